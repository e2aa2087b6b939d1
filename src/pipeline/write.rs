//! Applying one request's documents, whatever its write: the per-document checks, the
//! bulk items, resending the items a busy engine rejected (429/503), what an item's
//! answer means for its action (after a resend too), and one outcome per document in
//! the request's order. How the bytes reach the engine is the caller's `send`.

use std::borrow::Cow;
use std::future::Future;
use std::ops::Range;
use std::time::Duration;

use serde_json::Value;
use serde_json::value::RawValue;
use tracing::{debug, warn};

use tokio_util::sync::CancellationToken;

use crate::pipeline::bulk::{self, Get, Item, ItemOptions, Version, WholeKind};
use crate::pipeline::coalesce::BulkError;
use crate::pipeline::envelope::{self, Action, Content};
use crate::pipeline::response::Outcome;
use crate::storage::Abandoned;

/// How the worker makes the ids a `create` or `createOrReplace` entry leaves to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ids {
    /// From the request's identity (`Derived::of`): a delivery of the same request
    /// makes the same ids, so a redelivered `create` finds its own documents rather
    /// than making second copies.
    Derived(uuid::Uuid),
    /// A request without an identity of its own: random ids (a redelivery after its
    /// documents were written makes new ones).
    Random,
}

impl Ids {
    /// The ids of a request: derived when it has an identity of its own (its
    /// `requestId`, else its AMQP `message_id`), with the verified `user_id` and its
    /// whole body, hashed once (SHA-1, UUID v5); random otherwise.
    pub fn of(identity: Option<&str>, user: Option<&str>, body: &[u8]) -> Ids {
        let Some(identity) = identity else {
            return Ids::Random;
        };
        let mut name = Vec::with_capacity(body.len() + identity.len() + 64);
        for part in [user.unwrap_or("").as_bytes(), identity.as_bytes()] {
            name.extend_from_slice(&(part.len() as u64).to_be_bytes());
            name.extend_from_slice(part);
        }
        name.extend_from_slice(body);
        Ids::Derived(uuid::Uuid::new_v5(&IDS_NAMESPACE, &name))
    }

    /// The id of the entry at `slot`: 22 characters of URL-safe base64 (128 bits).
    fn make(self, slot: usize) -> String {
        use base64::Engine;
        let bytes = match self {
            Ids::Derived(request) => {
                *uuid::Uuid::new_v5(&request, &(slot as u64).to_be_bytes()).as_bytes()
            }
            // The OS's randomness: an id no one can guess (and create first).
            Ids::Random => *uuid::Uuid::new_v4().as_bytes(),
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }
}

/// The namespace of derived ids (a UUID of this project's own).
const IDS_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d75_7064_6174_6521_8a1e_0c3f_5b7d_2e94);

/// One valid entry, ready to write.
struct Entry<'a> {
    id: Cow<'a, str>,
    /// The id was derived from the request's identity (`Ids::Derived`).
    derived: bool,
    content: Content<'a>,
}

/// How `apply` reaches the engine: `send` for bulk calls, `versions` for the checks of
/// a replace.
pub struct Engine<F, V> {
    pub send: F,
    pub versions: V,
}

/// Applies `documents` for `action`. `send` takes an NDJSON bulk body and its number of
/// items and returns their bulk items in order, or the status and reason of a refused
/// call (which fails every document of that call); `versions` reads the versions of
/// documents by id (what a `replace` is guarded by: `bulk::append_whole`). Rejected
/// items are sent again at most `item_retries` times, waiting `backoff` between rounds,
/// unless `cancel` says the request was handed back: then it is `Abandoned`, whatever
/// was applied already (the request is delivered again; what a second delivery's
/// answers mean is read below, `outcome`). A replace refused because its document
/// changed after its check is checked again and retried the same way.
pub async fn apply<F, Fut, V, VFut>(
    documents: &[Value],
    action: Action,
    options: &ItemOptions<'_>,
    item_retries: u32,
    mut backoff: impl Iterator<Item = Duration>,
    cancel: &CancellationToken,
    Engine { send, versions }: Engine<F, V>,
) -> Result<Vec<Outcome>, Abandoned>
where
    F: Fn(Vec<u8>, usize) -> Fut,
    Fut: Future<Output = Result<Vec<Item>, BulkError>>,
    V: Fn(Vec<String>) -> VFut,
    VFut: Future<Output = Result<Vec<Option<Version>>, BulkError>>,
{
    let mut outcomes: Vec<Option<Outcome>> = vec![None; documents.len()];
    let mut entries: Vec<Option<Entry>> = Vec::with_capacity(documents.len());
    // The last entry of each `_id`: the only one whose `_source` is asked of the engine
    // (kept only when sources are asked).
    let mut last = std::collections::HashMap::new();
    for (slot, document) in documents.iter().enumerate() {
        match envelope::check_document(document, action) {
            Ok(doc) => {
                let (id, derived) = match doc.id {
                    Some(id) => (Cow::Borrowed(id), false),
                    None => (
                        Cow::Owned(options.ids.make(slot)),
                        matches!(options.ids, Ids::Derived(_)),
                    ),
                };
                if options.include_source {
                    last.insert(id.clone(), slot);
                }
                entries.push(Some(Entry {
                    id,
                    derived,
                    content: doc.content,
                }));
            }
            Err(err) => {
                outcomes[slot] = Some(failed(document, 400, err.reason().into()));
                entries.push(None);
            }
        }
    }
    let asks_source =
        |slot: usize, entry: &Entry| options.include_source && last.get(&entry.id) == Some(&slot);
    // Each entry's item, written once (a replace's once per check: its guard changes):
    // later rounds send the same bytes again.
    let mut written = Vec::new();
    let mut ranges: Vec<Range<usize>> = vec![0..0; documents.len()];
    let guarded = action == Action::Replace;
    if !guarded {
        for (slot, entry) in entries.iter().enumerate() {
            let Some(entry) = entry else { continue };
            let start = written.len();
            write_item(
                &mut written,
                options,
                action,
                entry,
                asks_source(slot, entry),
                None,
            );
            ranges[slot] = start..written.len();
        }
    }
    let mut pending: Vec<usize> = (0..documents.len())
        .filter(|slot| entries[*slot].is_some())
        .collect();
    // The replaces to check (again) before their next round: all of them at first.
    let mut unchecked: Vec<usize> = if guarded { pending.clone() } else { Vec::new() };
    let mut uncertain = vec![options.redelivered; documents.len()];
    let mut attempt = 0;
    while !pending.is_empty() {
        if !unchecked.is_empty() {
            let ids = unchecked
                .iter()
                .filter_map(|&slot| entries[slot].as_ref().map(|e| e.id.clone().into_owned()))
                .collect();
            // Boxed: only replaces check, and its future would make every request's
            // task as large as it is.
            let found = match Box::pin(versions(ids)).await {
                Ok(found) => found,
                Err(BulkError::Abandoned) => return Err(Abandoned),
                Err(BulkError::Refused(status, reason)) => {
                    warn!(status, reason = %crate::logs::Untrusted(&reason), "version check refused");
                    for slot in pending.drain(..) {
                        outcomes[slot] = Some(failed(&documents[slot], status, reason.clone()));
                    }
                    break;
                }
            };
            for (slot, version) in std::mem::take(&mut unchecked).into_iter().zip(found) {
                let Some(entry) = &entries[slot] else {
                    continue;
                };
                match version {
                    Some(version) => {
                        let start = written.len();
                        write_item(&mut written, options, action, entry, false, Some(version));
                        ranges[slot] = start..written.len();
                    }
                    None => {
                        outcomes[slot] =
                            Some(failed(&documents[slot], 404, "document not found".into()));
                        pending.retain(|s| *s != slot);
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
        }
        let mut body = Vec::with_capacity(pending.iter().map(|s| ranges[*s].len()).sum());
        for &slot in &pending {
            body.extend_from_slice(&written[ranges[slot].clone()]);
        }
        // A later round is a resend: its items were rejected by the call that answered,
        // but that call may itself have been a resend of one whose fate is unknown (the
        // coalescer sends again after a timeout or a broken connection), which may have
        // applied them. So it keeps the resend's protections: no false `noop`, no
        // conflict with that first call (`bulk::for_resend`), and its answers are read
        // as a resend's (`outcome`).
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
        for (slot, mut item) in pending.iter().copied().zip(items) {
            let Some(entry) = &entries[slot] else {
                continue;
            };
            // Uncertain once any call carrying it was a resend (`Item::resent`): an item
            // rejected (429) by a call that was not is known unapplied there.
            uncertain[slot] |= item.resent;
            item.resent = uncertain[slot];
            // A guarded replace refused as changed since its check: checked again.
            let changed = guarded && item.status == 409;
            // At least one check again, whatever `item_retries`: a resent replace meets
            // its own first write's version.
            let may_check_again = attempt < item_retries.max(1);
            if (item.is_rejected() && may_retry) || (changed && may_check_again) {
                rejected.push(slot);
                if changed {
                    unchecked.push(slot);
                }
                continue;
            }
            let document = written_document(options, &written[ranges[slot].clone()]);
            outcomes[slot] = Some(outcome(
                action,
                entry,
                slot,
                item,
                document,
                &documents[slot],
            ));
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

/// Writes an entry's bulk item (a replace's guarded by `version`).
fn write_item(
    buf: &mut Vec<u8>,
    options: &ItemOptions<'_>,
    action: Action,
    entry: &Entry<'_>,
    asks_source: bool,
    version: Option<Version>,
) {
    let id = &*entry.id;
    match entry.content {
        Content::Merge { changes, default } => {
            let item = ItemOptions {
                include_source: asks_source,
                ..*options
            };
            bulk::append_update(buf, &item, id, changes, default);
        }
        Content::Whole(body) => {
            let kind = match (action, version) {
                (Action::Create, _) => WholeKind::Create,
                (_, Some(version)) => WholeKind::Replace(version),
                _ => WholeKind::Index,
            };
            bulk::append_whole(buf, options, kind, id, body);
        }
        Content::Nothing => bulk::append_delete(buf, options, id),
    }
}

/// What an item wrote, for its reply's `_source`, when the reply carries that
/// (`ItemOptions::echo_written`).
fn written_document(options: &ItemOptions<'_>, item: &[u8]) -> Option<Box<RawValue>> {
    if !options.echo_written {
        return None;
    }
    let bytes = bulk::written_document(item)?;
    let text = std::str::from_utf8(bytes).ok()?;
    RawValue::from_string(text.to_owned()).ok()
}

/// What an item's answer means for its entry. A resent item (`Item::resent`: a call
/// carrying it, this one or an earlier round's, was sent again after an uncertain one,
/// which may have been applied) is read knowing that the uncertain call may have done
/// the work:
/// - a `delete` answered 404 deleted the document in that first call, or found it
///   already gone: either way it is gone, so it is a success (a client is never told a
///   document it deleted was missing);
/// - a `create` answered 409 is its own first call's document when its id was derived
///   from the request (only a delivery of this same request makes that id: `Ids`), and
///   a success; with the client's own id nothing tells its document from another's,
///   and it fails as existing (docs/src/guarantees.md).
///
/// The same holds for a redelivered request's derived-id `create` answered 409: its
/// first delivery made that document.
fn outcome(
    action: Action,
    entry: &Entry<'_>,
    slot: usize,
    item: Item,
    document: Option<Box<RawValue>>,
    sent: &Value,
) -> Outcome {
    let id = entry.id.clone().into_owned();
    let written = |mut item: Item| {
        if let Some(source) = document {
            item.get = Some(Get {
                source: Some(source),
            });
        }
        Outcome::Written { id, item, slot }
    };
    if item.is_success() {
        return written(item);
    }
    if refused_worker(&item) {
        return failed(
            sent,
            crate::error::ENGINE_REFUSED_WORKER_STATUS,
            crate::error::ENGINE_REFUSED_WORKER.into(),
        );
    }
    match (action, item.status) {
        (Action::Create, 409) if entry.derived => written(Item {
            status: 201,
            version: Some(1),
            result: Some("created".into()),
            error: None,
            ..item
        }),
        (Action::Create, 409) => failed(sent, 400, "document already exists".into()),
        (Action::Delete, 404) if item.resent => written(Item {
            status: 200,
            result: Some("deleted".into()),
            error: None,
            ..item
        }),
        _ => failed(sent, item.status, item.reason()),
    }
}

/// A reply carries `_source`s only up to `budget` bytes in all: past it, none at all
/// (each hit keeps its status, version and result; a client sees either every asked
/// `_source` or none, never a silently shortened list). They are dropped here, as soon
/// as the request's items are in, not when the reply is written.
fn within_source_budget(outcomes: &mut [Outcome], budget: usize) {
    let source_len = |o: &Outcome| match o {
        Outcome::Written { item, .. } => item
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
        if let Outcome::Written { item, .. } = outcome {
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
        single: false,
        ids: crate::pipeline::write::Ids::Random,
        redelivered: false,
        echo_written: false,
    };

    async fn no_versions(_ids: Vec<String>) -> Result<Vec<Option<Version>>, BulkError> {
        unreachable!("only replaces are checked")
    }

    /// `apply` of mUpdate entries: no version is ever read.
    async fn apply_updates<F, Fut>(
        docs: &[Value],
        options: &ItemOptions<'_>,
        retries: u32,
        backoff: impl Iterator<Item = Duration>,
        cancel: &CancellationToken,
        send: F,
    ) -> Result<Vec<Outcome>, Abandoned>
    where
        F: Fn(Vec<u8>, usize) -> Fut,
        Fut: Future<Output = Result<Vec<Item>, BulkError>>,
    {
        let engine = Engine {
            send,
            versions: no_versions,
        };
        apply(
            docs,
            Action::Update,
            options,
            retries,
            backoff,
            cancel,
            engine,
        )
        .await
    }

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
        let outcomes = apply_updates(
            docs.as_array().unwrap(),
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
                .all(|o| matches!(o, Outcome::Written { .. }))
        );
        let ids: Vec<_> = outcomes
            .iter()
            .map(|o| match o {
                Outcome::Written { id, .. } => id.as_str(),
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
        apply_updates(docs, &OPTIONS, 3, backoff, &cancel, send)
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
        apply_updates(docs, options, 0, backoff, &cancel, send)
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
        let outcomes = apply_updates(docs, &options, 0, std::iter::empty(), &cancel, send)
            .await
            .unwrap();
        outcomes
            .iter()
            .map(|o| match o {
                Outcome::Written { item, .. } => item.get.is_some(),
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
        assert!(matches!(&outcomes[1], Outcome::Written { .. }));
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
        let outcomes = apply_updates(
            docs.as_array().unwrap(),
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
        let result = apply_updates(
            docs.as_array().unwrap(),
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

    /// Deletes answered by `rounds` (each round: status, and whether the call was a
    /// resend), one entry.
    async fn delete_answered(rounds: Vec<(u16, bool)>) -> Outcome {
        delete_answered_with(rounds, false).await
    }

    async fn delete_answered_with(rounds: Vec<(u16, bool)>, redelivered: bool) -> Outcome {
        let rounds = Mutex::new(rounds);
        let send = |_body: Vec<u8>, count: usize| {
            let (status, resent) = rounds.lock().unwrap().remove(0);
            let bytes =
                serde_json::to_vec(&json!({"items": [{"delete": {"_id": "a", "status": status}}]}))
                    .unwrap();
            async move {
                let mut items = bulk::parse_response(&bytes, count).unwrap();
                items[0].resent = resent;
                Ok(items)
            }
        };
        let docs = json!([{"_id": "a"}]);
        let cancel = CancellationToken::new();
        let backoff = std::iter::repeat(Duration::from_millis(1));
        let engine = Engine {
            send,
            versions: no_versions,
        };
        let options = ItemOptions {
            redelivered,
            ..OPTIONS
        };
        let outcomes = apply(
            docs.as_array().unwrap(),
            Action::Delete,
            &options,
            3,
            backoff,
            &cancel,
            engine,
        )
        .await
        .unwrap();
        outcomes.into_iter().next().unwrap()
    }

    #[tokio::test]
    async fn a_delete_finds_its_document_gone_as_done_only_after_an_uncertain_call() {
        // Sent again after an uncertain call: gone is deleted.
        let after_resend = delete_answered(vec![(404, true)]).await;
        assert!(
            matches!(after_resend, Outcome::Written { .. }),
            "{after_resend:?}"
        );
        // Rejected by a call that was not a resend (so not applied), then missing: the
        // document was never there.
        let after_429 = delete_answered(vec![(429, false), (404, false)]).await;
        assert!(
            matches!(after_429, Outcome::Failed { status: 404, .. }),
            "{after_429:?}"
        );
        // Rejected by a resent call, then missing: that resend's first call may have
        // deleted it.
        let uncertain = delete_answered(vec![(429, true), (404, false)]).await;
        assert!(
            matches!(uncertain, Outcome::Written { .. }),
            "{uncertain:?}"
        );
        // A redelivered request: its first delivery may have deleted it.
        let redelivered = delete_answered_with(vec![(404, false)], true).await;
        assert!(
            matches!(redelivered, Outcome::Written { .. }),
            "{redelivered:?}"
        );
    }
}
