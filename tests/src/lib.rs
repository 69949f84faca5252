//! Helpers for natter's end-to-end tests: a real embedded server on port 0
//! with a fresh data dir, and clients that talk to it as applications do.
//! Set `TEST_LOG=debug` to see the server's logs.

use std::net::SocketAddr;
use std::time::Duration;

use natter::{Role, Server};
use natter_client::raw::{Connection, Incoming};
use natter_client::{Client, ClientConfig, Event, Events};
use natter_node::Config;
use natter_proto::msg::{AuthRequest, Message};
use natter_proto::{Frame, Op, UserId};
use natter_roles::Tokens;
use tempfile::TempDir;

/// The cluster secret (`rpc.secret`) of every distributed role a test starts
/// (unless its `tune` sets another).
pub const RPC_SECRET: &str = "the cluster secret of the test nodes, 32+ bytes";

/// The test user numbered `n`: the user id `u{n}`.
pub fn u(n: u64) -> UserId {
    UserId::parse(&format!("u{n}")).expect("a valid user id")
}

/// The wire form (a string) of the test users numbered `numbers`.
pub fn ids(numbers: &[u64]) -> Vec<String> {
    numbers.iter().map(|&n| u(n).to_string()).collect()
}

/// Whom a test acts as: a number `n` is the user `u{n}`; a string is
/// itself (it must be a valid user id).
pub trait AsUser {
    fn user(&self) -> UserId;
}

impl AsUser for u64 {
    fn user(&self) -> UserId {
        u(*self)
    }
}

impl AsUser for i32 {
    fn user(&self) -> UserId {
        u(u64::try_from(*self).expect("a non-negative user number"))
    }
}

impl AsUser for &str {
    fn user(&self) -> UserId {
        UserId::parse(self).expect("a valid user id")
    }
}

impl AsUser for UserId {
    fn user(&self) -> UserId {
        self.clone()
    }
}

impl AsUser for &UserId {
    fn user(&self) -> UserId {
        (*self).clone()
    }
}

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(10);

fn init_logging() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = natter_node::telemetry::init_logging(&natter_node::config::LogConfig {
            format: "text".into(),
            filter,
        });
    }
}

/// A running server and its data dir.
pub struct TestServer {
    server: Option<Server>,
    role: Role,
    config: Config,
    pub addr: SocketAddr,
    /// The gRPC address of a distributed role.
    pub rpc_addr: Option<SocketAddr>,
    /// The admin API's address (`serve` and `logic`).
    pub admin_addr: Option<SocketAddr>,
    tokens: Tokens,
    // Dropped last: removes the data dir.
    _dir: TempDir,
}

impl TestServer {
    /// Starts a server on 127.0.0.1:0 with a fresh data dir; `tune` adjusts the config.
    pub async fn start(tune: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_role(Role::Serve, tune).await
    }

    /// Starts one role (its gRPC listener on port 0 too).
    pub async fn start_role(role: Role, tune: impl FnOnce(&mut Config)) -> TestServer {
        init_logging();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        // fsync is not what these tests are about; the crash test turns it on.
        config.store.synchronous = false;
        // Nor are rate limits, except where a test sets them.
        config.limits.messages_per_sec = 1_000_000.0;
        config.limits.message_burst = 1_000_000;
        config.limits.http_requests_per_sec = 1_000_000.0;
        config.limits.http_request_burst = 1_000_000;
        config.groups.creates_per_hour = 1_000_000;
        config.groups.invites_per_hour = 1_000_000;
        config.groups.max_owned = 1_000_000;
        config.rpc.listen = "127.0.0.1:0".parse().expect("addr");
        config.rpc.secret = RPC_SECRET.into();
        config.admin.listen = "127.0.0.1:0".parse().expect("addr");
        tune(&mut config);
        let server = Server::start_role(config.clone(), role)
            .await
            .expect("server starts");
        let rpc_addr = server.rpc_addr();
        let admin_addr = server.admin_addr();
        let addr = server.addr();
        let tokens = Tokens::new(config.secret().expect("secret"));
        TestServer {
            server: Some(server),
            role,
            config,
            addr,
            rpc_addr,
            admin_addr,
            tokens,
            _dir: dir,
        }
    }

    pub fn token(&self, uid: impl AsUser, device: &str) -> String {
        self.tokens.mint(&uid.user(), device, 3600).expect("token")
    }

    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// The server's token secret.
    pub fn tokens_secret(&self) -> Vec<u8> {
        self.config.secret().expect("secret")
    }

    pub fn server(&self) -> String {
        self.addr.to_string()
    }

    pub fn client_config(&self, uid: impl AsUser, device: &str) -> ClientConfig {
        ClientConfig::new(self.server(), self.token(uid, device))
    }

    /// A connected SDK client.
    pub async fn client(&self, uid: impl AsUser, device: &str) -> (Client, Events) {
        let (client, mut events) = Client::connect(self.client_config(uid, device))
            .await
            .expect("client connects");
        // Wait for the connect-time sync to finish so tests start from a quiet state.
        client.sync().await.expect("initial sync");
        assert!(matches!(events.next().await, Some(Event::Connected { .. })));
        (client, events)
    }

    /// A raw frame connection, authenticated as `uid`/`device`.
    pub async fn raw(&self, uid: impl AsUser, device: &str) -> Connection {
        let mut conn = Connection::connect(&self.server(), None)
            .await
            .expect("connects");
        let auth = AuthRequest {
            token: self.token(uid, device),
            client: "raw".into(),
            device: String::new(),
        };
        conn.send(&Frame::new(Op::Auth, 1, 0, &auth))
            .await
            .expect("auth sent");
        let frame = next_frame(&mut conn).await;
        assert_eq!(frame.op, Op::AuthReply, "auth accepted");
        conn
    }

    /// Stops gracefully and starts again on the same data dir and port 0.
    pub async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.expect("clean stop");
        }
        let server = Server::start_role(self.config.clone(), self.role)
            .await
            .expect("restarts");
        self.addr = server.addr();
        self.admin_addr = server.admin_addr();
        self.server = Some(server);
    }

    /// Stops gracefully.
    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.expect("clean stop");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The admin API's URL of `path`.
    pub fn admin_url(&self, path: &str) -> String {
        let addr = self.admin_addr.expect("this role serves the admin API");
        format!("http://{addr}{path}")
    }

    /// The admin key: the configured one, or the data dir's.
    pub fn admin_key(&self) -> String {
        String::from_utf8(self.config.admin_key().expect("admin key")).expect("a UTF-8 key")
    }

    /// POSTs `body` to the admin API's `path` with the key; the status and
    /// the JSON body.
    pub async fn admin_post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .post(self.admin_url(path))
            .bearer_auth(self.admin_key())
            .json(&body)
            .send()
            .await
            .expect("admin request");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    /// A series' value in the server's metrics text (0 when absent).
    pub async fn metric<T: std::str::FromStr + Default>(&self, series: &str) -> T {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_default()
    }

    /// GETs `path` as `uid`/`device`; the status and the JSON body.
    pub async fn get_json(
        &self,
        path: &str,
        uid: impl AsUser,
        device: &str,
    ) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .get(self.url(path))
            .bearer_auth(self.token(uid, device))
            .send()
            .await
            .expect("HTTP request");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }
}

/// The next frame from a raw connection, failing the test on anything else.
pub async fn next_frame(conn: &mut Connection) -> Frame {
    match tokio::time::timeout(PATIENCE, conn.recv()).await {
        Ok(Ok(Some(Incoming::Frame(frame)))) => frame,
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// The next frame that is not a heartbeat reply or push.
pub async fn next_reply(conn: &mut Connection) -> Frame {
    loop {
        let frame = next_frame(conn).await;
        if !matches!(frame.op, Op::HeartbeatReply | Op::Push) {
            return frame;
        }
    }
}

/// Reads until the server closes; returns the `Disconnect` code seen (if
/// any) and the WebSocket close code.
pub async fn expect_close(conn: &mut Connection) -> (Option<u32>, u16) {
    let mut disconnect = None;
    loop {
        match tokio::time::timeout(PATIENCE, conn.recv()).await {
            Ok(Ok(Some(Incoming::Frame(frame)))) if frame.op == Op::Disconnect => {
                let d: natter_proto::msg::Disconnect = frame.message().expect("disconnect body");
                disconnect = Some(d.code);
            }
            Ok(Ok(Some(Incoming::Frame(_)))) | Ok(Ok(Some(Incoming::BadFrame(_)))) => continue,
            Ok(Ok(Some(Incoming::Close { code, .. }))) => return (disconnect, code),
            Ok(Ok(None)) | Ok(Err(_)) => return (disconnect, 1006),
            Err(_) => panic!("server did not close in time"),
        }
    }
}

/// The next chat message event.
pub async fn next_message(events: &mut Events) -> Message {
    loop {
        match tokio::time::timeout(PATIENCE, events.next()).await {
            Ok(Some(Event::Message(m))) => return m,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("event stream ended"),
            Err(_) => panic!("no message within {PATIENCE:?}"),
        }
    }
}

/// Asserts no chat message arrives within `wait`.
pub async fn no_message(events: &mut Events, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => return,
            Ok(Some(Event::Message(m))) => panic!("unexpected message {m:?}"),
            Ok(Some(_)) => continue,
            Ok(None) => return,
        }
    }
}

/// The text of a text message.
pub fn text_of(m: &Message) -> &str {
    match m.body.as_ref().and_then(|b| b.content.as_ref()) {
        Some(natter_proto::msg::Content::Text(t)) => &t.text,
        _ => "",
    }
}

/// A private `redis-server` on a free port, for tests that stop and start
/// it. A missing binary fails the test, saying what to install: a test
/// never passes without having run.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = RedisServer { child: None, port };
        match redis.spawn().await {
            Ok(()) => redis,
            Err(e) => panic!(
                "cannot start redis-server ({e}): install Debian's redis-server, or run scripts/test, which does"
            ),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        self.child = Some(child);
        // Ready when it accepts connections.
        let deadline = std::time::Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if std::time::Instant::now() > deadline {
                return Err("redis-server did not listen in time".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Kills it (its data is gone: it keeps nothing on disk).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await.expect("redis-server restarts");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
