//! Confirmed reply publishing, on a connection of its own.
//!
//! **A return is matched to its publish by what it carries, never by the order of
//! confirms.** The AMQP client hands a returned (unroutable) message to whichever confirm of the
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

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::port::{self, Channel, Confirm, Connection, Props, Returned, Value};
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
    pub props: Props<'a>,
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
    connection: Box<dyn Connection>,
    /// Confirming channels with no publish outstanding.
    idle: Mutex<Vec<Box<dyn Channel>>>,
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
        connection: Box<dyn Connection>,
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
        self.connection.connected()
    }

    pub(super) fn blocked(&self) -> bool {
        self.connection.blocked()
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
        let published = self.publish_message(&*channel, reply_message(reply)).await;
        self.discard(channel);
        published
    }

    fn too_large(&self, reply: &Outgoing<'_>) -> Option<Published> {
        let limit = self.max_reply.load(Ordering::Relaxed);
        (reply.body.len() > limit).then_some(Published::TooLarge { limit })
    }

    async fn open_channel(&self) -> Result<Box<dyn Channel>, BrokerError> {
        let open = async {
            let channel = self.connection.open_channel().await?;
            channel.confirm_select().await?;
            Ok::<_, port::Error>(channel)
        };
        Ok(bounded("open a reply channel", CALL, &self.stop, open).await??)
    }

    /// Closes `channel` in the background, bounded: nothing waits on it.
    fn discard(&self, channel: Box<dyn Channel>) {
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let close = channel.close("done");
            let _ = bounded("close a reply channel", CALL, &stop, close).await;
        });
    }

    /// Publishes a message on a pooled channel, alone on it, and waits for its confirm.
    pub(super) async fn publish_pooled(
        &self,
        message: Message<'_>,
    ) -> Result<Published, BrokerError> {
        // Every reply channel busy for as long as a confirm may take (confirms that are
        // late, a blocked connection): this one is unconfirmed too, and goes back to the
        // queue; the connection is not lost for it.
        let slot = match bounded(
            "a reply channel",
            self.confirm_timeout,
            &self.stop,
            self.slots.acquire(),
        )
        .await
        {
            Ok(slot) => slot,
            Err(Interrupted::TimedOut { .. }) if self.connected() => {
                return Ok(Published::Unconfirmed);
            }
            Err(interrupted) => return Err(interrupted.into()),
        };
        let Ok(_slot) = slot else {
            return Ok(Published::Refused);
        };
        let pooled = self.idle.lock().expect("poisoned").pop();
        let channel = match pooled {
            Some(channel) if channel.connected() => channel,
            _ => self.open_channel().await?,
        };
        let published = self.publish_message(&*channel, message).await;
        if let Ok(Published::Confirmed | Published::Unroutable) = published {
            self.idle.lock().expect("poisoned").push(channel);
        } else {
            self.discard(channel);
        }
        published
    }

    async fn publish_message(
        &self,
        channel: &dyn Channel,
        message: Message<'_>,
    ) -> Result<Published, BrokerError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let size = message.body.len();
        let publish = channel.publish(port::Message {
            exchange: message.exchange,
            routing_key: message.routing_key,
            mandatory: message.mandatory,
            body: message.body,
            props: with_publish_id(message.props, id),
        });
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
            Ok(Confirm {
                acked: true,
                returned: None,
            }) => Published::Confirmed,
            Ok(Confirm {
                acked: true,
                returned: Some(returned),
            }) => match publish_id(&returned) {
                Some(returned_id) if returned_id == id => Published::Unroutable,
                other => {
                    tracing::error!(
                        publish = id,
                        returned = ?other,
                        "a returned message names another publish; publishing this one again"
                    );
                    Published::Refused
                }
            },
            Ok(Confirm { acked: false, .. }) => Published::Refused,
            Err(err) if self.connected() => self.refusal(&err, size),
            Err(err) => return Err(err.into()),
        })
    }

    /// What a channel closed over a reply of `size` bytes means.
    fn refusal(&self, err: &port::Error, size: usize) -> Published {
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
        let close = self.connection.close("shutdown");
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
        props: reply_properties(reply),
    }
}

/// `props` with the publish's number in `PUBLISH_HEADER`.
fn with_publish_id(mut props: Props<'_>, id: u64) -> Props<'_> {
    props
        .headers
        .push((PUBLISH_HEADER, Value::LongLongInt(id as i64)));
    props
}

/// The publish number a returned message carries.
fn publish_id(returned: &Returned) -> Option<u64> {
    match returned.header(PUBLISH_HEADER)? {
        Value::LongLongInt(id) => u64::try_from(*id).ok(),
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
        let props = with_publish_id(Props::default(), 41);
        let returned = |headers| Returned {
            reply_code: 312,
            headers,
        };
        let (name, value) = props.headers[0].clone();
        let named = returned(vec![(name.to_owned(), value)]);
        assert_eq!(publish_id(&named), Some(41));
        assert_eq!(publish_id(&returned(Vec::new())), None);
    }
}
