//! Memory is bounded in bytes: a connection's send queue, a sync reply and
//! an HTTP page each stop at a byte budget; JSON keeps 64-bit ids exact and
//! carries bytes as base64.

use std::time::{Duration, Instant};

use natter_proto::msg::{MessageBody, SyncRequest};
use natter_proto::{Frame, Op};
use natter_tests::*;

const SEND_QUEUE_BYTES: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_cannot_make_the_server_queue_past_its_budget() {
    let server = TestServer::start(|c| {
        c.comet.send_queue_bytes = SEND_QUEUE_BYTES;
        c.limits.page_bytes = 512 * 1024;
    })
    .await;
    // About a megabyte of large messages for uid 3: each sync page of them
    // is about 500 KB.
    let (alice, _events) = server.client(1, "phone").await;
    let large = "x".repeat(60_000);
    for _ in 0..16 {
        alice
            .send(&u(3), MessageBody::text(large.clone()))
            .await
            .expect("sent");
    }
    // Authenticates, then asks for the same pages again and again and
    // never reads: about 60 MB of replies, far more than the sockets hold.
    let mut stuck = server.raw(3, "phone").await;
    let sync = SyncRequest {
        after: Some(0),
        limit: 500,
        group: 0,
    };
    for seq in 0..120 {
        stuck
            .send(&Frame::new(Op::Sync, 100 + seq, 0, &sync))
            .await
            .expect("sync sent");
    }
    let deadline = Instant::now() + PATIENCE;
    let mut most = 0;
    loop {
        let queued: i64 = server.metric("natter_comet_queued_bytes").await;
        most = most.max(queued);
        assert!(
            queued <= SEND_QUEUE_BYTES as i64,
            "{queued} bytes queued for one connection, over its budget"
        );
        let closed: i64 = server
            .metric("natter_disconnects_total{reason=\"slow_consumer\"}")
            .await;
        if closed == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the client that never reads was not closed ({most} bytes queued at most)"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The connection's queue is gone with it.
    let deadline = Instant::now() + PATIENCE;
    while server.metric::<i64>("natter_comet_queued_bytes").await != 0 {
        assert!(Instant::now() < deadline, "queued bytes left behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stuck);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_pages_stop_at_the_byte_budget_and_the_sdk_pages_on() {
    let server = TestServer::start(|c| c.limits.page_bytes = 4096).await;
    let (alice, _events) = server.client(1, "phone").await;
    let mut mids = Vec::new();
    for i in 0..5 {
        let text = format!("{i}{}", "y".repeat(1500));
        mids.push(
            alice
                .send(&u(2), MessageBody::text(text))
                .await
                .expect("sent")
                .mid,
        );
    }
    // Two messages of about 1.6 KB fit in 4 KB, a third does not.
    let seqs = |page: &serde_json::Value| -> Vec<String> {
        page["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["user_seq"].as_str().expect("a string").to_string())
            .collect()
    };
    let (status, page) = server
        .get_json("/v1/sync?after=0&limit=500", 2, "web")
        .await;
    assert_eq!(status, 200);
    assert_eq!(seqs(&page), ["1", "2"], "{page}");
    assert_eq!(page["has_more"], true);
    assert_eq!(page["cursor"], "2");
    let (_, page) = server
        .get_json("/v1/sync?after=2&limit=500", 2, "web")
        .await;
    assert_eq!(seqs(&page), ["3", "4"]);
    assert_eq!(page["has_more"], true);
    let (_, page) = server
        .get_json("/v1/sync?after=4&limit=500", 2, "web")
        .await;
    assert_eq!(seqs(&page), ["5"]);
    assert_eq!(page["has_more"], false);
    // History too: the page ends early and says where to go on.
    let (status, page) = server
        .get_json("/v1/conversations/p:u1:u2/messages?limit=100", 2, "web")
        .await;
    assert_eq!(status, 200);
    let got: Vec<&str> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["mid"].as_str().expect("mid"))
        .collect();
    assert_eq!(got, [mids[4].to_string(), mids[3].to_string()]);
    assert_eq!(page["next_before"], mids[3].to_string());

    // The SDK's connect-time sync follows has_more through every page.
    let (_bob, mut events) = server.client(2, "phone").await;
    for i in 0..5 {
        let m = next_message(&mut events).await;
        assert!(text_of(&m).starts_with(&i.to_string()), "{}", text_of(&m));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_has_64_bit_integers_as_strings_and_bytes_as_base64() {
    let server = TestServer::start(|_| {}).await;
    let (alice, _events) = server.client(1, "phone").await;
    let ack = alice
        .send(&u(2), MessageBody::custom("blob", vec![0, 1, 2, 250, 255]))
        .await
        .expect("sent");
    let (_, page) = server.get_json("/v1/sync?after=0", 2, "web").await;
    let m = &page["messages"][0];
    assert_eq!(m["mid"], ack.mid.to_string());
    assert_eq!(m["body"]["custom"]["data"], "AAEC+v8=", "{m}");
    for field in [
        "conv_seq",
        "user_seq",
        "sender",
        "receiver",
        "client_seq",
        "time_ms",
    ] {
        assert!(m[field].is_string(), "{field} in {m}");
    }
    assert_eq!(page["cursor"], "1");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sync_refuses_a_cursor_above_2_63_like_the_websocket() {
    let server = TestServer::start(|_| {}).await;
    for after in ["9223372036854775808", "18446744073709551615"] {
        let (status, body) = server
            .get_json(&format!("/v1/sync?after={after}"), 2, "web")
            .await;
        assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
        let (status, _) = server
            .get_json(&format!("/v1/sync?group=1&after={after}"), 2, "web")
            .await;
        assert_eq!(status, 400);
    }
    let (status, page) = server
        .get_json("/v1/sync?after=9223372036854775807", 2, "web")
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["cursor"], "9223372036854775807");
    server.stop().await;
}
