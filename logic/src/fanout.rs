//! Routing pushes: from users to their online sessions, grouped per gateway
//! node, so that one call reaches every connection a node holds (a group
//! message to 2,000 members is a handful of calls, not 2,000), with one
//! copy of each body per call.
//!
//! A group's pushes (messages and events alike) pass through its room: they
//! leave in the order they were queued, and a busy group's pushes share
//! writes. A group is busy while its pushes come well within a push window
//! of each other (a smoothed gap, with a quarter of it to spare; a pause of
//! a window or more ends it). A push of a
//! group that is not busy leaves at once. A busy group's push opens a batch
//! that later pushes join; the batch leaves when the next push is not
//! expected (with some room to spare) before the batch's first push has
//! waited a window, and at the latest when it has. Each connection receives a batch in one write: no
//! push waits more than a window, and a push waits only when another is
//! expected to share its write. Batches are sent by tasks of their own, so
//! a sender's reply does not wait for the fan-out, unless batches cannot
//! leave as fast as pushes come (a room holds `QUEUE_HIGH` pushes): then
//! pushes stop waiting in batches and their senders wait for them to leave.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use natter_group::Snapshot;
use natter_proto::UserId;
use prometheus::{Histogram, HistogramOpts, IntCounter, Registry};
use tokio::time::Instant;

use crate::sessions::{Route, Session, SessionDirectory};
use crate::{Gateway, Push, PushBatch, Target};

/// Who a group push is for.
#[derive(Clone)]
pub enum Audience {
    /// The group's members in this snapshot, each from their join point on.
    Members(Arc<Snapshot>),
    /// These users (sorted, without repeats).
    Users(Arc<[UserId]>),
}

impl Audience {
    /// These users, in any order.
    pub fn users(mut users: Vec<UserId>) -> Audience {
        users.sort_unstable();
        users.dedup();
        Audience::Users(users.into())
    }

    fn reaches(&self, uid: &UserId, seq: u64) -> bool {
        match self {
            Audience::Members(snapshot) => {
                snapshot.members.get(uid).is_some_and(|m| m.join_seq <= seq)
            }
            Audience::Users(users) => users.binary_search(uid).is_ok(),
        }
    }
}

/// A push waiting in its group's room.
struct Queued {
    push: Push,
    audience: Audience,
    /// The connection (node, conn) the push came from, which does not get it.
    except: Option<(Arc<str>, u64)>,
}

impl Queued {
    fn reaches(&self, route: &Route) -> bool {
        if let Some((node, conn)) = &self.except {
            if route.conn == *conn && route.node == *node {
                return false;
            }
        }
        self.audience.reaches(&route.uid, self.push.seq)
    }
}

struct Room {
    queue: Vec<Queued>,
    /// When the room's previous push arrived.
    last_push: Option<Instant>,
    /// The smoothed gap between pushes, at most a window.
    gap: Duration,
    /// The held batch, if any: its number and the end of its window. Its
    /// timer flushes only that batch.
    held: Option<(u64, Instant)>,
    /// Held while a batch is sent, so batches leave in order.
    sending: Arc<tokio::sync::Mutex<()>>,
    /// The routes of the last batch's audience, reused while the audience
    /// and the directory stay the same.
    routes: Option<Arc<CachedRoutes>>,
}

struct CachedRoutes {
    users: Vec<UserId>,
    version: u64,
    routes: Vec<Route>,
}

/// Pushes a room may hold before a sender waits for its push to leave
/// (far fewer than a connection may have unacknowledged).
const QUEUE_HIGH: usize = 256;

/// Rooms are swept of idle entries when there are more than this many.
const ROOMS_SWEEP_AT: usize = 1024;

struct Rooms {
    by_group: HashMap<u64, Room>,
    /// The next sweep happens at this many rooms.
    sweep_at: usize,
}

/// The sessions directory and the gateway nodes it points at.
pub struct Fanout {
    sessions: Arc<dyn SessionDirectory>,
    gateways: RwLock<HashMap<Arc<str>, Arc<dyn Gateway>>>,
    window: Duration,
    rooms: Mutex<Rooms>,
    /// Numbers held batches, across rooms: a room forgotten and made again
    /// never reuses the number a timer of the old one is waiting with.
    batches: std::sync::atomic::AtomicU64,
    directory_errors: IntCounter,
    batch_size: Histogram,
}

impl Fanout {
    /// A fan-out over `sessions`; a busy group's push waits at most `window`
    /// to share its writes with the next ones (zero: each leaves at once).
    pub fn new(
        sessions: Arc<dyn SessionDirectory>,
        window: Duration,
        registry: &Registry,
    ) -> Fanout {
        let directory_errors = natter_node::telemetry::register(
            registry,
            IntCounter::new(
                "natter_directory_errors_total",
                "Sessions directory calls that failed (register, unregister, renew, look-up).",
            )
            .expect("valid counter"),
        );
        let batch_size = natter_node::telemetry::register(
            registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "natter_group_push_batch_size",
                    "Group pushes sent together by a group's room.",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            )
            .expect("valid histogram"),
        );
        Fanout {
            sessions,
            gateways: RwLock::new(HashMap::new()),
            window,
            rooms: Mutex::new(Rooms {
                by_group: HashMap::new(),
                sweep_at: ROOMS_SWEEP_AT,
            }),
            batches: std::sync::atomic::AtomicU64::new(0),
            directory_errors,
            batch_size,
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

    /// Sends `pushes` to their targets (a device's route and the range of
    /// `pushes` it gets), one call per gateway node.
    pub fn push<R: Borrow<Route>>(
        &self,
        pushes: Vec<Push>,
        targets: impl IntoIterator<Item = (R, u32, u32)>,
    ) {
        let pushes: Arc<[Push]> = pushes.into();
        // Few nodes, many devices: a list beats hashing each node name.
        let mut by_node: Vec<(Arc<str>, Vec<Target>)> = Vec::new();
        for (route, from, to) in targets {
            let route = route.borrow();
            let target = Target {
                conn: route.conn,
                from,
                to,
            };
            let found = by_node
                .iter_mut()
                .find(|(node, _)| Arc::ptr_eq(node, &route.node) || *node == route.node);
            match found {
                Some((_, list)) => list.push(target),
                None => by_node.push((route.node.clone(), vec![target])),
            }
        }
        for (node, targets) in by_node {
            match self.gateway(&node) {
                Some(gateway) => gateway.push(PushBatch {
                    pushes: pushes.clone(),
                    targets,
                }),
                None => tracing::warn!(%node, "no route to gateway node; receivers will sync"),
            }
        }
    }

    /// Queues a push to a group's audience, except the connection it came
    /// from; it leaves with the group's next batch (see the module notes),
    /// sent by a task of its own. Returns at once, unless the group's room
    /// holds `QUEUE_HIGH` pushes or more: then once this push has left.
    pub async fn to_group(
        self: &Arc<Self>,
        group: u64,
        push: Push,
        audience: Audience,
        except: Option<&Session>,
    ) {
        let queued = Queued {
            push,
            audience,
            except: except.map(|s| (s.node.clone(), s.conn)),
        };
        let now = Instant::now();
        let overloaded;
        let sending = {
            let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
            self.sweep(&mut rooms, now);
            let window = self.window;
            let room = rooms.by_group.entry(group).or_insert_with(|| Room {
                queue: Vec::new(),
                last_push: None,
                gap: window,
                held: None,
                sending: Arc::default(),
                routes: None,
            });
            room.queue.push(queued);
            let gap = room
                .last_push
                .map_or(window, |last| now.duration_since(last));
            room.last_push = Some(now);
            // Smoothed, so one early or late push does not flip the group;
            // a pause of a window or more starts afresh.
            room.gap = if gap >= window {
                window
            } else {
                (room.gap + gap) / 2
            };
            // Batches are not leaving as fast as pushes come (a slow
            // directory, say): this push does not wait in a batch, and its
            // sender waits for it to leave.
            overloaded = room.queue.len() >= QUEUE_HIGH;
            // When the next push is expected, with a quarter of a gap to
            // spare: one expected right at a window's end would as often
            // miss it, and its batch would have waited for nothing.
            let next = room.gap + room.gap / 4;
            match room.held {
                // The batch waits while the next push is expected before
                // its window ends.
                Some((_, due)) if !overloaded && now + next < due => return,
                Some(_) => {
                    room.held = None;
                    room.sending.clone()
                }
                // Busy: another push is expected within the window to share
                // this one's write.
                None if !overloaded && next < window => {
                    let due = now + window;
                    let batch = self
                        .batches
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    room.held = Some((batch, due));
                    let fanout = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep_until(due).await;
                        if let Some(sending) = fanout.close_held(group, batch) {
                            fanout.flush(group, sending).await;
                        }
                    });
                    return;
                }
                None => room.sending.clone(),
            }
        };
        // In a task of its own: the sender's reply does not wait for a
        // fan-out to thousands of connections, and a caller that gives up
        // (a cancelled request) cannot stop a batch half-way. Flushes that
        // queue up behind one another take everything queued so far when
        // their turn comes, so a burst shares writes anyway.
        let fanout = self.clone();
        let flush = tokio::spawn(async move { fanout.flush(group, sending).await });
        if overloaded {
            let _ = flush.await;
        }
    }

    /// Closes held batch `batch` of `group` at the end of its window, unless
    /// a push closed it already (a later batch has its own timer).
    fn close_held(&self, group: u64, batch: u64) -> Option<Arc<tokio::sync::Mutex<()>>> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let room = rooms.by_group.get_mut(&group)?;
        if room.held.map(|(held, _)| held) != Some(batch) {
            return None;
        }
        room.held = None;
        Some(room.sending.clone())
    }

    /// Forgets rooms that are idle (nothing queued, nothing sent within the
    /// window) once there are many.
    fn sweep(&self, rooms: &mut Rooms, now: Instant) {
        if rooms.by_group.len() < rooms.sweep_at {
            return;
        }
        rooms.by_group.retain(|_, room| {
            // A clone of `sending` is a flush on its way.
            !room.queue.is_empty()
                || room.held.is_some()
                || Arc::strong_count(&room.sending) > 1
                || room.last_push.is_some_and(|last| last + self.window > now)
        });
        rooms.sweep_at = (rooms.by_group.len() * 2).max(ROOMS_SWEEP_AT);
    }

    /// Sends what the group's room holds, as one batch.
    async fn flush(&self, group: u64, sending: Arc<tokio::sync::Mutex<()>>) {
        // Whoever holds `sending` takes everything queued so far: batches
        // leave in the order their pushes were queued.
        let _sending = sending.lock().await;
        let (mut items, cached) = {
            let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
            match rooms.by_group.get_mut(&group) {
                Some(room) => (std::mem::take(&mut room.queue), room.routes.clone()),
                None => return,
            }
        };
        if items.is_empty() {
            return;
        }
        // Queued in the order their senders got here, which two messages
        // committed together may reach in either order; they leave in the
        // group's order. (Stable: a repeat keeps its place.)
        items.sort_by_key(|q| q.push.seq);
        self.batch_size.observe(items.len() as f64);
        let users = audience_users(&items);
        // Read before the look-up: a change meanwhile makes the next batch
        // look again.
        let version = self.sessions.version();
        let routes = match cached {
            Some(c) if version == Some(c.version) && c.users == users => c,
            _ => {
                let routes = match self.sessions.routes_of(&users).await {
                    Ok(routes) => routes,
                    Err(e) => {
                        self.directory_failed();
                        tracing::warn!(error = %e, group, "session look-up failed; members will sync");
                        return;
                    }
                };
                let fresh = Arc::new(CachedRoutes {
                    users,
                    version: version.unwrap_or(0),
                    routes,
                });
                if version.is_some() {
                    let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(room) = rooms.by_group.get_mut(&group) {
                        room.routes = Some(fresh.clone());
                    }
                }
                fresh
            }
        };
        let routes = &routes.routes;
        let mut targets = Vec::with_capacity(routes.len());
        for route in routes.iter() {
            // Each run of consecutive pushes this device gets is one target.
            let mut start = None;
            for (i, item) in items.iter().enumerate() {
                match (item.reaches(route), start) {
                    (true, None) => start = Some(i as u32),
                    (false, Some(from)) => {
                        targets.push((route, from, i as u32));
                        start = None;
                    }
                    _ => {}
                }
            }
            if let Some(from) = start {
                targets.push((route, from, items.len() as u32));
            }
        }
        self.push(items.into_iter().map(|q| q.push).collect(), targets);
    }
}

/// Every user any of `items` is for, sorted, without repeats.
fn audience_users(items: &[Queued]) -> Vec<UserId> {
    if let [only] = items {
        return match &only.audience {
            // Already sorted and unique.
            Audience::Members(snapshot) => snapshot.members.keys().cloned().collect(),
            Audience::Users(users) => users.to_vec(),
        };
    }
    let mut users = Vec::new();
    let mut last: Option<&Arc<Snapshot>> = None;
    for item in items {
        match &item.audience {
            Audience::Members(snapshot) => {
                if last.is_some_and(|l| Arc::ptr_eq(l, snapshot)) {
                    continue;
                }
                last = Some(snapshot);
                users.extend(snapshot.members.keys().cloned());
            }
            Audience::Users(list) => users.extend_from_slice(list),
        }
    }
    users.sort_unstable();
    users.dedup();
    users
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use natter_group::store::{GroupRecord, MemberRecord};
    use natter_proto::api::{JoinType, Role};
    use natter_proto::Op;

    use super::*;
    use crate::sessions::MemoryDirectory;

    /// A batch as (conn, seqs) per target.
    type Batch = Vec<(u64, Vec<u64>)>;

    /// Every batch a node got.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Batch>>);

    impl Gateway for Recorder {
        fn push(&self, batch: PushBatch) {
            let targets = batch
                .targets
                .iter()
                .map(|t| {
                    let seqs = batch.slice(t).expect("in range").iter().map(|p| p.seq);
                    (t.conn, seqs.collect())
                })
                .collect();
            self.0.lock().expect("lock").push(targets);
        }
        fn kick(&self, _conn: u64, _code: natter_proto::ErrorCode, _reason: &str) {}
    }

    impl Recorder {
        fn take(&self) -> Vec<Batch> {
            let mut batches = std::mem::take(&mut *self.0.lock().expect("lock"));
            for batch in &mut batches {
                batch.sort();
            }
            batches
        }
    }

    fn push(seq: u64) -> Push {
        Push {
            op: Op::Push,
            mid: seq,
            group: 7,
            seq,
            body: Bytes::from(vec![seq as u8]),
            acked_at: std::time::Instant::now(),
        }
    }

    fn u(n: u64) -> UserId {
        UserId::parse(&format!("u{n}")).expect("user id")
    }

    fn users(numbers: &[u64]) -> Vec<UserId> {
        numbers.iter().map(|&n| u(n)).collect()
    }

    /// Users 1..=n online on node "a", user u on connection 10·u.
    async fn fanout(window_ms: u64, users: u64) -> (Arc<Fanout>, Arc<Recorder>) {
        fanout_over(Arc::new(MemoryDirectory::default()), window_ms, users).await
    }

    /// A fan-out over `directory` with users 1..=n online on node "a".
    async fn fanout_over(
        directory: Arc<dyn SessionDirectory>,
        window_ms: u64,
        users: u64,
    ) -> (Arc<Fanout>, Arc<Recorder>) {
        for uid in 1..=users {
            directory
                .register(Session {
                    uid: u(uid),
                    device: "phone".into(),
                    node: Arc::from("a"),
                    conn: uid * 10,
                })
                .await
                .expect("register");
        }
        let fanout = Arc::new(Fanout::new(
            directory,
            Duration::from_millis(window_ms),
            &Registry::new(),
        ));
        let recorder = Arc::new(Recorder::default());
        fanout.attach_gateway("a", recorder.clone());
        (fanout, recorder)
    }

    fn members(joins: &[(u64, u64)]) -> Audience {
        let group = GroupRecord {
            id: 7,
            name: "g".into(),
            avatar: String::new(),
            owner: u(1),
            join_type: JoinType::Open,
            mute_all: false,
            dissolved: false,
            created_ms: 0,
            version: 1,
        };
        let members: BTreeMap<UserId, MemberRecord> = joins
            .iter()
            .map(|&(uid, join_seq)| {
                let member = MemberRecord {
                    uid: u(uid),
                    role: Role::Member,
                    nickname: String::new(),
                    joined_ms: 0,
                    join_seq,
                    muted_until_ms: 0,
                };
                (u(uid), member)
            })
            .collect();
        Audience::Members(Arc::new(Snapshot { group, members }))
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_group_shares_writes_and_a_quiet_one_sends_at_once() {
        let (fanout, recorder) = fanout(100, 2).await;
        let everyone = || Audience::users(users(&[1, 2]));
        queue(&fanout, 1, everyone()).await;
        assert_eq!(recorder.take(), [vec![(10, vec![1]), (20, vec![1])]]);
        // A burst: held, then sent together, in order.
        queue(&fanout, 2, everyone()).await;
        queue(&fanout, 3, everyone()).await;
        assert!(recorder.take().is_empty());
        tokio::time::sleep(Duration::from_millis(101)).await;
        assert_eq!(recorder.take(), [vec![(10, vec![2, 3]), (20, vec![2, 3])]]);
        // Another group is not held by this one's window.
        fanout.to_group(8, push(1), everyone(), None).await;
        settle().await;
        assert_eq!(recorder.take().len(), 1);
        // After a quiet window, at once again.
        tokio::time::sleep(Duration::from_millis(150)).await;
        queue(&fanout, 4, everyone()).await;
        assert_eq!(recorder.take(), [vec![(10, vec![4]), (20, vec![4])]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_leaves_when_the_next_push_would_come_after_its_window() {
        let (fanout, recorder) = fanout(100, 1).await;
        let one = || Audience::users(users(&[1]));
        // Every 40 ms: the first leaves at once, then each batch opens and
        // leaves with the push after which the next one would fall beyond
        // its window: three fit (at 0, 40 and 80 ms of it) once the gap is
        // known; the first batch, still measuring it, takes two.
        for seq in 1..=9 {
            queue(&fanout, seq, one()).await;
            tokio::time::advance(Duration::from_millis(40)).await;
            settle().await;
        }
        assert_eq!(
            recorder.take(),
            [
                vec![(10, vec![1])],
                vec![(10, vec![2, 3])],
                vec![(10, vec![4, 5, 6])],
                vec![(10, vec![7, 8, 9])],
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pair_a_window_shares_one_write_and_waits_one_gap() {
        let (fanout, recorder) = fanout(100, 1).await;
        let one = || Audience::users(users(&[1]));
        // 20 a second against a 100 ms window: pairs, the first of each
        // waiting 50 ms, not the whole window.
        queue(&fanout, 1, one()).await;
        assert_eq!(recorder.take().len(), 1);
        for seq in 2..=5 {
            tokio::time::advance(Duration::from_millis(50)).await;
            queue(&fanout, seq, one()).await;
            let want: &[Batch] = match seq {
                2 | 4 => &[],
                _ => &[vec![(10, vec![seq - 1, seq])]],
            };
            assert_eq!(recorder.take(), want, "after push {seq}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_batch_leaves_at_the_end_of_its_window_at_the_latest() {
        let (fanout, recorder) = fanout(100, 1).await;
        let one = || Audience::users(users(&[1]));
        queue(&fanout, 1, one()).await;
        queue(&fanout, 2, one()).await;
        recorder.take();
        // Held; nothing follows.
        tokio::time::advance(Duration::from_millis(99)).await;
        settle().await;
        assert!(recorder.take().is_empty());
        tokio::time::advance(Duration::from_millis(2)).await;
        settle().await;
        assert_eq!(recorder.take(), [vec![(10, vec![2])]]);
        // After a pause of a window, at once again.
        queue(&fanout, 3, one()).await;
        assert_eq!(recorder.take(), [vec![(10, vec![3])]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_closed_early_leaves_the_next_one_its_own_window() {
        let (fanout, recorder) = fanout(100, 1).await;
        let one = || Audience::users(users(&[1]));
        queue(&fanout, 1, one()).await;
        // Opens a batch due at 100 ms.
        queue(&fanout, 2, one()).await;
        tokio::time::advance(Duration::from_millis(60)).await;
        // Closes it (the next push is expected after 100 ms) ...
        queue(&fanout, 3, one()).await;
        // ... and this one opens the next, due at 160 ms.
        queue(&fanout, 4, one()).await;
        assert_eq!(
            recorder.take(),
            [vec![(10, vec![1])], vec![(10, vec![2, 3])]]
        );
        // The first batch's timer finds its batch gone.
        tokio::time::advance(Duration::from_millis(50)).await;
        settle().await;
        assert!(recorder.take().is_empty());
        tokio::time::advance(Duration::from_millis(51)).await;
        settle().await;
        assert_eq!(recorder.take(), [vec![(10, vec![4])]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_sending_about_once_a_window_never_waits() {
        // 95 ms apart: the next push would come too close to the end of a
        // 100 ms window to be worth holding this one for.
        let (fanout, recorder) = fanout(100, 1).await;
        for seq in 1..=6 {
            queue(&fanout, seq, Audience::users(users(&[1]))).await;
            assert_eq!(recorder.take(), [vec![(10, vec![seq])]], "push {seq}");
            tokio::time::advance(Duration::from_millis(95)).await;
        }
    }

    /// Queues push `seq` of group 7 for `audience` and lets its batch go
    /// out if it leaves now.
    async fn queue(fanout: &Arc<Fanout>, seq: u64, audience: Audience) {
        fanout.to_group(7, push(seq), audience, None).await;
        settle().await;
    }

    /// Lets spawned tasks run to their next wait, time standing still.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_connection_gets_only_what_is_for_it() {
        let (fanout, recorder) = fanout(100, 4).await;
        queue(&fanout, 1, Audience::users(users(&[1]))).await;
        recorder.take();
        // User 2 joined at 3, user 3 is not a member; user 1 sent 3 from
        // connection 10; the event at 4 is for user 4 alone.
        let snapshot = members(&[(1, 1), (2, 3)]);
        let from = Session {
            uid: u(1),
            device: "phone".into(),
            node: Arc::from("a"),
            conn: 10,
        };
        queue(&fanout, 2, snapshot.clone()).await;
        fanout
            .to_group(7, push(3), snapshot.clone(), Some(&from))
            .await;
        settle().await;
        queue(&fanout, 4, Audience::users(users(&[4]))).await;
        queue(&fanout, 5, snapshot).await;
        tokio::time::sleep(Duration::from_millis(101)).await;
        // One batch: user 1 gets 2 and 5 (two runs), user 2 from 3 on
        // except the event, user 4 the event only.
        assert_eq!(
            recorder.take(),
            [vec![
                (10, vec![2]),
                (10, vec![5]),
                (20, vec![3]),
                (20, vec![5]),
                (40, vec![4]),
            ]]
        );
    }

    #[tokio::test]
    async fn routes_are_reused_only_while_the_directory_is_unchanged() {
        let (fanout, recorder) = fanout(0, 1).await;
        let both = || Audience::users(users(&[1, 2]));
        queue(&fanout, 1, both()).await;
        queue(&fanout, 2, both()).await;
        let user_2 = Session {
            uid: u(2),
            device: "phone".into(),
            node: Arc::from("a"),
            conn: 20,
        };
        fanout
            .sessions()
            .register(user_2.clone())
            .await
            .expect("register");
        queue(&fanout, 3, both()).await;
        fanout
            .sessions()
            .unregister(&user_2)
            .await
            .expect("unregister");
        queue(&fanout, 4, both()).await;
        // A different audience is looked up afresh, the directory unchanged.
        fanout.sessions().register(user_2).await.expect("register");
        queue(&fanout, 5, Audience::users(users(&[1]))).await;
        queue(&fanout, 6, both()).await;
        assert_eq!(
            recorder.take(),
            [
                vec![(10, vec![1])],
                vec![(10, vec![2])],
                vec![(10, vec![3]), (20, vec![3])],
                vec![(10, vec![4])],
                vec![(10, vec![5])],
                vec![(10, vec![6]), (20, vec![6])],
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_leaves_in_the_groups_order_whatever_order_it_was_queued_in() {
        let (fanout, recorder) = fanout(100, 1).await;
        let one = || Audience::users(users(&[1]));
        queue(&fanout, 1, one()).await;
        // Committed together, queued by whichever sender got here first.
        queue(&fanout, 3, one()).await;
        queue(&fanout, 2, one()).await;
        tokio::time::sleep(Duration::from_millis(101)).await;
        assert_eq!(
            recorder.take(),
            [vec![(10, vec![1])], vec![(10, vec![2, 3])]]
        );
    }

    /// A directory whose look-ups wait for a permit.
    struct Gated {
        inner: MemoryDirectory,
        gate: tokio::sync::Semaphore,
    }

    #[async_trait::async_trait]
    impl SessionDirectory for Gated {
        async fn register(
            &self,
            session: Session,
        ) -> Result<Option<Session>, crate::sessions::DirectoryError> {
            self.inner.register(session).await
        }
        async fn unregister(
            &self,
            session: &Session,
        ) -> Result<(), crate::sessions::DirectoryError> {
            self.inner.unregister(session).await
        }
        async fn lookup(
            &self,
            uid: &UserId,
        ) -> Result<Vec<Session>, crate::sessions::DirectoryError> {
            self.inner.lookup(uid).await
        }
        async fn routes_of(
            &self,
            uids: &[UserId],
        ) -> Result<Vec<Route>, crate::sessions::DirectoryError> {
            let _permit = self.gate.acquire().await.expect("open");
            self.inner.routes_of(uids).await
        }
    }

    #[tokio::test]
    async fn batches_wait_in_order_behind_a_slow_look_up() {
        let directory = Arc::new(Gated {
            inner: MemoryDirectory::default(),
            gate: tokio::sync::Semaphore::new(0),
        });
        let (fanout, recorder) = fanout_over(directory.clone(), 0, 1).await;
        // The first batch waits on the directory, the second behind it; the
        // senders are not held meanwhile.
        fanout
            .to_group(7, push(1), Audience::users(users(&[1])), None)
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        fanout
            .to_group(7, push(2), Audience::users(users(&[1])), None)
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(recorder.take().is_empty());
        directory.gate.add_permits(10);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(recorder.take());
            assert!(std::time::Instant::now() < deadline, "lost: {got:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(got, [vec![(10, vec![1])], vec![(10, vec![2])]]);
    }

    #[tokio::test]
    async fn senders_wait_when_batches_cannot_keep_up() {
        let directory = Arc::new(Gated {
            inner: MemoryDirectory::default(),
            gate: tokio::sync::Semaphore::new(0),
        });
        let (fanout, recorder) = fanout_over(directory.clone(), 0, 1).await;
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sender = {
            let (fanout, sent) = (fanout.clone(), sent.clone());
            tokio::spawn(async move {
                for seq in 1..=300 {
                    fanout
                        .to_group(7, push(seq), Audience::users(users(&[1])), None)
                        .await;
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        };
        // The first batch waits on the directory: once the room holds
        // QUEUE_HIGH pushes, the sender waits too.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let held_at = sent.load(std::sync::atomic::Ordering::Relaxed);
        assert!(held_at <= QUEUE_HIGH, "sent {held_at}");
        assert!(!sender.is_finished());
        directory.gate.add_permits(1000);
        sender.await.expect("sender");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut seqs = Vec::new();
        while seqs.len() < 300 {
            for batch in recorder.take() {
                for (_, got) in batch {
                    seqs.extend(got);
                }
            }
            assert!(std::time::Instant::now() < deadline, "got {}", seqs.len());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(seqs, (1..=300).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn without_a_window_every_push_leaves_at_once() {
        let (fanout, recorder) = fanout(0, 1).await;
        for seq in 1..=3 {
            queue(&fanout, seq, Audience::users(users(&[1]))).await;
        }
        assert_eq!(
            recorder.take(),
            [
                vec![(10, vec![1])],
                vec![(10, vec![2])],
                vec![(10, vec![3])]
            ]
        );
    }
}
