//! Confirmed reply publishing, on a connection of its own.
//!
//! **A return is matched to its publish by what it carries, never by the order of
//! confirms.** lapin hands a returned (unroutable) message to whichever confirm of the
//! channel completes next, and completes the confirms a `multiple` ack covers in no set
//! order: with several publishes outstanding on one channel, a return can be reported on
//! another publish's confirm, so one request is dead-lettered for another's vanished
//! reply queue and the other acked as answered. Here each channel carries at most one
//! publish at a time (a pool of channels, `amqp.reply_channels` at most), so a confirm's
//! return can only be its own; and each publish carries a header with a number of its own,
//! checked on the returned message: one that names another publish is never taken as this
//! one's (it is reported, and this reply is published again, alone).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{BrokerError, CALL, Outgoing, reply_properties};
use crate::bounded::{Interrupted, bounded};
use crate::config::AmqpSettings;

/// A message to publish, confirmed.
pub(super) struct Message<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// Returned when it reaches no queue.
    pub mandatory: bool,
    pub body: &'a [u8],
    pub properties: BasicProperties,
}

/// The header naming a reply's publish (a number of this connection's own).
pub const PUBLISH_HEADER: &str = "x-mupdate-publish";

/// What the broker said of a published reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Routed and confirmed: the request can be acked.
    Confirmed,
    /// Confirmed but routed nowhere (no such queue or binding).
    Unroutable,
    /// The broker refused it: nacked, or closed the channel over it.
    Refused,
    /// Its confirm did not come within `amqp.confirm_timeout_ms` (the publishing
    /// connection blocked by an alarm, a broker too busy): the request goes back to the
    /// queue rather than wait on.
    Unconfirmed,
    /// Larger than the broker accepts (its `max_message_size`, learned when it closed
    /// the channel over a larger one).
    TooLarge { limit: usize },
}

pub(super) struct Replies {
    connection: Connection,
    /// Confirming channels with no publish outstanding.
    idle: Mutex<Vec<Channel>>,
    /// Publishes outstanding at once (one per channel).
    slots: Semaphore,
    next: AtomicU64,
    /// The broker's message size limit, once it has told us (by refusing a reply).
    max_reply: AtomicUsize,
    confirm_timeout: Duration,
    stop: CancellationToken,
}

impl Replies {
    pub(super) fn new(
        connection: Connection,
        settings: &AmqpSettings,
        stop: CancellationToken,
    ) -> Self {
        Replies {
            connection,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(usize::from(settings.reply_channels.max(1))),
            next: AtomicU64::new(0),
            max_reply: AtomicUsize::new(usize::MAX),
            confirm_timeout: Duration::from_millis(settings.confirm_timeout_ms),
            stop,
        }
    }

    pub(super) fn connected(&self) -> bool {
        self.connection.status().connected()
    }

    pub(super) fn blocked(&self) -> bool {
        self.connection.status().blocked()
    }

    /// Publishes a reply on a pooled channel, alone on it, and waits for its confirm.
    pub(super) async fn publish(&self, reply: &Outgoing<'_>) -> Result<Published, BrokerError> {
        if let Some(too_large) = self.too_large(reply) {
            return Ok(too_large);
        }
        self.publish_pooled(reply_message(reply)).await
    }

    /// Publishes on a channel opened for it, then closed.
    pub(super) async fn publish_alone(
        &self,
        reply: &Outgoing<'_>,
    ) -> Result<Published, BrokerError> {
        if let Some(too_large) = self.too_large(reply) {
            return Ok(too_large);
        }
        let channel = self.open_channel().await?;
        let published = self.publish_message(&channel, reply_message(reply)).await;
        self.discard(channel);
        published
    }

    fn too_large(&self, reply: &Outgoing<'_>) -> Option<Published> {
        let limit = self.max_reply.load(Ordering::Relaxed);
        (reply.body.len() > limit).then_some(Published::TooLarge { limit })
    }

    async fn open_channel(&self) -> Result<Channel, BrokerError> {
        let open = async {
            let channel = self.connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>(channel)
        };
        Ok(bounded("open a reply channel", CALL, &self.stop, open).await??)
    }

    /// Closes `channel` in the background, bounded: nothing waits on it.
    fn discard(&self, channel: Channel) {
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let close = channel.close(200, "done".into());
            let _ = bounded("close a reply channel", CALL, &stop, close).await;
        });
    }

    /// Publishes a message on a pooled channel, alone on it, and waits for its confirm.
    pub(super) async fn publish_pooled(
        &self,
        message: Message<'_>,
    ) -> Result<Published, BrokerError> {
        let slot = bounded(
            "a reply channel",
            self.confirm_timeout,
            &self.stop,
            self.slots.acquire(),
        )
        .await?;
        let Ok(_slot) = slot else {
            return Ok(Published::Refused);
        };
        let pooled = self.idle.lock().expect("poisoned").pop();
        let channel = match pooled {
            Some(channel) if channel.status().connected() => channel,
            _ => self.open_channel().await?,
        };
        let published = self.publish_message(&channel, message).await;
        if let Ok(Published::Confirmed | Published::Unroutable) = published {
            self.idle.lock().expect("poisoned").push(channel);
        } else {
            self.discard(channel);
        }
        published
    }

    async fn publish_message(
        &self,
        channel: &Channel,
        message: Message<'_>,
    ) -> Result<Published, BrokerError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let size = message.body.len();
        let properties = with_publish_id(message.properties, id);
        let publish = async {
            channel
                .basic_publish(
                    message.exchange.into(),
                    message.routing_key.into(),
                    BasicPublishOptions {
                        mandatory: message.mandatory,
                        ..BasicPublishOptions::default()
                    },
                    message.body,
                    properties,
                )
                .await?
                .await
        };
        let confirmed = match bounded(
            "a publish's confirm",
            self.confirm_timeout,
            &self.stop,
            publish,
        )
        .await
        {
            Ok(confirmed) => confirmed,
            Err(Interrupted::TimedOut { .. }) if self.connected() => {
                tracing::warn!(
                    timeout = ?self.confirm_timeout,
                    blocked = self.blocked(),
                    "a publish's confirm did not come in time"
                );
                return Ok(Published::Unconfirmed);
            }
            Err(interrupted) => return Err(interrupted.into()),
        };
        Ok(match confirmed {
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Published::Confirmed,
            Ok(Confirmation::Ack(Some(returned))) => {
                match publish_id(returned.properties.headers()) {
                    Some(returned_id) if returned_id == id => Published::Unroutable,
                    other => {
                        tracing::error!(
                            publish = id,
                            returned = ?other,
                            "a returned message names another publish; publishing this one again"
                        );
                        Published::Refused
                    }
                }
            }
            Ok(Confirmation::Nack(_)) => Published::Refused,
            Err(err) if self.connected() => self.refusal(&err, size),
            Err(err) => return Err(err.into()),
        })
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

    pub(super) async fn close(&self) {
        let close = self.connection.close(200, "shutdown".into());
        let _ = bounded("close", CALL, &self.stop, close).await;
    }
}

/// A reply as a message: to its destination, returned when it reaches no queue (except
/// direct reply-to, which RabbitMQ counts as unroutable for mandatory publishes though
/// it delivers them).
fn reply_message<'a>(reply: &'a Outgoing<'a>) -> Message<'a> {
    let destination = reply.destination;
    let (exchange, routing_key) = destination.route();
    Message {
        exchange,
        routing_key,
        mandatory: !destination.is_direct(),
        body: reply.body,
        properties: reply_properties(reply),
    }
}

/// `properties` with the publish's number in `PUBLISH_HEADER`.
fn with_publish_id(properties: BasicProperties, id: u64) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(PUBLISH_HEADER.into(), AMQPValue::LongLongInt(id as i64));
    properties.with_headers(headers)
}

/// The publish number a returned message carries.
fn publish_id(headers: &Option<FieldTable>) -> Option<u64> {
    match headers.as_ref()?.inner().get(PUBLISH_HEADER)? {
        AMQPValue::LongLongInt(id) => u64::try_from(*id).ok(),
        _ => None,
    }
}

/// The limit in RabbitMQ's "message size N is larger than [configured] max size L".
fn refused_size(error: &str) -> Option<usize> {
    let after = &error[error.find("max size ")? + "max size ".len()..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_limit_is_read_from_the_brokers_refusal() {
        let refusal = "protocol error: PRECONDITION_FAILED - message size 1500321 is larger \
                       than configured max size 1048576";
        assert_eq!(refused_size(refusal), Some(1_048_576));
        assert_eq!(refused_size("NOT_FOUND - no queue 'x'"), None);
    }

    #[test]
    fn a_publish_is_named_by_its_own_header() {
        let properties = with_publish_id(BasicProperties::default(), 41);
        assert_eq!(publish_id(properties.headers()), Some(41));
        assert_eq!(publish_id(&None), None);
    }
}
