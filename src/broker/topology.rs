//! The worker's queues and dead-letter exchange, all durable.
//!
//! **A queue that already exists is used as it is.** RabbitMQ refuses to declare a queue
//! again with other arguments (`PRECONDITION_FAILED - inequivalent arg`) and closes the
//! channel over it; a queue declared by a producer, or by an earlier version of this
//! worker, must not become a reconnection loop. Each declare goes on a channel of its
//! own; when it is refused so, the queue is checked to exist (a passive declare) and
//! used, and one warning names the difference and the policy that adds what is missing:
//! RabbitMQ recommends policies rather than arguments for dead-lettering and limits, for
//! this very reason.

use std::collections::HashSet;
use std::sync::Mutex;

use super::port::{self, Channel, ExchangeKind, Value};
use super::{Broker, BrokerError};
use crate::config::{AmqpSettings, QueueType};

/// Queues already warned about, so that each reconnection doesn't say it again.
static WARNED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

impl Broker {
    /// Declares the topology: the dead-letter exchange and queue when configured, the
    /// request queue and the default reply queue. With `queue_type = "quorum"` all three
    /// queues are quorum queues, replicated over a cluster: a classic queue lives on the
    /// node it was declared on and is gone with it. A queue that already exists with other
    /// arguments is used as it is (module doc); a dead-letter or reply queue that exists
    /// but can't be reached (a classic queue whose node is down) is reported, not a reason
    /// to stop consuming.
    pub async fn declare(&self, settings: &AmqpSettings) -> Result<(), BrokerError> {
        let mut request_args = queue_args(settings.queue_type);
        let dlx = settings.dead_letter_exchange.as_str();
        if !dlx.is_empty() {
            let probe = self.probe().await?;
            let declare = probe.declare_exchange(dlx, ExchangeKind::Fanout, false);
            match self.call("declare the dead-letter exchange", declare).await {
                Ok(()) => self.close_probe(&*probe).await,
                Err(err) if self.connected() => {
                    // An exchange of another type: dead letters still reach it.
                    tracing::warn!(exchange = dlx, error = %err, "the dead-letter exchange exists otherwise; using it as it is");
                }
                Err(err) => return Err(err),
            }
            let dlq = settings.dead_letter_queue.as_str();
            if self
                .declare_queue(dlq, queue_args(settings.queue_type), None)
                .await?
            {
                let probe = self.probe().await?;
                let bind = probe.bind_queue(dlq, dlx);
                self.call("bind the dead-letter queue", bind).await?;
                self.close_probe(&*probe).await;
            }
            request_args.push((
                "x-dead-letter-exchange",
                Value::LongString(dlx.as_bytes().into()),
            ));
        }
        if settings.queue_type == QueueType::Quorum && settings.delivery_limit > 0 {
            let limit = i64::from(settings.delivery_limit);
            request_args.push(("x-delivery-limit", Value::LongLongInt(limit)));
        }
        let queue = settings.request_queue.as_str();
        let policy = policy_command(queue, settings);
        if !self
            .declare_queue(queue, request_args, policy.as_deref())
            .await?
        {
            // The queue the worker consumes must be there.
            let probe = self.probe().await?;
            let check = probe.declare_queue(queue, true, &[]);
            self.call("find the request queue", check).await?;
            self.close_probe(&*probe).await;
        }
        self.declare_queue(&settings.reply_queue, queue_args(settings.queue_type), None)
            .await?;
        Ok(())
    }

    /// Declares `queue` with `args` on a channel of its own; whether it can be used as
    /// declared or as it already is. A queue that exists with other arguments is used as
    /// it is, with one warning (and `policy`, the command that adds what it lacks).
    async fn declare_queue(
        &self,
        queue: &str,
        args: Vec<(&'static str, Value<'_>)>,
        policy: Option<&str>,
    ) -> Result<bool, BrokerError> {
        let probe = self.probe().await?;
        let declare = probe.declare_queue(queue, false, &args);
        match self.call("declare a queue", declare).await {
            Ok(()) => {
                self.close_probe(&*probe).await;
                Ok(true)
            }
            Err(err) if !self.connected() => Err(err),
            Err(BrokerError::Amqp(err)) if exists_otherwise(&err) => {
                if first_warning(queue) {
                    let hint = policy.map_or_else(String::new, |p| {
                        format!("; to add what it lacks without redeclaring it: {p}")
                    });
                    tracing::warn!(
                        queue,
                        difference = %err,
                        "the queue exists with other arguments; using it as it is{hint}"
                    );
                }
                Ok(true)
            }
            Err(err) => {
                tracing::warn!(queue, error = %err, "queue can't be declared now; going on without it");
                Ok(false)
            }
        }
    }

    /// Fails unless `exchange` exists: publishing a reply to a missing exchange would
    /// close the channel. Checked on a channel of its own, which a failed passive declare
    /// closes.
    pub async fn check_exchange(&self, exchange: &str) -> Result<(), BrokerError> {
        let probe = self.probe().await?;
        let check = probe.declare_exchange(exchange, ExchangeKind::Direct, true);
        self.call("find the reply exchange", check).await?;
        self.close_probe(&*probe).await;
        Ok(())
    }

    /// A channel for one call that the broker may refuse by closing it.
    async fn probe(&self) -> Result<Box<dyn Channel>, BrokerError> {
        self.call("open a channel", self.connection.open_channel())
            .await
    }

    async fn close_probe(&self, probe: &dyn Channel) {
        let _ = self.call("close a channel", probe.close("declared")).await;
    }
}

/// Whether `queue` is warned about for the first time.
fn first_warning(queue: &str) -> bool {
    WARNED
        .lock()
        .expect("poisoned")
        .get_or_insert_with(HashSet::new)
        .insert(queue.to_owned())
}

/// The `rabbitmqctl set_policy` command that gives the request queue the dead-letter
/// exchange and delivery limit of `settings`, when there is any to give.
pub fn policy_command(queue: &str, settings: &AmqpSettings) -> Option<String> {
    let mut definition = serde_json::Map::new();
    if !settings.dead_letter_exchange.is_empty() {
        definition.insert(
            "dead-letter-exchange".into(),
            settings.dead_letter_exchange.clone().into(),
        );
    }
    if settings.queue_type == QueueType::Quorum && settings.delivery_limit > 0 {
        definition.insert("delivery-limit".into(), settings.delivery_limit.into());
    }
    if definition.is_empty() {
        return None;
    }
    let pattern = format!("^{}$", regex_escape(queue));
    let definition = serde_json::Value::Object(definition).to_string();
    Some(format!(
        "rabbitmqctl set_policy mupdate-requests '{pattern}' '{definition}' --apply-to queues"
    ))
}

/// `name` with the regular expression's special characters escaped.
fn regex_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The arguments a new queue of `queue_type` is declared with.
fn queue_args(queue_type: QueueType) -> Vec<(&'static str, Value<'static>)> {
    let mut args = Vec::new();
    if queue_type == QueueType::Quorum {
        args.push(("x-queue-type", Value::LongString(b"quorum".into())));
    }
    args
}

/// Whether a declare was refused because the queue exists with other arguments
/// (`PRECONDITION_FAILED - inequivalent arg …`), not because it can't be reached
/// (`NOT_FOUND - home node … is down or inaccessible`).
fn exists_otherwise(err: &port::Error) -> bool {
    err.to_string().contains("inequivalent arg")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_gives_what_the_arguments_would_have() {
        let mut settings = crate::config::Settings::defaults().amqp;
        let command = policy_command("mupdate.requests", &settings).unwrap();
        assert_eq!(
            command,
            r#"rabbitmqctl set_policy mupdate-requests '^mupdate\.requests$' '{"dead-letter-exchange":"mupdate.dlx"}' --apply-to queues"#
        );
        settings.queue_type = QueueType::Quorum;
        settings.delivery_limit = 5;
        assert!(
            policy_command("q", &settings)
                .unwrap()
                .contains(r#""delivery-limit":5"#)
        );
        settings.dead_letter_exchange.clear();
        settings.delivery_limit = 0;
        assert_eq!(policy_command("q", &settings), None);
    }
}
