//! Message storage and the history/sync HTTP API.
//!
//! - [`store`]: the [`MessageStore`] trait and the types that cross it.
//! - [`sqlite`]: the embedded implementation.
//! - [`committer`]: group commit in front of any store.
//! - [`http`]: `GET /v1/conversations/{id}/messages`, `GET /v1/sync` and
//!   `GET /v1/search`.
//! - [`retention`]: the job that deletes messages past their age.
//! - [`search`]: message search: what is indexed, and how each store finds it.
//! - [`suite`]: the behaviour every store implementation must pass.
//!
//! This crate knows the tables and its own routes. It does not know sockets,
//! frames on the wire, or how tokens are checked: the router is given an
//! [`http::Authenticate`] implementation.

mod batch;
pub mod committer;
pub mod http;
pub mod migrations;
pub mod mysql;
pub mod retention;
pub mod search;
pub mod sqlite;
pub mod store;
#[cfg(any(test, feature = "test-util"))]
pub mod suite;

pub use committer::{CommitError, Committer};
pub use store::{MessageStore, StoreError};
