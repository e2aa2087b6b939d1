//! One run's workload, and the invariants checked on it.
//!
//! Clients that wait for each reply update shared documents in turn (each its own
//! counter field `c{k}`, raised by one per request, on documents several clients
//! share); producers that never wait send theirs (`p{k}`) at random moments; requests
//! with and without `requestId`, with an `_id` repeated, mUpdate and mUpsert, missing
//! documents, a document refused by the checks, `refresh=wait_for`. A shutdown (the
//! worker's cancellation token) may fire at any moment: its requests are handed back, a
//! new worker (another `Processor` on the same engine) takes over, and each waiting
//! client sends its handed-back request again, as the broker would redeliver it.
//!
//! Invariants:
//! 1. A success in a reply (200/201) is in the engine: the document has the version the
//!    reply states, with the request's changes in it.
//! 2. No acknowledged update is overwritten by an older one: a client's counter never
//!    goes down in the engine, for the waiting clients (acknowledged before the next) and
//!    the producers (per-document order within a worker). The one exception, documented
//!    in docs/src/guarantees.md ("Timeouts"): a write whose call was given up after
//!    `storage.write_timeout_ms`, or whose connection broke, landing after its resend.
//! 3. Every handed-back request is safe to apply again: sent again, it is answered, and
//!    its changes are in the engine (1).
//! 4. Every call ends in time: after a shutdown, each request in process ends within
//!    `storage.write_timeout_ms` + 2 s; the run ends within its virtual bound.
//! 5. A reply's bytes stay within the bound of src/response.rs for its request's bytes.
//! 6. No false answer: no `noop` the worker reads for a change that is in the engine only
//!    because a call of the same worker, given up by it, wrote it; no 409 whose conflict
//!    was the same worker's earlier call of the same change (what `bulk::for_resend`
//!    protects a resend from).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mupdate_worker::config::{Format, Settings};
use mupdate_worker::lifecycle::worker::Processor;
use mupdate_worker::metrics::Metrics;
use mupdate_worker::pipeline::envelope::Properties;
use mupdate_worker::pipeline::order::Sequencer;
use mupdate_worker::storage::{Node, Storage};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::engine::{Faults, SimEngine, State, Writer};
use crate::trace::Trace;

const INDEX: &str = "shop";
const COLLECTION: &str = "c";
const TARGET: &str = "&shop.c";
/// No run may take longer, in virtual time: a wait that never ends fails the run.
const RUN_BOUND: Duration = Duration::from_secs(3600);

/// What one run did, for the totals.
#[derive(Debug, Default)]
pub struct Summary {
    requests: u64,
    answered: u64,
    handed_back: u64,
    shutdowns: u64,
    engine_calls: u64,
    late_writes: u64,
    /// Stale writes of the documented kind (invariant 2's exception).
    documented_stale: u64,
    virtual_time: Duration,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests, {} answered, {} handed back, {} shutdowns, {} engine calls, {} late writes, {} documented stale writes, {:.1?} virtual",
            self.requests,
            self.answered,
            self.handed_back,
            self.shutdowns,
            self.engine_calls,
            self.late_writes,
            self.documented_stale,
            self.virtual_time
        )
    }
}

#[derive(Debug, Default)]
pub struct Totals(Summary);

impl Totals {
    pub fn add(&mut self, s: &Summary) {
        let t = &mut self.0;
        t.requests += s.requests;
        t.answered += s.answered;
        t.handed_back += s.handed_back;
        t.shutdowns += s.shutdowns;
        t.engine_calls += s.engine_calls;
        t.late_writes += s.late_writes;
        t.documented_stale += s.documented_stale;
        t.virtual_time += s.virtual_time;
    }
}

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The worker of the moment: a new one after each shutdown.
#[derive(Clone)]
struct Worker {
    generation: u32,
    processor: Arc<Processor>,
    sequencer: Arc<Sequencer>,
    cancel: CancellationToken,
    /// Requests in process, and when the last one ended (for invariant 4).
    busy: Arc<tokio::sync::Semaphore>,
}

/// Everything the run's tasks share.
struct Run {
    settings: Arc<Settings>,
    state: Arc<Mutex<State>>,
    trace: Trace,
    /// The worker of the moment (not a `watch` channel: its waiters are woken in an
    /// order drawn at random, a `Notify`'s in the order they came).
    worker: Mutex<Option<Worker>>,
    new_worker: tokio::sync::Notify,
    violations: Mutex<Vec<String>>,
    summary: Mutex<Summary>,
}

impl Run {
    fn violation(&self, what: String) {
        self.trace.event(format!("VIOLATION: {what}"));
        self.violations.lock().unwrap().push(what);
    }

    /// The worker to send to, once there is one.
    async fn worker(&self) -> Worker {
        loop {
            let changed = self.new_worker.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(worker) = self.worker.lock().unwrap().clone()
                && !worker.cancel.is_cancelled()
            {
                return worker;
            }
            changed.await;
        }
    }

    fn publish(&self, worker: Worker) {
        *self.worker.lock().unwrap() = Some(worker);
        self.new_worker.notify_waiters();
    }
}

/// A request as a client built it.
struct Request {
    bytes: Vec<u8>,
    props: Properties,
    /// `_id` → the changes of each of its entries.
    changes: Vec<(String, Map<String, Value>)>,
    label: String,
}

fn request(rng: &mut StdRng, ids: &[String], field: &str, value: i64, label: String) -> Request {
    let upsert = rng.random_bool(0.3);
    let mut documents = Vec::new();
    let mut changes = Vec::new();
    for _ in 0..rng.random_range(1..=3) {
        let id = ids[rng.random_range(0..ids.len())].clone();
        let mut body = Map::new();
        body.insert(field.into(), json!(value));
        if rng.random_bool(0.1) {
            // Refused by the checks (a body that is not an object): a 400 for that one.
            documents.push(json!({"_id": id, "body": "not an object"}));
            continue;
        }
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
    if rng.random_bool(0.7) {
        envelope["requestId"] = json!(label);
    }
    if rng.random_bool(0.2) {
        envelope["refresh"] = json!("wait_for");
    }
    if rng.random_bool(0.5) {
        envelope["retryOnConflict"] = json!(rng.random_range(0..=3));
    }
    Request {
        bytes: serde_json::to_vec(&envelope).unwrap(),
        props: Properties::default(),
        changes,
        label,
    }
}

/// Sends `request` to the worker of the moment; `Err(())` when it was handed back.
async fn send(
    run: &Run,
    worker: &Worker,
    request: &Request,
    turn_taken: Option<mupdate_worker::pipeline::order::Turn>,
) -> Result<(), ()> {
    let _busy = worker.busy.clone().acquire_owned().await.unwrap();
    let mut turn = match turn_taken {
        Some(turn) => turn,
        None => worker.sequencer.turn(&request.bytes),
    };
    run.trace
        .event(format!("{} → worker {}", request.label, worker.generation));
    run.summary.lock().unwrap().requests += 1;
    if !turn.wait(&worker.cancel).await {
        run.trace.event(format!(
            "{}: handed back waiting for its turn",
            request.label
        ));
        run.summary.lock().unwrap().handed_back += 1;
        return Err(());
    }
    let processed = worker
        .processor
        .process(&request.bytes, &request.props, false, &worker.cancel)
        .await;
    drop(turn);
    let answer = match processed {
        Ok(answer) => answer,
        Err(_) => {
            run.trace.event(format!("{}: handed back", request.label));
            run.summary.lock().unwrap().handed_back += 1;
            return Err(());
        }
    };
    run.summary.lock().unwrap().answered += 1;
    check_reply(run, request, &answer.response.body, answer.response.status);
    Ok(())
}

/// Invariants 1 and 5 on one reply.
fn check_reply(run: &Run, request: &Request, body: &[u8], status: u16) {
    let bound = 4 * request.bytes.len()
        + 256 * request.changes.len().max(1)
        + run.settings.response.max_source_bytes
        + 4096;
    if body.len() > bound {
        run.violation(format!(
            "{}: a reply of {} bytes for a request of {} (bound {bound})",
            request.label,
            body.len(),
            request.bytes.len()
        ));
    }
    let Ok(reply) = serde_json::from_slice::<Value>(body) else {
        run.violation(format!("{}: a reply that is not JSON", request.label));
        return;
    };
    let result = &reply["result"];
    let hits = crate::hits(&reply);
    let errors = reply["error"]["errors"]
        .as_array()
        .or_else(|| result["errors"].as_array())
        .cloned()
        .unwrap_or_default();
    let mut said = Vec::new();
    let state = run.state.lock().unwrap();
    for hit in &hits {
        let id = hit["_id"].as_str().unwrap_or_default();
        let version = hit["_version"].as_i64().unwrap_or(-1);
        said.push(format!("{id}@{version}"));
        let doc = state.docs.get(&(TARGET.to_owned(), id.to_owned()));
        let found = doc.and_then(|d| d.versions.iter().find(|v| v.version == version));
        let holds = found.is_some_and(|v| {
            request
                .changes
                .iter()
                .filter(|(cid, _)| cid == id)
                .any(|(_, changes)| changes.iter().all(|(k, val)| v.source.get(k) == Some(val)))
        });
        if !holds {
            run.violation(format!(
                "{}: the reply says {id} is at version {version} with its changes; the engine has {:?}",
                request.label,
                found.map(|v| (&v.source, &v.writer))
            ));
        }
    }
    for error in &errors {
        let id = error["document"]["_id"].as_str().unwrap_or("?");
        said.push(format!("{id}:{}", error["status"]));
    }
    drop(state);
    run.trace
        .event(format!("{}: {status} [{}]", request.label, said.join(" ")));
}

/// Draws the run's settings.
fn settings(rng: &mut StdRng) -> Settings {
    let mut settings = Settings::defaults();
    let s = &mut settings.storage;
    s.url = "http://sim:9200".into();
    // The document's metadata would carry the wall clock into the engine.
    s.kuzzle_metadata = false;
    s.timeout_ms = 1000;
    s.write_timeout_ms = 5000;
    s.retry_min_delay_ms = 50;
    s.retry_max_delay_ms = 1000;
    s.item_retries = rng.random_range(0..=4);
    s.index_cache_ms = if rng.random_bool(0.5) { 0 } else { 60_000 };
    s.bulk_max_documents = rng.random_range(2..=50);
    s.concurrent_bulks = rng.random_range(1..=4);
    s.bulk_spread_documents = rng.random_range(0..=20);
    s.bulk_linger_ms = if rng.random_bool(0.3) {
        rng.random_range(1..=20)
    } else {
        0
    };
    settings.response.include_source = rng.random_bool(0.5);
    settings.response.format = if rng.random_bool(0.5) {
        Format::V1
    } else {
        Format::V2
    };
    settings
}

fn faults(rng: &mut StdRng, settings: &Settings) -> Faults {
    // From calm to stormy: most runs see a few faults, some many.
    let storm = rng.random_range(0.0..1.0f64).powi(2);
    Faults {
        never_sent: 0.05 * storm,
        whole_429: 0.1 * storm,
        server_error: 0.1 * storm,
        broken: 0.05 * storm,
        freeze: 0.02 * storm,
        slow: 0.1 * storm,
        too_slow: 0.05 * storm,
        item_429: 0.15 * storm,
        conflict: 0.2 * storm,
        slow_after: Duration::from_millis(settings.storage.timeout_ms),
    }
}

fn new_worker(generation: u32, settings: &Arc<Settings>, nodes: Vec<Node>) -> Worker {
    let metrics = Arc::new(Metrics::new());
    let storage = Storage::with_nodes(&settings.storage, nodes, metrics.clone()).unwrap();
    let processor = Processor::with_storage(settings.clone(), metrics, storage).unwrap();
    Worker {
        generation,
        processor: Arc::new(processor),
        sequencer: Arc::default(),
        cancel: CancellationToken::new(),
        busy: Arc::new(tokio::sync::Semaphore::new(1 << 20)),
    }
}

pub async fn simulate(seed: u64, trace: Trace) -> Result<Summary, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let settings = Arc::new(settings(&mut rng));
    let faults = faults(&mut rng, &settings);
    let engine_rng = Arc::new(Mutex::new(StdRng::seed_from_u64(rng.random())));
    let state = Arc::new(Mutex::new(State::default()));
    let shared: Vec<String> = (0..rng.random_range(1..=5))
        .map(|i| format!("d{i}"))
        .collect();
    {
        let mut state = state.lock().unwrap();
        state.indexes.insert(TARGET.into());
        for id in &shared {
            let doc = state.docs.entry((TARGET.into(), id.clone())).or_default();
            doc.versions.push(crate::engine::Version {
                version: 1,
                source: json!({"n": 0}).as_object().unwrap().clone(),
                writer: Writer::Seed,
            });
        }
    }
    // Some ids name no document: a 404 for mUpdate, a creation for mUpsert.
    let mut ids = shared.clone();
    ids.extend((0..rng.random_range(0..=2)).map(|i| format!("m{i}")));
    let node_count = rng.random_range(1..=3);
    let nodes = {
        let (state, engine_rng, trace) = (state.clone(), engine_rng.clone(), trace.clone());
        move |generation: u32| -> Vec<Node> {
            (0..node_count)
                .map(|i| {
                    let engine = SimEngine::new(
                        state.clone(),
                        engine_rng.clone(),
                        faults,
                        trace.clone(),
                        i,
                        generation,
                    );
                    Node::new(format!("sim-{i}"), Box::new(engine))
                })
                .collect()
        }
    };
    let worker = Mutex::new(Some(new_worker(0, &settings, nodes(0))));
    trace.event(format!(
        "seed {seed}: {node_count} nodes, {faults:?}, item_retries {}, concurrent_bulks {}, bulk_max_documents {}, ids {ids:?}",
        settings.storage.item_retries, settings.storage.concurrent_bulks, settings.storage.bulk_max_documents
    ));
    let run = Arc::new(Run {
        settings: settings.clone(),
        state: state.clone(),
        trace: trace.clone(),
        worker,
        new_worker: tokio::sync::Notify::new(),
        violations: Mutex::default(),
        summary: Mutex::default(),
    });

    let clients = rng.random_range(1..=4);
    let producers = rng.random_range(0..=2);
    let mut tasks = Vec::new();
    for k in 0..clients {
        let (run, ids) = (run.clone(), ids.clone());
        let mut rng = StdRng::seed_from_u64(rng.random());
        let count = rng.random_range(1..=10);
        tasks.push(tokio::spawn(async move {
            for seq in 1..=count {
                let request = request(&mut rng, &ids, &format!("c{k}"), seq, format!("c{k}.{seq}"));
                // Handed back: sent again to the next worker, as the broker redelivers.
                loop {
                    let worker = run.worker().await;
                    if send(&run, &worker, &request, None).await.is_ok() {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
            }
        }));
    }
    for k in 0..producers {
        let (run, ids) = (run.clone(), ids.clone());
        let mut rng = StdRng::seed_from_u64(rng.random());
        let count = rng.random_range(1..=15);
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for seq in 1..=count {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
                let request = request(&mut rng, &ids, &format!("p{k}"), seq, format!("p{k}.{seq}"));
                let worker = run.worker().await;
                // Its turn is taken as it is received, in the order sent.
                let turn = worker.sequencer.turn(&request.bytes);
                let run = run.clone();
                sent.push(tokio::spawn(async move {
                    // Handed back: a producer that never waits does not send it again.
                    let _ = send(&run, &worker, &request, Some(turn)).await;
                }));
            }
            for task in sent {
                task.await.unwrap();
            }
        }));
    }
    // Shutdowns at random moments; a new worker takes over once the last one's requests
    // are over.
    let shutdowns = if rng.random_bool(0.4) {
        rng.random_range(1..=2)
    } else {
        0
    };
    let shutdown_run = run.clone();
    let mut shutdown_rng = StdRng::seed_from_u64(rng.random());
    let write_timeout = Duration::from_millis(settings.storage.write_timeout_ms);
    let supervisor = tokio::spawn(async move {
        let run = shutdown_run;
        for generation in 1..=shutdowns {
            tokio::time::sleep(Duration::from_millis(shutdown_rng.random_range(0..3000))).await;
            let old = run.worker().await;
            run.trace
                .event(format!("shutdown of worker {}", old.generation));
            run.summary.lock().unwrap().shutdowns += 1;
            old.cancel.cancel();
            let bound = write_timeout + Duration::from_secs(2);
            let all = u32::try_from(1 << 20).unwrap();
            match tokio::time::timeout(bound, old.busy.acquire_many(all)).await {
                Ok(_) => run
                    .trace
                    .event(format!("worker {} is done", old.generation)),
                Err(_) => run.violation(format!(
                    "worker {}: requests still in process {bound:?} after the shutdown",
                    old.generation
                )),
            }
            run.publish(new_worker(generation, &run.settings, nodes(generation)));
        }
    });

    let all = async {
        for task in tasks {
            task.await.unwrap();
        }
    };
    if tokio::time::timeout(RUN_BOUND, all).await.is_err() {
        run.violation(format!("the run did not end within {RUN_BOUND:?}"));
    }
    supervisor.abort();
    // The engine's writes still on the way land (their delays are bounded).
    tokio::time::sleep(write_timeout * 3).await;

    check_stale(&run, write_timeout);
    let false_noops = run.state.lock().unwrap().false_noops.clone();
    for noop in false_noops {
        run.violation(format!("a false answer: {noop}"));
    }
    let mut summary = std::mem::take(&mut *run.summary.lock().unwrap());
    {
        let state = state.lock().unwrap();
        summary.engine_calls = state.calls;
        summary.late_writes = state.late_writes;
    }
    summary.virtual_time = trace.now();
    let violations = run.violations.lock().unwrap();
    if violations.is_empty() {
        Ok(summary)
    } else {
        Err(violations.join("; "))
    }
}

/// Invariant 2: a client's counter never went down, but by the documented exception.
fn check_stale(run: &Run, write_timeout: Duration) {
    let regressions = run.state.lock().unwrap().regressions.clone();
    let mut documented = 0;
    let mut seen = BTreeMap::new();
    for r in regressions {
        if !(r.field.starts_with('c') || r.field.starts_with('p')) {
            continue;
        }
        let exception = r.writer.late_as_documented(write_timeout);
        if exception {
            documented += 1;
            continue;
        }
        if seen.insert((r.id.clone(), r.field.clone()), ()).is_none() {
            run.violation(format!(
                "stale write: {}'s {} went from {} back to {} (written by {:?})",
                r.id, r.field, r.from, r.to, r.writer
            ));
        }
    }
    run.summary.lock().unwrap().documented_stale = documented;
}
