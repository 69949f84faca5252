//! The command-line contract, against the real binary: help text, `natter
//! token`, `natter serve` with its defaults, and durability across kill -9.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use natter_client::{Client, ClientConfig, Event};
use natter_proto::msg::MessageBody;

fn natter() -> Command {
    Command::new(env!("CARGO_BIN_EXE_natter"))
}

/// A `natter serve` child on port 0; its address is read from its JSON log.
struct Served {
    child: Child,
    addr: String,
}

fn serve(data_dir: &std::path::Path) -> Served {
    let mut child = natter()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env("NATTER_LOG__FORMAT", "json")
        // These tests send faster than one user may by default.
        .env("NATTER_LIMITS__MESSAGES_PER_SEC", "100000")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("natter serve starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server logged its address")
            .expect("log line");
        let entry: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        if let Some(addr) = entry["fields"]["addr"].as_str() {
            break addr.to_string();
        }
    };
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Served { child, addr }
}

fn token(data_dir: &std::path::Path, uid: u64, device: &str) -> String {
    let out = natter()
        .args([
            "token",
            "--uid",
            &format!("u{uid}"),
            "--device",
            device,
            "--data-dir",
        ])
        .arg(data_dir)
        .output()
        .expect("natter token runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

#[test]
fn help_describes_every_subcommand_and_flag() {
    let out = natter().arg("--help").output().expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["serve", "token", "pressure"] {
        assert!(text.contains(word), "{word} missing from --help:\n{text}");
    }
    let out = natter().args(["serve", "--help"]).output().expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--data-dir",
        "--config",
        "127.0.0.1:3102",
        "./natter-data",
        "--admin-listen",
        "127.0.0.1:3104",
    ] {
        assert!(
            text.contains(flag),
            "{flag} missing from serve --help:\n{text}"
        );
    }
    // The admin API is served where logic runs, not by gateways.
    let out = natter().args(["logic", "--help"]).output().expect("runs");
    assert!(String::from_utf8_lossy(&out.stdout).contains("--admin-listen"));
    let out = natter().args(["comet", "--help"]).output().expect("runs");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("--admin-listen"));
    let out = natter().args(["token", "--help"]).output().expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--uid", "--device", "--data-dir", "--ttl"] {
        assert!(
            text.contains(flag),
            "{flag} missing from token --help:\n{text}"
        );
    }
}

#[test]
fn bad_flags_and_bad_config_fail_before_binding() {
    let out = natter()
        .args([
            "token",
            "--uid",
            "a:b",
            "--device",
            "d",
            "--data-dir",
            "/nonexistent/x",
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let dir = tempfile::tempdir().expect("tempdir");
    let out = natter()
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .env("NATTER_COMET__HEARTBEAT_TIMEOUT_MS", "1")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("heartbeat_timeout_ms"));
}

/// `natter token --uid` takes the operator's own string ids, and refuses
/// every form outside the rule with the reason.
#[test]
fn tokens_are_minted_for_string_user_ids() {
    use base64::Engine;
    let dir = tempfile::tempdir().expect("tempdir");
    let mint = |uid: &str| {
        natter()
            .args(["token", "--uid", uid, "--device", "phone", "--data-dir"])
            .arg(dir.path())
            .output()
            .expect("runs")
    };
    let long = "x".repeat(64);
    for uid in [
        "alice",
        "Alice",
        "20210419184685527C1DB08A",
        "a.b-c_d@e",
        long.as_str(),
    ] {
        let out = mint(uid);
        assert!(out.status.success(), "{uid}: {out:?}");
        let token = String::from_utf8(out.stdout).expect("utf-8");
        let payload = token.trim().split('.').nth(1).expect("a JWT");
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .expect("base64url"),
        )
        .expect("JSON claims");
        assert_eq!(claims["uid"], uid, "the id byte for byte");
    }
    let too_long = "x".repeat(65);
    for uid in ["", "a:b", "..", "a b", "é", too_long.as_str()] {
        let out = mint(uid);
        assert!(!out.status.success(), "{uid:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("user id"), "{uid:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_the_cli_work_and_kill_9_loses_nothing_acked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut served = serve(&data);
    let alice_token = token(&data, 1, "phone");
    let (alice, _events) = Client::connect(ClientConfig::new(served.addr.clone(), alice_token))
        .await
        .expect("alice connects");
    let mut acked = Vec::new();
    for i in 0..200 {
        acked.push(
            alice
                .send(&u(2), MessageBody::text(format!("durable {i}")))
                .await
                .expect("acked")
                .mid,
        );
    }
    // No goodbye, no flush: SIGKILL right after the last ack.
    served.child.kill().expect("kill -9");
    served.child.wait().expect("reaped");
    drop(alice);

    let mut served = serve(&data);
    let bob = ClientConfig::new(served.addr.clone(), token(&data, 2, "phone"));
    let (_bob, mut events) = Client::connect(bob).await.expect("bob connects");
    let mut got = Vec::new();
    while got.len() < acked.len() {
        match tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("in time")
        {
            Some(Event::Message(m)) => got.push(m.mid),
            Some(_) => {}
            None => panic!("event stream ended"),
        }
    }
    assert_eq!(got, acked);

    // SIGTERM drains and exits cleanly.
    sigterm(served.child.id());
    let status = served.child.wait().expect("exits");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acked_group_message_nor_the_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut served = serve(&data);
    let alice = ClientConfig::new(served.addr.clone(), token(&data, 1, "phone"));
    let (alice, _events) = Client::connect(alice).await.expect("alice connects");
    let group = alice
        .create_group(&natter_client::CreateGroup {
            name: "durable".into(),
            members: vec![u(2), u(3)],
            ..Default::default()
        })
        .await
        .expect("group created");
    let mut acked = Vec::new();
    for i in 0..100 {
        let reply = alice
            .send_group(group.id, MessageBody::text(format!("durable {i}")))
            .await
            .expect("acked");
        acked.push(reply.mid);
    }
    served.child.kill().expect("kill -9");
    served.child.wait().expect("reaped");
    drop(alice);

    let mut served = serve(&data);
    let bob = ClientConfig::new(served.addr.clone(), token(&data, 2, "phone"));
    let (bob, mut events) = Client::connect(bob).await.expect("bob connects");
    let mut got = Vec::new();
    while got.len() < acked.len() {
        match tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("in time")
        {
            Some(Event::Message(m)) if m.group == group.id && m.sender_device == "phone" => {
                got.push(m.mid)
            }
            Some(_) => {}
            None => panic!("event stream ended"),
        }
    }
    assert_eq!(got, acked, "every acked group message, in order");
    // The group itself survived: bob is still a member and may write.
    let reply = bob
        .send_group(group.id, MessageBody::text("still here"))
        .await
        .expect("member after restart");
    assert_eq!(reply.conv_seq, 102, "created, 100 messages, this one");
    sigterm(served.child.id());
    assert!(served.child.wait().expect("exits").success());
}

fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

#[test]
fn pressure_runs_worker_processes_and_fails_loudly_on_a_wrong_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut served = serve(&data);
    let out = dir.path().join("report");
    let status = natter()
        .args([
            "pressure",
            "run",
            "--server",
            &served.addr,
            "--users",
            "100",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
        ])
        .args([
            "--drain",
            "500ms",
            "--rate",
            "3",
            "--workers",
            "2",
            "--quiet",
            "--data-dir",
        ])
        .arg(&data)
        .arg("--report-dir")
        .arg(&out)
        .arg("--server-pid")
        .arg(served.child.id().to_string())
        .status()
        .expect("pressure runs");
    assert!(status.success(), "{status:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json"))
            .expect("json");
    assert_eq!(report["clean"], true, "{report}");
    assert_eq!(report["connections"]["connected"], 100);
    assert_eq!(report["conditions"]["workers"], 2);
    assert_eq!(report["reconciliation"]["lost"], 0);
    assert!(report["reconciliation"]["acked"]
        .as_u64()
        .is_some_and(|n| n > 100));
    assert!(report["server_cost"]["rss_per_connection_bytes"].is_number());
    assert!(report["server_cost"]["steady_cpu_us_per_delivered"].is_number());
    assert!(out.join("report.html").exists());

    let status = natter()
        .args([
            "pressure",
            "run",
            "--server",
            &served.addr,
            "--users",
            "10",
            "--duration",
            "1s",
            "--quiet",
        ])
        .args(["--secret", "not the server's secret at all"])
        .arg("--report-dir")
        .arg(dir.path().join("bad"))
        .status()
        .expect("pressure runs");
    assert_eq!(
        status.code(),
        Some(1),
        "a run where nothing connects must fail"
    );
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("bad/report.json")).expect("report.json"),
    )
    .expect("json");
    assert_eq!(report["connections"]["errors"]["closed:auth_failed"], 10);
    served.child.kill().expect("kill");
    let _ = served.child.wait();
}

/// The test user numbered `n`: the user id `u{n}`.
fn u(n: u64) -> natter_proto::UserId {
    natter_proto::UserId::parse(&format!("u{n}")).expect("a valid user id")
}
