//! A request/reply client over direct reply-to: what `mupdate-worker send` uses, and
//! what an RPC-over-AMQP caller does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::AmqpSettings;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;

use crate::pipeline::envelope::Action;
use crate::pipeline::reply::DIRECT_REPLY_TO;
use crate::security::tls::AmqpTls;

pub mod loader;
pub mod send;
pub mod send_file;

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("the broker refused the request")]
    Refused,
    #[error("{0}")]
    Input(String),
}

pub struct Client {
    _connection: Connection,
    channel: Channel,
    waiting: Waiting,
    /// Published as the AMQP `user_id`: the identity the worker's rights check.
    user_id: Option<String>,
    /// Routes replies to their waiters; aborted on drop, which closes the connection.
    dispatcher: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

impl Client {
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::connect_with(url, &AmqpTls::default()).await
    }

    /// `connect` presenting and trusting `tls` (an `amqps://` URL's TLS settings).
    pub async fn connect_with(url: &str, tls: &AmqpTls) -> Result<Self, ClientError> {
        let connection =
            crate::security::tls::connect(url, tls, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut replies = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "mupdate-client".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let waiting: Waiting = Arc::default();
        let dispatch = waiting.clone();
        let dispatcher = tokio::spawn(async move {
            while let Some(Ok(delivery)) = replies.next().await {
                let id = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.to_string());
                let sender = id.and_then(|id| dispatch.lock().expect("poisoned").remove(&id));
                if let Some(sender) = sender {
                    let _ = sender.send(delivery.data);
                }
            }
        });
        Ok(Client {
            _connection: connection,
            channel,
            waiting,
            user_id: None,
            dispatcher,
        })
    }

    /// Connects to the first broker node of `settings.urls()` that answers (with the
    /// TLS files of `settings`), and publishes as the user it logs in as.
    pub async fn connect_any(settings: &AmqpSettings) -> Result<Self, ClientError> {
        let tls = AmqpTls::load(settings).map_err(|e| ClientError::Input(e.to_string()))?;
        let mut last = None;
        for url in settings.urls() {
            match Self::connect_with(url, &tls).await {
                Ok(client) => {
                    return Ok(client.with_user_id(crate::security::tls::login_user(settings, url)));
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Input("amqp.url names no broker".into())))
    }

    /// Sets the AMQP `user_id` of every request: it must be the connection's user
    /// (RabbitMQ refuses any other), and it is what the worker's rights check.
    pub fn with_user_id(mut self, user: Option<String>) -> Self {
        self.user_id = user.filter(|u| !u.is_empty());
        self
    }

    /// Publishes one envelope to `queue` and waits for its reply.
    pub async fn request(
        &self,
        queue: &str,
        body: &[u8],
        correlation_id: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .expect("poisoned")
            .insert(correlation_id.to_owned(), tx);
        let mut properties = BasicProperties::default()
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(correlation_id.into())
            .with_content_type("application/json".into());
        if let Some(user) = &self.user_id {
            properties = properties.with_user_id(user.as_str().into());
        }
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?
            .await?;
        if confirm.is_nack() {
            self.waiting
                .lock()
                .expect("poisoned")
                .remove(correlation_id);
            return Err(ClientError::Refused);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            _ => {
                self.waiting
                    .lock()
                    .expect("poisoned")
                    .remove(correlation_id);
                Err(ClientError::Timeout(timeout))
            }
        }
    }
}

/// The correlation id to wait on: the reply carries the envelope's `requestId` when it
/// has one, else the request's own correlation id.
pub fn correlation_id(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("requestId")?.as_str().map(str::to_owned))
        // A correlation_id is an AMQP short string: a longer requestId gets a UUID (the
        // worker answers it by the request's own correlation_id, `reply::reply_key`).
        .filter(|id| id.len() <= crate::pipeline::reply::SHORT_STRING_MAX)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Reads documents given as one JSON array or as NDJSON, one document a line.
pub fn read_documents(text: &str) -> Result<Vec<Value>, ClientError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        return serde_json::from_str(trimmed)
            .map_err(|e| ClientError::Input(format!("documents: {e}")));
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line)
                .map_err(|e| ClientError::Input(format!("documents line {}: {e}", n + 1)))
        })
        .collect()
}

/// The key of an m-form's body that lists its entries: `ids` for `mDelete`, else
/// `documents`.
pub fn listed_key(action: &str) -> &'static str {
    match Action::from_name(action) {
        Some((Action::Delete, _)) => "ids",
        _ => "documents",
    }
}

/// The id an `mDelete` entry stands for: a JSON string is the id, an object gives its
/// `_id`; any other value is sent as it is (the worker answers it, as Kuzzle does,
/// "document _id must be a string").
pub fn delete_id(entry: &Value) -> Result<Value, String> {
    match entry {
        Value::Object(object) => object
            .get("_id")
            .cloned()
            .ok_or_else(|| "an id to delete is a JSON string or an object with an _id".into()),
        other => Ok(other.clone()),
    }
}

/// The envelope of an m-form `action` (`mDelete`: `documents` are its ids) around
/// `documents`, as they are.
pub fn envelope(
    action: &str,
    index: &str,
    collection: &str,
    documents: Vec<Value>,
    refresh: Option<&str>,
    retry_on_conflict: Option<u32>,
) -> Value {
    let mut envelope = json!({
        "controller": "document", "action": action,
        "index": index, "collection": collection,
        "body": {listed_key(action): documents}});
    if let Some(refresh) = refresh {
        envelope["refresh"] = refresh.into();
    }
    if let Some(retries) = retry_on_conflict {
        envelope["retryOnConflict"] = retries.into();
    }
    envelope
}

/// What `send` builds a request from.
pub struct Target<'a> {
    pub action: &'a str,
    pub index: &'a str,
    pub collection: &'a str,
    pub refresh: Option<&'a str>,
    pub retry_on_conflict: Option<u32>,
}

/// The envelope of any action of `Action::names()`, from entries in the shape of its
/// m-form (`{_id, body}`, `{_id, changes, default}`; for a delete, an id or `{_id}`).
/// An m-form lists them (`body.documents`, or `body.ids` for `mDelete`); a single form
/// takes exactly one, as Kuzzle's does: its `_id` beside the body (`id`, when given,
/// stands for it), the rest as `body` (`{changes, default}` for `upsert`; none for
/// `delete`).
pub fn request(
    target: &Target,
    mut documents: Vec<Value>,
    id: Option<&str>,
) -> Result<Value, ClientError> {
    let input = |m: String| ClientError::Input(m);
    let Some((action, single)) = Action::from_name(target.action) else {
        return Err(input(format!("unknown action {:?}", target.action)));
    };
    if !single {
        if id.is_some() {
            return Err(input("--id is for a single-document action".into()));
        }
        if action == Action::Delete {
            documents = documents
                .iter()
                .enumerate()
                .map(|(n, entry)| delete_id(entry).map_err(|e| input(format!("id {}: {e}", n + 1))))
                .collect::<Result<_, _>>()?;
        }
        return Ok(envelope(
            target.action,
            target.index,
            target.collection,
            documents,
            target.refresh,
            target.retry_on_conflict,
        ));
    }
    let mut entry = match (documents.len(), id, action) {
        (0, Some(_), Action::Delete) => Value::Object(Map::new()),
        (1, ..) => documents.pop().unwrap_or_default(),
        (count, ..) => {
            return Err(input(format!(
                "{} takes one document, not {count}",
                target.action
            )));
        }
    };
    if action == Action::Delete && !entry.is_object() {
        entry = json!({ "_id": entry });
    }
    let Value::Object(mut entry) = entry else {
        return Err(input(format!(
            "the document of {} is an object",
            target.action
        )));
    };
    let mut envelope = envelope(
        target.action,
        target.index,
        target.collection,
        Vec::new(),
        target.refresh,
        target.retry_on_conflict,
    );
    envelope.as_object_mut().map(|e| e.remove("body"));
    if let Some(id) = id {
        entry.insert("_id".into(), id.into());
    }
    if let Some(id) = entry.remove("_id") {
        envelope["_id"] = id;
    }
    let body = match action {
        Action::Delete => None,
        Action::Upsert => {
            let mut body = Map::new();
            for key in ["changes", "default"] {
                if let Some(part) = entry.remove(key) {
                    body.insert(key.into(), part);
                }
            }
            Some(Value::Object(body))
        }
        _ => entry.remove("body"),
    };
    if let Some(body) = body {
        envelope["body"] = body;
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_as_ndjson_or_array() {
        let nd = "{\"_id\":\"a\",\"body\":{}}\n\n{\"_id\":\"b\",\"body\":{}}\n";
        assert_eq!(read_documents(nd).unwrap().len(), 2);
        assert_eq!(read_documents("[{\"_id\":\"a\"}]").unwrap().len(), 1);
        let err = read_documents("{}\n{nope").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    fn target(action: &str) -> Target<'_> {
        Target {
            action,
            index: "i",
            collection: "c",
            refresh: None,
            retry_on_conflict: None,
        }
    }

    #[test]
    fn every_action_is_built_as_kuzzle_takes_it() {
        let doc = json!({"_id": "a", "body": {"n": 1}});
        let made = request(&target("mCreate"), vec![doc.clone()], None).unwrap();
        assert_eq!(made["body"], json!({"documents": [doc]}));
        let ids = vec![json!("a"), json!({"_id": "b"}), json!(5)];
        let made = request(&target("mDelete"), ids, None).unwrap();
        assert_eq!(made["body"], json!({"ids": ["a", "b", 5]}));
        let err = request(&target("mDelete"), vec![json!({"x": 1})], None).unwrap_err();
        assert!(err.to_string().contains("id 1"), "{err}");

        let made = request(&target("replace"), vec![doc.clone()], None).unwrap();
        assert_eq!(
            (&made["_id"], &made["body"]),
            (&json!("a"), &json!({"n": 1}))
        );
        assert_eq!(made["action"], "replace");
        let upsert = json!({"_id": "a", "changes": {"n": 2}, "default": {"d": 1}});
        let made = request(&target("upsert"), vec![upsert], None).unwrap();
        assert_eq!(
            made["body"],
            json!({"changes": {"n": 2}, "default": {"d": 1}})
        );
        let made = request(&target("create"), vec![json!({"body": {}})], None).unwrap();
        assert_eq!((made.get("_id"), &made["body"]), (None, &json!({})));
        let made = request(&target("delete"), vec![], Some("z")).unwrap();
        assert_eq!((&made["_id"], made.get("body")), (&json!("z"), None));
        let made = request(&target("delete"), vec![json!("y")], None).unwrap();
        assert_eq!(made["_id"], "y");
        let made = request(&target("update"), vec![doc.clone()], Some("b")).unwrap();
        assert_eq!(made["_id"], "b");

        let two = vec![doc.clone(), doc.clone()];
        assert!(request(&target("update"), two, None).is_err());
        assert!(request(&target("mUpdate"), vec![doc.clone()], Some("a")).is_err());
        assert!(request(&target("mFrobnicate"), vec![doc], None).is_err());
    }
}
