//! A real Kuzzle 2.56 next to the worker, on the same Elasticsearch (issue 11).
//!
//! Needs Kuzzle running: `scripts/kuzzle.sh start` (`scripts/test.sh` starts it, and
//! stops it afterwards). When Kuzzle doesn't answer at http://127.0.0.1:7512 (or
//! `KUZZLE_URL`), every test here fails saying so: none is skipped.
//!
//! - Kuzzle creates an index, a collection and documents; the worker (v2 answers, on
//!   Kuzzle's alias layout) updates and upserts them; Kuzzle's own `document:get`,
//!   `document:search` and `collection:list` then see exactly the worker's changes, with
//!   the worker's `_kuzzle_info`.
//! - A table of requests, each sent to Kuzzle (HTTP) and to the worker (AMQP) on twin
//!   collections holding the same documents: the two answers, and the documents stored
//!   afterwards, must be equal once what differs by run (request ids, timestamps) is
//!   taken out, except for the deliberate differences listed in [`DELIBERATE`]. The test
//!   prints the comparison, case by case.

mod support;

use std::fmt::Write as _;

use futures_util::StreamExt;

use mupdate_worker::config::{Format, Layout, Settings};
use reqwest::Method;
use serde_json::{Map, Value, json};
use support::{Worker, call, fresh, http};

fn kuzzle_url() -> String {
    std::env::var("KUZZLE_URL").unwrap_or_else(|_| "http://127.0.0.1:7512".into())
}

/// Fails the test unless Kuzzle answers its health check. Waits first (bounded) for the
/// broker and the engine, which other test binaries may be restarting.
async fn require_kuzzle() {
    let deadline = tokio::time::Instant::now() + 2 * support::TIMEOUT;
    loop {
        let broker = tokio::net::TcpStream::connect("127.0.0.1:5672")
            .await
            .is_ok();
        let engine = http()
            .get(format!("{}/_cluster/health", support::ES_URL))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if broker && engine {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "RabbitMQ (up: {broker}) and Elasticsearch (up: {engine}) must run: scripts/services.sh start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let url = format!("{}/_healthcheck", kuzzle_url());
    match http().get(&url).send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => panic!("Kuzzle at {url} answers {}: is it starting?", r.status()),
        Err(e) => panic!(
            "Kuzzle is not reachable at {url} ({e}). These tests need a real Kuzzle: \
             run `scripts/kuzzle.sh start` first (scripts/test.sh does)."
        ),
    }
}

/// One call to Kuzzle's HTTP API; its JSON answer, whatever the status (the answer
/// carries it).
async fn kuzzle(
    method: Method,
    path: &str,
    query: &[(String, String)],
    body: Option<&Value>,
) -> Value {
    // Creating a collection waits for the engine's cluster state: more than the usual
    // bound when the engine has just restarted.
    let client = reqwest::Client::builder()
        .timeout(2 * support::TIMEOUT)
        .build()
        .unwrap();
    let mut request = client
        .request(method.clone(), format!("{}{path}", kuzzle_url()))
        .query(query);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("Kuzzle {method} {path}: {e}"));
    let text = response.text().await.unwrap();
    serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("Kuzzle {method} {path}: not JSON: {text}"))
}

/// A Kuzzle call that must succeed; its `result`. A set-up call Kuzzle fails with a 5xx
/// (the engine restarting: other test binaries stop it) is tried again, within a bound.
async fn kuzzle_ok(method: Method, path: &str, body: Option<&Value>) -> Value {
    let deadline = tokio::time::Instant::now() + 2 * support::TIMEOUT;
    loop {
        let answer = kuzzle(method.clone(), path, &[], body).await;
        let status = answer["status"].as_u64().unwrap_or(0);
        if status >= 500 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            continue;
        }
        assert_eq!(status, 200, "Kuzzle {method} {path}: {answer}");
        return answer["result"].clone();
    }
}

/// A Kuzzle index made through Kuzzle's API, deleted through it on drop.
struct KuzzleIndex {
    name: String,
}

impl KuzzleIndex {
    async fn create(prefix: &str) -> Self {
        let name = fresh(prefix);
        kuzzle_ok(Method::POST, &format!("/{name}/_create"), None).await;
        KuzzleIndex { name }
    }

    /// `collection:create` with these mappings, then `document:mCreate` of `docs`.
    async fn collection(&self, collection: &str, properties: Value, docs: &[(&str, Value)]) {
        let mappings = json!({"mappings": {"dynamic": "false", "properties": properties}});
        kuzzle_ok(
            Method::PUT,
            &format!("/{}/{collection}", self.name),
            Some(&mappings),
        )
        .await;
        if docs.is_empty() {
            return;
        }
        let documents: Vec<Value> = docs
            .iter()
            .map(|(id, body)| json!({"_id": id, "body": body}))
            .collect();
        let created = kuzzle_ok(
            Method::POST,
            &format!("/{}/{collection}/_mCreate?refresh=wait_for", self.name),
            Some(&json!({"documents": documents})),
        )
        .await;
        assert_eq!(created["errors"], json!([]), "mCreate: {created}");
    }

    /// Every document of a collection, by `_id`, as Kuzzle's `document:search` sees them.
    async fn documents(&self, collection: &str) -> Value {
        kuzzle_ok(
            Method::POST,
            &format!("/{}/{collection}/_refresh", self.name),
            None,
        )
        .await;
        let found = kuzzle_ok(
            Method::POST,
            &format!("/{}/{collection}/_search?size=1000", self.name),
            Some(&json!({"query": {"match_all": {}}})),
        )
        .await;
        let mut hits: Vec<Value> = found["hits"].as_array().unwrap().clone();
        hits.sort_by_key(|h| h["_id"].as_str().unwrap_or_default().to_owned());
        Value::Array(
            hits.into_iter()
                .map(|h| json!({"_id": h["_id"], "_source": h["_source"]}))
                .collect(),
        )
    }
}

impl Drop for KuzzleIndex {
    fn drop(&mut self) {
        support::delete_blocking(format!("{}/{}", kuzzle_url(), self.name));
    }
}

/// A worker answering in Kuzzle 2's layout, on Kuzzle 2's storage layout: each
/// collection is reached through its alias `@&{index}.{collection}`.
fn kuzzle2_settings() -> Settings {
    let mut settings = support::settings();
    settings.response.format = Format::V2;
    settings.storage.layout = Layout::Kuzzle2;
    settings
}

fn envelope(index: &str, collection: &str, action: &str, documents: Value) -> Value {
    json!({"index": index, "collection": collection, "controller": "document",
           "action": action, "refresh": "wait_for", "body": {"documents": documents}})
}

fn products() -> Value {
    json!({"name": {"type": "keyword"}, "price": {"type": "integer"}, "stock": {"type": "integer"}})
}

// ------------------------------------------------------------------ Kuzzle reads the worker's writes

#[tokio::test]
async fn kuzzle_sees_the_workers_updates() {
    require_kuzzle().await;
    let index = KuzzleIndex::create("kz-see").await;
    let docs = [
        ("p1", json!({"name": "chair", "price": 1})),
        ("p2", json!({"name": "table", "price": 2, "stock": 5})),
        ("p3", json!({"name": "lamp", "price": 3})),
    ];
    index.collection("products", products(), &docs).await;
    let before = index.documents("products").await;
    let worker = Worker::start_with(kuzzle2_settings()).await;

    let reply = call(
        &worker,
        &envelope(
            &index.name,
            "products",
            "mUpdate",
            json!([{"_id": "p1", "body": {"price": 10}},
                   {"_id": "p2", "body": {"price": 20, "stock": 0}}]),
        ),
    )
    .await;
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["result"]["errors"], json!([]), "{reply}");
    let successes = reply["result"]["successes"].as_array().unwrap();
    assert_eq!(successes.len(), 2, "{reply}");

    // document:get: each updated document is the worker's answer, _kuzzle_info included.
    for success in successes {
        let id = success["_id"].as_str().unwrap();
        let got = kuzzle_ok(Method::GET, &format!("/{}/products/{id}", index.name), None).await;
        assert_eq!(
            got["_source"], success["_source"],
            "{id}: Kuzzle {got} worker {success}"
        );
        assert_eq!(got["_version"], success["_version"], "{id}");
        let info = &got["_source"]["_kuzzle_info"];
        assert!(info["updatedAt"].is_u64(), "{id}: {info}");
        assert_eq!(
            info["author"], "-1",
            "{id}: Kuzzle's creation is kept: {info}"
        );
    }
    let p1 = kuzzle_ok(Method::GET, &format!("/{}/products/p1", index.name), None).await;
    assert_eq!(
        (&p1["_source"]["name"], &p1["_source"]["price"]),
        (&json!("chair"), &json!(10))
    );
    // The untouched document is as Kuzzle made it.
    let p3 = kuzzle_ok(Method::GET, &format!("/{}/products/p3", index.name), None).await;
    assert_eq!(p3["_version"], 1);
    assert_eq!(json!({"_id": "p3", "_source": p3["_source"]}), before[2]);

    // document:search: the new values are indexed (refresh wait_for: visible at once).
    let found = kuzzle_ok(
        Method::POST,
        &format!("/{}/products/_search", index.name),
        Some(&json!({"query": {"range": {"price": {"gte": 10}}}})),
    )
    .await;
    assert_eq!(found["total"], 2, "{found}");
    for hit in found["hits"].as_array().unwrap() {
        let success = successes.iter().find(|s| s["_id"] == hit["_id"]).unwrap();
        assert_eq!(hit["_source"], success["_source"], "{hit}");
    }
    let restocked = kuzzle_ok(
        Method::POST,
        &format!("/{}/products/_search", index.name),
        Some(&json!({"query": {"term": {"stock": 0}}})),
    )
    .await;
    assert_eq!(restocked["total"], 1, "{restocked}");
    assert_eq!(restocked["hits"][0]["_id"], "p2");

    // collection:list: the worker made no collection of its own.
    let list = kuzzle_ok(Method::GET, &format!("/{}/_list", index.name), None).await;
    assert_eq!(
        list["collections"],
        json!([{"name": "products", "type": "stored"}]),
        "{list}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn kuzzle_sees_the_workers_upserts() {
    require_kuzzle().await;
    let index = KuzzleIndex::create("kz-upsert").await;
    index
        .collection(
            "products",
            products(),
            &[("p1", json!({"name": "chair", "price": 1}))],
        )
        .await;
    let worker = Worker::start_with(kuzzle2_settings()).await;

    let reply = call(
        &worker,
        &envelope(
            &index.name,
            "products",
            "mUpsert",
            json!([{"_id": "p1", "changes": {"price": 10}, "default": {"stock": 1}},
                   {"_id": "p9", "changes": {"price": 90}, "default": {"name": "new", "stock": 9}}]),
        ),
    )
    .await;
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["result"]["errors"], json!([]), "{reply}");
    let successes = reply["result"]["successes"].as_array().unwrap();
    assert_eq!(successes.len(), 2, "{reply}");
    for success in successes {
        let id = success["_id"].as_str().unwrap();
        let got = kuzzle_ok(Method::GET, &format!("/{}/products/{id}", index.name), None).await;
        assert_eq!(
            got["_source"], success["_source"],
            "{id}: Kuzzle {got} worker {success}"
        );
        assert_eq!(got["_version"], success["_version"], "{id}");
    }
    let p1 = kuzzle_ok(Method::GET, &format!("/{}/products/p1", index.name), None).await;
    assert_eq!(
        p1["_source"]["stock"],
        Value::Null,
        "default is for creation only: {p1}"
    );
    assert_eq!(p1["_source"]["_kuzzle_info"]["author"], "-1", "{p1}");
    let p9 = kuzzle_ok(Method::GET, &format!("/{}/products/p9", index.name), None).await;
    assert_eq!(p9["_version"], 1, "{p9}");
    let source = &p9["_source"];
    assert_eq!(
        (&source["name"], &source["price"], &source["stock"]),
        (&json!("new"), &json!(90), &json!(9))
    );
    assert!(source["_kuzzle_info"]["createdAt"].is_u64(), "{p9}");

    let found = kuzzle_ok(
        Method::POST,
        &format!("/{}/products/_search", index.name),
        Some(&json!({"query": {"range": {"price": {"gte": 10}}}})),
    )
    .await;
    assert_eq!(found["total"], 2, "{found}");
    let list = kuzzle_ok(Method::GET, &format!("/{}/_list", index.name), None).await;
    assert_eq!(
        list["collections"],
        json!([{"name": "products", "type": "stored"}]),
        "{list}"
    );
    worker.stop().await;
}

// ------------------------------------------------------------------ Kuzzle's answers and the worker's

/// A known, deliberate difference between Kuzzle's answers (or stored documents) and
/// the worker's: at these paths (a key, `[*]` for any array position, covering what is
/// under it), in every case or in one.
struct Deliberate {
    case: Option<&'static str>,
    paths: &'static [&'static str],
    why: &'static str,
}

const fn everywhere(paths: &'static [&'static str], why: &'static str) -> Deliberate {
    Deliberate {
        case: None,
        paths,
        why,
    }
}

const fn only(case: &'static str, paths: &'static [&'static str], why: &'static str) -> Deliberate {
    Deliberate {
        case: Some(case),
        paths,
        why,
    }
}

/// Every difference allowed: any other one fails the comparison.
const DELIBERATE: &[Deliberate] = &[
    everywhere(
        &["headers"],
        "Kuzzle's HTTP response headers; an AMQP reply has its headers as message properties (SPEC 5)",
    ),
    everywhere(
        &["refresh", "retryOnConflict"],
        "the worker echoes the request's refresh and retryOnConflict (SPEC 3); Kuzzle 2 doesn't",
    ),
    everywhere(
        &[
            "result.successes[*]._source._kuzzle_info.updater",
            "result.successes[*]._source._kuzzle_info.author",
            "stored[*]._source._kuzzle_info.updater",
            "stored[*]._source._kuzzle_info.author",
        ],
        "Kuzzle's anonymous user is \"-1\"; the worker's is the AMQP user_id, null without one (SPEC 2)",
    ),
    everywhere(
        &[
            "result.errors[*].document.body._kuzzle_info",
            "error.errors[*].document.body._kuzzle_info",
        ],
        "a failure carries its document exactly as sent (SPEC 3); Kuzzle adds the metadata it would have written",
    ),
    only(
        "body missing",
        &["status", "error"],
        "Kuzzle 2.56 fails with a 500 (reading 'documents' of null); SPEC 4: 400 api.assert.body_required",
    ),
    only(
        "documents missing",
        &["status", "error"],
        "Kuzzle 2.56 fails with a 500 (reading 'length' of undefined); SPEC 4: 400 api.assert.missing_argument",
    ),
    only(
        "documents not an array",
        &["status", "error", "result"],
        "Kuzzle 2.56 answers 200 having done nothing; SPEC 4: 400 api.assert.invalid_type",
    ),
];

/// The documents every twin collection starts with (made by Kuzzle).
fn seed() -> Vec<(&'static str, Value)> {
    vec![
        ("d1", json!({"name": "one", "n": 1})),
        ("d2", json!({"name": "two", "n": 2})),
        ("d3", json!({"name": "three", "n": 3})),
    ]
}

/// One request of the table: an action, its arguments (HTTP query string for Kuzzle,
/// top-level envelope keys for the worker) and its body (none: no body at all).
struct Case {
    name: &'static str,
    action: &'static str,
    args: Value,
    body: Option<Value>,
    /// Sent to a collection that doesn't exist (in an index that does).
    unknown_collection: bool,
}

fn case(name: &'static str, action: &'static str, args: Value, documents: Value) -> Case {
    Case {
        name,
        action,
        args,
        body: Some(json!({"documents": documents})),
        unknown_collection: false,
    }
}

fn cases() -> Vec<Case> {
    let wait = || json!({"refresh": "wait_for"});
    let many: Vec<Value> = (0..201)
        .map(|i| json!({"_id": format!("m{i}"), "body": {"n": i}}))
        .collect();
    vec![
        case(
            "all succeed",
            "mUpdate",
            wait(),
            json!([{"_id": "d1", "body": {"n": 10}}, {"_id": "d2", "body": {"name": "deux"}}]),
        ),
        case(
            "mixed failures",
            "mUpdate",
            wait(),
            json!([{"_id": "d1", "body": {"n": 11}},
                   {"_id": "d9", "body": {"n": 9}},
                   {"_id": "d2", "body": "not an object"},
                   {"body": {"n": 0}},
                   {"_id": 3, "body": {"n": 3}},
                   {"_id": "d3", "body": {"n": 33}}]),
        ),
        case(
            "strict with a failure",
            "mUpdate",
            json!({"refresh": "wait_for", "strict": true}),
            json!([{"_id": "d1", "body": {"n": 12}}, {"_id": "d9", "body": {"n": 9}}]),
        ),
        case(
            "strict, all succeed",
            "mUpdate",
            json!({"refresh": "wait_for", "strict": true}),
            json!([{"_id": "d1", "body": {"n": 13}}]),
        ),
        case(
            "retryOnConflict 2",
            "mUpdate",
            json!({"retryOnConflict": 2}),
            json!([{"_id": "d1", "body": {"n": 14}}]),
        ),
        case(
            "retryOnConflict \"2\" (a string)",
            "mUpdate",
            json!({"retryOnConflict": "2"}),
            json!([{"_id": "d1", "body": {"n": 15}}]),
        ),
        case(
            "retryOnConflict \"three\"",
            "mUpdate",
            json!({"retryOnConflict": "three"}),
            json!([{"_id": "d1", "body": {"n": 16}}]),
        ),
        case(
            "refresh invalid",
            "mUpdate",
            json!({"refresh": "yes"}),
            json!([{"_id": "d1", "body": {"n": 17}}]),
        ),
        Case {
            body: Some(json!({"documents": {"_id": "d1", "body": {"n": 18}}})),
            ..case("documents not an array", "mUpdate", wait(), json!(null))
        },
        Case {
            body: Some(json!({})),
            ..case("documents missing", "mUpdate", wait(), json!(null))
        },
        Case {
            body: None,
            ..case("body missing", "mUpdate", wait(), json!(null))
        },
        Case {
            unknown_collection: true,
            ..case(
                "unknown collection",
                "mUpdate",
                wait(),
                json!([{"_id": "d1", "body": {"n": 19}}]),
            )
        },
        case(
            "silent",
            "mUpdate",
            json!({"refresh": "wait_for", "silent": true}),
            json!([{"_id": "d1", "body": {"n": 23}}]),
        ),
        case(
            "a document with _source",
            "mUpdate",
            wait(),
            json!([{"_id": "d1", "_source": {"n": 1}, "body": {"n": 24}}]),
        ),
        case("201 documents", "mUpdate", wait(), Value::Array(many)),
        case("empty documents", "mUpdate", wait(), json!([])),
        case(
            "mUpsert created and updated",
            "mUpsert",
            wait(),
            json!([{"_id": "d1", "changes": {"n": 20}, "default": {"name": "ignored"}},
                   {"_id": "d7", "changes": {"n": 7}, "default": {"name": "seven"}},
                   {"_id": "d8", "changes": {"name": "eight"}}]),
        ),
        case(
            "mUpsert failures",
            "mUpsert",
            wait(),
            json!([{"_id": "d1", "changes": {"n": 21}},
                   {"_id": "d2", "changes": "not an object"},
                   {"_id": "d3", "changes": {"n": 3}, "default": [1]},
                   {"changes": {"n": 0}},
                   {"_id": "d4", "default": {"n": 4}}]),
        ),
        case(
            "mUpsert strict with a failure",
            "mUpsert",
            json!({"refresh": "wait_for", "strict": true}),
            json!([{"_id": "d5", "changes": {"n": 5}}, {"_id": "d2", "changes": 2}]),
        ),
    ]
}

/// A case's arguments as Kuzzle's HTTP query string.
fn query(args: &Value) -> Vec<(String, String)> {
    args.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str().map_or_else(|| v.to_string(), str::to_owned),
            )
        })
        .collect()
}

/// Takes out what differs by run: the request id, `_kuzzle_info` times (a time stays
/// distinct from null), and the twin collection's name.
fn normalize(value: &mut Value, collection: &str) {
    if let Value::Object(map) = value {
        map.remove("requestId");
    }
    walk(value, collection);
    // Deliberate: the worker lists failures in the request's order; Kuzzle lists those
    // it refused before the storage call first. Compared as sets: same entries, either order.
    for pointer in ["/result/errors", "/error/errors"] {
        if let Some(Value::Array(items)) = value.pointer_mut(pointer) {
            items.sort_by_key(Value::to_string);
        }
    }
}

fn walk(value: &mut Value, collection: &str) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                if key == "_kuzzle_info" {
                    mask_times(inner);
                }
                walk(inner, collection);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| walk(v, collection)),
        Value::String(s) if s == collection => *s = "<collection>".into(),
        Value::String(s) => *s = s.replace(&format!("\"{collection}\""), "\"<collection>\""),
        _ => {}
    }
}

fn mask_times(info: &mut Value) {
    if let Value::Object(map) = info {
        for key in ["createdAt", "updatedAt"] {
            if let Some(v) = map.get_mut(key)
                && !v.is_null()
            {
                *v = json!("<time>");
            }
        }
    }
}

/// One difference: where, and each side's value (None: the key or item is absent).
#[derive(Debug)]
struct Diff {
    path: String,
    kuzzle: Option<Value>,
    worker: Option<Value>,
}

fn diff(path: String, kuzzle: Option<&Value>, worker: Option<&Value>, out: &mut Vec<Diff>) {
    match (kuzzle, worker) {
        (Some(Value::Object(k)), Some(Value::Object(w))) => {
            let mut keys: Vec<&String> = k.keys().chain(w.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let sub = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                diff(sub, k.get(key), w.get(key), out);
            }
        }
        (Some(Value::Array(k)), Some(Value::Array(w))) => {
            for i in 0..k.len().max(w.len()) {
                diff(format!("{path}[{i}]"), k.get(i), w.get(i), out);
            }
        }
        (k, w) if k == w => {}
        (k, w) => out.push(Diff {
            path,
            kuzzle: k.cloned(),
            worker: w.cloned(),
        }),
    }
}

/// `result.errors[3].status` as `result.errors[*].status`.
fn general(path: &str) -> String {
    let mut out = String::new();
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push_str("[*]");
            }
            ']' => in_index = false,
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

fn deliberate(case: &str, path: &str) -> Option<&'static str> {
    let path = general(path);
    DELIBERATE
        .iter()
        .filter(|d| d.case.is_none_or(|c| c == case))
        .flat_map(|d| d.paths.iter())
        .find(|pattern| {
            path.strip_prefix(**pattern)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
        .copied()
}

fn short(value: &Option<Value>, max: usize) -> String {
    let text = value
        .as_ref()
        .map_or_else(|| "(absent)".to_owned(), Value::to_string);
    if text.len() <= max {
        return text;
    }
    let cut = (0..=max)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}… ({} bytes)", &text[..cut], text.len())
}

/// What one case showed.
struct Outcome {
    name: &'static str,
    unexpected: Vec<Diff>,
    deliberate: Vec<&'static str>,
    kuzzle: Value,
    worker: Value,
}

async fn run_case(index: &KuzzleIndex, worker: &Worker, n: usize, case: &Case) -> Outcome {
    let (k, w) = if case.unknown_collection {
        ("nope".to_owned(), "nope".to_owned())
    } else {
        let (k, w) = (format!("k{n}"), format!("w{n}"));
        for c in [&k, &w] {
            index
                .collection(
                    c,
                    json!({"name": {"type": "keyword"}, "n": {"type": "integer"}}),
                    &seed(),
                )
                .await;
        }
        (k, w)
    };
    let (method, route) = match case.action {
        "mUpsert" => (Method::POST, "_mUpsert"),
        _ => (Method::PATCH, "_mUpdate"),
    };
    let mut kuzzle_answer = kuzzle(
        method,
        &format!("/{}/{k}/{route}", index.name),
        &query(&case.args),
        case.body.as_ref(),
    )
    .await;
    let mut envelope = json!({"index": index.name, "collection": w,
                              "controller": "document", "action": case.action});
    let map: &mut Map<String, Value> = envelope.as_object_mut().unwrap();
    for (key, value) in case.args.as_object().unwrap() {
        map.insert(key.clone(), value.clone());
    }
    if let Some(body) = &case.body {
        map.insert("body".into(), body.clone());
    }
    let mut worker_answer = call(worker, &envelope).await;
    normalize(&mut kuzzle_answer, &k);
    normalize(&mut worker_answer, &w);

    let mut diffs = Vec::new();
    diff(
        String::new(),
        Some(&kuzzle_answer),
        Some(&worker_answer),
        &mut diffs,
    );
    if !case.unknown_collection {
        let mut stored_k = index.documents(&k).await;
        let mut stored_w = index.documents(&w).await;
        normalize(&mut stored_k, &k);
        normalize(&mut stored_w, &w);
        diff(
            "stored".into(),
            Some(&stored_k),
            Some(&stored_w),
            &mut diffs,
        );
    }
    let (mut deliberate_paths, mut unexpected) = (Vec::new(), Vec::new());
    for d in diffs {
        match deliberate(case.name, &d.path) {
            Some(pattern) => deliberate_paths.push(pattern),
            None => unexpected.push(d),
        }
    }
    deliberate_paths.dedup();
    Outcome {
        name: case.name,
        unexpected,
        deliberate: deliberate_paths,
        kuzzle: kuzzle_answer,
        worker: worker_answer,
    }
}

/// The comparison, case by case: equal, or how they differ, with both answers.
fn table(outcomes: &[Outcome]) -> String {
    let mut out =
        String::from("\nKuzzle 2.56 vs the worker (v2), after removing request ids and times:\n\n");
    for o in outcomes {
        let mut deliberate = o.deliberate.clone();
        deliberate.sort_unstable();
        deliberate.dedup();
        let note = if deliberate.is_empty() {
            String::new()
        } else {
            format!(" (deliberate: {})", deliberate.join(", "))
        };
        if o.unexpected.is_empty() {
            let _ = writeln!(out, "  {:<34} equal{note}", o.name);
            continue;
        }
        let _ = writeln!(out, "  {:<34} DIFFERS{note}", o.name);
        for d in o.unexpected.iter().take(12) {
            let _ = writeln!(
                out,
                "      {}: kuzzle {} | worker {}",
                d.path,
                short(&d.kuzzle, 160),
                short(&d.worker, 160)
            );
        }
        if o.unexpected.len() > 12 {
            let _ = writeln!(out, "      … {} more", o.unexpected.len() - 12);
        }
        let _ = writeln!(
            out,
            "      kuzzle: {}",
            short(&Some(o.kuzzle.clone()), 1200)
        );
        let _ = writeln!(
            out,
            "      worker: {}",
            short(&Some(o.worker.clone()), 1200)
        );
    }
    out.push_str("\nDeliberate differences (tests/kuzzle.rs DELIBERATE):\n");
    for d in DELIBERATE {
        let case = d.case.map_or_else(String::new, |c| format!("[{c}] "));
        let _ = writeln!(out, "  {case}{}: {}", d.paths.join(", "), d.why);
    }
    out
}

#[tokio::test]
async fn answers_match_kuzzles() {
    require_kuzzle().await;
    let index = KuzzleIndex::create("kz-cmp").await;
    let worker = Worker::start_with(kuzzle2_settings()).await;
    // The cases are independent (twin collections of their own): a few at a time.
    let cases = cases();
    let outcomes: Vec<Outcome> = futures_util::stream::iter(
        cases
            .iter()
            .enumerate()
            .map(|(n, case)| run_case(&index, &worker, n, case)),
    )
    .buffered(4)
    .collect()
    .await;
    worker.stop().await;
    let table = table(&outcomes);
    println!("{table}");
    let report = concat!(env!("CARGO_TARGET_TMPDIR"), "/kuzzle-comparison.txt");
    let _ = std::fs::write(report, &table);
    let differing: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.unexpected.is_empty())
        .map(|o| o.name)
        .collect();
    assert!(
        differing.is_empty(),
        "{} of {} cases differ from Kuzzle: {differing:?}\n{table}",
        differing.len(),
        outcomes.len()
    );
}
