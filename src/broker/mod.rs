//! RabbitMQ over AMQP 0-9-1: the request consumer (`mod.rs`), the topology
//! (`topology.rs`) and confirmed reply publishing (`replies.rs`). Knows nothing of the
//! storage engine.
//!
//! Every call to the broker goes through `Broker::call` (or `bounded` directly before a
//! broker exists): a deadline and the session's stop token on each, so that a silent or
//! frozen broker, or a connection blocked by an alarm, ends a wait instead of holding it.
//!
//! Replies go out on a connection of their own: RabbitMQ blocks a connection that
//! publishes during a memory or disk alarm, reading nothing more from it, and acks and
//! requeues must still reach it then.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::bounded::{Interrupted, bounded};
use crate::config::AmqpSettings;
use crate::pipeline::reply::Destination;

pub mod lapin;
pub mod port;
#[cfg(test)]
mod port_tests;
mod refusing;
mod replies;
pub mod suspects;
mod topology;

pub use self::lapin::node_name;
use port::{BrokerLink, Channel, Connection, Consumer, Delivery, Original, Props, Value};
pub use refusing::Refusing;
pub use replies::Published;

/// The most a broker call (connect, open a channel, declare, consume, cancel, close) may
/// wait for its answer.
pub const CALL: Duration = Duration::from_secs(10);

/// How a call to the broker failed. Every one means the session must start over, except
/// where a caller says otherwise (a refused reply).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Amqp(#[from] port::Error),
    #[error("the broker: {0}")]
    Interrupted(#[from] Interrupted),
}

impl BrokerError {
    /// `port::Error::closed_by_the_broker`, for a call's error.
    pub fn closed_by_the_broker(&self) -> bool {
        matches!(self, BrokerError::Amqp(err) if err.closed_by_the_broker())
    }
}

/// One consuming connection and one publishing connection to a broker node.
pub struct Broker {
    connection: Box<dyn Connection>,
    consume: Box<dyn Channel>,
    replies: replies::Replies,
    /// Where a reply under suspicion of closing the connection it is published on goes.
    quarantine: Quarantine,
    /// Cancelled when the session ends (connection lost, or the shutdown grace over):
    /// every call still waiting gives up.
    stop: CancellationToken,
    /// Consumer tags are this, then `-` and the number of the consumer: each consumer
    /// of the connection gets a tag of its own (a quorum queue fails the connection with
    /// INTERNAL_ERROR when a tag is used again while the deliveries of its cancelled
    /// consumer are still unsettled).
    consumer_tag: String,
    consumers: AtomicU64,
    /// The consuming channel's unsettled deliveries, acked together.
    acks: crate::lifecycle::delivery::Acks,
}

impl Broker {
    /// Connects through `link` to the broker node at `url` (one of `settings.urls()`).
    /// Every call of the broker returned gives up when `stop` is cancelled.
    pub async fn connect(
        link: &Arc<dyn BrokerLink>,
        settings: &AmqpSettings,
        url: &str,
        stop: CancellationToken,
    ) -> Result<Self, BrokerError> {
        let open = |name: &'static str| {
            let stop = &stop;
            async move {
                Ok::<_, BrokerError>(
                    bounded("connect", CALL, stop, link.connect(url, name)).await??,
                )
            }
        };
        let connection = open("mupdate-worker").await?;
        let consume = bounded("open a channel", CALL, &stop, connection.open_channel()).await??;
        let publishing = open("mupdate-worker replies").await?;
        let replies = replies::Replies::new(publishing, settings, stop.clone());
        let quarantine = Quarantine {
            link: link.clone(),
            url: url.to_owned(),
            at_once: tokio::sync::Semaphore::new(QUARANTINED_AT_ONCE),
        };
        let consumer_tag = format!("mupdate-worker-{}", uuid::Uuid::new_v4());
        Ok(Broker {
            connection,
            consume,
            replies,
            quarantine,
            stop,
            consumer_tag,
            consumers: AtomicU64::new(0),
            acks: crate::lifecycle::delivery::Acks::start(),
        })
    }

    /// `call`, bounded by `CALL` and the session's stop.
    async fn call<T>(
        &self,
        what: &'static str,
        call: impl std::future::Future<Output = Result<T, port::Error>>,
    ) -> Result<T, BrokerError> {
        Ok(bounded(what, CALL, &self.stop, call).await??)
    }

    /// The consuming channel's unsettled deliveries.
    pub fn acks(&self) -> &crate::lifecycle::delivery::Acks {
        &self.acks
    }

    /// Whether both connections still stand (a closed channel leaves them up).
    pub fn connected(&self) -> bool {
        self.connection.connected() && self.replies.connected()
    }

    /// Whether the broker blocked the publishing connection (a memory or disk alarm):
    /// replies can't go out until it unblocks it.
    pub fn replies_blocked(&self) -> bool {
        self.replies.blocked()
    }

    /// Consumes `queue` with manual acks and at most `prefetch` unacked deliveries (a
    /// consumer's prefetch is the one set on its channel when it starts).
    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, BrokerError> {
        self.call("set the prefetch", self.consume.qos(prefetch))
            .await?;
        let n = self.consumers.fetch_add(1, Ordering::AcqRel) + 1;
        let tag = format!("{}-{n}", self.consumer_tag);
        self.call("consume", self.consume.consume(queue, &tag))
            .await
    }

    /// Stops the broker from sending more requests to `consumer`, and returns the
    /// deliveries it had already received (they come before the broker's cancel-ok, and
    /// then its stream ends). Unacked ones stay with us.
    pub async fn cancel(&self, mut consumer: Consumer) -> Result<Vec<Delivery>, BrokerError> {
        let cancel = self.consume.cancel(&consumer.tag);
        self.call("cancel the consumer", cancel).await?;
        let mut received = Vec::new();
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_millis(200), consumer.deliveries.next()).await
        {
            received.push(delivery);
        }
        Ok(received)
    }

    /// Publishes a reply on the replies' shared channel and waits for the broker's
    /// confirm (`replies`: how a return is paired with its own publish). An error means
    /// the session is lost.
    pub async fn publish_reply(&self, reply: &Outgoing<'_>) -> Result<Published, BrokerError> {
        self.replies.publish(reply).await
    }

    /// Publishes `reply` on a channel of its own, opened for it: how a refused reply is
    /// tried again. A channel keeps what it learned of a quorum queue's leader, and one
    /// that published while the leader was being elected was seen refusing every later
    /// reply to that queue for 20 s after a new leader was known; a new channel asks anew.
    pub async fn publish_reply_alone(
        &self,
        reply: &Outgoing<'_>,
    ) -> Result<Published, BrokerError> {
        self.replies.publish_alone(reply).await
    }

    /// Publishes a reply under suspicion of closing the connection it goes on (a direct
    /// reply-to address the broker can't decode: `Quarantine`) on a connection opened for
    /// it, at most `QUARANTINED_AT_ONCE` at a time: `Refused` when the broker closed
    /// that connection over it (`Replies::publish_quarantined`). Once its turn comes,
    /// a reply whose address is no longer `suspect` (another reply to it went through
    /// meanwhile) goes on the shared channel after all. No turn within `CALL`, or no
    /// connection: `Unconfirmed` (the request goes back to the queue; the session is not
    /// lost for it).
    pub async fn publish_reply_quarantined(
        &self,
        reply: &Outgoing<'_>,
        suspect: impl Fn() -> bool,
    ) -> Result<Published, BrokerError> {
        let quarantine = &self.quarantine;
        let turn = quarantine.at_once.acquire();
        let Ok(Ok(_turn)) = bounded("a quarantined publish's turn", CALL, &self.stop, turn).await
        else {
            return Ok(Published::Unconfirmed);
        };
        if !suspect() {
            return self.replies.publish(reply).await;
        }
        let connect = quarantine
            .link
            .connect(&quarantine.url, "mupdate-worker quarantine");
        let Ok(connection) = self.call("connect", connect).await else {
            return Ok(Published::Unconfirmed);
        };
        self.replies.publish_quarantined(connection, reply).await
    }

    /// Dead-letters a request by publishing it to `exchange` (with `routing_key`, the
    /// request queue's name, as the broker's own dead-lettering does) with headers saying
    /// why (`x-mupdate-reason`) and whether its update was applied (`x-mupdate-applied`),
    /// confirmed: then the caller acks it. Its properties (`original`) are kept, but for
    /// `user_id`, which RabbitMQ lets a connection publish only as its own user (it
    /// travels in `x-mupdate-user-id`), and `expiration`, which would let it expire there.
    pub async fn dead_letter(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        original: &Original,
        user_id: Option<&str>,
        letter: Letter<'_>,
    ) -> Result<Published, BrokerError> {
        let mut headers = vec![
            (
                REASON_HEADER,
                Value::LongString(letter.reason.as_bytes().into()),
            ),
            (APPLIED_HEADER, Value::Bool(letter.applied)),
        ];
        if let Some(error) = letter.error {
            let error = capped_error(error);
            headers.push((ERROR_HEADER, Value::LongString(error.into_bytes().into())));
        }
        if let Some(user) = user_id {
            headers.push((USER_ID_HEADER, Value::LongString(user.as_bytes().into())));
        }
        let message = replies::Message {
            exchange,
            routing_key,
            mandatory: true,
            body,
            props: Props {
                persistent: true,
                headers,
                carried: Some(original),
                ..Props::default()
            },
        };
        // Alone on a channel: an exchange that doesn't exist closes the channel it is
        // published on, and the replies outstanding on the shared one would go with it.
        self.replies.publish_on_own_channel(message).await
    }

    /// Closes both connections, each call bounded.
    pub async fn close(&self) {
        let _ = self.call("close", self.consume.close("shutdown")).await;
        self.replies.close().await;
        let _ = self.call("close", self.connection.close("shutdown")).await;
    }
}

/// How many replies under suspicion are published at once, each on a connection of its
/// own.
const QUARANTINED_AT_ONCE: usize = 2;

/// What a reply under suspicion is published through: a connection opened for it to the
/// session's broker node.
struct Quarantine {
    link: Arc<dyn BrokerLink>,
    url: String,
    at_once: tokio::sync::Semaphore,
}

/// Why the worker dead-lettered a request: `unroutable`, `refused`, `too_large`,
/// `unconfirmed`, `reply_unauthorized`, `reply_forbidden`.
pub const REASON_HEADER: &str = "x-mupdate-reason";
/// The error that refused the request, as its reply would have carried it (JSON), on a
/// dead letter whose reply was not sent (a reply destination the rights refuse).
pub const ERROR_HEADER: &str = "x-mupdate-error";
/// The request's verified `user_id`, on its reply and on its dead letter.
pub const USER_ID_HEADER: &str = "x-mupdate-user-id";
/// `true` on a dead letter sent without the request's own headers: with them, its
/// properties would not fit one AMQP frame (`frame_max`).
pub const HEADERS_DROPPED_HEADER: &str = "x-mupdate-headers-dropped";

/// Whether a header records a broker's dead-lettering (`x-death`, `x-first-death-*`,
/// `x-last-death-*`). The worker's own dead letters never carry one (`lapin.rs`,
/// `built`), so a dead letter that does was dead-lettered by the broker (a delivery
/// limit, a TTL, a length limit), and whatever `x-mupdate-*` headers it has are a
/// producer's, not the worker's word: `requeue-dead` believes none of them.
pub fn records_dead_lettering(header: &str) -> bool {
    header == "x-death"
        || header.starts_with("x-first-death-")
        || header.starts_with("x-last-death-")
}

/// The longest `ERROR_HEADER`: the error's text may quote a client's names.
pub const ERROR_HEADER_MAX: usize = 512;

/// `error` (an error's JSON) within `ERROR_HEADER_MAX` bytes: kept whole when it fits;
/// else, when it is a JSON object, its `message` cut (on a character boundary, ending in
/// `…`) until it fits, so that it stays JSON; else the text cut.
fn capped_error(error: &str) -> String {
    if error.len() <= ERROR_HEADER_MAX {
        return error.to_owned();
    }
    let Ok(serde_json::Value::Object(object)) = serde_json::from_str(error) else {
        return error[..char_floor(error, ERROR_HEADER_MAX)].to_owned();
    };
    let message = match object.get("message") {
        Some(serde_json::Value::String(message)) => message.clone(),
        _ => String::new(),
    };
    // The whole error with its message cut; else (its other fields quote a client's
    // names too: `props`) its status, id and message alone; else a constant.
    let lean: serde_json::Map<String, serde_json::Value> = object
        .iter()
        .filter(|(k, v)| matches!(k.as_str(), "status" | "id") && v.to_string().len() < 128)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    [object, lean]
        .into_iter()
        .find_map(|object| with_message_cut(object, &message))
        .unwrap_or_else(|| r#"{"message":"…"}"#.to_owned())
}

/// `object` as JSON with its `message` cut (halved, a few rounds at most) until the
/// whole is within `ERROR_HEADER_MAX`, if it ever is.
fn with_message_cut(
    mut object: serde_json::Map<String, serde_json::Value>,
    message: &str,
) -> Option<String> {
    let mut message = message.to_owned();
    loop {
        message.truncate(char_floor(&message, message.len() / 2));
        object.insert(
            "message".to_owned(),
            serde_json::Value::String(format!("{message}…")),
        );
        let json = serde_json::Value::Object(object.clone()).to_string();
        if json.len() <= ERROR_HEADER_MAX {
            return Some(json);
        }
        if message.is_empty() {
            return None;
        }
    }
}

/// The largest character boundary of `text` at or below `at`.
fn char_floor(text: &str, at: usize) -> usize {
    let mut end = at.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// Why a request is dead-lettered, as its dead letter says it.
pub struct Letter<'a> {
    /// `REASON_HEADER`.
    pub reason: &'static str,
    /// `APPLIED_HEADER`.
    pub applied: bool,
    /// `ERROR_HEADER`, when there is one.
    pub error: Option<&'a str>,
}
/// Whether the dead-lettered request's updates were applied (some of its documents
/// updated) before it was dead-lettered: such a request must not be sent again blindly.
pub const APPLIED_HEADER: &str = "x-mupdate-applied";

/// The longest requestId also carried in a reply's `requestId` header.
pub const REQUEST_ID_HEADER_MAX: usize = 4096;

/// A reply ready to publish.
pub struct Outgoing<'a> {
    pub destination: &'a Destination,
    /// Its `correlation_id`: a short string (`reply::reply_key`).
    pub key: &'a str,
    /// The full requestId, also in a `requestId` header up to `REQUEST_ID_HEADER_MAX`.
    pub request_id: &'a str,
    pub status: u16,
    pub body: &'a [u8],
    /// The request's W3C `traceparent`, carried on so the producer's trace continues.
    pub traceparent: Option<&'a str>,
    /// The request's `user_id` (verified by RabbitMQ), in `USER_ID_HEADER`.
    pub user_id: Option<&'a str>,
}

/// The AMQP properties of a reply (SPEC section 5).
pub fn reply_properties<'a>(reply: &Outgoing<'a>) -> Props<'a> {
    let mut headers = Vec::with_capacity(4);
    headers.push(("status", Value::ShortInt(reply.status as i16)));
    // The properties travel in one frame (128 KiB on RabbitMQ, which closes the whole
    // connection over a larger one): a longer id is in the body only.
    if reply.request_id.len() <= REQUEST_ID_HEADER_MAX {
        headers.push((
            "requestId",
            Value::LongString(reply.request_id.as_bytes().into()),
        ));
    }
    if let Some(traceparent) = reply.traceparent {
        headers.push((
            "traceparent",
            Value::LongString(traceparent.as_bytes().into()),
        ));
    }
    if let Some(user) = reply.user_id {
        headers.push((USER_ID_HEADER, Value::LongString(user.as_bytes().into())));
    }
    Props {
        correlation_id: Some(reply.key),
        content_type: Some("application/json"),
        persistent: reply.destination.persistent(),
        headers,
        carried: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_header_is_capped_and_stays_json() {
        let short = r#"{"status":403,"id":"security.rights.forbidden","message":"no"}"#;
        assert_eq!(capped_error(short), short);

        // A message quoting a client's name of control characters (six bytes each in JSON).
        let name = "\u{1}é".repeat(300);
        let long = serde_json::json!({
            "status": 403,
            "id": "security.rights.forbidden",
            "message": format!("replies to queue \"{name}\" are forbidden"),
        })
        .to_string();
        assert!(long.len() > 2 * ERROR_HEADER_MAX);
        let capped = capped_error(&long);
        assert!(capped.len() <= ERROR_HEADER_MAX, "{}", capped.len());
        let error: serde_json::Value = serde_json::from_str(&capped).unwrap();
        assert_eq!(error["status"], 403);
        assert_eq!(error["id"], "security.rights.forbidden");
        let message = error["message"].as_str().unwrap();
        assert!(message.starts_with("replies to queue \""), "{message}");
        assert!(message.ends_with('…'), "{message}");

        // Its other fields over the cap too (a reply destination of 255 quotes, six
        // bytes each when escaped): its status, id and message alone, still JSON.
        let quotes = "\u{1}".repeat(255);
        let wide = serde_json::json!({
            "status": 403,
            "id": "security.rights.forbidden",
            "message": format!("replies to \"{quotes}\" are forbidden"),
            "props": [quotes, "u".repeat(200)],
        })
        .to_string();
        let capped = capped_error(&wide);
        assert!(capped.len() <= ERROR_HEADER_MAX, "{}", capped.len());
        let error: serde_json::Value = serde_json::from_str(&capped).unwrap();
        assert_eq!(error["status"], 403);
        assert_eq!(error["id"], "security.rights.forbidden");
        assert!(error.get("props").is_none());
        assert!(error["message"].as_str().unwrap().ends_with('…'));

        // Not JSON: cut on a character boundary.
        let text = "é".repeat(ERROR_HEADER_MAX);
        let capped = capped_error(&text);
        assert!(capped.len() <= ERROR_HEADER_MAX && capped.len() >= ERROR_HEADER_MAX - 1);
        assert!(text.starts_with(&capped));
    }
}
