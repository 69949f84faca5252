//! natter on MySQL/MariaDB end to end: the same chat and groups as on
//! SQLite, on a fresh database of the machine's server, across a restart.

use natter_client::{CreateGroup, Event};
use natter_proto::msg::MessageBody;
use natter_record::mysql::testing::{drop_database, fresh_database};
use natter_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_groups_and_restart_on_mysql() {
    let (url, name) = fresh_database().await;
    let mut server = TestServer::start(|c| c.store.mysql_url = url.clone()).await;
    let (alice, _alice_events) = server.client(1, "phone").await;
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(
            alice
                .send(&u(2), MessageBody::text(format!("offline {i}")))
                .await
                .expect("acked")
                .mid,
        );
    }
    let group = alice
        .create_group(&CreateGroup {
            name: "on mysql".into(),
            members: vec![u(2)],
            ..Default::default()
        })
        .await
        .expect("group");
    let in_group = alice
        .send_group(group.id, MessageBody::text("to the group"))
        .await
        .expect("acked");
    assert_eq!(in_group.conv_seq, 2, "after the created event");

    // Everything survives a restart on the same database.
    drop(alice);
    server.restart().await;
    let (bob, mut bob_events) = server.client(2, "phone").await;
    let mut got = Vec::new();
    while let Some(event) = bob_events.try_next() {
        if let Event::Message(m) = event {
            got.push(m.mid);
        }
    }
    for mid in acked.iter().chain([&in_group.mid]) {
        assert!(
            got.contains(mid),
            "{mid} missing after restart; got {got:?}"
        );
    }
    let page = bob
        .history(&format!("g:{}", group.id), None, 10, &["text"])
        .await
        .expect("group history");
    assert_eq!(page.messages.len(), 1);
    // Numbering continues where it stopped.
    let (alice, _alice_events) = server.client(1, "phone").await;
    let next = alice
        .send(&u(2), MessageBody::text("after restart"))
        .await
        .expect("acked");
    assert_eq!(next.conv_seq, 21);
    server.stop().await;
    drop_database(&name).await;
}
