//! Discovery in etcd, end to end: servers register under a lease with
//! their address and a worker id of their own, leave at once on a graceful
//! stop, and report an etcd outage until it is over.

use std::time::Duration;

use natter_node::discovery::testing::EtcdServer;
use natter_node::discovery::{Etcd, NodeInfo};
use natter_proto::msg::MessageBody;
use natter_tests::*;

async fn registered(etcd: &Etcd) -> Vec<NodeInfo> {
    let (kvs, _) = etcd
        .range_prefix("natter/nodes/serve/")
        .await
        .expect("range");
    kvs.iter()
        .map(|(_, v)| serde_json::from_str(v).expect("node info"))
        .collect()
}

async fn ready(server: &TestServer) -> (u16, String) {
    let response = reqwest::get(server.url("/readyz")).await.expect("readyz");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

async fn eventually_ready(server: &TestServer, want: u16, containing: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, body) = ready(server).await;
        if status == want && body.contains(containing) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz stayed {status} {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_register_with_their_own_workers_leave_on_stop_and_report_an_outage() {
    let mut etcd_server = EtcdServer::start().await;
    let url = etcd_server.url.clone();
    let tune = |node: &'static str| {
        let url = url.clone();
        move |c: &mut natter_node::Config| {
            c.discovery.etcd_url = url;
            c.discovery.node = node.into();
            c.discovery.ttl_secs = 3;
        }
    };
    let a = TestServer::start(tune("a")).await;
    let b = TestServer::start(tune("b")).await;
    let etcd = Etcd::new(&url, Duration::from_secs(2)).expect("client");
    let mut nodes = registered(&etcd).await;
    nodes.sort_by(|x, y| x.node.cmp(&y.node));
    assert_eq!(nodes.len(), 2);
    assert_eq!(
        (nodes[0].addr.as_str(), nodes[1].addr.as_str()),
        (a.addr.to_string().as_str(), b.addr.to_string().as_str())
    );
    assert_ne!(nodes[0].worker, nodes[1].worker);

    // Each server's message ids carry its own worker id.
    for (server, info) in [(&a, &nodes[0]), (&b, &nodes[1])] {
        let (client, _events) = server.client(1, "phone").await;
        let mid = client
            .send(&u(2), MessageBody::text("x"))
            .await
            .expect("acked")
            .mid;
        assert_eq!((mid >> 12) & 1023, u64::from(info.worker), "mid {mid}");
    }
    eventually_ready(&a, 200, "ready").await;

    // etcd goes away: reported; it comes back: ready again, still registered.
    etcd_server.stop();
    eventually_ready(&a, 503, "etcd").await;
    etcd_server.restart().await;
    eventually_ready(&a, 200, "ready").await;
    assert_eq!(registered(&etcd).await.len(), 2);

    // A graceful stop removes the key at once, not at the lease's end.
    b.stop().await;
    let left = registered(&etcd).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].node, "a");
    a.stop().await;
    assert!(registered(&etcd).await.is_empty());
}
