//! The request envelope (SPEC section 1): parsing and whole-request validation
//! (section 4), and the per-document checks of section 3. Pure functions.

use serde_json::{Map, Value};

use crate::config::{Limits, StorageSettings};
use crate::error::{RequestError, quote};

/// The AMQP properties the worker reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub message_id: Option<String>,
    pub user_id: Option<String>,
    /// A W3C `traceparent` header, only when well formed (`trace_context`).
    pub traceparent: Option<String>,
}

/// A W3C trace context `traceparent` (`00-<32 hex trace id>-<16 hex parent id>-<2 hex
/// flags>`), or `None`: anything else a producer sends is not carried on.
pub fn trace_context(header: &str) -> Option<&str> {
    let parts: Vec<&str> = header.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    let well_formed = parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1] != "0".repeat(32)
        && hex(parts[2], 16)
        && parts[2] != "0".repeat(16)
        && hex(parts[3], 2);
    well_formed.then_some(header)
}

/// `refresh` as the bulk call takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    No,
    WaitFor,
}

/// What a response echoes of its request, whatever became of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Echo {
    pub request_id: String,
    /// Whether `request_id` is the envelope's own `requestId` (not taken from the AMQP
    /// properties, nor generated): part of what identifies a request again.
    pub own_id: bool,
    pub index: Option<Value>,
    pub collection: Option<Value>,
    pub controller: Option<Value>,
    pub action: Option<Value>,
    pub volatile: Option<Value>,
    pub refresh: Option<Value>,
    pub retry_on_conflict: Option<Value>,
}

/// The write a request asks of each of its documents (SPEC sections 1 and 8; issue 21:
/// the whole write side of Kuzzle's document controller). Each has a single-document
/// form (`update`) and a multi-document one (`mUpdate`): `Request::single` says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `document:mUpdate`: documents `{_id, body}`, which must exist; `body` is merged.
    Update,
    /// `document:mUpsert`: documents `{_id, changes, default}`; a missing one is created.
    Upsert,
    /// `document:mCreate`: documents `{_id?, body}`, which must not exist; an id is
    /// generated when absent.
    Create,
    /// `document:mCreateOrReplace`: documents `{_id?, body}`, written whole.
    CreateOrReplace,
    /// `document:mReplace`: documents `{_id, body}`, which must exist; written whole.
    Replace,
    /// `document:mDelete`: `ids`.
    Delete,
}

/// Every action the worker takes, by its Kuzzle name: (name, action, single form).
const ACTIONS: [(&str, Action, bool); 12] = [
    ("mUpdate", Action::Update, false),
    ("mUpsert", Action::Upsert, false),
    ("mCreate", Action::Create, false),
    ("mCreateOrReplace", Action::CreateOrReplace, false),
    ("mReplace", Action::Replace, false),
    ("mDelete", Action::Delete, false),
    ("update", Action::Update, true),
    ("upsert", Action::Upsert, true),
    ("create", Action::Create, true),
    ("createOrReplace", Action::CreateOrReplace, true),
    ("replace", Action::Replace, true),
    ("delete", Action::Delete, true),
];

impl Action {
    /// The Kuzzle name of the action, in its multi-document form or its single one.
    pub fn name(self, single: bool) -> &'static str {
        ACTIONS
            .iter()
            .find(|(_, a, s)| *a == self && *s == single)
            .map_or("mUpdate", |(name, _, _)| name)
    }

    /// The action and form a Kuzzle action name stands for.
    pub fn from_name(name: &str) -> Option<(Action, bool)> {
        ACTIONS
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, a, s)| (*a, *s))
    }

    /// What the action does to a document, as summaries and v1's 206 say it.
    pub fn participle(self) -> &'static str {
        match self {
            Action::Update | Action::Upsert => "updated",
            Action::Create => "created",
            Action::CreateOrReplace => "written",
            Action::Replace => "replaced",
            Action::Delete => "deleted",
        }
    }

    /// Every Kuzzle action name the worker takes.
    pub fn names() -> impl Iterator<Item = &'static str> {
        ACTIONS.iter().map(|(name, _, _)| *name)
    }

    /// Whether an entry may leave its id to the worker (as Kuzzle: the engine's
    /// generated ids there).
    pub fn generates_ids(self) -> bool {
        matches!(self, Action::Create | Action::CreateOrReplace)
    }

    /// The writes whose item is an engine `update` (the stored document is read and
    /// rebuilt): what the cost gate weighs by the stored documents' size.
    pub fn rebuilds_stored(self) -> bool {
        matches!(self, Action::Update | Action::Upsert)
    }
}

/// A valid request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub action: Action,
    /// The single-document form (`update`, not `mUpdate`): its one document is in
    /// `documents`, and it answers with that document's result or the request's error.
    pub single: bool,
    pub index: String,
    pub collection: String,
    pub refresh: Refresh,
    pub retry_on_conflict: u32,
    /// Kuzzle 2's `strict`: any failed document fails the request (format v2).
    pub strict: bool,
    /// Kuzzle's `silent`: no realtime notification, so no `_updatedFields` (format v2).
    pub silent: bool,
    /// Kuzzle 2's `source`: `Some(false)` asks no `_source` of the engine and puts none in
    /// the reply; `None` leaves it to `response.include_source`.
    pub source: Option<bool>,
    /// The request's size in bytes: what its reply's extras (`_updatedFields`) are
    /// budgeted from.
    pub bytes: usize,
    /// The entries of `body.documents`, as the client sent them; for `mDelete`, each of
    /// `body.ids` as `{"_id": id}`; for a single-document form, its one document made
    /// from `_id` and `body` as the m-form's entry would be (`{_id, body}`,
    /// `{_id, changes, default}`, `{_id}`).
    pub documents: Vec<Value>,
}

impl Request {
    /// The Kuzzle name of the request's action.
    pub fn action_name(&self) -> &'static str {
        self.action.name(self.single)
    }
}

/// An envelope read as far as it goes: the echo is always there.
#[derive(Debug)]
pub struct Parsed {
    pub echo: Echo,
    pub request: Result<Request, RequestError>,
}

/// Parses and validates one delivery's body.
pub fn parse(
    body: &[u8],
    props: &Properties,
    limits: &Limits,
    defaults: &StorageSettings,
) -> Parsed {
    let fallback_id = || {
        props
            .correlation_id
            .clone()
            .or_else(|| props.message_id.clone())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
    };
    let fail = |echo: Echo, err| Parsed {
        echo,
        request: Err(err),
    };

    if body.len() > limits.max_message_bytes {
        let echo = Echo {
            request_id: fallback_id(),
            own_id: false,
            ..Echo::default()
        };
        let err = RequestError::BodyTooLarge {
            size: body.len(),
            limit: limits.max_message_bytes,
        };
        return fail(echo, err);
    }
    let mut object = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            let echo = Echo {
                request_id: fallback_id(),
                own_id: false,
                ..Echo::default()
            };
            let err = RequestError::InvalidArgument {
                name: "body",
                expected: "a JSON object".into(),
            };
            return fail(echo, err);
        }
        Err(e) => {
            let echo = Echo {
                request_id: fallback_id(),
                own_id: false,
                ..Echo::default()
            };
            let err = RequestError::InvalidArgument {
                name: "body",
                expected: format!("a JSON object ({e})"),
            };
            return fail(echo, err);
        }
    };

    let request_id = object.remove("requestId");
    let echo = Echo {
        request_id: match &request_id {
            Some(Value::String(id)) => id.clone(),
            _ => fallback_id(),
        },
        // An empty id identifies nothing (ids made from it would be every such request's).
        own_id: matches!(&request_id, Some(Value::String(id)) if !id.is_empty()),
        index: field(&object, "index").cloned(),
        collection: field(&object, "collection").cloned(),
        controller: field(&object, "controller").cloned(),
        action: field(&object, "action").cloned(),
        volatile: field(&object, "volatile").cloned(),
        refresh: field(&object, "refresh").cloned(),
        retry_on_conflict: field(&object, "retryOnConflict").cloned(),
    };
    let request = validate(object, request_id.as_ref(), limits, defaults).map(|request| Request {
        bytes: body.len(),
        ..request
    });
    Parsed { echo, request }
}

fn validate(
    mut object: Map<String, Value>,
    request_id: Option<&Value>,
    limits: &Limits,
    defaults: &StorageSettings,
) -> Result<Request, RequestError> {
    match field(&object, "controller") {
        Some(Value::String(c)) if c == "document" => {}
        Some(Value::String(c)) => return Err(RequestError::ControllerNotFound(quote(c))),
        Some(other) => return Err(RequestError::ControllerNotFound(quote(&other.to_string()))),
        None => return Err(RequestError::MissingArgument("controller")),
    }
    let (action, single) = match field(&object, "action") {
        Some(Value::String(a)) => match Action::from_name(a) {
            Some(found) => found,
            None => return Err(RequestError::ActionNotFound(quote(a))),
        },
        Some(other) => return Err(RequestError::ActionNotFound(quote(&other.to_string()))),
        None => return Err(RequestError::MissingArgument("action")),
    };
    let index = name_argument(&object, "index")?;
    let collection = name_argument(&object, "collection")?;
    check_index_name(&index)?;
    check_collection_name(&collection)?;

    let documents = if single {
        single_document(&mut object, action)?
    } else {
        listed_documents(&mut object, action)?
    };
    if let Some(id) = request_id
        && !id.is_string()
    {
        return Err(RequestError::InvalidType {
            name: "requestId",
            expected: "string",
        });
    }
    if let Some(volatile) = field(&object, "volatile")
        && !(volatile.is_object() || volatile.is_null())
    {
        return Err(RequestError::InvalidType {
            name: "volatile",
            expected: "object",
        });
    }
    let refresh = match field(&object, "refresh") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Refresh::No,
        Some(Value::String(s)) if s == "false" => Refresh::No,
        Some(Value::String(s)) if s == "wait_for" => Refresh::WaitFor,
        Some(Value::String(_)) => {
            return Err(RequestError::StorageInvalidArgument {
                name: "refresh",
                expected: "\"wait_for\", false".into(),
            });
        }
        Some(_) => {
            return Err(RequestError::InvalidType {
                name: "refresh",
                expected: "string",
            });
        }
    };
    let retry_on_conflict = match field(&object, "retryOnConflict") {
        None | Some(Value::Null) => defaults.default_retry_on_conflict,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) if n <= u64::from(limits.max_retry_on_conflict) => n as u32,
            _ if n.is_i64() || n.is_u64() => return Err(retry_out_of_range(limits)),
            _ => {
                return Err(RequestError::InvalidType {
                    name: "retryOnConflict",
                    expected: "integer",
                });
            }
        },
        // As Kuzzle, whose HTTP arguments are strings: a string that is a whole number.
        Some(Value::String(text)) => match text.parse::<u64>() {
            Ok(n) if n <= u64::from(limits.max_retry_on_conflict) => n as u32,
            Ok(_) => return Err(retry_out_of_range(limits)),
            Err(_) => {
                return Err(RequestError::InvalidType {
                    name: "retryOnConflict",
                    expected: "integer",
                });
            }
        },
        Some(_) => {
            return Err(RequestError::InvalidType {
                name: "retryOnConflict",
                expected: "integer",
            });
        }
    };
    let strict = matches!(field(&object, "strict"), Some(Value::Bool(true)));
    let silent = matches!(field(&object, "silent"), Some(Value::Bool(true)));
    // As Kuzzle's boolean arguments: a boolean, or (HTTP-style) its string.
    let source = match field(&object, "source") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::String(s)) if s == "true" || s == "false" => Some(s == "true"),
        Some(_) => {
            return Err(RequestError::InvalidType {
                name: "source",
                expected: "boolean",
            });
        }
    };

    if documents.len() > limits.documents_write_count {
        return Err(RequestError::WriteLimitExceeded {
            count: documents.len(),
            limit: limits.documents_write_count,
        });
    }
    Ok(Request {
        action,
        index,
        collection,
        refresh,
        retry_on_conflict,
        strict,
        silent,
        source,
        bytes: 0,
        single,
        documents,
    })
}

/// The body of a request, when it has one that is an object.
fn body_object(object: &mut Map<String, Value>) -> Result<Map<String, Value>, RequestError> {
    match object.remove("body") {
        None | Some(Value::Null) => Err(RequestError::BodyRequired),
        Some(Value::Object(body)) => Ok(body),
        Some(_) => Err(RequestError::InvalidType {
            name: "body",
            expected: "object",
        }),
    }
}

/// The entries of an m-form: `body.documents`, or `body.ids` for `mDelete` (each id as
/// the entry `{"_id": id}`, so that every action's documents read alike).
fn listed_documents(
    object: &mut Map<String, Value>,
    action: Action,
) -> Result<Vec<Value>, RequestError> {
    let mut body = body_object(object)?;
    let (key, name) = match action {
        Action::Delete => ("ids", "body.ids"),
        _ => ("documents", "body.documents"),
    };
    let listed = match body.remove(key) {
        None | Some(Value::Null) => return Err(RequestError::MissingArgument(name)),
        Some(Value::Array(listed)) => listed,
        Some(_) => {
            return Err(RequestError::InvalidType {
                name,
                expected: "array",
            });
        }
    };
    if action == Action::Delete {
        return Ok(listed
            .into_iter()
            .map(|id| Value::Object(Map::from_iter([("_id".to_owned(), id)])))
            .collect());
    }
    // An entry's `_source` (a mistake for `body`) is read past, as Kuzzle's API reads
    // it: such an entry has no `body`, a per-document 400.
    Ok(listed)
}

/// The one document of a single-document form, as its m-form's entry: `_id` from the
/// request (optional for `create`), the content from `body`.
fn single_document(
    object: &mut Map<String, Value>,
    action: Action,
) -> Result<Vec<Value>, RequestError> {
    let id = match object.remove("_id") {
        None | Some(Value::Null) if action == Action::Create => None,
        None | Some(Value::Null) => return Err(RequestError::MissingArgument("_id")),
        Some(Value::String(id)) if id.is_empty() && action != Action::Create => {
            return Err(RequestError::MissingArgument("_id"));
        }
        Some(Value::String(id)) if id.is_empty() => None,
        Some(Value::String(id)) => Some(id),
        Some(_) => {
            return Err(RequestError::InvalidType {
                name: "_id",
                expected: "string",
            });
        }
    };
    let mut entry = Map::new();
    if let Some(id) = id {
        entry.insert("_id".to_owned(), Value::String(id));
    }
    match action {
        Action::Delete => {}
        Action::Upsert => {
            let mut body = body_object(object)?;
            match body.remove("changes") {
                Some(Value::Object(changes)) => {
                    entry.insert("changes".to_owned(), Value::Object(changes));
                }
                None | Some(Value::Null) => {
                    return Err(RequestError::MissingArgument("body.changes"));
                }
                Some(_) => {
                    return Err(RequestError::InvalidType {
                        name: "body.changes",
                        expected: "object",
                    });
                }
            }
            match body.remove("default") {
                None | Some(Value::Null) => {}
                Some(Value::Object(default)) => {
                    entry.insert("default".to_owned(), Value::Object(default));
                }
                Some(_) => {
                    return Err(RequestError::InvalidType {
                        name: "body.default",
                        expected: "object",
                    });
                }
            }
        }
        _ => {
            entry.insert("body".to_owned(), Value::Object(body_object(object)?));
        }
    }
    Ok(vec![Value::Object(entry)])
}

fn retry_out_of_range(limits: &Limits) -> RequestError {
    RequestError::StorageInvalidArgument {
        name: "retryOnConflict",
        expected: format!("an integer from 0 to {}", limits.max_retry_on_conflict),
    }
}

/// `object[key]`, found by comparing keys while they are few: a request's objects hold a
/// handful, and hashing the key (serde_json's map hashes each with a keyed SipHash) costs
/// more than comparing them. Keys are unique in a map: the first match is the one. A
/// larger object is looked up by hash, so that no object costs more than its keys.
fn field<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    if object.len() <= FEW_KEYS {
        object.iter().find_map(|(k, v)| (k == key).then_some(v))
    } else {
        object.get(key)
    }
}

/// Up to this many keys, `field` compares them rather than hash the one looked up.
const FEW_KEYS: usize = 16;

fn name_argument(object: &Map<String, Value>, key: &'static str) -> Result<String, RequestError> {
    match field(object, key) {
        None | Some(Value::Null) => Err(RequestError::MissingArgument(key)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(RequestError::InvalidType {
            name: key,
            expected: "string",
        }),
    }
}

/// Elasticsearch's index-name rules plus Kuzzle's: the name must stand in a physical
/// index name unchanged and never widen to other indexes (`*`, `,`, `_all`…).
fn is_valid_name(name: &str) -> bool {
    // `{` and `}` too: a name must never read as a placeholder of the template.
    const FORBIDDEN: &[char] = &[
        '*', ',', '/', '\\', '?', '"', '<', '>', '|', '#', ':', ' ', '{', '}',
    ];
    !name.is_empty()
        && name.len() <= 126
        && name != "."
        && name != ".."
        && !name.starts_with(['_', '-', '+'])
        && !name
            .chars()
            .any(|c| c.is_uppercase() || c.is_control() || FORBIDDEN.contains(&c))
}

fn check_index_name(index: &str) -> Result<(), RequestError> {
    if index.starts_with('%') {
        return Err(RequestError::IndexReserved(quote(index)));
    }
    // A dot in the index would make `&{index}.{collection}` ambiguous: (a.b, c) and
    // (a, b.c) would share one physical index.
    if !is_valid_name(index) || index.contains('.') {
        return Err(RequestError::InvalidIndexName(quote(index)));
    }
    Ok(())
}

fn check_collection_name(collection: &str) -> Result<(), RequestError> {
    if !is_valid_name(collection) {
        return Err(RequestError::InvalidCollectionName(quote(collection)));
    }
    Ok(())
}

/// Longest `_id` Elasticsearch accepts; a longer one fails the whole bulk call.
const MAX_ID_BYTES: usize = 512;

/// Why one document of a valid request is refused before reaching the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentError {
    BadId,
    IdTooLong,
    BodyNotObject,
    ChangesNotObject,
    DefaultNotObject,
}

impl DocumentError {
    pub fn reason(self) -> &'static str {
        match self {
            DocumentError::BadId => "document _id must be a string",
            DocumentError::IdTooLong => "document _id must be at most 512 bytes",
            DocumentError::BodyNotObject => "document body must be an object",
            DocumentError::ChangesNotObject => "document changes must be an object",
            DocumentError::DefaultNotObject => "document default must be an object",
        }
    }
}

/// A document entry ready to write.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Checked<'a> {
    /// `None` for a `create` or `createOrReplace` entry without one: the worker makes
    /// it (`pipeline::write`).
    pub id: Option<&'a str>,
    pub content: Content<'a>,
}

/// What an entry writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Content<'a> {
    /// mUpdate's `body`, mUpsert's `changes`: merged into the document; with
    /// `default` (mUpsert's, empty when not given), the document created when it is
    /// missing. `None` for mUpdate, which never creates one.
    Merge {
        changes: &'a Map<String, Value>,
        default: Option<&'a Map<String, Value>>,
    },
    /// create, createOrReplace, replace: the whole document.
    Whole(&'a Map<String, Value>),
    /// delete.
    Nothing,
}

/// The `default` of an mUpsert entry that gives none.
static NO_DEFAULT: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

/// A document entry checked for `action`, or why it can't be written. The content is
/// checked before the `_id`, in Kuzzle's order.
pub fn check_document(entry: &Value, action: Action) -> Result<Checked<'_>, DocumentError> {
    let get = |key| entry.as_object().and_then(|entry| field(entry, key));
    let content = match action {
        Action::Update => match get("body") {
            Some(Value::Object(body)) => Content::Merge {
                changes: body,
                default: None,
            },
            _ => return Err(DocumentError::BodyNotObject),
        },
        Action::Upsert => {
            let Some(Value::Object(changes)) = get("changes") else {
                return Err(DocumentError::ChangesNotObject);
            };
            let default = match get("default") {
                None | Some(Value::Null) => &*NO_DEFAULT,
                Some(Value::Object(default)) => default,
                Some(_) => return Err(DocumentError::DefaultNotObject),
            };
            Content::Merge {
                changes,
                default: Some(default),
            }
        }
        Action::Create | Action::CreateOrReplace | Action::Replace => match get("body") {
            Some(Value::Object(body)) => Content::Whole(body),
            _ => return Err(DocumentError::BodyNotObject),
        },
        Action::Delete => Content::Nothing,
    };
    let id = match get("_id") {
        Some(Value::String(id)) if !id.is_empty() => Some(id.as_str()),
        // As Kuzzle: no id (or an empty one) is an id to generate where the action makes
        // documents without one.
        None | Some(Value::Null) if action.generates_ids() => None,
        Some(Value::String(_)) if action.generates_ids() => None,
        _ => return Err(DocumentError::BadId),
    };
    if id.is_some_and(|id| id.len() > MAX_ID_BYTES) {
        return Err(DocumentError::IdTooLong);
    }
    Ok(Checked { id, content })
}

/// The physical index of a Kuzzle index and collection.
pub fn target_index(template: &str, index: &str, collection: &str) -> String {
    // One pass over the template: a value put in is never read again as a placeholder.
    let mut out = String::with_capacity(template.len() + index.len() + collection.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        rest = &rest[open..];
        if let Some(after) = rest.strip_prefix("{index}") {
            out.push_str(index);
            rest = after;
        } else if let Some(after) = rest.strip_prefix("{collection}") {
            out.push_str(collection);
            rest = after;
        } else {
            out.push('{');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use serde_json::json;

    fn run(body: Value) -> Parsed {
        run_bytes(&serde_json::to_vec(&body).unwrap())
    }

    fn run_bytes(bytes: &[u8]) -> Parsed {
        let s = Settings::defaults();
        parse(bytes, &Properties::default(), &s.limits, &s.storage)
    }

    fn valid() -> Value {
        json!({"index": "shop", "collection": "products", "controller": "document",
               "action": "mUpdate", "body": {"documents": [{"_id": "p1", "body": {"a": 1}}]}})
    }

    fn error_id(body: Value) -> &'static str {
        run(body).request.unwrap_err().status_and_id().1
    }

    fn with(key: &str, value: Value) -> Value {
        let mut v = valid();
        v[key] = value;
        v
    }

    #[test]
    fn a_valid_envelope_parses() {
        let p = run(with("refresh", json!("wait_for")));
        let r = p.request.unwrap();
        assert_eq!(
            (r.index.as_str(), r.collection.as_str()),
            ("shop", "products")
        );
        assert_eq!(r.refresh, Refresh::WaitFor);
        assert_eq!(r.retry_on_conflict, 0);
        assert_eq!(r.documents.len(), 1);
    }

    #[test]
    fn fields_are_found_among_few_keys_and_among_many() {
        let few = run(with("refresh", json!("wait_for"))).request.unwrap();
        let mut many = with("refresh", json!("wait_for"));
        for n in 0..FEW_KEYS {
            many[format!("extra{n}")] = json!(n);
        }
        assert!(many.as_object().unwrap().len() > FEW_KEYS);
        let many = run(many).request.unwrap();
        assert_eq!(
            (
                many.index.as_str(),
                many.collection.as_str(),
                many.refresh,
                many.documents.len()
            ),
            (
                few.index.as_str(),
                few.collection.as_str(),
                few.refresh,
                few.documents.len()
            )
        );
        assert_eq!(few.refresh, Refresh::WaitFor);
    }

    #[test]
    fn the_source_argument_is_a_boolean_or_its_string() {
        assert_eq!(run(valid()).request.unwrap().source, None);
        for (value, expected) in [
            (json!(false), Some(false)),
            (json!("false"), Some(false)),
            (json!(true), Some(true)),
            (json!("true"), Some(true)),
            (Value::Null, None),
        ] {
            let r = run(with("source", value.clone())).request.unwrap();
            assert_eq!(r.source, expected, "{value}");
        }
        assert_eq!(
            error_id(with("source", json!(0))),
            "api.assert.invalid_type"
        );
        assert_eq!(
            error_id(with("source", json!("no"))),
            "api.assert.invalid_type"
        );
        let bytes = serde_json::to_vec(&valid()).unwrap();
        assert_eq!(run_bytes(&bytes).request.unwrap().bytes, bytes.len());
    }

    #[test]
    fn request_id_comes_from_envelope_then_properties_then_uuid() {
        let s = Settings::defaults();
        let props = Properties {
            correlation_id: Some("c".into()),
            message_id: Some("m".into()),
            ..Properties::default()
        };
        let body = serde_json::to_vec(&with("requestId", json!("r"))).unwrap();
        assert_eq!(
            parse(&body, &props, &s.limits, &s.storage).echo.request_id,
            "r"
        );
        let body = serde_json::to_vec(&valid()).unwrap();
        assert_eq!(
            parse(&body, &props, &s.limits, &s.storage).echo.request_id,
            "c"
        );
        let props = Properties {
            message_id: Some("m".into()),
            ..Properties::default()
        };
        assert_eq!(
            parse(&body, &props, &s.limits, &s.storage).echo.request_id,
            "m"
        );
        let generated = run(valid()).echo.request_id;
        assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    }

    #[test]
    fn not_json_and_not_object_are_invalid_arguments() {
        assert_eq!(
            run_bytes(b"{nope").request.unwrap_err().status_and_id().1,
            "api.assert.invalid_argument"
        );
        assert_eq!(error_id(json!([1, 2])), "api.assert.invalid_argument");
        assert_eq!(run_bytes(&[0xff, 0xfe]).request.unwrap_err().status(), 400);
    }

    #[test]
    fn every_whole_request_row_has_its_id() {
        assert_eq!(
            error_id(with("controller", json!("auth"))),
            "api.process.controller_not_found"
        );
        assert_eq!(
            error_id(with("action", json!("mSearch"))),
            "api.process.action_not_found"
        );
        let mut v = valid();
        v.as_object_mut().unwrap().remove("index");
        assert_eq!(error_id(v), "api.assert.missing_argument");
        let mut v = valid();
        v.as_object_mut().unwrap().remove("collection");
        assert_eq!(error_id(v), "api.assert.missing_argument");
        for bad in [
            "", "ShOp", "*", "a,b", "../x", "_all", "-a", "+a", "a b", "a:b", "a.b", "a#b",
        ] {
            assert_eq!(
                error_id(with("index", json!(bad))),
                "services.storage.invalid_index_name",
                "{bad}"
            );
        }
        assert_eq!(
            error_id(with("index", json!("x".repeat(127)))),
            "services.storage.invalid_index_name"
        );
        assert_eq!(
            error_id(with("collection", json!("A"))),
            "services.storage.invalid_collection_name"
        );
        assert_eq!(
            error_id(with("collection", json!(".."))),
            "services.storage.invalid_collection_name"
        );
        assert_eq!(
            error_id(with("index", json!("%kuzzle"))),
            "services.storage.index_reserved"
        );
        let mut v = valid();
        v.as_object_mut().unwrap().remove("body");
        assert_eq!(error_id(v), "api.assert.body_required");
        assert_eq!(
            error_id(with("body", json!({}))),
            "api.assert.missing_argument"
        );
        assert_eq!(
            error_id(with("body", json!({"documents": {}}))),
            "api.assert.invalid_type"
        );
        assert_eq!(
            error_id(with("requestId", json!(42))),
            "api.assert.invalid_type"
        );
        assert_eq!(
            error_id(with("refresh", json!("true"))),
            "services.storage.invalid_argument"
        );
        assert_eq!(
            error_id(with("retryOnConflict", json!(101))),
            "services.storage.invalid_argument"
        );
        assert_eq!(
            error_id(with("retryOnConflict", json!(-1))),
            "services.storage.invalid_argument"
        );
        // A wrong type is Kuzzle's invalid_type; a wrong value of the right type,
        // invalid_argument.
        assert_eq!(
            error_id(with("retryOnConflict", json!("3abc"))),
            "api.assert.invalid_type"
        );
        assert_eq!(
            run(with("retryOnConflict", json!("3")))
                .request
                .unwrap()
                .retry_on_conflict,
            3
        );
        assert_eq!(
            error_id(with("retryOnConflict", json!(1.5))),
            "api.assert.invalid_type"
        );
        assert_eq!(
            error_id(with("refresh", json!(3))),
            "api.assert.invalid_type"
        );
        let docs: Vec<Value> = (0..201)
            .map(|i| json!({"_id": i.to_string(), "body": {}}))
            .collect();
        assert_eq!(
            error_id(with("body", json!({"documents": docs}))),
            "services.storage.write_limit_exceeded"
        );
    }

    #[test]
    fn oversized_messages_are_refused_before_parsing() {
        let s = Settings::defaults();
        let mut limits = s.limits.clone();
        limits.max_message_bytes = 10;
        let p = parse(
            b"{\"index\": \"aaaaaaaaaaaaaaaa\"}",
            &Properties::default(),
            &limits,
            &s.storage,
        );
        assert_eq!(
            p.request.unwrap_err().status_and_id(),
            (413, "api.assert.body_too_large")
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        assert_eq!(
            run_bytes(deep.as_bytes()).request.unwrap_err().status(),
            400
        );
    }

    #[test]
    fn document_checks() {
        assert_eq!(
            check_document(&json!({"_id": "a", "body": {}}), Action::Update)
                .unwrap()
                .id,
            Some("a")
        );
        assert_eq!(
            check_document(&json!({"body": {}}), Action::Update),
            Err(DocumentError::BadId)
        );
        assert_eq!(
            check_document(&json!({"_id": "", "body": {}}), Action::Update),
            Err(DocumentError::BadId)
        );
        assert_eq!(
            check_document(&json!({"_id": 3, "body": {}}), Action::Update),
            Err(DocumentError::BadId)
        );
        assert_eq!(
            check_document(&json!("x"), Action::Update),
            Err(DocumentError::BodyNotObject),
            "the content is checked first, as Kuzzle does"
        );
        assert_eq!(
            check_document(&json!({"_id": "a", "body": [1]}), Action::Update),
            Err(DocumentError::BodyNotObject)
        );
        assert_eq!(
            check_document(&json!({"_id": "a"}), Action::Update),
            Err(DocumentError::BodyNotObject)
        );
        let long = "x".repeat(513);
        assert_eq!(
            check_document(&json!({"_id": long, "body": {}}), Action::Update),
            Err(DocumentError::IdTooLong)
        );
    }

    #[test]
    fn only_well_formed_trace_contexts_are_carried() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_context(good), Some(good));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nx",
        ] {
            assert_eq!(trace_context(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn upsert_document_checks() {
        let check = |v: Value| {
            check_document(&v, Action::Upsert).map(|c| match c.content {
                Content::Merge {
                    default: Some(default),
                    ..
                } => (c.id.unwrap().to_owned(), !default.is_empty()),
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(
            check(json!({"_id": "a", "changes": {}})),
            Ok(("a".into(), false))
        );
        assert_eq!(
            check(json!({"_id": "a", "changes": {}, "default": null})),
            Ok(("a".into(), false))
        );
        assert_eq!(
            check(json!({"_id": "a", "changes": {}, "default": {"x": 1}})),
            Ok(("a".into(), true))
        );
        assert_eq!(
            check(json!({"_id": "a", "body": {}})),
            Err(DocumentError::ChangesNotObject)
        );
        assert_eq!(
            check(json!({"_id": "a", "changes": 1})),
            Err(DocumentError::ChangesNotObject)
        );
        assert_eq!(
            check(json!({"_id": "a", "changes": {}, "default": [1]})),
            Err(DocumentError::DefaultNotObject)
        );
        assert_eq!(check(json!({"changes": {}})), Err(DocumentError::BadId));
    }

    #[test]
    fn mupsert_is_an_action() {
        let request = run(with("action", json!("mUpsert"))).request.unwrap();
        assert_eq!(request.action, Action::Upsert);
        assert_eq!(run(valid()).request.unwrap().action, Action::Update);
    }

    #[test]
    fn target_index_follows_the_template() {
        assert_eq!(
            target_index("&{index}.{collection}", "shop", "products"),
            "&shop.products"
        );
        // A value is never expanded again, whatever it holds.
        assert_eq!(
            target_index("&{index}.{collection}", "{collection}", "orders"),
            "&{collection}.orders"
        );
        assert_eq!(target_index("{index}", "a{index}", "c"), "a{index}");
        assert_eq!(target_index("x{y}{index}{", "i", "c"), "x{y}i{");
    }

    #[test]
    fn braces_make_invalid_names() {
        for name in ["{collection}", "{index}", "a{index}", "x}", "{"] {
            assert_eq!(
                error_id(with("index", json!(name))),
                "services.storage.invalid_index_name",
                "{name}"
            );
            assert_eq!(
                error_id(with("collection", json!(name))),
                "services.storage.invalid_collection_name",
                "{name}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_on_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = run_bytes(&bytes);
        }

        #[test]
        fn parse_never_panics_on_json(index in ".*", collection in ".*", n in 0u64..300, refresh in ".*") {
            let v = json!({"index": index, "collection": collection, "controller": "document",
                           "action": "mUpdate", "retryOnConflict": n, "refresh": refresh,
                           "body": {"documents": [{"_id": index, "body": {"x": collection}}]}});
            let _ = run(v);
        }
    }
}
