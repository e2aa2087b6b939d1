//! The throughput benchmark: the worker end to end against the engine's own `_bulk`
//! limit, in one run, on the running services (scripts/services.sh start).
//!
//!     cargo bench --bench throughput [-- --rounds 2 --out target/bench]
//!
//! Each scenario runs direct (the same bulk bodies straight to `_bulk`, same batch
//! sizes and concurrency, no broker) and through the worker (envelopes on the request
//! queue, replies on direct reply-to), interleaved. Writes JSON and Markdown; exits
//! non-zero on any wrong or missing reply.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mupdate_worker::bulk::{self, ItemOptions, Metadata};
use mupdate_worker::client::Client;
use serde_json::{Value, json};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const ES_URL: &str = "http://127.0.0.1:9200";
const DOCUMENTS: usize = 20_000;
const TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    docs_per_request: usize,
    requests: usize,
    outstanding: usize,
    wait_for: bool,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "S1",
        docs_per_request: 100,
        requests: 200,
        outstanding: 16,
        wait_for: false,
    },
    Scenario {
        name: "S2",
        docs_per_request: 1,
        requests: 5_000,
        outstanding: 64,
        wait_for: false,
    },
    Scenario {
        name: "S3",
        docs_per_request: 10,
        requests: 500,
        outstanding: 16,
        wait_for: true,
    },
];

/// One measured run.
#[derive(Default, Clone)]
struct Run {
    documents: usize,
    seconds: f64,
    latencies_ms: Vec<f64>,
    worker_cpu: f64,
    broker_cpu: f64,
    worker_peak_rss_mib: f64,
    docs_per_bulk: f64,
    engine_cpu: f64,
    errors: usize,
}

impl Run {
    fn docs_per_second(&self) -> f64 {
        self.documents as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        let mut l = self.latencies_ms.clone();
        l.sort_by(f64::total_cmp);
        if l.is_empty() {
            return 0.0;
        }
        l[((l.len() - 1) as f64 * p).round() as usize]
    }

    fn to_json(&self) -> Value {
        json!({"documents": self.documents, "seconds": self.seconds,
               "docs_per_second": self.docs_per_second(),
               "latency_ms": {"p50": self.percentile(0.5), "p95": self.percentile(0.95), "p99": self.percentile(0.99)},
               "worker_cpu_seconds": self.worker_cpu, "broker_cpu_seconds": self.broker_cpu,
               "worker_peak_rss_mib": self.worker_peak_rss_mib, "documents_per_bulk": self.docs_per_bulk,
               "engine_cpu_seconds": self.engine_cpu, "errors": self.errors})
    }
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
        .pool_max_idle_per_host(128)
        .default_headers(headers)
        .build()
        .unwrap()
}

/// The engine's process id, from its own node info (its CPU counters in node stats
/// refresh only every second: /proc is exact).
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

/// The broker's Erlang VM, found by name in /proc.
fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("beam") && cmdline.contains("rabbit")).then_some(pid)
    })
}

static METRICS: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The worker's `mupdate_bulk_documents` sum and count so far.
async fn bulk_stats(http: &reqwest::Client) -> (f64, f64) {
    let text = http
        .get(format!("http://{}/metrics", METRICS.get().expect("set")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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

static PIDS: std::sync::OnceLock<(u32, Option<u32>)> = std::sync::OnceLock::new();

async fn engine_cpu_seconds(_http: &reqwest::Client) -> f64 {
    process_cpu_seconds(PIDS.get().expect("pids known").0)
}

fn broker_cpu_seconds() -> f64 {
    PIDS.get()
        .and_then(|p| p.1)
        .map_or(0.0, process_cpu_seconds)
}

/// utime + stime of a process, in seconds.
fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The documents of request `i` of a run: distinct within the scenario.
fn ids(s: &Scenario, i: usize) -> Vec<String> {
    (0..s.docs_per_request)
        .map(|j| format!("d{}", (i * s.docs_per_request + j) % DOCUMENTS))
        .collect()
}

fn documents(s: &Scenario, i: usize, value: u64) -> Vec<Value> {
    ids(s, i)
        .into_iter()
        .map(|id| json!({"_id": id, "body": {"v": value, "r": i}}))
        .collect()
}

/// The bulk body the worker builds for the same request.
fn bulk_body(target: &str, docs: &[Value]) -> Vec<u8> {
    let options = ItemOptions {
        target,
        retry_on_conflict: 5,
        include_source: true,
        metadata: Some(Metadata {
            updated_at: 0,
            updater: None,
        }),
    };
    let mut body = Vec::new();
    for d in docs {
        bulk::append_update(
            &mut body,
            &options,
            d["_id"].as_str().unwrap(),
            d["body"].as_object().unwrap(),
            None,
        );
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

async fn direct(http: &reqwest::Client, target: &str, s: &Scenario, value: u64) -> Run {
    let cpu0 = engine_cpu_seconds(http).await;
    let start = Instant::now();
    let url = format!(
        "{ES_URL}/_bulk{}",
        if s.wait_for { "?refresh=wait_for" } else { "" }
    );
    let results: Vec<(f64, bool)> = futures_util::stream::iter(0..s.requests)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            let docs = documents(s, i, value);
            let body = bulk_body(target, &docs);
            async move {
                let t = Instant::now();
                let r: Value = http
                    .post(url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let ok =
                    r["errors"] == false && r["items"].as_array().map(Vec::len) == Some(docs.len());
                let ok =
                    ok && (!s.wait_for || visible(&http, target, &docs, value).await == docs.len());
                (ms, ok)
            }
        })
        .buffer_unordered(s.outstanding)
        .collect()
        .await;
    let seconds = start.elapsed().as_secs_f64();
    Run {
        documents: s.requests * s.docs_per_request,
        seconds,
        latencies_ms: results.iter().map(|r| r.0).collect(),
        engine_cpu: engine_cpu_seconds(http).await - cpu0,
        errors: results.iter().filter(|r| !r.1).count(),
        ..Run::default()
    }
}

async fn through_worker(
    http: &reqwest::Client,
    client: &Arc<Client>,
    queue: &str,
    worker: u32,
    col: (&str, &str, &str),
    s: &Scenario,
    value: u64,
) -> Run {
    let (index, collection, target) = col;
    reset_peak_rss(worker);
    let bulks0 = bulk_stats(http).await;
    let (cpu0, wcpu0, bcpu0) = (
        engine_cpu_seconds(http).await,
        process_cpu_seconds(worker),
        broker_cpu_seconds(),
    );
    let start = Instant::now();
    let results: Vec<(f64, bool)> = futures_util::stream::iter(0..s.requests)
        .map(|i| {
            let client = client.clone();
            let docs = documents(s, i, value);
            let mut envelope = json!({"controller": "document", "action": "mUpdate", "index": index,
                "collection": collection, "retryOnConflict": 5, "body": {"documents": docs}});
            if s.wait_for {
                envelope["refresh"] = json!("wait_for");
            }
            let id = format!("b{value}-{i}");
            envelope["requestId"] = json!(id);
            let expected = ids(s, i);
            let http = http.clone();
            async move {
                let t = Instant::now();
                let reply = client
                    .request(queue, &serde_json::to_vec(&envelope).unwrap(), &id, TIMEOUT)
                    .await;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let Ok(reply) = reply else { return (ms, false) };
                let reply: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
                let hits: Vec<&str> = reply["result"]["hits"]
                    .as_array()
                    .map(|h| h.iter().filter_map(|h| h["_id"].as_str()).collect())
                    .unwrap_or_default();
                let ok = reply["status"] == 200 && reply["requestId"] == id && hits == expected;
                let docs = envelope["body"]["documents"].as_array().unwrap().clone();
                let ok =
                    ok && (!s.wait_for || visible(&http, target, &docs, value).await == docs.len());
                (ms, ok)
            }
        })
        .buffer_unordered(s.outstanding)
        .collect()
        .await;
    let seconds = start.elapsed().as_secs_f64();
    Run {
        documents: s.requests * s.docs_per_request,
        seconds,
        latencies_ms: results.iter().map(|r| r.0).collect(),
        worker_cpu: process_cpu_seconds(worker) - wcpu0,
        broker_cpu: broker_cpu_seconds() - bcpu0,
        worker_peak_rss_mib: peak_rss_mib(worker),
        docs_per_bulk: {
            let (sum, count) = bulk_stats(http).await;
            (sum - bulks0.0) / (count - bulks0.1).max(1.0)
        },
        engine_cpu: engine_cpu_seconds(http).await - cpu0,
        errors: results.iter().filter(|r| !r.1).count(),
    }
}

/// The engine's ideal for S2's updates: 1,000-document bulks, two at a time.
async fn ideal(http: &reqwest::Client, target: &str, value: u64) -> Run {
    let s = Scenario {
        name: "ideal",
        docs_per_request: 1_000,
        requests: 5,
        outstanding: 2,
        wait_for: false,
    };
    direct(http, target, &s, value).await
}

fn spawn_worker(queue: &str, metrics: &str) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mupdate-worker"));
    command
        .env("MUPDATE__AMQP__REQUEST_QUEUE", queue)
        .env("MUPDATE__METRICS__LISTEN", metrics)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    command.spawn().expect("the worker binary")
}

struct Args {
    rounds: usize,
    out: PathBuf,
}

fn args() -> Option<Args> {
    let argv: Vec<String> = std::env::args().collect();
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
    Some(Args {
        rounds: value("--rounds").and_then(|v| v.parse().ok()).unwrap_or(1),
        out: value("--out").map_or_else(|| PathBuf::from("target/bench"), PathBuf::from),
    })
}

#[tokio::main]
async fn main() {
    let Some(args) = args() else { return };
    let http = http();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let (index, collection) = (format!("bench{}", &suffix[..8]), "docs".to_owned());
    let target = format!("&{index}.{collection}");
    let queue = format!("mupdate.bench.{}", &suffix[..8]);

    // Seed: one shard, no replica (one node), the documents the scenarios update.
    let r = http
        .put(format!("{ES_URL}/{}", target.replace('&', "%26")))
        .json(&json!({"settings": {"number_of_shards": 1, "number_of_replicas": 0}}))
        .send()
        .await
        .expect("Elasticsearch on 127.0.0.1:9200 (scripts/services.sh start)");
    assert!(r.status().is_success(), "create the bench index");
    for chunk in (0..DOCUMENTS).collect::<Vec<_>>().chunks(5_000) {
        let mut body = String::new();
        for i in chunk {
            body.push_str(&format!(
                "{}\n{}\n",
                json!({"index": {"_index": target, "_id": format!("d{i}")}}),
                json!({"v": 0, "seed": i})
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

    let _ = PIDS.set((engine_pid(&http).await, broker_pid()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let _ = METRICS.set(metrics.clone());
    let mut worker = spawn_worker(&queue, &metrics);
    let client = Arc::new(
        Client::connect(AMQP_URL)
            .await
            .expect("RabbitMQ on 127.0.0.1:5672"),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let machine = format!(
        "{} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c
                .lines()
                .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned)))
            .unwrap_or_default()
    );

    let mut value = 1u64;
    let mut results: BTreeMap<String, Vec<(Run, Run)>> = BTreeMap::new();
    let mut ideal_runs = Vec::new();
    for round in 0..args.rounds {
        for s in &SCENARIOS {
            value += 1;
            let d = direct(&http, &target, s, value).await;
            value += 1;
            let w = through_worker(
                &http,
                &client,
                &queue,
                worker.id(),
                (&index, &collection, &target),
                s,
                value,
            )
            .await;
            eprintln!(
                "round {round} {}: direct {:.0} docs/s, worker {:.0} docs/s ({:.2}x), cpu: worker {:.2}s broker {:.2}s engine {:.2}s (direct: engine {:.2}s), rss {:.1} MiB, errors {}+{}",
                s.name,
                d.docs_per_second(),
                w.docs_per_second(),
                w.docs_per_second() / d.docs_per_second(),
                w.worker_cpu,
                w.broker_cpu,
                w.engine_cpu,
                d.engine_cpu,
                w.worker_peak_rss_mib,
                d.errors,
                w.errors
            );
            results.entry(s.name.to_owned()).or_default().push((d, w));
        }
        value += 1;
        let i = ideal(&http, &target, value).await;
        eprintln!("round {round} ideal: {:.0} docs/s", i.docs_per_second());
        ideal_runs.push(i);
    }
    let _ = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status();
    let _ = worker.wait();
    let _ = http
        .delete(format!("{ES_URL}/{}", target.replace('&', "%26")))
        .send()
        .await;
    drop(client);
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;

    // Report the median round of each, by documents per second.
    let median = |mut runs: Vec<Run>| -> Run {
        runs.sort_by(|a, b| a.docs_per_second().total_cmp(&b.docs_per_second()));
        runs.swap_remove(runs.len() / 2)
    };
    let typical = |runs: &[(Run, Run)]| -> (Run, Run) {
        (
            median(runs.iter().map(|r| r.0.clone()).collect()),
            median(runs.iter().map(|r| r.1.clone()).collect()),
        )
    };
    let ideal = median(ideal_runs.clone());
    let mut json_out = json!({"machine": machine, "rounds": args.rounds, "ideal": ideal.to_json(), "scenarios": {}});
    let mut md = format!(
        "Machine: {machine}. Rounds: {} (each figure is the median round). Engine ideal (1,000-document bulks, 2 at a time): {:.0} docs/s.\n\n\
         | scenario | direct docs/s | worker docs/s | worker/direct | worker/ideal | worker p50 / p95 / p99 ms | direct p50 / p95 / p99 ms | worker CPU s | engine CPU s | worker CPU / engine | worker peak RSS MiB | worker docs per bulk |\n\
         | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |\n",
        args.rounds,
        ideal.docs_per_second()
    );
    let mut errors = 0;
    for s in &SCENARIOS {
        let runs = &results[s.name];
        errors += runs.iter().map(|(d, w)| d.errors + w.errors).sum::<usize>();
        let (d, w) = typical(runs);
        let ratio = w.docs_per_second() / d.docs_per_second();
        json_out["scenarios"][s.name] = json!({"direct": d.to_json(), "worker": w.to_json(), "ratio": ratio,
            "worker_over_ideal": w.docs_per_second() / ideal.docs_per_second()});
        md.push_str(&format!(
            "| {} ({} × {} docs, {} outstanding{}) | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {:.2} | {:.2} | {:.0} % | {:.1} | {:.1} |\n",
            s.name, s.requests, s.docs_per_request, s.outstanding, if s.wait_for { ", wait_for" } else { "" },
            d.docs_per_second(), w.docs_per_second(), ratio, w.docs_per_second() / ideal.docs_per_second(),
            w.percentile(0.5), w.percentile(0.95), w.percentile(0.99),
            d.percentile(0.5), d.percentile(0.95), d.percentile(0.99),
            w.worker_cpu, w.engine_cpu, 100.0 * w.worker_cpu / w.engine_cpu.max(1e-9), w.worker_peak_rss_mib, w.docs_per_bulk
        ));
    }
    std::fs::create_dir_all(&args.out).unwrap();
    std::fs::write(
        args.out.join("throughput.json"),
        serde_json::to_string_pretty(&json_out).unwrap(),
    )
    .unwrap();
    std::fs::write(args.out.join("throughput.md"), &md).unwrap();
    println!("{md}");
    if errors > 0 {
        eprintln!("{errors} wrong or missing replies");
        std::process::exit(1);
    }
}
