//! The behaviour every [`MessageStore`] must have, as one suite that each
//! implementation's tests run against a fresh store.

use std::future::Future;

use natter_proto::msg::{Content, Edit, GroupEvent, Image, MessageBody, MessageType, Revoke, Text};
use prost::Message as _;

use natter_proto::UserId;

use crate::store::*;

static NEXT_MID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1_000);

/// The suite's user number `n`: the user id `u{n}`. (Cases about the ids
/// themselves use [`UserId`]s of their own.)
pub fn u(n: u64) -> UserId {
    UserId::parse(&format!("u{n}")).expect("a valid user id")
}

/// A text message from `sender` ("phone") to `receiver` with `client_seq`.
pub fn text(sender: u64, receiver: u64, client_seq: u64) -> NewMessage {
    typed(
        u(sender),
        Peer::User(u(receiver)),
        client_seq,
        MessageBody::text(format!("{sender}->{receiver} #{client_seq}")),
    )
}

fn typed(sender: UserId, to: Peer, client_seq: u64, body: MessageBody) -> NewMessage {
    let mid = NEXT_MID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    NewMessage {
        mid,
        time_ms: 1_700_000_000_000 + mid as i64,
        sender,
        sender_device: "phone".into(),
        client_seq,
        to,
        msg_type: body.message_type().map(|t| t as u32).unwrap_or(0),
        content: body.encode_to_vec(),
    }
}

/// Stores one text message and returns what the store says.
pub async fn store_one(
    store: &dyn MessageStore,
    sender: u64,
    receiver: u64,
    client_seq: u64,
) -> Stored {
    let outcomes = store
        .write_batch(&[Write::Message(text(sender, receiver, client_seq))])
        .await
        .expect("write");
    match outcomes.into_iter().next() {
        Some(Outcome::Stored(stored)) => stored,
        other => panic!("expected a stored message, got {other:?}"),
    }
}

/// Runs every case of the suite, each against a store from `make`.
pub async fn run_all<S, F, Fut>(make: F)
where
    S: MessageStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    sequences_are_contiguous(&make().await).await;
    resend_is_deduplicated(&make().await).await;
    history_pages_before_a_mid(&make().await).await;
    sync_returns_the_stream_in_order(&make().await).await;
    cursors_follow_acks(&make().await).await;
    message_to_oneself(&make().await).await;
    expiry_deletes_old_messages_only(&make().await).await;
    group_messages_are_stored_once_and_numbered(&make().await).await;
    group_history_pages_from_a_join_point(&make().await).await;
    group_cursors_are_per_device_and_group(&make().await).await;
    device_ids_are_case_sensitive(&make().await).await;
    pages_stop_at_their_byte_budget(&make().await).await;
    user_ids_are_compared_byte_for_byte(&make().await).await;
    logouts_are_kept_per_user_and_never_move_back(&make().await).await;
    conversation_list_counts_what_others_sent(&make().await).await;
    conversation_pages_never_repeat_or_skip(&make().await).await;
    read_cursors_only_move_forward_and_stop_at_the_newest(&make().await).await;
    markers_are_not_unread(&make().await).await;
    revoke_and_edit_change_their_target_only(&make().await).await;
    groups_count_from_the_join_point(&make().await).await;
    group_readers_and_settings_and_forgetting(&make().await).await;
}

/// A user's logout time is kept byte for byte by id, a later logout
/// replaces it, and an earlier one leaves it.
async fn logouts_are_kept_per_user_and_never_move_back(store: &dyn MessageStore) {
    let id = |s: &str| UserId::parse(s).expect("a valid user id");
    let (upper, lower) = (id("Carol"), id("carol"));
    assert_eq!(store.logged_out_at(&upper).await.expect("read"), None);
    store
        .log_out(&upper, 1_700_000_000_000)
        .await
        .expect("log out");
    assert_eq!(
        store.logged_out_at(&upper).await.expect("read"),
        Some(1_700_000_000_000)
    );
    assert_eq!(
        store.logged_out_at(&lower).await.expect("read"),
        None,
        "another user"
    );
    store
        .log_out(&upper, 1_700_000_005_000)
        .await
        .expect("later");
    store
        .log_out(&upper, 1_600_000_000_000)
        .await
        .expect("earlier");
    assert_eq!(
        store.logged_out_at(&upper).await.expect("read"),
        Some(1_700_000_005_000),
        "the later time stays"
    );
    let long = id(&"L".repeat(64));
    store.log_out(&long, 5).await.expect("a 64-byte id");
    assert_eq!(store.logged_out_at(&long).await.expect("read"), Some(5));
}

/// Ids that differ only in case are two users with streams of their own;
/// a 64-byte id is stored whole; conversation ids put the byte-wise smaller
/// id first (`B` is 0x42, `a` is 0x61).
async fn user_ids_are_compared_byte_for_byte(store: &dyn MessageStore) {
    let id = |s: &str| UserId::parse(s).expect("a valid user id");
    let (upper, lower, long) = (id("Bob"), id("bob"), id(&"Z9.-_@".repeat(11)[..64]));
    let send = |from: &UserId, to: &UserId, seq: u64| {
        Write::Message(typed(
            from.clone(),
            Peer::User(to.clone()),
            seq,
            MessageBody::text("hi"),
        ))
    };
    let outcomes = store
        .write_batch(&[
            send(&upper, &lower, 1),
            send(&lower, &upper, 1),
            send(&long, &lower, 1),
            send(&upper, &lower, 1),
        ])
        .await
        .expect("write");
    let stored: Vec<&Stored> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Stored(s) => s,
            other => panic!("expected a stored message, got {other:?}"),
        })
        .collect();
    assert_eq!(stored[0].message.conversation, "p:Bob:bob");
    assert_eq!(stored[1].message.conversation, "p:Bob:bob");
    assert_eq!(
        stored[2].message.conversation,
        format!("p:{long}:bob"),
        "'Z' (0x5a) sorts before 'b'"
    );
    // (Bob, phone, 1) and (bob, phone, 1) are two senders' first messages.
    assert!(!stored[1].repeat, "another sender's client seq 1");
    assert!(stored[3].repeat, "Bob's resend");
    assert_eq!(
        (stored[0].sender_seq, stored[0].receiver_seq),
        (1, 1),
        "Bob's and bob's streams are their own"
    );
    assert_eq!((stored[1].sender_seq, stored[1].receiver_seq), (2, 2));
    assert_eq!(stored[2].receiver_seq, 3);
    let bobs = store.sync(&lower, 0, 10.into()).await.expect("sync").items;
    assert_eq!(bobs.len(), 3);
    assert_eq!(
        bobs[2].message.sender, long,
        "a 64-byte id comes back whole"
    );
    let uppers = store.sync(&upper, 0, 10.into()).await.expect("sync").items;
    assert_eq!(uppers.len(), 2);
    let history = store
        .history(&HistoryQuery {
            owner: long.clone(),
            other: lower.clone(),
            before: None,
            limit: 10.into(),
            types: Vec::new(),
        })
        .await
        .expect("history");
    assert_eq!(history.items.len(), 1);
    assert_eq!(history.items[0].to.user(), Some(&lower));
    let none = store
        .history(&HistoryQuery {
            owner: id("BOB"),
            other: lower.clone(),
            before: None,
            limit: 10.into(),
            types: Vec::new(),
        })
        .await
        .expect("history");
    assert!(none.items.is_empty(), "BOB is nobody here");
}

/// Stores a message of `size` bytes of custom data (to a group with `group`).
async fn store_large(store: &dyn MessageStore, to: u64, client_seq: u64, size: usize, group: bool) {
    let to = if group {
        Peer::Group(to)
    } else {
        Peer::User(u(to))
    };
    let message = typed(
        u(1),
        to,
        client_seq,
        MessageBody::custom("blob", vec![7; size]),
    );
    store
        .write_batch(&[Write::Message(message)])
        .await
        .expect("write");
}

async fn pages_stop_at_their_byte_budget(store: &dyn MessageStore) {
    for i in 1..=5 {
        store_large(store, 2, i, 1000, false).await;
        store_large(store, 9, 100 + i, 1000, true).await;
    }
    let all = store.sync(&u(2), 0, 100.into()).await.expect("sync");
    assert_eq!((all.items.len(), all.more), (5, false));
    let one = all.items[0].message.page_bytes();
    assert!(one > 1000, "{one}");
    let seqs = |page: &Page<SyncItem>| page.items.iter().map(|i| i.user_seq).collect::<Vec<_>>();

    // Two and a half messages' worth: two, and more follow.
    let page = store
        .sync(&u(2), 0, PageLimit::new(100, 2 * one + one / 2))
        .await
        .expect("sync");
    assert_eq!((seqs(&page), page.more), (vec![1, 2], true));
    // Exactly two fit.
    let page = store
        .sync(&u(2), 2, PageLimit::new(100, 2 * one))
        .await
        .expect("sync");
    assert_eq!((seqs(&page), page.more), (vec![3, 4], true));
    // A message larger than the budget comes alone, so paging progresses.
    let page = store
        .sync(&u(2), 0, PageLimit::new(100, one / 2))
        .await
        .expect("sync");
    assert_eq!((seqs(&page), page.more), (vec![1], true));
    // The rest fits: the last page says so.
    let page = store
        .sync(&u(2), 3, PageLimit::new(100, 10 * one))
        .await
        .expect("sync");
    assert_eq!((seqs(&page), page.more), (vec![4, 5], false));
    // A page full by count may have more.
    let page = store.sync(&u(2), 0, 5.into()).await.expect("sync");
    assert!(page.more);

    let group = store
        .group_sync(9, 0, PageLimit::new(100, 2 * one + one / 2))
        .await
        .expect("sync");
    let conv_seqs =
        |page: &Page<StoredMessage>| page.items.iter().map(|m| m.conv_seq).collect::<Vec<_>>();
    assert_eq!((conv_seqs(&group), group.more), (vec![1, 2], true));
    let history = store
        .history(&HistoryQuery {
            owner: u(2),
            other: u(1),
            before: None,
            limit: PageLimit::new(100, 2 * one + one / 2),
            types: vec![],
        })
        .await
        .expect("history");
    assert_eq!((conv_seqs(&history), history.more), (vec![5, 4], true));
    let history = store
        .group_history(&GroupHistoryQuery {
            group: 9,
            from_seq: 1,
            before: None,
            limit: PageLimit::new(100, one / 2),
            types: vec![],
        })
        .await
        .expect("history");
    assert_eq!((conv_seqs(&history), history.more), (vec![5], true));
    let history = store
        .group_history(&GroupHistoryQuery {
            group: 9,
            from_seq: 1,
            before: None,
            limit: PageLimit::new(100, 10 * one),
            types: vec![],
        })
        .await
        .expect("history");
    assert_eq!(history.items.len(), 5);
    assert!(!history.more);
}

/// A text message from `sender` ("phone") to `group` with `client_seq`.
pub fn group_text(sender: u64, group: u64, client_seq: u64) -> NewMessage {
    typed(
        u(sender),
        Peer::Group(group),
        client_seq,
        MessageBody::text(format!("{sender}->g{group} #{client_seq}")),
    )
}

/// Stores one group text message and returns what the store says.
pub async fn store_group_one(
    store: &dyn MessageStore,
    sender: u64,
    group: u64,
    client_seq: u64,
) -> Stored {
    let outcomes = store
        .write_batch(&[Write::Message(group_text(sender, group, client_seq))])
        .await
        .expect("write");
    match outcomes.into_iter().next() {
        Some(Outcome::Stored(stored)) => stored,
        other => panic!("expected a stored message, got {other:?}"),
    }
}

async fn group_messages_are_stored_once_and_numbered(store: &dyn MessageStore) {
    let a = store_group_one(store, 1, 7, 1).await;
    let b = store_group_one(store, 2, 7, 1).await;
    let other = store_group_one(store, 1, 8, 2).await;
    assert_eq!(a.message.conversation, "g:7");
    assert_eq!(a.message.group(), Some(7));
    assert_eq!((a.message.conv_seq, b.message.conv_seq), (1, 2));
    assert_eq!(other.message.conv_seq, 1, "each group numbers its own");
    assert_eq!((a.sender_seq, a.receiver_seq), (0, 0));
    // A group message is in no user's stream.
    assert!(store
        .sync(&u(1), 0, 10.into())
        .await
        .expect("sync")
        .items
        .is_empty());
    assert!(store
        .sync(&u(7), 0, 10.into())
        .await
        .expect("sync")
        .items
        .is_empty());
    // The same (sender, device, client seq) is the same message, across
    // batches and within one.
    let again = store_group_one(store, 1, 7, 1).await;
    assert!(again.repeat);
    assert_eq!(again.message.mid, a.message.mid);
    let twice = store
        .write_batch(&[
            Write::Message(group_text(3, 7, 1)),
            Write::Message(group_text(3, 7, 1)),
        ])
        .await
        .expect("batch");
    let seqs: Vec<(u64, bool)> = twice
        .iter()
        .map(|o| match o {
            Outcome::Stored(s) => (s.message.conv_seq, s.repeat),
            Outcome::Done | Outcome::Reused | Outcome::Read(_) => panic!("a message"),
        })
        .collect();
    assert_eq!(seqs, vec![(3, false), (3, true)]);
    // A client seq used for a group message is not a one-to-one message, nor
    // one to another group: nothing is stored, nobody gets it.
    let reused = store
        .write_batch(&[
            Write::Message(text(1, 7, 1)),
            Write::Message(group_text(1, 8, 1)),
        ])
        .await
        .expect("batch");
    assert_eq!(reused, vec![Outcome::Reused, Outcome::Reused]);
    let synced = store.group_sync(7, 0, 10.into()).await.expect("sync").items;
    let numbers: Vec<u64> = synced.iter().map(|m| m.conv_seq).collect();
    assert_eq!(numbers, vec![1, 2, 3]);
    assert_eq!(synced[0].to_proto(0).group, 7);
    assert_eq!(synced[0].to_proto(0).receiver, "");
    let after = store.group_sync(7, 2, 10.into()).await.expect("sync").items;
    assert_eq!(after.len(), 1);
    assert_eq!(
        store.group_seqs(&[7, 8, 9]).await.expect("seqs"),
        vec![3, 1, 0]
    );
}

async fn group_history_pages_from_a_join_point(store: &dyn MessageStore) {
    let mut mids = Vec::new();
    for i in 1..=10 {
        mids.push(store_group_one(store, 1 + i % 3, 5, i).await.message.mid);
    }
    let page = |from_seq, before, limit: u32| GroupHistoryQuery {
        group: 5,
        from_seq,
        before,
        limit: limit.into(),
        types: vec![],
    };
    let first = store
        .group_history(&page(1, None, 4))
        .await
        .expect("page")
        .items;
    let seqs: Vec<u64> = first.iter().map(|m| m.conv_seq).collect();
    assert_eq!(seqs, vec![10, 9, 8, 7]);
    let next = store
        .group_history(&page(1, Some(first[3].mid), 4))
        .await
        .expect("page")
        .items;
    let seqs: Vec<u64> = next.iter().map(|m| m.conv_seq).collect();
    assert_eq!(seqs, vec![6, 5, 4, 3]);
    // A reader who joined at 5 sees nothing before it.
    let late = store
        .group_history(&page(5, Some(first[3].mid), 10))
        .await
        .expect("page")
        .items;
    let seqs: Vec<u64> = late.iter().map(|m| m.conv_seq).collect();
    assert_eq!(seqs, vec![6, 5]);
    // A mid from elsewhere bounds nothing in this group.
    let foreign = store_one(store, 1, 2, 99).await.message.mid;
    assert!(store
        .group_history(&page(1, Some(foreign), 10))
        .await
        .expect("page")
        .items
        .is_empty());
    let typed = GroupHistoryQuery {
        types: vec![MessageType::Image as u32],
        ..page(1, None, 10)
    };
    assert!(store
        .group_history(&typed)
        .await
        .expect("page")
        .items
        .is_empty());
    assert_eq!(mids.len(), 10);
}

async fn group_cursors_are_per_device_and_group(store: &dyn MessageStore) {
    for i in 1..=3 {
        store_group_one(store, 1, 4, i).await;
    }
    // The sending device holds what it sent; nobody else does.
    assert_eq!(store.cursor(&u(1), "phone", 4).await.expect("cursor"), 3);
    assert_eq!(store.cursor(&u(1), "phone", 0).await.expect("cursor"), 0);
    assert_eq!(store.cursor(&u(2), "phone", 4).await.expect("cursor"), 0);
    let ack = |seq| Write::Received {
        floor: 0,
        owner: u(2),
        device: "phone".into(),
        group: 4,
        seq,
    };
    store.write_batch(&[ack(1), ack(3)]).await.expect("acks");
    assert_eq!(store.cursor(&u(2), "phone", 4).await.expect("cursor"), 1);
    store.write_batch(&[ack(2)]).await.expect("acks");
    assert_eq!(store.cursor(&u(2), "phone", 4).await.expect("cursor"), 3);
    assert_eq!(store.cursor(&u(2), "laptop", 4).await.expect("cursor"), 0);
    assert_eq!(store.cursor(&u(2), "phone", 0).await.expect("cursor"), 0);
    store
        .write_batch(&[Write::SetCursor {
            owner: u(2),
            device: "laptop".into(),
            group: 4,
            cursor: 2,
        }])
        .await
        .expect("set");
    assert_eq!(store.cursor(&u(2), "laptop", 4).await.expect("cursor"), 2);
    assert_eq!(
        store
            .group_cursors(&u(2), "laptop", &[4, 5])
            .await
            .expect("cursors"),
        vec![2, 0]
    );
    assert_eq!(
        store
            .group_cursors(&u(2), "phone", &[9, 4])
            .await
            .expect("cursors"),
        vec![0, 3]
    );
}

async fn sequences_are_contiguous(store: &dyn MessageStore) {
    let a = store_one(store, 1, 2, 1).await;
    let b = store_one(store, 2, 1, 1).await;
    let c = store_one(store, 1, 3, 2).await;
    assert_eq!(a.message.conversation, "p:u1:u2");
    assert_eq!(
        (a.message.conv_seq, b.message.conv_seq, c.message.conv_seq),
        (1, 2, 1)
    );
    assert_eq!((a.sender_seq, a.receiver_seq), (1, 1));
    assert_eq!((b.sender_seq, b.receiver_seq), (2, 2));
    assert_eq!((c.sender_seq, c.receiver_seq), (3, 1));
    assert!(!a.repeat && !b.repeat && !c.repeat);
}

async fn resend_is_deduplicated(store: &dyn MessageStore) {
    let first = store_one(store, 1, 2, 7).await;
    let again = store_one(store, 1, 2, 7).await;
    assert!(again.repeat);
    assert_eq!(again.message, first.message);
    assert_eq!(
        (again.sender_seq, again.receiver_seq),
        (first.sender_seq, first.receiver_seq)
    );
    // Within one batch too, and another device's seq 7 is another message.
    let mut other_device = text(1, 2, 7);
    other_device.sender_device = "laptop".into();
    let out = store
        .write_batch(&[
            Write::Message(text(1, 2, 8)),
            Write::Message(text(1, 2, 8)),
            Write::Message(other_device),
        ])
        .await
        .expect("batch");
    let stored: Vec<&Stored> = out
        .iter()
        .map(|o| match o {
            Outcome::Stored(s) => s,
            Outcome::Done | Outcome::Reused | Outcome::Read(_) => {
                panic!("message write answered {o:?}")
            }
        })
        .collect();
    assert!(!stored[0].repeat && stored[1].repeat && !stored[2].repeat);
    assert_eq!(stored[0].message.mid, stored[1].message.mid);
    assert_eq!(stored[2].message.conv_seq, 3);
    let all = store.sync(&u(2), 0, 100.into()).await.expect("sync").items;
    assert_eq!(all.len(), 3, "one row per distinct message");
}

async fn device_ids_are_case_sensitive(store: &dyn MessageStore) {
    let from = |device: &str| {
        let mut m = text(1, 2, 7);
        m.sender_device = device.into();
        Write::Message(m)
    };
    let mut stored = Vec::new();
    for device in ["phone", "Phone"] {
        match store
            .write_batch(&[from(device)])
            .await
            .expect("write")
            .pop()
        {
            Some(Outcome::Stored(s)) => stored.push(s),
            other => panic!("expected a stored message, got {other:?}"),
        }
    }
    // The same client seq from another device is another message ...
    assert!(!stored[1].repeat, "\"Phone\" is not \"phone\"");
    assert_ne!(stored[0].message.mid, stored[1].message.mid);
    assert_eq!(stored[1].message.sender_device, "Phone");
    // ... and each device has its own cursor: each holds its own message,
    // and "Phone" has not had "phone"'s, which comes first.
    assert_eq!(store.cursor(&u(1), "phone", 0).await.expect("cursor"), 1);
    assert_eq!(store.cursor(&u(1), "Phone", 0).await.expect("cursor"), 0);
    let ack = |device: &str, seq| Write::Received {
        floor: 0,
        owner: u(2),
        device: device.into(),
        group: 0,
        seq,
    };
    store
        .write_batch(&[ack("tablet", 1), ack("tablet", 2), ack("Tablet", 1)])
        .await
        .expect("acks");
    assert_eq!(store.cursor(&u(2), "tablet", 0).await.expect("cursor"), 2);
    assert_eq!(store.cursor(&u(2), "Tablet", 0).await.expect("cursor"), 1);
}

async fn history_pages_before_a_mid(store: &dyn MessageStore) {
    let mut mids = Vec::new();
    for i in 1..=5 {
        mids.push(store_one(store, 1, 2, i).await.message.mid);
    }
    store_one(store, 1, 3, 100).await;
    let image = MessageBody {
        content: Some(natter_proto::msg::Content::Image(
            natter_proto::msg::Image {
                url: "https://x/1.png".into(),
                ..Default::default()
            },
        )),
    };
    let Outcome::Stored(img) = store
        .write_batch(&[Write::Message(typed(u(2), Peer::User(u(1)), 1, image))])
        .await
        .expect("image")[0]
        .clone()
    else {
        panic!("not stored")
    };
    let query = |before, limit: u32, types: Vec<u32>| HistoryQuery {
        owner: u(1),
        other: u(2),
        before,
        limit: limit.into(),
        types,
    };
    let page = store
        .history(&query(None, 3, vec![]))
        .await
        .expect("history")
        .items;
    assert_eq!(
        page.iter().map(|m| m.mid).collect::<Vec<_>>(),
        vec![img.message.mid, mids[4], mids[3]]
    );
    let next = store
        .history(&query(Some(mids[3]), 10, vec![]))
        .await
        .expect("history")
        .items;
    assert_eq!(
        next.iter().map(|m| m.mid).collect::<Vec<_>>(),
        vec![mids[2], mids[1], mids[0]]
    );
    let images = store
        .history(&query(None, 10, vec![MessageType::Image as u32]))
        .await
        .expect("history")
        .items;
    assert_eq!(images.len(), 1);
    assert_eq!(
        images[0].body().and_then(|b| b.message_type()),
        Some(MessageType::Image)
    );
    // The receiver sees the same conversation from the other side.
    let theirs = HistoryQuery {
        owner: u(2),
        other: u(1),
        before: None,
        limit: 100.into(),
        types: vec![],
    };
    assert_eq!(
        store.history(&theirs).await.expect("history").items.len(),
        6
    );
    let nobody = HistoryQuery {
        owner: u(3),
        other: u(2),
        before: None,
        limit: 100.into(),
        types: vec![],
    };
    assert!(store
        .history(&nobody)
        .await
        .expect("history")
        .items
        .is_empty());
}

async fn sync_returns_the_stream_in_order(store: &dyn MessageStore) {
    for i in 1..=4 {
        store_one(store, 1, 2, i).await;
        store_one(store, 3, 2, i).await;
    }
    let all = store.sync(&u(2), 0, 100.into()).await.expect("sync").items;
    assert_eq!(
        all.iter().map(|i| i.user_seq).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    let page = store.sync(&u(2), 5, 2.into()).await.expect("sync").items;
    assert_eq!(
        page.iter().map(|i| i.user_seq).collect::<Vec<_>>(),
        vec![6, 7]
    );
    // The sender's own stream holds its outbox.
    let outbox = store.sync(&u(1), 0, 100.into()).await.expect("sync").items;
    assert_eq!(outbox.len(), 4);
    assert!(outbox.iter().all(|i| i.message.sender == u(1)));
    let proto = all[0].message.to_proto(all[0].user_seq);
    assert_eq!(proto.user_seq, 1);
    assert!(proto.body.is_some());
}

async fn cursors_follow_acks(store: &dyn MessageStore) {
    assert_eq!(store.cursor(&u(2), "phone", 0).await.expect("cursor"), 0);
    for i in 1..=5 {
        store_one(store, 1, 2, i).await;
    }
    // Sending moves the sending device's cursor, not another device's.
    assert_eq!(store.cursor(&u(1), "phone", 0).await.expect("cursor"), 5);
    assert_eq!(store.cursor(&u(1), "laptop", 0).await.expect("cursor"), 0);
    let ack = |seq| Write::Received {
        floor: 0,
        owner: u(2),
        device: "phone".into(),
        group: 0,
        seq,
    };
    store.write_batch(&[ack(1), ack(3)]).await.expect("acks");
    // 2 is missing: the cursor waits at 1 rather than pass it.
    assert_eq!(store.cursor(&u(2), "phone", 0).await.expect("cursor"), 1);
    store.write_batch(&[ack(2), ack(5)]).await.expect("acks");
    assert_eq!(store.cursor(&u(2), "phone", 0).await.expect("cursor"), 3);
    store.write_batch(&[ack(4)]).await.expect("acks");
    assert_eq!(store.cursor(&u(2), "phone", 0).await.expect("cursor"), 5);
    // An explicit cursor from the device wins, both ways.
    store
        .write_batch(&[Write::SetCursor {
            owner: u(2),
            device: "phone".into(),
            group: 0,
            cursor: 2,
        }])
        .await
        .expect("set");
    assert_eq!(store.cursor(&u(2), "phone", 0).await.expect("cursor"), 2);
    store.write_batch(&[ack(4)]).await.expect("acks");
    assert_eq!(
        store.cursor(&u(2), "phone", 0).await.expect("cursor"),
        2,
        "3 is not vouched for"
    );
    store
        .write_batch(&[Write::SetCursor {
            owner: u(2),
            device: "phone".into(),
            group: 0,
            cursor: 5,
        }])
        .await
        .expect("set");
    assert_eq!(store.cursor(&u(2), "phone", 0).await.expect("cursor"), 5);
}

async fn message_to_oneself(store: &dyn MessageStore) {
    let note = store_one(store, 5, 5, 1).await;
    assert_eq!(note.message.conversation, "p:u5:u5");
    assert_eq!(note.sender_seq, note.receiver_seq);
    assert_eq!(
        store
            .sync(&u(5), 0, 10.into())
            .await
            .expect("sync")
            .items
            .len(),
        1
    );
    let again = store_one(store, 5, 5, 1).await;
    assert!(again.repeat);
}

async fn expiry_deletes_old_messages_only(store: &dyn MessageStore) {
    // Mids and times from the id generator, so that time order is mid order.
    let ids = natter_node::ids::MidGenerator::new(0).expect("worker");
    let at = |t: i64, seq: u64| {
        let mut m = text(1, 2, seq);
        m.mid = ids.next_at(t);
        m.time_ms = t;
        Write::Message(m)
    };
    let t0 = natter_node::ids::EPOCH_MS + 1_000_000;
    // In time order: the generator never goes back in time.
    let mut writes: Vec<Write> = (0..5).map(|i| at(t0 + i, i as u64 + 1)).collect();
    writes.push(at(t0 + 1_000, 9));
    store.write_batch(&writes).await.expect("write");
    // Two at a time, until nothing before the cut is left.
    assert_eq!(store.expire(t0 + 500, 2).await.expect("expire"), 2);
    assert_eq!(store.expire(t0 + 500, 100).await.expect("expire"), 3);
    assert_eq!(store.expire(t0 + 500, 100).await.expect("expire"), 0);
    let left = store.sync(&u(2), 0, 100.into()).await.expect("sync").items;
    assert_eq!(left.len(), 1, "the newer message stays");
    assert_eq!(left[0].message.client_seq, 9);
    assert_eq!(
        store
            .sync(&u(1), 0, 100.into())
            .await
            .expect("sync")
            .items
            .len(),
        1,
        "both sides' relation rows went"
    );
    let history = HistoryQuery {
        owner: u(1),
        other: u(2),
        before: None,
        limit: 100.into(),
        types: vec![],
    };
    assert_eq!(
        store.history(&history).await.expect("history").items.len(),
        1
    );
    // Numbering continues after expired messages.
    let next = store_one(store, 1, 2, 10).await;
    assert_eq!(next.message.conv_seq, 7);
    assert_eq!(next.receiver_seq, 7);
}

/// A message of any body from `sender` to `to`.
fn with_body(sender: u64, to: Peer, client_seq: u64, content: Content) -> NewMessage {
    typed(
        u(sender),
        to,
        client_seq,
        MessageBody {
            content: Some(content),
        },
    )
}

/// Stores one message and returns what the store says.
async fn store_message(store: &dyn MessageStore, message: NewMessage) -> Stored {
    match store.write_batch(&[Write::Message(message)]).await {
        Ok(outcomes) => match outcomes.into_iter().next() {
            Some(Outcome::Stored(stored)) => stored,
            other => panic!("expected a stored message, got {other:?}"),
        },
        Err(e) => panic!("write: {e}"),
    }
}

/// Moves `owner`'s read cursor and returns the read state the store gives.
async fn read(
    store: &dyn MessageStore,
    owner: u64,
    conversation: &str,
    seq: u64,
    floor: u64,
) -> ReadState {
    let outcomes = store
        .write_batch(&[Write::Read {
            owner: u(owner),
            conversation: conversation.to_string(),
            seq,
            floor,
        }])
        .await
        .expect("read");
    match outcomes.into_iter().next() {
        Some(Outcome::Read(state)) => state,
        other => panic!("expected a read state, got {other:?}"),
    }
}

/// A page of `owner`'s conversation list.
async fn list(
    store: &dyn MessageStore,
    owner: u64,
    groups: &[(u64, u64)],
    after: Option<ListKey>,
    limit: u32,
) -> Page<ConversationEntry> {
    store
        .conversations(&ConversationQuery {
            owner: u(owner),
            groups: groups.to_vec(),
            after,
            limit,
        })
        .await
        .expect("conversations")
}

fn p2p(a: u64, b: u64) -> String {
    p2p_conversation(&u(a), &u(b))
}

/// The list counts as unread only what the others sent after the user's
/// cursor: sending moves the sender's own cursor.
async fn conversation_list_counts_what_others_sent(store: &dyn MessageStore) {
    for seq in 1..=3 {
        store_one(store, 1, 2, seq).await;
    }
    let from_2 = store_one(store, 2, 1, 1).await;
    store_one(store, 3, 1, 1).await;
    let newest = store_one(store, 3, 1, 2).await;

    let page = list(store, 1, &[], None, 10).await;
    assert!(!page.more);
    let entries: Vec<_> = page
        .items
        .iter()
        .map(|e| {
            (
                e.conversation.clone(),
                e.peer.clone(),
                e.last_seq,
                e.read_seq,
                e.unread,
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            (p2p(1, 3), Peer::User(u(3)), 2, 0, 2),
            (p2p(1, 2), Peer::User(u(2)), 4, 3, 1),
        ]
    );
    assert_eq!(
        page.items[0].last.as_ref().map(|m| m.mid),
        Some(newest.message.mid)
    );
    assert_eq!(
        page.items[1].last.as_ref().map(|m| m.mid),
        Some(from_2.message.mid)
    );
    // The other user's cursor: user 2 read everything when it sent.
    assert_eq!(page.items[1].peer_read_seq, 4);
    assert_eq!(page.items[0].peer_read_seq, 2);

    // The other side: user 2 sent last, so nothing is unread; user 3 never
    // saw the conversation of users 1 and 2.
    let two = list(store, 2, &[], None, 10).await.items;
    assert_eq!(two.len(), 1);
    assert_eq!(
        (two[0].read_seq, two[0].unread, two[0].peer_read_seq),
        (4, 0, 3)
    );
    let three = list(store, 3, &[], None, 10).await.items;
    assert_eq!(
        three
            .iter()
            .map(|e| (e.conversation.clone(), e.unread))
            .collect::<Vec<_>>(),
        vec![(p2p(1, 3), 0)]
    );
    // A message to oneself is read as it is sent.
    store_one(store, 4, 4, 1).await;
    let four = list(store, 4, &[], None, 10).await.items;
    assert_eq!(four.len(), 1);
    assert_eq!((four[0].last_seq, four[0].unread), (1, 0));
}

/// Pages by key walk the whole list once, pinned entries first, however
/// many conversations share a time or have no message yet.
async fn conversation_pages_never_repeat_or_skip(store: &dyn MessageStore) {
    // Five conversations whose messages all carry one time.
    for other in 11..=15 {
        let mut m = text(other, 10, 1);
        m.time_ms = 1_700_000_000_000;
        store_message(store, m).await;
    }
    // Two with settings and no message (no activity: they tie on it), one
    // of them pinned, and an older conversation pinned.
    for (other, pinned) in [(20, false), (21, false), (22, true)] {
        store
            .set_settings(
                &u(10),
                &p2p(10, other),
                SettingsChange {
                    pinned: Some(pinned),
                    push: None,
                },
            )
            .await
            .expect("settings");
    }
    store
        .set_settings(
            &u(10),
            &p2p(10, 11),
            SettingsChange {
                pinned: Some(true),
                push: Some(PushMode::None),
            },
        )
        .await
        .expect("pin");
    // Two groups: one with a message, one the user joined after its last.
    let mut g = group_text(11, 5, 2);
    g.time_ms = 1_700_000_000_000;
    let in_group = store_message(store, g).await;
    store_group_one(store, 11, 6, 3).await;
    let groups = [(5, 1), (6, 2)];

    let all = list(store, 10, &groups, None, 100).await;
    assert!(!all.more);
    let order: Vec<String> = all.items.iter().map(|e| e.conversation.clone()).collect();
    let mut expected = vec![p2p(10, 11), p2p(10, 22), group_conversation(5)];
    expected.extend((12..=15).rev().map(|o| p2p(10, o)));
    expected.extend([p2p(10, 21), p2p(10, 20), group_conversation(6)]);
    // Ties on activity go by conversation id, descending.
    expected[7..].sort_by(|a, b| b.cmp(a));
    assert_eq!(order, expected);
    assert_eq!(
        all.items[0].settings,
        Settings {
            pinned: true,
            push: PushMode::None
        }
    );
    assert_eq!(
        all.items[2].last.as_ref().map(|m| m.mid),
        Some(in_group.message.mid)
    );
    assert_eq!(all.items[2].peer, Peer::Group(5));
    assert!(
        all.items.last().is_some_and(|e| e.last.is_none()),
        "joined after its last message"
    );
    for limit in [1, 2, 3, 4] {
        let mut walked = Vec::new();
        let mut after = None;
        loop {
            let page = list(store, 10, &groups, after.clone(), limit).await;
            assert!(page.items.len() <= limit as usize);
            walked.extend(page.items.iter().map(|e| e.conversation.clone()));
            after = page.items.last().map(ConversationEntry::key);
            if !page.more {
                break;
            }
            // A page that repeats entries would go on for ever.
            assert!(
                walked.len() <= expected.len(),
                "pages of {limit} repeat: {walked:?}"
            );
        }
        assert_eq!(walked, expected, "pages of {limit}");
    }
}

/// A read moves the cursor forward only, never past the newest message, and
/// says what is left unread.
async fn read_cursors_only_move_forward_and_stop_at_the_newest(store: &dyn MessageStore) {
    for seq in 1..=4 {
        store_one(store, 2, 1, seq).await;
    }
    let conv = p2p(1, 2);
    let state = store.read_state(&u(1), &conv, 0).await.expect("state");
    assert_eq!((state.last_seq, state.read_seq, state.unread), (4, 0, 4));
    assert_eq!(
        read(store, 1, &conv, 2, 0).await,
        ReadState {
            last_seq: 4,
            read_seq: 2,
            unread: 2,
            moved: true
        }
    );
    assert_eq!(
        read(store, 1, &conv, 1, 0).await,
        ReadState {
            last_seq: 4,
            read_seq: 2,
            unread: 2,
            moved: false
        },
        "never back"
    );
    assert_eq!(
        read(store, 1, &conv, 99, 0).await,
        ReadState {
            last_seq: 4,
            read_seq: 2,
            unread: 2,
            moved: false
        },
        "past the newest moves nothing (the caller refuses it)"
    );
    read(store, 1, &conv, 4, 0).await;
    store_one(store, 2, 1, 5).await;
    let state = store.read_state(&u(1), &conv, 0).await.expect("state");
    assert_eq!((state.last_seq, state.read_seq, state.unread), (5, 4, 1));
    let entry = &list(store, 1, &[], None, 10).await.items[0];
    assert_eq!((entry.read_seq, entry.unread), (4, 1));
    // Two reads in one batch: the second sees the first.
    let outcomes = store
        .write_batch(&[
            Write::Read {
                owner: u(1),
                conversation: conv.clone(),
                seq: 5,
                floor: 0,
            },
            Write::Read {
                owner: u(1),
                conversation: conv.clone(),
                seq: 5,
                floor: 0,
            },
        ])
        .await
        .expect("reads");
    assert_eq!(
        outcomes,
        vec![
            Outcome::Read(ReadState {
                last_seq: 5,
                read_seq: 5,
                unread: 0,
                moved: true
            }),
            Outcome::Read(ReadState {
                last_seq: 5,
                read_seq: 5,
                unread: 0,
                moved: false
            }),
        ]
    );
    // A conversation with nothing in it reads as empty.
    assert_eq!(
        read(store, 1, &p2p(1, 9), 3, 0).await,
        ReadState {
            last_seq: 0,
            read_seq: 0,
            unread: 0,
            moved: false
        }
    );
}

/// Group events, revokes and edits take positions but are no new messages.
async fn markers_are_not_unread(store: &dyn MessageStore) {
    let first = store_one(store, 2, 1, 1).await.message.mid;
    store_one(store, 2, 1, 2).await;
    let edit = Content::Edit(Edit {
        mid: first,
        text: Some(Text {
            text: "fixed".into(),
            mentions: vec![],
        }),
    });
    store_message(store, with_body(2, Peer::User(u(1)), 3, edit)).await;
    let revoke = Content::Revoke(Revoke { mid: first });
    store_message(store, with_body(2, Peer::User(u(1)), 4, revoke)).await;
    let conv = p2p(1, 2);
    let state = store.read_state(&u(1), &conv, 0).await.expect("state");
    assert_eq!((state.last_seq, state.unread), (4, 2));
    assert_eq!(list(store, 1, &[], None, 10).await.items[0].unread, 2);
    assert_eq!(read(store, 1, &conv, 1, 0).await.unread, 1);
    assert_eq!(read(store, 1, &conv, 2, 0).await.unread, 0);

    // A group: an event from the server between two messages.
    store_group_one(store, 3, 8, 1).await;
    let mut event = with_body(
        3,
        Peer::Group(8),
        2,
        Content::GroupEvent(GroupEvent {
            kind: "joined".into(),
            actor: "u3".into(),
            targets: vec!["u1".into()],
            ..Default::default()
        }),
    );
    event.sender_device = String::new();
    store_message(store, event).await;
    store_group_one(store, 3, 8, 3).await;
    let group = group_conversation(8);
    let state = store.read_state(&u(1), &group, 0).await.expect("state");
    assert_eq!((state.last_seq, state.unread), (3, 2));
    let entry = list(store, 1, &[(8, 1)], None, 10)
        .await
        .items
        .into_iter()
        .find(|e| e.conversation == group)
        .expect("the group");
    assert_eq!(entry.unread, 2);
    assert_eq!(read(store, 1, &group, 1, 0).await.unread, 1);
}

/// A revoke empties its target everywhere it is read; an edit replaces a
/// text message's text; neither reaches another conversation.
async fn revoke_and_edit_change_their_target_only(store: &dyn MessageStore) {
    let conv = p2p(1, 2);
    let kept = store_one(store, 1, 2, 1).await.message;
    let gone = store_one(store, 1, 2, 2).await.message;
    let revoke = store_message(
        store,
        with_body(
            1,
            Peer::User(u(2)),
            3,
            Content::Revoke(Revoke { mid: gone.mid }),
        ),
    )
    .await
    .message;
    let new_text = |mid, text: &str| {
        Content::Edit(Edit {
            mid,
            text: Some(Text {
                text: text.into(),
                mentions: vec![],
            }),
        })
    };
    let edit = store_message(
        store,
        with_body(1, Peer::User(u(2)), 4, new_text(kept.mid, "better")),
    )
    .await
    .message;
    // An edit after the revoke changes nothing.
    store_message(
        store,
        with_body(1, Peer::User(u(2)), 5, new_text(gone.mid, "too late")),
    )
    .await;
    // Another conversation's revoke and edit do not reach these messages.
    store_message(
        store,
        with_body(
            3,
            Peer::User(u(1)),
            1,
            Content::Revoke(Revoke { mid: kept.mid }),
        ),
    )
    .await;
    store_message(
        store,
        with_body(3, Peer::User(u(1)), 2, new_text(kept.mid, "not yours")),
    )
    .await;

    let revoked = store.message(gone.mid).await.expect("read").expect("kept");
    assert_eq!(revoked.revoked_ms, revoke.time_ms);
    assert!(revoked.content.is_empty());
    assert!(revoked.body().is_none());
    assert_eq!(revoked.edited_ms, 0);
    let edited = store.message(kept.mid).await.expect("read").expect("kept");
    assert_eq!(edited.body(), Some(MessageBody::text("better")));
    assert_eq!((edited.edited_ms, edited.revoked_ms), (edit.time_ms, 0));
    assert_eq!(edited.msg_type, MessageType::Text as u32);
    assert!(store.message(u64::MAX).await.expect("read").is_none());

    // History and sync show the same state.
    let history = store
        .history(&HistoryQuery {
            owner: u(2),
            other: u(1),
            before: None,
            limit: 10.into(),
            types: vec![],
        })
        .await
        .expect("history")
        .items;
    let find = |items: &[StoredMessage], mid| {
        items
            .iter()
            .find(|m| m.mid == mid)
            .cloned()
            .expect("in the page")
    };
    assert_eq!(find(&history, gone.mid), revoked);
    assert_eq!(find(&history, kept.mid), edited);
    let synced: Vec<StoredMessage> = store
        .sync(&u(2), 0, 20.into())
        .await
        .expect("sync")
        .items
        .into_iter()
        .map(|i| i.message)
        .collect();
    assert_eq!(find(&synced, gone.mid), revoked);
    assert_eq!(find(&synced, kept.mid), edited);

    // A revoke after an edit takes the edit's text too.
    store_message(
        store,
        with_body(
            1,
            Peer::User(u(2)),
            6,
            Content::Revoke(Revoke { mid: kept.mid }),
        ),
    )
    .await;
    let revoked_edit = store.message(edit.mid).await.expect("read").expect("kept");
    assert_eq!(
        revoked_edit.body(),
        Some(MessageBody {
            content: Some(Content::Edit(Edit {
                mid: kept.mid,
                text: None
            }))
        })
    );
    let now = store.message(kept.mid).await.expect("read").expect("kept");
    assert!(now.body().is_none() && now.content.is_empty() && now.revoked_ms != 0);

    // Only text messages are edited.
    let image = Content::Image(Image {
        url: "https://x/1.png".into(),
        ..Default::default()
    });
    let picture = store_message(store, with_body(1, Peer::User(u(2)), 7, image))
        .await
        .message;
    store_message(
        store,
        with_body(1, Peer::User(u(2)), 8, new_text(picture.mid, "text")),
    )
    .await;
    let unchanged = store
        .message(picture.mid)
        .await
        .expect("read")
        .expect("kept");
    assert_eq!(
        (unchanged.content, unchanged.edited_ms),
        (picture.content, 0)
    );

    // The list shows the newest message in its current state.
    let entry = list(store, 2, &[], None, 10)
        .await
        .items
        .into_iter()
        .find(|e| e.conversation == conv)
        .expect("listed");
    assert_eq!(entry.last_seq, 8);

    // In a group, the same.
    let said = store_group_one(store, 4, 9, 1).await.message;
    store_message(
        store,
        with_body(4, Peer::Group(9), 2, new_text(said.mid, "group edit")),
    )
    .await;
    let edited = store.message(said.mid).await.expect("read").expect("kept");
    assert_eq!(edited.body(), Some(MessageBody::text("group edit")));
    store_message(
        store,
        with_body(
            4,
            Peer::Group(9),
            3,
            Content::Revoke(Revoke { mid: said.mid }),
        ),
    )
    .await;
    let page = store
        .group_history(&GroupHistoryQuery {
            group: 9,
            from_seq: 0,
            before: None,
            limit: 10.into(),
            types: vec![],
        })
        .await
        .expect("group history")
        .items;
    let revoked = find(&page, said.mid);
    assert!(revoked.body().is_none() && revoked.revoked_ms != 0);
    let synced = store
        .group_sync(9, 0, 10.into())
        .await
        .expect("group sync")
        .items;
    assert_eq!(find(&synced, said.mid), revoked);
}

/// A group member without a row counts from its join point: nothing from
/// before it is unread, and its read moves from there.
async fn groups_count_from_the_join_point(store: &dyn MessageStore) {
    let mut last = 0;
    for seq in 1..=5 {
        last = store_group_one(store, 1, 7, seq).await.message.mid;
    }
    let group = group_conversation(7);
    // User 2 joined at position 3.
    let entry = &list(store, 2, &[(7, 3)], None, 10).await.items[0];
    assert_eq!((entry.last_seq, entry.read_seq, entry.unread), (5, 2, 3));
    assert_eq!(entry.last.as_ref().map(|m| m.mid), Some(last));
    assert_eq!(entry.settings, Settings::default());
    let state = store.read_state(&u(2), &group, 2).await.expect("state");
    assert_eq!((state.read_seq, state.unread), (2, 3));
    // The sender read what it sent.
    let entry = &list(store, 1, &[(7, 1)], None, 10).await.items[0];
    assert_eq!((entry.read_seq, entry.unread), (5, 0));
    // A read below the join point counts from the join point.
    assert_eq!(
        read(store, 2, &group, 1, 2).await,
        ReadState {
            last_seq: 5,
            read_seq: 2,
            unread: 3,
            moved: false
        }
    );
    assert_eq!(
        read(store, 2, &group, 4, 2).await,
        ReadState {
            last_seq: 5,
            read_seq: 4,
            unread: 1,
            moved: true
        }
    );
    let entry = &list(store, 2, &[(7, 3)], None, 10).await.items[0];
    assert_eq!((entry.read_seq, entry.unread), (4, 1));
    // User 3 joined after the last message: nothing shows.
    let entry = &list(store, 3, &[(7, 6)], None, 10).await.items[0];
    assert_eq!((entry.last_seq, entry.read_seq, entry.unread), (5, 5, 0));
    assert!(entry.last.is_none());
    // A group without a message yet.
    let entry = &list(store, 3, &[(70, 1)], None, 10).await.items[0];
    assert_eq!(
        (entry.conversation.as_str(), entry.last_seq, entry.unread),
        (group_conversation(70).as_str(), 0, 0)
    );
}

/// Who read a group message, settings made and changed, and a member who
/// left no longer counted.
async fn group_readers_and_settings_and_forgetting(store: &dyn MessageStore) {
    for seq in 1..=5 {
        store_group_one(store, 1, 3, seq).await;
    }
    let group = group_conversation(3);
    read(store, 3, &group, 4, 0).await;
    read(store, 2, &group, 2, 0).await;
    let readers = store.readers(&group, 4, 10).await.expect("readers");
    assert_eq!(
        readers,
        vec![
            Reader {
                uid: u(1),
                read_seq: 5
            },
            Reader {
                uid: u(3),
                read_seq: 4
            }
        ]
    );
    assert_eq!(
        store.readers(&group, 4, 1).await.expect("readers"),
        readers[..1]
    );
    assert_eq!(store.read_count(&group, 4).await.expect("count"), 2);
    assert_eq!(store.read_count(&group, 1).await.expect("count"), 3);
    assert_eq!(store.read_count(&group, 6).await.expect("count"), 0);
    assert_eq!(
        store
            .read_count(&group_conversation(4), 1)
            .await
            .expect("count"),
        0
    );
    // One-to-one cursors are no group's readers.
    store_one(store, 1, 2, 6).await;
    assert_eq!(store.read_count(&p2p(1, 2), 1).await.expect("count"), 0);

    // Settings: a row made by a change, then changed field by field.
    let set = |pinned, push| SettingsChange { pinned, push };
    let made = store
        .set_settings(&u(4), &group, set(None, Some(PushMode::Mentions)))
        .await
        .expect("set");
    assert_eq!(
        made,
        Settings {
            pinned: false,
            push: PushMode::Mentions
        }
    );
    let changed = store
        .set_settings(&u(4), &group, set(Some(true), None))
        .await
        .expect("set");
    assert_eq!(
        changed,
        Settings {
            pinned: true,
            push: PushMode::Mentions
        }
    );
    let entry = &list(store, 4, &[(3, 1)], None, 10).await.items[0];
    assert_eq!((entry.settings, entry.unread), (changed, 5));
    // A settings row counts as a reader from its cursor: none yet.
    assert_eq!(store.read_count(&group, 1).await.expect("count"), 3);
    // Settings keep the read cursor.
    store
        .set_settings(&u(3), &group, set(Some(false), Some(PushMode::None)))
        .await
        .expect("set");
    assert_eq!(store.read_count(&group, 4).await.expect("count"), 2);
    let p2p_settings = store
        .set_settings(&u(2), &p2p(1, 2), set(None, Some(PushMode::None)))
        .await
        .expect("set");
    assert_eq!(
        p2p_settings,
        Settings {
            pinned: false,
            push: PushMode::None
        }
    );
    let entry = &list(store, 2, &[], None, 10).await.items[0];
    assert_eq!((entry.settings, entry.unread), (p2p_settings, 1));

    // User 3 left the group.
    let outcomes = store
        .write_batch(&[Write::Forget {
            owner: u(3),
            conversation: group.clone(),
        }])
        .await
        .expect("forget");
    assert_eq!(outcomes, vec![Outcome::Done]);
    assert_eq!(store.read_count(&group, 4).await.expect("count"), 1);
    assert_eq!(
        store
            .readers(&group, 0, 10)
            .await
            .expect("readers")
            .iter()
            .map(|r| r.uid.clone())
            .collect::<Vec<_>>(),
        vec![u(1), u(2), u(4)]
    );
    let state = store.read_state(&u(3), &group, 0).await.expect("state");
    assert_eq!((state.read_seq, state.unread), (0, 5));
}
/// The search cases every store must pass, each against a fresh store
/// from `make`.
pub async fn run_search<S, F, Fut>(make: F)
where
    S: MessageStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    search_finds_words_in_any_script_in_the_owners_conversations_only(&make().await).await;
    search_pages_newest_first_within_a_time_range(&make().await).await;
    search_in_a_group_starts_at_the_join_point(&make().await).await;
    search_follows_revokes_and_edits(&make().await).await;
}

/// Stores `body` from `sender` to `to` at `time_ms` and returns its mid.
async fn store_body(
    store: &dyn MessageStore,
    sender: u64,
    to: Peer,
    client_seq: u64,
    time_ms: i64,
    body: MessageBody,
) -> u64 {
    let mut m = typed(u(sender), to, client_seq, body);
    m.time_ms = time_ms;
    let outcomes = store
        .write_batch(&[Write::Message(m)])
        .await
        .expect("write");
    match outcomes.into_iter().next() {
        Some(Outcome::Stored(stored)) => stored.message.mid,
        other => panic!("expected a stored message, got {other:?}"),
    }
}

/// A query of `owner` for `text` over all the owner's conversations.
fn search_for(owner: u64, text: &str) -> SearchQuery {
    SearchQuery {
        owner: u(owner),
        text: text.into(),
        conversation: None,
        groups: Vec::new(),
        from_ms: None,
        to_ms: None,
        before: None,
        limit: PageLimit::from(20),
    }
}

/// The mids of a search's page, in its order.
async fn found(store: &dyn MessageStore, q: &SearchQuery) -> Vec<u64> {
    store
        .search(q)
        .await
        .expect("search")
        .items
        .iter()
        .map(|m| m.mid)
        .collect()
}

async fn search_finds_words_in_any_script_in_the_owners_conversations_only(
    store: &dyn MessageStore,
) {
    let at = 1_700_000_000_000;
    let weather = store_body(
        store,
        1,
        Peer::User(u(2)),
        1,
        at,
        MessageBody::text("今天天气很好"),
    )
    .await;
    let hello = store_body(
        store,
        2,
        Peer::User(u(1)),
        1,
        at + 1,
        MessageBody::text("Hello World from Natter"),
    )
    .await;
    let mixed = store_body(
        store,
        1,
        Peer::User(u(2)),
        2,
        at + 2,
        MessageBody::text("明天 Meeting at 10点"),
    )
    .await;
    let japanese = store_body(
        store,
        2,
        Peer::User(u(1)),
        2,
        at + 3,
        MessageBody::text("東京の天気予報"),
    )
    .await;
    // Another pair's conversation, with the same words.
    let theirs = store_body(
        store,
        3,
        Peer::User(u(4)),
        1,
        at + 4,
        MessageBody::text("天气不错 hello world"),
    )
    .await;
    // Media has no text to find.
    store_body(
        store,
        1,
        Peer::User(u(2)),
        3,
        at + 5,
        MessageBody {
            content: Some(natter_proto::msg::Content::Image(
                natter_proto::msg::Image {
                    url: "https://img/hello.png".into(),
                    ..Default::default()
                },
            )),
        },
    )
    .await;
    store.flush_search().await.expect("flush");

    for (text, want) in [
        ("天气", vec![weather]),
        ("今天天气", vec![weather]),
        ("天", vec![japanese, mixed, weather]),
        ("天気", vec![japanese]),
        ("hello", vec![hello]),
        ("WORLD", vec![hello]),
        ("o w", vec![hello]),
        ("meeting at 10点", vec![mixed]),
        ("10点", vec![mixed]),
        ("goodbye", vec![]),
        ("png", vec![]),
    ] {
        assert_eq!(
            found(store, &search_for(1, text)).await,
            want,
            "{text:?} for u1"
        );
        assert_eq!(
            found(store, &search_for(2, text)).await,
            want,
            "{text:?} for u2"
        );
    }
    assert_eq!(found(store, &search_for(3, "天气")).await, vec![theirs]);
    assert_eq!(
        found(store, &search_for(5, "天气")).await,
        Vec::<u64>::new(),
        "no conversations"
    );
    // One conversation by name: another pair's is never searched.
    let named = |owner: u64, conversation: String| SearchQuery {
        conversation: Some(conversation),
        ..search_for(owner, "hello")
    };
    assert_eq!(
        found(store, &named(1, p2p_conversation(&u(1), &u(2)))).await,
        vec![hello]
    );
    assert_eq!(
        found(store, &named(1, p2p_conversation(&u(3), &u(4)))).await,
        Vec::<u64>::new()
    );
    assert_eq!(
        found(store, &named(1, p2p_conversation(&u(1), &u(3)))).await,
        Vec::<u64>::new()
    );
    // A group the user is not in (named, or among no groups) is not searched.
    assert_eq!(
        found(store, &named(1, group_conversation(9))).await,
        Vec::<u64>::new()
    );
}

async fn search_pages_newest_first_within_a_time_range(store: &dyn MessageStore) {
    let at = 1_700_000_000_000;
    let mut mids = Vec::new();
    for n in 0..6u64 {
        let body = MessageBody::text(format!("weekly report {n}"));
        mids.push(
            store_body(
                store,
                1,
                Peer::User(u(2)),
                n + 1,
                at + n as i64 * 1000,
                body,
            )
            .await,
        );
    }
    store.flush_search().await.expect("flush");
    let mut q = SearchQuery {
        limit: PageLimit::from(4),
        ..search_for(2, "report")
    };
    let first = store.search(&q).await.expect("search");
    let first_mids: Vec<u64> = first.items.iter().map(|m| m.mid).collect();
    assert_eq!(first_mids, vec![mids[5], mids[4], mids[3], mids[2]]);
    assert!(first.more);
    q.before = Some(mids[2]);
    let second = store.search(&q).await.expect("search");
    let second_mids: Vec<u64> = second.items.iter().map(|m| m.mid).collect();
    assert_eq!(second_mids, vec![mids[1], mids[0]]);
    assert!(!second.more);
    // Both ends of the range are included.
    let ranged = SearchQuery {
        from_ms: Some(at + 1000),
        to_ms: Some(at + 3000),
        ..search_for(1, "report")
    };
    assert_eq!(found(store, &ranged).await, vec![mids[3], mids[2], mids[1]]);
    let later = SearchQuery {
        from_ms: Some(at + 4500),
        ..search_for(1, "re")
    };
    assert_eq!(found(store, &later).await, vec![mids[5]]);
    // The message found is the stored one, whole.
    let page = store
        .search(&search_for(1, "report 3"))
        .await
        .expect("search");
    assert_eq!(page.items.len(), 1);
    assert_eq!(
        page.items[0].body(),
        Some(MessageBody::text("weekly report 3"))
    );
    assert_eq!(page.items[0].conversation, p2p_conversation(&u(1), &u(2)));
}

async fn search_in_a_group_starts_at_the_join_point(store: &dyn MessageStore) {
    let at = 1_700_000_000_000;
    let mut mids = Vec::new();
    for n in 1..=4u64 {
        let body = MessageBody::text(format!("群消息 number {n}"));
        mids.push(store_body(store, 1, Peer::Group(9), n, at + n as i64, body).await);
    }
    store.flush_search().await.expect("flush");
    // User 2 joined at conv_seq 3: the first two are not theirs to find.
    let member = SearchQuery {
        groups: vec![(9, 3)],
        ..search_for(2, "群消息")
    };
    assert_eq!(found(store, &member).await, vec![mids[3], mids[2]]);
    let named = SearchQuery {
        conversation: Some(group_conversation(9)),
        ..member.clone()
    };
    assert_eq!(found(store, &named).await, vec![mids[3], mids[2]]);
    let short = SearchQuery {
        text: "群".into(),
        ..member.clone()
    };
    assert_eq!(found(store, &short).await, vec![mids[3], mids[2]]);
    // The founder finds all four; a non-member none.
    let founder = SearchQuery {
        groups: vec![(9, 1)],
        ..search_for(1, "NUMBER")
    };
    assert_eq!(
        found(store, &founder).await,
        vec![mids[3], mids[2], mids[1], mids[0]]
    );
    assert_eq!(
        found(store, &search_for(3, "群消息")).await,
        Vec::<u64>::new()
    );
}

async fn search_follows_revokes_and_edits(store: &dyn MessageStore) {
    use natter_proto::msg::{Content, Edit, Revoke, Text};
    let at = 1_700_000_000_000;
    let revoked = store_body(
        store,
        1,
        Peer::User(u(2)),
        1,
        at,
        MessageBody::text("secret plan alpha"),
    )
    .await;
    let edited = store_body(
        store,
        1,
        Peer::User(u(2)),
        2,
        at + 1,
        MessageBody::text("draft wording"),
    )
    .await;
    store.flush_search().await.expect("flush");
    // Revoked before a flush (a store that indexes behind the commit may
    // not have indexed it yet): it never becomes findable either.
    let early = store_body(
        store,
        1,
        Peer::User(u(2)),
        3,
        at + 2,
        MessageBody::text("secret plan beta"),
    )
    .await;
    for (seq, target) in [(4, revoked), (5, early)] {
        let revoke = MessageBody {
            content: Some(Content::Revoke(Revoke { mid: target })),
        };
        store_body(store, 1, Peer::User(u(2)), seq, at + 10, revoke).await;
    }
    let edit = MessageBody {
        content: Some(Content::Edit(Edit {
            mid: edited,
            text: Some(Text {
                text: "final wording".into(),
                mentions: vec![],
            }),
        })),
    };
    store_body(store, 1, Peer::User(u(2)), 6, at + 11, edit).await;
    store.flush_search().await.expect("flush");
    assert_eq!(
        found(store, &search_for(2, "secret")).await,
        Vec::<u64>::new()
    );
    assert_eq!(
        found(store, &search_for(2, "plan")).await,
        Vec::<u64>::new()
    );
    assert_eq!(found(store, &search_for(2, "final")).await, vec![edited]);
    assert_eq!(found(store, &search_for(2, "wording")).await, vec![edited]);
    assert_eq!(
        found(store, &search_for(2, "draft")).await,
        Vec::<u64>::new()
    );
}
