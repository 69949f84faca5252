//! The one natter binary's library half: assembling roles into a running
//! process. [`Server`] is the embedded shape — every role in one process,
//! SQLite under the data dir, sessions in memory — used by `natter serve`
//! and by the end-to-end tests.

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
    Fanout, GroupPublisher, Logic, LogicParts, LogicService, MemoryDirectory, Tokens,
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

/// Routes of the HTTP API, for checking the OpenAPI document against.
pub fn http_routes() -> Vec<(&'static str, &'static str)> {
    [
        natter_comet::ROUTES,
        natter_record::http::ROUTES,
        natter_group::http::ROUTES,
        natter_node::telemetry::ROUTES,
    ]
    .concat()
}

/// A running embedded natter.
pub struct Server {
    addr: SocketAddr,
    worker: u16,
    shutdown: Shutdown,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Validates `config`, opens the store, binds the listener and serves.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        config.validate()?;
        let secret = config.secret().context("loading the token secret")?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        // Bound first: the address is what this node registers under.
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        // Discovery: register in etcd and take a worker id no live node has.
        let registration = if config.discovery.etcd_url.is_empty() {
            None
        } else {
            let d = &config.discovery;
            let etcd = Etcd::new(&d.etcd_url, Duration::from_millis(d.timeout_ms))
                .map_err(|e| anyhow::anyhow!("discovery.etcd_url: {e}"))?;
            let node = if d.node.is_empty() {
                random_node_name()
            } else {
                d.node.clone()
            };
            let advertise = if d.advertise.is_empty() {
                addr.to_string()
            } else {
                d.advertise.clone()
            };
            let registration = discovery::register(
                &etcd,
                &d.prefix,
                "serve",
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
        let store: Arc<dyn MessageStore> = if config.store.mysql_url.is_empty() {
            let db = config.data_dir.join("natter.db");
            let options = SqliteOptions {
                synchronous: config.store.synchronous,
                readers: config.store.readers,
                acquire_timeout: Duration::from_millis(config.store.acquire_timeout_ms),
            };
            Arc::new(
                SqliteStore::open(&db, &options)
                    .await
                    .with_context(|| format!("opening {}", db.display()))?,
            )
        } else {
            let options = MySqlOptions {
                max_connections: config.store.mysql_max_connections,
                acquire_timeout: Duration::from_millis(config.store.acquire_timeout_ms),
            };
            Arc::new(
                MySqlStore::connect(&config.store.mysql_url, &options)
                    .await
                    .context("connecting to MySQL (store.mysql_url)")?,
            )
        };

        let registry = Registry::new();
        natter_node::telemetry::register(
            &registry,
            natter_node::process::ProcessCollector::default(),
        );
        let shutdown = Shutdown::new();
        // The committer outlives the connections: it stops only after they drained.
        let committer_stop = Shutdown::new();
        let (committer, committer_task) = Committer::start(
            store.clone(),
            config.store.batch_max,
            config.store.queue,
            &registry,
            committer_stop.clone(),
        );
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
                    Duration::from_millis(config.store.acquire_timeout_ms),
                )
                .await
                .context("connecting to MySQL for groups (store.mysql_url)")?,
            )
        };
        let tokens = Tokens::new(secret);
        let ids = Arc::new(MidGenerator::new(worker).map_err(anyhow::Error::msg)?);
        // Sessions: in memory, or in Redis when configured.
        let mut dependencies: Vec<Arc<dyn Dependency>> = vec![
            Arc::new(StoreCheck(store.clone())),
            Arc::new(GroupStoreCheck(group_store.clone())),
        ];
        let directory: Arc<dyn SessionDirectory> = if config.sessions.redis_url.is_empty() {
            Arc::new(MemoryDirectory::default())
        } else {
            let redis = Arc::new(
                RedisDirectory::new(
                    &config.sessions.redis_url,
                    &config.sessions.key_prefix,
                    Duration::from_millis(config.sessions.ttl_ms),
                    Duration::from_millis(config.sessions.timeout_ms),
                )
                .map_err(|e| anyhow::anyhow!("sessions.redis_url: {e}"))?,
            );
            dependencies.push(Arc::new(RedisCheck(redis.clone())));
            redis
        };
        if let Some((etcd, registration)) = &registration {
            dependencies.push(Arc::new(EtcdCheck(etcd.clone(), registration.clone())));
        }
        let fanout = Arc::new(Fanout::new(directory, &registry));
        let publisher =
            GroupPublisher::new(committer.clone(), ids.clone(), fanout.clone(), &registry);
        let groups = Arc::new(Groups::new(
            group_store,
            store.clone(),
            Arc::new(publisher),
            config.groups.clone(),
        ));
        let logic = Arc::new(Logic::new(
            LogicParts {
                tokens: tokens.clone(),
                fanout,
                store: store.clone(),
                committer,
                ids,
                groups: groups.clone(),
            },
            &config.limits,
            &registry,
        ));
        let node = "local";
        let comet = Comet::new(
            node,
            config.comet.clone(),
            logic.clone() as Arc<dyn LogicService>,
            &registry,
            shutdown.clone(),
        );
        logic.attach_gateway(node, Arc::new(comet.clone()));

        let retention = (config.store.retention_days > 0).then(|| {
            let age =
                std::time::Duration::from_secs(u64::from(config.store.retention_days) * 86_400);
            let every = std::time::Duration::from_secs(600);
            tokio::spawn(natter_record::retention::run(
                store.clone(),
                age,
                every,
                committer_stop.clone(),
            ))
        });
        let ready = Readiness::default();
        let watcher = tokio::spawn({
            let (ready, registry, stop) = (ready.clone(), registry.clone(), committer_stop.clone());
            async move {
                watch_dependencies(dependencies, DEPENDENCY_CHECK_EVERY, ready, &registry, stop)
                    .await
            }
        });
        let renewal = tokio::spawn(
            comet
                .clone()
                .renew_sessions(Duration::from_millis(config.sessions.ttl_ms / 3)),
        );
        let app = Router::new()
            .merge(comet.router())
            .merge(natter_record::http::router(
                store.clone(),
                Arc::new(tokens.clone()),
                groups.clone(),
            ))
            .merge(natter_group::http::router(groups.clone(), Arc::new(tokens)))
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

        tracing::info!(%addr, worker, data_dir = %config.data_dir.display(), "natter serving");
        ready.set(true);

        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.clone().cancelled_owned())
                .await;
            // However serving ended, every connection is told to go.
            stop.cancel();
            ready.set(false);
            comet.drain().await;
            let _ = renewal.await;
            // Leave discovery once no connection is left: the key goes now.
            if let Some((_, registration)) = &registration {
                registration.close().await;
            }
            drop(logic);
            // Queued writes commit before the store closes, whatever happens.
            committer_stop.cancel();
            if let Some(retention) = retention {
                let _ = retention.await;
            }
            let committed = committer_task.await;
            let _ = watcher.await;
            groups.close().await;
            store.close().await;
            tracing::info!("natter stopped");
            committed.context("committer task")?;
            served.context("HTTP server")
        });
        Ok(Server {
            addr,
            worker,
            shutdown,
            task,
        })
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
