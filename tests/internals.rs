//! Issue 19, item 7: nothing internal is echoed to callers. What the engine says about the
//! worker's own engine account (a 403 naming its user and roles), or what a proxy in front
//! of it says (an HTML page naming its version), reaches the caller as a generic 503 reason;
//! the details are in the worker's log only. The real binary, broker and engine, behind
//! a proxy that answers some calls itself (`support::http_fault`).

mod support;

use std::process::Stdio;
use std::sync::Arc;

use serde_json::{Value, json};
use support::binary::BinaryWorker;
use support::cleanup::Cleanup;
use support::http_fault::{HttpFault, Responder};
use support::*;

const USER: &str = "mupdate_writer_19";
const ROLE: &str = "secret_role_19";
const PROXY: &str = "nginx/1.25.3-internal-19";
/// `error::ENGINE_REFUSED_WORKER`.
const GENERIC: &str = "the storage engine refused the worker's call; the worker's log says why";

fn denied() -> String {
    format!(
        "action [indices:data/write/bulk[s]] is unauthorized for user [{USER}] with effective \
         roles [{ROLE}] on indices [x], this action is granted by the index privileges [write]"
    )
}

/// What Elasticsearch answers a user without the right to write.
fn engine_403(method: &str, path: &str) -> Option<(u16, String, String)> {
    let body = json!({"error": {"root_cause": [{"type": "security_exception", "reason": denied()}],
                     "type": "security_exception", "reason": denied()}, "status": 403});
    (method == "POST" && path.contains("/_bulk"))
        .then(|| (403, "application/json".to_owned(), body.to_string()))
}

/// What an nginx in front of the engine answers when it forbids a path.
fn proxy_403(method: &str, path: &str) -> Option<(u16, String, String)> {
    let page = format!(
        "<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n<center><h1>403 \
         Forbidden</h1></center>\r\n<hr><center>{PROXY}</center>\r\n</body>\r\n</html>\r\n"
    );
    (method == "POST" && path.contains("/_bulk")).then(|| (403, "text/html".to_owned(), page))
}

/// A bulk call answered, each item refused for the worker's user (its rights on that
/// index), as Elasticsearch answers it.
fn items_403(method: &str, path: &str, body: &[u8]) -> Option<(u16, String, String)> {
    if method != "POST" || !path.contains("/_bulk") {
        return None;
    }
    let items: Vec<Value> = String::from_utf8_lossy(body)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|action| action["update"]["_id"].as_str().map(str::to_owned))
        .map(|id| {
            json!({"update": {"_index": "x", "_id": id, "status": 403,
                              "error": {"type": "security_exception", "reason": denied()}}})
        })
        .collect();
    let answer = json!({"took": 1, "errors": true, "items": items});
    Some((200, "application/json".to_owned(), answer.to_string()))
}

/// What an engine answers a HEAD of an index the worker's user may not see.
fn head_403(method: &str, _path: &str) -> Option<(u16, String, String)> {
    (method == "HEAD").then(|| (403, "application/json".to_owned(), String::new()))
}

fn assert_told_nothing_internal(reply: &Value) {
    let text = reply.to_string();
    for secret in [USER, ROLE, PROXY, "security_exception", "html"] {
        assert!(!text.contains(secret), "{secret} in the reply: {text}");
    }
}

#[tokio::test]
async fn the_engines_words_about_the_workers_account_or_a_proxys_page_reach_no_caller() {
    let col = Collection::create(&[("a", json!({"n": 1})), ("b", json!({"n": 1}))]).await;
    let other = Collection::create(&[("a", json!({"n": 1}))]).await;
    let fault = HttpFault::start(&ES_URL).await;
    let mut settings = settings();
    settings.storage.url = fault.url();
    let _cleanup = Cleanup::of(&settings);
    let mut worker = BinaryWorker::spawn(worker_command(&settings).stderr(Stdio::piped()));
    wait_consumers(&settings.amqp.request_queue, 1).await;
    let queue = settings.amqp.request_queue.clone();
    let documents = json!([{"_id": "a", "body": {"n": 2}}, {"_id": "b", "body": {"n": 2}}]);

    let bulk_answers: [(&str, Arc<Responder>); 3] = [
        ("an engine's 403", Arc::new(|m, p, _| engine_403(m, p))),
        ("a proxy's page", Arc::new(|m, p, _| proxy_403(m, p))),
        ("items refused", Arc::new(items_403)),
    ];
    for (case, responder) in bulk_answers {
        fault.answer_with(Some(responder));
        let envelope = col.envelope(documents.clone());
        let reply = call_queue(&queue, &serde_json::to_vec(&envelope).unwrap()).await;
        assert_eq!(reply["status"], 206, "{case}: {reply}");
        let errors = reply["error"]["errors"].as_array().unwrap();
        assert_eq!(errors.len(), 2, "{case}: {reply}");
        for error in errors {
            assert_eq!(error["status"], 503, "{case}: {reply}");
            assert_eq!(error["reason"], GENERIC, "{case}: {reply}");
        }
        assert_told_nothing_internal(&reply);
    }

    // The index check itself refused: a whole-request error, as generic.
    fault.answer_with(Some(Arc::new(|m, p, _| head_403(m, p))));
    let reply = call_queue(
        &queue,
        &serde_json::to_vec(&other.envelope(documents.clone())).unwrap(),
    )
    .await;
    assert_eq!(reply["status"], 500, "{reply}");
    assert_eq!(reply["error"]["message"], GENERIC, "{reply}");
    assert_told_nothing_internal(&reply);

    // The engine itself answering again: its document-level reasons reach callers.
    fault.answer_with(None);
    let envelope = col.envelope(json!([{"_id": "a", "body": {"n": 3}},
                                       {"_id": "missing", "body": {}}]));
    let reply = call_queue(&queue, &serde_json::to_vec(&envelope).unwrap()).await;
    assert_eq!(reply["status"], 206, "{reply}");
    assert_eq!(reply["error"]["errors"][0]["reason"], "document not found");

    assert!(worker.terminate().await.success());
    let log = worker.stderr();
    for detail in [USER, ROLE, PROXY] {
        assert!(log.contains(detail), "{detail} in the worker's log: {log}");
    }
}
