//! Downlink reliability: resend until push-ack, slow consumers, HTTP
//! history and sync, metrics.

use std::time::{Duration, Instant};

use natter_proto::msg::{Content, Image, Message, MessageBody, MessageType};
use natter_proto::{ErrorCode, Frame, Op};
use natter_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacked_push_is_resent_then_the_connection_closes_and_sync_recovers_it() {
    let server = TestServer::start(|c| {
        c.comet.push_rto_ms = 150;
        c.comet.push_retries = 2;
    })
    .await;
    let mut bob_raw = server.raw(2, "phone").await;
    let (alice, _events) = server.client(1, "phone").await;
    let ack = alice
        .send(&u(2), MessageBody::text("are you there"))
        .await
        .expect("sent");

    let first = next_frame(&mut bob_raw).await;
    assert_eq!(first.op, Op::Push);
    let m: Message = first.message().expect("message");
    assert_eq!(m.mid, ack.mid);
    // Not acked: the same frame (same seq) comes again, twice, then the close.
    for _ in 0..2 {
        let again = next_frame(&mut bob_raw).await;
        assert_eq!(
            (again.op, again.seq, &again.body),
            (Op::Push, first.seq, &first.body)
        );
    }
    let (disconnect, close) = expect_close(&mut bob_raw).await;
    assert_eq!(disconnect, Some(ErrorCode::PushAckTimeout as u32));
    assert_eq!(close, ErrorCode::PushAckTimeout.close_code());

    // The device comes back with the SDK and gets it by sync.
    let (_bob, mut bob_events) = server.client(2, "phone").await;
    assert_eq!(next_message(&mut bob_events).await.mid, ack.mid);
    server.stop().await;
}

/// Heartbeats keep `conn` open for `quiet`; only their replies may arrive,
/// no resent push.
async fn no_resend_for(conn: &mut natter_client::raw::Connection, quiet: Duration) {
    let deadline = Instant::now() + quiet;
    while Instant::now() < deadline {
        conn.send(&Frame::empty(Op::Heartbeat, 9, 0))
            .await
            .expect("heartbeat");
        let f = next_frame(conn).await;
        assert_eq!(
            f.op,
            Op::HeartbeatReply,
            "only heartbeat replies, no resent push"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acked_push_is_not_resent_and_moves_the_cursor() {
    let server = TestServer::start(|c| c.comet.push_rto_ms = 100).await;
    let mut bob_raw = server.raw(2, "phone").await;
    let (alice, _events) = server.client(1, "phone").await;
    alice
        .send(&u(2), MessageBody::text("one"))
        .await
        .expect("sent");
    let push = next_frame(&mut bob_raw).await;
    bob_raw
        .send(&Frame::empty(Op::PushAck, 0, push.seq))
        .await
        .expect("ack");
    // Heartbeats keep it open; no resend arrives within a few RTOs.
    no_resend_for(&mut bob_raw, Duration::from_millis(500)).await;
    // The server's cursor for the device now covers the message.
    let (status, page) = server.get_json("/v1/sync", 2, "phone").await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(0), "{page}");
    assert_eq!(page["cursor"], "1");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_push_ack_covers_every_push_before_it() {
    let server = TestServer::start(|c| c.comet.push_rto_ms = 100).await;
    let mut bob_raw = server.raw(2, "phone").await;
    let (alice, _events) = server.client(1, "phone").await;
    for text in ["one", "two", "three"] {
        alice
            .send(&u(2), MessageBody::text(text))
            .await
            .expect("sent");
    }
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let push = next_frame(&mut bob_raw).await;
        assert_eq!(push.op, Op::Push);
        seqs.push(push.seq);
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // An ack for a push not sent yet acknowledges nothing; the last one's
    // ack acknowledges all three.
    bob_raw
        .send(&Frame::empty(Op::PushAck, 0, seqs[2] + 5))
        .await
        .expect("ack");
    let resent = next_frame(&mut bob_raw).await;
    assert_eq!(
        (resent.op, resent.seq),
        (Op::Push, seqs[0]),
        "still in flight"
    );
    bob_raw
        .send(&Frame::empty(Op::PushAck, 0, seqs[2]))
        .await
        .expect("ack");
    // Frames are handled in order: once the heartbeat after the ack is
    // answered, the ack has been taken; resends written before it may
    // still be on their way, and nothing is resent after it.
    bob_raw
        .send(&Frame::empty(Op::Heartbeat, 9, 0))
        .await
        .expect("heartbeat");
    while next_frame(&mut bob_raw).await.op != Op::HeartbeatReply {}
    no_resend_for(&mut bob_raw, Duration::from_millis(500)).await;
    let (status, page) = server.get_json("/v1/sync", 2, "phone").await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(0), "{page}");
    assert_eq!(page["cursor"], "3");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_acknowledges_a_burst_of_pushes_with_few_acks() {
    let server = TestServer::start(|_| {}).await;
    let mut config = server.client_config(2, "phone");
    config.push_ack_delay = Duration::from_millis(300);
    let (bob, mut bob_events) = natter_client::Client::connect(config)
        .await
        .expect("connects");
    bob.sync().await.expect("initial sync");
    let (alice, _events) = server.client(1, "phone").await;
    let acks_before: u64 = server
        .metric("natter_frames_in_total{op=\"PushAck\"}")
        .await;
    for i in 0..20 {
        alice
            .send(&u(2), MessageBody::text(format!("m{i}")))
            .await
            .expect("sent");
    }
    for i in 0..20 {
        let m = next_message(&mut bob_events).await;
        assert_eq!(text_of(&m), format!("m{i}"));
    }
    // Every push is acknowledged, with fewer acks than pushes.
    let deadline = Instant::now() + PATIENCE;
    loop {
        // The stored cursor covers everything: nothing left to sync.
        let (_, page) = server.get_json("/v1/sync", 2, "phone").await;
        if page["messages"].as_array().is_some_and(Vec::is_empty) {
            assert_eq!(page["cursor"], "20");
            break;
        }
        assert!(Instant::now() < deadline, "not acknowledged: {page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acks: u64 = server
        .metric::<u64>("natter_frames_in_total{op=\"PushAck\"}")
        .await
        - acks_before;
    assert_eq!(
        server
            .metric::<u64>("natter_pushes_total{kind=\"acked\"}")
            .await,
        20
    );
    assert!((1..20).contains(&acks), "{acks} acks for 20 pushes");
    drop(bob);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_others_keep_their_latency() {
    let server = TestServer::start(|c| {
        c.comet.send_queue = 8;
        c.comet.max_body = 64 * 1024;
    })
    .await;
    // Authenticates, then never reads again.
    let _stuck = server.raw(3, "phone").await;
    let (alice, _alice_events) = server.client(1, "phone").await;
    let (bob, _bob_events) = server.client(2, "phone").await;
    let (_carol, mut carol_events) = server.client(4, "phone").await;

    let flood = tokio::spawn(async move {
        let big = "x".repeat(48 * 1024);
        for _ in 0..400 {
            alice
                .send(&u(3), MessageBody::text(big.clone()))
                .await
                .expect("acked even though the receiver is stuck");
        }
    });
    let mut worst = Duration::ZERO;
    for i in 0..30 {
        let started = Instant::now();
        bob.send(&u(4), MessageBody::text(format!("ping {i}")))
            .await
            .expect("sent");
        let m = next_message(&mut carol_events).await;
        assert_eq!(text_of(&m), format!("ping {i}"));
        worst = worst.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    flood.await.expect("flood");
    // A generous bound: the point is that nobody waits on the stuck reader.
    assert!(worst < Duration::from_secs(2), "worst round trip {worst:?}");

    let deadline = Instant::now() + PATIENCE;
    loop {
        let metrics = reqwest::get(server.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        if metrics.contains("natter_disconnects_total{reason=\"slow_consumer\"} 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stuck client was not dropped:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Everything sent to the stuck user is still there for when it returns.
    let (stuck_again, mut events) = server.client(3, "phone").await;
    let mut n = 0;
    while n < 400 {
        next_message(&mut events).await;
        n += 1;
    }
    drop(stuck_again);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_and_filters_over_http() {
    let server = TestServer::start(|_| {}).await;
    let (alice, _a) = server.client(1, "phone").await;
    let mut mids = Vec::new();
    for i in 0..25 {
        mids.push(
            alice
                .send(&u(2), MessageBody::text(format!("t{i}")))
                .await
                .expect("sent")
                .mid,
        );
    }
    let image = MessageBody {
        content: Some(Content::Image(Image {
            url: "https://cdn/x.png".into(),
            width: 10,
            height: 20,
            ..Default::default()
        })),
    };
    let img = alice.send(&u(2), image).await.expect("sent");

    let (bob, _b) = server.client(2, "phone").await;
    let first = bob.history("p:u1:u2", None, 10, &[]).await.expect("page 1");
    assert_eq!(first.messages.len(), 10);
    assert_eq!(first.messages[0].mid, img.mid.to_string(), "newest first");
    let second = bob
        .history("p:u1:u2", first.next_before_mid(), 10, &[])
        .await
        .expect("page 2");
    let third = bob
        .history("p:u1:u2", second.next_before_mid(), 10, &[])
        .await
        .expect("page 3");
    assert_eq!(third.messages.len(), 6);
    assert_eq!(third.next_before, None, "last page");
    let all: Vec<String> = [first.messages, second.messages, third.messages]
        .concat()
        .into_iter()
        .map(|m| m.mid)
        .collect();
    let mut expected: Vec<String> = mids
        .iter()
        .chain([&img.mid])
        .map(|m| m.to_string())
        .collect();
    expected.reverse();
    assert_eq!(all, expected);

    let images = bob
        .history("p:u1:u2", None, 100, &["image"])
        .await
        .expect("images");
    assert_eq!(images.messages.len(), 1);
    assert_eq!(images.messages[0].msg_type, Some(MessageType::Image));
    match &images.messages[0].body {
        Some(Content::Image(image)) => assert_eq!((image.width, image.height), (10, 20)),
        other => panic!("expected an image body, got {other:?}"),
    }

    // HTTP sync: the stream after a cursor, paged.
    let (status, page) = server
        .get_json("/v1/sync?after=20&limit=3", 2, "tablet")
        .await;
    assert_eq!(status, 200);
    let seqs: Vec<u64> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            m["user_seq"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("seq, a decimal string")
        })
        .collect();
    assert_eq!(seqs, vec![21, 22, 23]);
    assert_eq!(page["has_more"], true);
    assert_eq!(page["cursor"], "23");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let server = TestServer::start(|_| {}).await;
    assert_eq!(
        reqwest::get(server.url("/healthz"))
            .await
            .expect("healthz")
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(server.url("/readyz"))
            .await
            .expect("readyz")
            .status(),
        200
    );
    let (alice, _a) = server.client(1, "phone").await;
    let (_bob, mut bob_events) = server.client(2, "phone").await;
    alice
        .send(&u(2), MessageBody::text("counted"))
        .await
        .expect("sent");
    next_message(&mut bob_events).await;
    // A raw client sends a frame with a bad body to show up under errors.
    let mut raw = server.raw(5, "raw").await;
    raw.send(&Frame::raw(Op::Message, 1, 0, vec![0xff]))
        .await
        .expect("sent");
    next_frame(&mut raw).await;
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for needle in [
        "natter_connections 3",
        "natter_messages_total{outcome=\"ok\"} 1",
        "natter_pushes_total{kind=\"first\"} 1",
        "natter_frame_errors_total{reason=\"bad_body\"} 1",
        "natter_store_commit_seconds_count",
        "natter_ack_to_push_seconds_count 1",
        "natter_auth_total{outcome=\"ok\"} 3",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_own_send_never_moves_its_cursor_past_a_push_it_missed() {
    let server = TestServer::start(|c| c.comet.push_rto_ms = 60_000).await;
    let (alice, _alice_events) = server.client(1, "phone").await;
    let mut bob_raw = server.raw(2, "phone").await;
    let missed = alice
        .send(&u(2), MessageBody::text("pushed, never acked"))
        .await
        .expect("sent");
    assert_eq!(next_frame(&mut bob_raw).await.op, Op::Push);
    // Bob's device sends (user_seq 2 in his stream) without acking push 1, then goes away.
    let own = natter_proto::msg::SendMessage {
        client_seq: 7,
        receiver: u(1).to_string(),
        body: Some(MessageBody::text("mine")),
        group: 0,
    };
    bob_raw
        .send(&Frame::new(Op::Message, 3, 0, &own))
        .await
        .expect("sent");
    assert_eq!(next_reply(&mut bob_raw).await.op, Op::MessageReply);
    bob_raw.close().await;
    drop(bob_raw);
    // A fresh process on the same device, with no cursor of its own, starts
    // from the server's: it must still get the message it never acked.
    let (_bob, mut bob_events) = server.client(2, "phone").await;
    let first = next_message(&mut bob_events).await;
    assert_eq!(first.mid, missed.mid);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_that_never_authenticated() {
    let server = TestServer::start(|c| {
        c.comet.auth_timeout_ms = 60_000;
        c.comet.drain_ms = 30_000;
    })
    .await;
    let mut idle = natter_client::raw::Connection::connect(&server.server(), None)
        .await
        .expect("connects");
    let started = Instant::now();
    let stopping = tokio::spawn(server.stop());
    let (disconnect, close) = expect_close(&mut idle).await;
    assert_eq!(disconnect, Some(ErrorCode::ServerShutdown as u32));
    assert_eq!(close, ErrorCode::ServerShutdown.close_code());
    stopping.await.expect("stopped");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown waited for the idle socket"
    );
}
