//! A device's own send that comes back to it: stored, its ack lost (as in a
//! crash just after the commit), then returned by the connect-time sync
//! before the resend's reply. It answers the send; it is never incoming.

use std::time::Duration;

use natter_client::Client;
use natter_proto::msg::{MessageBody, MessageReply, SendMessage};
use natter_proto::{Frame, Op};
use natter_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_ack_was_lost_comes_back_by_sync_as_its_answer_never_as_incoming() {
    let server = TestServer::start(|_| {}).await;
    // Stored with client_seq 4242 from alice's phone; the client below never
    // sees this reply (the raw connection stands for the connection that
    // died with it).
    let mut raw = server.raw(1, "phone").await;
    let send = SendMessage {
        client_seq: 4242,
        receiver: u(2).to_string(),
        body: Some(MessageBody::text("once")),
        group: 0,
    };
    raw.send(&Frame::new(Op::Message, 2, 0, &send))
        .await
        .expect("sent");
    let stored: MessageReply = next_reply(&mut raw).await.message().expect("reply");
    raw.close().await;

    // The phone comes back with its cursor before the message, and resends.
    // Its sync goes out first and the server answers requests in order, so
    // the message comes back by sync while the resend waits for its reply.
    let mut config = server.client_config(1, "phone");
    config.cursor = Some(0);
    let (phone, mut events) = Client::connect(config).await.expect("connects");
    let answer = phone
        .send_with_seq(4242, &u(2), MessageBody::text("once"))
        .await
        .expect("the resend is answered");
    assert_eq!(
        (
            answer.mid,
            answer.conv_seq,
            answer.user_seq,
            &answer.conversation
        ),
        (
            stored.mid,
            stored.conv_seq,
            stored.user_seq,
            &stored.conversation
        ),
        "the first mid back"
    );
    assert!(answer.repeat);
    // A later resend of the same client_seq, and a second sync, change
    // nothing: the phone is never told of its own message.
    let again = phone
        .send_with_seq(4242, &u(2), MessageBody::text("once"))
        .await
        .expect("answered again");
    assert_eq!(again.mid, stored.mid);
    phone.sync().await.expect("sync");
    no_message(&mut events, Duration::from_millis(300)).await;

    // Alice's other device gets it, once: it did not send it.
    let mut config = server.client_config(1, "laptop");
    config.cursor = Some(0);
    let (_laptop, mut laptop_events) = Client::connect(config).await.expect("connects");
    assert_eq!(next_message(&mut laptop_events).await.mid, stored.mid);
    no_message(&mut laptop_events, Duration::from_millis(300)).await;
    server.stop().await;
}
