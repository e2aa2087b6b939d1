//! SPEC sections 4 to 6 at their edges: request ids and AMQP properties at their size
//! limits, replies larger than the broker takes, an engine outage longer than the hold
//! limit on a quorum queue with a delivery limit, SIGTERM with the engine down, engine
//! calls that time out, and the default dead-letter topology. Each request ends replied,
//! dead-lettered or back in its queue: never lost, never held forever. Every test holds
//! `servers_lock()`: some stop the engine or lower the broker's limits, which the others
//! would see. Every wait is bounded, and what a test makes is deleted even when it fails.

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use mupdate_worker::config::{QueueType, Settings};
use serde_json::{Value, json};
use support::binary::BinaryWorker;
use support::cleanup::Cleanup;
use support::load::Load;
use support::*;

use support::proxy::Proxy;

/// Long enough for a full load after an engine restart, on 2 cores.
const SETTLE: Duration = Duration::from_secs(120);
const SERVICES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
/// RabbitMQ's own default `max_message_size` (128 MiB).
const BROKER_MAX_MESSAGE_SIZE: u64 = 134_217_728;

#[tokio::test]
async fn long_request_ids_are_answered_in_full_with_a_correlation_id_that_fits() {
    let _servers = servers_lock().await;
    let col = Collection::create(&[("a", json!({"n": 0}))]).await;
    let settings = settings();
    let mut cleanup = Cleanup::of(&settings);
    let replies = cleanup.queue(fresh("guarantees.replies"));
    let worker = Worker::start_with(settings).await;
    let amqp = Amqp::open().await;
    durable_queue(&amqp, &replies).await;

    // (requestId, the request's correlation_id property, the reply's correlation_id)
    let fits = format!("a{}", "1".repeat(254));
    let cases = [
        (fits.clone(), None, fits),
        ("b".repeat(256), None, "b".repeat(255)),
        ("c".repeat(1000), None, "c".repeat(255)),
        // 400 bytes: cut at a character boundary, 127 characters (254 bytes).
        ("é".repeat(200), None, "é".repeat(127)),
        (
            "d".repeat(1000),
            Some("short-correlation-id"),
            "short-correlation-id".to_owned(),
        ),
    ];
    for (i, (id, correlation_id, _)) in cases.iter().enumerate() {
        let mut envelope = col.envelope(json!([{"_id": "a", "body": {"n": i}}]));
        envelope["requestId"] = json!(id);
        envelope["retryOnConflict"] = json!(10);
        let mut props = BasicProperties::default().with_reply_to(replies.as_str().into());
        if let Some(c) = correlation_id {
            props = props.with_correlation_id((*c).into());
        }
        publish(
            &amqp.channel,
            worker.request_queue(),
            &serde_json::to_vec(&envelope).unwrap(),
            props,
        )
        .await;
    }
    let mut got = replies_by_id(&amqp, &replies, cases.len()).await;
    for (id, _, correlation_id) in &cases {
        let reply = got
            .remove(id)
            .unwrap_or_else(|| panic!("no reply to the {}-byte id", id.len()));
        let body = body(&reply);
        assert_eq!(body["status"], 200, "{body}");
        assert_eq!(
            header_text(&reply, "requestId").as_deref(),
            Some(id.as_str()),
            "header requestId of the {}-byte id",
            id.len()
        );
        assert_eq!(
            reply
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str()),
            Some(correlation_id.as_str()),
            "correlation_id of the {}-byte id",
            id.len()
        );
    }
    assert_still_answers(&worker).await;
    let settings = halt_settled(worker).await;
    assert_eq!(ready(&settings.amqp.dead_letter_queue).await, 0);
    amqp.close().await;
}

#[tokio::test]
async fn a_request_id_larger_than_an_amqp_frame_still_gets_its_reply() {
    let _servers = servers_lock().await;
    // 200 KB: more than one frame (RabbitMQ's frame_max is 128 KiB) can carry in a
    // header; the body can.
    let col = Collection::create(&[("a", json!({"n": 0}))]).await;
    let mut settings = settings();
    let listen = with_metrics(&mut settings);
    let mut cleanup = Cleanup::of(&settings);
    let replies = cleanup.queue(fresh("guarantees.replies"));
    let worker = Worker::start_with(settings).await;
    let amqp = Amqp::open().await;
    durable_queue(&amqp, &replies).await;
    let id = "f".repeat(200_000);
    let mut envelope = col.envelope(json!([{"_id": "a", "body": {"n": 1}}]));
    envelope["requestId"] = json!(id);
    let props = BasicProperties::default().with_reply_to(replies.as_str().into());
    let request = serde_json::to_vec(&envelope).unwrap();
    publish(&amqp.channel, worker.request_queue(), &request, props).await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while ready(&replies).await == 0 {
        if tokio::time::Instant::now() >= deadline {
            let reconnects = metric(&listen, "mupdate_broker_reconnects_total").await;
            panic!("no reply in {TIMEOUT:?}; broker reconnects meanwhile: {reconnects}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reply = next_message(&amqp.channel, &replies).await;
    let body = body(&reply);
    assert_eq!(body["status"], 200);
    assert_eq!(body["requestId"], json!(id), "the full id in the body");
    assert_eq!(
        reply
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some(&id[..255])
    );
    assert_eq!(
        metric(&listen, "mupdate_broker_reconnects_total").await,
        0.0
    );
    assert_still_answers(&worker).await;
    halt_settled(worker).await;
    amqp.close().await;
}

#[tokio::test]
async fn amqp_properties_at_their_limits_are_each_answered_or_dead_lettered() {
    let _servers = servers_lock().await;
    let docs: Vec<(String, Value)> = (0..10)
        .map(|i| (format!("d{i}"), json!({"n": 0})))
        .collect();
    let refs: Vec<(&str, Value)> = docs
        .iter()
        .map(|(id, v)| (id.as_str(), v.clone()))
        .collect();
    let col = Collection::create(&refs).await;
    let settings = settings();
    let mut cleanup = Cleanup::of(&settings);
    let replies = cleanup.queue(fresh("guarantees.replies"));
    // As long as a queue name can be.
    let long_queue = cleanup.queue(at_255(fresh("guarantees.long-replies"), 'q'));
    let worker = Worker::start_with(settings).await;
    let amqp = Amqp::open().await;
    durable_queue(&amqp, &replies).await;
    durable_queue(&amqp, &long_queue).await;

    let envelope = |i: usize, id: Option<&str>| {
        let mut e = col.envelope(json!([{"_id": format!("d{i}"), "body": {"n": 1}}]));
        if let Some(id) = id {
            e["requestId"] = json!(id);
        }
        serde_json::to_vec(&e).unwrap()
    };
    let s255 = |c: char| c.to_string().repeat(255);
    let to_replies = || BasicProperties::default().with_reply_to(replies.as_str().into());
    let mut headers = FieldTable::default();
    for i in 0..1000 {
        headers.insert(
            format!("x-header-{i:04}").into(),
            AMQPValue::LongString("h".repeat(100).into()),
        );
    }
    // (the requestId the reply must carry, body, properties), each answered to `replies`
    let answered = [
        (
            s255('m'),
            envelope(0, None),
            to_replies().with_message_id(s255('m').into()),
        ),
        (
            s255('k'),
            envelope(1, None),
            to_replies().with_correlation_id(s255('k').into()),
        ),
        (
            "every-property".to_owned(),
            envelope(2, Some("every-property")),
            to_replies()
                .with_message_id(s255('m').into())
                .with_correlation_id(s255('k').into())
                .with_type(s255('t').into())
                .with_app_id(s255('a').into())
                .with_content_type(s255('c').into())
                .with_content_encoding(s255('e').into())
                .with_cluster_id(s255('i').into())
                .with_user_id("guest".into())
                // RabbitMQ's largest per-message TTL.
                .with_expiration("4294967295".into())
                .with_priority(255)
                .with_timestamp(u64::MAX)
                .with_delivery_mode(2),
        ),
        (
            "big-headers".to_owned(),
            envelope(3, Some("big-headers")),
            to_replies().with_headers(headers),
        ),
    ];
    for (_, body, props) in &answered {
        publish(&amqp.channel, worker.request_queue(), body, props.clone()).await;
    }
    let to_long_queue = BasicProperties::default().with_reply_to(long_queue.as_str().into());
    let long_reply_to = envelope(4, Some("long-reply-to"));
    publish(
        &amqp.channel,
        worker.request_queue(),
        &long_reply_to,
        to_long_queue,
    )
    .await;
    // 255 bytes naming no queue: can't be answered, so dead-lettered.
    let nowhere = at_255(fresh("guarantees.nowhere"), 'n');
    let unroutable = envelope(5, Some("unroutable"));
    let props = BasicProperties::default()
        .with_reply_to(nowhere.as_str().into())
        .with_message_id("unroutable".into());
    publish(&amqp.channel, worker.request_queue(), &unroutable, props).await;
    // Direct reply-to addresses no channel can own: the reply is lost, the request
    // must still be settled.
    let garbage = [
        "amq.rabbitmq.reply-to.garbage".to_owned(),
        at_255("amq.rabbitmq.reply-to.".to_owned(), 'g'),
    ];
    for (i, to) in garbage.iter().enumerate() {
        let props = BasicProperties::default()
            .with_reply_to(to.as_str().into())
            .with_message_id(format!("garbage-{i}").into());
        let body = envelope(6 + i, Some(&format!("garbage-{i}")));
        publish(&amqp.channel, worker.request_queue(), &body, props).await;
    }

    let mut got = replies_by_id(&amqp, &replies, answered.len()).await;
    for (id, _, _) in &answered {
        let reply = got
            .remove(id)
            .unwrap_or_else(|| panic!("no reply to {}", &id[..id.len().min(20)]));
        assert_eq!(body(&reply)["status"], 200, "{}", body(&reply));
        assert_eq!(
            reply
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str()),
            Some(id.as_str())
        );
    }
    let reply = next_message(&amqp.channel, &long_queue).await;
    assert_eq!(body(&reply)["requestId"], "long-reply-to");
    assert_eq!(body(&reply)["status"], 200);
    let dead = worker.settings.amqp.dead_letter_queue.clone();
    wait_ready(&dead, 1).await;
    assert_still_answers(&worker).await;
    halt_settled(worker).await;

    // The unroutable request, as published; the garbage direct reply-to ones either
    // acked (their reply lost) or dead-lettered too.
    let count = ready(&dead).await as usize;
    assert!((1..=3).contains(&count), "{count} dead-lettered");
    let mut ids = Vec::new();
    for m in next_messages(&amqp.channel, &dead, count).await {
        let id = m.properties.message_id().as_ref().unwrap().to_string();
        if id == "unroutable" {
            assert_eq!(m.data, unroutable, "dead-lettered untouched");
            assert_eq!(
                m.properties.reply_to().as_ref().map(|r| r.as_str()),
                Some(nowhere.as_str())
            );
        }
        ids.push(id);
    }
    assert!(ids.iter().any(|id| id == "unroutable"), "{ids:?}");
    assert!(
        ids.iter()
            .all(|id| id == "unroutable" || id.starts_with("garbage-")),
        "{ids:?}"
    );
    amqp.close().await;
}

#[tokio::test]
async fn a_reply_larger_than_the_broker_takes_is_sent_again_without_sources() {
    let _servers = servers_lock().await;
    // Each ~300 KiB: five of them make a reply of ~1.5 MiB with their _source.
    let blob = "x".repeat(300 * 1024);
    let mut docs: Vec<(String, Value)> = (0..10)
        .map(|i| (format!("big{i}"), json!({"blob": blob, "n": 0})))
        .collect();
    docs.extend((0..4).map(|i| (format!("small{i}"), json!({"n": 0}))));
    let refs: Vec<(&str, Value)> = docs
        .iter()
        .map(|(id, v)| (id.as_str(), v.clone()))
        .collect();
    let col = Collection::create(&refs).await;
    // Before the worker starts: channels read the limit when they open.
    let _limit = MaxMessageSize::set(1_048_576);
    let mut settings = settings();
    let listen = with_metrics(&mut settings);
    let mut cleanup = Cleanup::of(&settings);
    let replies = cleanup.queue(fresh("guarantees.replies"));
    let worker = Worker::start_with(settings).await;
    let amqp = Amqp::open().await;
    durable_queue(&amqp, &replies).await;

    let request = |id: &str, docs: Value| {
        let mut e = col.envelope(docs);
        e["requestId"] = json!(id);
        serde_json::to_vec(&e).unwrap()
    };
    let big: Vec<Value> = (0..5)
        .map(|i| json!({"_id": format!("big{i}"), "body": {"n": 1}}))
        .collect();
    // Five more, and a missing document: a 206 whose failed document shrinks to its _id.
    let mut partial: Vec<Value> = (5..10)
        .map(|i| json!({"_id": format!("big{i}"), "body": {"n": 1}}))
        .collect();
    partial.push(json!({"_id": "missing", "body": {"pad": "p".repeat(1000)}}));
    let mut bodies = vec![
        request("big", json!(big)),
        request("big-partial", json!(partial)),
    ];
    for i in 0..4 {
        let small = json!([{"_id": format!("small{i}"), "body": {"n": 1}}]);
        bodies.push(request(&format!("small-{i}"), small));
    }
    for body in &bodies {
        let props = BasicProperties::default().with_reply_to(replies.as_str().into());
        publish(&amqp.channel, worker.request_queue(), body, props).await;
    }
    let got = replies_by_id(&amqp, &replies, bodies.len()).await;

    let reply = body(&got["big"]);
    assert_eq!(reply["status"], 200, "{}", brief(&reply));
    assert_eq!(reply["error"], Value::Null);
    assert_eq!(reply["result"]["total"], 5);
    for (i, hit) in reply["result"]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(hit["_id"], format!("big{i}"));
        assert_eq!(
            (&hit["status"], &hit["result"]),
            (&json!(200), &json!("updated"))
        );
        assert!(hit.get("_source").is_none(), "no _source: {}", brief(hit));
    }
    let reply = body(&got["big-partial"]);
    assert_eq!(reply["status"], 206, "{}", brief(&reply));
    assert_eq!(reply["error"]["count"], 1);
    let errors = reply["error"]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["document"], json!({"_id": "missing"}));
    assert_eq!(errors[0]["status"], 404);
    let hits = reply["result"]["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 5);
    assert!(hits.iter().all(|h| h.get("_source").is_none()));
    for i in 0..4 {
        let reply = body(&got[&format!("small-{i}")]);
        assert_eq!(reply["status"], 200, "{reply}");
        assert_eq!(reply["result"]["hits"][0]["_source"]["n"], 1, "{reply}");
    }
    for i in 0..10 {
        assert_eq!(
            col.get(&format!("big{i}")).await.0["n"],
            1,
            "big{i} updated"
        );
    }
    assert_eq!(
        metric(&listen, "mupdate_broker_reconnects_total").await,
        0.0
    );
    assert_still_answers(&worker).await;
    halt_settled(worker).await;
    amqp.close().await;
}

#[tokio::test]
async fn an_engine_outage_longer_than_the_hold_limit_dead_letters_nothing_on_a_quorum_queue() {
    const N: usize = 50;
    let _servers = servers_lock().await;
    let load = Load::new(N, true).await;
    let mut settings = settings();
    settings.amqp.queue_type = QueueType::Quorum;
    settings.amqp.delivery_limit = 2;
    settings.worker.pause_after_ms = 2000;
    settings.worker.max_hold_ms = 3000;
    settings.storage.retry_max_delay_ms = 1000;
    let listen = with_metrics(&mut settings);
    let mut cleanup = Cleanup::of(&settings);
    cleanup.queue(load.reply_queue.clone());
    let worker = Worker::start_with(settings).await;
    let queue = worker.request_queue().to_owned();
    wait_readyz(&listen, 200).await;

    let engine = EngineStopped::stop().await;
    let outage = tokio::time::Instant::now();
    load.publish(&queue).await;
    wait_metric(&listen, "mupdate_consumption_paused", 1.0).await;
    assert_eq!(readyz(&listen).await, 503, "unready while paused");
    // Several hold limits long: each hold would cost a delivery attempt, and the
    // delivery limit would then dead-letter valid requests.
    tokio::time::sleep_until(outage + Duration::from_secs(15)).await;
    assert_eq!(metric(&listen, "mupdate_consumption_paused").await, 1.0);
    assert_eq!(
        queue_counts(&queue).await,
        Some((N as u32, 0)),
        "paused: every request back in the queue, no consumer"
    );
    engine.start().await;

    let replies = load.collect(SETTLE).await;
    let total: usize = replies.values().map(Vec::len).sum();
    println!(
        "outage on a quorum queue: {} answered, {total} replies",
        replies.len()
    );
    assert_eq!(replies.len(), N, "every request answered");
    load.check_replies(&replies);
    load.refresh().await;
    load.check_engine(load.requests.keys()).await;
    let pauses = metric(&listen, "mupdate_pauses_total").await;
    assert!(pauses >= 1.0, "{pauses} pauses");
    assert_eq!(metric(&listen, "mupdate_consumption_paused").await, 0.0);
    wait_readyz(&listen, 200).await;
    let settings = halt_settled(worker).await;
    assert_eq!(
        ready(&settings.amqp.dead_letter_queue).await,
        0,
        "nothing dead-lettered"
    );
}

#[tokio::test]
async fn sigterm_with_the_engine_down_exits_0_within_the_grace_and_loses_nothing() {
    const N: usize = 20;
    let _servers = servers_lock().await;
    let load = Load::new(N, false).await;
    let settings = settings();
    let mut cleanup = Cleanup::of(&settings);
    cleanup.queue(load.reply_queue.clone());
    let queue = settings.amqp.request_queue.clone();
    let mut binary = BinaryWorker::spawn(
        worker_command(&settings)
            .env("MUPDATE__WORKER__SHUTDOWN_TIMEOUT_MS", "3000")
            // Held, not paused, when the signal comes.
            .env("MUPDATE__WORKER__PAUSE_AFTER_MS", "600000")
            // All of them held: no prefetch chosen by size (it starts at 4).
            .env("MUPDATE__AMQP__MAX_HELD_BYTES", "0"),
    );
    wait_consumers(&queue, 1).await;
    let engine = EngineStopped::stop().await;
    load.publish(&queue).await;
    wait_ready(&queue, 0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    binary.signal("-TERM");
    let started = tokio::time::Instant::now();
    let status = binary
        .exit_within(Duration::from_secs(5))
        .await
        .expect("exits within the 3 s grace and 2 s");
    println!(
        "SIGTERM with the engine down: exit {status} after {:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(0));
    wait_ready(&queue, N as u32).await;
    assert_eq!(
        load.replies_waiting().await,
        0,
        "no reply while the engine was down"
    );

    engine.start().await;
    let worker = Worker::start_with(settings).await;
    let replies = load.collect(SETTLE).await;
    assert_eq!(replies.len(), N, "every request answered");
    assert!(replies.values().all(|r| r.len() == 1), "each answered once");
    load.check_replies(&replies);
    load.refresh().await;
    load.check_engine(load.requests.keys()).await;
    halt_settled(worker).await;
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once() {
    const N: usize = 10;
    let _servers = servers_lock().await;
    let load = Load::new(N, false).await;
    let settings = settings();
    let mut cleanup = Cleanup::of(&settings);
    cleanup.queue(load.reply_queue.clone());
    let queue = settings.amqp.request_queue.clone();
    let mut binary = BinaryWorker::spawn(
        worker_command(&settings)
            .env("MUPDATE__WORKER__SHUTDOWN_TIMEOUT_MS", "60000")
            .env("MUPDATE__WORKER__PAUSE_AFTER_MS", "600000")
            // All of them held: no prefetch chosen by size (it starts at 4).
            .env("MUPDATE__AMQP__MAX_HELD_BYTES", "0"),
    );
    wait_consumers(&queue, 1).await;
    let engine = EngineStopped::stop().await;
    load.publish(&queue).await;
    wait_ready(&queue, 0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    binary.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        binary.running(),
        "the first signal waits for the 60 s grace"
    );
    binary.signal("-TERM");
    let status = binary
        .exit_within(Duration::from_secs(1))
        .await
        .expect("the second signal exits at once");
    println!("second SIGTERM: exit {status}");
    // Its unacked requests went back to the queue with its connection.
    wait_ready(&queue, N as u32).await;

    engine.start().await;
    let worker = Worker::start_with(settings).await;
    let replies = load.collect(SETTLE).await;
    assert_eq!(replies.len(), N, "every request answered");
    load.check_replies(&replies);
    halt_settled(worker).await;
}

/// The default: a write past `storage.timeout_ms` is awaited, not sent again (a resend
/// could be overtaken by the first call landing late).
#[tokio::test]
async fn a_wait_for_update_through_a_slow_call_is_awaited_updated_and_searchable() {
    resent_after_a_timeout(None, false).await;
}

#[tokio::test]
async fn a_wait_for_update_sent_again_after_a_timeout_is_updated_and_searchable() {
    resent_after_a_timeout(None, true).await;
}

#[tokio::test]
async fn an_update_sent_again_after_a_timeout_without_retry_on_conflict_is_not_a_409() {
    resent_after_a_timeout(Some(0), true).await;
}

/// A wait_for update whose first bulk call times out (its response held back by the
/// proxy, the update applied). Awaited (`give_up` false: the default write timeout), or
/// given up and sent again (`storage.write_timeout_ms` = `timeout_ms`): either way the
/// reply must answer `updated`, not `noop` or a 409, and still mean searchable.
async fn resent_after_a_timeout(retry_on_conflict: Option<u64>, give_up: bool) {
    let _servers = servers_lock().await;
    // An explicit refresh interval: no search-idle shard, so a search doesn't refresh,
    // and a wait_for call outlasts the 1 s timeout unless a refresh comes first.
    let col = Collection::create_with(
        &[("a", json!({"v": "old"})), ("warm", json!({"n": 0}))],
        json!({"refresh_interval": "3s"}),
    )
    .await;
    let proxy = Proxy::start(&ES_URL).await;
    let mut settings = settings();
    settings.storage.url = proxy.url();
    settings.storage.timeout_ms = 1000;
    if give_up {
        settings.storage.write_timeout_ms = 1000;
    }
    settings.storage.retry_max_delay_ms = 200;
    let listen = with_metrics(&mut settings);
    let _cleanup = Cleanup::of(&settings);
    let worker = Worker::start_with(settings).await;
    // The target is now known to exist: only the bulk call meets the latency.
    let warm = call(
        &worker,
        &col.envelope(json!([{"_id": "warm", "body": {"n": 1}}])),
    )
    .await;
    assert_eq!(warm["status"], 200, "{warm}");

    let value = fresh("new");
    let mut envelope = col.envelope(json!([{"_id": "a", "body": {"v": value}}]));
    envelope["refresh"] = json!("wait_for");
    if let Some(n) = retry_on_conflict {
        envelope["retryOnConflict"] = json!(n);
    }
    let retries = metric(&listen, "mupdate_engine_retries_total").await;
    let slow = metric(&listen, "mupdate_engine_slow_writes_total").await;
    proxy.set_latency(Duration::ZERO, Duration::from_millis(2500));
    let (reply, ()) = tokio::join!(call(&worker, &envelope), async {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        proxy.set_latency(Duration::ZERO, Duration::ZERO);
    });
    let found: Value = http()
        .post(format!("{ES_URL}/{}/_search", path(&col.physical)))
        .json(&json!({"query": {"term": {"v.keyword": value}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let resent = metric(&listen, "mupdate_engine_retries_total").await > retries;
    assert_eq!(resent, give_up, "sent again only when given up");
    if !give_up {
        // Given up at the same moment, the call may end before it is counted as slow.
        assert!(
            metric(&listen, "mupdate_engine_slow_writes_total").await > slow,
            "the first call was not answered in time"
        );
    }
    assert_eq!(reply["status"], 200, "{reply}");
    let hit = &reply["result"]["hits"][0];
    assert_eq!(hit["_id"], "a");
    assert_eq!(hit["status"], 200, "{reply}");
    assert_eq!(hit["result"], "updated", "{reply}");
    assert_eq!(
        found["hits"]["total"]["value"], 1,
        "searchable once replied: {found}"
    );
    assert_eq!(col.get("a").await.0["v"], json!(value));
    halt_settled(worker).await;
}

#[tokio::test]
async fn the_default_configuration_dead_letters_an_unroutable_request_untouched() {
    let _servers = servers_lock().await;
    let defaults = Settings::defaults();
    assert_eq!(defaults.amqp.dead_letter_exchange, "mupdate.dlx");
    assert_eq!(defaults.amqp.dead_letter_queue, "mupdate.requests.dead");
    // The defaults, on names of this test's own.
    let mut settings = defaults;
    settings.amqp.request_queue = fresh("mupdate.requests");
    settings.amqp.reply_queue = fresh("mupdate.replies");
    settings.amqp.dead_letter_exchange = fresh("mupdate.dlx");
    settings.amqp.dead_letter_queue = fresh("mupdate.requests.dead");
    let listen = with_metrics(&mut settings);
    let _cleanup = Cleanup::of(&settings);
    let worker = Worker::start_with(settings).await;

    let amqp = Amqp::open().await;
    let body = br#"{"index":"a","collection":"b","controller":"document","action":"mUpdate","body":{"documents":[]}}"#;
    let mut headers = FieldTable::default();
    headers.insert("x-custom".into(), AMQPValue::LongString("kept".into()));
    let nowhere = fresh("no-such-queue");
    let props = BasicProperties::default()
        .with_reply_to(nowhere.as_str().into())
        .with_message_id("m-1".into())
        .with_correlation_id("c-1".into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    publish(&amqp.channel, worker.request_queue(), body, props).await;

    let dead = worker.settings.amqp.dead_letter_queue.clone();
    wait_ready(&dead, 1).await;
    let m = next_message(&amqp.channel, &dead).await;
    assert_eq!(m.data, body, "the body untouched");
    let p = &m.properties;
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "m-1");
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "c-1");
    assert_eq!(p.reply_to().as_ref().unwrap().as_str(), nowhere);
    assert_eq!(header_text(&m, "x-custom").as_deref(), Some("kept"));
    assert_eq!(
        metric(
            &listen,
            "mupdate_requests_dead_lettered_total{reason=\"unroutable\"}"
        )
        .await,
        1.0
    );
    halt_settled(worker).await;
    amqp.close().await;
}

// ---------------------------------------------------------------- helpers

/// Serves metrics on a free port; returns its address.
fn with_metrics(s: &mut Settings) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    s.metrics.listen = listen.clone();
    listen
}

/// `name` padded with `fill` (or cut) to 255 bytes, the longest AMQP short string.
fn at_255(mut name: String, fill: char) -> String {
    while name.len() < 255 {
        name.push(fill);
    }
    name.truncate(255);
    name
}

async fn durable_queue(amqp: &Amqp, name: &str) {
    amqp.channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

fn body(delivery: &Delivery) -> Value {
    serde_json::from_slice(&delivery.data).unwrap()
}

/// A reply without its long strings, for assertion messages.
fn brief(value: &Value) -> String {
    let text = value.to_string();
    text.chars().take(2000).collect()
}

/// A header's string value (long or short string).
fn header_text(delivery: &Delivery, key: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The next `n` messages of `queue`, by their body's `requestId`. One call per queue
/// and channel: its consumer stays.
async fn replies_by_id(amqp: &Amqp, queue: &str, n: usize) -> HashMap<String, Delivery> {
    next_messages(&amqp.channel, queue, n)
        .await
        .into_iter()
        .map(|d| (body(&d)["requestId"].as_str().unwrap().to_owned(), d))
        .collect()
}

/// Ready messages of a queue (0 when it doesn't exist).
async fn ready(queue: &str) -> u32 {
    queue_counts(queue).await.map_or(0, |(ready, _)| ready)
}

/// Waits until `queue` holds exactly `n` ready messages.
async fn wait_ready(queue: &str, n: u32) {
    wait_equal(&format!("{queue}: ready"), n, || ready(queue)).await;
}

/// A valid request over direct reply-to is still answered.
async fn assert_still_answers(worker: &Worker) {
    let envelope = json!({"index": "a", "collection": "b", "controller": "document",
                          "action": "mUpdate", "body": {"documents": []}});
    let reply = call(worker, &envelope).await;
    assert_eq!(reply["status"], 200, "{reply}");
}

/// Stops the worker, then checks it settled every request it took: unacked ones would
/// be back in the request queue once its channel closed.
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

/// The engine, stopped; started again when dropped if the test didn't.
struct EngineStopped {
    started: bool,
}

impl EngineStopped {
    async fn stop() -> Self {
        // Off the runtime's thread: an in-process worker keeps running meanwhile.
        tokio::task::spawn_blocking(|| services(&["stop", "engine"]))
            .await
            .unwrap();
        let stopped = EngineStopped { started: false };
        // services.sh stops only an engine whose pid file is in its state directory.
        assert!(
            http().get(ES_URL.to_string()).send().await.is_err(),
            "the engine still answers: set MUPDATE_SERVICES_DIR to the .services \
             directory of the checkout that started it"
        );
        stopped
    }

    async fn start(mut self) {
        tokio::task::spawn_blocking(|| services(&["start", "engine"]))
            .await
            .unwrap();
        self.started = true;
    }
}

impl Drop for EngineStopped {
    fn drop(&mut self) {
        if !self.started {
            let _ = Command::new(SERVICES).args(["start", "engine"]).status();
        }
    }
}

/// RabbitMQ's `max_message_size`, lowered until dropped.
struct MaxMessageSize;

impl MaxMessageSize {
    fn set(bytes: u64) -> Self {
        let set = format!("application:set_env(rabbit, max_message_size, {bytes}).");
        rabbitmqctl(&["eval", &set]);
        MaxMessageSize
    }
}

impl Drop for MaxMessageSize {
    fn drop(&mut self) {
        let restore =
            format!("application:set_env(rabbit, max_message_size, {BROKER_MAX_MESSAGE_SIZE}).");
        let restored = Command::new(SERVICES)
            .args(["rabbitmqctl", "-q", "eval", &restore])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !restored {
            eprintln!("could not restore RabbitMQ's max_message_size: run `{restore}`");
        }
    }
}
