//! Bad input gets a clear error, and the server and other clients carry on.

use natter_client::raw::{Connection, Incoming};
use natter_proto::msg::{AuthRequest, ErrorReply, MessageBody, SendMessage};
use natter_proto::{ErrorCode, Frame, Op};
use natter_tests::*;

fn error_of(frame: &Frame) -> (u32, ErrorCode) {
    assert_eq!(
        frame.op,
        Op::Error,
        "expected an error frame, got {:?}",
        frame.op
    );
    let e: ErrorReply = frame.message().expect("error body");
    (frame.seq, ErrorCode::from_u32(e.code).expect("known code"))
}

async fn still_alive(conn: &mut Connection, seq: u32) {
    conn.send(&Frame::empty(Op::Heartbeat, seq, 0))
        .await
        .expect("heartbeat");
    let reply = next_reply_or_heartbeat(conn).await;
    assert_eq!((reply.op, reply.seq), (Op::HeartbeatReply, seq));
}

async fn next_reply_or_heartbeat(conn: &mut Connection) -> Frame {
    loop {
        let f = next_frame(conn).await;
        if f.op != Op::Push {
            return f;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_error_frames_and_the_connection_survives() {
    let server = TestServer::start(|c| c.comet.max_body = 1024).await;
    let mut conn = server.raw(1, "raw").await;
    let (_bob, mut bob_events) = server.client(2, "phone").await;
    let (carol, _carol_events) = server.client(3, "phone").await;

    let good = Frame::empty(Op::Heartbeat, 5, 0).encode().to_vec();
    let mut wrong_header_len = good.clone();
    wrong_header_len[5] = 12;
    let mut length_mismatch = good.clone();
    length_mismatch[3] = 99;
    let mut bad_version = good.clone();
    bad_version[7] = 9;
    let mut unknown_op = good.clone();
    unknown_op[11] = 77;
    let cases: Vec<(&str, Vec<u8>, u32, ErrorCode)> = vec![
        ("too short", vec![0, 0, 0, 5, 0], 0, ErrorCode::BadFrame),
        (
            "wrong header length",
            wrong_header_len,
            0,
            ErrorCode::BadFrame,
        ),
        ("length mismatch", length_mismatch, 0, ErrorCode::BadFrame),
        (
            "unknown version",
            bad_version,
            5,
            ErrorCode::UnsupportedVersion,
        ),
        (
            "unknown operation",
            unknown_op,
            5,
            ErrorCode::UnknownOperation,
        ),
        (
            "body is not protobuf",
            Frame::raw(Op::Message, 6, 0, vec![0x0a, 0xff])
                .encode()
                .to_vec(),
            6,
            ErrorCode::BadBody,
        ),
        (
            "over-long body",
            Frame::raw(Op::Message, 7, 0, vec![0u8; 1025])
                .encode()
                .to_vec(),
            7,
            ErrorCode::FrameTooLarge,
        ),
        (
            "server-only operation",
            Frame::empty(Op::Push, 8, 0).encode().to_vec(),
            8,
            ErrorCode::UnknownOperation,
        ),
        (
            "second auth",
            Frame::new(Op::Auth, 9, 0, &AuthRequest::default())
                .encode()
                .to_vec(),
            9,
            ErrorCode::BadRequest,
        ),
    ];
    for (i, (name, bytes, seq, code)) in cases.into_iter().enumerate() {
        conn.send_bytes(bytes).await.expect("sent");
        let reply = next_reply_or_heartbeat(&mut conn).await;
        assert_eq!(error_of(&reply), (seq, code), "{name}");
        // The same connection still works, and so does everyone else's.
        still_alive(&mut conn, 100 + i as u32).await;
    }
    conn.send_text("hello").await.expect("sent");
    assert_eq!(
        error_of(&next_reply_or_heartbeat(&mut conn).await).1,
        ErrorCode::BadFrame
    );

    // An invalid envelope is refused with a reason; nothing is stored.
    let empty = SendMessage {
        client_seq: 1,
        receiver: u(2).to_string(),
        body: Some(MessageBody::text("")),
        group: 0,
    };
    conn.send(&Frame::new(Op::Message, 20, 0, &empty))
        .await
        .expect("sent");
    assert_eq!(
        error_of(&next_reply_or_heartbeat(&mut conn).await),
        (20, ErrorCode::InvalidMessage)
    );
    let no_receiver = SendMessage {
        client_seq: 2,
        receiver: String::new(),
        body: Some(MessageBody::text("x")),
        group: 0,
    };
    conn.send(&Frame::new(Op::Message, 21, 0, &no_receiver))
        .await
        .expect("sent");
    assert_eq!(
        error_of(&next_reply_or_heartbeat(&mut conn).await),
        (21, ErrorCode::InvalidMessage)
    );

    // A valid message on the same connection goes through.
    let ok = SendMessage {
        client_seq: 3,
        receiver: u(2).to_string(),
        body: Some(MessageBody::text("still here")),
        group: 0,
    };
    conn.send(&Frame::new(Op::Message, 22, 0, &ok))
        .await
        .expect("sent");
    assert_eq!(
        next_reply_or_heartbeat(&mut conn).await.op,
        Op::MessageReply
    );
    assert_eq!(text_of(&next_message(&mut bob_events).await), "still here");
    carol
        .send(&u(2), MessageBody::text("unaffected"))
        .await
        .expect("sent");
    assert_eq!(text_of(&next_message(&mut bob_events).await), "unaffected");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_malformed_frames_close_the_connection() {
    let server = TestServer::start(|c| c.comet.max_errors = 3).await;
    let mut conn = server.raw(1, "raw").await;
    for _ in 0..4 {
        conn.send_bytes(vec![1, 2, 3]).await.expect("sent");
    }
    let (disconnect, close) = expect_close(&mut conn).await;
    assert_eq!(disconnect, Some(ErrorCode::TooManyErrors as u32));
    assert_eq!(close, ErrorCode::TooManyErrors.close_code());
    server.stop().await;
}

async fn auth_with(server: &TestServer, token: &str) -> (Option<u32>, u16) {
    let mut conn = Connection::connect(&server.server(), None)
        .await
        .expect("connects");
    let auth = AuthRequest {
        token: token.into(),
        client: "t".into(),
        device: String::new(),
    };
    conn.send(&Frame::new(Op::Auth, 1, 0, &auth))
        .await
        .expect("sent");
    expect_close(&mut conn).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_frames_before_auth_are_refused() {
    let server = TestServer::start(|_| {}).await;
    let code = |c: ErrorCode| (Some(c as u32), c.close_code());
    assert_eq!(
        auth_with(&server, "not a token").await,
        code(ErrorCode::AuthFailed)
    );
    let foreign = natter_roles::Tokens::new(b"another secret, not the server's".to_vec())
        .mint(&u(1), "d", 60)
        .expect("token");
    assert_eq!(
        auth_with(&server, &foreign).await,
        code(ErrorCode::AuthFailed)
    );
    let expired = server
        .tokens()
        .mint_at(&u(1), "d", 1_000, 10)
        .expect("token");
    assert_eq!(
        auth_with(&server, &expired).await,
        code(ErrorCode::TokenExpired)
    );

    // A message before auth.
    let mut conn = Connection::connect(&server.server(), None)
        .await
        .expect("connects");
    let msg = SendMessage {
        client_seq: 1,
        receiver: u(2).to_string(),
        body: Some(MessageBody::text("sneaky")),
        group: 0,
    };
    conn.send(&Frame::new(Op::Message, 1, 0, &msg))
        .await
        .expect("sent");
    assert_eq!(expect_close(&mut conn).await, code(ErrorCode::AuthRequired));

    // Garbage before auth.
    let mut conn = Connection::connect(&server.server(), None)
        .await
        .expect("connects");
    conn.send_bytes(vec![0xde, 0xad]).await.expect("sent");
    assert_eq!(expect_close(&mut conn).await, code(ErrorCode::BadFrame));

    // An auth body that is not an AuthRequest.
    let mut conn = Connection::connect(&server.server(), None)
        .await
        .expect("connects");
    conn.send(&Frame::raw(Op::Auth, 1, 0, vec![0x0a, 0x10, 0x01]))
        .await
        .expect("sent");
    assert_eq!(expect_close(&mut conn).await, code(ErrorCode::BadBody));

    // Nothing was stored by any of it, and the server still serves.
    let (alice, _events) = server.client(1, "phone").await;
    let page = alice
        .history("p:u1:u2", None, 10, &[])
        .await
        .expect("history");
    assert!(page.messages.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_time_out() {
    let server = TestServer::start(|c| {
        c.comet.auth_timeout_ms = 200;
        c.comet.heartbeat_interval_ms = 100;
        c.comet.heartbeat_timeout_ms = 300;
    })
    .await;
    let mut conn = Connection::connect(&server.server(), None)
        .await
        .expect("connects");
    let code = |c: ErrorCode| (Some(c as u32), c.close_code());
    assert_eq!(expect_close(&mut conn).await, code(ErrorCode::AuthTimeout));
    let mut conn = server.raw(1, "raw").await;
    assert_eq!(
        expect_close(&mut conn).await,
        code(ErrorCode::HeartbeatTimeout)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_websocket_message_closes_only_that_connection() {
    let server = TestServer::start(|c| c.comet.max_body = 1024).await;
    let mut conn = server.raw(1, "raw").await;
    let (alice, _events) = server.client(2, "phone").await;
    conn.send_bytes(vec![0u8; 1024 * 1024]).await.ok();
    match tokio::time::timeout(PATIENCE, conn.recv())
        .await
        .expect("answer")
    {
        Ok(Some(Incoming::Close { code, .. })) => assert_eq!(code, 1009),
        Ok(None) | Err(_) => {}
        other => panic!("expected a close, got {other:?}"),
    }
    alice
        .send(&u(3), MessageBody::text("fine"))
        .await
        .expect("server still up");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_refuses_bad_tokens_bad_params_and_other_peoples_conversations() {
    let server = TestServer::start(|_| {}).await;
    let (alice, _events) = server.client(1, "phone").await;
    alice
        .send(&u(2), MessageBody::text("private"))
        .await
        .expect("sent");
    let http = reqwest::Client::new();
    let get = |path: &str, token: Option<String>| {
        let mut request = http.get(server.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let check = |response: reqwest::Response, status: u16, code: &'static str| async move {
        assert_eq!(response.status().as_u16(), status);
        let body: serde_json::Value = response.json().await.expect("json error");
        assert_eq!(body["code"], code, "{body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    };
    let mallory = Some(server.token(3, "laptop"));
    check(
        get("/v1/conversations/p:u1:u2/messages", mallory.clone())
            .await
            .expect("response"),
        403,
        "forbidden",
    )
    .await;
    check(
        get("/v1/conversations/p:u1:u2/messages", None)
            .await
            .expect("response"),
        401,
        "auth_required",
    )
    .await;
    check(
        get("/v1/conversations/p:u1:u2/messages", Some("junk".into()))
            .await
            .expect("response"),
        401,
        "auth_failed",
    )
    .await;
    let alice_token = Some(server.token(1, "phone"));
    for (path, code) in [
        ("/v1/conversations/p:u2:u1/messages", "bad_request"),
        ("/v1/conversations/group-9/messages", "bad_request"),
        ("/v1/conversations/p:u1:u2/messages?limit=0", "bad_request"),
        (
            "/v1/conversations/p:u1:u2/messages?limit=101",
            "bad_request",
        ),
        (
            "/v1/conversations/p:u1:u2/messages?limit=abc",
            "bad_request",
        ),
        (
            "/v1/conversations/p:u1:u2/messages?before=xyz",
            "bad_request",
        ),
        (
            "/v1/conversations/p:u1:u2/messages?types=hologram",
            "bad_request",
        ),
        ("/v1/sync?limit=501", "bad_request"),
    ] {
        check(
            get(path, alice_token.clone()).await.expect("response"),
            400,
            code,
        )
        .await;
    }
    check(
        get("/v1/nothing-here", alice_token.clone())
            .await
            .expect("response"),
        404,
        "not_found",
    )
    .await;
    // Mallory's own view of a conversation with Alice is empty.
    let response = get("/v1/conversations/p:u1:u3/messages", mallory)
        .await
        .expect("response");
    let page: serde_json::Value = response.json().await.expect("json");
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_sending_too_fast_is_told_to_slow_down_and_nothing_is_stored() {
    let server = TestServer::start(|c| {
        c.limits.messages_per_sec = 0.5;
        c.limits.message_burst = 2;
    })
    .await;
    let mut conn = server.raw(1, "raw").await;
    for seq in 1..=3u32 {
        let m = SendMessage {
            client_seq: u64::from(seq),
            receiver: u(2).to_string(),
            body: Some(MessageBody::text("quick")),
            group: 0,
        };
        conn.send(&Frame::new(Op::Message, seq, 0, &m))
            .await
            .expect("sent");
    }
    assert_eq!(
        next_reply_or_heartbeat(&mut conn).await.op,
        Op::MessageReply
    );
    assert_eq!(
        next_reply_or_heartbeat(&mut conn).await.op,
        Op::MessageReply
    );
    assert_eq!(
        error_of(&next_reply_or_heartbeat(&mut conn).await),
        (3, ErrorCode::RateLimited)
    );
    let (status, page) = server
        .get_json("/v1/conversations/p:u1:u2/messages", 1, "raw")
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(2));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_the_websocket_route_without_an_upgrade_is_refused() {
    let server = TestServer::start(|_| {}).await;
    let response = reqwest::get(server.url("/sub")).await.expect("answer");
    assert_eq!(response.status(), 426);
    assert_eq!(
        response.headers().get("upgrade").map(|v| v.as_bytes()),
        Some(&b"websocket"[..])
    );
    server.stop().await;
}

/// A client frame, masked, with `first` as its first byte (FIN and opcode).
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut out = vec![first];
    if payload.len() < 126 {
        out.push(0x80 | payload.len() as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// The encoded `Auth` frame of user 1's device "raw".
fn auth_frame(server: &TestServer, client: &str) -> Vec<u8> {
    let auth = AuthRequest {
        token: server.token(1, "raw"),
        client: client.into(),
        device: String::new(),
    };
    Frame::new(Op::Auth, 1, 0, &auth).encode().to_vec()
}

/// A WebSocket connection opened by hand, to send what no client library would.
async fn handshake_by_hand(server: &TestServer) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.server())
        .await
        .expect("connects");
    let request = format!(
        "GET /sub HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        server.server()
    );
    tcp.write_all(request.as_bytes()).await.expect("request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.expect("response");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("text");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    tcp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_protocol_error_closes_with_1002() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(|_| {}).await;
    let (alice, _events) = server.client(2, "phone").await;
    let mut tcp = handshake_by_hand(&server).await;
    // A client frame without a mask.
    tcp.write_all(&[0x82, 0x01, 0x00]).await.expect("frame");
    let mut header = [0u8; 4];
    tokio::time::timeout(PATIENCE, tcp.read_exact(&mut header))
        .await
        .expect("answer")
        .expect("close frame");
    assert_eq!(header[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([header[2], header[3]]), 1002);
    alice
        .send(&u(3), MessageBody::text("fine"))
        .await
        .expect("server still up");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_and_pings_by_hand_are_understood() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(|_| {}).await;
    let mut tcp = handshake_by_hand(&server).await;
    // The auth frame in two fragments with a ping between them.
    let auth = auth_frame(&server, "by hand");
    let (a, b) = auth.split_at(10);
    let mut bytes = masked(0x02, a);
    bytes.extend(masked(0x89, b"hi"));
    bytes.extend(masked(0x80, b));
    tcp.write_all(&bytes).await.expect("frames");
    // The pong comes first, then the auth reply as one binary message.
    let mut pong = [0u8; 4];
    tcp.read_exact(&mut pong).await.expect("pong");
    assert_eq!(pong, [0x8A, 2, b'h', b'i']);
    let mut header = [0u8; 2];
    tcp.read_exact(&mut header).await.expect("reply header");
    assert_eq!(header[0], 0x82);
    let len = usize::from(header[1] & 0x7F);
    assert!(len < 126);
    let mut body = vec![0u8; len];
    tcp.read_exact(&mut body).await.expect("reply");
    let reply = Frame::decode(&body, usize::MAX).expect("frame");
    let said = reply
        .message::<natter_proto::msg::Disconnect>()
        .map(|d| d.reason);
    assert_eq!(reply.op, Op::AuthReply, "{said:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_stops_sending_is_still_told_of_a_shutdown() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start(|_| {}).await;
    let mut tcp = handshake_by_hand(&server).await;
    let auth = auth_frame(&server, "flood");
    tcp.write_all(&masked(0x82, &auth)).await.expect("auth");
    // Acks of nothing, read and dropped without a reply, written far
    // faster than the server parses them: its reader always has a frame.
    let chunk = masked(0x82, &Frame::empty(Op::PushAck, 0, 0).encode()).repeat(40_000);
    let stop = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        server.stop().await;
    });
    let started = std::time::Instant::now();
    // The server closes the connection while the flood goes on.
    while tcp.write_all(&chunk).await.is_ok() {
        assert!(
            started.elapsed() < PATIENCE,
            "still open after {PATIENCE:?}"
        );
    }
    tokio::time::timeout(PATIENCE, stop)
        .await
        .expect("the server stops in time")
        .expect("stop");
}
