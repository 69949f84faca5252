//! kill -9 under traffic, again and again: `natter serve`, and a logic node
//! of the distributed shape, are killed in the middle of a pressure run and
//! started again on the same data (dir or database) and the same ports,
//! 20 times each. Every run must reconcile clean: nothing acked lost,
//! nothing delivered twice, nothing delivered to a device it was not meant
//! for (a send stored just before the crash whose ack was lost must not
//! come back to its own device as an incoming message).
//!
//! In the distributed shape the logic node dies in every cycle; in every
//! other cycle its gateway dies with it (one machine running both goes
//! down), and both come back on their ports. With the gateway alive the
//! clients keep their connections: the sends the crash caught are answered
//! with `internal` or time out, and are resent over the same connection to
//! the restarted logic node, which must answer them with the first mid
//! (the dedupe key is in MariaDB). With the gateway dead too, the clients
//! reconnect and sync, and a send stored just before the crash comes back
//! to its own device, as in the embedded shape.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use natter_node::discovery::testing::EtcdServer;
use natter_pressure::report::Report;
use natter_pressure::run::{execute, Mode, Target};
use natter_pressure::scenario::Scenario;
use natter_record::mysql::testing::{drop_database, fresh_database};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Kill-and-restart cycles per shape.
const CYCLES: u64 = 20;
const SECRET: &str = "a shared secret for every node of the crash test";
/// The cluster secret that signs every call between the test's nodes.
const RPC_SECRET: &str = "the cluster secret of the crash test's comet and logic";
/// Sending starts this long after a run starts (pressure's connect phase
/// with no connect rate).
const SENDING_AFTER: Duration = Duration::from_millis(1300);

/// A short run: 40 users sending 8 messages a second each for 1.7 s.
fn scenario() -> Scenario {
    Scenario {
        users: 40,
        devices: 1,
        rate: 8.0,
        warmup_ms: 200,
        duration_ms: 1500,
        drain_ms: 800,
        connect_rate: 0,
        workers: 1,
        ..Scenario::default()
    }
}

/// When cycle `i` kills: spread over the sending window, 0.2 s to 1.4 s
/// after sending starts.
fn kill_after(i: u64) -> Duration {
    SENDING_AFTER + Duration::from_millis(200 + (i * 337) % 1200)
}

/// A natter child process; killed when dropped.
struct Node {
    child: Child,
    addr: String,
    /// The gRPC address of a distributed role.
    rpc: Option<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Node {
    /// SIGKILL, and wait for the process to be gone.
    async fn kill_9(&mut self) {
        self.child.start_kill().expect("kill -9");
        let _ = self.child.wait().await;
    }
}

/// How to start one node: the binary's arguments and environment.
#[derive(Clone)]
struct Launch {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Launch {
    /// Starts the node with `--listen` (and `--rpc-listen`) as given; the
    /// addresses it bound come from its log.
    async fn start(&self, listen: &str, rpc_listen: Option<&str>) -> Result<Node, String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_natter"));
        command.args(&self.args).args(["--listen", listen]);
        if let Some(rpc) = rpc_listen {
            command.args(["--rpc-listen", rpc]);
        }
        let mut child = command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("NATTER_LOG__FORMAT", "json")
            // Nodes of one test run side by side: no fixed admin port.
            .env("NATTER_ADMIN__LISTEN", "127.0.0.1:0")
            .env("NATTER_LIMITS__MESSAGES_PER_SEC", "100000")
            .env("NATTER_LIMITS__MESSAGE_BURST", "100000")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("natter does not start: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut said = Vec::new();
        let serving = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if entry["fields"]["message"] == "natter serving" {
                    let addr = entry["fields"]["addr"].as_str().map(str::to_string);
                    let rpc = entry["fields"]["rpc"]
                        .as_str()
                        .and_then(|r| r.strip_prefix("Some(")?.strip_suffix(')'))
                        .map(str::to_string);
                    return addr.map(|addr| (addr, rpc));
                }
                said.push(line);
            }
            None
        })
        .await;
        let Ok(Some((addr, rpc))) = serving else {
            let _ = child.start_kill();
            return Err(format!("natter did not serve:\n{}", said.join("\n")));
        };
        // Keep draining the log so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Node { child, addr, rpc })
    }

    /// Starts the node again on the addresses it had: the kernel frees a
    /// killed process's ports at once, but retry briefly all the same.
    async fn restart(&self, old: &Node) -> Node {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.start(&old.addr, old.rpc.as_deref()).await {
                Ok(node) => {
                    assert_eq!((&node.addr, &node.rpc), (&old.addr, &old.rpc));
                    return node;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("restart failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot restart on {}: {e}", old.addr),
            }
        }
    }
}

fn target(server: &str, api: &str, secret: Vec<u8>, report_dir: &Path) -> Target {
    Target {
        server: server.to_string(),
        api: Some(api.to_string()),
        secret,
        report_dir: report_dir.to_path_buf(),
        server_probe: None,
        quiet: true,
        heartbeat_ms: None,
    }
}

/// One run with a kill -9 of each of `victims` (at the same moment) in its
/// sending window and a restart at once; returns the report and the
/// restarted nodes, in order.
async fn run_with_a_crash(
    i: u64,
    target: Target,
    victims: Vec<(&Launch, Node)>,
) -> (Report, Vec<Node>) {
    let run = tokio::spawn(execute(scenario(), target, Mode::Run));
    tokio::time::sleep(kill_after(i)).await;
    assert!(
        !run.is_finished(),
        "cycle {i}: the run ended before the kill"
    );
    let mut killed = Vec::new();
    for (launch, mut victim) in victims {
        victim.kill_9().await;
        killed.push((launch, victim));
    }
    let mut restarted = Vec::new();
    for (launch, victim) in killed {
        restarted.push(launch.restart(&victim).await);
    }
    let report = run
        .await
        .expect("the run task")
        .unwrap_or_else(|e| panic!("cycle {i}: the run failed: {e:#}"));
    (report, restarted)
}

/// What a failed cycle said, for the final verdict.
fn verdict(i: u64, report: &Report, failures: &mut Vec<String>) {
    let r = &report.reconciliation;
    eprintln!(
        "cycle {i}: acked {}/{}, lost {}, duplicates {}, unexpected {}; resends {}, reconnects {}, own copies back {}",
        r.acked,
        r.sent,
        r.lost,
        r.duplicates,
        r.unexpected,
        report.sdk.resends,
        report.sdk.reconnects,
        report.sdk.own_copies
    );
    if !report.clean {
        failures.push(format!("cycle {i}:\n{}", report.text()));
    }
}

fn check(shape: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{shape}: {} of {CYCLES} runs with a kill -9 were not clean:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn natter_serve_killed_20_times_under_traffic_keeps_every_promise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let launch = Launch {
        args: vec!["serve".into(), "--data-dir".into(), path(&data)],
        env: Vec::new(),
    };
    let mut server = launch.start("127.0.0.1:0", None).await.expect("serves");
    let secret = natter_node::config::read_secret(&data).expect("the server's secret");
    let mut failures = Vec::new();
    for i in 0..CYCLES {
        let target = target(
            &server.addr,
            &server.addr,
            secret.clone(),
            &dir.path().join(format!("report-{i}")),
        );
        let (report, mut restarted) = run_with_a_crash(i, target, vec![(&launch, server)]).await;
        server = restarted.remove(0);
        // Every device lost its connection and came back.
        assert!(
            report.sdk.reconnects >= scenario().users,
            "cycle {i}: the kill did not hit the run:\n{}",
            report.text()
        );
        verdict(i, &report, &mut failures);
    }
    check("natter serve", &failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logic_node_killed_20_times_under_traffic_keeps_every_promise() {
    let etcd = EtcdServer::start().await;
    let (mysql, db) = fresh_database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = |node: &str| -> Vec<(String, String)> {
        [
            ("NATTER_AUTH__SECRET", SECRET.to_string()),
            ("NATTER_DISCOVERY__ETCD_URL", etcd.url.clone()),
            ("NATTER_DISCOVERY__NODE", node.to_string()),
            ("NATTER_DISCOVERY__TTL_SECS", "2".to_string()),
            ("NATTER_STORE__MYSQL_URL", mysql.clone()),
            (
                "NATTER_SESSIONS__REDIS_URL",
                "redis://127.0.0.1:6379/0".to_string(),
            ),
            (
                "NATTER_SESSIONS__KEY_PREFIX",
                format!("natter-crash-{}:", std::process::id()),
            ),
            ("NATTER_RPC__TIMEOUT_MS", "1000".to_string()),
            ("NATTER_RPC__SECRET", RPC_SECRET.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    let role = |role: &str, node: &str| Launch {
        args: vec![
            role.into(),
            "--data-dir".into(),
            path(&dir.path().join(node)),
        ],
        env: env(node),
    };
    let logic_launch = role("logic", "logic-a");
    let mut logic = logic_launch
        .start("127.0.0.1:0", Some("127.0.0.1:0"))
        .await
        .expect("logic serves");
    let comet_launch = role("comet", "comet-a");
    let mut comet = comet_launch
        .start("127.0.0.1:0", Some("127.0.0.1:0"))
        .await
        .expect("comet serves");
    wait_for_logic(&comet.addr).await;
    let mut failures = Vec::new();
    for i in 0..CYCLES {
        let target = target(
            &comet.addr,
            &logic.addr,
            SECRET.as_bytes().to_vec(),
            &dir.path().join(format!("report-{i}")),
        );
        // Every other cycle the gateway dies with the logic node (a machine
        // running both goes down).
        let both = i % 2 == 1;
        let (report, restarted) = if both {
            let (report, mut restarted) = run_with_a_crash(
                i,
                target,
                vec![(&logic_launch, logic), (&comet_launch, comet)],
            )
            .await;
            comet = restarted.remove(1);
            (report, restarted)
        } else {
            run_with_a_crash(i, target, vec![(&logic_launch, logic)]).await
        };
        logic = restarted.into_iter().next().expect("logic restarted");
        // The sends the crash caught were resent.
        assert!(
            report.sdk.resends > 0 || (both && report.sdk.reconnects > 0),
            "cycle {i}: the kill did not hit the run:\n{}",
            report.text()
        );
        verdict(i, &report, &mut failures);
        // The next run connects only once the gateway reaches logic again.
        wait_for_logic(&comet.addr).await;
    }
    drop(comet);
    drop(logic);
    drop_database(&db).await;
    check("a logic node", &failures);
}

/// Waits until a client can authenticate through the gateway (which needs
/// a logic node).
async fn wait_for_logic(gateway: &str) {
    let token = natter_roles::Tokens::new(SECRET.as_bytes().to_vec())
        .mint(&u(1), "probe", 60)
        .expect("token");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match natter_client::Client::connect(natter_client::ClientConfig::new(gateway, &token))
            .await
        {
            Ok((client, _events)) => {
                client.close().await;
                return;
            }
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the gateway reaches no logic node: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The test user numbered `n`: the user id `u{n}`.
fn u(n: u64) -> natter_proto::UserId {
    natter_proto::UserId::parse(&format!("u{n}")).expect("a valid user id")
}
