//! `natter`: parses the command line and configuration, builds the roles and
//! waits for shutdown. Everything else lives in the role crates.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use natter::{Role, Server};
use natter_node::Config;
use natter_roles::Tokens;

#[derive(Parser)]
#[command(
    name = "natter",
    version,
    about = "An instant-messaging backend and its load-testing harness."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role in one process: WebSocket /sub, HTTP API, /metrics and health checks on one address; the admin API on --admin-listen.
    Serve(AdminServeArgs),
    /// Run a gateway node: WebSocket /sub and health on --listen, the Gateway gRPC service on --rpc-listen; finds logic nodes in etcd.
    Comet(RoleArgs),
    /// Run a logic node: HTTP API and health on --listen, the Logic gRPC service on --rpc-listen, the admin API on --admin-listen; finds gateways in etcd.
    Logic(LogicArgs),
    /// Run a history node: the read side of the HTTP API (conversation history and sync) and health on --listen.
    Record(ServeArgs),
    /// Print a token for a user and device, signed with the server's secret.
    Token(TokenArgs),
    /// Drive a running natter with simulated users and measure it.
    #[command(subcommand)]
    Pressure(Box<natter_pressure::cli::PressureCommand>),
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML configuration file; NATTER_… environment variables override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for the database and the token secret [default: ./natter-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Address to listen on [default: 127.0.0.1:3102].
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
}

#[derive(clap::Args)]
struct RoleArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Address of the gRPC listener [default: 127.0.0.1:3202].
    #[arg(long, value_name = "ADDR")]
    rpc_listen: Option<std::net::SocketAddr>,
}

/// The admin API's listener, on the roles that serve it.
#[derive(clap::Args)]
struct AdminArgs {
    /// Address of the admin API's listener, for the operator's own servers
    /// [default: 127.0.0.1:3104].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<std::net::SocketAddr>,
}

#[derive(clap::Args)]
struct AdminServeArgs {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args)]
struct LogicArgs {
    #[command(flatten)]
    role: RoleArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args)]
struct TokenArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The user id: the account id of your app's user, 1-64 bytes of
    /// A-Z a-z 0-9 _ - . @ (compared byte for byte).
    #[arg(long, value_parser = parse_uid)]
    uid: natter_proto::UserId,
    /// The device id (1-64 printable characters, no spaces).
    #[arg(long)]
    device: String,
    /// Lifetime in seconds [default: auth.token_ttl_secs, 7 days].
    #[arg(long, value_name = "SECS")]
    ttl: Option<u64>,
}

fn parse_uid(s: &str) -> Result<natter_proto::UserId, String> {
    natter_proto::UserId::parse(s).map_err(|e| e.to_string())
}

fn load(args: &ConfigArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    Ok(config)
}

/// Loads and validates the configuration, then runs `role` until SIGINT/SIGTERM.
fn run(
    args: &ServeArgs,
    rpc_listen: Option<std::net::SocketAddr>,
    admin: Option<&AdminArgs>,
    role: Role,
) -> anyhow::Result<()> {
    let mut config = load(&args.config)?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(listen) = rpc_listen {
        config.rpc.listen = listen;
    }
    if let Some(listen) = admin.and_then(|a| a.admin_listen) {
        config.admin.listen = listen;
    }
    config.validate()?;
    natter_node::telemetry::init_logging(&config.log).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let server = Server::start_role(config, role).await?;
        server.run_until(natter_node::shutdown::signal()).await
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => run(&args.serve, None, Some(&args.admin), Role::Serve),
        Command::Comet(args) => run(&args.serve, args.rpc_listen, None, Role::Comet),
        Command::Logic(args) => run(
            &args.role.serve,
            args.role.rpc_listen,
            Some(&args.admin),
            Role::Logic,
        ),
        Command::Record(args) => run(&args, None, None, Role::Record),
        Command::Token(args) => {
            let config = load(&args.config)?;
            config.validate()?;
            let secret = config.secret().context("loading the token secret")?;
            let ttl = args.ttl.unwrap_or(config.auth.token_ttl_secs);
            let token = Tokens::new(secret)
                .mint(&args.uid, &args.device, ttl)
                .map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(())
        }
        Command::Pressure(command) => natter_pressure::cli::main(*command),
    }
}
