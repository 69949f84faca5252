//! One connection, in phases: authenticate → register → work → clean up.
//!
//! Three tasks serve a connection. The control task (this module's `run`)
//! owns the read half of the socket; the writer task owns the write half and
//! drains a bounded queue; the request task runs messages and syncs through
//! logic one at a time, in the order the client sent them, so a slow store
//! never stalls heartbeats or pushes. Pushes do not pass through a task:
//! whoever pushes numbers the frame and queues it for the writer under the
//! connection's [`Pushes`] lock, which the control task shares for acks and
//! resends.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use natter_logic::{Delivery, LogicService, Session};
use natter_proto::msg::{
    AuthReply, AuthRequest, Disconnect, ErrorReply, HeartbeatReply, SendMessage, SyncRequest,
};
use natter_proto::{ErrorCode, Frame, Op};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::{Comet, ConnHandle};

/// Requests (messages, syncs) a client may have in flight on one connection.
const MAX_PENDING_REQUESTS: usize = 128;
/// Frames the writer sends with one flush at most.
const WRITE_BATCH: usize = 64;
/// Time the writer gets to flush a goodbye before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What the writer sends.
pub(crate) enum Out {
    Frame(Bytes),
    Close(u16, String),
}

/// Why the work phase ended.
enum Exit {
    /// The peer closed or the socket failed.
    Peer,
    /// The server closes, with a reason.
    Close(ErrorCode, String),
}

fn close(code: ErrorCode, reason: impl Into<String>) -> Exit {
    Exit::Close(code, reason.into())
}

pub(crate) struct Inflight {
    /// The stream the push belongs to (0: the user's) and its position there.
    group: u64,
    seq: u64,
    frame: Bytes,
    attempts: u32,
    deadline: Instant,
}

enum Job {
    Send { seq: u32, message: SendMessage },
    Sync { seq: u32, request: SyncRequest },
}

/// A connection's pushes: numbered per connection, kept until acknowledged.
/// Pushes that arrive before the auth reply is queued wait in `parked`.
#[derive(Default)]
pub(crate) struct Pushes {
    ready: bool,
    parked: Vec<Delivery>,
    next_seq: u32,
    inflight: BTreeMap<u32, Inflight>,
}

impl Pushes {
    /// Numbers `delivery` and queues it for the writer (or parks it until
    /// the connection is authenticated). An error closes the connection.
    pub(crate) fn push(
        &mut self,
        delivery: Delivery,
        out: &mpsc::Sender<Out>,
        comet: &crate::Inner,
    ) -> Result<(), (ErrorCode, &'static str)> {
        let config = &comet.config;
        if !self.ready {
            if self.parked.len() >= config.max_inflight {
                return Err((ErrorCode::SlowConsumer, "too many pushes before auth"));
            }
            self.parked.push(delivery);
            return Ok(());
        }
        if self.inflight.len() >= config.max_inflight {
            return Err((ErrorCode::SlowConsumer, "too many unacknowledged pushes"));
        }
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        let seq = self.next_seq;
        let frame = Frame::raw(delivery.op, seq, 0, delivery.body).encode();
        if out.try_send(Out::Frame(frame.clone())).is_err() {
            return Err((ErrorCode::SlowConsumer, "send queue full"));
        }
        let metrics = &comet.metrics;
        metrics
            .ack_to_push
            .observe(delivery.acked_at.elapsed().as_secs_f64());
        metrics.push_first.inc();
        let deadline = Instant::now() + Duration::from_millis(config.push_rto_ms);
        self.inflight.insert(
            seq,
            Inflight {
                group: delivery.group,
                seq: delivery.seq,
                frame,
                attempts: 0,
                deadline,
            },
        );
        Ok(())
    }

    /// The connection is authenticated: pushes go out from now on, the
    /// parked ones first.
    fn open(
        &mut self,
        out: &mpsc::Sender<Out>,
        comet: &crate::Inner,
    ) -> Result<(), (ErrorCode, &'static str)> {
        self.ready = true;
        for delivery in std::mem::take(&mut self.parked) {
            self.push(delivery, out, comet)?;
        }
        Ok(())
    }
}

struct Conn {
    comet: Comet,
    session: Session,
    handle: ConnHandle,
    out: mpsc::Sender<Out>,
    writer_kill: CancellationToken,
    jobs: mpsc::Sender<Job>,
    errors: u32,
}

/// Serves one upgraded WebSocket until it closes.
pub(crate) async fn run(comet: Comet, socket: WebSocket) {
    let config = comet.inner.config.clone();
    let (sink, mut stream) = socket.split();
    let (out, out_rx) = mpsc::channel(config.send_queue);
    let writer_kill = CancellationToken::new();
    let writer = tokio::spawn(write_loop(sink, out_rx, writer_kill.clone()));

    // Phase: register a handle first, so pushes that race the auth reply
    // find the connection.
    let conn_id = comet
        .inner
        .next_conn
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let handle = ConnHandle {
        out: out.clone(),
        pushes: Arc::new(Mutex::new(Pushes::default())),
        kill: CancellationToken::new(),
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
            authenticate(&comet, &mut stream, conn_id),
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
            goodbye(&comet, &out, &writer_kill, exit);
            drop(out);
            drop(handle);
            finish_writer(writer, &writer_kill).await;
            return;
        }
    };
    let reply = AuthReply {
        uid: session.uid,
        device: session.device.clone(),
        heartbeat_interval_ms: config.heartbeat_interval_ms as u32,
        server_time_ms: natter_node::ids::now_ms(),
        max_body: config.max_body as u32,
        cursor,
    };
    let _ = out.try_send(Out::Frame(
        Frame::new(Op::AuthReply, auth_seq, 0, &reply).encode(),
    ));
    let _ = handle.session.set(session.clone());
    // Pushes may be written now, after the auth reply.
    let opened = handle
        .pushes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .open(&out, &comet.inner);
    if let Err((code, reason)) = opened {
        handle.kick(code, reason);
    }
    comet.inner.metrics.connections.inc();
    tracing::debug!(conn = conn_id, uid = session.uid, device = %session.device, "connection authenticated");

    // Phase: work.
    let (jobs, jobs_rx) = mpsc::channel(MAX_PENDING_REQUESTS);
    let closing = CancellationToken::new();
    let mut requests = tokio::spawn(request_loop(
        comet.inner.logic.clone(),
        session.clone(),
        jobs_rx,
        out.clone(),
        handle.clone(),
        closing.clone(),
    ));
    let mut conn = Conn {
        comet: comet.clone(),
        session,
        handle,
        out,
        writer_kill,
        jobs,
        errors: 0,
    };
    let exit = conn.work(&mut stream).await;

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
    match exit {
        Exit::Peer => comet
            .inner
            .metrics
            .disconnects
            .with_label_values(&["peer"])
            .inc(),
        exit => goodbye(&comet, &conn.out, &conn.writer_kill, exit),
    }
    let Conn {
        out,
        jobs,
        writer_kill,
        handle,
        ..
    } = conn;
    // The handle holds a sender of the writer's queue: the writer ends only
    // once every sender is gone.
    drop(handle);
    // Requests still queued are dropped unrun; the one running finishes (or
    // is stopped after the grace period). Either way the client resends
    // what it has no ack for, and the resend is deduplicated.
    closing.cancel();
    drop(jobs);
    drop(out);
    if tokio::time::timeout(CLOSE_GRACE, &mut requests)
        .await
        .is_err()
    {
        requests.abort();
    }
    finish_writer(writer, &writer_kill).await;
}

/// Queues the `Disconnect` frame and the close; drops the socket when the
/// queue has no room for them (a slow consumer).
fn goodbye(comet: &Comet, out: &mpsc::Sender<Out>, writer_kill: &CancellationToken, exit: Exit) {
    let Exit::Close(code, reason) = exit else {
        return;
    };
    comet
        .inner
        .metrics
        .disconnects
        .with_label_values(&[code.as_str()])
        .inc();
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
    let sent = out.try_send(Out::Frame(frame.encode())).is_ok()
        && out.try_send(Out::Close(code.close_code(), reason)).is_ok();
    if !sent {
        writer_kill.cancel();
    }
}

async fn finish_writer(mut writer: tokio::task::JoinHandle<()>, writer_kill: &CancellationToken) {
    if tokio::time::timeout(CLOSE_GRACE, &mut writer)
        .await
        .is_err()
    {
        writer_kill.cancel();
        let _ = writer.await;
    }
}

async fn write_loop(
    mut sink: SplitSink<WebSocket, WsMessage>,
    mut rx: mpsc::Receiver<Out>,
    kill: CancellationToken,
) {
    let killed = kill.cancelled();
    tokio::pin!(killed);
    loop {
        let out = tokio::select! {
            biased;
            _ = &mut killed => break,
            out = rx.recv() => out,
        };
        let Some(mut out) = out else { break };
        // Everything already queued goes out with one flush (one write
        // call for a burst of frames, not one each).
        let mut last = false;
        let write = async {
            let mut queued = 0;
            loop {
                let message = match out {
                    Out::Frame(bytes) => WsMessage::Binary(bytes),
                    Out::Close(code, reason) => {
                        last = true;
                        WsMessage::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        }))
                    }
                };
                sink.feed(message).await?;
                queued += 1;
                if last || queued == WRITE_BATCH {
                    break;
                }
                match rx.try_recv() {
                    Ok(next) => out = next,
                    Err(_) => break,
                }
            }
            sink.flush().await
        };
        let sent = tokio::select! {
            biased;
            _ = &mut killed => break,
            sent = write => sent,
        };
        if sent.is_err() || last {
            break;
        }
    }
    // Dropping the sink closes the TCP connection once both halves are gone.
}

/// The next data message; pings and pongs are answered by the WebSocket layer.
async fn next_message(stream: &mut SplitStream<WebSocket>) -> Option<WsMessage> {
    loop {
        match stream.next().await {
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => return None,
            Some(Ok(message)) => return Some(message),
        }
    }
}

async fn authenticate(
    comet: &Comet,
    stream: &mut SplitStream<WebSocket>,
    conn_id: u64,
) -> Result<(Session, u64, u32), Exit> {
    let max_body = comet.inner.config.max_body;
    let bytes = match next_message(stream).await {
        None => return Err(Exit::Peer),
        Some(WsMessage::Binary(bytes)) => bytes,
        Some(_) => {
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
        .connect(&request.token, comet.node(), conn_id)
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
    async fn work(&mut self, stream: &mut SplitStream<WebSocket>) -> Exit {
        let config = self.comet.inner.config.clone();
        let idle = Duration::from_millis(config.heartbeat_timeout_ms);
        let rto = Duration::from_millis(config.push_rto_ms);
        let mut resend = tokio::time::interval((rto / 4).max(Duration::from_millis(10)));
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deadline = Instant::now() + idle;
        let shutdown = self.comet.inner.shutdown.clone();
        let kill = self.handle.kill.clone();
        // The timer and the cancellation futures live across iterations: a
        // busy connection wakes for every frame, and re-creating them on each
        // wake-up registered a timer and two waiters every time. The timer
        // fires at the deadline it was set to and is moved to the current one.
        let heartbeat = sleep_until(deadline);
        let killed = kill.cancelled();
        let stopping = shutdown.cancelled();
        tokio::pin!(heartbeat, killed, stopping);
        loop {
            let step = tokio::select! {
                message = stream.next() => match message {
                    None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => Err(Exit::Peer),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {
                        deadline = Instant::now() + idle;
                        Ok(())
                    }
                    Some(Ok(WsMessage::Text(_))) => {
                        deadline = Instant::now() + idle;
                        self.error(0, ErrorCode::BadFrame, "frames are binary WebSocket messages")
                    }
                    Some(Ok(WsMessage::Binary(bytes))) => {
                        deadline = Instant::now() + idle;
                        self.frame(&bytes).await
                    }
                },
                _ = resend.tick() => self.resend(rto, config.push_retries),
                _ = &mut heartbeat => {
                    if Instant::now() >= deadline {
                        Err(close(ErrorCode::HeartbeatTimeout, "no frame within the heartbeat time-out"))
                    } else {
                        heartbeat.as_mut().reset(deadline);
                        Ok(())
                    }
                }
                _ = &mut killed => {
                    let reason = self.handle.reason.lock().unwrap_or_else(|e| e.into_inner()).take();
                    let (code, reason) = reason.unwrap_or((ErrorCode::Internal, "closed".into()));
                    Err(Exit::Close(code, reason))
                }
                _ = &mut stopping => Err(close(ErrorCode::ServerShutdown, "server is shutting down")),
            };
            if let Err(exit) = step {
                return exit;
            }
        }
    }

    fn send_out(&self, bytes: Bytes) -> Result<(), Exit> {
        self.out
            .try_send(Out::Frame(bytes))
            .map_err(|_| close(ErrorCode::SlowConsumer, "send queue full"))
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
        self.send_out(Frame::new(Op::Error, seq, 0, &reply).encode())?;
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
        match frame.op {
            Op::Heartbeat => {
                let reply = HeartbeatReply {
                    server_time_ms: natter_node::ids::now_ms(),
                };
                self.send_out(Frame::new(Op::HeartbeatReply, frame.seq, 0, &reply).encode())
            }
            Op::Message => match frame.message() {
                Ok(message) => self.request(Job::Send {
                    seq: frame.seq,
                    message,
                }),
                Err(e) => self.error(frame.seq, ErrorCode::BadBody, e.to_string()),
            },
            Op::Sync => match frame.message() {
                Ok(request) => self.request(Job::Sync {
                    seq: frame.seq,
                    request,
                }),
                Err(e) => self.error(frame.seq, ErrorCode::BadBody, e.to_string()),
            },
            Op::PushAck => {
                // An ack for a seq no longer in flight is a duplicate ack of a resent push.
                let acked = self
                    .handle
                    .pushes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .inflight
                    .remove(&frame.ack);
                if let Some(acked) = acked {
                    self.comet.inner.metrics.push_acked.inc();
                    let logic = &self.comet.inner.logic;
                    logic
                        .push_acked(
                            self.session.uid,
                            &self.session.device,
                            acked.group,
                            acked.seq,
                        )
                        .await;
                }
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
        let seq = match &job {
            Job::Send { seq, .. } | Job::Sync { seq, .. } => *seq,
        };
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(_) => self.error(
                seq,
                ErrorCode::RateLimited,
                "too many requests in flight; wait for replies",
            ),
        }
    }

    fn resend(&mut self, rto: Duration, retries: u32) -> Result<(), Exit> {
        let now = Instant::now();
        let mut pushes = self.handle.pushes.lock().unwrap_or_else(|e| e.into_inner());
        let mut due = Vec::new();
        for (seq, inflight) in &pushes.inflight {
            if inflight.deadline <= now {
                if inflight.attempts >= retries {
                    return Err(close(
                        ErrorCode::PushAckTimeout,
                        format!("push {seq} was not acknowledged"),
                    ));
                }
                due.push(*seq);
            }
        }
        for seq in due {
            // Resend only what the queue has room for now; the rest stays due
            // for the next tick, so a burst of resends is not taken for a
            // slow consumer.
            if self.out.capacity() == 0 {
                break;
            }
            if let Some(inflight) = pushes.inflight.get_mut(&seq) {
                inflight.attempts += 1;
                inflight.deadline = now + rto;
                let frame = inflight.frame.clone();
                self.comet
                    .inner
                    .metrics
                    .pushes
                    .with_label_values(&["resend"])
                    .inc();
                self.out
                    .try_send(Out::Frame(frame))
                    .map_err(|_| close(ErrorCode::SlowConsumer, "send queue full"))?;
            }
        }
        Ok(())
    }
}

async fn request_loop(
    logic: Arc<dyn LogicService>,
    session: Session,
    mut jobs: mpsc::Receiver<Job>,
    out: mpsc::Sender<Out>,
    handle: ConnHandle,
    closing: CancellationToken,
) {
    while let Some(job) = jobs.recv().await {
        if closing.is_cancelled() {
            break;
        }
        let frame = match job {
            Job::Send { seq, message } => match logic.send(&session, message).await {
                Ok(reply) => Frame::new(Op::MessageReply, seq, 0, &reply),
                Err(r) => Frame::new(
                    Op::Error,
                    seq,
                    0,
                    &ErrorReply {
                        code: r.code as u32,
                        message: r.message,
                        until_ms: r.until_ms,
                    },
                ),
            },
            Job::Sync { seq, request } => {
                match logic.sync(session.uid, &session.device, request).await {
                    Ok(reply) => Frame::new(Op::SyncReply, seq, 0, &reply),
                    Err(r) => Frame::new(
                        Op::Error,
                        seq,
                        0,
                        &ErrorReply {
                            code: r.code as u32,
                            message: r.message,
                            until_ms: r.until_ms,
                        },
                    ),
                }
            }
        };
        if out.try_send(Out::Frame(frame.encode())).is_err() {
            handle.kick(ErrorCode::SlowConsumer, "send queue full");
        }
    }
}
