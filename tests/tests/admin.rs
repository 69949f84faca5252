//! The admin API (issue 13): its own listener, the key on every route, and
//! each route doing what the operator's servers rely on: tokens a client
//! can use, messages stored and pushed like any other, a logout that closes
//! a user's connections on every gateway and refuses older tokens, and
//! groups made on a user's behalf.

use std::time::Duration;

use natter::Role;
use natter_client::raw::Connection;
use natter_client::{Client, ClientConfig, Event};
use natter_node::discovery::testing::EtcdServer;
use natter_proto::msg::AuthRequest;
use natter_proto::{ErrorCode, Frame, Op};
use natter_record::mysql::testing::{drop_database, fresh_database};
use natter_tests::*;
use serde_json::{json, Value};

/// A token of `uid` for `device` issued `ago` seconds ago.
fn token_issued_ago(server: &TestServer, uid: &str, device: &str, ago: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    server
        .tokens()
        .mint_at(&uid.user(), device, now - ago, 3600)
        .expect("token")
}

/// A raw connection to `addr` authenticated with `token`, or the frame it
/// was answered with instead of `AuthReply`.
async fn raw_with(addr: &str, token: &str) -> Result<Connection, Frame> {
    let mut conn = Connection::connect(addr, None).await.expect("connects");
    let auth = AuthRequest {
        token: token.into(),
        client: "raw".into(),
        device: String::new(),
    };
    conn.send(&Frame::new(Op::Auth, 1, 0, &auth))
        .await
        .expect("auth sent");
    let frame = next_frame(&mut conn).await;
    if frame.op == Op::AuthReply {
        Ok(conn)
    } else {
        Err(frame)
    }
}

/// The admin request for each route, with a body it would accept.
fn every_route() -> Vec<(&'static str, String, Value)> {
    natter::admin_routes()
        .into_iter()
        .map(|(method, path)| {
            assert_eq!(method, "post", "{path}");
            let body = match path {
                "/v1/admin/tokens" => json!({"uid": "alice", "device": "phone"}),
                "/v1/admin/messages" => {
                    json!({"from": "alice", "to": "bob", "body": {"text": {"text": "hi"}}})
                }
                "/v1/admin/groups" => json!({"owner": "alice", "name": "g"}),
                _ => json!({}),
            };
            (method, path.replace("{uid}", "alice"), body)
        })
        .collect()
}

async fn post(url: String, key: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(url).json(body);
    if let Some(key) = key {
        request = request.header("Authorization", key);
    }
    let response = request.send().await.expect("HTTP request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_admin_route_is_refused_without_the_key_and_works_with_it() {
    let server = TestServer::start(|_| {}).await;
    let key = server.admin_key();
    assert!(key.len() >= 32, "a key was made in the data dir");
    let routes = every_route();
    assert_eq!(routes.len(), 4);
    let wrong = format!("Bearer {}", "x".repeat(key.len()));
    for (_, path, body) in &routes {
        for (header, code) in [
            (None, "auth_required"),
            (Some("Basic YWRtaW46YWRtaW4="), "auth_required"),
            (Some(wrong.as_str()), "auth_failed"),
            // A header value loses its trailing space: no key at all.
            (Some("Bearer "), "auth_required"),
            (Some(&*format!("Bearer {key}x")), "auth_failed"),
        ] {
            let (status, answer) = post(server.admin_url(path), header, body).await;
            assert_eq!(status, 401, "{path} with {header:?}: {answer}");
            assert_eq!(answer["code"], code, "{path} with {header:?}");
        }
        // A user's token is not the admin key.
        let user = format!("Bearer {}", server.token("alice", "phone"));
        let (status, _) = post(server.admin_url(path), Some(&user), body).await;
        assert_eq!(status, 401, "{path} with a user's token");
        // Nor is the admin API on the public listener.
        let bearer = format!("Bearer {key}");
        let (status, _) = post(server.url(path), Some(&bearer), body).await;
        assert_eq!(status, 404, "{path} on the public listener");
    }
    // Even a path that does not exist says nothing without the key.
    let (status, _) = post(server.admin_url("/v1/admin/nothing"), None, &json!({})).await;
    assert_eq!(status, 401);
    let bearer = format!("Bearer {key}");
    let (status, _) = post(
        server.admin_url("/v1/admin/nothing"),
        Some(&bearer),
        &json!({}),
    )
    .await;
    assert_eq!(status, 404);
    // With the key each route does its work.
    for (_, path, body) in &routes {
        let (status, answer) = server.admin_post(path, body.clone()).await;
        assert!(status == 200 || status == 201, "{path}: {status} {answer}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_configured_admin_key_is_the_one_taken() {
    let key = "an admin key set in the configuration, 32+ bytes";
    let server = TestServer::start(|c| c.admin.key = key.into()).await;
    assert_eq!(server.admin_key(), key);
    let body = json!({"uid": "alice", "device": "phone"});
    let (status, _) = post(
        server.admin_url("/v1/admin/tokens"),
        Some(&format!("Bearer {key}")),
        &body,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = post(
        server.admin_url("/v1/admin/tokens"),
        Some(&format!("Bearer {}", " ".repeat(40))),
        &body,
    )
    .await;
    assert_eq!(status, 401);
    server.stop().await;
}

#[tokio::test]
async fn an_admin_token_lets_a_client_in_for_its_life() {
    let server = TestServer::start(|c| c.auth.token_ttl_secs = 3600).await;
    let (status, answer) = server
        .admin_post(
            "/v1/admin/tokens",
            json!({"uid": "Alice.B@app", "device": "phone", "ttl_secs": "600"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let token = answer["token"].as_str().expect("a token").to_string();
    let expires: i64 = answer["expires_at"]
        .as_str()
        .expect("a 64-bit integer is a string")
        .parse()
        .expect("a number");
    let claims = server.tokens().verify(&token).expect("natter's own token");
    assert_eq!(claims.expires_at, expires);
    assert_eq!(claims.expires_at - claims.issued_at, 600);
    let (_client, mut events) = Client::connect(ClientConfig::new(server.server(), token))
        .await
        .expect("the token works");
    match tokio::time::timeout(PATIENCE, events.next()).await {
        Ok(Some(Event::Connected { uid, device })) => {
            assert_eq!((uid.as_str(), device.as_str()), ("Alice.B@app", "phone"))
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    // The default life is auth.token_ttl_secs, and it is the longest.
    let (status, answer) = server
        .admin_post("/v1/admin/tokens", json!({"uid": "a", "device": "d"}))
        .await;
    assert_eq!(status, 200);
    let claims = server
        .tokens()
        .verify(answer["token"].as_str().expect("token"))
        .expect("valid");
    assert_eq!(claims.expires_at - claims.issued_at, 3600);
    for bad in [
        json!({"uid": "a", "device": "d", "ttl_secs": 0}),
        json!({"uid": "a", "device": "d", "ttl_secs": 3601}),
        json!({"uid": "a", "device": "has space"}),
        json!({"uid": "a", "device": ""}),
        json!({"uid": "a b", "device": "d"}),
        json!({"uid": "..", "device": "d"}),
        json!({"device": "d"}),
    ] {
        let (status, answer) = server.admin_post("/v1/admin/tokens", bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {answer}");
        assert_eq!(answer["code"], "bad_request", "{bad}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_message_as_a_user_reaches_the_receiver_and_the_senders_other_devices() {
    let server = TestServer::start(|_| {}).await;
    let (_bob, mut bob_events) = server.client("bob", "phone").await;
    let (_alice, mut alice_events) = server.client("alice", "laptop").await;
    let send = json!({
        "from": "alice",
        "to": "bob",
        "client_seq": "7",
        "body": {"text": {"text": "from the operator's server"}}
    });
    let (status, answer) = server.admin_post("/v1/admin/messages", send.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["conversation"], "p:alice:bob");
    assert_eq!(answer["conv_seq"], "1");
    let mid: u64 = answer["mid"]
        .as_str()
        .expect("mid")
        .parse()
        .expect("number");
    for events in [&mut bob_events, &mut alice_events] {
        let m = next_message(events).await;
        assert_eq!(m.mid, mid);
        assert_eq!(text_of(&m), "from the operator's server");
        assert_eq!(
            (m.sender.as_str(), m.sender_device.as_str()),
            ("alice", "admin")
        );
    }
    // A retry with the same client_seq stores it once.
    let (status, again) = server.admin_post("/v1/admin/messages", send).await;
    assert_eq!(status, 200);
    assert_eq!(again["mid"], answer["mid"]);
    // Without one, each request is a message of its own.
    let fresh = json!({"from": "alice", "to": "bob", "body": {"text": {"text": "two"}}});
    let (_, first) = server.admin_post("/v1/admin/messages", fresh.clone()).await;
    let (_, second) = server.admin_post("/v1/admin/messages", fresh).await;
    assert_ne!(first["mid"], second["mid"]);
    assert_eq!(
        (first["conv_seq"].as_str(), second["conv_seq"].as_str()),
        (Some("2"), Some("3"))
    );
    // Stored like any message: in both users' history.
    let (status, page) = server
        .get_json("/v1/conversations/p:alice:bob/messages", "bob", "phone")
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(3));
    for (bad, code) in [
        (
            json!({"from": "alice", "body": {"text": {"text": "x"}}}),
            "bad_request",
        ),
        (
            json!({"from": "alice", "to": "bob", "group": "1", "body": {"text": {"text": "x"}}}),
            "bad_request",
        ),
        (
            json!({"from": "alice", "to": "bob", "body": {"text": {"text": ""}}}),
            "invalid_message",
        ),
        (
            json!({"from": "alice", "to": "bob", "body": {"nope": {}}}),
            "bad_request",
        ),
        (
            json!({"from": "alice", "to": "bob", "client_seq": "0", "body": {"text": {"text": "x"}}}),
            "invalid_message",
        ),
    ] {
        let (status, answer) = server.admin_post("/v1/admin/messages", bad.clone()).await;
        assert_eq!(answer["code"], code, "{bad}: {status} {answer}");
    }
    server.stop().await;
}

#[tokio::test]
async fn system_notices_and_groups_made_for_a_user() {
    let server = TestServer::start(|c| c.admin.system_sender = "natter-notices".into()).await;
    let (_bob, mut bob_events) = server.client("bob", "phone").await;
    let (status, answer) = server
        .admin_post(
            "/v1/admin/messages",
            json!({"from": null, "to": "bob", "body": {"notice": {"text": "maintenance at 2"}}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let m = next_message(&mut bob_events).await;
    assert_eq!(m.sender.as_str(), "natter-notices");
    assert_eq!(m.mid.to_string(), answer["mid"].as_str().expect("mid"));

    // A group made on alice's behalf: hers, with bob in it.
    let (status, group) = server
        .admin_post(
            "/v1/admin/groups",
            json!({"owner": "alice", "name": "made for alice", "members": ["bob"]}),
        )
        .await;
    assert_eq!(status, 201, "{group}");
    assert_eq!(group["owner"], "alice");
    assert_eq!(group["member_count"], 2);
    let id = group["id"].as_str().expect("id").to_string();
    let (status, mine) = server.get_json("/v1/groups", "alice", "phone").await;
    assert_eq!(status, 200);
    assert!(
        mine.as_array()
            .expect("groups")
            .iter()
            .any(|g| g["id"] == id.as_str() && g["role"] == "owner"),
        "{mine}"
    );
    // A system notice to the group, from a sender that is no member.
    let (status, answer) = server
        .admin_post(
            "/v1/admin/messages",
            json!({"from": null, "group": id, "body": {"text": {"text": "welcome"}}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    loop {
        let m = next_message(&mut bob_events).await;
        if m.mid.to_string() == answer["mid"].as_str().expect("mid") {
            assert_eq!(m.group.to_string(), id);
            assert_eq!(text_of(&m), "welcome");
            break;
        }
    }
    // A user sending on the admin API obeys the group's rules.
    let as_user =
        |from: &str| json!({"from": from, "group": id, "body": {"text": {"text": "hello"}}});
    let (status, _) = server
        .admin_post("/v1/admin/messages", as_user("alice"))
        .await;
    assert_eq!(status, 200, "a member");
    let (status, answer) = server
        .admin_post("/v1/admin/messages", as_user("carol"))
        .await;
    assert_eq!((status, answer["code"].as_str()), (403, Some("not_member")));
    let (status, answer) = server
        .admin_post(
            "/v1/admin/messages",
            json!({"from": null, "group": "999999", "body": {"text": {"text": "x"}}}),
        )
        .await;
    assert_eq!(status, 404, "no such group: {answer}");
    // The owner's quotas and the group rules apply.
    let (status, answer) = server
        .admin_post("/v1/admin/groups", json!({"owner": "alice", "name": ""}))
        .await;
    assert_eq!(status, 400, "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn a_logout_closes_every_connection_and_refuses_older_tokens() {
    let server = TestServer::start(|_| {}).await;
    let old_phone = token_issued_ago(&server, "alice", "phone", 10);
    let old_laptop = token_issued_ago(&server, "alice", "laptop", 10);
    let mut phone = raw_with(&server.server(), &old_phone).await.expect("in");
    let mut laptop = raw_with(&server.server(), &old_laptop).await.expect("in");
    let (_bob, _bob_events) = server.client("bob", "phone").await;
    let (status, answer) = server
        .admin_post("/v1/admin/users/alice/logout", json!(null))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["closed"], 2);
    let logged_out = ErrorCode::LoggedOut;
    for conn in [&mut phone, &mut laptop] {
        assert_eq!(
            expect_close(conn).await,
            (Some(logged_out as u32), logged_out.close_code())
        );
    }
    // The old tokens are refused, over the WebSocket and HTTP alike.
    let refused = raw_with(&server.server(), &old_phone)
        .await
        .err()
        .expect("refused");
    assert_ne!(refused.op, Op::AuthReply);
    let response = reqwest::Client::new()
        .get(server.url("/v1/groups"))
        .bearer_auth(&old_laptop)
        .send()
        .await
        .expect("HTTP");
    assert_eq!(response.status().as_u16(), 401);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["code"], "logged_out");
    // A token minted after the logout works; other users were untouched.
    let (_, minted) = server
        .admin_post(
            "/v1/admin/tokens",
            json!({"uid": "alice", "device": "phone"}),
        )
        .await;
    raw_with(&server.server(), minted["token"].as_str().expect("token"))
        .await
        .expect("a new token is taken");
    let (status, _) = server.get_json("/v1/groups", "bob", "phone").await;
    assert_eq!(status, 200);
    // The logout outlives a restart.
    let mut server = server;
    server.restart().await;
    let response = reqwest::Client::new()
        .get(server.url("/v1/groups"))
        .bearer_auth(&old_laptop)
        .send()
        .await
        .expect("HTTP");
    assert_eq!(response.status().as_u16(), 401, "after a restart");
    // A user with no connection: nothing to close; a bad id: refused.
    let (status, answer) = server
        .admin_post("/v1/admin/users/nobody/logout", json!(null))
        .await;
    assert_eq!((status, answer["closed"].as_u64()), (200, Some(0)));
    let (status, _) = server
        .admin_post("/v1/admin/users/a%20b/logout", json!(null))
        .await;
    assert_eq!(status, 400);
    server.stop().await;
}

/// Connects `token` through `gateway`, retrying while the gateway does not
/// yet see a logic node.
async fn connect_through(gateway: &TestServer, token: &str) -> Connection {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match raw_with(&gateway.server(), token).await {
            Ok(conn) => return conn,
            Err(frame) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "cannot connect: {frame:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_closes_the_users_connections_on_every_gateway() {
    let etcd_server = EtcdServer::start().await;
    let (mysql_url, db) = fresh_database().await;
    let prefix = format!("natter-admin-{}:", std::process::id());
    let etcd_url = etcd_server.url.clone();
    let tune = |node: &'static str| {
        let (etcd_url, mysql_url, prefix) = (etcd_url.clone(), mysql_url.clone(), prefix.clone());
        move |c: &mut natter_node::Config| {
            c.auth.secret = "a shared secret for every logic node".into();
            c.discovery.etcd_url = etcd_url;
            c.discovery.node = node.into();
            c.discovery.ttl_secs = 3;
            c.store.mysql_url = mysql_url;
            c.sessions.redis_url = "redis://127.0.0.1:6379/0".into();
            c.sessions.key_prefix = prefix;
            c.rpc.timeout_ms = 1000;
        }
    };
    let logic = TestServer::start_role(Role::Logic, tune("logic-a")).await;
    let gateway_a = TestServer::start_role(Role::Comet, tune("comet-a")).await;
    let gateway_b = TestServer::start_role(Role::Comet, tune("comet-b")).await;
    assert!(
        gateway_a.admin_addr.is_none(),
        "gateways serve no admin API"
    );
    let old = |device| token_issued_ago(&logic, "alice", device, 10);
    let mut on_a = connect_through(&gateway_a, &old("phone")).await;
    let mut on_b = connect_through(&gateway_b, &old("laptop")).await;
    let mut bob = connect_through(&gateway_b, &logic.token("bob", "phone")).await;

    let (status, answer) = logic
        .admin_post("/v1/admin/users/alice/logout", json!(null))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["closed"], 2);
    let logged_out = ErrorCode::LoggedOut;
    for conn in [&mut on_a, &mut on_b] {
        assert_eq!(
            expect_close(conn).await,
            (Some(logged_out as u32), logged_out.close_code())
        );
    }
    let refused = raw_with(&gateway_a.server(), &old("phone"))
        .await
        .err()
        .expect("an old token is refused");
    assert_ne!(refused.op, Op::AuthReply);
    // Bob's connection was not touched: a message still reaches him.
    let (status, _) = logic
        .admin_post(
            "/v1/admin/messages",
            json!({"from": null, "to": "bob", "body": {"text": {"text": "still here"}}}),
        )
        .await;
    assert_eq!(status, 200);
    loop {
        let frame = next_frame(&mut bob).await;
        if frame.op == Op::Push {
            break;
        }
    }

    for server in [gateway_a, gateway_b, logic] {
        server.stop().await;
    }
    drop_database(&db).await;
}
