//! The report of a run: a terminal summary, JSON, and a self-contained HTML
//! page with charts of throughput and latency over time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::reconcile::Reconciliation;
use crate::scenario::Scenario;
use crate::stats::{Summary, Timeline};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Connections {
    pub target: u64,
    pub connected: u64,
    /// Failed connects, by class (refused, reset, timeout, handshake, closed:<reason>, …).
    pub errors: BTreeMap<String, u64>,
    /// Connections lost during the run, by class.
    pub disconnects: BTreeMap<String, u64>,
    pub connect_time: Summary,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Throughput {
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    /// Seconds from the end of warm-up to the last measured ack or delivery
    /// (at least the scenario's duration).
    pub seconds: f64,
    pub acked_per_s: f64,
    pub delivered_per_s: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Intended send time → ack.
    pub ack: Summary,
    /// Intended send time → received by a device.
    pub end_to_end: Summary,
}

/// What the numbers were taken under.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Conditions {
    pub cpus: usize,
    pub workers: u32,
    pub source_addresses: usize,
    /// CPU seconds used by the harness (all workers).
    pub harness_cpu_seconds: f64,
    /// Average cores the harness kept busy.
    pub harness_cores: f64,
    /// Average busy cores of the whole machine.
    pub machine_busy_cores: f64,
    /// Busy cores not explained by the harness (and the server, when its PID is known).
    pub other_load_cores: f64,
    pub loadavg_start: f64,
    pub loadavg_end: f64,
    /// Actual minus intended send time.
    pub client_lag: Summary,
    pub late_sends: u64,
    pub late_threshold_ms: u64,
    pub wall_seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerCost {
    /// `pid N` or the `/metrics` URL the readings came from.
    pub source: String,
    pub cpu_seconds: f64,
    pub cpu_us_per_delivered: Option<f64>,
    /// CPU over the measured sending window alone, and per delivery of a
    /// message sent in it.
    #[serde(default)]
    pub steady_cpu_seconds: Option<f64>,
    #[serde(default)]
    pub steady_cpu_us_per_delivered: Option<f64>,
    pub rss_start_bytes: u64,
    pub rss_connected_bytes: u64,
    pub rss_end_bytes: u64,
    pub rss_per_connection_bytes: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sdk {
    /// Wire duplicates (same mid again) that the SDK dropped before the application.
    pub wire_duplicates_dropped: u64,
    pub resends: u64,
    pub reconnects: u64,
    /// Sending devices' own messages back by sync or push, which answered
    /// their sends instead of being delivered.
    #[serde(default)]
    pub own_copies: u64,
    pub final_sync_errors: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Point {
    pub second: usize,
    pub sent: u64,
    pub acked: u64,
    pub received: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub kind: String,
    pub run: String,
    pub started_unix_ms: i64,
    pub server: String,
    pub scenario: Scenario,
    /// The number of the first simulated user.
    pub uid_base: u64,
    /// The first simulated user's id, `u-{uid_base}`.
    #[serde(default)]
    pub first_user: String,
    pub connections: Connections,
    pub throughput: Throughput,
    pub latency: Latency,
    pub reconciliation: Reconciliation,
    pub conditions: Conditions,
    pub server_cost: Option<ServerCost>,
    pub sdk: Sdk,
    pub timeline: Vec<Point>,
    pub clean: bool,
    pub problems: Vec<String>,
}

pub fn points(timeline: &Timeline) -> Vec<Point> {
    let ms = |us: u64| us as f64 / 1000.0;
    timeline
        .buckets
        .iter()
        .enumerate()
        .map(|(second, b)| {
            let s = b.e2e.summary();
            Point {
                second,
                sent: b.sent,
                acked: b.acked,
                received: b.received,
                errors: b.errors,
                p50_ms: ms(s.p50_us),
                p90_ms: ms(s.p90_us),
                p99_ms: ms(s.p99_us),
                max_ms: ms(s.max_us),
            }
        })
        .collect()
}

fn fmt_us(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2}s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{us}µs")
    }
}

fn in_store(known: Option<bool>) -> &'static str {
    match known {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    }
}

fn summary_line(s: &Summary) -> String {
    if s.count == 0 {
        return "no samples".into();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
        fmt_us(s.p50_us),
        fmt_us(s.p90_us),
        fmt_us(s.p99_us),
        fmt_us(s.p999_us),
        fmt_us(s.max_us),
        s.count
    )
}

impl Report {
    /// The terminal summary.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let s = &self.scenario;
        let _ = writeln!(
            o,
            "natter pressure {} — run {} against {}",
            self.kind, self.run, self.server
        );
        let _ = writeln!(
            o,
            "scenario: {} users × {} devices, {:?}, {}/s per user, {} B, warm-up {} ms, {} ms measured, drain {} ms, push-acks within {} ms",
            s.users, s.devices, s.pattern, s.rate, s.message_size, s.warmup_ms, s.duration_ms, s.drain_ms, s.push_ack_delay_ms
        );
        let c = &self.connections;
        let _ = writeln!(
            o,
            "connections: {}/{} up; connect {}",
            c.connected,
            c.target,
            summary_line(&c.connect_time)
        );
        if !c.errors.is_empty() {
            let _ = writeln!(o, "  connect errors: {:?}", c.errors);
        }
        if !c.disconnects.is_empty() {
            let _ = writeln!(o, "  disconnects: {:?}", c.disconnects);
        }
        let t = &self.throughput;
        let _ = writeln!(
            o,
            "throughput: {} sent, {} acked, {} delivered; {:.0} acked/s, {:.0} delivered/s over {:.1} s",
            t.sent, t.acked, t.delivered, t.acked_per_s, t.delivered_per_s, t.seconds
        );
        let _ = writeln!(o, "ack latency:        {}", summary_line(&self.latency.ack));
        let _ = writeln!(
            o,
            "end-to-end latency: {}",
            summary_line(&self.latency.end_to_end)
        );
        let r = &self.reconciliation;
        let _ = writeln!(
            o,
            "reconciliation: expected {} deliveries; lost {}, duplicates {}, reordered {}, unexpected {}, unacked sends {:?}, unacked but delivered {}, stale {}",
            r.expected, r.lost, r.duplicates, r.reordered, r.unexpected, r.unacked, r.unacked_delivered, r.stale
        );
        for m in &r.lost_examples {
            let _ = writeln!(
                o,
                "  lost: mid {} from {} (seq {}) to {}/p{} in {}; in store: {}",
                m.mid,
                m.sender,
                m.client_seq,
                m.uid,
                m.device,
                m.conversation,
                in_store(m.in_store)
            );
        }
        for u in &r.unexpected_examples {
            let origin = match u.origin {
                Some(o) => format!(
                    "from {}/p{} (seq {}, run {:016x})",
                    o.sender, o.device, o.client_seq, o.run
                ),
                None => "not a pressure message".into(),
            };
            let conversation = if u.conversation.is_empty() {
                "no send of this run"
            } else {
                &u.conversation
            };
            let _ = writeln!(
                o,
                "  unexpected: mid {} to {}/p{} {} in {}; in store: {}",
                u.mid,
                u.uid,
                u.device,
                origin,
                conversation,
                in_store(u.in_store)
            );
        }
        let k = &self.conditions;
        let _ = writeln!(
            o,
            "conditions: {} cpus; harness {:.2} cores ({:.1} cpu-s, {} workers); machine busy {:.2} cores, other load {:.2} cores; loadavg {:.2} → {:.2}",
            k.cpus, k.harness_cores, k.harness_cpu_seconds, k.workers, k.machine_busy_cores, k.other_load_cores, k.loadavg_start, k.loadavg_end
        );
        let _ = writeln!(
            o,
            "client lag: {}; {} sends later than {} ms",
            summary_line(&k.client_lag),
            k.late_sends,
            k.late_threshold_ms
        );
        if let Some(sc) = &self.server_cost {
            let per_msg = sc
                .cpu_us_per_delivered
                .map(|v| format!("{v:.1} µs"))
                .unwrap_or_else(|| "n/a".into());
            let per_conn = sc
                .rss_per_connection_bytes
                .map(|v| format!("{:.1} KiB", v / 1024.0))
                .unwrap_or_else(|| "n/a".into());
            let _ = writeln!(
                o,
                "server ({}): {:.2} cpu-s, {} cpu per delivered message{}; rss {:.1} → {:.1} → {:.1} MiB, {} per connection",
                sc.source,
                sc.cpu_seconds,
                per_msg,
                sc.steady_cpu_us_per_delivered
                    .map(|v| format!(" ({v:.1} µs while sending)"))
                    .unwrap_or_default(),
                sc.rss_start_bytes as f64 / 1048576.0,
                sc.rss_connected_bytes as f64 / 1048576.0,
                sc.rss_end_bytes as f64 / 1048576.0,
                per_conn
            );
        }
        let d = &self.sdk;
        let _ = writeln!(
            o,
            "sdk: {} wire duplicates dropped, {} resends, {} reconnects, {} own copies back, {} final sync errors",
            d.wire_duplicates_dropped, d.resends, d.reconnects, d.own_copies, d.final_sync_errors
        );
        let _ = writeln!(
            o,
            "verdict: {}",
            if self.clean {
                "CLEAN".to_string()
            } else {
                format!("FAILED: {}", self.problems.join("; "))
            }
        );
        o
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("report.json"), json)?;
        std::fs::write(dir.join("report.html"), self.html())?;
        std::fs::write(dir.join("summary.txt"), self.text())?;
        Ok(())
    }

    /// A self-contained page: no scripts, no external assets.
    pub fn html(&self) -> String {
        let mut o = String::new();
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let _ = write!(
            o,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>natter pressure run {run}</title><style>\
             body{{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}}\
             h1{{font-size:1.4em}} h2{{font-size:1.1em;margin-top:1.6em}}\
             table{{border-collapse:collapse}} td,th{{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}}\
             th{{text-align:left;font-weight:600}} .ok{{color:#16794a}} .bad{{color:#b3261e}}\
             .verdict{{font-size:1.2em;font-weight:700}} svg text{{font-size:11px;fill:#444}}\
             pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>",
            run = esc(&self.run)
        );
        let _ = write!(
            o,
            "<h1>natter pressure {} — run {}</h1>",
            esc(&self.kind),
            esc(&self.run)
        );
        let _ = write!(
            o,
            "<p class=\"verdict {}\">{}</p>",
            if self.clean { "ok" } else { "bad" },
            if self.clean {
                "Clean: nothing acked was lost or duplicated.".to_string()
            } else {
                esc(&self.problems.join("; "))
            }
        );
        let t = &self.throughput;
        let r = &self.reconciliation;
        let row = |o: &mut String, k: &str, v: String| {
            let _ = write!(o, "<tr><th>{}</th><td>{}</td></tr>", k, esc(&v));
        };
        o.push_str("<h2>Results</h2><table>");
        row(&mut o, "server", self.server.clone());
        row(
            &mut o,
            "connections",
            format!("{}/{}", self.connections.connected, self.connections.target),
        );
        row(
            &mut o,
            "sent / acked / delivered",
            format!("{} / {} / {}", t.sent, t.acked, t.delivered),
        );
        row(
            &mut o,
            "acked/s, delivered/s",
            format!("{:.0}, {:.0}", t.acked_per_s, t.delivered_per_s),
        );
        row(&mut o, "ack latency", summary_line(&self.latency.ack));
        row(
            &mut o,
            "end-to-end latency",
            summary_line(&self.latency.end_to_end),
        );
        row(
            &mut o,
            "connect time",
            summary_line(&self.connections.connect_time),
        );
        row(&mut o, "lost", r.lost.to_string());
        row(&mut o, "duplicates", r.duplicates.to_string());
        row(&mut o, "reordered", r.reordered.to_string());
        row(&mut o, "unexpected", r.unexpected.to_string());
        row(&mut o, "unacked sends", format!("{:?}", r.unacked));
        o.push_str("</table>");

        let xs: Vec<f64> = self.timeline.iter().map(|p| p.second as f64).collect();
        o.push_str("<h2>Throughput per second</h2>");
        o.push_str(&chart(
            &xs,
            &[
                (
                    "sent",
                    "#5470c6",
                    self.timeline.iter().map(|p| p.sent as f64).collect(),
                ),
                (
                    "acked",
                    "#91cc75",
                    self.timeline.iter().map(|p| p.acked as f64).collect(),
                ),
                (
                    "received",
                    "#ee6666",
                    self.timeline.iter().map(|p| p.received as f64).collect(),
                ),
            ],
            "messages/s",
        ));
        o.push_str("<h2>End-to-end latency per second</h2>");
        o.push_str(&chart(
            &xs,
            &[
                (
                    "p50",
                    "#5470c6",
                    self.timeline.iter().map(|p| p.p50_ms).collect(),
                ),
                (
                    "p90",
                    "#fac858",
                    self.timeline.iter().map(|p| p.p90_ms).collect(),
                ),
                (
                    "p99",
                    "#ee6666",
                    self.timeline.iter().map(|p| p.p99_ms).collect(),
                ),
                (
                    "max",
                    "#999999",
                    self.timeline.iter().map(|p| p.max_ms).collect(),
                ),
            ],
            "ms",
        ));
        let _ = write!(
            o,
            "<p>Second 0 is the start of sending; the first {} ms are warm-up and are not in the latency summaries.</p>",
            self.scenario.warmup_ms
        );
        o.push_str("<h2>Conditions</h2><pre>");
        o.push_str(&esc(&self.text()));
        o.push_str("</pre></body></html>\n");
        o
    }
}

/// A line chart as inline SVG.
fn chart(xs: &[f64], series: &[(&str, &str, Vec<f64>)], unit: &str) -> String {
    let (w, h, left, bottom, top, right) = (960.0, 280.0, 60.0, 30.0, 20.0, 110.0);
    let max_x = xs.iter().copied().fold(1.0, f64::max);
    let max_y = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.1;
    let sx = |x: f64| left + x / max_x * (w - left - right);
    let sy = |y: f64| h - bottom - y / max_y * (h - bottom - top);
    let mut o = format!("<svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" xmlns=\"http://www.w3.org/2000/svg\">");
    for i in 0..=4 {
        let y = max_y * f64::from(i) / 4.0;
        let py = sy(y);
        let _ = write!(
            o,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            w - right,
            left - 6.0,
            py + 4.0,
            if y >= 100.0 { format!("{y:.0}") } else { format!("{y:.2}") },
        );
    }
    let _ = write!(o, "<text x=\"{}\" y=\"{}\">{unit}</text>", left, top - 6.0);
    let _ = write!(
        o,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">seconds</text>",
        w - right,
        h - 6.0
    );
    for (i, (name, color, values)) in series.iter().enumerate() {
        let points: Vec<String> = xs
            .iter()
            .zip(values)
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = write!(
            o,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        let ly = top + 16.0 * i as f64 + 10.0;
        let _ = write!(
            o,
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{name}</text>",
            w - right + 12.0,
            ly - 3.0,
            w - right + 30.0,
            ly + 1.0
        );
    }
    o.push_str("</svg>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_render_in_every_form() {
        let mut timeline = Timeline::default();
        timeline.at(0).sent = 10;
        timeline.at(1500).e2e.record_us(2500);
        let origin = crate::reconcile::Origin {
            run: 0xab,
            sender: crate::user::SimUser(1),
            device: 0,
            client_seq: 2,
        };
        let report = Report {
            kind: "run".into(),
            run: "abc".into(),
            timeline: points(&timeline),
            clean: false,
            problems: vec!["1 lost <x>".into()],
            reconciliation: Reconciliation {
                lost: 1,
                lost_examples: vec![crate::reconcile::Missing {
                    mid: 100,
                    sender: crate::user::SimUser(1),
                    client_seq: 1,
                    uid: crate::user::SimUser(2),
                    device: 1,
                    conversation: "p:u-1:u-2".into(),
                    in_store: Some(false),
                }],
                unexpected: 1,
                unexpected_examples: vec![crate::reconcile::Unexpected {
                    uid: crate::user::SimUser(1),
                    device: 0,
                    mid: 101,
                    origin: Some(origin),
                    conversation: "p:u-1:u-2".into(),
                    in_store: Some(true),
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        let text = report.text();
        assert!(text.contains("FAILED: 1 lost <x>"));
        assert!(
            text.contains("lost: mid 100 from u-1 (seq 1) to u-2/p1 in p:u-1:u-2; in store: no"),
            "{text}"
        );
        assert!(
            text.contains(
                "unexpected: mid 101 to u-1/p0 from u-1/p0 (seq 2, run 00000000000000ab) in p:u-1:u-2; in store: yes"
            ),
            "{text}"
        );
        assert!(report.html().contains("unexpected: mid 101 to u-1/p0"));
        let html = report.html();
        assert!(html.contains("<svg") && html.contains("polyline"));
        assert!(html.contains("1 lost &lt;x&gt;"), "escaped");
        let dir = tempfile::tempdir().expect("tempdir");
        report.write(dir.path()).expect("written");
        let back: Report =
            serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).expect("read"))
                .expect("json");
        assert_eq!(back.timeline.len(), 2);
        assert_eq!(back.reconciliation, report.reconciliation);
        let json = std::fs::read_to_string(dir.path().join("report.json")).expect("read");
        assert!(
            json.contains(r#""uid": "u-2""#) || json.contains(r#""uid":"u-2""#),
            "{json}"
        );
        assert!(
            (2.49..2.51).contains(&back.timeline[1].p50_ms),
            "{}",
            back.timeline[1].p50_ms
        );
    }
}
