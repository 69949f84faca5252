//! One worker: a slice of the simulated users, in one process. It connects
//! its devices on the ramp, sends on schedule, records every ack and
//! delivery, and ends with a final sync of every device.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use natter_client::{Client, ClientConfig, Event, Events};
use natter_roles::Tokens;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::payload::Payload;
use crate::reconcile::{DeliveryRecord, Ledger, Origin, SendRecord};
use crate::scenario::{splitmix, Scenario};
use crate::stats::{Hist, Timeline};
use crate::user::SimUser;

/// Connections being set up at once by one worker.
const CONNECT_CONCURRENCY: usize = 256;
/// Time each device gets for its final sync, all pages.
const FINAL_SYNC_DEADLINE: Duration = Duration::from_secs(60);

/// Everything a worker needs; written to a file for worker processes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub run: u64,
    pub server: String,
    pub scenario: Scenario,
    pub uid_base: u64,
    /// Unix ms at which connecting starts.
    pub connect_at_ms: i64,
    /// Unix ms at which sending starts (warm-up first).
    pub send_at_ms: i64,
    pub index: u32,
    pub workers: u32,
    pub sources: Vec<IpAddr>,
    pub seed: u64,
    /// Heartbeat interval override for the clients.
    pub heartbeat_ms: Option<u64>,
    /// Group traffic: the id of each group, by group index.
    #[serde(default)]
    pub groups: Vec<u64>,
}

impl Plan {
    /// User indexes (0-based) this worker simulates.
    pub fn users(&self) -> impl Iterator<Item = u64> + '_ {
        (u64::from(self.index)..self.scenario.users).step_by(self.workers.max(1) as usize)
    }

    /// The simulated user of index `user`: `u-{uid_base + user}`.
    pub fn uid(&self, user: u64) -> SimUser {
        SimUser(self.uid_base + user)
    }
}

/// A live snapshot, reported about once a second.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    pub connected: u64,
    pub sent: u64,
    pub acked: u64,
    pub received: u64,
    pub errors: u64,
    /// p99 end-to-end latency over the last second.
    pub window_p99_us: u64,
    pub done: bool,
}

/// What a worker measured.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub ledger: Ledger,
    pub ack: Hist,
    pub e2e: Hist,
    pub connect: Hist,
    /// Actual minus intended send time.
    pub lag: Hist,
    pub late_sends: u64,
    pub scheduled_sends: u64,
    pub timeline: Timeline,
    /// Connected devices by uid.
    pub devices: BTreeMap<SimUser, Vec<u16>>,
    pub connect_errors: BTreeMap<String, u64>,
    pub disconnects: BTreeMap<String, u64>,
    pub final_sync_errors: u64,
    pub wire_duplicates: u64,
    pub resends: u64,
    pub reconnects: u64,
    /// Devices' own messages back by sync or push (see `natter_client::Stats`).
    #[serde(default)]
    pub own_copies: u64,
    pub cpu_seconds: f64,
    /// Unix ns of the last ack and the last delivery of a measured message.
    pub last_ack_ns: u64,
    pub last_delivery_ns: u64,
}

impl WorkerResult {
    pub fn merge(&mut self, other: WorkerResult) {
        self.ledger.merge(other.ledger);
        self.ack.merge(&other.ack);
        self.e2e.merge(&other.e2e);
        self.connect.merge(&other.connect);
        self.lag.merge(&other.lag);
        self.late_sends += other.late_sends;
        self.scheduled_sends += other.scheduled_sends;
        self.timeline.merge(&other.timeline);
        for (uid, devices) in other.devices {
            self.devices.entry(uid).or_default().extend(devices);
        }
        for (k, v) in other.connect_errors {
            *self.connect_errors.entry(k).or_default() += v;
        }
        for (k, v) in other.disconnects {
            *self.disconnects.entry(k).or_default() += v;
        }
        self.final_sync_errors += other.final_sync_errors;
        self.wire_duplicates += other.wire_duplicates;
        self.resends += other.resends;
        self.reconnects += other.reconnects;
        self.own_copies += other.own_copies;
        self.cpu_seconds += other.cpu_seconds;
        self.last_ack_ns = self.last_ack_ns.max(other.last_ack_ns);
        self.last_delivery_ns = self.last_delivery_ns.max(other.last_delivery_ns);
    }
}

pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    plan: Plan,
    /// Unix ns and the Instant that correspond, for sleeping until a wall time.
    base_ns: u64,
    base: Instant,
    counters: Counters,
    result: Mutex<WorkerResult>,
    window: Mutex<Hist>,
    /// Each connected device's event task.
    receivers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Shared {
    fn instant_at(&self, unix_ns: u64) -> Instant {
        if unix_ns >= self.base_ns {
            self.base + Duration::from_nanos(unix_ns - self.base_ns)
        } else {
            self.base
                .checked_sub(Duration::from_nanos(self.base_ns - unix_ns))
                .unwrap_or(self.base)
        }
    }

    fn send_at_ns(&self) -> u64 {
        self.plan.send_at_ms as u64 * 1_000_000
    }

    /// Milliseconds since sending started, for timeline buckets.
    fn since_start_ms(&self, unix_ns: u64) -> i64 {
        (unix_ns as i64 - self.send_at_ns() as i64) / 1_000_000
    }

    fn measuring(&self, intended_ns: u64) -> bool {
        intended_ns >= self.send_at_ns() + self.plan.scenario.warmup_ms * 1_000_000
    }

    fn result(&self) -> std::sync::MutexGuard<'_, WorkerResult> {
        self.result.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs this worker's share of the plan and returns what it measured.
pub async fn run(
    plan: Plan,
    secret: Vec<u8>,
    progress: impl Fn(Progress) + Send + Sync + 'static,
) -> WorkerResult {
    let cpu_start = natter_node::process::cpu_seconds(None).unwrap_or(0.0);
    let shared = Arc::new(Shared {
        base_ns: unix_ns(),
        base: Instant::now(),
        counters: Counters::default(),
        result: Mutex::new(WorkerResult::default()),
        window: Mutex::new(Hist::default()),
        receivers: Mutex::new(Vec::new()),
        plan,
    });
    let progress = Arc::new(progress);
    let reporter = tokio::spawn(report_progress(shared.clone(), progress.clone()));

    // Phase: connect on the ramp.
    let clients = connect_all(&shared, &secret).await;

    // Phase: send on schedule.
    let scenario = shared.plan.scenario.clone();
    let mut senders = Vec::new();
    if scenario.rate > 0.0 {
        for (user, device, client) in &clients {
            if *device == 0 {
                senders.push(tokio::spawn(send_loop(
                    shared.clone(),
                    *user,
                    client.clone(),
                )));
            }
        }
    }
    let end_ns = shared.send_at_ns() + (scenario.warmup_ms + scenario.duration_ms) * 1_000_000;
    tokio::time::sleep_until(shared.instant_at(end_ns)).await;
    for s in senders {
        let _ = s.await;
    }

    // Phase: drain, then a final sync on every device.
    tokio::time::sleep(scenario.drain()).await;
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut syncs = Vec::new();
    for (_, _, client) in &clients {
        let client = client.clone();
        let gate = gate.clone();
        syncs.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            client.sync_within(FINAL_SYNC_DEADLINE).await
        }));
    }
    let mut sync_errors = 0;
    for s in syncs {
        if !matches!(s.await, Ok(Ok(()))) {
            sync_errors += 1;
        }
    }
    // Closing ends each event stream after its buffered events are recorded.
    let (mut dups, mut resends, mut reconnects, mut own_copies) = (0, 0, 0, 0);
    for (_, _, client) in &clients {
        dups += client.stats().duplicates.load(Ordering::Relaxed);
        resends += client.stats().resends.load(Ordering::Relaxed);
        reconnects += client.stats().reconnects.load(Ordering::Relaxed);
        own_copies += client.stats().own_copies.load(Ordering::Relaxed);
        client.close().await;
    }
    let receivers: Vec<_> = std::mem::take(&mut *shared.receivers());
    for r in receivers {
        let _ = tokio::time::timeout(Duration::from_secs(10), r).await;
    }
    reporter.abort();
    let mut result = std::mem::take(&mut *shared.result());
    result.final_sync_errors = sync_errors;
    result.wire_duplicates = dups;
    result.resends = resends;
    result.reconnects = reconnects;
    result.own_copies = own_copies;
    result.cpu_seconds = natter_node::process::cpu_seconds(None).unwrap_or(0.0) - cpu_start;
    progress(snapshot(&shared, true));
    result
}

impl Shared {
    fn receivers(&self) -> std::sync::MutexGuard<'_, Vec<tokio::task::JoinHandle<()>>> {
        self.receivers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn connect_all(shared: &Arc<Shared>, secret: &[u8]) -> Vec<(u64, u16, Client)> {
    let plan = &shared.plan;
    let scenario = &plan.scenario;
    let tokens = Tokens::new(secret.to_vec());
    let ttl = (scenario.warmup_ms + scenario.duration_ms + scenario.drain_ms) / 1000 + 3600;
    let per_worker_rate = f64::from(scenario.connect_rate) / f64::from(plan.workers.max(1));
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let start_ns = plan.connect_at_ms as u64 * 1_000_000;
    let mut tasks = Vec::new();
    let mut ordinal = 0u64;
    for user in plan.users() {
        for device in 0..scenario.devices as u16 {
            let uid = plan.uid(user);
            let token = match tokens.mint(&uid.id(), &format!("p{device}"), ttl) {
                Ok(token) => token,
                Err(e) => {
                    tracing::error!(error = %e, "cannot mint token");
                    continue;
                }
            };
            let mut config = ClientConfig::new(plan.server.clone(), token);
            config.ack_timeout = Duration::from_millis(scenario.ack_timeout_ms);
            config.push_ack_delay = Duration::from_millis(scenario.push_ack_delay_ms);
            config.event_buffer = 4096;
            config.heartbeat = plan.heartbeat_ms.map(Duration::from_millis);
            if !plan.sources.is_empty() {
                config.local_addr = Some(plan.sources[(ordinal as usize) % plan.sources.len()]);
            }
            let at = if per_worker_rate > 0.0 {
                start_ns + (ordinal as f64 / per_worker_rate * 1e9) as u64
            } else {
                start_ns
            };
            ordinal += 1;
            let shared = shared.clone();
            let gate = gate.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(shared.instant_at(at)).await;
                let _permit = gate.acquire().await;
                let started = Instant::now();
                match Client::connect(config).await {
                    Ok((client, events)) => {
                        shared.counters.connected.fetch_add(1, Ordering::Relaxed);
                        {
                            let mut result = shared.result();
                            result.connect.record(started.elapsed());
                            result.devices.entry(uid).or_default().push(device);
                        }
                        let receiver =
                            tokio::spawn(receive_loop(shared.clone(), uid, device, events));
                        shared.receivers().push(receiver);
                        Some((user, device, client))
                    }
                    Err(e) => {
                        *shared.result().connect_errors.entry(e.class()).or_default() += 1;
                        shared.counters.errors.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            }));
        }
    }
    let mut clients = Vec::new();
    for t in tasks {
        if let Ok(Some(c)) = t.await {
            clients.push(c);
        }
    }
    clients
}

async fn receive_loop(shared: Arc<Shared>, uid: SimUser, device: u16, mut events: Events) {
    let run = shared.plan.run;
    while let Some(event) = events.next().await {
        if let Event::Disconnected { error, .. } = &event {
            *shared
                .result()
                .disconnects
                .entry(error.class())
                .or_default() += 1;
        }
        let Some(m) = delivery(&event) else {
            continue;
        };
        let now = unix_ns();
        let payload = Payload::parse(m.body.as_ref());
        let origin = payload.map(|p| Origin {
            run: p.run,
            sender: p.sender,
            device: p.device,
            client_seq: p.client_seq,
        });
        shared.counters.received.fetch_add(1, Ordering::Relaxed);
        let latency = payload
            .filter(|p| p.run == run && shared.measuring(p.intended_ns))
            .map(|p| Duration::from_nanos(now.saturating_sub(p.intended_ns)));
        if let Some(latency) = latency {
            shared
                .window
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(latency);
        }
        let mut result = shared.result();
        result.ledger.deliveries.push(DeliveryRecord {
            uid,
            device,
            mid: m.mid,
            origin,
        });
        let bucket = result.timeline.at(shared.since_start_ms(now));
        bucket.received += 1;
        if let Some(latency) = latency {
            bucket.e2e.record(latency);
            result.e2e.record(latency);
            result.last_delivery_ns = result.last_delivery_ns.max(now);
        }
    }
}

/// The message `event` delivers, if it counts as a delivery: group events
/// (the server's own messages), read receipts, typing notices and other
/// notifies are not, whatever conversation they name.
fn delivery(event: &Event) -> Option<&natter_proto::msg::Message> {
    match event {
        Event::Message(m)
            if !matches!(
                m.body.as_ref().and_then(|b| b.content.as_ref()),
                Some(natter_proto::msg::Content::GroupEvent(_))
            ) =>
        {
            Some(m)
        }
        _ => None,
    }
}

async fn send_loop(shared: Arc<Shared>, user: u64, client: Client) {
    let plan = &shared.plan;
    let scenario = &plan.scenario;
    let interval_ns = (1e9 / scenario.rate) as u64;
    // Spread users over the interval so they do not all send at once.
    let phase = splitmix(plan.seed ^ user) % interval_ns.max(1);
    let end_ns = shared.send_at_ns() + (scenario.warmup_ms + scenario.duration_ms) * 1_000_000;
    let late = Duration::from_millis(scenario.late_ms);
    let uid = plan.uid(user);
    if !scenario.pattern.sends(user) {
        return;
    }
    // Group traffic goes to the sender's group.
    let group = scenario
        .pattern
        .group_of(user)
        .and_then(|g| plan.groups.get(g as usize).copied());
    for k in 0u64.. {
        let intended_ns = shared.send_at_ns() + phase + k * interval_ns;
        if intended_ns >= end_ns {
            break;
        }
        tokio::time::sleep_until(shared.instant_at(intended_ns)).await;
        let lag = Duration::from_nanos(unix_ns().saturating_sub(intended_ns));
        // A user's number, or the group id.
        let receiver = match group {
            Some(gid) => gid,
            None => {
                plan.uid(
                    scenario
                        .pattern
                        .receiver(user, k, scenario.users, plan.seed),
                )
                .0
            }
        };
        let client_seq = client.next_client_seq();
        let payload = Payload {
            run: plan.run,
            sender: uid,
            device: 0,
            client_seq,
            intended_ns,
        };
        {
            let mut result = shared.result();
            result.scheduled_sends += 1;
            result.lag.record(lag);
            if lag > late {
                result.late_sends += 1;
            }
            result.timeline.at(shared.since_start_ms(intended_ns)).sent += 1;
        }
        shared.counters.sent.fetch_add(1, Ordering::Relaxed);
        let body = payload.body(scenario.message_size);
        let outcome = match group {
            Some(gid) => client.send_group_with_seq(client_seq, gid, body).await,
            None => {
                client
                    .send_with_seq(client_seq, &SimUser(receiver).id(), body)
                    .await
            }
        };
        // Latency from the intended send time: a stalled server shows up here.
        let acked_at = unix_ns();
        let latency = Duration::from_nanos(acked_at.saturating_sub(intended_ns));
        let mut result = shared.result();
        let record = SendRecord {
            sender: uid,
            device: 0,
            client_seq,
            receiver,
            group: group.is_some(),
            mid: None,
            error: None,
        };
        match outcome {
            Ok(reply) => {
                shared.counters.acked.fetch_add(1, Ordering::Relaxed);
                if shared.measuring(intended_ns) {
                    result.ack.record(latency);
                    result.last_ack_ns = result.last_ack_ns.max(acked_at);
                }
                // Sends are charted when they were due, acks when they happened.
                result.timeline.at(shared.since_start_ms(acked_at)).acked += 1;
                result.ledger.sends.push(SendRecord {
                    mid: Some(reply.mid),
                    ..record
                });
            }
            Err(e) => {
                shared.counters.errors.fetch_add(1, Ordering::Relaxed);
                result
                    .timeline
                    .at(shared.since_start_ms(intended_ns))
                    .errors += 1;
                result.ledger.sends.push(SendRecord {
                    error: Some(e.class()),
                    ..record
                });
            }
        }
    }
}

fn snapshot(shared: &Shared, done: bool) -> Progress {
    let window = std::mem::take(&mut *shared.window.lock().unwrap_or_else(|e| e.into_inner()));
    let c = &shared.counters;
    Progress {
        connected: c.connected.load(Ordering::Relaxed),
        sent: c.sent.load(Ordering::Relaxed),
        acked: c.acked.load(Ordering::Relaxed),
        received: c.received.load(Ordering::Relaxed),
        errors: c.errors.load(Ordering::Relaxed),
        window_p99_us: window.summary().p99_us,
        done,
    }
}

async fn report_progress(
    shared: Arc<Shared>,
    progress: Arc<impl Fn(Progress) + Send + Sync + 'static>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        progress(snapshot(&shared, false));
    }
}

#[cfg(test)]
mod tests {
    use natter_client::{ClientError, Event};
    use natter_proto::msg::{
        Content, GroupEvent, Message, MessageBody, Notify, ReadReceipt, TypingNotice,
    };

    use super::delivery;

    #[test]
    fn only_chat_messages_count_as_deliveries() {
        let chat = Message {
            mid: 7,
            body: Some(MessageBody::text("hi")),
            ..Message::default()
        };
        let group_event = Message {
            mid: 8,
            group: 3,
            body: Some(MessageBody {
                content: Some(Content::GroupEvent(GroupEvent::default())),
            }),
            ..Message::default()
        };
        assert_eq!(delivery(&Event::Message(chat.clone())), Some(&chat));
        let not_deliveries = [
            Event::Message(group_event),
            Event::Read(ReadReceipt {
                conversation: "p:u1:u2".into(),
                reader: "u2".into(),
                seq: 7,
                time_ms: 1,
            }),
            Event::Typing(TypingNotice {
                conversation: "p:u1:u2".into(),
                user: "u2".into(),
                time_ms: 1,
            }),
            Event::Notify(Notify::default()),
            Event::Disconnected {
                error: ClientError::Disconnected,
                fatal: false,
            },
        ];
        for event in &not_deliveries {
            assert_eq!(delivery(event), None, "{event:?}");
        }
    }
}
