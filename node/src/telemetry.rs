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

/// Whether the process is ready to take traffic; flipped off while draining.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
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
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
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
