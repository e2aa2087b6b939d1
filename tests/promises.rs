//! Every promise holds on every path: SPEC sections 4 to 6, each on the path where it
//! is easiest to break — a redelivery of a request without an id, replies returned by
//! the broker among routed ones, SIGTERM with the engine or the broker frozen, silent or
//! blocked by an alarm, SIGHUP, queues declared by someone else, an engine answering
//! every `_bulk` with a whole-request 429, dead letters that say what happened, and a
//! configuration that can't work. Real servers; each test on fresh queues and indexes,
//! every wait bounded, what it made deleted even when it fails. Tests that change the
//! shared servers (the broker's memory watermark) hold `servers_lock()`.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Consumer};
use mupdate_worker::config::{QueueType, Settings};
use serde_json::{Value, json};
use support::binary::BinaryWorker;
use support::cleanup::Cleanup;
use support::http_fault::HttpFault;
use support::load::Load;
use support::proxy::Proxy;
use support::*;
use tokio::time::Instant;

/// SIGTERM tests: the grace given, and the bound on the exit (grace + 2 s, and a little
/// slack for a loaded machine).
const GRACE_MS: u64 = 3000;
const EXIT_BOUND: Duration = Duration::from_millis(5500);
/// Long enough for a small load to finish once a fault is over, on 2 cores.
const SETTLE: Duration = Duration::from_secs(60);
const SERVICES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");

// ------------------------------------------------------------- 1, 2: redeliveries

/// Behaviour 1: a request without requestId, correlation_id or message_id, byte-identical
/// to one answered earlier (with another update of the same document in between), is
/// applied and answered even when it comes back redelivered: only a request provably the
/// same (same id) may be skipped as "already answered".
#[tokio::test]
async fn byte_identical_requests_without_ids_are_always_applied_even_redelivered() {
    let on = br#"{"index":"IDX","collection":"col","controller":"document","action":"mUpdate","body":{"documents":[{"_id":"a","body":{"status":"on"}}]}}"#;
    let off = br#"{"index":"IDX","collection":"col","controller":"document","action":"mUpdate","body":{"documents":[{"_id":"a","body":{"status":"off"}}]}}"#;
    redelivered_third_is_applied(
        (on.to_vec(), None),
        (off.to_vec(), None),
        (on.to_vec(), None),
    )
    .await;
}

/// Behaviour 2: a redelivered request with the requestId of one answered earlier, but
/// sent by another user (`user_id`), is applied: the skip is keyed by id and user.
#[tokio::test]
async fn a_redelivered_request_with_the_same_id_from_another_user_is_applied() {
    let on = br#"{"index":"IDX","collection":"col","controller":"document","action":"mUpdate","requestId":"r-1","body":{"documents":[{"_id":"a","body":{"status":"on"}}]}}"#;
    let off = br#"{"index":"IDX","collection":"col","controller":"document","action":"mUpdate","requestId":"r-2","body":{"documents":[{"_id":"a","body":{"status":"off"}}]}}"#;
    redelivered_third_is_applied(
        (on.to_vec(), Some("guest")),
        (off.to_vec(), None),
        (on.to_vec(), None),
    )
    .await;
}

/// Behaviour 2: a redelivered request with the requestId of one answered earlier, but
/// other bytes, is applied: the skip is keyed by id, user and bytes.
#[tokio::test]
async fn a_redelivered_request_with_the_same_id_and_other_bytes_is_applied() {
    let on = br#"{"index":"IDX","collection":"col","controller":"document","action":"mUpdate","requestId":"r-1","body":{"documents":[{"_id":"a","body":{"status":"on"}}]}}"#;
    let off = br#"{"index":"IDX","collection":"col","controller":"document","action":"mUpdate","requestId":"r-2","body":{"documents":[{"_id":"a","body":{"status":"off"}}]}}"#;
    let on_again = br#"{"index":"IDX","collection":"col","controller":"document","action":"mUpdate","requestId":"r-1","volatile":{"try":2},"body":{"documents":[{"_id":"a","body":{"status":"on"}}]}}"#;
    redelivered_third_is_applied(
        (on.to_vec(), None),
        (off.to_vec(), None),
        (on_again.to_vec(), None),
    )
    .await;
}

/// Three requests (bytes with `IDX` standing for the index, and the `user_id` property)
/// updating document `a`: `on`, `off`, then `on` again. The first two are answered in
/// turn; the third reaches the worker while the engine is down, and the worker's broker
/// connection is cut, so the broker redelivers it (redelivered flag set). Once the
/// engine is back, the third must be answered 200 and the document end `on`.
async fn redelivered_third_is_applied(
    first: (Vec<u8>, Option<&str>),
    second: (Vec<u8>, Option<&str>),
    third: (Vec<u8>, Option<&str>),
) {
    let _servers = exclusive().await;
    let col = Collection::create(&[("a", json!({"status": "none"}))]).await;
    let engine = HttpFault::start(&ES_URL).await;
    let broker = Proxy::start("127.0.0.1:5672").await;
    let mut settings = settings();
    settings.storage.url = engine.url();
    settings.storage.retry_max_delay_ms = 500;
    settings.amqp.url = format!("amqp://guest:guest@{}/%2f", broker.addr());
    // Held, not handed back, while the engine is down.
    settings.worker.pause_after_ms = 600_000;
    let listen = with_metrics(&mut settings);
    let mut cleanup = Cleanup::of(&settings);
    let replies = cleanup.queue(fresh("promises.replies"));
    let amqp = Amqp::open().await;
    durable_queue(&amqp, &replies, FieldTable::default()).await;
    let mut answers = consume(&amqp, &replies).await;
    let worker = Worker::start_with(settings).await;
    let queue = worker.request_queue().to_owned();

    let send = |(bytes, user): &(Vec<u8>, Option<&str>)| {
        let bytes = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("IDX", &col.index)
            .into_bytes();
        let mut props = BasicProperties::default().with_reply_to(replies.as_str().into());
        if let Some(user) = user {
            props = props.with_user_id((*user).into());
        }
        (bytes, props)
    };
    for (step, request, status) in [(1, &first, "on"), (2, &second, "off")] {
        let (bytes, props) = send(request);
        publish(&amqp.channel, &queue, &bytes, props).await;
        let reply = body(&next_within(&mut answers, TIMEOUT, &format!("reply {step}")).await);
        assert_eq!(reply["status"], 200, "reply {step}: {reply}");
        assert_eq!(
            col.get("a").await.0["status"],
            status,
            "after request {step}"
        );
    }

    engine.down(true);
    let (bytes, props) = send(&third);
    publish(&amqp.channel, &queue, &bytes, props).await;
    wait_ready(&queue, 0).await;
    // Its engine call is failing meanwhile.
    wait_until("the worker calls the down engine", || async {
        engine.unavailable() > 0
    })
    .await;
    broker.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The worker is back, and holds the redelivered request.
    wait_consumers(&queue, 1).await;
    wait_ready(&queue, 0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    engine.down(false);

    let reply = tokio::time::timeout(TIMEOUT, answers.next()).await;
    let status = col.get("a").await.0["status"].clone();
    let Ok(Some(Ok(reply))) = reply else {
        let skipped = metric(&listen, "mupdate_duplicates_skipped_total").await;
        panic!(
            "no reply to the redelivered third request within {TIMEOUT:?} \
             (document a: status {status}; mupdate_duplicates_skipped_total {skipped})"
        );
    };
    let reply = body(&reply);
    assert_eq!(reply["status"], 200, "reply 3: {reply}");
    assert_eq!(status, "on", "the redelivered third request was applied");
    halt_settled(worker).await;
    amqp.close().await;
}

// ------------------------------------------------------------- 3: unroutable replies

/// Behaviour 3: of 400 requests taken at once, half with a `reply_to` queue that doesn't
/// exist: each routable one is answered exactly once and never dead-lettered, each
/// unroutable one is dead-lettered exactly once (returned replies are matched to their
/// request by the returned message, not by the order of confirms).
#[tokio::test]
async fn unroutable_replies_are_dead_lettered_exactly_once_routed_ones_never() {
    const N: usize = 400;
    let _servers = exclusive().await;
    let docs: Vec<(String, Value)> = (0..20).map(|d| (format!("d{d}"), json!({}))).collect();
    let refs: Vec<(&str, Value)> = docs.iter().map(|(i, v)| (i.as_str(), v.clone())).collect();
    let col = Collection::create(&refs).await;
    let mut settings = settings();
    settings.amqp.prefetch = 256;
    settings.amqp.max_held_bytes = 0;
    let mut cleanup = Cleanup::of(&settings);
    let replies = cleanup.queue(fresh("promises.replies"));
    let nowhere = fresh("promises.no-such-queue");
    let amqp = Amqp::open().await;
    durable_queue(&amqp, &replies, FieldTable::default()).await;
    let worker = Worker::start_with(settings).await;
    let queue = worker.request_queue().to_owned();
    let dead = worker.settings.amqp.dead_letter_queue.clone();

    let mut confirms = Vec::new();
    for i in 0..N {
        let mut envelope = col.envelope(json!([{"_id": format!("d{}", i % 20), "body": {"n": i}}]));
        envelope["requestId"] = json!(format!("req-{i}"));
        envelope["retryOnConflict"] = json!(50);
        let to = if i % 2 == 0 { &replies } else { &nowhere };
        let props = BasicProperties::default().with_reply_to(to.as_str().into());
        confirms.push(
            amqp.channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(&envelope).unwrap(),
                    props,
                )
                .await
                .unwrap(),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack(), "request confirmed");
    }

    let mut answered = consume(&amqp, &replies).await;
    let mut dead_letters = consume(&amqp, &dead).await;
    let mut replied: HashMap<String, usize> = HashMap::new();
    let mut dead_ids: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + SETTLE;
    let mut settle: Option<Instant> = None;
    loop {
        let until = settle.unwrap_or(deadline).min(deadline);
        let delivery = tokio::select! {
            d = answered.next() => d.map(|d| (true, d)),
            d = dead_letters.next() => d.map(|d| (false, d)),
            _ = tokio::time::sleep_until(until) => None,
        };
        let Some((is_reply, Ok(delivery))) = delivery else {
            break;
        };
        let id = body(&delivery)["requestId"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        let counts = if is_reply {
            &mut replied
        } else {
            &mut dead_ids
        };
        *counts.entry(id).or_default() += 1;
        let total_r: usize = replied.values().sum();
        let total_d: usize = dead_ids.values().sum();
        if settle.is_none() && total_r >= N / 2 && total_d >= N / 2 {
            // Everything came: a while more for late duplicates.
            settle = Some(Instant::now() + Duration::from_secs(3));
        }
    }
    let evens: BTreeSet<String> = (0..N).step_by(2).map(|i| format!("req-{i}")).collect();
    let odds: BTreeSet<String> = (1..N).step_by(2).map(|i| format!("req-{i}")).collect();
    let dup_replies: Vec<_> = replied.iter().filter(|(_, n)| **n > 1).collect();
    let dup_dead: Vec<_> = dead_ids.iter().filter(|(_, n)| **n > 1).collect();
    let routed_dead: Vec<_> = dead_ids.keys().filter(|id| evens.contains(*id)).collect();
    let unroutable_replied: Vec<_> = replied.keys().filter(|id| odds.contains(*id)).collect();
    let missing_replies: Vec<_> = evens
        .iter()
        .filter(|id| !replied.contains_key(*id))
        .collect();
    let missing_dead: Vec<_> = odds
        .iter()
        .filter(|id| !dead_ids.contains_key(*id))
        .collect();
    println!(
        "400 requests: {} replies ({} distinct), {} dead letters ({} distinct)",
        replied.values().sum::<usize>(),
        replied.len(),
        dead_ids.values().sum::<usize>(),
        dead_ids.len()
    );
    assert!(
        routed_dead.is_empty(),
        "routable requests dead-lettered: {} ({:?}…)",
        routed_dead.len(),
        routed_dead.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        missing_dead.is_empty(),
        "unroutable requests not dead-lettered: {} ({:?}…)",
        missing_dead.len(),
        missing_dead.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        dup_dead.is_empty(),
        "dead-lettered more than once: {dup_dead:?}"
    );
    assert!(
        missing_replies.is_empty(),
        "routable requests not answered: {} ({:?}…)",
        missing_replies.len(),
        missing_replies.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        dup_replies.is_empty(),
        "answered more than once: {dup_replies:?}"
    );
    assert!(
        unroutable_replied.is_empty(),
        "replies to unroutable requests: {unroutable_replied:?}"
    );
    drop((answered, dead_letters));
    halt_settled(worker).await;
    amqp.close().await;
}

// ------------------------------------------------------------- 4, 5, 6: SIGTERM

/// Behaviour 4: SIGTERM while the engine is frozen (every call hangs) and 20 requests
/// are held: the binary exits 0 within the grace + 2 s, and each request is then
/// answered or back in the queue: none lost.
#[tokio::test]
async fn sigterm_with_the_engine_frozen_exits_0_in_time_and_loses_nothing() {
    sigterm_with_the_engine_frozen("held", &[], Duration::from_secs(1)).await;
}

/// Behaviour 4, while pausing: the engine frozen long enough (reads time out after 1 s,
/// `worker.pause_after_ms` 2 s) for the worker to pause consumption and hand its held
/// requests back, whose `_bulk` calls hang: SIGTERM then still exits 0 within the grace
/// + 2 s, and none is lost.
#[tokio::test]
async fn sigterm_while_pausing_for_a_frozen_engine_exits_0_in_time_and_loses_nothing() {
    sigterm_with_the_engine_frozen(
        "pausing",
        &[
            ("MUPDATE__WORKER__PAUSE_AFTER_MS", "2000"),
            ("MUPDATE__STORAGE__TIMEOUT_MS", "1000"),
        ],
        Duration::from_secs(5),
    )
    .await;
}

/// 20 requests held by the binary (`held_binary`, then `env`) with the engine frozen;
/// `before` later, SIGTERM: exit 0 in time, and none lost.
async fn sigterm_with_the_engine_frozen(what: &str, env: &[(&str, &str)], before: Duration) {
    const N: usize = 20;
    let _servers = exclusive().await;
    let load = Load::new(N, false).await;
    let engine = Proxy::start(&ES_URL).await;
    let mut settings = settings();
    settings.storage.url = engine.url();
    let mut cleanup = Cleanup::of(&settings);
    cleanup.queue(load.reply_queue.clone());
    let queue = settings.amqp.request_queue.clone();
    let mut command = held_binary(&settings);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut binary = BinaryWorker::spawn(&mut command);
    wait_consumers(&queue, 1).await;
    engine.freeze();
    load.publish(&queue).await;
    wait_ready(&queue, 0).await;
    tokio::time::sleep(before).await;

    let took = sigterm_exits_0(&mut binary).await;
    println!("SIGTERM with the engine frozen ({what}): exit 0 after {took:?}");
    assert_none_lost(&load, &queue).await;
    drop(engine);
}

/// Behaviour 5: SIGTERM while the broker accepts TCP connections and never says a word
/// of AMQP: the binary exits 0 within the grace + 2 s.
#[tokio::test]
async fn sigterm_with_a_silent_broker_exits_0_in_time() {
    let _servers = exclusive().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    let settings = settings();
    let _cleanup = Cleanup::of(&settings);
    let mut binary = BinaryWorker::spawn(
        worker_command(&settings)
            .env(
                "MUPDATE__AMQP__URL",
                format!("amqp://guest:guest@{addr}/%2f"),
            )
            .env("MUPDATE__WORKER__SHUTDOWN_TIMEOUT_MS", GRACE_MS.to_string())
            .stderr(Stdio::piped()),
    );
    wait_until("the worker connects to the silent broker", || async {
        accepted.load(Ordering::SeqCst) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let took = sigterm_exits_0(&mut binary).await;
    println!("SIGTERM with a silent broker: exit 0 after {took:?}");
    silent.abort();
}

/// Behaviour 5: SIGTERM while the broker is frozen mid-session (the worker consumed 10
/// requests, the engine answered them, their replies can't get through): the binary
/// exits 0 within the grace + 2 s, and each request is then answered or back in the
/// queue: none lost.
#[tokio::test]
async fn sigterm_with_the_broker_frozen_mid_session_exits_0_in_time_and_loses_nothing() {
    const N: usize = 10;
    let _servers = exclusive().await;
    let load = Load::new(N, false).await;
    let engine = Proxy::start(&ES_URL).await;
    let broker = Proxy::start("127.0.0.1:5672").await;
    let mut settings = settings();
    settings.storage.url = engine.url();
    let mut cleanup = Cleanup::of(&settings);
    cleanup.queue(load.reply_queue.clone());
    let queue = settings.amqp.request_queue.clone();
    let mut binary = BinaryWorker::spawn(held_binary(&settings).env(
        "MUPDATE__AMQP__URL",
        format!("amqp://guest:guest@{}/%2f", broker.addr()),
    ));
    wait_consumers(&queue, 1).await;
    engine.freeze();
    load.publish(&queue).await;
    wait_ready(&queue, 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.freeze();
    engine.thaw();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let took = sigterm_exits_0(&mut binary).await;
    println!("SIGTERM with the broker frozen: exit 0 after {took:?}");
    // The broker sees the worker's connection close.
    drop(broker);
    assert_none_lost(&load, &queue).await;
}

/// Behaviour 6: SIGTERM while the broker has a memory alarm (requests taken before it,
/// their replies blocked): the binary exits 0 within the grace + 2 s, and once the alarm
/// is cleared each request is answered or back in the queue: none lost.
#[tokio::test]
async fn sigterm_during_a_broker_memory_alarm_exits_0_in_time_and_loses_nothing() {
    const N: usize = 20;
    let _servers = exclusive().await;
    let load = Load::new(N, false).await;
    let engine = Proxy::start(&ES_URL).await;
    let mut settings = settings();
    settings.storage.url = engine.url();
    let mut cleanup = Cleanup::of(&settings);
    cleanup.queue(load.reply_queue.clone());
    let queue = settings.amqp.request_queue.clone();
    let mut binary = BinaryWorker::spawn(&mut held_binary(&settings));
    wait_consumers(&queue, 1).await;
    engine.freeze();
    load.publish(&queue).await;
    wait_ready(&queue, 0).await;
    let alarm = MemoryAlarm::raise();
    engine.thaw();
    // The replies are being published, and blocked.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let took = sigterm_exits_0(&mut binary).await;
    println!("SIGTERM during a memory alarm: exit 0 after {took:?}");
    alarm.clear();
    assert_none_lost(&load, &queue).await;
}

/// Behaviour 6: with a memory alarm blocking the replies of held requests and no
/// SIGTERM, the worker doesn't wait forever: once the alarm clears, every request is
/// answered 200, nothing is left in the queue or dead-lettered, and the worker still
/// answers new requests.
#[tokio::test]
async fn replies_blocked_by_a_memory_alarm_are_all_sent_once_it_clears() {
    const N: usize = 10;
    let _servers = exclusive().await;
    let load = Load::new(N, false).await;
    let engine = Proxy::start(&ES_URL).await;
    let mut settings = settings();
    settings.storage.url = engine.url();
    settings.worker.max_hold_ms = 3000;
    // The prefetch as configured from the start: sized by bytes, it starts at 4 (as if
    // each request could be 16 MiB) and rises only after 8 deliveries, which a frozen
    // engine leaves to the hold limit's hand-backs and the pause's timing (seen once in
    // CI: 4 of the 10 taken until the wait below gave up).
    settings.amqp.max_held_bytes = 0;
    let mut cleanup = Cleanup::of(&settings);
    cleanup.queue(load.reply_queue.clone());
    let worker = Worker::start_with(settings).await;
    let queue = worker.request_queue().to_owned();
    engine.freeze();
    load.publish(&queue).await;
    wait_ready(&queue, 0).await;
    let alarm = MemoryAlarm::raise();
    engine.thaw();
    // Several hold limits long.
    tokio::time::sleep(Duration::from_secs(10)).await;
    alarm.clear();

    let replies = load.collect(SETTLE).await;
    let total: usize = replies.values().map(Vec::len).sum();
    println!(
        "memory alarm: {} of {N} answered, {total} replies",
        replies.len()
    );
    assert_eq!(
        replies.len(),
        N,
        "every request answered once the alarm cleared"
    );
    load.check_replies(&replies);
    assert_still_answers(&queue).await;
    let settings = halt_settled(worker).await;
    assert_eq!(
        ready(&settings.amqp.dead_letter_queue).await,
        0,
        "nothing dead-lettered"
    );
    drop(engine);
}

// ------------------------------------------------------------- 7: SIGHUP

/// Behaviour 7: SIGHUP, without a `[security]` section (rights off), doesn't end the
/// worker: it still runs 2 s later and still answers.
#[tokio::test]
async fn sighup_never_kills_the_worker() {
    let _servers = exclusive().await;
    let settings = settings();
    let _cleanup = Cleanup::of(&settings);
    let queue = settings.amqp.request_queue.clone();
    let mut binary = BinaryWorker::spawn(worker_command(&settings).stderr(Stdio::piped()));
    wait_consumers(&queue, 1).await;
    binary.signal("-HUP");
    tokio::time::sleep(Duration::from_secs(1)).await;
    binary.signal("-HUP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Some(status) = binary.exit_within(Duration::ZERO).await {
        panic!("SIGHUP ended the worker: {status}");
    }
    assert_still_answers(&queue).await;
    let status = binary.terminate().await;
    assert_eq!(status.code(), Some(0), "SIGTERM after SIGHUP: {status}");
}

// ------------------------------------------------------------- 8: existing queues

/// Behaviour 8: a request queue declared by someone else, durable and without
/// `x-dead-letter-exchange`, while the worker's settings have a dead-letter exchange: the
/// worker consumes it as it is and answers, never reconnects in a loop, and logs one
/// warning that mentions `set_policy` (how to add the dead-letter exchange).
#[tokio::test]
async fn an_existing_queue_without_a_dead_letter_exchange_is_used_with_one_warning() {
    let settings = settings();
    let logs = existing_queue_is_used(&settings, FieldTable::default(), &[]).await;
    let policy: Vec<&str> = logs.lines().filter(|l| l.contains("set_policy")).collect();
    assert_eq!(
        policy.len(),
        1,
        "one warning mentioning set_policy, got {policy:#?}"
    );
    assert!(policy[0].contains("WARN"), "a warning: {}", policy[0]);
}

/// Behaviour 8: a classic request queue declared by someone else (with the worker's
/// dead-letter exchange: only its type differs), while the worker is set to quorum
/// queues: used as it is, with a warning naming it, never a reconnect loop.
#[tokio::test]
async fn an_existing_classic_queue_with_quorum_settings_is_used_with_a_warning() {
    let settings = settings();
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(settings.amqp.dead_letter_exchange.as_str().into()),
    );
    let logs =
        existing_queue_is_used(&settings, args, &[("MUPDATE__AMQP__QUEUE_TYPE", "quorum")]).await;
    let queue = &settings.amqp.request_queue;
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(queue.as_str()))
        .collect();
    assert!(!warnings.is_empty(), "a warning naming {queue}:\n{logs}");
}

/// Declares the request queue (durable, `args`) before the binary starts with `env`;
/// checks the binary consumes it, answers a request and logs no reconnection; returns
/// its logs (stdout and stderr, `RUST_LOG=info`).
async fn existing_queue_is_used(
    settings: &Settings,
    args: FieldTable,
    env: &[(&str, &str)],
) -> String {
    let _servers = exclusive().await;
    let _cleanup = Cleanup::of(settings);
    let queue = settings.amqp.request_queue.clone();
    let amqp = Amqp::open().await;
    durable_queue(&amqp, &queue, args).await;
    amqp.close().await;
    let mut command = worker_command(settings);
    command
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut binary = BinaryWorker::spawn(&mut command);
    wait_until("the worker consumes the existing queue", || async {
        queue_consumers(&queue).await.unwrap_or(0) >= 1
    })
    .await;
    assert_still_answers(&queue).await;
    // Time for a reconnect loop to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(binary.running(), "the worker still runs");
    let status = binary.terminate().await;
    let logs = binary.stdout() + &binary.stderr();
    assert_eq!(status.code(), Some(0), "exit: {status}\n{logs}");
    let reconnects: Vec<&str> = logs
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("reconnect") || l.contains("connection lost")
        })
        .collect();
    assert!(
        reconnects.is_empty(),
        "no reconnection, got {} lines: {:#?}",
        reconnects.len(),
        reconnects.iter().take(5).collect::<Vec<_>>()
    );
    logs
}

// ------------------------------------------------------------- 9, 11: whole-request 429

/// Behaviour 9: an engine answering every `_bulk` with a whole-request 429 for 25 s is
/// an outage: the worker pauses consumption (`mupdate_consumption_paused` 1) after
/// `worker.pause_after_ms`, and once the engine takes writes again, each of 20 requests
/// is answered exactly once, 200, with every update in the engine.
#[tokio::test]
async fn a_whole_request_429_from_the_engine_is_an_outage() {
    const N: usize = 20;
    let _servers = exclusive().await;
    let load = Load::new(N, false).await;
    let engine = HttpFault::start(&ES_URL).await;
    let mut settings = settings();
    settings.storage.url = engine.url();
    settings.storage.retry_max_delay_ms = 1000;
    settings.worker.pause_after_ms = 5000;
    let listen = with_metrics(&mut settings);
    let mut cleanup = Cleanup::of(&settings);
    cleanup.queue(load.reply_queue.clone());
    let worker = Worker::start_with(settings).await;
    let queue = worker.request_queue().to_owned();
    wait_readyz(&listen, 200).await;

    engine.reject_bulk(true);
    let outage = Instant::now();
    load.publish(&queue).await;
    let mut paused = false;
    while Instant::now() < outage + Duration::from_secs(25) {
        if metric(&listen, "mupdate_consumption_paused").await == 1.0 {
            paused = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rejected = engine.rejected();
    engine.reject_bulk(false);
    let early = load.replies_waiting().await;
    println!(
        "whole-request 429s for 25 s: {rejected} _bulk calls rejected, {early} replies meanwhile, paused: {paused}"
    );
    assert!(rejected > 0, "the worker called _bulk during the outage");
    assert!(
        paused,
        "mupdate_consumption_paused never 1 during 25 s of 429s"
    );

    let replies = load.collect(SETTLE).await;
    let total: usize = replies.values().map(Vec::len).sum();
    assert_eq!(replies.len(), N, "every request answered");
    assert_eq!(total, N, "each answered exactly once");
    load.check_replies(&replies);
    load.refresh().await;
    load.check_engine(load.requests.keys()).await;
    let settings = halt_settled(worker).await;
    assert_eq!(
        ready(&settings.amqp.dead_letter_queue).await,
        0,
        "nothing dead-lettered"
    );
}

/// Behaviour 11: whole-request 429s for 20 s, on a quorum request queue with a delivery
/// limit of 2 and a hold limit of 3 s: the outage costs no request its delivery
/// attempts; all are answered 200 afterwards and none is dead-lettered.
#[tokio::test]
async fn a_long_overload_on_a_quorum_queue_with_a_delivery_limit_dead_letters_nothing() {
    const N: usize = 20;
    let _servers = exclusive().await;
    let load = Load::new(N, false).await;
    let engine = HttpFault::start(&ES_URL).await;
    let mut settings = settings();
    settings.storage.url = engine.url();
    settings.storage.retry_max_delay_ms = 1000;
    settings.amqp.queue_type = QueueType::Quorum;
    settings.amqp.delivery_limit = 2;
    settings.worker.max_hold_ms = 3000;
    let mut cleanup = Cleanup::of(&settings);
    cleanup.queue(load.reply_queue.clone());
    let worker = Worker::start_with(settings).await;
    let queue = worker.request_queue().to_owned();
    let dead = worker.settings.amqp.dead_letter_queue.clone();

    engine.reject_bulk(true);
    load.publish(&queue).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    engine.reject_bulk(false);
    let dead_during = ready(&dead).await;
    println!("20 s of 429s on a quorum queue: {dead_during} requests dead-lettered");
    assert_eq!(dead_during, 0, "nothing dead-lettered during the overload");

    let replies = load.collect(SETTLE).await;
    let total: usize = replies.values().map(Vec::len).sum();
    println!(
        "after the overload: {} answered, {total} replies",
        replies.len()
    );
    assert_eq!(ready(&dead).await, 0, "nothing dead-lettered");
    assert_eq!(replies.len(), N, "every request answered");
    load.check_replies(&replies);
    load.refresh().await;
    load.check_engine(load.requests.keys()).await;
    halt_settled(worker).await;
}

// ------------------------------------------------------------- 10: dead letters

/// Behaviour 10: a dead-lettered request says why and whether its update was applied:
/// `x-mupdate-reason` (long string) `unroutable` for a reply whose queue doesn't exist,
/// `refused` for one whose queue keeps refusing publishes; `x-mupdate-applied` true for
/// both, as their updates reached the engine before the reply failed (and did).
#[tokio::test]
async fn dead_letters_say_why_and_whether_the_update_was_applied() {
    let _servers = exclusive().await;
    let col = Collection::create(&[("a", json!({"n": 0})), ("b", json!({"n": 0}))]).await;
    let mut settings = settings();
    settings.amqp.reply_attempts = 2;
    let mut cleanup = Cleanup::of(&settings);
    let full = cleanup.queue(fresh("promises.full"));
    let nowhere = fresh("promises.no-such-queue");
    let amqp = Amqp::open().await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    durable_queue(&amqp, &full, args).await;
    let worker = Worker::start_with(settings).await;
    let queue = worker.request_queue().to_owned();
    let dead = worker.settings.amqp.dead_letter_queue.clone();

    for (id, doc, to) in [("unroutable-1", "a", &nowhere), ("refused-1", "b", &full)] {
        let mut envelope = col.envelope(json!([{"_id": doc, "body": {"n": 1}}]));
        envelope["requestId"] = json!(id);
        let props = BasicProperties::default().with_reply_to(to.as_str().into());
        publish_envelope(&amqp, &queue, &envelope, props).await;
    }
    wait_ready(&dead, 2).await;
    let mut got = HashMap::new();
    for _ in 0..2 {
        let message = amqp
            .channel
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("a dead letter");
        let id = body(&message.delivery)["requestId"]
            .as_str()
            .unwrap()
            .to_owned();
        got.insert(id, message.delivery);
    }
    for (id, reason, doc) in [
        ("unroutable-1", "unroutable", "a"),
        ("refused-1", "refused", "b"),
    ] {
        let letter = got
            .get(id)
            .unwrap_or_else(|| panic!("{id} dead-lettered, got {:?}", got.keys()));
        let headers = letter
            .properties
            .headers()
            .as_ref()
            .map(|h| h.inner().clone())
            .unwrap_or_default();
        assert_eq!(
            headers.get("x-mupdate-reason"),
            Some(&AMQPValue::LongString(reason.into())),
            "{id}: x-mupdate-reason; headers present: {:?}",
            headers.keys().map(|k| k.as_str()).collect::<Vec<_>>()
        );
        assert_eq!(
            headers.get("x-mupdate-applied"),
            Some(&AMQPValue::Boolean(true)),
            "{id}: x-mupdate-applied; headers present: {:?}",
            headers.keys().map(|k| k.as_str()).collect::<Vec<_>>()
        );
        assert_eq!(col.get(doc).await.0["n"], 1, "{id}: its update was applied");
    }
    halt_settled(worker).await;
    amqp.close().await;
}

// ------------------------------------------------------------- 12: configuration

/// Behaviour 12: `storage.write_timeout_ms` below `storage.timeout_ms` is refused at
/// start: the binary exits with code 2 and a message naming both keys.
#[tokio::test]
async fn a_write_timeout_below_the_read_timeout_is_refused_at_start() {
    let _servers = exclusive().await;
    let settings = settings();
    let _cleanup = Cleanup::of(&settings);
    let mut binary = BinaryWorker::spawn(
        worker_command(&settings)
            .env("MUPDATE__STORAGE__WRITE_TIMEOUT_MS", "1000")
            .env("MUPDATE__STORAGE__TIMEOUT_MS", "5000")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let Some(status) = binary.exit_within(Duration::from_secs(10)).await else {
        panic!(
            "write_timeout_ms 1000 < timeout_ms 5000 accepted: the worker still runs after 10 s"
        );
    };
    let out = binary.stdout() + &binary.stderr();
    assert_eq!(status.code(), Some(2), "exit: {status}\n{out}");
    assert!(
        out.contains("storage.write_timeout_ms") && out.contains("storage.timeout_ms"),
        "a message naming both keys:\n{out}"
    );
}

// ---------------------------------------------------------------- helpers

/// Every test here holds the servers: some raise a memory alarm on the shared broker,
/// and the tests of other files stop and restart it, which would fail these midway.
async fn exclusive() -> ServersLock {
    let lock = servers_lock().await;
    wait_servers().await;
    lock
}

/// The binary on `settings`, with the SIGTERM grace of these tests, never pausing on
/// its own, holding every request it is given (no prefetch chosen by size).
fn held_binary(settings: &Settings) -> std::process::Command {
    let mut command = worker_command(settings);
    command
        .env("MUPDATE__WORKER__SHUTDOWN_TIMEOUT_MS", GRACE_MS.to_string())
        .env("MUPDATE__WORKER__PAUSE_AFTER_MS", "600000")
        .env("MUPDATE__AMQP__MAX_HELD_BYTES", "0")
        .stderr(Stdio::piped());
    command
}

/// SIGTERM; the binary must exit 0 within `EXIT_BOUND`. Returns how long it took.
async fn sigterm_exits_0(binary: &mut BinaryWorker) -> Duration {
    binary.signal("-TERM");
    let started = Instant::now();
    let Some(status) = binary.exit_within(EXIT_BOUND).await else {
        panic!("still running {EXIT_BOUND:?} after SIGTERM (grace {GRACE_MS} ms + 2 s)");
    };
    let took = started.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    took
}

/// Once no worker runs: every request of `load` is answered or back in `queue`.
async fn assert_none_lost(load: &Load, queue: &str) {
    let n = load.requests.len();
    // The broker returns the unacked requests of the closed connection.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let seen = ready(queue).await as usize + load.replies_waiting().await as usize;
        if seen >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{seen} of {n} requests answered or queued after {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replies = load.collect(Duration::from_secs(2)).await;
    load.check_replies(&replies);
    let queued = ready(queue).await;
    let amqp = Amqp::open().await;
    let back: BTreeSet<String> = next_messages(&amqp.channel, queue, queued as usize)
        .await
        .iter()
        .map(|m| {
            m.properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default()
        })
        .collect();
    amqp.close().await;
    let lost: Vec<&String> = load
        .requests
        .keys()
        .filter(|id| !replies.contains_key(*id) && !back.contains(*id))
        .collect();
    println!(
        "{} answered, {} back in the queue, {} lost",
        replies.len(),
        back.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "requests lost: {lost:?}");
}

/// A memory alarm on the shared broker (watermark 1 byte), cleared when dropped: the
/// watermark goes back to what the broker was configured with.
struct MemoryAlarm {
    restore: String,
}

impl MemoryAlarm {
    fn raise() -> Self {
        let out = std::process::Command::new(SERVICES)
            .args(["rabbitmqctl", "-q", "environment"])
            .output()
            .unwrap();
        let env = String::from_utf8_lossy(&out.stdout);
        // `{vm_memory_high_watermark,0.4}` when it is a fraction.
        let restore = env
            .split("{vm_memory_high_watermark,")
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .filter(|v| v.parse::<f64>().is_ok())
            .unwrap_or("0.4")
            .to_owned();
        let alarm = MemoryAlarm { restore };
        rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "1"]);
        alarm
    }

    fn clear(self) {}
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let restored = std::process::Command::new(SERVICES)
            .args([
                "rabbitmqctl",
                "-q",
                "set_vm_memory_high_watermark",
                &self.restore,
            ])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !restored {
            eprintln!(
                "could not clear the memory alarm: run `rabbitmqctl set_vm_memory_high_watermark {}`",
                self.restore
            );
        }
    }
}

/// Serves metrics on a free port; returns its address.
fn with_metrics(s: &mut Settings) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    s.metrics.listen = listen.clone();
    listen
}

async fn durable_queue(amqp: &Amqp, name: &str, args: FieldTable) {
    amqp.channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .unwrap();
}

/// An auto-ack consumer of `queue`.
async fn consume(amqp: &Amqp, queue: &str) -> Consumer {
    amqp.channel
        .basic_consume(
            queue.into(),
            fresh("promises-consumer").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
}

/// The consumer's next message within `within`; fails naming `what`.
async fn next_within(consumer: &mut Consumer, within: Duration, what: &str) -> Delivery {
    match tokio::time::timeout(within, consumer.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(other) => panic!("{what}: the consumer ended: {other:?}"),
        Err(_) => panic!("{what}: nothing within {within:?}"),
    }
}

fn body(delivery: &Delivery) -> Value {
    serde_json::from_slice(&delivery.data).unwrap_or(Value::Null)
}

/// Ready messages of a queue (0 when it doesn't exist).
async fn ready(queue: &str) -> u32 {
    queue_counts(queue).await.map_or(0, |(ready, _)| ready)
}

/// Waits until `queue` holds exactly `n` ready messages.
async fn wait_ready(queue: &str, n: u32) {
    wait_equal(&format!("{queue}: ready"), n, || ready(queue)).await;
}

/// Polls `probe` until true; fails naming `what` after `TIMEOUT`.
async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, probe: impl FnMut() -> F) {
    wait_equal(what, true, probe).await;
}

/// A valid request over direct reply-to to `queue` is answered 200.
async fn assert_still_answers(queue: &str) {
    let envelope = json!({"index": "a", "collection": "b", "controller": "document",
                          "action": "mUpdate", "body": {"documents": []}});
    let reply = call_queue(queue, &serde_json::to_vec(&envelope).unwrap()).await;
    assert_eq!(reply["status"], 200, "{reply}");
}

/// Stops the worker, then checks it settled every request it took.
async fn halt_settled(worker: Worker) -> Settings {
    let settings = worker.halt().await;
    // Quorum queues return unacked messages through their log: give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        queue_counts(&settings.amqp.request_queue).await,
        Some((0, 0)),
        "every request settled: none back in the request queue"
    );
    settings
}

// ------------------------------------------------- a crafted direct reply-to address

/// A producer names as `reply_to` a direct reply-to address RabbitMQ can't decode
/// (`amq.rabbitmq.reply-to.g1.` + base64 of no Erlang term): RabbitMQ 3.10 answers its
/// publish with a connection error (`INTERNAL_ERROR`), closing the whole connection the
/// replies go on. The worker must not lose its other requests over it, nor loop on it:
/// the crafted request is settled (answered into nowhere, or dead-lettered) and every
/// other request is answered.
#[tokio::test]
async fn a_crafted_direct_reply_to_address_costs_no_other_request() {
    let col = Collection::create(&[("a", json!({}))]).await;
    let settings = settings();
    let mut cleanup = Cleanup::of(&settings);
    let replies = cleanup.queue(fresh("promises.replies"));
    let amqp = Amqp::open().await;
    durable_queue(&amqp, &replies, FieldTable::default()).await;
    let worker = Worker::start_with(settings).await;
    let queue = worker.request_queue().to_owned();
    let dead = worker.settings.amqp.dead_letter_queue.clone();
    const N: usize = 20;
    for i in 0..N {
        if i == N / 2 {
            publish_crafted(&amqp, &col, &queue, "crafted").await;
        }
        let mut envelope = col.envelope(json!([{"_id": "a", "body": {"n": i}}]));
        envelope["requestId"] = json!(format!("req-{i}"));
        let props = BasicProperties::default().with_reply_to(replies.as_str().into());
        publish_envelope(&amqp, &queue, &envelope, props).await;
    }
    let mut answered = consume(&amqp, &replies).await;
    let mut ids = BTreeSet::new();
    let deadline = Instant::now() + SETTLE;
    while ids.len() < N {
        let d = next_within(
            &mut answered,
            deadline - Instant::now(),
            "every other reply",
        )
        .await;
        ids.insert(body(&d)["requestId"].as_str().unwrap_or("?").to_owned());
    }
    // A second request to the same address: dead-lettered without publishing.
    publish_crafted(&amqp, &col, &queue, "crafted-again").await;
    let mut letters = consume(&amqp, &dead).await;
    let mut seen = BTreeSet::new();
    for _ in 0..2 {
        let letter = next_within(&mut letters, SETTLE, "the crafted requests' dead letters").await;
        let headers = letter.properties.headers().clone().unwrap_or_default();
        assert_eq!(
            headers.inner().get("x-mupdate-reason"),
            Some(&AMQPValue::LongString("refused".into())),
            "{headers:?}"
        );
        seen.insert(letter.properties.message_id().as_ref().unwrap().to_string());
    }
    assert_eq!(
        seen,
        BTreeSet::from(["crafted".to_owned(), "crafted-again".to_owned()])
    );
    // Nothing loops between the queue and the worker: stopping it hands nothing back.
    let settings = halt_settled(worker).await;
    delete_topology(&settings).await;
    amqp.close().await;
}

/// Publishes a request (`id` as its requestId and message_id) whose `reply_to` is a
/// direct reply-to address RabbitMQ 3.10 can't decode.
async fn publish_crafted(amqp: &Amqp, col: &Collection, queue: &str, id: &str) {
    let mut envelope = col.envelope(json!([{"_id": "a", "body": {"crafted": id}}]));
    envelope["requestId"] = json!(id);
    let props = BasicProperties::default()
        .with_reply_to("amq.rabbitmq.reply-to.g1.ZmFrZQ==".into())
        .with_message_id(id.into());
    publish_envelope(amqp, queue, &envelope, props).await;
}

async fn publish_envelope(amqp: &Amqp, queue: &str, envelope: &Value, props: BasicProperties) {
    publish(
        &amqp.channel,
        queue,
        &serde_json::to_vec(envelope).unwrap(),
        props,
    )
    .await;
}
