//! A connection's outgoing bytes, written by whoever sends.
//!
//! A push (or a reply) is framed into the connection's buffer and written to
//! the socket at once by the task that produced it, when nothing else is
//! waiting to be written: no hand-off to a writer task, no wake-up, one
//! `send` per frame. Only when the socket's buffer is full do the remaining
//! bytes wait, and then the connection's own task writes them as the socket
//! drains ([`Wire::poll_drive`]); frames sent meanwhile queue behind them,
//! in order.
//!
//! What waits is bounded in frames and in bytes ([`Budget`]): replies,
//! pushes and resends alike. A frame that does not fit is refused with
//! [`SendError::Full`] and the connection is closed as a slow consumer, so
//! a client that asks for much and reads nothing holds at most the budget
//! (or one frame larger than it) of the server's memory. The node's
//! unwritten bytes are a gauge, `natter_comet_queued_bytes`.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use natter_proto::{Frame, Op, HEADER_LEN};
use prometheus::IntGauge;
use tokio::io::AsyncWrite;

use crate::ws::{self, Opcode};

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendError {
    /// More frames, or more bytes, wait unwritten than the connection may
    /// hold.
    Full,
    /// The connection is closing, or its socket failed.
    Closed,
}

/// How much may wait unwritten on one connection before it counts as a
/// slow consumer.
#[derive(Clone, Debug)]
pub(crate) struct Budget {
    /// Frames.
    pub(crate) frames: usize,
    /// Bytes: a frame that would take the unwritten bytes past this is
    /// refused, unless nothing else waits (so any one frame can be sent).
    pub(crate) bytes: usize,
    /// The node's unwritten bytes, over every connection.
    pub(crate) gauge: IntGauge,
}

pub(crate) struct Wire<W> {
    state: Mutex<State<W>>,
    budget: Budget,
}

struct State<W> {
    /// `None` once shut down.
    io: Option<W>,
    /// Bytes not yet written, in order.
    pending: BytesMut,
    /// Frames queued since `pending` was last empty.
    queued: usize,
    /// A close frame is queued: nothing follows it.
    closing: bool,
    /// The last write failed.
    error: Option<io::ErrorKind>,
    /// The connection task, waiting for bytes to write.
    driver: Option<Waker>,
    /// `pending.len()` as last added to the budget's gauge.
    counted: usize,
}

impl<W: AsyncWrite + Unpin> Wire<W> {
    pub(crate) fn new(io: W, budget: Budget) -> Wire<W> {
        Wire {
            state: Mutex::new(State {
                io: Some(io),
                pending: BytesMut::with_capacity(256),
                queued: 0,
                closing: false,
                error: None,
                driver: None,
                counted: 0,
            }),
            budget,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<W>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a binary message holding `frame` and writes what the socket
    /// takes now.
    pub(crate) fn send_frame(&self, frame: &Frame) -> Result<(), SendError> {
        self.send_frames(std::slice::from_ref(frame))
    }

    /// Queues binary messages holding `frames`, in order, and writes them
    /// together: one `send` for all when the socket has room.
    pub(crate) fn send_frames(&self, frames: &[Frame]) -> Result<(), SendError> {
        self.send_with(frames.len(), |put| {
            for frame in frames {
                put(frame.op, frame.seq, frame.ack, &frame.body);
            }
        })
    }

    /// Queues the `count` binary messages that `frames` hands to its
    /// argument as frame parts (op, seq, ack, body), in order, and writes
    /// them together.
    pub(crate) fn send_with(
        &self,
        count: usize,
        frames: impl FnOnce(&mut dyn FnMut(Op, u32, u32, &[u8])),
    ) -> Result<(), SendError> {
        self.send(false, count, |dst| {
            frames(&mut |op, seq, ack, body: &[u8]| {
                ws::put_header(dst, Opcode::Binary, HEADER_LEN + body.len());
                Frame::encode_parts(dst, op, seq, ack, body);
            })
        })
    }

    /// Queues a pong answering a ping.
    pub(crate) fn pong(&self, payload: &[u8]) -> Result<(), SendError> {
        self.send(false, 1, |dst| ws::put_frame(dst, Opcode::Pong, payload))
    }

    /// Queues the close frame; nothing can be sent after it.
    pub(crate) fn close(&self, code: u16, reason: &str) -> Result<(), SendError> {
        self.send(true, 1, |dst| ws::put_close(dst, code, reason))
    }

    /// Queues `frames` frames, which `put` writes into the buffer.
    fn send(
        &self,
        last: bool,
        frames: usize,
        put: impl FnOnce(&mut BytesMut),
    ) -> Result<(), SendError> {
        let mut state = self.lock();
        if state.closing || state.error.is_some() || state.io.is_none() {
            return Err(SendError::Closed);
        }
        if state.queued >= self.budget.frames {
            return Err(SendError::Full);
        }
        let before = state.pending.len();
        let idle = before == 0;
        put(&mut state.pending);
        // Over the byte budget: take the frames back out. Any one frame
        // goes when nothing waits, so a frame larger than the budget (a
        // reply near `max_body`, say) is sent, and the unwritten bytes stay
        // under the budget or under one frame.
        if !idle && state.pending.len() > self.budget.bytes {
            state.pending.truncate(before);
            return Err(SendError::Full);
        }
        state.queued += frames;
        state.closing = last;
        if !idle {
            // The connection task is already waiting for the socket to drain.
            state.count(&self.budget.gauge);
            return Ok(());
        }
        // Nobody waits on the socket: write now, without a waker. What the
        // socket does not take is left to the connection task, which polls
        // with its own waker (replacing the no-op one registered here).
        // Outside the runtime's cooperative budget: a fan-out writes to
        // thousands of sockets from one task, and once the budget of a task
        // poll is spent every socket reports "not ready" without trying,
        // which would hand each of those writes to a task wake-up after all.
        let written = {
            let mut cx = Context::from_waker(Waker::noop());
            let write = std::pin::pin!(tokio::task::unconstrained(poll_fn(|cx| state.write(cx))));
            write.poll(&mut cx)
        };
        match written {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) | Poll::Pending => {
                if let Some(driver) = state.driver.take() {
                    driver.wake();
                }
            }
        }
        state.count(&self.budget.gauge);
        Ok(())
    }

    /// Writes waiting bytes as the socket takes them. Resolves only when
    /// the socket fails; the connection task keeps it in its select loop.
    pub(crate) fn poll_drive(&self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let mut state = self.lock();
        let written = state.write(cx);
        state.count(&self.budget.gauge);
        match written {
            Poll::Ready(Err(e)) => Poll::Ready(e),
            Poll::Ready(Ok(())) => {
                match &state.driver {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => state.driver = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Writes what is queued (up to the caller's time-out) and shuts the
    /// socket's write side, which ends the TCP connection once the read
    /// half is dropped too.
    pub(crate) async fn finish(&self) {
        let written = poll_fn(|cx| {
            let mut state = self.lock();
            let written = state.write(cx);
            state.count(&self.budget.gauge);
            written
        })
        .await;
        let io = self.lock().io.take();
        if let (Ok(()), Some(mut io)) = (written, io) {
            let _ = poll_fn(|cx| Pin::new(&mut io).poll_shutdown(cx)).await;
        }
    }

    /// Drops the socket at once, with whatever is still queued.
    pub(crate) fn abort(&self) {
        let mut state = self.lock();
        state.io = None;
        state.pending.clear();
        state.count(&self.budget.gauge);
    }

    /// Bytes waiting to be written.
    #[cfg(test)]
    pub(crate) fn unwritten(&self) -> usize {
        self.lock().pending.len()
    }
}

impl<W> Drop for Wire<W> {
    fn drop(&mut self) {
        // What never got written leaves the node's gauge with the connection.
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        self.budget.gauge.sub(state.counted as i64);
    }
}

impl<W> State<W> {
    /// Brings the node's gauge of unwritten bytes up to date with `pending`.
    fn count(&mut self, gauge: &IntGauge) {
        let now = self.pending.len();
        if now != self.counted {
            gauge.add(now as i64 - self.counted as i64);
            self.counted = now;
        }
    }
}

impl<W: AsyncWrite + Unpin> State<W> {
    /// Writes `pending` until it is empty or the socket is full.
    fn write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(kind) = self.error {
            return Poll::Ready(Err(kind.into()));
        }
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        while !self.pending.is_empty() {
            match Pin::new(&mut *io).poll_write(cx, &self.pending) {
                Poll::Ready(Ok(0)) => {
                    self.error = Some(io::ErrorKind::WriteZero);
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => self.pending.advance(n),
                Poll::Ready(Err(e)) => {
                    self.error = Some(e.kind());
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        self.queued = 0;
        // Keep a small buffer for the next frames, not the largest burst.
        if self.pending.capacity() > 64 * 1024 {
            self.pending = BytesMut::with_capacity(256);
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    fn frame(n: u32) -> Frame {
        Frame::raw(Op::Push, n, 0, vec![n as u8; 100])
    }

    fn gauge() -> IntGauge {
        IntGauge::new("unwritten", "test").expect("gauge")
    }

    /// A budget of `n` frames and no byte limit.
    fn frames(n: usize) -> Budget {
        Budget {
            frames: n,
            bytes: usize::MAX,
            gauge: gauge(),
        }
    }

    fn expected(frames: impl IntoIterator<Item = Frame>) -> Vec<u8> {
        let mut dst = BytesMut::new();
        for f in frames {
            ws::put_header(&mut dst, Opcode::Binary, f.wire_len());
            f.encode_to(&mut dst);
        }
        dst.to_vec()
    }

    #[tokio::test]
    async fn writes_at_once_when_the_socket_has_room() {
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let wire = Wire::new(a, frames(8));
        wire.send_frame(&frame(1)).unwrap();
        wire.send_frame(&frame(2)).unwrap();
        // Nothing drives the wire: the bytes are already in the socket.
        let want = expected([frame(1), frame(2)]);
        let mut got = vec![0u8; want.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
        assert!(wire.lock().pending.is_empty());
    }

    #[tokio::test]
    async fn frames_sent_together_arrive_in_one_piece_in_order() {
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let wire = Wire::new(a, frames(8));
        wire.send_frames(&[frame(1), frame(2), frame(3)]).unwrap();
        wire.send_frame(&frame(4)).unwrap();
        let want = expected([frame(1), frame(2), frame(3), frame(4)]);
        let mut got = vec![0u8; want.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_fan_out_writes_every_frame_itself_whatever_the_task_budget() {
        // One task pushing to many connections writes far more than the
        // runtime's per-poll budget; none of it may be left to the drivers.
        let mut peers = Vec::new();
        let mut wires = Vec::new();
        for _ in 0..300 {
            let (a, b) = tokio::io::duplex(64 * 1024);
            wires.push(Wire::new(a, frames(8)));
            peers.push(b);
        }
        for wire in &wires {
            wire.send_frame(&frame(1)).unwrap();
        }
        for (i, wire) in wires.iter().enumerate() {
            assert!(
                wire.lock().pending.is_empty(),
                "connection {i} was left waiting"
            );
        }
    }

    #[tokio::test]
    async fn a_full_socket_queues_in_order_and_the_driver_drains_it() {
        // A socket that takes 150 bytes at a time.
        let (a, mut b) = tokio::io::duplex(150);
        let wire = Arc::new(Wire::new(a, frames(100)));
        for n in 0..20 {
            wire.send_frame(&frame(n)).unwrap();
        }
        assert!(!wire.lock().pending.is_empty());
        let driver = {
            let wire = wire.clone();
            tokio::spawn(async move { poll_fn(|cx| wire.poll_drive(cx)).await })
        };
        let want = expected((0..20).map(frame));
        let mut got = vec![0u8; want.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
        // Frames sent while the driver waits are written too.
        wire.send_frame(&frame(99)).unwrap();
        let want = expected([frame(99)]);
        let mut got = vec![0u8; want.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
        drop(b);
        // A closed peer fails the next write, which ends the driver.
        let _ = wire.send_frame(&frame(100));
        let _ = wire.send_frame(&frame(101));
        let error = tokio::time::timeout(std::time::Duration::from_secs(5), driver)
            .await
            .expect("the driver ends")
            .unwrap();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(wire.send_frame(&frame(102)), Err(SendError::Closed));
    }

    #[tokio::test]
    async fn too_many_unwritten_frames_is_a_slow_consumer() {
        let (a, _b) = tokio::io::duplex(10);
        let wire = Wire::new(a, frames(3));
        for n in 0..3 {
            wire.send_frame(&frame(n)).unwrap();
        }
        assert_eq!(wire.send_frame(&frame(3)), Err(SendError::Full));
    }

    #[tokio::test]
    async fn too_many_unwritten_bytes_is_a_slow_consumer_and_the_gauge_shows_them() {
        // Each frame is 100 bytes of body plus the frame and WebSocket
        // headers; the budget holds five of them, the frame count many more.
        let one = expected([frame(0)]).len();
        let gauge = gauge();
        let (a, _b) = tokio::io::duplex(1);
        let wire = Wire::new(
            a,
            Budget {
                frames: 1000,
                bytes: 5 * one,
                gauge: gauge.clone(),
            },
        );
        let mut sent = 0;
        while wire.send_frame(&frame(sent)).is_ok() {
            sent += 1;
            assert!(sent < 100, "the byte budget never filled");
        }
        // One byte went into the socket; five frames less that byte wait.
        assert_eq!(sent, 5);
        assert!(
            wire.unwritten() <= 5 * one,
            "{} unwritten",
            wire.unwritten()
        );
        assert_eq!(gauge.get(), wire.unwritten() as i64);
        // A batch that does not fit is refused whole.
        assert_eq!(
            wire.send_frames(&[frame(1), frame(2)]),
            Err(SendError::Full)
        );
        assert_eq!(gauge.get(), wire.unwritten() as i64);
        // A resend counts the same as a first send.
        assert_eq!(wire.send_frame(&frame(3)), Err(SendError::Full));
        drop(wire);
        assert_eq!(gauge.get(), 0, "a dropped connection leaves the gauge");
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_byte_budget_goes_when_nothing_waits() {
        let gauge = gauge();
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let wire = Arc::new(Wire::new(
            a,
            Budget {
                frames: 8,
                bytes: 50,
                gauge: gauge.clone(),
            },
        ));
        wire.send_frame(&frame(1)).unwrap();
        let want = expected([frame(1)]);
        let mut got = vec![0u8; want.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
        assert_eq!(gauge.get(), 0);
        // Written as the socket drains, the gauge goes back to zero.
        let (a, mut b) = tokio::io::duplex(10);
        let wire = Arc::new(Wire::new(
            a,
            Budget {
                frames: 8,
                bytes: 50,
                gauge: gauge.clone(),
            },
        ));
        wire.send_frame(&frame(1)).unwrap();
        assert_eq!(wire.send_frame(&frame(2)), Err(SendError::Full));
        assert!(gauge.get() > 50);
        let driver = {
            let wire = wire.clone();
            tokio::spawn(async move { poll_fn(|cx| wire.poll_drive(cx)).await })
        };
        let mut got = vec![0u8; want.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while gauge.get() != 0 {
            assert!(tokio::time::Instant::now() < deadline, "gauge stuck");
            tokio::task::yield_now().await;
        }
        wire.abort();
        driver.abort();
    }

    #[tokio::test]
    async fn nothing_follows_the_close_frame() {
        let (a, mut b) = tokio::io::duplex(1024);
        let wire = Wire::new(a, frames(8));
        wire.close(4006, "bye").unwrap();
        assert_eq!(wire.send_frame(&frame(1)), Err(SendError::Closed));
        wire.finish().await;
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        let mut want = BytesMut::new();
        ws::put_close(&mut want, 4006, "bye");
        assert_eq!(got, want.to_vec());
    }
}
