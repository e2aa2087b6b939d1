//! The adversary's findings: each test breaks a promise of SPEC sections 4 to 6 that the
//! "every promise on every path" change meant to keep, on the real servers. Each fails
//! against the code it was written for; its name says the promise, its doc comment the
//! attack. None changes the shared servers' state.

mod support;

use std::process::Stdio;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use support::binary::BinaryWorker;
use support::*;

// ------------------------------------------------------------ signals at start-up

/// The binary on fresh queues, metrics off, started now.
fn spawn_binary() -> (BinaryWorker, Settings) {
    let settings = settings();
    let binary = BinaryWorker::spawn(worker_command(&settings).stderr(Stdio::null()));
    (binary, settings)
}

use mupdate_worker::config::Settings;

/// SPEC 6: "SIGHUP reloads the rules, and never ends the process." Attack: an operator
/// (or a supervisor's `reload`) sends SIGHUP just after the process started, before the
/// runtime got round to installing the handler (it is installed by a task spawned in
/// `session::run`, after the settings, the runtime, the engine client and the metrics
/// listener): SIGHUP's default action ends the process.
#[tokio::test]
async fn sighup_right_after_start_never_ends_the_process() {
    let (mut binary, settings) = spawn_binary();
    tokio::time::sleep(Duration::from_millis(20)).await;
    binary.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let alive = binary.running();
    let status = if alive {
        binary.terminate().await.to_string()
    } else {
        binary.wait_exit(TIMEOUT).await.to_string()
    };
    delete_topology(&settings).await;
    assert!(
        alive,
        "SIGHUP 20 ms after start ended the worker ({status}): the handler is not installed yet"
    );
}

/// SPEC 6: SIGTERM exits 0 within the grace + 2 s "whatever the state ... (connecting
/// ...)". Attack: SIGTERM 20 ms after start, before `shutdown_signal` is installed: the
/// process is killed by the signal (status 143) instead of exiting 0.
#[tokio::test]
async fn sigterm_right_after_start_exits_0() {
    let (mut binary, settings) = spawn_binary();
    tokio::time::sleep(Duration::from_millis(20)).await;
    binary.signal("-TERM");
    let status = binary.exit_within(Duration::from_secs(5)).await;
    delete_topology(&settings).await;
    let status = status.expect("exits after SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM 20 ms after start: {status} (killed by the signal, not a clean exit 0)"
    );
}

// ------------------------------------------------------------ dead letters

/// SPEC 4: "Messages are never lost silently: a message the worker can't answer at all
/// ... is rejected to the dead-letter exchange, never dropped." Attack: a producer that
/// sets a per-message TTL (`expiration`, here 3 s) on its request, whose reply queue is
/// gone. The worker takes it at once, its reply is unroutable, and the worker publishes
/// the dead letter itself, copying the request's properties, `expiration` included
/// (RabbitMQ's own dead-lettering removes it precisely so that a dead letter can't expire
/// again): the dead letter silently expires out of the dead-letter queue.
#[tokio::test]
async fn a_dead_letter_never_expires_out_of_the_dead_letter_queue() {
    let col = Collection::create(&[("a", json!({"n": 0}))]).await;
    let worker = Worker::start().await;
    let dlq = worker.settings.amqp.dead_letter_queue.clone();
    let amqp = Amqp::open().await;
    let nowhere = fresh("adversary.no-such-queue");
    let mut envelope = col.envelope(json!([{"_id": "a", "body": {"n": 1}}]));
    envelope["requestId"] = json!("ttl-1");
    let props = BasicProperties::default()
        .with_reply_to(nowhere.as_str().into())
        .with_expiration("3000".into());
    publish(
        &amqp.channel,
        worker.request_queue(),
        &serde_json::to_vec(&envelope).unwrap(),
        props,
    )
    .await;
    wait_equal("the request dead-lettered", 1, || ready(&dlq)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let left = ready(&dlq).await;
    amqp.close().await;
    worker.stop().await;
    assert_eq!(
        left, 1,
        "the dead letter of a request with `expiration` 3000 is gone from the dead-letter \
         queue 5 s later: it kept the request's TTL"
    );
}

/// `mupdate-worker requeue-dead` on `settings`' queues; its stdout.
async fn requeue_dead(settings: &Settings) -> (std::process::ExitStatus, String) {
    let mut command = worker_command(settings);
    command.arg("requeue-dead").stdout(Stdio::piped());
    let mut binary = BinaryWorker::spawn(&mut command);
    let status = binary.wait_exit(Duration::from_secs(60)).await;
    (status, binary.stdout())
}

/// A dead letter as the worker publishes it: `x-mupdate-applied` says whether its update
/// was applied.
async fn dead_letter(amqp: &Amqp, dlq: &str, n: usize, applied: bool) {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-mupdate-reason".into(),
        AMQPValue::LongString("unroutable".into()),
    );
    headers.insert("x-mupdate-applied".into(), AMQPValue::Boolean(applied));
    let body = serde_json::to_vec(&json!({"n": n, "applied": applied})).unwrap();
    let props = BasicProperties::default()
        .with_headers(headers)
        .with_message_id(format!("dead-{n}").into());
    publish(&amqp.channel, dlq, &body, props).await;
}

/// `mupdate-worker requeue-dead`: "moves the dead-lettered requests whose updates were
/// never applied back to the request queue". Attack: more than 100 dead letters that must
/// stay (applied) ahead of the ones to move. The tool keeps the ones that stay unacked
/// until the end, under a prefetch of 100: past 100 kept, the broker sends nothing more,
/// the tool waits 10 s, gives up the loop and reports success, having moved none.
#[tokio::test]
async fn requeue_dead_moves_every_unapplied_dead_letter_behind_many_applied_ones() {
    const KEPT: usize = 120;
    const MOVED: usize = 3;
    let settings = settings();
    let a = &settings.amqp;
    let amqp = Amqp::open().await;
    for q in [&a.request_queue, &a.dead_letter_queue] {
        amqp.channel
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    for n in 0..KEPT {
        dead_letter(&amqp, &a.dead_letter_queue, n, true).await;
    }
    for n in KEPT..KEPT + MOVED {
        dead_letter(&amqp, &a.dead_letter_queue, n, false).await;
    }
    let (status, out) = requeue_dead(&settings).await;
    let moved = ready(&a.request_queue).await;
    let left = ready(&a.dead_letter_queue).await;
    amqp.close().await;
    delete_queues(&[&a.request_queue, &a.dead_letter_queue]).await;
    assert!(status.success(), "requeue-dead: {status}\n{out}");
    assert_eq!(
        (moved, left),
        (MOVED as u32, KEPT as u32),
        "after requeue-dead (request queue, dead-letter queue); it said: {out}"
    );
}

// ------------------------------------------------------------ per-document order

/// SPEC 6: "Within one worker, updates of the same document land in the order the worker
/// received them." Attack: requests valid for the worker (duplicate JSON keys: the last
/// one counts, as `serde_json::Value` reads them) that the sequencer's own parse refuses
/// (`#[derive(Deserialize)]` rejects a duplicate field), so they take no turn and wait
/// for nothing: with calls side by side, later updates of a document overtake earlier
/// ones. The same producer loop as `tests/order.rs`, each request with its `collection`
/// key written twice.
#[tokio::test]
async fn requests_with_a_duplicated_key_keep_the_order_of_their_documents() {
    let col = Collection::create(&[("a", json!({"n": -1})), ("b", json!({"n": -1}))]).await;
    let mut settings = settings();
    settings.amqp.prefetch = 256;
    settings.amqp.max_held_bytes = 0;
    settings.storage.bulk_spread_documents = 1;
    settings.storage.concurrent_bulks = 8;
    let worker = Worker::start_with(settings).await;
    let amqp = Amqp::open().await;
    let replies = fresh("adversary.replies");
    amqp.channel
        .queue_declare(
            replies.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    const N: usize = 300;
    for i in 0..N {
        let mut documents = vec![json!({"_id": "a", "body": {"n": i}})];
        if i % 2 == 0 {
            documents.push(json!({"_id": "b", "body": {"n": i}}));
        }
        let mut envelope = col.envelope(json!(documents));
        envelope["requestId"] = json!(format!("order-{i}"));
        let text = serde_json::to_string(&envelope).unwrap();
        // The same key twice: the last one is the collection.
        let bytes = format!("{{\"collection\":\"ignored\",{}", &text[1..]);
        let props = BasicProperties::default().with_reply_to(replies.as_str().into());
        publish(
            &amqp.channel,
            worker.request_queue(),
            bytes.as_bytes(),
            props,
        )
        .await;
    }

    let mut version_of_a = vec![0i64; N];
    let mut failed = Vec::new();
    for message in next_messages(&amqp.channel, &replies, N).await {
        let reply: Value = serde_json::from_slice(&message.data).unwrap();
        if reply["status"] != 200 {
            // Two updates of "a" sent side by side: the later conflicts with the earlier.
            failed.push(reply["error"]["errors"][0]["reason"].clone());
            continue;
        }
        let i: usize = reply["requestId"].as_str().unwrap()["order-".len()..]
            .parse()
            .unwrap();
        version_of_a[i] = reply["result"]["hits"][0]["_version"].as_i64().unwrap();
    }
    let out_of_order: Vec<(usize, i64, i64)> = version_of_a
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] <= w[0])
        .map(|(i, w)| (i + 1, w[0], w[1]))
        .collect();
    let (a, _) = col.get("a").await;
    amqp.close().await;
    delete_queues(&[&replies]).await;
    worker.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {N} updates failed, sent beside an earlier update of the same document: {:?}…",
        failed.len(),
        failed.iter().take(2).collect::<Vec<_>>()
    );
    assert!(
        out_of_order.is_empty(),
        "{} requests applied before an earlier one (request, version before, its version): {:?}…",
        out_of_order.len(),
        out_of_order.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(a["n"], N - 1, "the document ends with the last update");
}

// ------------------------------------------------------------ helpers

/// Ready messages of a queue (0 when it doesn't exist).
async fn ready(queue: &str) -> u32 {
    queue_counts(queue).await.map_or(0, |(ready, _)| ready)
}
