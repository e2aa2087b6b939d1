//! The whole worker in the simulation: one to three workers (`session::run_with`, each
//! with its own sessions, handler, ticket, replies, pause and prefetch) consume one
//! request queue of the simulated broker (`broker.rs`) and write to the simulated engine
//! (`engine.rs`), on a current-thread runtime with paused time, every choice drawn from
//! the seed.
//!
//! Workload: clients that wait for each reply update shared documents in turn (each its
//! own counter `c{k}`, raised by one per request); producers that never wait, their
//! replies to a queue of their own, to a queue that does not exist (unroutable), to a
//! queue that refuses every publish (`x-max-length` 0, `reject-publish`: nacked), or to
//! the worker's reply queue; byte-identical requests without ids; a `requestId` used
//! again for other bytes or by another user; SIGHUPs at any moment (through
//! `session::run_with_hangups`), with rights rules written again before each (rules that
//! deny `bob` or not, now and then a file that does not load); oversize replies (the
//! broker's `max_message_size`, documents with a large field). Faults: SIGTERM (the
//! shutdown token) at any moment and a worker started again after it, connections and channels dropped,
//! consumers cancelled, memory alarms, engine outages (an overload of whole-call 429s, or
//! every connection refused), the engine's own faults, slow confirms and nacks.
//!
//! Invariants (each message of the clients is followed by its `traceparent`, which the
//! worker carries onto its reply and its dead letter):
//! 1. every delivery settled at most once (the broker fails a settlement of a delivery
//!    that is not unacked); at the end every message is acked or dead-lettered by the
//!    broker, none left;
//! 2. nothing acked that was not answered (a confirmed reply that reached a queue) or
//!    dead-lettered by the worker (confirmed), or skipped as a redelivery of the same
//!    request (same identity, bytes, user and properties) this same worker answered;
//! 3. a worker applies no request twice that it answered, while its answered set holds
//!    it (`worker.answered_max_bytes`, one by one);
//! 4. every reply that reached no queue is dead-lettered (`unroutable`), and no request
//!    whose reply queue exists is;
//! 5. no acknowledged update overwritten by an older one for clients that wait (a
//!    counter never goes down in the engine), but for the documented cases: a write
//!    given up after `write_timeout_ms` landing late, and a request redelivered after its
//!    reply (its ack lost) to a worker that does not know it answered it;
//! 6. each message is handed back no more often than the run's events can explain (an
//!    outage costs a request one delivery attempt at most: the pause);
//! 7. every worker exits within `worker.shutdown_timeout_ms` + 2 s of its shutdown;
//! 8. the bytes a worker holds stay within `amqp.max_held_bytes` + (its highest
//!    prefetch + 1) × the largest request (what module `prefetch` allows over the bound:
//!    the deliveries of the consumer in force when larger requests came, and the one the
//!    next consumer takes at least);
//! 10. a session starts again only after a broker fault that ends one;
//! 11. held bytes and unconfirmed publishes within a bound from the settings (`sampler`);
//! 12. one delivery, one end: answered or dead-lettered, once, never both;
//! 13. after a reply refused for its size, the smaller one (`check_smaller`);
//! 14. rights after a SIGHUP are the new ones (`check_rights`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mupdate_worker::broker::port::Value;
use mupdate_worker::config::{QueueType, Settings};
use mupdate_worker::metrics::Metrics;
use mupdate_worker::storage::Node;
use mupdate_worker::storage::port::{Answer, Call, EngineNode, Exchange, Failure, FailureKind};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Map, Value as Json, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::{BrokerFaults, Event, Props, SimBroker};
use crate::engine::{Faults, SimEngine, State, Writer};
use crate::trace::Trace;

const INDEX: &str = "shop";
const COLLECTION: &str = "c";
const TARGET: &str = "&shop.c";
const REQUESTS: &str = "mupdate.requests";
/// No run may take longer, in virtual time.
const RUN_BOUND: Duration = Duration::from_secs(3600);
const REASON: &str = "x-mupdate-reason";

/// What one run did.
#[derive(Debug, Default)]
pub struct Summary {
    requests: u64,
    deliveries: u64,
    redeliveries: u64,
    replies: u64,
    dead_letters: u64,
    shutdowns: u64,
    faults: u64,
    documented_stale: u64,
    sighups: u64,
    forbidden: u64,
    size_refusals: u64,
    shrunk: u64,
    too_large: u64,
    peak_in_flight: usize,
    virtual_time: Duration,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests, {} deliveries ({} redelivered), {} replies, {} dead letters, {} SIGTERMs, {} SIGHUPs, {} rights refusals, {} publishes refused for their size ({} replies sent again smaller, {} dead-lettered too_large), {} broker and engine outages, {} stale writes of the documented kinds, peak bytes held and in flight {}, {:.1?} virtual",
            self.requests,
            self.deliveries,
            self.redeliveries,
            self.replies,
            self.dead_letters,
            self.shutdowns,
            self.sighups,
            self.forbidden,
            self.size_refusals,
            self.shrunk,
            self.too_large,
            self.faults,
            self.documented_stale,
            self.peak_in_flight,
            self.virtual_time
        )
    }
}

impl Summary {
    pub fn add(&mut self, s: &Summary) {
        self.requests += s.requests;
        self.deliveries += s.deliveries;
        self.redeliveries += s.redeliveries;
        self.replies += s.replies;
        self.dead_letters += s.dead_letters;
        self.shutdowns += s.shutdowns;
        self.faults += s.faults;
        self.documented_stale += s.documented_stale;
        self.sighups += s.sighups;
        self.forbidden += s.forbidden;
        self.size_refusals += s.size_refusals;
        self.shrunk += s.shrunk;
        self.too_large += s.too_large;
        self.peak_in_flight = self.peak_in_flight.max(s.peak_in_flight);
        self.virtual_time += s.virtual_time;
    }
}

/// One seed's run of the whole worker: its summary or what failed, and its trace.
pub fn run(seed: u64, echo: bool) -> (Result<Summary, String>, Trace) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime");
    fastrand::seed(seed ^ 0x5eed);
    if echo && std::env::var_os("SIM_LOGS").is_some() {
        // The worker's own logs among the trace's events (wall-clock times left out).
        let _ = tracing_subscriber::fmt()
            .without_time()
            .with_max_level(tracing::Level::INFO)
            .try_init();
    }
    let trace = runtime.block_on(async { Trace::new(echo) });
    let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
        runtime.block_on(simulate(seed, trace.clone()))
    }));
    drop(runtime);
    let result = ran.unwrap_or_else(|panic| {
        Err(format!(
            "lifecycle: panicked: {}",
            crate::panic_message(&*panic)
        ))
    });
    (result, trace)
}

/// An engine outage the run draws: whole-call 429s (an overload), or nothing taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outage {
    None,
    Overload,
    Down,
}

/// The simulated engine node, behind a switch for outages.
struct Switched {
    inner: SimEngine,
    outage: Arc<Mutex<Outage>>,
}

impl EngineNode for Switched {
    fn exchange<'a>(&'a self, call: Call<'a>) -> Exchange<'a> {
        let outage = *self.outage.lock().unwrap();
        match outage {
            Outage::None => self.inner.exchange(call),
            Outage::Down => Box::pin(async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Err(Failure {
                    kind: FailureKind::NeverSent,
                    message: "connection refused".into(),
                })
            }),
            Outage::Overload if call.path.ends_with("_bulk") => Box::pin(async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let reason = "rejected execution of coordinating operation";
                Ok(Answer {
                    status: 429,
                    body: serde_json::to_vec(&json!({"error": {
                        "root_cause": [{"type": "es_rejected_execution_exception", "reason": reason}],
                        "type": "es_rejected_execution_exception", "reason": reason}, "status": 429}))
                    .unwrap(),
                })
            }),
            // Reads answer during an overload.
            Outage::Overload => self.inner.exchange(call),
        }
    }
}

/// `_id` → the changes of each of a request's entries.
type Changes = Vec<(String, Map<String, Json>)>;

/// A client's message, as the invariants follow it.
#[derive(Debug, Clone)]
struct Sent {
    label: String,
    /// The broker's number for it.
    msg: u64,
    body: Vec<u8>,
    props: Props,
    /// Whether it names itself (a `requestId`, or a `message_id`).
    identified: bool,
    /// Its reply queue: a client's, or one that does not exist, or one that refuses.
    to: Route,
    changes: Changes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Exists,
    Unroutable,
    Refusing,
}

struct Run {
    broker: SimBroker,
    state: Arc<Mutex<State>>,
    trace: Trace,
    settings: Settings,
    sent: Mutex<Vec<Sent>>,
    violations: Mutex<Vec<String>>,
    next_trace: Mutex<u64>,
    /// Events that hand deliveries back (SIGTERMs, faults, outages, pauses).
    hand_backs: Mutex<u64>,
    summary: Mutex<Summary>,
    /// Live workers' metrics (instance, metrics), for the held bytes.
    live: Mutex<Vec<(u32, Arc<Metrics>)>>,
    largest: Mutex<usize>,
    /// Sessions the workers started again.
    reconnects: Mutex<u64>,
    /// The rights rules, when `security.enabled`.
    rules: Mutex<Option<RulesFile>>,
    /// Workers starting now (their rules file read when first polled).
    starting: Mutex<u32>,
    /// Live workers' SIGHUP senders.
    hangups: Mutex<Vec<(u32, mpsc::Sender<()>)>>,
    /// The most a worker's publish may weigh: 4 × the largest request + 256 per
    /// document + the documents' sources (module `workload`'s bound on replies).
    largest_source: usize,
}

/// The rights rules of a run with `security.enabled`: one file, written again before
/// each SIGHUP. Rules that deny `bob` (the other producer users and the clients'
/// `carol` always allowed), or allow every user; replies may go to any queue.
struct RulesFile {
    path: PathBuf,
    /// Whether the rules in force (the last file that loaded) deny `bob`.
    denies_bob: bool,
    /// Whether the file does not load now (an operator's typo, fixed soon after).
    broken: bool,
}

impl RulesFile {
    fn write(&mut self, denies_bob: Option<bool>) {
        let text = match denies_bob {
            None => "[[allow]\nusers = [\"*\"".to_owned(),
            Some(denies) => {
                let users = if denies {
                    r#""alice", "carol""#
                } else {
                    r#""*""#
                };
                format!(
                    "[[allow]]\nusers = [{users}]\nindexes = [\"{INDEX}\"]\ncollections = [\"*\"]\n\n[[reply]]\nusers = [\"*\"]\nqueues = [\"*\"]\n"
                )
            }
        };
        std::fs::write(&self.path, text).expect("the rules file written");
        self.broken = denies_bob.is_none();
        if let Some(denies) = denies_bob {
            self.denies_bob = denies;
        }
    }
}

impl Run {
    fn violation(&self, what: String) {
        self.trace.event(format!("VIOLATION: {what}"));
        self.violations.lock().unwrap().push(what);
    }

    /// Publishes a client's request to the request queue, once a worker declared it.
    async fn publish(
        &self,
        label: String,
        body: Vec<u8>,
        mut props: Props,
        identified: bool,
        to: Route,
        changes: Changes,
    ) -> Sent {
        let number = {
            let mut n = self.next_trace.lock().unwrap();
            *n += 1;
            *n
        };
        props.headers.push((
            "traceparent".into(),
            Value::LongString(traceparent(number).into_bytes().into()),
        ));
        {
            let mut largest = self.largest.lock().unwrap();
            *largest = (*largest).max(body.len());
        }
        while !self.broker.exists(REQUESTS) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let msg = self
            .broker
            .client_publish(REQUESTS, body.clone(), props.clone());
        self.trace.event(format!("{label}: sent as message {msg}"));
        self.summary.lock().unwrap().requests += 1;
        let sent = Sent {
            label,
            msg,
            body,
            props,
            identified,
            to,
            changes,
        };
        self.sent.lock().unwrap().push(sent.clone());
        sent
    }
}

fn traceparent(n: u64) -> String {
    format!("00-{n:032x}-00000000000000a1-01")
}

/// A request's body: entries on `ids` setting `field` to `value`.
fn request(
    rng: &mut StdRng,
    ids: &[String],
    field: &str,
    value: i64,
    request_id: Option<&str>,
) -> (Vec<u8>, Changes) {
    let upsert = rng.random_bool(0.3);
    let mut documents = Vec::new();
    let mut changes = Vec::new();
    for _ in 0..rng.random_range(1..=3) {
        let id = ids[rng.random_range(0..ids.len())].clone();
        let mut body = Map::new();
        body.insert(field.into(), json!(value));
        changes.push((id.clone(), body.clone()));
        documents.push(if upsert {
            json!({"_id": id, "changes": body, "default": {"created": true}})
        } else {
            json!({"_id": id, "body": body})
        });
    }
    let mut envelope = json!({
        "index": INDEX, "collection": COLLECTION, "controller": "document",
        "action": if upsert { "mUpsert" } else { "mUpdate" },
        "body": {"documents": documents},
    });
    if let Some(id) = request_id {
        envelope["requestId"] = json!(id);
    }
    if rng.random_bool(0.5) {
        envelope["retryOnConflict"] = json!(rng.random_range(0..=3));
    }
    (serde_json::to_vec(&envelope).unwrap(), changes)
}

fn settings(rng: &mut StdRng, outages: bool) -> Settings {
    let mut settings = Settings::defaults();
    settings.metrics.listen.clear();
    let a = &mut settings.amqp;
    a.url = "amqp://sim:5672".into();
    a.prefetch = rng.random_range(1..=20);
    a.max_held_bytes = rng.random_range(1..=32) * 1024;
    a.reply_attempts = rng.random_range(1..=3);
    a.max_unconfirmed_replies = rng.random_range(1..=4);
    a.confirm_timeout_ms = rng.random_range(1000..=5000);
    if rng.random_bool(0.5) {
        a.queue_type = QueueType::Quorum;
        a.delivery_limit = rng.random_range(2..=6);
    }
    let w = &mut settings.worker;
    w.shutdown_timeout_ms = rng.random_range(500..=5000);
    w.pause_after_ms = rng.random_range(1000..=5000);
    w.max_hold_ms = if outages { 3000 } else { 120_000 };
    w.answered_window_ms = 3_600_000;
    if rng.random_bool(0.5) {
        // Room for a few requests only: the oldest go one by one.
        w.answered_max_bytes = 56 * rng.random_range(2..=12);
    }
    settings.limits.max_message_bytes = 64 * 1024;
    let s = &mut settings.storage;
    s.url = "http://sim:9200".into();
    s.kuzzle_metadata = false;
    s.timeout_ms = 1000;
    s.write_timeout_ms = 5000;
    s.retry_min_delay_ms = 50;
    s.retry_max_delay_ms = 1000;
    s.item_retries = rng.random_range(0..=3);
    s.bulk_max_documents = rng.random_range(2..=50);
    s.concurrent_bulks = rng.random_range(1..=4);
    s.bulk_linger_ms = if rng.random_bool(0.3) {
        rng.random_range(1..=20)
    } else {
        0
    };
    settings.response.include_source = rng.random_bool(0.5);
    settings
}

pub async fn simulate(seed: u64, trace: Trace) -> Result<Summary, String> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x11fe_c1c1e);
    let outages = rng.random_bool(0.3);
    let mut settings = settings(&mut rng, outages);
    // The workloads added later draw from a generator of their own: the others' draws
    // stay those of before.
    let mut x_rng = StdRng::seed_from_u64(seed ^ 0x0051_6a0e_512e);
    let security = x_rng.random_bool(0.3);
    let oversize = x_rng.random_bool(0.25);
    let blob = if oversize {
        x_rng.random_range(0..=3000)
    } else {
        0
    };
    let max_message_size = oversize.then(|| x_rng.random_range(100..=4000usize));
    let sighups = if x_rng.random_bool(0.6) {
        x_rng.random_range(1..=4u32)
    } else {
        0
    };
    let rules = security.then(|| {
        let dir = std::env::temp_dir().join(format!("mupdate-sim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for the rules file");
        let mut rules = RulesFile {
            path: dir.join(format!("{seed}.toml")),
            denies_bob: false,
            broken: false,
        };
        rules.write(Some(x_rng.random_bool(0.5)));
        settings.security.enabled = true;
        settings.security.rules_file = rules.path.display().to_string();
        rules
    });
    let storm = if outages {
        0.0
    } else {
        rng.random_range(0.0..1.0f64).powi(3)
    };
    let faults = Faults {
        never_sent: 0.03 * storm,
        whole_429: 0.05 * storm,
        server_error: 0.05 * storm,
        broken: 0.03 * storm,
        freeze: 0.01 * storm,
        slow: 0.05 * storm,
        too_slow: 0.02 * storm,
        item_429: 0.1 * storm,
        conflict: 0.1 * storm,
        slow_after: Duration::from_millis(settings.storage.timeout_ms),
    };
    let broker_storm = rng.random_range(0.0..1.0f64).powi(2);
    let broker_faults = BrokerFaults {
        slow_confirm: 0.1 * broker_storm,
        nack: 0.02 * broker_storm,
        refuse_connect: 0.1 * broker_storm,
        // A lost ack's redelivery meets a small answered set (full, it forgets its
        // oldest) more often.
        lost_ack: 0.05 * broker_storm
            + match settings.worker.answered_max_bytes <= 56 * 12 && x_rng.random_bool(0.5) {
                true => 0.1,
                false => 0.0,
            },
    };
    let shared_rng = Arc::new(Mutex::new(StdRng::seed_from_u64(rng.random())));
    let broker = SimBroker::new(shared_rng.clone(), trace.clone(), broker_faults);
    let state = Arc::new(Mutex::new(State::default()));
    let ids: Vec<String> = (0..rng.random_range(1..=4))
        .map(|i| format!("d{i}"))
        .collect();
    {
        let mut state = state.lock().unwrap();
        state.indexes.insert(TARGET.into());
        for id in &ids {
            let doc = state.docs.entry((TARGET.into(), id.clone())).or_default();
            let mut source = json!({"n": 0});
            if blob > 0 {
                source["blob"] = json!("b".repeat(blob));
            }
            doc.versions.push(crate::engine::Version {
                version: 1,
                source: source.as_object().unwrap().clone(),
                writer: Writer::Seed,
            });
        }
    }
    let workers = rng.random_range(1..=3u32);
    let clients = rng.random_range(1..=3);
    let producers = rng.random_range(0..=2);
    broker.state().max_message_size = max_message_size;
    trace.event(format!(
        "seed {seed} (lifecycle): {workers} workers, {clients} clients, {producers} producers, outages {outages}, security {security}, {sighups} SIGHUPs, max_message_size {max_message_size:?}, blob {blob}, prefetch {}, max_held_bytes {}, queue {:?} limit {}, shutdown_timeout_ms {}, pause_after_ms {}, answered_max_bytes {}, engine storm {storm:.2}, broker {broker_faults:?}",
        settings.amqp.prefetch,
        settings.amqp.max_held_bytes,
        settings.amqp.queue_type,
        settings.amqp.delivery_limit,
        settings.worker.shutdown_timeout_ms,
        settings.worker.pause_after_ms,
        settings.worker.answered_max_bytes,
    ));
    for k in 0..clients {
        broker.declare(&format!("client-{k}"), &[]);
    }
    for k in 0..producers {
        broker.declare(&format!("sink-{k}"), &[]);
        broker.declare(
            &format!("full-{k}"),
            &[
                ("x-max-length", Value::LongLongInt(0)),
                (
                    "x-overflow",
                    Value::LongString(b"reject-publish".to_vec().into()),
                ),
            ],
        );
    }
    let run = Arc::new(Run {
        broker: broker.clone(),
        state: state.clone(),
        trace: trace.clone(),
        settings: settings.clone(),
        sent: Mutex::default(),
        violations: Mutex::default(),
        next_trace: Mutex::new(0),
        hand_backs: Mutex::new(0),
        summary: Mutex::default(),
        live: Mutex::default(),
        largest: Mutex::new(0),
        reconnects: Mutex::new(0),
        rules: Mutex::new(rules),
        starting: Mutex::new(0),
        hangups: Mutex::default(),
        largest_source: blob + 512,
    });
    let outage = Arc::new(Mutex::new(Outage::None));
    let done = CancellationToken::new();

    // The workers: each slot runs a worker, SIGTERMs it at a random moment (or never),
    // checks that it exits in time, and starts another.
    let grace = Duration::from_millis(settings.worker.shutdown_timeout_ms);
    let instances = Arc::new(Mutex::new(0u32));
    let mut slots = Vec::new();
    for _ in 0..workers {
        let (run, done, outage) = (run.clone(), done.clone(), outage.clone());
        let (state, engine_rng, instances) = (state.clone(), shared_rng.clone(), instances.clone());
        let mut slot_rng = StdRng::seed_from_u64(rng.random());
        let sigterms = if slot_rng.random_bool(0.5) {
            slot_rng.random_range(1..=2)
        } else {
            0
        };
        slots.push(tokio::spawn(async move {
            let mut left = sigterms;
            loop {
                let instance = {
                    let mut n = instances.lock().unwrap();
                    *n += 1;
                    *n
                };
                let nodes: Vec<Node> = (0..2)
                    .map(|i| {
                        let engine = SimEngine::new(
                            state.clone(),
                            engine_rng.clone(),
                            faults,
                            run.trace.clone(),
                            i,
                            instance,
                        );
                        let switched = Switched {
                            inner: engine,
                            outage: outage.clone(),
                        };
                        Node::new(format!("sim-{i}"), Box::new(switched))
                    })
                    .collect();
                let metrics = Arc::new(Metrics::new());
                // Not on a rules file that does not load (the worker would not start).
                while run.rules.lock().unwrap().as_ref().is_some_and(|r| r.broken) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                *run.starting.lock().unwrap() += 1;
                if let Some(rules) = &*run.rules.lock().unwrap() {
                    run.broker.mark(Event::Rights {
                        worker: instance,
                        denies_bob: rules.denies_bob,
                        read: true,
                    });
                }
                let (hangup, hangups) = mpsc::channel(1);
                run.hangups.lock().unwrap().push((instance, hangup));
                run.live.lock().unwrap().push((instance, metrics.clone()));
                let token = CancellationToken::new();
                run.trace.event(format!("worker {instance} starts"));
                let mut worker =
                    tokio::spawn(mupdate_worker::lifecycle::session::run_with_hangups(
                        run.settings.clone(),
                        run.broker.link(instance),
                        nodes,
                        metrics.clone(),
                        token.clone(),
                        Some(hangups),
                    ));
                {
                    // Its rules read (its first poll) before the file may change again.
                    let run = run.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        *run.starting.lock().unwrap() -= 1;
                    });
                }
                let sigterm = if left > 0 {
                    left -= 1;
                    Duration::from_millis(slot_rng.random_range(0..20_000))
                } else {
                    RUN_BOUND
                };
                let ended_early = tokio::select! {
                    biased;
                    _ = done.cancelled() => false,
                    _ = tokio::time::sleep(sigterm) => false,
                    _ = &mut worker => true,
                };
                if ended_early {
                    run.violation(format!("worker {instance} ended before its shutdown"));
                    return;
                }
                let last = done.is_cancelled();
                run.trace.event(format!("SIGTERM to worker {instance}"));
                if !last {
                    run.summary.lock().unwrap().shutdowns += 1;
                    *run.hand_backs.lock().unwrap() += 1;
                }
                token.cancel();
                let bound = grace + Duration::from_secs(2);
                match tokio::time::timeout(bound, &mut worker).await {
                    Ok(Ok(Ok(()))) => run.trace.event(format!("worker {instance} exited")),
                    Ok(other) => {
                        run.violation(format!("worker {instance} ended with {other:?}"));
                    }
                    Err(_) => {
                        run.violation(format!(
                            "worker {instance} still running {bound:?} after its SIGTERM"
                        ));
                        worker.abort();
                    }
                }
                let pauses = metrics.pauses.get();
                *run.hand_backs.lock().unwrap() += pauses;
                *run.reconnects.lock().unwrap() += metrics.reconnects.get();
                run.live.lock().unwrap().retain(|(i, _)| *i != instance);
                run.hangups.lock().unwrap().retain(|(i, _)| *i != instance);
                if last {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(slot_rng.random_range(0..2000))).await;
            }
        }));
    }

    // Faults of the broker and of the engine, at random moments.
    let fault_count = (rng.random_range(0.0..1.0f64).powi(2) * 8.0) as u32;
    let faults_task = {
        let (run, outage) = (run.clone(), outage.clone());
        let mut f_rng = StdRng::seed_from_u64(rng.random());
        let outage_kinds = outages;
        tokio::spawn(async move {
            let mut faults = fault_count;
            if outage_kinds {
                faults += 1;
            }
            for _ in 0..faults {
                // An outage early, while the clients still send (most are done within
                // a few seconds).
                let within = if outage_kinds { 3_000 } else { 15_000 };
                tokio::time::sleep(Duration::from_millis(f_rng.random_range(0..within))).await;
                let kind = if outage_kinds {
                    5
                } else {
                    f_rng.random_range(0..5)
                };
                let happened = match kind {
                    0 => run.broker.drop_connection(),
                    1 => run.broker.close_consuming_channel(),
                    2 => run.broker.cancel_consumer(),
                    3 | 4 => {
                        run.broker.alarm();
                        tokio::time::sleep(Duration::from_millis(f_rng.random_range(500..15_000)))
                            .await;
                        run.broker.clear_alarm();
                        true
                    }
                    _ => {
                        let how = if f_rng.random_bool(0.5) {
                            Outage::Overload
                        } else {
                            Outage::Down
                        };
                        let long = Duration::from_millis(f_rng.random_range(5_000..40_000));
                        run.trace.event(format!("engine: {how:?} for {long:?}"));
                        *outage.lock().unwrap() = how;
                        tokio::time::sleep(long).await;
                        *outage.lock().unwrap() = Outage::None;
                        run.trace.event("engine: outage over".into());
                        true
                    }
                };
                if happened {
                    run.summary.lock().unwrap().faults += 1;
                    *run.hand_backs.lock().unwrap() += 1;
                }
            }
        })
    };

    // SIGHUPs at random moments, to every live worker: with rights, each after the
    // rules file is written again (rules that deny bob or not; now and then a file that
    // does not load, fixed and signalled again soon after); without, a log line.
    let hangup_task = {
        let run = run.clone();
        let mut h_rng = StdRng::seed_from_u64(x_rng.random());
        tokio::spawn(async move {
            for _ in 0..sighups {
                tokio::time::sleep(Duration::from_millis(h_rng.random_range(0..15_000))).await;
                if run.rules.lock().unwrap().is_none() {
                    signal(&run).await;
                    continue;
                }
                // Not while a worker reads the file at its start.
                while *run.starting.lock().unwrap() > 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                if h_rng.random_bool(0.2) {
                    run.rules.lock().unwrap().as_mut().unwrap().write(None);
                    run.trace.event("the rules file does not load".into());
                    signal(&run).await;
                    tokio::time::sleep(Duration::from_millis(h_rng.random_range(100..3000))).await;
                    while *run.starting.lock().unwrap() > 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                let denies = h_rng.random_bool(0.5);
                let written = run
                    .rules
                    .lock()
                    .unwrap()
                    .as_mut()
                    .map(|r| r.write(Some(denies)));
                debug_assert!(written.is_some());
                signal(&run).await;
            }
        })
    };

    // Held bytes, observed.
    let sampler = {
        let run = run.clone();
        tokio::spawn(async move {
            // Each worker's highest prefetch yet: a consumer's deliveries are still held
            // when the next consumer (one at least) starts (module `prefetch`).
            let mut highest: BTreeMap<u32, i64> = BTreeMap::new();
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let largest = *run.largest.lock().unwrap() as i64;
                let most = run.settings.amqp.max_held_bytes as i64;
                let live = run.live.lock().unwrap().clone();
                // The most one publish of a worker's weighs (a reply, or a dead letter: the
                // request as it came).
                let publish = 4 * largest + 256 * 3 + 3 * run.largest_source as i64;
                let channels = run.settings.amqp.max_unconfirmed_replies as i64;
                for (instance, metrics) in live {
                    let held = metrics.held_bytes.get();
                    let seen = highest.entry(instance).or_default();
                    *seen = (*seen).max(metrics.prefetch.get().max(1));
                    let prefetch = *seen + 1;
                    if held > most + prefetch * largest {
                        run.violation(format!(
                            "worker {instance} holds {held} bytes (max_held_bytes {most}, prefetch {prefetch}, largest request {largest})"
                        ));
                        return;
                    }
                    // 11. Held and in flight: the requests held, and the publishes not yet
                    // confirmed (max_unconfirmed_replies on the shared channel, and one per
                    // delivery held: a reply published alone after a refusal), each within
                    // its bound.
                    let (publishes, bytes, unacked) = run.broker.in_flight(instance);
                    let (publishes, bytes, unacked) =
                        (publishes as i64, bytes as i64, unacked as i64);
                    let in_flight = held + bytes;
                    {
                        let mut summary = run.summary.lock().unwrap();
                        summary.peak_in_flight = summary.peak_in_flight.max(in_flight as usize);
                    }
                    let bound = most + prefetch * largest + (channels + unacked + 1) * publish;
                    if publishes > channels + unacked + 1 || in_flight > bound {
                        run.violation(format!(
                            "worker {instance} holds {held} bytes of requests and {publishes} publishes of {bytes} bytes unconfirmed, with {unacked} deliveries unacked ({channels} unconfirmed replies at most; bound {bound} bytes)"
                        ));
                        return;
                    }
                }
            }
        })
    };

    // Clients that wait for each reply.
    let mut tasks = Vec::new();
    for k in 0..clients {
        let run = run.clone();
        let ids = ids.clone();
        let mut c_rng = StdRng::seed_from_u64(rng.random());
        let count = c_rng.random_range(1..=8);
        tasks.push(tokio::spawn(async move {
            let queue = format!("client-{k}");
            for seq in 1..=count {
                let label = format!("c{k}.{seq}");
                let with_id = c_rng.random_bool(0.8);
                let (body, changes) = request(
                    &mut c_rng,
                    &ids,
                    &format!("c{k}"),
                    seq,
                    with_id.then_some(label.as_str()),
                );
                let props = Props {
                    reply_to: Some(queue.clone()),
                    correlation_id: Some(label.clone()),
                    user_id: run.settings.security.enabled.then(|| "carol".into()),
                    ..Props::default()
                };
                let sent = run
                    .publish(label.clone(), body, props, with_id, Route::Exists, changes)
                    .await;
                wait_for_reply(&run, &queue, &sent).await;
                tokio::time::sleep(Duration::from_millis(c_rng.random_range(0..300))).await;
            }
        }));
    }
    // Producers that never wait.
    for k in 0..producers {
        let run = run.clone();
        let ids = ids.clone();
        let mut p_rng = StdRng::seed_from_u64(rng.random());
        let count = p_rng.random_range(1..=12);
        tasks.push(tokio::spawn(async move {
            let mut last: Option<Sent> = None;
            for seq in 1..=count {
                tokio::time::sleep(Duration::from_millis(p_rng.random_range(0..500))).await;
                let label = format!("p{k}.{seq}");
                let (to, reply_to) = match p_rng.random_range(0..10) {
                    0..=4 => (Route::Exists, Some(format!("sink-{k}"))),
                    5 => (Route::Exists, None),
                    6 | 7 => (Route::Unroutable, Some(format!("gone-{k}"))),
                    _ => (Route::Refusing, Some(format!("full-{k}"))),
                };
                let user = ["alice", "bob"][p_rng.random_range(0..2)];
                let sent = match (&last, p_rng.random_range(0..10)) {
                    // Byte-identical, without an id, again.
                    (Some(prev), 0 | 1) if !prev.identified => {
                        run.publish(
                            label,
                            prev.body.clone(),
                            without_trace(&prev.props),
                            false,
                            prev.to,
                            prev.changes.clone(),
                        )
                        .await
                    }
                    // Its requestId again, for other bytes, or by another user.
                    (Some(prev), 2 | 3) if prev.identified => {
                        let id = request_id(&prev.body).unwrap_or_default();
                        let (body, changes) =
                            request(&mut p_rng, &ids, &format!("p{k}"), seq, Some(&id));
                        let mut props = without_trace(&prev.props);
                        props.user_id = Some(user.into());
                        run.publish(label, body, props, true, prev.to, changes)
                            .await
                    }
                    _ => {
                        let with_id = p_rng.random_bool(0.6);
                        let (body, changes) = request(
                            &mut p_rng,
                            &ids,
                            &format!("p{k}"),
                            seq,
                            with_id.then_some(label.as_str()),
                        );
                        let props = Props {
                            reply_to,
                            user_id: Some(user.into()),
                            ..Props::default()
                        };
                        run.publish(label, body, props, with_id, to, changes).await
                    }
                };
                last = Some(sent);
            }
        }));
    }

    let all = async {
        for task in tasks {
            let _ = task.await;
        }
    };
    if tokio::time::timeout(RUN_BOUND, all).await.is_err() {
        run.violation(format!("the clients did not end within {RUN_BOUND:?}"));
    }
    let _ = faults_task.await;
    let _ = hangup_task.await;
    // Every message comes to its end while the workers run on.
    let drained = async {
        loop {
            if all_ended(&run) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(600), drained)
        .await
        .is_err()
    {
        run.violation("messages not settled 10 min after the workload ended".into());
    }
    done.cancel();
    for slot in slots {
        let _ = slot.await;
    }
    sampler.abort();
    // The engine's writes still on the way land.
    tokio::time::sleep(Duration::from_secs(15)).await;

    check(&run);
    if let Some(rules) = &*run.rules.lock().unwrap() {
        let _ = std::fs::remove_file(&rules.path);
    }
    let mut summary = std::mem::take(&mut *run.summary.lock().unwrap());
    summary.virtual_time = trace.now();
    {
        let broker_state = broker.state();
        for event in &broker_state.events {
            match event {
                Event::Delivered { redelivered, .. } => {
                    summary.deliveries += 1;
                    summary.redeliveries += u64::from(*redelivered);
                }
                Event::Published { props, .. } if props.header(REASON).is_some() => {
                    summary.dead_letters += 1
                }
                Event::Published { .. } => summary.replies += 1,
                _ => {}
            }
        }
        for v in &broker_state.violations {
            run.violation(v.clone());
        }
    }
    let violations = run.violations.lock().unwrap();
    if violations.is_empty() {
        Ok(summary)
    } else {
        Err(violations.join("; "))
    }
}

fn without_trace(props: &Props) -> Props {
    let mut props = props.clone();
    props.headers.retain(|(n, _)| n != "traceparent");
    props
}

fn request_id(body: &[u8]) -> Option<String> {
    let envelope: Json = serde_json::from_slice(body).ok()?;
    envelope["requestId"].as_str().map(str::to_owned)
}

/// Waits for the reply to `sent` in `queue` (other replies there are a redelivered
/// request's, answered again); a request dead-lettered has none.
async fn wait_for_reply(run: &Run, queue: &str, sent: &Sent) {
    let want = sent.props.text("traceparent");
    let bound = tokio::time::Instant::now() + Duration::from_secs(900);
    loop {
        for reply in run.broker.take(queue) {
            if reply.props.text("traceparent") == want {
                let status = match reply.props.header("status") {
                    Some(Value::ShortInt(s)) => *s,
                    _ => 0,
                };
                check_reply(run, sent, &reply.body, status);
                return;
            }
        }
        if ended(run, sent.msg) {
            run.trace
                .event(format!("{}: ended without a reply", sent.label));
            return;
        }
        if tokio::time::Instant::now() > bound {
            run.violation(format!("{}: no reply within 900 s", sent.label));
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether message `msg` came to its end (acked, or dead-lettered by the broker) with no
/// reply in its queue: the worker dead-lettered it, or the broker did.
fn ended(run: &Run, msg: u64) -> bool {
    run.broker.state().ended.contains(&msg)
}

/// Whether every message sent came to its end: acked, or dead-lettered by the broker,
/// none waiting or unacked.
fn all_ended(run: &Run) -> bool {
    let sent: Vec<u64> = run.sent.lock().unwrap().iter().map(|s| s.msg).collect();
    let all = {
        let state = run.broker.state();
        sent.iter().all(|m| state.ended.contains(m))
    };
    all && run.broker.ready(REQUESTS) == 0
}

/// A reply's successes are in the engine, at the version it states.
fn check_reply(run: &Run, sent: &Sent, body: &[u8], status: i16) {
    let Ok(reply) = serde_json::from_slice::<Json>(body) else {
        run.violation(format!("{}: a reply that is not JSON", sent.label));
        return;
    };
    let hits = crate::hits(&reply);
    let state = run.state.lock().unwrap();
    let mut said = Vec::new();
    for hit in &hits {
        let id = hit["_id"].as_str().unwrap_or_default();
        let version = hit["_version"].as_i64().unwrap_or(-1);
        said.push(format!("{id}@{version}"));
        let doc = state.docs.get(&(TARGET.to_owned(), id.to_owned()));
        let found = doc.and_then(|d| d.versions.iter().find(|v| v.version == version));
        let holds = found.is_some_and(|v| {
            sent.changes
                .iter()
                .filter(|(cid, _)| cid == id)
                .any(|(_, changes)| changes.iter().all(|(k, val)| v.source.get(k) == Some(val)))
        });
        if !holds {
            run.violation(format!(
                "{}: the reply says {id} is at version {version} with its changes; the engine has {:?}",
                sent.label,
                found.map(|v| &v.source)
            ));
        }
    }
    drop(state);
    run.trace.event(format!(
        "{}: reply {status} [{}]",
        sent.label,
        said.join(" ")
    ));
}

/// A worker's confirmed publish for a client's message.
struct Out {
    /// Its index among the broker's events.
    at: usize,
    worker: u32,
    dead_letter: Option<String>,
    routed: bool,
    /// An error answer (a 401 or 403, or a dead letter with `x-mupdate-applied`
    /// false): nothing applied, and not remembered as answered (only successes are).
    refusal: bool,
}

/// Invariants 1 to 6, on what the broker and the engine saw.
fn check(run: &Run) {
    let sent = run.sent.lock().unwrap().clone();
    let by_trace: BTreeMap<String, &Sent> = sent
        .iter()
        .filter_map(|s| s.props.text("traceparent").map(|t| (t, s)))
        .collect();
    let by_msg: BTreeMap<u64, &Sent> = sent.iter().map(|s| (s.msg, s)).collect();
    let state = run.broker.state();
    let mut outs: BTreeMap<u64, Vec<Out>> = BTreeMap::new();
    // Per worker, the identified requests it answered, in order (its answered set).
    let mut answered_by: BTreeMap<u32, Vec<(usize, u64)>> = BTreeMap::new();
    let mut acks: BTreeMap<u64, Vec<(usize, u32)>> = BTreeMap::new();
    let mut deliveries: BTreeMap<u64, Vec<(usize, u32, bool)>> = BTreeMap::new();
    let mut handed_back: BTreeMap<u64, u64> = BTreeMap::new();
    let mut acks_lost: BTreeMap<u64, Vec<(usize, u32)>> = BTreeMap::new();
    let mut broker_dead: BTreeSet<u64> = BTreeSet::new();
    let mut reached: BTreeMap<u64, usize> = BTreeMap::new();
    // (message, worker) → the index of its delivery now; per delivery of a message to a
    // worker (message, worker, the delivery's index): the answers and dead letters it
    // got, and whether a publish of it was refused for its size.
    let mut current: BTreeMap<(u64, u32), usize> = BTreeMap::new();
    let mut finals: BTreeMap<(u64, u32, usize), u32> = BTreeMap::new();
    let mut refused_size: BTreeMap<(u64, u32, usize), Arc<Vec<u8>>> = BTreeMap::new();
    // The workers refused a publish for its size (which learn the broker's limit).
    let mut learned: BTreeSet<u32> = BTreeSet::new();
    // Per worker, the rules it holds from each event on (whether they deny bob).
    let mut rights: BTreeMap<u32, Vec<(usize, bool)>> = BTreeMap::new();
    // Per worker, the rules it may hold now; per delivery, those it may have held then.
    let mut possible: BTreeMap<u32, Vec<bool>> = BTreeMap::new();
    let mut at_delivery: BTreeMap<(u64, u32, usize), Vec<bool>> = BTreeMap::new();
    for (at, e) in state.events.iter().enumerate() {
        match e {
            Event::Routed { props } => {
                if let Some(s) = props.text("traceparent").and_then(|t| by_trace.get(&t))
                    && props.header(REASON).is_none()
                {
                    reached.entry(s.msg).or_insert(at);
                }
            }
            Event::Published {
                worker,
                props,
                routed,
                body,
            } => {
                let Some(s) = props.text("traceparent").and_then(|t| by_trace.get(&t)) else {
                    continue;
                };
                let dead_letter = props.text(REASON);
                let delivery = current.get(&(s.msg, *worker)).copied().unwrap_or(0);
                let key = (s.msg, *worker, delivery);
                // 12. One delivery, one end: answered or dead-lettered, once, never both.
                if *routed || dead_letter.is_some() {
                    let ends = finals.entry(key).or_default();
                    *ends += 1;
                    if *ends == 2 {
                        run.violation(format!(
                            "{}: answered or dead-lettered twice in one delivery to worker {worker} (now {dead_letter:?})",
                            s.label
                        ));
                    }
                }
                if dead_letter.as_deref() == Some("too_large") {
                    run.summary.lock().unwrap().too_large += 1;
                    if !learned.contains(worker) {
                        run.violation(format!(
                            "{}: dead-lettered too_large by worker {worker}, which the broker never refused a publish for its size",
                            s.label
                        ));
                    }
                }
                if *routed && dead_letter.is_none() {
                    if let Some(first) = refused_size.get(&key) {
                        run.summary.lock().unwrap().shrunk += 1;
                        check_smaller(run, &s.label, body, first);
                    }
                    check_rights(
                        run,
                        s,
                        *worker,
                        props,
                        at_delivery.get(&key),
                        rights.get(worker).map(|r| {
                            r.iter()
                                .filter(|(at, _)| *at > delivery)
                                .map(|(_, d)| *d)
                                .collect()
                        }),
                    );
                }
                let refusal = match &dead_letter {
                    Some(_) => props.header("x-mupdate-applied") == Some(&Value::Bool(false)),
                    None => matches!(props.header("status"), Some(Value::ShortInt(401 | 403))),
                };
                if s.identified && (*routed || dead_letter.is_some()) && !refusal {
                    answered_by.entry(*worker).or_default().push((at, s.msg));
                }
                outs.entry(s.msg).or_default().push(Out {
                    at,
                    worker: *worker,
                    dead_letter,
                    routed: *routed,
                    refusal,
                });
            }
            Event::Settled { msg, worker, how } => {
                if *how == "ack" {
                    acks.entry(*msg).or_default().push((at, *worker));
                } else if *how == "requeue" {
                    *handed_back.entry(*msg).or_default() += 1;
                }
            }
            Event::HandedBack { msg } => *handed_back.entry(*msg).or_default() += 1,
            Event::AckLost { msg, worker } => {
                acks_lost.entry(*msg).or_default().push((at, *worker));
            }
            Event::Delivered {
                msg,
                worker,
                redelivered,
            } => {
                current.insert((*msg, *worker), at);
                if let Some(now) = possible.get(worker) {
                    at_delivery.insert((*msg, *worker, at), now.clone());
                }
                deliveries
                    .entry(*msg)
                    .or_default()
                    .push((at, *worker, *redelivered))
            }
            Event::TooLarge {
                worker,
                props,
                body,
            } => {
                run.summary.lock().unwrap().size_refusals += 1;
                learned.insert(*worker);
                if let Some(s) = props.text("traceparent").and_then(|t| by_trace.get(&t)) {
                    let delivery = current.get(&(s.msg, *worker)).copied().unwrap_or(0);
                    refused_size
                        .entry((s.msg, *worker, delivery))
                        .or_insert(body.clone());
                }
            }
            Event::Rights {
                worker,
                denies_bob,
                read,
            } => {
                rights.entry(*worker).or_default().push((at, *denies_bob));
                let now = possible.entry(*worker).or_default();
                if *read {
                    now.clear();
                }
                now.push(*denies_bob);
            }
            Event::BrokerDeadLettered { msg, .. } => {
                broker_dead.insert(*msg);
            }
        }
    }
    drop(state);
    let same_request =
        |a: &Sent, b: &Sent| a.body == b.body && without_trace(&a.props) == without_trace(&b.props);
    let hand_backs = {
        let broker = run.broker.state();
        *run.hand_backs.lock().unwrap() + broker.slow_confirms + broker.lost_acks
    };
    let most = run.settings.worker.answered_max_bytes / 56;
    for s in &sent {
        let msg_outs = outs.get(&s.msg).map(Vec::as_slice).unwrap_or_default();
        let msg_acks = acks.get(&s.msg).map(Vec::as_slice).unwrap_or_default();
        // 1. At its end, once.
        if msg_acks.len() > 1 {
            run.violation(format!("{}: acked {} times", s.label, msg_acks.len()));
        }
        if msg_acks.is_empty() && !broker_dead.contains(&s.msg) {
            run.violation(format!("{}: never settled", s.label));
        }
        // 2. Acked: answered, dead-lettered, or a redelivery of a request its worker
        // answered.
        for (ack_at, worker) in msg_acks {
            let own = msg_outs
                .iter()
                .any(|o| o.at < *ack_at && (o.routed || o.dead_letter.is_some()));
            let skipped = deliveries
                .get(&s.msg)
                .and_then(|d| d.iter().rev().find(|(at, w, _)| at < ack_at && w == worker))
                .is_some_and(|(_, _, redelivered)| *redelivered)
                && sent.iter().any(|other| {
                    other.identified
                        && same_request(other, s)
                        && outs.get(&other.msg).is_some_and(|os| {
                            os.iter().any(|o| {
                                o.worker == *worker
                                    && o.at < *ack_at
                                    && (o.routed || o.dead_letter.is_some())
                            })
                        })
                });
            if !own && !skipped {
                run.violation(format!(
                    "{}: acked by worker {worker} with no reply and no dead letter, and not a redelivery of a request it answered",
                    s.label
                ));
            }
        }
        // 3. Not applied twice by a worker whose answered set still holds it.
        if s.identified && most > 0 {
            let mut answers: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
            for o in msg_outs
                .iter()
                .filter(|o| (o.routed || o.dead_letter.is_some()) && !o.refusal)
            {
                answers.entry(o.worker).or_default().push(o.at);
            }
            for (worker, ats) in answers {
                for pair in ats.windows(2) {
                    // Only where the worker took the first as answered: it acked it
                    // (the ack lost). One whose reply's confirm never reached it (its
                    // session ended first) it handed back, not knowing it answered,
                    // and its redelivery is applied again (invariant 6's documented
                    // case).
                    let taken_as_answered = acks_lost.get(&s.msg).is_some_and(|r| {
                        r.iter()
                            .any(|(at, w)| *w == worker && *at >= pair[0] && *at < pair[1])
                    });
                    if !taken_as_answered {
                        continue;
                    }
                    let between = answered_by[&worker]
                        .iter()
                        .filter(|(at, _)| *at > pair[0] && *at < pair[1])
                        .count();
                    if between + 1 < most {
                        run.violation(format!(
                            "{}: answered twice by worker {worker}, with {between} answers between (its answered set holds {most})",
                            s.label
                        ));
                    }
                }
            }
        }
        // 4. Unroutable replies dead-lettered, routed ones never.
        for o in msg_outs {
            if o.dead_letter.as_deref() == Some("unroutable") && s.to != Route::Unroutable {
                run.violation(format!(
                    "{}: dead-lettered as unroutable by worker {}, though its reply queue exists",
                    s.label, o.worker
                ));
            }
            if o.dead_letter.is_none() && o.routed && s.to != Route::Exists {
                run.violation(format!(
                    "{}: a reply routed to a queue that can't take it",
                    s.label
                ));
            }
        }
        // 6. Handed back no more often than the run's events explain (each at most
        // twice: a session that fails requeues what it holds while its consumer still
        // stands, which the broker delivers to it again, then its channel's end hands
        // those back once more).
        let back = handed_back.get(&s.msg).copied().unwrap_or(0);
        if back > 2 * hand_backs + 2 {
            run.violation(format!(
                "{}: handed back {back} times, with {hand_backs} events that hand requests back",
                s.label
            ));
        }
    }
    let _ = by_msg;
    // 10. A session ends only by a fault of the broker's.
    let reconnects = *run.reconnects.lock().unwrap();
    let session_faults = run.broker.state().session_faults;
    if reconnects > session_faults {
        run.violation(format!(
            "{reconnects} sessions started again, with {session_faults} broker faults that end one"
        ));
    }
    check_stale(run, &sent, &reached, &deliveries);
}

/// Sends a SIGHUP to every live worker and waits until each has read it (and so the
/// rules file: it reads it at once), noting the rules each holds from the SIGHUP on
/// (its old ones or the new) and from its reading on (the new).
async fn signal(run: &Run) {
    let denies_bob = run.rules.lock().unwrap().as_ref().map(|r| r.denies_bob);
    let live = run.hangups.lock().unwrap().clone();
    for (worker, hangup) in &live {
        if let Some(denies_bob) = denies_bob {
            run.broker.mark(Event::Rights {
                worker: *worker,
                denies_bob,
                read: false,
            });
        }
        run.trace.event(format!(
            "SIGHUP to worker {worker} (rules deny bob: {denies_bob:?})"
        ));
        let _ = hangup.try_send(());
    }
    run.summary.lock().unwrap().sighups += 1;
    let mut waits = 0u32;
    while !live
        .iter()
        .all(|(_, h)| h.is_closed() || h.capacity() == h.max_capacity())
    {
        waits += 1;
        if waits.is_multiple_of(100) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    if let Some(denies_bob) = denies_bob {
        for (worker, _) in &live {
            run.broker.mark(Event::Rights {
                worker: *worker,
                denies_bob,
                read: true,
            });
        }
    }
}

/// Invariant 13: a reply sent after one refused for its size (`first`) is the smaller
/// one of docs/src/messages.md ("Reply routing"): no `_source`, each failed document its `_id` alone; or, that one
/// too large as well, a 500 `api.process.reply_too_large` naming its size (smaller than
/// the first's when the first had anything to leave out).
fn check_smaller(run: &Run, label: &str, body: &[u8], first: &[u8]) {
    let reply: Json = serde_json::from_slice(body).unwrap_or_default();
    let smaller = if reply["status"] == 500 {
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        let named: Option<usize> = message
            .strip_prefix("The reply (")
            .and_then(|m| m.split(' ').next())
            .and_then(|n| n.parse().ok());
        let full: Json = serde_json::from_slice(first).unwrap_or_default();
        let most = match lean(&full) {
            true => first.len(),
            false => first.len() - 1,
        };
        reply["error"]["id"] == "api.process.reply_too_large"
            && named.is_some_and(|size| size <= most)
    } else {
        lean(&reply)
    };
    if !smaller {
        run.violation(format!(
            "{label}: after a reply refused for its size, one not smaller: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ));
    }
}

/// Whether a reply has nothing the smaller one leaves out: no `_source`, no failed
/// document but its `_id`.
fn lean(reply: &Json) -> bool {
    let hits = crate::hits(reply);
    let errors = reply["error"]["errors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    hits.iter().all(|h| h.get("_source").is_none())
        && errors.iter().all(|e| {
            e["document"]
                .as_object()
                .is_none_or(|d| d.keys().all(|k| k == "_id"))
        })
}

/// Invariant 14: a reply's rights verdict is that of rules the worker held at its
/// delivery (from a SIGHUP to the worker's reading it, its rules of before or the new)
/// or since (`since`: each SIGHUP's): a 403 only for bob under rules that deny him; a
/// success for bob only under rules that allow him.
fn check_rights(
    run: &Run,
    s: &Sent,
    worker: u32,
    props: &Props,
    then: Option<&Vec<bool>>,
    since: Option<Vec<bool>>,
) {
    let status = match props.header("status") {
        Some(Value::ShortInt(s)) => *s,
        _ => 0,
    };
    if status == 403 {
        run.summary.lock().unwrap().forbidden += 1;
    }
    let (Some(then), Some(since)) = (then, since) else {
        if status == 403 {
            run.violation(format!("{}: 403 with rights off", s.label));
        }
        return;
    };
    let mut held = then.clone();
    held.extend(since);
    let bob = s.props.user_id.as_deref() == Some("bob");
    let right = match status {
        403 => bob && held.contains(&true),
        200..=299 if bob => held.contains(&false),
        _ => true,
    };
    if !right {
        run.violation(format!(
            "{} (user {:?}): reply {status} from worker {worker}, whose rules since its delivery deny bob: {held:?}",
            s.label, s.props.user_id
        ));
    }
}

/// Invariant 5: a waiting client's counter never went down, but by the documented cases.
fn check_stale(
    run: &Run,
    sent: &[Sent],
    reached: &BTreeMap<u64, usize>,
    deliveries: &BTreeMap<u64, Vec<(usize, u32, bool)>>,
) {
    let write_timeout = Duration::from_millis(run.settings.storage.write_timeout_ms);
    let regressions = run.state.lock().unwrap().regressions.clone();
    // Clients with a request delivered again after its reply reached them (its ack
    // lost, or its confirm later than `confirm_timeout_ms`), or delivered to two
    // workers (one's call may land after the other's answer: docs/src/guarantees.md).
    let mut answered_again = BTreeSet::new();
    for s in sent {
        let d = deliveries
            .get(&s.msg)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let again = reached
            .get(&s.msg)
            .is_some_and(|first| d.iter().any(|(at, _, _)| at > first));
        let two_workers = d.iter().any(|(_, w, _)| *w != d[0].1);
        if again || two_workers {
            let owner = s.label.split('.').next().unwrap_or_default().to_owned();
            answered_again.insert(owner);
        }
    }
    let mut reported = BTreeSet::new();
    for r in regressions {
        if !r.field.starts_with('c') {
            continue;
        }
        let documented =
            r.writer.late_as_documented(write_timeout) || answered_again.contains(&r.field);
        if documented {
            run.summary.lock().unwrap().documented_stale += 1;
        } else if reported.insert((r.id.clone(), r.field.clone())) {
            run.violation(format!(
                "stale write: {}'s {} went from {} back to {} (written by {:?})",
                r.id, r.field, r.from, r.to, r.writer
            ));
        }
    }
}
