//! What a gateway asks of logic, and the sessions it registers.

use std::sync::Arc;

use async_trait::async_trait;
use natter_proto::msg::{MessageReply, ReadReply, SendMessage, SyncReply, SyncRequest};
use natter_proto::UserId;

use crate::{Acked, Identity, Refusal};

/// One online device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub uid: UserId,
    pub device: String,
    /// The gateway node holding the connection.
    pub node: Arc<str>,
    /// The connection's id on that node.
    pub conn: u64,
}

/// Where one online device is reached: what a push needs of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub uid: UserId,
    pub node: Arc<str>,
    pub conn: u64,
}

impl From<Session> for Route {
    fn from(s: Session) -> Route {
        Route {
            uid: s.uid,
            node: s.node,
            conn: s.conn,
        }
    }
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
    /// Checks the token and registers the connection in the sessions
    /// directory. `device` is the auth frame's (used when the token names none).
    async fn connect(
        &self,
        token: &str,
        device: &str,
        node: &str,
        conn: u64,
    ) -> Result<Connected, Refusal>;
    /// Forgets a closed connection.
    async fn disconnect(&self, session: &Session);
    /// A gateway's periodic proof of life for its open connections: their
    /// sessions are renewed in the directory.
    async fn heartbeat(&self, sessions: &[Session]);
    /// Runs the pipeline for one message; returns the ack once it is durable.
    async fn send(&self, from: &Session, message: SendMessage) -> Result<MessageReply, Refusal>;
    /// The device acknowledged these pushes (one `PushAck` covers every
    /// push before it); never waits on storage.
    async fn push_acked(&self, uid: &UserId, device: &str, acked: &[Acked]);
    /// What the device has not received.
    async fn sync(
        &self,
        uid: &UserId,
        device: &str,
        request: SyncRequest,
    ) -> Result<SyncReply, Refusal>;
    /// The user has read `conversation` up to `seq`: the read cursor moves
    /// forward (never back), durably, and the others concerned are told.
    async fn read(
        &self,
        from: &Session,
        conversation: &str,
        seq: u64,
    ) -> Result<ReadReply, Refusal>;
    /// The user is typing in `conversation`: a transient notice to the
    /// other party's or the group members' online devices (rate limited).
    async fn typing(&self, from: &Session, conversation: &str) -> Result<(), Refusal>;
}
