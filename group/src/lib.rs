//! Groups: members, roles (owner, admins, members), join types with
//! applications, mute rules, limits, and the events every change publishes.
//!
//! - [`store`]: the [`GroupStore`] trait; [`sqlite`]: the embedded
//!   implementation, [`mysql`]: the distributed one.
//! - [`service`]: [`Groups`], the rules; the message path asks it
//!   [`Groups::check_send`] and fans out to the returned members.
//! - [`http`]: the `/v1/groups` API.
//!
//! Group *messages* are stored by `record` (once per group, numbered by the
//! group's `conv_seq`); this crate decides who may write and read them. It
//! does not know sockets or sessions: events leave through a [`Publisher`],
//! which `logic` implements. Every refusal is a [`natter_roles::Refusal`], and
//! every user is a [`natter_proto::UserId`], compared byte for byte.

pub mod http;
pub mod mysql;
pub mod service;
pub mod sqlite;
pub mod store;
#[cfg(test)]
mod suite;

pub use service::{Groups, Publisher, Snapshot};
pub use store::{GroupStore, GroupStoreError};
