//! The contracts between natter's roles: what each role offers the others,
//! and the values that cross between them.
//!
//! This crate is an API boundary. It holds traits and plain data, and does
//! no IO: no sockets, no storage, no clocks beyond reading the time. A role
//! (`comet`, `logic`, and the roles still to come) depends on this crate,
//! never on another role's crate, so that the gateway does not link the
//! message store and `rpc` can carry any implementation across machines.
//!
//! - [`refusal`]: the one refusal type every role answers with.
//! - [`auth`]: who a token names ([`Identity`]), the [`Authenticate`]
//!   contract, and natter's own HS256 [`Tokens`].
//! - [`gateway`]: what logic asks of a gateway node ([`Gateway`]) and the
//!   pushes it hands over.
//! - [`logic`]: what a gateway asks of logic ([`LogicService`]) and the
//!   sessions it registers.

pub mod auth;
pub mod gateway;
pub mod logic;
pub mod refusal;

pub use auth::{valid_device, Authenticate, Identity, TokenClaims, Tokens, MAX_DEVICE_LEN};
pub use gateway::{Acked, Gateway, Push, PushBatch, Target};
pub use logic::{Connected, LogicService, Route, Session};
pub use natter_proto::UserId;
pub use refusal::Refusal;
