//! Where a reply goes (SPEC section 5). Pure: the broker module turns it into a publish.

/// The prefix of RabbitMQ's direct reply-to pseudo-queues.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The request's `reply_to` (a queue name or a direct reply-to address).
    ReplyTo(String),
    /// `amqp.reply_exchange`, routed by requestId.
    Exchange {
        exchange: String,
        routing_key: String,
    },
    /// `amqp.reply_queue`.
    Queue(String),
}

impl Destination {
    pub fn choose(
        reply_to: Option<&str>,
        reply_exchange: &str,
        reply_queue: &str,
        request_id: &str,
    ) -> Self {
        match reply_to {
            Some(to) if !to.is_empty() => Destination::ReplyTo(to.to_owned()),
            _ if !reply_exchange.is_empty() => Destination::Exchange {
                exchange: reply_exchange.to_owned(),
                routing_key: request_id.to_owned(),
            },
            _ => Destination::Queue(reply_queue.to_owned()),
        }
    }

    /// The exchange and routing key to publish with.
    pub fn route(&self) -> (&str, &str) {
        match self {
            Destination::ReplyTo(queue) | Destination::Queue(queue) => ("", queue),
            Destination::Exchange {
                exchange,
                routing_key,
            } => (exchange, routing_key),
        }
    }

    /// A direct reply-to address: the caller's channel, not a queue.
    pub fn is_direct(&self) -> bool {
        matches!(self, Destination::ReplyTo(to) if to.starts_with(DIRECT_REPLY_TO))
    }

    /// Replies are persistent, except to direct reply-to, which can't hold them.
    pub fn persistent(&self) -> bool {
        !self.is_direct()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_to_wins_then_exchange_then_queue() {
        let d = Destination::choose(Some("q"), "ex", "replies", "r1");
        assert_eq!((d.route(), d.persistent()), (("", "q"), true));
        let d = Destination::choose(Some("amq.rabbitmq.reply-to.g1h2"), "", "replies", "r1");
        assert!(!d.persistent());
        let d = Destination::choose(None, "ex", "replies", "r1");
        assert_eq!(d.route(), ("ex", "r1"));
        let d = Destination::choose(Some(""), "", "replies", "r1");
        assert_eq!(d.route(), ("", "replies"));
    }
}
