//! The broker port: the one way the worker talks to the message broker.
//!
//! The lifecycle code (`Broker`, the reply pool, the topology, the session, the handler,
//! the ticket) calls the broker through these traits only, and knows nothing of AMQP
//! client types: `BrokerLink` connects to a node, a `Connection` opens channels and says
//! whether it stands or is blocked, a `Channel` does the few AMQP methods the worker uses
//! (and nothing more), and each `Delivery` carries the `Acker` that settles it. The lapin
//! implementation (module `lapin`) is the production one; a model of the broker can stand
//! in its place (the simulation, and `port_tests`).
//!
//! Deadlines are not the port's: `Broker` bounds every call it makes (module `bounded`),
//! so a broker that never answers can't hold it. The traits are object safe (calls are
//! boxed futures), so that the worker is not generic over its broker.

use std::any::Any;
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;

use crate::pipeline::envelope::Properties;

/// A call to the broker, answered later.
pub type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// How a call to the broker failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    /// What the broker or the client said (a refusal's text is read: a size limit, an
    /// inequivalent argument).
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The connection or channel is gone (or never came up).
    Closed,
    /// The broker went silent (a missed heartbeat).
    Timeout,
    /// The broker refused the call, closing its channel or connection with this AMQP
    /// reply code (404 NOT_FOUND, 406 PRECONDITION_FAILED, …).
    Refused { code: u16 },
}

impl Error {
    /// Whether the broker closed the connection with an error of its own (a code of 500
    /// or more, such as 541 `INTERNAL_ERROR`), rather than the network or a deadline.
    pub fn closed_by_the_broker(&self) -> bool {
        matches!(self.kind, ErrorKind::Refused { code } if code >= 500)
    }

    pub fn closed(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Closed,
            message: message.into(),
        }
    }
}

/// Connects to broker nodes.
pub trait BrokerLink: Send + Sync {
    /// Opens a connection to the node at `url` (one of `amqp.url`'s), named `name` on the
    /// broker.
    fn connect<'a>(&'a self, url: &'a str, name: &'static str) -> Call<'a, Box<dyn Connection>>;
}

/// A connection to a broker node.
pub trait Connection: Send + Sync {
    fn open_channel(&self) -> Call<'_, Box<dyn Channel>>;
    /// Whether the connection still stands.
    fn connected(&self) -> bool;
    /// Whether the broker blocked it (a memory or disk alarm): what it publishes is not
    /// read until the broker unblocks it.
    fn blocked(&self) -> bool;
    fn close<'a>(&'a self, reason: &'a str) -> Call<'a, ()>;
}

/// The kinds of exchange the worker declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
}

/// A channel of a connection.
pub trait Channel: Send + Sync {
    /// Whether the channel (and its connection) still stands.
    fn connected(&self) -> bool;
    /// Puts the channel in confirm mode: each publish is then confirmed.
    fn confirm_select(&self) -> Call<'_, ()>;
    /// At most `prefetch` unacked deliveries to the consumers started from now on.
    fn qos(&self, prefetch: u16) -> Call<'_, ()>;
    /// Declares a durable exchange, or checks that one exists (`passive`).
    fn declare_exchange<'a>(
        &'a self,
        name: &'a str,
        kind: ExchangeKind,
        passive: bool,
    ) -> Call<'a, ()>;
    /// Declares a durable queue with `args`, or checks that one exists (`passive`, the
    /// arguments unused).
    fn declare_queue<'a>(
        &'a self,
        name: &'a str,
        passive: bool,
        args: &'a [(&'static str, Value<'a>)],
    ) -> Call<'a, ()>;
    /// Binds `queue` to `exchange` with an empty routing key.
    fn bind_queue<'a>(&'a self, queue: &'a str, exchange: &'a str) -> Call<'a, ()>;
    /// Consumes `queue` with manual acks, as consumer `tag`.
    fn consume<'a>(&'a self, queue: &'a str, tag: &'a str) -> Call<'a, Consumer>;
    /// Cancels consumer `tag`: its stream ends once the broker's cancel-ok came.
    fn cancel<'a>(&'a self, tag: &'a str) -> Call<'a, ()>;
    /// Publishes `message` and waits for its confirm (on a confirming channel): acked or
    /// nacked, and a returned message (mandatory, routed nowhere), though not
    /// necessarily this one's: the AMQP client hands each return to some confirm of the
    /// channel completing after it (`on_return` is how a return is paired exactly). An
    /// error when the channel closed, over this publish or another.
    fn publish<'a>(&'a self, message: Message<'a>) -> Call<'a, Confirm>;
    /// Calls `hook` with each message the broker returns on this channel, as soon as it
    /// has come and before any later frame of the channel is read: RabbitMQ sends a
    /// return before the ack that confirms its publish, so when a publish's confirm
    /// completes, its return (if any) has been seen by `hook`. `hook` must not block.
    fn on_return(&self, hook: ReturnHook);
    fn close<'a>(&'a self, reason: &'a str) -> Call<'a, ()>;
}

/// The deliveries of a consumer, until it is cancelled (then the stream ends) or its
/// channel fails (an error).
pub type Deliveries = Pin<Box<dyn Stream<Item = Result<Delivery, Error>> + Send>>;

pub struct Consumer {
    pub tag: String,
    pub deliveries: Deliveries,
}

/// Settles one delivery. Each call says whether the settlement was handed to the
/// connection (`false`: the channel is gone, and the broker redelivers).
pub trait Acker: Send + Sync {
    /// Acks this delivery, and with `multiple` every earlier unsettled one of its channel.
    fn ack(&self, multiple: bool) -> Call<'_, bool>;
    /// Hands it back to the queue (a nack with requeue).
    fn requeue(&self) -> Call<'_, bool>;
    /// Rejects it without requeue: to the queue's dead-letter exchange.
    fn reject(&self) -> Call<'_, bool>;
}

/// A message the broker delivered.
pub struct Delivery {
    /// Its delivery tag on its channel.
    pub tag: u64,
    pub redelivered: bool,
    pub body: Vec<u8>,
    /// The properties the envelope reads.
    pub props: Properties,
    /// All of its properties, as the broker gave them: what a dead letter carries on.
    pub original: Original,
    pub acker: Arc<dyn Acker>,
}

/// A delivery's properties, opaque: only the implementation that delivered it reads
/// them (when a dead letter carries them on).
#[derive(Clone)]
pub struct Original(pub Arc<dyn Any + Send + Sync>);

/// A header or argument value (the kinds the worker sends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Bool(bool),
    ShortInt(i16),
    LongLongInt(i64),
    LongString(Cow<'a, [u8]>),
}

/// A message to publish.
#[derive(Clone)]
pub struct Message<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// Returned when it reaches no queue.
    pub mandatory: bool,
    pub body: &'a [u8],
    pub props: Props<'a>,
}

/// The properties of a message to publish.
#[derive(Default, Clone)]
pub struct Props<'a> {
    pub correlation_id: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// Delivery mode 2.
    pub persistent: bool,
    /// Set over those carried, if any.
    pub headers: Vec<(&'static str, Value<'a>)>,
    /// A dead letter's: the properties of the delivery it carries on, less its `user_id`
    /// and `expiration` (RabbitMQ takes the first only from that user; the second would
    /// let it expire where it is kept); its headers come first.
    pub carried: Option<&'a Original>,
}

/// The broker's answer to a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirm {
    /// Acked (taken by the broker), or nacked.
    pub acked: bool,
    /// The message, when the broker returned it as unroutable.
    pub returned: Option<Returned>,
}

/// What `Channel::on_return` calls with each returned message.
pub type ReturnHook = std::sync::Arc<dyn Fn(&Returned) + Send + Sync>;

/// A message the broker returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Returned {
    pub reply_code: u16,
    /// Its headers, of the kinds of `Value`.
    pub headers: Vec<(String, Value<'static>)>,
}

impl Returned {
    pub fn header(&self, name: &str) -> Option<&Value<'static>> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}
