//! The distributed shape in one test process: two logic nodes, two
//! gateways and a history node on the machine's MariaDB and Redis and a
//! private etcd, talking gRPC. Users on different gateways chat one-to-one and in a group;
//! gateways and logic nodes leave and the rest carries on.

use std::time::Duration;

use natter::Role;
use natter_client::{Client, ClientConfig, CreateGroup, Events};
use natter_node::discovery::testing::EtcdServer;
use natter_node::discovery::Etcd;
use natter_proto::msg::MessageBody;
use natter_record::mysql::testing::{drop_database, fresh_database};
use natter_tests::*;

const SECRET: &str = "a shared secret for every logic node";

/// Connects through `gateway`, retrying while the gateway does not yet see
/// a logic node.
async fn connect(gateway: &TestServer, uid: impl AsUser, device: &str) -> (Client, Events) {
    let uid = uid.user();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let config = ClientConfig::new(gateway.server(), gateway.token(&uid, device));
        match Client::connect(config).await {
            Ok((client, events)) => {
                client.sync().await.expect("initial sync");
                return (client, events);
            }
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "cannot connect: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// `from` sends to `to`, whose events show it arriving with both ids intact.
async fn exchange(from: &Client, to: &natter_proto::UserId, events: &mut Events) {
    let ack = from
        .send(to, MessageBody::text("case matters"))
        .await
        .expect("acked");
    let got = next_message(events).await;
    assert_eq!(got.mid, ack.mid);
    assert_eq!(got.sender, from.uid().as_str());
    assert_eq!(got.receiver, to.as_str());
}

async fn registered(etcd: &Etcd, role: &str) -> usize {
    etcd.range_prefix(&format!("natter/nodes/{role}/"))
        .await
        .expect("range")
        .0
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_gateways_chat_through_any_logic_node() {
    let etcd_server = EtcdServer::start().await;
    let (mysql_url, db) = fresh_database().await;
    let prefix = format!("natter-dist-{}:", std::process::id());
    let etcd_url = etcd_server.url.clone();
    let tune = |node: &'static str| {
        let (etcd_url, mysql_url, prefix) = (etcd_url.clone(), mysql_url.clone(), prefix.clone());
        move |c: &mut natter_node::Config| {
            c.auth.secret = SECRET.into();
            c.discovery.etcd_url = etcd_url;
            c.discovery.node = node.into();
            c.discovery.ttl_secs = 3;
            c.store.mysql_url = mysql_url;
            c.sessions.redis_url = "redis://127.0.0.1:6379/0".into();
            c.sessions.key_prefix = prefix;
            c.rpc.timeout_ms = 1000;
        }
    };
    let logic_a = TestServer::start_role(Role::Logic, tune("logic-a")).await;
    let logic_b = TestServer::start_role(Role::Logic, tune("logic-b")).await;
    let gateway_a = TestServer::start_role(Role::Comet, tune("comet-a")).await;
    let gateway_b = TestServer::start_role(Role::Comet, tune("comet-b")).await;
    let record = TestServer::start_role(Role::Record, tune("record-a")).await;
    let etcd = Etcd::new(&etcd_url, Duration::from_secs(2)).expect("client");
    assert_eq!(
        (
            registered(&etcd, "logic").await,
            registered(&etcd, "comet").await
        ),
        (2, 2)
    );

    let (alice, _alice_events) = connect(&gateway_a, 1, "phone").await;
    let (_bob, mut bob_events) = connect(&gateway_b, 2, "phone").await;
    let (_carol, mut carol_events) = connect(&gateway_a, 3, "phone").await;

    // One-to-one across gateways: logic pushes to the gateway holding Bob.
    let ack = alice
        .send(&u(2), MessageBody::text("across gateways"))
        .await
        .expect("acked");
    assert_eq!(next_message(&mut bob_events).await.mid, ack.mid);

    // String ids cross the plane byte for byte: `Kim` and `kim` are two
    // users on two gateways (one session each in Redis), and a 64-byte id
    // reaches both.
    let long = "L".repeat(32) + &"l".repeat(32);
    let (upper, mut upper_events) = connect(&gateway_a, "Kim", "phone").await;
    let (lower, mut lower_events) = connect(&gateway_b, "kim", "phone").await;
    let (longest, mut longest_events) = connect(&gateway_b, long.as_str(), "phone").await;
    exchange(&upper, lower.uid(), &mut lower_events).await;
    exchange(&lower, upper.uid(), &mut upper_events).await;
    exchange(&upper, longest.uid(), &mut longest_events).await;
    exchange(&longest, lower.uid(), &mut lower_events).await;
    let (status, between) = record
        .get_json("/v1/conversations/p:Kim:kim/messages", "kim", "phone")
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        between["messages"].as_array().map(Vec::len),
        Some(2),
        "one each way between Kim and kim: {between}"
    );

    // A group across both gateways, made over a logic node's HTTP API.
    let owner = Client::connect(ClientConfig::new(
        logic_a.server(),
        logic_a.token(1, "admin"),
    ))
    .await;
    assert!(owner.is_err(), "logic nodes have no WebSocket");
    let http = reqwest::Client::new();
    let group: natter_client::GroupView = http
        .post(logic_b.url("/v1/groups"))
        .bearer_auth(logic_b.token(1, "phone"))
        .json(&CreateGroup {
            name: "spread".into(),
            members: vec![u(2), u(3)],
            ..Default::default()
        })
        .send()
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("group");
    let sent = alice
        .send_group(group.id, MessageBody::text("to everyone"))
        .await
        .expect("acked");
    for events in [&mut bob_events, &mut carol_events] {
        loop {
            if next_message(events).await.mid == sent.mid {
                break;
            }
        }
    }

    // The history node serves what the logic nodes stored, to members only.
    let (status, page) = record
        .get_json("/v1/conversations/p:u1:u2/messages", 2, "phone")
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"][0]["mid"], ack.mid.to_string());
    let (status, page) = record
        .get_json(
            &format!("/v1/conversations/g:{}/messages", group.id),
            3,
            "phone",
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"][0]["mid"], sent.mid.to_string());
    let (status, _) = record
        .get_json(
            &format!("/v1/conversations/g:{}/messages", group.id),
            9,
            "phone",
        )
        .await;
    assert_eq!(status, 403, "not a member");
    let (status, _) = record.get_json("/v1/groups", 1, "phone").await;
    assert_eq!(status, 404, "group changes go through logic nodes");
    assert_eq!(registered(&etcd, "record").await, 1);

    // A logic node leaves: the gateways carry on with the other one.
    logic_a.stop().await;
    let again = alice
        .send(&u(2), MessageBody::text("after logic-a left"))
        .await
        .expect("acked");
    loop {
        if next_message(&mut bob_events).await.mid == again.mid {
            break;
        }
    }

    // A gateway leaves gracefully: its key goes at once; its users move to
    // the other gateway and sync what they missed.
    gateway_b.stop().await;
    assert_eq!(registered(&etcd, "comet").await, 1);
    let missed = alice
        .send(&u(2), MessageBody::text("while bob moves"))
        .await
        .expect("acked");
    let (_bob_again, mut bob_again_events) = connect(&gateway_a, 2, "phone").await;
    loop {
        if next_message(&mut bob_again_events).await.mid == missed.mid {
            break;
        }
    }
    gateway_a.stop().await;
    logic_b.stop().await;
    record.stop().await;
    drop_database(&db).await;
}

/// The gRPC plane of running nodes: a caller without the cluster secret is
/// refused by logic and gateways alike, and one with it (a gateway, say)
/// still cannot act for a user who did not connect through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_nodes_refuse_unsigned_calls_and_forged_sessions() {
    use natter_rpc::{pb, PlaneKey, SessionKey, Signer};
    use prost::Message as _;
    let etcd_server = EtcdServer::start().await;
    let (mysql_url, db) = fresh_database().await;
    let prefix = format!("natter-plane-{}:", std::process::id());
    let tune = |node: &'static str| {
        let (etcd_url, mysql_url, prefix) =
            (etcd_server.url.clone(), mysql_url.clone(), prefix.clone());
        move |c: &mut natter_node::Config| {
            c.auth.secret = SECRET.into();
            c.discovery.etcd_url = etcd_url;
            c.discovery.node = node.into();
            c.store.mysql_url = mysql_url;
            c.sessions.redis_url = "redis://127.0.0.1:6379/0".into();
            c.sessions.key_prefix = prefix;
            c.rpc.timeout_ms = 1000;
        }
    };
    let logic = TestServer::start_role(Role::Logic, tune("logic-p")).await;
    let gateway = TestServer::start_role(Role::Comet, tune("comet-p")).await;
    let (alice, _alice_events) = connect(&gateway, 1, "phone").await;
    let (_bob, mut bob_events) = connect(&gateway, 2, "phone").await;
    let channel = |addr: std::net::SocketAddr| {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_lazy()
    };
    let logic_rpc = logic.rpc_addr.expect("logic serves gRPC");
    let gateway_rpc = gateway.rpc_addr.expect("a gateway serves gRPC");

    // No credentials: nothing gets in, neither a token check nor a kick.
    let mut bare = pb::logic_client::LogicClient::new(channel(logic_rpc));
    let refused = bare
        .authenticate(pb::ConnectRequest {
            token: logic.token(1, "phone"),
            node: "comet-p".into(),
            conn: 1,
            device: String::new(),
        })
        .await
        .expect_err("unsigned");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut bare_gateway = pb::gateway_client::GatewayClient::new(channel(gateway_rpc));
    for conn in 0..8 {
        let refused = bare_gateway
            .kick(pb::Kick {
                conn,
                code: natter_proto::ErrorCode::Replaced as u32,
                reason: "forged".into(),
            })
            .await
            .expect_err("unsigned");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }

    // With the cluster secret but no grant from logic: a gateway's forgery.
    let plane = PlaneKey::new(RPC_SECRET.as_bytes(), Duration::from_secs(30));
    let mut signed =
        pb::logic_client::LogicClient::with_interceptor(channel(logic_rpc), Signer(plane));
    let forged = SessionKey::new(RPC_SECRET.as_bytes()).grant(&natter_roles::Session {
        uid: u(1),
        device: "phone".into(),
        node: std::sync::Arc::from("comet-p"),
        conn: 1,
    });
    let message = natter_proto::msg::SendMessage {
        client_seq: 1,
        receiver: u(2).to_string(),
        body: Some(MessageBody::text("forged")),
        ..Default::default()
    };
    let refused = signed
        .send(pb::SendRequest {
            from: Some(forged.clone()),
            message: message.encode_to_vec(),
        })
        .await
        .expect_err("forged session");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let refused = signed
        .sync(pb::SyncCall {
            from: Some(forged),
            request: natter_proto::msg::SyncRequest::default().encode_to_vec(),
        })
        .await
        .expect_err("forged session");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // The real gateway's sessions work as before, and nobody was kicked.
    let ack = alice
        .send(&u(2), MessageBody::text("through the gateway"))
        .await
        .expect("acked");
    assert_eq!(next_message(&mut bob_events).await.mid, ack.mid);
    gateway.stop().await;
    logic.stop().await;
    drop_database(&db).await;
}
