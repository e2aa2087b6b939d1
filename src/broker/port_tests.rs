//! The broker port holds the whole lifecycle: a minimal broker in memory (one queue, every
//! publish confirmed) and an engine node that answers every call stand behind the two
//! ports, and the worker, on a current-thread runtime with paused time, takes a request,
//! updates, replies and acks it, then shuts down, with no server at all. Not a model of
//! the broker (that is the simulation's): just enough to show that nothing of the
//! lifecycle goes around the ports.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value as Json, json};
use tokio_util::sync::CancellationToken;

use super::port::{
    Acker, BrokerLink, Call, Channel, Confirm, Connection, Consumer, Delivery, ExchangeKind,
    Message, Original, Returned, Value,
};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::pipeline::envelope::Properties;
use crate::storage::Node;
use crate::storage::port::{Answer, EngineNode, Exchange};

/// What the broker saw.
#[derive(Default)]
struct Seen {
    /// Messages waiting in the one queue: body, properties.
    queue: VecDeque<(Vec<u8>, Properties)>,
    next_tag: u64,
    /// Publishes: exchange, routing key, body, `status` header.
    published: Vec<(String, String, Vec<u8>, Option<i16>)>,
    /// Settlements: tag, how, multiple.
    settled: Vec<(u64, &'static str, bool)>,
    /// Routing keys that reach no queue: a mandatory publish to one is returned.
    unroutable: Vec<String>,
    /// Connections opened; whether the last one is lost.
    connects: usize,
    lost: bool,
    /// Every channel's return hook (the channels are one object here).
    hooks: Vec<super::port::ReturnHook>,
}

#[derive(Clone, Default)]
struct Memory(Arc<Mutex<Seen>>);

impl Memory {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.0.lock().unwrap()
    }
}

impl BrokerLink for Memory {
    fn connect<'a>(&'a self, _url: &'a str, _name: &'static str) -> Call<'a, Box<dyn Connection>> {
        let memory = self.clone();
        let mut seen = self.seen();
        seen.connects += 1;
        seen.lost = false;
        Box::pin(async move { Ok(Box::new(memory) as Box<dyn Connection>) })
    }
}

impl Connection for Memory {
    fn open_channel(&self) -> Call<'_, Box<dyn Channel>> {
        let memory = self.clone();
        Box::pin(async move { Ok(Box::new(memory) as Box<dyn Channel>) })
    }

    fn connected(&self) -> bool {
        !self.seen().lost
    }

    fn blocked(&self) -> bool {
        false
    }

    fn close<'a>(&'a self, _reason: &'a str) -> Call<'a, ()> {
        Box::pin(async { Ok(()) })
    }
}

fn done<'a>() -> Call<'a, ()> {
    Box::pin(async { Ok(()) })
}

impl Channel for Memory {
    fn connected(&self) -> bool {
        true
    }

    fn confirm_select(&self) -> Call<'_, ()> {
        done()
    }

    fn qos(&self, _prefetch: u16) -> Call<'_, ()> {
        done()
    }

    fn declare_exchange<'a>(&'a self, _: &'a str, _: ExchangeKind, _: bool) -> Call<'a, ()> {
        done()
    }

    fn declare_queue<'a>(
        &'a self,
        _: &'a str,
        _: bool,
        _: &'a [(&'static str, Value<'a>)],
    ) -> Call<'a, ()> {
        done()
    }

    fn bind_queue<'a>(&'a self, _: &'a str, _: &'a str) -> Call<'a, ()> {
        done()
    }

    /// Delivers what the queue holds, then nothing more (the stream stays open).
    fn consume<'a>(&'a self, _queue: &'a str, tag: &'a str) -> Call<'a, Consumer> {
        Box::pin(async move {
            let mut seen = self.seen();
            let mut deliveries = Vec::new();
            while let Some((body, props)) = seen.queue.pop_front() {
                seen.next_tag += 1;
                let acker = Arc::new(Settle {
                    tag: seen.next_tag,
                    memory: self.clone(),
                });
                deliveries.push(Ok(Delivery {
                    tag: seen.next_tag,
                    redelivered: false,
                    body,
                    props,
                    original: Original(Arc::new(())),
                    acker,
                }));
            }
            let stream =
                futures_util::stream::iter(deliveries).chain(futures_util::stream::pending());
            Ok(Consumer {
                tag: tag.to_owned(),
                deliveries: Box::pin(stream),
            })
        })
    }

    fn cancel<'a>(&'a self, _tag: &'a str) -> Call<'a, ()> {
        done()
    }

    fn publish<'a>(&'a self, message: Message<'a>) -> Call<'a, Confirm> {
        Box::pin(async move {
            let status = message
                .props
                .headers
                .iter()
                .find_map(|(name, value)| match value {
                    Value::ShortInt(status) if *name == "status" => Some(*status),
                    _ => None,
                });
            let mut seen = self.seen();
            seen.published.push((
                message.exchange.to_owned(),
                message.routing_key.to_owned(),
                message.body.to_vec(),
                status,
            ));
            let routed = !seen.unroutable.iter().any(|k| k == message.routing_key);
            // Returned as RabbitMQ does: acked, the message (its headers) with it.
            let returned = (message.mandatory && !routed).then(|| Returned {
                reply_code: 312,
                headers: message
                    .props
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        let value = match value {
                            Value::LongString(bytes) => Value::LongString(bytes.to_vec().into()),
                            Value::Bool(b) => Value::Bool(*b),
                            Value::ShortInt(n) => Value::ShortInt(*n),
                            Value::LongLongInt(n) => Value::LongLongInt(*n),
                        };
                        ((*name).to_owned(), value)
                    })
                    .collect(),
            });
            let hooks = seen.hooks.clone();
            drop(seen);
            if let Some(returned) = &returned {
                for hook in hooks {
                    hook(returned);
                }
            }
            Ok(Confirm {
                acked: true,
                returned,
            })
        })
    }

    fn on_return(&self, hook: super::port::ReturnHook) {
        self.seen().hooks.push(hook);
    }

    fn close<'a>(&'a self, _reason: &'a str) -> Call<'a, ()> {
        done()
    }
}

/// One delivery's acker.
struct Settle {
    tag: u64,
    memory: Memory,
}

impl Settle {
    fn record(&self, how: &'static str, multiple: bool) -> Call<'_, bool> {
        self.memory.seen().settled.push((self.tag, how, multiple));
        Box::pin(async { Ok(true) })
    }
}

impl Acker for Settle {
    fn ack(&self, multiple: bool) -> Call<'_, bool> {
        self.record("ack", multiple)
    }

    fn requeue(&self) -> Call<'_, bool> {
        self.record("requeue", false)
    }

    fn reject(&self) -> Call<'_, bool> {
        self.record("reject", false)
    }
}

/// An engine node whose indexes all exist and whose `_bulk` updates all succeed;
/// counts the `_bulk` calls.
#[derive(Clone, Default)]
struct Engine(Arc<Mutex<usize>>);

impl EngineNode for Engine {
    fn exchange<'a>(&'a self, call: crate::storage::port::Call<'a>) -> Exchange<'a> {
        Box::pin(async move {
            if call.path != "/_bulk" {
                return Ok(Answer {
                    status: 200,
                    body: br#"{"status":"green"}"#.to_vec(),
                });
            }
            *self.0.lock().unwrap() += 1;
            let body = call.body.unwrap_or_default();
            let items: Vec<Json> = body
                .split(|b| *b == b'\n')
                .filter(|line| !line.is_empty())
                .filter_map(|line| serde_json::from_slice::<Json>(line).ok())
                .filter_map(|line| line.get("update").cloned())
                .map(|action| {
                    json!({"update": {"_index": action["_index"], "_id": action["_id"],
                        "_version": 2, "result": "updated", "_seq_no": 1, "_primary_term": 1,
                        "_shards": {"total": 1, "successful": 1, "failed": 0},
                        "get": {"_seq_no": 1, "_primary_term": 1, "found": true,
                                "_source": {"n": 1}},
                        "status": 200}})
                })
                .collect();
            let answer = json!({"took": 1, "errors": false, "items": items});
            Ok(Answer {
                status: 200,
                body: serde_json::to_vec(&answer).unwrap(),
            })
        })
    }
}

/// Runs a worker on `memory` and an `Engine` until a delivery is settled (and 5 s more,
/// time for a second settlement were there one), then shuts it down; the number of
/// `_bulk` calls.
async fn run_until_settled(memory: &Memory, settings: Settings) -> usize {
    let engine = Engine::default();
    let nodes = vec![Node::new("memory:9200".into(), Box::new(engine.clone()))];
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(crate::lifecycle::session::run_with(
        settings,
        Arc::new(memory.clone()),
        nodes,
        Arc::new(Metrics::new()),
        shutdown.clone(),
    ));
    // Virtual time: each sleep passes at once once every task waits.
    for _ in 0..600 {
        if !memory.seen().settled.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(30), worker).await;
    assert!(
        matches!(stopped, Ok(Ok(Ok(())))),
        "the worker stops cleanly"
    );
    *engine.0.lock().unwrap()
}

fn request(id: &str) -> Vec<u8> {
    let envelope = json!({"index": "shop", "collection": "products",
        "controller": "document", "action": "mUpdate", "requestId": id,
        "body": {"documents": [{"_id": "a", "body": {"n": 1}}]}});
    serde_json::to_vec(&envelope).unwrap()
}

fn settings() -> Settings {
    let mut settings = Settings::defaults();
    settings.metrics.listen.clear();
    settings
}

#[tokio::test(start_paused = true)]
async fn a_request_is_updated_answered_and_acked_once_through_the_ports() {
    let memory = Memory::default();
    memory
        .seen()
        .queue
        .push_back((request("r-1"), Properties::default()));
    let settings = settings();
    let reply_queue = settings.amqp.reply_queue.clone();
    let bulks = run_until_settled(&memory, settings).await;

    let seen = memory.seen();
    assert_eq!(bulks, 1, "one _bulk call");
    assert_eq!(seen.published.len(), 1, "one reply");
    let (exchange, routing_key, body, status) = &seen.published[0];
    assert_eq!(
        (exchange.as_str(), routing_key.as_str()),
        ("", reply_queue.as_str())
    );
    assert_eq!(*status, Some(200));
    let reply: Json = serde_json::from_slice(body).unwrap();
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["requestId"], "r-1");
    assert_eq!(reply["result"]["hits"][0]["_id"], "a", "{reply}");
    assert_eq!(seen.settled, [(1, "ack", false)], "acked exactly once");
}

/// A return comes back through the port with the publish's own header: the request
/// whose reply reached no queue is dead-lettered (`unroutable`, applied), then acked.
#[tokio::test(start_paused = true)]
async fn a_returned_reply_is_dead_lettered_once_then_its_request_acked() {
    let memory = Memory::default();
    let props = Properties {
        reply_to: Some("gone".into()),
        ..Properties::default()
    };
    memory.seen().queue.push_back((request("r-2"), props));
    memory.seen().unroutable.push("gone".into());
    let settings = settings();
    let dlx = settings.amqp.dead_letter_exchange.clone();
    let request_queue = settings.amqp.request_queue.clone();
    run_until_settled(&memory, settings).await;

    let seen = memory.seen();
    let routes: Vec<(&str, &str)> = seen
        .published
        .iter()
        .map(|(exchange, key, _, _)| (exchange.as_str(), key.as_str()))
        .collect();
    assert_eq!(
        routes,
        [("", "gone"), (dlx.as_str(), request_queue.as_str())],
        "the reply, then the request's dead letter"
    );
    assert_eq!(seen.published[1].2, request("r-2"), "the request itself");
    assert_eq!(seen.settled, [(1, "ack", false)], "acked exactly once");
}

/// An engine node that never answers (SIGSTOP, a long GC pause).
struct Frozen;

impl EngineNode for Frozen {
    fn exchange<'a>(&'a self, _call: crate::storage::port::Call<'a>) -> Exchange<'a> {
        Box::pin(std::future::pending())
    }
}

/// Paused on a frozen engine (its health calls each wait for `storage.timeout_ms`), the
/// worker notices the broker connection lost at once, not once the health call gives up.
#[tokio::test(start_paused = true)]
async fn a_connection_lost_while_paused_on_a_frozen_engine_is_noticed_at_once() {
    let memory = Memory::default();
    let mut settings = settings();
    settings.worker.pause_after_ms = 1000;
    settings.storage.timeout_ms = 20_000;
    settings.storage.write_timeout_ms = 20_000;
    let metrics = Arc::new(Metrics::new());
    let nodes = vec![Node::new("frozen:9200".into(), Box::new(Frozen))];
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(crate::lifecycle::session::run_with(
        settings,
        Arc::new(memory.clone()),
        nodes,
        metrics.clone(),
        shutdown.clone(),
    ));
    let paused = async {
        while metrics.pauses.get() == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), paused)
        .await
        .expect("the worker pauses: the engine does not answer");
    // Well into the pause: a health call is under way.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = memory.seen().connects;
    memory.seen().lost = true;
    let lost = tokio::time::Instant::now();
    let reconnected = async {
        while memory.seen().connects == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let noticed = tokio::time::timeout(Duration::from_secs(60), reconnected).await;
    let took = lost.elapsed();
    assert!(noticed.is_ok(), "the worker connects again");
    assert!(
        took < Duration::from_secs(2),
        "the lost connection is noticed within the pause's check, not after the engine's \
         health call ({took:?})"
    );
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(30), worker).await;
    assert!(
        matches!(stopped, Ok(Ok(Ok(())))),
        "the worker stops cleanly"
    );
}
