//! `mupdate-worker requeue-dead`: moves the dead-lettered requests whose updates were
//! never applied back to the request queue, and leaves the others where they are.
//!
//! A request the worker dead-lettered after applying it (its reply unroutable, refused or
//! too large: `x-mupdate-applied: true`) must not be sent again blindly: its update would
//! land again over whatever came after it. One without the header was dead-lettered by the
//! broker (a quorum queue's delivery limit, a handler that panicked): whether it was
//! applied is unknown, so it stays too unless `--unknown` says to move those as well.
//!
//! The messages present when it starts are read once each (`basic.get`, manual acks): a
//! moved one is published to the request queue, confirmed, then acked; a kept one stays
//! unacked until the end, then goes back to the dead-letter queue, in its order (a crash
//! meanwhile hands them back too: nothing is lost, a moved one at worst is there twice). `user_id` is restored from
//! `x-mupdate-user-id` (RabbitMQ accepts it only from that user, or from one with the
//! `impersonator` tag); a message whose `user_id` the broker refuses is kept.
//!
//! Only the worker's own dead letters are believed: one the broker dead-lettered (it
//! carries `x-death`, which the worker's never do) has a producer's headers as they
//! were published, so a forged `x-mupdate-applied: false` or `x-mupdate-user-id` on it
//! counts for nothing (fate unknown; the `user_id` the broker checked stays); `x-mupdate-applied:
//! true` is believed on any (it only keeps a message where it is).

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::broker::{APPLIED_HEADER, USER_ID_HEADER, records_dead_lettering};
use crate::config::AmqpSettings;
use crate::security::tls::AmqpTls;

/// What a run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Never applied: back in the request queue.
    pub moved: u64,
    /// Applied before they were dead-lettered: left in the dead-letter queue.
    pub applied: u64,
    /// Dead-lettered by the broker, fate unknown: left (moved with `--unknown`).
    pub unknown: u64,
    /// Their `user_id` could not be restored: left.
    pub refused: u64,
}

/// The most one broker call may take here.
const CALL: Duration = Duration::from_secs(10);

pub async fn run(settings: &AmqpSettings, unknown_too: bool) -> anyhow::Result<Moved> {
    let tls = AmqpTls::load(settings)?;
    let url = settings
        .urls()
        .next()
        .ok_or_else(|| anyhow::anyhow!("amqp.url names no broker"))?;
    let properties =
        ConnectionProperties::default().with_connection_name("mupdate-worker requeue-dead".into());
    let connection =
        tokio::time::timeout(CALL, crate::security::tls::connect(url, &tls, properties)).await??;
    let read = connection.create_channel().await?;
    let dlq = settings.dead_letter_queue.as_str();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let present = read
        .queue_declare(dlq.into(), passive, FieldTable::default())
        .await?
        .message_count();
    let mut publish = confirming(&connection).await?;
    let mut done = Moved::default();
    let mut last_kept = None;
    // One message at a time (basic.get): what is kept stays unacked with us, so the
    // next get skips it, whatever the count kept (no prefetch to fill).
    for _ in 0..present {
        let get = read.basic_get(dlq.into(), BasicGetOptions::default());
        let Some(message) = tokio::time::timeout(CALL, get).await?? else {
            break;
        };
        let delivery = message.delivery;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        // Dead-lettered by the broker: its `x-mupdate-*` headers are a producer's.
        let workers = !headers
            .inner()
            .keys()
            .any(|k| records_dead_lettering(k.as_str()));
        // `true` is believed whoever set it (it only keeps a message where it is);
        // `false` only on the worker's own dead letters.
        let applied = match headers.inner().get(APPLIED_HEADER) {
            Some(AMQPValue::Boolean(true)) => Some(true),
            Some(AMQPValue::Boolean(false)) if workers => Some(false),
            _ => None,
        };
        let moving = match applied {
            Some(false) => true,
            None => unknown_too,
            Some(true) => false,
        };
        if moving {
            match send_back(
                &publish,
                &settings.request_queue,
                &delivery.data,
                &delivery.properties,
                workers,
            )
            .await
            {
                Ok(true) => {
                    delivery.acker.ack(Default::default()).await?;
                    done.moved += 1;
                    continue;
                }
                Ok(false) | Err(_) => {
                    // The channel is closed over a user_id it may not publish.
                    done.refused += 1;
                    publish = confirming(&connection).await?;
                }
            }
        } else if applied == Some(true) {
            done.applied += 1;
        } else {
            done.unknown += 1;
        }
        last_kept = Some(delivery.acker);
    }
    // Everything kept goes back to the dead-letter queue at once, in its order.
    if let Some(acker) = last_kept {
        let back = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        acker.nack(back).await?;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(done)
}

async fn confirming(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes a dead letter back to `queue` as it was first published: the worker's
/// headers gone, its `user_id` restored from `x-mupdate-user-id` when the dead letter
/// is the `workers` (one the broker dead-lettered kept the `user_id` it checked).
/// Whether the broker confirmed it.
async fn send_back(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: &BasicProperties,
    workers: bool,
) -> lapin::Result<bool> {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let user = match headers.inner().get(USER_ID_HEADER) {
        Some(AMQPValue::LongString(user)) if workers => {
            Some(String::from_utf8_lossy(user.as_bytes()).into_owned())
        }
        _ => None,
    };
    let kept: FieldTable = headers
        .inner()
        .iter()
        .filter(|(k, _)| kept_on_requeue(k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into();
    headers = kept;
    let mut properties = properties.clone().with_headers(headers);
    if let Some(user) = user {
        properties = properties.with_user_id(user.into());
    }
    let confirm = tokio::time::timeout(CALL, async {
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await?
            .await
    })
    .await
    .map_err(|_| lapin::Error::from(std::io::Error::other("no confirm in time")))??;
    Ok(matches!(confirm, lapin::Confirmation::Ack(None)))
}

/// Whether a dead letter's header goes back with it: the worker's own (`x-mupdate-*`:
/// why it was dead-lettered, whether it was applied, the caller it verified, whether
/// the request's headers were dropped to fit the frame) are about that dead-lettering,
/// and a worker sets them afresh; the request's own are kept.
fn kept_on_requeue(header: &str) -> bool {
    !header.starts_with("x-mupdate-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workers_own_headers_stay_behind() {
        use crate::broker::{ERROR_HEADER, HEADERS_DROPPED_HEADER, REASON_HEADER};
        for own in [
            APPLIED_HEADER,
            ERROR_HEADER,
            REASON_HEADER,
            HEADERS_DROPPED_HEADER,
        ] {
            assert!(!kept_on_requeue(own), "{own}");
        }
        assert!(!kept_on_requeue(USER_ID_HEADER));
        assert!(kept_on_requeue("x-trace-id"));
        assert!(kept_on_requeue("x-death"));
    }
}
