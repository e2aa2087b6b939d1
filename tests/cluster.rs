//! The worker on a cluster: three RabbitMQ nodes and three Elasticsearch nodes, started
//! by `scripts/cluster.sh start`, which this target needs (scripts/test.sh starts the
//! cluster for it and stops it after). Each test fails at once, saying so, when the
//! cluster isn't up.
//!
//! N requests in flight and queued on a quorum request queue replicated on the three
//! broker nodes, an index with one replica, worker processes given the three nodes of
//! each server, and one node SIGKILLed mid-stream: every request answered correctly,
//! every update in the engine, nothing left queued or dead-lettered; then the node
//! restarts and rejoins. The counts of each kill are printed (`-- --nocapture`). The
//! tests kill server nodes, so they hold the servers lock, and a guard restarts a killed
//! node even when a test fails.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use mupdate_worker::client::Client;
use mupdate_worker::config::Settings;
use serde_json::{Value, json};
use support::history::*;
use support::load::Load;
use support::*;
use tokio::time::Instant;

/// Requests per load: PREFETCH of them in flight, most of the rest queued at the kill.
const N: usize = 1000;
/// Replies before the kill.
const KILL_AFTER: usize = 100;
const PREFETCH: u16 = 64;
const DELIVERY_LIMIT: u32 = 10;
/// Every reply after a kill, on a loaded 2-core machine.
const SETTLE: Duration = Duration::from_secs(300);
/// How long replies are collected while a killed broker node is down, before it is
/// started again and the rest collected. A quorum queue keeps the deliveries it had
/// handed to a consumer on a node that dies checked out to that consumer (RabbitMQ
/// marks it suspected down, as on a partition, where it may still be working) until
/// the node is back; only then do they go to another consumer and get their answer.
const WHILE_DOWN: Duration = Duration::from_secs(60);
/// A worker moving to another node, a leader election, a node rejoining.
const RECOVER: Duration = Duration::from_secs(120);
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");

/// The three nodes of each server.
const ALL: [usize; 3] = [1, 2, 3];

fn amqp_url(node: usize) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", 5700 + node)
}

fn es_url(node: usize) -> String {
    format!("http://127.0.0.1:{}", 9200 + node)
}

/// The three nodes, comma-separated, `first` first.
fn urls_from(first: usize, url: fn(usize) -> String) -> String {
    (0..3)
        .map(|k| url((first - 1 + k) % 3 + 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// The broker node that is none of `nodes`.
fn other_than(nodes: &[usize]) -> usize {
    (1..=3).find(|n| !nodes.contains(n)).unwrap()
}

fn rabbit(node: usize) -> String {
    format!("rabbit{node}")
}

/// 2 for `rabbit-c2@localhost`.
fn rabbit_node_index(name: &str) -> usize {
    name.trim_start_matches("rabbit-c")
        .split('@')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a cluster node: {name}"))
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

// ------------------------------------------------------------------ the cluster

/// Runs `scripts/cluster.sh ARGS` off the runtime's threads; its stdout, or a panic with
/// its output when it fails.
async fn cluster(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(SCRIPT).args(&args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "scripts/cluster.sh {args:?} failed:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    })
    .await
    .unwrap()
}

/// rabbitmqctl (or rabbitmq-queues) on broker node `node`: its output.
async fn ctl(tool: &str, node: usize, args: &[&str]) -> String {
    let name = rabbit(node);
    let mut all = vec![tool, name.as_str(), "-q"];
    all.extend_from_slice(args);
    cluster(&all).await
}

/// The same, its JSON output.
async fn ctl_json(tool: &str, node: usize, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--formatter", "json"]);
    let out = ctl(tool, node, &all).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{tool} {args:?}: {e}: {out}"))
}

/// Fails the test unless the six nodes are up, and waits until the engine is green.
async fn require_cluster() {
    let status = tokio::task::spawn_blocking(|| Command::new(SCRIPT).arg("status").output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.status.success(),
        "the local cluster isn't up: start it with `scripts/cluster.sh start` (which also \
         restarts a node an interrupted test left down; scripts/test.sh starts the cluster \
         for this target). scripts/cluster.sh status says:\n{}",
        String::from_utf8_lossy(&status.stdout)
    );
    wait_green(&es_url(1), "").await;
}

/// Waits until the engine's cluster (or one index) is green.
async fn wait_green(es: &str, index: &str) {
    let url = format!(
        "{es}/_cluster/health/{}?wait_for_status=green&timeout=20s",
        path(index)
    );
    let deadline = Instant::now() + RECOVER;
    loop {
        let health: Value = match http().get(&url).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        if health["status"] == "green" {
            return;
        }
        assert!(Instant::now() < deadline, "not green in time: {health}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A queue's leader, members and online members, as broker node `via` sees them.
async fn queue_nodes(queue: &str, via: usize) -> (usize, Vec<usize>, Vec<usize>) {
    let queues = ctl_json(
        "rabbitmqctl",
        via,
        &["list_queues", "name", "leader", "members", "online"],
    )
    .await;
    let q = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == queue)
        .unwrap_or_else(|| panic!("no queue {queue} in {queues}"));
    let nodes = |key: &str| -> Vec<usize> {
        let mut v: Vec<usize> = q[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(rabbit_node_index)
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let leader = q["leader"].as_str().map_or(0, rabbit_node_index);
    (leader, nodes("members"), nodes("online"))
}

/// Waits until `queue` has a leader outside `not` and its three members online; the
/// leader.
async fn wait_queue_ready(queue: &str, via: usize, not: &[usize]) -> usize {
    let deadline = Instant::now() + RECOVER;
    loop {
        let (leader, members, online) = queue_nodes(queue, via).await;
        if leader != 0 && !not.contains(&leader) && online == [1, 2, 3] {
            assert_eq!(
                members,
                [1, 2, 3],
                "{queue} is replicated on the three nodes"
            );
            return leader;
        }
        assert!(
            Instant::now() < deadline,
            "{queue}: leader {leader} (not {not:?}), members {members:?}, online {online:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One test's hold on the cluster: the servers lock, and the nodes it killed, which are
/// restarted when it drops (before the lock is released).
struct ClusterTest {
    name: &'static str,
    started: Instant,
    locked: Duration,
    killed: Killed,
    _servers: ServersLock,
}

/// Takes the servers lock, then fails unless the cluster is up.
async fn begin(name: &'static str) -> ClusterTest {
    let started = Instant::now();
    let servers = servers_lock().await;
    let locked = started.elapsed();
    require_cluster().await;
    ClusterTest {
        name,
        started,
        locked,
        killed: Killed::default(),
        _servers: servers,
    }
}

impl ClusterTest {
    fn report(&self, counts: String) {
        println!(
            "{}: {counts}; test {:.0?} (after {:.0?} waiting for the servers lock)",
            self.name,
            self.started.elapsed() - self.locked,
            self.locked
        );
    }
}

/// Nodes killed by a test; dropping it restarts any it didn't restart itself (a failed
/// test leaves the cluster whole).
#[derive(Default)]
struct Killed(Vec<String>);

impl Killed {
    async fn kill(&mut self, node: &str) {
        self.0.push(node.to_owned());
        cluster(&["kill", node]).await;
    }

    /// Starts the node again and waits until it rejoined: how long that took.
    async fn restart(&mut self, node: &str) -> Duration {
        let t0 = Instant::now();
        cluster(&["restart", node]).await;
        self.0.retain(|n| n != node);
        t0.elapsed()
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        for node in self.0.drain(..) {
            eprintln!("restoring the cluster: scripts/cluster.sh restart {node}");
            let _ = Command::new(SCRIPT).args(["restart", &node]).status();
        }
    }
}

// ------------------------------------------------------------------ workers

/// Settings for workers on the cluster: fresh queue names, a quorum request queue.
fn cluster_settings() -> Settings {
    let mut settings = settings();
    settings.amqp.prefetch = PREFETCH;
    settings
}

/// A worker process given the broker nodes `brokers` and the three engine nodes, serving
/// metrics, logging to a file.
struct WorkerProcess {
    child: Child,
    listen: String,
}

impl WorkerProcess {
    fn spawn(name: &str, settings: &Settings, brokers: &[usize]) -> Self {
        let brokers: Vec<String> = brokers.iter().map(|&n| amqp_url(n)).collect();
        let listen = format!("127.0.0.1:{}", free_port());
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cluster-{name}.log"));
        println!("  worker {name}: log {}", log.display());
        let child = worker_command(settings)
            .env("MUPDATE__AMQP__URL", brokers.join(","))
            .env("MUPDATE__STORAGE__URL", urls_from(1, es_url))
            .env("MUPDATE__AMQP__QUEUE_TYPE", "quorum")
            .env("MUPDATE__AMQP__DELIVERY_LIMIT", DELIVERY_LIMIT.to_string())
            .env("MUPDATE__STORAGE__RETRY_MAX_DELAY_MS", "1000")
            .env("MUPDATE__METRICS__LISTEN", &listen)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        WorkerProcess { child, listen }
    }

    /// The broker node its AMQP connection goes to, from the kernel's socket table.
    async fn node(&self) -> Option<usize> {
        let pid = format!("pid={},", self.child.id());
        let out = tokio::process::Command::new("ss")
            .args(["-tnpH", "state", "established"])
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&pid))
            .filter_map(|l| {
                l.split_whitespace()
                    .nth(3)?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()
            })
            .find(|port: &usize| (5701..=5703).contains(port))
            .map(|port| port - 5700)
    }

    /// The broker node its `mupdate_broker_node` metric gives (the gauge at 1).
    async fn metric_node(&self) -> Option<usize> {
        let text = http()
            .get(format!("http://{}/metrics", self.listen))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines().find_map(|l| {
            let port = l.strip_prefix("mupdate_broker_node{node=\"127.0.0.1:")?;
            let (port, value) = port.split_once("\"} ")?;
            let port: usize = port.parse().ok()?;
            port.checked_sub(5700).filter(|_| value.trim() == "1")
        })
    }

    /// Waits until it is connected to a node other than `not`, its metric saying the
    /// same: that node and how long.
    async fn wait_node(&self, not: Option<usize>) -> (usize, Duration) {
        let t0 = Instant::now();
        loop {
            let node = self.node().await.filter(|n| Some(*n) != not);
            if let Some(node) = node
                && self.metric_node().await == Some(node)
            {
                return (node, t0.elapsed());
            }
            assert!(
                t0.elapsed() < RECOVER,
                "the worker is connected to no broker node other than {not:?} (sockets: \
                 {node:?}, mupdate_broker_node: {:?})",
                self.metric_node().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Requests it answered with a 200.
    async fn answered(&self) -> f64 {
        metric(
            &self.listen,
            "mupdate_requests_total{action=\"mUpdate\",status=\"200\"}",
        )
        .await
    }

    /// Requests it holds unsettled now (received, not yet acked, requeued or
    /// dead-lettered): what a queue's ready count doesn't show.
    async fn in_flight(&self) -> f64 {
        metric(&self.listen, "mupdate_requests_in_flight").await
    }

    /// SIGTERM, then its exit code (None: killed after TIMEOUT).
    async fn stop(mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ the load

/// An index of 3 shards with one replica each, on three nodes: each node holds a primary
/// and a replica. Not mapped dynamically: each request of the load writes a field of its
/// own (the check reads `_source`), and 1,000 mapping updates would be the test's cost.
fn index_body() -> Value {
    json!({"settings": {"number_of_shards": 3, "number_of_replicas": 1},
           "mappings": {"dynamic": false}})
}

/// N requests on a fresh index of `index_body()`, created through
/// engine node `es`; replies to a quorum queue; published and collected through broker
/// node `via`.
async fn cluster_load(via: usize, es: usize) -> Load {
    let servers = Servers {
        amqp: amqp_url(via),
        es: es_url(es),
    };
    let load = Load::on(&servers, N, true, index_body(), quorum()).await;
    wait_green(&servers.es, &load.collection.physical).await;
    load
}

/// The stream at the kill.
struct AtKill {
    answered: u32,
    queued: u32,
}

/// Publishes the load and waits until KILL_AFTER requests are answered.
async fn until_kill(load: &Load, queue: &str) -> AtKill {
    load.publish(queue).await;
    let answered = load.wait_for_replies(KILL_AFTER, SETTLE).await;
    let queued = queue_counts_at(&load.amqp, queue).await.map_or(0, |c| c.0);
    assert!(queued > 0, "the kill comes with requests still queued");
    AtKill { answered, queued }
}

/// What a load came to.
#[derive(Debug)]
struct Outcome {
    answered: usize,
    duplicates: usize,
    wrong: Vec<String>,
    missing: Vec<String>,
    left_queued: u32,
    dead_lettered: u32,
    /// Replies in the client's reply queue that `collect` never read: tells a reply the
    /// broker holds but didn't deliver from one never published.
    replies_unread: u32,
}

/// A queue's ready messages, read through `url`; waits (30 s at most) while the queue
/// can't be read (its home node restarting), and fails the test rather than count 0.
async fn ready_in(url: &str, queue: &str) -> u32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        // A declare the broker stalls on (a queue mid-election) counts as unread.
        let read = tokio::time::timeout_at(deadline, queue_counts_at(url, queue)).await;
        if let Ok(Some((ready, _))) = read {
            return ready;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("the counts of queue {queue} could not be read through {url} in 30 s")
}

impl Outcome {
    async fn of(load: &Load, replies: &HashMap<String, Vec<Value>>, settings: &Settings) -> Self {
        load.refresh().await;
        let amqp = &settings.amqp;
        Outcome {
            answered: replies.len(),
            duplicates: replies.values().map(Vec::len).sum::<usize>() - replies.len(),
            wrong: load.wrong_replies(replies),
            missing: load.missing_updates(load.requests.keys()).await,
            left_queued: ready_in(&load.amqp, &amqp.request_queue).await,
            dead_lettered: ready_in(&load.amqp, &amqp.dead_letter_queue).await,
            replies_unread: ready_in(&load.amqp, &load.reply_queue).await,
        }
    }

    fn assert_clean(&self) {
        assert!(self.wrong.is_empty(), "wrong replies: {:#?}", self.wrong);
        assert!(self.missing.is_empty(), "lost updates: {:#?}", self.missing);
        assert_eq!(self.answered, N, "every request answered");
        assert_eq!(self.left_queued, 0, "nothing left queued");
        assert_eq!(self.dead_lettered, 0, "nothing dead-lettered");
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "answered={}/{N}, duplicates={}, wrong={}, lost updates={}, left queued={}, \
             dead-lettered={}, replies unread in the reply queue={}",
            self.answered,
            self.duplicates,
            self.wrong.len(),
            self.missing.len(),
            self.left_queued,
            self.dead_lettered,
            self.replies_unread
        )
    }
}

/// Stops the workers (each must exit 0), deletes the topology and the load's queue.
async fn finish(workers: Vec<WorkerProcess>, settings: &Settings, load: Load) {
    let mut exits = Vec::new();
    for worker in workers {
        exits.push(worker.stop().await);
    }
    delete_topology_at(&load.amqp, settings).await;
    load.cleanup().await;
    assert!(
        exits.iter().all(|e| *e == Some(0)),
        "workers exit 0 on SIGTERM: {exits:?}"
    );
}

// ------------------------------------------------------------------ the tests

#[tokio::test]
async fn killing_the_workers_broker_node_moves_it_and_loses_nothing() {
    let mut t = begin("broker node kill (the worker's)").await;
    let settings = cluster_settings();
    let queue = settings.amqp.request_queue.clone();
    let worker = WorkerProcess::spawn("broker-kill", &settings, &ALL);
    let (node, _) = worker.wait_node(None).await;
    let via = other_than(&[node]);
    wait_consumers_at(&amqp_url(via), &queue, 1).await;
    wait_queue_ready(&queue, via, &[]).await;
    let load = cluster_load(via, 1).await;

    let at = until_kill(&load, &queue).await;
    t.killed.kill(&rabbit(node)).await;
    let (moved, took) = worker.wait_node(Some(node)).await;
    let replies = load.collect(WHILE_DOWN).await;
    let rejoined = t.killed.restart(&rabbit(node)).await;
    let replies = load.collect_more(SETTLE, replies).await;
    wait_queue_ready(&queue, via, &[]).await;
    let outcome = Outcome::of(&load, &replies, &settings).await;
    t.report(format!(
        "N={N}, answered before the kill={}, queued at the kill={}; SIGKILL \
         rabbit{node}: the worker moved to rabbit{moved} in {took:.1?}; {outcome}; \
         rabbit{node} restarted and rejoined in {rejoined:.1?}",
        at.answered, at.queued
    ));
    finish(vec![worker], &settings, load).await;
    outcome.assert_clean();
}

#[tokio::test]
async fn killing_the_request_queues_leader_loses_nothing() {
    let mut t = begin("broker node kill (the queue's leader)").await;
    let settings = cluster_settings();
    let queue = settings.amqp.request_queue.clone();
    let worker = WorkerProcess::spawn("leader-kill", &settings, &ALL);
    let (node, _) = worker.wait_node(None).await;
    let via = other_than(&[node]);
    wait_consumers_at(&amqp_url(via), &queue, 1).await;
    let mut leader = wait_queue_ready(&queue, via, &[]).await;
    if leader == node {
        // The queue was declared through the worker's node, which leads it: its member
        // there goes and comes back, so another node leads.
        let member = format!("rabbit-c{node}@localhost");
        ctl("rabbitmq-queues", via, &["delete_member", &queue, &member]).await;
        wait_leader_not(&queue, via, node).await;
        ctl("rabbitmq-queues", via, &["add_member", &queue, &member]).await;
        leader = wait_queue_ready(&queue, via, &[node]).await;
    }
    let via = other_than(&[node, leader]);
    let load = cluster_load(via, 1).await;

    let at = until_kill(&load, &queue).await;
    let t0 = Instant::now();
    t.killed.kill(&rabbit(leader)).await;
    let new_leader = wait_leader_not(&queue, via, leader).await;
    let elected = t0.elapsed();
    let replies = load.collect(WHILE_DOWN).await;
    let still = worker.node().await;
    let rejoined = t.killed.restart(&rabbit(leader)).await;
    let replies = load.collect_more(SETTLE, replies).await;
    wait_queue_ready(&queue, via, &[]).await;
    let outcome = Outcome::of(&load, &replies, &settings).await;
    t.report(format!(
        "N={N}, answered before the kill={}, queued at the kill={}; the worker on \
         rabbit{node}; SIGKILL rabbit{leader} (the leader): rabbit{new_leader} leads in \
         {elected:.1?}, the worker stayed on {still:?}; {outcome}; rabbit{leader} \
         restarted and rejoined in {rejoined:.1?}",
        at.answered, at.queued
    ));
    finish(vec![worker], &settings, load).await;
    outcome.assert_clean();
    assert_eq!(still, Some(node), "the worker kept its connection");
}

/// Waits until a node other than `old` leads `queue`; that node.
async fn wait_leader_not(queue: &str, via: usize, old: usize) -> usize {
    let deadline = Instant::now() + RECOVER;
    loop {
        let (leader, _, _) = queue_nodes(queue, via).await;
        if leader != 0 && leader != old {
            return leader;
        }
        assert!(
            Instant::now() < deadline,
            "{queue}: still led by rabbit{old}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn killing_an_engine_node_loses_nothing() {
    let mut t = begin("engine node kill").await;
    let settings = cluster_settings();
    let queue = settings.amqp.request_queue.clone();
    let worker = WorkerProcess::spawn("engine-kill", &settings, &ALL);
    let (via, _) = worker.wait_node(None).await;
    wait_consumers_at(&amqp_url(via), &queue, 1).await;
    let mut load = cluster_load(via, 1).await;
    // The victim holds primaries of the index (which its replicas elsewhere take over);
    // the test reads the engine through another node.
    let shards: Value = http()
        .get(format!(
            "{}/_cat/shards/{}?format=json&h=prirep,node",
            es_url(1),
            path(&load.collection.physical)
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let primaries = |n: usize| {
        let name = format!("es-c{n}");
        shards
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["prirep"] == "p" && s["node"] == name.as_str())
            .count()
    };
    let victim = (1..=3).max_by_key(|n| primaries(*n)).unwrap();
    let survivor = victim % 3 + 1;
    load.collection.es = es_url(survivor);
    let master: String = http()
        .get(format!("{}/_cat/master?h=node", es_url(survivor)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    let at = until_kill(&load, &queue).await;
    t.killed.kill(&format!("es{victim}")).await;
    let replies = load.collect(SETTLE).await;
    // The worker left the dead node out (calls went to the others at once) …
    let node_up = format!(
        "mupdate_engine_node_up{{node=\"127.0.0.1:{}\"}}",
        9200 + victim
    );
    let left_out = metric(&worker.listen, &node_up).await == 0.0;
    let retries = metric(&worker.listen, "mupdate_engine_retries_total").await;
    let rejoined = t.killed.restart(&format!("es{victim}")).await;
    let outcome = Outcome::of(&load, &replies, &settings).await;
    wait_green(&es_url(survivor), &load.collection.physical).await;
    // … and calls it again once it is back.
    let back = Instant::now();
    let client = Client::connect(&amqp_url(via)).await.unwrap();
    while metric(&worker.listen, &node_up).await != 1.0 {
        assert!(
            back.elapsed() < RECOVER,
            "es{victim} back in use by the worker"
        );
        let envelope = load
            .collection
            .envelope(json!([{"_id": "d1", "body": {"after": true}}]));
        let body = serde_json::to_vec(&envelope).unwrap();
        client
            .request(&queue, &body, "after", TIMEOUT)
            .await
            .unwrap();
    }
    let back = back.elapsed();
    t.report(format!(
        "N={N}, answered before the kill={}, queued at the kill={}; SIGKILL es{victim} \
         ({} of 3 primaries, elected master: {}); left out by the worker: {left_out}, engine \
         call retries {retries}; {outcome}; es{victim} restarted and rejoined in \
         {rejoined:.1?}, called again by the worker {back:.1?} after that",
        at.answered,
        at.queued,
        primaries(victim),
        master.trim() == format!("es-c{victim}"),
    ));
    finish(vec![worker], &settings, load).await;
    outcome.assert_clean();
    assert!(left_out, "the dead engine node left out");
}

#[tokio::test]
async fn two_workers_on_two_nodes_one_node_killed_the_rest_finish_everything() {
    let mut t = begin("broker node kill (two workers)").await;
    let settings = cluster_settings();
    let queue = settings.amqp.request_queue.clone();
    let a = WorkerProcess::spawn("two-workers-a", &settings, &ALL);
    let (node_a, _) = a.wait_node(None).await;
    // The second worker on another node: given only that one (a worker starts at a
    // random node of its list).
    let node_b = node_a % 3 + 1;
    let b = WorkerProcess::spawn("two-workers-b", &settings, &[node_b]);
    assert_eq!(b.wait_node(None).await.0, node_b);
    let via = other_than(&[node_a, node_b]);
    wait_consumers_at(&amqp_url(via), &queue, 2).await;
    wait_queue_ready(&queue, via, &[]).await;
    let load = cluster_load(via, 1).await;

    let at = until_kill(&load, &queue).await;
    let before = (a.answered().await, b.answered().await);
    t.killed.kill(&rabbit(node_a)).await;
    let (moved, took) = a.wait_node(Some(node_a)).await;
    let replies = load.collect(WHILE_DOWN).await;
    let rejoined = t.killed.restart(&rabbit(node_a)).await;
    let replies = load.collect_more(SETTLE, replies).await;
    let after = (a.answered().await, b.answered().await);
    let held = (a.in_flight().await, b.in_flight().await);
    wait_queue_ready(&queue, via, &[]).await;
    let outcome = Outcome::of(&load, &replies, &settings).await;
    t.report(format!(
        "N={N}, answered before the kill={} (worker A on rabbit{node_a}: {}, worker \
         B on rabbit{node_b}: {}), queued at the kill={}; SIGKILL rabbit{node_a}: A moved \
         to rabbit{moved} in {took:.1?}; answered in all by A={}, by B={}; still held \
         unsettled at the end: by A={}, by B={}; {outcome}; \
         rabbit{node_a} restarted and rejoined in {rejoined:.1?}",
        at.answered, before.0, before.1, at.queued, after.0, after.1, held.0, held.1
    ));
    finish(vec![a, b], &settings, load).await;
    outcome.assert_clean();
    assert!(
        after.0 > 0.0 && after.1 > 0.0,
        "each worker answered some: {after:?}"
    );
}

// ------------------------------------------------------------------ history

const CLIENTS: usize = 6;
/// A reply that takes longer is lost.
const REPLY_WITHIN: Duration = Duration::from_secs(90);

/// Clients updating their own documents sequentially (update k+1 sent once update k's
/// 200 came back), spread over the three broker nodes, while the worker's node is
/// killed: afterwards each document holds its last acknowledged update (the history
/// check of tests/history.rs, `support::history`, on the cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_updates_through_a_broker_node_kill_leave_no_stale_write() {
    let mut t = begin("history through a broker node kill").await;
    let settings = cluster_settings();
    let queue = settings.amqp.request_queue.clone();
    let worker = WorkerProcess::spawn("history", &settings, &ALL);
    let (node, _) = worker.wait_node(None).await;
    let via = other_than(&[node]);
    wait_consumers_at(&amqp_url(via), &queue, 1).await;
    wait_queue_ready(&queue, via, &[]).await;

    // Client c tries node c % 3 + 1 first: some are on the node that goes.
    let clients: Vec<ClientSpec> = (0..CLIENTS)
        .map(|c| ClientSpec {
            brokers: urls_from(c % 3 + 1, amqp_url)
                .split(',')
                .map(str::to_owned)
                .collect(),
            reply_args: quorum(),
            ..ClientSpec::new(c, 3)
        })
        .collect();
    let collection = Collection::create_on(&es_url(1), &seeds(&clients), index_body()).await;
    let collection = Arc::new(collection);
    let ended = Arc::new(OnceLock::new());
    let tasks: Vec<_> = clients
        .iter()
        .map(|c| {
            let (c, collection, ended) = (c.clone(), collection.clone(), ended.clone());
            tokio::spawn(run_client(
                c,
                collection,
                queue.clone(),
                ended,
                REPLY_WITHIN,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    t.killed.kill(&rabbit(node)).await;
    let (moved, took) = worker.wait_node(Some(node)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    ended.set(Instant::now()).unwrap();

    let clients_by = Instant::now() + REPLY_WITHIN + TIMEOUT;
    let mut reports = Vec::new();
    for (client, task) in clients.iter().zip(tasks) {
        let abort = task.abort_handle();
        reports.push(match tokio::time::timeout_at(clients_by, task).await {
            Ok(report) => report.unwrap(),
            Err(_) => {
                abort.abort();
                ClientReport::failed(format!("client {} not done in time", client.name))
            }
        });
    }
    // Late duplicates and stray writes have time to show.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut checks = Checks::default();
    for (client, report) in clients.iter().zip(&mut reports) {
        report.drain(&amqp_url(via), &client.reply_queue).await;
        checks.add(client, report, &collection).await;
    }
    let amqp = &settings.amqp;
    let url = amqp_url(via);
    let count = |q| queue_counts_at(&url, q);
    let left_queued = count(&amqp.request_queue).await.map_or(0, |c| c.0);
    let dead_lettered = count(&amqp.dead_letter_queue).await.map_or(0, |c| c.0);
    let rejoined = t.killed.restart(&rabbit(node)).await;
    t.report(format!(
        "SIGKILL rabbit{node} (the worker's): it moved to rabbit{moved} in {took:.1?}; \
         {CLIENTS} clients, {checks}, left queued={left_queued}, \
         dead-lettered={dead_lettered}; rabbit{node} restarted and rejoined in {rejoined:.1?}"
    ));
    let exit = worker.stop().await;
    delete_topology_at(&url, &settings).await;
    let replies: Vec<&str> = clients.iter().map(|c| c.reply_queue.as_str()).collect();
    delete_queues_at(&url, &replies).await;
    checks.assert_clean();
    assert!(checks.acknowledged > 0, "updates went through");
    assert_eq!(left_queued, 0, "requests left in the request queue");
    assert_eq!(dead_lettered, 0, "requests dead-lettered");
    assert_eq!(exit, Some(0), "the worker exits 0 on SIGTERM");
}
