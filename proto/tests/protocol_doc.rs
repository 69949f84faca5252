//! Every worked example in docs/protocol.md (the ```hex frame blocks) is a
//! valid frame whose body decodes as the message its operation declares.

use natter_proto::msg::*;
use natter_proto::{Frame, Op};

fn decode_hex(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd hex length: {hex}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn frames_in_doc() -> Vec<Vec<u8>> {
    let doc = include_str!("../../docs/protocol.md");
    let mut frames = Vec::new();
    let mut inside = false;
    for line in doc.lines() {
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

#[test]
fn worked_examples_decode_with_the_real_codec() {
    let frames = frames_in_doc();
    assert!(
        frames.len() >= 6,
        "the worked example is missing from docs/protocol.md"
    );
    for bytes in frames {
        let frame = Frame::decode(&bytes, 1 << 20).unwrap_or_else(|e| panic!("{e}: {bytes:02x?}"));
        assert_eq!(
            frame.encode().as_ref(),
            bytes.as_slice(),
            "re-encodes to the same bytes"
        );
        let ok = match frame.op {
            Op::Auth => frame.message::<AuthRequest>().is_ok(),
            Op::AuthReply => frame.message::<AuthReply>().is_ok(),
            Op::Heartbeat | Op::PushAck => frame.body.is_empty(),
            Op::HeartbeatReply => frame.message::<HeartbeatReply>().is_ok(),
            Op::Message => frame.message::<SendMessage>().is_ok(),
            Op::MessageReply => frame.message::<MessageReply>().is_ok(),
            Op::Push => frame.message::<Message>().is_ok(),
            Op::Sync => frame.message::<SyncRequest>().is_ok(),
            Op::SyncReply => frame.message::<SyncReply>().is_ok(),
            Op::Notify => frame.message::<Notify>().is_ok(),
            Op::Disconnect => frame.message::<Disconnect>().is_ok(),
            Op::Error => frame.message::<ErrorReply>().is_ok(),
        };
        assert!(ok, "{:?} body does not decode", frame.op);
    }
}
