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
//! - The table covers every write action (issue 21): create, mCreate, createOrReplace,
//!   mCreateOrReplace, replace, mReplace, delete, mDelete, update, mUpdate, upsert,
//!   mUpsert; successes, each per-document error (exists, missing, mapping clash),
//!   whole-request errors, `strict` with and without a failure, `silent`, `source`,
//!   `refresh`, empty and oversize lists (201: Kuzzle's `documentsWriteCount` is 200,
//!   the worker's default too, checked against Kuzzle's `/_getConfig`), generated ids
//!   (compared by shape: the engine's 20 base64url characters for Kuzzle, 22 for the
//!   worker's own) and mixes.
//! - mDelete: the test engine has no reindex module, so Kuzzle 2.56 fails every
//!   mDelete past its input checks (400 "undefined", no `_delete_by_query`). Its input
//!   checks are compared live; for the others the test checks Kuzzle failed so, then
//!   compares the worker with the answer Kuzzle's source gives (`{successes: [ids],
//!   errors: [{_id, reason, status}]}`) and with the stored state Kuzzle's single
//!   deletes of the same ids leave ([`Case::from_source`]).
//! - `MUPDATE_KUZZLE_CASES=text` runs only the cases whose name holds `text`.

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
    /// Only where Kuzzle has its anonymous user ("-1") and the worker none (null).
    anonymous: bool,
}

const fn everywhere(paths: &'static [&'static str], why: &'static str) -> Deliberate {
    Deliberate {
        case: None,
        paths,
        why,
        anonymous: false,
    }
}

/// Kuzzle's anonymous user against the worker's none, at these paths, in every case.
const fn anonymous(paths: &'static [&'static str], why: &'static str) -> Deliberate {
    Deliberate {
        case: None,
        paths,
        why,
        anonymous: true,
    }
}

const fn only(case: &'static str, paths: &'static [&'static str], why: &'static str) -> Deliberate {
    Deliberate {
        case: Some(case),
        paths,
        why,
        anonymous: false,
    }
}

const UPSERT_CREATED_INFO: &[&str] = &[
    "stored[*]._source._kuzzle_info.author",
    "stored[*]._source._kuzzle_info.createdAt",
    "stored[*]._source._kuzzle_info.updatedAt",
    "stored[*]._source._kuzzle_info.updater",
];
const UPSERT_CREATED_WHY: &str = "(the helper's reading, for the lead to confirm) an upsert \
     that creates stores {author, createdAt} as mUpsert does; Kuzzle 2.56's upsert lets the \
     changes' {updatedAt, updater} replace the default's metadata ({...default, ...changes})";

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
    anonymous(
        &[
            "result.successes[*]._source._kuzzle_info.updater",
            "result.successes[*]._source._kuzzle_info.author",
            "result._source._kuzzle_info.updater",
            "result._source._kuzzle_info.author",
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
    // Issue 21: every write action. Decided by the lead unless said otherwise.
    only(
        "mCreate a document with _source",
        &["result.errors[*].document._source"],
        "a failure carries its entry exactly as sent (SPEC 3), `_source` included; Kuzzle's \
         funnel rebuilds every entry as {_id, body} before it is checked",
    ),
    only(
        "mCreate failures",
        &[
            "result.errors[*].document._source",
            "result.errors[*].document.body",
        ],
        "a failure carries its entry exactly as sent ({_id, body}); Kuzzle's engine-level \
         failures carry {_source: {_kuzzle_info, …}, _id}",
    ),
    only(
        "mCreateOrReplace failures",
        &[
            "result.errors[*].document._source",
            "result.errors[*].document.body",
        ],
        "a failure carries its entry exactly as sent ({_id, body}); Kuzzle's engine-level \
         failures carry {_source: {_kuzzle_info, …}, _id}",
    ),
    only(
        "mReplace failures",
        &[
            "result.errors[*].document._source",
            "result.errors[*].document.body",
        ],
        "a failure carries its entry exactly as sent ({_id, body}); Kuzzle's engine-level \
         failures carry {_source: {_kuzzle_info, …}, _id}",
    ),
    only(
        "mUpsert mapping clash",
        &[
            "result.errors[*].document._source",
            "result.errors[*].document.changes",
        ],
        "a failure carries its entry exactly as sent ({_id, changes}); Kuzzle's engine-level \
         failures carry {_source: {changes, default} with its metadata, _id}",
    ),
    only(
        "mCreate body missing",
        &["status", "error"],
        "Kuzzle 2.56 fails with a 500 (reading 'documents' of null); the worker: 400 \
         api.assert.body_required",
    ),
    only(
        "mDelete ids not an array",
        &["status", "error"],
        "Kuzzle 2.56 fails with a 500 (ids.map is not a function); the worker: 400 \
         api.assert.invalid_type",
    ),
    only(
        "mCreate duplicate id",
        &["result", "stored"],
        "the worker's mCreate is the engine's `create`: the second entry of an id already \
         exists; Kuzzle's mget + index writes both (the second \"updated\", version 2)",
    ),
    only(
        "mCreate _id 5",
        &["result", "stored"],
        "a non-string _id is \"document _id must be a string\"; Kuzzle's mCreate generates \
         an id for it",
    ),
    only(
        "mCreateOrReplace _id 5",
        &["result", "stored"],
        "a non-string _id is \"document _id must be a string\"; Kuzzle's mCreateOrReplace \
         stores the document as \"5\"",
    ),
    only(
        "create refresh bogus",
        &["status", "error", "result", "stored"],
        "refresh must be wait_for or false for every action; Kuzzle's create takes any \
         value as wait_for",
    ),
    only(
        "delete source",
        &["result._source", "result._version"],
        "`source` on a single delete is ignored: {_id}; Kuzzle answers the deleted document",
    ),
    only(
        "mDelete 201 ids",
        &["status", "error"],
        "mDelete limits its ids to limits.documentsWriteCount (413); Kuzzle counts the \
         existing documents its search finds (here its mDelete fails past the checks: \
         this engine has no _delete_by_query)",
    ),
    only(
        "mDelete duplicate id",
        &["result.errors"],
        "each id is one delete, in input order: an id's second delete is a 404 error; \
         Kuzzle deletes by query, once, listing the id once",
    ),
    only("upsert creates", UPSERT_CREATED_INFO, UPSERT_CREATED_WHY),
    only(
        "upsert default clash, overridden",
        UPSERT_CREATED_INFO,
        UPSERT_CREATED_WHY,
    ),
    only(
        "mUpsert default clash, overridden",
        &["result", "stored"],
        "(the helper's proposal, for the lead to confirm) a created document is default \
         and changes merged, a key of both taking the changes' value (docs/src/messages.md, mUpsert), as Kuzzle's \
         single upsert does; Kuzzle 2.56's mUpsert has the engine parse the default as \
         sent, so a default field the changes override still fails the mapping",
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
    /// A single form's `_id` (Kuzzle: in the route; the worker: the envelope's `_id`).
    id: Option<Value>,
    /// Sent to Kuzzle as one JSON request (`POST /_query`, the worker's envelope) rather
    /// than through its route: for an `_id` a route can't carry (a number, none).
    via_query: bool,
    /// Sent to a collection that doesn't exist (in an index that does).
    unknown_collection: bool,
    /// mDelete only. This Elasticsearch has no reindex module, so Kuzzle 2.56 fails every
    /// mDelete that passes its input checks (400 "undefined", its `_delete_by_query`
    /// missing). When it does, Kuzzle's answer is taken as its source gives it (these
    /// top-level keys over its envelope), and its stored state made by deleting these
    /// ids through Kuzzle's single `delete`.
    from_source: Option<(Value, &'static [&'static str])>,
}

fn case(name: &'static str, action: &'static str, args: Value, documents: Value) -> Case {
    Case {
        name,
        action,
        args,
        body: Some(json!({"documents": documents})),
        id: None,
        via_query: false,
        unknown_collection: false,
        from_source: None,
    }
}

/// A single-document form: its `_id` (None: left out) and its body (None: no body).
fn single(
    name: &'static str,
    action: &'static str,
    args: Value,
    id: Option<&str>,
    body: Option<Value>,
) -> Case {
    Case {
        body,
        id: id.map(|id| json!(id)),
        ..case(name, action, args, Value::Null)
    }
}

/// An mDelete with this body (None: no body).
fn mdelete(name: &'static str, args: Value, body: Option<Value>) -> Case {
    Case {
        body,
        ..case(name, "mDelete", args, Value::Null)
    }
}

/// Kuzzle's mDelete answer as its source builds it (`{successes: [ids], errors: [{_id,
/// reason, status}]}`), with the ids it deletes.
fn mdelete_source(
    result: Value,
    deleted: &'static [&'static str],
) -> Option<(Value, &'static [&'static str])> {
    Some((
        json!({"status": 200, "error": null, "result": result}),
        deleted,
    ))
}

fn cases() -> Vec<Case> {
    let wait = || json!({"refresh": "wait_for"});
    let strict = || json!({"refresh": "wait_for", "strict": true});
    let many = |prefix: &str| -> Value {
        (0..201)
            .map(|i| json!({"_id": format!("{prefix}{i}"), "body": {"n": i}}))
            .collect()
    };
    let many_ids: Value = (0..201).map(|i| json!(format!("m{i}"))).collect();
    vec![
        // ---------------------------------------------------------------- mUpdate
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
            strict(),
            json!([{"_id": "d1", "body": {"n": 12}}, {"_id": "d9", "body": {"n": 9}}]),
        ),
        case(
            "strict, all succeed",
            "mUpdate",
            strict(),
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
        case("201 documents", "mUpdate", wait(), many("m")),
        case("empty documents", "mUpdate", wait(), json!([])),
        // ---------------------------------------------------------------- mUpsert
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
            "mUpsert mapping clash",
            "mUpsert",
            wait(),
            json!([{"_id": "d1", "changes": {"n": "not a number"}},
                   {"_id": "d2", "changes": {"n": 20}}]),
        ),
        case(
            "mUpsert default clash, overridden",
            "mUpsert",
            wait(),
            json!([{"_id": "d7", "changes": {"n": 7}, "default": {"n": "not a number"}}]),
        ),
        case(
            "mUpsert strict with a failure",
            "mUpsert",
            strict(),
            json!([{"_id": "d5", "changes": {"n": 5}}, {"_id": "d2", "changes": 2}]),
        ),
        // ---------------------------------------------------------------- create
        single(
            "create",
            "create",
            wait(),
            Some("d7"),
            Some(json!({"n": 7})),
        ),
        single(
            "create, no refresh",
            "create",
            json!({}),
            Some("d7"),
            Some(json!({"name": "seven"})),
        ),
        single(
            "create exists",
            "create",
            wait(),
            Some("d1"),
            Some(json!({"n": 7})),
        ),
        single(
            "create mapping clash",
            "create",
            wait(),
            Some("d7"),
            Some(json!({"n": "not a number"})),
        ),
        single(
            "create generated id",
            "create",
            wait(),
            None,
            Some(json!({"n": 7})),
        ),
        single("create body missing", "create", wait(), Some("d7"), None),
        single(
            "create silent",
            "create",
            json!({"refresh": "wait_for", "silent": true}),
            Some("d7"),
            Some(json!({"n": 7})),
        ),
        single(
            "create refresh bogus",
            "create",
            json!({"refresh": "bogus"}),
            Some("d7"),
            Some(json!({"n": 7})),
        ),
        Case {
            id: Some(json!(5)),
            via_query: true,
            ..single(
                "create _id 5",
                "create",
                wait(),
                None,
                Some(json!({"n": 7})),
            )
        },
        // ---------------------------------------------------------------- mCreate
        case(
            "mCreate",
            "mCreate",
            wait(),
            json!([{"_id": "d7", "body": {"n": 7}}, {"_id": "d8", "body": {"name": "eight"}}]),
        ),
        case(
            "mCreate generated id",
            "mCreate",
            wait(),
            json!([{"body": {"n": 7}}, {"_id": "d8", "body": {"n": 8}}]),
        ),
        case(
            "mCreate failures",
            "mCreate",
            wait(),
            json!([{"_id": "d1", "body": {"n": 1}},
                   {"_id": "d7", "body": {"n": "not a number"}},
                   {"_id": "d8", "body": "not an object"},
                   {"_id": "d9", "body": {"n": 9}}]),
        ),
        case(
            "mCreate strict with a failure",
            "mCreate",
            strict(),
            json!([{"_id": "d7", "body": {"n": 7}}, {"_id": "d1", "body": {"n": 1}}]),
        ),
        case(
            "mCreate strict, all succeed",
            "mCreate",
            strict(),
            json!([{"_id": "d7", "body": {"n": 7}}]),
        ),
        case(
            "mCreate silent",
            "mCreate",
            json!({"refresh": "wait_for", "silent": true}),
            json!([{"_id": "d7", "body": {"n": 7}}]),
        ),
        case(
            "mCreate source false",
            "mCreate",
            json!({"refresh": "wait_for", "source": false}),
            json!([{"_id": "d7", "body": {"n": 7}}]),
        ),
        case(
            "mCreate refresh invalid",
            "mCreate",
            json!({"refresh": "yes"}),
            json!([{"_id": "d7", "body": {"n": 7}}]),
        ),
        case("mCreate empty", "mCreate", wait(), json!([])),
        case("mCreate 201 documents", "mCreate", wait(), many("m")),
        Case {
            body: None,
            ..case("mCreate body missing", "mCreate", wait(), json!(null))
        },
        case(
            "mCreate duplicate id",
            "mCreate",
            wait(),
            json!([{"_id": "d7", "body": {"n": 7}}, {"_id": "d7", "body": {"n": 8}}]),
        ),
        case(
            "mCreate _id 5",
            "mCreate",
            wait(),
            json!([{"_id": 5, "body": {"n": 7}}]),
        ),
        case(
            "mCreate a document with _source",
            "mCreate",
            wait(),
            json!([{"_id": "d7", "_source": {"n": 7}}]),
        ),
        // ---------------------------------------------------------------- createOrReplace
        single(
            "createOrReplace creates",
            "createOrReplace",
            wait(),
            Some("d7"),
            Some(json!({"n": 7})),
        ),
        single(
            "createOrReplace replaces",
            "createOrReplace",
            wait(),
            Some("d1"),
            Some(json!({"n": 10})),
        ),
        single(
            "createOrReplace mapping clash",
            "createOrReplace",
            wait(),
            Some("d1"),
            Some(json!({"n": "not a number"})),
        ),
        single(
            "createOrReplace body missing",
            "createOrReplace",
            wait(),
            Some("d1"),
            None,
        ),
        single(
            "createOrReplace refresh invalid",
            "createOrReplace",
            json!({"refresh": "yes"}),
            Some("d1"),
            Some(json!({"n": 10})),
        ),
        Case {
            via_query: true,
            ..single(
                "createOrReplace _id missing",
                "createOrReplace",
                wait(),
                None,
                Some(json!({"n": 10})),
            )
        },
        Case {
            id: Some(json!(5)),
            via_query: true,
            ..single(
                "createOrReplace _id 5",
                "createOrReplace",
                wait(),
                None,
                Some(json!({"n": 10})),
            )
        },
        // ---------------------------------------------------------------- mCreateOrReplace
        case(
            "mCreateOrReplace",
            "mCreateOrReplace",
            wait(),
            json!([{"_id": "d1", "body": {"n": 10}}, {"_id": "d7", "body": {"n": 7}}]),
        ),
        case(
            "mCreateOrReplace failures",
            "mCreateOrReplace",
            wait(),
            json!([{"_id": "d1", "body": {"n": "not a number"}},
                   {"_id": "d2", "body": "not an object"},
                   {"_id": "d3", "body": {"n": 30}}]),
        ),
        case(
            "mCreateOrReplace generated id",
            "mCreateOrReplace",
            wait(),
            json!([{"body": {"n": 7}}]),
        ),
        case(
            "mCreateOrReplace strict with a failure",
            "mCreateOrReplace",
            strict(),
            json!([{"_id": "d1", "body": {"n": 10}}, {"_id": "d2", "body": 2}]),
        ),
        case(
            "mCreateOrReplace silent",
            "mCreateOrReplace",
            json!({"refresh": "wait_for", "silent": true}),
            json!([{"_id": "d1", "body": {"n": 10}}]),
        ),
        case(
            "mCreateOrReplace source false",
            "mCreateOrReplace",
            json!({"refresh": "wait_for", "source": false}),
            json!([{"_id": "d1", "body": {"n": 10}}, {"_id": "d7", "body": {"n": 7}}]),
        ),
        case(
            "mCreateOrReplace strict, all succeed",
            "mCreateOrReplace",
            strict(),
            json!([{"_id": "d1", "body": {"n": 10}}, {"_id": "d7", "body": {"n": 7}}]),
        ),
        case(
            "mCreateOrReplace refresh false",
            "mCreateOrReplace",
            json!({"refresh": false}),
            json!([{"_id": "d7", "body": {"n": 7}}]),
        ),
        case(
            "mCreateOrReplace empty",
            "mCreateOrReplace",
            wait(),
            json!([]),
        ),
        case(
            "mCreateOrReplace 201 documents",
            "mCreateOrReplace",
            wait(),
            many("m"),
        ),
        case(
            "mCreateOrReplace _id 5",
            "mCreateOrReplace",
            wait(),
            json!([{"_id": 5, "body": {"n": 7}}]),
        ),
        // ---------------------------------------------------------------- replace
        single(
            "replace",
            "replace",
            wait(),
            Some("d1"),
            Some(json!({"n": 10})),
        ),
        single(
            "replace missing",
            "replace",
            wait(),
            Some("d9"),
            Some(json!({"n": 9})),
        ),
        single(
            "replace mapping clash",
            "replace",
            wait(),
            Some("d1"),
            Some(json!({"n": "not a number"})),
        ),
        single("replace body missing", "replace", wait(), Some("d1"), None),
        single(
            "replace refresh invalid",
            "replace",
            json!({"refresh": "yes"}),
            Some("d1"),
            Some(json!({"n": 10})),
        ),
        // ---------------------------------------------------------------- mReplace
        case(
            "mReplace",
            "mReplace",
            wait(),
            json!([{"_id": "d1", "body": {"n": 10}}, {"_id": "d2", "body": {"name": "deux"}}]),
        ),
        case(
            "mReplace failures",
            "mReplace",
            wait(),
            json!([{"_id": "d9", "body": {"n": 9}},
                   {"_id": "d1", "body": {"n": "not a number"}},
                   {"_id": "d2", "body": "not an object"},
                   {"_id": 5, "body": {"n": 5}},
                   {"body": {"n": 0}},
                   {"_id": "d3", "body": {"n": 30}}]),
        ),
        case(
            "mReplace strict with a failure",
            "mReplace",
            strict(),
            json!([{"_id": "d1", "body": {"n": 10}}, {"_id": "d9", "body": {"n": 9}}]),
        ),
        case(
            "mReplace silent",
            "mReplace",
            json!({"refresh": "wait_for", "silent": true}),
            json!([{"_id": "d1", "body": {"n": 10}}]),
        ),
        case(
            "mReplace source false",
            "mReplace",
            json!({"refresh": "wait_for", "source": false}),
            json!([{"_id": "d1", "body": {"n": 10}}]),
        ),
        case(
            "mReplace strict, all succeed",
            "mReplace",
            strict(),
            json!([{"_id": "d1", "body": {"n": 10}}]),
        ),
        case("mReplace empty", "mReplace", wait(), json!([])),
        case("mReplace 201 documents", "mReplace", wait(), many("m")),
        case(
            "mReplace duplicate id",
            "mReplace",
            wait(),
            json!([{"_id": "d1", "body": {"n": 10}}, {"_id": "d1", "body": {"n": 11}}]),
        ),
        // ---------------------------------------------------------------- delete
        single("delete", "delete", wait(), Some("d1"), None),
        single("delete missing", "delete", wait(), Some("d9"), None),
        single(
            "delete silent",
            "delete",
            json!({"refresh": "wait_for", "silent": true}),
            Some("d1"),
            None,
        ),
        single(
            "delete source",
            "delete",
            json!({"refresh": "wait_for", "source": true}),
            Some("d1"),
            None,
        ),
        single(
            "delete refresh invalid",
            "delete",
            json!({"refresh": "bogus"}),
            Some("d1"),
            None,
        ),
        Case {
            via_query: true,
            ..single("delete _id missing", "delete", wait(), None, None)
        },
        Case {
            id: Some(json!(5)),
            via_query: true,
            ..single("delete _id 5", "delete", wait(), None, None)
        },
        // ---------------------------------------------------------------- mDelete
        Case {
            from_source: mdelete_source(
                json!({"errors": [], "successes": ["d1", "d2"]}),
                &["d1", "d2"],
            ),
            ..mdelete("mDelete", wait(), Some(json!({"ids": ["d1", "d2"]})))
        },
        Case {
            from_source: mdelete_source(
                json!({"errors": [{"_id": 5, "reason": "document _id must be a string", "status": 400},
                                  {"_id": "d9", "reason": "document not found", "status": 404}],
                       "successes": ["d1"]}),
                &["d1"],
            ),
            ..mdelete(
                "mDelete failures",
                wait(),
                Some(json!({"ids": ["d1", "d9", 5]})),
            )
        },
        Case {
            from_source: Some((
                json!({"status": 400, "result": null, "error": {
                    "code": 33685514,
                    "id": "api.process.incomplete_multiple_request",
                    "message": "At least one of the delete actions failed.",
                    "props": ["delete"],
                    "status": 400,
                    "count": 1,
                    "errors": [{"_id": "d9", "reason": "document not found", "status": 404}]}}),
                &["d1"],
            )),
            ..mdelete(
                "mDelete strict with a failure",
                strict(),
                Some(json!({"ids": ["d1", "d9"]})),
            )
        },
        Case {
            from_source: mdelete_source(json!({"errors": [], "successes": []}), &[]),
            ..mdelete("mDelete empty", wait(), Some(json!({"ids": []})))
        },
        Case {
            from_source: mdelete_source(json!({"errors": [], "successes": ["d1"]}), &["d1"]),
            ..mdelete(
                "mDelete strict, all succeed",
                strict(),
                Some(json!({"ids": ["d1"]})),
            )
        },
        Case {
            from_source: mdelete_source(json!({"errors": [], "successes": ["d1"]}), &["d1"]),
            ..mdelete(
                "mDelete silent",
                json!({"refresh": "wait_for", "silent": true}),
                Some(json!({"ids": ["d1"]})),
            )
        },
        mdelete("mDelete body missing", wait(), None),
        mdelete("mDelete ids missing", wait(), Some(json!({}))),
        mdelete(
            "mDelete ids not an array",
            wait(),
            Some(json!({"ids": "d1"})),
        ),
        mdelete("mDelete 201 ids", wait(), Some(json!({ "ids": many_ids }))),
        Case {
            from_source: mdelete_source(json!({"errors": [], "successes": ["d1"]}), &["d1"]),
            ..mdelete(
                "mDelete duplicate id",
                wait(),
                Some(json!({"ids": ["d1", "d1"]})),
            )
        },
        // ---------------------------------------------------------------- update
        single(
            "update",
            "update",
            wait(),
            Some("d1"),
            Some(json!({"n": 10})),
        ),
        single(
            "update missing",
            "update",
            wait(),
            Some("d9"),
            Some(json!({"n": 9})),
        ),
        single(
            "update mapping clash",
            "update",
            wait(),
            Some("d1"),
            Some(json!({"n": "not a number"})),
        ),
        single(
            "update source",
            "update",
            json!({"refresh": "wait_for", "source": true}),
            Some("d1"),
            Some(json!({"n": 10})),
        ),
        single("update body missing", "update", wait(), Some("d1"), None),
        single(
            "update refresh invalid",
            "update",
            json!({"refresh": "yes"}),
            Some("d1"),
            Some(json!({"n": 10})),
        ),
        // ---------------------------------------------------------------- upsert
        single(
            "upsert creates",
            "upsert",
            wait(),
            Some("d7"),
            Some(json!({"changes": {"n": 7}, "default": {"name": "seven"}})),
        ),
        single(
            "upsert updates",
            "upsert",
            wait(),
            Some("d1"),
            Some(json!({"changes": {"n": 10}, "default": {"name": "ignored"}})),
        ),
        single(
            "upsert source",
            "upsert",
            json!({"refresh": "wait_for", "source": true}),
            Some("d1"),
            Some(json!({"changes": {"n": 10}})),
        ),
        single(
            "upsert mapping clash",
            "upsert",
            wait(),
            Some("d1"),
            Some(json!({"changes": {"n": "not a number"}})),
        ),
        single(
            "upsert default clash, overridden",
            "upsert",
            wait(),
            Some("d7"),
            Some(json!({"changes": {"n": 7}, "default": {"n": "not a number"}})),
        ),
        single(
            "upsert changes missing",
            "upsert",
            wait(),
            Some("d1"),
            Some(json!({"default": {"n": 1}})),
        ),
        single(
            "upsert changes not an object",
            "upsert",
            wait(),
            Some("d1"),
            Some(json!({"changes": [1]})),
        ),
    ]
}

/// Kuzzle's HTTP route for a case: method and path under the collection.
fn route(case: &Case) -> (Method, String) {
    let id = case.id.as_ref().and_then(Value::as_str).unwrap_or_default();
    match case.action {
        "mUpdate" => (Method::PATCH, "/_mUpdate".into()),
        "mUpsert" => (Method::POST, "/_mUpsert".into()),
        "mCreate" => (Method::POST, "/_mCreate".into()),
        "mCreateOrReplace" => (Method::PUT, "/_mCreateOrReplace".into()),
        "mReplace" => (Method::PUT, "/_mReplace".into()),
        "mDelete" => (Method::DELETE, "/_mDelete".into()),
        "create" if id.is_empty() => (Method::POST, "/_create".into()),
        "create" => (Method::POST, format!("/{id}/_create")),
        "createOrReplace" => (Method::PUT, format!("/{id}")),
        "replace" => (Method::PUT, format!("/{id}/_replace")),
        "delete" => (Method::DELETE, format!("/{id}")),
        "update" => (Method::PATCH, format!("/{id}/_update")),
        "upsert" => (Method::POST, format!("/{id}/_upsert")),
        other => panic!("no Kuzzle route for {other}"),
    }
}

/// A case as one request envelope on this collection: the worker's AMQP message, and
/// Kuzzle's `POST /_query` body.
fn case_envelope(index: &str, collection: &str, case: &Case) -> Value {
    let mut envelope = json!({"index": index, "collection": collection,
                              "controller": "document", "action": case.action});
    let map: &mut Map<String, Value> = envelope.as_object_mut().unwrap();
    for (key, value) in case.args.as_object().unwrap() {
        map.insert(key.clone(), value.clone());
    }
    if let Some(id) = &case.id {
        map.insert("_id".into(), id.clone());
    }
    if let Some(body) = &case.body {
        map.insert("body".into(), body.clone());
    }
    envelope
}

/// The ids a case names (its `_id`, its entries' `_id`s, its `ids`): any other id in
/// an answer or a stored document was generated.
fn named_ids(case: &Case) -> Vec<String> {
    let mut ids: Vec<String> = seed().iter().map(|(id, _)| (*id).to_owned()).collect();
    ids.extend(case.id.iter().filter_map(Value::as_str).map(str::to_owned));
    let body = case.body.as_ref();
    let documents = body.and_then(|b| b["documents"].as_array());
    for entry in documents.into_iter().flatten() {
        ids.extend(entry["_id"].as_str().map(str::to_owned));
    }
    for id in body.and_then(|b| b["ids"].as_array()).into_iter().flatten() {
        ids.extend(id.as_str().map(str::to_owned));
    }
    ids
}

/// Kuzzle's generated ids are the engine's (20 characters of base64url), the worker's
/// its own (22 characters of base64url): each side's, where it is the value of an
/// `_id` named by no request, becomes `<generated>`; one of another shape stays, and
/// differs.
fn mask_generated(value: &mut Value, named: &[String], length: usize) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                if key == "_id"
                    && let Value::String(id) = inner
                    && !named.contains(id)
                    && id.len() == length
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    *inner = json!("<generated>");
                }
                mask_generated(inner, named, length);
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| mask_generated(v, named, length)),
        _ => {}
    }
}

const KUZZLE_ID_LENGTH: usize = 20;
const WORKER_ID_LENGTH: usize = 22;

/// A case's arguments as Kuzzle's HTTP query string. Over HTTP Kuzzle takes a boolean
/// flag as true whenever it is present (`?strict=false` is strict): the table sends
/// only `true` flags, except `source: false`, which Kuzzle's m-forms read as the string
/// "false" (mCreateOrReplace honours it; mCreate and mReplace ignore `source`).
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
    // it refused before the storage call first. Compared as sets: same entries, either
    // order, each side sorted by its entry's id and reason (not by its whole text:
    // Kuzzle's storage failures are `{_source, _id}`, the worker's `{_id, body}`).
    for pointer in ["/result/errors", "/error/errors"] {
        if let Some(Value::Array(items)) = value.pointer_mut(pointer) {
            items.sort_by_key(|item| {
                let id = item.pointer("/document/_id").or_else(|| item.get("_id"));
                (
                    id.map(Value::to_string),
                    item["reason"].to_string(),
                    item.to_string(),
                )
            });
        }
    }
    // Stored documents, sorted by `_id` when read: again, generated ids masked.
    if let Value::Array(documents) = value {
        documents.sort_by_key(Value::to_string);
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

fn deliberate(case: &str, found: &Diff) -> Option<&'static str> {
    let path = general(&found.path);
    let anonymous = found.kuzzle == Some(json!("-1")) && found.worker == Some(Value::Null);
    DELIBERATE
        .iter()
        .filter(|d| d.case.is_none_or(|c| c == case) && (!d.anonymous || anonymous))
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
    let mut kuzzle_answer = if case.via_query {
        kuzzle(
            Method::POST,
            "/_query",
            &[],
            Some(&case_envelope(&index.name, &k, case)),
        )
        .await
    } else {
        let (method, path) = route(case);
        kuzzle(
            method,
            &format!("/{}/{k}{path}", index.name),
            &query(&case.args),
            case.body.as_ref(),
        )
        .await
    };
    if let Some((answer, deleted)) = &case.from_source {
        // This engine has no `_delete_by_query`: Kuzzle's mDelete fails past its checks.
        assert_eq!(
            (&kuzzle_answer["status"], &kuzzle_answer["error"]["message"]),
            (&json!(400), &json!("undefined")),
            "{}: Kuzzle's mDelete ran here; compare its live answer instead: {kuzzle_answer}",
            case.name
        );
        for (key, value) in answer.as_object().unwrap() {
            kuzzle_answer[key] = value.clone();
        }
        for id in *deleted {
            kuzzle_ok(
                Method::DELETE,
                &format!("/{}/{k}/{id}?refresh=wait_for", index.name),
                None,
            )
            .await;
        }
    }
    let mut worker_answer = call(worker, &case_envelope(&index.name, &w, case)).await;
    let named = named_ids(case);
    mask_generated(&mut kuzzle_answer, &named, KUZZLE_ID_LENGTH);
    mask_generated(&mut worker_answer, &named, WORKER_ID_LENGTH);
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
        mask_generated(&mut stored_k, &named, KUZZLE_ID_LENGTH);
        mask_generated(&mut stored_w, &named, WORKER_ID_LENGTH);
        normalize(&mut stored_k, &k);
        normalize(&mut stored_w, &w);
        diff(
            "stored".into(),
            Some(&stored_k),
            Some(&stored_w),
            &mut diffs,
        );
    }
    if !case.unknown_collection {
        // Each collection is a shard of the shared engine, and Kuzzle's index:delete
        // names every collection in one engine URL (over 4 KiB past ~100 collections,
        // which the engine refuses): the twins go as soon as they are compared.
        for c in [&k, &w] {
            kuzzle_ok(Method::DELETE, &format!("/{}/{c}", index.name), None).await;
        }
    }
    let (mut deliberate_paths, mut unexpected) = (Vec::new(), Vec::new());
    for d in diffs {
        match deliberate(case.name, &d) {
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
    // The oversize cases (201 entries) mean the same on both sides only under the same
    // write limit: the worker's default is Kuzzle's.
    let settings = kuzzle2_settings();
    let config = kuzzle_ok(Method::GET, "/_getConfig", None).await;
    assert_eq!(
        config["limits"]["documentsWriteCount"],
        json!(settings.limits.documents_write_count),
        "Kuzzle's limits.documentsWriteCount and the worker's limits.documents_write_count"
    );
    let index = KuzzleIndex::create("kz-cmp").await;
    let worker = Worker::start_with(settings).await;
    // The cases are independent (twin collections of their own): a few at a time.
    // MUPDATE_KUZZLE_CASES=text: only the cases whose name holds it (while iterating).
    let only = std::env::var("MUPDATE_KUZZLE_CASES").unwrap_or_default();
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| c.name.contains(&only))
        .collect();
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
