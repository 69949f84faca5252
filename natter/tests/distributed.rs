//! The distributed shape as separate processes of the real binary, on the
//! machine's MariaDB and Redis and a private etcd: a logic node and then a
//! gateway are killed with SIGKILL in the middle of traffic, and every
//! message that was acknowledged still reaches its receiver.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natter_client::{Client, ClientConfig, Event, Events};
use natter_node::discovery::testing::EtcdServer;
use natter_proto::msg::MessageBody;
use natter_record::mysql::testing::{drop_database, fresh_database};
use natter_roles::Tokens;

const SECRET: &str = "a shared secret for every logic node";
/// The cluster secret of every comet and logic node.
const RPC_SECRET: &str = "the cluster secret of every comet and logic node";

struct Node {
    child: Child,
    addr: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Stack {
    etcd: String,
    mysql: String,
    prefix: String,
    dir: tempfile::TempDir,
}

impl Stack {
    /// Starts `natter ROLE` as node `name`; returns once it logged its address.
    fn start(&self, role: &str, name: &str) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_natter"))
            .args([
                role,
                "--listen",
                "127.0.0.1:0",
                "--rpc-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(self.dir.path().join(name))
            .env("NATTER_LOG__FORMAT", "json")
            // Nodes of one test run side by side: no fixed admin port.
            .env("NATTER_ADMIN__LISTEN", "127.0.0.1:0")
            .env("NATTER_AUTH__SECRET", SECRET)
            .env("NATTER_RPC__SECRET", RPC_SECRET)
            .env("NATTER_DISCOVERY__ETCD_URL", &self.etcd)
            .env("NATTER_DISCOVERY__NODE", name)
            .env("NATTER_DISCOVERY__TTL_SECS", "2")
            .env("NATTER_STORE__MYSQL_URL", &self.mysql)
            .env("NATTER_SESSIONS__REDIS_URL", "redis://127.0.0.1:6379/0")
            .env("NATTER_SESSIONS__KEY_PREFIX", &self.prefix)
            .env("NATTER_RPC__TIMEOUT_MS", "1000")
            .env("NATTER_LIMITS__MESSAGES_PER_SEC", "100000")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("natter starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("{name} exited before serving"))
                .expect("log line");
            let entry: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            if entry["fields"]["message"] == "natter serving" {
                if let Some(addr) = entry["fields"]["addr"].as_str() {
                    break addr.to_string();
                }
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Node { child, addr }
    }
}

fn token(uid: u64) -> String {
    Tokens::new(SECRET.as_bytes().to_vec())
        .mint(&u(uid), "phone", 3600)
        .expect("token")
}

/// Connects through `gateway`, retrying while it finds no logic node yet.
async fn connect(gateway: &Node, uid: u64) -> (Client, Events) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match Client::connect(ClientConfig::new(gateway.addr.clone(), token(uid))).await {
            Ok((client, events)) => return (client, events),
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "cannot connect: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Records every message an event stream delivers.
fn record(mut events: Events, into: Arc<Mutex<HashSet<u64>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let Event::Message(m) = event {
                into.lock().expect("lock").insert(m.mid);
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_logic_node_and_of_a_gateway_loses_nothing_acked() {
    let etcd = EtcdServer::start().await;
    let (mysql, db) = fresh_database().await;
    let stack = Stack {
        etcd: etcd.url.clone(),
        mysql,
        prefix: format!("natter-kill-{}:", std::process::id()),
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let mut logic_a = stack.start("logic", "logic-a");
    let _logic_b = stack.start("logic", "logic-b");
    let gateway_a = stack.start("comet", "comet-a");
    let mut gateway_b = stack.start("comet", "comet-b");

    let (alice, _alice_events) = connect(&gateway_a, 1).await;
    let (bob, bob_events) = connect(&gateway_b, 2).await;
    bob.sync().await.expect("sync");
    let received: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let first = record(bob_events, received.clone());

    // Alice sends all along; every ack is recorded.
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let sender = {
        let acked = acked.clone();
        tokio::spawn(async move {
            for i in 0..300u32 {
                if let Ok(reply) = alice.send(&u(2), MessageBody::text(format!("m{i}"))).await {
                    acked.lock().expect("lock").push(reply.mid);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let acked_now = || acked.lock().expect("lock").len();
    while acked_now() < 60 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGKILL a logic node: the gateways carry on with the other.
    logic_a.child.kill().expect("kill -9 logic-a");
    let _ = logic_a.child.wait();
    while acked_now() < 150 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGKILL Bob's gateway: he reconnects to the other and syncs.
    gateway_b.child.kill().expect("kill -9 comet-b");
    let _ = gateway_b.child.wait();
    drop(bob);
    let (bob, bob_events) = connect(&gateway_a, 2).await;
    let second = record(bob_events, received.clone());
    sender.await.expect("sender");
    bob.sync().await.expect("final sync");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 250, "most sends acked: {}", acked.len());
    let received = received.lock().expect("lock").clone();
    let lost: Vec<&u64> = acked.iter().filter(|m| !received.contains(m)).collect();
    assert!(
        lost.is_empty(),
        "{} acked messages lost: {lost:?}",
        lost.len()
    );
    first.abort();
    second.abort();
    drop(bob);
    drop_database(&db).await;
}

/// The test user numbered `n`: the user id `u{n}`.
fn u(n: u64) -> natter_proto::UserId {
    natter_proto::UserId::parse(&format!("u{n}")).expect("a valid user id")
}
