//! The role-to-role plane refuses callers without the cluster secret, and
//! logic acts only for sessions it granted: real tonic servers on port 0 in
//! front of stand-in roles that record what reaches them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use natter_proto::msg::{
    Message, MessageReply, ReadReply, ReadRequest, SendMessage, SyncReply, SyncRequest, Typing,
};
use natter_proto::{ErrorCode, UserId};
use natter_roles::{
    Acked, Connected, Gateway, Identity, LogicService, PushBatch, Refusal, Session,
};
use natter_rpc::{pb, GatewayServer, LogicServer, PlaneKey, RemoteLogic, SessionKey, Signer};
use prost::Message as _;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

const CLUSTER: &[u8] = b"the cluster secret, at least 32 bytes long";
const AUTH: &[u8] = b"the token secret, which gateways never hold";

fn plane(secret: &[u8]) -> PlaneKey {
    PlaneKey::new(secret, Duration::from_secs(30))
}

/// What reached the stand-in logic: (call, uid, device).
type Seen = Arc<Mutex<Vec<(&'static str, String, String)>>>;

fn uid(s: &str) -> UserId {
    UserId::parse(s).expect("valid uid")
}

/// One call as the stand-in logic records it.
fn call(call: &'static str, uid: &str, device: &str) -> (&'static str, String, String) {
    (call, uid.to_string(), device.to_string())
}

/// Logic that takes tokens of the form `UID:DEVICE` (or `UID:` for a token
/// that names no device: the auth frame's is used) and records each call.
struct Recorder(Seen);

impl Recorder {
    fn saw(&self, name: &'static str, uid: &UserId, device: &str) {
        self.0
            .lock()
            .expect("lock")
            .push(call(name, uid.as_str(), device));
    }
}

#[async_trait]
impl LogicService for Recorder {
    async fn connect(
        &self,
        token: &str,
        device: &str,
        _node: &str,
        _conn: u64,
    ) -> Result<Connected, Refusal> {
        let invalid = || Refusal::new(ErrorCode::AuthFailed, "invalid token");
        let (uid, named) = token.split_once(':').ok_or_else(invalid)?;
        let uid = UserId::parse(uid).map_err(|_| invalid())?;
        let device = if named.is_empty() { device } else { named }.to_string();
        self.saw("connect", &uid, &device);
        Ok(Connected {
            identity: Identity { uid, device },
            cursor: 0,
        })
    }
    async fn disconnect(&self, session: &Session) {
        self.saw("disconnect", &session.uid, &session.device);
    }
    async fn heartbeat(&self, sessions: &[Session]) {
        for s in sessions {
            self.saw("heartbeat", &s.uid, &s.device);
        }
    }
    async fn send(&self, from: &Session, message: SendMessage) -> Result<MessageReply, Refusal> {
        self.saw("send", &from.uid, &from.device);
        // The conversation names both users: the reply shows the receiver
        // arrived as the gateway sent it.
        let receiver = UserId::parse(&message.receiver)
            .map_err(|e| Refusal::new(ErrorCode::InvalidMessage, e.to_string()))?;
        Ok(MessageReply {
            mid: 77,
            conversation: from.uid.conversation_with(&receiver),
            ..MessageReply::default()
        })
    }
    async fn push_acked(&self, uid: &UserId, device: &str, _acked: &[Acked]) {
        self.saw("acked", uid, device);
    }
    async fn sync(
        &self,
        uid: &UserId,
        device: &str,
        _r: SyncRequest,
    ) -> Result<SyncReply, Refusal> {
        self.saw("sync", uid, device);
        // A note to self, so the sender and receiver both cross back.
        Ok(SyncReply {
            messages: vec![Message {
                sender: uid.to_string(),
                receiver: uid.to_string(),
                ..Message::default()
            }],
            ..SyncReply::default()
        })
    }
    async fn read(
        &self,
        from: &Session,
        conversation: &str,
        seq: u64,
    ) -> Result<ReadReply, Refusal> {
        self.saw("read", &from.uid, &from.device);
        // The cursor as asked and the unread count of the stand-in's
        // conversation of ten, so every field crosses back.
        Ok(ReadReply {
            conversation: conversation.to_string(),
            read_seq: seq,
            unread: 10u64.saturating_sub(seq),
        })
    }
    async fn typing(&self, from: &Session, conversation: &str) -> Result<(), Refusal> {
        self.saw("typing", &from.uid, &from.device);
        // A conversation of others: refused as logic refuses it.
        if !conversation.contains(from.uid.as_str()) {
            return Err(Refusal::new(ErrorCode::NotMember, "not your conversation"));
        }
        Ok(())
    }
}

/// A gateway that counts what reaches it.
#[derive(Default)]
struct Counter(Mutex<(usize, usize)>);

impl Gateway for Counter {
    fn push(&self, _batch: PushBatch) {
        self.0.lock().expect("lock").0 += 1;
    }
    fn kick(&self, _conn: u64, _code: ErrorCode, _reason: &str) {
        self.0.lock().expect("lock").1 += 1;
    }
}

async fn serve(router: tonic::transport::server::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(async move { router.serve_with_incoming(incoming).await });
    addr
}

/// A logic node (plane key from `CLUSTER`, grants from `AUTH`).
async fn logic_node() -> (String, Seen) {
    let seen = Seen::default();
    let service = LogicServer::service(
        Arc::new(Recorder(seen.clone())),
        SessionKey::new(AUTH),
        plane(CLUSTER),
    );
    let addr = serve(tonic::transport::Server::builder().add_service(service)).await;
    (addr, seen)
}

fn channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_lazy()
}

type Signed = InterceptedService<Channel, Signer>;

fn signed_logic(addr: &str, secret: &[u8]) -> pb::logic_client::LogicClient<Signed> {
    pb::logic_client::LogicClient::with_interceptor(channel(addr), Signer(plane(secret)))
}

fn connect_request(token: &str, conn: u64) -> pb::ConnectRequest {
    pb::ConnectRequest {
        token: token.into(),
        node: "comet-1".into(),
        conn,
        device: String::new(),
    }
}

fn read_request(conversation: &str, seq: u64) -> Vec<u8> {
    ReadRequest {
        conversation: conversation.into(),
        seq,
    }
    .encode_to_vec()
}

fn typing_request(conversation: &str) -> Vec<u8> {
    Typing {
        conversation: conversation.into(),
    }
    .encode_to_vec()
}

fn unauthenticated<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(
        status.code(),
        tonic::Code::Unauthenticated,
        "{what}: {status}"
    );
}

#[tokio::test]
async fn logic_refuses_calls_without_the_cluster_secret() {
    let (addr, seen) = logic_node().await;
    let mut bare = pb::logic_client::LogicClient::new(channel(&addr));
    unauthenticated(
        bare.authenticate(connect_request("u-1:phone", 1)).await,
        "no credentials",
    );
    unauthenticated(
        bare.send(pb::SendRequest::default()).await,
        "send without credentials",
    );
    let mut stranger = signed_logic(&addr, b"not the cluster secret, but 32+ bytes");
    unauthenticated(
        stranger.authenticate(connect_request("u-1:phone", 1)).await,
        "another secret",
    );
    // A credential lifted from one call does not open another method.
    let mut lifted = tonic::Request::new(pb::SyncCall::default());
    let credential =
        plane(CLUSTER).sign("/natter.rpc.Logic/Authenticate", natter_node::ids::now_ms());
    lifted.metadata_mut().insert(
        natter_rpc::auth::AUTH_HEADER,
        credential.parse().expect("ascii"),
    );
    unauthenticated(bare.sync(lifted).await, "a credential of another method");
    // Nor does an old one.
    let mut stale = tonic::Request::new(connect_request("u-1:phone", 1));
    let credential = plane(CLUSTER).sign(
        "/natter.rpc.Logic/Authenticate",
        natter_node::ids::now_ms() - 60_000,
    );
    stale.metadata_mut().insert(
        natter_rpc::auth::AUTH_HEADER,
        credential.parse().expect("ascii"),
    );
    unauthenticated(bare.authenticate(stale).await, "a stale credential");
    assert!(
        seen.lock().expect("lock").is_empty(),
        "nothing reached logic"
    );
    // The cluster's own nodes get through.
    let mut member = signed_logic(&addr, CLUSTER);
    let answer = member
        .authenticate(connect_request("u-1:phone", 1))
        .await
        .expect("signed call")
        .into_inner();
    assert!(matches!(
        answer.result,
        Some(pb::connect_result::Result::Connected(_))
    ));
    assert_eq!(
        *seen.lock().expect("lock"),
        vec![call("connect", "u-1", "phone")]
    );
}

#[tokio::test]
async fn a_gateway_refuses_pushes_and_kicks_without_the_cluster_secret() {
    let gateway = Arc::new(Counter::default());
    let service = GatewayServer::service(gateway.clone(), plane(CLUSTER));
    let addr = serve(tonic::transport::Server::builder().add_service(service)).await;
    let deliveries = pb::Deliveries {
        pushes: vec![pb::Push {
            op: natter_proto::Op::Push as u32,
            mid: 1,
            group: 0,
            seq: 1,
            body: vec![1, 2, 3],
        }],
        targets: vec![pb::Target {
            conn: 1,
            from: 0,
            to: 1,
        }],
    };
    let kick = pb::Kick {
        conn: 1,
        code: ErrorCode::Replaced as u32,
        reason: "forged".into(),
    };
    let mut bare = pb::gateway_client::GatewayClient::new(channel(&addr));
    unauthenticated(
        bare.push(deliveries.clone()).await,
        "push without credentials",
    );
    unauthenticated(bare.kick(kick.clone()).await, "kick without credentials");
    let mut stranger = pb::gateway_client::GatewayClient::with_interceptor(
        channel(&addr),
        Signer(plane(b"not the cluster secret, but 32+ bytes")),
    );
    unauthenticated(
        stranger.push(deliveries.clone()).await,
        "push, another secret",
    );
    unauthenticated(stranger.kick(kick.clone()).await, "kick, another secret");
    assert_eq!(
        *gateway.0.lock().expect("lock"),
        (0, 0),
        "nothing delivered"
    );
    let mut member =
        pb::gateway_client::GatewayClient::with_interceptor(channel(&addr), Signer(plane(CLUSTER)));
    member.push(deliveries).await.expect("signed push");
    member.kick(kick).await.expect("signed kick");
    assert_eq!(*gateway.0.lock().expect("lock"), (1, 1));
}

#[tokio::test]
async fn a_forged_or_tampered_session_is_refused_on_every_session_call() {
    let (addr, seen) = logic_node().await;
    let mut client = signed_logic(&addr, CLUSTER);
    let connected = match client
        .authenticate(connect_request("u-1:phone", 5))
        .await
        .expect("authenticate")
        .into_inner()
        .result
    {
        Some(pb::connect_result::Result::Connected(c)) => c,
        other => panic!("not connected: {other:?}"),
    };
    let grant = connected.grant.expect("a grant");
    let session = |uid: &str, conn: u64| {
        pb::Session {
            uid: uid.into(),
            device: "phone".into(),
            node: "comet-1".into(),
            conn,
        }
        .encode_to_vec()
    };
    assert_eq!(
        grant.session,
        session("u-1", 5),
        "the grant names the session"
    );
    let forgeries: Vec<(&str, Option<pb::Grant>)> = vec![
        ("no grant", None),
        (
            "another uid",
            Some(pb::Grant {
                session: session("u-2", 5),
                tag: grant.tag.clone(),
            }),
        ),
        (
            "another connection",
            Some(pb::Grant {
                session: session("u-1", 6),
                tag: grant.tag.clone(),
            }),
        ),
        (
            "unsigned",
            Some(pb::Grant {
                session: session("u-2", 5),
                tag: Vec::new(),
            }),
        ),
        (
            // Gateways hold the cluster secret, not logic's key.
            "signed with the cluster secret",
            Some(SessionKey::new(CLUSTER).grant(&Session {
                uid: uid("u-2"),
                device: "phone".into(),
                node: Arc::from("comet-1"),
                conn: 5,
            })),
        ),
    ];
    let message = SendMessage {
        client_seq: 1,
        receiver: "u-3".into(),
        ..SendMessage::default()
    }
    .encode_to_vec();
    for (what, forged) in &forgeries {
        unauthenticated(
            client
                .send(pb::SendRequest {
                    from: forged.clone(),
                    message: message.clone(),
                })
                .await,
            &format!("send, {what}"),
        );
        unauthenticated(
            client
                .sync(pb::SyncCall {
                    from: forged.clone(),
                    request: SyncRequest::default().encode_to_vec(),
                })
                .await,
            &format!("sync, {what}"),
        );
        unauthenticated(
            client
                .acked(pb::PushAck {
                    from: forged.clone(),
                    acked: vec![pb::Acked { group: 0, seq: 99 }],
                })
                .await,
            &format!("acked, {what}"),
        );
        unauthenticated(
            client
                .read(pb::ReadCall {
                    from: forged.clone(),
                    request: read_request("p:u-1:u-2", 9),
                })
                .await,
            &format!("read, {what}"),
        );
        unauthenticated(
            client
                .typing(pb::TypingCall {
                    from: forged.clone(),
                    request: typing_request("p:u-1:u-2"),
                })
                .await,
            &format!("typing, {what}"),
        );
        if let Some(forged) = forged {
            unauthenticated(
                client.disconnect(forged.clone()).await,
                &format!("disconnect, {what}"),
            );
            unauthenticated(
                client
                    .heartbeat(pb::Grants {
                        grants: vec![forged.clone()],
                    })
                    .await,
                &format!("heartbeat, {what}"),
            );
        }
    }
    assert_eq!(
        *seen.lock().expect("lock"),
        vec![call("connect", "u-1", "phone")],
        "no forged call reached logic"
    );
    // The genuine grant works, for the user it names.
    let reply = client
        .send(pb::SendRequest {
            from: Some(grant.clone()),
            message,
        })
        .await
        .expect("send")
        .into_inner();
    assert!(matches!(reply.result, Some(pb::answer::Result::Reply(_))));
    client
        .sync(pb::SyncCall {
            from: Some(grant.clone()),
            request: SyncRequest::default().encode_to_vec(),
        })
        .await
        .expect("sync");
    client
        .acked(pb::PushAck {
            from: Some(grant.clone()),
            acked: vec![pb::Acked { group: 0, seq: 1 }],
        })
        .await
        .expect("acked");
    let read = client
        .read(pb::ReadCall {
            from: Some(grant.clone()),
            request: read_request("p:u-1:u-2", 4),
        })
        .await
        .expect("read")
        .into_inner();
    assert!(matches!(read.result, Some(pb::answer::Result::Reply(_))));
    let typing = client
        .typing(pb::TypingCall {
            from: Some(grant),
            request: typing_request("p:u-1:u-2"),
        })
        .await
        .expect("typing")
        .into_inner();
    assert_eq!(
        typing.result,
        Some(pb::answer::Result::Reply(Vec::new())),
        "typing answers an empty reply"
    );
    let calls: Vec<_> = seen
        .lock()
        .expect("lock")
        .iter()
        .map(|c| (c.0, c.1.clone()))
        .collect();
    let u1 = || "u-1".to_string();
    assert_eq!(
        calls,
        vec![
            ("connect", u1()),
            ("send", u1()),
            ("sync", u1()),
            ("acked", u1()),
            ("read", u1()),
            ("typing", u1())
        ]
    );
}

#[tokio::test]
async fn a_gateway_presents_each_connections_grant_and_logic_acts_for_its_user() {
    let (addr, seen) = logic_node().await;
    let targets: natter_rpc::Targets = {
        let addr = addr.clone();
        Arc::new(move || vec![addr.clone()])
    };
    let remote = RemoteLogic::new(targets.clone(), Duration::from_secs(2), plane(CLUSTER));
    let connected = remote
        .connect("u-7:phone", "", "comet-1", 3)
        .await
        .expect("connect");
    assert_eq!(connected.identity.uid, uid("u-7"));
    let session = |id: &str, conn: u64| Session {
        uid: uid(id),
        device: "phone".into(),
        node: Arc::from("comet-1"),
        conn,
    };
    let message = SendMessage {
        client_seq: 1,
        receiver: "u-3".into(),
        ..SendMessage::default()
    };
    assert_eq!(
        remote
            .send(&session("u-7", 3), message.clone())
            .await
            .expect("send")
            .mid,
        77
    );
    remote
        .sync(&uid("u-7"), "phone", SyncRequest::default())
        .await
        .expect("sync");
    remote
        .push_acked(&uid("u-7"), "phone", &[Acked { group: 0, seq: 1 }])
        .await;
    let read = remote
        .read(&session("u-7", 3), "p:u-3:u-7", 4)
        .await
        .expect("read");
    assert_eq!(
        read,
        ReadReply {
            conversation: "p:u-3:u-7".into(),
            read_seq: 4,
            unread: 6,
        }
    );
    remote
        .typing(&session("u-7", 3), "p:u-3:u-7")
        .await
        .expect("typing");
    // Logic's refusal crosses as it was made.
    let refused = remote
        .typing(&session("u-7", 3), "p:u-3:u-4")
        .await
        .expect_err("refused by logic");
    assert_eq!(
        refused,
        Refusal::new(ErrorCode::NotMember, "not your conversation")
    );
    remote.heartbeat(&[session("u-7", 3)]).await;
    // A connection or device logic never authenticated has no grant.
    let refused = remote
        .send(&session("u-8", 4), message.clone())
        .await
        .expect_err("no grant");
    assert_eq!(refused.code, ErrorCode::Internal);
    assert!(remote
        .sync(&uid("u-8"), "phone", SyncRequest::default())
        .await
        .is_err());
    for refused in [
        remote
            .read(&session("u-8", 4), "p:u-3:u-8", 1)
            .await
            .map(|_| ()),
        remote.typing(&session("u-8", 4), "p:u-3:u-8").await,
    ] {
        assert_eq!(refused.expect_err("no grant").code, ErrorCode::Internal);
    }
    remote.disconnect(&session("u-7", 3)).await;
    assert!(
        remote.send(&session("u-7", 3), message).await.is_err(),
        "the grant went with the connection"
    );
    assert!(
        remote
            .read(&session("u-7", 3), "p:u-3:u-7", 5)
            .await
            .is_err(),
        "the grant went with the connection"
    );
    let calls: Vec<_> = seen.lock().expect("lock").iter().map(|c| c.0).collect();
    assert_eq!(
        calls,
        vec![
            "connect",
            "send",
            "sync",
            "acked",
            "read",
            "typing",
            "typing",
            "heartbeat",
            "disconnect"
        ]
    );
    assert!(
        seen.lock().expect("lock").iter().all(|c| c.1 == "u-7"),
        "every call for u-7"
    );
    // A gateway with another cluster secret gets nowhere.
    let stranger = RemoteLogic::new(
        targets,
        Duration::from_secs(2),
        plane(b"not the cluster secret, but 32+ bytes"),
    );
    assert!(stranger
        .connect("u-7:phone", "", "comet-1", 9)
        .await
        .is_err());
    assert_eq!(seen.lock().expect("lock").len(), 9);
}

#[tokio::test]
async fn user_ids_cross_the_plane_byte_for_byte() {
    let (addr, seen) = logic_node().await;
    let targets: natter_rpc::Targets = Arc::new(move || vec![addr.clone()]);
    let remote = RemoteLogic::new(targets, Duration::from_secs(2), plane(CLUSTER));
    let longest = "x".repeat(64);
    // Two users whose ids differ only in case, on one device name, and the
    // longest id; the tokens name no device, so the auth frame's is used.
    let users = [("Alice", 1), ("alice", 2), (longest.as_str(), 3)];
    for (id, conn) in users {
        let connected = remote
            .connect(&format!("{id}:"), "phone", "comet-1", conn)
            .await
            .expect("connect");
        assert_eq!(connected.identity.uid.as_str(), id);
        assert_eq!(connected.identity.device, "phone");
    }
    let mut conversations = Vec::new();
    for (id, conn) in users {
        let from = Session {
            uid: uid(id),
            device: "phone".into(),
            node: Arc::from("comet-1"),
            conn,
        };
        // Each writes to the user its id differs from only in case (or to
        // "Alice", for the longest).
        let to = if id == "Alice" { "alice" } else { "Alice" };
        let reply = remote
            .send(
                &from,
                SendMessage {
                    client_seq: 1,
                    receiver: to.into(),
                    ..SendMessage::default()
                },
            )
            .await
            .expect("send");
        conversations.push(reply.conversation);
        let synced = remote
            .sync(&uid(id), "phone", SyncRequest::default())
            .await
            .expect("sync");
        assert_eq!(synced.messages[0].sender, id);
        assert_eq!(synced.messages[0].receiver, id);
        remote
            .push_acked(&uid(id), "phone", &[Acked { group: 0, seq: 1 }])
            .await;
    }
    assert_eq!(
        conversations,
        [
            "p:Alice:alice",
            "p:Alice:alice",
            &format!("p:Alice:{longest}")
        ]
    );
    let mut expected = Vec::new();
    for (id, _) in users {
        expected.push(call("connect", id, "phone"));
    }
    for (id, _) in users {
        for name in ["send", "sync", "acked"] {
            expected.push(call(name, id, "phone"));
        }
    }
    assert_eq!(*seen.lock().expect("lock"), expected);
}

/// Logic that answers every connect with the same user id, valid or not.
struct Naming(String);

#[async_trait]
impl pb::logic_server::Logic for Naming {
    async fn authenticate(
        &self,
        _request: tonic::Request<pb::ConnectRequest>,
    ) -> Result<tonic::Response<pb::ConnectResult>, tonic::Status> {
        let connected = pb::Connected {
            uid: self.0.clone(),
            device: "phone".into(),
            cursor: 0,
            grant: Some(pb::Grant::default()),
        };
        Ok(tonic::Response::new(pb::ConnectResult {
            result: Some(pb::connect_result::Result::Connected(connected)),
        }))
    }
    async fn disconnect(
        &self,
        _: tonic::Request<pb::Grant>,
    ) -> Result<tonic::Response<pb::Empty>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn heartbeat(
        &self,
        _: tonic::Request<pb::Grants>,
    ) -> Result<tonic::Response<pb::Empty>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn send(
        &self,
        _: tonic::Request<pb::SendRequest>,
    ) -> Result<tonic::Response<pb::Answer>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn acked(
        &self,
        _: tonic::Request<pb::PushAck>,
    ) -> Result<tonic::Response<pb::Empty>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn sync(
        &self,
        _: tonic::Request<pb::SyncCall>,
    ) -> Result<tonic::Response<pb::Answer>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn read(
        &self,
        _: tonic::Request<pb::ReadCall>,
    ) -> Result<tonic::Response<pb::Answer>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn typing(
        &self,
        _: tonic::Request<pb::TypingCall>,
    ) -> Result<tonic::Response<pb::Answer>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
}

#[tokio::test]
async fn a_gateway_refuses_an_invalid_user_id_from_logic() {
    let too_long = "x".repeat(65);
    for bad in ["", "a:b", "a b", "..", "é", too_long.as_str()] {
        let service = natter_rpc::Guarded::new(
            pb::logic_server::LogicServer::new(Naming(bad.to_string())),
            plane(CLUSTER),
        );
        let addr = serve(tonic::transport::Server::builder().add_service(service)).await;
        let remote = RemoteLogic::new(
            Arc::new(move || vec![addr.clone()]),
            Duration::from_secs(2),
            plane(CLUSTER),
        );
        let refused = remote
            .connect("any", "phone", "comet-1", 1)
            .await
            .expect_err("an invalid uid is refused");
        assert_eq!(refused.code, ErrorCode::Internal, "{bad:?}");
        // No grant was kept for it.
        let session = Session {
            uid: uid("u-1"),
            device: "phone".into(),
            node: Arc::from("comet-1"),
            conn: 1,
        };
        assert!(remote.send(&session, SendMessage::default()).await.is_err());
    }
}

/// A grant as logic signs it (the key derivation of `SessionKey`, written
/// out): what only a holder of the token secret can make.
fn signed_by_logic(session: Vec<u8>) -> pb::Grant {
    use hmac::{Hmac, Mac};
    type HmacSha256 = Hmac<sha2::Sha256>;
    let mut derive = HmacSha256::new_from_slice(AUTH).expect("any key length");
    derive.update(b"natter session grant v2");
    let key = derive.finalize().into_bytes();
    let mut mac = HmacSha256::new_from_slice(&key).expect("any key length");
    mac.update(&session);
    pb::Grant {
        tag: mac.finalize().into_bytes().to_vec(),
        session,
    }
}

#[tokio::test]
async fn logic_refuses_a_signed_grant_naming_an_invalid_user_id() {
    let (addr, seen) = logic_node().await;
    let mut client = signed_logic(&addr, CLUSTER);
    // The derivation written out above is logic's: a valid session signed
    // with it is accepted.
    let good = pb::Session {
        uid: "u-1".into(),
        device: "phone".into(),
        node: "comet-1".into(),
        conn: 1,
    };
    client
        .acked(pb::PushAck {
            from: Some(signed_by_logic(good.encode_to_vec())),
            acked: vec![pb::Acked { group: 0, seq: 1 }],
        })
        .await
        .expect("a grant logic signed");
    let too_long = "x".repeat(65);
    for bad in ["", "a:b", "a b", "..", too_long.as_str()] {
        let grant = signed_by_logic(
            pb::Session {
                uid: bad.into(),
                ..good.clone()
            }
            .encode_to_vec(),
        );
        unauthenticated(
            client
                .send(pb::SendRequest {
                    from: Some(grant.clone()),
                    message: SendMessage::default().encode_to_vec(),
                })
                .await,
            &format!("send as {bad:?}"),
        );
        unauthenticated(
            client
                .sync(pb::SyncCall {
                    from: Some(grant.clone()),
                    request: SyncRequest::default().encode_to_vec(),
                })
                .await,
            &format!("sync as {bad:?}"),
        );
        unauthenticated(
            client
                .acked(pb::PushAck {
                    from: Some(grant.clone()),
                    acked: vec![pb::Acked { group: 0, seq: 1 }],
                })
                .await,
            &format!("acked as {bad:?}"),
        );
        unauthenticated(
            client
                .read(pb::ReadCall {
                    from: Some(grant.clone()),
                    request: read_request("p:u-1:u-2", 1),
                })
                .await,
            &format!("read as {bad:?}"),
        );
        unauthenticated(
            client
                .typing(pb::TypingCall {
                    from: Some(grant.clone()),
                    request: typing_request("p:u-1:u-2"),
                })
                .await,
            &format!("typing as {bad:?}"),
        );
        unauthenticated(
            client.disconnect(grant.clone()).await,
            &format!("disconnect as {bad:?}"),
        );
        unauthenticated(
            client
                .heartbeat(pb::Grants {
                    grants: vec![grant],
                })
                .await,
            &format!("heartbeat as {bad:?}"),
        );
    }
    assert_eq!(
        *seen.lock().expect("lock"),
        vec![call("acked", "u-1", "phone")],
        "only the valid session reached logic"
    );
}
