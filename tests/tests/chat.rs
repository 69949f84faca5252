//! One-to-one chat end to end: real server, real SDK clients.

use std::time::Duration;

use natter_client::Event;
use natter_proto::msg::MessageBody;
use natter_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_both_ways_across_devices() {
    let server = TestServer::start(|_| {}).await;
    let (alice_phone, mut alice_phone_events) = server.client(1, "phone").await;
    let (_alice_laptop, mut alice_laptop_events) = server.client(1, "laptop").await;
    let (bob_phone, mut bob_phone_events) = server.client(2, "phone").await;
    let (_bob_tablet, mut bob_tablet_events) = server.client(2, "tablet").await;

    let ack = alice_phone
        .send(&u(2), MessageBody::text("hi bob"))
        .await
        .expect("sent");
    assert!(!ack.repeat);
    assert_eq!(ack.conversation, "p:u1:u2");
    for events in [
        &mut bob_phone_events,
        &mut bob_tablet_events,
        &mut alice_laptop_events,
    ] {
        let m = next_message(events).await;
        assert_eq!(
            (m.mid, m.sender.clone(), m.receiver.clone(), text_of(&m)),
            (ack.mid, u(1).to_string(), u(2).to_string(), "hi bob")
        );
        assert_eq!(m.conv_seq, 1);
    }
    // The sending device does not get its own message back.
    no_message(&mut alice_phone_events, Duration::from_millis(200)).await;

    let reply = bob_phone
        .send(&u(1), MessageBody::text("hi alice"))
        .await
        .expect("sent");
    assert!(reply.mid > ack.mid, "mids are time-ordered");
    assert_eq!(reply.conv_seq, 2, "conversation numbering is contiguous");
    for events in [
        &mut alice_phone_events,
        &mut alice_laptop_events,
        &mut bob_tablet_events,
    ] {
        let m = next_message(events).await;
        assert_eq!((m.mid, text_of(&m)), (reply.mid, "hi alice"));
    }
    no_message(&mut bob_phone_events, Duration::from_millis(200)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_receiver_gets_everything_in_order_on_reconnect() {
    let server = TestServer::start(|_| {}).await;
    let (alice, _alice_events) = server.client(1, "phone").await;
    let (bob, mut bob_events) = server.client(2, "phone").await;
    let first = alice
        .send(&u(2), MessageBody::text("while online"))
        .await
        .expect("sent");
    assert_eq!(next_message(&mut bob_events).await.mid, first.mid);
    bob.close().await;
    drop(bob_events);

    let mut mids = Vec::new();
    for i in 0..30 {
        mids.push(
            alice
                .send(&u(2), MessageBody::text(format!("offline {i}")))
                .await
                .expect("sent")
                .mid,
        );
    }
    // Bob comes back as a new process: no local state, the server's cursor.
    let (_bob, mut bob_events) = server.client(2, "phone").await;
    let mut got = Vec::new();
    for _ in 0..30 {
        got.push(next_message(&mut bob_events).await);
    }
    assert_eq!(
        got.iter().map(|m| m.mid).collect::<Vec<_>>(),
        mids,
        "all of them, in order"
    );
    assert_eq!(text_of(&got[29]), "offline 29");
    let seqs: Vec<u64> = got.iter().map(|m| m.conv_seq).collect();
    assert_eq!(
        seqs,
        (2..=31).collect::<Vec<_>>(),
        "no gap in the conversation"
    );
    no_message(&mut bob_events, Duration::from_millis(300)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_client_seq_twice_is_one_message() {
    let server = TestServer::start(|_| {}).await;
    let (alice, _events) = server.client(1, "phone").await;
    let (_bob, mut bob_events) = server.client(2, "phone").await;
    let seq = alice.next_client_seq();
    let first = alice
        .send_with_seq(seq, &u(2), MessageBody::text("once"))
        .await
        .expect("sent");
    let again = alice
        .send_with_seq(seq, &u(2), MessageBody::text("once"))
        .await
        .expect("sent");
    assert!(!first.repeat);
    assert!(again.repeat);
    assert_eq!((again.mid, again.conv_seq), (first.mid, first.conv_seq));
    // Bob's SDK sees it once even though the repeat is pushed again.
    assert_eq!(next_message(&mut bob_events).await.mid, first.mid);
    no_message(&mut bob_events, Duration::from_millis(300)).await;
    let page = alice
        .history("p:u1:u2", None, 100, &[])
        .await
        .expect("history");
    assert_eq!(page.messages.len(), 1, "one stored row");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acked_is_lost_across_a_restart() {
    let mut server = TestServer::start(|c| {
        c.store.synchronous = true;
        // The retention job runs and stops with the server; nothing here is old enough.
        c.store.retention_days = 30;
    })
    .await;
    let (alice, _events) = server.client(1, "phone").await;
    let mut acked = Vec::new();
    for i in 0..50 {
        acked.push(
            alice
                .send(&u(2), MessageBody::text(format!("m{i}")))
                .await
                .expect("acked")
                .mid,
        );
    }
    drop(alice);
    server.restart().await;
    let (_bob, mut bob_events) = server.client(2, "phone").await;
    let mut got = Vec::new();
    for _ in 0..50 {
        got.push(next_message(&mut bob_events).await.mid);
    }
    assert_eq!(got, acked);
    // The sequence counters continue after the restart.
    let (alice, _events) = server.client(1, "phone").await;
    let after = alice
        .send(&u(2), MessageBody::text("after restart"))
        .await
        .expect("acked");
    assert_eq!(after.conv_seq, 51);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_logging_in_again_replaces_the_old_connection() {
    let server = TestServer::start(|_| {}).await;
    let (_old, mut old_events) = server.client(1, "phone").await;
    let (_new, _new_events) = server.client(1, "phone").await;
    loop {
        match tokio::time::timeout(PATIENCE, old_events.next())
            .await
            .expect("event")
        {
            Some(Event::Disconnected { error, fatal }) => {
                assert!(fatal);
                assert_eq!(error.class(), "closed:replaced");
                break;
            }
            Some(_) => continue,
            None => panic!("stream ended without a disconnect"),
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_send_concurrently_and_every_message_arrives_once() {
    let server = TestServer::start(|_| {}).await;
    let users = 20u64;
    let per_user = 20usize;
    let mut clients = Vec::new();
    for uid in 1..=users {
        clients.push(server.client(uid, "d").await);
    }
    let mut sends = Vec::new();
    for (i, (client, _)) in clients.iter().enumerate() {
        let client = client.clone();
        let to = (i as u64 + 1) % users + 1;
        sends.push(tokio::spawn(async move {
            for n in 0..per_user {
                client
                    .send(&u(to), MessageBody::text(format!("{n}")))
                    .await
                    .expect("acked");
            }
        }));
    }
    for s in sends {
        s.await.expect("sender");
    }
    for (client, events) in clients.iter_mut() {
        let mut last_seq = 0;
        for _ in 0..per_user {
            let m = next_message(events).await;
            assert!(m.conv_seq > last_seq, "in conversation order");
            last_seq = m.conv_seq;
        }
        no_message(events, Duration::from_millis(50)).await;
        assert_eq!(
            client
                .stats()
                .duplicates
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_in_the_middle_of_traffic_loses_nothing_that_was_acked() {
    let mut server = TestServer::start(|c| c.store.synchronous = true).await;
    let senders = 8u64;
    let mut tasks = Vec::new();
    for uid in 1..=senders {
        // Senders give up quickly once the server is gone.
        let mut config = server.client_config(uid, "phone");
        config.ack_timeout = Duration::from_millis(500);
        config.send_attempts = 2;
        let (client, _events) = natter_client::Client::connect(config)
            .await
            .expect("connects");
        tasks.push(tokio::spawn(async move {
            let _events = _events;
            let mut acked = Vec::new();
            // Send until the server goes away; keep what was acked.
            for n in 0..10_000u32 {
                match client
                    .send(&u(100), MessageBody::text(format!("{uid}/{n}")))
                    .await
                {
                    Ok(reply) => acked.push(reply.mid),
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart().await;
    let mut acked: Vec<u64> = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("sender"));
    }
    assert!(
        acked.len() > senders as usize,
        "traffic was flowing when the server stopped"
    );
    // Everything acked before the stop is there for the receiver after it
    // (a backlog too large to wait for before reading events).
    let (_receiver, mut events) =
        natter_client::Client::connect(server.client_config(100, "phone"))
            .await
            .expect("connects");
    // Messages stored whose ack never reached the sender arrive too; wait for
    // every acked one (next_message fails the test if one never comes).
    let mut got = std::collections::HashSet::new();
    while !acked.iter().all(|mid| got.contains(mid)) {
        got.insert(next_message(&mut events).await.mid);
    }
    server.stop().await;
}
