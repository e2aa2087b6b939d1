//! The pipeline, one delivery at a time: envelope → bulk update → response → reply →
//! ack; and the consuming loop around it, with reconnection and graceful shutdown.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::broker::{self, Broker, Published};
use crate::bulk::{ItemOptions, Metadata};
use crate::coalesce::{BatchLimits, Coalescer};
use crate::config::Settings;
use crate::envelope::{self, Properties, Refresh};
use crate::error::RequestError;
use crate::metrics::{self, Metrics};
use crate::reply::Destination;
use crate::response::{self, Outcome, Response};
use crate::storage::{self, IndexState, Storage, StorageError};
use crate::update;

/// Turns request bytes into a response, talking to the storage engine as needed.
pub struct Processor {
    settings: Arc<Settings>,
    storage: Arc<Storage>,
    coalescer: Coalescer,
    metrics: Arc<Metrics>,
}

impl Processor {
    pub fn new(settings: Arc<Settings>, metrics: Arc<Metrics>) -> Result<Self, StorageError> {
        let storage = Arc::new(Storage::new(&settings.storage, metrics.clone())?);
        let s = &settings.storage;
        let limits = BatchLimits {
            max_documents: s.bulk_max_documents,
            max_bytes: s.bulk_max_bytes,
            concurrent_bulks: s.concurrent_bulks,
            linger: Duration::from_millis(s.bulk_linger_ms),
            queue: usize::from(settings.amqp.prefetch),
        };
        let coalescer = Coalescer::start(storage.clone(), limits);
        Ok(Processor {
            settings,
            storage,
            coalescer,
            metrics,
        })
    }

    pub async fn process(&self, body: &[u8], props: &Properties) -> Response {
        let s = &self.settings;
        let parsed = envelope::parse(body, props, &s.limits, &s.storage);
        let echo = parsed.echo;
        let request = match parsed.request {
            Ok(request) => request,
            Err(err) => {
                info!(request_id = %echo.request_id, status = err.status(), error = %err, "request refused");
                return response::error_response(&echo, &err);
            }
        };
        let span = info_span!("request", request_id = %echo.request_id, index = %request.index,
            collection = %request.collection, documents = request.documents.len());
        async {
            let outcomes = match self.update(&request, props).await {
                Ok(outcomes) => outcomes,
                Err(err) => {
                    info!(status = err.status(), error = %err, "request refused");
                    return response::error_response(&echo, &err);
                }
            };
            self.metrics.outcomes(&outcomes);
            for outcome in &outcomes {
                if let Outcome::Failed { status, reason, .. } = outcome {
                    debug!(status, %reason, "document not updated");
                }
            }
            let response =
                response::documents_response(&echo, &request, &outcomes, s.response.format);
            info!(status = response.status, "replied");
            response
        }
        .instrument(span)
        .await
    }

    /// Applies the request's documents; per-document outcomes in the request's order.
    async fn update(
        &self,
        request: &envelope::Request,
        props: &Properties,
    ) -> Result<Vec<Outcome>, RequestError> {
        if request.documents.is_empty() {
            return Ok(Vec::new());
        }
        let s = &self.settings.storage;
        let target = envelope::target_index(&s.index_template, &request.index, &request.collection);
        let pattern = || {
            s.index_template
                .contains("{collection}")
                .then(|| envelope::target_index(&s.index_template, &request.index, "*"))
        };
        match self.storage.index_state(&target, pattern).await {
            Ok(IndexState::Exists) => {}
            Ok(IndexState::UnknownIndex) => {
                return Err(RequestError::UnknownIndex(request.index.clone()));
            }
            Ok(IndexState::UnknownCollection) => {
                return Err(RequestError::UnknownCollection {
                    index: request.index.clone(),
                    collection: request.collection.clone(),
                });
            }
            Err(err) => return Err(RequestError::StorageRejected(err.to_string())),
        }

        let options = ItemOptions {
            target: &target,
            retry_on_conflict: request.retry_on_conflict,
            include_source: self.settings.response.include_source,
            metadata: s.kuzzle_metadata.then(|| Metadata {
                updated_at: now_millis(),
                updater: props.user_id.as_deref(),
            }),
        };
        // Bounded by item_retries, not by the backoff.
        let backoff = storage::backoff(s).build();
        let wait_for = request.refresh == Refresh::WaitFor;
        let send = |body: Vec<u8>, items: usize| self.coalescer.submit(body, items, wait_for);
        Ok(update::apply(&request.documents, &options, s.item_retries, backoff, send).await)
    }
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Runs the worker until `shutdown` is cancelled, reconnecting to the broker whenever
/// the connection is lost.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let metrics = Arc::new(Metrics::new());
    let processor = Arc::new(Processor::new(settings.clone(), metrics.clone())?);
    let background = CancellationToken::new();
    let _stop_background = background.clone().drop_guard();
    if !settings.metrics.listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&settings.metrics.listen).await?;
        info!(listen = %settings.metrics.listen, "metrics on /metrics, /healthz, /readyz");
        let (metrics, stop) = (metrics.clone(), background.clone());
        tokio::spawn(async move {
            tokio::select! {
                served = metrics::serve(listener, metrics) => {
                    if let Err(err) = served { warn!(error = %err, "metrics endpoint failed"); }
                }
                _ = stop.cancelled() => {}
            }
        });
    }
    tokio::spawn(probe_engine(processor.clone(), background.clone()));

    let tracker = TaskTracker::new();
    let mut backoff = reconnect_backoff();
    let mut first = true;
    while !shutdown.is_cancelled() {
        if !first {
            metrics.reconnects.inc();
        }
        first = false;
        let outcome = session(&settings, &processor, &tracker, &shutdown).await;
        metrics.set_broker_up(false);
        match outcome {
            Ok(()) => break,
            Err(err) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                warn!(error = %err, ?wait, "broker connection lost; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    tracker.close();
    tracker.wait().await;
    info!("worker stopped");
    Ok(())
}

/// Keeps `engine_up` current while no request is calling the engine.
async fn probe_engine(processor: Arc<Processor>, stop: CancellationToken) {
    loop {
        processor.storage.ping().await;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// One broker connection's life. `Ok` means a clean shutdown.
async fn session(
    settings: &Arc<Settings>,
    processor: &Arc<Processor>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let broker = Arc::new(Broker::connect(&settings.amqp).await?);
    if settings.amqp.declare {
        broker.declare(&settings.amqp).await?;
    }
    let reply_exchange = &settings.amqp.reply_exchange;
    if !reply_exchange.is_empty() {
        broker.check_exchange(reply_exchange).await.map_err(|err| {
            anyhow::anyhow!("amqp.reply_exchange \"{reply_exchange}\" is not usable: {err}")
        })?;
    }
    let mut consumer = broker.consume(&settings.amqp.request_queue).await?;
    processor.metrics.set_broker_up(true);
    info!(queue = %settings.amqp.request_queue, prefetch = settings.amqp.prefetch, "connected; consuming");
    // Cancelled by a task whose reply channel failed: the session must start over.
    let broken = CancellationToken::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = broken.cancelled() => anyhow::bail!("the reply channel failed"),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let (broker, processor, settings) = (broker.clone(), processor.clone(), settings.clone());
                    let broken = broken.clone();
                    tracker.spawn(async move {
                        if let Err(err) = handle(delivery, &broker, &processor, &settings).await {
                            // The broker redelivers the request: its channel is gone.
                            warn!(error = %err, "broker channel failed; the request will be redelivered");
                            broken.cancel();
                        }
                    });
                }
                Some(Err(err)) => return Err(err.into()),
                None => anyhow::bail!("the broker cancelled the consumer"),
            }
        }
    }
    info!("shutting down: no new requests; finishing those in flight");
    if let Err(err) = broker.cancel().await {
        warn!(error = %err, "could not cancel the consumer");
    }
    let grace = Duration::from_millis(settings.worker.shutdown_timeout_ms);
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            ?grace,
            "in-flight requests did not finish in time; the broker will redeliver them"
        );
    }
    broker.close().await;
    Ok(())
}

/// Processes one delivery, replies, and acks once the reply is confirmed. An error
/// means the broker connection failed; the delivery is then redelivered by the broker.
async fn handle(
    delivery: Delivery,
    broker: &Broker,
    processor: &Processor,
    settings: &Settings,
) -> Result<(), lapin::Error> {
    let metrics = &processor.metrics;
    metrics.in_flight.inc();
    let started = std::time::Instant::now();
    let handled = reply_and_settle(delivery, broker, processor, settings).await;
    metrics.in_flight.dec();
    metrics
        .request_seconds
        .observe(started.elapsed().as_secs_f64());
    handled
}

async fn reply_and_settle(
    delivery: Delivery,
    broker: &Broker,
    processor: &Processor,
    settings: &Settings,
) -> Result<(), lapin::Error> {
    let metrics = &processor.metrics;
    let props = broker::properties(&delivery);
    let hold = Duration::from_millis(settings.worker.max_hold_ms);
    let Ok(response) = tokio::time::timeout(hold, processor.process(&delivery.data, &props)).await
    else {
        warn!(
            ?hold,
            "request held too long (storage engine down?); requeueing it"
        );
        metrics.requeued.inc();
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        delivery.nack(requeue).await?;
        return Ok(());
    };
    let a = &settings.amqp;
    let destination = Destination::choose(
        props.reply_to.as_deref(),
        &a.reply_exchange,
        &a.reply_queue,
        &response.request_id,
    );
    let published = broker
        .publish_reply(
            &destination,
            &response.request_id,
            response.status,
            &response.body,
        )
        .await?;
    match published {
        Published::Confirmed => {
            delivery.ack(BasicAckOptions::default()).await?;
            metrics.reply(response.status);
        }
        Published::Unroutable => {
            metrics.unroutable_replies.inc();
            warn!(request_id = %response.request_id, ?destination,
                "reply could not be routed; rejecting the request to the dead-letter exchange");
            delivery
                .reject(BasicRejectOptions { requeue: false })
                .await?;
        }
        Published::Nacked => {
            warn!(request_id = %response.request_id, "broker refused the reply; requeueing the request");
            // Don't spin on a destination that keeps refusing.
            tokio::time::sleep(Duration::from_secs(1)).await;
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await?;
        }
    }
    Ok(())
}
