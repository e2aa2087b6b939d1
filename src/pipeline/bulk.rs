//! The `_bulk` request body (SPEC section 2) and the reading of its response. Pure
//! functions: the engine client sends the bytes, this module makes and reads them.

use std::io::Write;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

pub use crate::storage::Version;

/// `_kuzzle_info` written into every updated document.
#[derive(Debug, Clone, Copy)]
pub struct Metadata<'a> {
    /// Epoch milliseconds.
    pub updated_at: i64,
    /// The broker-verified AMQP `user_id`, if any.
    pub updater: Option<&'a str>,
}

/// Options shared by every item of one request.
#[derive(Debug, Clone, Copy)]
pub struct ItemOptions<'a> {
    pub target: &'a str,
    pub retry_on_conflict: u32,
    /// Whether the request wants `_source`s (`response.include_source`, or its `source`
    /// argument); write.rs asks them of the engine only where they are needed.
    pub include_source: bool,
    /// The `_source` bytes the request's reply may carry (`response.max_source_bytes`).
    pub reply_source_bytes: usize,
    pub metadata: Option<Metadata<'a>>,
    /// The request is a single-document form: its whole documents' metadata is written
    /// as Kuzzle's single forms write it (`write_document`).
    pub single: bool,
    /// How ids left to the worker are made.
    pub ids: crate::pipeline::write::Ids,
    /// The request was delivered before (AMQP `redelivered`): its first delivery may
    /// have written its documents, so every answer is read as a resend's
    /// (`write::outcome`).
    pub redelivered: bool,
    /// The reply's `_source` of each whole document is what was written
    /// (`written_document`), not asked of the engine.
    pub echo_written: bool,
}

/// Appends one `update` action and its partial document to an NDJSON body, written
/// straight into `buf` (no intermediate JSON values: this is the hot path). With
/// `default` (mUpsert), a missing document is created from `default` and `changes`
/// (`changes` win) with `_kuzzle_info.author` and `createdAt`.
pub fn append_update(
    buf: &mut Vec<u8>,
    opts: &ItemOptions<'_>,
    id: &str,
    changes: &Map<String, Value>,
    default: Option<&Map<String, Value>>,
) {
    buf.extend_from_slice(b"{\"update\":{\"_index\":");
    write_json(buf, opts.target);
    buf.extend_from_slice(b",\"_id\":");
    write_json(buf, id);
    let _ = write!(
        buf,
        ",\"retry_on_conflict\":{}}}}}\n{{\"doc\":{{",
        opts.retry_on_conflict
    );
    let first = write_fields(buf, changes, true);
    if let Some(meta) = opts.metadata {
        if !first {
            buf.push(b',');
        }
        let _ = write!(
            buf,
            "\"_kuzzle_info\":{{\"updatedAt\":{},\"updater\":",
            meta.updated_at
        );
        write_json(buf, &meta.updater);
        buf.push(b'}');
    }
    buf.push(b'}');
    if let Some(default) = default {
        buf.extend_from_slice(b",\"upsert\":{");
        // `changes` win over `default`: a key of both is written once, from `changes`.
        let default_only = default.iter().filter(|(k, _)| !changes.contains_key(*k));
        let first = write_pairs(buf, default_only, true);
        let first = write_fields(buf, changes, first);
        if let Some(meta) = opts.metadata {
            if !first {
                buf.push(b',');
            }
            let _ = write!(buf, "\"_kuzzle_info\":{{\"author\":",);
            write_json(buf, &meta.updater);
            let _ = write!(buf, ",\"createdAt\":{}}}", meta.updated_at);
        }
        buf.push(b'}');
    }
    let _ = writeln!(buf, ",\"_source\":{}}}", opts.include_source);
}

/// Writes a body's fields as `"key":value` pairs, without the client's metadata;
/// whether nothing was written.
fn write_fields(buf: &mut Vec<u8>, body: &Map<String, Value>, first: bool) -> bool {
    write_pairs(buf, body.iter(), first)
}

fn write_pairs<'a>(
    buf: &mut Vec<u8>,
    pairs: impl Iterator<Item = (&'a String, &'a Value)>,
    mut first: bool,
) -> bool {
    // Clients can't forge metadata: theirs goes (dotted keys too, which the engine
    // expands into the same object), ours comes in.
    let forged = |key: &str| key == "_kuzzle_info" || key.starts_with("_kuzzle_info.");
    for (key, value) in pairs.filter(|(k, _)| !forged(k)) {
        if !first {
            buf.push(b',');
        }
        first = false;
        write_json(buf, key);
        buf.push(b':');
        write_json(buf, value);
    }
    first
}

/// Appends one item writing a whole document (`create`, `createOrReplace`, `replace`) to
/// an NDJSON body, with `_kuzzle_info` as Kuzzle 2 writes it for that action
/// (`write_document`).
///
/// `create` is the engine's `create` (it fails when the id exists: no check-then-write
/// race), `createOrReplace` its `index`, and `replace` an `index` guarded by the
/// document's sequence number and primary term as read just before (`Version`): the
/// engine refuses it (409) if the document changed or went meanwhile, so a document
/// deleted between the check and the write is never recreated (Kuzzle checks and
/// writes in two calls, unguarded).
pub fn append_whole(
    buf: &mut Vec<u8>,
    opts: &ItemOptions<'_>,
    kind: WholeKind,
    id: &str,
    body: &Map<String, Value>,
) {
    let action: &[u8] = match kind {
        WholeKind::Create => b"{\"create\":{\"_index\":",
        WholeKind::Index | WholeKind::Replace(_) => b"{\"index\":{\"_index\":",
    };
    buf.extend_from_slice(action);
    write_json(buf, opts.target);
    buf.extend_from_slice(b",\"_id\":");
    write_json(buf, id);
    if let WholeKind::Replace(version) = kind {
        let _ = write!(
            buf,
            ",\"if_seq_no\":{},\"if_primary_term\":{}",
            version.seq_no, version.primary_term
        );
    }
    buf.extend_from_slice(b"}}\n");
    write_document(buf, opts, body, kind);
    buf.push(b'\n');
}

/// The engine action a whole document is written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WholeKind {
    Create,
    Index,
    /// `index` guarded by the version read (`append_whole`).
    Replace(Version),
}

/// A whole document as stored: the client's fields without its metadata, and ours,
/// where Kuzzle 2 puts it (last for a single form, first for an m-form: the position in
/// an engine's parse error reads the same as Kuzzle's).
fn write_document(
    buf: &mut Vec<u8>,
    opts: &ItemOptions<'_>,
    body: &Map<String, Value>,
    kind: WholeKind,
) {
    buf.push(b'{');
    let Some(meta) = opts.metadata else {
        write_fields(buf, body, true);
        buf.push(b'}');
        return;
    };
    let metadata = |buf: &mut Vec<u8>| {
        buf.extend_from_slice(b"\"_kuzzle_info\":{\"author\":");
        write_json(buf, &meta.updater);
        let _ = write!(buf, ",\"createdAt\":{}", meta.updated_at);
        // As Kuzzle's single `createOrReplace` and `replace`; null elsewhere.
        if opts.single && kind != WholeKind::Create {
            let _ = write!(buf, ",\"updatedAt\":{},\"updater\":", meta.updated_at);
            write_json(buf, &meta.updater);
            buf.push(b'}');
        } else {
            buf.extend_from_slice(b",\"updatedAt\":null,\"updater\":null}");
        }
    };
    if opts.single {
        if !write_fields(buf, body, true) {
            buf.push(b',');
        }
        metadata(buf);
    } else {
        metadata(buf);
        write_fields(buf, body, false);
    }
    buf.push(b'}');
}

/// Appends one `delete` item (an action line alone).
pub fn append_delete(buf: &mut Vec<u8>, opts: &ItemOptions<'_>, id: &str) {
    buf.extend_from_slice(b"{\"delete\":{\"_index\":");
    write_json(buf, opts.target);
    buf.extend_from_slice(b",\"_id\":");
    write_json(buf, id);
    buf.extend_from_slice(b"}}\n");
}

/// What a whole-document item writes, as its reply's `_source` carries it: its source
/// line; none for a delete.
pub fn written_document(item: &[u8]) -> Option<&[u8]> {
    let (_, source) = items(item).next()?;
    let line = &item[source?];
    Some(line.strip_suffix(b"\n").unwrap_or(line))
}

/// The items of a body this module wrote: each one's action line and, unless it is a
/// `delete`, its source line, as byte ranges (each with its newline). Read by the
/// structure the body was written with, never by what a line looks like: a client's
/// document may hold any text, `{"doc":` and `"_source":false}` included.
fn items(
    body: &[u8],
) -> impl Iterator<Item = (std::ops::Range<usize>, Option<std::ops::Range<usize>>)> + '_ {
    let line_at = move |start: usize| {
        let end = body[start..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(body.len(), |i| start + i + 1);
        start..end
    };
    let mut next = 0;
    std::iter::from_fn(move || {
        if next >= body.len() {
            return None;
        }
        let action = line_at(next);
        next = action.end;
        if body[action.clone()].starts_with(b"{\"delete\":") || next >= body.len() {
            return Some((action, None));
        }
        let source = line_at(next);
        next = source.end;
        Some((action, Some(source)))
    })
}

/// The same items, written to be sent again after a call whose fate is unknown (it
/// timed out, or its connection broke): the first call may have been applied, so an
/// update's resend must not report `noop` for a change that is there (`detect_noop:
/// false` writes anyway, and so `wait_for` waits for this write), nor a conflict with
/// that first call itself (`retry_on_conflict` at least 1). Other items go as they were
/// (what their answers can mean after a resend is `pipeline::write`'s). Reads bodies
/// this module wrote.
pub fn for_resend(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 8);
    for (action, source) in items(body) {
        let action = &body[action];
        let update = action.starts_with(b"{\"update\":");
        match action.strip_suffix(b",\"retry_on_conflict\":0}}\n") {
            Some(head) if update => {
                out.extend_from_slice(head);
                out.extend_from_slice(b",\"retry_on_conflict\":1}}\n");
            }
            _ => out.extend_from_slice(action),
        }
        let Some(source) = source else { continue };
        let source = &body[source];
        match source.strip_prefix(b"{\"doc\":") {
            Some(doc) if update => {
                out.extend_from_slice(b"{\"detect_noop\":false,\"doc\":");
                out.extend_from_slice(doc);
            }
            _ => out.extend_from_slice(source),
        }
    }
    out
}

/// Makes some of the update items that ask no `_source` ask for it, in place: each
/// chosen item's line's `"_source":false}` becomes `"_source":true }` (the same length,
/// so nothing moves). `count(n)` says how many of the `n` such items to take, `pick(m)`
/// draws an index below `m` (each item is taken at most once). Their indices among the
/// body's items, ascending. Reads bodies this module wrote (`items`): only `update`
/// items are read, each ending as written.
pub fn ask_sources(
    body: &mut [u8],
    count: impl FnOnce(usize) -> usize,
    mut pick: impl FnMut(usize) -> usize,
) -> Vec<usize> {
    const NOT_ASKED: &[u8] = b",\"_source\":false}\n";
    const ASKED: &[u8] = b"true }\n";
    // (item, where its line ends) of every update item that asks none.
    let mut unasked: Vec<(usize, usize)> = items(body)
        .enumerate()
        .filter_map(|(item, (action, source))| {
            let source = source?;
            (body[action].starts_with(b"{\"update\":") && body[source.clone()].ends_with(NOT_ASKED))
                .then_some((item, source.end))
        })
        .collect();
    let n = unasked.len();
    let k = count(n).min(n);
    // The first k of a partial shuffle: k distinct items, each as likely.
    for i in 0..k {
        let j = i + pick(n - i).min(n - i - 1);
        unasked.swap(i, j);
    }
    let mut chosen: Vec<usize> = unasked[..k]
        .iter()
        .map(|&(item, end)| {
            body[end - ASKED.len()..end].copy_from_slice(ASKED);
            item
        })
        .collect();
    chosen.sort_unstable();
    chosen
}

/// Serializing into a Vec can't fail.
fn write_json<T: serde::Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(&mut *buf, value);
}

/// One item of a bulk response.
/// `_shards` and `_source` stay raw JSON: they are only copied into the reply.
///
/// This is where the engines' answers are read, and the one place their differences
/// meet the worker (scripts/conformance.sh runs the matrix): Elasticsearch 7 adds
/// `"_type": "_doc"` to each item (ignored: the reply's `_type` is the Kuzzle
/// collection) and says `[_doc][id]: document missing` where later versions say
/// `[id]: document missing` (a 404 is always "document not found"); a mapping error is
/// `mapper_parsing_exception` on Elasticsearch 7 and OpenSearch, `document_parsing_exception`
/// with a `[line:column] ` prefix on Elasticsearch 8 and 9 (its reason is passed on as
/// the engine wrote it, as SPEC says). Decisions go by the item's status, never by an
/// error's type name, so engines that name the same failure differently are handled
/// alike.
#[derive(Debug, Clone, Deserialize)]
pub struct Item {
    pub status: u16,
    #[serde(rename = "_version")]
    pub version: Option<i64>,
    pub result: Option<String>,
    #[serde(rename = "_shards")]
    pub shards: Option<Box<RawValue>>,
    pub get: Option<Get>,
    pub error: Option<ItemError>,
    /// Answered by a resend: an earlier call carrying this item may have been applied
    /// (set by the coalescer, never read from the engine).
    #[serde(skip)]
    pub resent: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Get {
    #[serde(rename = "_source")]
    pub source: Option<Box<RawValue>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ItemError {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub reason: Option<String>,
}

impl Item {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status) && self.error.is_none()
    }

    /// A busy engine refused this item: it is worth sending again.
    pub fn is_rejected(&self) -> bool {
        matches!(self.status, 429 | 503)
    }

    /// The reason given to the client for a failed item.
    pub fn reason(&self) -> String {
        if self.status == 404 {
            return "document not found".into();
        }
        match &self.error {
            Some(ItemError {
                reason: Some(reason),
                ..
            }) => reason.clone(),
            Some(ItemError { kind, .. }) if !kind.is_empty() => kind.clone(),
            _ => format!("storage engine answered {}", self.status),
        }
    }
}

#[derive(Deserialize)]
struct Response {
    items: Vec<OneAction>,
}

/// One entry of `items`: an object of one key, the item's action (update, create, index,
/// delete); `None` when it has another number of keys. A key given twice counts once, for
/// its last value (as a map would read it). The key is borrowed from the response where
/// it can be: no string is made for it.
struct OneAction(Option<Item>);

impl<'de> Deserialize<'de> for OneAction {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = OneAction;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<OneAction, M::Error> {
                let mut first: Option<ActionName<'de>> = None;
                let (mut item, mut others) = (None, false);
                while let Some(name) = map.next_key::<ActionName<'de>>()? {
                    item = Some(map.next_value::<Item>()?);
                    match &first {
                        None => first = Some(name),
                        Some(first) => others |= first.0 != name.0,
                    }
                }
                Ok(OneAction(item.filter(|_| !others)))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// An item's action name, borrowed when it has no escapes.
struct ActionName<'a>(std::borrow::Cow<'a, str>);

impl<'de> Deserialize<'de> for ActionName<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = ActionName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an action name")
            }
            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(ActionName(name.into()))
            }
            fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
                Ok(ActionName(name.to_owned().into()))
            }
        }
        deserializer.deserialize_str(Visit)
    }
}

/// Reads a bulk response: its items, in the order of the request's actions.
pub fn parse_response(bytes: &[u8], expected: usize) -> Result<Vec<Item>, String> {
    let response: Response =
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable bulk response: {e}"))?;
    if response.items.len() != expected {
        return Err(format!(
            "bulk response has {} items for {expected} actions",
            response.items.len()
        ));
    }
    response
        .items
        .into_iter()
        .map(|OneAction(item)| {
            item.ok_or_else(|| "bulk response item is not one action".to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts(metadata: Option<Metadata<'_>>) -> ItemOptions<'_> {
        ItemOptions {
            target: "&shop.products",
            retry_on_conflict: 3,
            include_source: true,
            reply_source_bytes: usize::MAX,
            metadata,
            single: false,
            ids: crate::pipeline::write::Ids::Random,
            redelivered: false,
            echo_written: false,
        }
    }

    fn lines(buf: &[u8]) -> Vec<Value> {
        buf.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    #[test]
    fn sources_are_asked_of_items_that_asked_none() {
        let mut buf = Vec::new();
        let changes = json!({"n": "\"_source\":false}"});
        let changes = changes.as_object().unwrap();
        for (id, include_source) in [("a", false), ("b", true), ("c", false), ("d", false)] {
            let opts = ItemOptions {
                include_source,
                ..opts(None)
            };
            append_update(&mut buf, &opts, id, changes, None);
        }
        let mut resent = for_resend(&buf);
        let before = resent.len();
        let asked = |body: &[u8]| -> Vec<bool> {
            lines(body)
                .iter()
                .skip(1)
                .step_by(2)
                .map(|doc| doc["_source"].as_bool().unwrap())
                .collect()
        };
        // Three ask none; take one, drawn as the last of them ("d").
        let mut seen = 0;
        let chosen = ask_sources(
            &mut resent,
            |n| {
                seen = n;
                1
            },
            |m| m - 1,
        );
        assert_eq!((seen, chosen), (3, vec![3]));
        assert_eq!(resent.len(), before, "nothing moved");
        assert_eq!(asked(&resent), [false, true, false, true]);
        assert_eq!(
            lines(&resent)[5]["doc"]["n"],
            "\"_source\":false}",
            "a value is left alone"
        );
        // More than there are: each of the two left, once; a pick out of range is held in.
        assert_eq!(ask_sources(&mut resent, |_| 5, |m| m + 7), vec![0, 2]);
        assert_eq!(asked(&resent), [true; 4]);
        assert!(
            ask_sources(&mut resent, |_| 1, |_| 0).is_empty(),
            "every item asks"
        );
        assert!(ask_sources(&mut Vec::new(), |_| 1, |_| 0).is_empty());
    }

    #[test]
    fn an_update_is_an_action_line_and_a_doc_line() {
        let mut buf = Vec::new();
        let body = json!({"price": 10, "_kuzzle_info": {"updater": "forged"}});
        let meta = Metadata {
            updated_at: 1234,
            updater: Some("alice"),
        };
        append_update(
            &mut buf,
            &opts(Some(meta)),
            "p1",
            body.as_object().unwrap(),
            None,
        );
        assert!(buf.ends_with(b"\n"));
        let l = lines(&buf);
        assert_eq!(
            l[0],
            json!({"update": {"_index": "&shop.products", "_id": "p1", "retry_on_conflict": 3}})
        );
        assert_eq!(
            l[1],
            json!({"doc": {"price": 10, "_kuzzle_info": {"updatedAt": 1234, "updater": "alice"}},
                   "_source": true})
        );
    }

    #[test]
    fn client_metadata_is_dropped_even_without_ours() {
        let mut buf = Vec::new();
        let body = json!({"a": 1, "_kuzzle_info": {"author": "x"},
                          "_kuzzle_info.updater": "admin", "_kuzzle_info.": 1});
        append_update(&mut buf, &opts(None), "p1", body.as_object().unwrap(), None);
        assert_eq!(lines(&buf)[1]["doc"], json!({"a": 1}));
    }

    #[test]
    fn empty_and_metadata_only_bodies_stay_valid_json() {
        let meta = Metadata {
            updated_at: 5,
            updater: None,
        };
        let mut buf = Vec::new();
        append_update(
            &mut buf,
            &opts(None),
            "a",
            json!({}).as_object().unwrap(),
            None,
        );
        let only_info = json!({"_kuzzle_info": {"x": 1}});
        append_update(
            &mut buf,
            &opts(Some(meta)),
            "b\"q",
            only_info.as_object().unwrap(),
            None,
        );
        let l = lines(&buf);
        assert_eq!(l[1]["doc"], json!({}));
        assert_eq!(l[2]["update"]["_id"], "b\"q");
        assert_eq!(
            l[3]["doc"],
            json!({"_kuzzle_info": {"updatedAt": 5, "updater": null}})
        );
    }

    #[test]
    fn an_upsert_creates_from_default_and_changes_with_author_metadata() {
        let mut buf = Vec::new();
        let changes = json!({"price": 10, "_kuzzle_info.author": "forged"});
        let default = json!({"price": 0, "stock": 5, "_kuzzle_info": {"author": "forged"}});
        let meta = Metadata {
            updated_at: 7,
            updater: Some("alice"),
        };
        append_update(
            &mut buf,
            &opts(Some(meta)),
            "p1",
            changes.as_object().unwrap(),
            default.as_object(),
        );
        let l = lines(&buf);
        assert_eq!(
            l[1],
            json!({"doc": {"price": 10, "_kuzzle_info": {"updatedAt": 7, "updater": "alice"}},
                   "upsert": {"stock": 5, "price": 10,
                              "_kuzzle_info": {"author": "alice", "createdAt": 7}},
                   "_source": true})
        );
        // Each key once: the engine refuses duplicate keys.
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.matches("\"price\"").count(), 2, "{text}");
        let resend = lines(&for_resend(text.as_bytes()));
        assert_eq!(resend[1]["upsert"]["stock"], 5);
        assert_eq!(resend[1]["detect_noop"], false);
    }

    #[test]
    fn a_resend_neither_detects_noops_nor_fails_on_its_own_first_call() {
        let mut buf = Vec::new();
        let doc = json!({"n": "{\"doc\":1}\n"});
        let zero = ItemOptions {
            retry_on_conflict: 0,
            ..opts(None)
        };
        append_update(&mut buf, &zero, "a", doc.as_object().unwrap(), None);
        append_update(&mut buf, &opts(None), "b", doc.as_object().unwrap(), None);
        // Both ask their `_source`, before and after: none is left that asks none.
        assert!(ask_sources(&mut buf.clone(), |n| n, |_| 0).is_empty());
        assert!(ask_sources(&mut for_resend(&buf), |n| n, |_| 0).is_empty());
        let l = lines(&for_resend(&buf));
        assert_eq!(l.len(), 4);
        assert_eq!(l[0]["update"]["retry_on_conflict"], 1);
        assert_eq!(
            l[2]["update"]["retry_on_conflict"], 3,
            "kept when already >= 1"
        );
        for doc_line in [&l[1], &l[3]] {
            assert_eq!(doc_line["detect_noop"], false);
            assert_eq!(doc_line["doc"], doc);
            assert_eq!(doc_line["_source"], true);
        }
    }

    // Recorded from Elasticsearch 8.19.
    const RECORDED: &str = r#"{"errors":true,"took":1000,"items":[
      {"update":{"_index":"t1","_id":"a","_version":2,"result":"updated","_shards":{"total":2,"successful":1,"failed":0},"_seq_no":1,"_primary_term":1,"get":{"_seq_no":1,"_primary_term":1,"found":true,"_source":{"x":1,"n":"k","y":1}},"status":200}},
      {"update":{"_index":"t1","_id":"b","status":404,"error":{"type":"document_missing_exception","reason":"[b]: document missing","index_uuid":"TVFyVqk-SqCkDFhiIu3Nmg","shard":"0","index":"t1"}}},
      {"update":{"_index":"t1","_id":"a","status":400,"error":{"type":"document_parsing_exception","reason":"[1:6] failed to parse field [x] of type [long] in document with id 'a'. Preview of field's value: 'notanumber'","caused_by":{"type":"illegal_argument_exception","reason":"For input string: \"notanumber\""}}}},
      {"update":{"_index":"t1","_id":"a","_version":2,"result":"noop","_shards":{"total":2,"successful":1,"failed":0},"_seq_no":1,"_primary_term":1,"status":200}},
      {"update":{"_index":"t1","_id":"c","status":429,"error":{"type":"es_rejected_execution_exception","reason":"rejected execution of coordinating operation"}}},
      {"update":{"_index":"t1","_id":"d","status":409,"error":{"type":"version_conflict_engine_exception","reason":"[d]: version conflict, required seqNo [5], primary term [1]. current document has seqNo [6] and primary term [1]"}}}
    ]}"#;

    #[test]
    fn recorded_items_map_to_successes_and_reasons() {
        let items = parse_response(RECORDED.as_bytes(), 6).unwrap();
        assert!(items[0].is_success());
        assert_eq!(items[0].version, Some(2));
        let source = items[0].get.as_ref().unwrap().source.as_ref().unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(source.get()).unwrap(),
            json!({"x":1,"n":"k","y":1})
        );
        assert_eq!(
            (items[1].status, items[1].reason()),
            (404, "document not found".into())
        );
        assert!(
            items[2]
                .reason()
                .starts_with("[1:6] failed to parse field [x]")
        );
        assert!(items[3].is_success());
        assert_eq!(items[3].result.as_deref(), Some("noop"));
        assert!(items[4].is_rejected() && !items[4].is_success());
        assert_eq!(items[5].status, 409);
        assert!(items[5].reason().contains("version conflict"));
    }

    // Recorded from Elasticsearch 7.17.29 (scripts/services.sh, ENGINE=elasticsearch-7; the
    // index name and uuid replaced):
    // each item has `_type`, a missing document's reason names it.
    const RECORDED_ES7: &str = r#"{"errors":true,"took":3,"items":[
      {"update":{"_index":"t1","_type":"_doc","_id":"a","_version":2,"result":"updated","_shards":{"total":2,"successful":1,"failed":0},"_seq_no":1,"_primary_term":1,"get":{"_seq_no":1,"_primary_term":1,"found":true,"_source":{"n":1,"x":"k","y":2}},"status":200}},
      {"update":{"_index":"t1","_type":"_doc","_id":"zz","status":404,"error":{"type":"document_missing_exception","reason":"[_doc][zz]: document missing","index_uuid":"9p1kP0QdR0W3t7yBrk0b1A","shard":"0","index":"t1"}}},
      {"update":{"_index":"t1","_type":"_doc","_id":"a","status":400,"error":{"type":"mapper_parsing_exception","reason":"failed to parse field [n] of type [long] in document with id 'a'. Preview of field's value: 'notanumber'","caused_by":{"type":"illegal_argument_exception","reason":"For input string: \"notanumber\""}}}},
      {"update":{"_index":"t1","_type":"_doc","_id":"a","status":409,"error":{"type":"version_conflict_engine_exception","reason":"[a]: version conflict, required seqNo [0], primary term [1]. current document has seqNo [2] and primary term [1]","index_uuid":"9p1kP0QdR0W3t7yBrk0b1A","shard":"0","index":"t1"}}},
      {"update":{"_index":"t1","_type":"_doc","_id":"new","_version":1,"result":"created","_shards":{"total":2,"successful":1,"failed":0},"_seq_no":3,"_primary_term":1,"get":{"_seq_no":3,"_primary_term":1,"found":true,"_source":{"d":0,"y":1}},"status":201}}
    ]}"#;

    // Recorded from OpenSearch 3.8.0 (the index name and uuid replaced): Elasticsearch 7's
    // mapping error, without `_type`.
    const RECORDED_OPENSEARCH: &str = r#"{"took":4,"errors":true,"items":[
      {"update":{"_index":"t1","_id":"a","_version":2,"result":"updated","_shards":{"total":2,"successful":1,"failed":0},"_seq_no":1,"_primary_term":1,"get":{"_seq_no":1,"_primary_term":1,"found":true,"_source":{"n":1,"x":"k","y":2}},"status":200}},
      {"update":{"_index":"t1","_id":"zz","status":404,"error":{"type":"document_missing_exception","reason":"[zz]: document missing","index":"t1","shard":"0","index_uuid":"JZ0E3qYeQeyH2k2C2HqH0g"}}},
      {"update":{"_index":"t1","_id":"a","status":400,"error":{"type":"mapper_parsing_exception","reason":"failed to parse field [n] of type [long] in document with id 'a'. Preview of field's value: 'notanumber'","caused_by":{"type":"illegal_argument_exception","reason":"For input string: \"notanumber\""}}}},
      {"update":{"_index":"t1","_id":"a","status":409,"error":{"type":"version_conflict_engine_exception","reason":"[a]: version conflict, required seqNo [0], primary term [1]. current document has seqNo [2] and primary term [1]","index":"t1","shard":"0","index_uuid":"JZ0E3qYeQeyH2k2C2HqH0g"}}},
      {"update":{"_index":"t1","_id":"new","_version":1,"result":"created","_shards":{"total":2,"successful":1,"failed":0},"_seq_no":3,"_primary_term":1,"get":{"_seq_no":3,"_primary_term":1,"found":true,"_source":{"d":0,"y":1}},"status":201}}
    ]}"#;

    #[test]
    fn every_engines_items_read_the_same() {
        for (engine, recorded) in [
            ("elasticsearch 7", RECORDED_ES7),
            ("opensearch", RECORDED_OPENSEARCH),
        ] {
            let items = parse_response(recorded.as_bytes(), 5).unwrap();
            assert!(items[0].is_success(), "{engine}");
            assert_eq!(items[0].version, Some(2), "{engine}");
            let source = items[0].get.as_ref().unwrap().source.as_ref().unwrap();
            assert_eq!(
                serde_json::from_str::<Value>(source.get()).unwrap(),
                json!({"n": 1, "x": "k", "y": 2}),
                "{engine}"
            );
            // Elasticsearch 7's "[_doc][zz]" or OpenSearch's "[zz]": the same 404.
            assert_eq!(
                (items[1].status, items[1].reason()),
                (404, "document not found".into()),
                "{engine}"
            );
            // The engine's own reason, without Elasticsearch 8's "[1:6] " prefix.
            assert_eq!(
                (items[2].status, items[2].reason()),
                (
                    400,
                    "failed to parse field [n] of type [long] in document with id 'a'. \
                     Preview of field's value: 'notanumber'"
                        .into()
                ),
                "{engine}"
            );
            assert!(!items[2].is_rejected(), "{engine}");
            assert_eq!(items[3].status, 409, "{engine}");
            assert!(items[3].reason().contains("version conflict"), "{engine}");
            assert!(items[4].is_success(), "{engine}");
            assert_eq!(items[4].result.as_deref(), Some("created"), "{engine}");
        }
    }

    #[test]
    fn a_short_or_garbled_response_is_an_error() {
        assert!(parse_response(RECORDED.as_bytes(), 5).is_err());
        assert!(parse_response(b"<html>", 1).is_err());
        assert!(parse_response(br#"{"items":[{}]}"#, 1).is_err());
        let two = br#"{"items":[{"index":{"status":200},"update":{"status":200}}]}"#;
        assert!(parse_response(two, 1).is_err());
        assert!(parse_response(br#"{"items":[{"delete":{"status":404}}]}"#, 1).is_ok());
        // One action given twice is one action, its last value counting (as a map reads
        // it), its name escaped or not.
        let twice = br#"{"items":[{"index":{"status":500},"ind\u0065x":{"status":201}}]}"#;
        let items = parse_response(twice, 1).unwrap();
        assert_eq!(items[0].status, 201);
        let not_a_map = parse_response(br#"{"items":[null]}"#, 1).unwrap_err();
        assert!(not_a_map.contains("expected a map"), "{not_a_map}");
    }
}
