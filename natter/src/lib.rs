//! The one natter binary's library half: assembling roles into a running
//! process. [`Server`] is the embedded shape — every role in one process,
//! SQLite under the data dir, sessions in memory — used by `natter serve`
//! and by the end-to-end tests.

pub mod admin;
pub mod conversations;
mod http;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use natter_comet::Comet;
use natter_group::mysql::MySqlGroupStore;
use natter_group::sqlite::SqliteGroupStore;
use natter_group::{GroupStore, Groups};
use natter_logic::redis_sessions::RedisDirectory;
use natter_logic::SessionDirectory;
use natter_logic::{
    Auth, Fanout, GroupPublisher, Logic, LogicParts, LogicService, MemoryDirectory, Tokens,
};
use natter_node::discovery::{self, Etcd, Registration};
use natter_node::ids::MidGenerator;
use natter_node::telemetry::{health_router, watch_dependencies, Dependency, Readiness};
use natter_node::{Config, Shutdown};
use natter_record::mysql::{MySqlOptions, MySqlStore};
use natter_record::sqlite::{SqliteOptions, SqliteStore};
use natter_record::{Committer, MessageStore};
use prometheus::Registry;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How often `/readyz` and `natter_dependency_up` re-check the store,
/// the group store and Redis.
const DEPENDENCY_CHECK_EVERY: Duration = Duration::from_secs(1);

struct StoreCheck(Arc<dyn MessageStore>);
struct GroupStoreCheck(Arc<dyn GroupStore>);
struct RedisCheck(Arc<RedisDirectory>);

#[async_trait::async_trait]
impl Dependency for StoreCheck {
    fn name(&self) -> &'static str {
        "store"
    }
    async fn check(&self) -> Result<(), String> {
        self.0.ping().await.map_err(|e| e.to_string())
    }
}

#[async_trait::async_trait]
impl Dependency for GroupStoreCheck {
    fn name(&self) -> &'static str {
        "group_store"
    }
    async fn check(&self) -> Result<(), String> {
        self.0.ping().await.map_err(|e| e.to_string())
    }
}

#[async_trait::async_trait]
impl Dependency for RedisCheck {
    fn name(&self) -> &'static str {
        "redis"
    }
    async fn check(&self) -> Result<(), String> {
        self.0.ping().await.map_err(|e| e.to_string())
    }
}

/// etcd answers and this node's lease is still held.
struct EtcdCheck(Etcd, Arc<Registration>);

#[async_trait::async_trait]
impl Dependency for EtcdCheck {
    fn name(&self) -> &'static str {
        "etcd"
    }
    async fn check(&self) -> Result<(), String> {
        self.0.status().await.map_err(|e| e.to_string())?;
        if self.1.alive() {
            Ok(())
        } else {
            Err("this node's lease was lost".into())
        }
    }
}

/// A random node name, for nodes not given one.
fn random_node_name() -> String {
    let mut bytes = [0u8; 6];
    let _ = getrandom::fill(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("natter-{hex}")
}

/// Opens the stores and builds logic: the part of a process that serves
/// the message pipeline, groups and the HTTP API.
async fn start_logic(
    config: &Config,
    worker: u16,
    registry: &Registry,
    stop: &Shutdown,
    dependencies: &mut Vec<Arc<dyn Dependency>>,
) -> anyhow::Result<LogicHalf> {
    let secret = config.secret().context("loading the token secret")?;
    let acquire = Duration::from_millis(config.store.acquire_timeout_ms);
    let store: Arc<dyn MessageStore> = if config.store.mysql_url.is_empty() {
        let db = config.data_dir.join("natter.db");
        let options = SqliteOptions {
            synchronous: config.store.synchronous,
            readers: config.store.readers,
            acquire_timeout: acquire,
        };
        Arc::new(
            SqliteStore::open(&db, &options)
                .await
                .with_context(|| format!("opening {}", db.display()))?,
        )
    } else {
        let options = MySqlOptions {
            max_connections: config.store.mysql_max_connections,
            acquire_timeout: acquire,
        };
        Arc::new(
            MySqlStore::connect(&config.store.mysql_url, &options)
                .await
                .context("connecting to MySQL (store.mysql_url)")?,
        )
    };
    let group_store: Arc<dyn GroupStore> = if config.store.mysql_url.is_empty() {
        let group_db = config.data_dir.join("groups.db");
        Arc::new(
            SqliteGroupStore::open(&group_db, config.store.synchronous)
                .await
                .with_context(|| format!("opening {}", group_db.display()))?,
        )
    } else {
        Arc::new(
            MySqlGroupStore::connect(
                &config.store.mysql_url,
                config.store.mysql_max_connections,
                acquire,
            )
            .await
            .context("connecting to MySQL for groups (store.mysql_url)")?,
        )
    };
    dependencies.push(Arc::new(StoreCheck(store.clone())));
    dependencies.push(Arc::new(GroupStoreCheck(group_store.clone())));
    let (committer, committer_task) = Committer::start(
        store.clone(),
        config.store.batch_max,
        config.store.queue,
        registry,
        stop.clone(),
    );
    // Group read cursors of an older version move to the message store.
    let imported = natter_logic::conversations::import_legacy_reads(&*group_store, &committer)
        .await
        .map_err(|e| anyhow::anyhow!("importing group read cursors: {}", e.message))?;
    if imported > 0 {
        tracing::info!(imported, "group read cursors moved to the message store");
    }
    // Sessions: in memory, or in Redis when configured.
    let directory: Arc<dyn SessionDirectory> = if config.sessions.redis_url.is_empty() {
        Arc::new(MemoryDirectory::default())
    } else {
        let redis = Arc::new(
            RedisDirectory::new(
                &config.sessions.redis_url,
                &config.sessions.redis_username,
                config.sessions.redis_password.expose(),
                &config.sessions.key_prefix,
                Duration::from_millis(config.sessions.ttl_ms),
                Duration::from_millis(config.sessions.timeout_ms),
            )
            .map_err(|e| anyhow::anyhow!("sessions.redis_url: {e}"))?,
        );
        dependencies.push(Arc::new(RedisCheck(redis.clone())));
        redis
    };
    let verify = natter_logic::VerifyUrl::from_config(&config.auth, registry)
        .map_err(|e| anyhow::anyhow!("auth.verify_url: {e}"))?
        .map(Arc::new);
    let auth = Arc::new(
        Auth::new(Tokens::new(secret.clone()), verify, registry).with_logouts(store.clone()),
    );
    let ids = Arc::new(MidGenerator::new(worker).map_err(anyhow::Error::msg)?);
    let fanout = Arc::new(Fanout::new(
        directory,
        Duration::from_millis(config.groups.push_window_ms),
        registry,
    ));
    let publisher = GroupPublisher::new(committer.clone(), ids.clone(), fanout.clone(), registry);
    let groups = Groups::new(
        group_store,
        store.clone(),
        Arc::new(publisher),
        config.groups.clone(),
    );
    // SQLite files belong to this process alone.
    let groups = Arc::new(if config.store.mysql_url.is_empty() {
        groups.sole_writer()
    } else {
        groups
    });
    let logic = Arc::new(Logic::new(
        LogicParts {
            auth: auth.clone(),
            fanout,
            store: store.clone(),
            committer,
            ids,
            groups: groups.clone(),
            conversations: config.conversations.clone(),
        },
        &config.limits,
        registry,
    ));
    let retention = (config.store.retention_days > 0).then(|| {
        let age = Duration::from_secs(u64::from(config.store.retention_days) * 86_400);
        tokio::spawn(natter_record::retention::run(
            store.clone(),
            age,
            Duration::from_secs(600),
            stop.clone(),
        ))
    });
    Ok(LogicHalf {
        logic,
        store,
        groups,
        auth,
        auth_secret: secret,
        committer_task,
        retention,
    })
}

/// Keeps logic's gateways in step with the gateway nodes in etcd: a
/// [`natter_rpc::RemoteGateway`] per live node, dropped when it leaves.
async fn follow_gateways(
    mut members: discovery::Members,
    logic: Arc<Logic>,
    timeout: Duration,
    plane: natter_rpc::PlaneKey,
    stop: Shutdown,
) {
    let mut attached: std::collections::HashMap<String, String> = Default::default();
    loop {
        let now = members.now();
        for node in &now {
            if attached.get(&node.node) != Some(&node.addr) {
                match natter_rpc::RemoteGateway::new(&node.addr, timeout, &plane) {
                    Ok(gateway) => {
                        logic.attach_gateway(&node.node, Arc::new(gateway));
                        attached.insert(node.node.clone(), node.addr.clone());
                        tracing::info!(node = %node.node, addr = %node.addr, "gateway joined");
                    }
                    Err(e) => tracing::warn!(node = %node.node, error = %e, "bad gateway address"),
                }
            }
        }
        let gone: Vec<String> = attached
            .keys()
            .filter(|n| !now.iter().any(|m| &m.node == *n))
            .cloned()
            .collect();
        for node in gone {
            logic.detach_gateway(&node);
            attached.remove(&node);
            tracing::info!(%node, "gateway left");
        }
        tokio::select! {
            changed = members.changed() => if changed.is_none() { return },
            _ = stop.cancelled() => return,
        }
    }
}

/// Routes of the HTTP API, for checking the OpenAPI document against.
pub fn http_routes() -> Vec<(&'static str, &'static str)> {
    [
        natter_comet::ROUTES,
        natter_record::http::ROUTES,
        natter_group::http::ROUTES,
        conversations::ROUTES,
        natter_node::telemetry::ROUTES,
    ]
    .concat()
}

/// Routes of the admin API (on its own listener), for checking the OpenAPI
/// document against.
pub fn admin_routes() -> Vec<(&'static str, &'static str)> {
    admin::ROUTES.to_vec()
}

/// What a process runs: every role (the embedded shape), or one role of
/// the distributed shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Gateway, logic and the HTTP API in one process.
    Serve,
    /// The gateway: WebSocket `/sub`, and the Gateway gRPC service.
    Comet,
    /// Logic and storage: the HTTP API, and the Logic gRPC service.
    Logic,
    /// The read side of the HTTP API: conversation history and sync.
    Record,
}

impl Role {
    /// The role's name in discovery.
    pub fn name(self) -> &'static str {
        match self {
            Role::Serve => "serve",
            Role::Comet => "comet",
            Role::Logic => "logic",
            Role::Record => "record",
        }
    }

    fn runs_logic(self) -> bool {
        self != Role::Comet
    }

    fn runs_gateway(self) -> bool {
        matches!(self, Role::Serve | Role::Comet)
    }

    fn serves_rpc(self) -> bool {
        matches!(self, Role::Comet | Role::Logic)
    }

    /// The roles that send messages and change groups serve the admin API.
    fn serves_admin(self) -> bool {
        matches!(self, Role::Serve | Role::Logic)
    }
}

/// Open connections on the admin listener at most: the operator's own
/// servers, a few pools of them.
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// A running natter process (of any [`Role`]).
pub struct Server {
    addr: SocketAddr,
    rpc_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    worker: u16,
    shutdown: Shutdown,
    task: JoinHandle<anyhow::Result<()>>,
}

/// The logic half of a process.
struct LogicHalf {
    logic: Arc<Logic>,
    store: Arc<dyn MessageStore>,
    groups: Arc<Groups>,
    /// Who tokens name: natter's own, then the account service.
    auth: Arc<Auth>,
    /// Logic's session grants are signed with a key derived from it.
    auth_secret: Vec<u8>,
    committer_task: JoinHandle<()>,
    retention: Option<JoinHandle<()>>,
}

impl Server {
    /// The embedded shape: validates `config`, opens the stores, binds the
    /// listener and serves every role.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        Server::start_role(config, Role::Serve).await
    }

    /// Starts `role`. The distributed roles register in etcd (required):
    /// a gateway finds logic nodes there and logic nodes find gateways.
    pub async fn start_role(config: Config, role: Role) -> anyhow::Result<Server> {
        config.validate()?;
        if role != Role::Serve && config.discovery.etcd_url.is_empty() {
            anyhow::bail!(
                "natter {} needs discovery.etcd_url: nodes find each other in etcd",
                role.name()
            );
        }
        if matches!(role, Role::Logic | Role::Record) && config.auth.secret.is_empty() {
            anyhow::bail!(
                "natter {} needs auth.secret: every node that checks tokens checks the same ones",
                role.name()
            );
        }
        // Calls between roles are signed with the cluster secret.
        let plane = if role.serves_rpc() {
            if config.rpc.secret.is_empty() {
                anyhow::bail!(
                    "natter {} needs rpc.secret: every call between comet and logic nodes is signed with it",
                    role.name()
                );
            }
            Some(natter_rpc::PlaneKey::new(
                config.rpc.secret.expose().trim().as_bytes(),
                Duration::from_millis(config.rpc.max_clock_skew_ms),
            ))
        } else {
            None
        };
        natter_node::private::create_private_dir(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        // Bound first: the addresses are what this node registers under.
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        let rpc_listener = if !role.serves_rpc() {
            None
        } else {
            Some(
                TcpListener::bind(config.rpc.listen)
                    .await
                    .with_context(|| format!("binding {}", config.rpc.listen))?,
            )
        };
        let rpc_addr = rpc_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        // The admin key is read (or made) before anything registers: a
        // refused key file stops the node first.
        let admin_listener = if !role.serves_admin() {
            None
        } else {
            let key = config.admin_key().context("loading the admin key")?;
            let listener = TcpListener::bind(config.admin.listen)
                .await
                .with_context(|| format!("binding {} (admin.listen)", config.admin.listen))?;
            Some((listener, key))
        };
        let admin_addr = admin_listener
            .as_ref()
            .map(|(l, _)| l.local_addr())
            .transpose()?;
        // Discovery: register in etcd and take a worker id no live node has.
        let registration = if config.discovery.etcd_url.is_empty() {
            None
        } else {
            let d = &config.discovery;
            let etcd = Etcd::new(&d.etcd_url, Duration::from_millis(d.timeout_ms))
                .map_err(|e| anyhow::anyhow!("discovery.etcd_url: {e}"))?
                .with_credentials(&d.username, d.password.expose());
            // Comet and logic nodes follow each other: only sealed entries.
            let etcd = if role.serves_rpc() {
                etcd.with_seal(config.rpc.secret.expose().trim().as_bytes())
            } else {
                etcd
            };
            let node = if d.node.is_empty() {
                random_node_name()
            } else {
                d.node.clone()
            };
            let advertise = if !d.advertise.is_empty() {
                d.advertise.clone()
            } else {
                rpc_addr.unwrap_or(addr).to_string()
            };
            let registration = discovery::register(
                &etcd,
                &d.prefix,
                role.name(),
                &node,
                &advertise,
                Duration::from_secs(d.ttl_secs),
            )
            .await
            .with_context(|| format!("registering in etcd at {}", d.etcd_url))?;
            Some((etcd, Arc::new(registration)))
        };
        let worker = registration
            .as_ref()
            .map(|(_, r)| r.info().worker)
            .unwrap_or(0);
        let node_name: Arc<str> = registration
            .as_ref()
            .map(|(_, r)| Arc::from(r.info().node.as_str()))
            .unwrap_or_else(|| Arc::from("local"));

        let registry = Registry::new();
        natter_node::telemetry::register(
            &registry,
            natter_node::process::ProcessCollector::default(),
        );
        let shutdown = Shutdown::new();
        // The committer and the background loops outlive the connections:
        // they stop only after the connections drained.
        let background_stop = Shutdown::new();
        let mut dependencies: Vec<Arc<dyn Dependency>> = Vec::new();
        if let Some((etcd, registration)) = &registration {
            dependencies.push(Arc::new(EtcdCheck(etcd.clone(), registration.clone())));
        }
        let rpc_timeout = Duration::from_millis(config.rpc.timeout_ms);

        let logic_half = if role.runs_logic() {
            Some(
                start_logic(
                    &config,
                    worker,
                    &registry,
                    &background_stop,
                    &mut dependencies,
                )
                .await?,
            )
        } else {
            None
        };
        // Logic nodes follow the gateways, to push to them.
        let gateways_watch = match (&registration, &logic_half, &plane, role) {
            (Some((etcd, _)), Some(half), Some(plane), Role::Logic) => {
                let (members, task) = discovery::watch_role(
                    etcd.clone(),
                    &config.discovery.prefix,
                    Role::Comet.name(),
                    background_stop.clone(),
                );
                Some((
                    task,
                    tokio::spawn(follow_gateways(
                        members,
                        half.logic.clone(),
                        rpc_timeout,
                        plane.clone(),
                        background_stop.clone(),
                    )),
                ))
            }
            _ => None,
        };

        let comet = if role.runs_gateway() {
            let logic: Arc<dyn LogicService> = match (&logic_half, &registration, &plane) {
                (Some(half), _, _) => half.logic.clone(),
                (None, Some((etcd, _)), Some(plane)) => {
                    let (members, _task) = discovery::watch_role(
                        etcd.clone(),
                        &config.discovery.prefix,
                        Role::Logic.name(),
                        background_stop.clone(),
                    );
                    let targets: natter_rpc::Targets =
                        Arc::new(move || members.now().into_iter().map(|n| n.addr).collect());
                    Arc::new(natter_rpc::RemoteLogic::new(
                        targets,
                        rpc_timeout,
                        plane.clone(),
                    ))
                }
                _ => unreachable!("validated: a gateway alone has discovery and rpc.secret"),
            };
            let comet = Comet::new(
                &node_name,
                config.comet.clone(),
                logic,
                &registry,
                shutdown.clone(),
            );
            if let Some(half) = &logic_half {
                half.logic
                    .attach_gateway(&node_name, Arc::new(comet.clone()));
            }
            Some(comet)
        } else {
            None
        };

        let ready = Readiness::default();
        let watcher = tokio::spawn({
            let (ready, registry, stop) =
                (ready.clone(), registry.clone(), background_stop.clone());
            async move {
                watch_dependencies(dependencies, DEPENDENCY_CHECK_EVERY, ready, &registry, stop)
                    .await
            }
        });
        let renewal = comet.as_ref().map(|comet| {
            tokio::spawn(
                comet
                    .clone()
                    .renew_sessions(Duration::from_millis(config.sessions.ttl_ms / 3)),
            )
        });
        let resends = comet
            .as_ref()
            .map(|comet| tokio::spawn(comet.clone().resend_pushes()));

        let mut app = Router::new();
        if let Some(comet) = &comet {
            app = app.merge(comet.router());
        }
        if let Some(half) = &logic_half {
            // One request limit per user across every route of the API.
            let auth: Arc<dyn natter_roles::Authenticate> =
                Arc::new(natter_record::http::RateLimitedAuth::new(
                    half.auth.clone(),
                    config.limits.http_requests_per_sec,
                    config.limits.http_request_burst,
                ));
            app = app.merge(natter_record::http::router(
                half.store.clone(),
                auth.clone(),
                half.groups.clone(),
                config.limits.page_bytes,
            ));
            // Group changes and reads publish to gateways: not from a record node.
            if role != Role::Record {
                app = app.merge(natter_group::http::router(
                    half.groups.clone(),
                    auth.clone(),
                ));
                app = app.merge(conversations::router(half.logic.clone(), auth));
            }
        }
        let http_metrics = http::Metrics::new(&registry);
        // The admin API: its own listener, the key in front of every route.
        let admin = match (admin_listener, &logic_half) {
            (Some((listener, key)), Some(half)) => {
                let system_sender = natter_proto::UserId::parse(&config.admin.system_sender)
                    .map_err(|e| anyhow::anyhow!("admin.system_sender: {e}"))?;
                let admin = admin::Admin {
                    key: admin::AdminKey::new(&key),
                    logic: half.logic.clone(),
                    auth: half.auth.clone(),
                    groups: half.groups.clone(),
                    tokens: Tokens::new(half.auth_secret.clone()),
                    max_ttl_secs: config.auth.token_ttl_secs,
                    system_sender,
                };
                Some((listener, admin::router(Arc::new(admin))))
            }
            _ => None,
        };
        let app = app
            .merge(health_router(registry, ready.clone()))
            .fallback(|| async {
                (
                    StatusCode::NOT_FOUND,
                    axum::Json(
                        serde_json::json!({"code": "not_found", "message": "no such route"}),
                    ),
                )
                    .into_response()
            });

        // The role's gRPC service.
        let rpc_stop = Shutdown::new();
        let rpc = match (rpc_listener, &plane) {
            (Some(listener), Some(plane)) => Some((listener, plane.clone())),
            _ => None,
        };
        let rpc = rpc.map(|(listener, plane)| {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let stop = rpc_stop.clone();
            let mut server = tonic::transport::Server::builder();
            let router = match (&logic_half, &comet) {
                (Some(half), _) => server.add_service(natter_rpc::LogicServer::service(
                    half.logic.clone() as Arc<dyn LogicService>,
                    natter_rpc::SessionKey::new(&half.auth_secret),
                    plane,
                )),
                (None, Some(comet)) => server.add_service(natter_rpc::GatewayServer::service(
                    Arc::new(comet.clone()),
                    plane,
                )),
                (None, None) => unreachable!("every role runs logic or a gateway"),
            };
            tokio::spawn(async move {
                router
                    .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                    .await
            })
        });

        // A node whose lease was lost may share its worker id (and so its
        // message ids) with a newer node: it stops rather than go on.
        if let Some((_, registration)) = &registration {
            let (registration, shutdown, stop) = (
                registration.clone(),
                shutdown.clone(),
                background_stop.clone(),
            );
            tokio::spawn(async move {
                tokio::select! {
                    _ = registration.lost() => {
                        tracing::error!("etcd registration lost; shutting down");
                        shutdown.cancel();
                    }
                    _ = stop.cancelled() => {}
                }
            });
        }
        tracing::info!(role = role.name(), %addr, rpc = ?rpc_addr, admin = ?admin_addr, worker, node = %node_name, data_dir = %config.data_dir.display(), "natter serving");
        ready.set(true);

        // One cap for every connection on the listener: the gateway's slots,
        // or slots of the same number where there is no gateway.
        let slots = comet
            .as_ref()
            .map(|c| c.slots())
            .unwrap_or_else(|| Arc::new(tokio::sync::Semaphore::new(config.comet.max_connections)));
        http::check_open_file_limit(config.comet.max_connections);
        let limits = http::Limits::new(&config.http, &config.comet);
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            // HTTP connections and WebSockets drain side by side, each
            // within the drain time.
            let serving = http::serve(
                listener,
                app,
                slots,
                limits,
                stop.clone(),
                http_metrics.clone(),
            );
            // The admin listener drains with the public one.
            let admin_serving = async {
                if let Some((listener, app)) = admin {
                    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
                    http::serve(listener, app, slots, limits, stop.clone(), http_metrics).await;
                }
            };
            let draining = async {
                stop.cancelled().await;
                ready.set(false);
                if let Some(comet) = &comet {
                    comet.drain().await;
                }
            };
            tokio::join!(serving, admin_serving, draining);
            if let Some(renewal) = renewal {
                let _ = renewal.await;
            }
            if let Some(resends) = resends {
                let _ = resends.await;
            }
            // A gateway leaves discovery once no connection is left: logic
            // stops pushing to it at once.
            if !role.runs_logic() {
                if let Some((_, registration)) = &registration {
                    registration.close().await;
                }
            }
            rpc_stop.cancel();
            if let Some(rpc) = rpc {
                match rpc.await {
                    Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server"),
                    Err(e) => tracing::warn!(error = %e, "gRPC server task"),
                    Ok(Ok(())) => {}
                }
            }
            drop(comet);
            // Queued writes commit before the store closes, whatever happens.
            background_stop.cancel();
            if let Some((watch, follow)) = gateways_watch {
                let _ = watch.await;
                let _ = follow.await;
            }
            let mut committed = Ok(());
            if let Some(half) = logic_half {
                drop(half.logic);
                if let Some(retention) = half.retention {
                    let _ = retention.await;
                }
                committed = half.committer_task.await;
                half.groups.close().await;
                half.store.close().await;
            }
            let _ = watcher.await;
            // A node that makes message ids keeps its worker id until its
            // last queued write has committed.
            if role.runs_logic() {
                if let Some((_, registration)) = &registration {
                    registration.close().await;
                }
            }
            tracing::info!("natter stopped");
            committed.context("committer task")
        });
        Ok(Server {
            addr,
            rpc_addr,
            admin_addr,
            worker,
            shutdown,
            task,
        })
    }

    /// The gRPC address of a distributed role.
    pub fn rpc_addr(&self) -> Option<SocketAddr> {
        self.rpc_addr
    }

    /// The admin API's address, on the roles that serve it (`serve`, `logic`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The worker id in this node's message ids (from etcd, or 0).
    pub fn worker(&self) -> u16 {
        self.worker
    }

    /// Begins a graceful shutdown.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down gracefully and waits until everything is flushed and closed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Serves until `signal` resolves (then shuts down gracefully) or the
    /// server fails on its own.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let Server {
            shutdown, mut task, ..
        } = self;
        tokio::select! {
            _ = signal => {
                shutdown.cancel();
                task.await.context("server task panicked")?
            }
            result = &mut task => result.context("server task panicked")?,
        }
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task panicked")?
    }
}
