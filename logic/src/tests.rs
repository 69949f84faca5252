use std::sync::Mutex;

use natter_group::sqlite::SqliteGroupStore;
use natter_node::Shutdown;
use natter_proto::msg::{Message, MessageBody};
use natter_record::sqlite::SqliteStore;

use super::*;

/// One push as one connection got it.
#[derive(Clone, Debug)]
struct Pushed {
    conn: u64,
    seq: u64,
    body: Bytes,
}

#[derive(Default)]
struct FakeGateway {
    pushed: Mutex<Vec<Pushed>>,
    kicked: Mutex<Vec<(u64, ErrorCode)>>,
}

impl Gateway for FakeGateway {
    fn push(&self, batch: PushBatch) {
        let mut pushed = self.pushed.lock().expect("lock");
        for target in &batch.targets {
            for push in batch.slice(target).expect("target in range") {
                pushed.push(Pushed {
                    conn: target.conn,
                    seq: push.seq,
                    body: push.body.clone(),
                });
            }
        }
    }
    fn kick(&self, conn: u64, code: ErrorCode, _reason: &str) {
        self.kicked.lock().expect("lock").push((conn, code));
    }
}

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

async fn logic() -> (Arc<Logic>, Arc<FakeGateway>, Arc<dyn MessageStore>) {
    logic_with(&natter_node::config::LimitsConfig {
        messages_per_sec: 1000.0,
        message_burst: 1000,
        ..Default::default()
    })
    .await
}

async fn logic_with(
    limits: &natter_node::config::LimitsConfig,
) -> (Arc<Logic>, Arc<FakeGateway>, Arc<dyn MessageStore>) {
    let store: Arc<dyn MessageStore> = Arc::new(SqliteStore::memory().await.expect("store"));
    let registry = Registry::new();
    let (committer, _task) = Committer::start(store.clone(), 64, 64, &registry, Shutdown::new());
    let ids = Arc::new(MidGenerator::new(0).expect("worker"));
    let fanout = Arc::new(Fanout::new(
        Arc::new(MemoryDirectory::default()),
        std::time::Duration::ZERO,
        &registry,
    ));
    let publisher = GroupPublisher::new(committer.clone(), ids.clone(), fanout.clone(), &registry);
    let groups = Arc::new(Groups::new(
        Arc::new(SqliteGroupStore::memory().await.expect("group store")),
        store.clone(),
        Arc::new(publisher),
        natter_node::config::GroupsConfig::default(),
    ));
    let logic = Arc::new(Logic::new(
        LogicParts {
            auth: Arc::new(Auth::new(Tokens::new(SECRET.to_vec()), None, &registry)),
            fanout,
            store: store.clone(),
            committer,
            ids,
            groups,
            conversations: Default::default(),
        },
        limits,
        &registry,
    ));
    let gateway = Arc::new(FakeGateway::default());
    logic.attach_gateway("n1", gateway.clone());
    (logic, gateway, store)
}

/// The test's user number `n`: the user id `u{n}`.
fn u(n: u64) -> UserId {
    UserId::parse(&format!("u{n}")).expect("user id")
}

async fn connect(logic: &Logic, uid: u64, device: &str, conn: u64) -> Session {
    let token = Tokens::new(SECRET.to_vec())
        .mint(&u(uid), device, 60)
        .expect("token");
    let connected = logic
        .connect(&token, "", "n1", conn)
        .await
        .expect("connect");
    Session {
        uid: connected.identity.uid,
        device: connected.identity.device,
        node: Arc::from("n1"),
        conn,
    }
}

fn text(client_seq: u64, receiver: u64, text: &str) -> SendMessage {
    SendMessage {
        client_seq,
        receiver: u(receiver).to_string(),
        body: Some(MessageBody::text(text)),
        group: 0,
    }
}

#[tokio::test]
async fn send_acks_then_pushes_to_every_other_device() {
    let (logic, gateway, _) = logic().await;
    let alice_phone = connect(&logic, 1, "phone", 10).await;
    let _alice_laptop = connect(&logic, 1, "laptop", 11).await;
    let _bob_phone = connect(&logic, 2, "phone", 20).await;
    let _bob_tablet = connect(&logic, 2, "tablet", 21).await;

    let reply = logic
        .send(&alice_phone, text(1, 2, "hello"))
        .await
        .expect("sent");
    assert!(!reply.repeat);
    assert_eq!((reply.conv_seq, reply.user_seq), (1, 1));
    assert_eq!(reply.conversation, "p:u1:u2");

    let pushed = gateway.pushed.lock().expect("lock").clone();
    let mut conns: Vec<u64> = pushed.iter().map(|d| d.conn).collect();
    conns.sort();
    assert_eq!(conns, vec![11, 20, 21], "not to the sending connection");
    for d in &pushed {
        let m = Message::decode(d.body.as_ref()).expect("message");
        assert_eq!(m.mid, reply.mid);
        assert_eq!(m.user_seq, d.seq);
        assert_eq!(m.sender_device, "phone");
    }
}

#[tokio::test]
async fn a_resend_gets_the_same_mid() {
    let (logic, gateway, store) = logic().await;
    let alice = connect(&logic, 1, "phone", 10).await;
    let first = logic.send(&alice, text(5, 2, "once")).await.expect("sent");
    let again = logic.send(&alice, text(5, 2, "once")).await.expect("sent");
    assert!(again.repeat);
    assert_eq!(again.mid, first.mid);
    assert_eq!(
        store
            .sync(&u(2), 0, 10.into())
            .await
            .expect("sync")
            .items
            .len(),
        1
    );
    assert!(
        gateway.pushed.lock().expect("lock").is_empty(),
        "receiver offline: nothing pushed"
    );
}

#[tokio::test]
async fn invalid_envelopes_are_rejected_with_a_reason() {
    let (logic, _, store) = logic().await;
    let alice = connect(&logic, 1, "phone", 10).await;
    let to = |receiver: &str| SendMessage {
        receiver: receiver.into(),
        ..text(1, 2, "x")
    };
    for bad in [
        to(""),
        to("a:b"),
        to(".."),
        to(&"x".repeat(65)),
        to("ü"),
        text(0, 2, "x"),
        text(1, 2, ""),
        // Client seqs are stored as signed 64-bit integers.
        text(u64::MAX, 2, "x"),
        SendMessage {
            body: None,
            ..text(1, 2, "x")
        },
    ] {
        let err = logic.send(&alice, bad).await.expect_err("rejected");
        assert_eq!(err.code, ErrorCode::InvalidMessage);
    }
    assert!(store
        .sync(&u(2), 0, 10.into())
        .await
        .expect("sync")
        .items
        .is_empty());
}

#[tokio::test]
async fn bad_tokens_and_device_replacement() {
    let (logic, gateway, _) = logic().await;
    let err = logic
        .connect("nonsense", "", "n1", 1)
        .await
        .expect_err("bad token");
    assert_eq!(err.code, ErrorCode::AuthFailed);
    let expired = Tokens::new(SECRET.to_vec())
        .mint_at(&u(1), "phone", 0, 1)
        .expect("token");
    assert_eq!(
        logic
            .connect(&expired, "", "n1", 1)
            .await
            .expect_err("expired")
            .code,
        ErrorCode::TokenExpired
    );

    connect(&logic, 1, "phone", 1).await;
    connect(&logic, 1, "phone", 2).await;
    assert_eq!(
        *gateway.kicked.lock().expect("lock"),
        vec![(1, ErrorCode::Replaced)]
    );
}

/// Bob's phone syncs from the server's record of its cursor.
async fn from_stored_cursor(logic: &Logic) -> natter_proto::msg::SyncReply {
    let request = SyncRequest {
        after: None,
        limit: 0,
        group: 0,
    };
    logic.sync(&u(2), "phone", request).await.expect("sync")
}

#[tokio::test]
async fn sync_follows_the_device_cursor() {
    let (logic, _, _) = logic().await;
    let alice = connect(&logic, 1, "phone", 10).await;
    for i in 1..=3 {
        logic.send(&alice, text(i, 2, "m")).await.expect("sent");
    }
    let all = from_stored_cursor(&logic).await;
    assert_eq!(all.messages.len(), 3);
    assert_eq!(all.cursor, 3);
    assert!(!all.has_more);
    // An ack past a gap does not move the cursor; closing the gap does.
    logic
        .push_acked(&u(2), "phone", &[Acked { group: 0, seq: 2 }])
        .await;
    logic
        .send(&alice, text(10, 3, "flush"))
        .await
        .expect("sent");
    let gap = from_stored_cursor(&logic).await;
    assert_eq!(gap.messages.len(), 3, "the cursor waits for 1");
    logic
        .push_acked(&u(2), "phone", &[Acked { group: 0, seq: 1 }])
        .await;
    // Acks are committed asynchronously; a write through the same queue orders after it.
    logic.send(&alice, text(4, 3, "flush")).await.expect("sent");
    let rest = from_stored_cursor(&logic).await;
    assert_eq!(
        rest.messages.iter().map(|m| m.user_seq).collect::<Vec<_>>(),
        vec![3]
    );
    let page = logic
        .sync(
            &u(2),
            "phone",
            SyncRequest {
                after: Some(0),
                limit: 2,
                group: 0,
            },
        )
        .await
        .expect("sync");
    assert!(page.has_more);
    assert_eq!(page.cursor, 2);
    let too_far = SyncRequest {
        after: Some(u64::MAX),
        limit: 1,
        group: 0,
    };
    assert_eq!(
        logic
            .sync(&u(2), "phone", too_far)
            .await
            .expect_err("rejected")
            .code,
        ErrorCode::BadRequest
    );
}

#[tokio::test]
async fn a_sync_reply_stops_at_the_page_byte_budget_and_says_more_follow() {
    let limits = natter_node::config::LimitsConfig {
        messages_per_sec: 1000.0,
        message_burst: 1000,
        page_bytes: 3000,
        ..Default::default()
    };
    let (logic, _, _) = logic_with(&limits).await;
    let alice = connect(&logic, 1, "phone", 10).await;
    let kilobyte = "x".repeat(1000);
    for i in 1..=4 {
        logic
            .send(&alice, text(i, 2, &kilobyte))
            .await
            .expect("sent");
    }
    // Larger than the whole budget.
    let large = "y".repeat(5000);
    logic.send(&alice, text(5, 2, &large)).await.expect("sent");
    let after = |after| SyncRequest {
        after: Some(after),
        limit: 0,
        group: 0,
    };
    let seqs = |reply: &natter_proto::msg::SyncReply| {
        reply
            .messages
            .iter()
            .map(|m| m.user_seq)
            .collect::<Vec<_>>()
    };
    // Two messages of about 1 KB fit in 3000 bytes, a third does not.
    let first = logic.sync(&u(2), "phone", after(0)).await.expect("sync");
    assert_eq!(seqs(&first), vec![1, 2]);
    assert!(first.has_more);
    assert_eq!(first.cursor, 2);
    let second = logic
        .sync(&u(2), "phone", after(first.cursor))
        .await
        .expect("sync");
    assert_eq!(seqs(&second), vec![3, 4]);
    assert!(second.has_more);
    // The large one comes alone; then the stream is done.
    let third = logic
        .sync(&u(2), "phone", after(second.cursor))
        .await
        .expect("sync");
    assert_eq!(seqs(&third), vec![5]);
    assert!(!third.has_more, "the last page of the stream");
    assert_eq!(third.cursor, 5);
}

#[tokio::test]
async fn a_user_over_the_rate_is_refused_until_the_bucket_refills() {
    let limits = natter_node::config::LimitsConfig {
        messages_per_sec: 1.0,
        message_burst: 5,
        ..Default::default()
    };
    let (logic, _, store) = logic_with(&limits).await;
    let alice = connect(&logic, 1, "phone", 10).await;
    let mut refused = 0;
    for i in 1..=10 {
        if let Err(e) = logic.send(&alice, text(i, 2, "spam")).await {
            assert_eq!(e.code, ErrorCode::RateLimited);
            refused += 1;
        }
    }
    // A burst of 5 at 1/s: the rest of 10 quick sends is refused (one may refill).
    assert!((4..=5).contains(&refused), "{refused} refused");
    let stored = store
        .sync(&u(2), 0, 100.into())
        .await
        .expect("sync")
        .items
        .len();
    assert_eq!(stored, 10 - refused, "refused messages are not stored");
    // Another user is not affected.
    let bob = connect(&logic, 3, "phone", 11).await;
    logic
        .send(&bob, text(1, 2, "hi"))
        .await
        .expect("bob's own bucket");
}

#[tokio::test]
async fn a_late_joiner_cursor_starts_at_the_join_point() {
    use natter_proto::api::{CreateGroup, JoinType};
    use natter_proto::msg::GroupCursor;
    let (logic, _gateway, store) = logic().await;
    let alice = connect(&logic, 1, "phone", 10).await;
    let g = logic
        .groups
        .create(
            &u(1),
            CreateGroup {
                name: "g".into(),
                join_type: JoinType::Open,
                ..Default::default()
            },
        )
        .await
        .expect("group")
        .id;
    for i in 1..=3 {
        let message = SendMessage {
            client_seq: i,
            receiver: String::new(),
            group: g,
            body: Some(MessageBody::text("before carol")),
        };
        logic.send(&alice, message).await.expect("sent");
    }
    // created = 1, messages 2..=4, carol's joined event = 5 = her join point.
    logic
        .groups
        .join(&u(3), g, String::new())
        .await
        .expect("joined");
    let stream = |group| SyncRequest {
        after: None,
        limit: 0,
        group,
    };
    let reply = logic.sync(&u(3), "phone", stream(0)).await.expect("sync");
    let listed = GroupCursor {
        group: g,
        last_seq: 5,
        cursor: 4,
    };
    assert_eq!(reply.groups, vec![listed]);
    let synced = logic
        .sync(
            &u(3),
            "phone",
            SyncRequest {
                after: Some(0),
                limit: 0,
                group: g,
            },
        )
        .await
        .expect("group sync");
    let seqs: Vec<u64> = synced.messages.iter().map(|m| m.conv_seq).collect();
    assert_eq!((seqs, synced.cursor), (vec![5], 5));
    // The acknowledged event advances the stored cursor past the join point.
    logic
        .push_acked(&u(3), "phone", &[Acked { group: g, seq: 5 }])
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while store.cursor(&u(3), "phone", g).await.expect("cursor") != 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "cursor never reached 5"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let reply = logic.sync(&u(3), "phone", stream(0)).await.expect("sync");
    assert!(reply.groups.is_empty(), "{:?}", reply.groups);
    // Outsiders cannot sync the group.
    let refused = logic.sync(&u(4), "phone", stream(g)).await;
    assert_eq!(
        refused.map_err(|r| r.code).err(),
        Some(ErrorCode::NotMember)
    );
}
