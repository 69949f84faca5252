//! Message search end to end: real server, real SDK clients, the HTTP API.

use std::time::{Duration, Instant};

use natter_proto::msg::MessageBody;
use natter_tests::*;

/// Searches as `uid` until the page holds `mid` (the embedded store indexes
/// behind the commit, within about a second); returns the page.
async fn search_until_found(
    server: &TestServer,
    uid: u64,
    query: &str,
    mid: u64,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, page) = server
            .get_json(&format!("/v1/search?{query}"), uid, "phone")
            .await;
        assert_eq!(status, 200, "{page}");
        let mids = page_mids(&page);
        if mids.contains(&mid.to_string()) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "{query} never found {mid}: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn page_mids(page: &serde_json::Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["mid"].as_str().expect("mid").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_find_their_own_messages_in_chinese_and_english() {
    let server = TestServer::start(|_| {}).await;
    let (alice, _alice_events) = server.client(1, "phone").await;
    let (bob, _bob_events) = server.client(2, "phone").await;
    let (carol, _carol_events) = server.client(3, "phone").await;
    let weather = alice
        .send(&u(2), MessageBody::text("今天天气很好"))
        .await
        .expect("sent");
    let hello = bob
        .send(&u(1), MessageBody::text("Hello from Bob"))
        .await
        .expect("sent");
    carol
        .send(&u(3), MessageBody::text("a note to myself"))
        .await
        .expect("sent");

    // Both parties find both messages, without spaces in Chinese and
    // whatever the case in English.
    for uid in [1, 2] {
        let page = search_until_found(&server, uid, "q=天气", weather.mid).await;
        assert_eq!(page_mids(&page), vec![weather.mid.to_string()]);
        assert_eq!(page["messages"][0]["body"]["text"]["text"], "今天天气很好");
        assert_eq!(page["messages"][0]["conversation"], "p:u1:u2");
        let page = search_until_found(&server, uid, "q=HELLO", hello.mid).await;
        assert_eq!(page_mids(&page), vec![hello.mid.to_string()]);
    }
    let page = search_until_found(
        &server,
        1,
        "q=%E5%A4%A9&conversation=p:u1:u2&limit=1",
        weather.mid,
    )
    .await;
    assert_eq!(page["next_before"], weather.mid.to_string());

    // Carol finds nothing of theirs, and may not search their conversation.
    for query in ["q=天气", "q=hello", "q=Bob"] {
        let (status, page) = server
            .get_json(&format!("/v1/search?{query}"), 3, "phone")
            .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page_mids(&page), Vec::<String>::new(), "{query}");
    }
    let (status, body) = server
        .get_json("/v1/search?q=hello&conversation=p:u1:u2", 3, "phone")
        .await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));

    // Bad queries are refused with a reason.
    let long = "字".repeat(201);
    for query in [
        "q=".to_string(),
        "limit=5".to_string(),
        format!("q={long}"),
        "q=hello&limit=0".to_string(),
        "q=hello&limit=ten".to_string(),
        "q=hello&from=20&to=10".to_string(),
        "q=hello&before=x".to_string(),
        "q=hello&conversation=nope".to_string(),
    ] {
        let (status, body) = server
            .get_json(&format!("/v1/search?{query}"), 1, "phone")
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["code"], "bad_request", "{query}");
        assert!(!body["message"].as_str().unwrap_or("").is_empty());
    }
    server.stop().await;
}
