//! The response envelope (SPEC section 3): 200, 206 (v1) or the v2 layout, and
//! whole-request errors. Pure functions.

use serde_json::{Map, Value, json};

use crate::bulk::Item;
use crate::config::Format;
use crate::envelope::{Echo, Request};
use crate::error::RequestError;

/// What became of one document of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Updated {
        id: String,
        item: Item,
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

fn envelope(echo: &Echo, status: u16, error: Value, result: Value) -> Response {
    let mut map = Map::new();
    map.insert("status".into(), status.into());
    map.insert("error".into(), error);
    map.insert("requestId".into(), echo.request_id.clone().into());
    let echoed = [
        ("index", &echo.index),
        ("collection", &echo.collection),
        ("controller", &echo.controller),
        ("action", &echo.action),
    ];
    for (key, value) in echoed {
        map.insert(key.into(), value.clone().unwrap_or(Value::Null));
    }
    map.insert(
        "volatile".into(),
        echo.volatile.clone().unwrap_or(Value::Null),
    );
    if let Some(refresh) = &echo.refresh {
        map.insert("refresh".into(), refresh.clone());
    }
    if let Some(retry) = &echo.retry_on_conflict {
        map.insert("retryOnConflict".into(), retry.clone());
    }
    map.insert("result".into(), result);
    Response {
        request_id: echo.request_id.clone(),
        status,
        body: serde_json::to_vec(&Value::Object(map)).unwrap_or_default(),
    }
}

/// A whole-request error: `result: null`.
pub fn error_response(echo: &Echo, error: &RequestError) -> Response {
    envelope(echo, error.status(), error.to_json(), Value::Null)
}

fn failure_json(document: &Value, status: u16, reason: &str) -> Value {
    json!({"document": document, "status": status, "reason": reason})
}

/// The reply to a request whose documents were all tried.
pub fn documents_response(
    echo: &Echo,
    request: &Request,
    outcomes: &[Outcome],
    format: Format,
) -> Response {
    let mut hits = Vec::new();
    let mut errors = Vec::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Updated { id, item } => hits.push(hit_json(id, item, request, format)),
            Outcome::Failed {
                document,
                status,
                reason,
            } => errors.push(failure_json(document, *status, reason)),
        }
    }
    match format {
        Format::V1 => {
            let result = json!({"total": hits.len(), "hits": hits});
            if errors.is_empty() {
                return envelope(echo, 200, Value::Null, result);
            }
            let error = json!({
                "status": 206, "id": "services.storage.incomplete_update",
                "message": format!("{} of {} documents could not be updated", errors.len(), outcomes.len()),
                "count": errors.len(), "errors": errors});
            envelope(echo, 206, error, result)
        }
        Format::V2 => {
            let failed = errors.len();
            let result = json!({"successes": hits, "errors": errors});
            if request.strict && failed > 0 {
                let error = json!({
                    "status": 400, "id": "api.process.incomplete_multiple_request",
                    "message": format!("{failed} of {} documents could not be updated", outcomes.len()),
                    "count": failed});
                return envelope(echo, 400, error, result);
            }
            envelope(echo, 200, Value::Null, result)
        }
    }
}

fn hit_json(id: &str, item: &Item, request: &Request, format: Format) -> Value {
    let mut hit = Map::new();
    hit.insert("_id".into(), id.into());
    if format == Format::V1 {
        hit.insert("_index".into(), request.index.clone().into());
        hit.insert("_type".into(), request.collection.clone().into());
    }
    hit.insert(
        "_version".into(),
        item.version.map_or(Value::Null, Value::from),
    );
    if format == Format::V1 {
        hit.insert(
            "result".into(),
            item.result.clone().map_or(Value::Null, Value::from),
        );
    }
    hit.insert("status".into(), item.status.into());
    if format == Format::V1 {
        hit.insert("_shards".into(), item.shards.clone().unwrap_or(Value::Null));
    }
    if let Some(source) = item.get.as_ref().and_then(|g| g.source.clone()) {
        hit.insert("_source".into(), source);
    }
    Value::Object(hit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bulk::Get;
    use crate::envelope::Refresh;

    fn echo() -> Echo {
        Echo {
            request_id: "r-42".into(),
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
            index: "shop".into(),
            collection: "products".into(),
            refresh: Refresh::WaitFor,
            retry_on_conflict: 3,
            strict,
            documents: vec![],
        }
    }

    fn updated(id: &str) -> Outcome {
        Outcome::Updated {
            id: id.into(),
            item: Item {
                status: 200,
                version: Some(2),
                result: Some("updated".into()),
                shards: Some(json!({"total": 2, "successful": 1, "failed": 0})),
                get: Some(Get {
                    source: Some(json!({"price": 10})),
                }),
                error: None,
            },
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
        let r = documents_response(&echo(), &request(false), &[updated("p1")], Format::V1);
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
        let all = documents_response(&echo(), &request(false), &[failed("a")], Format::V1);
        assert_eq!(all.status, 206);
    }

    #[test]
    fn v2_lists_successes_and_errors_and_strict_fails() {
        let outcomes = [updated("p1"), failed("p9")];
        let r = documents_response(&echo(), &request(false), &outcomes, Format::V2);
        assert_eq!(r.status, 200);
        let b = body(&r);
        assert_eq!(
            b["result"]["successes"][0],
            json!({"_id": "p1", "_version": 2, "status": 200, "_source": {"price": 10}})
        );
        assert_eq!(b["result"]["errors"][0]["status"], 404);
        let strict = documents_response(&echo(), &request(true), &outcomes, Format::V2);
        assert_eq!(strict.status, 400);
        assert_eq!(
            body(&strict)["error"]["id"],
            "api.process.incomplete_multiple_request"
        );
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
