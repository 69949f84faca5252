//! Latency histograms (HdrHistogram, microseconds) and the per-second
//! timeline, both mergeable across worker processes.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency tracked: one hour, in microseconds.
const MAX_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds.
#[derive(Clone, Debug)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist(
            Histogram::new_with_bounds(1, MAX_US, 3)
                .unwrap_or_else(|_| unreachable!("static bounds are valid")),
        )
    }
}

/// Percentiles of a histogram, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Hist {
    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.clamp(1, MAX_US));
    }

    pub fn record(&mut self, d: std::time::Duration) {
        self.record_us(d.as_micros().min(u128::from(MAX_US)) as u64);
    }

    pub fn merge(&mut self, other: &Hist) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn summary(&self) -> Summary {
        if self.0.is_empty() {
            return Summary::default();
        }
        Summary {
            count: self.0.len(),
            mean_us: self.0.mean(),
            p50_us: self.0.value_at_quantile(0.50),
            p90_us: self.0.value_at_quantile(0.90),
            p99_us: self.0.value_at_quantile(0.99),
            p999_us: self.0.value_at_quantile(0.999),
            max_us: self.0.max(),
        }
    }
}

/// Wire form: (value, count) pairs of the recorded buckets.
impl Serialize for Hist {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(u64, u64)> = self
            .0
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        pairs.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Hist {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Hist, D::Error> {
        let pairs = Vec::<(u64, u64)>::deserialize(d)?;
        let mut h = Hist::default();
        for (value, count) in pairs {
            let _ = h.0.record_n(value.clamp(1, MAX_US), count);
        }
        Ok(h)
    }
}

/// Counts and latencies of one second of the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Bucket {
    pub sent: u64,
    pub acked: u64,
    pub received: u64,
    pub errors: u64,
    pub e2e: Hist,
}

impl Bucket {
    pub fn merge(&mut self, other: &Bucket) {
        self.sent += other.sent;
        self.acked += other.acked;
        self.received += other.received;
        self.errors += other.errors;
        self.e2e.merge(&other.e2e);
    }
}

/// Per-second buckets from the start of sending.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timeline {
    pub buckets: Vec<Bucket>,
}

impl Timeline {
    /// The bucket for `ms` milliseconds after the start (earlier goes in the first).
    pub fn at(&mut self, ms: i64) -> &mut Bucket {
        let i = (ms.max(0) / 1000) as usize;
        if self.buckets.len() <= i {
            self.buckets.resize_with(i + 1, Bucket::default);
        }
        &mut self.buckets[i]
    }

    pub fn merge(&mut self, other: &Timeline) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets
                .resize_with(other.buckets.len(), Bucket::default);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            mine.merge(theirs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_wire_and_merge() {
        let mut a = Hist::default();
        for us in 1..=1000 {
            a.record_us(us);
        }
        let wire = serde_json::to_string(&a).expect("serialize");
        let b: Hist = serde_json::from_str(&wire).expect("deserialize");
        assert_eq!(a.summary(), b.summary());
        let mut c = Hist::default();
        c.record_us(1_000_000);
        c.merge(&b);
        let s = c.summary();
        assert_eq!(s.count, 1001);
        assert!((999_000..=1_001_000).contains(&s.max_us));
        assert!((495..=505).contains(&s.p50_us), "{s:?}");
    }

    #[test]
    fn timeline_buckets_by_second() {
        let mut t = Timeline::default();
        t.at(-5).sent += 1;
        t.at(1500).received += 2;
        let mut other = Timeline::default();
        other.at(2500).acked += 1;
        t.merge(&other);
        assert_eq!(t.buckets.len(), 3);
        assert_eq!(
            (t.buckets[0].sent, t.buckets[1].received, t.buckets[2].acked),
            (1, 2, 1)
        );
    }
}
