//! Every whole-request error the worker replies with, and its Kuzzle id and status, in
//! one table (SPEC section 4). Per-document failures are not errors of the request:
//! they are outcomes (see `outcome.rs`).

use serde_json::{Value, json};

/// A reason to answer the whole request with an error and `result: null`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("unknown controller \"{0}\"")]
    ControllerNotFound(String),
    #[error("unknown action \"{0}\"")]
    ActionNotFound(String),
    #[error("missing argument \"{0}\"")]
    MissingArgument(&'static str),
    #[error("invalid index name \"{0}\"")]
    InvalidIndexName(String),
    #[error("invalid collection name \"{0}\"")]
    InvalidCollectionName(String),
    #[error("index \"{0}\" is reserved")]
    IndexReserved(String),
    #[error("the request must specify a body")]
    BodyRequired,
    #[error("wrong type for argument \"{name}\" (expected: {expected})")]
    InvalidType {
        name: &'static str,
        expected: &'static str,
    },
    #[error("{0}")]
    StorageInvalidArgument(String),
    #[error("number of documents ({count}) exceeds the limit of {limit}")]
    WriteLimitExceeded { count: usize, limit: usize },
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    BodyTooLarge { size: usize, limit: usize },
    #[error("index \"{0}\" does not exist")]
    UnknownIndex(String),
    #[error("collection \"{collection}\" does not exist in index \"{index}\"")]
    UnknownCollection { index: String, collection: String },
    #[error("the storage engine rejected the request: {0}")]
    StorageRejected(String),
    #[error(
        "the reply ({size} bytes) is larger than the broker accepts ({limit} bytes); the request was processed"
    )]
    ReplyTooLarge { size: usize, limit: usize },
    #[error("Unauthorized: authentication required to execute the action \"{0}\".")]
    Unauthorized(String),
    #[error("Insufficient permissions to execute the action \"{action}\" (User \"{user}\").")]
    Forbidden { action: String, user: String },
}

impl RequestError {
    /// The status and Kuzzle error id of each case.
    pub fn status_and_id(&self) -> (u16, &'static str) {
        use RequestError::*;
        match self {
            InvalidArgument(_) => (400, "api.assert.invalid_argument"),
            ControllerNotFound(_) => (404, "api.process.controller_not_found"),
            ActionNotFound(_) => (404, "api.process.action_not_found"),
            MissingArgument(_) => (400, "api.assert.missing_argument"),
            InvalidIndexName(_) => (400, "services.storage.invalid_index_name"),
            InvalidCollectionName(_) => (400, "services.storage.invalid_collection_name"),
            IndexReserved(_) => (400, "services.storage.index_reserved"),
            BodyRequired => (400, "api.assert.body_required"),
            InvalidType { .. } => (400, "api.assert.invalid_type"),
            StorageInvalidArgument(_) => (400, "services.storage.invalid_argument"),
            WriteLimitExceeded { .. } => (413, "services.storage.write_limit_exceeded"),
            BodyTooLarge { .. } => (413, "api.assert.body_too_large"),
            UnknownIndex(_) => (412, "services.storage.unknown_index"),
            UnknownCollection { .. } => (412, "services.storage.unknown_collection"),
            StorageRejected(_) => (500, "services.storage.unexpected_error"),
            ReplyTooLarge { .. } => (500, "api.process.reply_too_large"),
            Unauthorized(_) => (401, "security.rights.unauthorized"),
            Forbidden { .. } => (403, "security.rights.forbidden"),
        }
    }

    pub fn status(&self) -> u16 {
        self.status_and_id().0
    }

    /// The `error` object of the reply: status, id and message, never a stack trace.
    pub fn to_json(&self) -> Value {
        let (status, id) = self.status_and_id();
        json!({"status": status, "id": id, "message": self.to_string()})
    }
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
