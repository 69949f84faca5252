//! Two users chat through a running natter.
//!
//! Run with: `cargo run -p natter-client --example chat -- HOST:PORT ALICE_TOKEN BOB_TOKEN`
//! (mint tokens with `natter token --uid alice --device phone`).

use natter_client::{Client, ClientConfig, Event, Events};
use natter_proto::msg::{Content, MessageBody};

async fn next_text(events: &mut Events) -> Option<(String, String)> {
    while let Some(event) = events.next().await {
        if let Event::Message(m) = event {
            if let Some(Content::Text(t)) = m.body.and_then(|b| b.content) {
                return Some((m.sender, t.text));
            }
        }
    }
    None
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [server, alice_token, bob_token] = args.as_slice() else {
        return Err("usage: chat HOST:PORT ALICE_TOKEN BOB_TOKEN".into());
    };
    let (alice, mut alice_events) =
        Client::connect(ClientConfig::new(server.clone(), alice_token.clone())).await?;
    let (bob, mut bob_events) =
        Client::connect(ClientConfig::new(server.clone(), bob_token.clone())).await?;
    println!(
        "alice is user {} on {}, bob is user {} on {}",
        alice.uid(),
        alice.device(),
        bob.uid(),
        bob.device()
    );

    let ack = alice
        .send(bob.uid(), MessageBody::text("hello bob"))
        .await?;
    println!(
        "alice sent mid {} (conversation {}, #{})",
        ack.mid, ack.conversation, ack.conv_seq
    );
    if let Some((from, text)) = next_text(&mut bob_events).await {
        println!("bob got from {from}: {text}");
    }
    let ack = bob.send(alice.uid(), MessageBody::text("hi alice")).await?;
    println!("bob sent mid {}", ack.mid);
    if let Some((from, text)) = next_text(&mut alice_events).await {
        println!("alice got from {from}: {text}");
    }
    let page = bob.history(&ack.conversation, None, 10, &[]).await?;
    println!(
        "history of {}: {} messages",
        ack.conversation,
        page.messages.len()
    );
    alice.close().await;
    bob.close().await;
    Ok(())
}
