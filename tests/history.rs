//! Histories under overlapping faults (SPEC section 6): clients update their own
//! documents sequentially (update k+1 of a document is sent only once update k's 200
//! reply came back) while the real servers are stopped, restarted, cut off and slowed
//! down, and worker processes are killed. Afterwards every document holds its last
//! acknowledged update, every update got its reply, and nothing is left queued.
//!
//! The servers must be the ones scripts/services.sh started; when another checkout
//! started them, point MUPDATE_SERVICES_DIR at its `.services` (the test checks that
//! stopping the engine really stopped it).

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mupdate_worker::config::Settings;
use support::history::*;
use support::proxy::Proxy;
use support::*;
use tokio::time::Instant;

const CLIENTS: usize = 8;
const DOCUMENTS_PER_CLIENT: usize = 3;
/// One engine call of the workers; the slow engine's latency exceeds it.
const ENGINE_TIMEOUT_MS: u64 = 1500;
/// A reply that takes longer is lost: this outlasts the engine's restart.
const REPLY_WITHIN: Duration = Duration::from_secs(60);
/// After the last update: longer than any backoff (the broker reconnect's is 10 s at
/// most), for late duplicate replies and stray writes to show.
const SETTLE: Duration = Duration::from_secs(12);
/// The clients, from the start (a client not done by then failed: this leaves time
/// for the checks and a report within the scenario's bound).
const CLIENTS_WITHIN: Duration = Duration::from_secs(120);
/// The whole scenario, faults included.
const SCENARIO_WITHIN: Duration = Duration::from_secs(180);

use Step::*;

/// One step of the fault schedule; faults overlap as one starts before another ends.
#[derive(Debug, Clone, Copy)]
enum Step {
    Wait(u64),
    StopEngine,
    StartEngine,
    CloseBrokerConnections,
    /// `stop_app`, 2 s, `start_app`, `await_startup`.
    RestartBroker,
    /// SIGKILL of worker `i` (modulo the number of workers), started again at once.
    KillWorker(usize),
    /// The engine's latency, to it and back, in ms.
    SlowEngine(u64, u64),
    FastEngine,
    /// Closes every open connection to the engine.
    CutEngine,
}

const SCHEDULE: &[Step] = &[
    Wait(3000),
    StopEngine,
    Wait(1000),
    CloseBrokerConnections, // while the engine is down
    Wait(4000),             // longer than pause_after_ms
    KillWorker(0),          // while the engine is down
    StartEngine,
    Wait(2000),
    SlowEngine(0, 2000), // every reply comes after the timeout: calls are sent again
    Wait(2000),
    KillWorker(1), // while the engine is slow
    Wait(1000),
    CutEngine,
    Wait(1000),
    RestartBroker, // while the engine is slow; no worker is killed after it
    FastEngine,
    Wait(3000),
    SlowEngine(1200, 0), // slow, in time: updates go on
    Wait(3000),
    SlowEngine(2000, 0), // calls reach the engine after the worker gave up on them
    Wait(1000),
    FastEngine,
];

impl Step {
    fn is_fault(self) -> bool {
        !matches!(self, Wait(_) | StartEngine | FastEngine)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker() {
    history("one worker", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers() {
    history("two workers", 2).await;
}

/// The scenario: `workers` worker processes on one request queue, CLIENTS clients, the
/// SCHEDULE, then the checks.
async fn history(name: &str, workers: usize) {
    let _servers = servers_lock().await;
    let _restore = RestoreServers;
    let started = Instant::now();
    let run = tokio::time::timeout(SCENARIO_WITHIN, scenario(name, workers)).await;
    let outcome = run.unwrap_or_else(|_| panic!("{name}: not done within {SCENARIO_WITHIN:?}"));
    println!("{name}: {outcome}, in {:.0?}", started.elapsed());
    outcome.assert_clean();
}

async fn scenario(name: &str, workers: usize) -> Outcome {
    let clients_by = Instant::now() + CLIENTS_WITHIN;
    let clients: Vec<ClientSpec> = (0..CLIENTS)
        .map(|c| ClientSpec::new(c, DOCUMENTS_PER_CLIENT))
        .collect();
    let collection = Arc::new(Collection::create(&seeds(&clients)).await);
    let proxy = Proxy::start("127.0.0.1:9200").await;
    let mut settings = settings();
    settings.amqp.prefetch = 16;
    let mut pool = Workers::start(name, settings.clone(), &proxy, workers);
    wait_consumers(&settings.amqp.request_queue, workers as u32).await;

    let ended = Arc::new(OnceLock::new());
    let tasks: Vec<_> = clients
        .iter()
        .map(|c| {
            tokio::spawn(run_client(
                c.clone(),
                collection.clone(),
                settings.amqp.request_queue.clone(),
                ended.clone(),
                REPLY_WITHIN,
            ))
        })
        .collect();
    let mut faults = 0;
    for step in SCHEDULE {
        faults += usize::from(step.is_fault());
        inject(*step, &proxy, &mut pool).await;
    }
    ended.set(Instant::now()).unwrap();
    let mut reports = Vec::new();
    for (client, task) in clients.iter().zip(tasks) {
        // Each client's own waits are bounded; this bounds the client as a whole.
        let abort = task.abort_handle();
        reports.push(match tokio::time::timeout_at(clients_by, task).await {
            Ok(report) => report.unwrap(),
            Err(_) => {
                abort.abort();
                let stuck = format!("client {} not done within {CLIENTS_WITHIN:?}", client.name);
                ClientReport::failed(stuck)
            }
        });
    }
    pool.note(&format!(
        "clients done, {:.1?} after the schedule",
        ended.get().unwrap().elapsed()
    ));
    tokio::time::sleep(SETTLE).await;
    for (client, report) in clients.iter().zip(&mut reports) {
        report.drain(AMQP_URL, &client.reply_queue).await;
    }

    let mut outcome = Outcome {
        faults,
        workers,
        consuming: queue_counts(&settings.amqp.request_queue)
            .await
            .map_or(0, |c| c.1) as usize,
        ..Outcome::default()
    };
    for (client, report) in clients.iter().zip(&reports) {
        outcome.checks.add(client, report, &collection).await;
    }
    pool.note("replies drained, documents checked; stopping the workers");
    outcome.worker_exits = pool.stop().await;
    let amqp = &settings.amqp;
    outcome.left_queued = queue_counts(&amqp.request_queue).await.map_or(0, |c| c.0);
    outcome.dead_lettered = queue_counts(&amqp.dead_letter_queue)
        .await
        .map_or(0, |c| c.0);

    delete_topology(&settings).await;
    let replies: Vec<&str> = clients.iter().map(|c| c.reply_queue.as_str()).collect();
    delete_queues(&replies).await;
    outcome
}

async fn inject(step: Step, proxy: &Proxy, pool: &mut Workers) {
    if let Wait(ms) = step {
        return tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    pool.note(&format!("{step:?}"));
    let at = Instant::now();
    match step {
        Wait(_) => unreachable!(),
        StopEngine => {
            blocking(|| services(&["stop", "engine"])).await;
            // The engine may take a moment to close its port after the signal.
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut up = http().get(format!("{ES_URL}/_cluster/health")).send().await;
            while up.is_ok() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                up = http().get(format!("{ES_URL}/_cluster/health")).send().await;
            }
            assert!(
                up.is_err(),
                "the engine still answers: services.sh did not stop it (set \
                 MUPDATE_SERVICES_DIR to the .services of the checkout that started it)"
            );
        }
        StartEngine => blocking(|| services(&["start", "engine"])).await,
        CloseBrokerConnections => {
            blocking(|| rabbitmqctl(&["close_all_connections", "history"])).await
        }
        RestartBroker => {
            blocking(|| rabbitmqctl(&["stop_app"])).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            blocking(|| {
                rabbitmqctl(&["start_app"]);
                rabbitmqctl(&["await_startup"]);
            })
            .await;
        }
        KillWorker(i) => pool.kill_and_restart(i),
        SlowEngine(up, down) => {
            proxy.set_latency(Duration::from_millis(up), Duration::from_millis(down))
        }
        FastEngine => proxy.set_latency(Duration::ZERO, Duration::ZERO),
        CutEngine => proxy.cut(),
    }
    let done = format!("{step:?} in {:.1?}", at.elapsed());
    pool.note(&done);
    println!("  {done}");
}

/// Runs a blocking fault step off the runtime's threads: the clients, the proxy and the
/// workers' broker traffic go on meanwhile.
async fn blocking(step: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(step).await.unwrap();
}

/// Starts whatever a failed run left stopped: the broker's app and the engine.
struct RestoreServers;

impl Drop for RestoreServers {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
            for args in [
                &["rabbitmqctl", "start_app"][..],
                &["rabbitmqctl", "await_startup"],
                &["start", "engine"],
            ] {
                let _ = Command::new(script).args(args).status();
            }
        }
    }
}

// ------------------------------------------------------------------ workers

/// Worker processes on one request queue, their engine behind the proxy.
struct Workers {
    env: Vec<(String, String)>,
    settings: Settings,
    children: Vec<Child>,
    logs: std::path::PathBuf,
}

impl Workers {
    fn start(name: &str, settings: Settings, proxy: &Proxy, n: usize) -> Self {
        let env = [
            ("MUPDATE__STORAGE__URL", proxy.url()),
            (
                "MUPDATE__STORAGE__TIMEOUT_MS",
                ENGINE_TIMEOUT_MS.to_string(),
            ),
            ("MUPDATE__STORAGE__RETRY_MAX_DELAY_MS", "1000".into()),
            ("MUPDATE__WORKER__PAUSE_AFTER_MS", "3000".into()),
            ("MUPDATE__WORKER__SHUTDOWN_TIMEOUT_MS", "5000".into()),
            ("RUST_LOG", "info".into()),
        ];
        let logs = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("history-{}.log", name.replace(' ', "-")));
        let _ = std::fs::remove_file(&logs);
        let mut workers = Workers {
            env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            settings,
            children: Vec::new(),
            logs,
        };
        for _ in 0..n {
            let child = workers.spawn();
            workers.children.push(child);
        }
        println!("  worker logs: {}", workers.logs.display());
        workers
    }

    fn spawn(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.logs)
            .unwrap();
        worker_command(&self.settings)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap()
    }

    fn kill_and_restart(&mut self, i: usize) {
        let i = i % self.children.len();
        let child = &mut self.children[i];
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        self.children[i] = self.spawn();
    }

    /// Writes a line in the workers' log, between theirs.
    fn note(&self, line: &str) {
        use std::io::Write;
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.logs)
            .unwrap();
        // UTC time of day, as the workers' own lines have it.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let (s, ms) = (now.as_secs() % 86400, now.subsec_millis());
        let time = format!("{:02}:{:02}:{:02}.{ms:03}", s / 3600, s / 60 % 60, s % 60);
        let _ = writeln!(log, "---- {time} history test: {line}");
    }

    /// SIGTERM to each, then their exit codes (None: killed, not exited in time).
    async fn stop(&mut self) -> Vec<Option<i32>> {
        let mut exits = Vec::new();
        for mut child in std::mem::take(&mut self.children) {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let waited = tokio::task::spawn_blocking(move || {
                let deadline = std::time::Instant::now() + TIMEOUT;
                loop {
                    if let Some(status) = child.try_wait().unwrap() {
                        return status.code();
                    }
                    if std::time::Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
            exits.push(waited.await.unwrap());
        }
        exits
    }
}

impl Drop for Workers {
    /// A failed run leaves no worker behind.
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ------------------------------------------------------------------ clients

// ------------------------------------------------------------------ checks

#[derive(Default)]
struct Outcome {
    faults: usize,
    workers: usize,
    /// Workers consuming the request queue after the settle period.
    consuming: usize,
    checks: Checks,
    left_queued: u32,
    dead_lettered: u32,
    worker_exits: Vec<Option<i32>>,
}

impl Outcome {
    fn assert_clean(&self) {
        self.checks.assert_clean();
        assert_eq!(self.left_queued, 0, "requests left in the request queue");
        assert_eq!(self.consuming, self.workers, "every worker consumes again");
        assert_eq!(self.dead_lettered, 0, "requests dead-lettered");
        assert!(
            self.worker_exits.iter().all(|e| *e == Some(0)),
            "workers exit 0 on SIGTERM: {:?}",
            self.worker_exits
        );
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, faults injected={}, workers consuming={}/{}, left queued={}, \
             dead-lettered={}, worker exits={:?}",
            self.checks,
            self.faults,
            self.consuming,
            self.workers,
            self.left_queued,
            self.dead_lettered,
            self.worker_exits
        )
    }
}
