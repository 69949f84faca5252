//! Role-to-role calls over gRPC (tonic), for the distributed shape.
//!
//! - [`pb`]: the code generated from `proto/natter_rpc.proto` (at build
//!   time, with protox: no `protoc` needed).
//! - [`LogicServer`] serves any [`LogicService`] to gateways;
//!   [`RemoteLogic`] is the [`LogicService`] a gateway uses: load-balanced
//!   over the live logic nodes, a failed call retried on the next one (every
//!   logic call is safe to repeat: sends are deduplicated by client seq, a
//!   read cursor only moves forward, and a typing notice repeated is at
//!   worst shown twice).
//! - [`GatewayServer`] serves any [`Gateway`] to logic nodes;
//!   [`RemoteGateway`] is the [`Gateway`] logic uses for one gateway node:
//!   pushes are queued and sent in batches, one call for many connections;
//!   a push to a dead gateway is dropped (its devices sync on reconnect).
//! - [`auth`]: every call is signed with the cluster secret, and logic
//!   acts only for sessions it granted at `Authenticate`.
//!
//! This crate knows neither sockets of clients nor storage: it moves the
//! calls of the two traits between processes.

pub mod auth;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use natter_proto::msg::{
    MessageReply, ReadReply, ReadRequest, SendMessage, SyncReply, SyncRequest, Typing,
};
use natter_proto::{ErrorCode, Op, UserId};
use natter_roles::{
    Acked, Connected, Gateway, Identity, LogicService, Push, PushBatch, Refusal, Session, Target,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

pub use auth::{Guarded, PlaneKey, SessionKey, Signer};

/// A channel whose every call is signed for the plane.
type Signed = InterceptedService<Channel, Signer>;

/// The generated messages, clients and servers.
#[allow(clippy::all, unreachable_pub, missing_docs)]
pub mod pb {
    tonic::include_proto!("natter.rpc");
}

fn to_pb(s: &Session) -> pb::Session {
    pb::Session {
        uid: s.uid.to_string(),
        device: s.device.clone(),
        node: s.node.to_string(),
        conn: s.conn,
    }
}

/// A user id from the wire: parsed, never trusted (`what` names the field
/// in the error).
fn user_id(uid: &str, what: &str) -> Result<UserId, String> {
    UserId::parse(uid).map_err(|e| format!("{what}: {e}"))
}

fn from_pb(s: pb::Session) -> Result<Session, String> {
    Ok(Session {
        uid: user_id(&s.uid, "session uid")?,
        device: s.device,
        node: Arc::from(s.node.as_str()),
        conn: s.conn,
    })
}

fn refusal_to_pb(r: Refusal) -> pb::Refusal {
    pb::Refusal {
        code: r.code as u32,
        message: r.message,
        until_ms: r.until_ms,
    }
}

fn refusal_from_pb(r: pb::Refusal) -> Refusal {
    Refusal {
        // A code this node does not know (a newer node's) is still a refusal.
        code: ErrorCode::from_u32(r.code).unwrap_or(ErrorCode::Internal),
        message: r.message,
        until_ms: r.until_ms,
    }
}

fn answer(result: Result<Vec<u8>, Refusal>) -> pb::Answer {
    pb::Answer {
        result: Some(match result {
            Ok(reply) => pb::answer::Result::Reply(reply),
            Err(r) => pb::answer::Result::Refused(refusal_to_pb(r)),
        }),
    }
}

fn bad_request(what: &str, e: prost::DecodeError) -> Status {
    Status::invalid_argument(format!("{what} does not decode: {e}"))
}

/// Serves a [`LogicService`] to gateways: signs a grant for each session it
/// authenticates and acts only for sessions named by such a grant.
pub struct LogicServer {
    logic: Arc<dyn LogicService>,
    sessions: SessionKey,
}

impl LogicServer {
    /// The service, behind the plane's check of every call.
    pub fn service(
        logic: Arc<dyn LogicService>,
        sessions: SessionKey,
        plane: PlaneKey,
    ) -> Guarded<pb::logic_server::LogicServer<LogicServer>> {
        Guarded::new(
            pb::logic_server::LogicServer::new(LogicServer { logic, sessions }),
            plane,
        )
    }
}

#[async_trait]
impl pb::logic_server::Logic for LogicServer {
    async fn authenticate(
        &self,
        request: Request<pb::ConnectRequest>,
    ) -> Result<Response<pb::ConnectResult>, Status> {
        let r = request.into_inner();
        let connected = self
            .logic
            .connect(&r.token, &r.device, &r.node, r.conn)
            .await;
        let result = match connected {
            Ok(c) => {
                // The session exactly as registered: the token's user and
                // device on the connection the gateway named.
                let session = Session {
                    uid: c.identity.uid.clone(),
                    device: c.identity.device.clone(),
                    node: Arc::from(r.node.as_str()),
                    conn: r.conn,
                };
                pb::connect_result::Result::Connected(pb::Connected {
                    uid: c.identity.uid.to_string(),
                    device: c.identity.device,
                    cursor: c.cursor,
                    grant: Some(self.sessions.grant(&session)),
                })
            }
            Err(e) => pb::connect_result::Result::Refused(refusal_to_pb(e)),
        };
        Ok(Response::new(pb::ConnectResult {
            result: Some(result),
        }))
    }

    async fn disconnect(&self, request: Request<pb::Grant>) -> Result<Response<pb::Empty>, Status> {
        let session = self.sessions.verify(Some(&request.into_inner()))?;
        self.logic.disconnect(&session).await;
        Ok(Response::new(pb::Empty {}))
    }

    async fn heartbeat(&self, request: Request<pb::Grants>) -> Result<Response<pb::Empty>, Status> {
        let grants = request.into_inner().grants;
        let mut sessions = Vec::with_capacity(grants.len());
        for grant in &grants {
            match self.sessions.verify(Some(grant)) {
                Ok(session) => sessions.push(session),
                // One bad grant does not cost the others their renewal.
                Err(e) => tracing::warn!(error = %e.message(), "session renewal refused"),
            }
        }
        if sessions.is_empty() && !grants.is_empty() {
            return Err(Status::unauthenticated("no session grant verifies"));
        }
        self.logic.heartbeat(&sessions).await;
        Ok(Response::new(pb::Empty {}))
    }

    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::Answer>, Status> {
        let r = request.into_inner();
        let from = self.sessions.verify(r.from.as_ref())?;
        let message =
            SendMessage::decode(r.message.as_slice()).map_err(|e| bad_request("message", e))?;
        let result = self
            .logic
            .send(&from, message)
            .await
            .map(|reply| reply.encode_to_vec());
        Ok(Response::new(answer(result)))
    }

    async fn acked(&self, request: Request<pb::PushAck>) -> Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        let from = self.sessions.verify(r.from.as_ref())?;
        let acked: Vec<Acked> = r
            .acked
            .iter()
            .map(|a| Acked {
                group: a.group,
                seq: a.seq,
            })
            .collect();
        self.logic.push_acked(&from.uid, &from.device, &acked).await;
        Ok(Response::new(pb::Empty {}))
    }

    async fn sync(&self, request: Request<pb::SyncCall>) -> Result<Response<pb::Answer>, Status> {
        let r = request.into_inner();
        let from = self.sessions.verify(r.from.as_ref())?;
        let sync =
            SyncRequest::decode(r.request.as_slice()).map_err(|e| bad_request("request", e))?;
        let result = self
            .logic
            .sync(&from.uid, &from.device, sync)
            .await
            .map(|reply| reply.encode_to_vec());
        Ok(Response::new(answer(result)))
    }

    async fn read(&self, request: Request<pb::ReadCall>) -> Result<Response<pb::Answer>, Status> {
        let r = request.into_inner();
        let from = self.sessions.verify(r.from.as_ref())?;
        let read =
            ReadRequest::decode(r.request.as_slice()).map_err(|e| bad_request("request", e))?;
        let result = self
            .logic
            .read(&from, &read.conversation, read.seq)
            .await
            .map(|reply| reply.encode_to_vec());
        Ok(Response::new(answer(result)))
    }

    async fn typing(
        &self,
        request: Request<pb::TypingCall>,
    ) -> Result<Response<pb::Answer>, Status> {
        let r = request.into_inner();
        let from = self.sessions.verify(r.from.as_ref())?;
        let typing = Typing::decode(r.request.as_slice()).map_err(|e| bad_request("request", e))?;
        // Success has no body: an empty reply.
        let result = self
            .logic
            .typing(&from, &typing.conversation)
            .await
            .map(|()| Vec::new());
        Ok(Response::new(answer(result)))
    }
}

/// Serves a [`Gateway`] to logic nodes.
pub struct GatewayServer(pub Arc<dyn Gateway>);

impl GatewayServer {
    /// The service, behind the plane's check of every call.
    pub fn service(
        gateway: Arc<dyn Gateway>,
        plane: PlaneKey,
    ) -> Guarded<pb::gateway_server::GatewayServer<GatewayServer>> {
        Guarded::new(
            pb::gateway_server::GatewayServer::new(GatewayServer(gateway)),
            plane,
        )
    }
}

#[async_trait]
impl pb::gateway_server::Gateway for GatewayServer {
    async fn push(&self, request: Request<pb::Deliveries>) -> Result<Response<pb::Empty>, Status> {
        let batch = batch_from_pb(request.into_inner(), Instant::now())?;
        self.0.push(batch);
        Ok(Response::new(pb::Empty {}))
    }

    async fn kick(&self, request: Request<pb::Kick>) -> Result<Response<pb::Empty>, Status> {
        let k = request.into_inner();
        let code = ErrorCode::from_u32(k.code).unwrap_or(ErrorCode::Internal);
        self.0.kick(k.conn, code, &k.reason);
        Ok(Response::new(pb::Empty {}))
    }
}

/// Where a [`RemoteLogic`] finds logic nodes: their gRPC addresses now.
pub type Targets = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

type LogicClient = pb::logic_client::LogicClient<Signed>;

/// The session grants of one gateway node's connections.
#[derive(Default)]
struct Grants {
    by_conn: HashMap<u64, pb::Grant>,
    /// The connections of each (uid, device), latest last: sync and
    /// push-acks name a device, not a connection, and any grant of the
    /// device vouches for it.
    by_device: HashMap<(UserId, String), Vec<u64>>,
}

impl Grants {
    fn insert(&mut self, uid: UserId, device: &str, conn: u64, grant: pb::Grant) {
        self.by_conn.insert(conn, grant);
        let conns = self.by_device.entry((uid, device.to_string())).or_default();
        conns.retain(|c| *c != conn);
        conns.push(conn);
    }

    fn remove(&mut self, session: &Session) -> Option<pb::Grant> {
        let key = (session.uid.clone(), session.device.clone());
        if let Some(conns) = self.by_device.get_mut(&key) {
            conns.retain(|c| *c != session.conn);
            if conns.is_empty() {
                self.by_device.remove(&key);
            }
        }
        self.by_conn.remove(&session.conn)
    }

    fn of_device(&self, uid: &UserId, device: &str) -> Option<pb::Grant> {
        let conn = self
            .by_device
            .get(&(uid.clone(), device.to_string()))?
            .last()?;
        self.by_conn.get(conn).cloned()
    }
}

/// A [`LogicService`] in other processes, for one gateway node. It keeps the
/// grant logic gave each of the node's connections at `connect` and
/// presents it on every later call for that session.
pub struct RemoteLogic {
    targets: Targets,
    plane: PlaneKey,
    clients: Mutex<Vec<(String, LogicClient)>>,
    grants: Mutex<Grants>,
    next: AtomicUsize,
    timeout: Duration,
}

fn channel(addr: &str, timeout: Duration, plane: &PlaneKey) -> Result<Signed, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout);
    Ok(InterceptedService::new(
        endpoint.connect_lazy(),
        Signer(plane.clone()),
    ))
}

/// Status codes after which the same call may succeed on another node.
fn try_elsewhere(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
            | tonic::Code::Internal
    )
}

impl RemoteLogic {
    pub fn new(targets: Targets, timeout: Duration, plane: PlaneKey) -> RemoteLogic {
        RemoteLogic {
            targets,
            plane,
            clients: Mutex::new(Vec::new()),
            grants: Mutex::new(Grants::default()),
            next: AtomicUsize::new(0),
            timeout,
        }
    }

    fn grants(&self) -> std::sync::MutexGuard<'_, Grants> {
        self.grants.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn no_grant() -> Refusal {
        Refusal::new(
            ErrorCode::Internal,
            "this connection holds no session grant from logic",
        )
    }

    /// The grant of `session`'s connection.
    fn grant_of(&self, session: &Session) -> Result<pb::Grant, Refusal> {
        self.grants()
            .by_conn
            .get(&session.conn)
            .cloned()
            .ok_or_else(Self::no_grant)
    }

    /// The clients of the live nodes, starting with the next in turn.
    fn rotation(&self) -> Vec<(String, LogicClient)> {
        let addrs = (self.targets)();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        // Follow joins and leaves: keep clients of live nodes, add new ones.
        clients.retain(|(addr, _)| addrs.contains(addr));
        for addr in &addrs {
            if !clients.iter().any(|(a, _)| a == addr) {
                match channel(addr, self.timeout, &self.plane) {
                    Ok(ch) => clients.push((addr.clone(), pb::logic_client::LogicClient::new(ch))),
                    Err(e) => tracing::warn!(%addr, error = %e, "bad logic address"),
                }
            }
        }
        if clients.is_empty() {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % clients.len();
        let mut turn = clients[start..].to_vec();
        turn.extend_from_slice(&clients[..start]);
        turn
    }

    /// Runs `call` on the live nodes in turn until one answers.
    async fn call<T, F, Fut>(&self, what: &str, call: F) -> Result<T, Refusal>
    where
        F: Fn(LogicClient) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let nodes = self.rotation();
        if nodes.is_empty() {
            return Err(Refusal::new(
                ErrorCode::Internal,
                "no logic node is available",
            ));
        }
        let mut last = None;
        for (addr, client) in nodes {
            match call(client).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if try_elsewhere(&status) => {
                    tracing::warn!(%addr, call = what, error = %status, "logic node failed; trying the next");
                    last = Some(status);
                }
                Err(status) => {
                    tracing::error!(%addr, call = what, error = %status, "logic call refused");
                    return Err(Refusal::new(ErrorCode::Internal, status.message()));
                }
            }
        }
        let reason = last.map(|s| s.to_string()).unwrap_or_default();
        Err(Refusal::new(
            ErrorCode::Internal,
            format!("no logic node answered: {reason}"),
        ))
    }
}

fn unanswer<T: prost::Message + Default>(answer: pb::Answer) -> Result<T, Refusal> {
    match answer.result {
        Some(pb::answer::Result::Reply(bytes)) => T::decode(bytes.as_slice())
            .map_err(|e| Refusal::new(ErrorCode::Internal, format!("bad reply: {e}"))),
        Some(pb::answer::Result::Refused(r)) => Err(refusal_from_pb(r)),
        None => Err(Refusal::new(ErrorCode::Internal, "empty answer")),
    }
}

#[async_trait]
impl LogicService for RemoteLogic {
    async fn connect(
        &self,
        token: &str,
        device: &str,
        node: &str,
        conn: u64,
    ) -> Result<Connected, Refusal> {
        let request = pb::ConnectRequest {
            token: token.to_string(),
            node: node.to_string(),
            conn,
            device: device.to_string(),
        };
        let result = self
            .call("authenticate", |mut c| {
                let request = request.clone();
                async move { c.authenticate(request).await }
            })
            .await?;
        match result.result {
            Some(pb::connect_result::Result::Connected(c)) => {
                let grant = c
                    .grant
                    .ok_or_else(|| Refusal::new(ErrorCode::Internal, "no session grant"))?;
                // Logic registered the session, but one whose user this node
                // cannot name is refused: it is never renewed and expires.
                let uid = user_id(&c.uid, "connected uid").map_err(|e| {
                    tracing::error!(error = %e, "logic answered an invalid user id");
                    Refusal::new(ErrorCode::Internal, e)
                })?;
                self.grants().insert(uid.clone(), &c.device, conn, grant);
                Ok(Connected {
                    identity: Identity {
                        uid,
                        device: c.device,
                    },
                    cursor: c.cursor,
                })
            }
            Some(pb::connect_result::Result::Refused(r)) => Err(refusal_from_pb(r)),
            None => Err(Refusal::new(ErrorCode::Internal, "empty answer")),
        }
    }

    async fn disconnect(&self, session: &Session) {
        let grant = self.grants().remove(session);
        let Some(grant) = grant else {
            return;
        };
        if let Err(e) = self
            .call("disconnect", |mut c| {
                let grant = grant.clone();
                async move { c.disconnect(grant).await }
            })
            .await
        {
            tracing::warn!(error = %e, "disconnect not delivered; the session expires");
        }
    }

    async fn heartbeat(&self, sessions: &[Session]) {
        let batch = {
            let grants = self.grants();
            pb::Grants {
                grants: sessions
                    .iter()
                    .filter_map(|s| grants.by_conn.get(&s.conn).cloned())
                    .collect(),
            }
        };
        if batch.grants.is_empty() {
            return;
        }
        if let Err(e) = self
            .call("heartbeat", |mut c| {
                let batch = batch.clone();
                async move { c.heartbeat(batch).await }
            })
            .await
        {
            tracing::warn!(error = %e, "session renewal not delivered");
        }
    }

    async fn send(&self, from: &Session, message: SendMessage) -> Result<MessageReply, Refusal> {
        let request = pb::SendRequest {
            from: Some(self.grant_of(from)?),
            message: message.encode_to_vec(),
        };
        let answer = self
            .call("send", |mut c| {
                let request = request.clone();
                async move { c.send(request).await }
            })
            .await?;
        unanswer(answer)
    }

    async fn read(
        &self,
        from: &Session,
        conversation: &str,
        seq: u64,
    ) -> Result<ReadReply, Refusal> {
        let call = pb::ReadCall {
            from: Some(self.grant_of(from)?),
            request: ReadRequest {
                conversation: conversation.to_string(),
                seq,
            }
            .encode_to_vec(),
        };
        let answer = self
            .call("read", |mut c| {
                let call = call.clone();
                async move { c.read(call).await }
            })
            .await?;
        unanswer(answer)
    }

    async fn typing(&self, from: &Session, conversation: &str) -> Result<(), Refusal> {
        let call = pb::TypingCall {
            from: Some(self.grant_of(from)?),
            request: Typing {
                conversation: conversation.to_string(),
            }
            .encode_to_vec(),
        };
        let answer = self
            .call("typing", |mut c| {
                let call = call.clone();
                async move { c.typing(call).await }
            })
            .await?;
        // Success is an empty reply, which decodes as `()`.
        unanswer(answer)
    }

    async fn push_acked(&self, uid: &UserId, device: &str, acked: &[Acked]) {
        let Some(grant) = self.grants().of_device(uid, device) else {
            tracing::debug!(%uid, "push ack of a device without a grant");
            return;
        };
        let ack = pb::PushAck {
            from: Some(grant),
            acked: acked
                .iter()
                .map(|a| pb::Acked {
                    group: a.group,
                    seq: a.seq,
                })
                .collect(),
        };
        if let Err(e) = self
            .call("acked", |mut c| {
                let ack = ack.clone();
                async move { c.acked(ack).await }
            })
            .await
        {
            tracing::debug!(error = %e, "push ack not recorded");
        }
    }

    async fn sync(
        &self,
        uid: &UserId,
        device: &str,
        request: SyncRequest,
    ) -> Result<SyncReply, Refusal> {
        let call = pb::SyncCall {
            from: Some(
                self.grants()
                    .of_device(uid, device)
                    .ok_or_else(Self::no_grant)?,
            ),
            request: request.encode_to_vec(),
        };
        let answer = self
            .call("sync", |mut c| {
                let call = call.clone();
                async move { c.sync(call).await }
            })
            .await?;
        unanswer(answer)
    }
}

/// Deliveries queued for one gateway node before new ones are dropped.
const GATEWAY_QUEUE: usize = 65_536;
/// Targets sent in one call at most (more wait for the next call).
const GATEWAY_BATCH: usize = 4096;

enum ToGateway {
    Push(PushBatch),
    Kick(u64, ErrorCode, String),
}

/// A [`Gateway`] in another process: calls are queued (never blocking
/// logic) and a task sends what is queued in as few calls as it can.
pub struct RemoteGateway {
    queue: mpsc::Sender<ToGateway>,
    queued: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RemoteGateway {
    /// A gateway at `addr` (its gRPC address).
    pub fn new(addr: &str, timeout: Duration, plane: &PlaneKey) -> Result<RemoteGateway, String> {
        let client = pb::gateway_client::GatewayClient::new(channel(addr, timeout, plane)?);
        let (queue, rx) = mpsc::channel(1024);
        let queued = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(send_loop(addr.to_string(), client, rx, queued.clone()));
        Ok(RemoteGateway {
            queue,
            queued,
            task,
        })
    }
}

impl Drop for RemoteGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A batch as it travels: each body once, targets as ranges.
fn batch_to_pb(batch: &PushBatch, into: &mut pb::Deliveries) {
    let offset = into.pushes.len() as u32;
    into.pushes.extend(batch.pushes.iter().map(|p| pb::Push {
        op: p.op as u32,
        mid: p.mid,
        group: p.group,
        seq: p.seq,
        body: p.body.to_vec(),
    }));
    into.targets
        .extend(batch.targets.iter().map(|t| pb::Target {
            conn: t.conn,
            from: t.from + offset,
            to: t.to + offset,
        }));
}

/// A batch received; `now` stands for the sender's ack time, which happened
/// in another process (ack-to-push is measured from here).
fn batch_from_pb(d: pb::Deliveries, now: Instant) -> Result<PushBatch, Status> {
    let mut pushes = Vec::with_capacity(d.pushes.len());
    for p in d.pushes {
        let op = match Op::from_u32(p.op) {
            Some(op @ (Op::Push | Op::Notify)) => op,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "op {} is not a push",
                    p.op
                )))
            }
        };
        pushes.push(Push {
            op,
            mid: p.mid,
            group: p.group,
            seq: p.seq,
            body: Bytes::from(p.body),
            acked_at: now,
        });
    }
    let count = pushes.len() as u32;
    let mut targets = Vec::with_capacity(d.targets.len());
    for t in d.targets {
        if t.from > t.to || t.to > count {
            return Err(Status::invalid_argument(format!(
                "target {}: pushes {}..{} of {count}",
                t.conn, t.from, t.to
            )));
        }
        targets.push(Target {
            conn: t.conn,
            from: t.from,
            to: t.to,
        });
    }
    Ok(PushBatch {
        pushes: pushes.into(),
        targets,
    })
}

async fn send_loop(
    addr: String,
    mut client: pb::gateway_client::GatewayClient<Signed>,
    mut rx: mpsc::Receiver<ToGateway>,
    queued: Arc<AtomicUsize>,
) {
    while let Some(first) = rx.recv().await {
        let mut request = pb::Deliveries::default();
        let mut targets = 0;
        let mut kicks = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                ToGateway::Push(push) => {
                    targets += push.targets.len();
                    batch_to_pb(&push, &mut request);
                }
                ToGateway::Kick(conn, code, reason) => kicks.push((conn, code, reason)),
            }
            if targets < GATEWAY_BATCH {
                next = rx.try_recv().ok();
            }
        }
        queued.fetch_sub(targets, Ordering::Relaxed);
        for (conn, code, reason) in kicks {
            let kick = pb::Kick {
                conn,
                code: code as u32,
                reason,
            };
            if let Err(e) = client.kick(kick).await {
                tracing::warn!(%addr, error = %e, "kick not delivered");
            }
        }
        if targets == 0 {
            continue;
        }
        if let Err(e) = client.push(request).await {
            // Nothing acked is lost: these devices sync when they reconnect.
            tracing::warn!(%addr, targets, error = %e, "push to gateway failed; dropped");
        }
    }
}

impl Gateway for RemoteGateway {
    fn push(&self, batch: PushBatch) {
        let count = batch.targets.len();
        if self.queued.load(Ordering::Relaxed) + count > GATEWAY_QUEUE {
            tracing::warn!(targets = count, "gateway queue full; pushes dropped");
            return;
        }
        self.queued.fetch_add(count, Ordering::Relaxed);
        if self.queue.try_send(ToGateway::Push(batch)).is_err() {
            self.queued.fetch_sub(count, Ordering::Relaxed);
            tracing::warn!(targets = count, "gateway queue full; pushes dropped");
        }
    }

    fn kick(&self, conn: u64, code: ErrorCode, reason: &str) {
        if self
            .queue
            .try_send(ToGateway::Kick(conn, code, reason.to_string()))
            .is_err()
        {
            tracing::warn!(conn, "gateway queue full; kick dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(seq: u64) -> Push {
        Push {
            op: Op::Push,
            mid: seq,
            group: 9,
            seq,
            body: Bytes::from(vec![seq as u8; 3]),
            acked_at: Instant::now(),
        }
    }

    fn target(conn: u64, from: u32, to: u32) -> Target {
        Target { conn, from, to }
    }

    #[test]
    fn batches_merged_into_one_call_keep_each_targets_pushes() {
        let first = PushBatch {
            pushes: vec![push(1), push(2)].into(),
            targets: vec![target(10, 0, 2), target(11, 1, 2)],
        };
        let second = PushBatch {
            pushes: vec![push(3)].into(),
            targets: vec![target(10, 0, 1)],
        };
        let mut call = pb::Deliveries::default();
        batch_to_pb(&first, &mut call);
        batch_to_pb(&second, &mut call);
        // Each body travels once.
        assert_eq!(call.pushes.len(), 3);
        let got = batch_from_pb(call, Instant::now()).expect("valid");
        let seqs = |t: &Target| {
            got.slice(t)
                .expect("in range")
                .iter()
                .map(|p| p.seq)
                .collect::<Vec<_>>()
        };
        let per_target: Vec<(u64, Vec<u64>)> =
            got.targets.iter().map(|t| (t.conn, seqs(t))).collect();
        assert_eq!(
            per_target,
            vec![(10, vec![1, 2]), (11, vec![2]), (10, vec![3])]
        );
        assert_eq!(got.pushes[2].body.as_ref(), &[3, 3, 3]);
    }

    #[test]
    fn a_refusal_crosses_with_its_mute_end_or_without_one() {
        let cross = |r: Refusal| {
            let bytes = refusal_to_pb(r).encode_to_vec();
            refusal_from_pb(pb::Refusal::decode(bytes.as_slice()).expect("decodes"))
        };
        let plain = Refusal::new(ErrorCode::AuthUnavailable, "account service down");
        assert_eq!(cross(plain.clone()), plain);
        assert_eq!(cross(plain.clone()).until_ms, None);
        for until in [0, 1_700_000_000_000, -1] {
            let muted = Refusal::muted(until, "muted");
            assert_eq!(cross(muted.clone()), muted, "{until}");
        }
        // A code this node does not know is still a refusal.
        let unknown = pb::Refusal {
            code: 9_999,
            message: "from a newer node".into(),
            until_ms: None,
        };
        assert_eq!(refusal_from_pb(unknown).code, ErrorCode::Internal);
    }

    #[test]
    fn a_call_with_a_range_beyond_its_pushes_or_a_non_push_op_is_refused() {
        let mut call = pb::Deliveries::default();
        batch_to_pb(
            &PushBatch {
                pushes: vec![push(1)].into(),
                targets: vec![target(10, 0, 1)],
            },
            &mut call,
        );
        let mut beyond = call.clone();
        beyond.targets[0].to = 2;
        let refused = batch_from_pb(beyond, Instant::now()).expect_err("out of range");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        let mut reversed = call.clone();
        reversed.targets[0].from = 1;
        reversed.targets[0].to = 0;
        assert!(batch_from_pb(reversed, Instant::now()).is_err());
        let mut not_a_push = call;
        not_a_push.pushes[0].op = Op::Message as u32;
        assert!(batch_from_pb(not_a_push, Instant::now()).is_err());
    }
}
