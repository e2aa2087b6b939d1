//! The throughput benchmark: the worker end to end, against the broker's ceiling (an
//! echo consumer that touches no engine) and the engine's own `_bulk`, in one run, on
//! the running services (scripts/services.sh start).
//!
//!     cargo bench --bench throughput [-- --rounds 3 --scenarios S1,S2,S4,L,M1,M100 --publish]
//!     cargo bench --bench throughput -- --soak 600 [--rate 4000] [--publish]
//!     (--out DIR: where the results go, target/bench by default)
//!
//! Each round runs every scenario with each contender, interleaved:
//! - worker: envelopes on the worker's request queue, replies on direct reply-to;
//! - echo: the same envelopes to `echo.rs`'s consumer (a child process of this binary);
//! - direct: the same bulk bodies straight to `_bulk`, one call per request, no broker.
//!
//! Every reply is checked; the tool exits non-zero on any wrong or missing one. It
//! writes JSON, Markdown and a PNG chart (report.rs; copied to docs/src/bench/ with
//! `--publish`). `--soak` drives one-document requests through the worker at a fixed
//! rate instead (soak.rs).

mod chart;
mod echo;
mod procfs;
mod report;
mod soak;

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use mupdate_worker::client::Client;
use mupdate_worker::pipeline::bulk::{self, ItemOptions, Metadata};
use serde_json::{Value, json};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const ES_URL: &str = "http://127.0.0.1:9200";
const DOCUMENTS: usize = 20_000;
const TIMEOUT: Duration = Duration::from_secs(120);
/// The integration tests' lock on the shared servers (tests/support servers_lock).
const SERVERS_LOCK: &str = "mupdate-worker-servers.lock";
/// Where the charts are copied, to be committed: the book's benchmarks chapter
/// (docs/src/benchmarks.md) shows them.
const PUBLISHED: &str = "docs/src/bench";

#[derive(Clone, Copy)]
pub struct Scenario {
    name: &'static str,
    docs_per_request: usize,
    requests: usize,
    outstanding: usize,
    wait_for: bool,
    /// Size of a string field added to each document (0: none).
    doc_bytes: usize,
    /// L's documents have a collection of their own: made large, they would slow the
    /// updates of the other scenarios.
    collection: &'static str,
    /// Mixed actions (issue 21): request `i` creates new documents, updates seeded
    /// ones or deletes documents seeded for it before the run, in turn (`action`).
    mixed: bool,
}

const SCENARIOS: [Scenario; 7] = [
    Scenario {
        name: "S1",
        docs_per_request: 100,
        requests: 200,
        outstanding: 16,
        wait_for: false,
        doc_bytes: 0,
        collection: "docs",
        mixed: false,
    },
    Scenario {
        name: "S2",
        docs_per_request: 1,
        requests: 3_000,
        outstanding: 64,
        wait_for: false,
        doc_bytes: 0,
        collection: "docs",
        mixed: false,
    },
    Scenario {
        name: "S3",
        docs_per_request: 10,
        requests: 200,
        outstanding: 16,
        wait_for: true,
        doc_bytes: 0,
        collection: "docs",
        mixed: false,
    },
    Scenario {
        name: "S4",
        docs_per_request: 1,
        requests: 3_000,
        outstanding: 256,
        wait_for: false,
        doc_bytes: 0,
        collection: "docs",
        mixed: false,
    },
    Scenario {
        name: "M1",
        docs_per_request: 1,
        requests: 3_000,
        outstanding: 64,
        wait_for: false,
        doc_bytes: 0,
        collection: "docs",
        mixed: true,
    },
    Scenario {
        name: "M100",
        docs_per_request: 100,
        requests: 200,
        outstanding: 16,
        wait_for: false,
        doc_bytes: 0,
        collection: "docs",
        mixed: true,
    },
    Scenario {
        name: "L",
        docs_per_request: 200,
        requests: 50,
        outstanding: 8,
        wait_for: false,
        doc_bytes: 10 * 1024,
        collection: "large",
        mixed: false,
    },
];

/// The action of request `i` of scenario `s`: mUpdate, or for a mixed scenario mCreate,
/// mUpdate and mDelete in turn.
pub fn action(s: &Scenario, i: usize) -> &'static str {
    if !s.mixed {
        return "mUpdate";
    }
    ["mCreate", "mUpdate", "mDelete"][i % 3]
}

/// Run unless `--scenarios` says otherwise. S3 (`wait_for`: each call waits a refresh
/// interval) takes ~15 s a run and says little about throughput: opt in.
const DEFAULT_SCENARIOS: &str = "S1,S2,S4,M1,M100,L";

impl Scenario {
    fn describe(&self) -> String {
        format!(
            "{}{} × {} docs{}, {} outstanding{}",
            if self.mixed {
                "creates, updates and deletes in turn: "
            } else {
                ""
            },
            self.requests,
            self.docs_per_request,
            if self.doc_bytes > 0 {
                format!(" of {} KiB", self.doc_bytes / 1024)
            } else {
                String::new()
            },
            self.outstanding,
            if self.wait_for { ", wait_for" } else { "" }
        )
    }

    /// The echo consumer doesn't write: it can't answer `wait_for` truthfully.
    fn contenders(&self) -> &'static [Contender] {
        if self.wait_for {
            &[Contender::Worker, Contender::Direct]
        } else {
            &[Contender::Worker, Contender::Echo, Contender::Direct]
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Contender {
    Worker,
    Echo,
    Direct,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Worker => "worker",
            Contender::Echo => "echo",
            Contender::Direct => "direct",
        }
    }
}

/// CPU seconds of each process a run involves.
#[derive(Default, Clone, Copy)]
pub struct Cpu {
    /// The worker or the echo consumer (nothing for direct).
    consumer: f64,
    broker: f64,
    engine: f64,
    /// This process: the benchmark's client.
    driver: f64,
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            consumer: self.consumer - o.consumer,
            broker: self.broker - o.broker,
            engine: self.engine - o.engine,
            driver: self.driver - o.driver,
        }
    }
}

/// One measured run.
#[derive(Clone)]
pub struct Run {
    contender: Contender,
    requests: usize,
    documents: usize,
    seconds: f64,
    /// Sorted.
    latencies_ms: Vec<f64>,
    cpu: Cpu,
    consumer_peak_rss_mib: f64,
    docs_per_bulk: f64,
    errors: usize,
}

impl Run {
    fn docs_per_second(&self) -> f64 {
        self.documents as f64 / self.seconds
    }

    fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        percentile(&self.latencies_ms, p)
    }

    /// CPU per request in µs.
    fn per_request(&self, seconds: f64) -> f64 {
        seconds * 1e6 / self.requests as f64
    }

    fn to_json(&self) -> Value {
        json!({"contender": self.contender.name(), "requests": self.requests,
               "documents": self.documents, "seconds": self.seconds,
               "docs_per_second": self.docs_per_second(), "requests_per_second": self.requests_per_second(),
               "latency_ms": {"p50": self.percentile(0.5), "p95": self.percentile(0.95), "p99": self.percentile(0.99)},
               "cpu_seconds": {"consumer": self.cpu.consumer, "broker": self.cpu.broker,
                               "engine": self.cpu.engine, "driver": self.cpu.driver},
               "cpu_us_per_request": {"consumer": self.per_request(self.cpu.consumer),
                               "broker": self.per_request(self.cpu.broker),
                               "engine": self.per_request(self.cpu.engine),
                               "driver": self.per_request(self.cpu.driver)},
               "consumer_peak_rss_mib": self.consumer_peak_rss_mib,
               "documents_per_bulk": self.docs_per_bulk, "errors": self.errors})
    }
}

/// The `p` quantile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// What every run needs: the services, the processes measured and the names in use.
pub struct Bench {
    http: reqwest::Client,
    client: Arc<Client>,
    index: String,
    worker_queue: String,
    echo_queue: String,
    worker: u32,
    echo: u32,
    broker: Option<u32>,
    engine: u32,
    metrics: String,
}

impl Bench {
    /// The engine's index of a scenario's collection.
    fn target(&self, s: &Scenario) -> String {
        format!("&{}.{}", self.index, s.collection)
    }

    fn cpu(&self, contender: Contender) -> Cpu {
        let consumer = match contender {
            Contender::Worker => procfs::cpu_seconds(&self.worker.to_string()),
            Contender::Echo => procfs::cpu_seconds(&self.echo.to_string()),
            Contender::Direct => 0.0,
        };
        Cpu {
            consumer,
            broker: self
                .broker
                .map_or(0.0, |p| procfs::cpu_seconds(&p.to_string())),
            engine: procfs::cpu_seconds(&self.engine.to_string()),
            driver: procfs::cpu_seconds("self"),
        }
    }

    /// The worker's `mupdate_bulk_documents` sum and count so far.
    async fn bulk_stats(&self) -> (f64, f64) {
        // Nothing (0, 0) when the worker doesn't answer: its replies tell what went wrong.
        let text = match self
            .http
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let read = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (
            read("mupdate_bulk_documents_sum"),
            read("mupdate_bulk_documents_count"),
        )
    }

    async fn run(&self, contender: Contender, s: &Scenario, value: u64) -> Run {
        match contender {
            Contender::Direct => self.direct(s, value).await,
            _ => self.through_broker(contender, s, value).await,
        }
    }

    async fn direct(&self, s: &Scenario, value: u64) -> Run {
        let target = &self.target(s);
        let cpu0 = self.cpu(Contender::Direct);
        let start = Instant::now();
        let url = format!(
            "{ES_URL}/_bulk{}",
            if s.wait_for { "?refresh=wait_for" } else { "" }
        );
        let results: Vec<(f64, bool)> = futures_util::stream::iter(0..s.requests)
            .map(|i| {
                let (http, url) = (self.http.clone(), url.clone());
                let docs = documents(s, i, value);
                let body = bulk_body(target, action(s, i), &docs);
                async move {
                    let t = Instant::now();
                    let r: Value = match http
                        .post(url)
                        .header("content-type", "application/x-ndjson")
                        .body(body)
                        .send()
                        .await
                    {
                        Ok(r) => r.json().await.unwrap_or(Value::Null),
                        Err(_) => Value::Null,
                    };
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    let ok = r["errors"] == false
                        && r["items"].as_array().map(Vec::len) == Some(docs.len());
                    let ok = ok
                        && (!s.wait_for
                            || visible(&http, target, &docs, value).await == docs.len());
                    (ms, ok)
                }
            })
            .buffer_unordered(s.outstanding)
            .collect()
            .await;
        let seconds = start.elapsed().as_secs_f64();
        self.finish(Contender::Direct, s, seconds, results, cpu0)
    }

    async fn through_broker(&self, contender: Contender, s: &Scenario, value: u64) -> Run {
        let (queue, pid) = match contender {
            Contender::Worker => (&self.worker_queue, self.worker),
            _ => (&self.echo_queue, self.echo),
        };
        let target = &self.target(s);
        let watch = ProcessWatch::new(pid, contender.name());
        procfs::reset_peak_rss(pid);
        let bulks0 = self.bulk_stats().await;
        let cpu0 = self.cpu(contender);
        let start = Instant::now();
        let results: Vec<(f64, bool)> = futures_util::stream::iter(0..s.requests)
            .map(|i| {
                let client = self.client.clone();
                let id = format!("b{value}-{i}");
                let envelope = self.envelope(s, i, value, &id);
                let expected = ids(s, i, value);
                let gone = watch.gone.clone();
                async move {
                    let body = serde_json::to_vec(&envelope).unwrap();
                    let t = Instant::now();
                    let reply = request(&client, gone, queue, &body, &id).await;
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    let ok = reply.is_some_and(|r| good_reply(&r, &id, &expected));
                    let ok = ok
                        && (!s.wait_for || {
                            let docs = envelope["body"]["documents"].as_array().unwrap();
                            visible(&self.http, target, docs, value).await == docs.len()
                        });
                    (ms, ok)
                }
            })
            .buffer_unordered(s.outstanding)
            .collect()
            .await;
        let seconds = start.elapsed().as_secs_f64();
        let mut run = self.finish(contender, s, seconds, results, cpu0);
        run.consumer_peak_rss_mib = procfs::peak_rss_mib(pid);
        if contender == Contender::Worker {
            let (sum, count) = self.bulk_stats().await;
            run.docs_per_bulk = (sum - bulks0.0) / (count - bulks0.1).max(1.0);
        }
        run
    }

    fn finish(
        &self,
        contender: Contender,
        s: &Scenario,
        seconds: f64,
        results: Vec<(f64, bool)>,
        cpu0: Cpu,
    ) -> Run {
        let mut latencies_ms: Vec<f64> = results.iter().map(|r| r.0).collect();
        latencies_ms.sort_by(f64::total_cmp);
        Run {
            contender,
            requests: s.requests,
            documents: s.requests * s.docs_per_request,
            seconds,
            latencies_ms,
            cpu: self.cpu(contender) - cpu0,
            consumer_peak_rss_mib: 0.0,
            docs_per_bulk: 0.0,
            errors: results.iter().filter(|r| !r.1).count(),
        }
    }

    /// The envelope of request `i`.
    fn envelope(&self, s: &Scenario, i: usize, value: u64, id: &str) -> Value {
        let body = match action(s, i) {
            "mDelete" => json!({"ids": ids(s, i, value)}),
            _ => json!({"documents": documents(s, i, value)}),
        };
        let mut envelope = json!({"controller": "document", "action": action(s, i),
            "index": self.index, "collection": s.collection, "retryOnConflict": 5,
            "requestId": id, "body": body});
        if s.wait_for {
            envelope["refresh"] = json!("wait_for");
        }
        envelope
    }
}

/// Watches a consumer's process, so that the requests in flight fail at once when it
/// ends rather than each after TIMEOUT.
pub struct ProcessWatch {
    gone: tokio::sync::watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ProcessWatch {
    pub fn new(pid: u32, name: &'static str) -> Self {
        assert!(procfs::alive(pid), "the {name} process ({pid}) has ended");
        let (tx, gone) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            while procfs::alive(pid) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            eprintln!("the {name} process ({pid}) has ended");
            let _ = tx.send(true);
        });
        ProcessWatch { gone, task }
    }
}

impl Drop for ProcessWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request and its reply; None when it failed, or the consumer's process ended.
pub async fn request(
    client: &Client,
    mut gone: tokio::sync::watch::Receiver<bool>,
    queue: &str,
    body: &[u8],
    id: &str,
) -> Option<Vec<u8>> {
    let ended = async {
        if gone.wait_for(|g| *g).await.is_err() {
            // The watch stopped without seeing the end: nothing to report.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        reply = client.request(queue, body, id, TIMEOUT) => reply.ok(),
        () = ended => None,
    }
}

/// A 200 reply to request `id` whose hits are its documents, in order.
pub fn good_reply(reply: &[u8], id: &str, expected: &[String]) -> bool {
    let reply: Value = serde_json::from_slice(reply).unwrap_or(Value::Null);
    let hits: Vec<&str> = reply["result"]["hits"]
        .as_array()
        .map(|h| h.iter().filter_map(|h| h["_id"].as_str()).collect())
        .unwrap_or_default();
    reply["status"] == 200 && reply["requestId"] == id && hits == expected
}

fn http() -> reqwest::Client {
    // Plain bodies, as the worker asks for (reqwest would ask for gzip by default).
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::ACCEPT_ENCODING,
        "identity".parse().unwrap(),
    );
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        .pool_max_idle_per_host(256)
        .default_headers(headers)
        .build()
        .unwrap()
}

/// The engine's process id, from its own node info.
async fn engine_pid(http: &reqwest::Client) -> u32 {
    let info: Value = http
        .get(format!(
            "{ES_URL}/_nodes/_local/process?filter_path=nodes.*.process.id"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let node = info["nodes"].as_object().unwrap().values().next().unwrap();
    node["process"]["id"].as_u64().unwrap() as u32
}

/// The documents of request `i` of a run: distinct within the scenario. An update
/// names seeded documents; a mixed scenario's create names new ones, and its delete
/// ones seeded for it (`seed_deletes`), both of this run only.
pub fn ids(s: &Scenario, i: usize, value: u64) -> Vec<String> {
    (0..s.docs_per_request)
        .map(|j| match action(s, i) {
            "mCreate" => format!("c{value}-{i}-{j}"),
            "mDelete" => format!("x{value}-{i}-{j}"),
            _ => format!("d{}", (i * s.docs_per_request + j) % DOCUMENTS),
        })
        .collect()
}

/// Before a mixed run (not timed): the documents its deletes will delete.
async fn seed_deletes(http: &reqwest::Client, target: &str, s: &Scenario, value: u64) {
    let docs = (0..s.requests)
        .filter(|&i| action(s, i) == "mDelete")
        .flat_map(|i| ids(s, i, value))
        .map(|id| (id, json!({"v": 0})));
    index_all(http, target, docs.collect()).await;
}

pub fn documents(s: &Scenario, i: usize, value: u64) -> Vec<Value> {
    ids(s, i, value)
        .into_iter()
        .enumerate()
        .map(|(j, id)| {
            let mut body = json!({"v": value, "r": i});
            if s.doc_bytes > 0 {
                body["text"] = json!(text(s.doc_bytes, value, i, j));
            }
            json!({"_id": id, "body": body})
        })
        .collect()
}

/// `len` letters and digits, different for each document and run (so not a run of one
/// byte the engine's compression would make nothing of).
fn text(len: usize, value: u64, i: usize, j: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -";
    let mut x = (value << 40) ^ ((i as u64) << 20) ^ j as u64 ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x >> 58) as usize] as char
        })
        .collect()
}

/// The bulk body the worker builds for the same request.
fn bulk_body(target: &str, action: &str, docs: &[Value]) -> Vec<u8> {
    let options = ItemOptions {
        target,
        retry_on_conflict: 5,
        include_source: true,
        reply_source_bytes: usize::MAX,
        metadata: Some(Metadata {
            updated_at: 0,
            updater: None,
        }),
        single: false,
        ids: mupdate_worker::pipeline::write::Ids::Random,
        redelivered: false,
        echo_written: false,
    };
    let mut body = Vec::new();
    for d in docs {
        let (id, doc) = (d["_id"].as_str().unwrap(), d["body"].as_object().unwrap());
        match action {
            "mCreate" => bulk::append_whole(&mut body, &options, bulk::WholeKind::Create, id, doc),
            "mDelete" => bulk::append_delete(&mut body, &options, id),
            _ => bulk::append_update(&mut body, &options, id, doc, None),
        }
    }
    body
}

/// Counts the documents of `docs` holding `value`: 0 unless they are searchable.
async fn visible(http: &reqwest::Client, target: &str, docs: &[Value], value: u64) -> usize {
    let ids: Vec<&str> = docs.iter().map(|d| d["_id"].as_str().unwrap()).collect();
    let query =
        json!({"query": {"bool": {"filter": [{"ids": {"values": ids}}, {"term": {"v": value}}]}}});
    let r: Value = http
        .post(format!("{ES_URL}/{}/_count", target.replace('&', "%26")))
        .json(&query)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["count"].as_u64().unwrap_or(0) as usize
}

/// A child process, ended (SIGTERM, then waited for) when dropped.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn spawn_worker(queue: &str, metrics: &str) -> Spawned {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mupdate-worker"));
    command
        .env("MUPDATE__AMQP__REQUEST_QUEUE", queue)
        .env("MUPDATE__METRICS__LISTEN", metrics)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    Spawned(command.spawn().expect("the worker binary"))
}

/// This binary again, as the echo consumer; its stdin is a pipe whose end tells it
/// the benchmark is gone.
fn spawn_echo(queue: &str, prefetch: usize) -> Spawned {
    let exe = std::env::current_exe().expect("this binary");
    let child = Command::new(exe)
        .args(["--echo-consumer", queue, &prefetch.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("the echo consumer");
    Spawned(child)
}

/// Waits until `queue` has a consumer.
async fn wait_for_consumer(conn: &lapin::Connection, queue: &str) {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // A failed passive declare closes its channel: a new one each time.
        let ch = conn.create_channel().await.unwrap();
        if let Ok(q) = ch
            .queue_declare(queue.into(), passive, Default::default())
            .await
        {
            let _ = ch.close(200, "checked".into()).await;
            if q.consumer_count() > 0 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no consumer on {queue} in 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the integration tests to leave the servers, and keeps them off while held.
fn servers_lock() -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join(SERVERS_LOCK))
        .unwrap();
    if file.try_lock().is_err() {
        eprintln!("waiting for the servers lock (integration tests running)…");
        file.lock().unwrap();
    }
    file
}

pub struct Args {
    rounds: usize,
    out: PathBuf,
    scenarios: Vec<Scenario>,
    soak: Option<u64>,
    rate: Option<f64>,
    publish: bool,
}

fn args() -> Option<Args> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--echo-consumer") {
        let prefetch = argv.get(3).and_then(|p| p.parse().ok()).unwrap_or(256);
        echo::run(AMQP_URL, &argv[2], prefetch);
    }
    // `cargo test --all-targets` runs bench targets too, without --bench: do nothing then.
    if !argv.iter().any(|a| a == "--bench") {
        return None;
    }
    let value = |flag: &str| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
            .cloned()
    };
    let names = value("--scenarios").unwrap_or_else(|| DEFAULT_SCENARIOS.to_owned());
    let names: Vec<&str> = names.split(',').map(str::trim).collect();
    for n in &names {
        assert!(
            SCENARIOS.iter().any(|s| s.name.eq_ignore_ascii_case(n)),
            "unknown scenario {n:?} (S1, S2, S3, S4, L, M1, M100)"
        );
    }
    // In SCENARIOS' order whatever the order asked: L last.
    let scenarios = SCENARIOS
        .iter()
        .filter(|s| names.iter().any(|n| s.name.eq_ignore_ascii_case(n)))
        .copied()
        .collect();
    Some(Args {
        rounds: value("--rounds").and_then(|v| v.parse().ok()).unwrap_or(1),
        out: value("--out").map_or_else(|| PathBuf::from("target/bench"), PathBuf::from),
        scenarios,
        soak: argv
            .iter()
            .any(|a| a == "--soak")
            .then(|| value("--soak").and_then(|v| v.parse().ok()).unwrap_or(600)),
        rate: value("--rate").and_then(|v| v.parse().ok()),
        publish: argv.iter().any(|a| a == "--publish"),
    })
}

fn main() {
    let Some(args) = args() else { return };
    let _lock = servers_lock();
    let ok = tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(bench(args));
    if !ok {
        std::process::exit(1);
    }
}

fn shell(command: &str, args: &[&str]) -> String {
    Command::new(command)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The machine, the worker's commit (the last to change src/ or config/), the time and
/// the load: the header of a report.
fn context() -> Value {
    json!({
        "machine": format!(
            "{} cores, {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|c| c
                    .lines()
                    .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned)))
                .unwrap_or_default()
        ),
        "commit": shell("git", &["log", "-1", "--format=%h (%cs)", "--", "src", "config"]),
        "dirty": !shell("git", &["status", "--porcelain", "--untracked-files=no", "src"]).is_empty(),
        "date": shell("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "load_average_before": procfs::load_average(),
    })
}

async fn bench(args: Args) -> bool {
    let http = http();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let index = format!("bench{suffix}");
    let collections: BTreeMap<&str, usize> = SCENARIOS.iter().fold(BTreeMap::new(), |mut c, s| {
        let n = c.entry(s.collection).or_default();
        *n = (*n).max((s.requests * s.docs_per_request).min(DOCUMENTS));
        c
    });
    let worker_queue = format!("mupdate.bench.{suffix}");
    let echo_queue = format!("mupdate.bench.{suffix}.echo");
    let mut context = context();

    for (collection, count) in &collections {
        seed(&http, &format!("&{index}.{collection}"), *count).await;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let worker = spawn_worker(&worker_queue, &metrics);
    let prefetch = SCENARIOS.iter().map(|s| s.outstanding).max().unwrap_or(64);
    let echo = spawn_echo(&echo_queue, prefetch);
    let admin = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (scripts/services.sh start)");
    wait_for_consumer(&admin, &worker_queue).await;
    wait_for_consumer(&admin, &echo_queue).await;
    let b = Bench {
        client: Arc::new(Client::connect(AMQP_URL).await.expect("RabbitMQ")),
        engine: engine_pid(&http).await,
        broker: procfs::broker_pid(),
        worker: worker.0.id(),
        echo: echo.0.id(),
        http,
        index,
        worker_queue,
        echo_queue,
        metrics,
    };

    // A panic still removes the index and the queues.
    let outcome = std::panic::AssertUnwindSafe(async {
        match args.soak {
            Some(seconds) => soak::run(&b, &args, seconds, &mut context).await,
            None => scenarios(&b, &args, &mut context).await,
        }
    })
    .catch_unwind()
    .await;

    drop(worker);
    drop(echo);
    for collection in collections.keys() {
        let _ = b
            .http
            .delete(format!("{ES_URL}/%26{}.{collection}", b.index))
            .send()
            .await;
    }
    let ch = admin.create_channel().await.unwrap();
    for queue in [&b.worker_queue, &b.echo_queue] {
        let _ = ch
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
    outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// One shard, no replica (one node), the `count` documents the scenarios update.
async fn seed(http: &reqwest::Client, target: &str, count: usize) {
    let r = http
        .put(format!("{ES_URL}/{}", target.replace('&', "%26")))
        .json(&json!({"settings": {"number_of_shards": 1, "number_of_replicas": 0}}))
        .send()
        .await
        .expect("Elasticsearch on 127.0.0.1:9200 (scripts/services.sh start)");
    assert!(r.status().is_success(), "create the bench index");
    let docs = (0..count).map(|i| (format!("d{i}"), json!({"v": 0, "seed": i})));
    index_all(http, target, docs.collect()).await;
}

/// Indexes `docs` (`(id, source)`) into `target` straight through `_bulk`, 5,000 a
/// call, then refreshes it.
async fn index_all(http: &reqwest::Client, target: &str, docs: Vec<(String, Value)>) {
    for chunk in docs.chunks(5_000) {
        let mut body = String::new();
        for (id, source) in chunk {
            body.push_str(&format!(
                "{}\n{source}\n",
                json!({"index": {"_index": target, "_id": id}})
            ));
        }
        http.post(format!("{ES_URL}/_bulk"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .unwrap();
    }
    http.post(format!("{ES_URL}/{}/_refresh", target.replace('&', "%26")))
        .send()
        .await
        .unwrap();
}

/// Draws chart `name` under `--out`, and with `--publish` copies it to docs/src/bench/ (a
/// partial run leaves the committed charts alone).
fn write_chart(args: &Args, name: &str, draw: impl Fn(&Path) -> Result<(), Box<dyn Error>>) {
    let path = args.out.join(name);
    if let Err(err) = draw(&path) {
        eprintln!("chart {name}: {err}");
        return;
    }
    eprintln!("wrote {}", path.display());
    if args.publish {
        let _ = std::fs::create_dir_all(PUBLISHED);
        let _ = std::fs::copy(&path, Path::new(PUBLISHED).join(name));
        eprintln!("copied to {PUBLISHED}/{name}");
    }
}

async fn scenarios(b: &Bench, args: &Args, context: &mut Value) -> bool {
    let mut value = 1u64;
    let mut results: BTreeMap<(&str, Contender), Vec<Run>> = BTreeMap::new();
    // Scenario by scenario, L last: the memory the worker keeps after L's large messages
    // would show in the peak RSS of every scenario after it. Contenders interleave.
    for s in &args.scenarios {
        for round in 0..args.rounds {
            // Rotate who goes first, so no contender always runs on a cold (or hot) engine.
            let mut order = s.contenders().to_vec();
            let len = order.len();
            order.rotate_left(round % len);
            for contender in order {
                value += 1;
                if s.mixed {
                    seed_deletes(&b.http, &b.target(s), s, value).await;
                }
                let run = b.run(contender, s, value).await;
                eprintln!(
                    "round {round} {} {:6}: {:7.0} docs/s {:6.0} req/s, p99 {:6.1} ms, cpu µs/req: consumer {:.0} broker {:.0} engine {:.0} driver {:.0}, rss {:.1} MiB, errors {}",
                    s.name,
                    contender.name(),
                    run.docs_per_second(),
                    run.requests_per_second(),
                    run.percentile(0.99),
                    run.per_request(run.cpu.consumer),
                    run.per_request(run.cpu.broker),
                    run.per_request(run.cpu.engine),
                    run.per_request(run.cpu.driver),
                    run.consumer_peak_rss_mib,
                    run.errors
                );
                results.entry((s.name, contender)).or_default().push(run);
            }
        }
    }
    context["load_average_after"] = json!(procfs::load_average());
    context["rounds"] = json!(args.rounds);
    report::write(args, context, &results)
}
