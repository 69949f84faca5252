//! The sessions directory: which gateway node and connection each online
//! device of a user is on. Embedded: [`MemoryDirectory`]; distributed:
//! [`crate::redis_sessions::RedisDirectory`] (entries with a TTL that
//! gateways renew).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use async_trait::async_trait;
use natter_proto::user::shard_of;
use natter_proto::UserId;

pub use natter_roles::{Route, Session};

#[derive(Debug, thiserror::Error)]
#[error("sessions directory unavailable: {0}")]
pub struct DirectoryError(pub String);

#[async_trait]
pub trait SessionDirectory: Send + Sync + 'static {
    /// Records `session`; returns the session it replaced for the same
    /// (uid, device) on another connection, which the caller closes.
    async fn register(&self, session: Session) -> Result<Option<Session>, DirectoryError>;
    /// Forgets `session`, if it is still the registered one for its device.
    async fn unregister(&self, session: &Session) -> Result<(), DirectoryError>;
    /// Every online device of `uid`.
    async fn lookup(&self, uid: &UserId) -> Result<Vec<Session>, DirectoryError>;
    /// Extends the lifetime of `sessions` (a gateway's live connections);
    /// entries that are never renewed expire. The in-memory directory needs
    /// none: it dies with its process.
    async fn renew(&self, sessions: &[Session]) -> Result<(), DirectoryError> {
        let _ = sessions;
        Ok(())
    }
    /// Every online device of each of `uids` (a group's members): one call,
    /// which a networked directory answers in one round trip.
    async fn lookup_many(&self, uids: &[UserId]) -> Result<Vec<Session>, DirectoryError> {
        let mut out = Vec::new();
        for uid in uids {
            out.extend(self.lookup(uid).await?);
        }
        Ok(out)
    }
    /// A number that changes whenever an entry changes, so that routes read
    /// under one version can be reused while it holds; `None` (the
    /// default) when the directory cannot tell (entries change elsewhere,
    /// or expire).
    fn version(&self) -> Option<u64> {
        None
    }
    /// The routes of every online device of each of `uids`, like
    /// [`SessionDirectory::lookup_many`] without the device names.
    async fn routes_of(&self, uids: &[UserId]) -> Result<Vec<Route>, DirectoryError> {
        let sessions = self.lookup_many(uids).await?;
        Ok(sessions.into_iter().map(Route::from).collect())
    }
}

const SHARDS: usize = 64;

/// The in-process directory, sharded by user so lookups rarely contend.
pub struct MemoryDirectory {
    shards: Vec<RwLock<HashMap<UserId, Vec<Session>>>>,
    /// Bumped by every change, under the changed shard's lock.
    version: AtomicU64,
}

impl Default for MemoryDirectory {
    fn default() -> Self {
        MemoryDirectory {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            version: AtomicU64::new(0),
        }
    }
}

impl MemoryDirectory {
    fn shard(&self, uid: &UserId) -> &RwLock<HashMap<UserId, Vec<Session>>> {
        &self.shards[shard_of(uid, SHARDS)]
    }
}

#[async_trait]
impl SessionDirectory for MemoryDirectory {
    async fn register(&self, session: Session) -> Result<Option<Session>, DirectoryError> {
        let mut map = self
            .shard(&session.uid)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let devices = map.entry(session.uid.clone()).or_default();
        let replaced = match devices.iter().position(|s| s.device == session.device) {
            Some(i) => Some(std::mem::replace(&mut devices[i], session)),
            None => {
                devices.push(session);
                None
            }
        };
        self.version.fetch_add(1, Ordering::Release);
        Ok(replaced)
    }

    async fn unregister(&self, session: &Session) -> Result<(), DirectoryError> {
        let mut map = self
            .shard(&session.uid)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(devices) = map.get_mut(&session.uid) {
            devices.retain(|s| {
                !(s.device == session.device && s.node == session.node && s.conn == session.conn)
            });
            if devices.is_empty() {
                map.remove(&session.uid);
            }
            self.version.fetch_add(1, Ordering::Release);
        }
        Ok(())
    }

    async fn lookup(&self, uid: &UserId) -> Result<Vec<Session>, DirectoryError> {
        let map = self.shard(uid).read().unwrap_or_else(|e| e.into_inner());
        Ok(map.get(uid).cloned().unwrap_or_default())
    }

    async fn lookup_many(&self, uids: &[UserId]) -> Result<Vec<Session>, DirectoryError> {
        let mut out = Vec::new();
        for uid in uids {
            let map = self.shard(uid).read().unwrap_or_else(|e| e.into_inner());
            if let Some(sessions) = map.get(uid) {
                out.extend(sessions.iter().cloned());
            }
        }
        Ok(out)
    }

    fn version(&self) -> Option<u64> {
        Some(self.version.load(Ordering::Acquire))
    }

    async fn routes_of(&self, uids: &[UserId]) -> Result<Vec<Route>, DirectoryError> {
        let mut out = Vec::with_capacity(uids.len());
        for uid in uids {
            let map = self.shard(uid).read().unwrap_or_else(|e| e.into_inner());
            if let Some(sessions) = map.get(uid) {
                out.extend(sessions.iter().map(|s| Route {
                    uid: uid.clone(),
                    node: s.node.clone(),
                    conn: s.conn,
                }));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    fn u(n: u64) -> UserId {
        UserId::parse(&format!("u{n}")).expect("user id")
    }

    fn s(uid: u64, device: &str, conn: u64) -> Session {
        Session {
            uid: u(uid),
            device: device.into(),
            node: Arc::from("n1"),
            conn,
        }
    }

    #[tokio::test]
    async fn register_replace_and_unregister() {
        let dir = MemoryDirectory::default();
        assert_eq!(dir.register(s(1, "phone", 1)).await.expect("ok"), None);
        assert_eq!(dir.register(s(1, "laptop", 2)).await.expect("ok"), None);
        assert_eq!(dir.lookup(&u(1)).await.expect("ok").len(), 2);
        // The same device again replaces the older connection.
        assert_eq!(
            dir.register(s(1, "phone", 3)).await.expect("ok"),
            Some(s(1, "phone", 1))
        );
        // The replaced connection's late unregister does not remove the new one.
        dir.unregister(&s(1, "phone", 1)).await.expect("ok");
        let mut conns: Vec<u64> = dir
            .lookup(&u(1))
            .await
            .expect("ok")
            .iter()
            .map(|s| s.conn)
            .collect();
        conns.sort();
        assert_eq!(conns, vec![2, 3]);
        dir.unregister(&s(1, "phone", 3)).await.expect("ok");
        dir.unregister(&s(1, "laptop", 2)).await.expect("ok");
        assert!(dir.lookup(&u(1)).await.expect("ok").is_empty());
        assert!(dir.lookup(&u(2)).await.expect("ok").is_empty());
    }
}
