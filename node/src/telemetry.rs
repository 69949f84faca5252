//! Logging setup and the health/metrics endpoints every role serves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use crate::config::LogConfig;

/// Installs the global tracing subscriber: text or JSON lines on stderr,
/// filtered by `RUST_LOG` when set, else by the configured filter.
pub fn init_logging(config: &LogConfig) -> Result<(), String> {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| config.filter.clone());
    let filter: Targets = spec
        .parse()
        .map_err(|e| format!("bad log filter {spec:?}: {e}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    let result = if config.format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    result.map_err(|e| e.to_string())
}

/// Whether the process is ready to take traffic: it is serving (not
/// draining) and every dependency it watches answers.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<ReadinessInner>);

#[derive(Debug, Default)]
struct ReadinessInner {
    serving: AtomicBool,
    /// Dependencies that failed their last check.
    down: std::sync::Mutex<std::collections::BTreeSet<&'static str>>,
}

impl Readiness {
    /// Serving or not (off while starting and draining).
    pub fn set(&self, ready: bool) {
        self.0.serving.store(ready, Ordering::SeqCst);
    }

    /// Records the outcome of a dependency's check.
    pub fn set_dependency(&self, name: &'static str, up: bool) {
        let mut down = self.0.down.lock().unwrap_or_else(|e| e.into_inner());
        if up {
            down.remove(name);
        } else {
            down.insert(name);
        }
    }

    /// Dependencies whose last check failed.
    pub fn down(&self) -> Vec<&'static str> {
        let down = self.0.down.lock().unwrap_or_else(|e| e.into_inner());
        down.iter().copied().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.0.serving.load(Ordering::SeqCst) && self.down().is_empty()
    }
}

/// Something a role depends on, checked by [`watch_dependencies`].
#[async_trait::async_trait]
pub trait Dependency: Send + Sync + 'static {
    /// A short, fixed name: `store`, `redis`, … (a metric label).
    fn name(&self) -> &'static str;
    /// Answers if the dependency works; the error says why not.
    async fn check(&self) -> Result<(), String>;
}

/// Checks each dependency every `every` until `stop`: the outcome goes to
/// `natter_dependency_up{dependency}`, to `readiness`, and to the log when
/// it changes. A check that takes longer than `every` counts as failed.
pub async fn watch_dependencies(
    dependencies: Vec<Arc<dyn Dependency>>,
    every: std::time::Duration,
    readiness: Readiness,
    registry: &Registry,
    stop: crate::Shutdown,
) {
    let gauge = register(
        registry,
        prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "natter_dependency_up",
                "1 when the dependency answered its last check, 0 when it did not.",
            ),
            &["dependency"],
        )
        .expect("valid gauge"),
    );
    let mut was_up: Vec<Option<bool>> = vec![None; dependencies.len()];
    // One slow answer under load is not an outage: a dependency is down
    // after this many failed checks in a row.
    const FAILURES: u32 = 2;
    let mut failures: Vec<u32> = vec![0; dependencies.len()];
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        for ((dependency, was), failed) in dependencies
            .iter()
            .zip(was_up.iter_mut())
            .zip(failures.iter_mut())
        {
            let name = dependency.name();
            let outcome = match tokio::time::timeout(every, dependency.check()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {every:?}")),
            };
            *failed = if outcome.is_ok() { 0 } else { *failed + 1 };
            if outcome.is_err() && *failed < FAILURES {
                continue;
            }
            let up = outcome.is_ok();
            gauge.with_label_values(&[name]).set(i64::from(up));
            readiness.set_dependency(name, up);
            if *was != Some(up) {
                match &outcome {
                    Ok(()) if was.is_some() => {
                        tracing::info!(dependency = name, "dependency answers again")
                    }
                    Ok(()) => {}
                    Err(e) => tracing::error!(dependency = name, error = %e, "dependency is down"),
                }
                *was = Some(up);
            }
        }
    }
}

#[derive(Clone)]
struct HealthState {
    registry: Registry,
    ready: Readiness,
}

/// Routes served by [`health_router`].
pub const ROUTES: &[(&str, &str)] = &[("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")];

/// `/healthz` (the process answers), `/readyz` (it takes traffic) and
/// `/metrics` (Prometheus text format).
pub fn health_router(registry: Registry, ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(HealthState { registry, ready })
}

async fn readyz(State(state): State<HealthState>) -> Response {
    if state.ready.is_ready() {
        return (StatusCode::OK, "ready\n").into_response();
    }
    let down = state.ready.down();
    let body = if down.is_empty() {
        "not ready\n".to_string()
    } else {
        format!("not ready: {} down\n", down.join(", "))
    };
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

async fn metrics(State(state): State<HealthState>) -> Response {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], buf).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Registers `collector` and returns it; a name clash is a programming error
/// that shows up in the first test that builds the role.
pub fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> C {
    if let Err(e) = registry.register(Box::new(collector.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    collector
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    struct Flaky(Arc<AtomicBool>);

    #[async_trait::async_trait]
    impl Dependency for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        async fn check(&self) -> Result<(), String> {
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("refused".into())
            }
        }
    }

    fn gauge(registry: &Registry) -> Option<f64> {
        registry
            .gather()
            .iter()
            .find(|f| f.name() == "natter_dependency_up")
            .and_then(|f| f.get_metric().first().map(|m| m.get_gauge().get_value()))
    }

    #[tokio::test]
    async fn a_failing_dependency_shows_in_readiness_and_metrics_until_it_recovers() {
        let up = Arc::new(AtomicBool::new(true));
        let ready = Readiness::default();
        ready.set(true);
        let registry = Registry::new();
        let stop = crate::Shutdown::new();
        let every = std::time::Duration::from_millis(20);
        let watcher = tokio::spawn({
            let (ready, registry, stop) = (ready.clone(), registry.clone(), stop.clone());
            let deps: Vec<Arc<dyn Dependency>> = vec![Arc::new(Flaky(up.clone()))];
            async move { watch_dependencies(deps, every, ready, &registry, stop).await }
        });
        let settle = || tokio::time::sleep(every * 4);
        settle().await;
        assert!(ready.is_ready());
        assert_eq!(gauge(&registry), Some(1.0));
        up.store(false, Ordering::SeqCst);
        settle().await;
        assert!(!ready.is_ready());
        assert_eq!(ready.down(), vec!["flaky"]);
        assert_eq!(gauge(&registry), Some(0.0));
        up.store(true, Ordering::SeqCst);
        settle().await;
        assert!(ready.is_ready());
        // Draining wins over healthy dependencies.
        ready.set(false);
        assert!(!ready.is_ready());
        stop.cancel();
        watcher.await.expect("the watcher stops");
    }
}
