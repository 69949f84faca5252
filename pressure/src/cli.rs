//! The `natter pressure` subcommands.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context as _;

use crate::run::{execute, worker_process, Mode, ServerProbe, Target};
use crate::scenario::{parse_duration, Pattern, Scenario};

#[derive(clap::Subcommand)]
pub enum PressureCommand {
    /// Send chat traffic from simulated users, measure latency and reconcile acked against received.
    Run(Box<RunArgs>),
    /// Hold idle authenticated connections with heartbeats and measure what they cost the server.
    Keep(KeepArgs),
    /// One worker process of a run (started by `run` and `keep`).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

#[derive(clap::Args)]
pub struct TargetArgs {
    /// Address of a natter gateway.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:3102")]
    server: String,
    /// Address of the HTTP API, where group scenarios create their groups
    /// (a logic node in the distributed shape) [default: --server].
    #[arg(long, value_name = "HOST:PORT")]
    api: Option<String>,
    /// The server's data dir; the token secret is read from DIR/secret.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The token secret itself (instead of --data-dir).
    #[arg(long, value_name = "SECRET")]
    secret: Option<String>,
    /// Where report.json, report.html and summary.txt are written.
    #[arg(long, value_name = "OUT", default_value = "pressure-report")]
    report_dir: PathBuf,
    /// PID of the server process (on this machine), to report its CPU per message and memory per connection.
    #[arg(long, value_name = "PID", conflicts_with = "server_metrics")]
    server_pid: Option<u32>,
    /// The server's /metrics URL, for the same readings from a server elsewhere.
    #[arg(long, value_name = "URL")]
    server_metrics: Option<String>,
    /// No live progress.
    #[arg(long)]
    quiet: bool,
}

impl TargetArgs {
    fn target(&self, heartbeat_ms: Option<u64>) -> anyhow::Result<Target> {
        let secret = match (&self.secret, &self.data_dir) {
            (Some(secret), _) => secret.as_bytes().to_vec(),
            (None, Some(dir)) => natter_node::config::read_secret(dir)?,
            (None, None) => {
                anyhow::bail!("give the server's --data-dir or its --secret to mint tokens")
            }
        };
        Ok(Target {
            server: self.server.clone(),
            api: self.api.clone(),
            secret,
            report_dir: self.report_dir.clone(),
            server_probe: match (self.server_pid, &self.server_metrics) {
                (Some(pid), _) => Some(ServerProbe::Pid(pid)),
                (None, Some(url)) => Some(ServerProbe::Metrics(url.clone())),
                (None, None) => None,
            },
            quiet: self.quiet,
            heartbeat_ms,
        })
    }
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// A TOML scenario file; flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    scenario: Option<PathBuf>,
    /// Simulated users [default: 100].
    #[arg(long)]
    users: Option<u64>,
    /// Devices per user; the first one sends [default: 1].
    #[arg(long)]
    devices: Option<u32>,
    /// New connections per second, 0 for no limit [default: 2000].
    #[arg(long)]
    connect_rate: Option<u32>,
    /// random (random receiver per message), fixed (fixed pairs) or group
    /// (groups of --group-size users, --group-senders of them sending) [default: random].
    #[arg(long, value_name = "PATTERN")]
    pattern: Option<String>,
    /// Members per group with --pattern group [default: 100].
    #[arg(long)]
    group_size: Option<u64>,
    /// Users per group who send, with --pattern group [default: 1].
    #[arg(long)]
    group_senders: Option<u64>,
    /// Messages per second per user [default: 1].
    #[arg(long)]
    rate: Option<f64>,
    /// Message payload size in bytes [default: 64].
    #[arg(long, value_name = "BYTES")]
    size: Option<usize>,
    /// Warm-up before measuring, e.g. 1s [default: 1s].
    #[arg(long, value_parser = parse_duration)]
    warmup: Option<std::time::Duration>,
    /// Measured sending time, e.g. 5s or 2m [default: 5s].
    #[arg(long, value_parser = parse_duration)]
    duration: Option<std::time::Duration>,
    /// Wait after sending before the final sync [default: 2s].
    #[arg(long, value_parser = parse_duration)]
    drain: Option<std::time::Duration>,
    /// Number of the first user: the users are u-N, u-(N+1), … [default:
    /// random, so each run has fresh users].
    #[arg(long, visible_alias = "first-user", value_name = "N")]
    uid_base: Option<u64>,
    /// Worker processes [default: one per 15,000 connections].
    #[arg(long)]
    workers: Option<u32>,
    /// Source address for client sockets; repeat to spread over several.
    #[arg(long = "source-ip", value_name = "IP")]
    source_ips: Vec<IpAddr>,
    /// A send this far behind schedule counts as late, in ms [default: 10].
    #[arg(long)]
    late_ms: Option<u64>,
    /// SDK reply time-out before a resend, e.g. 5s [default: 5s].
    #[arg(long, value_parser = parse_duration)]
    ack_timeout: Option<std::time::Duration>,
    /// How long the SDK may wait before acknowledging pushes (one ack
    /// covers every push before it), e.g. 200ms; 0 acks each at once
    /// [default: 1s].
    #[arg(long, value_parser = parse_duration)]
    push_ack_delay: Option<std::time::Duration>,
}

impl RunArgs {
    fn scenario(&self) -> anyhow::Result<Scenario> {
        let mut s = match &self.scenario {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => Scenario::default(),
        };
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        if let Some(v) = self.users {
            s.users = v;
        }
        if let Some(v) = self.devices {
            s.devices = v;
        }
        if let Some(v) = self.connect_rate {
            s.connect_rate = v;
        }
        if let Some(p) = &self.pattern {
            s.pattern = match p.as_str() {
                "random" | "random_pairs" => Pattern::RandomPairs,
                "fixed" | "fixed_pairs" => Pattern::FixedPairs,
                "group" => Pattern::Group {
                    size: 100,
                    senders: 1,
                },
                other => anyhow::bail!("unknown pattern {other:?}: random, fixed or group"),
            };
        }
        if let Pattern::Group { size, senders } = &mut s.pattern {
            if let Some(v) = self.group_size {
                *size = v;
            }
            if let Some(v) = self.group_senders {
                *senders = v;
            }
        } else if self.group_size.is_some() || self.group_senders.is_some() {
            anyhow::bail!("--group-size and --group-senders go with --pattern group");
        }
        if let Some(v) = self.rate {
            s.rate = v;
        }
        if let Some(v) = self.size {
            s.message_size = v;
        }
        if let Some(v) = self.warmup {
            s.warmup_ms = ms(v);
        }
        if let Some(v) = self.duration {
            s.duration_ms = ms(v);
        }
        if let Some(v) = self.drain {
            s.drain_ms = ms(v);
        }
        if self.uid_base.is_some() {
            s.uid_base = self.uid_base;
        }
        if let Some(v) = self.workers {
            s.workers = v;
        }
        if !self.source_ips.is_empty() {
            s.source_ips = self.source_ips.clone();
        }
        if let Some(v) = self.late_ms {
            s.late_ms = v;
        }
        if let Some(v) = self.ack_timeout {
            s.ack_timeout_ms = ms(v);
        }
        if let Some(v) = self.push_ack_delay {
            s.push_ack_delay_ms = ms(v);
        }
        s.validate().map_err(anyhow::Error::msg)?;
        Ok(s)
    }
}

#[derive(clap::Args)]
pub struct KeepArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Connections to hold.
    #[arg(long, default_value_t = 1000)]
    users: u64,
    /// How long to hold them, e.g. 30s.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: std::time::Duration,
    /// New connections per second, 0 for no limit.
    #[arg(long, default_value_t = 2000)]
    connect_rate: u32,
    /// Client heartbeat interval, e.g. 10s [default: what the server asks for].
    #[arg(long, value_parser = parse_duration)]
    heartbeat: Option<std::time::Duration>,
    /// Worker processes [default: one per 15,000 connections].
    #[arg(long)]
    workers: Option<u32>,
    /// Source address for client sockets; repeat to spread over several.
    #[arg(long = "source-ip", value_name = "IP")]
    source_ips: Vec<IpAddr>,
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    plan: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Runs a pressure subcommand; the process exit code is 1 when the run was not clean.
pub fn main(command: PressureCommand) -> anyhow::Result<()> {
    match command {
        PressureCommand::Run(args) => {
            let scenario = args.scenario()?;
            let target = args.target.target(None)?;
            let report = runtime()?.block_on(execute(scenario, target.clone(), Mode::Run))?;
            finish(&report, &target)
        }
        PressureCommand::Keep(args) => {
            let scenario = Scenario {
                users: args.users,
                devices: 1,
                connect_rate: args.connect_rate,
                rate: 0.0,
                warmup_ms: 0,
                duration_ms: args.duration.as_millis().max(1) as u64,
                drain_ms: 0,
                workers: args.workers.unwrap_or(0),
                source_ips: args.source_ips.clone(),
                ..Scenario::default()
            };
            let target = args
                .target
                .target(args.heartbeat.map(|d| d.as_millis() as u64))?;
            let report = runtime()?.block_on(execute(scenario, target.clone(), Mode::Keep))?;
            finish(&report, &target)
        }
        PressureCommand::Worker(args) => runtime()?.block_on(worker_process(&args.plan, &args.out)),
    }
}

fn finish(report: &crate::report::Report, target: &Target) -> anyhow::Result<()> {
    print!("{}", report.text());
    println!("reports: {}", target.report_dir.display());
    if !report.clean {
        std::process::exit(1);
    }
    Ok(())
}
