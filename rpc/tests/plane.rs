//! The role-to-role plane refuses callers without the cluster secret, and
//! logic acts only for sessions it granted: real tonic servers on port 0 in
//! front of stand-in roles that record what reaches them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use natter_logic::{Acked, Connected, Gateway, LogicService, PushBatch, Rejection, Session};
use natter_proto::msg::{MessageReply, SendMessage, SyncReply, SyncRequest};
use natter_proto::ErrorCode;
use natter_record::http::Identity;
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
type Seen = Arc<Mutex<Vec<(&'static str, u64, String)>>>;

/// Logic that takes tokens of the form `UID:DEVICE` and records each call.
struct Recorder(Seen);

impl Recorder {
    fn saw(&self, call: &'static str, uid: u64, device: &str) {
        self.0
            .lock()
            .expect("lock")
            .push((call, uid, device.to_string()));
    }
}

#[async_trait]
impl LogicService for Recorder {
    async fn connect(&self, token: &str, _node: &str, _conn: u64) -> Result<Connected, Rejection> {
        let (uid, device) = token
            .split_once(':')
            .and_then(|(u, d)| Some((u.parse().ok()?, d.to_string())))
            .ok_or_else(|| Rejection::new(ErrorCode::AuthFailed, "invalid token"))?;
        self.saw("connect", uid, &device);
        Ok(Connected {
            identity: Identity { uid, device },
            cursor: 0,
        })
    }
    async fn disconnect(&self, session: &Session) {
        self.saw("disconnect", session.uid, &session.device);
    }
    async fn heartbeat(&self, sessions: &[Session]) {
        for s in sessions {
            self.saw("heartbeat", s.uid, &s.device);
        }
    }
    async fn send(&self, from: &Session, _message: SendMessage) -> Result<MessageReply, Rejection> {
        self.saw("send", from.uid, &from.device);
        Ok(MessageReply {
            mid: 77,
            ..MessageReply::default()
        })
    }
    async fn push_acked(&self, uid: u64, device: &str, _acked: &[Acked]) {
        self.saw("acked", uid, device);
    }
    async fn sync(&self, uid: u64, device: &str, _r: SyncRequest) -> Result<SyncReply, Rejection> {
        self.saw("sync", uid, device);
        Ok(SyncReply::default())
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
    }
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
        bare.authenticate(connect_request("1:phone", 1)).await,
        "no credentials",
    );
    unauthenticated(
        bare.send(pb::SendRequest::default()).await,
        "send without credentials",
    );
    let mut stranger = signed_logic(&addr, b"not the cluster secret, but 32+ bytes");
    unauthenticated(
        stranger.authenticate(connect_request("1:phone", 1)).await,
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
    let mut stale = tonic::Request::new(connect_request("1:phone", 1));
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
        .authenticate(connect_request("1:phone", 1))
        .await
        .expect("signed call")
        .into_inner();
    assert!(matches!(
        answer.result,
        Some(pb::connect_result::Result::Connected(_))
    ));
    assert_eq!(
        *seen.lock().expect("lock"),
        vec![("connect", 1, "phone".to_string())]
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
async fn a_forged_or_tampered_session_is_refused_on_send_sync_and_acked() {
    let (addr, seen) = logic_node().await;
    let mut client = signed_logic(&addr, CLUSTER);
    let connected = match client
        .authenticate(connect_request("1:phone", 5))
        .await
        .expect("authenticate")
        .into_inner()
        .result
    {
        Some(pb::connect_result::Result::Connected(c)) => c,
        other => panic!("not connected: {other:?}"),
    };
    let grant = connected.grant.expect("a grant");
    let session = |uid: u64, conn: u64| {
        pb::Session {
            uid,
            device: "phone".into(),
            node: "comet-1".into(),
            conn,
        }
        .encode_to_vec()
    };
    assert_eq!(grant.session, session(1, 5), "the grant names the session");
    let forgeries: Vec<(&str, Option<pb::Grant>)> = vec![
        ("no grant", None),
        (
            "another uid",
            Some(pb::Grant {
                session: session(2, 5),
                tag: grant.tag.clone(),
            }),
        ),
        (
            "another connection",
            Some(pb::Grant {
                session: session(1, 6),
                tag: grant.tag.clone(),
            }),
        ),
        (
            "unsigned",
            Some(pb::Grant {
                session: session(2, 5),
                tag: Vec::new(),
            }),
        ),
        (
            // Gateways hold the cluster secret, not logic's key.
            "signed with the cluster secret",
            Some(SessionKey::new(CLUSTER).grant(&Session {
                uid: 2,
                device: "phone".into(),
                node: Arc::from("comet-1"),
                conn: 5,
            })),
        ),
    ];
    let message = SendMessage {
        client_seq: 1,
        receiver: 3,
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
        vec![("connect", 1, "phone".to_string())],
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
            from: Some(grant),
            acked: vec![pb::Acked { group: 0, seq: 1 }],
        })
        .await
        .expect("acked");
    let calls: Vec<_> = seen
        .lock()
        .expect("lock")
        .iter()
        .map(|c| (c.0, c.1))
        .collect();
    assert_eq!(
        calls,
        vec![("connect", 1), ("send", 1), ("sync", 1), ("acked", 1)]
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
        .connect("7:phone", "comet-1", 3)
        .await
        .expect("connect");
    assert_eq!(connected.identity.uid, 7);
    let session = |uid: u64, conn: u64| Session {
        uid,
        device: "phone".into(),
        node: Arc::from("comet-1"),
        conn,
    };
    let message = SendMessage {
        client_seq: 1,
        receiver: 3,
        ..SendMessage::default()
    };
    assert_eq!(
        remote
            .send(&session(7, 3), message.clone())
            .await
            .expect("send")
            .mid,
        77
    );
    remote
        .sync(7, "phone", SyncRequest::default())
        .await
        .expect("sync");
    remote
        .push_acked(7, "phone", &[Acked { group: 0, seq: 1 }])
        .await;
    remote.heartbeat(&[session(7, 3)]).await;
    // A connection or device logic never authenticated has no grant.
    let refused = remote
        .send(&session(8, 4), message.clone())
        .await
        .expect_err("no grant");
    assert_eq!(refused.code, ErrorCode::Internal);
    assert!(remote
        .sync(8, "phone", SyncRequest::default())
        .await
        .is_err());
    remote.disconnect(&session(7, 3)).await;
    assert!(
        remote.send(&session(7, 3), message).await.is_err(),
        "the grant went with the connection"
    );
    let calls: Vec<_> = seen
        .lock()
        .expect("lock")
        .iter()
        .map(|c| (c.0, c.1))
        .collect();
    assert_eq!(
        calls,
        vec![
            ("connect", 7),
            ("send", 7),
            ("sync", 7),
            ("acked", 7),
            ("heartbeat", 7),
            ("disconnect", 7)
        ]
    );
    // A gateway with another cluster secret gets nowhere.
    let stranger = RemoteLogic::new(
        targets,
        Duration::from_secs(2),
        plane(b"not the cluster secret, but 32+ bytes"),
    );
    assert!(stranger.connect("7:phone", "comet-1", 9).await.is_err());
    assert_eq!(seen.lock().expect("lock").len(), 6);
}
