//! The sessions directory in Redis, end to end: a server whose sessions
//! live in a real Redis, and what happens when that Redis goes away.

use std::time::Duration;

use natter_client::CreateGroup;
use natter_proto::msg::MessageBody;
use natter_tests::*;

async fn readyz(server: &TestServer) -> (u16, String) {
    let response = reqwest::get(server.url("/readyz")).await.expect("readyz");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

async fn metric(server: &TestServer, line_start: &str) -> Option<String> {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    text.lines()
        .find(|l| l.starts_with(line_start))
        .map(str::to_string)
}

/// Polls `check` until it holds or the patience runs out.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_works_on_redis_sessions_and_an_outage_is_reported_then_recovered() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let server = TestServer::start(|c| {
        c.sessions.redis_url = url;
        c.sessions.timeout_ms = 300;
        // Renewals every second.
        c.sessions.ttl_ms = 3000;
    })
    .await;
    let (alice, _alice_events) = server.client(1, "phone").await;
    let (bob, mut bob_events) = server.client(2, "phone").await;
    let ack = alice
        .send(&u(2), MessageBody::text("via redis"))
        .await
        .expect("acked");
    assert_eq!(next_message(&mut bob_events).await.mid, ack.mid);
    let group = alice
        .create_group(&CreateGroup {
            name: "g".into(),
            members: vec![u(2)],
            ..Default::default()
        })
        .await
        .expect("group");
    let sent = alice
        .send_group(group.id, MessageBody::text("to the group"))
        .await
        .expect("acked");
    loop {
        if next_message(&mut bob_events).await.mid == sent.mid {
            break;
        }
    }
    eventually("ready with Redis up", || async {
        readyz(&server).await.0 == 200
    })
    .await;

    // Redis goes away: sends still succeed (storage does not need it), the
    // outage shows in /readyz and the metrics.
    redis.stop();
    eventually("readiness reports Redis down", || async {
        let (status, body) = readyz(&server).await;
        status == 503 && body.contains("redis")
    })
    .await;
    assert_eq!(
        metric(&server, "natter_dependency_up{dependency=\"redis\"}")
            .await
            .as_deref(),
        Some("natter_dependency_up{dependency=\"redis\"} 0")
    );
    let during = alice
        .send(&u(2), MessageBody::text("during the outage"))
        .await
        .expect("stored and acked");
    let errors = metric(&server, "natter_directory_errors_total")
        .await
        .expect("counter");
    assert_ne!(
        errors, "natter_directory_errors_total 0",
        "the failed look-up is counted"
    );

    // It comes back empty (it keeps nothing on disk). Readiness recovers,
    // live connections are back in the directory at their gateway's next
    // renewal, and what was not pushed meanwhile comes with a sync.
    redis.restart().await;
    eventually("ready again", || async { readyz(&server).await.0 == 200 }).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = alice
        .send(&u(2), MessageBody::text("after"))
        .await
        .expect("acked");
    bob.sync_within(PATIENCE).await.expect("bob syncs");
    let mut seen = Vec::new();
    while !(seen.contains(&during.mid) && seen.contains(&after.mid)) {
        seen.push(next_message(&mut bob_events).await.mid);
    }
    server.stop().await;
}
