//! Per-key rate limits (messages, HTTP requests, group changes per user): a token bucket per key, sharded so senders rarely
//! contend. Buckets of users who have been quiet long enough to be full again
//! are dropped when a shard grows, so memory follows the active users.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

const SHARDS: usize = 64;

/// The shard of `key`: FNV-1a over its bytes (keys are user ids, which the
/// caller does not choose freely enough to aim at one shard with any gain:
/// a crowded shard only costs its users a little lock contention).
fn shard_of(key: &str) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % SHARDS as u64) as usize
}
/// Buckets a shard keeps before it drops the full ones.
const SHARD_LIMIT: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Shard {
    buckets: HashMap<Box<str>, Bucket>,
    /// Size at which the next sweep runs: doubling keeps sweeps amortized O(1)
    /// even when many users are active at once.
    sweep_at: usize,
}

/// Allows `rate` events per second per key, with bursts of up to `burst`.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    shards: Vec<Mutex<Shard>>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter {
            rate,
            burst: f64::from(burst),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        buckets: HashMap::new(),
                        sweep_at: SHARD_LIMIT,
                    })
                })
                .collect(),
        }
    }

    /// Takes one token for `key` at time `now`; false when there is none.
    pub fn allow_at(&self, key: &str, now: Instant) -> bool {
        self.allow_n_at(key, 1, now)
    }

    /// Takes `n` tokens for `key` at time `now`, or none (and false) when
    /// fewer are left. More than the burst is never allowed.
    pub fn allow_n_at(&self, key: &str, n: u32, now: Instant) -> bool {
        let mut shard = self.shards[shard_of(key)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if shard.buckets.len() >= shard.sweep_at {
            let (rate, burst) = (self.rate, self.burst);
            shard.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            shard.sweep_at = (shard.buckets.len() * 2).max(SHARD_LIMIT);
        }
        // Look up by `&str`; only a key's first event allocates.
        if !shard.buckets.contains_key(key) {
            shard.buckets.insert(
                key.into(),
                Bucket {
                    tokens: self.burst,
                    at: now,
                },
            );
        }
        let Some(bucket) = shard.buckets.get_mut(key) else {
            unreachable!("inserted above")
        };
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        let n = f64::from(n);
        if bucket.tokens >= n {
            bucket.tokens -= n;
            true
        } else {
            false
        }
    }

    pub fn allow(&self, key: &str) -> bool {
        self.allow_at(key, Instant::now())
    }

    /// [`RateLimiter::allow_n_at`] now.
    pub fn allow_n(&self, key: &str, n: u32) -> bool {
        self.allow_n_at(key, n, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_the_rate() {
        let limiter = RateLimiter::new(2.0, 3);
        let t = Instant::now();
        assert!((0..3).all(|_| limiter.allow_at("1", t)), "the burst");
        assert!(!limiter.allow_at("1", t), "then nothing");
        assert!(limiter.allow_at("2", t), "other users are not affected");
        assert!(!limiter.allow_at("1", t + Duration::from_millis(400)));
        assert!(
            limiter.allow_at("1", t + Duration::from_millis(500)),
            "2/s refills one in 500 ms"
        );
        assert!(!limiter.allow_at("1", t + Duration::from_millis(600)));
        // A long pause refills to the burst, not beyond.
        let later = t + Duration::from_secs(60);
        assert!((0..3).all(|_| limiter.allow_at("1", later)));
        assert!(!limiter.allow_at("1", later));
    }

    #[test]
    fn several_tokens_are_taken_at_once_or_not_at_all() {
        let limiter = RateLimiter::new(1.0, 10);
        let t = Instant::now();
        assert!(limiter.allow_n_at("1", 7, t));
        assert!(!limiter.allow_n_at("1", 4, t), "3 left");
        assert!(limiter.allow_n_at("1", 3, t), "a refused take took nothing");
        assert!(!limiter.allow_n_at("2", 11, t), "never more than the burst");
    }

    #[test]
    fn quiet_users_are_forgotten_when_a_shard_fills() {
        let limiter = RateLimiter::new(1000.0, 1);
        let t = Instant::now();
        // Users in shard 0 only.
        let in_shard_0 = |from: u64| {
            (from..)
                .map(|n| format!("u-{n}"))
                .filter(|k| shard_of(k) == 0)
        };
        for key in in_shard_0(0).take(SHARD_LIMIT * 3) {
            limiter.allow_at(&key, t);
        }
        let busy = limiter.shards[0].lock().expect("lock").buckets.len();
        assert_eq!(busy, SHARD_LIMIT * 3, "active users are all kept");
        // A second later every bucket is full again: the next sweep drops them.
        let later = t + Duration::from_secs(1);
        for key in in_shard_0(100_000_000).take(SHARD_LIMIT * 4) {
            limiter.allow_at(&key, later);
        }
        let size = limiter.shards[0].lock().expect("lock").buckets.len();
        assert!(size < SHARD_LIMIT * 5, "full buckets were dropped ({size})");
    }
}
