//! Reconciliation: what the server acked against what each device received.
//!
//! Every acked message must reach every intended device exactly once: each
//! device of the receiver, and each device of the sender other than the one
//! it was sent from. Deliveries are what the SDK handed to the application
//! (after its de-duplication by mid); duplicates here are real defects and
//! are counted one by one, never collapsed.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::user::SimUser;

/// The outcome of one message send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRecord {
    pub sender: SimUser,
    pub device: u16,
    pub client_seq: u64,
    /// The receiving user's number (user `u-{receiver}`), or with `group`
    /// the group id.
    pub receiver: u64,
    /// The message went to the group `receiver`.
    #[serde(default)]
    pub group: bool,
    /// The acked mid, or `None` when the send failed.
    pub mid: Option<u64>,
    /// The error class of a failed send.
    pub error: Option<String>,
}

/// One message handed to the application on one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub uid: SimUser,
    pub device: u16,
    pub mid: u64,
    /// From the payload; `None` if the message was not a pressure message.
    pub origin: Option<Origin>,
}

/// Who sent a pressure message, from its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    pub run: u64,
    pub sender: SimUser,
    pub device: u16,
    pub client_seq: u64,
}

/// Everything a run records, mergeable across worker processes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub sends: Vec<SendRecord>,
    /// In arrival order per device.
    pub deliveries: Vec<DeliveryRecord>,
}

impl Ledger {
    pub fn merge(&mut self, other: Ledger) {
        self.sends.extend(other.sends);
        self.deliveries.extend(other.deliveries);
    }
}

/// One acked message that a device never got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missing {
    pub mid: u64,
    pub sender: SimUser,
    pub client_seq: u64,
    pub uid: SimUser,
    pub device: u16,
    #[serde(default)]
    pub conversation: String,
    /// Whether the store holds the mid, looked up after the run; `None`
    /// when it was not or could not be.
    #[serde(default)]
    pub in_store: Option<bool>,
}

/// One delivery nobody expected: a device that was not meant to get the
/// message, or a message under another mid than its sender was given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unexpected {
    /// The device that got it.
    pub uid: SimUser,
    pub device: u16,
    pub mid: u64,
    /// Who sent it, from its payload (`None`: not a pressure message).
    pub origin: Option<Origin>,
    /// Its conversation, from the send of that origin; empty when this run
    /// has no such send.
    pub conversation: String,
    /// Whether the store holds the mid, as for [`Missing`].
    #[serde(default)]
    pub in_store: Option<bool>,
}

/// Examples of each kind kept in a reconciliation.
pub const EXAMPLES: usize = 10;

impl SendRecord {
    /// The conversation of this send, as the server names it.
    pub fn conversation(&self) -> String {
        if self.group {
            format!("g:{}", self.receiver)
        } else {
            self.sender.conversation_with(SimUser(self.receiver))
        }
    }
}

/// The verdict.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconciliation {
    pub sent: u64,
    pub acked: u64,
    /// Sends that never got an ack, by error class.
    pub unacked: HashMap<String, u64>,
    /// (acked message, intended device) pairs.
    pub expected: u64,
    pub delivered: u64,
    /// Acked, never received by an intended device.
    pub lost: u64,
    /// Extra deliveries of a mid to a device that already had it.
    pub duplicates: u64,
    /// Deliveries that arrived after a later message from the same sender.
    pub reordered: u64,
    /// Deliveries of messages this run never sent (or under another mid than acked).
    pub unexpected: u64,
    /// Deliveries of messages whose send failed but which the server had stored
    /// (the ack was lost): not an error; the sender would resend the same seq.
    pub unacked_delivered: u64,
    /// Messages from earlier runs to the same users.
    pub stale: u64,
    /// The first few losses, to look up in the server's logs.
    pub lost_examples: Vec<Missing>,
    /// The first few unexpected deliveries, likewise.
    #[serde(default)]
    pub unexpected_examples: Vec<Unexpected>,
}

impl Reconciliation {
    fn count_unexpected(&mut self, d: &DeliveryRecord, sent: Option<&SendRecord>) {
        self.unexpected += 1;
        if self.unexpected_examples.len() < EXAMPLES {
            self.unexpected_examples.push(Unexpected {
                uid: d.uid,
                device: d.device,
                mid: d.mid,
                origin: d.origin,
                conversation: sent.map(SendRecord::conversation).unwrap_or_default(),
                in_store: None,
            });
        }
    }
}

impl Reconciliation {
    /// Whether the run kept every promise: nothing acked lost or duplicated,
    /// nothing unexpected received.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.unexpected == 0
    }
}

/// The devices that took part, by user: only they are expected to receive.
pub type Topology = HashMap<SimUser, Vec<u16>>;

/// The members of each group of the run, by group id.
pub type Groups = HashMap<u64, Vec<SimUser>>;

/// Reconciles `ledger` for run `run` over the connected devices in
/// `topology`; a group message is expected on every device of every member
/// in `groups` but the one it was sent from.
pub fn reconcile(
    ledger: &Ledger,
    run: u64,
    topology: &Topology,
    groups: &Groups,
) -> Reconciliation {
    let mut r = Reconciliation {
        sent: ledger.sends.len() as u64,
        ..Default::default()
    };
    // How often each (uid, device, mid) was delivered.
    let mut counts: HashMap<(SimUser, u16, u64), u64> = HashMap::new();
    for d in &ledger.deliveries {
        *counts.entry((d.uid, d.device, d.mid)).or_default() += 1;
    }
    r.delivered = ledger.deliveries.len() as u64;
    let mut acked_by_origin: HashMap<(SimUser, u16, u64), u64> = HashMap::new();
    let mut failed_origins: HashMap<(SimUser, u16, u64), ()> = HashMap::new();
    let mut expected_keys: HashMap<(SimUser, u16, u64), ()> = HashMap::new();
    for send in &ledger.sends {
        let Some(mid) = send.mid else {
            *r.unacked
                .entry(send.error.clone().unwrap_or_else(|| "unknown".into()))
                .or_default() += 1;
            failed_origins.insert((send.sender, send.device, send.client_seq), ());
            continue;
        };
        r.acked += 1;
        acked_by_origin.insert((send.sender, send.device, send.client_seq), mid);
        let none = Vec::new();
        let devices = |uid: SimUser| {
            topology
                .get(&uid)
                .unwrap_or(&none)
                .iter()
                .map(move |d| (uid, *d))
        };
        let receiver = SimUser(send.receiver);
        let receivers: Vec<SimUser> = if send.group {
            groups.get(&send.receiver).cloned().unwrap_or_default()
        } else if receiver == send.sender {
            vec![send.sender]
        } else {
            vec![receiver, send.sender]
        };
        let targets: Vec<(SimUser, u16)> = receivers
            .into_iter()
            .flat_map(devices)
            .filter(|&(uid, d)| !(uid == send.sender && d == send.device))
            .collect();
        for (uid, device) in targets {
            r.expected += 1;
            expected_keys.insert((uid, device, mid), ());
            match counts.get(&(uid, device, mid)).copied().unwrap_or(0) {
                0 => {
                    r.lost += 1;
                    if r.lost_examples.len() < EXAMPLES {
                        r.lost_examples.push(Missing {
                            mid,
                            sender: send.sender,
                            client_seq: send.client_seq,
                            uid,
                            device,
                            conversation: send.conversation(),
                            in_store: None,
                        });
                    }
                }
                n => r.duplicates += n - 1,
            }
        }
    }
    // Deliveries nobody expected, and order per (device, sender device).
    let mut highest: HashMap<(SimUser, u16, SimUser, u16), u64> = HashMap::new();
    // Deliveries of sends that failed but were stored anyway, by device and
    // origin: the mid each device first got for that origin.
    let mut unacked_seen: HashMap<(SimUser, u16, Origin), u64> = HashMap::new();
    // The send of a delivery's origin, for its conversation.
    let by_origin: HashMap<(SimUser, u16, u64), &SendRecord> = ledger
        .sends
        .iter()
        .map(|s| ((s.sender, s.device, s.client_seq), s))
        .collect();
    let sent_by = |d: &DeliveryRecord| {
        d.origin
            .filter(|o| o.run == run)
            .and_then(|o| by_origin.get(&(o.sender, o.device, o.client_seq)).copied())
    };
    for d in &ledger.deliveries {
        let key = (d.uid, d.device, d.mid);
        if !expected_keys.contains_key(&key) {
            match d.origin {
                Some(o) if o.run != run => r.stale += 1,
                Some(o)
                    if failed_origins.contains_key(&(o.sender, o.device, o.client_seq))
                        && !acked_by_origin.contains_key(&(o.sender, o.device, o.client_seq)) =>
                {
                    match unacked_seen.get(&(d.uid, d.device, o)) {
                        None => {
                            unacked_seen.insert((d.uid, d.device, o), d.mid);
                            r.unacked_delivered += 1;
                        }
                        // The same message again.
                        Some(mid) if *mid == d.mid => r.duplicates += 1,
                        // One send stored twice under two ids: a dedupe failure.
                        Some(_) => r.count_unexpected(d, sent_by(d)),
                    }
                }
                _ => r.count_unexpected(d, sent_by(d)),
            }
            continue;
        }
        if let Some(o) = d.origin {
            let order = highest
                .entry((d.uid, d.device, o.sender, o.device))
                .or_default();
            if o.client_seq < *order {
                r.reordered += 1;
            } else {
                *order = o.client_seq;
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: u64 = 9;

    /// Users 1..=5, each with devices 0..devices.
    fn topo(devices: u16) -> Topology {
        (1..=5)
            .map(|uid| (SimUser(uid), (0..devices).collect()))
            .collect()
    }

    fn send(sender: u64, seq: u64, receiver: u64, mid: u64) -> SendRecord {
        SendRecord {
            sender: SimUser(sender),
            device: 0,
            client_seq: seq,
            receiver,
            group: false,
            mid: Some(mid),
            error: None,
        }
    }

    fn got(uid: u64, device: u16, mid: u64, sender: u64, seq: u64) -> DeliveryRecord {
        DeliveryRecord {
            uid: SimUser(uid),
            device,
            mid,
            origin: Some(Origin {
                run: RUN,
                sender: SimUser(sender),
                device: 0,
                client_seq: seq,
            }),
        }
    }

    /// Three messages 1→2, delivered perfectly to user 2's single device.
    fn perfect() -> Ledger {
        Ledger {
            sends: vec![send(1, 1, 2, 100), send(1, 2, 2, 101), send(1, 3, 2, 102)],
            deliveries: vec![
                got(2, 0, 100, 1, 1),
                got(2, 0, 101, 1, 2),
                got(2, 0, 102, 1, 3),
            ],
        }
    }

    #[test]
    fn a_perfect_run_is_clean() {
        let r = reconcile(&perfect(), RUN, &topo(1), &Groups::new());
        assert_eq!((r.sent, r.acked, r.expected, r.delivered), (3, 3, 3, 3));
        assert_eq!(
            (r.lost, r.duplicates, r.reordered, r.unexpected),
            (0, 0, 0, 0)
        );
        assert!(r.clean());
    }

    #[test]
    fn loss_is_counted_exactly_with_examples() {
        let mut ledger = perfect();
        ledger.deliveries.remove(1);
        let r = reconcile(&ledger, RUN, &topo(1), &Groups::new());
        assert_eq!(r.lost, 1);
        assert_eq!(
            r.lost_examples,
            vec![Missing {
                mid: 101,
                sender: SimUser(1),
                client_seq: 2,
                uid: SimUser(2),
                device: 0,
                conversation: "p:u-1:u-2".into(),
                in_store: None,
            }]
        );
        assert!(!r.clean());
    }

    #[test]
    fn duplicates_are_counted_not_collapsed() {
        let mut ledger = perfect();
        ledger.deliveries.push(got(2, 0, 100, 1, 1));
        ledger.deliveries.push(got(2, 0, 100, 1, 1));
        ledger.deliveries.push(got(2, 0, 102, 1, 3));
        let r = reconcile(&ledger, RUN, &topo(1), &Groups::new());
        assert_eq!(r.duplicates, 3);
        assert_eq!(r.lost, 0);
        assert!(!r.clean());
    }

    #[test]
    fn reordering_is_counted_per_sender_and_device() {
        let mut ledger = perfect();
        ledger.deliveries.swap(0, 2); // 102, 101, 100
        let r = reconcile(&ledger, RUN, &topo(1), &Groups::new());
        assert_eq!(r.reordered, 2);
        assert!(r.clean(), "reordering is reported, not a broken promise");
    }

    #[test]
    fn every_device_of_the_receiver_and_the_senders_other_devices_count() {
        let ledger = Ledger {
            sends: vec![send(1, 1, 2, 100)],
            deliveries: vec![
                got(2, 0, 100, 1, 1),
                got(2, 1, 100, 1, 1),
                got(1, 1, 100, 1, 1),
            ],
        };
        let r = reconcile(&ledger, RUN, &topo(2), &Groups::new());
        assert_eq!((r.expected, r.lost), (3, 0));
        let mut missing_copy = ledger.clone();
        missing_copy.deliveries.pop();
        let r = reconcile(&missing_copy, RUN, &topo(2), &Groups::new());
        assert_eq!(r.lost, 1);
        assert_eq!(
            r.lost_examples[0].uid,
            SimUser(1),
            "the sender's second device missed its copy"
        );
        // A device that never connected is not expected to receive.
        let mut partial = topo(2);
        partial.insert(SimUser(1), vec![0]);
        assert_eq!(
            reconcile(&missing_copy, RUN, &partial, &Groups::new()).lost,
            0
        );
    }

    #[test]
    fn group_messages_are_expected_on_every_member_device_but_the_sending_one() {
        let groups: Groups = [(70, vec![SimUser(1), SimUser(2), SimUser(3)])]
            .into_iter()
            .collect();
        let mut ledger = Ledger::default();
        ledger.sends.push(SendRecord {
            group: true,
            ..send(1, 1, 70, 500)
        });
        // Members 1 (other device), 2 and 3 on two devices each; 4 is not a member.
        for (uid, device) in [(1, 1), (2, 0), (2, 1), (3, 0)] {
            ledger.deliveries.push(got(uid, device, 500, 1, 1));
        }
        let r = reconcile(&ledger, RUN, &topo(2), &groups);
        assert_eq!((r.expected, r.delivered), (5, 4));
        assert_eq!(r.lost, 1);
        assert_eq!(
            (r.lost_examples[0].uid, r.lost_examples[0].device),
            (SimUser(3), 1)
        );
        ledger.deliveries.push(got(3, 1, 500, 1, 1));
        ledger.deliveries.push(got(4, 0, 500, 1, 1));
        let r = reconcile(&ledger, RUN, &topo(2), &groups);
        assert_eq!((r.lost, r.unexpected), (0, 1), "a non-member got it");
    }

    #[test]
    fn unacked_unexpected_and_stale_are_told_apart() {
        let mut ledger = perfect();
        ledger.sends.push(SendRecord {
            sender: SimUser(1),
            device: 0,
            client_seq: 4,
            receiver: 2,
            group: false,
            mid: None,
            error: Some("timeout".into()),
        });
        ledger.deliveries.push(got(2, 0, 103, 1, 4)); // stored though the ack was lost
        ledger.deliveries.push(got(2, 0, 555, 1, 77)); // never sent
        ledger.deliveries.push(got(2, 0, 104, 1, 2)); // seq 2 under another mid than acked
        let mut stale = got(2, 0, 9, 1, 1);
        stale.origin = Some(Origin {
            run: RUN + 1,
            sender: SimUser(1),
            device: 0,
            client_seq: 1,
        });
        ledger.deliveries.push(stale);
        ledger.deliveries.push(DeliveryRecord {
            uid: SimUser(2),
            device: 0,
            mid: 777,
            origin: None,
        });
        // The failed send stored twice, under a second mid: a dedupe failure.
        ledger.deliveries.push(got(2, 0, 106, 1, 4));
        // And its first copy delivered again: a duplicate.
        ledger.deliveries.push(got(2, 0, 103, 1, 4));
        let r = reconcile(&ledger, RUN, &topo(1), &Groups::new());
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.unacked.get("timeout"), Some(&1));
        assert_eq!(r.unacked_delivered, 1);
        assert_eq!(r.unexpected, 4);
        assert_eq!(r.stale, 1);
        assert_eq!(r.lost, 0);
        assert!(!r.clean());
    }

    #[test]
    fn unexpected_deliveries_are_listed_with_their_device_origin_and_conversation() {
        // The issue's failure: the sending device got its own acked message.
        let mut ledger = perfect();
        ledger.deliveries.push(got(1, 0, 101, 1, 2));
        // And a device got a message never sent.
        ledger.deliveries.push(got(3, 0, 555, 1, 77));
        let r = reconcile(&ledger, RUN, &topo(1), &Groups::new());
        assert_eq!((r.unexpected, r.lost, r.duplicates), (2, 0, 0));
        let origin = |seq| {
            Some(Origin {
                run: RUN,
                sender: SimUser(1),
                device: 0,
                client_seq: seq,
            })
        };
        assert_eq!(
            r.unexpected_examples,
            vec![
                Unexpected {
                    uid: SimUser(1),
                    device: 0,
                    mid: 101,
                    origin: origin(2),
                    conversation: "p:u-1:u-2".into(),
                    in_store: None,
                },
                Unexpected {
                    uid: SimUser(3),
                    device: 0,
                    mid: 555,
                    origin: origin(77),
                    conversation: String::new(),
                    in_store: None,
                },
            ]
        );
        // At most a few examples, however many there are.
        for mid in 1000..1100 {
            ledger.deliveries.push(got(4, 0, mid, 1, mid));
        }
        let r = reconcile(&ledger, RUN, &topo(1), &Groups::new());
        assert_eq!(r.unexpected, 102);
        assert_eq!(r.unexpected_examples.len(), EXAMPLES);
    }

    #[test]
    fn conversations_of_examples_order_string_ids_byte_wise() {
        // u-10 sorts before u-9 as a string: the server's conversation id
        // is "p:u-10:u-9", not the numeric order.
        let mut ledger = Ledger::default();
        ledger.sends.push(send(9, 1, 10, 600));
        let topology: Topology = [(SimUser(9), vec![0]), (SimUser(10), vec![0])]
            .into_iter()
            .collect();
        let r = reconcile(&ledger, RUN, &topology, &Groups::new());
        assert_eq!(r.lost, 1);
        assert_eq!(r.lost_examples[0].conversation, "p:u-10:u-9");
        let json = serde_json::to_string(&r.lost_examples[0]).expect("serializes");
        assert!(
            json.contains(r#""sender":"u-9""#) && json.contains(r#""uid":"u-10""#),
            "{json}"
        );
    }
}
