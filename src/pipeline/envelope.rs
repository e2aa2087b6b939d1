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

/// The two actions the worker executes (SPEC sections 1 and 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `document:mUpdate`: documents `{_id, body}`, which must exist.
    Update,
    /// `document:mUpsert`: documents `{_id, changes, default}`; a missing one is created.
    Upsert,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Update => "mUpdate",
            Action::Upsert => "mUpsert",
        }
    }
}

/// A valid mUpdate or mUpsert request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub action: Action,
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
    /// The entries of `body.documents`, as the client sent them.
    pub documents: Vec<Value>,
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
        own_id: matches!(request_id, Some(Value::String(_))),
        index: object.get("index").cloned(),
        collection: object.get("collection").cloned(),
        controller: object.get("controller").cloned(),
        action: object.get("action").cloned(),
        volatile: object.get("volatile").cloned(),
        refresh: object.get("refresh").cloned(),
        retry_on_conflict: object.get("retryOnConflict").cloned(),
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
    match object.get("controller") {
        Some(Value::String(c)) if c == "document" => {}
        Some(Value::String(c)) => return Err(RequestError::ControllerNotFound(quote(c))),
        Some(other) => return Err(RequestError::ControllerNotFound(quote(&other.to_string()))),
        None => return Err(RequestError::MissingArgument("controller")),
    }
    let action = match object.get("action") {
        Some(Value::String(a)) if a == "mUpdate" => Action::Update,
        Some(Value::String(a)) if a == "mUpsert" => Action::Upsert,
        Some(Value::String(a)) => return Err(RequestError::ActionNotFound(quote(a))),
        Some(other) => return Err(RequestError::ActionNotFound(quote(&other.to_string()))),
        None => return Err(RequestError::MissingArgument("action")),
    };
    let index = name_argument(&object, "index")?;
    let collection = name_argument(&object, "collection")?;
    check_index_name(&index)?;
    check_collection_name(&collection)?;

    let mut body = match object.remove("body") {
        None | Some(Value::Null) => return Err(RequestError::BodyRequired),
        Some(Value::Object(body)) => body,
        Some(_) => {
            return Err(RequestError::InvalidType {
                name: "body",
                expected: "object",
            });
        }
    };
    let documents = match body.remove("documents") {
        None | Some(Value::Null) => return Err(RequestError::MissingArgument("body.documents")),
        Some(Value::Array(documents)) => documents,
        Some(_) => {
            return Err(RequestError::InvalidType {
                name: "body.documents",
                expected: "array",
            });
        }
    };

    if let Some(id) = request_id
        && !id.is_string()
    {
        return Err(RequestError::InvalidType {
            name: "requestId",
            expected: "string",
        });
    }
    if let Some(volatile) = object.get("volatile")
        && !(volatile.is_object() || volatile.is_null())
    {
        return Err(RequestError::InvalidType {
            name: "volatile",
            expected: "object",
        });
    }
    let refresh = match object.get("refresh") {
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
    let retry_on_conflict = match object.get("retryOnConflict") {
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
    let strict = matches!(object.get("strict"), Some(Value::Bool(true)));
    let silent = matches!(object.get("silent"), Some(Value::Bool(true)));
    // As Kuzzle's boolean arguments: a boolean, or (HTTP-style) its string.
    let source = match object.get("source") {
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
        documents,
    })
}

fn retry_out_of_range(limits: &Limits) -> RequestError {
    RequestError::StorageInvalidArgument {
        name: "retryOnConflict",
        expected: format!("an integer from 0 to {}", limits.max_retry_on_conflict),
    }
}

fn name_argument(object: &Map<String, Value>, key: &'static str) -> Result<String, RequestError> {
    match object.get(key) {
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
    pub id: &'a str,
    /// mUpdate's `body`, mUpsert's `changes`: merged into the document.
    pub changes: &'a Map<String, Value>,
    /// mUpsert's `default` (empty when not given): with `changes`, the document created
    /// when it is missing. `None` for mUpdate, which never creates one.
    pub default: Option<&'a Map<String, Value>>,
}

/// The `default` of an mUpsert entry that gives none.
static NO_DEFAULT: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

/// A document entry checked for `action`, or why it can't be written. The content is
/// checked before the `_id`, in Kuzzle's order.
pub fn check_document(entry: &Value, action: Action) -> Result<Checked<'_>, DocumentError> {
    let (changes, default) = match action {
        Action::Update => match entry.get("body") {
            Some(Value::Object(body)) => (body, None),
            _ => return Err(DocumentError::BodyNotObject),
        },
        Action::Upsert => {
            let Some(Value::Object(changes)) = entry.get("changes") else {
                return Err(DocumentError::ChangesNotObject);
            };
            match entry.get("default") {
                None | Some(Value::Null) => (changes, Some(&*NO_DEFAULT)),
                Some(Value::Object(default)) => (changes, Some(default)),
                Some(_) => return Err(DocumentError::DefaultNotObject),
            }
        }
    };
    let id = match entry.get("_id") {
        Some(Value::String(id)) if !id.is_empty() => id,
        _ => return Err(DocumentError::BadId),
    };
    if id.len() > MAX_ID_BYTES {
        return Err(DocumentError::IdTooLong);
    }
    Ok(Checked {
        id,
        changes,
        default,
    })
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
            error_id(with("action", json!("mCreate"))),
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
            "a"
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
            check_document(&v, Action::Upsert)
                .map(|c| (c.id.to_owned(), !c.default.unwrap().is_empty()))
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
