//! Orchestrates a run: plans it, runs the workers (in this process or as
//! child processes), shows live progress, samples the machine and the
//! server, reconciles and writes the report.

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::AsyncBufReadExt;

use crate::reconcile::{reconcile, Topology};
use crate::report::*;
use crate::scenario::Scenario;
use crate::user::SimUser;
use crate::worker::{self, Plan, Progress, WorkerResult};
use natter_node::process as system;

/// Environment variable carrying the secret to worker processes.
pub const SECRET_ENV: &str = "NATTER_PRESSURE_SECRET";

/// Where and how to run.
#[derive(Clone, Debug)]
pub struct Target {
    pub server: String,
    /// Where the HTTP API is (group scenarios create groups there); `None`: `server`.
    pub api: Option<String>,
    pub secret: Vec<u8>,
    pub report_dir: PathBuf,
    /// Where to read the server's CPU and memory from, if anywhere.
    pub server_probe: Option<ServerProbe>,
    pub quiet: bool,
    pub heartbeat_ms: Option<u64>,
}

/// A reading of the server's process.
#[derive(Clone, Copy, Debug)]
pub struct ServerSample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// Where the server's CPU time and memory come from: its process on this
/// machine, or its `/metrics` (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`) anywhere.
#[derive(Clone, Debug)]
pub enum ServerProbe {
    Pid(u32),
    Metrics(String),
}

impl std::fmt::Display for ServerProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerProbe::Pid(pid) => write!(f, "pid {pid}"),
            ServerProbe::Metrics(url) => f.write_str(url),
        }
    }
}

impl ServerProbe {
    pub async fn sample(&self) -> Option<ServerSample> {
        match self {
            ServerProbe::Pid(pid) => Some(ServerSample {
                cpu_seconds: system::cpu_seconds(Some(*pid))?,
                rss_bytes: system::rss_bytes(*pid)?,
            }),
            ServerProbe::Metrics(url) => {
                let text = reqwest::get(url).await.ok()?.text().await.ok()?;
                Some(ServerSample {
                    cpu_seconds: system::metric_value(&text, "process_cpu_seconds_total")?,
                    rss_bytes: system::metric_value(&text, "process_resident_memory_bytes")? as u64,
                })
            }
        }
    }
}

/// `run` (traffic and reconciliation) or `keep` (idle connections).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Run,
    Keep,
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

fn is_loopback(server: &str) -> bool {
    let host = server
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(server)
        .trim_matches(['[', ']']);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Live totals across workers.
#[derive(Default)]
struct Live {
    per_worker: Vec<Progress>,
}

impl Live {
    fn total(&self) -> Progress {
        let mut t = Progress::default();
        for p in &self.per_worker {
            t.connected += p.connected;
            t.sent += p.sent;
            t.acked += p.acked;
            t.received += p.received;
            t.errors += p.errors;
            t.window_p99_us = t.window_p99_us.max(p.window_p99_us);
        }
        t
    }
}

/// Runs the scenario and returns the report.
pub async fn execute(scenario: Scenario, target: Target, mode: Mode) -> anyhow::Result<Report> {
    scenario.validate().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&target.report_dir)
        .with_context(|| format!("creating report dir {}", target.report_dir.display()))?;
    let workers = scenario.worker_count();
    let sources = scenario.sources(is_loopback(&target.server));
    let run = random_u64();
    let uid_base = scenario
        .uid_base
        .unwrap_or(1_000_000_000 + random_u64() % 1_000_000_000_000);
    let connections = scenario.connections();
    let connect_secs = if scenario.connect_rate > 0 {
        connections as f64 / f64::from(scenario.connect_rate)
    } else {
        0.0
    };
    let now_ms = natter_node::ids::now_ms();
    let connect_at_ms = now_ms + 300;
    let send_at_ms = connect_at_ms + (connect_secs * 1000.0) as i64 + 1000;
    let total_ms = (send_at_ms - now_ms) as u64
        + scenario.warmup_ms
        + scenario.duration_ms
        + scenario.drain_ms;
    // Group traffic: the groups exist before anyone connects.
    let (groups, members) = create_groups(&scenario, &target, uid_base).await?;
    let plan = Plan {
        groups,
        run,
        server: target.server.clone(),
        scenario: scenario.clone(),
        uid_base,
        connect_at_ms,
        send_at_ms,
        index: 0,
        workers,
        sources: sources.clone(),
        seed: random_u64(),
        heartbeat_ms: target.heartbeat_ms,
    };

    let machine_start = system::machine_cpu();
    let load_start = system::loadavg().unwrap_or(0.0);
    let server_start = match &target.server_probe {
        Some(probe) => probe.sample().await,
        None => None,
    };
    let own_cpu_start = system::cpu_seconds(None).unwrap_or(0.0);
    let wall = Instant::now();

    let live = Arc::new(Mutex::new(Live {
        per_worker: vec![Progress::default(); workers as usize],
    }));
    let printer = tokio::spawn(print_progress(
        live.clone(),
        total_ms,
        target.quiet,
        connections,
    ));
    // Server memory once everyone is connected, just before sending.
    let server_connected = {
        let probe = target.server_probe.clone();
        let at = Duration::from_millis((send_at_ms - natter_node::ids::now_ms()).max(0) as u64);
        tokio::spawn(async move {
            tokio::time::sleep(at).await;
            match probe {
                Some(probe) => probe.sample().await,
                None => None,
            }
        })
    };

    // Server CPU over the measured sending window alone (no connects,
    // warm-up or final syncs): what steady traffic costs.
    let server_steady = {
        let probe = target.server_probe.clone();
        let from = send_at_ms + scenario.warmup_ms as i64;
        let to = from + scenario.duration_ms as i64;
        tokio::spawn(async move {
            let probe = probe?;
            let until =
                |at: i64| Duration::from_millis((at - natter_node::ids::now_ms()).max(0) as u64);
            tokio::time::sleep(until(from)).await;
            let start = probe.sample().await?;
            tokio::time::sleep(until(to)).await;
            let end = probe.sample().await?;
            Some(end.cpu_seconds - start.cpu_seconds)
        })
    };

    let mut merged = WorkerResult::default();
    if workers == 1 {
        let live = live.clone();
        merged = worker::run(plan, target.secret.clone(), move |p| {
            live.lock().unwrap_or_else(|e| e.into_inner()).per_worker[0] = p;
        })
        .await;
    } else {
        for result in run_processes(&plan, &target, live.clone()).await? {
            merged.merge(result);
        }
    }
    printer.abort();
    if !target.quiet && std::io::stderr().is_terminal() {
        eprintln!();
    }

    let wall_seconds = wall.elapsed().as_secs_f64();
    let harness_cpu = if workers == 1 {
        system::cpu_seconds(None).unwrap_or(0.0) - own_cpu_start
    } else {
        merged.cpu_seconds + system::cpu_seconds(None).unwrap_or(0.0) - own_cpu_start
    };
    let machine_busy = match (machine_start, system::machine_cpu()) {
        (Some(a), Some(b)) => (b.busy - a.busy) / wall_seconds.max(1e-9),
        _ => 0.0,
    };
    let server_end = match &target.server_probe {
        Some(probe) => probe.sample().await,
        None => None,
    };
    let server_connected = server_connected.await.ok().flatten();
    let server_steady = server_steady.await.ok().flatten();

    let topology: Topology = merged
        .devices
        .iter()
        .map(|(uid, d)| (*uid, d.clone()))
        .collect();
    let mut reconciliation = reconcile(&merged.ledger, run, &topology, &members);
    look_up_examples(&mut reconciliation, &target).await;
    // Rates over the time the measured work actually took: a server that
    // falls behind takes longer, and its rate says so.
    let measure_from_ns = (send_at_ms as u64 + scenario.warmup_ms) * 1_000_000;
    let window = |last_ns: u64| {
        (last_ns.saturating_sub(measure_from_ns) as f64 / 1e9)
            .max(scenario.duration_ms as f64 / 1000.0)
    };
    let ack_window = window(merged.last_ack_ns);
    let delivery_window = window(merged.last_delivery_ns);
    let measured_acked: u64 = merged.ack.len();
    let measured_delivered: u64 = merged.e2e.len();
    let mut problems = Vec::new();
    if reconciliation.lost > 0 {
        problems.push(format!("{} acked deliveries lost", reconciliation.lost));
    }
    if reconciliation.duplicates > 0 {
        problems.push(format!(
            "{} duplicate deliveries",
            reconciliation.duplicates
        ));
    }
    if reconciliation.unexpected > 0 {
        problems.push(format!(
            "{} deliveries of messages never sent",
            reconciliation.unexpected
        ));
    }
    if mode == Mode::Run && scenario.rate > 0.0 && reconciliation.acked == 0 {
        problems.push("no message was acked".into());
    }
    if merged.final_sync_errors > 0 {
        problems.push(format!(
            "{} devices failed their final sync, so their deliveries could not be verified",
            merged.final_sync_errors
        ));
    }
    if merged.devices.is_empty() {
        problems.push("no connection succeeded".into());
    }
    let connected: u64 = merged.devices.values().map(|d| d.len() as u64).sum();
    let server_cost = match (&target.server_probe, server_start, server_end) {
        (Some(probe), Some(start), Some(end)) => {
            let connected_rss = server_connected.map(|s| s.rss_bytes).unwrap_or(0);
            let cpu_seconds = end.cpu_seconds - start.cpu_seconds;
            Some(ServerCost {
                source: probe.to_string(),
                cpu_seconds,
                cpu_us_per_delivered: (reconciliation.delivered > 0)
                    .then(|| cpu_seconds * 1e6 / reconciliation.delivered as f64),
                steady_cpu_seconds: server_steady,
                steady_cpu_us_per_delivered: server_steady
                    .filter(|_| measured_delivered > 0)
                    .map(|cpu| cpu * 1e6 / measured_delivered as f64),
                rss_start_bytes: start.rss_bytes,
                rss_connected_bytes: connected_rss,
                rss_end_bytes: end.rss_bytes,
                rss_per_connection_bytes: (connected > 0 && connected_rss > 0)
                    .then(|| (connected_rss as f64 - start.rss_bytes as f64) / connected as f64),
            })
        }
        (Some(probe), _, _) => {
            tracing::warn!(%probe, "could not read the server's CPU and memory");
            None
        }
        _ => None,
    };
    let harness_cores = harness_cpu / wall_seconds.max(1e-9);
    let server_cores = server_cost
        .as_ref()
        .map(|s| s.cpu_seconds / wall_seconds.max(1e-9))
        .unwrap_or(0.0);
    let report = Report {
        kind: match mode {
            Mode::Run => "run".into(),
            Mode::Keep => "keep".into(),
        },
        run: format!("{run:016x}"),
        started_unix_ms: now_ms,
        server: target.server.clone(),
        scenario: scenario.clone(),
        uid_base,
        first_user: SimUser(uid_base).to_string(),
        connections: Connections {
            target: connections,
            connected,
            errors: merged.connect_errors.clone(),
            disconnects: merged.disconnects.clone(),
            connect_time: merged.connect.summary(),
        },
        throughput: Throughput {
            sent: reconciliation.sent,
            acked: reconciliation.acked,
            delivered: reconciliation.delivered,
            seconds: ack_window.max(delivery_window),
            acked_per_s: measured_acked as f64 / ack_window,
            delivered_per_s: measured_delivered as f64 / delivery_window,
        },
        latency: Latency {
            ack: merged.ack.summary(),
            end_to_end: merged.e2e.summary(),
        },
        conditions: Conditions {
            cpus: system::cpus(),
            workers,
            source_addresses: sources.len(),
            harness_cpu_seconds: harness_cpu,
            harness_cores,
            machine_busy_cores: machine_busy,
            other_load_cores: (machine_busy - harness_cores - server_cores).max(0.0),
            loadavg_start: load_start,
            loadavg_end: system::loadavg().unwrap_or(0.0),
            client_lag: merged.lag.summary(),
            late_sends: merged.late_sends,
            late_threshold_ms: scenario.late_ms,
            wall_seconds,
        },
        server_cost,
        sdk: Sdk {
            wire_duplicates_dropped: merged.wire_duplicates,
            resends: merged.resends,
            reconnects: merged.reconnects,
            own_copies: merged.own_copies,
            final_sync_errors: merged.final_sync_errors,
        },
        timeline: points(&merged.timeline),
        clean: problems.is_empty(),
        problems,
        reconciliation,
    };
    report
        .write(&target.report_dir)
        .with_context(|| format!("writing the report to {}", target.report_dir.display()))?;
    Ok(report)
}

/// Looks up each lost and unexpected example's mid in the server's store,
/// through the HTTP history of its conversation (as the receiver of a lost
/// one: its own copy), so that a failed run says whether the message was
/// stored at all. Works for either shape, given the API's address.
async fn look_up_examples(r: &mut crate::reconcile::Reconciliation, target: &Target) {
    if r.lost_examples.is_empty() && r.unexpected_examples.is_empty() {
        return;
    }
    let tokens = natter_roles::Tokens::new(target.secret.clone());
    let http = reqwest::Client::new();
    let api = target.api.as_deref().unwrap_or(&target.server);
    let look_up = |uid: SimUser, conversation: String, mid: u64| {
        let token = tokens.mint(&uid.id(), "pressure-check", 600);
        let http = http.clone();
        async move {
            if conversation.is_empty() {
                return None;
            }
            let response = http
                .get(format!(
                    "http://{api}/v1/conversations/{conversation}/messages"
                ))
                .query(&[("before", (mid + 1).to_string()), ("limit", "1".into())])
                .bearer_auth(token.ok()?)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?;
            if !response.status().is_success() {
                return None;
            }
            let page: natter_proto::api::HistoryPage = response.json().await.ok()?;
            Some(
                page.messages
                    .first()
                    .is_some_and(|m| m.mid == mid.to_string()),
            )
        }
    };
    for m in &mut r.lost_examples {
        m.in_store = look_up(m.uid, m.conversation.clone(), m.mid).await;
    }
    // As the sender, who is in the conversation whoever got it.
    for u in &mut r.unexpected_examples {
        let uid = u.origin.map(|o| o.sender).unwrap_or(u.uid);
        u.in_store = look_up(uid, u.conversation.clone(), u.mid).await;
    }
}

/// Creates the groups of a group scenario, each owned by its first user,
/// through the HTTP API; returns their ids in order and their members.
async fn create_groups(
    scenario: &Scenario,
    target: &Target,
    uid_base: u64,
) -> anyhow::Result<(Vec<u64>, crate::reconcile::Groups)> {
    let ranges = scenario.pattern.groups(scenario.users);
    if ranges.is_empty() {
        return Ok((Vec::new(), Default::default()));
    }
    let tokens = natter_roles::Tokens::new(target.secret.clone());
    let http = reqwest::Client::new();
    let mut ids = Vec::with_capacity(ranges.len());
    let mut members = crate::reconcile::Groups::new();
    for range in ranges {
        let uids: Vec<SimUser> = range.map(|u| SimUser(uid_base + u)).collect();
        let owner = uids[0];
        let token = tokens
            .mint(&owner.id(), "pressure-setup", 3600)
            .map_err(|e| anyhow::anyhow!("minting a token: {e}"))?;
        let request = natter_proto::api::CreateGroup {
            name: format!("pressure {owner}"),
            members: uids[1..].iter().map(|u| u.id()).collect(),
            ..Default::default()
        };
        let response = http
            .post(format!(
                "http://{}/v1/groups",
                target.api.as_deref().unwrap_or(&target.server)
            ))
            .bearer_auth(token)
            .json(&request)
            .send()
            .await
            .context("creating a group")?;
        let status = response.status();
        let body = response.text().await.context("reading the answer")?;
        if !status.is_success() {
            anyhow::bail!("creating a group of {} failed: {status} {body}", uids.len());
        }
        let view: natter_proto::api::GroupView =
            serde_json::from_str(&body).context("parsing the created group")?;
        ids.push(view.id);
        members.insert(view.id, uids);
    }
    Ok((ids, members))
}

async fn run_processes(
    plan: &Plan,
    target: &Target,
    live: Arc<Mutex<Live>>,
) -> anyhow::Result<Vec<WorkerResult>> {
    let exe = std::env::current_exe().context("locating the natter binary")?;
    let secret = String::from_utf8(target.secret.clone())
        .context("the secret must be text to pass to workers")?;
    let mut children = Vec::new();
    for index in 0..plan.workers {
        let plan = Plan {
            index,
            ..plan.clone()
        };
        let plan_path = target.report_dir.join(format!("worker-{index}.plan.json"));
        let out_path = target.report_dir.join(format!("worker-{index}.json"));
        std::fs::write(&plan_path, serde_json::to_vec(&plan)?)?;
        let mut child = tokio::process::Command::new(&exe)
            .args(["pressure", "worker", "--plan"])
            .arg(&plan_path)
            .arg("--out")
            .arg(&out_path)
            .env(SECRET_ENV, &secret)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let live = live.clone();
        let reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(p) = serde_json::from_str::<Progress>(&line) {
                    live.lock().unwrap_or_else(|e| e.into_inner()).per_worker[index as usize] = p;
                }
            }
        });
        children.push((child, reader, out_path));
    }
    let mut results = Vec::new();
    for (mut child, reader, out_path) in children {
        let status = child.wait().await?;
        let _ = reader.await;
        anyhow::ensure!(status.success(), "worker process failed: {status}");
        let bytes =
            std::fs::read(&out_path).with_context(|| format!("reading {}", out_path.display()))?;
        results.push(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", out_path.display()))?,
        );
    }
    Ok(results)
}

/// The body of `natter pressure worker`: runs one share and writes its result.
pub async fn worker_process(plan_path: &Path, out_path: &Path) -> anyhow::Result<()> {
    let plan: Plan =
        serde_json::from_slice(&std::fs::read(plan_path)?).context("parsing the plan")?;
    let secret = std::env::var(SECRET_ENV).context("the secret is passed in the environment")?;
    let result = worker::run(plan, secret.into_bytes(), |p| {
        if let Ok(line) = serde_json::to_string(&p) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    })
    .await;
    std::fs::write(out_path, serde_json::to_vec(&result)?)?;
    Ok(())
}

async fn print_progress(live: Arc<Mutex<Live>>, total_ms: u64, quiet: bool, target: u64) {
    if quiet {
        return;
    }
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last = Progress::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = live.lock().unwrap_or_else(|e| e.into_inner()).total();
        let elapsed = started.elapsed().as_millis() as u64;
        let fraction = (elapsed as f64 / total_ms.max(1) as f64).min(1.0);
        let width = 30;
        let filled = (fraction * width as f64) as usize;
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(width - filled));
        let line = format!(
            "[{bar}] {:>4}s  conns {}/{}  sent/s {}  recv/s {}  p99 {:.1}ms  errors {}",
            elapsed / 1000,
            now.connected,
            target,
            now.sent.saturating_sub(last.sent),
            now.received.saturating_sub(last.received),
            now.window_p99_us as f64 / 1000.0,
            now.errors
        );
        if tty {
            eprint!("\r{line}   ");
        } else if (elapsed / 1000).is_multiple_of(5) {
            eprintln!("{line}");
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1:3102"));
        assert!(is_loopback("localhost:1"));
        assert!(is_loopback("[::1]:80"));
        assert!(!is_loopback("10.0.0.1:3102"));
    }
}
