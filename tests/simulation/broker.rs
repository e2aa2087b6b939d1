//! The simulated broker: a `BrokerLink` (the worker's broker port) over one in-memory
//! RabbitMQ, driven by the run's seeded generator and tokio's virtual time. Each
//! behaviour copies a real-server test of tests/model.rs:
//!
//! - queues with the arguments the worker declares and those the tests use
//!   (`x-max-length` with `x-overflow` `reject-publish`: a full queue NACKS a publish,
//!   `a_queue_that_rejects_publishes_nacks_them`; `x-delivery-limit`: a message handed
//!   back more often is dead-lettered with `x-delivery-count`,
//!   `a_quorum_queue_dead_letters_past_its_delivery_limit`; `x-dead-letter-exchange`);
//!   a queue declared again with other arguments is refused (406) and its channel closed;
//! - the default exchange (routing by queue name), fanout and direct exchanges with
//!   bindings; a publish to an exchange that does not exist closes its channel (404);
//! - connections and channels; `qos` fixes the prefetch of the consumers started after
//!   it; consumers of a queue are served round robin, each up to its prefetch;
//! - a delivery handed back (nack with requeue, or its channel or connection closed)
//!   comes again flagged `redelivered`
//!   (`a_delivery_handed_back_comes_again_flagged_redelivered`,
//!   `a_closed_channel_fails_its_settlements_and_hands_its_deliveries_back`); a closed
//!   channel's settlements are not sent: `Ok(false)` (the same test);
//! - confirms come late, by a `multiple` ack that completes every confirm up to it, in
//!   an order drawn at random, and channels independently of each other; a mandatory
//!   publish routed nowhere is returned, then acked
//!   (`an_unroutable_mandatory_publish_is_returned_then_acked`): the channel's return
//!   hook hears it at once, and the return is also reported on SOME confirm of its
//!   channel completing next, not necessarily its own
//!   (`returns_come_back_on_some_confirm_of_their_channel`);
//! - an alarm blocks the connections that publish: nothing they publish is read (no
//!   confirm) until it clears, `blocked()` is true meanwhile, consumers go on
//!   (`a_memory_alarm_holds_publishes_and_lets_consumers_go_on`);
//! - the broker cancels a consumer (its queue deleted, or a quorum queue's leader gone):
//!   its stream ends, its channel stays (`a_deleted_queue_ends_its_consumer_and_keeps_the_channel`);
//! - a connection or a channel dropped at any moment: its unacked deliveries requeued,
//!   redelivered; its publishes waiting for their confirm fail; its consumers' streams
//!   fail.
//!
//! What the invariants read is recorded as it happens: each settlement (a settlement of
//! a delivery that is not unacked on its open channel is a double settlement: RabbitMQ
//! closes the channel with 406 `unknown delivery tag`, and the run fails), each publish
//! of a worker and what became of it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use mupdate_worker::broker::port::{
    Acker, BrokerLink, Call, Channel, Confirm, Connection, Consumer, Delivery, Error, ErrorKind,
    ExchangeKind, Message, Original, ReturnHook, Returned, Value,
};
use mupdate_worker::pipeline::envelope::Properties;
use rand::RngExt;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot};

use crate::trace::Trace;

/// How often the broker's own faults happen.
#[derive(Debug, Clone, Copy, Default)]
pub struct BrokerFaults {
    /// A confirm that takes long (up to 3 s).
    pub slow_confirm: f64,
    /// A publish the broker nacks (an internal error), taking nothing.
    pub nack: f64,
    /// A connection refused.
    pub refuse_connect: f64,
    /// An ack lost: the connection drops with it unread (lapin said it was sent).
    pub lost_ack: f64,
}

/// A message's properties, as the broker keeps them (and a delivery's `Original`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Props {
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub message_id: Option<String>,
    pub user_id: Option<String>,
    pub headers: Vec<(String, Value<'static>)>,
}

impl Props {
    pub fn header(&self, name: &str) -> Option<&Value<'static>> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn text(&self, name: &str) -> Option<String> {
        match self.header(name)? {
            Value::LongString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
            _ => None,
        }
    }

    fn set(&mut self, name: &str, value: Value<'static>) {
        self.headers.retain(|(n, _)| n != name);
        self.headers.push((name.to_owned(), value));
    }
}

/// A message in the broker.
#[derive(Debug, Clone)]
pub struct Msg {
    /// The broker's own number for it.
    pub id: u64,
    pub body: Arc<Vec<u8>>,
    pub props: Props,
    redelivered: bool,
    /// Times handed back (a quorum queue's delivery count).
    returns: u32,
}

/// What the broker did, for the invariants.
#[derive(Debug, Clone)]
pub enum Event {
    /// Delivered to a consumer of `worker`'s.
    Delivered {
        msg: u64,
        worker: u32,
        redelivered: bool,
    },
    /// Settled by `worker`: `ack`, `requeue`, `reject`.
    Settled {
        msg: u64,
        worker: u32,
        how: &'static str,
    },
    /// Handed back by a channel's end.
    HandedBack { msg: u64 },
    /// Acked by `worker`, the ack lost with its connection.
    AckLost { msg: u64, worker: u32 },
    /// Dead-lettered by the broker itself (a reject, or the delivery limit).
    BrokerDeadLettered { msg: u64 },
    /// A publish of a worker's routed to a queue (its confirm may never reach the
    /// worker: a client has it all the same).
    Routed { props: Props },
    /// A publish of `worker`'s refused for its size (over `max_message_size`): its
    /// channel closed.
    TooLarge {
        worker: u32,
        props: Props,
        body: Arc<Vec<u8>>,
    },
    /// Not the broker's: rights rules of `worker`'s (noted by the run when a worker
    /// starts, and twice for each SIGHUP: when sent, and once the worker has `read` it
    /// and the file): whether they deny the producer `bob`. From a SIGHUP to its
    /// reading, the worker holds its rules of before or these.
    Rights {
        worker: u32,
        denies_bob: bool,
        read: bool,
    },
    /// A publish of a worker's acked, and its confirm handed to the worker: routed to a
    /// queue, or returned.
    Published {
        worker: u32,
        props: Props,
        routed: bool,
        body: Arc<Vec<u8>>,
    },
}

struct Queue {
    ready: VecDeque<Msg>,
    args: Vec<(String, Value<'static>)>,
    max_length: Option<usize>,
    reject_publish: bool,
    delivery_limit: Option<u32>,
    dlx: Option<String>,
    /// Round robin among its consumers.
    next_consumer: usize,
}

struct Exchange {
    kind: ExchangeKind,
    bound: Vec<String>,
}

struct Conn {
    worker: u32,
    open: bool,
    /// Whether it publishes (an alarm blocks it).
    publishes: bool,
    blocked: bool,
    /// Publishes not read while the connection is blocked: channel, publish number.
    held: Vec<(u64, u64)>,
}

struct Pending {
    /// What the broker decided (acked), once it read the publish.
    decided: Option<bool>,
    /// What the invariants are told once the worker has its confirm.
    outcome: Option<Event>,
    answer: oneshot::Sender<Confirm>,
    /// Its body's bytes, which its publisher holds until the confirm.
    size: usize,
    /// The publish, until it is read (a blocked connection).
    unread: Option<Unread>,
}

struct Unread {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    body: Arc<Vec<u8>>,
    props: Props,
}

struct Chan {
    conn: u64,
    open: bool,
    prefetch: u16,
    next_tag: u64,
    /// Delivery tag → (queue, message, consumer index).
    unacked: BTreeMap<u64, (String, Msg, usize)>,
    next_publish: u64,
    pending: BTreeMap<u64, Pending>,
    /// Returned messages not yet reported on a confirm.
    returns: VecDeque<Returned>,
    /// Told of each return as it comes (`Channel::on_return`).
    hook: Option<ReturnHook>,
}

struct ConsumerEntry {
    chan: u64,
    queue: String,
    prefetch: u16,
    active: bool,
    sender: Option<mpsc::UnboundedSender<Result<Delivery, Error>>>,
}

#[derive(Default)]
pub struct State {
    queues: BTreeMap<String, Queue>,
    exchanges: BTreeMap<String, Exchange>,
    conns: BTreeMap<u64, Conn>,
    chans: BTreeMap<u64, Chan>,
    consumers: Vec<ConsumerEntry>,
    next_id: u64,
    pub events: Vec<Event>,
    pub violations: Vec<String>,
    /// Worker connections blocked now (an alarm).
    alarm: bool,
    /// Confirms that came late (a broker too busy): each may hand requests back.
    pub slow_confirms: u64,
    /// Acks lost with their connection.
    pub lost_acks: u64,
    /// Faults that end a worker's session (a connection dropped or refused, a consuming
    /// channel closed, a consumer cancelled).
    pub session_faults: u64,
    /// Messages at their end: acked, or dead-lettered by the broker.
    pub ended: std::collections::BTreeSet<u64>,
    /// RabbitMQ's `max_message_size`, as the workers' channels read it when they open
    /// (the clients' requests, published before it was lowered, are not held to it).
    pub max_message_size: Option<usize>,
}

/// The simulated broker; cheap to clone.
#[derive(Clone)]
pub struct SimBroker(Arc<Inner>);

pub struct Inner {
    pub state: Mutex<State>,
    rng: Arc<Mutex<StdRng>>,
    trace: Trace,
    faults: BrokerFaults,
}

fn closed(what: &str) -> Error {
    Error::closed(what)
}

fn refused(code: u16, message: String) -> Error {
    Error {
        kind: ErrorKind::Refused { code },
        message,
    }
}

pub fn owned(value: &Value<'_>) -> Value<'static> {
    match value {
        Value::Bool(b) => Value::Bool(*b),
        Value::ShortInt(n) => Value::ShortInt(*n),
        Value::LongLongInt(n) => Value::LongLongInt(*n),
        Value::LongString(bytes) => Value::LongString(bytes.to_vec().into()),
    }
}

impl SimBroker {
    pub fn new(rng: Arc<Mutex<StdRng>>, trace: Trace, faults: BrokerFaults) -> Self {
        SimBroker(Arc::new(Inner {
            state: Mutex::default(),
            rng,
            trace,
            faults,
        }))
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap()
    }

    /// The link one worker connects through.
    pub fn link(&self, worker: u32) -> Arc<dyn BrokerLink> {
        Arc::new(Link {
            broker: self.clone(),
            worker,
        })
    }

    /// Declares a queue as a test would (its own reply queues, a full one).
    pub fn declare(&self, name: &str, args: &[(&str, Value<'static>)]) {
        let args: Vec<(String, Value<'static>)> = args
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.clone()))
            .collect();
        self.state().queues.insert(name.to_owned(), queue_of(args));
    }

    /// Whether `queue` exists.
    pub fn exists(&self, queue: &str) -> bool {
        self.state().queues.contains_key(queue)
    }

    /// Publishes as a client does (not through a worker's connection): routed on the
    /// default exchange to `queue`, which exists.
    pub fn client_publish(&self, queue: &str, body: Vec<u8>, props: Props) -> u64 {
        let mut state = self.state();
        state.next_id += 1;
        let id = state.next_id;
        let msg = Msg {
            id,
            body: Arc::new(body),
            props,
            redelivered: false,
            returns: 0,
        };
        if let Some(q) = state.queues.get_mut(queue) {
            q.ready.push_back(msg);
        }
        self.dispatch(&mut state);
        id
    }

    /// Takes the messages waiting in `queue`.
    pub fn take(&self, queue: &str) -> Vec<Msg> {
        let mut state = self.state();
        match state.queues.get_mut(queue) {
            Some(q) => q.ready.drain(..).collect(),
            None => Vec::new(),
        }
    }

    pub fn ready(&self, queue: &str) -> usize {
        self.state().queues.get(queue).map_or(0, |q| q.ready.len())
    }

    /// Notes an event of the run's among the broker's (in their order).
    pub fn mark(&self, event: Event) {
        self.state().events.push(event);
    }

    /// What `worker` has at the broker now: its publishes waiting for their confirm
    /// (count, bytes) and its unacked deliveries, on its open channels.
    pub fn in_flight(&self, worker: u32) -> (usize, usize, usize) {
        let state = self.state();
        let (mut publishes, mut bytes, mut unacked) = (0, 0, 0);
        for ch in state.chans.values().filter(|ch| {
            ch.open
                && state
                    .conns
                    .get(&ch.conn)
                    .is_some_and(|c| c.open && c.worker == worker)
        }) {
            publishes += ch.pending.len();
            bytes += ch.pending.values().map(|p| p.size).sum::<usize>();
            unacked += ch.unacked.len();
        }
        (publishes, bytes, unacked)
    }

    /// Unacked deliveries on open channels, in all.
    fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.0.rng.lock().unwrap().random_bool(p.min(1.0))
    }

    fn millis(&self, low: u64, high: u64) -> Duration {
        Duration::from_millis(self.0.rng.lock().unwrap().random_range(low..=high))
    }

    fn event(&self, what: String) {
        self.0.trace.event(what);
    }

    // --- faults, drawn by the run ---

    /// Drops a worker connection at random: its channels close, their unacked
    /// deliveries go back to their queues, redelivered.
    pub fn drop_connection(&self) -> bool {
        let mut state = self.state();
        let open: Vec<u64> = state
            .conns
            .iter()
            .filter(|(_, c)| c.open)
            .map(|(id, _)| *id)
            .collect();
        if open.is_empty() {
            return false;
        }
        let conn = open[self.0.rng.lock().unwrap().random_range(0..open.len())];
        self.event(format!("broker: connection {conn} dropped"));
        state.session_faults += 1;
        self.close_conn(
            &mut state,
            conn,
            "CONNECTION_FORCED - broker forced connection closure",
        );
        true
    }

    /// Closes a channel that consumes, at random (as over a protocol error).
    pub fn close_consuming_channel(&self) -> bool {
        let mut state = self.state();
        let consuming: Vec<u64> = state
            .consumers
            .iter()
            .filter(|c| c.active && state.chans.get(&c.chan).is_some_and(|ch| ch.open))
            .map(|c| c.chan)
            .collect();
        if consuming.is_empty() {
            return false;
        }
        let chan = consuming[self.0.rng.lock().unwrap().random_range(0..consuming.len())];
        self.event(format!("broker: channel {chan} closed"));
        state.session_faults += 1;
        self.close_chan(&mut state, chan, "channel closed by the broker");
        true
    }

    /// Cancels a consumer at random (its stream ends; its channel stays).
    pub fn cancel_consumer(&self) -> bool {
        let mut state = self.state();
        let active: Vec<usize> = (0..state.consumers.len())
            .filter(|i| state.consumers[*i].active)
            .collect();
        if active.is_empty() {
            return false;
        }
        let i = active[self.0.rng.lock().unwrap().random_range(0..active.len())];
        self.event(format!("broker: consumer {i} cancelled"));
        state.session_faults += 1;
        let consumer = &mut state.consumers[i];
        consumer.active = false;
        consumer.sender = None;
        true
    }

    /// An alarm: the connections that publish are blocked until `clear_alarm`.
    pub fn alarm(&self) {
        let mut state = self.state();
        self.event("broker: memory alarm".into());
        state.alarm = true;
        for conn in state.conns.values_mut() {
            if conn.open && conn.publishes {
                conn.blocked = true;
            }
        }
    }

    pub fn clear_alarm(&self) {
        let mut state = self.state();
        self.event("broker: alarm cleared".into());
        state.alarm = false;
        let conns: Vec<u64> = state.conns.keys().copied().collect();
        for id in conns {
            let held = {
                let conn = state.conns.get_mut(&id).unwrap();
                conn.blocked = false;
                std::mem::take(&mut conn.held)
            };
            for (chan, number) in held {
                self.read_publish(&mut state, chan, number);
            }
        }
        self.dispatch(&mut state);
    }

    // --- the broker's work ---

    fn close_conn(&self, state: &mut State, conn: u64, why: &str) {
        let Some(c) = state.conns.get_mut(&conn) else {
            return;
        };
        if !c.open {
            return;
        }
        c.open = false;
        c.held.clear();
        let chans: Vec<u64> = state
            .chans
            .iter()
            .filter(|(_, ch)| ch.conn == conn)
            .map(|(id, _)| *id)
            .collect();
        for chan in chans {
            self.close_chan(state, chan, why);
        }
    }

    fn close_chan(&self, state: &mut State, chan: u64, why: &str) {
        let Some(ch) = state.chans.get_mut(&chan) else {
            return;
        };
        if !ch.open {
            return;
        }
        ch.open = false;
        // Publishes waiting for their confirm fail (their senders dropped).
        ch.pending.clear();
        ch.returns.clear();
        let unacked = std::mem::take(&mut ch.unacked);
        for consumer in state.consumers.iter_mut().filter(|c| c.chan == chan) {
            if consumer.active
                && let Some(sender) = consumer.sender.take()
            {
                let _ = sender.send(Err(closed(why)));
            }
            consumer.active = false;
            consumer.sender = None;
        }
        // Handed back in their order, ahead of the rest.
        for (_, (queue, mut msg, _)) in unacked.into_iter().rev() {
            state.events.push(Event::HandedBack { msg: msg.id });
            msg.redelivered = true;
            self.requeue(state, &queue, msg);
        }
        self.dispatch(state);
    }

    /// Back to the front of `queue`, or dead-lettered past its delivery limit.
    fn requeue(&self, state: &mut State, queue: &str, mut msg: Msg) {
        msg.returns += 1;
        let Some(q) = state.queues.get_mut(queue) else {
            return;
        };
        if let Some(limit) = q.delivery_limit
            && msg.returns > limit
        {
            let dlx = q.dlx.clone();
            self.event(format!(
                "broker: message {} past its delivery limit",
                msg.id
            ));
            state.events.push(Event::BrokerDeadLettered { msg: msg.id });
            state.ended.insert(msg.id);
            msg.props.set(
                "x-delivery-count",
                Value::LongLongInt(i64::from(msg.returns)),
            );
            if let Some(dlx) = dlx {
                self.route(state, &dlx, queue, msg);
            }
            return;
        }
        q.ready.push_front(msg);
    }

    /// The queues a publish reaches.
    fn targets(&self, state: &State, exchange: &str, routing_key: &str) -> Vec<String> {
        if exchange.is_empty() {
            return state
                .queues
                .contains_key(routing_key)
                .then(|| routing_key.to_owned())
                .into_iter()
                .collect();
        }
        match state.exchanges.get(exchange) {
            Some(e) => match e.kind {
                ExchangeKind::Fanout => e.bound.clone(),
                ExchangeKind::Direct => e
                    .bound
                    .iter()
                    .filter(|q| routing_key.is_empty() || *q == routing_key)
                    .cloned()
                    .collect(),
            },
            None => Vec::new(),
        }
    }

    /// Enqueues `msg` where `exchange` routes it; whether any queue took it.
    fn route(&self, state: &mut State, exchange: &str, routing_key: &str, msg: Msg) -> bool {
        let targets = self.targets(state, exchange, routing_key);
        for name in &targets {
            if let Some(q) = state.queues.get_mut(name) {
                let mut copy = msg.clone();
                copy.redelivered = false;
                copy.returns = 0;
                q.ready.push_back(copy);
            }
        }
        !targets.is_empty()
    }

    /// Reads publish `number` of `chan`: routes it and decides its confirm.
    fn read_publish(&self, state: &mut State, chan: u64, number: u64) {
        let Some(ch) = state.chans.get_mut(&chan) else {
            return;
        };
        let conn = ch.conn;
        let Some(pending) = ch.pending.get_mut(&number) else {
            return;
        };
        let Some(unread) = pending.unread.take() else {
            return;
        };
        let worker = state.conns.get(&conn).map_or(0, |c| c.worker);
        let targets = self.targets(state, &unread.exchange, &unread.routing_key);
        let full = targets.iter().any(|name| {
            state.queues.get(name).is_some_and(|q| {
                q.reject_publish && q.max_length.is_some_and(|m| q.ready.len() >= m)
            })
        });
        let acked = !full && !self.chance(self.0.faults.nack);
        let mut outcome = None;
        if acked {
            state.next_id += 1;
            let msg = Msg {
                id: state.next_id,
                body: unread.body.clone(),
                props: unread.props.clone(),
                redelivered: false,
                returns: 0,
            };
            let routed = self.route(state, &unread.exchange, &unread.routing_key, msg);
            if routed {
                state.events.push(Event::Routed {
                    props: unread.props.clone(),
                });
            }
            if !routed && unread.mandatory {
                let returned = Returned {
                    reply_code: 312,
                    headers: unread.props.headers.clone(),
                };
                if let Some(ch) = state.chans.get_mut(&chan) {
                    if let Some(hook) = &ch.hook {
                        hook(&returned);
                    }
                    ch.returns.push_back(returned);
                }
            }
            self.event(format!(
                "broker: worker {worker} publish to {:?}/{:?}: {}",
                unread.exchange,
                unread.routing_key,
                if routed { "routed" } else { "returned" }
            ));
            outcome = Some(Event::Published {
                worker,
                props: unread.props,
                routed,
                body: unread.body,
            });
        } else {
            self.event(format!(
                "broker: worker {worker} publish to {:?}: nacked",
                unread.routing_key
            ));
        }
        if let Some(p) = state
            .chans
            .get_mut(&chan)
            .and_then(|ch| ch.pending.get_mut(&number))
        {
            p.decided = Some(acked);
            p.outcome = outcome;
        }
        self.dispatch(state);
        // Its confirm comes later: a `multiple` ack up to it.
        let delay = if self.chance(self.0.faults.slow_confirm) {
            state.slow_confirms += 1;
            self.millis(100, 3000)
        } else {
            self.millis(0, 15)
        };
        let broker = Arc::downgrade(&self.0);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(inner) = Weak::upgrade(&broker) {
                SimBroker(inner).confirm_up_to(chan, number);
            }
        });
    }

    /// Completes the decided confirms of `chan` up to `number`, in an order drawn at
    /// random; each takes a waiting return, if there is one, as lapin hands them out.
    fn confirm_up_to(&self, chan: u64, number: u64) {
        let mut state = self.state();
        let Some(ch) = state.chans.get_mut(&chan) else {
            return;
        };
        if !ch.open {
            return;
        }
        let mut due: Vec<u64> = ch
            .pending
            .range(..=number)
            .filter(|(_, p)| p.decided.is_some())
            .map(|(n, _)| *n)
            .collect();
        // The order the client completes them in.
        {
            let mut rng = self.0.rng.lock().unwrap();
            for i in (1..due.len()).rev() {
                let j = rng.random_range(0..=i);
                due.swap(i, j);
            }
        }
        let mut told = Vec::new();
        for n in due {
            let Some(p) = ch.pending.remove(&n) else {
                continue;
            };
            let acked = p.decided.unwrap_or(false);
            let returned = if acked { ch.returns.pop_front() } else { None };
            if p.answer.send(Confirm { acked, returned }).is_ok()
                && let Some(event) = p.outcome
            {
                told.push(event);
            }
        }
        state.events.extend(told);
    }

    /// Delivers what the queues hold to their consumers with room, round robin.
    fn dispatch(&self, state: &mut State) {
        let names: Vec<String> = state.queues.keys().cloned().collect();
        for name in names {
            loop {
                if state.queues[&name].ready.is_empty() {
                    break;
                }
                let candidates: Vec<usize> = (0..state.consumers.len())
                    .filter(|i| {
                        let c = &state.consumers[*i];
                        c.active
                            && c.queue == name
                            && state.chans.get(&c.chan).is_some_and(|ch| {
                                ch.open
                                    && (c.prefetch == 0
                                        || ch.unacked.values().filter(|(_, _, k)| k == i).count()
                                            < usize::from(c.prefetch))
                            })
                    })
                    .collect();
                if candidates.is_empty() {
                    break;
                }
                let q = state.queues.get_mut(&name).unwrap();
                let pick = candidates
                    .iter()
                    .copied()
                    .find(|i| *i >= q.next_consumer)
                    .unwrap_or(candidates[0]);
                q.next_consumer = pick + 1;
                let msg = q.ready.pop_front().unwrap();
                let chan = state.consumers[pick].chan;
                let ch = state.chans.get_mut(&chan).unwrap();
                ch.next_tag += 1;
                let tag = ch.next_tag;
                ch.unacked.insert(tag, (name.clone(), msg.clone(), pick));
                let worker = state.conns.get(&ch.conn).map_or(0, |c| c.worker);
                self.event(format!(
                    "broker: message {} to worker {worker}{}",
                    msg.id,
                    if msg.redelivered { ", redelivered" } else { "" }
                ));
                state.events.push(Event::Delivered {
                    msg: msg.id,
                    worker,
                    redelivered: msg.redelivered,
                });
                let delivery = Delivery {
                    tag,
                    redelivered: msg.redelivered,
                    body: msg.body.to_vec(),
                    props: Properties {
                        reply_to: msg.props.reply_to.clone(),
                        correlation_id: msg.props.correlation_id.clone(),
                        message_id: msg.props.message_id.clone(),
                        user_id: msg.props.user_id.clone(),
                        traceparent: msg.props.text("traceparent"),
                    },
                    original: Original(Arc::new(msg.props.clone())),
                    acker: Arc::new(SimAcker {
                        broker: self.clone(),
                        chan,
                        tag,
                        worker,
                    }),
                };
                if let Some(sender) = &state.consumers[pick].sender {
                    let _ = sender.send(Ok(delivery));
                }
            }
        }
    }

    /// A settlement of delivery `tag` on `chan`: `Ok(false)` on a closed channel.
    fn settle(&self, chan: u64, tag: u64, how: &'static str, multiple: bool, worker: u32) -> bool {
        let mut state = self.state();
        let Some(ch) = state.chans.get_mut(&chan) else {
            return false;
        };
        if !ch.open {
            return false;
        }
        if !ch.unacked.contains_key(&tag) {
            let what = format!(
                "worker {worker}: {how} of delivery tag {tag} on channel {chan}, which is not unacked (settled twice?)"
            );
            self.event(format!("VIOLATION: {what}"));
            state.violations.push(what);
            // RabbitMQ: PRECONDITION_FAILED - unknown delivery tag, the channel closed.
            self.close_chan(
                &mut state,
                chan,
                "PRECONDITION_FAILED - unknown delivery tag",
            );
            return true;
        }
        if how == "ack" && self.chance(self.0.faults.lost_ack) {
            let conn = ch.conn;
            // The worker took these as answered (it acks only what it answered).
            let lost: Vec<u64> = if multiple {
                ch.unacked
                    .range(..=tag)
                    .map(|(_, (_, m, _))| m.id)
                    .collect()
            } else {
                ch.unacked
                    .get(&tag)
                    .map(|(_, m, _)| m.id)
                    .into_iter()
                    .collect()
            };
            for msg in lost {
                state.events.push(Event::AckLost { msg, worker });
            }
            state.lost_acks += 1;
            state.session_faults += 1;
            self.event(format!(
                "broker: connection {conn} dropped with worker {worker}'s ack of tag {tag} unread"
            ));
            self.close_conn(&mut state, conn, "connection lost");
            return true;
        }
        let tags: Vec<u64> = if multiple {
            ch.unacked.range(..=tag).map(|(t, _)| *t).collect()
        } else {
            vec![tag]
        };
        let mut settled = Vec::new();
        for t in tags {
            if let Some(entry) = ch.unacked.remove(&t) {
                settled.push(entry);
            }
        }
        for (queue, mut msg, _) in settled {
            self.event(format!(
                "broker: message {} {how} by worker {worker}",
                msg.id
            ));
            state.events.push(Event::Settled {
                msg: msg.id,
                worker,
                how,
            });
            match how {
                "requeue" => {
                    msg.redelivered = true;
                    self.requeue(&mut state, &queue, msg);
                }
                "reject" => {
                    state.events.push(Event::BrokerDeadLettered { msg: msg.id });
                    state.ended.insert(msg.id);
                    let dlx = state.queues.get(&queue).and_then(|q| q.dlx.clone());
                    if let Some(dlx) = dlx {
                        self.route(&mut state, &dlx, &queue, msg);
                    }
                }
                _ => {
                    state.ended.insert(msg.id);
                }
            }
        }
        self.dispatch(&mut state);
        true
    }
}

fn queue_of(args: Vec<(String, Value<'static>)>) -> Queue {
    let number = |name: &str| {
        args.iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| match v {
                Value::LongLongInt(n) => Some(*n),
                Value::ShortInt(n) => Some(i64::from(*n)),
                _ => None,
            })
    };
    let text = |name: &str| {
        args.iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| match v {
                Value::LongString(s) => Some(String::from_utf8_lossy(s).into_owned()),
                _ => None,
            })
    };
    Queue {
        ready: VecDeque::new(),
        max_length: number("x-max-length").map(|n| n.max(0) as usize),
        reject_publish: text("x-overflow").as_deref() == Some("reject-publish"),
        delivery_limit: number("x-delivery-limit").map(|n| n.max(0) as u32),
        dlx: text("x-dead-letter-exchange"),
        next_consumer: 0,
        args,
    }
}

struct Link {
    broker: SimBroker,
    worker: u32,
}

impl BrokerLink for Link {
    fn connect<'a>(&'a self, _url: &'a str, name: &'static str) -> Call<'a, Box<dyn Connection>> {
        Box::pin(async move {
            tokio::time::sleep(self.broker.millis(0, 5)).await;
            if self.broker.chance(self.broker.0.faults.refuse_connect) {
                self.broker
                    .event(format!("broker: worker {} connect refused", self.worker));
                self.broker.state().session_faults += 1;
                return Err(closed("connection refused"));
            }
            let mut state = self.broker.state();
            state.next_id += 1;
            let id = state.next_id;
            // Only connections that publish are blocked by an alarm: the reply one.
            let publishes = name.ends_with("replies");
            let blocked = state.alarm && publishes;
            state.conns.insert(
                id,
                Conn {
                    worker: self.worker,
                    open: true,
                    publishes,
                    blocked,
                    held: Vec::new(),
                },
            );
            Ok(Box::new(SimConnection {
                broker: self.broker.clone(),
                id,
            }) as Box<dyn Connection>)
        })
    }
}

struct SimConnection {
    broker: SimBroker,
    id: u64,
}

impl SimConnection {
    fn open(&self) -> bool {
        self.broker
            .state()
            .conns
            .get(&self.id)
            .is_some_and(|c| c.open)
    }
}

impl Drop for SimConnection {
    /// The socket goes with it: the broker closes the connection.
    fn drop(&mut self) {
        let mut state = self.broker.state();
        self.broker
            .close_conn(&mut state, self.id, "connection dropped");
    }
}

impl Connection for SimConnection {
    fn open_channel(&self) -> Call<'_, Box<dyn Channel>> {
        Box::pin(async move {
            let mut state = self.broker.state();
            if !state.conns.get(&self.id).is_some_and(|c| c.open) {
                return Err(closed("connection closed"));
            }
            state.next_id += 1;
            let id = state.next_id;
            state.chans.insert(
                id,
                Chan {
                    conn: self.id,
                    open: true,
                    prefetch: 0,
                    next_tag: 0,
                    unacked: BTreeMap::new(),
                    next_publish: 0,
                    pending: BTreeMap::new(),
                    returns: VecDeque::new(),
                    hook: None,
                },
            );
            Ok(Box::new(SimChannel {
                broker: self.broker.clone(),
                id,
                conn: self.id,
            }) as Box<dyn Channel>)
        })
    }

    fn connected(&self) -> bool {
        self.open()
    }

    fn blocked(&self) -> bool {
        self.broker
            .state()
            .conns
            .get(&self.id)
            .is_some_and(|c| c.open && c.blocked)
    }

    fn close<'a>(&'a self, _reason: &'a str) -> Call<'a, ()> {
        Box::pin(async move {
            let mut state = self.broker.state();
            self.broker
                .close_conn(&mut state, self.id, "connection closed");
            Ok(())
        })
    }
}

struct SimChannel {
    broker: SimBroker,
    id: u64,
    conn: u64,
}

impl SimChannel {
    /// Fails unless the channel is open.
    fn check(&self, state: &State) -> Result<(), Error> {
        match state.chans.get(&self.id) {
            Some(ch) if ch.open => Ok(()),
            _ => Err(closed("channel closed")),
        }
    }

    /// Closes the channel over a refusal, as RabbitMQ does.
    fn refuse(&self, state: &mut State, code: u16, message: String) -> Error {
        self.broker.close_chan(state, self.id, &message);
        refused(code, message)
    }
}

impl Channel for SimChannel {
    fn connected(&self) -> bool {
        self.check(&self.broker.state()).is_ok()
    }

    fn confirm_select(&self) -> Call<'_, ()> {
        Box::pin(async move { self.check(&self.broker.state()) })
    }

    fn qos(&self, prefetch: u16) -> Call<'_, ()> {
        Box::pin(async move {
            let mut state = self.broker.state();
            self.check(&state)?;
            state.chans.get_mut(&self.id).unwrap().prefetch = prefetch;
            Ok(())
        })
    }

    fn declare_exchange<'a>(
        &'a self,
        name: &'a str,
        kind: ExchangeKind,
        passive: bool,
    ) -> Call<'a, ()> {
        Box::pin(async move {
            let mut state = self.broker.state();
            self.check(&state)?;
            match state.exchanges.get(name) {
                Some(e) if !passive && e.kind != kind => Err(self.refuse(
                    &mut state,
                    406,
                    format!("PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{name}'"),
                )),
                Some(_) => Ok(()),
                None if passive => {
                    Err(self.refuse(&mut state, 404, format!("NOT_FOUND - no exchange '{name}'")))
                }
                None => {
                    state.exchanges.insert(
                        name.to_owned(),
                        Exchange {
                            kind,
                            bound: Vec::new(),
                        },
                    );
                    Ok(())
                }
            }
        })
    }

    fn declare_queue<'a>(
        &'a self,
        name: &'a str,
        passive: bool,
        args: &'a [(&'static str, Value<'a>)],
    ) -> Call<'a, ()> {
        Box::pin(async move {
            let mut state = self.broker.state();
            self.check(&state)?;
            let mut args: Vec<(String, Value<'static>)> = args
                .iter()
                .map(|(n, v)| ((*n).to_owned(), owned(v)))
                .collect();
            args.sort_by(|a, b| a.0.cmp(&b.0));
            match state.queues.get(name) {
                Some(q) if !passive && q.args != args => Err(self.refuse(
                    &mut state,
                    406,
                    format!("PRECONDITION_FAILED - inequivalent arg for queue '{name}'"),
                )),
                Some(_) => Ok(()),
                None if passive => {
                    Err(self.refuse(&mut state, 404, format!("NOT_FOUND - no queue '{name}'")))
                }
                None => {
                    state.queues.insert(name.to_owned(), queue_of(args));
                    Ok(())
                }
            }
        })
    }

    fn bind_queue<'a>(&'a self, queue: &'a str, exchange: &'a str) -> Call<'a, ()> {
        Box::pin(async move {
            let mut state = self.broker.state();
            self.check(&state)?;
            if !state.queues.contains_key(queue) {
                return Err(self.refuse(
                    &mut state,
                    404,
                    format!("NOT_FOUND - no queue '{queue}'"),
                ));
            }
            match state.exchanges.get_mut(exchange) {
                Some(e) => {
                    if !e.bound.iter().any(|q| q == queue) {
                        e.bound.push(queue.to_owned());
                    }
                    Ok(())
                }
                None => Err(self.refuse(
                    &mut state,
                    404,
                    format!("NOT_FOUND - no exchange '{exchange}'"),
                )),
            }
        })
    }

    fn consume<'a>(&'a self, queue: &'a str, tag: &'a str) -> Call<'a, Consumer> {
        Box::pin(async move {
            tokio::time::sleep(self.broker.millis(0, 3)).await;
            let mut state = self.broker.state();
            self.check(&state)?;
            if !state.queues.contains_key(queue) {
                return Err(self.refuse(
                    &mut state,
                    404,
                    format!("NOT_FOUND - no queue '{queue}'"),
                ));
            }
            let (sender, receiver) = mpsc::unbounded_channel();
            let prefetch = state.chans[&self.id].prefetch;
            state.consumers.push(ConsumerEntry {
                chan: self.id,
                queue: queue.to_owned(),
                prefetch,
                active: true,
                sender: Some(sender),
            });
            // Registered under the worker's tag, which the trace never shows (a uuid).
            let index = state.consumers.len() - 1;
            self.broker.event(format!(
                "broker: consumer {index} on channel {} (prefetch {prefetch})",
                self.id
            ));
            self.broker.dispatch(&mut state);
            let stream = tokio_stream_of(receiver);
            Ok(Consumer {
                tag: tag.to_owned(),
                deliveries: stream,
            })
        })
    }

    fn cancel<'a>(&'a self, tag: &'a str) -> Call<'a, ()> {
        let _ = tag;
        Box::pin(async move {
            tokio::time::sleep(self.broker.millis(0, 3)).await;
            let mut state = self.broker.state();
            self.check(&state)?;
            // The channel's active consumer (the worker has one at a time per channel).
            let chan = self.id;
            for consumer in state.consumers.iter_mut().filter(|c| c.chan == chan) {
                consumer.active = false;
                consumer.sender = None;
            }
            Ok(())
        })
    }

    fn publish<'a>(&'a self, message: Message<'a>) -> Call<'a, Confirm> {
        let mut props = Props::default();
        if let Some(carried) = message
            .props
            .carried
            .and_then(|o| o.0.downcast_ref::<Props>())
        {
            props = carried.clone();
            // Dropped by the worker (port.rs): RabbitMQ takes user_id from that user only.
            props.user_id = None;
        }
        if let Some(c) = message.props.correlation_id {
            props.correlation_id = Some(c.to_owned());
        }
        for (name, value) in &message.props.headers {
            props.set(name, owned(value));
        }
        let unread = Unread {
            exchange: message.exchange.to_owned(),
            routing_key: message.routing_key.to_owned(),
            mandatory: message.mandatory,
            body: Arc::new(message.body.to_vec()),
            props,
        };
        Box::pin(async move {
            let answer = {
                let mut state = self.broker.state();
                self.check(&state)?;
                if !unread.exchange.is_empty() && !state.exchanges.contains_key(&unread.exchange) {
                    let message = format!("NOT_FOUND - no exchange '{}'", unread.exchange);
                    return Err(self.refuse(&mut state, 404, message));
                }
                let size = unread.body.len();
                if let Some(max) = state.max_message_size
                    && size > max
                {
                    let worker = state.conns.get(&self.conn).map_or(0, |c| c.worker);
                    self.broker.event(format!(
                        "broker: worker {worker} publish of {size} bytes refused (max {max})"
                    ));
                    state.events.push(Event::TooLarge {
                        worker,
                        props: unread.props.clone(),
                        body: unread.body.clone(),
                    });
                    let message = format!(
                        "PRECONDITION_FAILED - message size {size} is larger than configured max size {max}"
                    );
                    return Err(self.refuse(&mut state, 406, message));
                }
                let (sender, answer) = oneshot::channel();
                let ch = state.chans.get_mut(&self.id).unwrap();
                ch.next_publish += 1;
                let number = ch.next_publish;
                ch.pending.insert(
                    number,
                    Pending {
                        decided: None,
                        outcome: None,
                        answer: sender,
                        size,
                        unread: Some(unread),
                    },
                );
                let conn = state.conns.get_mut(&self.conn).unwrap();
                if conn.blocked {
                    conn.held.push((self.id, number));
                } else {
                    self.broker.read_publish(&mut state, self.id, number);
                }
                answer
            };
            answer
                .await
                .map_err(|_| closed("channel closed before the confirm"))
        })
    }

    fn on_return(&self, hook: ReturnHook) {
        if let Some(ch) = self.broker.state().chans.get_mut(&self.id) {
            ch.hook = Some(hook);
        }
    }

    fn close<'a>(&'a self, _reason: &'a str) -> Call<'a, ()> {
        Box::pin(async move {
            let mut state = self.broker.state();
            self.broker.close_chan(&mut state, self.id, "closed");
            Ok(())
        })
    }
}

fn tokio_stream_of(
    mut receiver: mpsc::UnboundedReceiver<Result<Delivery, Error>>,
) -> mupdate_worker::broker::port::Deliveries {
    Box::pin(futures_util::stream::poll_fn(move |cx| {
        receiver.poll_recv(cx)
    }))
}

struct SimAcker {
    broker: SimBroker,
    chan: u64,
    tag: u64,
    worker: u32,
}

impl Acker for SimAcker {
    fn ack(&self, multiple: bool) -> Call<'_, bool> {
        Box::pin(async move {
            Ok(self
                .broker
                .settle(self.chan, self.tag, "ack", multiple, self.worker))
        })
    }

    fn requeue(&self) -> Call<'_, bool> {
        Box::pin(async move {
            Ok(self
                .broker
                .settle(self.chan, self.tag, "requeue", false, self.worker))
        })
    }

    fn reject(&self) -> Call<'_, bool> {
        Box::pin(async move {
            Ok(self
                .broker
                .settle(self.chan, self.tag, "reject", false, self.worker))
        })
    }
}
