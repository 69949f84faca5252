//! Routing pushes: from users to their online sessions, grouped per gateway
//! node, so that one call reaches every connection a node holds for a
//! message (a group message to 2,000 members is a handful of calls, not
//! 2,000).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use natter_proto::Op;
use prometheus::{IntCounter, Registry};

use crate::sessions::{Session, SessionDirectory};
use crate::{Delivery, Gateway};

/// One push to fan out: the same body for everyone it reaches.
pub struct Outbound {
    pub op: Op,
    pub mid: u64,
    pub group: u64,
    pub seq: u64,
    pub body: Bytes,
    pub acked_at: Instant,
}

/// The sessions directory and the gateway nodes it points at.
pub struct Fanout {
    sessions: Arc<dyn SessionDirectory>,
    gateways: RwLock<HashMap<Arc<str>, Arc<dyn Gateway>>>,
    directory_errors: IntCounter,
}

impl Fanout {
    pub fn new(sessions: Arc<dyn SessionDirectory>, registry: &Registry) -> Fanout {
        let directory_errors = natter_node::telemetry::register(
            registry,
            IntCounter::new(
                "natter_directory_errors_total",
                "Sessions directory calls that failed (register, unregister, renew, look-up).",
            )
            .expect("valid counter"),
        );
        Fanout {
            sessions,
            gateways: RwLock::new(HashMap::new()),
            directory_errors,
        }
    }

    /// Counts a failed call to the sessions directory.
    pub fn directory_failed(&self) {
        self.directory_errors.inc();
    }

    pub fn sessions(&self) -> &Arc<dyn SessionDirectory> {
        &self.sessions
    }

    /// Makes a gateway node reachable for pushes.
    pub fn attach_gateway(&self, node: &str, gateway: Arc<dyn Gateway>) {
        self.gateways
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Arc::from(node), gateway);
    }

    /// Forgets a gateway node that left.
    pub fn detach_gateway(&self, node: &str) {
        self.gateways
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(node);
    }

    pub fn gateway(&self, node: &str) -> Option<Arc<dyn Gateway>> {
        self.gateways
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .cloned()
    }

    /// The online sessions of `users`; a failed look-up is logged and
    /// skipped (those users sync on reconnect; nothing acked is lost).
    pub async fn sessions_of(&self, users: &[u64]) -> Vec<Session> {
        match self.sessions.lookup_many(users).await {
            Ok(sessions) => sessions,
            Err(e) => {
                self.directory_failed();
                tracing::warn!(error = %e, "session look-up failed; receivers will sync");
                Vec::new()
            }
        }
    }

    /// Pushes `out` to `targets`, one call per gateway node.
    pub fn push(&self, out: &Outbound, targets: impl IntoIterator<Item = Session>) {
        let mut by_node: HashMap<Arc<str>, Vec<Delivery>> = HashMap::new();
        for session in targets {
            by_node
                .entry(session.node.clone())
                .or_default()
                .push(Delivery {
                    conn: session.conn,
                    op: out.op,
                    mid: out.mid,
                    group: out.group,
                    seq: out.seq,
                    body: out.body.clone(),
                    acked_at: out.acked_at,
                });
        }
        self.send(by_node);
    }

    /// Hands each node its deliveries.
    pub fn send(&self, by_node: HashMap<Arc<str>, Vec<Delivery>>) {
        for (node, deliveries) in by_node {
            match self.gateway(&node) {
                Some(gateway) => gateway.push(deliveries),
                None => tracing::warn!(%node, "no route to gateway node; receivers will sync"),
            }
        }
    }
}
