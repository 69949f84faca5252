//! WebSocket conformance (RFC 6455) checked with an independent client
//! library, tokio-tungstenite, which shares no framing code with the
//! gateway: the closing handshake both ways, ping and pong, fragments,
//! unmasked and oversized frames, and close codes.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use natter_proto::msg::AuthRequest;
use natter_proto::{ErrorCode, Frame, Op};
use natter_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(server: &TestServer) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/sub", server.addr))
        .await
        .expect("WebSocket handshake");
    ws
}

fn auth_bytes(server: &TestServer, uid: u64) -> Vec<u8> {
    let auth = AuthRequest {
        token: server.token(uid, "tungstenite"),
        client: "tungstenite".into(),
        device: String::new(),
    };
    Frame::new(Op::Auth, 1, 0, &auth).encode().to_vec()
}

/// The next message that is not a natter frame of `skip`.
async fn next(ws: &mut Ws) -> Message {
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(Some(Ok(message))) => message,
        Ok(Some(Err(e))) => panic!("the connection failed: {e}"),
        Ok(None) => panic!("the connection ended without a close frame"),
        Err(_) => panic!("nothing within {PATIENCE:?}"),
    }
}

/// The natter frame in the next binary message.
async fn next_frame_of(ws: &mut Ws) -> Frame {
    match next(ws).await {
        Message::Binary(bytes) => Frame::decode(&bytes, usize::MAX).expect("a natter frame"),
        other => panic!("expected a binary message, got {other:?}"),
    }
}

async fn authenticate(ws: &mut Ws, server: &TestServer, uid: u64) {
    ws.send(Message::binary(auth_bytes(server, uid)))
        .await
        .expect("auth sent");
    assert_eq!(next_frame_of(ws).await.op, Op::AuthReply);
}

/// Reads to the server's close frame (skipping data messages); its code.
async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match next(ws).await {
            Message::Close(Some(frame)) => return u16::from(frame.code),
            Message::Close(None) => panic!("a close frame without a code"),
            _ => continue,
        }
    }
}

/// After the closing handshake the stream ends cleanly: no error, no
/// "reset without closing handshake".
async fn ends_cleanly(ws: &mut Ws) {
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(None) => {}
        Ok(Some(Err(e))) => panic!("not a clean close: {e}"),
        Ok(Some(Ok(m))) => panic!("more after the close: {m:?}"),
        Err(_) => panic!("the connection stayed open after the close handshake"),
    }
}

fn close_frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_from_the_client_is_answered_with_a_close_echoing_its_code() {
    let server = TestServer::start(|_| {}).await;
    // While working, and while the gateway waits for the auth frame.
    for (code, auth) in [(1000, true), (4321, true), (1001, false), (3000, false)] {
        let mut ws = connect(&server).await;
        if auth {
            authenticate(&mut ws, &server, 1).await;
        }
        ws.close(Some(close_frame(code, "bye")))
            .await
            .expect("close sent");
        assert_eq!(close_code(&mut ws).await, code, "echo of {code}");
        ends_cleanly(&mut ws).await;
    }
    // A close frame without a code is answered as a normal close.
    let mut ws = connect(&server).await;
    authenticate(&mut ws, &server, 1).await;
    ws.close(None).await.expect("close sent");
    assert_eq!(close_code(&mut ws).await, 1000);
    ends_cleanly(&mut ws).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_from_the_server_completes_the_handshake() {
    let server = TestServer::start(|c| c.comet.auth_timeout_ms = 200).await;
    // The library answers the server's close; both ends see a clean close.
    let mut ws = connect(&server).await;
    let disconnect = next_frame_of(&mut ws).await;
    assert_eq!(disconnect.op, Op::Disconnect);
    assert_eq!(
        close_code(&mut ws).await,
        ErrorCode::AuthTimeout.close_code()
    );
    ends_cleanly(&mut ws).await;

    // By hand, to see the order on the wire: the server's close frame,
    // then the server keeps the connection open for the client's close,
    // and ends it once that came.
    let mut tcp = handshake_by_hand(&server).await;
    let mut seen = Vec::new();
    let close_at = loop {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(PATIENCE, tcp.read(&mut buf))
            .await
            .expect("frames in time")
            .expect("read");
        assert!(n > 0, "closed before the close frame");
        seen.extend_from_slice(&buf[..n]);
        if let Some(at) = find_close(&seen) {
            break at;
        }
    };
    let code = u16::from_be_bytes([seen[close_at + 2], seen[close_at + 3]]);
    assert_eq!(code, ErrorCode::AuthTimeout.close_code());
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut byte))
            .await
            .is_err(),
        "the server ended the connection without waiting for the client's close"
    );
    tcp.write_all(&masked(0x88, &code.to_be_bytes()))
        .await
        .expect("close sent");
    let end = tokio::time::timeout(PATIENCE, tcp.read(&mut byte))
        .await
        .expect("the server ends the connection after the client's close");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    server.stop().await;
}

/// Where the close frame starts in the server's bytes, if they hold it.
fn find_close(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at + 2 <= bytes.len() {
        let (len, header) = match bytes[at + 1] & 0x7F {
            126 if at + 4 <= bytes.len() => (
                usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]])),
                4,
            ),
            126 => return None,
            n => (usize::from(n), 2),
        };
        if at + header + len > bytes.len() {
            return None;
        }
        if bytes[at] == 0x88 {
            return Some(at);
        }
        at += header + len;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_gets_its_pong() {
    let server = TestServer::start(|_| {}).await;
    let mut ws = connect(&server).await;
    authenticate(&mut ws, &server, 1).await;
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("ping sent");
    loop {
        match next(&mut ws).await {
            Message::Pong(payload) => {
                assert_eq!(&payload[..], b"are you there");
                break;
            }
            Message::Binary(_) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_are_reassembled_around_a_ping() {
    let server = TestServer::start(|_| {}).await;
    let mut ws = connect(&server).await;
    let auth = auth_bytes(&server, 1);
    let (a, rest) = auth.split_at(7);
    let (b, c) = rest.split_at(rest.len() / 2);
    let frames = [
        WsFrame::message(a.to_vec(), OpCode::Data(Data::Binary), false),
        WsFrame::message(b.to_vec(), OpCode::Data(Data::Continue), false),
        WsFrame::ping(b"mid".to_vec()),
        WsFrame::message(c.to_vec(), OpCode::Data(Data::Continue), true),
    ];
    for frame in frames {
        ws.send(Message::Frame(frame)).await.expect("fragment sent");
    }
    let mut ponged = false;
    loop {
        match next(&mut ws).await {
            Message::Pong(payload) => {
                assert_eq!(&payload[..], b"mid");
                ponged = true;
            }
            Message::Binary(bytes) => {
                let frame = Frame::decode(&bytes, usize::MAX).expect("frame");
                assert_eq!(frame.op, Op::AuthReply);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(ponged, "the ping between fragments was answered first");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmasked_frame_is_answered_with_1002() {
    let server = TestServer::start(|_| {}).await;
    let mut tcp = handshake_by_hand(&server).await;
    tcp.write_all(&[0x82, 0x03, 1, 2, 3]).await.expect("frame");
    let mut ws = WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(u16::from(frame.code), 1002),
        other => panic!("expected a close frame, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_answered_with_1009() {
    let server = TestServer::start(|c| c.comet.max_body = 1024).await;
    let mut ws = connect(&server).await;
    authenticate(&mut ws, &server, 1).await;
    // Far over what the gateway reads (a few times max_body, at least 64 KiB).
    ws.send(Message::binary(vec![7u8; 512 * 1024]))
        .await
        .expect("sent");
    assert_eq!(close_code(&mut ws).await, 1009);
    ends_cleanly(&mut ws).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_codes_not_allowed_on_the_wire_and_bad_text_are_refused() {
    let server = TestServer::start(|_| {}).await;
    for code in [999u16, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
        let mut ws = connect(&server).await;
        authenticate(&mut ws, &server, 1).await;
        ws.send(Message::Frame(WsFrame::close(Some(close_frame(code, "")))))
            .await
            .expect("close sent");
        assert_eq!(close_code(&mut ws).await, 1002, "close code {code}");
    }
    // A text message that is not UTF-8.
    let mut ws = connect(&server).await;
    authenticate(&mut ws, &server, 1).await;
    ws.send(Message::Frame(WsFrame::message(
        vec![0xC3, 0x28],
        OpCode::Data(Data::Text),
        true,
    )))
    .await
    .expect("sent");
    assert_eq!(close_code(&mut ws).await, 1007);
    server.stop().await;
}

/// A client frame, masked, with `first` as its first byte (FIN and opcode).
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut out = vec![first, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A WebSocket handshake by hand, to send what no library would.
async fn handshake_by_hand(server: &TestServer) -> TcpStream {
    let mut tcp = TcpStream::connect(server.addr).await.expect("connects");
    let request = format!(
        "GET /sub HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        server.addr
    );
    tcp.write_all(request.as_bytes()).await.expect("request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.expect("response");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    tcp
}
