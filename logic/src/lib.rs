//! The logic role: token checks, the sessions directory and the message
//! pipeline (check → dedupe → id → store → ack → route → push).
//!
//! Gateways call logic through [`LogicService`]; logic reaches gateways
//! through [`Gateway`]. Both are traits, so the pipeline does not know whether
//! it runs in one process or across machines. Logic holds no sockets and
//! knows no frame bytes beyond the protobuf bodies it fills in.

pub mod limit;
pub mod sessions;
pub mod token;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use natter_node::config::LimitsConfig;
use natter_node::ids::MidGenerator;
use natter_node::telemetry::register;
use natter_proto::msg::{MessageReply, SendMessage, SyncReply, SyncRequest};
use natter_proto::ErrorCode;
use natter_record::http::Identity;
use natter_record::store::{NewMessage, Outcome, Stored, Write};
use natter_record::{CommitError, Committer, MessageStore};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use prost::Message as _;

pub use sessions::{MemoryDirectory, Session, SessionDirectory};
pub use token::Tokens;

/// A request logic refused, with the code and a human-readable reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            message: message.into(),
        }
    }
}

impl From<CommitError> for Rejection {
    fn from(e: CommitError) -> Rejection {
        match e {
            CommitError::Closed => {
                Rejection::new(ErrorCode::ServerShutdown, "server is shutting down")
            }
            CommitError::Failed(_) => Rejection::new(ErrorCode::Internal, "storage failed; retry"),
            CommitError::Full => {
                Rejection::new(ErrorCode::RateLimited, "the server is busy; retry")
            }
        }
    }
}

/// One push for one connection: an encoded `Message` body.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub conn: u64,
    pub mid: u64,
    /// The message's position in the stream of the connection's user.
    pub user_seq: u64,
    pub body: Bytes,
    /// When the message was acked to its sender (for ack-to-push latency).
    pub acked_at: Instant,
}

/// What logic needs from a gateway node.
pub trait Gateway: Send + Sync + 'static {
    /// Queues pushes to connections of this node; never blocks.
    fn push(&self, deliveries: Vec<Delivery>);
    /// Closes one connection with a reason.
    fn kick(&self, conn: u64, code: ErrorCode, reason: &str);
}

/// An authenticated connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connected {
    pub identity: Identity,
    /// The device's stored sync cursor.
    pub cursor: u64,
}

/// What a gateway needs from logic.
#[async_trait]
pub trait LogicService: Send + Sync + 'static {
    /// Checks the token and registers the connection in the sessions directory.
    async fn connect(&self, token: &str, node: &str, conn: u64) -> Result<Connected, Rejection>;
    /// Forgets a closed connection.
    async fn disconnect(&self, session: &Session);
    /// Runs the pipeline for one message; returns the ack once it is durable.
    async fn send(&self, from: &Session, message: SendMessage) -> Result<MessageReply, Rejection>;
    /// The device acknowledged the push at `user_seq`; never waits on storage.
    async fn push_acked(&self, uid: u64, device: &str, user_seq: u64);
    /// What the device has not received.
    async fn sync(
        &self,
        uid: u64,
        device: &str,
        request: SyncRequest,
    ) -> Result<SyncReply, Rejection>;
}

struct Metrics {
    messages: IntCounterVec,
    auths: IntCounterVec,
    acks_dropped: IntCounter,
}

/// The logic role.
pub struct Logic {
    tokens: Tokens,
    sessions: Arc<dyn SessionDirectory>,
    store: Arc<dyn MessageStore>,
    committer: Committer,
    ids: MidGenerator,
    limiter: limit::RateLimiter,
    gateways: RwLock<HashMap<Arc<str>, Arc<dyn Gateway>>>,
    metrics: Metrics,
}

impl Logic {
    pub fn new(
        tokens: Tokens,
        sessions: Arc<dyn SessionDirectory>,
        store: Arc<dyn MessageStore>,
        committer: Committer,
        ids: MidGenerator,
        limits: &LimitsConfig,
        registry: &Registry,
    ) -> Logic {
        let metrics = Metrics {
            messages: register(
                registry,
                IntCounterVec::new(
                    Opts::new("natter_messages_total", "Messages received, by outcome."),
                    &["outcome"],
                )
                .expect("valid counter"),
            ),
            auths: register(
                registry,
                IntCounterVec::new(
                    Opts::new("natter_auth_total", "Authentications, by outcome."),
                    &["outcome"],
                )
                .expect("valid counter"),
            ),
            acks_dropped: register(
                registry,
                IntCounter::new(
                    "natter_push_acks_dropped_total",
                    "Push-acks not recorded because the write queue was full.",
                )
                .expect("valid counter"),
            ),
        };
        Logic {
            tokens,
            sessions,
            store,
            committer,
            ids,
            limiter: limit::RateLimiter::new(limits.messages_per_sec, limits.message_burst),
            gateways: RwLock::new(HashMap::new()),
            metrics,
        }
    }

    /// Makes a gateway node reachable for pushes.
    pub fn attach_gateway(&self, node: &str, gateway: Arc<dyn Gateway>) {
        self.gateways
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Arc::from(node), gateway);
    }

    fn gateway(&self, node: &str) -> Option<Arc<dyn Gateway>> {
        self.gateways
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .cloned()
    }

    fn directory_failed(&self, e: sessions::DirectoryError) -> Rejection {
        tracing::error!(error = %e, "sessions directory failed");
        Rejection::new(ErrorCode::Internal, "sessions directory unavailable")
    }

    /// Pushes a stored message to every online device of the receiver and
    /// to the sender's devices other than the one it came from.
    async fn route(&self, stored: &Stored, from: &Session, acked_at: Instant) {
        let m = &stored.message;
        let mut targets = match self.sessions.lookup(m.receiver).await {
            Ok(sessions) => sessions
                .into_iter()
                .map(|s| (s, stored.receiver_seq))
                .collect::<Vec<_>>(),
            Err(e) => {
                // The receiver syncs on reconnect; nothing acked is lost.
                tracing::warn!(error = %e, mid = m.mid, "receiver lookup failed; relying on sync");
                Vec::new()
            }
        };
        if m.receiver != m.sender {
            match self.sessions.lookup(m.sender).await {
                Ok(sessions) => {
                    targets.extend(sessions.into_iter().map(|s| (s, stored.sender_seq)))
                }
                Err(e) => {
                    tracing::warn!(error = %e, mid = m.mid, "sender lookup failed; relying on sync")
                }
            }
        }
        targets.retain(|(s, _)| !(s.node == from.node && s.conn == from.conn));
        let mut bodies: HashMap<u64, Bytes> = HashMap::new();
        let mut by_node: HashMap<Arc<str>, Vec<Delivery>> = HashMap::new();
        for (session, user_seq) in targets {
            let body = bodies
                .entry(user_seq)
                .or_insert_with(|| Bytes::from(m.to_proto(user_seq).encode_to_vec()))
                .clone();
            by_node
                .entry(session.node.clone())
                .or_default()
                .push(Delivery {
                    conn: session.conn,
                    mid: m.mid,
                    user_seq,
                    body,
                    acked_at,
                });
        }
        for (node, deliveries) in by_node {
            match self.gateway(&node) {
                Some(gateway) => gateway.push(deliveries),
                None => tracing::warn!(%node, "no route to gateway node; receivers will sync"),
            }
        }
    }
}

/// Ids and sequence numbers are stored as signed 64-bit integers.
const MAX_ID: u64 = i64::MAX as u64;

fn sync_limit(requested: u32) -> u32 {
    match requested {
        0 => 100,
        n => n.min(500),
    }
}

#[async_trait]
impl LogicService for Logic {
    async fn connect(&self, token: &str, node: &str, conn: u64) -> Result<Connected, Rejection> {
        let identity = match self.tokens.verify(token) {
            Ok(identity) => identity,
            Err(code) => {
                self.metrics.auths.with_label_values(&[code.as_str()]).inc();
                return Err(Rejection::new(
                    code,
                    if code == ErrorCode::TokenExpired {
                        "token expired"
                    } else {
                        "invalid token"
                    },
                ));
            }
        };
        let cursor = self
            .store
            .cursor(identity.uid, &identity.device)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cursor lookup failed");
                Rejection::new(ErrorCode::Internal, "storage unavailable")
            })?;
        let session = Session {
            uid: identity.uid,
            device: identity.device.clone(),
            node: Arc::from(node),
            conn,
        };
        let replaced = self
            .sessions
            .register(session)
            .await
            .map_err(|e| self.directory_failed(e))?;
        if let Some(old) = replaced.filter(|old| !(&*old.node == node && old.conn == conn)) {
            if let Some(gateway) = self.gateway(&old.node) {
                gateway.kick(
                    old.conn,
                    ErrorCode::Replaced,
                    "the same device connected again",
                );
            }
        }
        self.metrics.auths.with_label_values(&["ok"]).inc();
        Ok(Connected { identity, cursor })
    }

    async fn disconnect(&self, session: &Session) {
        if let Err(e) = self.sessions.unregister(session).await {
            tracing::warn!(error = %e, uid = session.uid, "unregister failed");
        }
    }

    async fn send(&self, from: &Session, message: SendMessage) -> Result<MessageReply, Rejection> {
        let count = |outcome: &str| self.metrics.messages.with_label_values(&[outcome]).inc();
        if message.receiver == 0 || message.receiver > MAX_ID {
            count("invalid");
            return Err(Rejection::new(
                ErrorCode::InvalidMessage,
                "receiver must be a user id",
            ));
        }
        if message.client_seq == 0 || message.client_seq > MAX_ID {
            count("invalid");
            return Err(Rejection::new(
                ErrorCode::InvalidMessage,
                "client_seq must be between 1 and 2^63-1",
            ));
        }
        if !self.limiter.allow(from.uid) {
            count("rate_limited");
            return Err(Rejection::new(
                ErrorCode::RateLimited,
                "too many messages; slow down",
            ));
        }
        let body = message.body.unwrap_or_default();
        let msg_type = body.validate().map_err(|reason| {
            count("invalid");
            Rejection::new(ErrorCode::InvalidMessage, reason)
        })?;
        let mid = self.ids.next();
        let new = NewMessage {
            mid,
            time_ms: natter_node::ids::mid_time_ms(mid),
            sender: from.uid,
            sender_device: from.device.clone(),
            client_seq: message.client_seq,
            receiver: message.receiver,
            msg_type: msg_type as u32,
            content: body.encode_to_vec(),
        };
        let stored = match self.committer.write(Write::Message(new)).await {
            Ok(Outcome::Stored(stored)) => stored,
            Ok(Outcome::Done) => {
                count("error");
                return Err(Rejection::new(
                    ErrorCode::Internal,
                    "store answered without a message",
                ));
            }
            Err(e) => {
                count("error");
                return Err(e.into());
            }
        };
        count(if stored.repeat { "repeat" } else { "ok" });
        let acked_at = Instant::now();
        // A repeat is pushed again: the first attempt may have stopped between
        // store and push, and receivers drop duplicates by mid.
        self.route(&stored, from, acked_at).await;
        let m = &stored.message;
        tracing::debug!(
            mid = m.mid,
            sender = m.sender,
            receiver = m.receiver,
            repeat = stored.repeat,
            "message stored"
        );
        Ok(MessageReply {
            mid: m.mid,
            time_ms: m.time_ms,
            conv_seq: m.conv_seq,
            user_seq: stored.sender_seq,
            repeat: stored.repeat,
            conversation: m.conversation.clone(),
        })
    }

    async fn push_acked(&self, uid: u64, device: &str, user_seq: u64) {
        let write = Write::Received {
            owner: uid,
            device: device.into(),
            user_seq,
        };
        // Never wait on storage here: the caller is a connection's control
        // loop. A dropped ack costs only a cursor update; the device's next
        // sync sets its cursor anyway.
        if let Err(e) = self.committer.try_enqueue(write) {
            self.metrics.acks_dropped.inc();
            tracing::debug!(error = %e, "push ack not recorded");
        }
    }

    async fn sync(
        &self,
        uid: u64,
        device: &str,
        request: SyncRequest,
    ) -> Result<SyncReply, Rejection> {
        let storage = |e: natter_record::StoreError| {
            tracing::error!(error = %e, "sync failed");
            Rejection::new(ErrorCode::Internal, "storage unavailable")
        };
        let after = match request.after {
            Some(after) if after > MAX_ID => {
                return Err(Rejection::new(
                    ErrorCode::BadRequest,
                    "after must be at most 2^63-1",
                ));
            }
            Some(after) => {
                // The device vouches for everything up to `after`.
                let write = Write::SetCursor {
                    owner: uid,
                    device: device.into(),
                    cursor: after,
                };
                self.committer.enqueue(write).await?;
                after
            }
            None => self.store.cursor(uid, device).await.map_err(storage)?,
        };
        let limit = sync_limit(request.limit);
        let items = self.store.sync(uid, after, limit).await.map_err(storage)?;
        Ok(SyncReply {
            has_more: items.len() == limit as usize,
            cursor: items.last().map(|i| i.user_seq).unwrap_or(after),
            messages: items
                .iter()
                .map(|i| i.message.to_proto(i.user_seq))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests;
