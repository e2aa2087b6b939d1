//! Shared by the integration tests: the real servers' addresses, fresh names, a worker
//! started in-process on fresh queues, and clean-up of what a test made.
#![allow(dead_code)]

pub mod binary;
pub mod cleanup;
pub mod history;
pub mod http_fault;
pub mod latency;
pub mod load;
pub mod proxy;
pub mod rabbitmqctl;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use mupdate_worker::config::{Settings, redact_url};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The engine under test: `MUPDATE_TEST_ES_URL`, else the single node on 9200. It reads
/// as a `&str` (`&ES_URL`, `ES_URL.to_owned()`) and formats as one (`{ES_URL}`), so the
/// conformance run of scripts/test.sh can point every test at another engine.
pub const ES_URL: EsUrl = EsUrl;

pub struct EsUrl;

impl std::ops::Deref for EsUrl {
    type Target = str;
    fn deref(&self) -> &str {
        static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        URL.get_or_init(|| {
            std::env::var("MUPDATE_TEST_ES_URL")
                .ok()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| "http://127.0.0.1:9200".to_owned())
        })
    }
}

impl std::fmt::Display for EsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

/// The servers a helper talks to: the single node of scripts/services.sh unless a test
/// names others (a node of scripts/cluster.sh's cluster).
#[derive(Clone, Debug)]
pub struct Servers {
    pub amqp: String,
    pub es: String,
}

impl Servers {
    pub fn single() -> Self {
        Servers {
            amqp: AMQP_URL.to_owned(),
            es: ES_URL.to_owned(),
        }
    }
}
/// Every wait in a test is bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `http://{listen}/readyz` answers `want`.
pub async fn wait_readyz(listen: &str, want: u16) {
    wait_equal("readyz", want, || readyz(listen)).await;
}

/// The status of the worker's `/readyz` (0 when it doesn't answer).
pub async fn readyz(listen: &str) -> u16 {
    http()
        .get(format!("http://{listen}/readyz"))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// Polls `probe` until it gives `want`; fails the test, naming `what` and the last value,
/// after `TIMEOUT`.
pub async fn wait_equal<T, F>(what: &str, want: T, mut probe: impl FnMut() -> F)
where
    T: PartialEq + std::fmt::Debug,
    F: std::future::Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let now = probe().await;
        if now == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {now:?}, never {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (up to 3 minutes) until RabbitMQ accepts connections and Elasticsearch answers:
/// for tests that may start while another test, or another checkout's, restarts them.
pub async fn wait_servers() {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let broker = tokio::net::TcpStream::connect("127.0.0.1:5672")
            .await
            .is_ok();
        let engine = http()
            .get(format!("{ES_URL}/_cluster/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if broker && engine {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "servers down (broker up: {broker}, engine up: {engine})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The Prometheus text a worker serves at `http://{listen}/metrics`.
pub async fn metrics_text(listen: &str) -> String {
    http()
        .get(format!("http://{listen}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// One sample of the Prometheus text at `http://{listen}/metrics`, 0 when absent.
pub async fn metric(listen: &str, name: &str) -> f64 {
    sample(&metrics_text(listen).await, name)
}

/// Waits (within `TIMEOUT`) until the worker's metric `name` is `value`.
pub async fn wait_metric(listen: &str, name: &str, value: f64) {
    wait_equal(name, value, || metric(listen, name)).await;
}

/// The sample `name` (with its labels, if any) of Prometheus text, 0 when absent.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A lowercase name no other test or run uses.
pub fn fresh(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}-{n}", &id[..10])
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(TIMEOUT).build().unwrap()
}

/// Sends a test's own set-up or read-back call to the engine, again while the engine
/// answers 429: its memory circuit breaker counts garbage not yet collected, and on a
/// small heap an earlier test's large documents can trip it for a moment
/// (`circuit_breaking_exception`, `"durability": "TRANSIENT"`). At most 20 tries, half
/// a second apart; then the last answer, whatever it is (callers check its status). What
/// the worker sends never goes through here.
pub async fn engine_call(request: reqwest::RequestBuilder) -> reqwest::Response {
    let (client, request) = request.build_split();
    let request = request.unwrap();
    for _ in 1..20 {
        let again = request.try_clone().expect("a buffered body");
        let r = client.execute(again).await.unwrap();
        if r.status() != reqwest::StatusCode::TOO_MANY_REQUESTS {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    client.execute(request).await.unwrap()
}

/// Percent-encodes `&` so a physical Kuzzle index name can stand in a URL path.
pub fn path(name: &str) -> String {
    name.replace('&', "%26")
}

/// A Kuzzle index and collection backed by a fresh physical index, deleted on drop.
pub struct Collection {
    pub index: String,
    pub collection: String,
    pub physical: String,
    /// The engine it is read and deleted through (any node of a cluster).
    pub es: String,
}

impl Collection {
    /// Creates `&{index}.{collection}` holding `docs` (`(id, source)` pairs).
    pub async fn create(docs: &[(&str, Value)]) -> Self {
        Self::create_with(docs, json!({})).await
    }

    pub async fn create_with(docs: &[(&str, Value)], settings: Value) -> Self {
        Self::create_on(&ES_URL, docs, json!({"settings": settings})).await
    }

    /// A fresh collection on the engine at `es`, its index created with `body`
    /// (`settings`, `mappings`).
    pub async fn create_on(es: &str, docs: &[(&str, Value)], body: Value) -> Self {
        Self::create_in(es, &fresh("idx"), "col", docs, body).await
    }

    /// Another collection of an existing (or new) Kuzzle index.
    pub async fn create_named(index: &str, collection: &str, docs: &[(&str, Value)]) -> Self {
        Self::create_in(&ES_URL, index, collection, docs, json!({"settings": {}})).await
    }

    async fn create_in(
        es_url: &str,
        index: &str,
        collection: &str,
        docs: &[(&str, Value)],
        body: Value,
    ) -> Self {
        let (index, collection) = (index.to_owned(), collection.to_owned());
        let physical = format!("&{index}.{collection}");
        let es = http();
        let r = engine_call(es.put(format!("{es_url}/{}", path(&physical))).json(&body)).await;
        assert!(
            r.status().is_success(),
            "create index: {}",
            r.text().await.unwrap()
        );
        for (id, source) in docs {
            let r = engine_call(
                es.put(format!("{es_url}/{}/_doc/{id}", path(&physical)))
                    .json(source),
            )
            .await;
            assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        }
        let r = engine_call(es.post(format!("{es_url}/{}/_refresh", path(&physical)))).await;
        assert!(
            r.status().is_success(),
            "refresh: {}",
            r.text().await.unwrap()
        );
        Collection {
            index,
            collection,
            physical,
            es: es_url.to_owned(),
        }
    }

    /// A stored document's `_source` and `_version`: `(null, 0)` when the engine says
    /// it is not there (404: no such document, or no such index). Any other answer fails
    /// the test, so that an engine error never reads as a deleted document.
    pub async fn get(&self, id: &str) -> (Value, u64) {
        let r = engine_call(http().get(format!("{}/{}/_doc/{id}", self.es, path(&self.physical))))
            .await;
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(
            status == reqwest::StatusCode::OK || status == reqwest::StatusCode::NOT_FOUND,
            "read {id}: {status} {text}"
        );
        let doc: Value = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("read {id}: {status} {err}: {text}"));
        (
            doc["_source"].clone(),
            doc["_version"].as_u64().unwrap_or(0),
        )
    }

    /// An mUpdate envelope for this collection.
    pub fn envelope(&self, documents: Value) -> Value {
        json!({"index": self.index, "collection": self.collection,
               "controller": "document", "action": "mUpdate",
               "body": {"documents": documents}})
    }
}

impl Drop for Collection {
    fn drop(&mut self) {
        let url = format!("{}/{}", self.es, path(&self.physical));
        delete_blocking(url);
    }
}

/// A fresh directory under the system's temporary directory, removed on drop.
pub struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tempdir() -> TempDir {
    let dir = std::env::temp_dir().join(fresh("mupdate-test"));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// Deletes an engine resource from a destructor, outside the test's runtime.
pub fn delete_blocking(url: String) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { http().delete(url).send().await })
    })
    .join();
}

/// Whether a physical index exists.
pub async fn index_exists(name: &str) -> bool {
    let status = engine_call(http().head(format!("{ES_URL}/{}", path(name))))
        .await
        .status();
    assert!(
        status == reqwest::StatusCode::OK || status == reqwest::StatusCode::NOT_FOUND,
        "does {name} exist: {status}"
    );
    status == reqwest::StatusCode::OK
}

/// Defaults, with fresh queue names so tests run in parallel.
pub fn settings() -> Settings {
    let mut s = Settings::defaults();
    s.storage.url = ES_URL.to_owned();
    s.amqp.request_queue = fresh("mupdate.requests");
    s.amqp.reply_queue = fresh("mupdate.replies");
    s.amqp.dead_letter_exchange = fresh("mupdate.dlx");
    s.amqp.dead_letter_queue = fresh("mupdate.dead");
    // Many workers run at once: none serves metrics unless a test asks.
    s.metrics.listen = String::new();
    s
}

/// A worker running in this test's runtime, on its own queues.
pub struct Worker {
    pub settings: Settings,
    token: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    pub async fn start() -> Self {
        Self::start_with(settings()).await
    }

    /// Starts a worker and waits until it consumes its request queue.
    pub async fn start_with(settings: Settings) -> Self {
        let token = CancellationToken::new();
        let task = tokio::spawn(mupdate_worker::lifecycle::session::run(
            settings.clone(),
            token.clone(),
        ));
        wait_consumers(&settings.amqp.request_queue, 1).await;
        Worker {
            settings,
            token,
            task,
        }
    }

    pub fn request_queue(&self) -> &str {
        &self.settings.amqp.request_queue
    }

    /// Stops the worker gracefully and deletes its queues and dead-letter exchange.
    pub async fn stop(self) {
        let settings = self.halt().await;
        delete_topology(&settings).await;
    }

    /// Stops the worker gracefully, keeping its queues; its settings start it again.
    pub async fn halt(self) -> Settings {
        self.token.cancel();
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .expect("worker stops in time")
            .unwrap()
            .unwrap();
        self.settings
    }
}

/// Deletes the queues and the dead-letter exchange a worker on `settings` declares.
pub async fn delete_topology(settings: &Settings) {
    delete_topology_at(AMQP_URL, settings).await
}

/// The same through the broker at `url`.
pub async fn delete_topology_at(url: &str, settings: &Settings) {
    let amqp = &settings.amqp;
    delete_queues_at(
        url,
        &[
            &amqp.request_queue,
            &amqp.reply_queue,
            &amqp.dead_letter_queue,
        ],
    )
    .await;
    if !amqp.dead_letter_exchange.is_empty() {
        let broker = Amqp::open_at(url).await;
        let _ = broker
            .channel
            .exchange_delete(
                amqp.dead_letter_exchange.as_str().into(),
                Default::default(),
            )
            .await;
        broker.close().await;
    }
}

pub async fn delete_queues(queues: &[&str]) {
    delete_queues_at(AMQP_URL, queues).await
}

pub async fn delete_queues_at(url: &str, queues: &[&str]) {
    let amqp = Amqp::open_at(url).await;
    for q in queues {
        let _ = amqp
            .channel
            .queue_delete((*q).into(), QueueDeleteOptions::default())
            .await;
    }
    amqp.close().await;
}

/// The worker binary on `settings`' queues and prefetch, metrics off, logging warnings;
/// callers add environment and stdio, then spawn it (`binary::BinaryWorker::spawn`).
pub fn worker_command(settings: &Settings) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mupdate-worker"));
    command
        .env("MUPDATE__AMQP__REQUEST_QUEUE", &settings.amqp.request_queue)
        .env("MUPDATE__AMQP__REPLY_QUEUE", &settings.amqp.reply_queue)
        .env(
            "MUPDATE__AMQP__DEAD_LETTER_EXCHANGE",
            &settings.amqp.dead_letter_exchange,
        )
        .env(
            "MUPDATE__AMQP__DEAD_LETTER_QUEUE",
            &settings.amqp.dead_letter_queue,
        )
        .env(
            "MUPDATE__AMQP__PREFETCH",
            settings.amqp.prefetch.to_string(),
        )
        .env("MUPDATE__STORAGE__URL", &settings.storage.url)
        .env("MUPDATE__METRICS__LISTEN", "")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    command
}

/// Waits until `queue` has at least `n` consumers.
pub async fn wait_consumers(queue: &str, n: u32) {
    wait_consumers_at(AMQP_URL, queue, n).await
}

pub async fn wait_consumers_at(url: &str, queue: &str, n: u32) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while queue_counts_at(url, queue).await.map_or(0, |c| c.1) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "workers did not start consuming"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ready messages and consumers of a queue, or None when it doesn't exist.
pub async fn queue_counts(queue: &str) -> Option<(u32, u32)> {
    queue_counts_at(AMQP_URL, queue).await
}

pub async fn queue_counts_at(url: &str, queue: &str) -> Option<(u32, u32)> {
    let amqp = Amqp::open_at(url).await;
    let declared = amqp
        .channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()
        .map(|q| (q.message_count(), q.consumer_count()));
    amqp.close().await;
    declared
}

pub async fn queue_consumers(queue: &str) -> Option<u32> {
    queue_counts(queue).await.map(|(_, c)| c)
}

/// A connection and one confirming channel on it.
pub struct Amqp {
    pub connection: Connection,
    pub channel: Channel,
}

impl Amqp {
    pub async fn open() -> Self {
        Self::open_at(AMQP_URL).await
    }

    pub async fn open_at(url: &str) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ at {}: {e}", redact_url(url)));
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Amqp {
            connection,
            channel,
        }
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "bye".into()).await;
    }
}

/// Publishes bytes to a queue with the given properties, confirmed.
pub async fn publish(channel: &Channel, queue: &str, body: &[u8], props: BasicProperties) {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
}

/// Sends an envelope over direct reply-to and returns the parsed reply.
pub async fn call(worker: &Worker, envelope: &Value) -> Value {
    call_bytes(worker, &serde_json::to_vec(envelope).unwrap()).await
}

pub async fn call_bytes(worker: &Worker, body: &[u8]) -> Value {
    call_queue(worker.request_queue(), body).await
}

/// Sends bytes to a request queue over direct reply-to and returns the parsed reply.
pub async fn call_queue(queue: &str, body: &[u8]) -> Value {
    let client = mupdate_worker::client::Client::connect(AMQP_URL)
        .await
        .unwrap();
    let id = mupdate_worker::client::correlation_id(body);
    let reply = client.request(queue, body, &id, TIMEOUT).await.unwrap();
    serde_json::from_slice(&reply).unwrap()
}

/// The next message of `queue` (consumed with auto-ack), within the test timeout.
pub async fn next_message(channel: &Channel, queue: &str) -> lapin::message::Delivery {
    next_messages(channel, queue, 1).await.remove(0)
}

/// The next `n` messages of `queue`, from one auto-ack consumer.
pub async fn next_messages(
    channel: &Channel,
    queue: &str,
    n: usize,
) -> Vec<lapin::message::Delivery> {
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            fresh("test-consumer").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut messages = Vec::new();
    for _ in 0..n {
        let message = tokio::time::timeout(TIMEOUT, consumer.next())
            .await
            .expect("a message in time")
            .unwrap()
            .unwrap();
        messages.push(message);
    }
    messages
}

/// Held by every test that stops, starts or reconfigures the shared servers: one such
/// test at a time in this process (a tokio mutex) and across processes (a file lock, for
/// test binaries run side by side).
pub struct ServersLock {
    _local: tokio::sync::MutexGuard<'static, ()>,
    _file: std::fs::File,
}

pub async fn servers_lock() -> ServersLock {
    static LOCAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let local = LOCAL.lock().await;
    let file = tokio::task::spawn_blocking(|| {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join("mupdate-worker-servers.lock"))
            .unwrap();
        file.lock().unwrap();
        file
    })
    .await
    .unwrap();
    ServersLock {
        _local: local,
        _file: file,
    }
}

/// scripts/services.sh with `args` (e.g. `stop engine`), which must succeed.
pub fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let status = std::process::Command::new(script)
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "services.sh {args:?}");
}

/// The type (`classic`, `quorum`, …) of each of `queues`, from `rabbitmqctl list_queues`.
pub fn queue_types(queues: &[&str]) -> HashMap<String, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let out = std::process::Command::new(script)
        .args([
            "rabbitmqctl",
            "-q",
            "list_queues",
            "--no-table-headers",
            "name",
            "type",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "rabbitmqctl list_queues");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(name, _)| queues.contains(name))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}

/// rabbitmqctl, through the script that knows the node's name.
pub fn rabbitmqctl(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let status = std::process::Command::new(script)
        .args(["rabbitmqctl", "-q"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "rabbitmqctl {args:?}");
}
