//! What a run does: users, devices, connect ramp, traffic pattern, rates,
//! sizes and phases. Read from a small TOML file and/or flags.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Who sends to whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Pattern {
    /// Each message goes to a user chosen at random (never the sender).
    RandomPairs,
    /// Users are paired (0↔1, 2↔3, …) and only talk to their partner.
    FixedPairs,
    /// Users form groups of `size` consecutive users (the last may be
    /// smaller); the first `senders` users of each group send to it.
    Group { size: u64, senders: u64 },
}

impl Pattern {
    /// The group index of `user`, for group traffic.
    pub fn group_of(&self, user: u64) -> Option<u64> {
        match self {
            Pattern::Group { size, .. } => Some(user / (*size).max(1)),
            _ => None,
        }
    }

    /// Whether `user` sends at all.
    pub fn sends(&self, user: u64) -> bool {
        match self {
            Pattern::Group { size, senders } => user % (*size).max(1) < *senders,
            _ => true,
        }
    }

    /// Groups of `users` users: each one's member indexes.
    pub fn groups(&self, users: u64) -> Vec<std::ops::Range<u64>> {
        match self {
            Pattern::Group { size, .. } => (0..users)
                .step_by((*size).max(1) as usize)
                .map(|first| first..(first + size).min(users))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The receiver of a sender's `k`-th message, for user indexes
    /// `0..users` (for group traffic: the index of the sender's group).
    pub fn receiver(&self, sender: u64, k: u64, users: u64, seed: u64) -> u64 {
        match self {
            Pattern::Group { size, .. } => sender / (*size).max(1),
            Pattern::FixedPairs => {
                let partner = sender ^ 1;
                if partner < users {
                    partner
                } else {
                    // With an odd count the last user (index ≥ 2) joins its neighbour.
                    sender - 1
                }
            }
            Pattern::RandomPairs => {
                let r = splitmix(
                    seed ^ sender.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        ^ k.wrapping_mul(0xbf58_476d_1ce4_e5b9),
                );
                let other = r % (users - 1);
                if other >= sender {
                    other + 1
                } else {
                    other
                }
            }
        }
    }
}

/// A fast, well-mixed hash for deterministic pseudo-random choices.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A whole run's parameters. Durations are in milliseconds in TOML
/// (`duration_ms = 5000`) and human form on the command line (`5s`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Simulated users.
    pub users: u64,
    /// Connected devices per user; the first device of each user sends.
    pub devices: u32,
    /// New connections per second across the whole run (0: as fast as possible).
    pub connect_rate: u32,
    pub pattern: Pattern,
    /// Messages per second each user sends (may be fractional; 0 = idle).
    pub rate: f64,
    /// Bytes of the message payload (at least 35).
    pub message_size: usize,
    /// Sending before measurement starts.
    pub warmup_ms: u64,
    /// Measured sending.
    pub duration_ms: u64,
    /// Time after sending stops for deliveries to arrive, before the final sync.
    pub drain_ms: u64,
    /// Number of the first user (users are `u-{uid_base}`, `u-{uid_base + 1}`,
    /// …); absent: a random base, so every run has fresh users.
    pub uid_base: Option<u64>,
    /// Worker processes (0: one per 15,000 connections).
    pub workers: u32,
    /// Source addresses for client sockets (empty: automatic).
    pub source_ips: Vec<IpAddr>,
    /// A send later than this behind its schedule counts as late.
    pub late_ms: u64,
    /// Reply time-out of the SDK before it resends.
    pub ack_timeout_ms: u64,
    /// How long the SDK may wait before acknowledging pushes.
    #[serde(default = "default_push_ack_delay_ms")]
    pub push_ack_delay_ms: u64,
}

fn default_push_ack_delay_ms() -> u64 {
    1000
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            users: 100,
            devices: 1,
            connect_rate: 2000,
            pattern: Pattern::RandomPairs,
            rate: 1.0,
            message_size: 64,
            warmup_ms: 1000,
            duration_ms: 5000,
            drain_ms: 2000,
            uid_base: None,
            workers: 0,
            source_ips: Vec::new(),
            late_ms: 10,
            ack_timeout_ms: 5000,
            push_ack_delay_ms: default_push_ack_delay_ms(),
        }
    }
}

/// Connections one worker process holds at most (the open-files limit is 20,000).
pub const CONNECTIONS_PER_WORKER: u64 = 15_000;
/// Connections per source address (one address has about 28,000 ephemeral ports).
pub const CONNECTIONS_PER_SOURCE: u64 = 25_000;

impl Scenario {
    pub fn connections(&self) -> u64 {
        self.users * u64::from(self.devices)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.users < 2 {
            return Err("at least 2 users are needed".into());
        }
        if self.devices == 0 || self.devices > 16 {
            return Err("devices must be between 1 and 16".into());
        }
        if !(self.rate >= 0.0 && self.rate <= 10_000.0) {
            return Err("rate must be between 0 and 10000 messages/s per user".into());
        }
        if self.message_size < crate::payload::MIN_SIZE || self.message_size > 1 << 20 {
            return Err(format!(
                "message size must be between {} and 1048576 bytes",
                crate::payload::MIN_SIZE
            ));
        }
        if self.duration_ms == 0 {
            return Err("duration must be positive".into());
        }
        if let Pattern::Group { size, senders } = self.pattern {
            if size < 2 || size > self.users {
                return Err("group size must be between 2 and the number of users".into());
            }
            if senders == 0 || senders > size {
                return Err("group senders must be between 1 and the group size".into());
            }
        }
        Ok(())
    }

    /// Worker processes to use.
    pub fn worker_count(&self) -> u32 {
        if self.workers > 0 {
            return self.workers;
        }
        self.connections().div_ceil(CONNECTIONS_PER_WORKER).max(1) as u32
    }

    /// Source addresses: as given, or enough 127.0.0.x addresses for the
    /// connection count when the server is on loopback.
    pub fn sources(&self, server_is_loopback: bool) -> Vec<IpAddr> {
        if !self.source_ips.is_empty() {
            return self.source_ips.clone();
        }
        let needed = self.connections().div_ceil(CONNECTIONS_PER_SOURCE);
        if needed <= 1 || !server_is_loopback {
            return Vec::new();
        }
        (1..=needed.min(250))
            .map(|i| IpAddr::from([127, 0, 0, i as u8]))
            .collect()
    }

    pub fn warmup(&self) -> Duration {
        Duration::from_millis(self.warmup_ms)
    }

    pub fn duration(&self) -> Duration {
        Duration::from_millis(self.duration_ms)
    }

    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }
}

/// Parses `250ms`, `5s`, `2m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 5s or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn random_pairs_never_pick_the_sender_and_cover_everyone() {
        let users = 7;
        let mut seen = vec![false; users as usize];
        for sender in 0..users {
            for k in 0..200 {
                let r = Pattern::RandomPairs.receiver(sender, k, users, 42);
                assert_ne!(r, sender);
                assert!(r < users);
                seen[r as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn fixed_pairs_are_partners() {
        assert_eq!(Pattern::FixedPairs.receiver(0, 5, 4, 0), 1);
        assert_eq!(Pattern::FixedPairs.receiver(3, 5, 4, 0), 2);
        // With an odd count the last user talks to its neighbour.
        assert_eq!(Pattern::FixedPairs.receiver(4, 0, 5, 0), 3);
    }

    #[test]
    fn group_pattern_splits_users_into_groups_with_senders() {
        let p = Pattern::Group {
            size: 4,
            senders: 2,
        };
        assert_eq!(p.groups(10), vec![0..4, 4..8, 8..10]);
        assert_eq!((p.group_of(5), p.group_of(9)), (Some(1), Some(2)));
        let senders: Vec<u64> = (0..10).filter(|u| p.sends(*u)).collect();
        assert_eq!(senders, vec![0, 1, 4, 5, 8, 9]);
        assert_eq!(p.receiver(6, 0, 10, 0), 1);
        let bad = Scenario {
            users: 3,
            pattern: Pattern::Group {
                size: 4,
                senders: 1,
            },
            ..Scenario::default()
        };
        assert!(bad.validate().is_err());
        let bad = Scenario {
            users: 8,
            pattern: Pattern::Group {
                size: 4,
                senders: 0,
            },
            ..Scenario::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn scenario_toml_round_trips_and_validates() {
        let text = "users = 10\ndevices = 2\nrate = 2.5\nduration_ms = 3000\n[pattern]\nkind = \"fixed_pairs\"\n";
        let s: Scenario = toml::from_str(text).expect("parses");
        assert_eq!(
            (s.users, s.devices, s.rate, s.pattern),
            (10, 2, 2.5, Pattern::FixedPairs)
        );
        s.validate().expect("valid");
        assert!(toml::from_str::<Scenario>("userz = 1").is_err());
        let mut bad = s.clone();
        bad.users = 1;
        assert!(bad.validate().is_err());
        let big = Scenario {
            users: 40_000,
            ..Scenario::default()
        };
        assert_eq!(big.worker_count(), 3);
        assert_eq!(big.sources(true).len(), 2);
        assert!(big.sources(false).is_empty());
    }
}
