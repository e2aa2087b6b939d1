//! The broker port over AMQP 0-9-1, through lapin: the production implementation of
//! `port`. Each method is the one lapin call it names, nothing more; deadlines, pooling
//! and the pairing of returns with publishes are the lifecycle's (module `broker`).
//! Connections are made through `security::tls` (TLS files read again on each connect,
//! so a renewed certificate is used from then on).
//!
//! **A message's properties fit one frame, checked before it is sent.** AMQP sends them
//! in one content header frame, never split, and RabbitMQ closes the whole connection
//! over a frame larger than the `frame_max` negotiated (128 KiB by default): a dead
//! letter carrying a request's own headers, near that size already, would close it on
//! every redelivery. Such a dead letter goes without the carried headers (and says so in
//! `x-mupdate-headers-dropped`); whatever is still too large is refused here, unsent.

use std::sync::Arc;

use ::lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use ::lapin::types::{AMQPValue, FieldTable, ShortString};
use ::lapin::{BasicProperties, Confirmation, ConnectionProperties};
use futures_util::StreamExt;

use super::port::{
    self, Call, Confirm, Consumer, Delivery, Error, ErrorKind, ExchangeKind, Message, Original,
    Returned, Value,
};
use super::{HEADERS_DROPPED_HEADER, records_dead_lettering};
use crate::config::AmqpSettings;
use crate::pipeline::envelope::Properties;
use crate::security::tls::AmqpTls;

/// Connects to the nodes of `amqp.url` as `settings` say (TLS included).
pub struct Link {
    settings: AmqpSettings,
}

impl Link {
    pub fn new(settings: AmqpSettings) -> Self {
        Link { settings }
    }
}

impl port::BrokerLink for Link {
    fn connect<'a>(
        &'a self,
        url: &'a str,
        name: &'static str,
    ) -> Call<'a, Box<dyn port::Connection>> {
        Box::pin(async move {
            let tls = AmqpTls::load(&self.settings).map_err(|e| Error::closed(e.to_string()))?;
            let properties = ConnectionProperties::default().with_connection_name(name.into());
            let connection = crate::security::tls::connect(url, &tls, properties)
                .await
                .map_err(error)?;
            Ok(Box::new(Connection(connection)) as Box<dyn port::Connection>)
        })
    }
}

/// The port's error for lapin's.
fn error(err: ::lapin::Error) -> Error {
    let kind = match err.kind() {
        ::lapin::ErrorKind::ProtocolError(amqp) => ErrorKind::Refused {
            code: amqp.get_id(),
        },
        ::lapin::ErrorKind::MissingHeartbeatError => ErrorKind::Timeout,
        _ => ErrorKind::Closed,
    };
    Error {
        kind,
        message: err.to_string(),
    }
}

pub struct Connection(::lapin::Connection);

impl port::Connection for Connection {
    fn open_channel(&self) -> Call<'_, Box<dyn port::Channel>> {
        Box::pin(async move {
            let channel = self.0.create_channel().await.map_err(error)?;
            let frame_max = self.0.configuration().frame_max() as usize;
            Ok(Box::new(Channel { channel, frame_max }) as Box<dyn port::Channel>)
        })
    }

    fn connected(&self) -> bool {
        self.0.status().connected()
    }

    fn blocked(&self) -> bool {
        self.0.status().blocked()
    }

    fn close<'a>(&'a self, reason: &'a str) -> Call<'a, ()> {
        Box::pin(async move { self.0.close(200, reason.into()).await.map_err(error) })
    }
}

pub struct Channel {
    channel: ::lapin::Channel,
    /// The connection's negotiated `frame_max`: the largest frame, its 8 bytes of
    /// framing included.
    frame_max: usize,
}

impl port::Channel for Channel {
    fn connected(&self) -> bool {
        self.channel.status().connected()
    }

    fn confirm_select(&self) -> Call<'_, ()> {
        Box::pin(async move {
            let select = self.channel.confirm_select(ConfirmSelectOptions::default());
            select.await.map_err(error)
        })
    }

    fn qos(&self, prefetch: u16) -> Call<'_, ()> {
        Box::pin(async move {
            let qos = self.channel.basic_qos(prefetch, BasicQosOptions::default());
            qos.await.map_err(error)
        })
    }

    fn declare_exchange<'a>(
        &'a self,
        name: &'a str,
        kind: ExchangeKind,
        passive: bool,
    ) -> Call<'a, ()> {
        Box::pin(async move {
            let options = ExchangeDeclareOptions {
                passive,
                durable: !passive,
                ..ExchangeDeclareOptions::default()
            };
            let kind = match kind {
                ExchangeKind::Direct => ::lapin::ExchangeKind::Direct,
                ExchangeKind::Fanout => ::lapin::ExchangeKind::Fanout,
            };
            let declare =
                self.channel
                    .exchange_declare(name.into(), kind, options, FieldTable::default());
            declare.await.map_err(error)
        })
    }

    fn declare_queue<'a>(
        &'a self,
        name: &'a str,
        passive: bool,
        args: &'a [(&'static str, Value<'a>)],
    ) -> Call<'a, ()> {
        Box::pin(async move {
            let options = if passive {
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                }
            } else {
                QueueDeclareOptions::durable()
            };
            let declare = self
                .channel
                .queue_declare(name.into(), options, table(args));
            declare.await.map(|_| ()).map_err(error)
        })
    }

    fn bind_queue<'a>(&'a self, queue: &'a str, exchange: &'a str) -> Call<'a, ()> {
        Box::pin(async move {
            let bind = self.channel.queue_bind(
                queue.into(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            );
            bind.await.map_err(error)
        })
    }

    fn consume<'a>(&'a self, queue: &'a str, tag: &'a str) -> Call<'a, Consumer> {
        Box::pin(async move {
            let consumer = self
                .channel
                .basic_consume(
                    queue.into(),
                    tag.into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(error)?;
            let deliveries = consumer.map(|delivery| delivery.map(delivery_of).map_err(error));
            Ok(Consumer {
                tag: tag.to_owned(),
                deliveries: Box::pin(deliveries),
            })
        })
    }

    fn cancel<'a>(&'a self, tag: &'a str) -> Call<'a, ()> {
        Box::pin(async move {
            let cancel = self
                .channel
                .basic_cancel(tag.into(), BasicCancelOptions::default());
            cancel.await.map_err(error)
        })
    }

    fn publish<'a>(&'a self, message: Message<'a>) -> Call<'a, Confirm> {
        Box::pin(async move {
            let carried = message
                .props
                .carried
                .and_then(|original| original.0.downcast_ref::<Received>())
                .map(|received| &received.properties);
            let properties = fitted(&message.props, carried, self.frame_max)?;
            let confirm = self
                .channel
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
                .await
                .map_err(error)?
                .await
                .map_err(error)?;
            Ok(match confirm {
                Confirmation::Ack(None) | Confirmation::NotRequested => Confirm {
                    acked: true,
                    returned: None,
                },
                Confirmation::Ack(Some(returned)) => Confirm {
                    acked: true,
                    returned: Some(Returned {
                        reply_code: returned.reply_code,
                        headers: headers_of(returned.delivery.properties.headers()),
                    }),
                },
                Confirmation::Nack(returned) => Confirm {
                    acked: false,
                    returned: returned.map(|returned| Returned {
                        reply_code: returned.reply_code,
                        headers: headers_of(returned.delivery.properties.headers()),
                    }),
                },
            })
        })
    }

    fn on_return(&self, hook: port::ReturnHook) {
        self.channel.on_return(move |returned| {
            hook(&Returned {
                reply_code: returned.reply_code,
                headers: headers_of(returned.delivery.properties.headers()),
            });
        });
    }

    fn close<'a>(&'a self, reason: &'a str) -> Call<'a, ()> {
        Box::pin(async move { self.channel.close(200, reason.into()).await.map_err(error) })
    }
}

/// What a delivery carries, in one allocation: its acker and all its properties.
struct Received {
    acker: ::lapin::Acker,
    properties: BasicProperties,
}

impl port::Acker for Received {
    fn ack(&self, multiple: bool) -> Call<'_, bool> {
        Box::pin(async move {
            let ack = self.acker.ack(BasicAckOptions { multiple });
            ack.await.map_err(error)
        })
    }

    fn requeue(&self) -> Call<'_, bool> {
        Box::pin(async move {
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            self.acker.nack(requeue).await.map_err(error)
        })
    }

    fn reject(&self) -> Call<'_, bool> {
        Box::pin(async move {
            let reject = self.acker.reject(BasicRejectOptions { requeue: false });
            reject.await.map_err(error)
        })
    }
}

fn delivery_of(delivery: ::lapin::message::Delivery) -> Delivery {
    let props = properties(&delivery.properties);
    let received = Arc::new(Received {
        acker: delivery.acker,
        properties: delivery.properties,
    });
    Delivery {
        tag: delivery.delivery_tag,
        redelivered: delivery.redelivered,
        body: delivery.data,
        props,
        original: Original(received.clone()),
        acker: received,
    }
}

fn text(value: &Option<ShortString>) -> Option<String> {
    value.as_ref().map(|s| s.as_str().to_owned())
}

/// The properties of a delivery the envelope reads.
fn properties(p: &BasicProperties) -> Properties {
    let traceparent =
        p.headers()
            .as_ref()
            .and_then(|headers| match headers.inner().get("traceparent")? {
                AMQPValue::LongString(value) => {
                    let value = std::str::from_utf8(value.as_bytes()).ok()?;
                    crate::pipeline::envelope::trace_context(value).map(str::to_owned)
                }
                AMQPValue::ShortString(value) => {
                    crate::pipeline::envelope::trace_context(value.as_str()).map(str::to_owned)
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

fn amqp_value(value: &Value<'_>) -> AMQPValue {
    match value {
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::ShortInt(n) => AMQPValue::ShortInt(*n),
        Value::LongLongInt(n) => AMQPValue::LongLongInt(*n),
        Value::LongString(bytes) => AMQPValue::LongString(bytes.as_ref().into()),
    }
}

fn table(entries: &[(&'static str, Value<'_>)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in entries {
        table.insert((*name).into(), amqp_value(value));
    }
    table
}

/// The headers of a returned message, of the kinds of `Value` (others left out).
fn headers_of(headers: &Option<FieldTable>) -> Vec<(String, Value<'static>)> {
    let Some(headers) = headers else {
        return Vec::new();
    };
    headers
        .inner()
        .iter()
        .filter_map(|(name, value)| {
            let value = match value {
                AMQPValue::Boolean(b) => Value::Bool(*b),
                AMQPValue::ShortInt(n) => Value::ShortInt(*n),
                AMQPValue::LongLongInt(n) => Value::LongLongInt(*n),
                AMQPValue::LongString(s) => Value::LongString(s.as_bytes().to_vec().into()),
                AMQPValue::ShortString(s) => {
                    Value::LongString(s.as_str().as_bytes().to_vec().into())
                }
                _ => return None,
            };
            Some((name.as_str().to_owned(), value))
        })
        .collect()
}

/// The bytes of a content header frame's payload (the frame less its 8 bytes of
/// framing) with `properties`: class id, weight and body size (12 bytes), then the
/// properties as lapin writes them.
fn header_payload(properties: &BasicProperties) -> usize {
    let write = ::lapin::protocol::basic::gen_properties(properties);
    match write(Vec::new().into()) {
        Ok(written) => 12 + usize::try_from(written.position).unwrap_or(usize::MAX),
        Err(_) => usize::MAX,
    }
}

/// At least `header_payload` of what `built` makes of `props` alone (nothing carried),
/// without encoding it: a reply's properties are far below any frame limit, and this
/// spares encoding them twice.
fn most_header_payload(props: &port::Props<'_>) -> usize {
    // Class, weight, body size and flags; delivery mode; each short string's length byte.
    let fixed = 12 + 2 + 1;
    let strings = [props.correlation_id, props.content_type]
        .iter()
        .map(|s| 1 + s.map_or(0, str::len))
        .sum::<usize>();
    // The table's length, then per entry its name (length byte), type tag and value.
    let headers = 4 + props
        .headers
        .iter()
        .map(|(name, value)| {
            2 + name.len()
                + match value {
                    Value::Bool(_) => 1,
                    Value::ShortInt(_) => 2,
                    Value::LongLongInt(_) => 8,
                    Value::LongString(bytes) => 4 + bytes.len(),
                }
        })
        .sum::<usize>();
    fixed + strings + headers
}

/// The AMQP properties of a message to publish, whose header frame fits `frame_max`: a
/// dead letter's start from those of the delivery it carries on (`carried`, less `user_id`
/// and `expiration`), its headers first; without those headers when they would not fit
/// (`x-mupdate-headers-dropped: true` then). Refused when still too large.
fn fitted(
    props: &port::Props<'_>,
    carried: Option<&BasicProperties>,
    frame_max: usize,
) -> Result<BasicProperties, Error> {
    let limit = frame_max.saturating_sub(8);
    let whole = built(props, carried, true);
    if carried.is_none() && most_header_payload(props) <= limit {
        return Ok(whole);
    }
    let size = header_payload(&whole);
    if size <= limit {
        return Ok(whole);
    }
    let lean = built(props, carried, false);
    let lean_size = header_payload(&lean);
    if carried.is_some() && lean_size <= limit {
        tracing::warn!(
            bytes = size,
            limit,
            "a dead letter's properties exceed the frame limit; the request's headers are dropped"
        );
        return Ok(lean);
    }
    Err(Error {
        kind: ErrorKind::Refused { code: FRAME_ERROR },
        message: format!(
            "the message's properties take {lean_size} bytes, over the frame limit of {limit}; not sent"
        ),
    })
}

/// AMQP's reply code for a frame that breaks the rules (a too large one among them).
const FRAME_ERROR: u16 = 501;

/// `props` over `carried`'s properties, when there are; the carried headers only when
/// `with_headers` (else `x-mupdate-headers-dropped: true` says they were there).
fn built(
    props: &port::Props<'_>,
    carried: Option<&BasicProperties>,
    with_headers: bool,
) -> BasicProperties {
    let mut out = carried.map_or_else(BasicProperties::default, without_user_id);
    // The worker's own headers (`x-mupdate-*`) are its word alone: one a producer set
    // (a forged `x-mupdate-user-id`, say) never rides on where the worker sets none. A
    // broker's record of an earlier dead-lettering stays behind too: a dead letter
    // with one is the broker's (`records_dead_lettering`).
    let mut headers = FieldTable::default();
    let carried_headers = carried.and_then(|p| p.headers().as_ref());
    if with_headers {
        for (name, value) in carried_headers
            .map(|h| h.inner().iter())
            .into_iter()
            .flatten()
        {
            if !name.as_str().starts_with("x-mupdate-") && !records_dead_lettering(name.as_str()) {
                headers.insert(name.clone(), value.clone());
            }
        }
    } else if carried_headers.is_some_and(|h| !h.inner().is_empty()) {
        headers.insert(HEADERS_DROPPED_HEADER.into(), AMQPValue::Boolean(true));
    }
    for (name, value) in &props.headers {
        headers.insert((*name).into(), amqp_value(value));
    }
    if let Some(correlation_id) = props.correlation_id {
        out = out.with_correlation_id(correlation_id.into());
    }
    if let Some(content_type) = props.content_type {
        out = out.with_content_type(content_type.into());
    }
    out = out.with_headers(headers);
    if props.persistent {
        out = out.with_delivery_mode(2);
    }
    out
}

/// `p` less its `user_id` (RabbitMQ takes it only from that user) and its `expiration` (a
/// dead letter must not expire out of the dead-letter queue: RabbitMQ's own
/// dead-lettering drops it too).
fn without_user_id(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    out
}

/// `host:port` of an AMQP URL, without credentials: how logs and metrics name a node.
pub fn node_name(url: &str) -> String {
    match url.parse::<::lapin::uri::AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => "unparsable-url".to_owned(),
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
    fn a_dead_letter_keeps_the_deliverys_properties_but_its_user_and_expiration() {
        let mut headers = FieldTable::default();
        headers.insert("mine".into(), AMQPValue::LongString("kept".into()));
        headers.insert("x-mupdate-reason".into(), AMQPValue::Boolean(false));
        headers.insert(
            "x-mupdate-user-id".into(),
            AMQPValue::LongString("admin".into()),
        );
        headers.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        headers.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString("expired".into()),
        );
        let delivered = BasicProperties::default()
            .with_user_id("alice".into())
            .with_expiration("60000".into())
            .with_message_id("m1".into())
            .with_reply_to("replies".into())
            .with_headers(headers);
        let letter = port::Props {
            persistent: true,
            headers: vec![
                ("x-mupdate-reason", Value::LongString(b"refused".into())),
                ("x-mupdate-applied", Value::Bool(false)),
            ],
            ..port::Props::default()
        };
        let published = fitted(&letter, Some(&delivered), 131_072).unwrap();
        assert_eq!(published.user_id(), &None);
        assert_eq!(published.expiration(), &None);
        assert_eq!(
            published.message_id().as_ref().map(|m| m.as_str()),
            Some("m1")
        );
        assert_eq!(
            published.reply_to().as_ref().map(|m| m.as_str()),
            Some("replies")
        );
        assert_eq!(published.delivery_mode(), &Some(2));
        let headers = published.headers().clone().unwrap();
        let header = |name: &str| headers.inner().get(name).cloned();
        assert_eq!(header("mine"), Some(AMQPValue::LongString("kept".into())));
        assert_eq!(
            header("x-mupdate-reason"),
            Some(AMQPValue::LongString("refused".into())),
            "the worker's headers go over the delivery's"
        );
        assert_eq!(header("x-mupdate-applied"), Some(AMQPValue::Boolean(false)));
        assert_eq!(
            header("x-mupdate-user-id"),
            None,
            "a producer's x-mupdate-* header is not carried where the worker sets none"
        );
        assert_eq!(
            (header("x-death"), header("x-first-death-reason")),
            (None, None),
            "a broker's record of a dead-lettering would say this one is the broker's"
        );
    }

    proptest::proptest! {
        /// The bound that spares encoding a reply's properties is never below their
        /// size: a header over the frame limit can't get past it.
        #[test]
        fn the_bound_on_a_replys_properties_is_never_below_their_size(
            correlation_id in proptest::option::of("[a-z]{0,255}"),
            content_type in proptest::option::of("[a-z/]{0,40}"),
            persistent in proptest::bool::ANY,
            status in proptest::num::i16::ANY,
            publish in proptest::num::i64::ANY,
            long in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            flag in proptest::bool::ANY,
        ) {
            let props = port::Props {
                correlation_id: correlation_id.as_deref(),
                content_type: content_type.as_deref(),
                persistent,
                headers: vec![
                    ("status", Value::ShortInt(status)),
                    ("x-mupdate-publish", Value::LongLongInt(publish)),
                    ("traceparent", Value::LongString(long.into())),
                    ("x-mupdate-flag", Value::Bool(flag)),
                ],
                carried: None,
            };
            let exact = header_payload(&built(&props, None, true));
            proptest::prop_assert!(most_header_payload(&props) >= exact);
        }
    }

    #[test]
    fn a_reply_has_its_own_properties_and_headers_come_back_from_a_return() {
        let props = port::Props {
            correlation_id: Some("k"),
            content_type: Some("application/json"),
            persistent: false,
            headers: vec![("status", Value::ShortInt(200))],
            carried: None,
        };
        let published = fitted(&props, None, 131_072).unwrap();
        assert_eq!(published.delivery_mode(), &None);
        assert_eq!(
            published.correlation_id().as_ref().map(|c| c.as_str()),
            Some("k")
        );
        let headers = published.headers().clone().unwrap();
        assert_eq!(
            headers.inner().get("status"),
            Some(&AMQPValue::ShortInt(200))
        );
        assert_eq!(
            headers_of(&Some(headers)),
            [("status".to_owned(), Value::ShortInt(200))]
        );
    }

    /// A dead letter of `delivered`, as the worker sends one: its reason, whether it was
    /// applied, its error, its user and its publish number.
    fn letter(error: &str) -> port::Props<'_> {
        port::Props {
            persistent: true,
            headers: vec![
                (
                    "x-mupdate-reason",
                    Value::LongString(b"reply_forbidden".into()),
                ),
                ("x-mupdate-applied", Value::Bool(false)),
                (
                    "x-mupdate-error",
                    Value::LongString(error.as_bytes().into()),
                ),
                (
                    "x-mupdate-user-id",
                    Value::LongString(vec![b'u'; 255].into()),
                ),
                ("x-mupdate-publish", Value::LongLongInt(i64::MAX)),
            ],
            ..port::Props::default()
        }
    }

    fn padded(bytes: usize) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert("mine".into(), AMQPValue::LongString("kept".into()));
        headers.insert(
            "pad".into(),
            AMQPValue::LongString(vec![b'p'; bytes].into()),
        );
        BasicProperties::default()
            .with_message_id("m1".into())
            .with_headers(headers)
    }

    #[test]
    fn a_dead_letter_whose_carried_headers_would_overflow_the_frame_goes_without_them() {
        let frame_max = 131_072;
        let error = r#"{"status":403,"id":"security.rights.forbidden"}"#;
        // Its own headers fill the largest frame a producer may send.
        let delivered = padded(frame_max - 8 - 12 - 40);
        assert!(header_payload(&delivered) <= frame_max - 8);
        let published = fitted(&letter(error), Some(&delivered), frame_max).unwrap();
        assert!(header_payload(&published) <= frame_max - 8);
        let headers = published.headers().clone().unwrap();
        let header = |name: &str| headers.inner().get(name).cloned();
        assert_eq!(header("pad"), None);
        assert_eq!(header("mine"), None);
        assert_eq!(
            header(HEADERS_DROPPED_HEADER),
            Some(AMQPValue::Boolean(true))
        );
        assert_eq!(
            header("x-mupdate-reason"),
            Some(AMQPValue::LongString("reply_forbidden".into()))
        );
        assert_eq!(
            header("x-mupdate-error"),
            Some(AMQPValue::LongString(error.into()))
        );
        assert_eq!(
            published.message_id().as_ref().map(|m| m.as_str()),
            Some("m1"),
            "its other properties are kept"
        );

        // Smaller ones are carried, and nothing says they were dropped.
        let published = fitted(&letter(error), Some(&padded(1000)), frame_max).unwrap();
        let headers = published.headers().clone().unwrap();
        assert!(headers.inner().contains_key("pad"));
        assert!(!headers.inner().contains_key(HEADERS_DROPPED_HEADER));
    }

    #[test]
    fn a_message_too_large_for_the_frame_even_without_carried_headers_is_not_sent() {
        let refused = fitted(&letter(&"e".repeat(9000)), None, 8192).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::Refused { code: FRAME_ERROR });
    }

    /// The worker's own properties, at their largest, fit the smallest frame lapin
    /// negotiates: only a request's own headers can overflow one, and those are dropped.
    #[test]
    fn the_workers_own_properties_at_their_largest_fit_the_smallest_frame() {
        let smallest = ::lapin::protocol::constants::FRAME_MIN_SIZE as usize;
        let short = |c: char| ShortString::from(c.to_string().repeat(255));
        // Every short string a delivery carries on, at its longest.
        let delivered = BasicProperties::default()
            .with_content_type(short('t'))
            .with_content_encoding(short('e'))
            .with_correlation_id(short('c'))
            .with_reply_to(short('r'))
            .with_message_id(short('m'))
            .with_type(short('k'))
            .with_app_id(short('a'))
            .with_priority(9)
            .with_timestamp(u64::MAX)
            .with_headers(padded(smallest).headers().clone().unwrap());
        let error = "e".repeat(super::super::ERROR_HEADER_MAX);
        let published = fitted(&letter(&error), Some(&delivered), smallest).unwrap();
        assert_eq!(
            published
                .headers()
                .as_ref()
                .unwrap()
                .inner()
                .get(HEADERS_DROPPED_HEADER),
            Some(&AMQPValue::Boolean(true))
        );

        let destination = crate::pipeline::reply::Destination::ReplyTo("r".repeat(255));
        let request_id = "i".repeat(super::super::REQUEST_ID_HEADER_MAX);
        let user = "u".repeat(255);
        let key = "k".repeat(255);
        let reply = super::super::Outgoing {
            destination: &destination,
            key: &key,
            request_id: &request_id,
            status: 200,
            body: b"{}",
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            user_id: Some(&user),
        };
        let mut props = super::super::reply_properties(&reply);
        props
            .headers
            .push(("x-mupdate-publish", Value::LongLongInt(i64::MAX)));
        let published = fitted(&props, None, smallest).unwrap();
        assert_eq!(
            published
                .headers()
                .as_ref()
                .unwrap()
                .inner()
                .get("requestId"),
            Some(&AMQPValue::LongString(request_id.as_str().into()))
        );
    }
}
