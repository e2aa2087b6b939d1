//! The pipeline, one delivery at a time: envelope → bulk update → response → reply →
//! settle. `Processor` turns a request's bytes into its answer; `Handler` carries one
//! delivery from the broker through the processor to its reply and settlement.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::BackoffBuilder;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::broker::port::{Delivery, Original};
use crate::broker::suspects::Suspicion;
use crate::broker::{Broker, Letter, Outgoing, Published, Refusing};
use crate::config::{Format, Settings};
use crate::error::RequestError;
use crate::lifecycle::delivery::{ChannelGone, Settlement, Ticket};
use crate::logs::Untrusted;
use crate::metrics::Metrics;
use crate::pipeline::bulk::{ItemOptions, Metadata};
use crate::pipeline::coalesce::{BatchLimits, BulkError, Coalescer};
use crate::pipeline::envelope::{self, Action, Echo, Properties, Refresh, Request};
use crate::pipeline::reply::{self, Destination};
use crate::pipeline::response::{self, Outcome, Response, Shape};
use crate::pipeline::write::{self, Ids};
use crate::security::rights::{Rights, Verdict};
use crate::storage::{self, Abandoned, IndexState, Storage, StorageError};

/// A request's answer, and what a smaller one is made from if the broker refuses its size.
pub struct Answer {
    pub response: Response,
    /// The Kuzzle action it answers, as the metrics label it (`metrics::action_label`).
    action: &'static str,
    /// Whether the request carries an identity of its own (the envelope's `requestId`):
    /// only then, or with a `message_id`, is it remembered as answered (`Answered`).
    identified: bool,
    documents: Option<(Echo, Request, Vec<Outcome>, Format)>,
    /// The request's span, for what is logged of it after processing.
    span: tracing::Span,
    /// Its reply destination is refused by the rights: the reason it is dead-lettered
    /// for, and the error (JSON) its dead letter carries. Nothing was applied.
    refused: Option<(&'static str, String)>,
}

impl Answer {
    fn plain(echo: &Echo, err: &RequestError) -> Self {
        Answer {
            response: response::error_response(echo, err),
            action: crate::metrics::action_label(echo),
            identified: false,
            documents: None,
            span: tracing::Span::none(),
            refused: None,
        }
    }

    /// A request whose reply may not go where it asks: dead-lettered, never applied.
    fn refused(echo: &Echo, verdict: Verdict, err: &RequestError) -> Self {
        let reason = match verdict {
            Verdict::Unauthorized => "reply_unauthorized",
            _ => "reply_forbidden",
        };
        Answer {
            identified: echo.own_id,
            refused: Some((reason, err.to_json().to_string())),
            ..Answer::plain(echo, err)
        }
    }

    /// Whether some of its documents were updated.
    fn applied(&self) -> bool {
        self.documents.as_ref().is_some_and(|(_, _, outcomes, _)| {
            outcomes
                .iter()
                .any(|o| matches!(o, Outcome::Written { .. }))
        })
    }

    /// The same statuses and counts without `_source` or document bodies, when there is
    /// anything to leave out.
    fn lean(&self) -> Option<Response> {
        let (echo, request, outcomes, format) = self.documents.as_ref()?;
        Some(response::documents_response(
            echo,
            request,
            outcomes,
            *format,
            Shape::Lean,
        ))
    }
}

/// Turns request bytes into a response, talking to the storage engine as needed.
pub struct Processor {
    settings: Arc<Settings>,
    storage: Arc<Storage>,
    coalescer: Coalescer,
    metrics: Arc<Metrics>,
    /// `None` when `security.enabled` is off.
    pub rights: Option<Rights>,
}

impl Processor {
    pub fn new(settings: Arc<Settings>, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let storage = Storage::new(&settings.storage, metrics.clone())?;
        Self::with_storage(settings, metrics, storage)
    }

    /// On `storage` (whose metrics are `metrics`) rather than the nodes of `storage.url`.
    pub fn with_storage(
        settings: Arc<Settings>,
        metrics: Arc<Metrics>,
        storage: Storage,
    ) -> anyhow::Result<Self> {
        let rights = Rights::from_settings(&settings.security)?;
        let storage = Arc::new(storage);
        let s = &settings.storage;
        let limits = BatchLimits {
            max_documents: s.bulk_max_documents,
            max_bytes: s.bulk_max_bytes,
            concurrent_bulks: s.concurrent_bulks,
            spread_documents: s.bulk_spread_documents,
            linger: Duration::from_millis(s.bulk_linger_ms),
            queue: usize::from(settings.amqp.prefetch),
            max_source_bytes: s.max_source_bytes,
        };
        let coalescer = Coalescer::start(storage.clone(), limits);
        Ok(Processor {
            settings,
            storage,
            coalescer,
            metrics,
            rights,
        })
    }

    /// The answer to a request, or `Abandoned` when `cancel` handed it back before its
    /// work was done (it is then delivered again). `redelivered`: the broker delivered it
    /// before (its writes' answers are read as a resend's).
    pub async fn process(
        &self,
        body: &[u8],
        props: &Properties,
        redelivered: bool,
        cancel: &CancellationToken,
    ) -> Result<Answer, Abandoned> {
        let s = &self.settings;
        let parsed = envelope::parse(body, props, &s.limits, &s.storage);
        let echo = parsed.echo;
        // Before anything is applied: a reply that may not go where it asks is never
        // published, and its request is dead-lettered unapplied.
        if let Err((verdict, err)) = self.destination(&echo.request_id, props) {
            let action = crate::metrics::action_label(&echo);
            self.metrics.rights(action, reply_outcome(verdict));
            info!(request_id = %Untrusted(&echo.request_id), status = err.status(), error = %Untrusted(&err.to_string()), "reply destination refused");
            return Ok(Answer::refused(&echo, verdict, &err));
        }
        let request = match parsed.request {
            Ok(request) => request,
            Err(err) => {
                info!(request_id = %Untrusted(&echo.request_id), status = err.status(), error = %Untrusted(&err.to_string()), "request refused");
                return Ok(Answer::plain(&echo, &err));
            }
        };
        if let Some(rights) = &self.rights {
            let action = echo
                .action
                .as_ref()
                .and_then(|a| a.as_str())
                .unwrap_or("mUpdate");
            let user = props.user_id.as_deref();
            let verdict = rights.check(user, action, &request.index, &request.collection);
            if let Err((verdict, err)) = verdict {
                self.metrics.rights(request.action_name(), verdict.label());
                info!(request_id = %Untrusted(&echo.request_id), status = err.status(), error = %Untrusted(&err.to_string()), "request refused");
                return Ok(Answer::plain(&echo, &err));
            }
            self.metrics.rights(request.action_name(), "allowed");
        }
        let span = info_span!("request", request_id = %Untrusted(&echo.request_id),
            index = %Untrusted(&request.index), collection = %Untrusted(&request.collection), documents = request.documents.len(),
            traceparent = props.traceparent.as_deref());
        async {
            let identity = if echo.own_id {
                Some(echo.request_id.as_str())
            } else {
                props.message_id.as_deref().filter(|id| !id.is_empty())
            };
            let outcomes = match self
                .write(&request, body, identity, props, redelivered, cancel)
                .await?
            {
                Ok(outcomes) => outcomes,
                Err(err) => {
                    info!(status = err.status(), error = %Untrusted(&err.to_string()), "request refused");
                    return Ok(Answer::plain(&echo, &err));
                }
            };
            self.metrics.outcomes(request.action_name(), &outcomes);
            for outcome in &outcomes {
                if let Outcome::Failed { status, reason, .. } = outcome {
                    debug!(status, reason = %Untrusted(reason), "document not updated");
                }
            }
            let format = s.response.format;
            let response =
                response::documents_response(&echo, &request, &outcomes, format, Shape::Full);
            Ok(Answer {
                response,
                action: request.action_name(),
                identified: echo.own_id,
                documents: Some((echo, request, outcomes, format)),
                span: tracing::Span::current(),
                refused: None,
            })
        }
        .instrument(span)
        .await
    }

    /// Where the reply to request `request_id` goes (SPEC section 5), under the rights
    /// when they are on; `Ok(None)` when no destination is possible.
    pub fn destination(
        &self,
        request_id: &str,
        props: &Properties,
    ) -> Result<Option<Destination>, (Verdict, RequestError)> {
        let a = &self.settings.amqp;
        let key = reply::reply_key(request_id, props.correlation_id.as_deref());
        let reply_to = props.reply_to.as_deref();
        let Some(destination) =
            Destination::choose(reply_to, &a.reply_exchange, &a.reply_queue, key)
        else {
            return Ok(None);
        };
        match &self.rights {
            Some(rights) => rights
                .reply_destination(props.user_id.as_deref(), destination)
                .map(Some),
            None => Ok(Some(destination)),
        }
    }

    /// Applies the request's documents; per-document outcomes in the request's order.
    /// `body` and `identity` (its `requestId`, else its `message_id`) make the ids it
    /// leaves to the worker (`write::Ids`).
    async fn write(
        &self,
        request: &envelope::Request,
        body: &[u8],
        identity: Option<&str>,
        props: &Properties,
        redelivered: bool,
        cancel: &CancellationToken,
    ) -> Result<Result<Vec<Outcome>, RequestError>, Abandoned> {
        if request.documents.is_empty() {
            return Ok(Ok(Vec::new()));
        }
        let s = &self.settings.storage;
        let template = s.target_template();
        let target = envelope::target_index(template, &request.index, &request.collection);
        let pattern = || {
            template
                .contains("{collection}")
                .then(|| envelope::target_index(template, &request.index, "*"))
        };
        match self.storage.index_state(&target, pattern, cancel).await {
            Ok(IndexState::Exists) => {}
            Ok(IndexState::UnknownIndex) => {
                return Ok(Err(RequestError::UnknownIndex(request.index.clone())));
            }
            Ok(IndexState::UnknownCollection) => {
                return Ok(Err(RequestError::UnknownCollection {
                    index: request.index.clone(),
                    collection: request.collection.clone(),
                }));
            }
            Err(StorageError::Abandoned) => return Err(Abandoned),
            Err(err) => return Ok(Err(RequestError::StorageRejected(err.to_string()))),
        }

        let options = ItemOptions {
            target: &target,
            retry_on_conflict: request.retry_on_conflict,
            include_source: asks_sources(request, self.settings.response.include_source),
            reply_source_bytes: self.settings.response.max_source_bytes,
            metadata: s.kuzzle_metadata.then(|| Metadata {
                updated_at: now_millis(),
                updater: props.user_id.as_deref(),
            }),
            single: request.single,
            ids: if request.action.generates_ids() {
                Ids::of(identity, props.user_id.as_deref(), body)
            } else {
                Ids::Random
            },
            echo_written: echoes_written(request, self.settings.response.include_source),
            redelivered,
        };
        // Bounded by item_retries, not by the backoff.
        let backoff = storage::backoff(s).build();
        let wait_for = request.refresh == Refresh::WaitFor;
        let rebuilds = request.action.rebuilds_stored();
        let send = |body: Vec<u8>, items: usize| {
            // Updates make the engine rebuild stored documents: the gate weighs them.
            let rebuilt = if rebuilds { items } else { 0 };
            self.coalescer
                .submit(body, items, rebuilt, wait_for, cancel)
        };
        let versions = |ids: Vec<String>| {
            let target = &target;
            async move {
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                self.storage
                    .versions(target, &ids, cancel)
                    .await
                    .map_err(|err| match err {
                        StorageError::Abandoned => BulkError::Abandoned,
                        StorageError::Refused { status, reason } => {
                            BulkError::Refused(status, reason)
                        }
                        other => BulkError::Refused(500, other.to_string()),
                    })
            }
        };
        let documents = &request.documents;
        let action = request.action;
        write::apply(
            documents,
            action,
            &options,
            s.item_retries,
            backoff,
            cancel,
            write::Engine { send, versions },
        )
        .await
        .map(Ok)
    }

    /// Whether the engine has been unavailable for at least `long`.
    pub fn engine_unavailable_for(&self, long: Duration) -> bool {
        self.storage
            .unavailable_for()
            .is_some_and(|down| down >= long)
    }

    /// One health call to the engine: whether it answers.
    pub async fn engine_answers(&self) -> bool {
        self.storage.ping().await
    }
}

/// The rights metric's outcome for a refused reply destination.
/// Whether a request's update items ask the engine for the stored document: its
/// `source` argument, else `response.include_source`; a single `upsert` only when
/// `source` is true, a single `update` always (as Kuzzle's: its answer carries the
/// stored `_kuzzle_info`). Whole documents and deletes never do.
fn asks_sources(request: &Request, include_source: bool) -> bool {
    match request.action {
        // Kuzzle's single update answers the stored metadata even without `source`.
        Action::Update if request.single => true,
        Action::Upsert if request.single => request.source == Some(true),
        Action::Update | Action::Upsert => request.source.unwrap_or(include_source),
        _ => false,
    }
}

/// Whether a request's reply carries what it wrote as each document's `_source`: a
/// whole document (always for the single forms, as Kuzzle's; for mCreate and mReplace
/// as `response.include_source`, for mCreateOrReplace as `source` too), and a single
/// `update` not asking the stored one (its changes and metadata, as Kuzzle answers it).
fn echoes_written(request: &Request, include_source: bool) -> bool {
    match request.action {
        Action::Update | Action::Upsert | Action::Delete => false,
        // As Kuzzle: only mCreateOrReplace takes `source` of these.
        Action::CreateOrReplace if !request.single => request.source.unwrap_or(include_source),
        _ => request.single || include_source,
    }
}

fn reply_outcome(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Unauthorized => "reply_unauthorized",
        _ => "reply_forbidden",
    }
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What handling a delivery comes to before anything is published.
pub enum Plan {
    /// Publish this answer there, then settle by what the broker says.
    Reply {
        answer: Box<Answer>,
        destination: Destination,
    },
    /// Settle without a reply.
    Settle(Settlement),
    /// Answered, but no reply destination is possible: dead-lettered.
    DeadLetter {
        answer: Box<Answer>,
        reason: &'static str,
    },
}

/// What became of a delivery's reply, and so of the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// The reply is confirmed: ack.
    Answered,
    /// Back to the queue.
    HandBack,
    /// To the dead-letter exchange, for this reason.
    DeadLetter(&'static str),
}

/// How a delivery's handling failed the session: its channel or connection is gone,
/// and the broker redelivers it.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("the broker connection failed: {0}")]
    Broker(#[from] crate::broker::BrokerError),
    #[error(transparent)]
    Settle(#[from] ChannelGone),
}

/// Carries deliveries through the processor to their reply and settlement.
pub struct Handler {
    pub processor: Arc<Processor>,
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    answered: Answered,
    /// Reply destinations that keep refusing, and the budget of refused replies waiting
    /// to be published again.
    refusing: Refusing,
    /// Direct reply-to addresses under suspicion of closing the replies' connection.
    suspects: crate::broker::suspects::Suspects,
    /// Per-document order of the requests received (module `order`).
    sequencer: Arc<crate::pipeline::order::Sequencer>,
    /// Room for request bytes in process, in KiB (`worker.max_processing_bytes`).
    room: Arc<tokio::sync::Semaphore>,
    room_kib: u32,
}

impl Handler {
    pub fn new(processor: Arc<Processor>) -> Self {
        let room_kib = u32::try_from(processor.settings.worker.max_processing_bytes / 1024)
            .unwrap_or(u32::MAX)
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS as u32);
        let worker = &processor.settings.worker;
        let answered = Answered::new(
            Duration::from_millis(worker.answered_window_ms),
            worker.answered_max_bytes,
        );
        Handler {
            refusing: Refusing::new(processor.settings.amqp.prefetch),
            settings: processor.settings.clone(),
            metrics: processor.metrics.clone(),
            processor,
            answered,
            suspects: Default::default(),
            sequencer: Arc::default(),
            room: Arc::new(tokio::sync::Semaphore::new(room_kib as usize)),
            room_kib,
        }
    }

    /// Waits for room for `bytes` of request (all of it for a larger one); `None` when
    /// the work is given up meanwhile.
    async fn room_for(
        &self,
        bytes: usize,
        cancel: &CancellationToken,
    ) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.room_kib);
        tokio::select! {
            permit = self.room.acquire_many(kib) => permit.ok(),
            _ = cancel.cancelled() => None,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Where deliveries take their turn, as they are received.
    pub fn sequencer(&self) -> &Arc<crate::pipeline::order::Sequencer> {
        &self.sequencer
    }

    /// Processes one delivery, replies, and settles it: acked once the reply is
    /// confirmed, dead-lettered when it can't be answered, requeued when its work is
    /// handed back (`cancel`, or held longer than `worker.max_hold_ms`).
    pub async fn handle(
        &self,
        delivery: Delivery,
        broker: &Broker,
        cancel: CancellationToken,
        mut turn: crate::pipeline::order::Turn,
    ) -> Result<(), HandleError> {
        let Delivery {
            tag,
            redelivered,
            body: data,
            props,
            original,
            acker,
        } = delivery;
        let acks = broker.acks().clone();
        let ticket = Ticket::new(tag, acker, acks, cancel, self.metrics.clone());
        let _in_flight = InFlight::new(&self.metrics);
        let work = ticket.cancel().clone();
        // Earlier requests of the same documents first; then room (waiting for a turn
        // while holding room could starve the earlier request of it).
        if !turn.wait(&work).await {
            self.metrics.requeued.inc();
            return Ok(ticket.settle(Settlement::Requeue).await?);
        }
        let Some(_room) = self.room_for(data.len(), &work).await else {
            self.metrics.requeued.inc();
            return Ok(ticket.settle(Settlement::Requeue).await?);
        };
        let planned = self.plan(&data, &props, redelivered, &work).await;
        // Its engine work is over: later requests of its documents may go.
        drop(turn);
        let (answer, fate) = match planned {
            Plan::Settle(settlement) => return Ok(ticket.settle(settlement).await?),
            Plan::DeadLetter { answer, reason } => (answer, Fate::DeadLetter(reason)),
            Plan::Reply {
                answer,
                destination,
            } => {
                let fate = self
                    .reply(&answer, &props, &destination, broker, &ticket)
                    .await?;
                (answer, fate)
            }
        };
        let settlement = match fate {
            Fate::Answered => {
                // Remembered before the ack goes: if the ack is lost, the redelivery is
                // known.
                if self.answered.insert(answer.identified, &data, &props) {
                    let window = self.answered.held_for().as_secs();
                    self.metrics.answered_window.set(window as i64);
                }
                Settlement::Ack
            }
            Fate::HandBack => Settlement::Requeue,
            Fate::DeadLetter(reason) => {
                let request_id = &answer.response.request_id;
                let applied = answer.applied();
                let error = answer.refused.as_ref().map(|(_, error)| error.as_str());
                let letter = Letter {
                    reason,
                    applied,
                    error,
                };
                let settled = self
                    .dead_letter(broker, &data, &original, &props, letter, request_id)
                    .await?;
                // Its dead letter is confirmed: a redelivery after a lost ack is acked
                // without a second dead letter (it is in the dead-letter queue already).
                if settled == Settlement::Ack {
                    self.answered.insert(answer.identified, &data, &props);
                }
                settled
            }
        };
        ticket.settle(settlement).await?;
        if fate == Fate::Answered {
            self.metrics.reply(answer.action, answer.response.status);
            debug!(parent: &answer.span, status = answer.response.status, "replied");
        }
        Ok(())
    }

    /// What a delivery comes to before anything is published: its answer and where it
    /// goes, or a settlement without a reply. Never panics, whatever the bytes and
    /// properties (a property test holds it to that).
    pub async fn plan(
        &self,
        data: &[u8],
        props: &Properties,
        redelivered: bool,
        cancel: &CancellationToken,
    ) -> Plan {
        if redelivered && self.answered.contains(data, props) {
            // Its reply was confirmed; only the ack was lost: don't apply it again.
            self.metrics.duplicates_skipped.inc();
            info!("redelivered request already answered; acking it without a second update");
            return Plan::Settle(Settlement::Ack);
        }
        let hold = Duration::from_millis(self.settings.worker.max_hold_ms);
        let processing = self.processor.process(data, props, redelivered, cancel);
        tokio::pin!(processing);
        let mut deadline = tokio::time::Instant::now() + hold;
        let processed = loop {
            tokio::select! {
                processed = &mut processing => break processed,
                _ = tokio::time::sleep_until(deadline) => {
                    // During an engine outage the pause hands every held request back,
                    // once per outage: handing it back here as well would cost it a
                    // delivery attempt per max_hold_ms (a quorum queue's delivery limit
                    // would dead-letter it).
                    if self.processor.engine_unavailable_for(Duration::ZERO) {
                        deadline += hold;
                        continue;
                    }
                    warn!(?hold, "request held too long; handing it back to the queue");
                    cancel.cancel();
                    break processing.await;
                }
            }
        };
        let Ok(answer) = processed else {
            self.metrics.requeued.inc();
            return Plan::Settle(Settlement::Requeue);
        };
        if let Some((reason, _)) = answer.refused {
            return Plan::DeadLetter {
                answer: Box::new(answer),
                reason,
            };
        }
        match self
            .processor
            .destination(&answer.response.request_id, props)
        {
            Ok(Some(destination)) => Plan::Reply {
                answer: Box::new(answer),
                destination,
            },
            Ok(None) => Plan::DeadLetter {
                answer: Box::new(answer),
                reason: "unroutable",
            },
            // The rules were reloaded meanwhile, and now refuse it.
            Err((verdict, err)) => {
                self.metrics.rights(answer.action, reply_outcome(verdict));
                let mut answer = answer;
                answer.refused = Some((reply_outcome(verdict), err.to_json().to_string()));
                Plan::DeadLetter {
                    answer: Box::new(answer),
                    reason: reply_outcome(verdict),
                }
            }
        }
    }

    /// Publishes the answer until the broker confirms it, smaller if it must; what then
    /// becomes of the delivery.
    async fn reply(
        &self,
        answer: &Answer,
        props: &Properties,
        destination: &Destination,
        broker: &Broker,
        ticket: &Ticket,
    ) -> Result<Fate, crate::broker::BrokerError> {
        let request_id = answer.response.request_id.as_str();
        let key = reply::reply_key(request_id, props.correlation_id.as_deref());
        let mut response = std::borrow::Cow::Borrowed(&answer.response);
        let mut shrunk = 0;
        let mut refusals = 0;
        let refusing = Refusing::key(destination, props.user_id.as_deref());
        let mut retrying = None;
        let direct = match destination {
            Destination::ReplyTo(address) if destination.is_direct() => Some(address.as_str()),
            _ => None,
        };
        let suspicion = direct.and_then(|address| self.suspects.of(address));
        // The address of a reply that goes on a connection of its own.
        let quarantined = direct.filter(|_| suspicion == Some(Suspicion::Suspect));
        if suspicion == Some(Suspicion::Proven) {
            warn!(
                ?destination,
                "a reply to this address closes the connection it goes on"
            );
            return Ok(Fate::DeadLetter("refused"));
        }
        loop {
            let reply = Outgoing {
                destination,
                key,
                request_id,
                status: response.status,
                body: &response.body,
                traceparent: props.traceparent.as_deref(),
                user_id: props.user_id.as_deref(),
            };
            // Alone after a refusal, or to a destination known to refuse: a refusal that
            // closes its channel then takes no other reply with it.
            let alone = refusals > 0 || refusing.as_ref().is_some_and(|r| self.refusing.known(r));
            let published = {
                let publish = async {
                    if let Some(address) = quarantined {
                        // Suspect or proven meanwhile: not for the shared connection.
                        let suspect = || self.suspects.of(address).is_some();
                        broker.publish_reply_quarantined(&reply, suspect).await
                    } else if !alone {
                        broker.publish_reply(&reply).await
                    } else {
                        broker.publish_reply_alone(&reply).await
                    }
                };
                tokio::pin!(publish);
                let published = tokio::select! {
                published = &mut publish => published,
                // Work given up (the connection lost, a pause, shutdown): a confirm still
                // due gets a little longer, then the delivery is handed back; one stuck on
                // a dead connection must not hold the next session up.
                _ = ticket.cancel().cancelled() => {
                    match tokio::time::timeout(CONFIRM_GRACE, &mut publish).await {
                        Ok(published) => published,
                        Err(_) => return Ok(Fate::HandBack),
                    }
                }
                };
                if let (Err(err), Some(address)) = (&published, direct)
                    && err.closed_by_the_broker()
                {
                    warn!(?destination, error = %err, "the broker closed the replies' connection while a reply to this address was under way: it is suspect");
                    self.suspects.suspect(address);
                }
                published?
            };
            if let Some(address) = quarantined {
                if published == Published::Confirmed {
                    self.suspects.cleared(address);
                } else if published == Published::Refused {
                    warn!(
                        ?destination,
                        "the broker closed a connection over a reply to this address"
                    );
                    self.suspects.proven(address);
                    return Ok(Fate::DeadLetter("refused"));
                }
            }
            match published {
                Published::Confirmed => {
                    if let Some(refusing) = &refusing {
                        self.refusing.confirmed(refusing);
                    }
                    return Ok(Fate::Answered);
                }
                // Back to the queue rather than wait on a blocked connection: the
                // session pauses while the broker blocks replies.
                Published::Unconfirmed => {
                    self.metrics.requeued.inc();
                    return Ok(Fate::HandBack);
                }
                Published::Unroutable => {
                    self.metrics.unroutable_replies.inc();
                    warn!(?destination, "reply could not be routed");
                    return Ok(Fate::DeadLetter("unroutable"));
                }
                Published::Refused => {
                    refusals += 1;
                    // Known to refuse, or refused through all its attempts: final, and
                    // known for a while longer.
                    let known = refusing.as_ref().is_some_and(|r| self.refusing.known(r));
                    if known || refusals >= self.settings.amqp.reply_attempts {
                        if let Some(refusing) = &refusing {
                            self.refusing.refused_for_good(refusing);
                        }
                        warn!(
                            ?destination,
                            refusals, known, "the broker keeps refusing the reply"
                        );
                        return Ok(Fate::DeadLetter("refused"));
                    }
                    // A turn to wait and publish again, within the budget, or give up.
                    if let (None, Some(refusing)) = (&retrying, &refusing) {
                        retrying = self.refusing.retry(refusing);
                        if retrying.is_none() {
                            warn!(
                                ?destination,
                                "reply refused, and the budget of refused replies is spent"
                            );
                            return Ok(Fate::DeadLetter("refused"));
                        }
                    }
                    let pause = reply_pause(refusals);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = ticket.cancel().cancelled() => return Ok(Fate::HandBack),
                    }
                }
                Published::TooLarge { limit } => {
                    self.metrics.replies_shrunk.inc();
                    shrunk += 1;
                    let size = response.body.len();
                    warn!(
                        size,
                        limit, "reply larger than the broker accepts; sending a smaller one"
                    );
                    response = match (shrunk, answer.lean()) {
                        (1, Some(lean)) => std::borrow::Cow::Owned(lean),
                        (1 | 2, _) => {
                            std::borrow::Cow::Owned(response::too_large_response(key, size, limit))
                        }
                        _ => return Ok(Fate::DeadLetter("too_large")),
                    };
                }
            }
        }
    }

    /// Dead-letters a request: published by the worker to `amqp.dead_letter_exchange`
    /// with headers saying why and whether its update was applied, then acked; rejected
    /// to the queue's own dead-letter exchange (without them) when there is none
    /// configured or that publish is not confirmed.
    async fn dead_letter(
        &self,
        broker: &Broker,
        data: &[u8],
        original: &Original,
        props: &Properties,
        letter: Letter<'_>,
        request_id: &str,
    ) -> Result<Settlement, crate::broker::BrokerError> {
        let (reason, applied) = (letter.reason, letter.applied);
        self.metrics.dead_lettered(reason);
        warn!(request_id = %Untrusted(request_id), reason, applied, "dead-lettering the request");
        let a = &self.settings.amqp;
        if a.dead_letter_exchange.is_empty() {
            return Ok(Settlement::DeadLetter);
        }
        let published = broker
            .dead_letter(
                &a.dead_letter_exchange,
                &a.request_queue,
                data,
                original,
                props.user_id.as_deref(),
                letter,
            )
            .await?;
        Ok(match published {
            Published::Confirmed => Settlement::Ack,
            other => {
                warn!(
                    request_id = %Untrusted(request_id),
                    ?other,
                    "the dead letter was not confirmed; rejecting the request instead"
                );
                Settlement::DeadLetter
            }
        })
    }
}

/// How long a reply's confirm is still awaited once its delivery's work is given up.
const CONFIRM_GRACE: Duration = Duration::from_secs(5);

/// The pause after a reply's `refusals`-th refusal: doubling from 0.5 s, at most 4 s, so
/// that the default attempts outlast a quorum reply queue's leader election (2 s here).
fn reply_pause(refusals: u32) -> Duration {
    Duration::from_millis((250u64 << refusals.min(4)).min(4000))
}

/// Counts a request in flight for as long as it lives, panics included.
struct InFlight<'a> {
    metrics: &'a Metrics,
    started: Instant,
}

impl<'a> InFlight<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.in_flight.inc();
        InFlight {
            metrics,
            started: Instant::now(),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        self.metrics
            .request_seconds
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Requests this worker answered lately, so that one redelivered only because its ack was
/// lost isn't applied a second time, after an update the client sent on the strength of
/// its reply.
///
/// **Why it can't drop a request.** A redelivery is skipped only when all of this holds:
/// the broker flags it redelivered; the request carries an identity of its own (the
/// envelope's `requestId`, else the `message_id` property; a request with neither is
/// always applied, byte-identical or not); and its identity, its verified `user_id`, its
/// other properties and every byte of its body are those of a request this worker
/// answered (its reply confirmed) within the window. The key is a 128-bit SipHash keyed
/// at random per process: a false match is out of reach by chance or by
/// design. A producer that reuses an id for the same bytes sends, by its own word, the
/// same request.
///
/// **The window**: `worker.answered_window_ms` (10 minutes), within
/// `worker.answered_max_bytes` (16 MiB, about 300,000 requests): at rates too high for
/// both, the oldest entries go first, one by one (never all at once), and
/// `mupdate_answered_window_seconds` shows the window actually held.
struct Answered {
    state: Mutex<AnsweredState>,
    /// The keys of the 128-bit SipHash of requests, random per process.
    keys: (u64, u64),
    window: Duration,
    most: usize,
}

#[derive(Default)]
struct AnsweredState {
    /// Keyed hashes already (`Answered::key`): a fast hash of them is safe.
    keys: std::collections::HashSet<u128, foldhash::fast::RandomState>,
    /// In the order they were answered.
    order: std::collections::VecDeque<(u128, tokio::time::Instant)>,
}

/// What one remembered request costs: its key in the order and in the set, with the
/// set's spare capacity.
const ANSWERED_ENTRY_BYTES: usize = 56;

impl Answered {
    fn new(window: Duration, max_bytes: usize) -> Self {
        Answered {
            state: Mutex::default(),
            keys: {
                // Drawn from the operating system's randomness (std's `RandomState`).
                use std::hash::BuildHasher;
                let random = std::hash::RandomState::new();
                (random.hash_one(0u8), random.hash_one(1u8))
            },
            window,
            most: max_bytes / ANSWERED_ENTRY_BYTES,
        }
    }

    fn key(&self, identity: &str, body: &[u8], props: &Properties) -> u128 {
        use siphasher::sip128::Hasher128;
        use std::hash::Hash;
        let mut hasher = siphasher::sip128::SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        (
            identity,
            &props.user_id,
            body,
            &props.correlation_id,
            &props.message_id,
            &props.reply_to,
        )
            .hash(&mut hasher);
        hasher.finish128().as_u128()
    }

    /// Whether this redelivered request was answered within the window.
    fn contains(&self, body: &[u8], props: &Properties) -> bool {
        // The envelope's requestId is in the body: the key covers it. Without a
        // message_id, whether the body names a requestId is only known once parsed, so
        // `insert` remembers only requests that have one.
        let identity = props.message_id.as_deref().unwrap_or("");
        let key = self.key(identity, body, props);
        let mut state = self.state.lock().expect("poisoned");
        state.expire(self.window);
        state.keys.contains(&key)
    }

    /// Remembers an answered request, if it has an identity of its own.
    fn insert(&self, identified: bool, body: &[u8], props: &Properties) -> bool {
        if self.most == 0 || !identified && props.message_id.is_none() {
            return false;
        }
        let identity = props.message_id.as_deref().unwrap_or("");
        let key = self.key(identity, body, props);
        let mut state = self.state.lock().expect("poisoned");
        state.expire(self.window);
        while state.order.len() >= self.most {
            state.forget_oldest();
        }
        if state.keys.insert(key) {
            state.order.push_back((key, tokio::time::Instant::now()));
        }
        true
    }

    /// How long ago the oldest remembered request was answered.
    fn held_for(&self) -> Duration {
        let state = self.state.lock().expect("poisoned");
        state
            .order
            .front()
            .map_or(Duration::ZERO, |(_, at)| at.elapsed())
    }
}

impl AnsweredState {
    fn expire(&mut self, window: Duration) {
        while self
            .order
            .front()
            .is_some_and(|(_, at)| at.elapsed() >= window)
        {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((key, _)) = self.order.pop_front() {
            self.keys.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::reply::SHORT_STRING_MAX;
    use proptest::prelude::*;

    fn props(message_id: Option<&str>, user_id: Option<&str>) -> Properties {
        Properties {
            message_id: message_id.map(str::to_owned),
            user_id: user_id.map(str::to_owned),
            ..Properties::default()
        }
    }

    #[test]
    fn a_request_without_an_id_of_its_own_is_never_remembered() {
        let answered = Answered::new(Duration::from_secs(600), 1 << 20);
        let on = br#"{"body":{"documents":[{"_id":"a","body":{"status":"on"}}]}}"#;
        assert!(!answered.insert(false, on, &props(None, None)));
        assert!(
            !answered.contains(on, &props(None, None)),
            "byte-identical, no id: applied"
        );
    }

    #[test]
    fn the_same_id_from_another_user_or_with_other_bytes_is_another_request() {
        let answered = Answered::new(Duration::from_secs(600), 1 << 20);
        let body = br#"{"requestId":"r1","body":{}}"#;
        assert!(answered.insert(true, body, &props(None, Some("alice"))));
        assert!(answered.contains(body, &props(None, Some("alice"))));
        assert!(!answered.contains(body, &props(None, Some("bob"))));
        assert!(!answered.contains(body, &props(None, None)));
        assert!(!answered.contains(
            br#"{"requestId":"r1","body":{"x":1}}"#,
            &props(None, Some("alice"))
        ));
        let with_message_id = props(Some("m1"), None);
        assert!(answered.insert(false, b"anything", &with_message_id));
        assert!(answered.contains(b"anything", &with_message_id));
        assert!(!answered.contains(b"anything", &props(Some("m2"), None)));
    }

    #[test]
    fn past_its_bytes_the_oldest_go_one_by_one_never_all_at_once() {
        let most = 1000;
        let answered = Answered::new(Duration::from_secs(600), most * ANSWERED_ENTRY_BYTES);
        let p = props(Some("m"), None);
        for i in 0..5 * most {
            answered.insert(true, format!("{i}").as_bytes(), &p);
        }
        // The latest `most` are all there; the one before them is gone.
        assert!((4 * most..5 * most).all(|i| answered.contains(format!("{i}").as_bytes(), &p)));
        assert!(!answered.contains(format!("{}", 4 * most - 1).as_bytes(), &p));
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_is_a_duration() {
        let answered = Answered::new(Duration::from_secs(600), 1 << 20);
        let p = props(Some("m"), None);
        answered.insert(true, b"x", &p);
        tokio::time::advance(Duration::from_secs(599)).await;
        assert!(answered.contains(b"x", &p));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!answered.contains(b"x", &p));
    }

    #[test]
    fn the_default_reply_attempts_outlast_a_leader_election() {
        let attempts = crate::config::Settings::load(None)
            .unwrap()
            .amqp
            .reply_attempts;
        let waited: Duration = (1..attempts).map(reply_pause).sum();
        assert!(waited >= Duration::from_secs(10), "{waited:?}");
        assert!((1..100).all(|n| reply_pause(n) <= Duration::from_secs(4)));
        assert_eq!(reply_pause(1), Duration::from_millis(500));
    }

    /// Item 9 of issue 19: a forbidden user's copy of another user's bytes, answered (a
    /// 403), is remembered as that user's: the allowed user's copy, redelivered, is
    /// processed, not skipped as answered.
    #[tokio::test]
    async fn a_forbidden_users_copy_of_another_users_bytes_is_not_remembered_as_theirs() {
        let rules = std::env::temp_dir().join(format!("rules-{}.toml", uuid::Uuid::new_v4()));
        let text = "[[allow]]\nusers = [\"alice\"]\nindexes = [\"shop\"]\ncollections = [\"*\"]\n";
        std::fs::write(&rules, text).unwrap();
        let mut settings = Settings::defaults();
        settings.storage.url = "http://127.0.0.1:9".into();
        settings.security.enabled = true;
        settings.security.rules_file = rules.display().to_string();
        let processor = Processor::new(Arc::new(settings), Arc::new(Metrics::new())).unwrap();
        std::fs::remove_file(&rules).unwrap();
        let handler = Handler::new(Arc::new(processor));
        let bytes = br#"{"index":"shop","collection":"c","controller":"document","action":"mUpdate","requestId":"r-1","body":{"documents":[{"_id":"a","body":{"n":1}}]}}"#;
        // The same message_id too: a refusal is remembered (its redelivery acked) only
        // when the request carries one.
        let (bob, alice) = (
            props(Some("m-1"), Some("bob")),
            props(Some("m-1"), Some("alice")),
        );

        // Bob's copy: a 403, answered and remembered as handle() does.
        let live = CancellationToken::new();
        let Plan::Reply { answer, .. } = handler.plan(bytes, &bob, false, &live).await else {
            panic!("bob's copy is answered");
        };
        assert_eq!(answer.response.status, 403);
        assert!(handler.answered.insert(answer.identified, bytes, &bob));

        // Alice's copy, redelivered: processed (here handed back, its engine call given
        // up), never acked as answered; bob's own redelivery is.
        let handed_back = CancellationToken::new();
        handed_back.cancel();
        let plan = handler.plan(bytes, &alice, true, &handed_back).await;
        assert!(
            matches!(plan, Plan::Settle(Settlement::Requeue)),
            "alice's copy processed"
        );
        let plan = handler.plan(bytes, &bob, true, &handed_back).await;
        assert!(
            matches!(plan, Plan::Settle(Settlement::Ack)),
            "bob's skipped"
        );
    }

    fn text(max: usize) -> impl Strategy<Value = Option<String>> {
        prop::option::of(prop_oneof![
            ".{0,300}",
            (0..=max).prop_map(|n| "é".repeat(n / 2)),
            (0..=max).prop_map(|n| "amq.rabbitmq.reply-to.".to_owned() + &"x".repeat(n)),
        ])
    }

    fn properties() -> impl Strategy<Value = Properties> {
        (text(65_536), text(65_536), text(65_536), text(65_536)).prop_map(
            |(reply_to, correlation_id, message_id, user_id)| Properties {
                reply_to,
                correlation_id,
                message_id,
                traceparent: user_id
                    .as_deref()
                    .and_then(crate::pipeline::envelope::trace_context)
                    .map(str::to_owned),
                user_id,
            },
        )
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            (".{0,70000}", any::<bool>()).prop_map(|(id, long)| {
                let id = if long { id.repeat(4) } else { id };
                serde_json::to_vec(&serde_json::json!({
                    "index": "i", "collection": "c", "controller": "document",
                    "action": "mUpdate", "requestId": id,
                    "body": {"documents": [{"_id": "a", "body": {"n": 1}}]}}))
                .unwrap()
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever arrives, handling it ends in a decision: a reply whose AMQP short
        /// strings fit, or a settlement. Valid requests meet an already handed-back
        /// token, so no engine is needed: they are requeued.
        #[test]
        fn every_delivery_comes_to_a_decision(data in body(), props in properties(), redelivered in any::<bool>()) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let mut settings = Settings::defaults();
                settings.storage.url = "http://127.0.0.1:9".into();
                let metrics = Arc::new(Metrics::new());
                let processor = Arc::new(Processor::new(Arc::new(settings), metrics).unwrap());
                let handler = Handler::new(processor);
                let handed_back = CancellationToken::new();
                handed_back.cancel();
                match handler.plan(&data, &props, redelivered, &handed_back).await {
                    Plan::Settle(_) | Plan::DeadLetter { .. } => {}
                    Plan::Reply { answer, destination } => {
                        let response = &answer.response;
                        let key = reply::reply_key(&response.request_id, props.correlation_id.as_deref());
                        let reply = Outgoing { destination: &destination, key, request_id: &response.request_id,
                            status: response.status, body: &response.body, traceparent: props.traceparent.as_deref(),
                            user_id: props.user_id.as_deref() };
                        let amqp = crate::broker::reply_properties(&reply);
                        let correlation = amqp.correlation_id.map_or(0, str::len);
                        prop_assert!(correlation <= SHORT_STRING_MAX);
                        prop_assert!(destination.route().0.len() <= SHORT_STRING_MAX);
                        prop_assert!(destination.route().1.len() <= SHORT_STRING_MAX);
                        let parsed: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
                        prop_assert_eq!(parsed["requestId"].as_str(), Some(response.request_id.as_str()));
                    }
                }
                Ok(())
            })?;
        }
    }
}
