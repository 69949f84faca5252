//! The sessions directory in Redis, for the distributed shape: every logic
//! node sees every gateway's sessions, and a crashed gateway's sessions
//! expire on their own.
//!
//! Keys (with the configured prefix `P`; `{uid}` is a hash tag, so one
//! user's keys stay in one Redis Cluster slot):
//!
//! - `P{uid}:d:DEVICE` → `NODE|CONN`, with a TTL: one online device.
//! - `P{uid}:devices` → the set of the user's devices, with the same TTL.
//!
//! Gateways renew their sessions' TTLs every third of it ([`renew`]);
//! disconnects take them out at once, leaving the entry `gone` for one TTL
//! so that a renewal already on its way cannot write it back. A look-up of many users (a group's
//! members) is two pipelined round trips, whatever their number.
//!
//! [`renew`]: SessionDirectory::renew

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use natter_proto::UserId;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use crate::sessions::{DirectoryError, Session, SessionDirectory};

/// Keys renewed or looked up per pipeline.
const CHUNK: usize = 1000;

/// Renews a device's entry, writing it again if it is missing (Redis was
/// restarted or flushed) but never over a newer connection's entry nor over
/// the `gone` left by the connection's own disconnect.
const RENEW: &str = r"
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
";

/// Takes out a device's entry only if it still names this connection (a
/// newer connection of the same device may have replaced it), leaving
/// `gone` in its place for one TTL: a renewal that read its sessions before
/// the disconnect finds it and writes nothing.
const UNREGISTER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'gone', 'PX', ARGV[3])
  redis.call('SREM', KEYS[2], ARGV[2])
end
return 1
";

pub struct RedisDirectory {
    conn: ConnectionManager,
    prefix: String,
    ttl_ms: u64,
    unregister: Script,
    renew: Script,
}

fn failed(e: redis::RedisError) -> DirectoryError {
    DirectoryError(e.to_string())
}

/// Where and as whom to connect: the URL, with `username` and `password`
/// in place of its own when given.
fn connection_info(
    url: &str,
    username: &str,
    password: &str,
) -> Result<redis::ConnectionInfo, DirectoryError> {
    use redis::IntoConnectionInfo as _;
    let info = url.into_connection_info().map_err(failed)?;
    let mut redis = info.redis_settings().clone();
    if !username.is_empty() {
        redis = redis.set_username(username);
    }
    if !password.is_empty() {
        redis = redis.set_password(password);
    }
    Ok(info.set_redis_settings(redis))
}

impl RedisDirectory {
    /// A directory on the Redis at `url`. Connects lazily and reconnects by
    /// itself; every command gives up after `timeout`. A non-empty
    /// `username` or `password` replaces the URL's (`redis://user:pass@…`).
    pub fn new(
        url: &str,
        username: &str,
        password: &str,
        prefix: &str,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<RedisDirectory, DirectoryError> {
        let client = Client::open(connection_info(url, username, password)?).map_err(failed)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(failed)?;
        Ok(RedisDirectory {
            conn,
            prefix: prefix.to_string(),
            ttl_ms: ttl.as_millis().max(1) as u64,
            unregister: Script::new(UNREGISTER),
            renew: Script::new(RENEW),
        })
    }

    fn device_key(&self, uid: &UserId, device: &str) -> String {
        format!("{}{{{uid}}}:d:{device}", self.prefix)
    }

    fn devices_key(&self, uid: &UserId) -> String {
        format!("{}{{{uid}}}:devices", self.prefix)
    }

    fn value(session: &Session) -> String {
        format!("{}|{}", session.node, session.conn)
    }

    /// The session an entry names; `None` for anything else (`gone`).
    fn parse(uid: &UserId, device: &str, value: &str) -> Option<Session> {
        let (node, conn) = value.rsplit_once('|')?;
        Some(Session {
            uid: uid.clone(),
            device: device.to_string(),
            node: Arc::from(node),
            conn: conn.parse().ok()?,
        })
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> Result<(), DirectoryError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(failed)
    }
}

#[async_trait]
impl SessionDirectory for RedisDirectory {
    async fn register(&self, session: Session) -> Result<Option<Session>, DirectoryError> {
        let mut conn = self.conn.clone();
        let (old,): (Option<String>,) = redis::pipe()
            .cmd("SET")
            .arg(self.device_key(&session.uid, &session.device))
            .arg(Self::value(&session))
            .arg("PX")
            .arg(self.ttl_ms)
            .arg("GET")
            .cmd("SADD")
            .arg(self.devices_key(&session.uid))
            .arg(&session.device)
            .ignore()
            .cmd("PEXPIRE")
            .arg(self.devices_key(&session.uid))
            .arg(self.ttl_ms)
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        Ok(old
            .and_then(|value| Self::parse(&session.uid, &session.device, &value))
            .filter(|old| *old != session))
    }

    async fn unregister(&self, session: &Session) -> Result<(), DirectoryError> {
        let mut conn = self.conn.clone();
        self.unregister
            .key(self.device_key(&session.uid, &session.device))
            .key(self.devices_key(&session.uid))
            .arg(Self::value(session))
            .arg(&session.device)
            .arg(self.ttl_ms)
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(failed)
    }

    async fn lookup(&self, uid: &UserId) -> Result<Vec<Session>, DirectoryError> {
        self.lookup_many(std::slice::from_ref(uid)).await
    }

    async fn lookup_many(&self, uids: &[UserId]) -> Result<Vec<Session>, DirectoryError> {
        let mut out = Vec::new();
        let mut conn = self.conn.clone();
        for chunk in uids.chunks(CHUNK) {
            // Round trip 1: each user's devices.
            let mut pipe = redis::pipe();
            for uid in chunk {
                pipe.cmd("SMEMBERS").arg(self.devices_key(uid));
            }
            let devices: Vec<Vec<String>> = pipe.query_async(&mut conn).await.map_err(failed)?;
            // Round trip 2: the entries of those devices (expired ones are nil).
            let mut pipe = redis::pipe();
            let mut asked = Vec::new();
            for (uid, devices) in chunk.iter().zip(devices) {
                if devices.is_empty() {
                    continue;
                }
                let cmd = pipe.cmd("MGET");
                for device in &devices {
                    cmd.arg(self.device_key(uid, device));
                }
                asked.push((uid, devices));
            }
            if asked.is_empty() {
                continue;
            }
            let values: Vec<Vec<Option<String>>> =
                pipe.query_async(&mut conn).await.map_err(failed)?;
            for ((uid, devices), values) in asked.into_iter().zip(values) {
                for (device, value) in devices.iter().zip(values) {
                    if let Some(session) = value.and_then(|v| Self::parse(uid, device, &v)) {
                        out.push(session);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn renew(&self, sessions: &[Session]) -> Result<(), DirectoryError> {
        let mut conn = self.conn.clone();
        // Loaded once per call; the pipeline then calls it by hash.
        self.renew
            .prepare_invoke()
            .load_async(&mut conn)
            .await
            .map_err(failed)?;
        for chunk in sessions.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            for s in chunk {
                pipe.cmd("EVALSHA")
                    .arg(self.renew.get_hash())
                    .arg(2)
                    .arg(self.device_key(&s.uid, &s.device))
                    .arg(self.devices_key(&s.uid))
                    .arg(Self::value(s))
                    .arg(&s.device)
                    .arg(self.ttl_ms)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await.map_err(failed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machine's Redis; a missing one fails the test, saying what to
    /// install (a test never passes without having run).
    async fn redis(prefix: &str, ttl: Duration) -> RedisDirectory {
        let url = std::env::var("NATTER_TEST_REDIS")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_string());
        let dir = RedisDirectory::new(&url, "", "", prefix, ttl, Duration::from_secs(2))
            .expect("valid URL");
        match dir.ping().await {
            Ok(()) => dir,
            Err(e) => panic!(
                "no Redis at {url} ({e}): install and start Debian's redis-server, or run scripts/test, which does"
            ),
        }
    }

    fn prefix() -> String {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("random");
        format!("natter-test:{}:", u64::from_le_bytes(bytes))
    }

    fn u(n: u64) -> UserId {
        UserId::parse(&format!("u{n}")).expect("user id")
    }

    fn s(uid: u64, device: &str, node: &str, conn: u64) -> Session {
        Session {
            uid: u(uid),
            device: device.into(),
            node: Arc::from(node),
            conn,
        }
    }

    #[tokio::test]
    async fn register_replace_lookup_and_unregister() {
        let dir = redis(&prefix(), Duration::from_secs(60)).await;
        assert_eq!(
            dir.register(s(1, "phone", "gw-a", 1)).await.expect("ok"),
            None
        );
        assert_eq!(
            dir.register(s(1, "laptop", "gw-b", 2)).await.expect("ok"),
            None
        );
        assert_eq!(
            dir.register(s(2, "phone", "gw-b", 3)).await.expect("ok"),
            None
        );
        let mut found = dir.lookup(&u(1)).await.expect("ok");
        found.sort_by_key(|s| s.conn);
        assert_eq!(
            found,
            vec![s(1, "phone", "gw-a", 1), s(1, "laptop", "gw-b", 2)]
        );
        // The same device again replaces the older connection, on any node.
        assert_eq!(
            dir.register(s(1, "phone", "gw-b", 9)).await.expect("ok"),
            Some(s(1, "phone", "gw-a", 1))
        );
        // Registering the same connection twice replaces nothing.
        assert_eq!(
            dir.register(s(1, "phone", "gw-b", 9)).await.expect("ok"),
            None
        );
        // The replaced connection's late unregister leaves the new one.
        dir.unregister(&s(1, "phone", "gw-a", 1)).await.expect("ok");
        let mut many = dir.lookup_many(&[u(1), u(2), u(3)]).await.expect("ok");
        many.sort_by_key(|s| s.conn);
        assert_eq!(
            many,
            vec![
                s(1, "laptop", "gw-b", 2),
                s(2, "phone", "gw-b", 3),
                s(1, "phone", "gw-b", 9)
            ]
        );
        dir.unregister(&s(1, "phone", "gw-b", 9)).await.expect("ok");
        dir.unregister(&s(1, "laptop", "gw-b", 2))
            .await
            .expect("ok");
        dir.unregister(&s(2, "phone", "gw-b", 3)).await.expect("ok");
        assert!(dir.lookup_many(&[u(1), u(2)]).await.expect("ok").is_empty());
    }

    #[tokio::test]
    async fn sessions_expire_unless_renewed() {
        let dir = redis(&prefix(), Duration::from_millis(400)).await;
        dir.register(s(7, "phone", "gw-a", 1)).await.expect("ok");
        dir.register(s(8, "phone", "gw-a", 2)).await.expect("ok");
        // Only user 7's gateway keeps renewing.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            dir.renew(&[s(7, "phone", "gw-a", 1)]).await.expect("ok");
        }
        let alive = dir.lookup_many(&[u(7), u(8)]).await.expect("ok");
        assert_eq!(
            alive,
            vec![s(7, "phone", "gw-a", 1)],
            "8 expired, 7 renewed"
        );
        // A renewal writes back an entry Redis lost (a restart, a flush),
        // but never over a newer connection of the same device.
        let mut raw = dir.conn.clone();
        redis::cmd("DEL")
            .arg(dir.device_key(&u(7), "phone"))
            .arg(dir.devices_key(&u(7)))
            .query_async::<i64>(&mut raw)
            .await
            .expect("del");
        assert!(dir.lookup(&u(7)).await.expect("ok").is_empty());
        dir.renew(&[s(7, "phone", "gw-a", 1)]).await.expect("ok");
        assert_eq!(
            dir.lookup(&u(7)).await.expect("ok"),
            vec![s(7, "phone", "gw-a", 1)]
        );
        dir.register(s(7, "phone", "gw-b", 5)).await.expect("ok");
        dir.renew(&[s(7, "phone", "gw-a", 1)]).await.expect("ok");
        assert_eq!(
            dir.lookup(&u(7)).await.expect("ok"),
            vec![s(7, "phone", "gw-b", 5)]
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            dir.lookup(&u(7)).await.expect("ok").is_empty(),
            "expires once renewals stop"
        );
    }

    #[tokio::test]
    async fn a_renewal_racing_a_disconnect_does_not_bring_the_session_back() {
        let dir = redis(&prefix(), Duration::from_secs(60)).await;
        let phone = s(7, "phone", "gw-a", 1);
        dir.register(phone.clone()).await.expect("ok");
        // The gateway read its sessions for a renewal; the device
        // disconnects before the renewal reaches Redis.
        dir.unregister(&phone).await.expect("ok");
        dir.renew(std::slice::from_ref(&phone)).await.expect("ok");
        assert!(
            dir.lookup(&u(7)).await.expect("ok").is_empty(),
            "stays offline"
        );
        // The device comes back: registered as usual, replacing nothing.
        let again = s(7, "phone", "gw-b", 2);
        assert_eq!(dir.register(again.clone()).await.expect("ok"), None);
        dir.renew(std::slice::from_ref(&again)).await.expect("ok");
        assert_eq!(dir.lookup(&u(7)).await.expect("ok"), vec![again]);
    }

    #[tokio::test]
    async fn a_dead_redis_is_an_error_not_a_hang() {
        // Nothing listens on port 1.
        let dir = RedisDirectory::new(
            "redis://127.0.0.1:1/0",
            "",
            "",
            "x:",
            Duration::from_secs(60),
            Duration::from_millis(200),
        )
        .expect("valid URL");
        let started = std::time::Instant::now();
        assert!(dir.lookup(&u(1)).await.is_err());
        assert!(dir.register(s(1, "phone", "gw", 1)).await.is_err());
        assert!(dir.ping().await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// A Redis of its own that requires a password, killed on drop.
    struct PrivateRedis {
        child: std::process::Child,
        url: String,
    }

    impl Drop for PrivateRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[tokio::test]
    async fn the_configured_password_is_used_and_a_missing_or_wrong_one_is_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--requirepass", "a redis password"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let child = child.unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}): install Debian's redis-server, or run scripts/test, which does")
        });
        let server = PrivateRedis {
            child,
            url: format!("redis://127.0.0.1:{port}/0"),
        };
        let open = |user: &str, password: &str| {
            RedisDirectory::new(
                &server.url,
                user,
                password,
                &prefix(),
                Duration::from_secs(60),
                Duration::from_secs(2),
            )
            .expect("valid URL")
        };
        let with_password = open("", "a redis password");
        let mut up = false;
        for _ in 0..100 {
            if with_password.ping().await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up, "Redis with requirepass answers the right password");
        with_password
            .register(s(1, "phone", "gw", 1))
            .await
            .expect("authenticated write");
        // Redis 6+ names requirepass's user `default`.
        open("default", "a redis password")
            .ping()
            .await
            .expect("user and password");
        assert!(open("", "").ping().await.is_err(), "no password");
        assert!(open("", "wrong").ping().await.is_err(), "wrong password");
        // The password may also come in the URL; the setting wins over it.
        let in_url = RedisDirectory::new(
            &server
                .url
                .replace("redis://", "redis://:a%20redis%20password@"),
            "",
            "",
            &prefix(),
            Duration::from_secs(60),
            Duration::from_secs(2),
        )
        .expect("valid URL");
        in_url.ping().await.expect("password in the URL");
    }
}
