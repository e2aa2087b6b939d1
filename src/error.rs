//! Every whole-request error the worker replies with, and its Kuzzle id and status, in
//! one table (SPEC section 4). Per-document failures are not errors of the request:
//! they are outcomes (see `outcome.rs`).

use serde_json::{Value, json};

/// A reason to answer the whole request with an error and `result: null`. Where Kuzzle
/// has the same error, the message is Kuzzle's (its `lib/kerror/codes/`), and the reply
/// carries Kuzzle's numeric `code` and the message's arguments as `props`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("Invalid argument \"{name}\". Expected: {expected}")]
    InvalidArgument {
        name: &'static str,
        expected: String,
    },
    #[error("API controller \"{0}\" not found.")]
    ControllerNotFound(String),
    #[error("API action \"document\":\"{0}\" not found")]
    ActionNotFound(String),
    #[error("Missing argument \"{0}\".")]
    MissingArgument(&'static str),
    #[error("The index name \"{0}\" is invalid")]
    InvalidIndexName(String),
    #[error("The collection name \"{0}\" is invalid")]
    InvalidCollectionName(String),
    #[error("The index \"{0}\" is reserved for Kuzzle's internal use.")]
    IndexReserved(String),
    #[error("The request must specify a body.")]
    BodyRequired,
    #[error("Wrong type for argument \"{name}\" (expected: {expected})")]
    InvalidType {
        name: &'static str,
        expected: &'static str,
    },
    #[error("Argument \"{name}\" is invalid (expected: {expected})")]
    StorageInvalidArgument {
        name: &'static str,
        expected: String,
    },
    #[error("The number of documents edited by this request exceeds the configured server limit.")]
    WriteLimitExceeded { count: usize, limit: usize },
    #[error("The message ({size} bytes) exceeds the limit of {limit} bytes.")]
    BodyTooLarge { size: usize, limit: usize },
    #[error("The index \"{0}\" does not exist.")]
    UnknownIndex(String),
    #[error("The collection \"{index}\":\"{collection}\" does not exist.")]
    UnknownCollection { index: String, collection: String },
    #[error("{0}")]
    StorageRejected(String),
    #[error(
        "The reply ({size} bytes) is larger than the broker accepts ({limit} bytes); the request was processed."
    )]
    ReplyTooLarge { size: usize, limit: usize },
    #[error("Unauthorized: authentication required to execute the action \"{0}\".")]
    Unauthorized(String),
    #[error("Insufficient permissions to execute the action \"{action}\" (User \"{user}\").")]
    Forbidden { action: String, user: String },
    /// A reply destination (`reply_to`, or the reply exchange) asked without a user.
    #[error("Unauthorized: authentication required to have a reply sent to the {0}.")]
    ReplyUnauthorized(String),
    /// A single-document form's document is missing.
    #[error("Document \"{id}\" not found in \"{index}\":\"{collection}\".")]
    DocumentNotFound {
        id: String,
        index: String,
        collection: String,
    },
    /// A single-document form's document kept changing under it (a version conflict
    /// past its retries).
    #[error(
        "Unable to modify document \"{0}\": cluster sync failed (too many simultaneous changes applied)"
    )]
    TooManyChanges(String),
    /// A single-document `create` of an id that exists.
    #[error("Document already exists.")]
    DocumentAlreadyExists,
    /// A single-document form's document refused by the engine (a mapping clash, a
    /// version conflict…): its status and reason as a failed entry of an m-form has them.
    #[error("{reason}")]
    DocumentRefused { status: u16, reason: String },
    /// A reply destination the user's rules don't allow.
    #[error(
        "Insufficient permissions to have a reply sent to the {destination} (User \"{user}\")."
    )]
    ReplyForbidden { destination: String, user: String },
}

/// Kuzzle's numeric code of an error id: domain, subdomain and error, a byte each
/// (`0x01010001` is `services.storage.unknown_index`). `None` for the worker's own ids.
pub fn kuzzle_code(id: &str) -> Option<u32> {
    let (domain, subdomain, error) = match id {
        "services.storage.unknown_index" => (1, 1, 1),
        "services.storage.unknown_collection" => (1, 1, 2),
        "services.storage.write_limit_exceeded" => (1, 1, 4),
        "services.storage.invalid_argument" => (1, 1, 19),
        "services.storage.not_found" => (1, 1, 11),
        "services.storage.document_already_exists" => (1, 1, 17),
        "services.storage.too_many_operations" => (1, 1, 25),
        "services.storage.too_many_changes" => (1, 1, 32),
        "services.storage.unexpected_bad_request" => (1, 1, 33),
        "services.storage.unexpected_error" => (1, 1, 35),
        "services.storage.invalid_index_name" => (1, 1, 41),
        "services.storage.invalid_collection_name" => (1, 1, 42),
        "services.storage.incomplete_update" => (1, 1, 46),
        "api.assert.invalid_type" => (2, 1, 1),
        "api.assert.invalid_argument" => (2, 1, 2),
        "api.assert.missing_argument" => (2, 1, 3),
        "api.assert.body_required" => (2, 1, 8),
        "api.process.controller_not_found" => (2, 2, 4),
        "api.process.action_not_found" => (2, 2, 5),
        "api.process.incomplete_multiple_request" => (2, 2, 10),
        "security.rights.unauthorized" => (7, 3, 1),
        "security.rights.forbidden" => (7, 3, 2),
        _ => return None,
    };
    Some((domain << 24) | (subdomain << 16) | error)
}

impl RequestError {
    /// The status and Kuzzle error id of each case.
    pub fn status_and_id(&self) -> (u16, &'static str) {
        use RequestError::*;
        match self {
            InvalidArgument { .. } => (400, "api.assert.invalid_argument"),
            ControllerNotFound(_) => (404, "api.process.controller_not_found"),
            ActionNotFound(_) => (404, "api.process.action_not_found"),
            MissingArgument(_) => (400, "api.assert.missing_argument"),
            InvalidIndexName(_) => (400, "services.storage.invalid_index_name"),
            InvalidCollectionName(_) => (400, "services.storage.invalid_collection_name"),
            IndexReserved(_) => (400, "services.storage.index_reserved"),
            BodyRequired => (400, "api.assert.body_required"),
            InvalidType { .. } => (400, "api.assert.invalid_type"),
            StorageInvalidArgument { .. } => (400, "services.storage.invalid_argument"),
            WriteLimitExceeded { .. } => (413, "services.storage.write_limit_exceeded"),
            BodyTooLarge { .. } => (413, "api.assert.body_too_large"),
            UnknownIndex(_) => (412, "services.storage.unknown_index"),
            UnknownCollection { .. } => (412, "services.storage.unknown_collection"),
            StorageRejected(_) => (500, "services.storage.unexpected_error"),
            ReplyTooLarge { .. } => (500, "api.process.reply_too_large"),
            Unauthorized(_) => (401, "security.rights.unauthorized"),
            Forbidden { .. } => (403, "security.rights.forbidden"),
            ReplyUnauthorized(_) => (401, "security.rights.unauthorized"),
            ReplyForbidden { .. } => (403, "security.rights.forbidden"),
            DocumentNotFound { .. } => (404, "services.storage.not_found"),
            DocumentAlreadyExists => (400, "services.storage.document_already_exists"),
            TooManyChanges(_) => (409, "services.storage.too_many_changes"),
            DocumentRefused { status, .. } => match status {
                429 => (503, "services.storage.too_many_operations"),
                400..=499 => (400, "services.storage.unexpected_bad_request"),
                _ => (500, "services.storage.unexpected_error"),
            },
        }
    }

    pub fn status(&self) -> u16 {
        self.status_and_id().0
    }

    /// The arguments of the message, as Kuzzle lists them in `props`.
    fn props(&self) -> Vec<String> {
        use RequestError::*;
        match self {
            InvalidArgument { name, expected } => vec![(*name).into(), expected.clone()],
            ControllerNotFound(c) => vec![c.clone()],
            ActionNotFound(a) => vec!["document".into(), a.clone()],
            MissingArgument(name) => vec![(*name).into()],
            InvalidIndexName(n) | InvalidCollectionName(n) | IndexReserved(n) => vec![n.clone()],
            InvalidType { name, expected } => vec![(*name).into(), (*expected).into()],
            StorageInvalidArgument { name, expected } => vec![(*name).into(), expected.clone()],
            UnknownIndex(index) => vec![index.clone()],
            UnknownCollection { index, collection } => vec![index.clone(), collection.clone()],
            StorageRejected(reason) => vec![reason.clone()],
            Unauthorized(action) => vec![action.clone()],
            Forbidden { action, user } => vec![action.clone(), user.clone()],
            ReplyUnauthorized(destination) => vec![destination.clone()],
            ReplyForbidden { destination, user } => vec![destination.clone(), user.clone()],
            DocumentNotFound {
                id,
                index,
                collection,
            } => vec![id.clone(), index.clone(), collection.clone()],
            DocumentRefused { reason, .. } => vec![reason.clone()],
            TooManyChanges(id) => vec![id.clone()],
            DocumentAlreadyExists
            | BodyRequired
            | WriteLimitExceeded { .. }
            | BodyTooLarge { .. }
            | ReplyTooLarge { .. } => vec![],
        }
    }

    /// The `error` object of the reply: status, id, message, and Kuzzle's `code` and
    /// `props` where Kuzzle has this error; never a stack trace.
    pub fn to_json(&self) -> Value {
        let (status, id) = self.status_and_id();
        let mut error = json!({"status": status, "id": id, "message": self.to_string()});
        if let Some(code) = kuzzle_code(id) {
            error["code"] = json!(code);
        }
        if error.get("code").is_some() {
            // Kuzzle's errors always carry their props, empty or not.
            error["props"] = json!(self.props());
        }
        error
    }
}

/// What a caller is told when the engine refused the worker itself rather than the
/// request: its own engine account (401, 403, 407, a `security_exception`, which name the
/// worker's engine user and roles), or something in front of the engine (a proxy's error
/// page, its version). The details go to the worker's log only.
pub const ENGINE_REFUSED_WORKER: &str =
    "the storage engine refused the worker's call; the worker's log says why";

/// The status a caller is given with `ENGINE_REFUSED_WORKER`: the service can't do this
/// now, through no fault of the request.
pub const ENGINE_REFUSED_WORKER_STATUS: u16 = 503;

/// What a caller is told when the engine (or a proxy) refused a call as too large.
pub const ENGINE_TOO_LARGE: &str = "the request is larger than the storage engine accepts";

/// Whether an engine error, by its status and its `type`, is about the worker's own
/// engine account rather than the request: never shown to callers.
pub fn engine_refused_worker(status: u16, kind: &str) -> bool {
    matches!(status, 401 | 403 | 407) || kind == "security_exception"
}

/// Quotes at most this much of a client-supplied value in a message.
const QUOTE_MAX: usize = 64;

/// Shortens a client-supplied name for an error message, on a character boundary.
pub fn quote(name: &str) -> String {
    if name.len() <= QUOTE_MAX {
        return name.to_owned();
    }
    let mut end = QUOTE_MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kuzzles_codes_messages_and_props() {
        assert_eq!(
            kuzzle_code("services.storage.unknown_index"),
            Some(0x0101_0001)
        );
        assert_eq!(
            kuzzle_code("api.process.incomplete_multiple_request"),
            Some(0x0202_000a)
        );
        assert_eq!(kuzzle_code("api.assert.body_too_large"), None);
        let err = RequestError::UnknownCollection {
            index: "shop".into(),
            collection: "nope".into(),
        };
        assert_eq!(
            err.to_json(),
            json!({"status": 412, "id": "services.storage.unknown_collection",
                   "message": "The collection \"shop\":\"nope\" does not exist.",
                   "code": 0x0101_0002, "props": ["shop", "nope"]})
        );
        let err = RequestError::InvalidType {
            name: "retryOnConflict",
            expected: "integer",
        };
        assert_eq!(
            err.to_string(),
            "Wrong type for argument \"retryOnConflict\" (expected: integer)"
        );
        assert_eq!(RequestError::BodyRequired.to_json()["props"], json!([]));
        let worker_only = RequestError::BodyTooLarge { size: 2, limit: 1 }.to_json();
        assert!(worker_only.get("props").is_none() && worker_only.get("code").is_none());
    }
}
