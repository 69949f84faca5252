//! Every worked example in docs/protocol.md (the ```hex frame blocks) is a
//! valid version-2 frame whose body decodes as the message its operation
//! declares, and whose user ids are valid user ids; and the schema the
//! document reproduces is proto/natter.proto itself.

use natter_proto::msg::*;
use natter_proto::{Frame, Op, UserId, VERSION};

const DOC: &str = include_str!("../../docs/protocol.md");

fn decode_hex(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd hex length: {hex}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn frames_in_doc() -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut inside = false;
    for line in DOC.lines() {
        let trimmed = line.trim();
        if trimmed == "```hex frame" {
            inside = true;
        } else if inside && trimmed.starts_with("```") {
            inside = false;
        } else if inside && !trimmed.is_empty() {
            frames.push(decode_hex(trimmed));
        }
    }
    frames
}

/// Parses `id` as a user id, or panics naming the field it came from.
fn user(id: &str, field: &str) -> UserId {
    UserId::parse(id).unwrap_or_else(|e| panic!("{field} {id:?} is not a user id: {e}"))
}

/// The one-to-one receiver is a user id; a group message has none.
fn check_receiver(receiver: &str, group: u64, field: &str) -> Option<UserId> {
    if group == 0 {
        Some(user(receiver, field))
    } else {
        assert!(receiver.is_empty(), "{field} is set on a group message");
        None
    }
}

fn check_body(body: Option<&MessageBody>) {
    let Some(content) = body.and_then(|b| b.content.as_ref()) else {
        return;
    };
    match content {
        Content::Text(t) => {
            for m in &t.mentions {
                user(m, "Text.mentions");
            }
        }
        Content::Forward(f) => {
            for item in &f.items {
                user(&item.sender, "ForwardItem.sender");
            }
        }
        Content::Card(c) if c.kind == "user" => {
            user(&c.id, "Card.id");
        }
        Content::GroupEvent(e) => {
            user(&e.actor, "GroupEvent.actor");
            for t in &e.targets {
                user(t, "GroupEvent.targets");
            }
        }
        _ => {}
    }
}

fn check_message(m: &Message) {
    let sender = user(&m.sender, "Message.sender");
    match check_receiver(&m.receiver, m.group, "Message.receiver") {
        Some(receiver) => assert_eq!(
            m.conversation,
            sender.conversation_with(&receiver),
            "a one-to-one conversation is p:{{a}}:{{b}}, byte-wise smaller first"
        ),
        None => assert_eq!(m.conversation, format!("g:{}", m.group)),
    }
    check_body(m.body.as_ref());
}

/// Decodes the body as `M` or panics naming the operation.
fn body<M: prost::Message + Default>(frame: &Frame) -> M {
    frame
        .message::<M>()
        .unwrap_or_else(|e| panic!("{:?} body does not decode: {e}", frame.op))
}

#[test]
fn worked_examples_decode_with_the_real_codec() {
    let frames = frames_in_doc();
    assert!(
        frames.len() >= 6,
        "the worked example is missing from docs/protocol.md"
    );
    assert_eq!(VERSION, 2, "the document describes version 2");
    for bytes in frames {
        let frame = Frame::decode(&bytes, 1 << 20).unwrap_or_else(|e| panic!("{e}: {bytes:02x?}"));
        assert_eq!(
            u16::from_be_bytes([bytes[6], bytes[7]]),
            2,
            "version byte of {:?}",
            frame.op
        );
        assert_eq!(
            frame.encode().as_ref(),
            bytes.as_slice(),
            "re-encodes to the same bytes"
        );
        match frame.op {
            Op::Auth => {
                body::<AuthRequest>(&frame);
            }
            Op::AuthReply => {
                user(&body::<AuthReply>(&frame).uid, "AuthReply.uid");
            }
            Op::Heartbeat | Op::PushAck => assert!(frame.body.is_empty(), "{:?}", frame.op),
            Op::HeartbeatReply => {
                body::<HeartbeatReply>(&frame);
            }
            Op::Message => {
                let send = body::<SendMessage>(&frame);
                check_receiver(&send.receiver, send.group, "SendMessage.receiver");
                check_body(send.body.as_ref());
            }
            Op::MessageReply => {
                body::<MessageReply>(&frame);
            }
            Op::Push => check_message(&body::<Message>(&frame)),
            Op::Sync => {
                body::<SyncRequest>(&frame);
            }
            Op::SyncReply => body::<SyncReply>(&frame)
                .messages
                .iter()
                .for_each(check_message),
            Op::Notify => {
                let notify = body::<Notify>(&frame);
                if notify.kind == "group_event" {
                    let m: Message = prost::Message::decode(notify.payload.as_slice())
                        .expect("a group_event payload is a Message");
                    check_message(&m);
                }
                if notify.kind == "read" {
                    let r: natter_proto::msg::ReadReceipt =
                        prost::Message::decode(notify.payload.as_slice())
                            .expect("a read payload is a ReadReceipt");
                    user(&r.reader, "ReadReceipt.reader");
                }
                if notify.kind == "typing" {
                    let t: natter_proto::msg::TypingNotice =
                        prost::Message::decode(notify.payload.as_slice())
                            .expect("a typing payload is a TypingNotice");
                    user(&t.user, "TypingNotice.user");
                }
            }
            Op::Disconnect => {
                body::<Disconnect>(&frame);
            }
            Op::Error => {
                body::<ErrorReply>(&frame);
            }
            Op::Read => {
                body::<natter_proto::msg::ReadRequest>(&frame);
            }
            Op::ReadReply => {
                body::<natter_proto::msg::ReadReply>(&frame);
            }
            Op::Typing => {
                body::<natter_proto::msg::Typing>(&frame);
            }
        }
    }
}

/// Section 4 reproduces the schema file; the two must not drift apart.
#[test]
fn the_schema_in_the_document_is_natter_proto() {
    let start = DOC.find("```proto\n").expect("a ```proto block") + "```proto\n".len();
    let end = start + DOC[start..].find("```\n").expect("the block ends");
    assert_eq!(&DOC[start..end], include_str!("../natter.proto"));
}

/// The checks above are not vacuous: a version-1 example, or one whose
/// sender is not a user id, is refused.
#[test]
fn the_checks_refuse_old_examples() {
    let mut v1 = Frame::empty(Op::Heartbeat, 7, 0).encode().to_vec();
    v1[7] = 1;
    assert!(Frame::decode(&v1, 1 << 20).is_err());
    let bad = std::panic::catch_unwind(|| {
        check_message(&Message {
            conversation: "p:1:2".into(),
            sender: "1 ".into(),
            receiver: "2".into(),
            ..Default::default()
        })
    });
    assert!(bad.is_err(), "a sender with a space passed");
    let misordered = std::panic::catch_unwind(|| {
        check_message(&Message {
            conversation: "p:bob:alice".into(),
            sender: "alice".into(),
            receiver: "bob".into(),
            ..Default::default()
        })
    });
    assert!(misordered.is_err(), "p:bob:alice passed");
}
