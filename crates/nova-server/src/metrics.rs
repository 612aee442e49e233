//! Prometheus metrics (`GET /metrics`), through `prometheus-client`.
//!
//! Counters and histograms are updated where things happen (a create, an
//! exec, an error response); gauges that describe the present (sandboxes by
//! state, the pool, per-sandbox CPU and memory) are filled at scrape time
//! from the runtime, so they cannot drift from it.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `nova_sandboxes` | gauge | `state` |
//! | `nova_create_duration_seconds` | histogram | `source` = `boot` / `pool` |
//! | `nova_boot_duration_seconds` | histogram | `restored` |
//! | `nova_execs_total` | counter | `outcome` = `ok` / `error` |
//! | `nova_api_errors_total` | counter | `code` (the problem code) |
//! | `nova_http_responses_total` | counter | `class` = `2xx`, `4xx`, ... |
//! | `nova_pool_claims_total` | counter | `result` = `hit` / `miss` |
//! | `nova_pool_ready` | gauge | `template` |
//! | `nova_sandboxes_expired_total` | counter | |
//! | `nova_sandbox_cpu_seconds_total` | gauge | `sandbox` |
//! | `nova_sandbox_memory_bytes` | gauge | `sandbox` |

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::daemon::Daemon;
use crate::problem::ProblemCode;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestoredLabel {
    restored: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TemplateLabel {
    template: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabel {
    sandbox: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// What a scrape reads from the runtime.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Sandboxes per state name.
    pub states: Vec<(String, i64)>,
    /// Ready pool sandboxes per template.
    pub pool: Vec<(String, i64)>,
    /// Per sandbox: id, CPU seconds, memory bytes in use.
    pub sandboxes: Vec<(String, f64, f64)>,
}

/// The daemon's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sandboxes: Family<StateLabel, Gauge>,
    create: Family<SourceLabel, Histogram, fn() -> Histogram>,
    boot: Family<RestoredLabel, Histogram, fn() -> Histogram>,
    execs: Family<OutcomeLabel, Counter>,
    errors: Family<CodeLabel, Counter>,
    responses: Family<ClassLabel, Counter>,
    pool_claims: Family<ResultLabel, Counter>,
    pool_ready: Family<TemplateLabel, Gauge>,
    expired: Counter,
    cpu: Family<SandboxLabel, FloatGauge>,
    memory: Family<SandboxLabel, FloatGauge>,
    /// Serializes scrapes: each clears and refills the present-tense gauges.
    scrape: tokio::sync::Mutex<()>,
}

fn latency_histogram() -> Histogram {
    // 5 ms .. ~41 s: restores on KVM up to cold boots under emulation.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered and zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nova");
        let sandboxes = Family::<StateLabel, Gauge>::default();
        registry.register("sandboxes", "Sandboxes by state", sandboxes.clone());
        let create = Family::<SourceLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "create_duration_seconds",
            "Create request to ready sandbox, seconds",
            create.clone(),
        );
        let boot = Family::<RestoredLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "boot_duration_seconds",
            "VMM spawn to agent ready, seconds",
            boot.clone(),
        );
        let execs = Family::<OutcomeLabel, Counter>::default();
        registry.register("execs", "Commands run", execs.clone());
        let errors = Family::<CodeLabel, Counter>::default();
        registry.register(
            "api_errors",
            "Error responses by problem code",
            errors.clone(),
        );
        let responses = Family::<ClassLabel, Counter>::default();
        registry.register(
            "http_responses",
            "HTTP responses by status class",
            responses.clone(),
        );
        let pool_claims = Family::<ResultLabel, Counter>::default();
        registry.register(
            "pool_claims",
            "Creates served by the warm pool (hit) or not (miss)",
            pool_claims.clone(),
        );
        let pool_ready = Family::<TemplateLabel, Gauge>::default();
        registry.register(
            "pool_ready",
            "Sandboxes waiting in the warm pool",
            pool_ready.clone(),
        );
        let expired = Counter::default();
        registry.register(
            "sandboxes_expired",
            "Sandboxes stopped at the end of their lifetime",
            expired.clone(),
        );
        let cpu = Family::<SandboxLabel, FloatGauge>::default();
        registry.register(
            "sandbox_cpu_seconds_total",
            "CPU time of a sandbox's VMM, seconds",
            cpu.clone(),
        );
        let memory = Family::<SandboxLabel, FloatGauge>::default();
        registry.register(
            "sandbox_memory_bytes",
            "Guest memory in use, bytes",
            memory.clone(),
        );
        Self {
            registry,
            sandboxes,
            create,
            boot,
            execs,
            errors,
            responses,
            pool_claims,
            pool_ready,
            expired,
            cpu,
            memory,
            scrape: tokio::sync::Mutex::new(()),
        }
    }

    /// A create finished in `seconds`, from the pool or by a boot.
    pub fn create_done(&self, seconds: f64, from_pool: bool) {
        let source = if from_pool { "pool" } else { "boot" };
        self.create
            .get_or_create(&SourceLabel {
                source: source.into(),
            })
            .observe(seconds);
    }

    /// A sandbox booted (or was restored) in `seconds`.
    pub fn booted(&self, seconds: f64, restored: bool) {
        self.boot
            .get_or_create(&RestoredLabel {
                restored: restored.to_string(),
            })
            .observe(seconds);
    }

    /// A command ended (`ok`: it ran to its exit, whatever its code).
    pub fn exec_done(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.execs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// A create was (`hit`) or was not served by the pool.
    pub fn pool_claim(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.pool_claims
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// A sandbox's lifetime ended.
    pub fn expired(&self) {
        self.expired.inc();
    }

    /// The text exposition of every metric, with the present-tense gauges
    /// set from `now`.
    pub async fn render(&self, now: Snapshot) -> String {
        let _scrape = self.scrape.lock().await;
        self.sandboxes.clear();
        for (state, n) in now.states {
            self.sandboxes.get_or_create(&StateLabel { state }).set(n);
        }
        self.pool_ready.clear();
        for (template, n) in now.pool {
            self.pool_ready
                .get_or_create(&TemplateLabel { template })
                .set(n);
        }
        self.cpu.clear();
        self.memory.clear();
        for (sandbox, cpu, memory) in now.sandboxes {
            let label = SandboxLabel { sandbox };
            self.cpu.get_or_create(&label).set(cpu);
            self.memory.get_or_create(&label).set(memory);
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        text
    }

    fn response(&self, status: u16, code: Option<ProblemCode>) {
        self.responses
            .get_or_create(&ClassLabel {
                class: format!("{}xx", status / 100),
            })
            .inc();
        if let Some(code) = code {
            self.errors
                .get_or_create(&CodeLabel {
                    code: code.as_str().into(),
                })
                .inc();
        }
    }
}

/// Middleware: counts every response by status class, and errors by their
/// problem code.
pub async fn count_responses(
    State(daemon): State<Arc<Daemon>>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    let code = response.extensions().get::<ProblemCode>().copied();
    daemon.metrics().response(response.status().as_u16(), code);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_scrape_shows_counters_and_present_gauges() {
        let m = Metrics::new();
        m.create_done(0.12, false);
        m.exec_done(true);
        m.pool_claim(false);
        m.response(404, Some(ProblemCode::SandboxNotFound));
        let text = m
            .render(Snapshot {
                states: vec![("running".into(), 2)],
                pool: vec![("python".into(), 1)],
                sandboxes: vec![("sb-1".into(), 1.5, 1024.0)],
            })
            .await;
        for want in [
            "nova_sandboxes{state=\"running\"} 2",
            "nova_create_duration_seconds_count{source=\"boot\"} 1",
            "nova_execs_total{outcome=\"ok\"} 1",
            "nova_api_errors_total{code=\"sandbox_not_found\"} 1",
            "nova_pool_claims_total{result=\"miss\"} 1",
            "nova_pool_ready{template=\"python\"} 1",
            "nova_sandbox_memory_bytes{sandbox=\"sb-1\"} 1024",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        // Present-tense gauges do not keep sandboxes that are gone.
        let text = m.render(Snapshot::default()).await;
        assert!(!text.contains("sb-1"));
    }
}
