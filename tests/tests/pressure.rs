//! The pressure harness against a real server: a clean smoke run, and a run
//! through a proxy that loses one message, which the harness must report.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use natter_pressure::run::{execute, Mode, ServerProbe, Target};
use natter_pressure::scenario::{Pattern, Scenario};
use natter_proto::msg::{Message, SyncReply};
use natter_proto::{Frame, Op};
use natter_tests::TestServer;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as Ws;

fn target(server: &TestServer, addr: String, dir: &std::path::Path) -> Target {
    Target {
        server: addr,
        api: None,
        secret: server.tokens_secret(),
        report_dir: dir.join("report"),
        server_probe: Some(ServerProbe::Metrics(server.url("/metrics"))),
        quiet: true,
        heartbeat_ms: None,
    }
}

fn small_run(users: u64) -> Scenario {
    Scenario {
        users,
        devices: 1,
        rate: 4.0,
        warmup_ms: 300,
        duration_ms: 1500,
        drain_ms: 500,
        connect_rate: 0,
        workers: 1,
        ..Scenario::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_run_reconciles_every_member_device() {
    let server = TestServer::start(|_| {}).await;
    let out = tempfile::tempdir().expect("tempdir");
    // 3 groups (50, 50, 20 members), 2 senders each, two devices per user.
    let scenario = Scenario {
        devices: 2,
        rate: 3.0,
        pattern: Pattern::Group {
            size: 50,
            senders: 2,
        },
        ..small_run(120)
    };
    let report = execute(
        scenario,
        target(&server, server.server(), out.path()),
        Mode::Run,
    )
    .await
    .expect("run");
    let r = &report.reconciliation;
    assert!(report.clean, "{}", report.text());
    assert_eq!((r.lost, r.duplicates, r.unexpected), (0, 0, 0));
    assert!(r.acked > 20, "{}", report.text());
    // Each message: every device of every member but the sending one
    // (99 in the groups of 50, 39 in the group of 20).
    assert!(
        r.expected >= r.acked * 39 && r.expected <= r.acked * 99,
        "{}",
        report.text()
    );
    assert_eq!(r.delivered, r.expected);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smoke_run_is_clean_and_writes_every_report() {
    let server = TestServer::start(|_| {}).await;
    let out = tempfile::tempdir().expect("tempdir");
    let scenario = Scenario {
        devices: 2,
        ..small_run(300)
    };
    let report = execute(
        scenario,
        target(&server, server.server(), out.path()),
        Mode::Run,
    )
    .await
    .expect("run");
    let r = &report.reconciliation;
    assert!(report.clean, "{}", report.text());
    assert_eq!((r.lost, r.duplicates, r.unexpected), (0, 0, 0));
    assert_eq!(report.connections.connected, 600);
    assert!(r.acked > 1000, "{}", report.text());
    assert_eq!(
        r.expected,
        r.acked * 3,
        "two receiver devices and the sender's other device"
    );
    assert!(report.latency.end_to_end.count > 0 && report.latency.end_to_end.count <= r.delivered);
    assert!(report.latency.ack.p99_us > 0);
    assert_eq!(report.conditions.client_lag.count, r.sent);
    let cost = report.server_cost.as_ref().expect("server cost");
    assert!(cost.cpu_seconds > 0.0);
    // The sending window alone: part of the whole run's CPU.
    let steady = cost.steady_cpu_seconds.expect("steady cpu");
    assert!(
        steady > 0.0 && steady <= cost.cpu_seconds,
        "{steady} of {}",
        cost.cpu_seconds
    );
    assert!(cost.steady_cpu_us_per_delivered.is_some_and(|us| us > 0.0));
    for file in ["report.json", "report.html", "summary.txt"] {
        assert!(
            out.path().join("report").join(file).exists(),
            "{file} written"
        );
    }
    let html = std::fs::read_to_string(out.path().join("report/report.html")).expect("html");
    assert!(html.contains("<svg") && html.contains("Clean"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_held_and_counted() {
    let server = TestServer::start(|_| {}).await;
    let out = tempfile::tempdir().expect("tempdir");
    let scenario = Scenario {
        rate: 0.0,
        warmup_ms: 0,
        duration_ms: 500,
        drain_ms: 0,
        ..small_run(200)
    };
    let report = execute(
        scenario,
        target(&server, server.server(), out.path()),
        Mode::Keep,
    )
    .await
    .expect("keep");
    assert!(report.clean, "{}", report.text());
    assert_eq!(report.connections.connected, 200);
    assert_eq!(report.connections.connect_time.count, 200);
    server.stop().await;
}

/// A WebSocket proxy that makes one message vanish: it drops the first
/// push of the chosen ordinal, acknowledges it to the server itself so it is
/// never resent, and strips it from every later sync reply.
async fn lossy_proxy(
    upstream: SocketAddr,
    drop_nth_push: usize,
) -> (SocketAddr, Arc<Mutex<Option<u64>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let victim: Arc<Mutex<Option<u64>>> = Arc::new(Mutex::new(None));
    let pushes = Arc::new(Mutex::new(0usize));
    let shared_victim = victim.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let victim = shared_victim.clone();
            let pushes = pushes.clone();
            tokio::spawn(async move {
                let Ok(client) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let Ok((server, _)) =
                    tokio_tungstenite::connect_async(format!("ws://{upstream}/sub")).await
                else {
                    return;
                };
                let (mut client_tx, mut client_rx) = client.split();
                let (mut server_tx, mut server_rx) = server.split();
                let (up_tx, mut up_rx) = tokio::sync::mpsc::channel::<Ws>(1024);
                let up = up_tx.clone();
                tokio::spawn(async move {
                    while let Some(Ok(m)) = client_rx.next().await {
                        if up.send(m).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Some(m) = up_rx.recv().await {
                        if server_tx.send(m).await.is_err() {
                            break;
                        }
                    }
                });
                while let Some(Ok(m)) = server_rx.next().await {
                    let Ws::Binary(bytes) = &m else {
                        if client_tx.send(m).await.is_err() {
                            break;
                        }
                        continue;
                    };
                    let Ok(frame) = Frame::decode(bytes, 1 << 24) else {
                        continue;
                    };
                    let forward = match frame.op {
                        Op::Push => {
                            let message: Message = frame.message().expect("push body");
                            let n = {
                                let mut p = pushes.lock().expect("lock");
                                *p += 1;
                                *p
                            };
                            let dropped = {
                                let mut v = victim.lock().expect("lock");
                                if n == drop_nth_push && v.is_none() {
                                    *v = Some(message.mid);
                                }
                                *v == Some(message.mid)
                            };
                            if dropped {
                                let ack = Frame::empty(Op::PushAck, 0, frame.seq).encode();
                                let _ = up_tx.send(Ws::Binary(ack)).await;
                                None
                            } else {
                                Some(m)
                            }
                        }
                        Op::SyncReply => {
                            let mut reply: SyncReply = frame.message().expect("sync body");
                            let v = *victim.lock().expect("lock");
                            reply.messages.retain(|msg| Some(msg.mid) != v);
                            Some(Ws::Binary(
                                Frame::raw(Op::SyncReply, frame.seq, 0, reply.encode_to_vec())
                                    .encode(),
                            ))
                        }
                        _ => Some(m),
                    };
                    if let Some(m) = forward {
                        if client_tx.send(m).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    (addr, victim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_message_is_reported_and_fails_the_run() {
    let server = TestServer::start(|_| {}).await;
    let (proxy, victim) = lossy_proxy(server.addr, 25).await;
    let out = tempfile::tempdir().expect("tempdir");
    // Clients go through the proxy; the store is looked up at the server.
    let target = Target {
        api: Some(server.server()),
        ..target(&server, proxy.to_string(), out.path())
    };
    let report = execute(small_run(40), target, Mode::Run)
        .await
        .expect("run");
    let victim = victim
        .lock()
        .expect("lock")
        .expect("the proxy dropped a push");
    let r = &report.reconciliation;
    assert_eq!(r.lost, 1, "{}", report.text());
    assert_eq!(r.lost_examples[0].mid, victim);
    assert_eq!(
        r.lost_examples[0].in_store,
        Some(true),
        "stored, only never delivered: {}",
        report.text()
    );
    assert_eq!(r.duplicates, 0);
    assert!(!report.clean);
    assert!(report
        .problems
        .iter()
        .any(|p| p.contains("1 acked deliveries lost")));
    server.stop().await;
}
