//! `natter pressure`: drives a running natter with simulated users through
//! the client SDK and says honestly what happened.
//!
//! - [`scenario`]: what a run does (users, devices, ramp, pattern, rates, phases).
//! - [`worker`]: one process's share of the users: connect, send on
//!   schedule, record every ack and delivery, final sync.
//! - [`run`]: the orchestration: worker processes, live progress, machine and
//!   server sampling, merging.
//! - [`reconcile`]: acked against received — lost, duplicated, reordered, unexpected.
//! - [`user`]: simulated users, number `n` being the user id `u-{n}`.
//! - [`stats`], [`report`], [`payload`]: histograms and timeline, the report
//!   in text/JSON/HTML, the message payload. Machine and process readings
//!   come from `natter_node::process`.
//!
//! Latency is measured from each message's *intended* send time on the
//! schedule, so a stalled server shows up as latency instead of as a
//! politely slower client (coordinated omission).

pub mod cli;
pub mod payload;
pub mod reconcile;
pub mod report;
pub mod run;
pub mod scenario;
pub mod stats;
pub mod user;
pub mod worker;
