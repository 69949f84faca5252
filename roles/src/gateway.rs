//! What logic asks of a gateway node, and the pushes it hands over.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use natter_proto::{ErrorCode, Op};

/// One push: an encoded `Message` body (op `Push`) or `Notify` body (op
/// `Notify`), the same bytes for every connection it reaches; each of them
/// numbers it and resends it until the client acknowledges it.
#[derive(Clone, Debug)]
pub struct Push {
    /// `Push` or `Notify`.
    pub op: Op,
    pub mid: u64,
    /// The group of a group message or event; 0 for the user's stream.
    pub group: u64,
    /// The message's position: in the user's stream (`user_seq`), or for a
    /// group, in the group (`conv_seq`). Acknowledging it advances the
    /// device's cursor of that stream.
    pub seq: u64,
    pub body: Bytes,
    /// When the message was acked to its sender (for ack-to-push latency).
    pub acked_at: Instant,
}

/// Which pushes of a [`PushBatch`] one connection gets: `pushes[from..to]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub conn: u64,
    pub from: u32,
    pub to: u32,
}

/// Pushes for one gateway node. Each target gets its slice of `pushes`, in
/// order and written together; a connection may appear in several targets
/// (its slices are then written in the order of the targets).
#[derive(Clone, Debug, Default)]
pub struct PushBatch {
    pub pushes: Arc<[Push]>,
    pub targets: Vec<Target>,
}

impl PushBatch {
    /// Deliveries in the batch: pushes summed over targets.
    pub fn deliveries(&self) -> usize {
        self.targets
            .iter()
            .map(|t| t.to.saturating_sub(t.from) as usize)
            .sum()
    }

    /// The pushes `target` gets, or `None` if its range is out of bounds.
    pub fn slice(&self, target: &Target) -> Option<&[Push]> {
        self.pushes.get(target.from as usize..target.to as usize)
    }
}

/// A push a device acknowledged: its stream (0: the user's, else a group)
/// and its position there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acked {
    pub group: u64,
    pub seq: u64,
}

/// What logic needs from a gateway node.
pub trait Gateway: Send + Sync + 'static {
    /// Queues pushes to connections of this node; never blocks.
    fn push(&self, batch: PushBatch);
    /// Closes one connection with a reason.
    fn kick(&self, conn: u64, code: ErrorCode, reason: &str);
}
