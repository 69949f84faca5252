//! Per-user limits of the HTTP API, end to end: a real server, real HTTP.

use natter_tests::*;
use serde_json::json;

/// Every authenticated route draws from one bucket per user; over it the
/// answer is 429 `rate_limited`, and other users are not affected.
#[tokio::test]
async fn http_requests_are_limited_per_user() {
    let server = TestServer::start(|c| {
        c.limits.http_requests_per_sec = 0.001;
        c.limits.http_request_burst = 3;
    })
    .await;
    for path in [
        "/v1/groups",
        "/v1/sync",
        "/v1/conversations/p:u1:u2/messages",
    ] {
        let (status, _) = server.get_json(path, 1, "phone").await;
        assert_eq!(status, 200, "{path} within the burst");
    }
    let (status, body) = server.get_json("/v1/groups", 1, "phone").await;
    assert_eq!((status, &body["code"]), (429, &json!("rate_limited")));
    let (status, body) = server.get_json("/v1/sync", 1, "laptop").await;
    assert_eq!(
        (status, &body["code"]),
        (429, &json!("rate_limited")),
        "the user's other devices share the bucket"
    );
    let (status, _) = server.get_json("/v1/groups", 2, "phone").await;
    assert_eq!(status, 200, "another user has a bucket of its own");
}

/// Group creation over HTTP: the hourly limit and the groups-owned quota
/// arrive with their codes and statuses.
#[tokio::test]
async fn group_creation_limits_arrive_over_http() {
    let server = TestServer::start(|c| {
        c.groups.max_owned = 1;
        c.groups.creates_per_hour = 2;
    })
    .await;
    let http = reqwest::Client::new();
    let create = |uid: u64| {
        http.post(server.url("/v1/groups"))
            .bearer_auth(server.token(uid, "phone"))
            .json(&json!({"name": "g"}))
            .send()
    };
    assert_eq!(create(1).await.expect("request").status().as_u16(), 201);
    let owned = create(1).await.expect("request");
    assert_eq!(owned.status().as_u16(), 403);
    let body: serde_json::Value = owned.json().await.expect("JSON");
    assert_eq!(body["code"], json!("quota_exceeded"));
}
