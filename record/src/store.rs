//! The storage trait for messages and the types that cross it.

use async_trait::async_trait;
use natter_proto::msg::{Message, MessageBody};
use prost::Message as _;

/// A storage failure. The caller answers the client with `internal` and the
/// client retries; nothing half-written is visible (every write is a transaction).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the store is closed")]
    Closed,
    #[error("the store is overloaded")]
    Overloaded,
}

/// The id of a one-to-one conversation: `p:{smaller uid}:{larger uid}`.
pub fn p2p_conversation(a: u64, b: u64) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("p:{lo}:{hi}")
}

/// The two members of a one-to-one conversation id, if it is one.
pub fn parse_p2p_conversation(id: &str) -> Option<(u64, u64)> {
    let rest = id.strip_prefix("p:")?;
    let (a, b) = rest.split_once(':')?;
    let (a, b) = (a.parse().ok()?, b.parse().ok()?);
    (a <= b && p2p_conversation(a, b) == id).then_some((a, b))
}

/// A message to store; its `mid` was assigned by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub mid: u64,
    pub time_ms: i64,
    pub sender: u64,
    pub sender_device: String,
    pub client_seq: u64,
    pub receiver: u64,
    pub msg_type: u32,
    /// The encoded `MessageBody`.
    pub content: Vec<u8>,
}

/// A message as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub mid: u64,
    pub conversation: String,
    pub conv_seq: u64,
    pub sender: u64,
    pub sender_device: String,
    pub client_seq: u64,
    pub receiver: u64,
    pub msg_type: u32,
    pub content: Vec<u8>,
    pub time_ms: i64,
}

impl StoredMessage {
    /// The decoded body; `None` if the stored bytes do not decode (they were
    /// validated on the way in, so this means corruption, which is logged).
    pub fn body(&self) -> Option<MessageBody> {
        match MessageBody::decode(self.content.as_slice()) {
            Ok(body) => Some(body),
            Err(e) => {
                tracing::error!(mid = self.mid, error = %e, "stored message body does not decode");
                None
            }
        }
    }

    /// The wire form, as seen by the user whose stream position is `user_seq`.
    pub fn to_proto(&self, user_seq: u64) -> Message {
        Message {
            mid: self.mid,
            conversation: self.conversation.clone(),
            conv_seq: self.conv_seq,
            user_seq,
            sender: self.sender,
            sender_device: self.sender_device.clone(),
            receiver: self.receiver,
            client_seq: self.client_seq,
            time_ms: self.time_ms,
            body: self.body(),
        }
    }
}

/// One write in a group-committed batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Store a message, unless (sender, device, client seq) is stored already.
    Message(NewMessage),
    /// A device acknowledged the message at `user_seq` of its owner's stream.
    /// The device's stored cursor advances only over positions without a gap,
    /// so it never passes a message the device has not had.
    Received {
        owner: u64,
        device: String,
        user_seq: u64,
    },
    /// A device holds everything up to `cursor` and vouches for nothing after
    /// it: the device's cursor is set to exactly this.
    SetCursor {
        owner: u64,
        device: String,
        cursor: u64,
    },
}

/// The result of a [`Write::Message`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub message: StoredMessage,
    /// The message's position in the sender's stream.
    pub sender_seq: u64,
    /// The message's position in the receiver's stream (equal to
    /// `sender_seq` for a message to oneself).
    pub receiver_seq: u64,
    /// The message had been stored before; this is the earlier copy.
    pub repeat: bool,
}

/// The result of one write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Stored(Stored),
    Done,
}

/// A page of one user's conversation history, newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryQuery {
    pub owner: u64,
    pub other: u64,
    /// Only messages with a smaller mid; `None` for the newest.
    pub before: Option<u64>,
    pub limit: u32,
    /// Only these message types; empty for all.
    pub types: Vec<u32>,
}

/// One message of a user's stream, for sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncItem {
    pub user_seq: u64,
    pub message: StoredMessage,
}

/// Message storage. Implementations: SQLite ([`crate::sqlite::SqliteStore`]);
/// every implementation passes the suite in [`crate::suite`].
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Applies `writes` in one transaction and returns one outcome per write,
    /// in order. Either all of them are durable when this returns `Ok`, or none is.
    async fn write_batch(&self, writes: &[Write]) -> Result<Vec<Outcome>, StoreError>;

    /// A page of the conversation between `owner` and `other`, newest first.
    async fn history(&self, query: &HistoryQuery) -> Result<Vec<StoredMessage>, StoreError>;

    /// Up to `limit` messages of `owner`'s stream with `user_seq > after`, in order.
    async fn sync(&self, owner: u64, after: u64, limit: u32) -> Result<Vec<SyncItem>, StoreError>;

    /// The device's stored cursor (0 for a device never seen).
    async fn cursor(&self, owner: u64, device: &str) -> Result<u64, StoreError>;

    /// Deletes up to `limit` messages stored before `before_ms` (Unix ms),
    /// with their relation rows; returns how many went. Sequence counters
    /// are kept, so numbering continues after expired messages.
    async fn expire(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError>;

    /// Whether the store answers; used by `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Flushes and closes; later calls fail with [`StoreError::Closed`].
    async fn close(&self);
}
