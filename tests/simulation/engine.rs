//! The simulated engine: an `EngineNode` that keeps documents with versions and applies
//! `_bulk` bodies the way Elasticsearch 8 does, with faults drawn from the run's seeded
//! generator. Each behaviour copies a real-server test (tests/model.rs, the recorded
//! answers of src/bulk.rs):
//!
//! - a partial update merges `doc` into the document (objects key by key) and raises
//!   `_version` by one; one that changes nothing is a `noop` at the same version unless
//!   `detect_noop` is false; a missing document is a 404 `document_missing_exception`,
//!   or, with `upsert`, created from it (201, `created`, version 1);
//! - `_source: true` adds `get._source` (the document after the update) to the item;
//! - a write of a concurrent writer, or of another call still on its way, between the
//!   engine's read and write of a document is a conflict, retried `retry_on_conflict`
//!   times, then a 409 `version_conflict_engine_exception` (the other write stays);
//! - an item the engine is too busy for is a 429 `es_rejected_execution_exception`;
//! - the whole call can be refused with a 429 or a 5xx, and nothing is applied;
//! - answers are `{"errors","took","items"}`, one item per action, in order.
//!
//! Faults of the exchange itself: a delay, a connection refused (nothing sent), an answer
//! later than the client's timeout (the client gets `TimedOut`, the writes still land,
//! possibly after the client gave up), a connection broken mid-call (the writes may land,
//! before or after), and a freeze (no answer ever; the caller's own bound ends it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elasticsearch::http::Method;
use mupdate_worker::storage::port::{Answer, Call, EngineNode, Exchange, Failure, FailureKind};
use rand::RngExt;
use rand::rngs::StdRng;
use serde_json::{Map, Value, json};

use crate::trace::Trace;

/// How often each fault happens, per call or per item.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub never_sent: f64,
    pub whole_429: f64,
    pub server_error: f64,
    pub broken: f64,
    pub freeze: f64,
    /// An answer slower than `timeout_ms` (awaited by the worker until its write timeout).
    pub slow: f64,
    /// An answer slower than the client's timeout of the call: `TimedOut`.
    pub too_slow: f64,
    pub item_429: f64,
    pub conflict: f64,
    /// The worker's `storage.timeout_ms`: "slow" answers come after it.
    pub slow_after: Duration,
}

/// Who wrote a version of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writer {
    /// The documents the test made before the run.
    Seed,
    /// A concurrent writer other than the worker.
    Other,
    /// A `_bulk` call of the worker.
    Call {
        call: u64,
        /// Applied after the client gave the call up (its timeout, or its connection broke).
        late: Option<GaveUp>,
    },
}

impl Writer {
    /// A write of the documented kind when it lands late: a call given up after its
    /// connection broke, or after `write_timeout` or longer (docs/src/simulation.md, invariant 5).
    pub fn late_as_documented(&self, write_timeout: Duration) -> bool {
        match self {
            Writer::Call {
                late: Some(GaveUp::Broken),
                ..
            } => true,
            Writer::Call {
                late: Some(GaveUp::TimedOut(after)),
                ..
            } => *after >= write_timeout,
            _ => false,
        }
    }
}

/// How the client gave up a call whose writes landed after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaveUp {
    /// Its timeout, this long.
    TimedOut(Duration),
    Broken,
}

#[derive(Debug, Clone)]
pub struct Version {
    pub version: i64,
    pub source: Map<String, Value>,
    pub writer: Writer,
}

#[derive(Debug, Default)]
pub struct Doc {
    /// Every version, in order; the last is the document now. Empty: never existed.
    pub versions: Vec<Version>,
}

impl Doc {
    pub fn current(&self) -> Option<&Version> {
        self.versions.last()
    }
}

/// Something the engine saw that an invariant looks at: a write that made a field
/// smaller than it was (`n` fields only grow in the workloads).
#[derive(Debug, Clone)]
pub struct Regression {
    pub id: String,
    pub field: String,
    pub from: i64,
    pub to: i64,
    pub writer: Writer,
}

/// A call whose writes are on their way: its items, and those that already landed (in
/// the middle of another call's update of the same document: a conflict for that one).
struct Pending {
    items: Vec<Action>,
    landed: BTreeMap<usize, Value>,
}

#[derive(Clone)]
struct Action {
    index: String,
    id: String,
    retry_on_conflict: u64,
    line: Value,
}

/// A `_bulk` body's update actions; `None` when it is not one.
fn actions(body: &[u8]) -> Option<Vec<Action>> {
    let lines: Vec<&[u8]> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    if !lines.len().is_multiple_of(2) {
        return None;
    }
    lines
        .chunks(2)
        .map(|pair| {
            let action = serde_json::from_slice::<Value>(pair[0]).ok()?;
            let line = serde_json::from_slice::<Value>(pair[1]).ok()?;
            let update = action.get("update")?;
            Some(Action {
                index: update["_index"].as_str().unwrap_or_default().to_owned(),
                id: update["_id"].as_str().unwrap_or_default().to_owned(),
                retry_on_conflict: update["retry_on_conflict"].as_u64().unwrap_or(0),
                line,
            })
        })
        .collect()
}

#[derive(Default)]
pub struct State {
    pub indexes: BTreeSet<String>,
    pub docs: BTreeMap<(String, String), Doc>,
    pub seq_no: i64,
    pub regressions: Vec<Regression>,
    /// `noop`s answered for a change that is there only because an earlier call of the
    /// same worker, given up by it, wrote it: what a resend must not report.
    pub false_noops: Vec<String>,
    /// The worker each call came from.
    call_worker: BTreeMap<u64, u32>,
    /// Such `noop`s (and false conflicts) of each call, until its answer reaches the
    /// worker (or is lost).
    noops_of_call: BTreeMap<u64, Vec<String>>,
    /// Calls whose writes are on their way (sent, not landed yet).
    pending: BTreeMap<u64, Pending>,
    /// Calls given up by their client, and how.
    given_up: BTreeMap<u64, GaveUp>,
    next_call: u64,
    pub calls: u64,
    pub late_writes: u64,
}

pub struct SimEngine {
    pub state: Arc<Mutex<State>>,
    rng: Arc<Mutex<StdRng>>,
    faults: Faults,
    trace: Trace,
    /// Which node of the engine this is, for the trace.
    node: usize,
    /// Which worker's node this is (each worker has its own).
    worker: u32,
}

impl SimEngine {
    pub fn new(
        state: Arc<Mutex<State>>,
        rng: Arc<Mutex<StdRng>>,
        faults: Faults,
        trace: Trace,
        node: usize,
        worker: u32,
    ) -> Self {
        SimEngine {
            state,
            rng,
            faults,
            trace,
            node,
            worker,
        }
    }

    fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.rng.lock().unwrap().random_bool(p.min(1.0))
    }

    fn millis(&self, low: u64, high: u64) -> Duration {
        Duration::from_millis(self.rng.lock().unwrap().random_range(low..=high))
    }

    async fn head(&self, path: &str) -> Result<Answer, Failure> {
        tokio::time::sleep(self.millis(0, 5)).await;
        if self.chance(self.faults.server_error / 2.0) {
            self.trace
                .event(format!("engine{}: HEAD {path}: 503", self.node));
            return Ok(unavailable());
        }
        let name = percent_decode(path.trim_start_matches('/'));
        let state = self.state.lock().unwrap();
        let exists = match name.strip_suffix('*') {
            Some(prefix) => state.indexes.iter().any(|i| i.starts_with(prefix)),
            None => state.indexes.contains(&name),
        };
        Ok(Answer {
            status: if exists { 200 } else { 404 },
            body: Vec::new(),
        })
    }

    async fn bulk(
        &self,
        body: Vec<u8>,
        query: Vec<(String, String)>,
        timeout: Duration,
    ) -> Result<Answer, Failure> {
        let call = {
            let mut state = self.state.lock().unwrap();
            state.next_call += 1;
            state.calls += 1;
            let call = state.next_call;
            state.call_worker.insert(call, self.worker);
            call
        };
        let wait_for = query.iter().any(|(k, v)| k == "refresh" && v == "wait_for");
        let items = body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count()
            / 2;
        let f = self.faults;
        let node = self.node;
        if self.chance(f.never_sent) {
            self.trace.event(format!(
                "engine{node}: call {call} ({items} items): connection refused"
            ));
            return Err(failure(FailureKind::NeverSent, "connection refused"));
        }
        if self.chance(f.freeze) {
            self.trace
                .event(format!("engine{node}: call {call} ({items} items): frozen"));
            std::future::pending::<()>().await;
        }
        if self.chance(f.whole_429) {
            tokio::time::sleep(self.millis(0, 20)).await;
            self.trace
                .event(format!("engine{node}: call {call} ({items} items): 429"));
            return Ok(rejected_call());
        }
        if self.chance(f.server_error) {
            tokio::time::sleep(self.millis(0, 20)).await;
            self.trace
                .event(format!("engine{node}: call {call} ({items} items): 503"));
            return Ok(unavailable());
        }
        // When the answer would come, and when its writes land before it.
        let mut answer_in = self.millis(1, 40);
        if wait_for {
            answer_in += self.millis(0, 1000);
        }
        if self.chance(f.slow) {
            answer_in = f.slow_after + self.millis(1, 2000);
        }
        if self.chance(f.too_slow) {
            answer_in = timeout + self.millis(1, 3000);
        }
        let applied_in = answer_in.mul_f64(self.rng.lock().unwrap().random_range(0.0..=1.0));
        if self.chance(f.broken) {
            // The connection breaks at `broken_in`; the writes land or not, before or after.
            let broken_in = self.millis(0, 100).min(answer_in);
            let lands = self.chance(0.5);
            self.trace.event(format!(
                "engine{node}: call {call} ({items} items): breaks in {broken_in:?}, writes {}",
                if lands {
                    format!("land in {applied_in:?}")
                } else {
                    "lost".into()
                }
            ));
            if lands {
                self.sent(call, &body);
                self.apply_later(call, body, applied_in);
            }
            tokio::time::sleep(broken_in).await;
            self.state
                .lock()
                .unwrap()
                .given_up
                .insert(call, GaveUp::Broken);
            return Err(failure(FailureKind::Broken, "connection reset by peer"));
        }
        if answer_in > timeout {
            self.trace.event(format!(
                "engine{node}: call {call} ({items} items): answers in {answer_in:?}, past the client's {timeout:?}; writes land in {applied_in:?}"
            ));
            self.sent(call, &body);
            self.apply_later(call, body, applied_in);
            tokio::time::sleep(timeout).await;
            self.state
                .lock()
                .unwrap()
                .given_up
                .insert(call, GaveUp::TimedOut(timeout));
            return Err(failure(FailureKind::TimedOut, "operation timed out"));
        }
        self.sent(call, &body);
        tokio::time::sleep(applied_in).await;
        let answer = self.apply(call, &body);
        tokio::time::sleep(answer_in - applied_in).await;
        // Its answer reaches the worker: what it says is the worker's to rely on.
        {
            let mut state = self.state.lock().unwrap();
            let noops = state.noops_of_call.remove(&call).unwrap_or_default();
            state.false_noops.extend(noops);
        }
        self.trace.event(format!(
            "engine{node}: call {call} ({items} items) answered in {answer_in:?}"
        ));
        Ok(answer)
    }

    /// The writes of `call` land in `delay`, whether its client still waits or not.
    fn apply_later(&self, call: u64, body: Vec<u8>, delay: Duration) {
        let engine = SimEngine {
            state: self.state.clone(),
            rng: self.rng.clone(),
            faults: self.faults,
            trace: self.trace.clone(),
            node: self.node,
            worker: self.worker,
        };
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            engine.apply(call, &body);
            // No one reads this answer.
            engine.state.lock().unwrap().noops_of_call.remove(&call);
            engine.trace.event(format!(
                "engine{}: call {call}'s writes landed",
                engine.node
            ));
        });
    }

    /// Applies a `_bulk` body's update items, in order, and answers as the engine does.
    /// The writes of `call` are on their way from now on.
    fn sent(&self, call: u64, body: &[u8]) {
        if let Some(items) = actions(body) {
            self.state.lock().unwrap().pending.insert(
                call,
                Pending {
                    items,
                    landed: BTreeMap::new(),
                },
            );
        }
    }

    fn apply(&self, call: u64, body: &[u8]) -> Answer {
        let Some(actions) = actions(body) else {
            return parse_error("Malformed action/metadata line, expected update");
        };
        let mut items = Vec::new();
        let mut errors = false;
        let mut state = self.state.lock().unwrap();
        let late = state.given_up.get(&call).copied();
        if late.is_some() {
            state.late_writes += 1;
        }
        let mut landed = state
            .pending
            .remove(&call)
            .map(|p| p.landed)
            .unwrap_or_default();
        let writer = Writer::Call { call, late };
        for (i, a) in actions.iter().enumerate() {
            let item = match landed.remove(&i) {
                Some(item) => item,
                None => self.update(
                    &mut state,
                    &a.index,
                    &a.id,
                    a.retry_on_conflict,
                    &a.line,
                    &writer,
                    true,
                ),
            };
            errors |= item["status"].as_u64().is_some_and(|s| s >= 300);
            items.push(json!({"update": item}));
        }
        let took = self.rng.lock().unwrap().random_range(1..50u64);
        let answer = json!({"errors": errors, "took": took, "items": items});
        Answer {
            status: 200,
            body: serde_json::to_vec(&answer).unwrap(),
        }
    }

    /// Another call's pending write of `index`/`id` that lands now, half the time there
    /// is one.
    fn in_flight(
        &self,
        state: &State,
        call: u64,
        index: &str,
        id: &str,
    ) -> Option<(u64, usize, Action)> {
        let found = state.pending.iter().find_map(|(earlier, p)| {
            if *earlier == call {
                return None;
            }
            let i =
                p.items.iter().enumerate().position(|(i, a)| {
                    a.index == index && a.id == id && !p.landed.contains_key(&i)
                })?;
            Some((*earlier, i, p.items[i].clone()))
        })?;
        self.chance(0.5).then_some(found)
    }

    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        state: &mut State,
        index: &str,
        id: &str,
        retry_on_conflict: u64,
        line: &Value,
        writer: &Writer,
        in_flight: bool,
    ) -> Value {
        if self.chance(self.faults.item_429) {
            return json!({"_index": index, "_id": id, "status": 429, "error": {
                "type": "es_rejected_execution_exception",
                "reason": "rejected execution of coordinating operation"}});
        }
        // A bulk update auto-creates its index.
        state.indexes.insert(index.to_owned());
        let mut conflicts = 0;
        // Another call's write of this document, on its way, lands between this update's
        // read and its write: a conflict.
        if let Writer::Call { call, .. } = writer
            && in_flight
            && let Some((earlier, i, action)) = self.in_flight(state, *call, index, id)
        {
            let late = state.given_up.get(&earlier).copied();
            let earlier_writer = Writer::Call {
                call: earlier,
                late,
            };
            let item = self.update(
                state,
                index,
                id,
                action.retry_on_conflict,
                &action.line,
                &earlier_writer,
                false,
            );
            let same_worker = state.call_worker.get(&earlier) == state.call_worker.get(call);
            if let Some(p) = state.pending.get_mut(&earlier) {
                p.landed.insert(i, item);
            }
            self.trace.event(format!(
                "engine{}: call {earlier}'s write of {id} lands within call {call}'s update of it",
                self.node
            ));
            conflicts = 1;
            if retry_on_conflict == 0 {
                let same = action.line["doc"] == line["doc"]
                    && action.line.get("upsert") == line.get("upsert");
                if same && same_worker {
                    state.noops_of_call.entry(*call).or_default().push(format!(
                        "call {call} answered 409 for {id}: its conflict was call {earlier} of the same worker, with the same change"
                    ));
                }
                return conflict(state, index, id);
            }
        }
        // Concurrent writers, each between a read and the write of this update.
        while conflicts <= retry_on_conflict && self.chance(self.faults.conflict) {
            conflicts += 1;
            let key = (index.to_owned(), id.to_owned());
            let Some(current) = state.docs.get(&key).and_then(Doc::current).cloned() else {
                break;
            };
            let mut source = current.source.clone();
            let other = source.get("other").and_then(Value::as_i64).unwrap_or(0);
            source.insert("other".into(), json!(other + 1));
            state.seq_no += 1;
            state.docs.get_mut(&key).unwrap().versions.push(Version {
                version: current.version + 1,
                source,
                writer: Writer::Other,
            });
            if conflicts > retry_on_conflict {
                return conflict(state, index, id);
            }
        }
        let key = (index.to_owned(), id.to_owned());
        let doc = state.docs.entry(key).or_default();
        let detect_noop = line["detect_noop"].as_bool().unwrap_or(true);
        let want_source = line["_source"].as_bool().unwrap_or(false);
        let changes = line["doc"].as_object().cloned().unwrap_or_default();
        let (status, result, source) = match doc.current() {
            None => match line.get("upsert").and_then(Value::as_object) {
                Some(upsert) => (201, "created", upsert.clone()),
                None if line["doc_as_upsert"] == json!(true) => (201, "created", changes),
                None => {
                    return json!({"_index": index, "_id": id, "status": 404, "error": {
                        "type": "document_missing_exception",
                        "reason": format!("[{id}]: document missing"),
                        "index_uuid": "sim", "shard": "0", "index": index}});
                }
            },
            Some(current) => {
                let mut merged = current.source.clone();
                merge(&mut merged, &changes);
                if detect_noop && merged == current.source {
                    // The write that brought the change: the oldest of the latest versions
                    // that all hold it.
                    let holds = |v: &&Version| {
                        let mut m = v.source.clone();
                        merge(&mut m, &changes);
                        m == v.source
                    };
                    let brought = doc.versions.iter().rev().take_while(holds).last();
                    if let (Some(Writer::Call { call: earlier, .. }), Writer::Call { call, .. }) =
                        (brought.map(|v| &v.writer), writer)
                        && earlier != call
                        && state.given_up.contains_key(earlier)
                        && state.call_worker.get(earlier) == state.call_worker.get(call)
                    {
                        state.noops_of_call.entry(*call).or_default().push(format!(
                            "call {call} answered noop for {id}: its change is there only by call {earlier}, which the worker gave up"
                        ));
                    }
                    (200, "noop", merged)
                } else {
                    (200, "updated", merged)
                }
            }
        };
        let version = match (result, doc.current()) {
            ("noop", Some(current)) => current.version,
            (_, Some(current)) => current.version + 1,
            (_, None) => 1,
        };
        if result != "noop" {
            // What an invariant looks at: a counter (an integer field) made smaller.
            if let Some(current) = doc.current() {
                for (field, value) in &source {
                    let (Some(to), Some(from)) = (
                        value.as_i64(),
                        current.source.get(field).and_then(Value::as_i64),
                    ) else {
                        continue;
                    };
                    if to < from {
                        state.regressions.push(Regression {
                            id: id.to_owned(),
                            field: field.clone(),
                            from,
                            to,
                            writer: writer.clone(),
                        });
                    }
                }
            }
            state.seq_no += 1;
            let doc = state
                .docs
                .get_mut(&(index.to_owned(), id.to_owned()))
                .unwrap();
            doc.versions.push(Version {
                version,
                source: source.clone(),
                writer: writer.clone(),
            });
        }
        let seq_no = state.seq_no;
        let mut item = Map::new();
        item.insert("_index".into(), json!(index));
        item.insert("_id".into(), json!(id));
        item.insert("_version".into(), json!(version));
        item.insert("result".into(), json!(result));
        item.insert(
            "_shards".into(),
            json!({"total": 2, "successful": 1, "failed": 0}),
        );
        item.insert("_seq_no".into(), json!(seq_no));
        item.insert("_primary_term".into(), json!(1));
        if want_source {
            item.insert(
                "get".into(),
                json!({"_seq_no": seq_no, "_primary_term": 1, "found": true, "_source": source}),
            );
        }
        item.insert("status".into(), json!(status));
        Value::Object(item)
    }
}

impl EngineNode for SimEngine {
    fn exchange<'a>(&'a self, call: Call<'a>) -> Exchange<'a> {
        let path = call.path.to_owned();
        let query: Vec<(String, String)> = call
            .query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let body = call.body.map(<[u8]>::to_vec);
        let method = call.method;
        let timeout = call.timeout;
        Box::pin(async move {
            match (method, path.as_str(), body) {
                (Method::Post, "/_bulk", Some(body)) => self.bulk(body, query, timeout).await,
                (Method::Head, path, None) => self.head(path).await,
                (Method::Get, "/_cluster/health", None) => Ok(Answer {
                    status: 200,
                    body: br#"{"cluster_name":"sim","status":"green","timed_out":false}"#.to_vec(),
                }),
                (method, path, _) => Ok(Answer {
                    status: 405,
                    body: format!(r#"{{"error":"Incorrect HTTP method for uri [{path}] and method [{method:?}]","status":405}}"#).into_bytes(),
                }),
            }
        })
    }
}

/// A 409 as Elasticsearch answers it (tests/model.rs, the stale `if_seq_no` write).
fn conflict(state: &State, index: &str, id: &str) -> Value {
    let seq_no = state.seq_no;
    json!({"_index": index, "_id": id, "status": 409, "error": {
        "type": "version_conflict_engine_exception",
        "reason": format!("[{id}]: version conflict, required seqNo [{}], primary term [1]. current document has seqNo [{seq_no}] and primary term [1]", seq_no - 1),
        "index_uuid": "sim", "shard": "0", "index": index}})
}

/// Elasticsearch's partial update: objects merged key by key, anything else replaced.
fn merge(into: &mut Map<String, Value>, changes: &Map<String, Value>) {
    for (key, value) in changes {
        match (into.get_mut(key), value) {
            (Some(Value::Object(old)), Value::Object(new)) => merge(old, new),
            _ => {
                into.insert(key.clone(), value.clone());
            }
        }
    }
}

fn failure(kind: FailureKind, message: &str) -> Failure {
    Failure {
        kind,
        message: message.into(),
    }
}

/// A whole call refused for overload, as Elasticsearch 8 answers it.
fn rejected_call() -> Answer {
    let reason = "rejected execution of coordinating operation [coordinating_and_primary_bytes=0, replica_bytes=0, all_bytes=0, coordinating_operation_bytes=1, max_coordinating_and_primary_bytes=0]";
    Answer {
        status: 429,
        body: serde_json::to_vec(&json!({"error": {
            "root_cause": [{"type": "es_rejected_execution_exception", "reason": reason}],
            "type": "es_rejected_execution_exception", "reason": reason}, "status": 429}))
        .unwrap(),
    }
}

fn unavailable() -> Answer {
    let reason = "[sim] primary shard is not active Timeout: [1m]";
    Answer {
        status: 503,
        body: serde_json::to_vec(&json!({"error": {
            "root_cause": [{"type": "unavailable_shards_exception", "reason": reason}],
            "type": "unavailable_shards_exception", "reason": reason}, "status": 503}))
        .unwrap(),
    }
}

fn parse_error(reason: &str) -> Answer {
    Answer {
        status: 400,
        body: serde_json::to_vec(&json!({"error": {
            "root_cause": [{"type": "illegal_argument_exception", "reason": reason}],
            "type": "illegal_argument_exception", "reason": reason}, "status": 400}))
        .unwrap(),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(byte) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
