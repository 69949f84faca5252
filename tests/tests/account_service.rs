//! The operator's account service as the auth provider (`auth.verify_url`):
//! a real local HTTP server stands in for it and checks what natter sends;
//! clients connect over the WebSocket and call the HTTP API with its tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use natter_client::{Client, ClientConfig, ClientError, Event};
use natter_proto::msg::MessageBody;
use natter_proto::{ErrorCode, UserId};
use natter_tests::{TestServer, PATIENCE};

/// The stand-in account service: tokens it knows, and every call it got.
#[derive(Default)]
struct Accounts {
    calls: Mutex<HashMap<String, u32>>,
    /// Calls whose Authorization was not `Bearer <token>`.
    malformed: Mutex<u32>,
}

impl Accounts {
    fn calls(&self, token: &str) -> u32 {
        self.calls
            .lock()
            .expect("lock")
            .get(token)
            .copied()
            .unwrap_or(0)
    }
}

async fn verify(State(accounts): State<Arc<Accounts>>, headers: HeaderMap) -> Response {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        *accounts.malformed.lock().expect("lock") += 1;
        return StatusCode::BAD_REQUEST.into_response();
    };
    *accounts
        .calls
        .lock()
        .expect("lock")
        .entry(token.to_string())
        .or_default() += 1;
    match token {
        // The original system's account ids: opaque strings.
        "tok-upper" => Json(serde_json::json!({"uid": "20210419184685527C1DB08A"})).into_response(),
        "tok-lower" => Json(serde_json::json!({"uid": "20210419184685527c1db08a"})).into_response(),
        "tok-refused" => StatusCode::UNAUTHORIZED.into_response(),
        "tok-forbidden" => StatusCode::FORBIDDEN.into_response(),
        "tok-broken" => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        "tok-bad-id" => Json(serde_json::json!({"uid": "has:colon"})).into_response(),
        "tok-slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Json(serde_json::json!({"uid": "slow"})).into_response()
        }
        _ => StatusCode::UNAUTHORIZED.into_response(),
    }
}

async fn account_service() -> (String, Arc<Accounts>) {
    let accounts = Arc::new(Accounts::default());
    let app = Router::new()
        .route("/verify", get(verify))
        .with_state(accounts.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/verify", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, accounts)
}

async fn server_with(url: &str) -> TestServer {
    let url = url.to_string();
    TestServer::start(move |c| {
        c.auth.verify_url = url;
        c.auth.verify_timeout_ms = 500;
        c.auth.verify_cache_accepted_secs = 60;
        c.auth.verify_cache_refused_secs = 60;
    })
    .await
}

fn config(server: &TestServer, token: &str, device: &str) -> ClientConfig {
    let mut config = ClientConfig::new(server.server(), token.to_string());
    config.device = Some(device.to_string());
    config.reconnect = false;
    config
}

/// The code a connect attempt was refused with.
async fn refused(server: &TestServer, token: &str) -> ErrorCode {
    match Client::connect(config(server, token, "phone")).await {
        Err(ClientError::Closed { code, .. }) => code,
        Err(other) => panic!("expected a close with a code, got {other}"),
        Ok(_) => panic!("{token} was accepted"),
    }
}

#[tokio::test]
async fn the_account_service_names_users_that_chat_over_natter() {
    let (url, accounts) = account_service().await;
    let server = server_with(&url).await;
    let (upper, mut upper_events) = Client::connect(config(&server, "tok-upper", "phone"))
        .await
        .expect("accepted");
    let (lower, mut lower_events) = Client::connect(config(&server, "tok-lower", "web"))
        .await
        .expect("accepted");
    assert_eq!(upper.uid().as_str(), "20210419184685527C1DB08A");
    assert_eq!(lower.uid().as_str(), "20210419184685527c1db08a");
    for events in [&mut upper_events, &mut lower_events] {
        match tokio::time::timeout(PATIENCE, events.next()).await {
            Ok(Some(Event::Connected { .. })) => {}
            other => panic!("expected Connected, got {other:?}"),
        }
    }
    // Ids that differ only in case are two users.
    upper
        .send(lower.uid(), MessageBody::text("hello, lower case"))
        .await
        .expect("sent");
    let message = loop {
        match tokio::time::timeout(PATIENCE, lower_events.next()).await {
            Ok(Some(Event::Message(m))) => break m,
            Ok(Some(_)) => continue,
            other => panic!("expected the message, got {other:?}"),
        }
    };
    assert_eq!(message.sender, "20210419184685527C1DB08A");
    assert_eq!(message.sender_device, "phone");
    assert_eq!(
        message.conversation,
        "p:20210419184685527C1DB08A:20210419184685527c1db08a"
    );
    // The HTTP API takes the same tokens (and the device from a header).
    let response = reqwest::Client::new()
        .get(server.url(&format!(
            "/v1/conversations/{}/messages",
            message.conversation
        )))
        .bearer_auth("tok-lower")
        .header("X-Natter-Device", "web")
        .send()
        .await
        .expect("HTTP");
    assert_eq!(response.status(), 200);
    let page: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(page["messages"][0]["sender"], "20210419184685527C1DB08A");
    assert_eq!(page["messages"][0]["receiver"], "20210419184685527c1db08a");
    // Every answer came from the service once, then from the cache.
    assert_eq!(accounts.calls("tok-upper"), 1);
    assert_eq!(accounts.calls("tok-lower"), 1);
    assert_eq!(*accounts.malformed.lock().expect("lock"), 0);
    upper.close().await;
    lower.close().await;
}

#[tokio::test]
async fn refusals_failures_and_time_outs_are_told_apart_and_cached_as_configured() {
    let (url, accounts) = account_service().await;
    let server = server_with(&url).await;
    assert_eq!(refused(&server, "tok-refused").await, ErrorCode::AuthFailed);
    assert_eq!(
        refused(&server, "tok-forbidden").await,
        ErrorCode::AuthFailed
    );
    assert_eq!(
        refused(&server, "tok-broken").await,
        ErrorCode::AuthUnavailable
    );
    assert_eq!(
        refused(&server, "tok-slow").await,
        ErrorCode::AuthUnavailable
    );
    assert_eq!(
        refused(&server, "tok-bad-id").await,
        ErrorCode::AuthUnavailable
    );
    // Refusals are cached; failures and time-outs are asked again.
    assert_eq!(refused(&server, "tok-refused").await, ErrorCode::AuthFailed);
    assert_eq!(
        refused(&server, "tok-broken").await,
        ErrorCode::AuthUnavailable
    );
    assert_eq!(accounts.calls("tok-refused"), 1);
    assert_eq!(accounts.calls("tok-broken"), 2);
    // A token that names no device needs one from the client.
    let mut no_device = config(&server, "tok-upper", "phone");
    no_device.device = None;
    match Client::connect(no_device).await {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, ErrorCode::AuthFailed),
        other => panic!("expected auth_failed, got {:?}", other.err()),
    }
    // Over HTTP: 401 for a refusal, 503 while the service fails.
    let status = |token: &'static str| {
        let url = server.url("/v1/sync?after=0");
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .header("X-Natter-Device", "web")
                .send()
                .await
                .expect("HTTP")
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("tok-refused").await, 401);
    assert_eq!(status("tok-broken").await, 503);
    assert_eq!(status("tok-upper").await, 200);
    // natter's own tokens keep working beside the account service.
    let (own, _events) = server.client("u-own", "phone").await;
    assert_eq!(own.uid(), &UserId::parse("u-own").expect("uid"));
    // Metrics count each outcome by provider.
    let counted = |outcome: &str| {
        format!("natter_auth_provider_total{{outcome=\"{outcome}\",provider=\"verify_url\"}}")
    };
    assert!(server.metric::<u64>(&counted("auth_unavailable")).await >= 3);
    assert!(server.metric::<u64>(&counted("auth_failed")).await >= 2);
    own.close().await;
}
