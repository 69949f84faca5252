//! Time-ordered 64-bit message ids, snowflake style:
//! 41 bits of milliseconds since 2024-01-01 UTC, 10 bits of worker, 12 bits of
//! sequence within the millisecond.
//!
//! Ids from one generator strictly increase. When more than 4096 ids are asked
//! for in one millisecond, or the clock steps back, the generator runs ahead
//! of the clock on its own logical time rather than repeat an id.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds of the id epoch, 2024-01-01T00:00:00Z.
pub const EPOCH_MS: i64 = 1_704_067_200_000;
const WORKER_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;
/// Largest worker id.
pub const MAX_WORKER: u16 = (1 << WORKER_BITS) - 1;

/// Unix time now in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix milliseconds at which `mid` was made.
pub fn mid_time_ms(mid: u64) -> i64 {
    (mid >> (WORKER_BITS + SEQ_BITS)) as i64 + EPOCH_MS
}

/// Makes ids for one worker.
#[derive(Debug)]
pub struct MidGenerator {
    worker: u64,
    state: Mutex<(i64, u64)>,
}

impl MidGenerator {
    /// A generator for `worker` (0..=1023).
    pub fn new(worker: u16) -> Result<MidGenerator, String> {
        if worker > MAX_WORKER {
            return Err(format!("worker id {worker} exceeds {MAX_WORKER}"));
        }
        Ok(MidGenerator {
            worker: u64::from(worker),
            state: Mutex::new((0, 0)),
        })
    }

    /// The next id, using the wall clock.
    pub fn next(&self) -> u64 {
        self.next_at(now_ms())
    }

    /// The next id as if the wall clock read `now_ms`.
    pub fn next_at(&self, now_ms: i64) -> u64 {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last_ms, seq) = *state;
        let (ms, seq) = if now_ms > last_ms {
            (now_ms, 0)
        } else if seq + 1 < (1 << SEQ_BITS) {
            (last_ms, seq + 1)
        } else {
            (last_ms + 1, 0)
        };
        *state = (ms, seq);
        let elapsed = (ms - EPOCH_MS).max(0) as u64;
        (elapsed << (WORKER_BITS + SEQ_BITS)) | (self.worker << SEQ_BITS) | seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_carry_time_and_worker() {
        let generator = MidGenerator::new(5).expect("worker");
        let t = EPOCH_MS + 1_000;
        let a = generator.next_at(t);
        let b = generator.next_at(t);
        assert!(b > a);
        assert_eq!(mid_time_ms(a), t);
        assert_eq!((a >> SEQ_BITS) & u64::from(MAX_WORKER), 5);
    }

    #[test]
    fn sequence_overflow_and_clock_steps_back_never_repeat() {
        let generator = MidGenerator::new(1).expect("worker");
        let t = EPOCH_MS + 50;
        let mut last = 0;
        for _ in 0..10_000 {
            let id = generator.next_at(t);
            assert!(id > last);
            last = id;
        }
        let back = generator.next_at(t - 10);
        assert!(back > last);
    }

    #[test]
    fn workers_never_collide() {
        let a = MidGenerator::new(1).expect("worker");
        let b = MidGenerator::new(2).expect("worker");
        assert_ne!(a.next_at(EPOCH_MS + 7), b.next_at(EPOCH_MS + 7));
        assert!(MidGenerator::new(MAX_WORKER + 1).is_err());
    }
}
