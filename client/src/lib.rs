//! The natter client SDK.
//!
//! ```no_run
//! # async fn demo() -> Result<(), natter_client::ClientError> {
//! use natter_client::{Client, ClientConfig, Event};
//! use natter_proto::msg::MessageBody;
//! use natter_proto::UserId;
//!
//! let (client, mut events) = Client::connect(ClientConfig::new("127.0.0.1:3102", "TOKEN")).await?;
//! let bob = UserId::parse("bob").expect("a valid user id");
//! let ack = client.send(&bob, MessageBody::text("hello")).await?;
//! println!("stored as {}", ack.mid);
//! while let Some(event) = events.next().await {
//!     if let Event::Message(m) = event {
//!         println!("{} says {:?}", m.sender, m.body);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! What the SDK does for you:
//! - sends resend the same `client_seq` after a time-out or reconnect, so a
//!   lost ack never duplicates a message;
//! - pushes are acknowledged once handed to your event stream, and messages
//!   are de-duplicated by `mid` (the wire is at-least-once): a message comes
//!   again only in a newer state (edited, or revoked) than it came before;
//! - a message this device sent never comes back as an event: when its copy
//!   arrives by sync or push before the ack (which a crash may have lost),
//!   it answers the waiting send instead;
//! - on every (re)connect it syncs what it missed from its cursor (the highest
//!   contiguous `user_seq` it has seen), so nothing acked goes missing;
//! - read receipts and typing notices of others arrive as [`Event::Read`]
//!   and [`Event::Typing`]; edits and revokes are messages of the
//!   conversation (see [`Client::edit`], [`Client::revoke`]), and a message
//!   synced after one carries its state (`edited_ms`, `revoked_ms`);
//! - heartbeats, and reconnects with back-off unless the server said the
//!   session is over (bad or expired token, logged out, replaced by the same
//!   device; see [`ClientError::session_over`]). An account service that
//!   does not answer (`auth_unavailable`) is not the end: the client keeps
//!   reconnecting with back-off, as after a dropped connection.

mod driver;
pub mod raw;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use natter_proto::api::ErrorBody;
pub use natter_proto::api::{
    ConversationPage, ConversationView, CreateGroup, GroupView, HistoryPage, MarkRead, MessageView,
    PushMode, ReadState, ReceiptsView, SettingsUpdate, SettingsView, SyncPage,
};
use natter_proto::msg::{
    Content, Edit, ErrorReply, Message, MessageBody, MessageReply, Notify, ReadReceipt, ReadReply,
    ReadRequest, Revoke, SendMessage, Text, Typing, TypingNotice,
};
use natter_proto::{ErrorCode, Frame, Op, UserId};
use prost::Message as _;
pub use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// What can go wrong for a client.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("connection refused: {0}")]
    Refused(String),
    #[error("connection reset: {0}")]
    Reset(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("WebSocket handshake failed: {0}")]
    Handshake(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("timed out")]
    Timeout,
    #[error("server closed the connection: {code}: {reason}")]
    Closed { code: ErrorCode, reason: String },
    #[error("server closed the connection with WebSocket code {code}: {reason}")]
    ClosedRaw { code: u16, reason: String },
    #[error("request rejected: {code}: {message}")]
    Rejected {
        code: ErrorCode,
        message: String,
        /// With `muted`: the end of the mute, Unix ms.
        until_ms: Option<i64>,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("HTTP error: {0}")]
    Http(String),
    #[error("the client is closed")]
    Shut,
    #[error("disconnected; the request may be retried")]
    Disconnected,
}

impl ClientError {
    fn from_io(e: std::io::Error) -> ClientError {
        match e.kind() {
            std::io::ErrorKind::ConnectionRefused => ClientError::Refused(e.to_string()),
            std::io::ErrorKind::ConnectionReset => ClientError::Reset(e.to_string()),
            std::io::ErrorKind::TimedOut => ClientError::Timeout,
            _ => ClientError::Connect(e.to_string()),
        }
    }

    /// A WebSocket close, with natter's reason code when the close carries one.
    pub fn closed(code: u16, reason: String) -> ClientError {
        match code
            .checked_sub(4000)
            .and_then(|c| ErrorCode::from_u32(u32::from(c)))
        {
            Some(code) => ClientError::Closed { code, reason },
            None => ClientError::ClosedRaw { code, reason },
        }
    }

    /// A short class name for reports and metrics.
    pub fn class(&self) -> String {
        match self {
            ClientError::Refused(_) => "refused".into(),
            ClientError::Reset(_) => "reset".into(),
            ClientError::Connect(_) => "connect".into(),
            ClientError::Handshake(_) => "handshake".into(),
            ClientError::Io(_) => "io".into(),
            ClientError::Timeout => "timeout".into(),
            ClientError::Closed { code, .. } => format!("closed:{code}"),
            ClientError::ClosedRaw { code, .. } => format!("closed:{code}"),
            ClientError::Rejected { code, .. } => format!("rejected:{code}"),
            ClientError::Protocol(_) => "protocol".into(),
            ClientError::Http(_) => "http".into(),
            ClientError::Shut => "shut".into(),
            ClientError::Disconnected => "disconnected".into(),
        }
    }

    /// Whether the server said this session is over for good: the token is
    /// bad or expired, the user was logged out, or the same device
    /// connected elsewhere. Connecting again with the same token would be
    /// refused the same way, so the client does not reconnect; the
    /// application needs a new token (or the user). Anything else,
    /// `auth_unavailable` included (the operator's account service did not
    /// answer), is worth another attempt after a back-off.
    pub fn session_over(&self) -> bool {
        matches!(
            self,
            ClientError::Closed {
                code: ErrorCode::AuthFailed
                    | ErrorCode::TokenExpired
                    | ErrorCode::LoggedOut
                    | ErrorCode::Replaced,
                ..
            }
        )
    }

    /// Whether the same request may succeed if sent again.
    fn retryable(&self) -> bool {
        match self {
            ClientError::Timeout | ClientError::Disconnected => true,
            ClientError::Rejected { code, .. } => {
                matches!(
                    code,
                    ErrorCode::Internal | ErrorCode::RateLimited | ErrorCode::ServerShutdown
                )
            }
            _ => false,
        }
    }
}

/// How to reach the server and how patient to be.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port` of a gateway; WebSocket at `/sub`, HTTP API at `/v1`.
    pub server: String,
    pub token: String,
    /// The device to connect as, for a token that names none (one from the
    /// operator's account service). A token that names a device must name
    /// this one, so leave it `None` for natter's own tokens.
    pub device: Option<String>,
    /// Time to wait for a reply before resending.
    pub ack_timeout: Duration,
    /// Attempts per send before giving up.
    pub send_attempts: u32,
    /// Reconnect after a disconnect (not after a fatal close such as a bad token).
    pub reconnect: bool,
    /// Sync what was missed after each (re)connect.
    pub auto_sync: bool,
    /// The sync cursor this device had; `None` uses the server's record.
    pub cursor: Option<u64>,
    /// Source address for the TCP connection.
    pub local_addr: Option<IpAddr>,
    /// Overrides the heartbeat interval the server asks for.
    pub heartbeat: Option<Duration>,
    /// Events buffered before the SDK stops reading the socket.
    pub event_buffer: usize,
    /// Free-form client name sent with auth.
    pub client_name: String,
    /// How long a received push may wait for its `PushAck`. One ack covers
    /// every push received before it, so a delay lets one frame acknowledge
    /// several pushes. Zero acknowledges each push at once. Keep it well
    /// under the server's `push_rto_ms`.
    pub push_ack_delay: Duration,
}

/// Pushes acknowledged by one `PushAck` at most, whatever the delay.
pub const PUSH_ACK_BATCH: u32 = 64;

impl ClientConfig {
    pub fn new(server: impl Into<String>, token: impl Into<String>) -> ClientConfig {
        ClientConfig {
            server: server.into(),
            token: token.into(),
            device: None,
            ack_timeout: Duration::from_secs(5),
            send_attempts: 6,
            reconnect: true,
            auto_sync: true,
            cursor: None,
            local_addr: None,
            heartbeat: None,
            event_buffer: 1024,
            client_name: format!("natter-client/{}", env!("CARGO_PKG_VERSION")),
            push_ack_delay: Duration::from_secs(1),
        }
    }
}

/// What the client tells the application.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A message for this device (pushed or synced), once per `mid` and
    /// state: again when it comes edited or revoked (`edited_ms`,
    /// `revoked_ms`) after it came in an older state. Never
    /// one this device sent: that one answers its send (with `repeat` set
    /// when its copy came back before the server's reply).
    Message(Message),
    /// A user read a conversation up to a `conv_seq`: the other party of a
    /// one-to-one conversation, another device of this user, or a member
    /// of a small group.
    Read(ReadReceipt),
    /// A user is typing in a conversation (never stored: only devices
    /// online at the time hear of it).
    Typing(TypingNotice),
    /// Any other notify, as it came.
    Notify(Notify),
    /// Authenticated (first connect and every reconnect).
    Connected { uid: UserId, device: String },
    /// The connection ended; the client reconnects unless `fatal`.
    Disconnected { error: ClientError, fatal: bool },
    /// A frame the server sent that the client could not use.
    ProtocolError(String),
}

/// The application's end of the event stream.
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the client has stopped.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// An event if one is ready.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

/// Counters kept by the client.
#[derive(Debug, Default)]
pub struct Stats {
    pub pushes: AtomicU64,
    /// Messages received again (same `mid`) and dropped.
    pub duplicates: AtomicU64,
    pub resends: AtomicU64,
    pub reconnects: AtomicU64,
    pub synced: AtomicU64,
    /// This device's own messages that came back by sync or push: they
    /// answer its sends and are never events.
    pub own_copies: AtomicU64,
}

struct Shared {
    uid: UserId,
    device: String,
    next_client_seq: AtomicU64,
    stats: Stats,
    http: Mutex<Option<reqwest::Client>>,
}

enum Command {
    Request {
        op: Op,
        body: Bytes,
        reply: oneshot::Sender<Result<Frame, ClientError>>,
        /// With a `Message` request: what the server dedupes it on.
        send: Option<SendKey>,
    },
    Close,
}

/// What identifies a send for this device: its `client_seq`, and where it
/// goes (the server refuses a `client_seq` reused for another receiver).
#[derive(Clone, Debug, PartialEq, Eq)]
struct SendKey {
    client_seq: u64,
    /// The receiving user as on the wire; empty for a group send.
    receiver: String,
    group: u64,
}

/// Where a message goes: a user, or a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    User(UserId),
    Group(u64),
}

impl From<UserId> for Peer {
    fn from(uid: UserId) -> Peer {
        Peer::User(uid)
    }
}

impl From<&UserId> for Peer {
    fn from(uid: &UserId) -> Peer {
        Peer::User(uid.clone())
    }
}

/// A connected client. Clones share one connection.
#[derive(Clone)]
pub struct Client {
    config: Arc<ClientConfig>,
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
}

impl Client {
    /// Connects and authenticates; fails if the first attempt does.
    pub async fn connect(config: ClientConfig) -> Result<(Client, Events), ClientError> {
        let (conn, auth, uid) = driver::open(&config).await?;
        // Unique per device over its lifetime: microseconds at start, counting up.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        let shared = Arc::new(Shared {
            uid: uid.clone(),
            device: auth.device.clone(),
            next_client_seq: AtomicU64::new(start),
            stats: Stats::default(),
            http: Mutex::new(None),
        });
        let (commands, commands_rx) = mpsc::channel(256);
        let (events_tx, events_rx) = mpsc::channel(config.event_buffer.max(1));
        let config = Arc::new(config);
        tokio::spawn(
            driver::Driver::new(config.clone(), shared.clone(), commands_rx, events_tx)
                .run(conn, auth, uid),
        );
        Ok((
            Client {
                config,
                shared,
                commands,
            },
            Events { rx: events_rx },
        ))
    }

    /// The user the token names, as the server said.
    pub fn uid(&self) -> &UserId {
        &self.shared.uid
    }

    /// The one-to-one conversation id of this user and `other`, for
    /// [`Client::history`].
    pub fn conversation_with(&self, other: &UserId) -> String {
        self.shared.uid.conversation_with(other)
    }

    pub fn device(&self) -> &str {
        &self.shared.device
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// A fresh client sequence number for [`Client::send_with_seq`].
    pub fn next_client_seq(&self) -> u64 {
        self.shared.next_client_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends a message and waits for the durable ack, resending on time-outs.
    pub async fn send(
        &self,
        receiver: &UserId,
        body: MessageBody,
    ) -> Result<MessageReply, ClientError> {
        self.send_with_seq(self.next_client_seq(), receiver, body)
            .await
    }

    /// Sends with a given `client_seq`: the same seq is the same message.
    pub async fn send_with_seq(
        &self,
        client_seq: u64,
        receiver: &UserId,
        body: MessageBody,
    ) -> Result<MessageReply, ClientError> {
        self.send_message(SendMessage {
            client_seq,
            receiver: receiver.as_str().to_owned(),
            body: Some(body),
            group: 0,
        })
        .await
    }

    /// Sends a message to a group and waits for the durable ack.
    pub async fn send_group(
        &self,
        group: u64,
        body: MessageBody,
    ) -> Result<MessageReply, ClientError> {
        self.send_group_with_seq(self.next_client_seq(), group, body)
            .await
    }

    /// [`Client::send_group`] with a given `client_seq`.
    pub async fn send_group_with_seq(
        &self,
        client_seq: u64,
        group: u64,
        body: MessageBody,
    ) -> Result<MessageReply, ClientError> {
        self.send_message(SendMessage {
            client_seq,
            receiver: String::new(),
            body: Some(body),
            group,
        })
        .await
    }

    /// Sends an envelope as given, resending the same client seq on time-outs.
    pub async fn send_message(&self, message: SendMessage) -> Result<MessageReply, ClientError> {
        let key = SendKey {
            client_seq: message.client_seq,
            receiver: message.receiver.clone(),
            group: message.group,
        };
        let body = Bytes::from(message.encode_to_vec());
        let frame = self.request_retrying(Op::Message, body, Some(key)).await?;
        decode_reply(&frame)
    }

    /// Revokes message `mid` of the conversation with `to`: a message whose
    /// body is a [`Revoke`], sent (and resent) like any other; the server's
    /// ack says it is stored.
    pub async fn revoke(&self, to: impl Into<Peer>, mid: u64) -> Result<MessageReply, ClientError> {
        let body = MessageBody {
            content: Some(Content::Revoke(Revoke { mid })),
        };
        self.send_to(to.into(), body).await
    }

    /// Replaces the text of text message `mid` of the conversation with
    /// `to`: a message whose body is an [`Edit`], sent like any other.
    pub async fn edit(
        &self,
        to: impl Into<Peer>,
        mid: u64,
        text: impl Into<String>,
    ) -> Result<MessageReply, ClientError> {
        let body = MessageBody {
            content: Some(Content::Edit(Edit {
                mid,
                text: Some(Text {
                    text: text.into(),
                    mentions: Vec::new(),
                }),
            })),
        };
        self.send_to(to.into(), body).await
    }

    async fn send_to(&self, to: Peer, body: MessageBody) -> Result<MessageReply, ClientError> {
        match to {
            Peer::User(uid) => self.send(&uid, body).await,
            Peer::Group(group) => self.send_group(group, body).await,
        }
    }

    /// Marks `conversation` read up to `seq` (a `conv_seq`); the answer is
    /// the read state after it, whose cursor may be past `seq` (it never
    /// moves back). Retried on time-outs like a send: a read is idempotent.
    pub async fn read(&self, conversation: &str, seq: u64) -> Result<ReadReply, ClientError> {
        let request = ReadRequest {
            conversation: conversation.to_string(),
            seq,
        };
        let body = Bytes::from(request.encode_to_vec());
        let frame = self.request_retrying(Op::Read, body, None).await?;
        if frame.op != Op::ReadReply {
            return Err(ClientError::Protocol(format!(
                "expected ReadReply, got {}",
                frame.op.name()
            )));
        }
        frame
            .message()
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Tells the others in `conversation` that this user is typing. The
    /// server does not answer one that it takes, so this returns once the
    /// notice is written to the socket; a refusal (rate limited, not a
    /// member) comes later and is dropped, as is a notice not written
    /// within the ack time-out: typing is best-effort and never resent.
    pub async fn typing(&self, conversation: &str) -> Result<(), ClientError> {
        let typing = Typing {
            conversation: conversation.to_string(),
        };
        self.request(Op::Typing, Bytes::from(typing.encode_to_vec()))
            .await
            .map(|_| ())
    }

    /// A request sent again after a time-out or disconnect, and after a
    /// refusal worth another try, up to `send_attempts` times; for requests
    /// the server takes once however often they come (a send, by its
    /// `client_seq`; a read).
    async fn request_retrying(
        &self,
        op: Op,
        body: Bytes,
        send: Option<SendKey>,
    ) -> Result<Frame, ClientError> {
        let mut backoff = Duration::from_millis(50);
        let mut last = ClientError::Timeout;
        for attempt in 0..self.config.send_attempts.max(1) {
            if attempt > 0 {
                self.shared.stats.resends.fetch_add(1, Ordering::Relaxed);
            }
            match self.request_send(op, body.clone(), send.clone()).await {
                Ok(frame) => return Ok(frame),
                Err(e) if e.retryable() => {
                    if e != ClientError::Timeout {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// One request/reply exchange; an `Error` reply becomes `Rejected`.
    async fn request(&self, op: Op, body: Bytes) -> Result<Frame, ClientError> {
        self.request_send(op, body, None).await
    }

    /// [`Client::request`], for a send with its key.
    async fn request_send(
        &self,
        op: Op,
        body: Bytes,
        send: Option<SendKey>,
    ) -> Result<Frame, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request {
                op,
                body,
                reply,
                send,
            })
            .await
            .map_err(|_| ClientError::Shut)?;
        let frame = match tokio::time::timeout(self.config.ack_timeout, answer).await {
            Err(_) => return Err(ClientError::Timeout),
            Ok(Err(_)) => return Err(ClientError::Disconnected),
            Ok(Ok(result)) => result?,
        };
        if frame.op == Op::Error {
            let error: ErrorReply = frame
                .message()
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            let code = ErrorCode::from_u32(error.code).unwrap_or(ErrorCode::Internal);
            return Err(ClientError::Rejected {
                code,
                message: error.message,
                until_ms: (error.until_ms != 0).then_some(error.until_ms),
            });
        }
        Ok(frame)
    }

    /// Sends a heartbeat and waits for the reply; returns the server time.
    pub async fn ping(&self) -> Result<i64, ClientError> {
        let frame = self.request(Op::Heartbeat, Bytes::new()).await?;
        let reply: natter_proto::msg::HeartbeatReply = frame
            .message()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(reply.server_time_ms)
    }

    /// Asks the driver to sync now; missed messages arrive as events.
    pub async fn sync(&self) -> Result<(), ClientError> {
        self.sync_within(self.config.ack_timeout).await
    }

    /// [`Client::sync`] with its own deadline for all pages.
    pub async fn sync_within(&self, deadline: Duration) -> Result<(), ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request {
                op: Op::Sync,
                body: Bytes::new(),
                reply,
                send: None,
            })
            .await
            .map_err(|_| ClientError::Shut)?;
        match tokio::time::timeout(deadline, answer).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Err(_)) => Err(ClientError::Disconnected),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok(frame))) if frame.op == Op::Error => {
                let error: ErrorReply = frame
                    .message()
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                let code = ErrorCode::from_u32(error.code).unwrap_or(ErrorCode::Internal);
                Err(ClientError::Rejected {
                    code,
                    message: error.message,
                    until_ms: (error.until_ms != 0).then_some(error.until_ms),
                })
            }
            Ok(Ok(Ok(_))) => Ok(()),
        }
    }

    /// A page of a conversation's history over HTTP, newest first.
    pub async fn history(
        &self,
        conversation: &str,
        before: Option<u64>,
        limit: u32,
        types: &[&str],
    ) -> Result<HistoryPage, ClientError> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(before) = before {
            query.push(("before", before.to_string()));
        }
        if !types.is_empty() {
            query.push(("types", types.join(",")));
        }
        self.get_json(
            &format!("/v1/conversations/{conversation}/messages"),
            &query,
        )
        .await
    }

    /// Marks `conversation` read up to `seq` over HTTP (`POST
    /// /v1/conversations/{id}/read`), for an application without a
    /// connection at hand; [`Client::read`] does the same over the
    /// WebSocket.
    pub async fn mark_read(&self, conversation: &str, seq: u64) -> Result<ReadState, ClientError> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/conversations/{conversation}/read"),
            Some(&MarkRead { seq }),
        )
        .await
    }

    /// A page of the user's conversations (`GET /v1/conversations`): pinned
    /// first, then newest activity first, with unread counts. Pass the
    /// page's `next` as `after` for the one after it.
    pub async fn conversations(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<ConversationPage, ClientError> {
        let mut url = format!("/v1/conversations?limit={limit}");
        if let Some(after) = after {
            url.push_str("&after=");
            url.push_str(after);
        }
        self.call(reqwest::Method::GET, &url, None::<&()>).await
    }

    /// Changes the user's settings for a conversation (`PUT
    /// /v1/conversations/{id}/settings`); returns them all.
    pub async fn set_settings(
        &self,
        conversation: &str,
        update: &SettingsUpdate,
    ) -> Result<SettingsView, ClientError> {
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/conversations/{conversation}/settings"),
            Some(update),
        )
        .await
    }

    /// Who has read message `mid` of `conversation`.
    pub async fn receipts(
        &self,
        conversation: &str,
        mid: u64,
    ) -> Result<ReceiptsView, ClientError> {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/conversations/{conversation}/messages/{mid}/receipts"),
            None::<&()>,
        )
        .await
    }

    /// Creates a group with the caller as owner.
    pub async fn create_group(&self, request: &CreateGroup) -> Result<GroupView, ClientError> {
        self.call(reqwest::Method::POST, "/v1/groups", Some(request))
            .await
    }

    /// Any call of the HTTP API as this client's user: `body` is sent as
    /// JSON, and the answer read as `T` (`()` for the empty answers).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let json = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.http_json(method, path, &[], json).await
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ClientError> {
        self.http_json(reqwest::Method::GET, path, query, None)
            .await
    }

    async fn http_json<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let http = {
            let mut slot = self.shared.http.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert_with(reqwest::Client::new).clone()
        };
        let mut request = http
            .request(method, format!("http://{}{}", self.config.server, path))
            .query(query)
            .bearer_auth(&self.config.token);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => match e.error_code() {
                    Some(code) => ClientError::Rejected {
                        code,
                        message: e.message,
                        until_ms: e.until_ms,
                    },
                    None => ClientError::Http(format!("{status}: {}", e.message)),
                },
                Err(_) => {
                    ClientError::Http(format!("{status}: {}", String::from_utf8_lossy(&bytes)))
                }
            });
        }
        // An empty answer (204) reads as JSON null, which `()` accepts.
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Closes the connection; the event stream ends.
    pub async fn close(&self) {
        let _ = self.commands.send(Command::Close).await;
    }
}

fn decode_reply(frame: &Frame) -> Result<MessageReply, ClientError> {
    if frame.op != Op::MessageReply {
        return Err(ClientError::Protocol(format!(
            "expected MessageReply, got {}",
            frame.op.name()
        )));
    }
    frame
        .message()
        .map_err(|e| ClientError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connecting_to_a_server_that_never_answers_times_out() {
        // Accepts TCP connections and never says a word.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                sockets.push(socket);
            }
        });
        let mut config = ClientConfig::new(addr.to_string(), "token");
        config.ack_timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let result = Client::connect(config).await;
        assert!(
            matches!(result, Err(ClientError::Timeout)),
            "{:?}",
            result.err()
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        held.abort();
    }

    /// A gateway on port 0 that answers the auth of its n-th connection as
    /// `script[n]` says: `None` accepts (as user "Ann") and then closes the
    /// connection normally, a code refuses with that close code. Every
    /// auth request it gets is passed on.
    async fn scripted_gateway(
        script: Vec<Option<ErrorCode>>,
    ) -> (
        String,
        mpsc::Receiver<natter_proto::msg::AuthRequest>,
        tokio::task::JoinHandle<()>,
    ) {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        use tokio_tungstenite::tungstenite::Message as WsMessage;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        // One auth per connection of the script, so it never fills.
        let (auths, auths_rx) = mpsc::channel(script.len().max(1));
        let task = tokio::spawn(async move {
            for answer in script {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(socket).await else {
                    return;
                };
                let Some(Ok(WsMessage::Binary(bytes))) = ws.next().await else {
                    return;
                };
                let frame = Frame::decode(&bytes, natter_proto::frame::DEFAULT_MAX_BODY)
                    .expect("an auth frame");
                let _ = auths.try_send(frame.message().expect("an auth body"));
                let close = match answer {
                    None => {
                        let reply = natter_proto::msg::AuthReply {
                            uid: "Ann".into(),
                            device: "tablet".into(),
                            heartbeat_interval_ms: 30_000,
                            ..Default::default()
                        };
                        let reply = Frame::new(Op::AuthReply, frame.seq, 0, &reply);
                        let _ = ws.send(WsMessage::Binary(reply.encode())).await;
                        CloseFrame {
                            code: CloseCode::Normal,
                            reason: "bye".into(),
                        }
                    }
                    Some(code) => CloseFrame {
                        code: CloseCode::from(4000 + code as u16),
                        reason: code.to_string().into(),
                    },
                };
                let _ = ws.close(Some(close)).await;
            }
        });
        (addr, auths_rx, task)
    }

    #[tokio::test]
    async fn auth_unavailable_is_retried_and_a_refused_session_is_final() {
        for last in [
            ErrorCode::AuthFailed,
            ErrorCode::TokenExpired,
            ErrorCode::LoggedOut,
        ] {
            let script = vec![
                None,
                Some(ErrorCode::AuthUnavailable),
                Some(ErrorCode::AuthUnavailable),
                Some(last),
            ];
            let (addr, mut auths, gateway) = scripted_gateway(script).await;
            let mut config = ClientConfig::new(addr, "token");
            config.device = Some("tablet".into());
            config.ack_timeout = Duration::from_secs(2);
            let (client, mut events) = Client::connect(config).await.expect("connects");
            assert_eq!(client.uid().as_str(), "Ann");
            let mut seen = Vec::new();
            // The stream ends once the driver gives up.
            while let Some(event) = tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .expect("the client settles")
            {
                seen.push(event);
            }
            let ann = UserId::parse("Ann").expect("valid");
            assert!(
                matches!(&seen[..], [
                    Event::Connected { uid, .. },
                    Event::Disconnected { fatal: false, .. },
                    Event::Disconnected { error: ClientError::Closed { code, .. }, fatal: true },
                ] if *uid == ann && *code == last),
                "{last}: {seen:?}"
            );
            // Two refusals as unavailable were retried; the final one was not.
            let mut devices = Vec::new();
            while let Ok(auth) = auths.try_recv() {
                devices.push(auth.device);
            }
            assert_eq!(devices, vec!["tablet"; 4], "{last}");
            assert_eq!(client.stats().reconnects.load(Ordering::Relaxed), 0);
            gateway.await.expect("the gateway ran its script");
        }
    }

    #[test]
    fn only_a_refused_session_is_over() {
        let closed = |code| ClientError::Closed {
            code,
            reason: String::new(),
        };
        for code in [
            ErrorCode::AuthFailed,
            ErrorCode::TokenExpired,
            ErrorCode::LoggedOut,
            ErrorCode::Replaced,
        ] {
            assert!(closed(code).session_over(), "{code}");
        }
        for code in [ErrorCode::AuthUnavailable, ErrorCode::ServerShutdown] {
            assert!(!closed(code).session_over(), "{code}");
        }
        assert!(!ClientError::Disconnected.session_over());
        assert!(!ClientError::Timeout.session_over());
    }
}
