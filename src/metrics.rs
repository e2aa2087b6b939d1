//! Prometheus metrics and the health endpoints: `/metrics`, `/healthz` (the process
//! runs) and `/readyz` (the broker channel is open and the engine answers).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::pipeline::envelope::{Action, Echo};
use crate::pipeline::response::Outcome;

/// The `action` label of a request whose action is not one the worker takes (or that
/// failed before its action was read): with the 12 Kuzzle action names, the only values
/// the label takes, so that no request adds series of its own.
pub const UNKNOWN_ACTION: &str = "unknown";

/// The `action` label of a request: its Kuzzle action (`mCreate`, `delete`…) when the
/// envelope names one the worker takes on the `document` controller, else
/// `UNKNOWN_ACTION`. Always one of a fixed set of 13 values.
pub fn action_label(echo: &Echo) -> &'static str {
    let document = echo.controller.as_ref().and_then(|c| c.as_str()) == Some("document");
    let named = echo.action.as_ref().and_then(|a| a.as_str());
    match named.and_then(Action::from_name) {
        Some((action, single)) if document => action.name(single),
        _ => UNKNOWN_ACTION,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    action: &'static str,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    action: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
    commit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Every metric of one worker.
pub struct Metrics {
    registry: Registry,
    requests: Family<StatusLabel, Counter>,
    documents: Family<OutcomeLabel, Counter>,
    pub request_seconds: Histogram,
    pub bulk_seconds: Histogram,
    pub bulk_documents: Histogram,
    pub in_flight: Gauge,
    pub prefetch: Gauge,
    pub held_bytes: Gauge,
    pub engine_retries: Counter,
    pub reconnects: Counter,
    pub unroutable_replies: Counter,
    pub requeued: Counter,
    dead_lettered: Family<ReasonLabel, Counter>,
    rights: Family<OutcomeLabel, Counter>,
    broker_node: Family<NodeLabel, Gauge>,
    engine_node: Family<NodeLabel, Gauge>,
    pub pauses: Counter,
    pub panics: Counter,
    pub replies_shrunk: Counter,
    pub slow_writes: Counter,
    pub duplicates_skipped: Counter,
    pub answered_window: Gauge,
    paused_gauge: Gauge,
    paused: AtomicBool,
    broker_up_gauge: Gauge,
    engine_up_gauge: Gauge,
    broker_up: AtomicBool,
    engine_up: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mupdate");
        let requests = Family::<StatusLabel, Counter>::default();
        let documents = Family::<OutcomeLabel, Counter>::default();
        let request_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let bulk_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let bulk_documents = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        let (in_flight, broker_up_gauge, engine_up_gauge) =
            (Gauge::default(), Gauge::default(), Gauge::default());
        let (engine_retries, reconnects) = (Counter::default(), Counter::default());
        let (unroutable_replies, requeued) = (Counter::default(), Counter::default());
        let dead_lettered = Family::<ReasonLabel, Counter>::default();
        let rights = Family::<OutcomeLabel, Counter>::default();
        let broker_node = Family::<NodeLabel, Gauge>::default();
        let engine_node = Family::<NodeLabel, Gauge>::default();
        let (pauses, panics) = (Counter::default(), Counter::default());
        let (replies_shrunk, duplicates_skipped) = (Counter::default(), Counter::default());
        let slow_writes = Counter::default();
        let paused_gauge = Gauge::default();
        let (prefetch, held_bytes) = (Gauge::default(), Gauge::default());
        let build_info = Family::<BuildLabel, Gauge>::default();
        build_info
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
                commit: env!("MUPDATE_GIT_COMMIT"),
            })
            .set(1);
        registry.register(
            "build_info",
            "1, labelled with the worker's version and the commit it was built from",
            build_info,
        );
        registry.register(
            "prefetch",
            "The consumer's prefetch, chosen from the requests' sizes (amqp.max_held_bytes)",
            prefetch.clone(),
        );
        registry.register(
            "held_bytes",
            "Bytes of the requests received and not yet settled",
            held_bytes.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by Kuzzle action and reply status",
            requests.clone(),
        );
        registry.register(
            "documents",
            "Documents, by Kuzzle action and outcome",
            documents.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "From delivery to confirmed reply",
            request_seconds.clone(),
        );
        registry.register(
            "bulk_duration_seconds",
            "One _bulk call",
            bulk_seconds.clone(),
        );
        registry.register(
            "bulk_documents",
            "Documents per _bulk call (coalesced from concurrent requests)",
            bulk_documents.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests being processed",
            in_flight.clone(),
        );
        registry.register(
            "engine_retries",
            "Engine calls retried (down, 5xx, 429)",
            engine_retries.clone(),
        );
        registry.register(
            "broker_reconnects",
            "Broker connections re-established",
            reconnects.clone(),
        );
        registry.register(
            "unroutable_replies",
            "Replies no queue took; requests dead-lettered",
            unroutable_replies.clone(),
        );
        registry.register(
            "requests_requeued",
            "Requests held too long and put back",
            requeued.clone(),
        );
        registry.register(
            "requests_dead_lettered",
            "Requests rejected to the dead-letter exchange, by reason",
            dead_lettered.clone(),
        );
        registry.register(
            "rights_checks",
            "Rights checks (security.enabled), by Kuzzle action and outcome",
            rights.clone(),
        );
        registry.register(
            "broker_node",
            "1 for the broker node (host:port) the worker is connected to, 0 for the others",
            broker_node.clone(),
        );
        registry.register(
            "engine_node_up",
            "0 for a storage engine node (host:port) left out after a refused or broken connection, 1 otherwise",
            engine_node.clone(),
        );
        registry.register(
            "pauses",
            "Times consumption paused because the engine stayed unavailable",
            pauses.clone(),
        );
        registry.register(
            "consumption_paused",
            "1 while consumption is paused until the engine answers",
            paused_gauge.clone(),
        );
        registry.register(
            "handler_panics",
            "Deliveries whose handling panicked (dead-lettered)",
            panics.clone(),
        );
        registry.register(
            "replies_shrunk",
            "Replies published smaller because the broker refused their size",
            replies_shrunk.clone(),
        );
        registry.register(
            "engine_slow_writes",
            "_bulk calls not answered within storage.timeout_ms (still awaited)",
            slow_writes.clone(),
        );
        registry.register(
            "duplicates_skipped",
            "Redelivered requests already answered by this worker, acked without a second update",
            duplicates_skipped.clone(),
        );
        let answered_window = Gauge::default();
        registry.register(
            "answered_window_seconds",
            "How far back the answered requests remembered for redeliveries go (worker.answered_window_ms at most)",
            answered_window.clone(),
        );
        registry.register(
            "broker_up",
            "1 when consuming from the broker",
            broker_up_gauge.clone(),
        );
        registry.register(
            "engine_up",
            "1 when the storage engine answers",
            engine_up_gauge.clone(),
        );
        Metrics {
            registry,
            requests,
            documents,
            request_seconds,
            bulk_seconds,
            bulk_documents,
            in_flight,
            prefetch,
            held_bytes,
            engine_retries,
            reconnects,
            unroutable_replies,
            requeued,
            dead_lettered,
            rights,
            broker_node,
            engine_node,
            pauses,
            panics,
            replies_shrunk,
            slow_writes,
            duplicates_skipped,
            answered_window,
            paused_gauge,
            paused: AtomicBool::new(false),
            broker_up_gauge,
            engine_up_gauge,
            broker_up: AtomicBool::new(false),
            engine_up: AtomicBool::new(false),
        }
    }

    /// Counts a request answered with `status`; `action` is its `action_label` (or a
    /// `Request::action_name`).
    pub fn reply(&self, action: &'static str, status: u16) {
        self.requests
            .get_or_create(&StatusLabel {
                action,
                status: status.to_string(),
            })
            .inc();
    }

    /// Counts each document of a request of `action` (its Kuzzle name) by what became
    /// of it.
    pub fn outcomes(&self, action: &'static str, outcomes: &[Outcome]) {
        for outcome in outcomes {
            let label = match outcome {
                Outcome::Written { item, .. } => match item.result.as_deref() {
                    Some("noop") => "noop",
                    Some("created") => "created",
                    Some("deleted") => "deleted",
                    _ => "updated",
                },
                Outcome::Failed { status: 404, .. } => "not_found",
                Outcome::Failed { status: 409, .. } => "conflict",
                Outcome::Failed {
                    status: 429 | 503, ..
                } => "rejected",
                Outcome::Failed { status: 400, .. } => "invalid",
                Outcome::Failed { .. } => "failed",
            };
            let label = OutcomeLabel {
                action,
                outcome: label,
            };
            self.documents.get_or_create(&label).inc();
        }
    }

    pub fn set_broker_up(&self, up: bool) {
        self.broker_up.store(up, Ordering::Relaxed);
        self.broker_up_gauge.set(i64::from(up));
    }

    pub fn set_engine_up(&self, up: bool) {
        self.engine_up.store(up, Ordering::Relaxed);
        self.engine_up_gauge.set(i64::from(up));
    }

    pub fn dead_lettered(&self, reason: &'static str) {
        self.dead_lettered
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a rights check of a request of `action` (its `action_label`): `allowed`,
    /// `unauthorized`, `forbidden`, or `reply_unauthorized`/`reply_forbidden` for its
    /// reply destination.
    pub fn rights(&self, action: &'static str, outcome: &'static str) {
        self.rights
            .get_or_create(&OutcomeLabel { action, outcome })
            .inc();
    }

    /// The broker node in use: 1 for `node`, 0 for the `others`.
    pub fn set_engine_node(&self, node: &str, up: bool) {
        let label = NodeLabel {
            node: node.to_owned(),
        };
        self.engine_node.get_or_create(&label).set(i64::from(up));
    }

    pub fn set_broker_node<'a>(&self, node: &str, others: impl Iterator<Item = &'a str>) {
        for other in others {
            let label = NodeLabel {
                node: other.to_owned(),
            };
            self.broker_node.get_or_create(&label).set(0);
        }
        let label = NodeLabel {
            node: node.to_owned(),
        };
        self.broker_node.get_or_create(&label).set(1);
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
        self.paused_gauge.set(i64::from(paused));
    }

    /// Consuming, not paused, and the engine answers.
    pub fn ready(&self) -> bool {
        self.broker_up.load(Ordering::Relaxed)
            && self.engine_up.load(Ordering::Relaxed)
            && !self.paused.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    axum::serve(listener, app).await
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::bulk::Item;

    #[test]
    fn the_build_is_named() {
        let text = Metrics::new().encode();
        let line = format!(
            "mupdate_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            env!("MUPDATE_GIT_COMMIT")
        );
        assert!(text.contains(&line), "{line} not in {text}");
    }

    #[test]
    fn outcomes_and_statuses_are_counted() {
        let m = Metrics::new();
        m.reply("mUpdate", 206);
        let item = |result: &str| Item {
            status: 200,
            version: Some(2),
            result: Some(result.into()),
            shards: None,
            get: None,
            error: None,
            resent: false,
        };
        m.outcomes(
            "mUpdate",
            &[
                Outcome::Written {
                    id: "a".into(),
                    item: item("updated"),
                    slot: 0,
                },
                Outcome::Written {
                    id: "b".into(),
                    item: item("noop"),
                    slot: 1,
                },
                Outcome::Failed {
                    document: serde_json::json!({}),
                    status: 404,
                    reason: String::new(),
                },
            ],
        );
        let text = m.encode();
        assert!(
            text.contains("mupdate_requests_total{action=\"mUpdate\",status=\"206\"} 1"),
            "{text}"
        );
        for outcome in ["updated", "noop", "not_found"] {
            let line =
                format!("mupdate_documents_total{{action=\"mUpdate\",outcome=\"{outcome}\"}} 1");
            assert!(text.contains(&line), "{text}");
        }
        assert!(!m.ready());
        m.set_broker_up(true);
        m.set_engine_up(true);
        assert!(m.ready());
        m.set_paused(true);
        assert!(!m.ready(), "a paused worker is not ready");
    }

    #[test]
    fn requests_documents_and_rights_are_counted_by_action() {
        let m = Metrics::new();
        let item = |result: &str| Item {
            status: 200,
            version: Some(1),
            result: Some(result.into()),
            shards: None,
            get: None,
            error: None,
            resent: false,
        };
        let written = |result: &str| Outcome::Written {
            id: "a".into(),
            item: item(result),
            slot: 0,
        };
        m.reply("mCreate", 200);
        m.reply("mCreate", 200);
        m.reply("delete", 404);
        m.outcomes("mCreate", &[written("created"), written("created")]);
        m.outcomes("mDelete", &[written("deleted")]);
        m.rights("mDelete", "forbidden");
        let text = m.encode();
        for line in [
            "mupdate_requests_total{action=\"mCreate\",status=\"200\"} 2",
            "mupdate_requests_total{action=\"delete\",status=\"404\"} 1",
            "mupdate_documents_total{action=\"mCreate\",outcome=\"created\"} 2",
            "mupdate_documents_total{action=\"mDelete\",outcome=\"deleted\"} 1",
            "mupdate_rights_checks_total{action=\"mDelete\",outcome=\"forbidden\"} 1",
        ] {
            assert!(text.contains(line), "no {line} in\n{text}");
        }
    }

    /// The label takes 13 values at most, whatever the envelopes say.
    #[test]
    fn the_action_label_is_a_known_action_or_unknown() {
        let echo = |controller: Value, action: Value| Echo {
            controller: Some(controller),
            action: Some(action),
            ..Echo::default()
        };
        use serde_json::{Value, json};
        assert_eq!(
            action_label(&echo(json!("document"), json!("mCreate"))),
            "mCreate"
        );
        assert_eq!(
            action_label(&echo(json!("document"), json!("delete"))),
            "delete"
        );
        for (controller, action) in [
            (json!("document"), json!("mGet")),
            (json!("document"), json!("MUPDATE")),
            (json!("document"), json!(["mUpdate"])),
            (json!("document"), json!("x".repeat(10_000))),
            (json!("collection"), json!("mUpdate")),
            (json!(1), json!("mUpdate")),
        ] {
            assert_eq!(action_label(&echo(controller, action)), UNKNOWN_ACTION);
        }
        assert_eq!(action_label(&Echo::default()), UNKNOWN_ACTION);
        let labels: std::collections::HashSet<_> = Action::names()
            .map(|name| action_label(&echo(json!("document"), json!(name))))
            .collect();
        assert_eq!(labels.len(), 12);
        assert!(!labels.contains(UNKNOWN_ACTION));
    }
}
