//! A bounded load for the fault tests: N requests of mixed sizes over one collection,
//! replies to a durable queue, and the checks that every request got its reply and the
//! engine holds every update. On the single node by default; `Load::on` puts it on
//! other servers (the local cluster), with the index settings and reply queue type
//! given there.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use serde_json::{Value, json};

use super::*;

/// Documents in the collection the load updates.
const DOCUMENTS: usize = 300;

pub struct Load {
    pub collection: Collection,
    pub reply_queue: String,
    /// Where it publishes, counts and collects: a test on the cluster points this at a
    /// node it isn't about to kill.
    pub amqp: String,
    /// requestId → the document ids it updates.
    pub requests: BTreeMap<String, Vec<String>>,
    envelopes: Vec<(String, Vec<u8>)>,
}

impl Load {
    /// `n` requests of 1 to 12 documents; request `i` sets field `r{i}` on each.
    pub async fn new(n: usize, refresh: bool) -> Self {
        let index = json!({"settings": {}});
        Self::on(&Servers::single(), n, refresh, index, FieldTable::default()).await
    }

    /// The same on `servers`: the collection's index created with `index` (its
    /// `settings` and `mappings`: with 1,000 requests or more, `"dynamic": false`, as
    /// each request adds a field), the reply queue declared with `reply_args` (e.g.
    /// `x-queue-type: quorum`).
    pub async fn on(
        servers: &Servers,
        n: usize,
        refresh: bool,
        index: Value,
        reply_args: FieldTable,
    ) -> Self {
        let docs: Vec<(String, Value)> = (0..DOCUMENTS)
            .map(|d| (format!("d{d}"), json!({"seed": d})))
            .collect();
        let refs: Vec<(&str, Value)> = docs
            .iter()
            .map(|(id, v)| (id.as_str(), v.clone()))
            .collect();
        let collection = Collection::create_on(&servers.es, &refs, index).await;
        let reply_queue = fresh("mupdate.fault-replies");
        let amqp = Amqp::open_at(&servers.amqp).await;
        amqp.channel
            .queue_declare(
                reply_queue.as_str().into(),
                QueueDeclareOptions::durable(),
                reply_args,
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
            amqp: servers.amqp.clone(),
            requests,
            envelopes,
        }
    }

    /// Publishes every request (persistent) to `queue`, up to 256 awaiting their
    /// confirms at once, and returns once all are confirmed.
    pub async fn publish(&self, queue: &str) {
        let amqp = Amqp::open_at(&self.amqp).await;
        for batch in self.envelopes.chunks(256) {
            let mut confirms = Vec::with_capacity(batch.len());
            for (request_id, body) in batch {
                let props = BasicProperties::default()
                    .with_reply_to(self.reply_queue.as_str().into())
                    .with_message_id(request_id.as_str().into())
                    .with_delivery_mode(2);
                let confirm = amqp
                    .channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        body,
                        props,
                    )
                    .await
                    .unwrap();
                confirms.push(confirm);
            }
            for confirm in confirms {
                assert!(confirm.await.unwrap().is_ack(), "request confirmed");
            }
        }
        amqp.close().await;
    }

    /// Replies now in the reply queue.
    pub async fn replies_waiting(&self) -> u32 {
        queue_counts_at(&self.amqp, &self.reply_queue)
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
        self.collect_more(within, HashMap::new()).await
    }

    /// `collect`, adding to the replies already collected.
    pub async fn collect_more(
        &self,
        within: Duration,
        mut replies: HashMap<String, Vec<Value>>,
    ) -> HashMap<String, Vec<Value>> {
        let amqp = Amqp::open_at(&self.amqp).await;
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
        let deadline = tokio::time::Instant::now() + within;
        // Every request answered already: only a short while for late duplicates.
        let mut settle = (replies.len() == self.requests.len())
            .then(|| tokio::time::Instant::now() + Duration::from_secs(1));
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
        let wrong = self.wrong_replies(replies);
        assert!(wrong.is_empty(), "wrong replies: {wrong:#?}");
    }

    /// The replies that aren't the right one for their request, described.
    pub fn wrong_replies(&self, replies: &HashMap<String, Vec<Value>>) -> Vec<String> {
        let mut wrong = Vec::new();
        for (id, bodies) in replies {
            let Some(ids) = self.requests.get(id) else {
                wrong.push(format!("reply to unknown request {id}"));
                continue;
            };
            for body in bodies {
                let hits: Option<Vec<&str>> = body["result"]["hits"]
                    .as_array()
                    .and_then(|hits| hits.iter().map(|h| h["_id"].as_str()).collect());
                if body["status"] != 200
                    || hits.as_ref() != Some(&ids.iter().map(String::as_str).collect())
                {
                    wrong.push(format!("reply to {id}: {body}"));
                }
            }
        }
        wrong
    }

    /// The engine holds the update of every request in `done`.
    pub async fn check_engine<'a>(&self, done: impl Iterator<Item = &'a String>) {
        let missing = self.missing_updates(done).await;
        assert!(
            missing.is_empty(),
            "updates not in the engine: {missing:#?}"
        );
    }

    /// The updates of requests in `done` that the engine doesn't hold, described.
    pub async fn missing_updates<'a>(&self, done: impl Iterator<Item = &'a String>) -> Vec<String> {
        let found: Value = http()
            .post(format!(
                "{}/{}/_search",
                self.collection.es,
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
        let mut missing = Vec::new();
        for request_id in done {
            let i: u64 = request_id.trim_start_matches("req-").parse().unwrap();
            for doc in &self.requests[request_id] {
                if sources.get(doc).map(|s| &s[format!("r{i}")]) != Some(&json!(i)) {
                    missing.push(format!("{request_id} updated {doc}"));
                }
            }
        }
        missing
    }

    /// Refreshes the collection so a search sees every update.
    pub async fn refresh(&self) {
        http()
            .post(format!(
                "{}/{}/_refresh",
                self.collection.es,
                path(&self.collection.physical)
            ))
            .send()
            .await
            .unwrap();
    }

    pub async fn cleanup(self) {
        delete_queues_at(&self.amqp, &[&self.reply_queue]).await;
    }
}
