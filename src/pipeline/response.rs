//! The response envelope (SPEC section 3): 200, 206 (v1) or the v2 layout, and
//! whole-request errors. Pure functions.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::config::Format;
use crate::error::{RequestError, kuzzle_code};
use crate::pipeline::bulk::Item;
use crate::pipeline::envelope::{Action, Echo, Request};

/// What became of one document of a request.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Written (updated, created, replaced, deleted): its item as the engine answered it
    /// (for a whole document, `get._source` is the document as written, when asked).
    Written {
        id: String,
        item: Item,
        /// Its place in the request's `documents`.
        slot: usize,
    },
    Failed {
        document: Value,
        status: u16,
        reason: String,
    },
}

/// A reply ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub request_id: String,
    pub status: u16,
    pub body: Vec<u8>,
}

/// The reply's JSON, serialized as is: hits carry the engine's `_source` unparsed.
#[derive(Serialize)]
struct Envelope<'a, R: Serialize> {
    status: u16,
    error: &'a Value,
    #[serde(rename = "requestId")]
    request_id: &'a str,
    index: &'a Option<Value>,
    collection: &'a Option<Value>,
    controller: &'a Option<Value>,
    action: &'a Option<Value>,
    volatile: &'a Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh: Option<&'a Value>,
    #[serde(rename = "retryOnConflict", skip_serializing_if = "Option::is_none")]
    retry_on_conflict: Option<&'a Value>,
    result: R,
}

fn envelope<R: Serialize>(echo: &Echo, status: u16, error: &Value, result: R) -> Response {
    let envelope = Envelope {
        status,
        error,
        request_id: &echo.request_id,
        index: &echo.index,
        collection: &echo.collection,
        controller: &echo.controller,
        action: &echo.action,
        volatile: &echo.volatile,
        refresh: echo.refresh.as_ref(),
        retry_on_conflict: echo.retry_on_conflict.as_ref(),
        result,
    };
    Response {
        request_id: echo.request_id.clone(),
        status,
        body: serde_json::to_vec(&envelope).unwrap_or_default(),
    }
}

/// A whole-request error: `result: null`.
pub fn error_response(echo: &Echo, error: &RequestError) -> Response {
    envelope(echo, error.status(), &error.to_json(), ())
}

/// How much of the documents a reply carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Everything: `_source` of each success, each failed document as sent.
    Full,
    /// For a broker that refused the full reply as too large: the same statuses and
    /// counts, without `_source`, and each failed document reduced to its `_id`.
    Lean,
}

fn failure_json(document: &Value, status: u16, reason: &str, shape: Shape) -> Value {
    let document = match (shape, document.get("_id")) {
        (Shape::Full, _) => document.clone(),
        (Shape::Lean, Some(id)) => json!({"_id": id}),
        (Shape::Lean, None) => json!({}),
    };
    json!({"document": document, "status": status, "reason": reason})
}

/// The last resort when even a lean reply is too large: a 500 saying so, echoing only
/// the reply key (at most 255 bytes) as `requestId`.
pub fn too_large_response(key: &str, size: usize, limit: usize) -> Response {
    let echo = Echo {
        request_id: key.to_owned(),
        own_id: false,
        index: None,
        collection: None,
        controller: None,
        action: None,
        volatile: None,
        refresh: None,
        retry_on_conflict: None,
    };
    error_response(&echo, &RequestError::ReplyTooLarge { size, limit })
}

/// A hit in the seed's (v1) layout.
#[derive(Serialize)]
struct HitV1<'a> {
    _id: &'a str,
    _index: &'a str,
    _type: &'a str,
    _version: Option<i64>,
    result: Option<&'a str>,
    status: u16,
    /// mUpsert only: whether the document was created.
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    _shards: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    _source: Option<&'a RawValue>,
}

/// A success in Kuzzle 2's (v2) layout: an update's or upsert's, or (with `result`)
/// a whole document's, as Kuzzle's `mCreate`, `mCreateOrReplace` and `mReplace` list
/// them (`_id`, `_source`, `_version`, `created`, `result`, `status`).
#[derive(Serialize)]
struct HitV2<'a> {
    _id: &'a str,
    /// The paths the entry set, as Kuzzle's realtime layer reads them; as Kuzzle, none
    /// for a created document or a `silent` request (no notification follows).
    #[serde(rename = "_updatedFields", skip_serializing_if = "Option::is_none")]
    updated_fields: Option<Vec<String>>,
    _version: Option<i64>,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    _source: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a str>,
}

#[derive(Serialize)]
struct V1Result<'a> {
    total: usize,
    hits: Vec<HitV1<'a>>,
}

#[derive(Serialize)]
struct V2Result<S: Serialize> {
    successes: Vec<S>,
    errors: Vec<Value>,
}

/// Bytes of `_updatedFields` paths a reply may list beyond twice its request's size: the
/// paths repeat their parents' keys (a leaf 18 objects deep under 1 KiB keys has an
/// 18 KiB path), so a full listing can be quadratic in the request.
pub const UPDATED_FIELDS_SLACK: usize = 64 * 1024;

/// What a reply's `_updatedFields` may hold, in bytes of JSON (each path counted with its
/// quotes and comma): `2 × request + 64 KiB`. An entry whose full listing would go past
/// what is left lists its top-level keys instead (each is a prefix of its paths, so the
/// list stays true, only coarser): those are the request's own bytes, so every reply's
/// `_updatedFields` stay under `3 × request + 64 KiB`.
pub fn updated_fields_budget(request_bytes: usize) -> usize {
    request_bytes
        .saturating_mul(2)
        .saturating_add(UPDATED_FIELDS_SLACK)
}

/// The client's metadata, never listed (it is dropped before the engine).
fn forged(key: &str) -> bool {
    key == "_kuzzle_info" || key.starts_with("_kuzzle_info.")
}

/// The JSON bytes of the leaf paths under `object` (its paths starting `prefix_len` bytes
/// in), or `None` as soon as they pass `limit`: nothing is built, and the walk stops
/// there, so it costs at most the entry's own size.
fn listing_cost(
    object: &serde_json::Map<String, Value>,
    prefix_len: usize,
    limit: usize,
    total: &mut usize,
) -> Option<()> {
    for (key, value) in object {
        if prefix_len == 0 && forged(key) {
            continue;
        }
        let len = if prefix_len == 0 {
            escaped_len(key)
        } else {
            prefix_len + 1 + escaped_len(key)
        };
        match value {
            Value::Object(inner) if !inner.is_empty() => {
                listing_cost(inner, len, limit, total)?;
            }
            _ => {
                *total += len + 3;
                if *total > limit {
                    return None;
                }
            }
        }
    }
    Some(())
}

/// The bytes `key` takes written as JSON (without its quotes): a control character as
/// `\u0001` takes 6, so the budget counts what the reply writes, not the key's bytes.
fn escaped_len(key: &str) -> usize {
    key.chars()
        .map(|c| match c {
            '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum()
}

/// Appends the leaf paths under `object` to `out`, `path` holding their prefix: one
/// allocation per path, of its own size.
fn list_paths(object: &serde_json::Map<String, Value>, path: &mut String, out: &mut Vec<String>) {
    for (key, value) in object {
        if path.is_empty() && forged(key) {
            continue;
        }
        let before = path.len();
        if before > 0 {
            path.push('.');
        }
        path.push_str(key);
        match value {
            Value::Object(inner) if !inner.is_empty() => list_paths(inner, path, out),
            _ => out.push(path.clone()),
        }
        path.truncate(before);
    }
}

/// The paths an entry sets (`{"obj": {"z": 1}, "arr": []}` → `obj.z`, `arr`), from its
/// own changes: each entry's, even when a request updates one `_id` twice. `budget`: the
/// bytes the reply may still spend on them, lowered by what this listing spends; past
/// it, the entry's top-level keys (`updated_fields_budget`).
fn updated_fields(request: &Request, slot: usize, budget: &mut usize) -> Vec<String> {
    let entry = request.documents.get(slot);
    let changes = match request.action {
        Action::Update => entry.and_then(|e| e.get("body")),
        Action::Upsert => entry.and_then(|e| e.get("changes")),
        _ => None,
    };
    let Some(Value::Object(changes)) = changes else {
        return Vec::new();
    };
    let mut cost = 0;
    if listing_cost(changes, 0, *budget, &mut cost).is_none() {
        return changes.keys().filter(|k| !forged(k)).cloned().collect();
    }
    *budget -= cost;
    let mut fields = Vec::new();
    list_paths(changes, &mut String::new(), &mut fields);
    fields
}

/// Whether the document was created, where the action's hits say it: mUpsert's and the
/// whole-document writes' (mUpdate's, mCreate's in v1, and deletes' don't carry it).
fn created(request: &Request, item: &Item, format: Format) -> Option<bool> {
    let carried = match request.action {
        Action::Upsert | Action::CreateOrReplace => true,
        Action::Create | Action::Replace => format == Format::V2,
        Action::Update | Action::Delete => false,
    };
    carried.then(|| item.result.as_deref() == Some("created"))
}

fn source(item: &Item, shape: Shape) -> Option<&RawValue> {
    match shape {
        Shape::Full => item.get.as_ref().and_then(|g| g.source.as_deref()),
        Shape::Lean => None,
    }
}

/// A failed document in an m-form's `errors`: `{document, status, reason}` with the
/// entry as sent; mDelete's, in either format, as Kuzzle lists them: `{_id, reason,
/// status}` (it has no document to echo).
fn failure(request: &Request, document: &Value, status: u16, reason: &str, shape: Shape) -> Value {
    if request.action == Action::Delete {
        let id = document.get("_id").cloned().unwrap_or(Value::Null);
        return json!({"_id": id, "reason": reason, "status": status});
    }
    failure_json(document, status, reason, shape)
}

/// The reply to a request whose documents were all tried.
pub fn documents_response(
    echo: &Echo,
    request: &Request,
    outcomes: &[Outcome],
    format: Format,
    shape: Shape,
) -> Response {
    if request.single {
        return single_response(echo, request, outcomes, shape);
    }
    let errors: Vec<Value> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Failed {
                document,
                status,
                reason,
            } => Some(failure(request, document, *status, reason, shape)),
            Outcome::Written { .. } => None,
        })
        .collect();
    let written = outcomes.iter().filter_map(|o| match o {
        Outcome::Written { id, item, slot } => Some((id.as_str(), item, *slot)),
        Outcome::Failed { .. } => None,
    });
    let failed = errors.len();
    match format {
        Format::V1 => {
            let hits: Vec<HitV1> = written
                .map(|(id, item, _)| HitV1 {
                    _id: id,
                    _index: &request.index,
                    _type: &request.collection,
                    _version: item.version,
                    result: item.result.as_deref(),
                    status: item.status,
                    created: created(request, item, format),
                    _shards: item.shards.as_deref(),
                    _source: source(item, shape),
                })
                .collect();
            let result = V1Result {
                total: hits.len(),
                hits,
            };
            if failed == 0 {
                return envelope(echo, 200, &Value::Null, result);
            }
            let error = json!({
                "status": 206, "id": "services.storage.incomplete_update",
                "code": kuzzle_code("services.storage.incomplete_update"),
                "message": format!("{failed} of {} documents could not be {}", outcomes.len(), request.action.participle()),
                "count": failed, "errors": errors});
            envelope(echo, 206, &error, result)
        }
        Format::V2 => {
            if request.strict && failed > 0 {
                // As Kuzzle 2 answers it: no result, the failed documents in the error
                // (mDelete's names its action "delete", as Kuzzle's does).
                let action = match request.action {
                    Action::Delete => "delete",
                    other => other.name(false),
                };
                let error = json!({
                    "status": 400, "id": "api.process.incomplete_multiple_request",
                    "code": kuzzle_code("api.process.incomplete_multiple_request"),
                    "props": [action],
                    "message": format!("At least one of the {action} actions failed."),
                    "count": failed, "errors": errors});
                return envelope(echo, 400, &error, Value::Null);
            }
            if request.action == Action::Delete {
                // As Kuzzle's mDelete: the deleted ids.
                let successes: Vec<&str> = written.map(|(id, _, _)| id).collect();
                return envelope(echo, 200, &Value::Null, V2Result { successes, errors });
            }
            let mut budget = updated_fields_budget(request.bytes);
            let merges = matches!(request.action, Action::Update | Action::Upsert);
            let successes: Vec<HitV2> = written
                .map(|(id, item, slot)| HitV2 {
                    _id: id,
                    updated_fields: (merges
                        && !request.silent
                        && created(request, item, format) != Some(true))
                    .then(|| updated_fields(request, slot, &mut budget)),
                    _version: item.version,
                    status: item.status,
                    created: created(request, item, format),
                    _source: source(item, shape),
                    result: (!merges).then_some(item.result.as_deref()).flatten(),
                })
                .collect();
            let result = V2Result { successes, errors };
            envelope(echo, 200, &Value::Null, result)
        }
    }
}

/// The result of a single-document form, as Kuzzle 2 answers it in either format.
#[derive(Serialize)]
struct Single<'a> {
    _id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    _source: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    _version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
}

/// What Kuzzle's single `update` answers as `_source` without `source: true`: the
/// changes as sent (without the client's metadata) and the stored `_kuzzle_info`, read
/// from the stored document the engine answered (none when the reply carries none).
fn update_changes(request: &Request, stored: Option<&RawValue>) -> Option<Box<RawValue>> {
    let Some(Value::Object(changes)) = request.documents.first().and_then(|d| d.get("body")) else {
        return None;
    };
    let mut answer: serde_json::Map<String, Value> = changes
        .iter()
        .filter(|(k, _)| !forged(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    #[derive(serde::Deserialize)]
    struct Stored {
        _kuzzle_info: Option<Value>,
    }
    if let Some(info) = stored
        .and_then(|s| serde_json::from_str::<Stored>(s.get()).ok())
        .and_then(|s| s._kuzzle_info)
    {
        answer.insert("_kuzzle_info".into(), info);
    }
    serde_json::value::to_raw_value(&answer).ok()
}

/// The reply to a single-document form: its one document's result, or its failure as
/// the whole request's error (Kuzzle's error for it: not found, already exists, or the
/// engine's reason).
fn single_response(echo: &Echo, request: &Request, outcomes: &[Outcome], shape: Shape) -> Response {
    let Some(outcome) = outcomes.first() else {
        let error = RequestError::StorageRejected("no document was written".into());
        return error_response(echo, &error);
    };
    match outcome {
        Outcome::Failed {
            document,
            status,
            reason,
        } => {
            let id = document.get("_id").and_then(Value::as_str).unwrap_or("");
            let error = match (request.action, *status) {
                (_, 404) => RequestError::DocumentNotFound {
                    id: id.to_owned(),
                    index: request.index.clone(),
                    collection: request.collection.clone(),
                },
                (Action::Create, 400) if reason == "document already exists" => {
                    RequestError::DocumentAlreadyExists
                }
                (_, 409) => RequestError::TooManyChanges(id.to_owned()),
                (_, status) => RequestError::DocumentRefused {
                    status,
                    reason: reason.clone(),
                },
            };
            error_response(echo, &error)
        }
        Outcome::Written { id, item, .. } => {
            let changes;
            let result = Single {
                _id: id,
                _source: match request.action {
                    Action::Delete => None,
                    Action::Update if request.source != Some(true) => {
                        changes = update_changes(request, source(item, shape));
                        changes.as_deref()
                    }
                    _ => source(item, shape),
                },
                _version: (request.action != Action::Delete)
                    .then_some(item.version)
                    .flatten(),
                created: matches!(request.action, Action::Upsert | Action::CreateOrReplace)
                    .then(|| item.result.as_deref() == Some("created")),
            };
            envelope(echo, 200, &Value::Null, result)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::bulk::Get;
    use crate::pipeline::envelope::Refresh;

    fn echo() -> Echo {
        Echo {
            request_id: "r-42".into(),
            own_id: true,
            index: Some(json!("shop")),
            collection: Some(json!("products")),
            controller: Some(json!("document")),
            action: Some(json!("mUpdate")),
            volatile: Some(json!({"trace": "x"})),
            refresh: Some(json!("wait_for")),
            retry_on_conflict: Some(json!(3)),
        }
    }

    fn request(strict: bool) -> Request {
        Request {
            action: crate::pipeline::envelope::Action::Update,
            index: "shop".into(),
            collection: "products".into(),
            refresh: Refresh::WaitFor,
            retry_on_conflict: 3,
            strict,
            silent: false,
            source: None,
            bytes: 0,
            single: false,
            documents: vec![],
        }
    }

    fn raw(value: Value) -> Box<RawValue> {
        serde_json::value::to_raw_value(&value).unwrap()
    }

    fn updated(id: &str) -> Outcome {
        Outcome::Written {
            id: id.into(),
            item: Item {
                status: 200,
                version: Some(2),
                result: Some("updated".into()),
                shards: Some(raw(json!({"total": 2, "successful": 1, "failed": 0}))),
                get: Some(Get {
                    source: Some(raw(json!({"price": 10}))),
                }),
                error: None,
                resent: false,
            },
            slot: 0,
        }
    }

    fn failed(id: &str) -> Outcome {
        Outcome::Failed {
            document: json!({"_id": id, "body": {"price": 1}}),
            status: 404,
            reason: "document not found".into(),
        }
    }

    fn body(r: &Response) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn all_updated_is_the_seed_shape() {
        let r = documents_response(
            &echo(),
            &request(false),
            &[updated("p1")],
            Format::V1,
            Shape::Full,
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            body(&r),
            json!({"status": 200, "error": null, "requestId": "r-42", "index": "shop",
                   "collection": "products", "controller": "document", "action": "mUpdate",
                   "refresh": "wait_for", "retryOnConflict": 3, "volatile": {"trace": "x"},
                   "result": {"total": 1, "hits": [
                     {"_id": "p1", "_index": "shop", "_type": "products", "_version": 2,
                      "result": "updated", "status": 200,
                      "_shards": {"total": 2, "successful": 1, "failed": 0},
                      "_source": {"price": 10}}]}})
        );
    }

    #[test]
    fn failures_make_a_206_with_each_document_as_sent() {
        let r = documents_response(
            &echo(),
            &request(false),
            &[updated("p1"), failed("p9")],
            Format::V1,
            Shape::Full,
        );
        assert_eq!(r.status, 206);
        let b = body(&r);
        assert_eq!(b["result"]["total"], 1);
        assert_eq!(b["error"]["id"], "services.storage.incomplete_update");
        assert_eq!(
            b["error"]["message"],
            "1 of 2 documents could not be updated"
        );
        assert_eq!(b["error"]["count"], 1);
        assert_eq!(
            b["error"]["errors"][0],
            json!({"document": {"_id": "p9", "body": {"price": 1}}, "status": 404, "reason": "document not found"})
        );
        let all = documents_response(
            &echo(),
            &request(false),
            &[failed("a")],
            Format::V1,
            Shape::Full,
        );
        assert_eq!(all.status, 206);
    }

    #[test]
    fn v2_lists_successes_and_errors_and_strict_fails() {
        let outcomes = [updated("p1"), failed("p9")];
        let r = documents_response(&echo(), &request(false), &outcomes, Format::V2, Shape::Full);
        assert_eq!(r.status, 200);
        let b = body(&r);
        assert_eq!(
            b["result"]["successes"][0],
            json!({"_id": "p1", "_updatedFields": [], "_version": 2, "status": 200, "_source": {"price": 10}})
        );
        assert_eq!(b["result"]["errors"][0]["status"], 404);
        let strict =
            documents_response(&echo(), &request(true), &outcomes, Format::V2, Shape::Full);
        assert_eq!(strict.status, 400);
        assert_eq!(
            body(&strict)["error"]["id"],
            "api.process.incomplete_multiple_request"
        );
    }

    #[test]
    fn updated_fields_are_the_leaf_paths_of_each_entry() {
        let mut req = request(false);
        req.documents = vec![
            json!({"_id": "p1", "body": {"obj": {"inner": {"z": 1}, "e": {}}, "arr": [1], "_kuzzle_info": {}}}),
            json!({"_id": "p1", "body": {"other": 2}}),
        ];
        let mut budget = usize::MAX;
        assert_eq!(
            updated_fields(&req, 0, &mut budget),
            ["obj.inner.z", "obj.e", "arr"]
        );
        assert_eq!(
            updated_fields(&req, 1, &mut budget),
            ["other"],
            "per entry, even for one _id twice"
        );
        let r = documents_response(&echo(), &req, &[updated("p1")], Format::V2, Shape::Full);
        assert_eq!(
            body(&r)["result"]["successes"][0]["_updatedFields"],
            json!(["obj.inner.z", "obj.e", "arr"])
        );
    }

    /// `depth` objects nested under keys of `key_len` bytes, `leaves` leaves at the bottom.
    fn deep(depth: usize, key_len: usize, leaves: usize) -> Value {
        deep_of(depth, key_len, leaves, '0')
    }

    /// `depth` objects nested under keys of `key_len` characters (`fill`, then the level).
    fn deep_of(depth: usize, key_len: usize, leaves: usize, fill: char) -> Value {
        let mut value = Value::Object((0..leaves).map(|i| (format!("l{i}"), json!(1))).collect());
        for level in 0..depth {
            let digits = level.to_string();
            let pad = key_len.saturating_sub(digits.len());
            let key = format!("{}{digits}", fill.to_string().repeat(pad));
            value = json!({ key: value });
        }
        value
    }

    #[test]
    fn keys_are_counted_as_the_reply_writes_them() {
        for c in (0u8..0x80).map(char::from).chain(['é', '\u{2028}', '😀']) {
            let key = c.to_string();
            let written = serde_json::to_string(&key).unwrap().len() - 2;
            assert_eq!(escaped_len(&key), written, "{c:?}");
        }
        // Keys of control characters, 6 bytes each once written: the listing is held to
        // its budget in written bytes (it was 20 times the request).
        let mut req = request(false);
        req.documents = vec![json!({"_id": "a", "body": deep_of(18, 400, 20, '\u{1}')})];
        req.bytes = serde_json::to_vec(&req.documents).unwrap().len();
        let r = documents_response(&echo(), &req, &[updated("a")], Format::V2, Shape::Full);
        let bound = 3 * req.bytes + UPDATED_FIELDS_SLACK;
        assert!(r.body.len() <= bound, "{} > {bound}", r.body.len());
    }

    #[test]
    fn updated_fields_past_the_budget_are_the_top_level_keys() {
        let mut req = request(false);
        req.documents = vec![
            json!({"_id": "a", "body": {"small": {"x": 1}}}),
            json!({"_id": "b", "body": {"top": deep(18, 1024, 900), "also": 1, "_kuzzle_info": 1}}),
            json!({"_id": "c", "body": {"small": {"y": 1}}}),
        ];
        req.bytes = serde_json::to_vec(&req.documents).unwrap().len();
        let outcomes: Vec<Outcome> = (0..3)
            .map(|slot| match updated("x") {
                Outcome::Written { id, item, .. } => Outcome::Written { id, item, slot },
                other => other,
            })
            .collect();
        let r = documents_response(&echo(), &req, &outcomes, Format::V2, Shape::Full);
        let b = body(&r);
        let fields = |i: usize| b["result"]["successes"][i]["_updatedFields"].clone();
        assert_eq!(fields(0), json!(["small.x"]));
        assert_eq!(
            fields(1),
            json!(["top", "also"]),
            "18 KiB × 900 paths don't fit"
        );
        assert_eq!(fields(2), json!(["small.y"]), "the next entry still fits");
        assert!(
            r.body.len() < 2 * req.bytes,
            "{} for {}",
            r.body.len(),
            req.bytes
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Over generated bodies (depth, key length, fan-out, an entry repeated), a v2
        /// reply stays under `4 × request + 128 bytes a document + 64 KiB`: its echo and
        /// failures are the request's own bytes, its `_updatedFields` within
        /// `updated_fields_budget` plus the top-level keys (its `_source`s are budgeted
        /// apart: write.rs).
        #[test]
        fn a_v2_reply_stays_within_its_bound(
            depth in 0usize..24,
            key_len in 1usize..2048,
            fan_out in 1usize..64,
            entries in 1usize..20,
            repeats in 1usize..10,
            control in proptest::bool::ANY,
        ) {
            let mut req = request(false);
            // Keys of digits, or of control characters (6 bytes each once written).
            let fill = if control { '\u{1}' } else { '0' };
            req.documents = (0..entries)
                .map(|e| json!({"_id": format!("d{e}"), "body": {"k": deep_of(depth, key_len, fan_out, fill), "e": e}}))
                .flat_map(|entry| std::iter::repeat_n(entry, repeats))
                .collect();
            req.bytes = serde_json::to_vec(&req.documents).unwrap().len();
            let outcomes: Vec<Outcome> = (0..req.documents.len())
                .map(|slot| match updated("d") {
                    Outcome::Written { id, item, .. } => Outcome::Written { id, item, slot },
                    other => other,
                })
                .collect();
            let r = documents_response(&echo(), &req, &outcomes, Format::V2, Shape::Full);
            let bound = 4 * req.bytes + 128 * outcomes.len() + UPDATED_FIELDS_SLACK;
            proptest::prop_assert!(r.body.len() <= bound, "{} > {bound}", r.body.len());
        }
    }

    #[test]
    fn a_lean_reply_keeps_statuses_and_counts_without_sources_or_bodies() {
        let outcomes = [updated("p1"), failed("p9")];
        let full = documents_response(&echo(), &request(false), &outcomes, Format::V1, Shape::Full);
        let lean = documents_response(&echo(), &request(false), &outcomes, Format::V1, Shape::Lean);
        assert_eq!(lean.status, full.status);
        let (full, lean) = (body(&full), body(&lean));
        assert!(lean["result"]["hits"][0].get("_source").is_none());
        assert_eq!(lean["result"]["hits"][0]["_version"], 2);
        assert_eq!(lean["error"]["count"], full["error"]["count"]);
        assert_eq!(lean["error"]["message"], full["error"]["message"]);
        assert_eq!(lean["error"]["errors"][0]["document"], json!({"_id": "p9"}));
        let last = too_large_response("r-42", 5_000_000, 1_000_000);
        assert_eq!(last.status, 500);
        assert_eq!(body(&last)["error"]["id"], "api.process.reply_too_large");
        assert_eq!(body(&last)["requestId"], "r-42");
    }

    #[test]
    fn a_whole_request_error_has_a_null_result() {
        let r = error_response(&echo(), &RequestError::BodyRequired);
        let b = body(&r);
        assert_eq!(r.status, 400);
        assert_eq!(b["result"], Value::Null);
        assert_eq!(b["error"]["id"], "api.assert.body_required");
        assert_eq!(b["volatile"], json!({"trace": "x"}));
    }
}
