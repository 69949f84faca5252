//! Readings from /proc: CPU time and memory of a process and how busy the
//! machine is. The server exports its own as Prometheus metrics
//! ([`ProcessCollector`]); the load harness reads them to record the
//! conditions of a run.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntGauge};
use serde::{Deserialize, Serialize};

/// Clock ticks per second of /proc CPU times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// User + system CPU seconds of a process (`None`: this process).
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".into(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces; fields after it are plain.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS)
}

/// Resident memory of a process in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Busy and total CPU time of the whole machine, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineCpu {
    pub busy: f64,
    pub total: f64,
}

pub fn machine_cpu() -> Option<MachineCpu> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = values.iter().take(8).sum();
    // idle and iowait are the 4th and 5th values.
    let idle = values.get(3)? + values.get(4).unwrap_or(&0.0);
    Some(MachineCpu {
        busy: (total - idle) / TICKS,
        total: total / TICKS,
    })
}

/// The 1-minute load average.
pub fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Logical CPUs.
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `process_cpu_seconds_total` and `process_resident_memory_bytes` of this
/// process, read from /proc each time metrics are gathered.
#[derive(Clone)]
pub struct ProcessCollector {
    cpu: Gauge,
    rss: IntGauge,
}

impl Default for ProcessCollector {
    fn default() -> Self {
        ProcessCollector {
            cpu: Gauge::new(
                "process_cpu_seconds_total",
                "User and system CPU time of the process, in seconds.",
            )
            .expect("valid gauge"),
            rss: IntGauge::new(
                "process_resident_memory_bytes",
                "Resident memory of the process, in bytes.",
            )
            .expect("valid gauge"),
        }
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.cpu.desc().into_iter().chain(self.rss.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(cpu) = cpu_seconds(None) {
            self.cpu.set(cpu);
        }
        if let Some(rss) = rss_bytes(std::process::id()) {
            self.rss.set(rss as i64);
        }
        self.cpu
            .collect()
            .into_iter()
            .chain(self.rss.collect())
            .collect()
    }
}

/// Reads `name`'s value from Prometheus text exposition (first sample, no labels).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_machine() {
        let before = cpu_seconds(None).expect("own cpu");
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_seconds(None).expect("own cpu") >= before);
        assert!(rss_bytes(std::process::id()).expect("own rss") > 1024 * 1024);
        let m = machine_cpu().expect("machine");
        assert!(m.total > 0.0 && m.busy <= m.total);
        assert!(loadavg().is_some());
        assert!(cpu_seconds(Some(u32::MAX)).is_none());
    }

    #[test]
    fn the_process_collector_exports_standard_metrics() {
        let registry = prometheus::Registry::new();
        registry
            .register(Box::new(ProcessCollector::default()))
            .expect("registers");
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut text,
        )
        .expect("encodes");
        let text = String::from_utf8(text).expect("utf-8");
        assert!(
            metric_value(&text, "process_cpu_seconds_total").is_some_and(|v| v >= 0.0),
            "{text}"
        );
        assert!(
            metric_value(&text, "process_resident_memory_bytes").is_some_and(|v| v > 1e6),
            "{text}"
        );
        assert_eq!(metric_value("# HELP x y\nx 3\nx_total 4\n", "x"), Some(3.0));
        assert_eq!(metric_value("x_total 4\n", "x"), None);
    }
}
