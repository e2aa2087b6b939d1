//! A seeded, randomized fault run against the real servers (SPEC sections 4 to 6).
//!
//! A seed (`CHAOS_SEED`, else a fresh random one) drives a small deterministic generator
//! (splitmix64) that computes, up front, a schedule of overlapping faults over
//! `CHAOS_SECONDS` (default 40) seconds: the engine stopped (its proxy's port refuses) or
//! frozen, a worker's broker connection cut or frozen (each worker has its own AMQP
//! proxy), the broker restarted (`stop_app`/`start_app`) or blocked by a memory alarm,
//! a worker killed (SIGKILL) or terminated (SIGTERM), then started again. The schedule
//! and the one command that replays it are printed first; every event is traced with its
//! time as it happens (`--nocapture`).
//!
//! Meanwhile two worker processes on one request queue serve:
//! - waiting clients (tests/support/history.rs): each updates its own documents, update
//!   k+1 sent once update k's reply came back;
//! - rings of clients sharing documents in turn: update k of the ring's documents is sent
//!   by member k mod n, on its own connection, once update k-1's reply came back (to
//!   another member): an update sent after another's reply must never be overwritten by
//!   the older one, whichever worker handled each;
//! - producers that never wait: requests with an id, byte-identical requests with no id
//!   at all (no requestId, correlation_id or message_id; replied to a queue read at the
//!   end, or to the default reply queue), and requests whose `reply_to` names no queue.
//!
//! Once every fault is healed and the workers had time to finish: no stale document,
//! every request with an id answered (the unroutable ones dead-lettered, never answered:
//! once, or once more when a fault came between a dead letter's confirm and its ack; the
//! others never dead-lettered), every no-id request answered, the
//! request queue empty, each worker consuming again, and every SIGTERM exit was 0 within
//! `shutdown_timeout_ms` + 2 s. One summary line per seed; a failing seed's panic names
//! the seed, its replay command and its schedule.
//!
//! `CHAOS_SEEDS=N` runs N seeds in a row (default 2; with `CHAOS_SEED`, 1: that seed).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use mupdate_worker::config::Settings;
use serde_json::{Value, json};
use support::binary::BinaryWorker;
use support::history::*;
use support::proxy::Proxy;
use support::rabbitmqctl::*;
use support::*;
use tokio::time::Instant;

const WORKERS: usize = 2;
const DEFAULT_SECONDS: u64 = 40;
const DEFAULT_SEEDS: usize = 2;
const SHUTDOWN_TIMEOUT_MS: u64 = 3000;
/// What SPEC section 6 allows a SIGTERM exit.
const EXIT_WITHIN: Duration = Duration::from_millis(SHUTDOWN_TIMEOUT_MS + 2000);
/// How long a SIGTERM'd worker is waited for before it is called hung and killed.
const EXIT_WAIT: Duration = Duration::from_millis(SHUTDOWN_TIMEOUT_MS + 12_000);
/// One engine call of the workers; a frozen engine outlasts it.
const ENGINE_TIMEOUT_MS: u64 = 1500;
const OWN_CLIENTS: usize = 3;
const OWN_DOCUMENTS: usize = 2;
const RINGS: usize = 2;
const RING_MEMBERS: usize = 3;
const RING_DOCUMENTS: usize = 2;
const PRODUCERS: usize = 2;
const PRODUCER_DOCUMENTS: usize = 3;
/// A waiting client's reply not back within this is a failure.
const REPLY_WITHIN: Duration = Duration::from_secs(60);
/// The clients, once every fault is healed.
const CLIENTS_WITHIN: Duration = Duration::from_secs(70);
/// Every request settled (request queue: nothing ready, nothing unacked), after that.
const DRAIN_WITHIN: Duration = Duration::from_secs(45);
/// Then this long, for late duplicate replies and stray writes to show.
const SETTLE: Duration = Duration::from_secs(5);
/// Each of the producers' own broker calls (connect, publish and confirm): a memory alarm
/// blocks publishers, a stopped or frozen broker answers nothing.
const BROKER_CALL: Duration = Duration::from_secs(5);
/// A whole seed, beyond its schedule: a hung run fails with its seed instead of hanging.
const SEED_OVERHEAD: Duration = Duration::from_secs(240);

// ------------------------------------------------------------------ the test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_faults() {
    let _servers = servers_lock().await;
    let _broker = BrokerGuard;
    heal_broker().await; // whatever an earlier run left behind
    let started = Instant::now();
    let seconds = env_u64("CHAOS_SECONDS").unwrap_or(DEFAULT_SECONDS).max(5);
    let seeds = seeds_to_run();
    println!("chaos: {} seed(s) of {seconds} s: {:?}", seeds.len(), seeds);
    let mut summaries = Vec::new();
    let mut failed = Vec::new();
    for seed in seeds {
        let schedule = Schedule::generate(seed, seconds);
        println!("\n{}", schedule.header());
        println!("{schedule}");
        let seed_started = Instant::now();
        let task = tokio::spawn(run_seed(schedule.clone()));
        let abort = task.abort_handle();
        let within = Duration::from_secs(seconds) + SEED_OVERHEAD;
        let verdict = match tokio::time::timeout(within, task).await {
            Ok(Ok(outcome)) => {
                let line = format!(
                    "seed {seed}: {} in {:.0?}",
                    outcome.summary(),
                    seed_started.elapsed()
                );
                println!("{line}");
                summaries.push(line);
                outcome.failures()
            }
            Ok(Err(e)) => {
                let why = panic_text(e);
                summaries.push(format!("seed {seed}: panicked: {why}"));
                vec![format!("panicked: {why}")]
            }
            Err(_) => {
                abort.abort();
                summaries.push(format!("seed {seed}: not done within {within:?}"));
                vec![format!("not done within {within:?}")]
            }
        };
        // Faults cut short leave nothing behind for the next seed.
        heal_broker().await;
        if !verdict.is_empty() {
            failed.push(format!(
                "chaos seed {seed} FAILED:\n  - {}\nreplay: {}\n{schedule}",
                verdict.join("\n  - "),
                schedule.replay()
            ));
        }
    }
    println!("\nchaos summary ({:.0?} in all):", started.elapsed());
    for line in &summaries {
        println!("  {line}");
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok().filter(|v| !v.trim().is_empty())?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value}: not a number")),
    )
}

/// `CHAOS_SEED`, else a fresh one; then as many more (derived from it) as `CHAOS_SEEDS`
/// asks.
fn seeds_to_run() -> Vec<u64> {
    let given = env_u64("CHAOS_SEED");
    let count = env_u64("CHAOS_SEEDS")
        .map_or(if given.is_some() { 1 } else { DEFAULT_SEEDS }, |n| {
            n.max(1) as usize
        });
    let first = given.unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        Rng(now.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)).next()
    });
    let mut next = Rng(first);
    let mut seeds = vec![first];
    while seeds.len() < count {
        seeds.push(next.next());
    }
    seeds
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into()),
        Err(e) => e.to_string(),
    }
}

// ------------------------------------------------------------------ the schedule

/// splitmix64: small, deterministic, good enough to draw a schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi.max(lo) - lo + 1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// The engine proxy's port refuses connections; open ones are cut.
    EngineDown,
    /// The engine proxy forwards nothing; new connections are held.
    EngineFrozen,
    /// The AMQP proxy of one worker (or of both: None) cuts every connection.
    BrokerCut(Option<usize>),
    /// The AMQP proxy of one worker (or of both) forwards nothing.
    BrokerFrozen(Option<usize>),
    /// `rabbitmqctl stop_app`, then `start_app` after the hold.
    BrokerRestart,
    /// `set_vm_memory_high_watermark absolute 1`, restored after the hold.
    MemoryAlarm,
    /// SIGKILL, started again after the hold.
    WorkerKill(usize),
    /// SIGTERM, its exit waited for, started again after the hold.
    WorkerTerm(usize),
}

impl Fault {
    /// What two faults must not hold at once (one's end would end the other), and how
    /// long this one holds it beyond its hold.
    fn resource(self) -> Option<(String, u64)> {
        match self {
            Fault::EngineDown => Some(("engine down".into(), 500)),
            Fault::EngineFrozen => Some(("engine frozen".into(), 500)),
            Fault::BrokerCut(_) => None,
            Fault::BrokerFrozen(_) => Some(("broker frozen".into(), 500)),
            // stop_app and start_app take seconds each; the alarm must not meet a
            // stopped app (which forgets it).
            Fault::BrokerRestart | Fault::MemoryAlarm => Some(("broker".into(), 10_000)),
            Fault::WorkerKill(i) | Fault::WorkerTerm(i) => {
                Some((format!("worker {i}"), SHUTDOWN_TIMEOUT_MS + 2000 + 1000))
            }
        }
    }
}

fn target(worker: Option<usize>) -> String {
    worker.map_or("both workers".into(), |i| format!("worker {i}"))
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Fault::EngineDown => write!(f, "engine stopped (proxy refuses)"),
            Fault::EngineFrozen => write!(f, "engine frozen"),
            Fault::BrokerCut(w) => write!(f, "broker connections of {} cut", target(w)),
            Fault::BrokerFrozen(w) => write!(f, "broker frozen for {}", target(w)),
            Fault::BrokerRestart => write!(f, "broker restart (stop_app, start_app)"),
            Fault::MemoryAlarm => write!(f, "broker memory alarm"),
            Fault::WorkerKill(i) => write!(f, "worker {i} SIGKILL"),
            Fault::WorkerTerm(i) => write!(f, "worker {i} SIGTERM"),
        }
    }
}

#[derive(Clone, Debug)]
struct Event {
    /// From the start of the schedule.
    at_ms: u64,
    fault: Fault,
    /// How long it lasts (for a worker: how long it stays stopped after its exit).
    hold_ms: u64,
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hold = self.hold_ms as f64 / 1000.0;
        write!(f, "+{:6.2}s  {}", self.at_ms as f64 / 1000.0, self.fault)?;
        match self.fault {
            Fault::BrokerCut(_) => Ok(()),
            Fault::WorkerKill(_) | Fault::WorkerTerm(_) => {
                write!(f, ", started again {hold:.2}s after its exit")
            }
            _ => write!(f, " for {hold:.2}s"),
        }
    }
}

#[derive(Clone, Debug)]
struct Schedule {
    seed: u64,
    seconds: u64,
    events: Vec<Event>,
}

impl Schedule {
    /// The faults of `seed` over `seconds`: one every 4 s on average, each at a random
    /// time, of a random kind and length; faults of one kind (or on one worker, or on
    /// the broker's app) never overlap, others may.
    fn generate(seed: u64, seconds: u64) -> Self {
        let mut rng = Rng(seed);
        let span = seconds * 1000;
        let mut busy: HashMap<String, u64> = HashMap::new();
        let mut events = Vec::new();
        for _ in 0..(seconds / 4).max(1) {
            let worker = rng.range(0, WORKERS as u64 - 1) as usize;
            let proxies = [None, Some(0), Some(1)][rng.range(0, 2) as usize];
            let (fault, hold_ms) = match rng.range(0, 7) {
                0 => (Fault::EngineDown, rng.range(1000, 8000)),
                1 => (Fault::EngineFrozen, rng.range(1000, 10_000)),
                2 => (Fault::BrokerCut(proxies), 0),
                3 => (Fault::BrokerFrozen(proxies), rng.range(1000, 12_000)),
                4 => (Fault::BrokerRestart, rng.range(1000, 4000)),
                5 => (Fault::MemoryAlarm, rng.range(2000, 12_000)),
                6 => (Fault::WorkerKill(worker), rng.range(0, 3000)),
                _ => (Fault::WorkerTerm(worker), rng.range(0, 2000)),
            };
            let mut at_ms = rng.range(1000, span.saturating_sub(3000).max(1000));
            if let Some((key, extra)) = fault.resource() {
                let free = busy.get(&key).copied().unwrap_or(0);
                at_ms = at_ms.max(free);
                if at_ms > span.saturating_sub(1000) {
                    continue; // no room left for it
                }
                busy.insert(key, at_ms + hold_ms + extra);
            }
            events.push(Event {
                at_ms,
                fault,
                hold_ms,
            });
        }
        events.sort_by_key(|e| e.at_ms);
        Schedule {
            seed,
            seconds,
            events,
        }
    }

    fn replay(&self) -> String {
        let seconds = if self.seconds == DEFAULT_SECONDS {
            String::new()
        } else {
            format!("CHAOS_SECONDS={} ", self.seconds)
        };
        format!(
            "CHAOS_SEED={} {seconds}cargo test --test chaos -- --nocapture",
            self.seed
        )
    }

    fn header(&self) -> String {
        format!(
            "chaos seed {}: {} faults over {} s; replay: {}",
            self.seed,
            self.events.len(),
            self.seconds,
            self.replay()
        )
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "schedule of seed {} ({} s):", self.seed, self.seconds)?;
        for event in &self.events {
            writeln!(f, "  {event}")?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------ one seed

/// Prints each event with its time since the start of the schedule, and notes it in the
/// workers' log between their lines.
struct Tracer {
    seed: u64,
    t0: Instant,
    log: PathBuf,
}

impl Tracer {
    fn trace(&self, line: &str) {
        use std::io::Write;
        let at = self.t0.elapsed().as_secs_f64();
        println!("[chaos {} +{at:6.2}s] {line}", self.seed);
        if let Ok(mut log) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
        {
            // UTC time of day, as the workers' own lines have it.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let (s, ms) = (now.as_secs() % 86400, now.subsec_millis());
            let time = format!("{:02}:{:02}:{:02}.{ms:03}", s / 3600, s / 60 % 60, s % 60);
            let _ = writeln!(log, "---- {time} chaos +{at:.2}s: {line}");
        }
    }

    fn at(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
}

/// What a seed shares with its fault tasks.
struct Ctx {
    tracer: Tracer,
    engine: Proxy,
    /// One per worker, in front of the broker.
    brokers: Vec<Proxy>,
    pool: Pool,
}

impl Ctx {
    fn proxies(&self, worker: Option<usize>) -> Vec<&Proxy> {
        match worker {
            Some(i) => vec![&self.brokers[i]],
            None => self.brokers.iter().collect(),
        }
    }
}

/// Aborts spawned tasks when a seed is cut short (a panic, its time bound).
struct Tasks(Vec<tokio::task::AbortHandle>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

async fn run_seed(schedule: Schedule) -> Outcome {
    let seed = schedule.seed;
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{seed}.log"));
    let _ = std::fs::remove_file(&log);
    println!("  worker logs: {}", log.display());

    // The documents: clients', rings', producers' and the no-id requests' one.
    let own: Vec<ClientSpec> = (0..OWN_CLIENTS)
        .map(|c| ClientSpec::new(c, OWN_DOCUMENTS))
        .collect();
    let rings: Vec<(ClientSpec, Vec<ClientSpec>)> = (0..RINGS).map(ring).collect();
    let mut documents: Vec<(String, Value)> = seeds(&own)
        .into_iter()
        .map(|(id, v)| (id.to_owned(), v))
        .collect();
    for (ring, _) in &rings {
        documents.extend(ring.documents.iter().map(|d| (d.clone(), json!({"n": 0}))));
    }
    for p in 0..PRODUCERS {
        documents.extend((0..PRODUCER_DOCUMENTS).map(|d| (format!("p{p}-d{d}"), json!({"n": 0}))));
    }
    documents.push(("noid".into(), json!({"n": 0})));
    let docs: Vec<(&str, Value)> = documents
        .iter()
        .map(|(id, v)| (id.as_str(), v.clone()))
        .collect();
    let collection = Arc::new(Collection::create(&docs).await);

    let mut settings = settings();
    settings.amqp.prefetch = 16;
    let queues = Queues {
        replies: fresh("chaos.replies"),
        noid: fresh("chaos.noid-replies"),
        nowhere: fresh("chaos.nowhere"),
    };
    // Deleted even when the seed fails: declared before the workers, dropped after them.
    let mut mine = vec![queues.replies.clone(), queues.noid.clone()];
    mine.extend(own.iter().map(|c| c.reply_queue.clone()));
    for (_, members) in &rings {
        mine.extend(members.iter().map(|m| m.reply_queue.clone()));
    }
    let _cleanup = Cleanup {
        settings: settings.clone(),
        queues: mine,
    };

    let engine = Proxy::start(&ES_URL).await;
    settings.storage.url = engine.url();
    let mut brokers = Vec::new();
    for _ in 0..WORKERS {
        brokers.push(Proxy::start("127.0.0.1:5672").await);
    }
    let mut pool = Pool::new(settings.clone(), &brokers, log.clone());
    for i in 0..WORKERS {
        *pool.slots[i].get_mut() = Some(pool.spawn(i));
    }
    let queue = settings.amqp.request_queue.clone();
    wait_consumers(&queue, WORKERS as u32).await;
    {
        let amqp = Amqp::open().await;
        for q in [&queues.replies, &queues.noid] {
            amqp.channel
                .queue_declare(
                    q.as_str().into(),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        amqp.close().await;
    }

    // The schedule's clock starts now.
    let t0 = Instant::now();
    let ctx = Arc::new(Ctx {
        tracer: Tracer { seed, t0, log },
        engine,
        brokers,
        pool,
    });
    ctx.tracer.trace("schedule starts");
    let mut tasks = Tasks(Vec::new());
    let ended = Arc::new(OnceLock::new());
    let stop_producers = Arc::new(AtomicBool::new(false));

    let own_tasks: Vec<_> = own
        .iter()
        .map(|c| {
            tokio::spawn(run_client(
                c.clone(),
                collection.clone(),
                queue.clone(),
                ended.clone(),
                REPLY_WITHIN,
            ))
        })
        .collect();
    let ring_tasks: Vec<_> = rings
        .iter()
        .map(|(ring, members)| {
            tokio::spawn(run_ring(
                ring.clone(),
                members.clone(),
                collection.clone(),
                queue.clone(),
                ended.clone(),
            ))
        })
        .collect();
    let producer_tasks: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            tokio::spawn(run_producer(
                p,
                seed,
                collection.clone(),
                queue.clone(),
                queues.clone(),
                stop_producers.clone(),
            ))
        })
        .collect();
    let fault_tasks: Vec<_> = schedule
        .events
        .iter()
        .map(|e| tokio::spawn(inject(e.clone(), ctx.clone())))
        .collect();
    tasks.0.extend(own_tasks.iter().map(|t| t.abort_handle()));
    tasks.0.extend(ring_tasks.iter().map(|t| t.abort_handle()));
    tasks
        .0
        .extend(producer_tasks.iter().map(|t| t.abort_handle()));
    tasks.0.extend(fault_tasks.iter().map(|t| t.abort_handle()));

    tokio::time::sleep_until(t0 + Duration::from_secs(schedule.seconds)).await;
    stop_producers.store(true, Ordering::Relaxed);
    ctx.tracer
        .trace("schedule over: producers stop; waiting for the last faults to heal");
    let mut outcome = Outcome {
        faults: schedule.events.len(),
        ..Outcome::default()
    };
    for task in fault_tasks {
        // Each fault's own steps are bounded.
        if let Err(e) = task.await {
            outcome
                .problems
                .push(format!("a fault task failed: {}", panic_text(e)));
        }
    }
    ctx.tracer.trace("every fault healed");
    ended.set(Instant::now()).unwrap();

    let clients_by = Instant::now() + CLIENTS_WITHIN;
    let mut reports = Vec::new();
    for (client, task) in own.iter().zip(own_tasks) {
        reports.push((
            client.clone(),
            bounded_client(&client.name, clients_by, task).await,
        ));
    }
    for ((ring, _), task) in rings.iter().zip(ring_tasks) {
        reports.push((
            ring.clone(),
            bounded_client(&ring.name, clients_by, task).await,
        ));
    }
    let mut published = Published::default();
    for task in producer_tasks {
        match task.await {
            Ok(p) => published.add(p),
            Err(e) => outcome
                .problems
                .push(format!("a producer failed: {}", panic_text(e))),
        }
    }
    ctx.tracer.trace(&format!(
        "clients done; producers published {}",
        published.describe()
    ));

    // Every request settled, both workers consuming.
    let drained_by = Instant::now() + DRAIN_WITHIN;
    let mut last = None;
    loop {
        let counts = request_counts(&queue).await;
        let consumers = queue_counts(&queue).await.map_or(0, |c| c.1);
        if counts == Some((0, 0)) && consumers == WORKERS as u32 {
            break;
        }
        last = Some((counts, consumers));
        if Instant::now() > drained_by {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some((counts, consumers)) = last.filter(|_| Instant::now() > drained_by) {
        outcome.problems.push(format!(
            "request queue not settled within {DRAIN_WITHIN:?} of the clients' end: \
             (ready, unacked) {counts:?}, consumers {consumers}/{WORKERS}"
        ));
    }
    ctx.tracer.trace("request queue settled; settling");
    tokio::time::sleep(SETTLE).await;

    // The replies and the dead letters.
    for (client, report) in &mut reports {
        if let Some((_, members)) = rings.iter().find(|(r, _)| r.name == client.name) {
            for m in members {
                report.drain(AMQP_URL, &m.reply_queue).await;
            }
        } else {
            report.drain(AMQP_URL, &client.reply_queue).await;
        }
    }
    let routed_replies = take_all(&queues.replies).await;
    let noid_replies = take_all(&queues.noid).await;
    let default_replies = take_all(&settings.amqp.reply_queue).await;
    let dead = take_all(&settings.amqp.dead_letter_queue).await;
    for (client, report) in &reports {
        outcome.checks.add(client, report, &collection).await;
    }
    outcome.judge_producers(
        &published,
        &routed_replies,
        &noid_replies,
        &default_replies,
        &dead,
    );

    // Each worker: still running (restarted after its faults), then SIGTERM.
    ctx.tracer.trace("checks read; stopping the workers");
    for i in 0..WORKERS {
        let mut slot = ctx.pool.slots[i].lock().await;
        match slot.take() {
            Some(mut worker) => {
                if worker.running() {
                    ctx.pool
                        .terminate(&ctx.tracer, i, &mut worker, "final")
                        .await;
                } else {
                    let status = worker.exit_within(Duration::ZERO).await;
                    outcome
                        .problems
                        .push(format!("worker {i} exited on its own: {status:?}"));
                }
            }
            None => outcome.problems.push(format!("worker {i} not running")),
        }
    }
    outcome.exits = ctx.pool.exits.lock().unwrap().clone();
    outcome.left_ready = queue_counts(&queue).await.map_or(0, |c| c.0);
    ctx.tracer.trace("done");
    outcome
}

async fn bounded_client(
    name: &str,
    by: Instant,
    task: tokio::task::JoinHandle<ClientReport>,
) -> ClientReport {
    let abort = task.abort_handle();
    match tokio::time::timeout_at(by, task).await {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => ClientReport::failed(format!("client {name}: {}", panic_text(e))),
        Err(_) => {
            abort.abort();
            ClientReport::failed(format!(
                "client {name} not done within {CLIENTS_WITHIN:?} of the faults' end"
            ))
        }
    }
}

/// Ready and unacknowledged messages of `queue` (rabbitmqctl), None when unknown.
async fn request_counts(queue: &str) -> Option<(u64, u64)> {
    let out = ctl(&[
        "list_queues",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ])
    .await
    .ok()?;
    out.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        if fields.next()? != queue {
            return None;
        }
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    })
}

/// Every message of `queue`, taken (auto-ack) until it is empty.
async fn take_all(queue: &str) -> Vec<lapin::message::Delivery> {
    let amqp = Amqp::open().await;
    let mut all = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        let got = amqp
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await;
        match got {
            Ok(Some(message)) => all.push(message.delivery),
            _ => break,
        }
    }
    amqp.close().await;
    all
}

// ------------------------------------------------------------------ faults

async fn inject(event: Event, ctx: Arc<Ctx>) {
    tokio::time::sleep_until(ctx.tracer.t0 + Duration::from_millis(event.at_ms)).await;
    let hold = Duration::from_millis(event.hold_ms);
    let t = &ctx.tracer;
    t.trace(&format!("FAULT {}", event.fault));
    match event.fault {
        Fault::EngineDown => {
            ctx.engine.down();
            tokio::time::sleep(hold).await;
            ctx.engine.up();
            t.trace("healed: engine up");
        }
        Fault::EngineFrozen => {
            ctx.engine.freeze();
            tokio::time::sleep(hold).await;
            ctx.engine.thaw();
            t.trace("healed: engine thawed");
        }
        Fault::BrokerCut(w) => ctx.proxies(w).iter().for_each(|p| p.cut()),
        Fault::BrokerFrozen(w) => {
            ctx.proxies(w).iter().for_each(|p| p.freeze());
            tokio::time::sleep(hold).await;
            ctx.proxies(w).iter().for_each(|p| p.thaw());
            t.trace(&format!("healed: broker thawed for {}", target(w)));
        }
        Fault::BrokerRestart => {
            let stop = ctl(&["stop_app"]).await;
            t.trace(&format!("broker app stopped: {}", ok_or(&stop)));
            tokio::time::sleep(hold).await;
            let start = ctl(&["start_app"]).await;
            let ready = ctl(&["await_startup"]).await;
            t.trace(&format!(
                "healed: broker app started: {}, {}",
                ok_or(&start),
                ok_or(&ready)
            ));
        }
        Fault::MemoryAlarm => {
            let set = ctl(&["set_vm_memory_high_watermark", "absolute", "1"]).await;
            t.trace(&format!("memory alarm set: {}", ok_or(&set)));
            tokio::time::sleep(hold).await;
            let restored = restore_watermark().await;
            t.trace(&format!("healed: watermark restored: {}", ok_or(&restored)));
        }
        Fault::WorkerKill(i) | Fault::WorkerTerm(i) => {
            let mut slot = ctx.pool.slots[i].lock().await;
            if let Some(mut worker) = slot.take() {
                if matches!(event.fault, Fault::WorkerKill(_)) {
                    let _ = Command::new("kill")
                        .args(["-KILL", &worker.pid().to_string()])
                        .status();
                    let status = worker.exit_within(TIMEOUT).await;
                    t.trace(&format!("worker {i} killed: {status:?}"));
                } else {
                    ctx.pool.terminate(t, i, &mut worker, "fault").await;
                }
            }
            tokio::time::sleep(hold).await;
            *slot = Some(ctx.pool.spawn(i));
            t.trace(&format!("healed: worker {i} started again"));
        }
    }
}

fn ok_or(result: &Result<String, String>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(e) => format!("FAILED ({})", e.trim()),
    }
}

/// The broker's app started and its watermark the configured one.
async fn heal_broker() {
    tokio::task::spawn_blocking(heal_broker_blocking)
        .await
        .unwrap();
}

fn heal_broker_blocking() {
    for args in [
        &["start_app"][..],
        &["await_startup"],
        &["eval", RESTORE_WATERMARK],
    ] {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if let Err(e) = ctl_blocking(&args) {
            eprintln!("chaos: healing the broker: {e}");
        }
    }
}

/// Heals the broker whatever happens: a panic, a seed cut short.
struct BrokerGuard;

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        heal_broker_blocking();
    }
}

// ------------------------------------------------------------------ workers

#[derive(Clone, Debug)]
struct Exit {
    worker: usize,
    /// Seconds into the schedule when the signal went.
    at: f64,
    why: &'static str,
    /// None: not exited within EXIT_WAIT (then killed).
    code: Option<Option<i32>>,
    took: Duration,
}

impl Exit {
    fn clean(&self) -> bool {
        self.code == Some(Some(0)) && self.took <= EXIT_WITHIN
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let code = match self.code {
            Some(Some(c)) => format!("exit {c}"),
            Some(None) => "killed by a signal".into(),
            None => format!("still running after {EXIT_WAIT:?} (killed)"),
        };
        write!(
            f,
            "worker {} SIGTERM ({}) at +{:.1}s: {code} in {:.1?}",
            self.worker, self.why, self.at, self.took
        )
    }
}

/// The worker processes: each through its own AMQP proxy, all through the engine proxy.
struct Pool {
    settings: Settings,
    amqp_urls: Vec<String>,
    log: PathBuf,
    slots: Vec<tokio::sync::Mutex<Option<BinaryWorker>>>,
    exits: Mutex<Vec<Exit>>,
}

impl Pool {
    fn new(settings: Settings, brokers: &[Proxy], log: PathBuf) -> Self {
        Pool {
            settings,
            amqp_urls: brokers
                .iter()
                .map(|p| format!("amqp://guest:guest@{}/%2f", p.addr()))
                .collect(),
            log,
            slots: (0..brokers.len())
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            exits: Mutex::new(Vec::new()),
        }
    }

    fn spawn(&self, i: usize) -> BinaryWorker {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        BinaryWorker::spawn(
            worker_command(&self.settings)
                .env("MUPDATE__AMQP__URL", &self.amqp_urls[i])
                .env(
                    "MUPDATE__STORAGE__TIMEOUT_MS",
                    ENGINE_TIMEOUT_MS.to_string(),
                )
                .env("MUPDATE__STORAGE__RETRY_MAX_DELAY_MS", "1000")
                .env("MUPDATE__WORKER__PAUSE_AFTER_MS", "3000")
                .env(
                    "MUPDATE__WORKER__SHUTDOWN_TIMEOUT_MS",
                    SHUTDOWN_TIMEOUT_MS.to_string(),
                )
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stderr(Stdio::from(log)),
        )
    }

    /// SIGTERM, then its exit (killed if it doesn't within EXIT_WAIT), recorded.
    async fn terminate(&self, t: &Tracer, i: usize, worker: &mut BinaryWorker, why: &'static str) {
        let at = t.at();
        let sent = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &worker.pid().to_string()])
            .status();
        let status = worker.exit_within(EXIT_WAIT).await;
        let took = sent.elapsed();
        if status.is_none() {
            let _ = Command::new("kill")
                .args(["-KILL", &worker.pid().to_string()])
                .status();
            let _ = worker.exit_within(TIMEOUT).await;
        }
        let exit = Exit {
            worker: i,
            at,
            why,
            code: status.map(|s| s.code()),
            took,
        };
        t.trace(&format!(
            "{exit}{}",
            if exit.clean() { "" } else { "  <-- NOT CLEAN" }
        ));
        self.exits.lock().unwrap().push(exit);
    }
}

/// Deletes a seed's queues and dead-letter exchange, even when it failed: on a thread of
/// its own, every broker call bounded, nothing that can panic.
struct Cleanup {
    settings: Settings,
    queues: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let amqp = &self.settings.amqp;
        let mut queues = self.queues.clone();
        queues.extend([
            amqp.request_queue.clone(),
            amqp.reply_queue.clone(),
            amqp.dead_letter_queue.clone(),
        ]);
        let exchange = amqp.dead_letter_exchange.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Some((connection, channel)) = connect("chaos-cleanup").await else {
                    eprintln!("chaos: cleanup: no broker; queues left: {queues:?}");
                    return;
                };
                for q in &queues {
                    let delete =
                        channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default());
                    let _ = tokio::time::timeout(BROKER_CALL, delete).await;
                }
                let delete = channel.exchange_delete(exchange.as_str().into(), Default::default());
                let _ = tokio::time::timeout(BROKER_CALL, delete).await;
                let _ =
                    tokio::time::timeout(BROKER_CALL, connection.close(200, "bye".into())).await;
            });
        })
        .join();
    }
}

// ------------------------------------------------------------------ rings

/// Ring `r`: its documents, shared by RING_MEMBERS clients in turn. The ring is checked
/// as one client (`Checks::add`): its name is the writer its documents must hold.
fn ring(r: usize) -> (ClientSpec, Vec<ClientSpec>) {
    let name = format!("r{r}");
    let documents: Vec<String> = (0..RING_DOCUMENTS)
        .map(|d| format!("{name}-d{d}"))
        .collect();
    let members: Vec<ClientSpec> = (0..RING_MEMBERS)
        .map(|m| ClientSpec {
            name: format!("{name}m{m}"),
            documents: documents.clone(),
            reply_queue: fresh("chaos.ring-replies"),
            brokers: vec![AMQP_URL.to_owned()],
            reply_args: FieldTable::default(),
        })
        .collect();
    let spec = ClientSpec {
        name,
        documents,
        reply_queue: members[0].reply_queue.clone(),
        brokers: vec![AMQP_URL.to_owned()],
        reply_args: FieldTable::default(),
    };
    (spec, members)
}

#[derive(PartialEq)]
enum Sent {
    No,
    Unconfirmed,
    Confirmed,
}

/// Like `run_client`, but update k is sent by member (k-1) mod n, on its own connection,
/// to its own reply queue, once update k-1's reply came back to the member before it.
async fn run_ring(
    ring: ClientSpec,
    members: Vec<ClientSpec>,
    collection: Arc<Collection>,
    queue: String,
    ended: Arc<OnceLock<Instant>>,
) -> ClientReport {
    let mut report = ClientReport::default();
    let mut sessions: Vec<Option<Session>> = members.iter().map(|_| None).collect();
    let mut k: u64 = 1;
    let mut sent = Sent::No;
    let mut since = Instant::now();
    loop {
        let m = (k as usize - 1) % members.len();
        let member = &members[m];
        if sent != Sent::No && since.elapsed() > REPLY_WITHIN {
            let failure = format!(
                "{} (sent by {}): no reply within {REPLY_WITHIN:?}",
                ring.request_id(k),
                member.name
            );
            report.failures.push(failure);
            break;
        }
        let Some(s) = sessions[m].as_mut() else {
            sessions[m] = Session::open(member).await;
            if sessions[m].is_none() {
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
            let docs: Vec<Value> = ring
                .documents
                .iter()
                .map(|id| json!({"_id": id, "body": {"n": k, "w": ring.name, "by": member.name}}))
                .collect();
            let mut envelope = collection.envelope(json!(docs));
            envelope["requestId"] = json!(ring.request_id(k));
            envelope["retryOnConflict"] = json!(10);
            let body = serde_json::to_vec(&envelope).unwrap();
            if s.publish(&queue, &ring.request_id(k), &body, &member.reply_queue)
                .await
            {
                sent = Sent::Confirmed;
            } else {
                sent = Sent::Unconfirmed;
                if let Some(s) = sessions[m].take() {
                    s.close().await;
                }
                report.reconnects += 1;
                continue;
            }
        }
        use futures_util::StreamExt;
        match tokio::time::timeout(Duration::from_secs(1), s.replies.next()).await {
            Err(_) => {}
            Ok(Some(Ok(delivery))) => {
                let ack = delivery.ack(BasicAckOptions::default());
                let _ = tokio::time::timeout(TIMEOUT, ack).await;
                let (id, reply) = report.record(delivery.data);
                if id == ring.request_id(k) {
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
                if let Some(s) = sessions[m].take() {
                    s.close().await;
                }
                report.reconnects += 1;
            }
        }
    }
    for s in sessions.into_iter().flatten() {
        s.close().await;
    }
    report
}

// ------------------------------------------------------------------ producers

#[derive(Clone)]
struct Queues {
    /// Replies to the producers' requests with an id.
    replies: String,
    /// Replies to no-id requests that name a reply queue.
    noid: String,
    /// A queue that doesn't exist: requests replied to there are unroutable.
    nowhere: String,
}

/// What producers published: confirmed by the broker, or maybe (no confirm came).
#[derive(Default)]
struct Published {
    routed: Vec<String>,
    routed_maybe: Vec<String>,
    unroutable: Vec<String>,
    unroutable_maybe: Vec<String>,
    noid_queue: u64,
    noid_queue_maybe: u64,
    noid_default: u64,
    noid_default_maybe: u64,
}

impl Published {
    fn add(&mut self, other: Published) {
        self.routed.extend(other.routed);
        self.routed_maybe.extend(other.routed_maybe);
        self.unroutable.extend(other.unroutable);
        self.unroutable_maybe.extend(other.unroutable_maybe);
        self.noid_queue += other.noid_queue;
        self.noid_queue_maybe += other.noid_queue_maybe;
        self.noid_default += other.noid_default;
        self.noid_default_maybe += other.noid_default_maybe;
    }

    fn describe(&self) -> String {
        format!(
            "routed {} (+{} unconfirmed), unroutable {} (+{}), no-id to a queue {} (+{}), \
             no-id to the default queue {} (+{})",
            self.routed.len(),
            self.routed_maybe.len(),
            self.unroutable.len(),
            self.unroutable_maybe.len(),
            self.noid_queue,
            self.noid_queue_maybe,
            self.noid_default,
            self.noid_default_maybe
        )
    }
}

/// A connection of the test's own, every step bounded by BROKER_CALL.
async fn connect(name: &str) -> Option<(Connection, Channel)> {
    let open = async {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection = Connection::connect(AMQP_URL, properties).await.ok()?;
        let channel = connection.create_channel().await.ok()?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .ok()?;
        Some((connection, channel))
    };
    tokio::time::timeout(BROKER_CALL, open).await.ok().flatten()
}

/// Publishes `batch` to `queue` back to back, then waits for the confirms: whether each
/// was confirmed, all within BROKER_CALL (none is, past it).
async fn publish_batch(
    channel: &Channel,
    queue: &str,
    batch: &[(Vec<u8>, BasicProperties)],
) -> Vec<bool> {
    let publish = async {
        let mut confirms = Vec::new();
        for (body, props) in batch {
            let options = BasicPublishOptions::default();
            let published = channel
                .basic_publish("".into(), queue.into(), options, body, props.clone())
                .await;
            confirms.push(published.ok());
        }
        let mut confirmed = Vec::new();
        for confirm in confirms {
            confirmed.push(match confirm {
                Some(confirm) => confirm.await.is_ok_and(|c| c.is_ack()),
                None => false,
            });
        }
        confirmed
    };
    tokio::time::timeout(BROKER_CALL, publish)
        .await
        .unwrap_or_else(|_| vec![false; batch.len()])
}

/// What a producer's message is.
#[derive(Clone, Copy)]
enum Kind {
    Routed,
    Unroutable,
    NoIdToQueue,
    NoIdToDefault,
}

/// Publishes, never waiting for a reply, until `stop`: requests with an id (replied to
/// `queues.replies`, or unroutable: to `queues.nowhere`) and byte-identical requests with
/// no id at all (replied to `queues.noid`, or to the default reply queue). One message at
/// a time, or now and then a burst of them published back to back (replies the workers
/// then publish together, routed and unroutable mixed).
async fn run_producer(
    p: usize,
    seed: u64,
    collection: Arc<Collection>,
    queue: String,
    queues: Queues,
    stop: Arc<AtomicBool>,
) -> Published {
    let mut rng = Rng(seed ^ (0xA076_1D64_78BD_642F_u64.wrapping_mul(p as u64 + 1)));
    let mut published = Published::default();
    // Concurrent updates of one document: retried on a version conflict.
    let noid_body = {
        let mut envelope = collection.envelope(json!([{"_id": "noid", "body": {"same": "bytes"}}]));
        envelope["retryOnConflict"] = json!(10);
        serde_json::to_vec(&envelope).unwrap()
    };
    let persistent = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let mut session: Option<(Connection, Channel)> = None;
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.range(40, 200))).await;
        let Some((_, channel)) = session.as_ref() else {
            session = connect(&format!("chaos-producer-{p}")).await;
            if session.is_none() {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            continue;
        };
        let size = if rng.range(0, 99) < 15 {
            rng.range(5, 20)
        } else {
            1
        };
        let mut batch = Vec::new();
        let mut kinds = Vec::new();
        for _ in 0..size {
            k += 1;
            let (kind, id) = match rng.range(0, 99) {
                0..40 => (Kind::Routed, format!("p{p}-{k}")),
                40..55 => (Kind::Unroutable, format!("u{p}-{k}")),
                55..80 => (Kind::NoIdToQueue, String::new()),
                _ => (Kind::NoIdToDefault, String::new()),
            };
            let message = match kind {
                Kind::Routed | Kind::Unroutable => {
                    let reply_to = match kind {
                        Kind::Routed => &queues.replies,
                        _ => &queues.nowhere,
                    };
                    let doc = format!("p{p}-d{}", k % PRODUCER_DOCUMENTS as u64);
                    let mut envelope = collection.envelope(json!([{"_id": doc, "body": {"n": k}}]));
                    envelope["requestId"] = json!(id);
                    envelope["retryOnConflict"] = json!(10);
                    let props = persistent
                        .clone()
                        .with_reply_to(reply_to.as_str().into())
                        .with_correlation_id(id.as_str().into())
                        .with_message_id(id.as_str().into());
                    (serde_json::to_vec(&envelope).unwrap(), props)
                }
                Kind::NoIdToQueue => (
                    noid_body.clone(),
                    persistent
                        .clone()
                        .with_reply_to(queues.noid.as_str().into()),
                ),
                Kind::NoIdToDefault => (noid_body.clone(), persistent.clone()),
            };
            batch.push(message);
            kinds.push((kind, id));
        }
        let confirmed = publish_batch(channel, &queue, &batch).await;
        for ((kind, id), confirmed) in kinds.into_iter().zip(&confirmed) {
            match (kind, *confirmed) {
                (Kind::Routed, true) => published.routed.push(id),
                (Kind::Routed, false) => published.routed_maybe.push(id),
                (Kind::Unroutable, true) => published.unroutable.push(id),
                (Kind::Unroutable, false) => published.unroutable_maybe.push(id),
                (Kind::NoIdToQueue, true) => published.noid_queue += 1,
                (Kind::NoIdToQueue, false) => published.noid_queue_maybe += 1,
                (Kind::NoIdToDefault, true) => published.noid_default += 1,
                (Kind::NoIdToDefault, false) => published.noid_default_maybe += 1,
            }
        }
        if confirmed.iter().any(|c| !c)
            && let Some((connection, _)) = session.take()
        {
            let _ = tokio::time::timeout(BROKER_CALL, connection.close(200, "bye".into())).await;
        }
    }
    if let Some((connection, _)) = session {
        let _ = tokio::time::timeout(BROKER_CALL, connection.close(200, "bye".into())).await;
    }
    published
}

// ------------------------------------------------------------------ checks

#[derive(Default)]
struct Outcome {
    faults: usize,
    checks: Checks,
    /// Whatever else failed, one line each.
    problems: Vec<String>,
    routed: usize,
    routed_answered: usize,
    unroutable: usize,
    dead_lettered: usize,
    /// Dead letters beyond the first of an unroutable request (a lost ack's copy).
    dead_letter_copies: usize,
    noid: (u64, usize),
    noid_default: (u64, usize),
    producer_duplicates: usize,
    exits: Vec<Exit>,
    left_ready: u32,
}

/// The first few of `items`, each cut short: a failure message stays readable.
fn few<T: std::fmt::Display>(items: &[T]) -> String {
    let mut shown: Vec<String> = items
        .iter()
        .take(6)
        .map(|item| {
            let item = item.to_string();
            match item.char_indices().nth(240) {
                Some((cut, _)) => format!("{}…", &item[..cut]),
                None => item,
            }
        })
        .collect();
    if items.len() > shown.len() {
        shown.push(format!("… and {} more", items.len() - shown.len()));
    }
    format!("[{}]", shown.join("; "))
}

fn reply_id(m: &lapin::message::Delivery) -> Option<String> {
    let body: Value = serde_json::from_slice(&m.data).ok()?;
    body["requestId"].as_str().map(str::to_owned)
}

fn reply_status(m: &lapin::message::Delivery) -> Value {
    serde_json::from_slice::<Value>(&m.data).map_or(Value::Null, |b| b["status"].clone())
}

impl Outcome {
    fn judge_producers(
        &mut self,
        published: &Published,
        routed_replies: &[lapin::message::Delivery],
        noid_replies: &[lapin::message::Delivery],
        default_replies: &[lapin::message::Delivery],
        dead: &[lapin::message::Delivery],
    ) {
        let problems = &mut self.problems;
        // Replies to the requests with an id.
        let mut answers: BTreeMap<String, usize> = BTreeMap::new();
        for m in routed_replies {
            let id = reply_id(m).unwrap_or_default();
            let correlation = m
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string());
            if correlation.as_deref() != Some(id.as_str()) {
                problems.push(format!(
                    "reply to {id:?} with correlation_id {correlation:?}"
                ));
            }
            if reply_status(m) != 200 {
                let body = String::from_utf8_lossy(&m.data);
                problems.push(format!("reply to {id}: {}", few(&[body])));
            }
            *answers.entry(id).or_default() += 1;
        }
        self.producer_duplicates = answers.values().map(|n| n - 1).sum();
        self.routed = published.routed.len();
        let unanswered: Vec<&String> = published
            .routed
            .iter()
            .filter(|id| !answers.contains_key(*id))
            .collect();
        self.routed_answered = self.routed - unanswered.len();
        if !unanswered.is_empty() {
            problems.push(format!(
                "{} routed request(s) with an id never answered: {}",
                unanswered.len(),
                few(&unanswered)
            ));
        }
        // The dead letters: the unroutable requests, each once; nothing else.
        let mut dead_ids: BTreeMap<String, usize> = BTreeMap::new();
        let mut dead_noid = 0;
        for m in dead {
            match m.properties.message_id() {
                Some(id) => *dead_ids.entry(id.to_string()).or_default() += 1,
                None => dead_noid += 1,
            }
        }
        self.dead_lettered = dead.len();
        self.unroutable = published.unroutable.len();
        let mut unroutable_wrong = Vec::new();
        // At least once, never lost. A copy more is the documented cost of a lost ack:
        // the worker publishes the dead letter, confirmed, then acks, and a worker killed
        // (or a connection lost) between the two leaves the request to be dead-lettered
        // again by whoever gets it next. Counted in the summary, not a failure.
        for id in &published.unroutable {
            let n = dead_ids.get(id).copied().unwrap_or(0);
            if n == 0 {
                unroutable_wrong.push(format!("{id}: never dead-lettered"));
            } else if n > 1 {
                self.dead_letter_copies += n - 1;
            }
        }
        for id in &published.unroutable_maybe {
            let n = dead_ids.get(id).copied().unwrap_or(0);
            if n > 1 {
                unroutable_wrong.push(format!("{id} (unconfirmed): dead-lettered {n} times"));
            }
        }
        if !unroutable_wrong.is_empty() {
            problems.push(format!(
                "{} unroutable request(s) not dead-lettered: {}",
                unroutable_wrong.len(),
                few(&unroutable_wrong)
            ));
        }
        let routed_dead: Vec<String> = dead_ids
            .iter()
            .filter(|(id, _)| {
                !published.unroutable.contains(id) && !published.unroutable_maybe.contains(id)
            })
            .map(|(id, n)| format!("{id} x{n}"))
            .collect();
        if !routed_dead.is_empty() {
            problems.push(format!(
                "{} routed request(s) dead-lettered: {}",
                routed_dead.len(),
                few(&routed_dead)
            ));
        }
        if dead_noid > 0 {
            problems.push(format!(
                "{dead_noid} no-id (routed) request(s) dead-lettered"
            ));
        }
        // The unroutable ones are never answered (anywhere a reply could be seen).
        let all_replies = routed_replies
            .iter()
            .chain(noid_replies)
            .chain(default_replies);
        let answered_unroutable: Vec<String> = all_replies
            .filter_map(reply_id)
            .filter(|id| {
                published.unroutable.contains(id) || published.unroutable_maybe.contains(id)
            })
            .collect();
        if !answered_unroutable.is_empty() {
            problems.push(format!(
                "{} unroutable request(s) answered: {}",
                answered_unroutable.len(),
                few(&answered_unroutable)
            ));
        }
        // The byte-identical no-id requests: each one confirmed is answered (at least
        // as many replies as confirmed publishes), and with a 200.
        self.noid = (published.noid_queue, noid_replies.len());
        self.noid_default = (published.noid_default, default_replies.len());
        for (what, sent, replies) in [
            ("to a reply queue", published.noid_queue, noid_replies),
            (
                "to the default reply queue",
                published.noid_default,
                default_replies,
            ),
        ] {
            if (replies.len() as u64) < sent {
                problems.push(format!(
                    "byte-identical no-id requests {what}: {} replies to {sent} confirmed \
                     publishes",
                    replies.len()
                ));
            }
            let wrong: Vec<String> = replies
                .iter()
                .filter(|m| reply_status(m) != 200)
                .map(|m| String::from_utf8_lossy(&m.data).into_owned())
                .collect();
            if !wrong.is_empty() {
                problems.push(format!(
                    "{} no-id replies {what} not a 200: {}",
                    wrong.len(),
                    few(&wrong)
                ));
            }
        }
    }

    fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        let checks = &self.checks;
        if !checks.failures.is_empty() {
            failures.push(format!(
                "{} client failures: {}",
                checks.failures.len(),
                few(&checks.failures)
            ));
        }
        if checks.stale.len() != checks.stale_after_republish {
            failures.push(format!(
                "{} stale documents: {}",
                checks.stale.len(),
                few(&checks.stale)
            ));
        }
        if !checks.unacknowledged.is_empty() {
            failures.push(format!(
                "{} unacknowledged writes: {}",
                checks.unacknowledged.len(),
                few(&checks.unacknowledged)
            ));
        }
        failures.extend(self.problems.iter().cloned());
        if self.left_ready != 0 {
            failures.push(format!(
                "{} request(s) left in the request queue after the workers stopped",
                self.left_ready
            ));
        }
        for exit in self.exits.iter().filter(|e| !e.clean()) {
            failures.push(format!("{exit} (allowed: exit 0 within {EXIT_WITHIN:?})"));
        }
        failures
    }

    fn summary(&self) -> String {
        let exits: Vec<String> = self
            .exits
            .iter()
            .map(|e| match e.code {
                Some(Some(c)) => format!("{c}/{:.1}s", e.took.as_secs_f64()),
                Some(None) => format!("signal/{:.1}s", e.took.as_secs_f64()),
                None => "hung".into(),
            })
            .collect();
        let stale = self.checks.stale.len() - self.checks.stale_after_republish;
        format!(
            "faults={} acknowledged={} stale={}/{} duplicate-replies={} dead-lettered={} \
             (unroutable, confirmed: {}; copies after a lost ack: {}), routed answered={}/{}, no-id replies={}/{} and {}/{} \
             (default queue), sigterm exits=[{}], left={}, failed checks={}",
            self.faults,
            self.checks.acknowledged,
            stale,
            self.checks.documents,
            self.checks.duplicates + self.producer_duplicates,
            self.dead_lettered,
            self.unroutable,
            self.dead_letter_copies,
            self.routed_answered,
            self.routed,
            self.noid.1,
            self.noid.0,
            self.noid_default.1,
            self.noid_default.0,
            exits.join(" "),
            self.left_ready,
            self.failures().len()
        )
    }
}

/// No servers needed: a seed always gives the same schedule, within its span, and faults
/// that must not overlap don't.
#[test]
fn a_seed_gives_one_schedule() {
    for seed in [0, 1, 42, u64::MAX] {
        let a = Schedule::generate(seed, DEFAULT_SECONDS);
        let b = Schedule::generate(seed, DEFAULT_SECONDS);
        assert_eq!(a.to_string(), b.to_string());
        assert!(!a.events.is_empty());
        assert!(a.events.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        assert!(a.events.iter().all(|e| e.at_ms <= DEFAULT_SECONDS * 1000));
        let mut until: HashMap<String, u64> = HashMap::new();
        for e in &a.events {
            if let Some((key, extra)) = e.fault.resource() {
                assert!(until.get(&key).is_none_or(|t| *t <= e.at_ms), "{a}");
                until.insert(key, e.at_ms + e.hold_ms + extra);
            }
        }
    }
    assert_ne!(
        Schedule::generate(1, 40).to_string(),
        Schedule::generate(2, 40).to_string()
    );
}
