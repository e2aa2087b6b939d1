//! Confirmed reply publishing, on a connection of its own.
//!
//! **A return is matched to its publish by what it carries, never by the order of
//! confirms.** Replies share one confirming channel, many outstanding at once (at most
//! `amqp.max_unconfirmed_replies`), so that the broker confirms them together with `multiple`
//! acks. The AMQP client hands a returned (unroutable) message to whichever confirm of
//! the channel completes next, in no set order, so the confirm's own `returned` is not
//! believed. Instead each publish carries a header with a number of its own, and the
//! channel's return hook (`Channel::on_return`) marks the publish a returned message
//! names as soon as it comes. RabbitMQ sends a publish's return before the ack that
//! confirms it, and the client reads a channel's frames in order, so when a publish's
//! confirm completes, it is marked if and only if it was returned: the verdict is exact
//! whatever order the confirms complete in, `multiple` included.
//!
//! **A channel closed under a reply is not taken as that reply's refusal.** The broker
//! closes a channel over one publish (too large, an exchange that does not exist), and
//! every other publish outstanding on it fails with the same error. A reply that failed
//! so on the shared channel is published again alone, on a channel opened for it, whose
//! verdict is its own. That second publish may copy a reply the broker had routed before
//! it closed the channel (its confirm lost with it): the client then gets that reply
//! twice, as it may after any lost confirm. What is published where a close is to be
//! feared goes alone from the start: dead letters (to an exchange that may be gone),
//! replies to a destination known to refuse, and a reply sent again after a refusal. A
//! reply larger than the broker's limit closes the shared channel once per session; from
//! then on the limit is known and such replies are not sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::port::{self, Channel, Confirm, Connection, Props, Returned, Value};
use super::{BrokerError, CALL, Outgoing, reply_properties};
use crate::bounded::{Interrupted, bounded};
use crate::config::AmqpSettings;

/// A message to publish, confirmed.
#[derive(Clone)]
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

/// A confirming channel, and its publishes awaiting their confirm, each with whether the
/// broker returned it.
struct Lane {
    channel: Box<dyn Channel>,
    waiting: Arc<Mutex<Waiting>>,
    /// A publish on it was given up before its confirm (a timeout, its request handed
    /// back): the AMQP client keeps such a confirm for as long as the channel lives, so
    /// the channel is retired (closed once its other publishes are over) rather than
    /// collect them.
    given_up: std::sync::atomic::AtomicBool,
}

impl Lane {
    /// Publish `id` awaits its confirm: a return naming it is recorded from now on.
    fn expect(&self, id: u64) {
        lock(&self.waiting).insert(id, false);
    }

    /// Whether publish `id` was returned (and forgets it).
    fn claim(&self, id: u64) -> bool {
        lock(&self.waiting).remove(&id).unwrap_or(false)
    }
}

/// Publishes awaiting their confirm, by number, each with whether it was returned. The
/// numbers are the worker's own (no client picks them): a fast hash is safe.
type Waiting = HashMap<u64, bool, foldhash::fast::RandomState>;

/// A lock that never panics: nothing done under it can leave the map half changed, and
/// the return hook runs on the AMQP client's I/O thread, which must not die.
fn lock(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    waiting
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Forgets a publish once its wait is over, however it ends (a timeout, shutdown): a
/// return that comes later names no publish waiting and is not kept, so the map holds
/// only publishes awaiting their confirm.
struct Unclaimed<'a> {
    lane: &'a Lane,
    id: u64,
    /// Its confirm came (or the channel failed under it).
    answered: bool,
}

impl Drop for Unclaimed<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.lane.given_up.store(true, Ordering::Relaxed);
        }
        self.lane.claim(self.id);
    }
}

pub(super) struct Replies {
    connection: Box<dyn Connection>,
    /// The confirming channel replies share, once opened (and again after it closed).
    shared: tokio::sync::Mutex<Option<Arc<Lane>>>,
    /// Publishes outstanding at once.
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
            shared: tokio::sync::Mutex::new(None),
            slots: Semaphore::new(
                settings
                    .max_unconfirmed_replies
                    .clamp(1, crate::config::MOST_UNCONFIRMED_REPLIES),
            ),
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

    /// Publishes a reply on the shared channel and waits for its confirm.
    pub(super) async fn publish(&self, reply: &Outgoing<'_>) -> Result<Published, BrokerError> {
        if let Some(too_large) = self.too_large(reply) {
            return Ok(too_large);
        }
        self.publish_shared(reply_message(reply)).await
    }

    /// Publishes on a channel opened for it, then closed.
    pub(super) async fn publish_alone(
        &self,
        reply: &Outgoing<'_>,
    ) -> Result<Published, BrokerError> {
        if let Some(too_large) = self.too_large(reply) {
            return Ok(too_large);
        }
        self.publish_on_own_channel(reply_message(reply)).await
    }

    /// Publishes a reply on `connection`, a connection of its own opened for it, and
    /// closes that connection after. `Refused` only when the broker closed that
    /// connection over it with an error of its own (code 500 or more) while the replies'
    /// own connection stands: the address's doing. `Confirmed`, `TooLarge`, or
    /// `Unconfirmed` for anything else (a nack, a deadline, a connection lost or not
    /// opened): then the request goes back to the queue and nothing is proven.
    pub(super) async fn publish_quarantined(
        &self,
        connection: Box<dyn Connection>,
        reply: &Outgoing<'_>,
    ) -> Result<Published, BrokerError> {
        if let Some(too_large) = self.too_large(reply) {
            return Ok(too_large);
        }
        let published = match self.open_lane_on(&*connection).await {
            Ok(lane) => self.publish_message(&lane, &reply_message(reply)).await,
            Err(_) => Ok((Published::Unconfirmed, None)),
        };
        let closed_it = |err: &port::Error| {
            err.closed_by_the_broker() && !connection.connected() && self.connected()
        };
        let published = match published {
            Ok((Published::Confirmed, None)) => Ok(Published::Confirmed),
            Ok((too_large @ Published::TooLarge { .. }, _)) => Ok(too_large),
            Ok((_, Some(err))) if closed_it(&err) => Ok(Published::Refused),
            Ok(_) => Ok(Published::Unconfirmed),
            Err(err) => Err(err),
        };
        let close = connection.close("done");
        let _ = bounded("close a quarantined connection", CALL, &self.stop, close).await;
        published
    }

    fn too_large(&self, reply: &Outgoing<'_>) -> Option<Published> {
        let limit = self.max_reply.load(Ordering::Relaxed);
        (reply.body.len() > limit).then_some(Published::TooLarge { limit })
    }

    /// Publishes a message on a channel opened for it, then closed: its verdict is its
    /// own, whatever else is published meanwhile.
    pub(super) async fn publish_on_own_channel(
        &self,
        message: Message<'_>,
    ) -> Result<Published, BrokerError> {
        let lane = self.open_lane().await?;
        let published = self.publish_message(&lane, &message).await;
        self.discard(lane);
        published.map(|(published, _)| published)
    }

    /// A confirming channel whose returns are recorded.
    async fn open_lane(&self) -> Result<Lane, BrokerError> {
        self.open_lane_on(&*self.connection).await
    }

    /// The same, on `connection`.
    async fn open_lane_on(&self, connection: &dyn Connection) -> Result<Lane, BrokerError> {
        let open = async {
            let channel = connection.open_channel().await?;
            let waiting = Arc::new(Mutex::new(Waiting::default()));
            let record = waiting.clone();
            channel.on_return(Arc::new(move |message: &Returned| {
                let returned = publish_id(message)
                    .and_then(|id| lock(&record).get_mut(&id).map(|returned| *returned = true));
                if returned.is_none() {
                    tracing::warn!(
                        reply_code = message.reply_code,
                        number = ?publish_id(message),
                        "the broker returned a message no publish awaits (given up already)"
                    );
                }
            }));
            channel.confirm_select().await?;
            Ok::<_, port::Error>(Lane {
                channel,
                waiting,
                given_up: Default::default(),
            })
        };
        Ok(bounded("open a reply channel", CALL, &self.stop, open).await??)
    }

    /// Closes `lane`'s channel in the background, bounded: nothing waits on it.
    fn discard(&self, lane: Lane) {
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let close = lane.channel.close("done");
            let _ = bounded("close a reply channel", CALL, &stop, close).await;
        });
    }

    /// The shared channel, opened if there is none standing.
    async fn shared(&self) -> Result<Arc<Lane>, BrokerError> {
        let mut shared = bounded("the reply channel", CALL, &self.stop, self.shared.lock()).await?;
        if let Some(lane) = shared
            .as_ref()
            .filter(|lane| lane.channel.connected() && !lane.given_up.load(Ordering::Relaxed))
        {
            return Ok(lane.clone());
        }
        let lane = Arc::new(self.open_lane().await?);
        if let Some(old) = shared.replace(lane.clone()) {
            self.retire(old);
        }
        Ok(lane)
    }

    /// Closes a lane no longer used once the publishes still on it are over (each ends
    /// within `confirm_timeout`), in the background, bounded.
    fn retire(&self, lane: Arc<Lane>) {
        let stop = self.stop.clone();
        let within = self.confirm_timeout + CALL;
        tokio::spawn(async move {
            let over = async {
                while Arc::strong_count(&lane) > 1 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            let _ = bounded("the reply channel's last publishes", within, &stop, over).await;
            let close = lane.channel.close("retired");
            let _ = bounded("close a reply channel", CALL, &stop, close).await;
        });
    }

    /// Publishes a message on the shared channel and waits for its confirm; published
    /// again alone when the channel closed under it (see the module's doc).
    pub(super) async fn publish_shared(
        &self,
        message: Message<'_>,
    ) -> Result<Published, BrokerError> {
        // As many outstanding as a confirm may take (confirms that are late, a blocked
        // connection): this one is unconfirmed too, and goes back to the queue; the
        // connection is not lost for it.
        let slot = match bounded(
            "room for a reply",
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
        let lane = self.shared().await?;
        match self.publish_message(&lane, &message).await? {
            (Published::Refused, Some(_)) => self.publish_on_own_channel(message).await,
            (published, _) => Ok(published),
        }
    }

    /// Publishes `message` on `lane` and waits for its confirm; and the error when the
    /// channel closed under it (the verdict is then not necessarily its own).
    async fn publish_message(
        &self,
        lane: &Lane,
        message: &Message<'_>,
    ) -> Result<(Published, Option<port::Error>), BrokerError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lane.expect(id);
        let mut unclaimed = Unclaimed {
            lane,
            id,
            answered: false,
        };
        let size = message.body.len();
        let publish = lane.channel.publish(port::Message {
            exchange: message.exchange,
            routing_key: message.routing_key,
            mandatory: message.mandatory,
            body: message.body,
            props: with_publish_id(&message.props, id),
        });
        let confirmed = match bounded(
            "a publish's confirm",
            self.confirm_timeout,
            &self.stop,
            publish,
        )
        .await
        {
            Ok(confirmed) => {
                unclaimed.answered = true;
                confirmed
            }
            Err(Interrupted::TimedOut { .. }) if self.connected() => {
                tracing::warn!(
                    timeout = ?self.confirm_timeout,
                    blocked = self.blocked(),
                    "a publish's confirm did not come in time"
                );
                return Ok((Published::Unconfirmed, None));
            }
            Err(interrupted) => return Err(interrupted.into()),
        };
        Ok(match confirmed {
            // The confirm's own `returned` may be another publish's: the record says.
            Ok(Confirm { acked: true, .. }) if lane.claim(id) => (Published::Unroutable, None),
            Ok(Confirm { acked: true, .. }) => (Published::Confirmed, None),
            Ok(Confirm { acked: false, .. }) => (Published::Refused, None),
            Err(err) if self.connected() => (self.refusal(&err, size), Some(err)),
            Err(err) => return Err(err.into()),
        })
    }

    /// What a channel closed over a reply of `size` bytes means.
    fn refusal(&self, err: &port::Error, size: usize) -> Published {
        // Only a channel closed with PRECONDITION_FAILED says a size (any other text may
        // carry what a producer wrote, such as a routing key).
        let limit = match err.kind {
            port::ErrorKind::Refused { code: 406 } => refused_size(&err.message),
            _ => None,
        };
        match limit {
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
fn with_publish_id<'a>(props: &Props<'a>, id: u64) -> Props<'a> {
    let mut headers = Vec::with_capacity(props.headers.len() + 1);
    headers.extend(props.headers.iter().cloned());
    headers.push((PUBLISH_HEADER, Value::LongLongInt(id as i64)));
    Props { headers, ..*props }
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

    /// A connection whose first channel (the shared one) fails every publish as a channel
    /// closed over another publish would, or nacks it; later channels confirm.
    struct Scripted {
        opened: Arc<AtomicUsize>,
        closed: Arc<AtomicUsize>,
        first: First,
        hooks: Arc<Mutex<Vec<port::ReturnHook>>>,
        alive: Arc<std::sync::atomic::AtomicBool>,
    }

    /// What the first channel opened (the shared one) does with every publish; the
    /// others confirm.
    #[derive(Clone, Copy)]
    enum First {
        /// Fails it as a channel closed over another publish would.
        ClosedUnder,
        Nacks,
        /// Never confirms it.
        Silent,
        /// Closes the whole connection over it, as RabbitMQ 3.10 does over a direct
        /// reply-to address it can't decode.
        KillsConnection,
        /// Confirms it, as the others do.
        Confirms,
    }

    struct ScriptedChannel {
        number: usize,
        first: First,
        closed: Arc<AtomicUsize>,
        hooks: Arc<Mutex<Vec<port::ReturnHook>>>,
        alive: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Connection for Scripted {
        fn open_channel(&self) -> port::Call<'_, Box<dyn Channel>> {
            let number = self.opened.fetch_add(1, Ordering::SeqCst) + 1;
            let (first, hooks, closed) = (self.first, self.hooks.clone(), self.closed.clone());
            let alive = self.alive.clone();
            Box::pin(async move {
                Ok(Box::new(ScriptedChannel {
                    number,
                    first,
                    closed,
                    hooks,
                    alive,
                }) as Box<dyn Channel>)
            })
        }
        fn connected(&self) -> bool {
            self.alive.load(Ordering::SeqCst)
        }
        fn blocked(&self) -> bool {
            false
        }
        fn close<'a>(&'a self, _: &'a str) -> port::Call<'a, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    impl Channel for ScriptedChannel {
        fn connected(&self) -> bool {
            true
        }
        fn confirm_select(&self) -> port::Call<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn qos(&self, _: u16) -> port::Call<'_, ()> {
            unreachable!()
        }
        fn declare_exchange<'a>(
            &'a self,
            _: &'a str,
            _: port::ExchangeKind,
            _: bool,
        ) -> port::Call<'a, ()> {
            unreachable!()
        }
        fn declare_queue<'a>(
            &'a self,
            _: &'a str,
            _: bool,
            _: &'a [(&'static str, Value<'a>)],
        ) -> port::Call<'a, ()> {
            unreachable!()
        }
        fn bind_queue<'a>(&'a self, _: &'a str, _: &'a str) -> port::Call<'a, ()> {
            unreachable!()
        }
        fn consume<'a>(&'a self, _: &'a str, _: &'a str) -> port::Call<'a, port::Consumer> {
            unreachable!()
        }
        fn cancel<'a>(&'a self, _: &'a str) -> port::Call<'a, ()> {
            unreachable!()
        }
        fn publish<'a>(&'a self, _: port::Message<'a>) -> port::Call<'a, Confirm> {
            let first = (self.number == 1).then_some(self.first);
            let alive = self.alive.clone();
            Box::pin(async move {
                match first {
                    Some(First::KillsConnection) => {
                        alive.store(false, Ordering::SeqCst);
                        Err(port::Error {
                            kind: port::ErrorKind::Refused { code: 541 },
                            message: "INTERNAL_ERROR".into(),
                        })
                    }
                    Some(First::ClosedUnder) => Err(port::Error {
                        kind: port::ErrorKind::Refused { code: 404 },
                        message: "NOT_FOUND - no exchange 'another-publish'".into(),
                    }),
                    Some(First::Nacks) => Ok(Confirm {
                        acked: false,
                        returned: None,
                    }),
                    Some(First::Silent) => std::future::pending().await,
                    None | Some(First::Confirms) => Ok(Confirm {
                        acked: true,
                        returned: None,
                    }),
                }
            })
        }
        fn on_return(&self, hook: port::ReturnHook) {
            self.hooks.lock().unwrap().push(hook);
        }
        fn close<'a>(&'a self, _: &'a str) -> port::Call<'a, ()> {
            self.closed.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
    }

    /// Replies over a scripted connection; how many channels it opened, and closed.
    fn scripted(first: First) -> (Replies, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let connection = Scripted {
            opened: opened.clone(),
            closed: closed.clone(),
            first,
            hooks: Arc::default(),
            alive: Arc::new(true.into()),
        };
        let settings = crate::config::Settings::defaults().amqp;
        let replies = Replies::new(Box::new(connection), &settings, CancellationToken::new());
        (replies, opened, closed)
    }

    /// What a reply published on a connection of its own (a quarantine) comes to, when
    /// that connection's first channel does `first`.
    async fn quarantined(first: First) -> Published {
        // The replies' own connection confirms everything (its first channel too).
        let (mut replies, _, _) = scripted(First::Silent);
        replies.confirm_timeout = Duration::from_millis(50);
        let quarantine = Scripted {
            opened: Arc::default(),
            closed: Arc::default(),
            first,
            hooks: Arc::default(),
            alive: Arc::new(true.into()),
        };
        let destination = crate::pipeline::reply::Destination::ReplyTo(
            "amq.rabbitmq.reply-to.g1.ZmFrZQ==".into(),
        );
        let reply = Outgoing {
            destination: &destination,
            key: "k",
            request_id: "r",
            status: 200,
            body: b"{}",
            traceparent: None,
            user_id: None,
        };
        replies
            .publish_quarantined(Box::new(quarantine), &reply)
            .await
            .unwrap()
    }

    /// Only a connection the broker closed over the reply (code 500 or more, the
    /// replies' own connection standing) proves the address closes connections; a nack,
    /// a channel closed, a confirm that never comes are not its doing.
    #[tokio::test(start_paused = true)]
    async fn a_quarantined_reply_is_refused_only_when_its_connection_is_closed_over_it() {
        assert_eq!(quarantined(First::Confirms).await, Published::Confirmed);
        assert_eq!(
            quarantined(First::KillsConnection).await,
            Published::Refused
        );
        assert_eq!(
            quarantined(First::ClosedUnder).await,
            Published::Unconfirmed
        );
        assert_eq!(quarantined(First::Nacks).await, Published::Unconfirmed);
        assert_eq!(quarantined(First::Silent).await, Published::Unconfirmed);
    }

    fn message() -> Message<'static> {
        Message {
            exchange: "",
            routing_key: "replies",
            mandatory: true,
            body: b"{}",
            props: Props::default(),
        }
    }

    /// The shared channel closed under a reply (over another publish): the reply is
    /// published again alone, and that verdict is its own; it is not taken as refused.
    #[tokio::test]
    async fn a_channel_closed_under_a_reply_is_not_its_refusal() {
        let (replies, opened, _) = scripted(First::ClosedUnder);
        let published = replies.publish_shared(message()).await.unwrap();
        assert_eq!(published, Published::Confirmed);
        assert_eq!(opened.load(Ordering::SeqCst), 2, "published again alone");
    }

    fn returned(id: u64) -> Returned {
        let props = with_publish_id(&Props::default(), id);
        let (name, value) = props.headers[0].clone();
        Returned {
            reply_code: 312,
            headers: vec![(name.to_owned(), value)],
        }
    }

    /// A lane keeps only the publishes awaiting their confirm: a return that names one
    /// marks it, once; one that names a publish given up (or none) is not kept, so
    /// returns that come after their publish's wait ended can't pile up.
    #[tokio::test]
    async fn a_lane_keeps_only_what_awaits_its_confirm() {
        let hooks = Arc::new(Mutex::new(Vec::new()));
        let connection = Scripted {
            opened: Arc::default(),
            closed: Arc::default(),
            first: First::Silent,
            hooks: hooks.clone(),
            alive: Arc::new(true.into()),
        };
        let settings = crate::config::Settings::defaults().amqp;
        let replies = Replies::new(Box::new(connection), &settings, CancellationToken::new());
        let lane = replies.open_lane().await.unwrap();
        let hook = hooks.lock().unwrap()[0].clone();
        hook(&returned(5));
        hook(&Returned {
            reply_code: 312,
            headers: Vec::new(),
        });
        assert!(lock(&lane.waiting).is_empty(), "no publish 5 awaits");
        lane.expect(6);
        lane.expect(7);
        hook(&returned(6));
        assert!(lane.claim(6), "6 was returned");
        assert!(!lane.claim(7), "7 was not");
        {
            let _given_up = Unclaimed {
                lane: &lane,
                id: 8,
                answered: false,
            };
            lane.expect(8);
        }
        hook(&returned(8));
        assert!(lock(&lane.waiting).is_empty(), "{:?}", lock(&lane.waiting));
        assert!(lane.given_up.load(Ordering::Relaxed), "8 was given up");
    }

    /// A publish given up before its confirm retires the shared channel: the next reply
    /// goes on a new one, and the old one is closed once nothing is left on it (the
    /// AMQP client would otherwise keep every given-up confirm for the channel's life).
    #[tokio::test(start_paused = true)]
    async fn a_publish_given_up_retires_the_shared_channel() {
        let (mut replies, opened, closed) = scripted(First::Silent);
        replies.confirm_timeout = Duration::from_millis(50);
        let first = replies.publish_shared(message()).await.unwrap();
        assert_eq!(first, Published::Unconfirmed);
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        let second = replies.publish_shared(message()).await.unwrap();
        assert_eq!(second, Published::Confirmed);
        assert_eq!(opened.load(Ordering::SeqCst), 2, "a new shared channel");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(closed.load(Ordering::SeqCst), 1, "the old one closed");
        let third = replies.publish_shared(message()).await.unwrap();
        assert_eq!(third, Published::Confirmed);
        assert_eq!(opened.load(Ordering::SeqCst), 2, "the new one kept");
    }

    /// A nack names its own publish: refused, with no second attempt here.
    #[tokio::test]
    async fn a_nack_on_the_shared_channel_is_the_replys_own() {
        let (replies, opened, _) = scripted(First::Nacks);
        let published = replies.publish_shared(message()).await.unwrap();
        assert_eq!(published, Published::Refused);
        assert_eq!(opened.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_publish_is_named_by_its_own_header() {
        let props = with_publish_id(&Props::default(), 41);
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
