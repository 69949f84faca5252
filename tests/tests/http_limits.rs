//! The public listener's bounds: HTTP time-outs, one connection cap for
//! HTTP and WebSocket, a shutdown that ends within the drain time, and
//! bodies over the limit.

use std::time::{Duration, Instant};

use natter_proto::ErrorCode;
use natter_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response read off a raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Reads one response (a head and a `content-length` body).
async fn answer(tcp: &mut TcpStream) -> Answer {
    let read = async {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            if tcp.read(&mut byte).await.expect("read") == 0 {
                panic!(
                    "connection closed before a whole head: {:?}",
                    String::from_utf8_lossy(&head)
                );
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8(head)
            .expect("text head")
            .to_ascii_lowercase();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        tcp.read_exact(&mut body).await.expect("body");
        Answer {
            status,
            head,
            body: String::from_utf8(body).expect("text body"),
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("an answer in time")
}

/// Waits until the server closes the connection; how long that took.
async fn closed(tcp: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(PATIENCE, tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => started.elapsed(),
        Ok(Ok(n)) => panic!(
            "expected the connection to close, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => panic!("still open after {PATIENCE:?}"),
    }
}

/// Whether the connection is still open after `wait` (nothing arrives).
async fn still_open(tcp: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1];
    tokio::time::timeout(wait, tcp.read(&mut buf))
        .await
        .is_err()
}

async fn connect(server: &TestServer) -> TcpStream {
    TcpStream::connect(server.addr).await.expect("connects")
}

fn healthz() -> &'static [u8] {
    b"GET /healthz HTTP/1.1\r\nHost: natter\r\n\r\n"
}

fn code_of(answer: &Answer) -> String {
    let body: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON body");
    body["code"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_or_slow_head_is_cut_at_the_header_time_out() {
    let server = TestServer::start(|c| {
        c.http.header_read_timeout_ms = 300;
        c.http.idle_timeout_ms = 60_000;
    })
    .await;
    // Nothing at all.
    let mut tcp = connect(&server).await;
    let took = closed(&mut tcp).await;
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    // A head a line at a time, each line well within the time-out.
    let mut tcp = connect(&server).await;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .expect("line");
    let started = Instant::now();
    let mut cut = false;
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if tcp
            .write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
            .await
            .is_err()
        {
            cut = true;
            break;
        }
    }
    assert!(
        cut || tokio::time::timeout(PATIENCE, closed(&mut tcp))
            .await
            .is_ok(),
        "a slow head was let run for {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    // The server itself is fine.
    let mut tcp = connect(&server).await;
    tcp.write_all(healthz()).await.expect("request");
    assert_eq!(answer(&mut tcp).await.status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_time_out() {
    let server = TestServer::start(|c| {
        c.http.header_read_timeout_ms = 5_000;
        c.http.idle_timeout_ms = 300;
    })
    .await;
    let mut tcp = connect(&server).await;
    tcp.write_all(healthz()).await.expect("request");
    assert_eq!(answer(&mut tcp).await.status, 200);
    let took = closed(&mut tcp).await;
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    server.stop().await;

    // The other way round, a keep-alive connection waits for its next
    // request longer than a head may take to arrive.
    let server = TestServer::start(|c| {
        c.http.header_read_timeout_ms = 200;
        c.http.idle_timeout_ms = 5_000;
    })
    .await;
    let mut tcp = connect(&server).await;
    tcp.write_all(healthz()).await.expect("request");
    assert_eq!(answer(&mut tcp).await.status, 200);
    assert!(still_open(&mut tcp, Duration::from_millis(800)).await);
    tcp.write_all(healthz()).await.expect("second request");
    assert_eq!(answer(&mut tcp).await.status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_body_times_out_with_408() {
    let server = TestServer::start(|c| {
        c.http.body_timeout_ms = 300;
        c.http.idle_timeout_ms = 60_000;
    })
    .await;
    let mut tcp = connect(&server).await;
    let request = format!(
        "POST /v1/groups HTTP/1.1\r\nHost: natter\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\"",
        server.token(1, "phone")
    );
    tcp.write_all(request.as_bytes()).await.expect("request");
    let answer = answer(&mut tcp).await;
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(code_of(&answer), ErrorCode::RequestTimeout.as_str());
    assert!(answer.head.contains("connection: close"), "{answer:?}");
    closed(&mut tcp).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_not_done_within_the_request_time_out_gets_408() {
    let server = TestServer::start(|c| {
        c.http.body_timeout_ms = 2_000;
        c.http.request_timeout_ms = 500;
    })
    .await;
    let mut tcp = connect(&server).await;
    let request = format!(
        "POST /v1/groups HTTP/1.1\r\nHost: natter\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 200\r\n\r\n",
        server.token(1, "phone")
    );
    tcp.write_all(request.as_bytes()).await.expect("request");
    // A byte every 50 ms: the body never stalls, but it would take 10 s.
    let (mut read, mut write) = tcp.into_split();
    let drip = tokio::spawn(async move {
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if write.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let mut head = vec![0u8; 12];
    tokio::time::timeout(PATIENCE, read.read_exact(&mut head))
        .await
        .expect("an answer before the body is complete")
        .expect("read");
    assert_eq!(&head, b"HTTP/1.1 408");
    drip.abort();
    server.stop().await;
}

/// Opens connections until one is refused; the refused one's answer.
async fn fill(server: &TestServer, open: &mut Vec<TcpStream>, want: usize) {
    while open.len() < want {
        let mut tcp = connect(server).await;
        tcp.write_all(healthz()).await.expect("request");
        assert_eq!(answer(&mut tcp).await.status, 200);
        open.push(tcp);
    }
}

/// A fresh connection is refused: a 503 `overloaded`, then the close.
async fn refused(server: &TestServer) {
    let mut tcp = connect(server).await;
    let answer = answer(&mut tcp).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(code_of(&answer), ErrorCode::Overloaded.as_str());
    closed(&mut tcp).await;
}

/// A fresh connection is served, once the server has let go of a closed one.
async fn served_again(server: &TestServer) -> TcpStream {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut tcp = connect(server).await;
        tcp.write_all(healthz()).await.expect("request");
        if answer(&mut tcp).await.status == 200 {
            return tcp;
        }
        assert!(Instant::now() < deadline, "no slot came free");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_websocket_connections_share_one_cap() {
    let server = TestServer::start(|c| c.comet.max_connections = 2).await;
    let mut open = Vec::new();
    fill(&server, &mut open, 2).await;
    // Two idle HTTP connections fill it: a third HTTP connection and a
    // WebSocket are both refused.
    refused(&server).await;
    let ws = tokio_tungstenite::connect_async(format!("ws://{}/sub", server.addr)).await;
    match ws {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        Err(_) => {} // reset before the answer was read: refused all the same
        Ok(_) => panic!("a WebSocket over the cap was accepted"),
    }
    // One HTTP connection and one WebSocket fill it too.
    drop(open.pop());
    let _ = served_again(&server).await;
    let mut ws = loop {
        match tokio::time::timeout(
            PATIENCE,
            natter_client::raw::Connection::connect(&server.server(), None),
        )
        .await
        .expect("connect in time")
        {
            Ok(conn) => break conn,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    refused(&server).await;
    // The WebSocket's slot comes back when it closes.
    ws.close().await;
    drop(ws);
    drop(open);
    let _a = served_again(&server).await;
    let _b = served_again(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_half_sent_requests_ends_within_the_drain_time() {
    let server = TestServer::start(|c| {
        c.comet.drain_ms = 300;
        c.http.header_read_timeout_ms = 600_000;
        c.http.body_timeout_ms = 600_000;
        c.http.request_timeout_ms = 600_000;
    })
    .await;
    // A head without its last line, and a body without its end.
    let mut head = connect(&server).await;
    head.write_all(b"GET /healthz HTTP/1.1\r\nHost: natter\r\n")
        .await
        .expect("head");
    let mut body = connect(&server).await;
    let request = format!(
        "POST /v1/groups HTTP/1.1\r\nHost: natter\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\"",
        server.token(1, "phone")
    );
    body.write_all(request.as_bytes()).await.expect("request");
    // And a WebSocket, which drains beside them.
    let (client, _events) = server.client(1, "phone").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    tokio::time::timeout(PATIENCE, server.stop())
        .await
        .expect("the server stops despite the half-sent requests");
    // The drain time, the WebSocket's closing handshake (at most 1 s) and
    // the final commit, with room for a busy machine; without the bound it
    // would never end.
    assert!(
        started.elapsed() < Duration::from_millis(300) + Duration::from_secs(4),
        "stopped in {:?}",
        started.elapsed()
    );
    closed(&mut head).await;
    closed(&mut body).await;
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_413() {
    let server = TestServer::start(|_| {}).await;
    let name = "x".repeat(3 * 1024 * 1024);
    let response = reqwest::Client::new()
        .post(server.url("/v1/groups"))
        .bearer_auth(server.token(1, "phone"))
        .json(&serde_json::json!({ "name": name }))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(body["code"], ErrorCode::PayloadTooLarge.as_str());
    server.stop().await;
}
