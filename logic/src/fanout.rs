//! Routing pushes: from users to their online sessions, grouped per gateway
//! node, so that one call reaches every connection a node holds (a group
//! message to 2,000 members is a handful of calls, not 2,000), with one
//! copy of each body per call.
//!
//! A group's pushes (messages and events alike) pass through its room: they
//! leave in the order they were queued, and a busy group's pushes leave at
//! most once per push window, together. A group becomes busy when a push
//! follows the previous one within half a window, and stays busy while its
//! pushes keep coming within a window. A push of a group that is not busy,
//! or the first after a quiet window, leaves at once; the pushes of a busy
//! group wait for the end of the window and then go out as one batch, which
//! each connection receives in one write. That trades at most one window of
//! latency, only where at least two pushes share each write, for far fewer
//! writes and wake-ups per delivery.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use natter_group::Snapshot;
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
    Users(Arc<[u64]>),
}

impl Audience {
    /// These users, in any order.
    pub fn users(mut users: Vec<u64>) -> Audience {
        users.sort_unstable();
        users.dedup();
        Audience::Users(users.into())
    }

    fn reaches(&self, uid: u64, seq: u64) -> bool {
        match self {
            Audience::Members(snapshot) => snapshot
                .members
                .get(&uid)
                .is_some_and(|m| m.join_seq <= seq),
            Audience::Users(users) => users.binary_search(&uid).is_ok(),
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
        self.audience.reaches(route.uid, self.push.seq)
    }
}

#[derive(Default)]
struct Room {
    queue: Vec<Queued>,
    /// When the room last sent.
    last_flush: Option<Instant>,
    /// When the room's previous push arrived.
    last_push: Option<Instant>,
    /// The group sends often enough for its pushes to share writes.
    busy: bool,
    /// A flush at the end of the window is on its way.
    scheduled: bool,
    /// Held while a batch is sent, so batches leave in order.
    sending: Arc<tokio::sync::Mutex<()>>,
    /// The routes of the last batch's audience, reused while the audience
    /// and the directory stay the same.
    routes: Option<Arc<CachedRoutes>>,
}

struct CachedRoutes {
    users: Vec<u64>,
    version: u64,
    routes: Vec<Route>,
}

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
    directory_errors: IntCounter,
    batch_size: Histogram,
}

impl Fanout {
    /// A fan-out over `sessions`; a group's pushes leave at most once per
    /// `window` (zero: each at once).
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
    /// from; it leaves with the group's next batch (see the module notes).
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
        let sending = {
            let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
            self.sweep(&mut rooms, now);
            let room = rooms.by_group.entry(group).or_default();
            room.queue.push(queued);
            if room.scheduled {
                room.last_push = Some(now);
                room.busy = true;
                return;
            }
            // Held only while the group is busy: it becomes busy when a push
            // follows the previous one within half a window (two a window),
            // and stays busy while they keep coming within a window. A
            // slower group would wait without sharing a write.
            let gap = room.last_push.map(|last| now.duration_since(last));
            room.busy =
                gap.is_some_and(|gap| gap < self.window / 2 || (room.busy && gap < self.window));
            room.last_push = Some(now);
            match room.last_flush.map(|last| last + self.window) {
                Some(due) if room.busy && due > now => {
                    room.scheduled = true;
                    let fanout = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep_until(due).await;
                        let sending = {
                            let mut rooms = fanout.rooms.lock().unwrap_or_else(|e| e.into_inner());
                            let Some(room) = rooms.by_group.get_mut(&group) else {
                                return;
                            };
                            room.scheduled = false;
                            // The window this batch closes ended at `due`,
                            // however late the timer fired: windows keep to
                            // their grid instead of drifting later each time.
                            room.last_flush = Some(due);
                            room.sending.clone()
                        };
                        fanout.flush(group, sending).await;
                    });
                    return;
                }
                _ => {
                    room.last_flush = Some(now);
                    room.sending.clone()
                }
            }
        };
        // In a task of its own, awaited: the caller waits for its batch to
        // leave, but a caller that gives up (a cancelled request) cannot
        // stop a batch half-way, which holds other senders' pushes too.
        let fanout = self.clone();
        let _ = tokio::spawn(async move { fanout.flush(group, sending).await }).await;
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
                || room.scheduled
                || Arc::strong_count(&room.sending) > 1
                || room.last_flush.is_some_and(|last| last + self.window > now)
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
fn audience_users(items: &[Queued]) -> Vec<u64> {
    if let [only] = items {
        return match &only.audience {
            // Already sorted and unique.
            Audience::Members(snapshot) => snapshot.members.keys().copied().collect(),
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
                users.extend(snapshot.members.keys().copied());
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
                    uid,
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
            owner: 1,
            join_type: JoinType::Open,
            mute_all: false,
            dissolved: false,
            created_ms: 0,
            version: 1,
        };
        let members: BTreeMap<u64, MemberRecord> = joins
            .iter()
            .map(|&(uid, join_seq)| {
                let member = MemberRecord {
                    uid,
                    role: Role::Member,
                    nickname: String::new(),
                    joined_ms: 0,
                    join_seq,
                    muted_until_ms: 0,
                };
                (uid, member)
            })
            .collect();
        Audience::Members(Arc::new(Snapshot { group, members }))
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_group_sends_once_per_window_and_a_quiet_one_at_once() {
        let (fanout, recorder) = fanout(100, 2).await;
        let everyone = || Audience::users(vec![1, 2]);
        fanout.to_group(7, push(1), everyone(), None).await;
        assert_eq!(recorder.take(), [vec![(10, vec![1]), (20, vec![1])]]);
        // Within the window: held, then sent together, in order.
        fanout.to_group(7, push(2), everyone(), None).await;
        fanout.to_group(7, push(3), everyone(), None).await;
        assert!(recorder.take().is_empty());
        tokio::time::sleep(Duration::from_millis(101)).await;
        assert_eq!(recorder.take(), [vec![(10, vec![2, 3]), (20, vec![2, 3])]]);
        // Another group is not held by this one's window.
        fanout.to_group(8, push(1), everyone(), None).await;
        assert_eq!(recorder.take().len(), 1);
        // After a quiet window, at once again.
        tokio::time::sleep(Duration::from_millis(150)).await;
        fanout.to_group(7, push(4), everyone(), None).await;
        assert_eq!(recorder.take(), [vec![(10, vec![4]), (20, vec![4])]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_timer_does_not_push_the_next_window_later() {
        let (fanout, recorder) = fanout(100, 1).await;
        let one = || Audience::users(vec![1]);
        fanout.to_group(7, push(1), one(), None).await;
        fanout.to_group(7, push(2), one(), None).await;
        tokio::time::advance(Duration::from_millis(80)).await;
        fanout.to_group(7, push(3), one(), None).await;
        // The window ends at 100 ms; its batch leaves at 110.
        tokio::time::advance(Duration::from_millis(30)).await;
        settle().await;
        assert_eq!(
            recorder.take(),
            [vec![(10, vec![1])], vec![(10, vec![2, 3])]]
        );
        // Still busy: the next window ends at 200 ms, not 210.
        fanout.to_group(7, push(4), one(), None).await;
        assert!(recorder.take().is_empty());
        tokio::time::advance(Duration::from_millis(91)).await;
        settle().await;
        assert_eq!(recorder.take(), [vec![(10, vec![4])]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_group_stays_busy_while_pushes_come_within_a_window() {
        let (fanout, recorder) = fanout(100, 1).await;
        let one = || Audience::users(vec![1]);
        // A burst makes the group busy.
        fanout.to_group(7, push(1), one(), None).await;
        fanout.to_group(7, push(2), one(), None).await;
        // Then 70 ms apart (more than half a window, less than one): still
        // held, and pushes that fall in one window leave together.
        for seq in 3..=6 {
            tokio::time::advance(Duration::from_millis(70)).await;
            settle().await;
            fanout.to_group(7, push(seq), one(), None).await;
        }
        tokio::time::advance(Duration::from_millis(100)).await;
        settle().await;
        assert_eq!(
            recorder.take(),
            [
                vec![(10, vec![1])],
                vec![(10, vec![2, 3])],
                vec![(10, vec![4])],
                vec![(10, vec![5, 6])],
            ]
        );
        // A pause of more than a window ends it: the next push leaves at once.
        tokio::time::advance(Duration::from_millis(300)).await;
        fanout.to_group(7, push(7), one(), None).await;
        assert_eq!(recorder.take(), [vec![(10, vec![7])]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_sending_about_once_a_window_never_waits() {
        let (fanout, recorder) = fanout(100, 1).await;
        for seq in 1..=4 {
            fanout
                .to_group(7, push(seq), Audience::users(vec![1]), None)
                .await;
            assert_eq!(recorder.take(), [vec![(10, vec![seq])]], "push {seq}");
            tokio::time::advance(Duration::from_millis(60)).await;
        }
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
        fanout
            .to_group(7, push(1), Audience::users(vec![1]), None)
            .await;
        recorder.take();
        // User 2 joined at 3, user 3 is not a member; user 1 sent 3 from
        // connection 10; the event at 4 is for user 4 alone.
        let snapshot = members(&[(1, 1), (2, 3)]);
        let from = Session {
            uid: 1,
            device: "phone".into(),
            node: Arc::from("a"),
            conn: 10,
        };
        fanout.to_group(7, push(2), snapshot.clone(), None).await;
        fanout
            .to_group(7, push(3), snapshot.clone(), Some(&from))
            .await;
        fanout
            .to_group(7, push(4), Audience::users(vec![4]), None)
            .await;
        fanout.to_group(7, push(5), snapshot, None).await;
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
        let both = || Audience::users(vec![1, 2]);
        fanout.to_group(7, push(1), both(), None).await;
        fanout.to_group(7, push(2), both(), None).await;
        let user_2 = Session {
            uid: 2,
            device: "phone".into(),
            node: Arc::from("a"),
            conn: 20,
        };
        fanout
            .sessions()
            .register(user_2.clone())
            .await
            .expect("register");
        fanout.to_group(7, push(3), both(), None).await;
        fanout
            .sessions()
            .unregister(&user_2)
            .await
            .expect("unregister");
        fanout.to_group(7, push(4), both(), None).await;
        // A different audience is looked up afresh, the directory unchanged.
        fanout.sessions().register(user_2).await.expect("register");
        fanout
            .to_group(7, push(5), Audience::users(vec![1]), None)
            .await;
        fanout.to_group(7, push(6), both(), None).await;
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
        let one = || Audience::users(vec![1]);
        fanout.to_group(7, push(1), one(), None).await;
        // Committed together, queued by whichever sender got here first.
        fanout.to_group(7, push(3), one(), None).await;
        fanout.to_group(7, push(2), one(), None).await;
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
        async fn lookup(&self, uid: u64) -> Result<Vec<Session>, crate::sessions::DirectoryError> {
            self.inner.lookup(uid).await
        }
        async fn routes_of(
            &self,
            uids: &[u64],
        ) -> Result<Vec<Route>, crate::sessions::DirectoryError> {
            let _permit = self.gate.acquire().await.expect("open");
            self.inner.routes_of(uids).await
        }
    }

    #[tokio::test]
    async fn a_sender_that_gives_up_does_not_take_the_batch_with_it() {
        let directory = Arc::new(Gated {
            inner: MemoryDirectory::default(),
            gate: tokio::sync::Semaphore::new(0),
        });
        let (fanout, recorder) = fanout_over(directory.clone(), 0, 1).await;
        let send = |seq| {
            let fanout = fanout.clone();
            tokio::spawn(async move {
                fanout
                    .to_group(7, push(seq), Audience::users(vec![1]), None)
                    .await
            })
        };
        // Two senders; the first one's batch waits on the directory, the
        // second waits for the first; both give up (cancelled requests).
        let first = send(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = send(2);
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        second.abort();
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
    async fn without_a_window_every_push_leaves_at_once() {
        let (fanout, recorder) = fanout(0, 1).await;
        for seq in 1..=3 {
            fanout
                .to_group(7, push(seq), Audience::users(vec![1]), None)
                .await;
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
