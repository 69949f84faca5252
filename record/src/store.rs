//! The storage trait for messages and the types that cross it.

use async_trait::async_trait;
use futures_util::{Stream, TryStreamExt};
use natter_proto::msg::{Message, MessageBody};
use natter_proto::UserId;
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
    #[error("the store cannot write (its last commit failed)")]
    Unwritable,
}

/// The largest id, sequence number or cursor the stores hold (their
/// integers are signed 64-bit); anything above it is refused on input.
pub const MAX_ID: u64 = i64::MAX as u64;

/// The id of a one-to-one conversation: `p:{a}:{b}`, the byte-wise
/// smaller user id first.
pub fn p2p_conversation(a: &UserId, b: &UserId) -> String {
    a.conversation_with(b)
}

/// The two members of a one-to-one conversation id, if it is one (in its
/// one canonical order).
pub fn parse_p2p_conversation(id: &str) -> Option<(UserId, UserId)> {
    let rest = id.strip_prefix("p:")?;
    let (a, b) = rest.split_once(':')?;
    let (a, b) = (UserId::parse(a).ok()?, UserId::parse(b).ok()?);
    (a <= b).then_some((a, b))
}

/// A user id read back from a store (a decode error if it is not one: the
/// stores only ever write valid ids).
pub(crate) fn user_id(stored: String) -> Result<UserId, sqlx::Error> {
    UserId::try_from(stored).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// A stored message's receiver: the group of a group conversation (whose
/// `receiver` column is empty), else the receiving user.
pub(crate) fn peer(conversation: &str, receiver: String) -> Result<Peer, sqlx::Error> {
    match parse_group_conversation(conversation) {
        Some(group) => Ok(Peer::Group(group)),
        None => Ok(Peer::User(user_id(receiver)?)),
    }
}

/// The id of a group's conversation: `g:{group}`.
pub fn group_conversation(group: u64) -> String {
    format!("g:{group}")
}

/// The group of a group conversation id, if it is one.
pub fn parse_group_conversation(id: &str) -> Option<u64> {
    let group: u64 = id.strip_prefix("g:")?.parse().ok()?;
    (group_conversation(group) == id).then_some(group)
}

/// Where a message goes: a user's stream, or a group.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    User(UserId),
    Group(u64),
}

impl Peer {
    /// The receiving user of a one-to-one message.
    pub fn user(&self) -> Option<&UserId> {
        match self {
            Peer::User(uid) => Some(uid),
            Peer::Group(_) => None,
        }
    }

    /// The group of a group message.
    pub fn group(&self) -> Option<u64> {
        match self {
            Peer::User(_) => None,
            Peer::Group(group) => Some(*group),
        }
    }
}

/// A message to store; its `mid` was assigned by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub mid: u64,
    pub time_ms: i64,
    pub sender: UserId,
    pub sender_device: String,
    pub client_seq: u64,
    /// The receiving user or group.
    pub to: Peer,
    pub msg_type: u32,
    /// The encoded `MessageBody`.
    pub content: Vec<u8>,
}

impl NewMessage {
    /// This message as stored at `conv_seq` of `conversation`.
    pub fn stored(&self, conversation: String, conv_seq: u64) -> StoredMessage {
        StoredMessage {
            mid: self.mid,
            conversation,
            conv_seq,
            sender: self.sender.clone(),
            sender_device: self.sender_device.clone(),
            client_seq: self.client_seq,
            to: self.to.clone(),
            msg_type: self.msg_type,
            content: self.content.clone(),
            time_ms: self.time_ms,
            edited_ms: 0,
            revoked_ms: 0,
        }
    }
}

/// A message as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub mid: u64,
    pub conversation: String,
    pub conv_seq: u64,
    pub sender: UserId,
    pub sender_device: String,
    pub client_seq: u64,
    /// The receiving user, or the group of a group message.
    pub to: Peer,
    pub msg_type: u32,
    pub content: Vec<u8>,
    pub time_ms: i64,
    /// When the message was last edited (Unix ms); 0 if never.
    pub edited_ms: i64,
    /// When the message was revoked (Unix ms); 0 if it was not. Its
    /// `content` is then empty.
    pub revoked_ms: i64,
}

/// What a stored message counts towards a page's byte budget besides its
/// content and strings: its numbers and their encoding, generously.
const MESSAGE_OVERHEAD: usize = 64;

impl StoredMessage {
    /// The bytes this message counts towards a page's budget
    /// ([`PageLimit::bytes`]): its content, its strings and a fixed
    /// overhead, about the size of its protobuf encoding. (Its JSON form is
    /// larger by a constant factor: base64 content, escaped strings.)
    pub fn page_bytes(&self) -> usize {
        self.content.len()
            + self.conversation.len()
            + self.sender.len()
            + self.to.user().map_or(0, |u| u.len())
            + self.sender_device.len()
            + MESSAGE_OVERHEAD
    }

    /// The decoded body; `None` for a revoked message, or if the stored
    /// bytes do not decode (they were validated on the way in, so this
    /// means corruption, which is logged).
    pub fn body(&self) -> Option<MessageBody> {
        if self.revoked_ms != 0 {
            return None;
        }
        match MessageBody::decode(self.content.as_slice()) {
            Ok(body) => Some(body),
            Err(e) => {
                tracing::error!(mid = self.mid, error = %e, "stored message body does not decode");
                None
            }
        }
    }

    /// The group, for a group message.
    pub fn group(&self) -> Option<u64> {
        self.to.group()
    }

    /// The wire form, as seen by the user whose stream position is
    /// `user_seq` (0 for group messages).
    pub fn to_proto(&self, user_seq: u64) -> Message {
        Message {
            group: self.to.group().unwrap_or(0),
            mid: self.mid,
            conversation: self.conversation.clone(),
            conv_seq: self.conv_seq,
            user_seq,
            sender: self.sender.to_string(),
            sender_device: self.sender_device.clone(),
            receiver: self.to.user().map(|u| u.to_string()).unwrap_or_default(),
            client_seq: self.client_seq,
            time_ms: self.time_ms,
            body: self.body(),
            edited_ms: self.edited_ms,
            revoked_ms: self.revoked_ms,
        }
    }
}

/// One write in a group-committed batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Store a message, unless (sender, device, client seq) is stored
    /// already: to a user, numbered in the pair's conversation and in both
    /// users' streams (relation rows); to a group, once, numbered in the
    /// group's conversation, with no per-member rows.
    Message(NewMessage),
    /// A device acknowledged the message at position `seq` of a stream: its
    /// owner's (`group` 0, `seq` a `user_seq`) or a group's (`seq` a
    /// `conv_seq`). The device's stored cursor advances only over positions
    /// without a gap, so it never passes a message the device has not had.
    Received {
        owner: UserId,
        device: String,
        group: u64,
        seq: u64,
        /// Positions up to here count as held: a group member's join point
        /// minus one (nothing before it is delivered to the member); 0 otherwise.
        floor: u64,
    },
    /// A device holds everything of a stream up to `cursor` and vouches for
    /// nothing after it: the device's cursor is set to exactly this.
    SetCursor {
        owner: UserId,
        device: String,
        group: u64,
        cursor: u64,
    },
    /// The user has read `conversation` up to `seq`: the read cursor moves
    /// to it unless it is there already (it never moves back). A `seq`
    /// past the conversation's newest message moves nothing (the outcome's
    /// `last_seq` tells the caller). `floor` counts as read
    /// already (a group member's join point minus one). Answers
    /// [`Outcome::Read`].
    Read {
        owner: UserId,
        conversation: String,
        seq: u64,
        floor: u64,
    },
    /// The user left a group: the user's row of its conversation goes (its
    /// read cursor no longer counts in the group's receipts).
    Forget { owner: UserId, conversation: String },
}

/// The result of a [`Write::Message`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub message: StoredMessage,
    /// The message's position in the sender's stream (0 for group messages).
    pub sender_seq: u64,
    /// The message's position in the receiver's stream (equal to
    /// `sender_seq` for a message to oneself; 0 for group messages).
    pub receiver_seq: u64,
    /// The message had been stored before; this is the earlier copy.
    pub repeat: bool,
}

impl Stored {
    /// The sender's ack: a `MessageReply` (its `user_seq` is 0 for a group
    /// message, which has no place in the sender's stream).
    pub fn reply(&self) -> natter_proto::msg::MessageReply {
        let m = &self.message;
        natter_proto::msg::MessageReply {
            mid: m.mid,
            time_ms: m.time_ms,
            conv_seq: m.conv_seq,
            user_seq: self.sender_seq,
            repeat: self.repeat,
            conversation: m.conversation.clone(),
        }
    }
}

/// A user's read state in one conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The conversation's newest `conv_seq`.
    pub last_seq: u64,
    /// The user's read cursor.
    pub read_seq: u64,
    /// Messages from others after the cursor (group events, revokes and
    /// edits are not counted).
    pub unread: u64,
    /// The write moved the cursor.
    pub moved: bool,
}

/// The result of one write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Stored(Stored),
    /// The outcome of a [`Write::Read`].
    Read(ReadState),
    Done,
    /// The (sender, device, client seq) belongs to a message to another
    /// user or group: nothing was stored.
    Reused,
}

/// How much one page of messages may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLimit {
    /// Messages at most.
    pub count: u32,
    /// Bytes at most, counted by [`StoredMessage::page_bytes`]: the page
    /// stops before the message that would take it past this. The first
    /// message always goes in, however large, so every page makes progress.
    pub bytes: usize,
}

impl PageLimit {
    pub fn new(count: u32, bytes: usize) -> PageLimit {
        PageLimit { count, bytes }
    }
}

impl From<u32> for PageLimit {
    /// `count` messages, whatever their size.
    fn from(count: u32) -> PageLimit {
        PageLimit::new(count, usize::MAX)
    }
}

/// A page of messages, in the order asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The page stopped at its limit, of messages (the next page may still
    /// be empty) or of bytes (a message did not fit): ask again after the
    /// last item.
    pub more: bool,
}

impl<T> Page<T> {
    /// Collects a page from `rows` in order, converting each with `item`,
    /// until `limit` is reached. Stops reading there: rows past the budget
    /// are never held.
    pub(crate) async fn collect<R>(
        rows: impl Stream<Item = Result<R, sqlx::Error>>,
        limit: PageLimit,
        item: impl Fn(&R) -> Result<T, sqlx::Error>,
        bytes: impl Fn(&T) -> usize,
    ) -> Result<Page<T>, sqlx::Error> {
        let mut rows = std::pin::pin!(rows);
        let mut items = Vec::new();
        let mut used = 0usize;
        while items.len() < limit.count as usize {
            let Some(row) = rows.try_next().await? else {
                return Ok(Page { items, more: false });
            };
            let next = item(&row)?;
            let size = bytes(&next);
            if !items.is_empty() && used.saturating_add(size) > limit.bytes {
                return Ok(Page { items, more: true });
            }
            used = used.saturating_add(size);
            items.push(next);
        }
        // A full page: more may follow.
        Ok(Page {
            more: limit.count > 0,
            items,
        })
    }
}

/// A page of one user's conversation history, newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryQuery {
    pub owner: UserId,
    pub other: UserId,
    /// Only messages with a smaller mid; `None` for the newest.
    pub before: Option<u64>,
    pub limit: PageLimit,
    /// Only these message types; empty for all.
    pub types: Vec<u32>,
}

/// A page of a group's history, newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupHistoryQuery {
    pub group: u64,
    /// Only messages from this `conv_seq` on (the reader's join point).
    pub from_seq: u64,
    /// Only messages older than this one; `None` for the newest.
    pub before: Option<u64>,
    pub limit: PageLimit,
    /// Only these message types; empty for all.
    pub types: Vec<u32>,
}

/// A page of message search over one user's conversations, newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchQuery {
    pub owner: UserId,
    /// What to find: a substring of a message's searchable text
    /// ([`crate::search::searchable_text`]), compared case-insensitively.
    /// Never empty (the HTTP API refuses an empty query).
    pub text: String,
    /// Only this conversation; `None` for all of `owner`'s one-to-one
    /// conversations and `groups`. A one-to-one conversation must be one
    /// `owner` is a party of, and a group one of `groups` (else the page is
    /// empty): the caller checked that the owner may read it.
    pub conversation: Option<String>,
    /// The owner's groups, each with the owner's join point (`conv_seq`):
    /// nothing before it is found. Group membership is the group store's,
    /// so the caller names them.
    pub groups: Vec<(u64, u64)>,
    /// Only messages sent at or after this time (Unix ms).
    pub from_ms: Option<i64>,
    /// Only messages sent at or before this time (Unix ms).
    pub to_ms: Option<i64>,
    /// Only messages with a smaller mid; `None` for the newest.
    pub before: Option<u64>,
    pub limit: PageLimit,
}

/// One message of a user's stream, for sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncItem {
    pub user_seq: u64,
    pub message: StoredMessage,
}

pub use natter_proto::api::PushMode;

/// A [`PushMode`] as stored.
pub fn push_mode_code(mode: PushMode) -> i64 {
    match mode {
        PushMode::All => 0,
        PushMode::Mentions => 1,
        PushMode::None => 2,
    }
}

/// The stored number back (an unknown number reads as `All`).
pub fn push_mode_from(code: i64) -> PushMode {
    match code {
        1 => PushMode::Mentions,
        2 => PushMode::None,
        _ => PushMode::All,
    }
}

/// A user's settings for one conversation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub pinned: bool,
    pub push: PushMode,
}

/// A change to [`Settings`]: the fields that are set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SettingsChange {
    pub pinned: Option<bool>,
    pub push: Option<PushMode>,
}

/// A position in a user's conversation list, which is ordered pinned
/// first, then by newest activity (the `mid` of the newest message; mids
/// are unique and time-ordered), then by conversation id, all descending.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListKey {
    pub pinned: bool,
    pub last_mid: u64,
    pub conversation: String,
}

/// A page of one user's conversation list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationQuery {
    pub owner: UserId,
    /// The user's groups, each with the user's join point (`conv_seq`):
    /// group membership is the group store's, so the caller names them.
    pub groups: Vec<(u64, u64)>,
    /// Only entries after this key (in list order); `None` from the top.
    pub after: Option<ListKey>,
    pub limit: u32,
}

/// One conversation in a user's list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationEntry {
    pub conversation: String,
    /// The other user, or the group.
    pub peer: Peer,
    /// The newest message the user may see, in its current state (edited
    /// or revoked).
    pub last: Option<StoredMessage>,
    /// The conversation's newest `conv_seq`.
    pub last_seq: u64,
    pub read_seq: u64,
    pub unread: u64,
    /// One-to-one: the other user's read cursor (0 in groups).
    pub peer_read_seq: u64,
    pub settings: Settings,
}

impl ConversationEntry {
    pub fn key(&self) -> ListKey {
        ListKey {
            pinned: self.settings.pinned,
            last_mid: self.last.as_ref().map_or(0, |m| m.mid),
            conversation: self.conversation.clone(),
        }
    }
}

/// A read cursor in a conversation: whose, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reader {
    pub uid: UserId,
    pub read_seq: u64,
}

/// Message storage. Implementations: SQLite ([`crate::sqlite::SqliteStore`]);
/// every implementation passes the suite in [`crate::suite`].
/// A device's push-ack of a group message: the group, the `conv_seq`, and
/// the position below which the member holds everything (its join point).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupAck {
    pub group: u64,
    pub seq: u64,
    pub floor: u64,
}

#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Applies `writes` in one transaction and returns one outcome per write,
    /// in order. Either all of them are durable when this returns `Ok`, or none is.
    async fn write_batch(&self, writes: &[Write]) -> Result<Vec<Outcome>, StoreError>;

    /// Records group push-acks of one device at once, without a
    /// transaction, when the store keeps all of those cursors in memory and
    /// nothing is due to be written out: each is what a `Write::Received`
    /// with these `owner` and `device` would record. `false`: nothing was
    /// done, and the acks go through [`MessageStore::write_batch`]. Never
    /// waits.
    fn received_now(&self, _owner: &UserId, _device: &str, _acks: &[GroupAck]) -> bool {
        false
    }

    /// A page of the conversation between `owner` and `other`, newest first.
    async fn history(&self, query: &HistoryQuery) -> Result<Page<StoredMessage>, StoreError>;

    /// A page (up to `limit`) of `owner`'s stream with `user_seq > after`, in order.
    async fn sync(
        &self,
        owner: &UserId,
        after: u64,
        limit: PageLimit,
    ) -> Result<Page<SyncItem>, StoreError>;

    /// A page of a group's history, newest first.
    async fn group_history(
        &self,
        query: &GroupHistoryQuery,
    ) -> Result<Page<StoredMessage>, StoreError>;

    /// A page (up to `limit`) of `group`'s messages with `conv_seq > after`, in order.
    async fn group_sync(
        &self,
        group: u64,
        after: u64,
        limit: PageLimit,
    ) -> Result<Page<StoredMessage>, StoreError>;

    /// The newest committed `conv_seq` of each group (0 for none yet), in order.
    async fn group_seqs(&self, groups: &[u64]) -> Result<Vec<u64>, StoreError>;

    /// The device's stored cursor for a stream: its owner's (`group` 0) or a
    /// group's (0 for a device never seen).
    async fn cursor(&self, owner: &UserId, device: &str, group: u64) -> Result<u64, StoreError>;

    /// The device's stored cursors for each of `groups`, in order (0 for none).
    async fn group_cursors(
        &self,
        owner: &UserId,
        device: &str,
        groups: &[u64],
    ) -> Result<Vec<u64>, StoreError>;

    /// Deletes up to `limit` messages stored before `before_ms` (Unix ms),
    /// with their relation rows; returns how many went. Sequence counters
    /// are kept, so numbering continues after expired messages.
    async fn expire(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError>;

    /// Records that the operator logged `uid` out everywhere at `at_ms`
    /// (Unix ms): the user's tokens issued before it are refused. The time
    /// never moves back: an earlier `at_ms` than the stored one is ignored.
    /// Written at once, not through the committer: a logout is rare.
    async fn log_out(&self, uid: &UserId, at_ms: i64) -> Result<(), StoreError>;

    /// When `uid` was last logged out everywhere (Unix ms), if ever.
    async fn logged_out_at(&self, uid: &UserId) -> Result<Option<i64>, StoreError>;

    /// One message by its id, in its current state.
    async fn message(&self, mid: u64) -> Result<Option<StoredMessage>, StoreError>;

    /// A page of a user's conversations, in list order ([`ListKey`]).
    async fn conversations(
        &self,
        query: &ConversationQuery,
    ) -> Result<Page<ConversationEntry>, StoreError>;

    /// The user's read state in one conversation; `floor` counts as read
    /// (a group member's join point minus one).
    async fn read_state(
        &self,
        owner: &UserId,
        conversation: &str,
        floor: u64,
    ) -> Result<ReadState, StoreError>;

    /// Changes a user's settings for a conversation; returns them all.
    /// Written at once, not through the committer: settings change rarely.
    async fn set_settings(
        &self,
        owner: &UserId,
        conversation: &str,
        change: SettingsChange,
    ) -> Result<Settings, StoreError>;

    /// The users whose read cursor in `conversation` is at `seq` or past it,
    /// at most `limit` of them, in user id order.
    async fn readers(
        &self,
        conversation: &str,
        seq: u64,
        limit: u32,
    ) -> Result<Vec<Reader>, StoreError>;

    /// How many users' read cursors in `conversation` are at `seq` or past it.
    async fn read_count(&self, conversation: &str, seq: u64) -> Result<u64, StoreError>;

    /// A page of the messages `query.owner` may read whose text holds
    /// `query.text`, newest first, in their current state. Stores that
    /// index behind the commit find a message within about a second of
    /// its commit (see [`MessageStore::flush_search`]).
    async fn search(&self, query: &SearchQuery) -> Result<Page<StoredMessage>, StoreError>;

    /// Indexes for search everything committed before the call, before
    /// returning. Stores that index inside the write transaction have
    /// nothing to do.
    async fn flush_search(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether the store answers; used by `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Flushes and closes; later calls fail with [`StoreError::Closed`].
    async fn close(&self);
}
