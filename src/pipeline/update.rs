//! Applying one request's documents: the per-document checks, the bulk items, resending
//! the items a busy engine rejected (429/503), and one outcome per document in the
//! request's order. How the bytes reach the engine is the caller's `send`.

use std::future::Future;
use std::time::Duration;

use serde_json::Value;
use tracing::{debug, warn};

use tokio_util::sync::CancellationToken;

use crate::pipeline::bulk::{self, Item, ItemOptions};
use crate::pipeline::coalesce::BulkError;
use crate::pipeline::envelope::{self, Action};
use crate::pipeline::response::Outcome;
use crate::storage::Abandoned;

/// Updates `documents`. `send` takes an NDJSON bulk body and its number of items and
/// returns their bulk items in order, or the status and reason of a refused call
/// (which fails every document of that call). Rejected items are sent again at most
/// `item_retries` times, waiting `backoff` between rounds, unless `cancel` says the
/// request was handed back: then it is `Abandoned`, whatever was applied already (the
/// request is delivered again, and re-applying a partial update is harmless).
pub async fn apply<F, Fut>(
    documents: &[Value],
    action: Action,
    options: &ItemOptions<'_>,
    item_retries: u32,
    mut backoff: impl Iterator<Item = Duration>,
    cancel: &CancellationToken,
    send: F,
) -> Result<Vec<Outcome>, Abandoned>
where
    F: Fn(Vec<u8>, usize) -> Fut,
    Fut: Future<Output = Result<Vec<Item>, BulkError>>,
{
    let mut outcomes: Vec<Option<Outcome>> = vec![None; documents.len()];
    let mut pending = Vec::new();
    // The last entry of each `_id`: the only one whose `_source` is asked of the engine.
    let mut last = std::collections::HashMap::new();
    for (slot, entry) in documents.iter().enumerate() {
        match envelope::check_document(entry, action) {
            Ok(doc) => {
                pending.push(slot);
                last.insert(doc.id, slot);
            }
            Err(err) => {
                outcomes[slot] = Some(failed(entry, 400, err.reason().into()));
            }
        }
    }
    let asks_source = |slot: usize, id: &str| options.include_source && last.get(id) == Some(&slot);
    let mut attempt = 0;
    while !pending.is_empty() {
        let mut body = Vec::new();
        for &slot in &pending {
            if let Ok(doc) = envelope::check_document(&documents[slot], action) {
                let item = ItemOptions {
                    include_source: asks_source(slot, doc.id),
                    ..*options
                };
                bulk::append_update(&mut body, &item, doc.id, doc.changes, doc.default);
            }
        }
        // A later round is a resend: its items were rejected by the call that answered,
        // but that call may itself have been a resend of one whose fate is unknown (the
        // coalescer sends again after a timeout or a broken connection), which may have
        // applied them. So it keeps the resend's protections: no false `noop`, no
        // conflict with that first call (`bulk::for_resend`).
        if attempt > 0 {
            body = bulk::for_resend(&body);
        }
        let items = match send(body, pending.len()).await {
            Ok(items) => items,
            Err(BulkError::Abandoned) => return Err(Abandoned),
            Err(BulkError::Refused(status, reason)) => {
                warn!(status, reason = %crate::logs::Untrusted(&reason), "bulk call refused");
                for slot in pending.drain(..) {
                    outcomes[slot] = Some(failed(&documents[slot], status, reason.clone()));
                }
                break;
            }
        };
        let may_retry = attempt < item_retries;
        let mut rejected = Vec::new();
        for (slot, item) in pending.iter().copied().zip(items) {
            let entry = &documents[slot];
            if item.is_success() {
                let id = entry["_id"].as_str().unwrap_or_default().to_owned();
                outcomes[slot] = Some(Outcome::Updated { id, item, slot });
            } else if item.is_rejected() && may_retry {
                rejected.push(slot);
            } else if refused_worker(&item) {
                outcomes[slot] = Some(failed(
                    entry,
                    crate::error::ENGINE_REFUSED_WORKER_STATUS,
                    crate::error::ENGINE_REFUSED_WORKER.into(),
                ));
            } else {
                outcomes[slot] = Some(failed(entry, item.status, item.reason()));
            }
        }
        pending = rejected;
        if !pending.is_empty() {
            attempt += 1;
            let wait = backoff.next().unwrap_or(Duration::from_secs(1));
            debug!(
                items = pending.len(),
                ?wait,
                "engine rejected items; sending them again"
            );
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Abandoned),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
    let mut outcomes: Vec<Outcome> = outcomes
        .into_iter()
        .zip(documents)
        .map(|(outcome, entry)| outcome.unwrap_or_else(|| failed(entry, 500, "not sent".into())))
        .collect();
    within_source_budget(&mut outcomes, options.reply_source_bytes);
    Ok(outcomes)
}

/// A reply carries `_source`s only up to `budget` bytes in all: past it, none at all
/// (each hit keeps its status, version and result; a client sees either every asked
/// `_source` or none, never a silently shortened list). They are dropped here, as soon
/// as the request's items are in, not when the reply is written.
fn within_source_budget(outcomes: &mut [Outcome], budget: usize) {
    let source_len = |o: &Outcome| match o {
        Outcome::Updated { item, .. } => item
            .get
            .as_ref()
            .and_then(|g| g.source.as_ref())
            .map_or(0, |s| s.get().len()),
        Outcome::Failed { .. } => 0,
    };
    let total = outcomes
        .iter()
        .map(source_len)
        .fold(0usize, usize::saturating_add);
    if total <= budget {
        return;
    }
    debug!(
        bytes = total,
        budget, "reply over its _source budget: sent without _source"
    );
    for outcome in outcomes {
        if let Outcome::Updated { item, .. } = outcome {
            item.get = None;
        }
    }
}

/// Whether an item failed on the worker's own engine account (its rights on that index):
/// logged here with the engine's words, which name that account; never told to callers.
fn refused_worker(item: &Item) -> bool {
    let kind = item.error.as_ref().map_or("", |e| e.kind.as_str());
    if !crate::error::engine_refused_worker(item.status, kind) {
        return false;
    }
    warn!(
        status = item.status,
        reason = %crate::logs::Untrusted(&item.reason()),
        "the storage engine refused the worker an item; its caller is told it without these details"
    );
    true
}

fn failed(document: &Value, status: u16, reason: String) -> Outcome {
    Outcome::Failed {
        document: document.clone(),
        status,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Mutex;

    const OPTIONS: ItemOptions<'static> = ItemOptions {
        target: "&i.c",
        retry_on_conflict: 0,
        include_source: false,
        reply_source_bytes: usize::MAX,
        metadata: None,
    };

    fn ok(id: &str) -> Value {
        json!({"update": {"_id": id, "_version": 2, "result": "updated", "status": 200}})
    }

    fn rejected(id: &str) -> Value {
        json!({"update": {"_id": id, "status": 429, "error": {
            "type": "es_rejected_execution_exception", "reason": "rejected execution"}}})
    }

    fn ids_in(body: &[u8]) -> Vec<String> {
        body.split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
            .filter_map(|v| v["update"]["_id"].as_str().map(str::to_owned))
            .collect()
    }

    async fn run(
        docs: &Value,
        retries: u32,
        responses: Vec<Vec<Value>>,
    ) -> (Vec<Outcome>, Vec<Vec<String>>) {
        // Each call gets the next canned response; the ids each call sent are kept.
        let responses = Mutex::new(responses);
        let calls: Mutex<Vec<Vec<String>>> = Mutex::new(Vec::new());
        let send = |body: Vec<u8>, count: usize| {
            calls.lock().unwrap().push(ids_in(&body));
            let items = responses.lock().unwrap().remove(0);
            let bytes = serde_json::to_vec(&json!({"items": items})).unwrap();
            async move { Ok(bulk::parse_response(&bytes, count).unwrap()) }
        };
        let backoff = std::iter::repeat(Duration::from_millis(1));
        let cancel = CancellationToken::new();
        let outcomes = apply(
            docs.as_array().unwrap(),
            Action::Update,
            &OPTIONS,
            retries,
            backoff,
            &cancel,
            send,
        )
        .await
        .unwrap();
        (outcomes, calls.into_inner().unwrap())
    }

    #[tokio::test]
    async fn only_rejected_items_are_sent_again() {
        let docs =
            json!([{"_id": "a", "body": {}}, {"_id": "b", "body": {}}, {"_id": "c", "body": {}}]);
        let responses = vec![vec![ok("a"), rejected("b"), ok("c")], vec![ok("b")]];
        let (outcomes, calls) = run(&docs, 5, responses).await;
        assert_eq!(calls, [vec!["a", "b", "c"], vec!["b"]]);
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Updated { .. }))
        );
        let ids: Vec<_> = outcomes
            .iter()
            .map(|o| match o {
                Outcome::Updated { id, .. } => id.as_str(),
                Outcome::Failed { .. } => "",
            })
            .collect();
        assert_eq!(ids, ["a", "b", "c"], "the request's order");
    }

    #[tokio::test]
    async fn later_rounds_keep_the_resend_protections() {
        let docs = json!([{"_id": "a", "body": {}}]);
        let bodies: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let responses = Mutex::new(vec![vec![rejected("a")], vec![ok("a")]]);
        let send = |body: Vec<u8>, count: usize| {
            bodies
                .lock()
                .unwrap()
                .push(String::from_utf8(body).unwrap());
            let items = responses.lock().unwrap().remove(0);
            let bytes = serde_json::to_vec(&json!({"items": items})).unwrap();
            async move { Ok(bulk::parse_response(&bytes, count).unwrap()) }
        };
        let cancel = CancellationToken::new();
        let backoff = std::iter::repeat(Duration::from_millis(1));
        let docs = docs.as_array().unwrap();
        apply(docs, Action::Update, &OPTIONS, 3, backoff, &cancel, send)
            .await
            .unwrap();
        let bodies = bodies.into_inner().unwrap();
        assert!(!bodies[0].contains("detect_noop"), "{}", bodies[0]);
        assert!(bodies[0].contains("\"retry_on_conflict\":0"));
        assert!(bodies[1].contains("\"detect_noop\":false"), "{}", bodies[1]);
        assert!(
            bodies[1].contains("\"retry_on_conflict\":1"),
            "{}",
            bodies[1]
        );
    }

    /// The `_source` flag of each item of a body, with its `_id`.
    fn source_flags(body: &[u8]) -> Vec<(String, bool)> {
        let lines: Vec<Value> = body
            .split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect();
        lines
            .chunks(2)
            .map(|p| {
                let id = p[0]["update"]["_id"].as_str().unwrap().to_owned();
                (id, p[1]["_source"].as_bool().unwrap())
            })
            .collect()
    }

    async fn flags_sent(docs: &Value, options: &ItemOptions<'_>) -> Vec<(String, bool)> {
        let bodies: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
        let send = |body: Vec<u8>, count: usize| {
            bodies.lock().unwrap().push(body);
            let items: Vec<Value> = (0..count).map(|_| ok("x")).collect();
            let bytes = serde_json::to_vec(&json!({"items": items})).unwrap();
            async move { Ok(bulk::parse_response(&bytes, count).unwrap()) }
        };
        let cancel = CancellationToken::new();
        let docs = docs.as_array().unwrap();
        let backoff = std::iter::empty();
        apply(docs, Action::Update, options, 0, backoff, &cancel, send)
            .await
            .unwrap();
        source_flags(&bodies.into_inner().unwrap()[0])
    }

    #[tokio::test]
    async fn a_repeated_id_asks_its_source_once_from_its_last_entry() {
        let docs = json!([{"_id": "a", "body": {"n": 1}}, {"_id": "b", "body": {}},
                          {"_id": "a", "body": {"n": 2}}, {"_id": "a", "body": 3},
                          {"_id": "c", "body": {}}]);
        let with_sources = ItemOptions {
            include_source: true,
            ..OPTIONS
        };
        let flags = flags_sent(&docs, &with_sources).await;
        let expected = [("a", false), ("b", true), ("a", true), ("c", true)];
        let expected: Vec<(String, bool)> =
            expected.iter().map(|(i, f)| (i.to_string(), *f)).collect();
        assert_eq!(
            flags, expected,
            "the invalid 4th entry is not the last of a"
        );
        // `source: false` (or include_source off): none asked at all.
        let flags = flags_sent(&docs, &OPTIONS).await;
        assert!(flags.iter().all(|(_, f)| !f), "{flags:?}");
    }

    fn with_source(id: &str, bytes: usize) -> Value {
        let mut item = ok(id);
        item["update"]["get"] = json!({"_source": {"s": "x".repeat(bytes)}});
        item
    }

    async fn sources_kept(budget: usize) -> Vec<bool> {
        let docs = json!([{"_id": "a", "body": {}}, {"_id": "b", "body": {}}]);
        let send = |_body: Vec<u8>, count: usize| {
            let items = json!({"items": [with_source("a", 600), with_source("b", 600)]});
            let bytes = serde_json::to_vec(&items).unwrap();
            async move { Ok(bulk::parse_response(&bytes, count).unwrap()) }
        };
        let options = ItemOptions {
            include_source: true,
            reply_source_bytes: budget,
            ..OPTIONS
        };
        let cancel = CancellationToken::new();
        let docs = docs.as_array().unwrap();
        let outcomes = apply(
            docs,
            Action::Update,
            &options,
            0,
            std::iter::empty(),
            &cancel,
            send,
        )
        .await
        .unwrap();
        outcomes
            .iter()
            .map(|o| match o {
                Outcome::Updated { item, .. } => item.get.is_some(),
                Outcome::Failed { .. } => panic!("{o:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_reply_over_its_source_budget_carries_no_source_at_all() {
        assert_eq!(sources_kept(1300).await, [true, true]);
        assert_eq!(sources_kept(1000).await, [false, false]);
    }

    #[tokio::test]
    async fn items_still_rejected_after_the_retries_are_per_document_errors() {
        let docs = json!([{"_id": "a", "body": {}}]);
        let responses = vec![vec![rejected("a")], vec![rejected("a")]];
        let (outcomes, calls) = run(&docs, 1, responses).await;
        assert_eq!(calls.len(), 2);
        match &outcomes[0] {
            Outcome::Failed { status, reason, .. } => {
                assert_eq!((*status, reason.as_str()), (429, "rejected execution"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn invalid_documents_keep_their_place_and_are_never_sent() {
        let docs =
            json!([{"_id": 1, "body": {}}, {"_id": "b", "body": {}}, {"_id": "c", "body": 3}]);
        let (outcomes, calls) = run(&docs, 0, vec![vec![ok("b")]]).await;
        assert_eq!(calls, [vec!["b"]]);
        assert!(matches!(&outcomes[0], Outcome::Failed { status: 400, .. }));
        assert!(matches!(&outcomes[1], Outcome::Updated { .. }));
        assert!(matches!(&outcomes[2], Outcome::Failed { status: 400, .. }));
    }

    #[tokio::test]
    async fn an_item_refused_to_the_workers_engine_account_is_told_without_its_words() {
        let docs = json!([{"_id": "a", "body": {}}, {"_id": "b", "body": {}}]);
        let denied = json!({"update": {"_id": "a", "status": 403, "error": {
            "type": "security_exception",
            "reason": "action [indices:data/write/update] is unauthorized for user [mupdate] with effective roles [writer]"}}});
        let mapping = json!({"update": {"_id": "b", "status": 400, "error": {
            "type": "document_parsing_exception", "reason": "failed to parse field [n]"}}});
        let (outcomes, _) = run(&docs, 0, vec![vec![denied, mapping]]).await;
        match &outcomes[0] {
            Outcome::Failed { status, reason, .. } => {
                assert_eq!(*status, crate::error::ENGINE_REFUSED_WORKER_STATUS);
                assert_eq!(reason, crate::error::ENGINE_REFUSED_WORKER);
            }
            other => panic!("{other:?}"),
        }
        match &outcomes[1] {
            Outcome::Failed { status, reason, .. } => {
                assert_eq!(
                    (*status, reason.as_str()),
                    (400, "failed to parse field [n]")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_refused_call_fails_each_of_its_documents() {
        let docs = json!([{"_id": "a", "body": {}}, {"_id": "b", "body": {}}]);
        let send = |_body: Vec<u8>, _count: usize| async {
            Err(BulkError::Refused(413, "too large".to_owned()))
        };
        let backoff = std::iter::empty();
        let cancel = CancellationToken::new();
        let outcomes = apply(
            docs.as_array().unwrap(),
            Action::Update,
            &OPTIONS,
            3,
            backoff,
            &cancel,
            send,
        )
        .await
        .unwrap();
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Failed { status: 413, .. }))
        );
    }

    #[tokio::test]
    async fn a_request_handed_back_sends_no_more_rounds() {
        let docs = json!([{"_id": "a", "body": {}}]);
        let calls = Mutex::new(0);
        let cancel = CancellationToken::new();
        let send = |_body: Vec<u8>, count: usize| {
            *calls.lock().unwrap() += 1;
            // The request is handed back while its first round is at the engine.
            cancel.cancel();
            let bytes = serde_json::to_vec(&json!({"items": [rejected("a")]})).unwrap();
            async move { Ok(bulk::parse_response(&bytes, count).unwrap()) }
        };
        let backoff = std::iter::repeat(Duration::from_secs(60));
        let result = apply(
            docs.as_array().unwrap(),
            Action::Update,
            &OPTIONS,
            5,
            backoff,
            &cancel,
            send,
        )
        .await;
        assert_eq!(result.unwrap_err(), Abandoned);
        assert_eq!(*calls.lock().unwrap(), 1, "no round after the hand-back");
    }
}
