//! Feeds arbitrary bytes to the frame decoder and, when a frame decodes, to
//! every body decoder. Nothing may panic; a decoded frame must re-encode to
//! the same bytes.
//!
//! Run with: `cd proto && cargo +nightly fuzz run frame_decode`
#![no_main]

use libfuzzer_sys::fuzz_target;
use natter_proto::msg::*;
use natter_proto::Frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data, 4096) {
        assert_eq!(frame.encode().as_ref(), data);
        let _ = frame.message::<AuthRequest>();
        let _ = frame.message::<SendMessage>();
        let _ = frame.message::<SyncRequest>();
        let _ = frame.message::<Message>().map(|m| m.body.map(|b| b.validate()));
        let _ = frame.message::<ErrorReply>();
    }
});
