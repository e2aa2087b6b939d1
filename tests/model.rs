//! What the real servers do, in the cases the worker's guarantees rest on: redelivery
//! flags, publisher confirms and returns as lapin reports them, refusals, consumers
//! cancelled by the broker, channels it closes, memory alarms, the delivery limit of a
//! quorum queue, and the engine's versions, no-ops and conflicts. Each test
//! states one behaviour a model of these servers (the deterministic simulation of the
//! delivery lifecycle) must copy, and shows it on the servers of `scripts/services.sh`.

mod support;

use std::collections::BTreeSet;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use serde_json::{Value, json};
use support::*;

/// The header numbering the test's publishes.
const NUMBER: &str = "x-test-number";

fn numbered(n: u64) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(NUMBER.into(), AMQPValue::LongLongInt(n as i64));
    BasicProperties::default().with_headers(headers)
}

fn number_of(properties: &BasicProperties) -> Option<u64> {
    match properties.headers().as_ref()?.inner().get(NUMBER)? {
        AMQPValue::LongLongInt(n) => Some(*n as u64),
        _ => None,
    }
}

/// Publishes `body` (numbered `n`) to `routing_key` on the default exchange, mandatory:
/// its confirm, to await.
async fn mandatory(
    channel: &Channel,
    routing_key: &str,
    body: &[u8],
    n: u64,
) -> lapin::PublisherConfirm {
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    channel
        .basic_publish("".into(), routing_key.into(), options, body, numbered(n))
        .await
        .unwrap()
}

async fn declare(channel: &Channel, queue: &str, arguments: FieldTable) {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .unwrap();
}

async fn consumer(channel: &Channel, queue: &str) -> lapin::Consumer {
    channel
        .basic_consume(
            queue.into(),
            fresh("model").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
}

async fn next(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(TIMEOUT, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("the consumer is open")
        .expect("a delivery")
}

/// Sends NDJSON `lines` to the collection's `_bulk` endpoint: the engine's answer.
async fn post_bulk(col: &Collection, lines: &[Value]) -> Value {
    let mut body = String::new();
    for line in lines {
        body.push_str(&line.to_string());
        body.push('\n');
    }
    http()
        .post(format!("{}/{}/_bulk", col.es, path(&col.physical)))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A first delivery has `redelivered` false; once handed back (nacked with requeue, or
/// left unacked by a channel that closes) it comes again with `redelivered` true, and
/// its bytes and properties unchanged.
#[tokio::test]
async fn a_delivery_handed_back_comes_again_flagged_redelivered() {
    let queue = fresh("model-redelivered");
    let amqp = Amqp::open().await;
    declare(&amqp.channel, &queue, FieldTable::default()).await;
    publish(&amqp.channel, &queue, b"one", numbered(1)).await;

    let first = amqp.connection.create_channel().await.unwrap();
    let mut consuming = consumer(&first, &queue).await;
    let delivery = next(&mut consuming).await;
    assert!(!delivery.redelivered, "a first delivery");
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    delivery.acker.nack(requeue).await.unwrap();
    let again = next(&mut consuming).await;
    assert!(again.redelivered, "after a nack with requeue");
    assert_eq!(
        (&*again.data, number_of(&again.properties)),
        (&b"one"[..], Some(1))
    );

    // Left unacked by a channel that closes.
    first.close(200, "bye".into()).await.unwrap();
    let second = amqp.connection.create_channel().await.unwrap();
    let mut consuming = consumer(&second, &queue).await;
    let again = next(&mut consuming).await;
    assert!(again.redelivered, "after its channel closed");
    again.acker.ack(Default::default()).await.unwrap();
    delete_queues(&[&queue]).await;
    amqp.close().await;
}

/// `basic.qos` (not global) sets the prefetch of the consumers a channel starts after it,
/// each its own: a consumer started with 1 holds at most one unacked delivery, one started
/// later on the same channel with 3 holds three more beside it (its own count, the first
/// one's unacked delivery not counted). The simulated broker serves each consumer up to
/// its own prefetch: how the worker's prefetch changes (a new consumer) admit more.
#[tokio::test]
async fn each_consumer_holds_up_to_the_prefetch_set_before_it_started() {
    let queue = fresh("model-prefetch");
    let amqp = Amqp::open().await;
    declare(&amqp.channel, &queue, FieldTable::default()).await;
    for n in 0..8 {
        publish(&amqp.channel, &queue, b"x", numbered(n)).await;
    }
    let channel = amqp.connection.create_channel().await.unwrap();
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut first = consumer(&channel, &queue).await;
    let one = next(&mut first).await;
    let more = tokio::time::timeout(std::time::Duration::from_millis(500), first.next()).await;
    assert!(more.is_err(), "the first consumer holds one: {more:?}");
    channel
        .basic_qos(3, BasicQosOptions::default())
        .await
        .unwrap();
    let mut second = consumer(&channel, &queue).await;
    for _ in 0..3 {
        next(&mut second).await;
    }
    let more = tokio::time::timeout(std::time::Duration::from_millis(500), second.next()).await;
    assert!(
        more.is_err(),
        "the second holds three beside the first's one: {more:?}"
    );
    let more = tokio::time::timeout(std::time::Duration::from_millis(300), first.next()).await;
    assert!(more.is_err(), "and the first still one: {more:?}");
    drop(one);
    delete_queues(&[&queue]).await;
    amqp.close().await;
}

/// A mandatory publish that reaches no queue is returned (`basic.return`, the message
/// with its properties) and then confirmed with an ack, never a nack: the confirm alone
/// does not say it was routed. lapin hands the returned message over with a confirm.
#[tokio::test]
async fn an_unroutable_mandatory_publish_is_returned_then_acked() {
    let amqp = Amqp::open().await;
    let nowhere = fresh("model-no-such-queue");
    let confirm = mandatory(&amqp.channel, &nowhere, b"lost", 7)
        .await
        .await
        .unwrap();
    let Confirmation::Ack(Some(returned)) = confirm else {
        panic!("expected an ack carrying the returned message, got {confirm:?}");
    };
    assert_eq!(returned.reply_code, 312, "NO_ROUTE");
    assert_eq!(number_of(&returned.properties), Some(7));
    assert_eq!(&*returned.data, b"lost");
    amqp.close().await;
}

/// Many publishes outstanding on one channel, every other one unroutable: every returned
/// message comes back (on some confirm of that channel), every confirm is an ack; but
/// which confirm a return is reported on is not always its own publish's. The model
/// reports returns the same way, so only what a returned message carries (the worker's
/// header) may say which publish it was.
#[tokio::test]
async fn returns_come_back_on_some_confirm_of_their_channel() {
    let queue = fresh("model-returns");
    let amqp = Amqp::open().await;
    declare(&amqp.channel, &queue, FieldTable::default()).await;
    let nowhere = fresh("model-no-such-queue");
    const N: u64 = 400;
    let mut confirms = Vec::new();
    for n in 0..N {
        let key = if n % 2 == 0 { &queue } else { &nowhere };
        let confirm = mandatory(&amqp.channel, key, b"x", n).await;
        confirms.push((n, confirm));
    }
    let (mut returned, mut elsewhere) = (BTreeSet::new(), 0);
    for (n, confirm) in confirms {
        let confirmation = tokio::time::timeout(TIMEOUT, confirm)
            .await
            .expect("a confirm in time")
            .unwrap();
        match confirmation {
            Confirmation::Ack(Some(message)) => {
                let number = number_of(&message.properties).expect("our header");
                elsewhere += u32::from(number != n);
                returned.insert(number);
            }
            Confirmation::Ack(None) => {}
            other => panic!("publish {n}: {other:?}"),
        }
    }
    let unroutable: BTreeSet<u64> = (0..N).filter(|n| n % 2 == 1).collect();
    assert_eq!(
        returned, unroutable,
        "every unroutable publish returned once"
    );
    println!(
        "returns reported on another publish's confirm: {elsewhere} of {}",
        N / 2
    );
    delete_queues(&[&queue]).await;
    amqp.close().await;
}

/// What the worker's pairing stands on (`broker/replies.rs`): the channel's return hook
/// (vendored lapin's `Channel::on_return`) has seen a publish's return by the time the
/// publish's confirm completes, and has seen no return of a routed publish. Many
/// publishes outstanding on one channel, every other one unroutable, their confirms
/// awaited in whatever order they complete.
#[tokio::test]
async fn a_return_is_heard_before_its_confirm_completes() {
    let queue = fresh("model-return-hook");
    let amqp = Amqp::open().await;
    let channel = amqp.connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    declare(&channel, &queue, FieldTable::default()).await;
    let heard = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let record = heard.clone();
    channel.on_return(move |message| {
        let number = number_of(&message.delivery.properties).expect("our header");
        record.lock().unwrap().insert(number);
    });
    let nowhere = fresh("model-no-such-queue");
    const N: u64 = 400;
    let mut confirms = futures_util::stream::FuturesUnordered::new();
    for n in 0..N {
        let key = if n % 2 == 0 { &queue } else { &nowhere };
        let confirm = mandatory(&channel, key, b"x", n).await;
        confirms.push(async move { (n, confirm.await) });
    }
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut completed = 0;
    while let Some((n, confirmation)) = tokio::time::timeout_at(deadline, confirms.next())
        .await
        .expect("every confirm in time")
    {
        assert!(
            matches!(confirmation, Ok(Confirmation::Ack(_))),
            "publish {n}: {confirmation:?}"
        );
        let was_heard = heard.lock().unwrap().contains(&n);
        assert_eq!(
            was_heard,
            n % 2 == 1,
            "publish {n}: its return heard when its confirm completed"
        );
        completed += 1;
    }
    assert_eq!(completed, N);
    delete_queues(&[&queue]).await;
    channel.close(200, "done".into()).await.unwrap();
    amqp.close().await;
}

/// A queue that refuses publishes (`x-max-length` 0 with `x-overflow` `reject-publish`)
/// nacks them: the confirm is a nack, nothing is returned, and it keeps refusing.
#[tokio::test]
async fn a_queue_that_rejects_publishes_nacks_them() {
    let queue = fresh("model-full");
    let amqp = Amqp::open().await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    declare(&amqp.channel, &queue, arguments).await;
    for n in 0..3 {
        let confirm = mandatory(&amqp.channel, &queue, b"x", n)
            .await
            .await
            .unwrap();
        assert!(
            matches!(confirm, Confirmation::Nack(None)),
            "publish {n}: {confirm:?}"
        );
    }
    delete_queues(&[&queue]).await;
    amqp.close().await;
}

/// A queue deleted under its consumer cancels it (`basic.cancel` from the broker): lapin
/// ends the consumer's stream, and the channel stays open (it can consume elsewhere).
#[tokio::test]
async fn a_deleted_queue_ends_its_consumer_and_keeps_the_channel() {
    let queue = fresh("model-cancelled");
    let amqp = Amqp::open().await;
    declare(&amqp.channel, &queue, FieldTable::default()).await;
    let consuming_channel = amqp.connection.create_channel().await.unwrap();
    let mut consuming = consumer(&consuming_channel, &queue).await;
    delete_queues(&[&queue]).await;
    let ended = tokio::time::timeout(TIMEOUT, consuming.next())
        .await
        .expect("the consumer's stream ends in time");
    assert!(ended.is_none(), "the stream ends: {ended:?}");
    assert!(
        consuming_channel.status().connected(),
        "the channel stays open"
    );
    let other = fresh("model-cancelled-other");
    declare(&consuming_channel, &other, FieldTable::default()).await;
    delete_queues(&[&other]).await;
    amqp.close().await;
}

/// A channel the broker closes (here over a publish to an exchange that does not exist,
/// `NOT_FOUND`: a reply exchange deleted under the worker) takes its unsettled
/// deliveries with it: a settlement on it is not sent (lapin answers `Ok(false)`, not an
/// error), and the delivery comes again, flagged redelivered, on another channel.
#[tokio::test]
async fn a_closed_channel_fails_its_settlements_and_hands_its_deliveries_back() {
    let queue = fresh("model-channel-gone");
    let amqp = Amqp::open().await;
    declare(&amqp.channel, &queue, FieldTable::default()).await;
    publish(&amqp.channel, &queue, b"one", numbered(1)).await;
    publish(&amqp.channel, &queue, b"two", numbered(2)).await;

    let first = amqp.connection.create_channel().await.unwrap();
    let mut consuming = consumer(&first, &queue).await;
    let one = next(&mut consuming).await;
    let two = next(&mut consuming).await;
    one.acker.ack(Default::default()).await.unwrap();
    // A publish to an exchange that does not exist: the broker closes the channel.
    let missing = fresh("model-no-such-exchange");
    let _ = first
        .basic_publish(
            missing.as_str().into(),
            "x".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await;
    let mut closed = false;
    for _ in 0..100 {
        if !first.status().connected() {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(closed, "the broker closes the channel");
    let settled = two.acker.ack(Default::default()).await;
    assert!(
        matches!(settled, Ok(false)),
        "lapin does not send a settlement on a closed channel, and says so with false: {settled:?}"
    );

    let second = amqp.connection.create_channel().await.unwrap();
    let mut consuming = consumer(&second, &queue).await;
    let again = next(&mut consuming).await;
    assert!(again.redelivered, "handed back by the closed channel");
    assert_eq!(number_of(&again.properties), Some(2));
    again.acker.ack(Default::default()).await.unwrap();
    delete_queues(&[&queue]).await;
    amqp.close().await;
}

/// Puts the broker's memory watermark back however the test ends.
struct Watermark;

impl Drop for Watermark {
    fn drop(&mut self) {
        let restore = [
            "eval".to_string(),
            support::rabbitmqctl::RESTORE_WATERMARK.to_string(),
        ];
        if let Err(e) = support::rabbitmqctl::ctl_blocking(&restore) {
            eprintln!("model: restoring the watermark: {e}");
        }
    }
}

/// A memory alarm blocks publishers (`connection.blocked`): a publish is neither
/// confirmed nor refused while it lasts, and is confirmed once it clears; a connection
/// that only consumes goes on receiving and settling. lapin shows the block in the
/// connection's status.
#[tokio::test]
async fn a_memory_alarm_holds_publishes_and_lets_consumers_go_on() {
    let queue = fresh("model-alarm");
    let publisher = Amqp::open().await;
    let consumer_side = Amqp::open().await;
    declare(&publisher.channel, &queue, FieldTable::default()).await;
    publish(&publisher.channel, &queue, b"before", numbered(1)).await;

    let watermark = Watermark;
    support::rabbitmqctl::ctl(&["set_vm_memory_high_watermark", "absolute", "1"])
        .await
        .unwrap();
    let held = mandatory(&publisher.channel, &queue, b"during", 2).await;
    let mut held = Box::pin(held);
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(3), &mut held)
            .await
            .is_err(),
        "no confirm while the alarm lasts"
    );
    assert!(
        publisher.connection.status().blocked(),
        "lapin reports the publisher blocked"
    );
    let mut consuming = consumer(&consumer_side.channel, &queue).await;
    let before = next(&mut consuming).await;
    assert_eq!(number_of(&before.properties), Some(1));
    before.acker.ack(Default::default()).await.unwrap();

    drop(watermark);
    let confirm = tokio::time::timeout(TIMEOUT, held)
        .await
        .expect("confirmed once the alarm clears")
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    let during = next(&mut consuming).await;
    assert_eq!(number_of(&during.properties), Some(2));
    during.acker.ack(Default::default()).await.unwrap();
    assert!(!publisher.connection.status().blocked(), "unblocked");
    delete_queues(&[&queue]).await;
    publisher.close().await;
    consumer_side.close().await;
}

/// A quorum queue counts deliveries handed back: with `x-delivery-limit` L, the message
/// is redelivered carrying its count (`x-delivery-count`) and, handed back once more
/// than L times, goes to the dead-letter exchange instead of coming again.
#[tokio::test]
async fn a_quorum_queue_dead_letters_past_its_delivery_limit() {
    let (queue, dead) = (fresh("model-limited"), fresh("model-limited-dlq"));
    let amqp = Amqp::open().await;
    declare(&amqp.channel, &dead, FieldTable::default()).await;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments.insert("x-delivery-limit".into(), AMQPValue::LongInt(2));
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dead.as_str().into()),
    );
    declare(&amqp.channel, &queue, arguments).await;
    publish(&amqp.channel, &queue, b"poison", numbered(1)).await;

    let channel = amqp.connection.create_channel().await.unwrap();
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consuming = consumer(&channel, &queue).await;
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    let mut counts = Vec::new();
    for _ in 0..3 {
        let delivery = next(&mut consuming).await;
        let count = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned());
        counts.push((delivery.redelivered, count));
        delivery.acker.nack(requeue).await.unwrap();
    }
    let count = |n: i64| Some(AMQPValue::LongLongInt(n));
    assert_eq!(
        counts,
        [(false, None), (true, count(1)), (true, count(2))],
        "redelivered, x-delivery-count"
    );
    // Handed back a third time with a limit of 2: dead-lettered, not delivered again.
    let dead_letter = next_message(&amqp.channel, &dead).await;
    assert_eq!(&*dead_letter.data, b"poison");
    assert_eq!(number_of(&dead_letter.properties), Some(1));
    let again = tokio::time::timeout(std::time::Duration::from_millis(500), consuming.next()).await;
    assert!(again.is_err(), "not delivered again: {again:?}");
    delete_queues(&[&queue, &dead]).await;
    amqp.close().await;
}

/// The engine's answers a model copies: each applied partial update raises `_version`
/// by one; an update that changes nothing is a `noop` at the same version unless
/// `detect_noop` is off; a write guarded by a stale `if_seq_no` is a 409
/// `version_conflict_engine_exception`; an update of a missing document is a 404
/// `document_missing_exception`; each item of a `_bulk` answers alone, in order.
#[tokio::test]
async fn the_engine_versions_noops_and_conflicts() {
    let col = Collection::create(&[("a", json!({"n": 0}))]).await;
    let bulk = async |lines: Vec<Value>| {
        let answer = post_bulk(&col, &lines).await;
        answer["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["update"].clone())
            .collect::<Vec<Value>>()
    };
    let update = |id: &str, doc: Value, noop: bool| {
        vec![
            json!({"update": {"_id": id, "retry_on_conflict": 1}}),
            json!({"doc": doc, "detect_noop": noop}),
        ]
    };
    let mut lines = update("a", json!({"n": 1}), true);
    lines.extend(update("a", json!({"n": 1}), true));
    lines.extend(update("a", json!({"n": 1}), false));
    lines.extend(update("missing", json!({"n": 1}), true));
    let items = bulk(lines).await;
    let seen: Vec<(Value, Value, Value)> = items
        .iter()
        .map(|i| {
            (
                i["status"].clone(),
                i["result"].clone(),
                i["_version"].clone(),
            )
        })
        .collect();
    assert_eq!(
        seen[..3],
        [
            (json!(200), json!("updated"), json!(2)),
            (json!(200), json!("noop"), json!(2)),
            (json!(200), json!("updated"), json!(3)),
        ],
        "{items:?}"
    );
    assert_eq!(items[3]["status"], 404);
    assert_eq!(items[3]["error"]["type"], "document_missing_exception");

    let seq_no = items[2]["_seq_no"].as_u64().unwrap();
    let stale = vec![
        json!({"update": {"_id": "a", "if_seq_no": seq_no - 1, "if_primary_term": items[2]["_primary_term"]}}),
        json!({"doc": {"n": 2}}),
    ];
    let items = bulk(stale).await;
    assert_eq!(items[0]["status"], 409, "{items:?}");
    assert_eq!(
        items[0]["error"]["type"],
        "version_conflict_engine_exception"
    );
    let (source, version) = col.get("a").await;
    assert_eq!((source["n"].clone(), version), (json!(1), 3));
}

/// What else the engine model of tests/simulation copies: a missing document with
/// `upsert` is created from it (201, `created`, version 1); an update merges objects key
/// by key; `_source: true` adds `get._source`, the document after the update, a no-op's
/// included; the answer's keys are `errors`, `took`, `items`, in that order.
#[tokio::test]
async fn the_engine_upserts_merges_and_returns_sources() {
    let col = Collection::create(&[("a", json!({"n": 0, "o": {"x": 1}}))]).await;
    let answer = post_bulk(
        &col,
        &[
            json!({"update": {"_id": "new", "retry_on_conflict": 0}}),
            json!({"doc": {"n": 1}, "upsert": {"n": 1, "created": true}, "_source": true}),
            json!({"update": {"_id": "a", "retry_on_conflict": 0}}),
            json!({"doc": {"o": {"y": 2}}, "_source": true}),
            json!({"update": {"_id": "a", "retry_on_conflict": 0}}),
            json!({"doc": {"o": {"y": 2}}, "_source": true}),
        ],
    )
    .await;
    let keys: Vec<&String> = answer.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["errors", "took", "items"], "{answer}");
    assert_eq!(answer["errors"], false);
    let items: Vec<&Value> = answer["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["update"])
        .collect();
    let seen = |i: &Value| {
        (
            i["status"].clone(),
            i["result"].clone(),
            i["_version"].clone(),
        )
    };
    assert_eq!(seen(items[0]), (json!(201), json!("created"), json!(1)));
    assert_eq!(items[0]["get"]["_source"], json!({"n": 1, "created": true}));
    assert_eq!(seen(items[1]), (json!(200), json!("updated"), json!(2)));
    let merged = json!({"n": 0, "o": {"x": 1, "y": 2}});
    assert_eq!(items[1]["get"]["_source"], merged);
    assert_eq!(seen(items[2]), (json!(200), json!("noop"), json!(2)));
    assert_eq!(items[2]["get"]["_source"], merged, "a no-op's source too");
    let shards = json!({"total": 2, "successful": 1, "failed": 0});
    assert_eq!(
        (&items[1]["_shards"], &items[2]["_shards"]),
        (&shards, &shards)
    );
    let (source, version) = col.get("a").await;
    assert_eq!((source, version), (merged, 2));
}
