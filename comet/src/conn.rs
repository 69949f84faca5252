//! One connection, in phases: authenticate → register → work → clean up.
//!
//! Two tasks serve a connection. The control task (this module's `run`)
//! reads the socket and writes what the socket could not take at once
//! (see [`Wire`]); the request task runs messages, syncs, reads and typing
//! notices through logic one at a time, in the order the client sent them, so a slow store never
//! stalls heartbeats or pushes. Pushes do not pass through a task: whoever
//! pushes numbers the frame and writes it under the connection's [`Pushes`]
//! lock, which the control task shares for acks and the node's resend round
//! ([`crate::Comet::resend_pushes`]) for resends.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use natter_proto::msg::{
    AuthReply, AuthRequest, Disconnect, ErrorReply, HeartbeatReply, ReadRequest, SendMessage,
    SyncRequest, Typing,
};
use natter_proto::{BodyError, ErrorCode, Frame, Op};
use natter_roles::{Acked, LogicService, Push, Refusal, Session};
use tokio::io::{AsyncRead, AsyncReadExt as _, ReadHalf};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::wire::SendError;
use crate::ws::{self, Incoming, ReadError, Reader};
use crate::{Comet, ConnHandle, Socket, Wire};

/// Requests (messages, syncs, reads, typing notices) a client may have in
/// flight on one connection.
const MAX_PENDING_REQUESTS: usize = 128;
/// Time a goodbye gets to be written before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What woke a connection's task.
enum Wake {
    Incoming(Result<Incoming, ReadError>),
    WriteFailed(std::io::Error),
    Heartbeat,
    Killed,
    Overdue,
    Stopping,
}

/// Why the work phase ended.
enum Exit {
    /// The socket ended or failed without a close frame.
    Peer,
    /// The peer sent a close frame, with this code if it gave one: the
    /// server answers with a close frame echoing it (RFC 6455, section 5.5.1).
    PeerClosed(Option<u16>),
    /// The peer broke the WebSocket protocol: a close frame with this
    /// code, and no `Disconnect` frame.
    Protocol(u16, String),
    /// The server closes, with a reason.
    Close(ErrorCode, String),
}

fn close(code: ErrorCode, reason: impl Into<String>) -> Exit {
    Exit::Close(code, reason.into())
}

pub(crate) struct Inflight {
    /// The push's number on this connection.
    wire_seq: u32,
    /// The stream the push belongs to (0: the user's) and its position there.
    group: u64,
    seq: u64,
    op: Op,
    body: Bytes,
    attempts: u32,
    deadline: Instant,
}

/// A request for logic, run in order on the connection's request task.
enum Job {
    Send { seq: u32, message: SendMessage },
    Sync { seq: u32, request: SyncRequest },
    Read { seq: u32, request: ReadRequest },
    Typing { seq: u32, typing: Typing },
}

impl Job {
    /// The job a request for logic asks for (`Message`, `Sync`, `Read`,
    /// `Typing`), or its body's decoding error; `None` for any other frame.
    fn of(frame: &Frame) -> Option<Result<Job, BodyError>> {
        let seq = frame.seq;
        Some(match frame.op {
            Op::Message => frame.message().map(|message| Job::Send { seq, message }),
            Op::Sync => frame.message().map(|request| Job::Sync { seq, request }),
            Op::Read => frame.message().map(|request| Job::Read { seq, request }),
            Op::Typing => frame.message().map(|typing| Job::Typing { seq, typing }),
            _ => return None,
        })
    }

    /// The request frame's number, which its answer echoes.
    fn seq(&self) -> u32 {
        match self {
            Job::Send { seq, .. }
            | Job::Sync { seq, .. }
            | Job::Read { seq, .. }
            | Job::Typing { seq, .. } => *seq,
        }
    }
}

/// A connection's pushes: numbered per connection, kept until acknowledged.
/// Pushes that arrive before the auth reply is queued wait in `parked`.
#[derive(Default)]
pub(crate) struct Pushes {
    ready: bool,
    parked: Vec<Push>,
    /// The last number given to a push (0: none yet).
    next_seq: u32,
    /// Un-acked pushes in the order they were numbered and written.
    inflight: VecDeque<Inflight>,
}

/// What a resend round did on one connection.
pub(crate) enum Resend {
    /// This many pushes were resent.
    Sent(u64),
    /// A push was resent `push_retries` times and its last RTO ran out: the
    /// connection's task checks [`Pushes::timed_out`] and closes.
    OutOfRetries,
}

/// Whether push number `a` was numbered no later than `b`, counting across
/// the wrap from 2^32−1 to 1 (the window of pushes in flight is far smaller
/// than 2^31).
fn not_after(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) >= 0
}

impl Pushes {
    /// Numbers `pushes` and writes them together (or parks them until the
    /// connection is authenticated); returns how many were written. An
    /// error closes the connection.
    pub(crate) fn push(
        &mut self,
        pushes: &[Push],
        wire: &Wire,
        comet: &crate::Inner,
        deadline: Instant,
    ) -> Result<usize, (ErrorCode, &'static str)> {
        let config = &comet.config;
        if pushes.is_empty() {
            return Ok(0);
        }
        if !self.ready {
            if self.parked.len() + pushes.len() > config.max_inflight {
                return Err((ErrorCode::SlowConsumer, "too many pushes before auth"));
            }
            self.parked.extend_from_slice(pushes);
            return Ok(0);
        }
        if self.inflight.len() + pushes.len() > config.max_inflight {
            return Err((ErrorCode::SlowConsumer, "too many unacknowledged pushes"));
        }
        let first = self.next_seq;
        let sent = wire.send_with(pushes.len(), |put| {
            let mut seq = first;
            for push in pushes {
                seq = seq.wrapping_add(1).max(1);
                put(push.op, seq, 0, &push.body);
            }
        });
        match sent {
            Ok(()) => {}
            Err(SendError::Full) => return Err((ErrorCode::SlowConsumer, "send queue full")),
            // The connection is closing; the device syncs when it is back.
            Err(SendError::Closed) => return Ok(0),
        }
        comet.metrics.push_first.inc_by(pushes.len() as u64);
        for push in pushes {
            self.next_seq = self.next_seq.wrapping_add(1).max(1);
            self.inflight.push_back(Inflight {
                wire_seq: self.next_seq,
                group: push.group,
                seq: push.seq,
                op: push.op,
                body: push.body.clone(),
                attempts: 0,
                deadline,
            });
        }
        Ok(pushes.len())
    }

    /// Takes out every push in flight numbered up to `ack` (a `PushAck`
    /// acknowledges its push and all before it: they arrived in order). An
    /// ack for a number not yet given out acknowledges nothing.
    fn acknowledge(&mut self, ack: u32) -> Vec<Acked> {
        if ack == 0 || self.next_seq == 0 || !not_after(ack, self.next_seq) {
            return Vec::new();
        }
        let mut acked = Vec::new();
        while let Some(front) = self.inflight.front() {
            if !not_after(front.wire_seq, ack) {
                break;
            }
            acked.push(Acked {
                group: front.group,
                seq: front.seq,
            });
            self.inflight.pop_front();
        }
        acked
    }

    /// Resends, byte for byte, every push whose ack is overdue, as far as
    /// the socket has room now (the rest stay due).
    pub(crate) fn resend(&mut self, wire: &Wire, comet: &crate::Inner, now: Instant) -> Resend {
        if self.timed_out(now, comet.config.push_retries).is_some() {
            return Resend::OutOfRetries;
        }
        let rto = Duration::from_millis(comet.config.push_rto_ms);
        let mut resent = 0;
        for inflight in self.inflight.iter_mut() {
            if inflight.deadline > now {
                continue;
            }
            let frame = Frame::raw(inflight.op, inflight.wire_seq, 0, inflight.body.clone());
            match wire.send_frame(&frame) {
                Ok(()) => {}
                // Resend only what the socket has room for now; the rest
                // stays due for the next round, so a burst of resends is
                // not taken for a slow consumer.
                Err(SendError::Full) => break,
                // The connection is closing; its task sees to it.
                Err(SendError::Closed) => break,
            }
            inflight.attempts += 1;
            inflight.deadline = now + rto;
            resent += 1;
        }
        Resend::Sent(resent)
    }

    /// The first push still unacknowledged after `retries` resends and one
    /// more RTO, if any.
    fn timed_out(&self, now: Instant, retries: u32) -> Option<u32> {
        self.inflight
            .iter()
            .find(|p| p.attempts >= retries && p.deadline <= now)
            .map(|p| p.wire_seq)
    }

    /// The connection is authenticated: pushes go out from now on, the
    /// parked ones first.
    fn open(&mut self, wire: &Wire, comet: &crate::Inner) -> Result<(), (ErrorCode, &'static str)> {
        self.ready = true;
        let parked = std::mem::take(&mut self.parked);
        let deadline = Instant::now() + Duration::from_millis(comet.config.push_rto_ms);
        self.push(&parked, wire, comet, deadline).map(|_| ())
    }
}

struct Conn {
    comet: Comet,
    session: Session,
    handle: ConnHandle,
    jobs: mpsc::Sender<Job>,
    errors: u32,
}

/// Serves one upgraded WebSocket until it closes.
pub(crate) async fn run(comet: Comet, socket: Socket, max_message: usize) {
    let config = comet.inner.config.clone();
    let (mut read, write) = tokio::io::split(socket);
    let budget = crate::wire::Budget {
        frames: config.send_queue,
        bytes: config.send_queue_bytes,
        gauge: comet.inner.metrics.queued_bytes.clone(),
    };
    let wire = Arc::new(Wire::new(write, budget));
    let mut reader = Reader::new(max_message, Bytes::new());

    // Phase: register a handle first, so pushes that race the auth reply
    // find the connection.
    let conn_id = comet
        .inner
        .next_conn
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let handle = ConnHandle {
        wire: wire.clone(),
        pushes: Arc::new(Mutex::new(Pushes::default())),
        kill: CancellationToken::new(),
        overdue: Arc::new(tokio::sync::Notify::new()),
        reason: Arc::new(Mutex::new(None)),
        session: Arc::new(std::sync::OnceLock::new()),
    };
    comet
        .bucket(conn_id)
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(conn_id, handle.clone());

    // Phase: authenticate.
    let shutdown = comet.inner.shutdown.clone();
    let auth = tokio::select! {
        auth = tokio::time::timeout(
            Duration::from_millis(config.auth_timeout_ms),
            authenticate(&comet, &mut reader, &mut read, &wire, conn_id),
        ) => auth.unwrap_or_else(|_| Err(close(ErrorCode::AuthTimeout, "no auth frame in time"))),
        _ = shutdown.cancelled() => Err(close(ErrorCode::ServerShutdown, "server is shutting down")),
    };
    let (session, cursor, auth_seq) = match auth {
        Ok(ok) => ok,
        Err(exit) => {
            comet
                .bucket(conn_id)
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&conn_id);
            let ending = goodbye(&comet, &wire, exit);
            drop(handle);
            finish(&wire, &mut reader, &mut read, ending).await;
            return;
        }
    };
    let reply = AuthReply {
        uid: session.uid.to_string(),
        device: session.device.clone(),
        heartbeat_interval_ms: config.heartbeat_interval_ms as u32,
        server_time_ms: natter_node::ids::now_ms(),
        max_body: config.max_body as u32,
        cursor,
    };
    let _ = wire.send_frame(&Frame::new(Op::AuthReply, auth_seq, 0, &reply));
    let _ = handle.session.set(session.clone());
    // Pushes may be written now, after the auth reply.
    let opened = handle
        .pushes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .open(&wire, &comet.inner);
    if let Err((code, reason)) = opened {
        handle.kick(code, reason);
    }
    comet.inner.metrics.connections.inc();
    tracing::debug!(conn = conn_id, uid = %session.uid, device = %session.device, "connection authenticated");

    // Phase: work.
    let (jobs, jobs_rx) = mpsc::channel(MAX_PENDING_REQUESTS);
    let closing = CancellationToken::new();
    let mut requests = tokio::spawn(request_loop(
        comet.inner.logic.clone(),
        session.clone(),
        jobs_rx,
        handle.clone(),
        closing.clone(),
    ));
    let mut conn = Conn {
        comet: comet.clone(),
        session,
        handle,
        jobs,
        errors: 0,
    };
    let exit = conn.work(&mut reader, &mut read).await;

    // Phase: clean up.
    comet
        .bucket(conn_id)
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&conn_id);
    comet.inner.logic.disconnect(&conn.session).await;
    // Un-acked pushes need nothing: the device's stored cursor only advances
    // over acknowledged positions, so its next sync returns them.
    comet.inner.metrics.connections.dec();
    let ending = goodbye(&comet, &wire, exit);
    let Conn { jobs, handle, .. } = conn;
    drop(handle);
    // Requests still queued are dropped unrun; the one running finishes (or
    // is stopped after the grace period). Either way the client resends
    // what it has no ack for, and the resend is deduplicated.
    closing.cancel();
    drop(jobs);
    if tokio::time::timeout(CLOSE_GRACE, &mut requests)
        .await
        .is_err()
    {
        requests.abort();
    }
    finish(&wire, &mut reader, &mut read, ending).await;
}

/// How the socket ends once the last frame is queued.
enum Ending {
    /// Nothing more to wait for: the peer is gone, or its close frame was
    /// answered.
    Now,
    /// The server sent a close frame: the peer's close frame is awaited
    /// (RFC 6455, section 5.5.1), then the connection ends.
    AwaitClose,
    /// The peer broke the protocol: what it still sends is read and
    /// dropped until it closes, so that the close frame is not lost to a
    /// reset.
    Discard,
}

/// Queues what the peer is told on the way out: for a server close, the
/// `Disconnect` frame and the close frame; for a protocol error, the close
/// frame alone; for the peer's close frame, a close frame echoing its code.
/// A slow consumer's socket is dropped instead.
fn goodbye(comet: &Comet, wire: &Wire, exit: Exit) -> Ending {
    let disconnects = &comet.inner.metrics.disconnects;
    let (code, reason) = match exit {
        Exit::Peer => {
            disconnects.with_label_values(&["peer"]).inc();
            return Ending::Now;
        }
        Exit::PeerClosed(code) => {
            disconnects.with_label_values(&["peer"]).inc();
            // A close frame without a code is answered as a normal close.
            if wire.close(code.unwrap_or(ws::CLOSE_NORMAL), "").is_err() {
                wire.abort();
            }
            return Ending::Now;
        }
        Exit::Protocol(close_code, reason) => {
            disconnects.with_label_values(&["websocket"]).inc();
            tracing::debug!(close_code, %reason, "websocket protocol error");
            if wire.close(close_code, &reason).is_err() {
                wire.abort();
            }
            return Ending::Discard;
        }
        Exit::Close(code, reason) => (code, reason),
    };
    disconnects.with_label_values(&[code.as_str()]).inc();
    tracing::debug!(%code, %reason, "closing connection");
    let frame = Frame::new(
        Op::Disconnect,
        0,
        0,
        &Disconnect {
            code: code as u32,
            reason: reason.clone(),
        },
    );
    let sent = wire.send_frame(&frame).is_ok() && wire.close(code.close_code(), &reason).is_ok();
    if !sent {
        wire.abort();
        return Ending::Now;
    }
    Ending::AwaitClose
}

/// Ends the socket as `ending` says, within the grace period: writes what
/// is queued, and shuts the write side, which ends the TCP connection once
/// the read half is dropped too.
async fn finish(wire: &Wire, reader: &mut Reader, read: &mut ReadSide, ending: Ending) {
    let deadline = Instant::now() + CLOSE_GRACE;
    if let Ending::AwaitClose = ending {
        // The close frame goes out while the peer's is awaited; the socket
        // stays open both ways until it comes (or the grace period ends).
        let _ = tokio::time::timeout_at(deadline, async {
            loop {
                tokio::select! {
                    incoming = reader.next(read) => match incoming {
                        Ok(Incoming::Close(_)) | Err(_) => return,
                        Ok(_) => {}
                    },
                    _ = std::future::poll_fn(|cx| wire.poll_drive(cx)) => return,
                }
            }
        })
        .await;
    }
    if tokio::time::timeout_at(deadline, wire.finish())
        .await
        .is_err()
    {
        wire.abort();
        return;
    }
    if let Ending::Discard = ending {
        // What the peer still sends is read and dropped until it closes:
        // closing with unread bytes would reset the connection, and the
        // reset may overtake the close frame.
        let _ = tokio::time::timeout_at(deadline, async {
            // On the heap: an array here would be part of every
            // connection's task for its whole life (4 KiB each).
            let mut scratch = vec![0u8; 4096];
            while matches!(read.read(&mut scratch).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

type ReadSide = ReadHalf<Socket>;

/// The next data message; pings are answered, pongs skipped.
async fn next_message(
    reader: &mut Reader,
    read: &mut (impl AsyncRead + Unpin),
    wire: &Wire,
) -> Result<Incoming, Exit> {
    loop {
        match reader.next(read).await {
            Ok(Incoming::Ping(payload)) => {
                let _ = wire.pong(&payload);
            }
            Ok(Incoming::Pong) => {}
            Ok(Incoming::Close(close)) => {
                return Err(Exit::PeerClosed(close.map(|(code, _)| code)))
            }
            Ok(message) => return Ok(message),
            Err(e) => return Err(read_failed(e)),
        }
    }
}

fn read_failed(e: ReadError) -> Exit {
    match e.close_code() {
        Some(code) => Exit::Protocol(code, e.to_string()),
        None => Exit::Peer,
    }
}

async fn authenticate(
    comet: &Comet,
    reader: &mut Reader,
    read: &mut ReadSide,
    wire: &Wire,
    conn_id: u64,
) -> Result<(Session, u64, u32), Exit> {
    let max_body = comet.inner.config.max_body;
    let bytes = match next_message(reader, read, wire).await? {
        Incoming::Binary(bytes) => bytes,
        _ => {
            return Err(close(
                ErrorCode::AuthRequired,
                "frames are binary WebSocket messages; the first must be auth",
            ))
        }
    };
    let frame = Frame::decode(&bytes, max_body).map_err(|e| close(e.code(), e.to_string()))?;
    if frame.op != Op::Auth {
        return Err(close(
            ErrorCode::AuthRequired,
            format!("first frame must be auth, not {}", frame.op.name()),
        ));
    }
    let request: AuthRequest = frame
        .message()
        .map_err(|e| close(ErrorCode::BadBody, e.to_string()))?;
    let connected = comet
        .inner
        .logic
        .connect(&request.token, &request.device, comet.node(), conn_id)
        .await
        .map_err(|r| close(r.code, r.message))?;
    let session = Session {
        uid: connected.identity.uid,
        device: connected.identity.device,
        node: comet.inner.node.clone(),
        conn: conn_id,
    };
    Ok((session, connected.cursor, frame.seq))
}

impl Conn {
    async fn work(&mut self, reader: &mut Reader, read: &mut ReadSide) -> Exit {
        let config = self.comet.inner.config.clone();
        let idle = Duration::from_millis(config.heartbeat_timeout_ms);
        let mut deadline = Instant::now() + idle;
        let shutdown = self.comet.inner.shutdown.clone();
        let kill = self.handle.kill.clone();
        let wire = self.handle.wire.clone();
        // The timer and the cancellation futures live across iterations: a
        // busy connection wakes for every frame, and re-creating them on each
        // wake-up registered a timer and two waiters every time. The timer
        // fires at the deadline it was set to and is moved to the current one.
        let heartbeat = sleep_until(deadline);
        let killed = kill.cancelled();
        let stopping = shutdown.cancelled();
        let overdue_signal = self.handle.overdue.clone();
        let overdue = overdue_signal.notified();
        tokio::pin!(heartbeat, killed, stopping, overdue);
        // Frames first: a busy connection wakes for each one, and polling
        // every timer and token on each wake-up cost more than reading the
        // frame. A client that never stops sending still yields to the
        // others: the socket read draws on the runtime's cooperative budget
        // and reports "not ready" once it is spent, and then the branches
        // after it are polled.
        loop {
            let wake = tokio::select! {
                biased;
                incoming = reader.next(read) => Wake::Incoming(incoming),
                error = std::future::poll_fn(|cx| wire.poll_drive(cx)) => Wake::WriteFailed(error),
                _ = &mut heartbeat => Wake::Heartbeat,
                _ = &mut killed => Wake::Killed,
                _ = &mut overdue => Wake::Overdue,
                _ = &mut stopping => Wake::Stopping,
            };
            let step = match wake {
                Wake::Incoming(incoming) => {
                    deadline = Instant::now() + idle;
                    match incoming {
                        Err(e) => Err(read_failed(e)),
                        Ok(Incoming::Close(close)) => {
                            Err(Exit::PeerClosed(close.map(|(code, _)| code)))
                        }
                        Ok(Incoming::Ping(payload)) => {
                            let _ = wire.pong(&payload);
                            Ok(())
                        }
                        Ok(Incoming::Pong) => Ok(()),
                        Ok(Incoming::Text(_)) => self.error(
                            0,
                            ErrorCode::BadFrame,
                            "frames are binary WebSocket messages",
                        ),
                        Ok(Incoming::Binary(bytes)) => self.frame(&bytes).await,
                    }
                }
                Wake::WriteFailed(error) => {
                    tracing::debug!(%error, "write failed");
                    Err(Exit::Peer)
                }
                Wake::Heartbeat => {
                    if Instant::now() >= deadline {
                        Err(close(
                            ErrorCode::HeartbeatTimeout,
                            "no frame within the heartbeat time-out",
                        ))
                    } else {
                        heartbeat.as_mut().reset(deadline);
                        Ok(())
                    }
                }
                Wake::Overdue => {
                    overdue.set(overdue_signal.notified());
                    // The resend round found a push out of retries; acks
                    // read since (frames come first) may have taken it.
                    let timed_out = self
                        .handle
                        .pushes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .timed_out(Instant::now(), config.push_retries);
                    match timed_out {
                        Some(seq) => Err(close(
                            ErrorCode::PushAckTimeout,
                            format!("push {seq} was not acknowledged"),
                        )),
                        None => Ok(()),
                    }
                }
                Wake::Killed => {
                    let reason = self
                        .handle
                        .reason
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    let (code, reason) = reason.unwrap_or((ErrorCode::Internal, "closed".into()));
                    Err(Exit::Close(code, reason))
                }
                Wake::Stopping => Err(close(ErrorCode::ServerShutdown, "server is shutting down")),
            };
            if let Err(exit) = step {
                return exit;
            }
        }
    }

    fn send_out(&self, frame: Frame) -> Result<(), Exit> {
        match self.handle.wire.send_frame(&frame) {
            Ok(()) => Ok(()),
            Err(SendError::Full) => Err(close(ErrorCode::SlowConsumer, "send queue full")),
            Err(SendError::Closed) => Err(Exit::Peer),
        }
    }

    fn error(&mut self, seq: u32, code: ErrorCode, message: impl Into<String>) -> Result<(), Exit> {
        self.errors += 1;
        self.comet
            .inner
            .metrics
            .errors
            .with_label_values(&[code.as_str()])
            .inc();
        let reply = ErrorReply {
            code: code as u32,
            message: message.into(),
            until_ms: 0,
        };
        self.send_out(Frame::new(Op::Error, seq, 0, &reply))?;
        if self.errors > self.comet.inner.config.max_errors {
            return Err(close(ErrorCode::TooManyErrors, "too many malformed frames"));
        }
        Ok(())
    }

    async fn frame(&mut self, bytes: &[u8]) -> Result<(), Exit> {
        let frame = match Frame::decode(bytes, self.comet.inner.config.max_body) {
            Ok(frame) => frame,
            Err(e) => return self.error(e.seq(), e.code(), e.to_string()),
        };
        self.comet.inner.metrics.frame_in(frame.op);
        if let Some(job) = Job::of(&frame) {
            return match job {
                Ok(job) => self.request(job),
                Err(e) => self.error(frame.seq, ErrorCode::BadBody, e.to_string()),
            };
        }
        match frame.op {
            Op::Heartbeat => {
                let reply = HeartbeatReply {
                    server_time_ms: natter_node::ids::now_ms(),
                };
                self.send_out(Frame::new(Op::HeartbeatReply, frame.seq, 0, &reply))
            }
            Op::PushAck => {
                // An ack for pushes no longer in flight (a duplicate ack of
                // a resent push, say) acknowledges nothing.
                let acked = self
                    .handle
                    .pushes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .acknowledge(frame.ack);
                if acked.is_empty() {
                    return Ok(());
                }
                self.comet
                    .inner
                    .metrics
                    .push_acked
                    .inc_by(acked.len() as u64);
                self.comet
                    .inner
                    .logic
                    .push_acked(&self.session.uid, &self.session.device, &acked)
                    .await;
                Ok(())
            }
            Op::Auth => self.error(frame.seq, ErrorCode::BadRequest, "already authenticated"),
            op => self.error(
                frame.seq,
                ErrorCode::UnknownOperation,
                format!("{} is not a client operation", op.name()),
            ),
        }
    }

    fn request(&mut self, job: Job) -> Result<(), Exit> {
        let seq = job.seq();
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(_) => self.error(
                seq,
                ErrorCode::RateLimited,
                "too many requests in flight; wait for replies",
            ),
        }
    }
}

async fn request_loop(
    logic: Arc<dyn LogicService>,
    session: Session,
    mut jobs: mpsc::Receiver<Job>,
    handle: ConnHandle,
    closing: CancellationToken,
) {
    while let Some(job) = jobs.recv().await {
        if closing.is_cancelled() {
            break;
        }
        let Some(frame) = run_job(logic.as_ref(), &session, job).await else {
            continue;
        };
        if handle.wire.send_frame(&frame) == Err(SendError::Full) {
            handle.kick(ErrorCode::SlowConsumer, "send queue full");
        }
    }
}

/// The `Error` frame answering request `seq` that logic refused.
fn refused(seq: u32, r: Refusal) -> Frame {
    let reply = ErrorReply {
        code: r.code as u32,
        message: r.message,
        // The frame's 0 stands for "no end": only a mute has one.
        until_ms: r.until_ms.unwrap_or(0),
    };
    Frame::new(Op::Error, seq, 0, &reply)
}

/// Runs one request through logic: the frame that answers it, if any (a
/// typing notice is answered only when refused).
async fn run_job(logic: &dyn LogicService, session: &Session, job: Job) -> Option<Frame> {
    let frame = match job {
        Job::Send { seq, message } => match logic.send(session, message).await {
            Ok(reply) => Frame::new(Op::MessageReply, seq, 0, &reply),
            Err(r) => refused(seq, r),
        },
        Job::Sync { seq, request } => {
            match logic.sync(&session.uid, &session.device, request).await {
                Ok(reply) => Frame::new(Op::SyncReply, seq, 0, &reply),
                Err(r) => refused(seq, r),
            }
        }
        Job::Read { seq, request } => {
            match logic
                .read(session, &request.conversation, request.seq)
                .await
            {
                Ok(reply) => Frame::new(Op::ReadReply, seq, 0, &reply),
                Err(r) => refused(seq, r),
            }
        }
        Job::Typing { seq, typing } => match logic.typing(session, &typing.conversation).await {
            Ok(()) => return None,
            Err(r) => refused(seq, r),
        },
    };
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pushes(seqs: impl IntoIterator<Item = u32>) -> Pushes {
        let mut pushes = Pushes {
            ready: true,
            ..Pushes::default()
        };
        for wire_seq in seqs {
            pushes.next_seq = wire_seq;
            pushes.inflight.push_back(Inflight {
                wire_seq,
                group: 0,
                seq: u64::from(wire_seq),
                op: Op::Push,
                body: Bytes::new(),
                attempts: 0,
                deadline: Instant::now(),
            });
        }
        pushes
    }

    /// The wire numbers an ack takes out (the helper numbers each push's
    /// stream position like its wire number).
    fn acked(pushes: &mut Pushes, ack: u32) -> Vec<u32> {
        pushes
            .acknowledge(ack)
            .into_iter()
            .map(|a| a.seq as u32)
            .collect()
    }

    #[test]
    fn an_ack_takes_its_push_and_every_one_before_it() {
        let mut p = pushes(1..=5);
        assert_eq!(acked(&mut p, 1), [1]);
        assert_eq!(acked(&mut p, 4), [2, 3, 4]);
        // Again, or older: nothing more.
        assert_eq!(acked(&mut p, 4), Vec::<u32>::new());
        assert_eq!(acked(&mut p, 2), Vec::<u32>::new());
        assert_eq!(acked(&mut p, 5), [5]);
        assert!(p.inflight.is_empty());
    }

    #[test]
    fn an_ack_for_a_push_not_yet_sent_takes_nothing() {
        let mut p = pushes(1..=3);
        assert_eq!(acked(&mut p, 4), Vec::<u32>::new());
        assert_eq!(acked(&mut p, u32::MAX), Vec::<u32>::new());
        assert_eq!(acked(&mut p, 0), Vec::<u32>::new());
        assert_eq!(p.inflight.len(), 3);
        assert_eq!(acked(&mut Pushes::default(), 1), Vec::<u32>::new());
    }

    #[test]
    fn a_push_times_out_only_after_its_last_resend_and_unless_acked() {
        let now = Instant::now();
        let mut p = pushes([1, 2]);
        p.inflight[0].attempts = 3;
        p.inflight[0].deadline = now + Duration::from_millis(10);
        // Resent three times, but its last RTO has not run out.
        assert_eq!(p.timed_out(now, 3), None);
        assert_eq!(p.timed_out(now + Duration::from_millis(10), 3), Some(1));
        // Fewer resends than allowed: not yet.
        assert_eq!(p.timed_out(now + Duration::from_millis(10), 4), None);
        // An ack read after the resend round raised it takes it out.
        acked(&mut p, 1);
        assert_eq!(p.timed_out(now + Duration::from_millis(10), 3), None);
    }

    /// Logic that reads every conversation up to the seq asked for and
    /// refuses the conversation "p:x:y", for reads and typing alike.
    struct Reading;

    #[async_trait::async_trait]
    impl LogicService for Reading {
        async fn connect(
            &self,
            _token: &str,
            _device: &str,
            _node: &str,
            _conn: u64,
        ) -> Result<natter_roles::Connected, Refusal> {
            Err(Refusal::new(ErrorCode::Internal, "not in this test"))
        }
        async fn disconnect(&self, _session: &Session) {}
        async fn heartbeat(&self, _sessions: &[Session]) {}
        async fn send(
            &self,
            _from: &Session,
            _message: SendMessage,
        ) -> Result<natter_proto::msg::MessageReply, Refusal> {
            Err(Refusal::new(ErrorCode::Internal, "not in this test"))
        }
        async fn push_acked(&self, _uid: &natter_proto::UserId, _device: &str, _acked: &[Acked]) {}
        async fn sync(
            &self,
            _uid: &natter_proto::UserId,
            _device: &str,
            _request: SyncRequest,
        ) -> Result<natter_proto::msg::SyncReply, Refusal> {
            Err(Refusal::new(ErrorCode::Internal, "not in this test"))
        }
        async fn read(
            &self,
            _from: &Session,
            conversation: &str,
            seq: u64,
        ) -> Result<natter_proto::msg::ReadReply, Refusal> {
            if conversation == "p:x:y" {
                return Err(Refusal::new(ErrorCode::NotMember, "not yours"));
            }
            Ok(natter_proto::msg::ReadReply {
                conversation: conversation.to_string(),
                read_seq: seq,
                unread: 1,
            })
        }
        async fn typing(&self, _from: &Session, conversation: &str) -> Result<(), Refusal> {
            if conversation == "p:x:y" {
                return Err(Refusal::new(ErrorCode::RateLimited, "slow down"));
            }
            Ok(())
        }
    }

    fn session() -> Session {
        Session {
            uid: natter_proto::UserId::parse("ann").expect("valid"),
            device: "phone".into(),
            node: Arc::from("comet-1"),
            conn: 1,
        }
    }

    fn read_frame(seq: u32, conversation: &str, at: u64) -> Frame {
        let request = ReadRequest {
            conversation: conversation.into(),
            seq: at,
        };
        Frame::new(Op::Read, seq, 0, &request)
    }

    fn typing_frame(seq: u32, conversation: &str) -> Frame {
        let typing = Typing {
            conversation: conversation.into(),
        };
        Frame::new(Op::Typing, seq, 0, &typing)
    }

    /// The job of `frame`, run through [`Reading`].
    async fn answer(frame: Frame) -> Option<Frame> {
        let job = Job::of(&frame)
            .expect("a request for logic")
            .expect("a good body");
        run_job(&Reading, &session(), job).await
    }

    fn error_of(frame: &Frame) -> (ErrorCode, String) {
        let error: ErrorReply = frame.message().expect("an ErrorReply");
        let code = ErrorCode::from_u32(error.code).expect("a known code");
        (code, error.message)
    }

    #[test]
    fn reads_and_typing_are_requests_for_logic_and_a_bad_body_is_told_apart() {
        match Job::of(&read_frame(7, "p:ann:bob", 12)) {
            Some(Ok(Job::Read { seq: 7, request })) => {
                assert_eq!(
                    (request.conversation.as_str(), request.seq),
                    ("p:ann:bob", 12)
                );
            }
            _ => panic!("a read job"),
        }
        match Job::of(&typing_frame(8, "g:5")) {
            Some(Ok(Job::Typing { seq: 8, typing })) => assert_eq!(typing.conversation, "g:5"),
            _ => panic!("a typing job"),
        }
        // A body that does not decode (a field tag of 0) is a bad body,
        // for the connection to answer with its seq.
        for op in [Op::Read, Op::Typing] {
            let bad = Frame::raw(op, 9, 0, Bytes::from_static(&[0x00, 0x01]));
            assert!(matches!(Job::of(&bad), Some(Err(_))), "{}", op.name());
        }
        // Frames the connection answers itself are not jobs.
        for op in [Op::Heartbeat, Op::PushAck, Op::Auth, Op::ReadReply] {
            assert!(Job::of(&Frame::empty(op, 1, 0)).is_none(), "{}", op.name());
        }
    }

    #[tokio::test]
    async fn a_read_is_answered_with_its_reply_and_a_refusal_with_an_error() {
        let reply = answer(read_frame(7, "p:ann:bob", 12))
            .await
            .expect("an answer");
        assert_eq!((reply.op, reply.seq), (Op::ReadReply, 7));
        let read: natter_proto::msg::ReadReply = reply.message().expect("a ReadReply");
        assert_eq!(
            read,
            natter_proto::msg::ReadReply {
                conversation: "p:ann:bob".into(),
                read_seq: 12,
                unread: 1,
            }
        );
        let refused = answer(read_frame(8, "p:x:y", 1)).await.expect("an answer");
        assert_eq!((refused.op, refused.seq), (Op::Error, 8));
        assert_eq!(
            error_of(&refused),
            (ErrorCode::NotMember, "not yours".into())
        );
    }

    #[tokio::test]
    async fn typing_is_answered_only_when_refused() {
        assert!(answer(typing_frame(3, "p:ann:bob")).await.is_none());
        let refused = answer(typing_frame(4, "p:x:y")).await.expect("an answer");
        assert_eq!((refused.op, refused.seq), (Op::Error, 4));
        assert_eq!(
            error_of(&refused),
            (ErrorCode::RateLimited, "slow down".into())
        );
    }

    #[test]
    fn numbering_wraps_past_zero() {
        let mut p = pushes([u32::MAX - 1, u32::MAX, 1, 2]);
        assert_eq!(acked(&mut p, u32::MAX), [u32::MAX - 1, u32::MAX]);
        assert_eq!(acked(&mut p, 3), Vec::<u32>::new());
        assert_eq!(acked(&mut p, 2), [1, 2]);
    }
}
