//! Groups end to end: real server, SDK clients, the HTTP API and raw frames.

use std::time::Duration;

use natter_client::{Client, ClientError, CreateGroup, Events, GroupView, Method};
use natter_proto::api::{
    JoinOutcome, JoinType, MemberPage, MemberView, ReadState, Role, SyncPage, UpdateGroup, Users,
};
use natter_proto::msg::{Content, GroupEvent, Message, MessageBody, MUTED_FOREVER};
use natter_proto::ErrorCode;
use natter_tests::*;
use serde_json::json;

/// The group event in a message, if it is one.
fn event_of(m: &Message) -> Option<&GroupEvent> {
    match m.body.as_ref().and_then(|b| b.content.as_ref()) {
        Some(Content::GroupEvent(e)) => Some(e),
        _ => None,
    }
}

/// The next chat message, skipping group events.
async fn next_chat(events: &mut Events) -> Message {
    loop {
        let m = next_message(events).await;
        if event_of(&m).is_none() {
            return m;
        }
    }
}

/// The next group event of `kind`, skipping everything else.
async fn next_event(events: &mut Events, kind: &str) -> (Message, GroupEvent) {
    loop {
        let m = next_message(events).await;
        if let Some(e) = event_of(&m) {
            if e.kind == kind {
                let e = e.clone();
                return (m, e);
            }
        }
    }
}

/// No chat message (group events aside) within `wait`.
async fn no_chat(events: &mut Events, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) | Ok(None) => return,
            Ok(Some(natter_client::Event::Message(m))) if event_of(&m).is_none() => {
                panic!("unexpected message {m:?}")
            }
            Ok(Some(_)) => continue,
        }
    }
}

fn rejected<T: std::fmt::Debug>(result: Result<T, ClientError>) -> (ErrorCode, Option<i64>) {
    match result {
        Err(ClientError::Rejected { code, until_ms, .. }) => (code, until_ms),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

async fn create(client: &Client, name: &str, members: &[u64], join_type: JoinType) -> GroupView {
    client
        .create_group(&CreateGroup {
            name: name.into(),
            avatar: String::new(),
            join_type,
            members: members.iter().map(|&n| u(n)).collect(),
        })
        .await
        .expect("group created")
}

async fn send(client: &Client, group: u64, text: &str) -> Result<u64, ClientError> {
    client
        .send_group(group, MessageBody::text(text))
        .await
        .map(|reply| reply.mid)
}

async fn put<T: serde::de::DeserializeOwned>(
    client: &Client,
    path: String,
    body: serde_json::Value,
) -> Result<T, ClientError> {
    client.call(Method::PUT, &path, Some(&body)).await
}

async fn post<T: serde::de::DeserializeOwned>(
    client: &Client,
    path: String,
    body: serde_json::Value,
) -> Result<T, ClientError> {
    client.call(Method::POST, &path, Some(&body)).await
}

async fn delete(client: &Client, path: String) -> Result<(), ClientError> {
    client.call(Method::DELETE, &path, None::<&()>).await
}

async fn get<T: serde::de::DeserializeOwned>(
    client: &Client,
    path: String,
) -> Result<T, ClientError> {
    client.call(Method::GET, &path, None::<&()>).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_messages_reach_every_member_device_once_numbered_in_order() {
    let server = TestServer::start(|_| {}).await;
    let (alice, mut alice_events) = server.client(1, "phone").await;
    let (_alice_laptop, mut alice_laptop_events) = server.client(1, "laptop").await;
    let (bob, mut bob_events) = server.client(2, "phone").await;
    let (_bob_tablet, mut bob_tablet_events) = server.client(2, "tablet").await;
    let (carol, mut carol_events) = server.client(3, "phone").await;
    let (dave, _dave_events) = server.client(4, "phone").await;

    let group = create(&alice, "team", &[2, 3, 2], JoinType::Approval).await;
    assert_eq!(
        (group.owner, group.member_count, group.role),
        (u(1), 3, Role::Owner)
    );
    // The creation is an event every member sees, kept in the history.
    let (created, event) = next_event(&mut bob_events, "created").await;
    assert_eq!(
        (event.actor, event.targets.clone(), event.value.as_str()),
        (ids(&[1]).remove(0), ids(&[2, 3]), "team")
    );
    assert_eq!(
        (created.group, created.conv_seq, created.receiver),
        (group.id, 1, String::new())
    );

    let first = alice
        .send_group(group.id, MessageBody::text("hello team"))
        .await
        .expect("acked");
    assert_eq!((first.conv_seq, first.user_seq), (2, 0));
    assert_eq!(first.conversation, format!("g:{}", group.id));
    let second = bob
        .send_group(group.id, MessageBody::text("hi"))
        .await
        .expect("acked");
    assert_eq!(second.conv_seq, 3, "one contiguous numbering for the group");

    for events in [
        &mut bob_tablet_events,
        &mut carol_events,
        &mut alice_laptop_events,
    ] {
        let m = next_chat(events).await;
        assert_eq!(
            (m.mid, m.group, m.conv_seq, m.sender.clone(), text_of(&m)),
            (first.mid, group.id, 2, ids(&[1]).remove(0), "hello team")
        );
        let m = next_chat(events).await;
        assert_eq!(
            (m.mid, m.conv_seq, m.sender),
            (second.mid, 3, u(2).to_string())
        );
    }
    // Each sender's other devices get a copy; the sending connection does not.
    let m = next_chat(&mut alice_events).await;
    assert_eq!(m.mid, second.mid);
    let m = next_chat(&mut bob_events).await;
    assert_eq!(m.mid, first.mid);
    no_chat(&mut bob_events, Duration::from_millis(200)).await;

    // Outsiders neither write nor read.
    assert_eq!(
        rejected(send(&dave, group.id, "let me in").await).0,
        ErrorCode::NotMember
    );
    assert_eq!(
        rejected(
            dave.history(&format!("g:{}", group.id), None, 10, &[])
                .await
        )
        .0,
        ErrorCode::NotMember
    );
    assert_eq!(
        rejected(get::<GroupView>(&dave, format!("/v1/groups/{}", group.id)).await).0,
        ErrorCode::NotMember
    );
    assert_eq!(
        rejected(send(&dave, 999_999, "nobody").await).0,
        ErrorCode::NotFound
    );
    // A message names a user or a group, not both.
    let both = dave
        .send_message(natter_proto::msg::SendMessage {
            client_seq: 77,
            receiver: u(1).to_string(),
            group: group.id,
            body: Some(MessageBody::text("x")),
        })
        .await;
    assert_eq!(rejected(both).0, ErrorCode::InvalidMessage);
    // Clients cannot forge group events.
    let forged = alice
        .send_group(
            group.id,
            MessageBody {
                content: Some(Content::GroupEvent(GroupEvent::default())),
            },
        )
        .await;
    assert_eq!(rejected(forged).0, ErrorCode::InvalidMessage);

    // The same client seq is the same message.
    let again = alice
        .send_group_with_seq(500, group.id, MessageBody::text("once"))
        .await
        .expect("acked");
    let repeat = alice
        .send_group_with_seq(500, group.id, MessageBody::text("once"))
        .await
        .expect("acked");
    assert!(repeat.repeat);
    assert_eq!((repeat.mid, repeat.conv_seq), (again.mid, again.conv_seq));

    let mine: Vec<GroupView> = get(&bob, "/v1/groups".into()).await.expect("my groups");
    assert_eq!(mine.len(), 1);
    assert_eq!(
        (mine[0].id, mine[0].role, mine[0].last_seq),
        (group.id, Role::Member, 4)
    );
    // Bob sent the message at 3: his cursor moved there. The group event
    // at 1 was never unread; alice's message at 4 is.
    assert_eq!((mine[0].read_seq, mine[0].unread), (3, 1));

    // The read cursor is per member, moves only forward, and stays in range.
    let read = format!("/v1/groups/{}/read", group.id);
    let state: ReadState = put(&bob, read.clone(), json!({"seq": 4}))
        .await
        .expect("read");
    assert_eq!((state.read_seq, state.unread), (4, 0));
    let state: ReadState = put(&bob, read.clone(), json!({"seq": 2}))
        .await
        .expect("read");
    assert_eq!((state.read_seq, state.unread), (4, 0));
    assert_eq!(
        rejected(put::<ReadState>(&bob, read.clone(), json!({"seq": 99})).await).0,
        ErrorCode::BadRequest
    );
    assert_eq!(
        rejected(put::<ReadState>(&dave, read.clone(), json!({"seq": 1})).await).0,
        ErrorCode::NotMember
    );
    let info: GroupView = get(&bob, format!("/v1/groups/{}", group.id))
        .await
        .expect("info");
    assert_eq!((info.read_seq, info.unread), (4, 0));
    let carol_view: GroupView = get(&carol, format!("/v1/groups/{}", group.id))
        .await
        .expect("info");
    assert_eq!(
        (carol_view.read_seq, carol_view.unread),
        (0, 3),
        "each member has their own"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mute_rules_and_admin_limit_are_enforced() {
    let server = TestServer::start(|c| {
        c.groups.max_admins = 1;
        c.groups.max_mute_secs = 3600;
    })
    .await;
    let (owner, _owner_events) = server.client(1, "phone").await;
    let (admin, _admin_events) = server.client(2, "phone").await;
    let (member, mut member_events) = server.client(3, "phone").await;
    let (other, _other_events) = server.client(4, "phone").await;
    let g = create(&owner, "rules", &[2, 3, 4], JoinType::Approval)
        .await
        .id;
    let path = |uid: u64, what: &str| format!("/v1/groups/{g}/members/u{uid}/{what}");

    // Roles: only the owner grants them, and the admin limit holds.
    assert_eq!(
        rejected(put::<MemberView>(&admin, path(3, "role"), json!({"role": "admin"})).await).0,
        ErrorCode::Forbidden
    );
    let made: MemberView = put(&owner, path(2, "role"), json!({"role": "admin"}))
        .await
        .expect("admin");
    assert_eq!(made.role, Role::Admin);
    assert_eq!(
        rejected(put::<MemberView>(&owner, path(3, "role"), json!({"role": "admin"})).await).0,
        ErrorCode::AdminLimit
    );

    // A timed mute: the send is refused with the end time, nothing is stored.
    let before = natter_node::ids::now_ms();
    let muted: MemberView = put(&admin, path(3, "mute"), json!({"duration_secs": 600}))
        .await
        .expect("muted");
    let until = muted.muted_until_ms.expect("muted until");
    assert!(until >= before + 600_000 && until <= natter_node::ids::now_ms() + 600_000);
    let (_, event) = next_event(&mut member_events, "muted").await;
    assert_eq!((event.targets.clone(), event.until_ms), (ids(&[3]), until));
    let (code, until_ms) = rejected(send(&member, g, "can I talk").await);
    assert_eq!((code, until_ms), (ErrorCode::Muted, Some(until)));
    let one: MemberView = get(&member, path(3, "").trim_end_matches('/').to_string())
        .await
        .expect("member");
    assert_eq!(
        one.muted_until_ms,
        Some(until),
        "anyone can see a member's mute end"
    );
    let page = member
        .history(&format!("g:{g}"), None, 50, &["text"])
        .await
        .expect("history");
    assert!(
        page.messages.is_empty(),
        "the refused message was not stored"
    );

    // Admins and the owner cannot be muted; members cannot mute; limits hold.
    assert_eq!(
        rejected(put::<MemberView>(&owner, path(2, "mute"), json!({"duration_secs": 60})).await).0,
        ErrorCode::Forbidden
    );
    assert_eq!(
        rejected(put::<MemberView>(&other, path(3, "mute"), json!({"duration_secs": 60})).await).0,
        ErrorCode::Forbidden
    );
    assert_eq!(
        rejected(put::<MemberView>(&admin, path(4, "mute"), json!({"duration_secs": 3601})).await)
            .0,
        ErrorCode::BadRequest
    );
    // Listing the muted is for admins.
    let list: Vec<MemberView> = get(&admin, format!("/v1/groups/{g}/muted"))
        .await
        .expect("list");
    assert_eq!(
        list.iter().map(|m| m.uid.clone()).collect::<Vec<_>>(),
        vec![u(3)]
    );
    assert_eq!(
        rejected(get::<Vec<MemberView>>(&other, format!("/v1/groups/{g}/muted")).await).0,
        ErrorCode::Forbidden
    );

    // 0 unmutes; -1 mutes forever; granting admin lifts a mute.
    let _: MemberView = put(&admin, path(3, "mute"), json!({"duration_secs": 0}))
        .await
        .expect("unmuted");
    send(&member, g, "free").await.expect("sent after unmute");
    let forever: MemberView = put(&admin, path(4, "mute"), json!({"duration_secs": -1}))
        .await
        .expect("muted");
    assert_eq!(forever.muted_until_ms, Some(MUTED_FOREVER));
    assert_eq!(
        rejected(send(&other, g, "x").await),
        (ErrorCode::Muted, Some(MUTED_FOREVER))
    );
    let _: MemberView = put(&owner, path(2, "role"), json!({"role": "member"}))
        .await
        .expect("demoted");
    let promoted: MemberView = put(&owner, path(4, "role"), json!({"role": "admin"}))
        .await
        .expect("promoted");
    assert_eq!(promoted.muted_until_ms, None);
    send(&other, g, "an admin now").await.expect("sent");

    // Everyone muted but the owner and admins.
    let _: GroupView = owner
        .call(
            Method::PATCH,
            &format!("/v1/groups/{g}"),
            Some(&UpdateGroup {
                mute_all: Some(true),
                ..Default::default()
            }),
        )
        .await
        .expect("mute all");
    assert_eq!(
        rejected(send(&member, g, "x").await),
        (ErrorCode::Muted, Some(MUTED_FOREVER))
    );
    send(&other, g, "admins talk").await.expect("admin sends");
    send(&owner, g, "owner talks").await.expect("owner sends");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_join_types_kick_transfer_and_dissolve() {
    let server = TestServer::start(|c| c.groups.max_members = 4).await;
    let (owner, _owner_events) = server.client(1, "phone").await;
    let (bob, mut bob_events) = server.client(2, "phone").await;
    let (carol, _carol_events) = server.client(3, "phone").await;
    let (dave, _dave_events) = server.client(4, "phone").await;
    let (erin, _erin_events) = server.client(5, "phone").await;

    // The member limit holds at creation and afterwards.
    let too_big = owner
        .create_group(&CreateGroup {
            name: "big".into(),
            members: vec![u(2), u(3), u(4), u(5)],
            ..Default::default()
        })
        .await;
    assert_eq!(rejected(too_big).0, ErrorCode::MemberLimit);
    let bad_name = owner
        .create_group(&CreateGroup {
            name: " ".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(rejected(bad_name).0, ErrorCode::BadRequest);

    // Approval: apply, an admin approves.
    let g = create(&owner, "club", &[2], JoinType::Approval).await.id;
    let applied: JoinOutcome = post(
        &carol,
        format!("/v1/groups/{g}/join"),
        json!({"message": "me too"}),
    )
    .await
    .expect("applied");
    assert!(!applied.joined);
    assert_eq!(rejected(send(&carol, g, "x").await).0, ErrorCode::NotMember);
    assert_eq!(
        rejected(get::<Vec<serde_json::Value>>(&bob, format!("/v1/groups/{g}/applications")).await)
            .0,
        ErrorCode::Forbidden
    );
    let apps: Vec<serde_json::Value> = get(&owner, format!("/v1/groups/{g}/applications"))
        .await
        .expect("apps");
    assert_eq!(apps[0]["uid"], "u3");
    post::<()>(
        &owner,
        format!("/v1/groups/{g}/applications/u3"),
        json!({"approve": true}),
    )
    .await
    .expect("approved");
    let (_, joined) = next_event(&mut bob_events, "joined").await;
    assert_eq!(joined.targets, ids(&[3]));
    send(&carol, g, "thanks").await.expect("member now");
    assert_eq!(
        rejected(
            post::<()>(
                &owner,
                format!("/v1/groups/{g}/applications/u3"),
                json!({"approve": true})
            )
            .await
        )
        .0,
        ErrorCode::NotFound
    );

    // Invites count against the limit; re-inviting members is a conflict.
    let added: Users = post(
        &bob,
        format!("/v1/groups/{g}/members"),
        json!({"users": ["u4"]}),
    )
    .await
    .expect("invited");
    assert_eq!(added.users, vec![u(4)]);
    assert_eq!(
        rejected(
            post::<Users>(
                &bob,
                format!("/v1/groups/{g}/members"),
                json!({"users": ["u5"]})
            )
            .await
        )
        .0,
        ErrorCode::MemberLimit
    );
    assert_eq!(
        rejected(
            post::<Users>(
                &bob,
                format!("/v1/groups/{g}/members"),
                json!({"users": ["u4"]})
            )
            .await
        )
        .0,
        ErrorCode::Conflict
    );
    let page: MemberPage = get(&dave, format!("/v1/groups/{g}/members?limit=3"))
        .await
        .expect("page");
    assert_eq!(
        page.members
            .iter()
            .map(|m| m.uid.clone())
            .collect::<Vec<_>>(),
        vec![u(1), u(2), u(3)]
    );
    assert_eq!(page.next_after, Some(u(3)));
    let rest: MemberPage = get(&dave, format!("/v1/groups/{g}/members?after=u3&limit=3"))
        .await
        .expect("page");
    assert_eq!((rest.members.len(), rest.next_after), (1, None));

    // Invite-only groups refuse joins; open groups take them.
    let closed = create(&owner, "closed", &[], JoinType::InviteOnly).await.id;
    assert_eq!(
        rejected(post::<JoinOutcome>(&erin, format!("/v1/groups/{closed}/join"), json!({})).await)
            .0,
        ErrorCode::Forbidden
    );
    let open = create(&owner, "open", &[], JoinType::Open).await.id;
    let joined: JoinOutcome = post(&erin, format!("/v1/groups/{open}/join"), json!({}))
        .await
        .expect("joined");
    assert!(joined.joined);
    assert_eq!(
        rejected(post::<JoinOutcome>(&erin, format!("/v1/groups/{open}/join"), json!({})).await).0,
        ErrorCode::Conflict
    );

    // Kicks: members cannot; the kicked member hears it, then nothing more.
    assert_eq!(
        rejected(delete(&carol, format!("/v1/groups/{g}/members/u2")).await).0,
        ErrorCode::Forbidden
    );
    delete(&owner, format!("/v1/groups/{g}/members/u2"))
        .await
        .expect("kicked");
    let (_, kicked) = next_event(&mut bob_events, "kicked").await;
    assert_eq!(
        (kicked.actor, kicked.targets.clone()),
        (u(1).to_string(), ids(&[2]))
    );
    send(&carol, g, "after the kick").await.expect("sent");
    no_chat(&mut bob_events, Duration::from_millis(300)).await;
    assert_eq!(rejected(send(&bob, g, "x").await).0, ErrorCode::NotMember);
    assert_eq!(
        rejected(bob.history(&format!("g:{g}"), None, 10, &[]).await).0,
        ErrorCode::NotMember
    );
    let (status, body) = server
        .get_json(&format!("/v1/sync?group={g}"), 2, "phone")
        .await;
    assert_eq!((status, body["code"].as_str()), (403, Some("not_member")));

    // The owner leaves only by handing over; then quits as a member.
    assert_eq!(
        rejected(delete(&owner, format!("/v1/groups/{g}/members/u1")).await).0,
        ErrorCode::Forbidden
    );
    assert_eq!(
        rejected(
            post::<GroupView>(
                &carol,
                format!("/v1/groups/{g}/transfer"),
                json!({"to": "u3"})
            )
            .await
        )
        .0,
        ErrorCode::Forbidden
    );
    let handed: GroupView = post(
        &owner,
        format!("/v1/groups/{g}/transfer"),
        json!({"to": "u3"}),
    )
    .await
    .expect("transferred");
    assert_eq!((handed.owner, handed.role), (u(3), Role::Member));
    delete(&owner, format!("/v1/groups/{g}/members/u1"))
        .await
        .expect("left");
    assert_eq!(rejected(send(&owner, g, "x").await).0, ErrorCode::NotMember);

    // Dissolved: nothing is accepted, members still read the history.
    assert_eq!(
        rejected(delete(&dave, format!("/v1/groups/{g}")).await).0,
        ErrorCode::Forbidden
    );
    delete(&carol, format!("/v1/groups/{g}"))
        .await
        .expect("dissolved");
    assert_eq!(
        rejected(send(&carol, g, "x").await).0,
        ErrorCode::GroupDissolved
    );
    assert_eq!(
        rejected(
            post::<Users>(
                &carol,
                format!("/v1/groups/{g}/members"),
                json!({"users": ["u5"]})
            )
            .await
        )
        .0,
        ErrorCode::GroupDissolved
    );
    let info: GroupView = get(&dave, format!("/v1/groups/{g}")).await.expect("info");
    assert!(info.dissolved);
    let history = dave
        .history(&format!("g:{g}"), None, 50, &["group_event"])
        .await
        .expect("history");
    let kinds: Vec<String> = history
        .messages
        .iter()
        .filter_map(|m| match &m.body {
            Some(Content::GroupEvent(e)) => Some(e.kind.clone()),
            _ => None,
        })
        .collect();
    // Dave joined by invite: his history starts there.
    assert_eq!(
        kinds,
        vec![
            "dissolved",
            "left",
            "owner_transferred",
            "kicked",
            "invited"
        ]
    );

    // Bad input gets clear errors.
    let (status, _) = server.get_json("/v1/groups/not-a-number", 3, "phone").await;
    assert_eq!(status, 400);
    let bad = carol
        .call::<serde_json::Value>(Method::POST, "/v1/groups", Some(&json!({"name": 5})))
        .await;
    assert_eq!(rejected(bad).0, ErrorCode::BadRequest);
    assert_eq!(
        rejected(get::<GroupView>(&carol, "/v1/groups/424242".into()).await).0,
        ErrorCode::NotFound
    );
    let _ = (erin, carol);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_members_catch_up_on_reconnect_and_late_joiners_see_from_their_join() {
    let mut server = TestServer::start(|_| {}).await;
    let (alice, _alice_events) = server.client(1, "phone").await;
    let (bob, mut bob_events) = server.client(2, "phone").await;
    let g = create(&alice, "catch-up", &[2], JoinType::Open).await.id;
    let (_, _) = next_event(&mut bob_events, "created").await;
    bob.close().await;
    drop(bob_events);

    let mut mids = Vec::new();
    for i in 0..5 {
        mids.push(
            send(&alice, g, &format!("while away {i}"))
                .await
                .expect("acked"),
        );
    }
    // Across a restart too: group messages and cursors are durable.
    server.restart().await;
    let (alice, _alice_events) = server.client(1, "phone").await;
    let (carol, _carol_events) = server.client(3, "phone").await;
    let joined: JoinOutcome = post(&carol, format!("/v1/groups/{g}/join"), json!({}))
        .await
        .expect("joined");
    assert!(joined.joined);
    let late = send(&alice, g, "after carol joined").await.expect("acked");

    // Bob's device syncs the group on reconnect, in order, nothing missing.
    let (_bob, mut bob_events) = server.client(2, "phone").await;
    let mut got = Vec::new();
    let mut seqs = Vec::new();
    while got.len() < 6 {
        let m = next_chat(&mut bob_events).await;
        seqs.push(m.conv_seq);
        got.push(m.mid);
    }
    let mut want = mids.clone();
    want.push(late);
    assert_eq!(got, want);
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in conv_seq order: {seqs:?}"
    );
    no_chat(&mut bob_events, Duration::from_millis(200)).await;
    // The client vouched for the last page it synced: the server's cursor
    // for bob's phone covers it, and a reconnect would resend nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = server
            .get_json(&format!("/v1/sync?group={g}"), 2, "phone")
            .await;
        assert_eq!(status, 200);
        let page: SyncPage = serde_json::from_value(body).expect("sync page");
        if page.messages.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stored cursor stays behind what was synced: {} unreceived",
            page.messages.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Carol's history and sync start at her join.
    let page = carol
        .history(&format!("g:{g}"), None, 50, &[])
        .await
        .expect("history");
    let texts: Vec<String> = page
        .messages
        .iter()
        .map(|m| match &m.body {
            Some(Content::Text(t)) => t.text.clone(),
            Some(Content::GroupEvent(e)) => e.kind.clone(),
            _ => String::new(),
        })
        .collect();
    assert_eq!(texts, vec!["after carol joined", "joined"]);
    let (status, body) = server
        .get_json(&format!("/v1/sync?group={g}&after=0"), 3, "phone")
        .await;
    assert_eq!(status, 200);
    let synced: SyncPage = serde_json::from_value(body).expect("sync page");
    assert_eq!(synced.messages.len(), 2);
    assert_eq!(synced.cursor, synced.messages[1].conv_seq);

    // Bob pages through the whole history, newest first.
    let first = alice
        .history(&format!("g:{g}"), None, 4, &["text"])
        .await
        .expect("page");
    assert_eq!(first.messages.len(), 4);
    let rest = alice
        .history(&format!("g:{g}"), first.next_before_mid(), 4, &["text"])
        .await
        .expect("page");
    assert_eq!(rest.messages.len(), 2);
    assert_eq!(rest.messages[1].mid, mids[0].to_string());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_and_grants_never_pass_the_limits() {
    let server = TestServer::start(|c| {
        c.groups.max_members = 10;
        c.groups.max_admins = 2;
    })
    .await;
    let (owner, _events) = server.client(1, "phone").await;
    let g = create(&owner, "race", &[], JoinType::Open).await.id;
    let http = reqwest::Client::new();
    // Thirty users race for nine free places.
    let joins = (100..130u64).map(|uid| {
        let request = http
            .post(server.url(&format!("/v1/groups/{g}/join")))
            .bearer_auth(server.token(uid, "phone"))
            .json(&json!({}));
        async move { request.send().await.expect("HTTP").status().as_u16() }
    });
    let statuses = futures_util::future::join_all(joins).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let full = statuses.iter().filter(|s| **s == 409).count();
    assert_eq!((ok, full), (9, 21), "{statuses:?}");
    let info: GroupView = get(&owner, format!("/v1/groups/{g}")).await.expect("info");
    assert_eq!(info.member_count, 10);

    // Grants race for two admin places.
    let members: MemberPage = get(&owner, format!("/v1/groups/{g}/members?limit=20"))
        .await
        .expect("members");
    let grants = members.members.iter().filter(|m| m.uid != u(1)).map(|m| {
        let request = http
            .put(server.url(&format!("/v1/groups/{g}/members/{}/role", m.uid)))
            .bearer_auth(server.token(1, "phone"))
            .json(&json!({"role": "admin"}));
        async move { request.send().await.expect("HTTP").status().as_u16() }
    });
    let statuses = futures_util::future::join_all(grants).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    let members: MemberPage = get(&owner, format!("/v1/groups/{g}/members?limit=20"))
        .await
        .expect("members");
    assert_eq!(
        members
            .members
            .iter()
            .filter(|m| m.role == Role::Admin)
            .count(),
        2
    );
    // Every change is in the history, in order, numbered without gaps.
    let page = owner
        .history(&format!("g:{g}"), None, 50, &["group_event"])
        .await
        .expect("history");
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.conv_seq).collect();
    let expected: Vec<u64> = (1..=12).rev().collect();
    assert_eq!(seqs, expected, "created, 9 joined, 2 role_changed");
    server.stop().await;
}
