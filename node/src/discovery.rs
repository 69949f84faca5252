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
//! With etcd's authentication on, the node logs in with its user and
//! password (`POST /v3/auth/authenticate`) and sends the token it gets in
//! the `Authorization` header of every call; when etcd no longer knows the
//! token (it expired, etcd restarted), the node logs in again and retries
//! once.
//!
//! Registrations can be sealed ([`Etcd::with_seal`]): a node writes an
//! HMAC of its role, name, address and worker id under a key derived from
//! the cluster secret, and [`watch_role`] ignores entries whose seal does
//! not verify. Whoever can write to etcd but does not hold the secret then
//! cannot pose as a logic node (which gateways would send users' tokens
//! to) or as a gateway.
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
    /// HMAC-SHA256 (hex) of the fields above under the cluster's sealing
    /// key; empty when the cluster does not seal its registrations.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub seal: String,
}

/// The key registrations are sealed with.
type SealKey = [u8; 32];

fn seal_of(key: &SealKey, info: &NodeInfo) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac as _;
    let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    // JSON of a tuple: no two field lists give the same bytes.
    let fields = json!([info.role, info.node, info.addr, info.worker]).to_string();
    mac.update(fields.as_bytes());
    mac
}

/// An etcd client over the JSON gateway.
#[derive(Clone)]
pub struct Etcd {
    http: reqwest::Client,
    base: String,
    login: Option<std::sync::Arc<Login>>,
    seal: Option<SealKey>,
}

/// An etcd user's name and password, and the token of its last login.
struct Login {
    name: String,
    password: String,
    token: std::sync::Mutex<Option<String>>,
}

/// Whether etcd refused a call for its token (expired, or unknown after a
/// restart): worth a new login.
fn token_refused(e: &DiscoveryError) -> bool {
    match e {
        DiscoveryError::Status { status, body } => *status == 401 || body.contains("auth token"),
        _ => false,
    }
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
            login: None,
            seal: None,
        })
    }

    /// Seals this node's registration, and follows only sealed ones, with a
    /// key derived from `secret` (the cluster secret).
    pub fn with_seal(mut self, secret: &[u8]) -> Etcd {
        use hmac::Mac as _;
        let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(b"natter registration v1");
        self.seal = Some(mac.finalize().into_bytes().into());
        self
    }

    /// Whether a registration read from etcd is to be followed.
    fn accepts(&self, info: &NodeInfo) -> bool {
        use hmac::Mac as _;
        let Some(key) = &self.seal else {
            return true;
        };
        let tag = (0..info.seal.len())
            .step_by(2)
            .map(|i| {
                info.seal
                    .get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>();
        match tag {
            Some(tag) => seal_of(key, info).verify_slice(&tag).is_ok(),
            None => false,
        }
    }

    /// Logs in as `name` (etcd's authentication on); an empty name: no login.
    pub fn with_credentials(mut self, name: &str, password: &str) -> Etcd {
        self.login = (!name.is_empty()).then(|| {
            std::sync::Arc::new(Login {
                name: name.to_string(),
                password: password.to_string(),
                token: std::sync::Mutex::new(None),
            })
        });
        self
    }

    /// The token to send: the last login's, or a new login's when there is
    /// none or `fresh`; `None` without credentials.
    async fn token(&self, fresh: bool) -> Result<Option<String>, DiscoveryError> {
        let Some(login) = &self.login else {
            return Ok(None);
        };
        if !fresh {
            if let Some(token) = login
                .token
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return Ok(Some(token));
            }
        }
        let answer = self
            .post(
                "/v3/auth/authenticate",
                &json!({"name": login.name, "password": login.password}),
                None,
            )
            .await?;
        let token = answer["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| DiscoveryError::Answer("etcd login answered no token".into()))?
            .to_string();
        *login.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        Ok(Some(token))
    }

    async fn call(&self, path: &str, body: Value) -> Result<Value, DiscoveryError> {
        let token = self.token(false).await?;
        match self.post(path, &body, token.as_deref()).await {
            Err(e) if self.login.is_some() && token_refused(&e) => {
                tracing::debug!(error = %e, "etcd refused the token; logging in again");
                let token = self.token(true).await?;
                self.post(path, &body, token.as_deref()).await
            }
            other => other,
        }
    }

    async fn post(
        &self,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<Value, DiscoveryError> {
        let mut request = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(token) = token {
            request = request.header(reqwest::header::AUTHORIZATION, token);
        }
        let response = request
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
        let mut request = http.post(format!("{}/v3/watch", self.base));
        // A refused token shows in the full read that precedes every watch,
        // which logs in again.
        if let Some(token) = self.token(false).await? {
            request = request.header(reqwest::header::AUTHORIZATION, token);
        }
        let request = request.json(&json!({
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
    let mut info = NodeInfo {
        role: role.to_string(),
        node: node.to_string(),
        addr: addr.to_string(),
        worker,
        seal: String::new(),
    };
    if let Some(key) = &etcd.seal {
        use hmac::Mac as _;
        let tag = seal_of(key, &info).finalize().into_bytes();
        info.seal = tag.iter().map(|b| format!("{b:02x}")).collect();
    }
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
                // Entries that do not parse, or whose seal does not verify,
                // are not nodes of this cluster.
                let follow = |key: &str, value: &str| {
                    let info = serde_json::from_str::<NodeInfo>(value).ok()?;
                    if etcd.accepts(&info) {
                        Some(info)
                    } else {
                        tracing::warn!(%key, addr = %info.addr, "etcd entry without a valid seal ignored");
                        None
                    }
                };
                let (kvs, revision) = etcd.range_prefix(&dir).await?;
                for (key, value) in kvs {
                    if let Some(info) = follow(&key, &value) {
                        nodes.insert(key, info);
                    }
                }
                tx.send_replace(nodes.values().cloned().collect());
                let mut apply = |key: String, value: Option<String>| {
                    match value.and_then(|v| follow(&key, &v)) {
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
        pub async fn start() -> EtcdServer {
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
                Ok(()) => server,
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

        /// Turns etcd's authentication on, with a `root` user (password
        /// `root_password`) and a user `name` who may read and write the
        /// keys under `prefix` only.
        pub async fn enable_auth(&self, name: &str, password: &str, prefix: &str) {
            let etcd = Etcd::new(&self.url, Duration::from_secs(2)).expect("client");
            let calls = [
                ("/v3/auth/role/add", serde_json::json!({"name": "root"})),
                (
                    "/v3/auth/user/add",
                    serde_json::json!({"name": "root", "password": "root password"}),
                ),
                (
                    "/v3/auth/user/grant",
                    serde_json::json!({"user": "root", "role": "root"}),
                ),
                ("/v3/auth/role/add", serde_json::json!({"name": name})),
                (
                    "/v3/auth/role/grant",
                    serde_json::json!({"name": name, "perm": {
                        "permType": "READWRITE",
                        "key": super::b64(prefix),
                        "range_end": super::prefix_end(prefix),
                    }}),
                ),
                (
                    "/v3/auth/user/add",
                    serde_json::json!({"name": name, "password": password}),
                ),
                (
                    "/v3/auth/user/grant",
                    serde_json::json!({"user": name, "role": name}),
                ),
                ("/v3/auth/enable", serde_json::json!({})),
            ];
            for (path, body) in calls {
                etcd.call(path, body)
                    .await
                    .unwrap_or_else(|e| panic!("{path}: {e}"));
            }
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
        let server = EtcdServer::start().await;
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
    async fn with_etcd_auth_on_the_configured_user_registers_and_watches_and_logs_in_again() {
        let server = EtcdServer::start().await;
        server
            .enable_auth("natter", "the natter password", "natter/")
            .await;
        let ttl = Duration::from_secs(5);
        let anonymous = Etcd::new(&server.url, Duration::from_secs(2)).expect("client");
        let refused = register(&anonymous, "natter/", "logic", "a", "10.0.0.1:1", ttl).await;
        assert!(refused.is_err(), "no credentials: refused");
        let wrong = Etcd::new(&server.url, Duration::from_secs(2))
            .expect("client")
            .with_credentials("natter", "not the password");
        assert!(wrong.status().await.is_err(), "a wrong password: refused");
        let etcd = Etcd::new(&server.url, Duration::from_secs(2))
            .expect("client")
            .with_credentials("natter", "the natter password");
        let stop = CancellationToken::new();
        let (mut members, watcher) = watch_role(etcd.clone(), "natter/", "logic", stop.clone());
        let a = register(&etcd, "natter/", "logic", "a", "10.0.0.1:1", ttl)
            .await
            .expect("registered with credentials");
        wait_for(&mut members, |n| n.len() == 1).await;
        // The role is confined to its prefix.
        assert!(etcd.put("elsewhere/x", "1", 0).await.is_err());
        // A token etcd no longer knows (expired, etcd restarted): log in again.
        let login = etcd.login.as_ref().expect("credentials");
        *login.token.lock().expect("lock") = Some("no.such.token".into());
        let b = register(&etcd, "natter/", "logic", "b", "10.0.0.2:1", ttl)
            .await
            .expect("logged in again");
        wait_for(&mut members, |n| n.len() == 2).await;
        a.close().await;
        b.close().await;
        wait_for(&mut members, |n| n.is_empty()).await;
        stop.cancel();
        watcher.await.expect("watcher stops");
    }

    #[tokio::test]
    async fn with_sealed_registrations_an_entry_written_without_the_key_is_not_followed() {
        let server = EtcdServer::start().await;
        let secret = b"the cluster secret, at least 32 bytes long";
        let etcd = Etcd::new(&server.url, Duration::from_secs(2))
            .expect("client")
            .with_seal(secret);
        let stop = CancellationToken::new();
        let (mut members, watcher) = watch_role(etcd.clone(), "natter/", "logic", stop.clone());
        let ttl = Duration::from_secs(5);
        // Anyone who can write to etcd, without the secret: an unsealed
        // entry, one sealed with another key, and a genuine entry moved to
        // another address.
        let plain = Etcd::new(&server.url, Duration::from_secs(2)).expect("client");
        let _fake = register(&plain, "natter/", "logic", "fake", "10.6.6.6:1", ttl)
            .await
            .expect("written");
        let other = plain
            .clone()
            .with_seal(b"another secret of at least 32 bytes!!");
        let _other = register(&other, "natter/", "logic", "other", "10.6.6.7:1", ttl)
            .await
            .expect("written");
        let real = register(&etcd, "natter/", "logic", "real", "10.0.0.1:1", ttl)
            .await
            .expect("registered");
        let lease = plain.grant(ttl).await.expect("lease");
        let mut moved = real.info().clone();
        moved.node = "moved".into();
        moved.addr = "10.6.6.8:1".into();
        plain
            .put(
                "natter/nodes/logic/moved",
                &serde_json::to_string(&moved).expect("json"),
                lease,
            )
            .await
            .expect("written");
        let seen = wait_for(&mut members, |n| !n.is_empty()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = members.now();
        assert_eq!(now.len(), 1, "{now:?} (first seen: {seen:?})");
        assert_eq!(now[0].addr, "10.0.0.1:1");
        // Without a seal key, a node follows every entry (and its own is unsealed).
        let (mut all, all_watcher) = watch_role(plain.clone(), "natter/", "logic", stop.clone());
        wait_for(&mut all, |n| n.len() == 4).await;
        stop.cancel();
        watcher.await.expect("watcher stops");
        all_watcher.await.expect("watcher stops");
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
