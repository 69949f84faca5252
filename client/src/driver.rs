//! The task that owns the client's socket: one `select!` loop over the
//! socket, the command queue and the heartbeat timer, and a reconnect loop
//! around it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use natter_proto::msg::{
    AuthReply, AuthRequest, Disconnect, Message, MessageReply, Notify, ReadReceipt, SyncReply,
    SyncRequest, TypingNotice, NOTIFY_GROUP_EVENT, NOTIFY_READ, NOTIFY_TYPING,
};
use natter_proto::{ErrorCode, Frame, Op, UserId};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::raw::{Connection, Incoming};
use crate::{ClientConfig, ClientError, Command, Event, SendKey, Shared};

/// Mids remembered for de-duplication.
const SEEN_CAPACITY: usize = 100_000;
/// This device's own messages remembered, when they came back by sync or
/// push with no send waiting for them, to answer a resend still queued.
const OWN_CAPACITY: usize = 1024;
const SYNC_PAGE: u32 = 200;
/// Typing notices remembered, so that the server's refusal of one (it
/// answers only refusals) is told from an error nobody waits for.
const TYPING_CAPACITY: usize = 64;

/// Connects and authenticates once; the user id is the reply's, parsed.
pub(crate) async fn open(
    config: &ClientConfig,
) -> Result<(Connection, AuthReply, UserId), ClientError> {
    let connect = Connection::connect(&config.server, config.local_addr);
    let mut conn = tokio::time::timeout(config.ack_timeout, connect)
        .await
        .map_err(|_| ClientError::Timeout)??;
    let auth = AuthRequest {
        token: config.token.clone(),
        client: config.client_name.clone(),
        device: config.device.clone().unwrap_or_default(),
    };
    conn.send(&Frame::new(Op::Auth, 1, 0, &auth)).await?;
    let reply = tokio::time::timeout(config.ack_timeout, async {
        loop {
            match conn.recv().await? {
                None => return Err(ClientError::Disconnected),
                Some(Incoming::Close { code, reason }) => {
                    return Err(ClientError::closed(code, reason))
                }
                Some(Incoming::BadFrame(e)) => return Err(ClientError::Protocol(e.to_string())),
                Some(Incoming::Frame(frame)) => match frame.op {
                    Op::AuthReply => {
                        return frame
                            .message::<AuthReply>()
                            .map_err(|e| ClientError::Protocol(e.to_string()))
                    }
                    Op::Disconnect => {
                        let d: Disconnect = frame
                            .message()
                            .map_err(|e| ClientError::Protocol(e.to_string()))?;
                        let code = ErrorCode::from_u32(d.code).unwrap_or(ErrorCode::Internal);
                        return Err(ClientError::Closed {
                            code,
                            reason: d.reason,
                        });
                    }
                    _ => continue,
                },
            }
        }
    })
    .await
    .map_err(|_| ClientError::Timeout)??;
    let uid = UserId::parse(&reply.uid)
        .map_err(|e| ClientError::Protocol(format!("auth reply: {e}: {:?}", reply.uid)))?;
    Ok((conn, reply, uid))
}

/// The highest `user_seq` below which this device has seen everything.
#[derive(Default)]
struct Cursor {
    contiguous: u64,
    above: BTreeSet<u64>,
}

impl Cursor {
    fn mark(&mut self, seq: u64) {
        if seq <= self.contiguous {
            return;
        }
        self.above.insert(seq);
        while self.above.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
    }

    /// Jumps forward: everything up to `seq` is held.
    fn advance_to(&mut self, seq: u64) {
        if seq > self.contiguous {
            self.contiguous = seq;
            self.above = self.above.split_off(&(seq + 1));
            while self.above.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
        }
    }
}

/// The mids seen, each with the state it was seen in: the time of its
/// latest change (edit or revoke), 0 for none.
#[derive(Default)]
struct Seen {
    changed: HashMap<u64, i64>,
    order: VecDeque<u64>,
}

/// When `message` last changed (an edit or its revoke), 0 if never.
fn changed_ms(message: &Message) -> i64 {
    message.edited_ms.max(message.revoked_ms)
}

impl Seen {
    /// True if `mid` is new, or comes in a newer state (`changed`, the
    /// time of its latest change) than it was seen in.
    fn insert(&mut self, mid: u64, changed: i64) -> bool {
        match self.changed.get_mut(&mid) {
            Some(seen) if *seen >= changed => false,
            Some(seen) => {
                *seen = changed;
                true
            }
            None => {
                self.changed.insert(mid, changed);
                self.order.push_back(mid);
                if self.order.len() > SEEN_CAPACITY {
                    if let Some(old) = self.order.pop_front() {
                        self.changed.remove(&old);
                    }
                }
                true
            }
        }
    }
}

/// This device's own messages that came back (by sync or push) before
/// any send of theirs was waiting: the answer to a resend of one of them
/// that is still in the command queue.
#[derive(Default)]
struct Own {
    replies: HashMap<u64, (SendKey, MessageReply)>,
    order: VecDeque<u64>,
}

impl Own {
    fn remember(&mut self, key: SendKey, reply: MessageReply) {
        let client_seq = key.client_seq;
        if self.replies.insert(client_seq, (key, reply)).is_none() {
            self.order.push_back(client_seq);
            if self.order.len() > OWN_CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.replies.remove(&old);
                }
            }
        }
    }

    /// The stored message a send of `key` would be answered with. (A
    /// `client_seq` reused for another receiver is left to the server,
    /// which refuses it.)
    fn answer(&self, key: &SendKey) -> Option<&MessageReply> {
        self.replies
            .get(&key.client_seq)
            .filter(|(k, _)| k == key)
            .map(|(_, reply)| reply)
    }
}

type Report = oneshot::Sender<Result<Frame, ClientError>>;

enum Waiter {
    App(Report),
    /// A `Message` request: its reply may also come from the stored
    /// message itself, when it reaches this device by sync or push first.
    Send {
        report: Report,
        key: SendKey,
    },
    /// The driver's own sync of the user's stream; `report` answers an
    /// application's `sync()` once the stream and every group it names are done.
    Sync {
        report: Option<Report>,
        /// The `after` the request carried.
        after: u64,
    },
    /// A sync of one group, started by a stream sync.
    GroupSync {
        group: u64,
        after: u64,
    },
}

impl Waiter {
    /// Whether a reply up to `cursor` with `has_more` false still needs
    /// one more page: the server records a sync's `after` as the device's
    /// cursor, so a driver's sync that returned messages ends with a page
    /// asked from its end, which vouches for what it returned.
    fn vouch_needed(&self, cursor: u64) -> bool {
        match self {
            Waiter::Sync { after, .. } | Waiter::GroupSync { after, .. } => cursor > *after,
            Waiter::App(_) | Waiter::Send { .. } => false,
        }
    }
}

/// Why one connection ended.
enum End {
    Closed(ClientError),
    /// The application closed the client.
    Shut,
}

pub(crate) struct Driver {
    config: Arc<ClientConfig>,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    pending: HashMap<u32, Waiter>,
    next_seq: u32,
    cursor: Cursor,
    /// Per group: the highest `conv_seq` below which this device has seen everything.
    groups: HashMap<u64, Cursor>,
    /// Group syncs still running, and the `sync()` calls waiting for them.
    group_syncs: usize,
    waiting: Vec<Report>,
    seen: Seen,
    own: Own,
    /// The seqs of the latest typing notices sent on this connection.
    typing: VecDeque<u32>,
    /// Pushes handed to the application but not yet acknowledged: the last
    /// one's seq (the ack covers it and all before it), how many, and when
    /// the ack is due.
    unacked: Option<Unacked>,
}

struct Unacked {
    last: u32,
    count: u32,
    due: Instant,
}

impl Driver {
    pub(crate) fn new(
        config: Arc<ClientConfig>,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
    ) -> Driver {
        Driver {
            config,
            shared,
            commands,
            events,
            pending: HashMap::new(),
            next_seq: 1,
            cursor: Cursor::default(),
            groups: HashMap::new(),
            group_syncs: 0,
            waiting: Vec::new(),
            seen: Seen::default(),
            own: Own::default(),
            typing: VecDeque::new(),
            unacked: None,
        }
    }

    fn seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1).max(2);
        self.next_seq
    }

    pub(crate) async fn run(mut self, mut conn: Connection, mut auth: AuthReply, mut uid: UserId) {
        self.cursor.contiguous = self.config.cursor.unwrap_or(auth.cursor);
        let mut backoff = Duration::from_millis(100);
        loop {
            let _ = self
                .events
                .send(Event::Connected {
                    uid: uid.clone(),
                    device: auth.device.clone(),
                })
                .await;
            let heartbeat = self
                .config
                .heartbeat
                .unwrap_or(Duration::from_millis(u64::from(
                    auth.heartbeat_interval_ms.max(1000),
                )));
            let end = self.serve(&mut conn, heartbeat).await;
            conn.close().await;
            // Whatever was waiting on this connection may be retried by its owner.
            for (_, waiter) in self.pending.drain() {
                if let Waiter::App(reply)
                | Waiter::Send { report: reply, .. }
                | Waiter::Sync {
                    report: Some(reply),
                    ..
                } = waiter
                {
                    let _ = reply.send(Err(ClientError::Disconnected));
                }
            }
            self.group_syncs = 0;
            for reply in self.waiting.drain(..) {
                let _ = reply.send(Err(ClientError::Disconnected));
            }
            let error = match end {
                End::Shut => return,
                End::Closed(error) => error,
            };
            let fatal = !self.config.reconnect || error.session_over();
            let _ = self.events.send(Event::Disconnected { error, fatal }).await;
            if fatal {
                return;
            }
            // Reconnect with back-off; commands wait in their queue meanwhile.
            loop {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                match open(&self.config).await {
                    Ok((c, a, u)) => {
                        conn = c;
                        auth = a;
                        uid = u;
                        backoff = Duration::from_millis(100);
                        self.shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    // A refused token (or a logged-out user) stays refused: say
                    // so once and stop, rather than knock again every few seconds.
                    // `auth_unavailable` is not among them and is retried below.
                    Err(error) if error.session_over() => {
                        let _ = self
                            .events
                            .send(Event::Disconnected { error, fatal: true })
                            .await;
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "reconnect failed"),
                }
                if self.events.is_closed() {
                    return;
                }
            }
        }
    }

    async fn send_sync(
        &mut self,
        conn: &mut Connection,
        report: Option<oneshot::Sender<Result<Frame, ClientError>>>,
    ) -> Result<(), ClientError> {
        let seq = self.seq();
        let after = self.cursor.contiguous;
        let request = SyncRequest {
            after: Some(after),
            limit: SYNC_PAGE,
            group: 0,
        };
        conn.send(&Frame::new(Op::Sync, seq, 0, &request)).await?;
        self.pending.insert(seq, Waiter::Sync { report, after });
        Ok(())
    }

    async fn send_group_sync(
        &mut self,
        conn: &mut Connection,
        group: u64,
    ) -> Result<(), ClientError> {
        let seq = self.seq();
        let after = self.groups.entry(group).or_default().contiguous;
        let request = SyncRequest {
            after: Some(after),
            limit: SYNC_PAGE,
            group,
        };
        conn.send(&Frame::new(Op::Sync, seq, 0, &request)).await?;
        self.pending.insert(seq, Waiter::GroupSync { group, after });
        Ok(())
    }

    /// A group sync finished (or failed: the group is skipped, e.g. left
    /// meanwhile); the last one answers the waiting `sync()` calls.
    fn group_sync_done(&mut self) {
        self.group_syncs = self.group_syncs.saturating_sub(1);
        if self.group_syncs == 0 {
            for report in self.waiting.drain(..) {
                let _ = report.send(Ok(Frame::empty(Op::SyncReply, 0, 0)));
            }
        }
    }

    async fn serve(&mut self, conn: &mut Connection, heartbeat: Duration) -> End {
        if self.config.auto_sync {
            if let Err(e) = self.send_sync(conn, None).await {
                return End::Closed(e);
            }
        }
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        let silence = heartbeat * 3;
        let mut last_heard = Instant::now();
        // Acks of the previous connection's pushes mean nothing on this
        // one, nor do its typing notices.
        self.unacked = None;
        self.typing.clear();
        let ack_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(ack_timer);
        loop {
            let ack_due = self.unacked.as_ref().map(|u| u.due);
            if let Some(due) = ack_due {
                if ack_timer.deadline() != due {
                    ack_timer.as_mut().reset(due);
                }
            }
            tokio::select! {
                _ = &mut ack_timer, if ack_due.is_some() => {
                    if let Err(e) = self.send_ack(conn).await {
                        return End::Closed(e);
                    }
                }
                incoming = conn.recv() => {
                    last_heard = Instant::now();
                    let result = match incoming {
                        Err(e) => Err(End::Closed(e)),
                        Ok(None) => Err(End::Closed(ClientError::Disconnected)),
                        Ok(Some(Incoming::Close { code, reason })) => Err(End::Closed(ClientError::closed(code, reason))),
                        Ok(Some(Incoming::BadFrame(e))) => {
                            let _ = self.events.send(Event::ProtocolError(e.to_string())).await;
                            Ok(())
                        }
                        Ok(Some(Incoming::Frame(frame))) => self.frame(conn, frame).await,
                    };
                    if let Err(end) = result {
                        return end;
                    }
                }
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => {
                        // What the application has is acknowledged before leaving.
                        let _ = self.send_ack(conn).await;
                        return End::Shut;
                    }
                    Some(Command::Request { op, body, reply, send }) => {
                        if reply.is_closed() {
                            continue; // Its sender gave up waiting; a resend follows.
                        }
                        if let Some(answer) = send.as_ref().and_then(|key| self.own.answer(key)) {
                            // The message is stored: it came back to this device already.
                            let _ = reply.send(Ok(Frame::new(Op::MessageReply, 0, 0, answer)));
                            continue;
                        }
                        let sent = if op == Op::Sync {
                            self.send_sync(conn, Some(reply)).await
                        } else if op == Op::Typing {
                            self.send_typing(conn, body, reply).await
                        } else {
                            let seq = self.seq();
                            let waiter = match send {
                                Some(key) => Waiter::Send { report: reply, key },
                                None => Waiter::App(reply),
                            };
                            self.pending.insert(seq, waiter);
                            conn.send(&Frame::raw(op, seq, 0, body)).await
                        };
                        if let Err(e) = sent {
                            return End::Closed(e);
                        }
                    }
                },
                _ = ticker.tick() => {
                    if last_heard.elapsed() > silence {
                        return End::Closed(ClientError::Timeout);
                    }
                    let seq = self.seq();
                    if let Err(e) = conn.send(&Frame::empty(Op::Heartbeat, seq, 0)).await {
                        return End::Closed(e);
                    }
                }
            }
        }
    }

    /// Sends a typing notice, which the server answers only if it refuses
    /// it: the request is done once the notice is written.
    async fn send_typing(
        &mut self,
        conn: &mut Connection,
        body: bytes::Bytes,
        reply: Report,
    ) -> Result<(), ClientError> {
        let seq = self.seq();
        conn.send(&Frame::raw(Op::Typing, seq, 0, body)).await?;
        self.typing.push_back(seq);
        if self.typing.len() > TYPING_CAPACITY {
            self.typing.pop_front();
        }
        let _ = reply.send(Ok(Frame::empty(Op::Typing, seq, 0)));
        Ok(())
    }

    /// Whether `seq` numbered a typing notice (forgotten once answered).
    fn was_typing(&mut self, seq: u32) -> bool {
        match self.typing.iter().position(|s| *s == seq) {
            Some(at) => {
                self.typing.remove(at);
                true
            }
            None => false,
        }
    }

    /// A read receipt or typing notice for the application; one whose
    /// payload does not decode is reported and skipped (neither is part of
    /// any history, so nothing is missing for it).
    fn transient<M: prost::Message + Default>(
        notify: &Notify,
        event: impl FnOnce(M) -> Event,
    ) -> Event {
        match M::decode(notify.payload.as_slice()) {
            Ok(payload) => event(payload),
            Err(e) => Event::ProtocolError(format!("{} notify: {e}", notify.kind)),
        }
    }

    /// The push numbered `seq` is with the application: its ack (which
    /// covers every push before it) goes out now or after the configured
    /// delay, with those that arrive meanwhile.
    async fn handled(&mut self, conn: &mut Connection, seq: u32) -> Result<(), ClientError> {
        let delay = self.config.push_ack_delay;
        let unacked = self.unacked.get_or_insert(Unacked {
            last: seq,
            count: 0,
            due: Instant::now() + delay,
        });
        unacked.last = seq;
        unacked.count += 1;
        if delay.is_zero() || unacked.count >= crate::PUSH_ACK_BATCH {
            self.send_ack(conn).await?;
        }
        Ok(())
    }

    /// Acknowledges every push handled so far, if any.
    async fn send_ack(&mut self, conn: &mut Connection) -> Result<(), ClientError> {
        if let Some(unacked) = self.unacked.take() {
            conn.send(&Frame::empty(Op::PushAck, 0, unacked.last))
                .await?;
        }
        Ok(())
    }

    /// Hands a message to the application unless it was seen before or
    /// this device sent it.
    async fn deliver(&mut self, message: Message) -> Result<(), End> {
        if message.group != 0 {
            self.groups
                .entry(message.group)
                .or_default()
                .mark(message.conv_seq);
        } else {
            self.cursor.mark(message.user_seq);
        }
        if self.is_own(&message) {
            self.own_message(&message);
            return Ok(());
        }
        if !self.seen.insert(message.mid, changed_ms(&message)) {
            self.shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.events
            .send(Event::Message(message))
            .await
            .map_err(|_| End::Shut)
    }

    /// Whether this device sent `message`. (Group events carry no device.)
    fn is_own(&self, message: &Message) -> bool {
        // Byte for byte: ids that differ only in case are other users.
        message.sender == self.shared.uid.as_str()
            && !message.sender_device.is_empty()
            && message.sender_device == self.shared.device
    }

    /// This device's own message, back by sync or push: the server holds
    /// it, so it answers every send of its `client_seq` still waiting (its
    /// ack may have been lost, say in a crash just after the commit), and
    /// the application, which sent it, is not told of it again.
    fn own_message(&mut self, message: &Message) {
        self.shared.stats.own_copies.fetch_add(1, Ordering::Relaxed);
        let fresh = self.seen.insert(message.mid, changed_ms(message));
        let key = SendKey {
            client_seq: message.client_seq,
            receiver: message.receiver.clone(),
            group: message.group,
        };
        let reply = MessageReply {
            mid: message.mid,
            time_ms: message.time_ms,
            conv_seq: message.conv_seq,
            user_seq: message.user_seq,
            repeat: true,
            conversation: message.conversation.clone(),
        };
        let waiting: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, w)| matches!(w, Waiter::Send { key: k, .. } if *k == key))
            .map(|(seq, _)| *seq)
            .collect();
        if waiting.is_empty() {
            if fresh {
                self.own.remember(key, reply);
            }
            return;
        }
        for seq in waiting {
            if let Some(Waiter::Send { report, .. }) = self.pending.remove(&seq) {
                let _ = report.send(Ok(Frame::new(Op::MessageReply, seq, 0, &reply)));
            }
        }
    }

    async fn frame(&mut self, conn: &mut Connection, frame: Frame) -> Result<(), End> {
        let protocol =
            |e: natter_proto::BodyError| End::Closed(ClientError::Protocol(e.to_string()));
        match frame.op {
            Op::Push => {
                let message: Message = frame.message().map_err(protocol)?;
                self.shared.stats.pushes.fetch_add(1, Ordering::Relaxed);
                self.deliver(message).await?;
                // Acknowledged only once the application has it.
                self.handled(conn, frame.seq).await.map_err(End::Closed)
            }
            Op::Notify => {
                let notify: Notify = frame.message().map_err(protocol)?;
                if notify.kind == NOTIFY_GROUP_EVENT {
                    // A group event is a message of the group's history.
                    let message = Message::decode(notify.payload.as_slice())
                        .map_err(|e| End::Closed(ClientError::Protocol(e.to_string())))?;
                    self.shared.stats.pushes.fetch_add(1, Ordering::Relaxed);
                    self.deliver(message).await?;
                } else {
                    let event = match notify.kind.as_str() {
                        NOTIFY_READ => Self::transient::<ReadReceipt>(&notify, Event::Read),
                        NOTIFY_TYPING => Self::transient::<TypingNotice>(&notify, Event::Typing),
                        _ => Event::Notify(notify),
                    };
                    self.events.send(event).await.map_err(|_| End::Shut)?;
                }
                // Notifies are numbered and acknowledged like pushes.
                self.handled(conn, frame.seq).await.map_err(End::Closed)
            }
            Op::Disconnect => {
                let d: Disconnect = frame.message().map_err(protocol)?;
                let code = ErrorCode::from_u32(d.code).unwrap_or(ErrorCode::Internal);
                Err(End::Closed(ClientError::Closed {
                    code,
                    reason: d.reason,
                }))
            }
            Op::SyncReply => {
                let Some(waiter) = self.pending.remove(&frame.seq) else {
                    return Ok(());
                };
                let reply: SyncReply = frame.message().map_err(protocol)?;
                let cursor = reply.cursor;
                let has_more = reply.has_more || waiter.vouch_needed(cursor);
                for message in reply.messages {
                    self.shared.stats.synced.fetch_add(1, Ordering::Relaxed);
                    self.deliver(message).await?;
                }
                if let Waiter::GroupSync { group, .. } = waiter {
                    self.groups.entry(group).or_default().advance_to(cursor);
                    if has_more {
                        return self.send_group_sync(conn, group).await.map_err(End::Closed);
                    }
                    self.group_sync_done();
                    return Ok(());
                }
                // The reply covers everything up to its cursor.
                self.cursor.advance_to(cursor);
                if !has_more && !reply.groups.is_empty() {
                    // (A page that needs vouching for comes back with the
                    // groups once more.)
                    // The stream is done; the groups it names follow.
                    for g in &reply.groups {
                        self.groups.entry(g.group).or_default().advance_to(g.cursor);
                        self.send_group_sync(conn, g.group)
                            .await
                            .map_err(End::Closed)?;
                        self.group_syncs += 1;
                    }
                    if let Waiter::Sync {
                        report: Some(report),
                        ..
                    }
                    | Waiter::App(report) = waiter
                    {
                        self.waiting.push(report);
                    }
                    return Ok(());
                }
                if !has_more && self.group_syncs > 0 {
                    if let Waiter::Sync {
                        report: Some(report),
                        ..
                    }
                    | Waiter::App(report) = waiter
                    {
                        self.waiting.push(report);
                    }
                    return Ok(());
                }
                match waiter {
                    Waiter::Sync { report, .. } if has_more => {
                        self.send_sync(conn, report).await.map_err(End::Closed)
                    }
                    Waiter::Sync {
                        report: Some(report),
                        ..
                    }
                    | Waiter::App(report)
                    | Waiter::Send { report, .. } => {
                        let _ = report.send(Ok(Frame::empty(Op::SyncReply, frame.seq, 0)));
                        Ok(())
                    }
                    Waiter::Sync { report: None, .. } => Ok(()),
                    Waiter::GroupSync { .. } => Ok(()),
                }
            }
            Op::Error if self.was_typing(frame.seq) => {
                // Typing is best-effort: its refusal (rate limited, say)
                // has no one waiting and is no protocol error.
                if let Ok(error) = frame.message::<natter_proto::msg::ErrorReply>() {
                    tracing::debug!(code = error.code, message = %error.message, "typing notice refused");
                }
                Ok(())
            }
            Op::MessageReply | Op::HeartbeatReply | Op::ReadReply | Op::Error => {
                if frame.op == Op::MessageReply {
                    if let Ok(reply) = frame.message::<MessageReply>() {
                        // The sender's own message is part of its stream (or its group).
                        match reply
                            .conversation
                            .strip_prefix("g:")
                            .and_then(|g| g.parse().ok())
                        {
                            Some(group) => {
                                self.groups.entry(group).or_default().mark(reply.conv_seq)
                            }
                            None => self.cursor.mark(reply.user_seq),
                        }
                        self.seen.insert(reply.mid, 0);
                    }
                }
                match self.pending.remove(&frame.seq) {
                    // A group that cannot be synced (left meanwhile) is skipped.
                    Some(Waiter::GroupSync { .. }) => self.group_sync_done(),
                    // A sync answered by an error is reported too; the next connect syncs again.
                    Some(Waiter::App(reply))
                    | Some(Waiter::Send { report: reply, .. })
                    | Some(Waiter::Sync {
                        report: Some(reply),
                        ..
                    }) => {
                        let _ = reply.send(Ok(frame));
                    }
                    // The connect-time sync failed: reconnect (with back-off) and sync again,
                    // rather than stay connected with messages missing.
                    Some(Waiter::Sync { report: None, .. }) if frame.op == Op::Error => {
                        let error = frame
                            .message::<natter_proto::msg::ErrorReply>()
                            .map(|e| ClientError::Rejected {
                                code: ErrorCode::from_u32(e.code).unwrap_or(ErrorCode::Internal),
                                message: e.message,
                                until_ms: None,
                            })
                            .unwrap_or_else(|e| ClientError::Protocol(e.to_string()));
                        return Err(End::Closed(error));
                    }
                    Some(Waiter::Sync { report: None, .. }) => {}
                    None if frame.op == Op::Error => {
                        let text = frame
                            .message::<natter_proto::msg::ErrorReply>()
                            .map(|e| e.message)
                            .unwrap_or_else(|e| e.to_string());
                        let _ = self.events.send(Event::ProtocolError(text)).await;
                    }
                    None => {}
                }
                Ok(())
            }
            op => {
                let _ = self
                    .events
                    .send(Event::ProtocolError(format!(
                        "unexpected {} from server",
                        op.name()
                    )))
                    .await;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> UserId {
        UserId::parse(s).expect("a valid user id")
    }

    /// A driver for user "Ann", device "phone", with no connection.
    fn driver() -> (Driver, mpsc::Receiver<Event>) {
        let shared = Arc::new(Shared {
            uid: uid("Ann"),
            device: "phone".into(),
            next_client_seq: std::sync::atomic::AtomicU64::new(1),
            stats: crate::Stats::default(),
            http: std::sync::Mutex::new(None),
        });
        let (_commands, commands_rx) = mpsc::channel(1);
        let (events, events_rx) = mpsc::channel(16);
        let config = Arc::new(ClientConfig::new("127.0.0.1:1", "token"));
        (Driver::new(config, shared, commands_rx, events), events_rx)
    }

    /// Message `mid` from Ann to bob with `client_seq`, sent from `device`.
    fn from_device(device: &str, mid: u64, client_seq: u64) -> Message {
        from_user("Ann", device, mid, client_seq)
    }

    /// Message `mid` from `sender` to bob with `client_seq`, sent from `device`.
    fn from_user(sender: &str, device: &str, mid: u64, client_seq: u64) -> Message {
        Message {
            mid,
            conversation: format!("p:{sender}:bob"),
            conv_seq: 3,
            user_seq: 1,
            sender: sender.into(),
            sender_device: device.into(),
            receiver: "bob".into(),
            client_seq,
            time_ms: 1_700_000_000_000,
            body: None,
            group: 0,
            edited_ms: 0,
            revoked_ms: 0,
        }
    }

    fn key(client_seq: u64) -> SendKey {
        SendKey {
            client_seq,
            receiver: "bob".into(),
            group: 0,
        }
    }

    #[tokio::test]
    async fn the_devices_own_message_answers_its_waiting_sends_and_is_no_event() {
        let (mut d, mut events) = driver();
        // The send was tried twice (the first attempt's reply never came).
        let (first, first_answer) = oneshot::channel();
        let (second, second_answer) = oneshot::channel();
        d.pending.insert(
            5,
            Waiter::Send {
                report: first,
                key: key(42),
            },
        );
        d.pending.insert(
            9,
            Waiter::Send {
                report: second,
                key: key(42),
            },
        );
        let (other, mut other_answer) = oneshot::channel();
        d.pending.insert(
            11,
            Waiter::Send {
                report: other,
                key: key(43),
            },
        );
        // Its copy arrives (by sync or push: both come through `deliver`).
        assert!(d.deliver(from_device("phone", 900, 42)).await.is_ok());
        for answer in [first_answer, second_answer] {
            let frame = answer.await.expect("answered").expect("a reply");
            assert_eq!(frame.op, Op::MessageReply);
            let reply: MessageReply = frame.message().expect("body");
            assert_eq!(
                reply,
                MessageReply {
                    mid: 900,
                    time_ms: 1_700_000_000_000,
                    conv_seq: 3,
                    user_seq: 1,
                    repeat: true,
                    conversation: "p:Ann:bob".into(),
                }
            );
        }
        assert!(other_answer.try_recv().is_err(), "another send still waits");
        assert_eq!(d.pending.len(), 1);
        assert_eq!(d.cursor.contiguous, 1, "its place in the stream is held");
        // The same copy again (a push after the sync), then the same
        // message as another device of the user sent it: only that one is
        // for the application.
        assert!(d.deliver(from_device("phone", 900, 42)).await.is_ok());
        assert!(d.deliver(from_device("laptop", 901, 42)).await.is_ok());
        match events.try_recv() {
            Ok(Event::Message(m)) => assert_eq!(m.mid, 901),
            other => panic!("expected the laptop's message, got {other:?}"),
        }
        assert!(events.try_recv().is_err(), "nothing else");
    }

    #[tokio::test]
    async fn a_sender_whose_id_differs_only_in_case_is_another_user() {
        let (mut d, mut events) = driver();
        let (send, mut answer) = oneshot::channel();
        d.pending.insert(
            5,
            Waiter::Send {
                report: send,
                key: key(42),
            },
        );
        // Same device name, same client_seq, same receiver: only the
        // sender's id tells them apart, and it is compared byte for byte.
        for (mid, sender) in [(910, "ann"), (911, "ANN"), (912, "Ann ")] {
            assert!(d.deliver(from_user(sender, "phone", mid, 42)).await.is_ok());
        }
        assert!(answer.try_recv().is_err(), "the send still waits");
        assert!(
            d.own.answer(&key(42)).is_none(),
            "nothing taken for its own"
        );
        assert_eq!(d.shared.stats.own_copies.load(Ordering::Relaxed), 0);
        for mid in [910, 911, 912] {
            assert!(matches!(events.try_recv(), Ok(Event::Message(m)) if m.mid == mid));
        }
        // The user's own id, exactly, is its own copy.
        assert!(d.deliver(from_device("phone", 913, 42)).await.is_ok());
        assert!(answer.try_recv().is_ok(), "answered by its copy");
        assert!(events.try_recv().is_err(), "and no event");
    }

    #[tokio::test]
    async fn the_devices_own_message_with_no_send_waiting_answers_a_later_resend() {
        let (mut d, mut events) = driver();
        assert!(d.deliver(from_device("phone", 900, 42)).await.is_ok());
        assert!(events.try_recv().is_err(), "not an event");
        let reply = d.own.answer(&key(42)).expect("remembered");
        assert_eq!((reply.mid, reply.repeat), (900, true));
        // The same client_seq to someone else is the server's to refuse.
        assert!(d
            .own
            .answer(&SendKey {
                receiver: "Bob".into(),
                ..key(42)
            })
            .is_none());
        // A group event carries the actor's uid and no device: it is an event.
        let mut event = from_device("", 902, 902);
        event.group = 5;
        assert!(d.deliver(event).await.is_ok());
        assert!(matches!(events.try_recv(), Ok(Event::Message(m)) if m.mid == 902));
    }

    /// A WebSocket connection to a peer that takes what it is sent and
    /// hands it over: the client's end, and the frames that reach the peer.
    async fn wired() -> (Connection, mpsc::Receiver<Frame>) {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message as WsMessage;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (frames, frames_rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut ws) = tokio_tungstenite::accept_async(socket).await else {
                return;
            };
            while let Some(Ok(WsMessage::Binary(bytes))) = ws.next().await {
                let frame =
                    Frame::decode(&bytes, natter_proto::frame::DEFAULT_MAX_BODY).expect("a frame");
                if frames.send(frame).await.is_err() {
                    return;
                }
            }
        });
        let conn = Connection::connect(&addr, None).await.expect("connects");
        (conn, frames_rx)
    }

    fn notify(kind: &str, payload: Vec<u8>) -> Notify {
        Notify {
            kind: kind.into(),
            payload,
            ..Notify::default()
        }
    }

    fn error(code: ErrorCode, message: &str) -> natter_proto::msg::ErrorReply {
        natter_proto::msg::ErrorReply {
            code: code as u32,
            message: message.into(),
            until_ms: 0,
        }
    }

    #[tokio::test]
    async fn read_and_typing_notifies_are_typed_events_and_acknowledged() {
        let (mut d, mut events) = driver();
        let (mut conn, _frames) = wired().await;
        let receipt = ReadReceipt {
            conversation: "p:Ann:bob".into(),
            reader: "bob".into(),
            seq: 12,
            time_ms: 1_700_000_000_000,
        };
        let typing = TypingNotice {
            conversation: "g:5".into(),
            user: "cy".into(),
            time_ms: 1_700_000_000_001,
        };
        let notifies = [
            notify(NOTIFY_READ, receipt.encode_to_vec()),
            notify(NOTIFY_TYPING, typing.encode_to_vec()),
            // A payload that does not decode (a field tag of 0).
            notify(NOTIFY_READ, vec![0x00, 0x01]),
            notify("custom_kind", vec![1, 2, 3]),
        ];
        for (seq, n) in (1u32..).zip(&notifies) {
            let frame = Frame::new(Op::Notify, seq, 0, n);
            assert!(d.frame(&mut conn, frame).await.is_ok(), "{}", n.kind);
        }
        assert_eq!(events.try_recv().ok(), Some(Event::Read(receipt)));
        assert_eq!(events.try_recv().ok(), Some(Event::Typing(typing)));
        assert!(matches!(
            events.try_recv(),
            Ok(Event::ProtocolError(e)) if e.starts_with("read notify")
        ));
        assert_eq!(
            events.try_recv().ok(),
            Some(Event::Notify(notifies[3].clone()))
        );
        // None of them is a message, and all four are acknowledged.
        assert_eq!(d.shared.stats.pushes.load(Ordering::Relaxed), 0);
        assert_eq!(d.cursor.contiguous, 0);
        let unacked = d.unacked.as_ref().expect("an ack due");
        assert_eq!((unacked.last, unacked.count), (4, 4));
    }

    #[tokio::test]
    async fn a_refused_typing_notice_is_no_protocol_error_and_a_read_reply_answers_its_request() {
        let (mut d, mut events) = driver();
        let (mut conn, mut frames) = wired().await;
        let (reply, mut answer) = oneshot::channel();
        let body = natter_proto::msg::Typing {
            conversation: "p:Ann:bob".into(),
        }
        .encode_to_vec();
        d.send_typing(&mut conn, body.into(), reply)
            .await
            .expect("sent");
        // Answered once written; nothing waits for the server.
        let written = answer.try_recv().expect("answered").expect("written");
        let sent = frames.recv().await.expect("the notice reached the peer");
        assert_eq!((sent.op, sent.seq), (Op::Typing, written.seq));
        assert!(d.pending.is_empty());
        let refused = Frame::new(
            Op::Error,
            sent.seq,
            0,
            &error(ErrorCode::RateLimited, "slow down"),
        );
        assert!(d.frame(&mut conn, refused.clone()).await.is_ok());
        assert!(events.try_recv().is_err(), "a typing refusal is no event");
        // Once: the same error again answers nothing and is reported.
        assert!(d.frame(&mut conn, refused).await.is_ok());
        assert!(matches!(events.try_recv(), Ok(Event::ProtocolError(e)) if e == "slow down"));
        // A read's reply goes to the request waiting on its seq.
        let (reply, answer) = oneshot::channel();
        d.pending.insert(40, Waiter::App(reply));
        let read = natter_proto::msg::ReadReply {
            conversation: "p:Ann:bob".into(),
            read_seq: 7,
            unread: 2,
        };
        let frame = Frame::new(Op::ReadReply, 40, 0, &read);
        assert!(d.frame(&mut conn, frame).await.is_ok());
        let got = answer.await.expect("answered").expect("a reply");
        assert_eq!(got.op, Op::ReadReply);
        assert_eq!(
            got.message::<natter_proto::msg::ReadReply>().expect("body"),
            read
        );
        assert!(events.try_recv().is_err(), "and no event");
    }

    #[tokio::test]
    async fn a_message_seen_before_comes_again_only_in_a_newer_state() {
        let (mut d, mut events) = driver();
        let original = from_user("bob", "laptop", 920, 7);
        let mut edited = original.clone();
        edited.edited_ms = 1_700_000_000_500;
        edited.body = Some(natter_proto::msg::MessageBody::text("fixed"));
        let mut revoked = edited.clone();
        revoked.revoked_ms = 1_700_000_000_600;
        revoked.body = None;
        // The original, its copy, the edited version (say by a sync after
        // the edit), its copy, an older state come late, the revoked one.
        for m in [&original, &original, &edited, &edited, &original, &revoked] {
            assert!(d.deliver(m.clone()).await.is_ok());
        }
        for m in [original, edited, revoked] {
            assert_eq!(events.try_recv().ok(), Some(Event::Message(m)));
        }
        assert!(events.try_recv().is_err(), "nothing else");
        assert_eq!(d.shared.stats.duplicates.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn own_replies_are_bounded() {
        let mut own = Own::default();
        for seq in 0..(OWN_CAPACITY as u64 + 10) {
            own.remember(key(seq), MessageReply::default());
        }
        assert_eq!(own.replies.len(), OWN_CAPACITY);
        assert!(own.answer(&key(0)).is_none(), "the oldest is forgotten");
        assert!(own.answer(&key(OWN_CAPACITY as u64 + 9)).is_some());
    }

    #[test]
    fn cursor_advances_only_over_contiguous_runs() {
        let mut c = Cursor::default();
        c.mark(2);
        assert_eq!(c.contiguous, 0);
        c.mark(1);
        assert_eq!(c.contiguous, 2);
        c.mark(4);
        c.mark(5);
        assert_eq!(c.contiguous, 2);
        c.advance_to(3);
        assert_eq!(c.contiguous, 5);
        c.mark(5);
        assert_eq!(c.contiguous, 5);
    }

    #[test]
    fn seen_forgets_the_oldest() {
        let mut s = Seen::default();
        assert!(s.insert(1, 0));
        assert!(!s.insert(1, 0));
        for mid in 2..(SEEN_CAPACITY as u64 + 2) {
            s.insert(mid, 0);
        }
        assert!(s.insert(1, 0), "evicted and so new again");
    }

    #[test]
    fn close_codes_map_to_error_codes() {
        assert_eq!(
            ClientError::closed(4011, "slow".into()),
            ClientError::Closed {
                code: ErrorCode::SlowConsumer,
                reason: "slow".into()
            }
        );
        assert_eq!(
            ClientError::closed(1000, String::new()),
            ClientError::ClosedRaw {
                code: 1000,
                reason: String::new()
            }
        );
    }
}
