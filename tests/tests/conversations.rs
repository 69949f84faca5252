//! Conversations end to end: the list with unread counts, read cursors and
//! their notifies, receipts, settings, revoke and edit, and typing, through
//! a real server, SDK clients and raw frames.

use std::time::Duration;

use natter_client::{Client, ClientError, CreateGroup, Event, Events, GroupView, Method};
use natter_proto::api::{
    ConversationPage, ConversationView, HistoryPage, PushMode, ReadState, ReceiptsView,
    SettingsView,
};
use natter_proto::msg::{
    Content, Edit, Message, MessageBody, ReadReceipt, Revoke, Text, TypingNotice,
};
use natter_proto::{ErrorCode, Frame, Op};
use natter_tests::*;
use serde_json::json;

async fn call<T: serde::de::DeserializeOwned>(
    client: &Client,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<T, ClientError> {
    client.call(method, path, body.as_ref()).await
}

fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Rejected { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn list(client: &Client, after: Option<&str>, limit: u32) -> ConversationPage {
    let path = match after {
        Some(after) => format!("/v1/conversations?limit={limit}&after={after}"),
        None => format!("/v1/conversations?limit={limit}"),
    };
    call(client, Method::GET, &path, None).await.expect("list")
}

async fn entry(client: &Client, conversation: &str) -> ConversationView {
    list(client, None, 100)
        .await
        .conversations
        .into_iter()
        .find(|c| c.conversation == conversation)
        .unwrap_or_else(|| panic!("{conversation} not in the list"))
}

async fn read(client: &Client, conversation: &str, seq: u64) -> Result<ReadState, ClientError> {
    call(
        client,
        Method::POST,
        &format!("/v1/conversations/{conversation}/read"),
        Some(json!({"seq": seq.to_string()})),
    )
    .await
}

/// The next read receipt, skipping everything else.
async fn next_read(events: &mut Events) -> ReadReceipt {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
            Ok(Some(Event::Read(r))) => return r,
            Ok(Some(_)) => continue,
            other => panic!("no read receipt: {other:?}"),
        }
    }
}

/// The next typing notice, skipping everything else.
async fn next_typing(events: &mut Events) -> TypingNotice {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
            Ok(Some(Event::Typing(t))) => return t,
            Ok(Some(_)) => continue,
            other => panic!("no typing notice: {other:?}"),
        }
    }
}

/// No event that `unwanted` matches within `wait`.
async fn none_of(events: &mut Events, wait: Duration, unwanted: fn(&Event) -> bool) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) | Ok(None) => return,
            Ok(Some(e)) if unwanted(&e) => panic!("unexpected {e:?}"),
            Ok(Some(_)) => continue,
        }
    }
}

fn revoke(mid: u64) -> MessageBody {
    MessageBody {
        content: Some(Content::Revoke(Revoke { mid })),
    }
}

fn edit(mid: u64, text: &str) -> MessageBody {
    MessageBody {
        content: Some(Content::Edit(Edit {
            mid,
            text: Some(Text {
                text: text.into(),
                mentions: vec![],
            }),
        })),
    }
}

fn refused(result: Result<natter_proto::msg::MessageReply, ClientError>) -> ErrorCode {
    code(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_read_cursors_and_read_notifies_in_one_to_one() {
    let server = TestServer::start(|_| {}).await;
    let (alice, mut alice_events) = server.client("alice", "phone").await;
    let (bob, _bob_events) = server.client("bob", "phone").await;
    let (_bob_laptop, mut bob_laptop_events) = server.client("bob", "laptop").await;
    let (carol, _carol_events) = server.client("carol", "phone").await;
    let conv = "p:alice:bob";

    let mut last = 0;
    for i in 0..3 {
        last = alice
            .send(
                &"bob".parse().expect("uid"),
                MessageBody::text(format!("m{i}")),
            )
            .await
            .expect("sent")
            .mid;
    }
    // Bob has three unread; alice's own messages are never unread to her.
    let b = entry(&bob, conv).await;
    assert_eq!((b.last_seq, b.read_seq, b.unread), (3, 0, 3));
    assert_eq!(b.peer.as_ref().map(|p| p.as_str()), Some("alice"));
    let last_message = b.last_message.expect("a last message");
    assert_eq!(last_message.mid, last.to_string());
    let a = entry(&alice, conv).await;
    assert_eq!((a.read_seq, a.unread, a.peer_read_seq), (3, 0, Some(0)));

    // Bob reads up to 2 on the phone: alice and bob's laptop are told.
    let state = read(&bob, conv, 2).await.expect("read");
    assert_eq!((state.read_seq, state.unread), (2, 1));
    for events in [&mut alice_events, &mut bob_laptop_events] {
        let receipt = next_read(events).await;
        assert_eq!(
            (
                receipt.conversation.as_str(),
                receipt.reader.as_str(),
                receipt.seq
            ),
            (conv, "bob", 2)
        );
    }
    assert_eq!(entry(&alice, conv).await.peer_read_seq, Some(2));
    // The cursor never moves back, and a repeat tells no one.
    let state = read(&bob, conv, 1).await.expect("read");
    assert_eq!((state.read_seq, state.unread), (2, 1));
    none_of(&mut alice_events, Duration::from_millis(300), |e| {
        matches!(e, Event::Read(_))
    })
    .await;
    // Past the newest message, or someone else's conversation: refused.
    assert_eq!(code(read(&bob, conv, 4).await), ErrorCode::BadRequest);
    assert_eq!(code(read(&carol, conv, 1).await), ErrorCode::Forbidden);
    assert_eq!(code(read(&bob, "p:bob", 1).await), ErrorCode::BadRequest);

    // Bob answers: sending reads everything before it.
    bob.send(&"alice".parse().expect("uid"), MessageBody::text("hi"))
        .await
        .expect("sent");
    let b = entry(&bob, conv).await;
    assert_eq!((b.last_seq, b.read_seq, b.unread), (4, 4, 0));
    let a = entry(&alice, conv).await;
    assert_eq!((a.read_seq, a.unread), (3, 1));

    // Receipts of alice's third message: bob has read it.
    let receipts: ReceiptsView = call(
        &alice,
        Method::GET,
        &format!("/v1/conversations/{conv}/messages/{last}/receipts"),
        None,
    )
    .await
    .expect("receipts");
    assert_eq!(receipts.read_count, 1);
    let readers = receipts
        .readers
        .expect("one-to-one receipts name the reader");
    assert_eq!(readers[0].uid.as_str(), "bob");
    assert_eq!(
        code(
            call::<ReceiptsView>(
                &carol,
                Method::GET,
                &format!("/v1/conversations/{conv}/messages/{last}/receipts"),
                None,
            )
            .await
        ),
        ErrorCode::Forbidden
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_pages_by_key_pinned_first_newest_first() {
    let server = TestServer::start(|_| {}).await;
    let (me, _events) = server.client("me", "phone").await;
    let mut peers = Vec::new();
    for i in 0..7 {
        let peer = format!("peer{i}");
        me.send(&peer.parse().expect("uid"), MessageBody::text("hello"))
            .await
            .expect("sent");
        peers.push(format!("p:me:{peer}"));
    }
    // Pin the oldest one: it comes first.
    let settings: SettingsView = call(
        &me,
        Method::PUT,
        &format!("/v1/conversations/{}/settings", peers[0]),
        Some(json!({"pinned": true, "push": "mentions"})),
    )
    .await
    .expect("settings");
    assert_eq!((settings.pinned, settings.push), (true, PushMode::Mentions));
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = list(&me, after.as_deref(), 3).await;
        assert!(page.conversations.len() <= 3);
        seen.extend(page.conversations.iter().map(|c| c.conversation.clone()));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let mut expected = vec![peers[0].clone()];
    expected.extend(peers[1..].iter().rev().cloned());
    assert_eq!(seen, expected, "pinned first, then newest first, each once");
    let pinned = entry(&me, &peers[0]).await;
    assert_eq!((pinned.pinned, pinned.push), (true, PushMode::Mentions));

    for bad in ["/v1/conversations?limit=0", "/v1/conversations?after=x.y"] {
        assert_eq!(
            code(call::<ConversationPage>(&me, Method::GET, bad, None).await),
            ErrorCode::BadRequest,
            "{bad}"
        );
    }
    assert_eq!(
        code(
            call::<SettingsView>(
                &me,
                Method::PUT,
                "/v1/conversations/p:x:y/settings",
                Some(json!({"pinned": true})),
            )
            .await
        ),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(
            call::<SettingsView>(
                &me,
                Method::PUT,
                &format!("/v1/conversations/{}/settings", peers[1]),
                Some(json!({"push": "loud"})),
            )
            .await
        ),
        ErrorCode::BadRequest
    );
    server.stop().await;
}

/// The text or revoked state of a message in history.
async fn history(client: &Client, conversation: &str) -> HistoryPage {
    call(
        client,
        Method::GET,
        &format!("/v1/conversations/{conversation}/messages?limit=100"),
        None,
    )
    .await
    .expect("history")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_revokes_reach_every_device_and_an_offline_one_never_sees_the_original() {
    let server = TestServer::start(|_| {}).await;
    let (alice, _alice_events) = server.client("alice", "phone").await;
    let (bob, mut bob_events) = server.client("bob", "phone").await;
    let bob_id = "bob".parse().expect("uid");
    let alice_id = "alice".parse().expect("uid");
    // Bob's tablet has synced once and goes offline.
    let (bob_tablet, tablet_events) = server.client("bob", "tablet").await;
    bob_tablet.close().await;
    drop(tablet_events);

    let secret = alice
        .send(&bob_id, MessageBody::text("the secret is swordfish"))
        .await
        .expect("sent");
    let typo = alice
        .send(&bob_id, MessageBody::text("see you tomorow"))
        .await
        .expect("sent");
    assert_eq!(
        text_of(&next_message(&mut bob_events).await),
        "the secret is swordfish"
    );
    next_message(&mut bob_events).await;

    // Edit: the event reaches bob; history shows the new text, marked.
    let edited = alice
        .send(&bob_id, edit(typo.mid, "see you tomorrow"))
        .await
        .expect("edited");
    assert_eq!(edited.conv_seq, 3, "an edit takes a position");
    let event = next_message(&mut bob_events).await;
    assert!(matches!(
        event.body.as_ref().and_then(|b| b.content.as_ref()),
        Some(Content::Edit(e)) if e.mid == typo.mid
    ));
    // Revoke: bob's phone gets the event; the content is gone from history.
    let revoked_seq = 1_000;
    let revoked = alice
        .send_with_seq(revoked_seq, &bob_id, revoke(secret.mid))
        .await
        .expect("revoked");
    let event = next_message(&mut bob_events).await;
    assert_eq!(event.mid, revoked.mid);
    let page = history(&bob, "p:alice:bob").await;
    let original = page
        .messages
        .iter()
        .find(|m| m.mid == secret.mid.to_string())
        .expect("the revoked message is still listed");
    assert!(original.body.is_none() && original.revoked_ms.is_some());
    let fixed = page
        .messages
        .iter()
        .find(|m| m.mid == typo.mid.to_string())
        .expect("the edited message");
    assert!(fixed.edited_ms.is_some());
    assert!(matches!(&fixed.body, Some(Content::Text(t)) if t.text == "see you tomorrow"));
    let json = serde_json::to_string(&page).expect("serializes");
    assert!(
        !json.contains("swordfish") && !json.contains("tomorow"),
        "{json}"
    );

    // The offline tablet syncs: the changed states, never the originals.
    let (_tablet, mut tablet_events) = server.client("bob", "tablet").await;
    let mut synced: Vec<Message> = Vec::new();
    while synced.len() < 4 {
        synced.push(next_message(&mut tablet_events).await);
    }
    for m in &synced {
        let text = format!("{:?}", m.body);
        assert!(
            !text.contains("swordfish") && !text.contains("tomorow"),
            "{m:?}"
        );
    }
    let first = synced.iter().find(|m| m.mid == secret.mid).expect("synced");
    assert!(first.body.is_none() && first.revoked_ms != 0);

    // Someone else's message, a revoked one, an unknown one: refused.
    assert_eq!(
        refused(bob.send(&alice_id, revoke(typo.mid)).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        refused(bob.send(&alice_id, edit(typo.mid, "x")).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        refused(alice.send(&bob_id, edit(secret.mid, "x")).await),
        ErrorCode::Conflict
    );
    // A resent revoke gets its first answer; revoking again changes nothing.
    let again = alice
        .send_with_seq(revoked_seq, &bob_id, revoke(secret.mid))
        .await
        .expect("resent");
    assert!(again.repeat && again.mid == revoked.mid);
    assert_eq!(
        refused(alice.send(&bob_id, revoke(12345)).await),
        ErrorCode::NotFound
    );
    // A message of another conversation is not found through this one.
    let other = alice
        .send(
            &"carol".parse().expect("uid"),
            MessageBody::text("hi carol"),
        )
        .await
        .expect("sent");
    assert_eq!(
        refused(alice.send(&bob_id, revoke(other.mid)).await),
        ErrorCode::NotFound
    );
    // Edits and revokes are not unread.
    assert_eq!(entry(&bob, "p:alice:bob").await.unread, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revoke_window_closes() {
    let server = TestServer::start(|c| {
        c.conversations.revoke_window_secs = 1;
        c.conversations.edit_window_secs = 1;
    })
    .await;
    let (alice, _alice_events) = server.client("alice", "phone").await;
    let bob_id = "bob".parse().expect("uid");
    let early = alice
        .send(&bob_id, MessageBody::text("quick"))
        .await
        .expect("sent");
    alice
        .send(&bob_id, edit(early.mid, "quick!"))
        .await
        .expect("edited in time");
    let late = alice
        .send(&bob_id, MessageBody::text("slow"))
        .await
        .expect("sent");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        refused(alice.send(&bob_id, revoke(late.mid)).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        refused(alice.send(&bob_id, edit(late.mid, "x")).await),
        ErrorCode::Forbidden
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_receipts_typing_and_moderation() {
    let server = TestServer::start(|c| c.conversations.receipt_detail_max_members = 3).await;
    let (alice, mut alice_events) = server.client("alice", "phone").await;
    let (bob, mut bob_events) = server.client("bob", "phone").await;
    let (carol, mut carol_events) = server.client("carol", "phone").await;
    let (dave, _dave_events) = server.client("dave", "phone").await;
    let group: GroupView = alice
        .create_group(&CreateGroup {
            name: "trio".into(),
            members: vec!["bob".parse().expect("uid"), "carol".parse().expect("uid")],
            ..Default::default()
        })
        .await
        .expect("created");
    let conv = format!("g:{}", group.id);
    let hello = alice
        .send_group(group.id, MessageBody::text("hello all"))
        .await
        .expect("sent");
    let from_bob = bob
        .send_group(group.id, MessageBody::text("bob here"))
        .await
        .expect("sent");

    // Carol has two unread (group events are not counted); alice one.
    let c = entry(&carol, &conv).await;
    assert_eq!((c.unread, c.group), (2, Some(group.id)));
    assert_eq!(entry(&alice, &conv).await.unread, 1);
    assert_eq!(entry(&bob, &conv).await.unread, 0);

    // Carol reads alice's message: a small group's members are told.
    read(&carol, &conv, hello.conv_seq).await.expect("read");
    for events in [&mut alice_events, &mut bob_events] {
        let receipt = next_read(events).await;
        assert_eq!(
            (receipt.reader.as_str(), receipt.seq),
            ("carol", hello.conv_seq)
        );
    }
    let path = format!("/v1/conversations/{conv}/messages/{}/receipts", hello.mid);
    let receipts: ReceiptsView = call(&alice, Method::GET, &path, None)
        .await
        .expect("receipts");
    // Carol read it, and bob read it by sending after it; alice sent it.
    assert_eq!(receipts.read_count, 2);
    let mut names: Vec<String> = receipts
        .readers
        .expect("a small group names its readers")
        .iter()
        .map(|r| r.uid.to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["bob", "carol"]);
    assert_eq!(
        code(call::<ReceiptsView>(&dave, Method::GET, &path, None).await),
        ErrorCode::NotMember
    );
    // The old group route moves the same cursor.
    let state: ReadState = call(
        &carol,
        Method::PUT,
        &format!("/v1/groups/{}/read", group.id),
        Some(json!({"seq": from_bob.conv_seq.to_string()})),
    )
    .await
    .expect("read");
    assert_eq!((state.read_seq, state.unread), (from_bob.conv_seq, 0));

    // Typing reaches the other members online, never the typist, and is limited.
    let frame_seq = 7;
    let mut raw = server.raw("carol", "laptop").await;
    let typing = natter_proto::msg::Typing {
        conversation: conv.clone(),
    };
    raw.send(&Frame::new(Op::Typing, frame_seq, 0, &typing))
        .await
        .expect("typing sent");
    for events in [&mut alice_events, &mut bob_events] {
        let notice = next_typing(events).await;
        assert_eq!(
            (notice.user.as_str(), notice.conversation.as_str()),
            ("carol", conv.as_str())
        );
    }
    none_of(&mut carol_events, Duration::from_millis(300), |e| {
        matches!(e, Event::Typing(_))
    })
    .await;
    let mut limited = false;
    for i in 0..20 {
        raw.send(&Frame::new(Op::Typing, 100 + i, 0, &typing))
            .await
            .expect("typing sent");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        let frame = next_reply(&mut raw).await;
        if frame.op == Op::Error {
            let error: natter_proto::msg::ErrorReply = frame.message().expect("error body");
            assert_eq!(error.code, ErrorCode::RateLimited as u32);
            limited = true;
            break;
        }
    }
    assert!(limited, "typing is rate limited per user");
    // Typing in someone else's conversation is refused.
    let stranger = natter_proto::msg::Typing {
        conversation: "p:alice:bob".into(),
    };
    let mut raw_dave = server.raw("dave", "laptop").await;
    raw_dave
        .send(&Frame::new(Op::Typing, 3, 0, &stranger))
        .await
        .expect("sent");
    let frame = next_reply(&mut raw_dave).await;
    assert_eq!((frame.op, frame.seq), (Op::Error, 3));

    // A member revokes only their own message; the owner any.
    assert_eq!(
        refused(bob.send_group(group.id, revoke(hello.mid)).await),
        ErrorCode::Forbidden
    );
    alice
        .send_group(group.id, revoke(from_bob.mid))
        .await
        .expect("the owner moderates");
    assert_eq!(
        refused(dave.send_group(group.id, revoke(hello.mid)).await),
        ErrorCode::NotMember
    );
    server.stop().await;
}
