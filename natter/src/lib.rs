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
use natter_group::sqlite::SqliteGroupStore;
use natter_group::{GroupStore, Groups};
use natter_logic::redis_sessions::RedisDirectory;
use natter_logic::SessionDirectory;
use natter_logic::{
    Fanout, GroupPublisher, Logic, LogicParts, LogicService, MemoryDirectory, Tokens,
};
use natter_node::ids::MidGenerator;
use natter_node::telemetry::{health_router, watch_dependencies, Dependency, Readiness};
use natter_node::{Config, Shutdown};
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
        let db = config.data_dir.join("natter.db");
        let options = SqliteOptions {
            synchronous: config.store.synchronous,
            readers: config.store.readers,
            acquire_timeout: std::time::Duration::from_millis(config.store.acquire_timeout_ms),
        };
        let store: Arc<dyn MessageStore> = Arc::new(
            SqliteStore::open(&db, &options)
                .await
                .with_context(|| format!("opening {}", db.display()))?,
        );

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
        let group_db = config.data_dir.join("groups.db");
        let group_store: Arc<dyn GroupStore> = Arc::new(
            SqliteGroupStore::open(&group_db, config.store.synchronous)
                .await
                .with_context(|| format!("opening {}", group_db.display()))?,
        );
        let tokens = Tokens::new(secret);
        let ids = Arc::new(MidGenerator::new(0).map_err(anyhow::Error::msg)?);
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

        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, data_dir = %config.data_dir.display(), "natter serving");
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
            shutdown,
            task,
        })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
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
