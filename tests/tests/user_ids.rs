//! User ids are the operator's own strings, end to end on `natter serve`:
//! ids that differ only in case are two users, a 64-byte id works
//! everywhere, and every form outside the rule is refused with a clear
//! error wherever it arrives (a frame, an HTTP path or body; tokens naming
//! such ids are refused in `natter_roles::auth`'s tests).

use natter_proto::msg::{ErrorReply, MessageBody, SendMessage};
use natter_proto::{ErrorCode, Frame, Op};
use natter_tests::*;

/// Ids outside the rule, as they could arrive from a client.
const REFUSED: &[&str] = &["", "a:b", "..", ".", "a b", "a/b", "é", "a%2Fb"];

fn too_long() -> String {
    "x".repeat(65)
}

#[tokio::test]
async fn ids_differing_only_in_case_and_the_longest_id_are_users_of_their_own() {
    let server = TestServer::start(|_| {}).await;
    let long = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ._";
    assert_eq!(long.len(), 64);
    let (upper, mut upper_events) = server.client("Alice", "phone").await;
    let (lower, mut lower_events) = server.client("alice", "phone").await;
    let (longest, mut longest_events) = server.client(long, "phone").await;
    let ack = upper
        .send(lower.uid(), MessageBody::text("to my lower-case twin"))
        .await
        .expect("acked");
    assert_eq!(ack.conversation, "p:Alice:alice");
    let got = next_message(&mut lower_events).await;
    assert_eq!(
        (got.sender.as_str(), got.receiver.as_str()),
        ("Alice", "alice")
    );
    let ack = longest
        .send(upper.uid(), MessageBody::text("from the longest id"))
        .await
        .expect("acked");
    assert_eq!(
        ack.conversation,
        format!("p:{long}:Alice"),
        "'0' sorts first"
    );
    let got = next_message(&mut upper_events).await;
    assert_eq!(got.sender, long);
    lower
        .send(longest.uid(), MessageBody::text("back"))
        .await
        .expect("acked");
    assert_eq!(next_message(&mut longest_events).await.sender, "alice");
    // Each stream is its own: Alice's holds two messages, alice's two.
    for (user, expected) in [("Alice", 2), ("alice", 2), (long, 2)] {
        let (status, page) = server.get_json("/v1/sync?after=0", user, "web").await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(
            page["messages"].as_array().map(Vec::len),
            Some(expected),
            "{user}"
        );
    }
    // A conversation is readable only by its two users, byte for byte.
    let path = "/v1/conversations/p:Alice:alice/messages";
    assert_eq!(server.get_json(path, "alice", "web").await.0, 200);
    assert_eq!(server.get_json(path, "ALICE", "web").await.0, 403);
    // Groups hold both twins as two members.
    let (status, group) = server.get_json("/v1/groups", "Alice", "web").await;
    assert_eq!((status, group.as_array().map(Vec::len)), (200, Some(0)));
    let created: serde_json::Value = reqwest::Client::new()
        .post(server.url("/v1/groups"))
        .bearer_auth(server.token("Alice", "web"))
        .json(&serde_json::json!({"name": "twins", "members": ["alice", long]}))
        .send()
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("JSON");
    assert_eq!(created["member_count"], 3, "{created}");
    assert_eq!(created["owner"], "Alice");
    let (status, members) = server
        .get_json(
            &format!("/v1/groups/{}/members", created["id"].as_str().expect("id")),
            "alice",
            "web",
        )
        .await;
    assert_eq!(status, 200);
    let uids: Vec<&str> = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["uid"].as_str().expect("uid"))
        .collect();
    assert_eq!(uids, vec![long, "Alice", "alice"], "byte order");
    for client in [upper, lower, longest] {
        client.close().await;
    }
}

#[tokio::test]
async fn every_refused_form_is_refused_on_the_websocket() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = server.raw("alice", "phone").await;
    let long = too_long();
    let mut seq = 10;
    let refused = |conn_seq: u32, frame: Frame| {
        assert_eq!(
            frame.op,
            Op::Error,
            "expected an error frame, got {frame:?}"
        );
        let e: ErrorReply = frame.message().expect("error body");
        assert_eq!(frame.seq, conn_seq);
        (ErrorCode::from_u32(e.code), e.message)
    };
    for bad in REFUSED.iter().copied().chain([long.as_str()]) {
        seq += 1;
        let message = SendMessage {
            client_seq: u64::from(seq),
            receiver: bad.into(),
            body: Some(MessageBody::text("x")),
            group: 0,
        };
        conn.send(&Frame::new(Op::Message, seq, 0, &message))
            .await
            .expect("sent");
        let (code, reason) = refused(seq, next_reply(&mut conn).await);
        assert_eq!(code, Some(ErrorCode::InvalidMessage), "{bad:?}");
        if !bad.is_empty() {
            assert!(reason.contains("receiver"), "{bad:?}: {reason}");
        }
    }
    // A mention outside the rule is refused with the message.
    seq += 1;
    let mut body = MessageBody::text("hi @x");
    if let Some(natter_proto::msg::Content::Text(text)) = body.content.as_mut() {
        text.mentions = vec!["a:b".into()];
    }
    let message = SendMessage {
        client_seq: u64::from(seq),
        receiver: "bob".into(),
        body: Some(body),
        group: 0,
    };
    conn.send(&Frame::new(Op::Message, seq, 0, &message))
        .await
        .expect("sent");
    let (code, reason) = refused(seq, next_reply(&mut conn).await);
    assert_eq!(code, Some(ErrorCode::InvalidMessage));
    assert!(reason.contains("mentions"), "{reason}");
    // Nothing of it was stored.
    let (_, page) = server.get_json("/v1/sync?after=0", "alice", "web").await;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(0));
}

#[tokio::test]
async fn every_refused_form_is_refused_over_http() {
    let server = TestServer::start(|_| {}).await;
    let http = reqwest::Client::new();
    let token = server.token("alice", "web");
    let long = too_long();
    let (_, group) = {
        let created: serde_json::Value = http
            .post(server.url("/v1/groups"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"name": "g"}))
            .send()
            .await
            .expect("HTTP")
            .json()
            .await
            .expect("JSON");
        ((), created["id"].as_str().expect("id").to_string())
    };
    let code = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.expect("JSON error");
        (
            status,
            body["code"].as_str().unwrap_or_default().to_string(),
        )
    };
    for bad in REFUSED
        .iter()
        .copied()
        .filter(|b| !b.is_empty() && !b.contains('/') && *b != "." && *b != "..")
        .chain([long.as_str()])
    {
        // In a conversation id.
        let response = http
            .get(server.url(&format!("/v1/conversations/p:{bad}:alice/messages")))
            .bearer_auth(&token)
            .send()
            .await
            .expect("HTTP");
        assert_eq!(code(response).await, (400, "bad_request".into()), "{bad:?}");
        // In a path.
        let response = http
            .delete(server.url(&format!("/v1/groups/{group}/members/{bad}")))
            .bearer_auth(&token)
            .send()
            .await
            .expect("HTTP");
        assert_eq!(code(response).await, (400, "bad_request".into()), "{bad:?}");
    }
    for bad in REFUSED.iter().copied().chain([long.as_str()]) {
        // In a body.
        let response = http
            .post(server.url(&format!("/v1/groups/{group}/members")))
            .bearer_auth(&token)
            .json(&serde_json::json!({"users": [bad]}))
            .send()
            .await
            .expect("HTTP");
        assert_eq!(code(response).await, (400, "bad_request".into()), "{bad:?}");
    }
}
