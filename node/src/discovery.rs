//! Discovery in etcd: each node registers under a lease with its role and
//! address and takes a worker id for its message ids; other nodes watch a
//! role and follow joins and leaves. A graceful stop revokes the lease
//! (the keys go at once); a crash stops the keep-alives and the keys expire
//! with the lease.
//!
//! etcd is reached through its JSON gateway (`/v3/...` over HTTP), not its
//! gRPC API: the gateway is part of every etcd since 3.3, it needs no
//! generated code (so no `protoc` in the build), and the few calls
//! discovery needs — lease grant, keep-alive and revoke, put, a
//! create-if-absent transaction, range and watch — are all there.
//!
//! Keys, under a prefix (`natter/` by default):
//!
//! - `P nodes/ROLE/NODE` → the [`NodeInfo`] as JSON, under the node's lease;
//! - `P workers/N` → the node holding worker id `N` (0..=1023), same lease.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ids::MAX_WORKER;

/// A failed etcd call.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("etcd request failed: {0}")]
    Http(String),
    #[error("etcd answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("etcd answer not understood: {0}")]
    Answer(String),
    #[error("all {} worker ids are taken", MAX_WORKER as u32 + 1)]
    NoWorker,
    #[error("the watch was quiet for a while")]
    Idle,
}

/// A node as registered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub role: String,
    pub node: String,
    /// Where other roles reach it (`host:port`).
    pub addr: String,
    /// Its worker id, unique among live nodes.
    pub worker: u16,
}

/// An etcd client over the JSON gateway.
#[derive(Clone)]
pub struct Etcd {
    http: reqwest::Client,
    base: String,
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn unb64(v: &Value) -> Result<String, DiscoveryError> {
    let text = v.as_str().unwrap_or("");
    let bytes = B64
        .decode(text)
        .map_err(|e| DiscoveryError::Answer(format!("base64: {e}")))?;
    String::from_utf8(bytes).map_err(|e| DiscoveryError::Answer(format!("utf-8: {e}")))
}

/// etcd writes 64-bit integers as JSON strings.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0xff {
            bytes.push(last + 1);
            return B64.encode(&bytes);
        }
    }
    B64.encode([0u8])
}

impl Etcd {
    /// `endpoint` is `http://host:port`; every call gives up after `timeout`
    /// (watches excepted: they stay open).
    pub fn new(endpoint: &str, timeout: Duration) -> Result<Etcd, DiscoveryError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .map_err(|e| DiscoveryError::Http(e.to_string()))?;
        Ok(Etcd {
            http,
            base: endpoint.trim_end_matches('/').to_string(),
        })
    }

    async fn call(&self, path: &str, body: Value) -> Result<Value, DiscoveryError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| DiscoveryError::Http(e.to_string()))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| DiscoveryError::Http(e.to_string()))?;
        if !status.is_success() {
            return Err(DiscoveryError::Status {
                status: status.as_u16(),
                body: text,
            });
        }
        serde_json::from_str(&text).map_err(|e| DiscoveryError::Answer(e.to_string()))
    }

    /// Whether etcd answers.
    pub async fn status(&self) -> Result<(), DiscoveryError> {
        self.call("/v3/maintenance/status", json!({}))
            .await
            .map(|_| ())
    }

    /// A new lease of `ttl`; its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, DiscoveryError> {
        let answer = self
            .call("/v3/lease/grant", json!({"TTL": ttl.as_secs().max(1)}))
            .await?;
        match int(&answer["ID"]) {
            0 => Err(DiscoveryError::Answer(format!("no lease id in {answer}"))),
            id => Ok(id),
        }
    }

    /// Refreshes a lease; the seconds it has left (0: it is gone).
    pub async fn keepalive(&self, lease: i64) -> Result<i64, DiscoveryError> {
        let answer = self
            .call("/v3/lease/keepalive", json!({"ID": lease.to_string()}))
            .await?;
        Ok(int(&answer["result"]["TTL"]))
    }

    /// Ends a lease now; its keys are deleted.
    pub async fn revoke(&self, lease: i64) -> Result<(), DiscoveryError> {
        self.call("/v3/lease/revoke", json!({"ID": lease.to_string()}))
            .await
            .map(|_| ())
    }

    pub async fn put(&self, key: &str, value: &str, lease: i64) -> Result<(), DiscoveryError> {
        self.call(
            "/v3/kv/put",
            json!({"key": b64(key), "value": b64(value), "lease": lease.to_string()}),
        )
        .await
        .map(|_| ())
    }

    /// Writes `key` only if it does not exist; whether it did.
    pub async fn create(&self, key: &str, value: &str, lease: i64) -> Result<bool, DiscoveryError> {
        let answer = self
            .call(
                "/v3/kv/txn",
                json!({
                    "compare": [{"target": "CREATE", "key": b64(key), "createRevision": "0"}],
                    "success": [{"requestPut": {"key": b64(key), "value": b64(value), "lease": lease.to_string()}}],
                }),
            )
            .await?;
        Ok(answer["succeeded"].as_bool().unwrap_or(false))
    }

    /// Every key under `prefix` with its value, and the store's revision.
    pub async fn range_prefix(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, String)>, i64), DiscoveryError> {
        let answer = self
            .call(
                "/v3/kv/range",
                json!({"key": b64(prefix), "range_end": prefix_end(prefix)}),
            )
            .await?;
        let mut out = Vec::new();
        if let Some(kvs) = answer["kvs"].as_array() {
            for kv in kvs {
                out.push((unb64(&kv["key"])?, unb64(&kv["value"])?));
            }
        }
        Ok((out, int(&answer["header"]["revision"])))
    }

    /// Watches `prefix` from `revision` on; each change is sent to `events`
    /// as (key, Some(value)) for a put or (key, None) for a delete. Returns
    /// when the watch ends (etcd went away, `stop`), with the error if any.
    async fn watch_prefix(
        &self,
        prefix: &str,
        revision: i64,
        events: &mut impl FnMut(String, Option<String>),
        stop: &CancellationToken,
    ) -> Result<(), DiscoveryError> {
        // Watches stay open: a client without the per-request time-out.
        let http = reqwest::Client::new();
        let request = http.post(format!("{}/v3/watch", self.base)).json(&json!({
            "create_request": {
                "key": b64(prefix),
                "range_end": prefix_end(prefix),
                "start_revision": revision.to_string(),
            }
        }));
        let mut response = tokio::select! {
            r = request.send() => r.map_err(|e| DiscoveryError::Http(e.to_string()))?,
            _ = stop.cancelled() => return Ok(()),
        };
        let mut buf: Vec<u8> = Vec::new();
        loop {
            // A quiet watch is read again from scratch now and then: a
            // half-open connection would otherwise freeze the membership.
            let chunk = tokio::select! {
                c = tokio::time::timeout(WATCH_IDLE, response.chunk()) => match c {
                    Ok(c) => c.map_err(|e| DiscoveryError::Http(e.to_string()))?,
                    Err(_) => return Err(DiscoveryError::Idle),
                },
                _ = stop.cancelled() => return Ok(()),
            };
            let Some(chunk) = chunk else {
                return Err(DiscoveryError::Http("watch stream ended".into()));
            };
            buf.extend_from_slice(&chunk);
            // The gateway writes one JSON object per line.
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let message: Value = serde_json::from_slice(&line)
                    .map_err(|e| DiscoveryError::Answer(e.to_string()))?;
                if let Some(error) = message.get("error") {
                    return Err(DiscoveryError::Answer(error.to_string()));
                }
                let result = &message["result"];
                if result["canceled"].as_bool() == Some(true) {
                    return Err(DiscoveryError::Answer(format!("watch canceled: {result}")));
                }
                for event in result["events"].as_array().into_iter().flatten() {
                    let key = unb64(&event["kv"]["key"])?;
                    if event["type"].as_str() == Some("DELETE") {
                        events(key, None);
                    } else {
                        events(key, Some(unb64(&event["kv"]["value"])?));
                    }
                }
            }
        }
    }
}

/// A watch without events for this long is replaced by a fresh read and watch.
const WATCH_IDLE: Duration = Duration::from_secs(60);

/// A node's registration; keeps its lease alive until [`Registration::close`]
/// (or until the process dies, when the lease expires).
pub struct Registration {
    etcd: Etcd,
    lease: i64,
    info: NodeInfo,
    stop: CancellationToken,
    keepalive: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    alive: watch::Receiver<bool>,
}

impl Registration {
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// False once the lease could not be kept (etcd unreachable past the
    /// TTL): the keys are gone and other nodes no longer see this one.
    pub fn alive(&self) -> bool {
        *self.alive.borrow()
    }

    /// Resolves when the lease is lost (etcd was unreachable past the TTL):
    /// another node may now hold this node's worker id. Never resolves
    /// after a deliberate close.
    pub async fn lost(&self) {
        let mut alive = self.alive.clone();
        while *alive.borrow_and_update() {
            if alive.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Deregisters: revokes the lease, which deletes the keys at once.
    pub async fn close(&self) {
        self.abandon().await;
        if let Err(e) = self.etcd.revoke(self.lease).await {
            tracing::warn!(error = %e, "lease not revoked; the keys expire with it");
        }
    }

    /// Stops the keep-alives without revoking, as a crash would (tests).
    pub async fn abandon(&self) {
        self.stop.cancel();
        let task = self
            .keepalive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Registers `node` of `role` at `addr` under a lease of `ttl`, with a
/// worker id no live node holds (tried from a hash of the node name).
pub async fn register(
    etcd: &Etcd,
    prefix: &str,
    role: &str,
    node: &str,
    addr: &str,
    ttl: Duration,
) -> Result<Registration, DiscoveryError> {
    let lease = etcd.grant(ttl).await?;
    let workers = u32::from(MAX_WORKER) + 1;
    let start = node
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        % workers;
    let mut worker = None;
    for i in 0..workers {
        let candidate = ((start + i) % workers) as u16;
        if etcd
            .create(&format!("{prefix}workers/{candidate}"), node, lease)
            .await?
        {
            worker = Some(candidate);
            break;
        }
    }
    let Some(worker) = worker else {
        let _ = etcd.revoke(lease).await;
        return Err(DiscoveryError::NoWorker);
    };
    let info = NodeInfo {
        role: role.to_string(),
        node: node.to_string(),
        addr: addr.to_string(),
        worker,
    };
    let value = serde_json::to_string(&info).map_err(|e| DiscoveryError::Answer(e.to_string()))?;
    etcd.put(&format!("{prefix}nodes/{role}/{node}"), &value, lease)
        .await?;
    let stop = CancellationToken::new();
    let (alive_tx, alive) = watch::channel(true);
    let keepalive = tokio::spawn(keep_alive(etcd.clone(), lease, ttl, stop.clone(), alive_tx));
    tracing::info!(role, node, addr, worker, "registered in etcd");
    Ok(Registration {
        etcd: etcd.clone(),
        lease,
        info,
        stop,
        keepalive: std::sync::Mutex::new(Some(keepalive)),
        alive,
    })
}

async fn keep_alive(
    etcd: Etcd,
    lease: i64,
    ttl: Duration,
    stop: CancellationToken,
    alive: watch::Sender<bool>,
) {
    let every = (ttl / 3).max(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        match etcd.keepalive(lease).await {
            Ok(left) if left > 0 => {
                if !*alive.borrow() {
                    tracing::info!(lease, "etcd lease kept again");
                }
                let _ = alive.send(true);
            }
            Ok(_) => {
                // The lease expired while etcd was away: the keys are gone.
                tracing::error!(lease, "etcd lease lost; this node is no longer registered");
                let _ = alive.send(false);
                return;
            }
            Err(e) => tracing::warn!(lease, error = %e, "etcd keep-alive failed; retrying"),
        }
    }
}

/// The live nodes of a role, followed as they join and leave.
#[derive(Clone)]
pub struct Members {
    rx: watch::Receiver<Vec<NodeInfo>>,
}

impl Members {
    /// The nodes now, by node name.
    pub fn now(&self) -> Vec<NodeInfo> {
        self.rx.borrow().clone()
    }

    /// Waits for the next change.
    pub async fn changed(&mut self) -> Option<Vec<NodeInfo>> {
        self.rx.changed().await.ok()?;
        Some(self.now())
    }
}

/// Follows the nodes of `role` until `stop`: a full read, then a watch from
/// the next revision; after any error, again from a full read.
pub fn watch_role(
    etcd: Etcd,
    prefix: &str,
    role: &str,
    stop: CancellationToken,
) -> (Members, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Vec::new());
    let dir = format!("{prefix}nodes/{role}/");
    let task = tokio::spawn(async move {
        loop {
            let mut nodes: BTreeMap<String, NodeInfo> = BTreeMap::new();
            let result = async {
                let (kvs, revision) = etcd.range_prefix(&dir).await?;
                for (key, value) in kvs {
                    if let Ok(info) = serde_json::from_str::<NodeInfo>(&value) {
                        nodes.insert(key, info);
                    }
                }
                tx.send_replace(nodes.values().cloned().collect());
                let mut apply = |key: String, value: Option<String>| {
                    match value.and_then(|v| serde_json::from_str::<NodeInfo>(&v).ok()) {
                        Some(info) => nodes.insert(key, info),
                        None => nodes.remove(&key),
                    };
                    tx.send_replace(nodes.values().cloned().collect());
                };
                etcd.watch_prefix(&dir, revision + 1, &mut apply, &stop)
                    .await
            }
            .await;
            if stop.is_cancelled() {
                return;
            }
            match result {
                Err(DiscoveryError::Idle) => {
                    tracing::debug!(role = %dir, "etcd watch quiet; reading again")
                }
                Err(e) => {
                    tracing::warn!(error = %e, role = %dir, "etcd watch failed; reading again")
                }
                Ok(()) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
    (Members { rx }, task)
}

/// A private etcd for tests: free ports, a temp data dir, killed on drop.
#[cfg(any(test, feature = "test-util"))]
pub mod testing {
    use std::time::Duration;

    use super::Etcd;

    pub struct EtcdServer {
        child: Option<std::process::Child>,
        pub url: String,
        args: Vec<String>,
        _dir: tempfile::TempDir,
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    impl EtcdServer {
        /// Starts one; a missing `etcd` binary fails the test, saying what
        /// to install (a test never passes without having run).
        pub async fn start() -> Option<EtcdServer> {
            let dir = tempfile::tempdir().expect("tempdir");
            let (client, peer) = (free_port(), free_port());
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let args = vec![
                "--name=t".to_string(),
                format!("--data-dir={}", dir.path().join("etcd").display()),
                format!("--listen-client-urls={url}"),
                format!("--advertise-client-urls={url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=t={peer_url}"),
            ];
            let mut server = EtcdServer {
                child: None,
                url,
                args,
                _dir: dir,
            };
            match server.spawn().await {
                Ok(()) => Some(server),
                Err(e) => panic!(
                    "cannot start etcd ({e}): install Debian's etcd-server, or run scripts/test, which does"
                ),
            }
        }

        async fn spawn(&mut self) -> Result<(), String> {
            let child = std::process::Command::new("etcd")
                .args(&self.args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?;
            self.child = Some(child);
            let client = Etcd::new(&self.url, Duration::from_secs(2)).map_err(|e| e.to_string())?;
            for _ in 0..200 {
                if client.status().await.is_ok() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err("etcd did not answer in time".into())
        }

        /// Kills it (as a crash would; its data dir stays).
        pub fn stop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        /// Starts it again on the same ports and data.
        pub async fn restart(&mut self) {
            self.stop();
            self.spawn().await.expect("etcd restarts");
        }
    }

    impl Drop for EtcdServer {
        fn drop(&mut self) {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::EtcdServer;
    use super::*;

    async fn wait_for(members: &mut Members, want: impl Fn(&[NodeInfo]) -> bool) -> Vec<NodeInfo> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = members.now();
            if want(&now) {
                return now;
            }
            tokio::time::timeout_at(deadline, members.changed())
                .await
                .expect("membership changed in time");
        }
    }

    #[tokio::test]
    async fn nodes_register_with_distinct_workers_and_are_followed_until_they_leave() {
        let Some(server) = EtcdServer::start().await else {
            return;
        };
        let etcd = Etcd::new(&server.url, Duration::from_secs(2)).expect("client");
        let stop = CancellationToken::new();
        let (mut members, watcher) = watch_role(etcd.clone(), "natter/", "logic", stop.clone());
        let ttl = Duration::from_secs(2);
        let a = register(&etcd, "natter/", "logic", "a", "10.0.0.1:1", ttl)
            .await
            .expect("a");
        // Same hash start: the second one takes the next free worker.
        let b = register(&etcd, "natter/", "logic", "a2", "10.0.0.2:1", ttl)
            .await
            .expect("b");
        let _other = register(&etcd, "natter/", "comet", "c", "10.0.0.3:1", ttl)
            .await
            .expect("c");
        assert_ne!(a.info().worker, b.info().worker);
        let both = wait_for(&mut members, |n| n.len() == 2).await;
        assert!(both.iter().all(|n| n.role == "logic"), "{both:?}");
        // Keep-alives hold the keys past the TTL.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(members.now().len(), 2);
        assert!(a.alive());
        // A graceful stop removes the key at once.
        a.close().await;
        let left = wait_for(&mut members, |n| n.len() == 1).await;
        assert_eq!(left[0].node, "a2");
        // A crash: no more keep-alives, and the key expires with the lease.
        b.abandon().await;
        wait_for(&mut members, |n| n.is_empty()).await;
        let (workers, _) = etcd.range_prefix("natter/workers/").await.expect("range");
        assert_eq!(workers.len(), 1, "only the comet's worker id is still held");
        stop.cancel();
        watcher.await.expect("watcher stops");
    }

    #[tokio::test]
    async fn an_unreachable_etcd_is_an_error_in_time() {
        let etcd = Etcd::new("http://127.0.0.1:1", Duration::from_millis(300)).expect("client");
        let started = std::time::Instant::now();
        assert!(etcd.status().await.is_err());
        assert!(register(
            &etcd,
            "natter/",
            "logic",
            "x",
            "a:1",
            Duration::from_secs(5)
        )
        .await
        .is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn prefix_ends_cover_the_prefix() {
        assert_eq!(B64.decode(prefix_end("ab")).expect("b64"), b"ac");
        assert_eq!(B64.decode(prefix_end("a\u{7f}")).expect("b64"), b"a\x80");
    }
}
