//! A bounded load for the fault tests: N requests of mixed sizes over one collection,
//! replies to a durable queue, and the checks that every request got its reply and the
//! engine holds every update.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

use super::*;

/// Documents in the collection the load updates.
const DOCUMENTS: usize = 300;

pub struct Load {
    pub collection: Collection,
    pub reply_queue: String,
    /// requestId → the document ids it updates.
    pub requests: BTreeMap<String, Vec<String>>,
    envelopes: Vec<(String, Vec<u8>)>,
}

impl Load {
    /// `n` requests of 1 to 12 documents; request `i` sets field `r{i}` on each.
    pub async fn new(n: usize, refresh: bool) -> Self {
        let docs: Vec<(String, Value)> = (0..DOCUMENTS)
            .map(|d| (format!("d{d}"), json!({"seed": d})))
            .collect();
        let refs: Vec<(&str, Value)> = docs
            .iter()
            .map(|(id, v)| (id.as_str(), v.clone()))
            .collect();
        let collection = Collection::create(&refs).await;
        let reply_queue = fresh("mupdate.fault-replies");
        let amqp = Amqp::open().await;
        amqp.channel
            .queue_declare(
                reply_queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        amqp.close().await;
        let mut requests = BTreeMap::new();
        let mut envelopes = Vec::new();
        for i in 0..n {
            let size = 1 + (i * 7) % 12;
            let ids: Vec<String> = (0..size)
                .map(|j| format!("d{}", (i * 13 + j * 31) % DOCUMENTS))
                .collect();
            let docs: Vec<Value> = ids
                .iter()
                .map(|id| json!({"_id": id, "body": {format!("r{i}"): i}}))
                .collect();
            let mut envelope = collection.envelope(json!(docs));
            let request_id = format!("req-{i}");
            envelope["requestId"] = json!(request_id);
            envelope["retryOnConflict"] = json!(20);
            if refresh {
                envelope["refresh"] = json!("wait_for");
            }
            envelopes.push((request_id.clone(), serde_json::to_vec(&envelope).unwrap()));
            requests.insert(request_id, ids);
        }
        Load {
            collection,
            reply_queue,
            requests,
            envelopes,
        }
    }

    /// Publishes every request (persistent, confirmed) to `queue`.
    pub async fn publish(&self, queue: &str) {
        let amqp = Amqp::open().await;
        for (request_id, body) in &self.envelopes {
            let props = BasicProperties::default()
                .with_reply_to(self.reply_queue.as_str().into())
                .with_message_id(request_id.as_str().into())
                .with_delivery_mode(2);
            publish(&amqp.channel, queue, body, props).await;
        }
        amqp.close().await;
    }

    /// Replies now in the reply queue.
    pub async fn replies_waiting(&self) -> u32 {
        queue_counts(&self.reply_queue)
            .await
            .map_or(0, |(ready, _)| ready)
    }

    /// Waits until `at_least` replies are in the reply queue, or `within` passes.
    pub async fn wait_for_replies(&self, at_least: usize, within: Duration) -> u32 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let waiting = self.replies_waiting().await;
            if waiting as usize >= at_least || tokio::time::Instant::now() >= deadline {
                return waiting;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Consumes replies until every request has one or `within` passes, then takes
    /// whatever else is waiting: requestId → the replies to it.
    pub async fn collect(&self, within: Duration) -> HashMap<String, Vec<Value>> {
        let amqp = Amqp::open().await;
        let mut consumer = amqp
            .channel
            .basic_consume(
                self.reply_queue.as_str().into(),
                "fault-test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut replies: HashMap<String, Vec<Value>> = HashMap::new();
        let deadline = tokio::time::Instant::now() + within;
        let mut settle = None;
        loop {
            let until = settle.unwrap_or(deadline).min(deadline);
            let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(until, consumer.next()).await
            else {
                break;
            };
            let body: Value = serde_json::from_slice(&delivery.data).unwrap();
            delivery.ack(BasicAckOptions::default()).await.unwrap();
            let id = body["requestId"].as_str().unwrap().to_owned();
            replies.entry(id).or_default().push(body);
            if replies.len() == self.requests.len() && settle.is_none() {
                // Every request answered: a short while more for late duplicates.
                settle = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
        }
        amqp.close().await;
        replies
    }

    /// Each reply is the right one for its request: 200, its documents in order.
    pub fn check_replies(&self, replies: &HashMap<String, Vec<Value>>) {
        for (id, bodies) in replies {
            let ids = self
                .requests
                .get(id)
                .unwrap_or_else(|| panic!("reply to unknown request {id}"));
            for body in bodies {
                assert_eq!(body["status"], 200, "{body}");
                let hits: Vec<&str> = body["result"]["hits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| h["_id"].as_str().unwrap())
                    .collect();
                assert_eq!(hits, *ids, "reply to {id}");
            }
        }
    }

    /// The engine holds the update of every request in `done`.
    pub async fn check_engine<'a>(&self, done: impl Iterator<Item = &'a String>) {
        let found: Value = http()
            .post(format!(
                "{ES_URL}/{}/_search",
                path(&self.collection.physical)
            ))
            .json(&json!({"size": DOCUMENTS, "query": {"match_all": {}}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let sources: HashMap<String, Value> = found["hits"]["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h["_id"].as_str().unwrap().to_owned(), h["_source"].clone()))
            .collect();
        for request_id in done {
            let i: u64 = request_id.trim_start_matches("req-").parse().unwrap();
            for doc in &self.requests[request_id] {
                assert_eq!(
                    sources[doc][format!("r{i}")],
                    i,
                    "{request_id} updated {doc}"
                );
            }
        }
    }

    /// Refreshes the collection so a search sees every update.
    pub async fn refresh(&self) {
        http()
            .post(format!(
                "{ES_URL}/{}/_refresh",
                path(&self.collection.physical)
            ))
            .send()
            .await
            .unwrap();
    }

    pub async fn cleanup(self) {
        delete_queues(&[&self.reply_queue]).await;
    }
}
