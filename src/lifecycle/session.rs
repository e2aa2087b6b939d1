//! Session supervision: one broker connection's life (connect, declare, consume), the
//! pause while the engine is unavailable, reconnection, and shutdown.
//!
//! Every delivery's work is bounded by tokens that this module cancels: a consuming
//! period's (ended by a pause) and the session's (ended by a lost connection, or the
//! shutdown grace running out). A new period or session starts consuming only once the
//! work of the one before has stopped, so a redelivered request never runs beside its
//! abandoned copy in this worker.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use backon::BackoffBuilder;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::broker::port::{BrokerLink, Consumer, Delivery};
use crate::broker::{Broker, BrokerError};
use crate::config::{AmqpSettings, Settings};
use crate::lifecycle::delivery::{Settlement, Ticket};
use crate::lifecycle::prefetch::{Held, Sizing};
use crate::lifecycle::worker::{Handler, Processor};
use crate::metrics::{self, Metrics};

/// A session that consumed this long counts as healthy: the reconnect backoff restarts.
const HEALTHY: Duration = Duration::from_secs(5);
/// After the shutdown grace: time for handed-back requests to reach the broker.
const HAND_BACK: Duration = Duration::from_millis(700);
/// The most a consumer change (cancel, consume) may wait for the broker's answer.
const BROKER_CALL: Duration = Duration::from_secs(10);
/// How often the session checks whether the engine has been unavailable too long.
const ENGINE_CHECK: Duration = Duration::from_millis(250);

/// Runs the worker until `shutdown` is cancelled, reconnecting to the broker whenever
/// the connection is lost.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let link = Arc::new(crate::broker::lapin::Link::new(settings.amqp.clone()));
    let engine = crate::storage::http_nodes(&settings.storage)?;
    run_with(settings, link, engine, Arc::new(Metrics::new()), shutdown).await
}

/// `run`, with the broker behind `link` and the engine's nodes given (each behind the
/// engine port) rather than those of `amqp.url` and `storage.url`: how a model of the
/// broker and of the engine runs the worker. `metrics` are the worker's.
pub async fn run_with(
    settings: Settings,
    link: Arc<dyn BrokerLink>,
    engine: Vec<crate::storage::Node>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_hangups(settings, link, engine, metrics, shutdown, None).await
}

/// `run_with`, its SIGHUPs read from `hangups` (one `()` each) rather than from the
/// process's signal when given: how a simulation sends one to one worker of several.
pub async fn run_with_hangups(
    settings: Settings,
    link: Arc<dyn BrokerLink>,
    engine: Vec<crate::storage::Node>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    hangups: Option<tokio::sync::mpsc::Receiver<()>>,
) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let storage = crate::storage::Storage::with_nodes(&settings.storage, engine, metrics.clone())?;
    let processor = Arc::new(Processor::with_storage(
        settings.clone(),
        metrics.clone(),
        storage,
    )?);
    let handler = Arc::new(Handler::new(processor.clone()));
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
    tokio::spawn(reload_rights_on_sighup(
        processor.clone(),
        background.clone(),
        hangups,
    ));

    let mut backoff = reconnect_backoff();
    let mut nodes = Nodes::new(&settings.amqp);
    let mut first = true;
    // Across sessions: the work of a lost session holds its bytes until it ends.
    let held = Arc::new(Held::new(metrics.held_bytes.clone()));
    while !shutdown.is_cancelled() {
        if !first {
            metrics.reconnects.inc();
        }
        first = false;
        let mut session = Session {
            link: &link,
            settings: &settings,
            handler: &handler,
            shutdown: &shutdown,
            url: nodes.current(),
            consuming_since: None,
            held: held.clone(),
            sizing: Sizing::new(
                settings.amqp.prefetch,
                settings.amqp.max_held_bytes,
                settings.limits.max_message_bytes,
            ),
        };
        let outcome = session.run().await;
        metrics.set_broker_up(false);
        metrics.set_paused(false);
        let healthy = session
            .consuming_since
            .is_some_and(|t| t.elapsed() >= HEALTHY);
        if healthy {
            backoff = reconnect_backoff();
            nodes.round_starts();
        }
        match outcome {
            Ok(()) => break,
            Err(err) => {
                let node = crate::broker::node_name(nodes.current());
                // The next node of the cluster at once; a pause once all were tried.
                if nodes.advance() {
                    warn!(error = %err, %node, "broker node unavailable; trying the next one");
                    continue;
                }
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                warn!(error = %err, %node, ?wait, "broker connection lost; reconnecting");
                crate::lifecycle::systemd::reconnecting();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    info!("worker stopped");
    Ok(())
}

/// Keeps `engine_up` current while no request is calling the engine. Ends at `stop`,
/// even in the middle of a call to a frozen engine.
async fn probe_engine(processor: Arc<Processor>, stop: CancellationToken) {
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = processor.engine_answers() => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// SIGHUP reads the rights rules again; requests in flight are not disturbed, and a file
/// that doesn't load keeps the rules in force. Handled whether or not there are rules:
/// operators send it to reload, and its default action would end the process.
async fn reload_rights_on_sighup(
    processor: Arc<Processor>,
    stop: CancellationToken,
    given: Option<tokio::sync::mpsc::Receiver<()>>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut signalled, mut given) = match given {
        Some(given) => (None, Some(given)),
        None => match signal(SignalKind::hangup()) {
            Ok(hangup) => (Some(hangup), None),
            Err(_) => {
                warn!("SIGHUP can't be handled; sending it would end the worker");
                return;
            }
        },
    };
    loop {
        let hangup = async {
            match (&mut signalled, &mut given) {
                (Some(hangup), _) => hangup.recv().await,
                (_, Some(given)) => given.recv().await,
                _ => None,
            }
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            got = hangup => if got.is_none() { return },
        }
        let Some(rights) = &processor.rights else {
            info!("SIGHUP: nothing to reload (security.enabled is off)");
            continue;
        };
        match rights.reload() {
            Ok(rules) => info!(rules, "rights rules reloaded"),
            Err(err) => {
                warn!(error = %err, "rights rules not reloaded; the previous rules stay in force")
            }
        }
    }
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    crate::backoff::jittered(Duration::from_millis(200), Duration::from_secs(10)).build()
}

/// The broker nodes (`amqp.url`, comma-separated), tried in turn from a random first one,
/// so that several workers spread over a cluster's nodes.
struct Nodes {
    urls: Vec<String>,
    current: usize,
    /// Nodes tried since a session last went well.
    tried: usize,
}

impl Nodes {
    fn new(settings: &AmqpSettings) -> Self {
        let urls: Vec<String> = settings.urls().map(str::to_owned).collect();
        let current = (uuid::Uuid::new_v4().as_u128() % urls.len().max(1) as u128) as usize;
        Nodes {
            urls,
            current,
            tried: 0,
        }
    }

    fn current(&self) -> &str {
        &self.urls[self.current]
    }

    /// Moves to the next node; false once every node was tried in this round (then
    /// the caller backs off, and a new round starts).
    fn advance(&mut self) -> bool {
        self.current = (self.current + 1) % self.urls.len();
        self.tried += 1;
        if self.tried >= self.urls.len() {
            self.tried = 0;
            return false;
        }
        true
    }

    /// A session went well: the next failure starts a new round.
    fn round_starts(&mut self) {
        self.tried = 0;
    }
}

/// How a consumer's work ended.
enum End {
    Shutdown,
    Pause,
    /// Requests' sizes call for another prefetch (module `prefetch`).
    Resize,
    Failed(anyhow::Error),
}

struct Session<'a> {
    link: &'a Arc<dyn BrokerLink>,
    settings: &'a Arc<Settings>,
    handler: &'a Arc<Handler>,
    shutdown: &'a CancellationToken,
    /// The broker node of this session.
    url: &'a str,
    consuming_since: Option<Instant>,
    /// Bytes of the requests received and not yet settled.
    held: Arc<Held>,
    sizing: Sizing,
}

impl Session<'_> {
    /// Connects, declares the topology and checks the reply exchange: the broker of a
    /// session that can consume.
    async fn start_session(&self, session: &CancellationToken) -> anyhow::Result<Arc<Broker>> {
        let amqp = &self.settings.amqp;
        let broker = Arc::new(Broker::connect(self.link, amqp, self.url, session.clone()).await?);
        let node = crate::broker::node_name(self.url);
        let others: Vec<String> = amqp.urls().map(crate::broker::node_name).collect();
        let metrics = self.handler.metrics();
        metrics.set_broker_node(&node, others.iter().map(String::as_str));
        info!(%node, "connected");
        if amqp.declare {
            broker.declare(amqp).await?;
        }
        let reply_exchange = &amqp.reply_exchange;
        if !reply_exchange.is_empty() {
            broker.check_exchange(reply_exchange).await.map_err(|err| {
                anyhow::anyhow!("amqp.reply_exchange \"{reply_exchange}\" is not usable: {err}")
            })?;
        }
        Ok(broker)
    }

    /// One connection's life. `Ok` means a clean shutdown.
    async fn run(&mut self) -> anyhow::Result<()> {
        // Every broker call of this session gives up once it ends, however it ends.
        let session = CancellationToken::new();
        let _ended = session.clone().drop_guard();
        let starting = self.start_session(&session);
        let broker = tokio::select! {
            started = starting => started?,
            // Nothing is held yet: nothing to finish.
            _ = self.shutdown.cancelled() => return Ok(()),
        };
        let (amqp, metrics) = (&self.settings.amqp, self.handler.metrics().clone());
        // Cancelled by a handler whose channel failed: the session must start over.
        let broken = CancellationToken::new();
        loop {
            if let Some(why) = self.pause_reason(&broker) {
                crate::lifecycle::systemd::paused(why);
                match self.pause(&broker, &broken).await {
                    Some(End::Shutdown) => break,
                    Some(End::Failed(err)) => return Err(err),
                    _ => {}
                }
            }
            let tracker = TaskTracker::new();
            let period = session.child_token();
            let prefetch = self.sizing.prefetch();
            let mut consumer = tokio::select! {
                consumer = self.consume_with(&broker, prefetch) => consumer?,
                _ = self.shutdown.cancelled() => break,
            };
            metrics.set_broker_up(true);
            metrics.set_paused(false);
            self.consuming_since.get_or_insert_with(Instant::now);
            info!(queue = %amqp.request_queue, prefetch, "consuming");
            crate::lifecycle::systemd::consuming(&amqp.request_queue);
            // None: the end came between two consumers.
            let (end, consumer) = loop {
                let end = self
                    .consume(&mut consumer, &broker, &tracker, &period, &broken)
                    .await;
                let End::Resize = end else {
                    break (end, Some(consumer));
                };
                match self
                    .resize(consumer, &broker, &tracker, &period, &broken)
                    .await
                {
                    Ok(next) => consumer = next,
                    Err(end) => break (end, None),
                }
            };
            match end {
                End::Pause => {
                    metrics.pauses.inc();
                    metrics.set_paused(true);
                    let why = self.pause_reason(&broker).unwrap_or("unavailable");
                    warn!(why, "pausing consumption and handing held requests back");
                    crate::lifecycle::systemd::paused(why);
                    let stopped = self.stop_consuming(&broker, consumer).await;
                    period.cancel();
                    tracker.close();
                    // Calls already at the engine are awaited (a write may still land),
                    // unless shutdown comes first: then the grace bounds them.
                    tokio::select! {
                        _ = tracker.wait() => {}
                        _ = self.shutdown.cancelled() => {
                            self.drain(&broker, None, &tracker, &session).await;
                            break;
                        }
                    }
                    stopped?;
                }
                End::Shutdown => {
                    self.drain(&broker, consumer, &tracker, &session).await;
                    break;
                }
                End::Resize => unreachable!("a resize ends in another consumer or another end"),
                End::Failed(err) => {
                    // Calls already at the engine return or time out before the next
                    // session consumes the same requests again; a handler stuck on the
                    // dead connection itself doesn't hold the reconnection up for long.
                    session.cancel();
                    tracker.close();
                    let bound = Duration::from_millis(self.settings.storage.write_timeout_ms);
                    tokio::select! {
                        waited = tokio::time::timeout(bound, tracker.wait()) => if waited.is_err() {
                            warn!(tasks = tracker.len(), "requests of the lost session still running; reconnecting anyway");
                        },
                        _ = self.shutdown.cancelled() => {
                            let _ = tokio::time::timeout(HAND_BACK, tracker.wait()).await;
                        }
                    }
                    return Err(err);
                }
            }
        }
        let _ = tokio::time::timeout(HAND_BACK, broker.close()).await;
        Ok(())
    }

    /// Why consumption must pause now, if it must: the engine unavailable for
    /// `worker.pause_after_ms`, or replies blocked by a broker alarm.
    fn pause_reason(&self, broker: &Broker) -> Option<&'static str> {
        let pause_after = Duration::from_millis(self.settings.worker.pause_after_ms);
        if self.handler.processor.engine_unavailable_for(pause_after) {
            Some("the storage engine has been unavailable too long")
        } else if broker.replies_blocked() {
            Some("the broker blocks replies (a memory or disk alarm)")
        } else {
            None
        }
    }

    /// Consumes the request queue with `prefetch`, shown in its gauge.
    async fn consume_with(&self, broker: &Broker, prefetch: u16) -> Result<Consumer, BrokerError> {
        let consumer = broker
            .consume(&self.settings.amqp.request_queue, prefetch)
            .await?;
        self.handler.metrics().prefetch.set(prefetch.into());
        Ok(consumer)
    }

    /// Works on a delivery in a task of its own, its bytes counted as held until it is
    /// settled.
    fn start(
        &self,
        delivery: Delivery,
        broker: &Arc<Broker>,
        tracker: &TaskTracker,
        period: &CancellationToken,
        broken: &CancellationToken,
    ) {
        broker.acks().taken(delivery.tag);
        let hold = self.held.hold(delivery.body.len());
        // Its place among the requests touching its documents: taken here, in the order
        // deliveries arrive (module `order`).
        let turn = self.handler.sequencer().turn(&delivery.body);
        let (handler, broker) = (self.handler.clone(), broker.clone());
        let (cancel, broken) = (period.child_token(), broken.clone());
        // Boxed: the request's future is some kilobytes (every stage of its work, inline),
        // and the runtime moves a task's future by value as it spawns and ends it; a box
        // is moved as a pointer (docs/src/benchmarks.md, "The build profile").
        tracker.spawn(Box::pin(async move {
            let _hold = hold;
            if let Err(err) = handler.handle(delivery, &broker, cancel, turn).await {
                warn!(error = %err, "broker channel failed; the request will be redelivered");
                broken.cancel();
            }
        }));
    }

    /// Consumes again with the prefetch the requests' sizes call for: cancels the
    /// consumer, works on the deliveries it had already received, and consumes with as
    /// many as the room left by the bytes held allows (one at least). The work under way
    /// goes on throughout.
    async fn resize(
        &mut self,
        consumer: Consumer,
        broker: &Arc<Broker>,
        tracker: &TaskTracker,
        period: &CancellationToken,
        broken: &CancellationToken,
    ) -> Result<Consumer, End> {
        // A connection lost meanwhile fails the calls; one that hangs counts as lost.
        let failed = |err: BrokerError| End::Failed(err.into());
        let unanswered = |_| {
            End::Failed(anyhow::anyhow!(
                "the broker did not answer a consumer change"
            ))
        };
        let received = tokio::time::timeout(BROKER_CALL, broker.cancel(consumer))
            .await
            .map_err(unanswered)?
            .map_err(failed)?;
        for delivery in received {
            self.sizing.observe(delivery.body.len());
            self.start(delivery, broker, tracker, period, broken);
        }
        if self.shutdown.is_cancelled() {
            return Err(End::Shutdown);
        }
        if broken.is_cancelled() {
            return Err(End::Failed(anyhow::anyhow!("a broker channel failed")));
        }
        let prefetch = self.sizing.resize(self.held.bytes());
        let consumer = tokio::time::timeout(BROKER_CALL, self.consume_with(broker, prefetch))
            .await
            .map_err(unanswered)?
            .map_err(failed)?;
        info!(
            prefetch,
            held_bytes = self.held.bytes(),
            "consuming again, with a prefetch for the requests' sizes"
        );
        Ok(consumer)
    }

    /// Takes deliveries until shutdown, a failure, an engine unavailable too long, or
    /// requests whose sizes call for another prefetch.
    async fn consume(
        &mut self,
        consumer: &mut Consumer,
        broker: &Arc<Broker>,
        tracker: &TaskTracker,
        period: &CancellationToken,
        broken: &CancellationToken,
    ) -> End {
        let mut check = tokio::time::interval(ENGINE_CHECK);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return End::Shutdown,
                _ = broken.cancelled() => return End::Failed(anyhow::anyhow!("a broker channel failed")),
                _ = check.tick() => if self.pause_reason(broker).is_some() {
                    return End::Pause;
                },
                next = consumer.deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        let size = delivery.body.len();
                        self.start(delivery, broker, tracker, period, broken);
                        if self.sizing.received(size, self.held.bytes()) {
                            return End::Resize;
                        }
                    }
                    Some(Err(err)) => return End::Failed(err.into()),
                    None => return End::Failed(anyhow::anyhow!("the broker cancelled the consumer")),
                }
            }
        }
    }

    /// Waits, not consuming, until the engine answers again (or the broker connection
    /// is lost meanwhile: noticed within `ENGINE_CHECK`, even while a call to a frozen
    /// engine is under way).
    async fn pause(&self, broker: &Broker, broken: &CancellationToken) -> Option<End> {
        let metrics = self.handler.metrics();
        metrics.set_paused(true);
        loop {
            let answers = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Some(End::Shutdown),
                lost = lost(broker, broken) => return Some(lost),
                answers = self.handler.processor.engine_answers() => answers,
            };
            if answers && !broker.replies_blocked() {
                info!("storage engine answers and the broker takes replies; resuming consumption");
                return None;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Some(End::Shutdown),
                lost = lost(broker, broken) => return Some(lost),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Cancels the consumer and hands back the deliveries it had already received.
    async fn stop_consuming(
        &self,
        broker: &Broker,
        consumer: Option<Consumer>,
    ) -> anyhow::Result<()> {
        // None: already cancelled (between two consumers).
        let Some(consumer) = consumer else {
            return Ok(());
        };
        for delivery in broker.cancel(consumer).await? {
            let metrics = self.handler.metrics().clone();
            broker.acks().taken(delivery.tag);
            let ticket = Ticket::new(
                delivery.tag,
                delivery.acker,
                broker.acks().clone(),
                CancellationToken::new(),
                metrics.clone(),
            );
            ticket.settle(Settlement::Requeue).await?;
            metrics.requeued.inc();
        }
        Ok(())
    }

    /// Shutdown: no new requests; those in flight get `worker.shutdown_timeout_ms` to
    /// finish, then whatever is left is handed back.
    async fn drain(
        &self,
        broker: &Broker,
        consumer: Option<Consumer>,
        tracker: &TaskTracker,
        session: &CancellationToken,
    ) {
        info!("shutting down: no new requests; finishing those in flight");
        let grace = Duration::from_millis(self.settings.worker.shutdown_timeout_ms);
        let deadline = tokio::time::Instant::now() + grace;
        if let Err(err) = tokio::time::timeout(grace, self.stop_consuming(broker, consumer))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")))
        {
            warn!(error = %err, "could not cancel the consumer");
        }
        tracker.close();
        if tokio::time::timeout_at(deadline, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                ?grace,
                "in-flight requests did not finish in time; handing them back to the queue"
            );
            session.cancel();
            let _ = tokio::time::timeout(HAND_BACK, tracker.wait()).await;
        }
    }
}

/// Ends once the broker connection is lost or a handler's channel failed (`broken`). The
/// port has no signal for a lost connection: its state is read every `ENGINE_CHECK`.
async fn lost(broker: &Broker, broken: &CancellationToken) -> End {
    loop {
        if !broker.connected() {
            return End::Failed(anyhow::anyhow!(
                "the broker connection was lost while paused"
            ));
        }
        tokio::select! {
            biased;
            _ = broken.cancelled() => return End::Failed(anyhow::anyhow!("a broker channel failed")),
            _ = tokio::time::sleep(ENGINE_CHECK) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::port::{Call, EngineNode, Exchange};

    /// An engine node that never answers (a frozen engine: SIGSTOP, a long GC pause).
    struct Frozen;

    impl EngineNode for Frozen {
        fn exchange<'a>(&'a self, _call: Call<'a>) -> Exchange<'a> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_engine_probe_stops_at_once_even_on_a_frozen_engine() {
        let mut settings = Settings::defaults();
        settings.storage.timeout_ms = 30_000;
        let (settings, metrics) = (Arc::new(settings), Arc::new(Metrics::new()));
        let nodes = vec![crate::storage::Node::new("frozen".into(), Box::new(Frozen))];
        let storage =
            crate::storage::Storage::with_nodes(&settings.storage, nodes, metrics.clone()).unwrap();
        let processor = Arc::new(Processor::with_storage(settings, metrics, storage).unwrap());
        let stop = CancellationToken::new();
        let probe = tokio::spawn(probe_engine(processor, stop.clone()));
        // Its health call is under way, and will not be answered.
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.cancel();
        let stopped = tokio::time::timeout(Duration::from_millis(100), probe).await;
        assert!(
            stopped.is_ok(),
            "the probe ends at its stop, not at the call's timeout"
        );
    }

    #[test]
    fn nodes_are_tried_in_turn_and_a_round_ends_after_each_was_tried() {
        let mut settings = Settings::defaults().amqp;
        settings.url = "amqp://a:1, amqp://b:2 ,amqp://c:3".into();
        let mut nodes = Nodes::new(&settings);
        let first = nodes.current().to_owned();
        let mut seen = vec![first.clone()];
        assert!(nodes.advance());
        seen.push(nodes.current().to_owned());
        assert!(nodes.advance());
        seen.push(nodes.current().to_owned());
        assert!(!nodes.advance(), "all three tried: back off");
        assert_eq!(
            nodes.current(),
            first,
            "the next round starts where this one did"
        );
        seen.sort();
        assert_eq!(seen, ["amqp://a:1", "amqp://b:2", "amqp://c:3"]);
        // A session that went well starts a new round from wherever it is.
        assert!(nodes.advance());
        nodes.round_starts();
        assert!(nodes.advance() && nodes.advance());
        assert!(!nodes.advance());
    }
}
