//! natter's wire protocol: the frame codec ([`frame`]), the error and close
//! codes ([`code`]), the protobuf bodies ([`msg`]), the HTTP API's JSON
//! bodies ([`api`]) and their one rule for 64-bit integers and bytes in
//! JSON ([`json`]).
//!
//! This crate is the only place that knows frame bytes. It does no IO: the
//! gateway and the client SDK move whole frames over WebSocket messages and
//! call into here to encode and decode them.

pub mod api;
pub mod code;
pub mod frame;
pub mod json;
pub mod msg;
pub mod user;

pub use code::ErrorCode;
pub use frame::{BodyError, Frame, FrameError, Op, DEFAULT_MAX_BODY, HEADER_LEN, VERSION};
pub use user::{UserId, UserIdError, MAX_USER_ID_LEN};
