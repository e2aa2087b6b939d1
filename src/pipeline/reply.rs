//! Where a reply goes and what it is keyed by (SPEC section 5). Pure: the broker module
//! turns it into a publish.

/// The prefix of RabbitMQ's direct reply-to pseudo-queues.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The longest AMQP short string: `correlation_id`, routing keys, queue names.
pub const SHORT_STRING_MAX: usize = 255;

/// The reply's `correlation_id`, and its routing key on `amqp.reply_exchange`: the
/// requestId when it fits a short string; else the request's own `correlation_id`
/// (what an RPC client matches on); else the requestId cut to 255 bytes, on a character
/// boundary. The full requestId is in the reply's body and its `requestId` header.
pub fn reply_key<'a>(request_id: &'a str, correlation_id: Option<&'a str>) -> &'a str {
    if request_id.len() <= SHORT_STRING_MAX {
        return request_id;
    }
    match correlation_id {
        Some(own) if !own.is_empty() && own.len() <= SHORT_STRING_MAX => own,
        _ => {
            let mut end = SHORT_STRING_MAX;
            while !request_id.is_char_boundary(end) {
                end -= 1;
            }
            &request_id[..end]
        }
    }
}

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
    /// `key` is the reply key (`reply_key`); a `reply_to` longer than a short string
    /// (it can't come from AMQP) names no destination: `None`.
    pub fn choose(
        reply_to: Option<&str>,
        reply_exchange: &str,
        reply_queue: &str,
        key: &str,
    ) -> Option<Self> {
        Some(match reply_to {
            Some(to) if to.len() > SHORT_STRING_MAX => return None,
            Some(to) if !to.is_empty() => Destination::ReplyTo(to.to_owned()),
            _ if !reply_exchange.is_empty() => Destination::Exchange {
                exchange: reply_exchange.to_owned(),
                routing_key: key.to_owned(),
            },
            _ => Destination::Queue(reply_queue.to_owned()),
        })
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
        let choose = |to, ex| Destination::choose(to, ex, "replies", "r1").unwrap();
        let d = choose(Some("q"), "ex");
        assert_eq!((d.route(), d.persistent()), (("", "q"), true));
        let d = choose(Some("amq.rabbitmq.reply-to.g1h2"), "");
        assert!(!d.persistent());
        let d = choose(None, "ex");
        assert_eq!(d.route(), ("ex", "r1"));
        let d = choose(Some(""), "");
        assert_eq!(d.route(), ("", "replies"));
        let long = "q".repeat(256);
        assert_eq!(Destination::choose(Some(&long), "", "replies", "r1"), None);
    }

    #[test]
    fn a_reply_key_always_fits_a_short_string() {
        assert_eq!(reply_key("r-42", Some("c")), "r-42");
        let long = "x".repeat(1000);
        assert_eq!(reply_key(&long, Some("client-7")), "client-7");
        assert_eq!(reply_key(&long, None), &long[..255]);
        assert_eq!(reply_key(&long, Some("")), &long[..255]);
        let accents = "é".repeat(200);
        let key = reply_key(&accents, None);
        assert_eq!(key.len(), 254, "cut on a character boundary");
        assert_eq!(key, "é".repeat(127));
    }
}
