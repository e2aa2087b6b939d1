//! SPEC section 6 under faults: for each, N requests of mixed sizes, a fault injected
//! mid-stream, then every request has its correct reply, the engine holds every update,
//! and nothing is left in the request queue. The tests stop and start the real servers,
//! so they run one at a time, and need the services started by scripts/services.sh.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use mupdate_worker::config::{QueueType, Settings};
use serde_json::Value;
use support::binary::BinaryWorker;
use support::load::Load;
use support::*;

const N: usize = 200;
/// Long enough for a full load after a fault, on 2 cores.
const SETTLE: Duration = Duration::from_secs(120);

fn summary(name: &str, replies: &HashMap<String, Vec<Value>>) -> (usize, usize) {
    let total: usize = replies.values().map(Vec::len).sum();
    println!(
        "{name}: N={N}, requests answered={}, replies={total}, duplicates={}",
        replies.len(),
        total - replies.len()
    );
    (replies.len(), total)
}

/// Every request answered correctly, every update in the engine, the queue empty.
async fn assert_complete(load: &Load, replies: &HashMap<String, Vec<Value>>, request_queue: &str) {
    assert_eq!(replies.len(), N, "every request answered");
    load.check_replies(replies);
    load.refresh().await;
    load.check_engine(load.requests.keys()).await;
    assert_eq!(
        queue_counts(request_queue).await.unwrap().0,
        0,
        "nothing left queued"
    );
}

/// N requests through a worker on `settings`; `fault` runs once some are answered.
/// Then every request has its correct reply, every update is in the engine and
/// nothing is left queued.
async fn survives<F: std::future::Future<Output = ()>>(name: &str, settings: Settings, fault: F) {
    // wait_for keeps requests in flight long enough for the fault to find some.
    let load = Load::new(N, true).await;
    let worker = Worker::start_with(settings).await;
    load.publish(worker.request_queue()).await;
    let before = load.wait_for_replies(10, TIMEOUT).await;
    println!("{name}: fault after {before} replies");
    fault.await;
    let replies = load.collect(SETTLE).await;
    summary(name, &replies);
    let queue = worker.request_queue().to_owned();
    let settings = worker.halt().await;
    assert_complete(&load, &replies, &queue).await;
    delete_topology(&settings).await;
    load.cleanup().await;
}

#[tokio::test]
async fn broker_connections_closed_mid_stream_lose_nothing() {
    let _servers = servers_lock().await;
    let fault = async { rabbitmqctl(&["close_all_connections", "fault test"]) };
    survives("close_all_connections", settings(), fault).await;
}

#[tokio::test]
async fn a_broker_restart_mid_stream_loses_nothing() {
    let _servers = servers_lock().await;
    let fault = async {
        rabbitmqctl(&["stop_app"]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    };
    survives("stop_app/start_app", settings(), fault).await;
}

#[tokio::test]
async fn an_engine_outage_mid_stream_loses_nothing() {
    let _servers = servers_lock().await;
    let mut settings = settings();
    settings.storage.retry_max_delay_ms = 1000;
    // The pause hands held requests back to the queue once the engine has been
    // unavailable 2 s: the outage outlasts that, however fast the engine starts again.
    // (`max_hold_ms` no longer does during an outage: each hold would cost a delivery
    // attempt.)
    settings.worker.pause_after_ms = 2000;
    // Fewer held than the load (200), so that requests reach the worker during the
    // outage: with all of them held at once (prefetch 256), every call was already at
    // the engine, which answered them while stopping, and none had to be handed back.
    settings.amqp.prefetch = 64;
    let listen = format!("127.0.0.1:{}", free_port());
    settings.metrics.listen = listen.clone();
    let fault = async {
        services(&["stop", "engine"]);
        tokio::time::sleep(Duration::from_secs(5)).await;
        services(&["start", "engine"]);
        let requeued = metric(&listen, "mupdate_requests_requeued_total").await;
        println!("engine outage: {requeued} held requests requeued");
        assert!(
            requeued > 0.0,
            "requests held through the outage were requeued"
        );
    };
    survives("engine outage", settings, fault).await;
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_leaves_the_rest_queued() {
    let _servers = servers_lock().await;
    // wait_for keeps requests in flight long enough for the signal to find some.
    let load = Load::new(N, true).await;
    let mut settings = settings();
    settings.amqp.prefetch = 16;
    let mut child = BinaryWorker::start(&settings);
    let queue = settings.amqp.request_queue.clone();
    wait_consumers(&queue, 1).await;
    load.publish(&queue).await;
    load.wait_for_replies(20, TIMEOUT).await;
    child.signal("-TERM");
    let status = child.exit_within(TIMEOUT).await.expect("exits in time");
    assert_eq!(status.code(), Some(0));

    let replied = load.replies_waiting().await as usize;
    let queued = queue_counts(&queue).await.unwrap().0 as usize;
    println!("SIGTERM: N={N}, replied={replied}, still queued={queued}");
    assert!(queued > 0, "the signal came mid-stream");
    assert_eq!(
        replied + queued,
        N,
        "each request either replied once or still queued"
    );
    let first = load.collect(Duration::from_secs(5)).await;
    assert_eq!(first.len(), replied, "no duplicate replies");
    load.check_replies(&first);

    // A new worker finishes the rest.
    let worker = Worker::start_with(settings).await;
    let rest = load.collect(SETTLE).await;
    let mut replies = first;
    replies.extend(rest);
    summary("SIGTERM then restart", &replies);
    let settings = worker.halt().await;
    assert_complete(&load, &replies, &queue).await;
    delete_topology(&settings).await;
    load.cleanup().await;
}

#[tokio::test]
async fn sigkill_of_one_of_two_workers_leaves_the_other_to_finish_everything() {
    let _servers = servers_lock().await;
    let load = Load::new(N, true).await;
    let mut settings = settings();
    settings.amqp.prefetch = 16;
    let mut victim = BinaryWorker::start(&settings);
    let mut survivor = BinaryWorker::start(&settings);
    let queue = settings.amqp.request_queue.clone();
    wait_consumers(&queue, 2).await;
    load.publish(&queue).await;
    load.wait_for_replies(20, TIMEOUT).await;
    victim.signal("-KILL");
    victim.wait_exit(TIMEOUT).await;
    let replies = load.collect(SETTLE).await;
    summary("SIGKILL of one of two workers", &replies);
    survivor.signal("-TERM");
    let status = survivor.exit_within(TIMEOUT).await.expect("exits in time");
    assert_eq!(status.code(), Some(0));
    assert_complete(&load, &replies, &queue).await;
    delete_topology(&settings).await;
    load.cleanup().await;
}

#[tokio::test]
async fn poison_messages_on_a_quorum_queue_end_in_the_dead_letter_queue() {
    let _servers = servers_lock().await;
    let mut settings = settings();
    settings.amqp.queue_type = QueueType::Quorum;
    settings.amqp.delivery_limit = 2;
    settings.amqp.dead_letter_exchange = fresh("mupdate.dlx");
    settings.amqp.dead_letter_queue = fresh("mupdate.dead");
    settings.amqp.reply_attempts = 3;
    // A default reply queue that already exists as a classic queue is kept as it is.
    let amqp = Amqp::open().await;
    amqp.channel
        .queue_declare(
            settings.amqp.reply_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let worker = Worker::start_with(settings).await;
    // On a cluster a classic queue dies with its node: with quorum requests, the
    // dead-letter queue the worker declares is a quorum queue too.
    let amqp_settings = &worker.settings.amqp;
    let types = queue_types(&[
        &amqp_settings.request_queue,
        &amqp_settings.dead_letter_queue,
        &amqp_settings.reply_queue,
    ]);
    assert_eq!(types[&amqp_settings.request_queue], "quorum");
    assert_eq!(types[&amqp_settings.dead_letter_queue], "quorum");
    assert_eq!(types[&amqp_settings.reply_queue], "classic");

    // One reply destination that doesn't exist: the request can't be answered at all.
    let props = BasicProperties::default()
        .with_reply_to(fresh("no-such-queue").as_str().into())
        .with_message_id("unroutable".into());
    publish(&amqp.channel, worker.request_queue(), b"{}", props).await;
    // One that always refuses: redelivered until the delivery limit dead-letters it.
    let full = fresh("mupdate.full");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    amqp.channel
        .queue_declare(full.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    let props = BasicProperties::default()
        .with_reply_to(full.as_str().into())
        .with_message_id("refused".into());
    publish(&amqp.channel, worker.request_queue(), b"{}", props).await;

    let dead = &worker.settings.amqp.dead_letter_queue;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while queue_counts(dead).await.map_or(0, |c| c.0) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both requests dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut ids = Vec::new();
    for m in next_messages(&amqp.channel, dead, 2).await {
        assert_eq!(m.data, b"{}", "dead-lettered as published");
        ids.push(m.properties.message_id().as_ref().unwrap().to_string());
    }
    ids.sort();
    assert_eq!(ids, ["refused", "unroutable"]);
    assert_eq!(queue_counts(worker.request_queue()).await.unwrap().0, 0);
    let settings = worker.settings.clone();
    worker.stop().await;
    delete_queues(&[&settings.amqp.dead_letter_queue, &full]).await;
    let _ = amqp
        .channel
        .exchange_delete(
            settings.amqp.dead_letter_exchange.as_str().into(),
            Default::default(),
        )
        .await;
    amqp.close().await;
}

#[tokio::test]
async fn readyz_turns_unready_while_the_engine_is_stopped() {
    let _servers = servers_lock().await;
    let mut settings = settings();
    let listen = format!("127.0.0.1:{}", free_port());
    settings.metrics.listen = listen.clone();
    let worker = Worker::start_with(settings).await;
    wait_readyz(&listen, 200).await;
    services(&["stop", "engine"]);
    wait_readyz(&listen, 503).await;
    services(&["start", "engine"]);
    wait_readyz(&listen, 200).await;
    worker.stop().await;
}
