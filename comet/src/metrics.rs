//! Gateway metrics. Labels are operation names, outcomes and error codes:
//! bounded sets, never user ids.

use natter_node::telemetry::register;
use natter_proto::Op;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub connections: IntGauge,
    /// Bytes queued for connections and not yet taken by their sockets.
    pub queued_bytes: IntGauge,
    pub frames_in: IntCounterVec,
    pub pushes: IntCounterVec,
    pub errors: IntCounterVec,
    pub disconnects: IntCounterVec,
    pub ack_to_push: Histogram,
    /// Children resolved once: these are counted on every push and ack.
    pub push_first: IntCounter,
    pub push_acked: IntCounter,
    frames_in_by_op: Vec<(Op, IntCounter)>,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let counter = |name: &str, help: &str, label: &str| {
            register(
                registry,
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid counter"),
            )
        };
        let frames_in = counter(
            "natter_frames_in_total",
            "Frames received, by operation.",
            "op",
        );
        let pushes = counter(
            "natter_pushes_total",
            "Pushes, by kind (first, resend, acked, no_connection).",
            "kind",
        );
        Metrics {
            push_first: pushes.with_label_values(&["first"]),
            push_acked: pushes.with_label_values(&["acked"]),
            frames_in_by_op: Op::ALL
                .iter()
                .map(|op| (*op, frames_in.with_label_values(&[op.name()])))
                .collect(),
            frames_in,
            pushes,
            connections: register(
                registry,
                IntGauge::new("natter_connections", "Open authenticated connections.").expect("valid gauge"),
            ),
            queued_bytes: register(
                registry,
                IntGauge::new(
                    "natter_comet_queued_bytes",
                    "Bytes queued for this node's connections that their sockets have not taken yet (each connection holds at most comet.send_queue_bytes, or one frame).",
                )
                .expect("valid gauge"),
            ),
            errors: counter("natter_frame_errors_total", "Error frames sent, by reason.", "reason"),
            disconnects: counter("natter_disconnects_total", "Connections closed, by reason.", "reason"),
            ack_to_push: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "natter_ack_to_push_seconds",
                        "Time from the sender's ack to the push being written to the socket queues of all its receivers on this node.",
                    )
                    .buckets(vec![0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
                )
                .expect("valid histogram"),
            ),
        }
    }

    /// Counts one frame received.
    pub fn frame_in(&self, op: Op) {
        if let Some((_, counter)) = self.frames_in_by_op.iter().find(|(o, _)| *o == op) {
            counter.inc();
        }
    }
}
