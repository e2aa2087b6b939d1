//! Sequential histories, for tests/history.rs (one node, overlapping faults) and
//! tests/cluster.rs (a node of the cluster killed): clients update their own documents,
//! update k+1 sent only once update k's 200 reply came back, reconnecting (to the next
//! broker node they know) whenever their connection dies. The check: every document
//! holds its client's last acknowledged update, every update got its reply.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, Consumer};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::*;

#[derive(Clone)]
pub struct ClientSpec {
    pub name: String,
    pub documents: Vec<String>,
    /// Durable: replies wait there while the client reconnects.
    pub reply_queue: String,
    /// Broker nodes, tried in this order whenever the client (re)connects.
    pub brokers: Vec<String>,
    /// The reply queue's arguments (`x-queue-type: quorum` on a cluster, where a
    /// classic queue dies with its node).
    pub reply_args: FieldTable,
}

impl ClientSpec {
    /// Client `c` with `documents` documents of its own, on the single node.
    pub fn new(c: usize, documents: usize) -> Self {
        ClientSpec {
            name: format!("c{c}"),
            documents: (0..documents).map(|d| format!("c{c}-d{d}")).collect(),
            reply_queue: fresh("mupdate.history-replies"),
            brokers: vec![AMQP_URL.to_owned()],
            reply_args: FieldTable::default(),
        }
    }

    pub fn request_id(&self, k: u64) -> String {
        format!("{}-{k}", self.name)
    }
}

/// The seed documents of `clients`, for `Collection::create`.
pub fn seeds(clients: &[ClientSpec]) -> Vec<(&str, Value)> {
    clients
        .iter()
        .flat_map(|c| c.documents.iter().map(|d| (d.as_str(), json!({"n": 0}))))
        .collect()
}

#[derive(Default)]
pub struct ClientReport {
    /// The last update acknowledged by a 200 reply: updates 1..=acked all were.
    pub acked: u64,
    /// requestId → the distinct reply bodies received (a message the broker delivered
    /// again, unacknowledged, has the same body; a second reply has another `_version`).
    pub replies: HashMap<String, HashSet<Vec<u8>>>,
    /// Updates published again because their first publish was never confirmed.
    pub republished: HashSet<u64>,
    /// What went wrong: no reply in time, a reply other than 200.
    pub failures: Vec<String>,
    pub reconnects: u32,
}

impl ClientReport {
    /// A report of one failure (a client that didn't finish in time).
    pub fn failed(failure: String) -> Self {
        ClientReport {
            failures: vec![failure],
            ..ClientReport::default()
        }
    }

    /// Records a reply: its requestId and body.
    pub fn record(&mut self, body: Vec<u8>) -> (String, Value) {
        let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let id = parsed["requestId"].as_str().unwrap_or_default().to_owned();
        if parsed["status"] != 200 {
            self.failures.push(format!("reply to {id}: {parsed}"));
        }
        self.replies.entry(id.clone()).or_default().insert(body);
        (id, parsed)
    }

    /// Takes the replies still waiting in the client's queue, through the broker at
    /// `url`.
    pub async fn drain(&mut self, url: &str, queue: &str) {
        let waiting = queue_counts_at(url, queue).await.map_or(0, |c| c.0) as usize;
        if waiting == 0 {
            return;
        }
        let amqp = Amqp::open_at(url).await;
        for message in next_messages(&amqp.channel, queue, waiting).await {
            self.record(message.data);
        }
        amqp.close().await;
    }
}

/// A client's broker connection: one confirming channel consuming its reply queue.
pub struct Session {
    pub connection: Connection,
    pub channel: lapin::Channel,
    pub replies: Consumer,
}

impl Session {
    /// Connects to the first of the client's broker nodes that answers.
    pub async fn open(me: &ClientSpec) -> Option<Self> {
        for url in &me.brokers {
            if let Ok(Ok(s)) = tokio::time::timeout(TIMEOUT, Self::open_at(url, me)).await {
                return Some(s);
            }
        }
        None
    }

    async fn open_at(url: &str, me: &ClientSpec) -> Result<Self, lapin::Error> {
        let properties = ConnectionProperties::default().with_connection_name("history".into());
        let connection = Connection::connect(url, properties).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel
            .queue_declare(
                me.reply_queue.as_str().into(),
                QueueDeclareOptions::durable(),
                me.reply_args.clone(),
            )
            .await?;
        let replies = channel
            .basic_consume(
                me.reply_queue.as_str().into(),
                "history-client".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Session {
            connection,
            channel,
            replies,
        })
    }

    pub async fn close(self) {
        let close = self.connection.close(200, "bye".into());
        let _ = tokio::time::timeout(TIMEOUT, close).await;
    }

    /// Publishes persistently; true once the broker confirmed it.
    pub async fn publish(
        &self,
        queue: &str,
        request_id: &str,
        body: &[u8],
        reply_to: &str,
    ) -> bool {
        let props = BasicProperties::default()
            .with_reply_to(reply_to.into())
            .with_correlation_id(request_id.into())
            .with_message_id(request_id.into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let published = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await;
        let confirmed = async { published.ok()?.await.ok().map(|c| c.is_ack()) };
        // A connection the broker dropped fails at once; bounded all the same.
        matches!(
            tokio::time::timeout(TIMEOUT, confirmed).await,
            Ok(Some(true))
        )
    }
}

/// Whether update k has been published.
#[derive(PartialEq)]
enum Sent {
    No,
    /// Maybe: the connection died, or the broker refused it, before a confirm.
    Unconfirmed,
    Confirmed,
}

/// Sends updates 1, 2, … of the client's documents to `queue`, each once the previous
/// one's 200 reply came back (a reply not back within `reply_within` is a failure);
/// reconnects whenever its connection dies. Once the faults have `ended`, it sends one
/// more update and stops: an older update (the one in flight at the end) that lands
/// late then lands after the client's last one, and shows.
pub async fn run_client(
    me: ClientSpec,
    collection: Arc<Collection>,
    queue: String,
    ended: Arc<OnceLock<Instant>>,
    reply_within: Duration,
) -> ClientReport {
    let mut report = ClientReport::default();
    let mut session: Option<Session> = None;
    let mut k = 1;
    let mut sent = Sent::No;
    let mut since = Instant::now();
    loop {
        if sent != Sent::No && since.elapsed() > reply_within {
            let failure = format!("{}: no reply within {reply_within:?}", me.request_id(k));
            report.failures.push(failure);
            break;
        }
        let Some(s) = session.as_mut() else {
            session = Session::open(&me).await;
            if session.is_none() {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            continue;
        };
        if sent != Sent::Confirmed {
            if sent == Sent::No {
                since = Instant::now();
            } else {
                report.republished.insert(k);
            }
            let docs: Vec<Value> = me
                .documents
                .iter()
                .map(|id| json!({"_id": id, "body": {"n": k, "w": me.name}}))
                .collect();
            let mut envelope = collection.envelope(json!(docs));
            envelope["requestId"] = json!(me.request_id(k));
            envelope["retryOnConflict"] = json!(10);
            let body = serde_json::to_vec(&envelope).unwrap();
            if s.publish(&queue, &me.request_id(k), &body, &me.reply_queue)
                .await
            {
                sent = Sent::Confirmed;
            } else {
                sent = Sent::Unconfirmed;
                session = None;
                report.reconnects += 1;
                continue;
            }
        }
        match tokio::time::timeout(Duration::from_secs(1), s.replies.next()).await {
            Err(_) => {} // nothing yet: check the bounds again
            Ok(Some(Ok(delivery))) => {
                // Unacked when the connection dies: delivered again, recorded once.
                let ack = delivery.ack(BasicAckOptions::default());
                let _ = tokio::time::timeout(TIMEOUT, ack).await;
                let (id, reply) = report.record(delivery.data);
                if id == me.request_id(k) {
                    if reply["status"] != 200 {
                        break;
                    }
                    report.acked = k;
                    k += 1;
                    sent = Sent::No;
                    if ended.get().is_some_and(|end| since >= *end) {
                        break;
                    }
                }
            }
            Ok(_) => {
                session.take().unwrap().close().await;
                report.reconnects += 1;
            }
        }
    }
    if let Some(s) = session {
        s.close().await;
    }
    report
}

/// What the clients' histories came to.
#[derive(Default)]
pub struct Checks {
    pub acknowledged: u64,
    pub documents: usize,
    /// Documents holding an update older than their last acknowledged one.
    pub stale: Vec<String>,
    /// Of those, the ones holding an update the client published twice (its first
    /// publish unconfirmed): the client's own at-least-once, not the worker's doing.
    pub stale_after_republish: usize,
    /// Documents holding an update never acknowledged (its client gave up on it).
    pub unacknowledged: Vec<String>,
    pub duplicates: usize,
    /// Of those, replies to updates the client published twice.
    pub duplicates_after_republish: usize,
    pub republished: usize,
    pub reconnects: u32,
    pub failures: Vec<String>,
}

impl Checks {
    /// Adds a client's report and the documents it holds now.
    pub async fn add(
        &mut self,
        client: &ClientSpec,
        report: &ClientReport,
        collection: &Collection,
    ) {
        self.acknowledged += report.acked;
        self.republished += report.republished.len();
        self.reconnects += report.reconnects;
        self.failures.extend(report.failures.iter().cloned());
        for k in 1..=report.acked {
            if !report.replies.contains_key(&client.request_id(k)) {
                self.failures
                    .push(format!("no reply to {}", client.request_id(k)));
            }
        }
        for (id, bodies) in &report.replies {
            self.duplicates += bodies.len() - 1;
            let k = id.rsplit('-').next().and_then(|k| k.parse().ok());
            if k.is_some_and(|k| report.republished.contains(&k)) {
                self.duplicates_after_republish += bodies.len() - 1;
            }
            if !id
                .strip_prefix(&client.name)
                .is_some_and(|k| k.starts_with('-'))
            {
                self.failures
                    .push(format!("{}: a reply to {id}", client.name));
            }
        }
        for doc in &client.documents {
            self.documents += 1;
            let (source, version) = collection.get(doc).await;
            let n = source["n"].as_u64().unwrap_or(0);
            let held = format!(
                "{doc} holds n={n} (version {version}), last acknowledged {}",
                report.acked
            );
            if n < report.acked || (n > 0 && source["w"] != client.name.as_str()) {
                if report.republished.contains(&n) {
                    self.stale_after_republish += 1;
                }
                self.stale.push(held);
            } else if n > report.acked {
                self.unacknowledged.push(held);
            }
        }
    }

    /// No failure, no stale document (but the client's own re-publishes), no write
    /// that wasn't acknowledged.
    pub fn assert_clean(&self) {
        assert!(self.failures.is_empty(), "failures: {:#?}", self.failures);
        assert_eq!(
            self.stale.len(),
            self.stale_after_republish,
            "stale documents: {:#?}",
            self.stale
        );
        assert!(self.unacknowledged.is_empty(), "{:#?}", self.unacknowledged);
    }
}

impl std::fmt::Display for Checks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "updates acknowledged={}, stale documents={}/{} ({} after a client re-publish), \
             unacknowledged writes={}, duplicate replies={} ({} after a client re-publish), \
             failures={}, client re-publishes={}, client reconnects={}",
            self.acknowledged,
            self.stale.len(),
            self.documents,
            self.stale_after_republish,
            self.unacknowledged.len(),
            self.duplicates,
            self.duplicates_after_republish,
            self.failures.len(),
            self.republished,
            self.reconnects
        )
    }
}
