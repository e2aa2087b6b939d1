//! RabbitMQ over AMQP 0-9-1: topology, the request consumer and confirmed reply
//! publishing. Knows nothing of the storage engine.
//!
//! Replies go out on a channel of their own, so that a reply the broker refuses by
//! closing that channel (over its `max_message_size`, or an address it won't take)
//! costs a new publishing channel, never the consuming channel and its deliveries.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Confirmation;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

use crate::config::{AmqpSettings, QueueType};
use crate::envelope::Properties;
use crate::reply::Destination;
use crate::security::tls::AmqpTls;

/// What the broker said of a published reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Routed and confirmed: the request can be acked.
    Confirmed,
    /// Confirmed but routed nowhere (no such queue or binding).
    Unroutable,
    /// The broker refused it: nacked, or closed the channel over it.
    Refused,
    /// Larger than the broker accepts (its `max_message_size`, learned when it closed
    /// the channel over a larger one).
    TooLarge { limit: usize },
}

/// One connection with a consuming channel and a confirming publishing channel.
pub struct Broker {
    connection: Connection,
    consume: Channel,
    /// Replaced when the broker closes it; the number counts replacements.
    publish: tokio::sync::Mutex<(u64, Channel)>,
    /// The broker's message size limit, once it has told us (by refusing a reply).
    max_reply: AtomicUsize,
    /// Consumer tags are this, then `-` and the number of the consumer: each consumer
    /// of the connection gets a tag of its own (a quorum queue fails the connection with
    /// INTERNAL_ERROR when a tag is used again while the deliveries of its cancelled
    /// consumer are still unsettled).
    consumer_tag: String,
    consumers: AtomicU64,
    /// The consuming channel's unsettled deliveries, acked together.
    acks: crate::delivery::Acks,
}

impl Broker {
    /// Connects to the broker node at `url` (one of `settings.urls()`), with the TLS
    /// files of `settings` read again (a renewed certificate is used from then on).
    pub async fn connect(settings: &AmqpSettings, url: &str) -> Result<Self, lapin::Error> {
        let tls = AmqpTls::load(settings).map_err(|e| std::io::Error::other(e.to_string()))?;
        let connection = crate::security::tls::connect(
            url,
            &tls,
            ConnectionProperties::default().with_connection_name("mupdate-worker".into()),
        )
        .await?;
        let consume = connection.create_channel().await?;
        let publish = confirming_channel(&connection).await?;
        let consumer_tag = format!("mupdate-worker-{}", uuid::Uuid::new_v4());
        Ok(Broker {
            connection,
            consume,
            publish: tokio::sync::Mutex::new((0, publish)),
            max_reply: AtomicUsize::new(usize::MAX),
            consumer_tag,
            consumers: AtomicU64::new(0),
            acks: crate::delivery::Acks::start(),
        })
    }

    /// The consuming channel's unsettled deliveries.
    pub fn acks(&self) -> &crate::delivery::Acks {
        &self.acks
    }

    /// Whether the connection still stands (a closed channel leaves it up).
    pub fn connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Declares the topology, all durable: the dead-letter exchange and queue when
    /// configured, the request queue and the default reply queue. With
    /// `queue_type = "quorum"` all three queues are quorum queues, replicated over a
    /// cluster: a classic queue lives on the node it was declared on and is gone with it.
    /// A dead-letter or reply queue that already exists with other arguments (say, a
    /// classic one from before) is kept as it is, and one that exists but can't be reached
    /// (a classic queue whose node is down) is reported, not a reason to stop consuming.
    pub async fn declare(&self, settings: &AmqpSettings) -> Result<(), lapin::Error> {
        let ch = &self.consume;
        let mut request_args = queue_args(settings.queue_type);
        let dlx = settings.dead_letter_exchange.as_str();
        if !dlx.is_empty() {
            ch.exchange_declare(
                dlx.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
            let dlq = settings.dead_letter_queue.as_str();
            if self.declare_secondary(dlq, settings.queue_type).await? {
                ch.queue_bind(
                    dlq.into(),
                    dlx.into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
            request_args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(dlx.into()),
            );
        }
        if settings.queue_type == QueueType::Quorum && settings.delivery_limit > 0 {
            let limit = i64::from(settings.delivery_limit);
            request_args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
        }
        ch.queue_declare(
            settings.request_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            request_args,
        )
        .await?;
        self.declare_secondary(&settings.reply_queue, settings.queue_type)
            .await?;
        Ok(())
    }

    /// Declares `queue` of `queue_type`, keeping it as it is if it exists with other
    /// arguments; whether it can be used (bound).
    async fn declare_secondary(
        &self,
        queue: &str,
        queue_type: QueueType,
    ) -> Result<bool, lapin::Error> {
        // A refused declare closes its channel: a channel of its own.
        let probe = self.connection.create_channel().await?;
        let declared = probe
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::durable(),
                queue_args(queue_type),
            )
            .await;
        match declared {
            Ok(_) => {
                let _ = probe.close(200, "declared".into()).await;
                Ok(true)
            }
            Err(err) if !self.connected() => Err(err),
            Err(err) if exists_otherwise(&err) => Ok(true),
            Err(err) => {
                tracing::warn!(queue, error = %err, "queue can't be declared now; going on without it");
                Ok(false)
            }
        }
    }

    /// Fails unless `exchange` exists: publishing a reply to a missing exchange would
    /// close the channel, and with it every request in flight. Checked on a channel of
    /// its own, which a failed passive declare closes.
    pub async fn check_exchange(&self, exchange: &str) -> Result<(), lapin::Error> {
        let probe = self.connection.create_channel().await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        probe
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Direct,
                passive,
                FieldTable::default(),
            )
            .await?;
        let _ = probe.close(200, "checked".into()).await;
        Ok(())
    }

    /// Consumes `queue` with manual acks and at most `prefetch` unacked deliveries (a
    /// consumer's prefetch is the one set on its channel when it starts).
    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, lapin::Error> {
        self.consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let n = self.consumers.fetch_add(1, Ordering::AcqRel) + 1;
        self.consume
            .basic_consume(
                queue.into(),
                format!("{}-{n}", self.consumer_tag).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// Stops the broker from sending more requests to `consumer`, and returns the
    /// deliveries it had already received (they come before the broker's cancel-ok, and
    /// then its stream ends). Unacked ones stay with us.
    pub async fn cancel(&self, mut consumer: Consumer) -> Result<Vec<Delivery>, lapin::Error> {
        self.consume
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await?;
        let mut received = Vec::new();
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
        {
            received.push(delivery);
        }
        Ok(received)
    }

    /// Publishes a reply and waits for the broker's confirm. An error means the
    /// connection is lost.
    pub async fn publish_reply(&self, reply: &Outgoing<'_>) -> Result<Published, lapin::Error> {
        let body = reply.body;
        let limit = self.max_reply.load(Ordering::Relaxed);
        if body.len() > limit {
            return Ok(Published::TooLarge { limit });
        }
        let (generation, channel) = self.publish.lock().await.clone();
        match publish_on(&channel, reply).await {
            Ok(published) => Ok(published),
            Err(err) if self.connected() => {
                // The broker closed the channel, over this reply or one sent beside it.
                self.replace_publish_channel(generation).await?;
                Ok(self.refusal(&err, body.len()))
            }
            Err(err) => Err(err),
        }
    }

    /// Publishes `reply` on a channel of its own, opened for it: how a refused reply is
    /// tried again. A channel keeps what it learned of a quorum queue's leader, and one
    /// that published while the leader was being elected was seen refusing every later
    /// reply to that queue for 20 s after a new leader was known; a new channel asks anew.
    pub async fn publish_reply_alone(
        &self,
        reply: &Outgoing<'_>,
    ) -> Result<Published, lapin::Error> {
        let limit = self.max_reply.load(Ordering::Relaxed);
        if reply.body.len() > limit {
            return Ok(Published::TooLarge { limit });
        }
        let channel = confirming_channel(&self.connection).await?;
        let published = match publish_on(&channel, reply).await {
            Ok(published) => Ok(published),
            Err(err) if self.connected() => return Ok(self.refusal(&err, reply.body.len())),
            Err(err) => Err(err),
        };
        let _ = channel.close(200, "published".into()).await;
        published
    }

    /// What a channel closed over a reply of `size` bytes means.
    fn refusal(&self, err: &lapin::Error, size: usize) -> Published {
        match refused_size(&err.to_string()) {
            Some(limit) => {
                self.max_reply.fetch_min(limit, Ordering::Relaxed);
                if size > limit {
                    return Published::TooLarge { limit };
                }
                Published::Refused
            }
            None => {
                tracing::warn!(error = %err, "the broker closed the reply channel");
                Published::Refused
            }
        }
    }

    /// Opens a new publishing channel unless another caller already replaced `generation`.
    async fn replace_publish_channel(&self, generation: u64) -> Result<(), lapin::Error> {
        let mut current = self.publish.lock().await;
        if current.0 == generation {
            *current = (generation + 1, confirming_channel(&self.connection).await?);
        }
        Ok(())
    }

    pub async fn close(&self) {
        let _ = self.consume.close(200, "shutdown".into()).await;
        let publish = self.publish.lock().await.1.clone();
        let _ = publish.close(200, "shutdown".into()).await;
        let _ = self.connection.close(200, "shutdown".into()).await;
    }
}

async fn confirming_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

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
}

/// The AMQP properties of a reply (SPEC section 5).
pub fn reply_properties(reply: &Outgoing<'_>) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("status".into(), AMQPValue::ShortInt(reply.status as i16));
    // The properties travel in one frame (128 KiB on RabbitMQ, which closes the whole
    // connection over a larger one): a longer id is in the body only.
    if reply.request_id.len() <= REQUEST_ID_HEADER_MAX {
        headers.insert(
            "requestId".into(),
            AMQPValue::LongString(reply.request_id.as_bytes().into()),
        );
    }
    if let Some(traceparent) = reply.traceparent {
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(traceparent.as_bytes().into()),
        );
    }
    let properties = BasicProperties::default()
        .with_correlation_id(reply.key.into())
        .with_content_type("application/json".into())
        .with_headers(headers);
    if reply.destination.persistent() {
        properties.with_delivery_mode(2)
    } else {
        properties
    }
}

async fn publish_on(channel: &Channel, reply: &Outgoing<'_>) -> Result<Published, lapin::Error> {
    let destination = reply.destination;
    let (exchange, routing_key) = destination.route();
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                // RabbitMQ counts direct reply-to as unroutable for mandatory
                // publishes, though it delivers them.
                mandatory: !destination.is_direct(),
                ..BasicPublishOptions::default()
            },
            reply.body,
            reply_properties(reply),
        )
        .await?
        .await?;
    Ok(match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Published::Confirmed,
        Confirmation::Ack(Some(_)) => Published::Unroutable,
        Confirmation::Nack(_) => Published::Refused,
    })
}

/// The arguments a new queue of `queue_type` is declared with.
fn queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    args
}

/// Whether a declare was refused because the queue exists with other arguments
/// (`PRECONDITION_FAILED - inequivalent arg …`), not because it can't be reached
/// (`NOT_FOUND - home node … is down or inaccessible`).
fn exists_otherwise(err: &lapin::Error) -> bool {
    err.to_string().contains("inequivalent arg")
}

/// The limit in RabbitMQ's "message size N is larger than [configured] max size L".
fn refused_size(error: &str) -> Option<usize> {
    let after = &error[error.find("max size ")? + "max size ".len()..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `host:port` of an AMQP URL, without credentials: how logs and metrics name a node.
pub fn node_name(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => "unparsable-url".to_owned(),
    }
}

fn text(value: &Option<ShortString>) -> Option<String> {
    value.as_ref().map(|s| s.as_str().to_owned())
}

/// The properties of a delivery the envelope reads.
pub fn properties(p: &BasicProperties) -> Properties {
    let traceparent =
        p.headers()
            .as_ref()
            .and_then(|headers| match headers.inner().get("traceparent")? {
                AMQPValue::LongString(value) => {
                    let value = std::str::from_utf8(value.as_bytes()).ok()?;
                    crate::envelope::trace_context(value).map(str::to_owned)
                }
                AMQPValue::ShortString(value) => {
                    crate::envelope::trace_context(value.as_str()).map(str::to_owned)
                }
                _ => None,
            });
    Properties {
        reply_to: text(p.reply_to()),
        correlation_id: text(p.correlation_id()),
        message_id: text(p.message_id()),
        user_id: text(p.user_id()),
        traceparent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_named_without_credentials() {
        assert_eq!(
            node_name("amqp://guest:secret@127.0.0.1:5701/%2f"),
            "127.0.0.1:5701"
        );
        assert_eq!(
            node_name("amqps://u:p@rabbit.example:5671"),
            "rabbit.example:5671"
        );
    }

    #[test]
    fn the_size_limit_is_read_from_the_brokers_refusal() {
        let refusal = "protocol error: PRECONDITION_FAILED - message size 1500321 is larger \
                       than configured max size 1048576";
        assert_eq!(refused_size(refusal), Some(1_048_576));
        assert_eq!(refused_size("NOT_FOUND - no queue 'x'"), None);
    }
}
