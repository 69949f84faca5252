//! The binary refuses to start on a secret anyone could guess or read, and
//! the distributed roles refuse to start without the cluster secret.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};

fn natter(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_natter"));
    command
        .args(args)
        // Tests run side by side: no fixed admin port.
        .env("NATTER_ADMIN__LISTEN", "127.0.0.1:0")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Nothing from the environment this test runs in.
    for (var, _) in std::env::vars() {
        if var.starts_with("NATTER_") {
            command.env_remove(var);
        }
    }
    command
}

/// Runs a command that must fail before serving; its error output. One that
/// is still running after a few seconds started: it is killed and the test
/// fails. (A plain thread waiting on a child process: no runtime to yield to.)
#[allow(clippy::disallowed_methods)]
fn refused(command: &mut Command) -> String {
    let mut child = command.spawn().expect("natter runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let Output { stderr, .. } = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&stderr).to_string();
    match status {
        Some(status) => assert!(!status.success(), "succeeded: {stderr}"),
        None => panic!("started and kept running: {stderr}"),
    }
    assert!(!stderr.contains("natter serving"), "{stderr}");
    stderr
}

#[test]
fn a_blank_short_or_world_readable_secret_file_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    let secret = data.join("secret");
    let listen = ["--listen", "127.0.0.1:0", "--data-dir"];
    for (content, mode) in [
        ("", 0o600),
        ("   \n", 0o600),
        ("0123456789abcdef0123456789abcde\n", 0o600),
        ("0123456789abcdef0123456789abcdef0123\n", 0o644),
    ] {
        std::fs::write(&secret, content).expect("write");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let mut serve = natter(&["serve"]);
        serve.args(listen).arg(&data);
        let stderr = refused(&mut serve);
        assert!(stderr.contains("secret"), "{content:?}: {stderr}");
        // `natter token` signs with nothing weaker either.
        let mut token = natter(&["token", "--uid", "1", "--device", "d", "--data-dir"]);
        token.arg(&data);
        refused(&mut token);
    }
    std::fs::remove_file(&secret).expect("rm");
    let mut token = natter(&["token", "--uid", "1", "--device", "d", "--data-dir"]);
    let out = token.arg(&data).output().expect("runs");
    assert!(out.status.success(), "a new secret is made: {out:?}");
}

#[test]
fn a_short_configured_secret_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (var, value) in [
        ("NATTER_AUTH__SECRET", "only 31 bytes: not 32 or more."),
        ("NATTER_AUTH__SECRET", "                                   "),
        ("NATTER_RPC__SECRET", "only 31 bytes: not 32 or more."),
    ] {
        let mut serve = natter(&["serve", "--listen", "127.0.0.1:0", "--data-dir"]);
        serve.arg(dir.path()).env(var, value);
        let stderr = refused(&mut serve);
        assert!(
            stderr.contains("at least 32 bytes"),
            "{var}={value:?}: {stderr}"
        );
    }
}

#[test]
fn comet_and_logic_refuse_to_start_without_the_cluster_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = "the token secret of this test, 32 bytes or more";
    for role in ["comet", "logic"] {
        let mut start = natter(&[
            role,
            "--listen",
            "127.0.0.1:0",
            "--rpc-listen",
            "127.0.0.1:0",
        ]);
        start
            .arg("--data-dir")
            .arg(dir.path().join(role))
            .env("NATTER_AUTH__SECRET", auth)
            .env("NATTER_DISCOVERY__ETCD_URL", "http://127.0.0.1:1");
        let stderr = refused(&mut start);
        assert!(stderr.contains("rpc.secret"), "{role}: {stderr}");
        // Nor with the token secret as the cluster secret.
        start.env("NATTER_RPC__SECRET", auth);
        let stderr = refused(&mut start);
        assert!(
            stderr.contains("must differ from auth.secret"),
            "{role}: {stderr}"
        );
    }
}
