//! Reply destinations that keep refusing cost their own requests, not everyone's (issue
//! 19, item 3): a producer whose reply queue refuses every publish (`x-max-length: 0`,
//! `reject-publish`) sends 50 requests a second, and an unrelated producer's latency stays
//! near its p99 measured alone.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use mupdate_worker::client::Client;
use serde_json::json;
use support::cleanup::Cleanup;
use support::latency::{one_document_latencies, p99};
use support::*;

fn status_200(reply: &serde_json::Value) {
    assert_eq!(reply["status"], 200, "{reply}");
}

/// The tests measure latencies and load the same servers: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a flood of refused replies does to an unrelated producer.
struct Beside {
    alone_p99: Duration,
    beside_p99: Duration,
    /// The hostile producer's requests, and how many of them were dead-lettered.
    sent: usize,
    dead_lettered: usize,
}

impl Beside {
    /// The unrelated producer's p99 stays near its p99 alone, and the hostile requests
    /// went to the dead-letter queue, refused, rather than wait.
    fn assert_unharmed(&self) {
        let Beside {
            alone_p99,
            beside_p99,
            sent,
            dead_lettered,
        } = *self;
        assert!(sent >= 250, "the hostile producer sent {sent}");
        let bound = alone_p99 * 4 + Duration::from_millis(250);
        assert!(
            beside_p99 <= bound,
            "p99 {beside_p99:?} beside the refusing destination, {alone_p99:?} alone (bound {bound:?})"
        );
        assert!(
            dead_lettered >= sent / 2,
            "{dead_lettered} of {sent} dead-lettered"
        );
    }
}

/// A hostile producer sends 50 requests a second answered to a reply queue of
/// `x-max-length: max_length` with `reject-publish` (when `max_length` is 1, after one
/// reply taken, which fills it); an unrelated producer's latencies alone, then beside it.
async fn beside_a_flood(max_length: i32) -> Beside {
    let col = Collection::create(&[("d", json!({"n": 0}))]).await;
    let mut settings = settings();
    // A small prefetch: without a budget, the refused replies would hold every slot
    // within a second (50 a second, each held about 20 s).
    settings.amqp.prefetch = 32;
    let mut cleanup = Cleanup::of(&settings);
    let full = cleanup.queue(fresh("destinations.full"));
    let amqp = Amqp::open().await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(max_length));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    amqp.channel
        .queue_declare(full.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    let worker = Worker::start_with(settings).await;
    let queue = worker.request_queue().to_owned();
    let client = Client::connect(AMQP_URL).await.unwrap();

    // Alone: the unrelated producer's normal latency.
    let mut alone =
        one_document_latencies(&client, &queue, &col, Duration::from_secs(3), status_200).await;
    let alone_p99 = p99(&mut alone);

    let envelope = col.envelope(json!([{"_id": "h", "body": {"n": 1}}]));
    let body = serde_json::to_vec(&envelope).unwrap();
    let props = BasicProperties::default().with_reply_to(full.as_str().into());
    if max_length > 0 {
        // The first reply is taken (and fills the queue): the queue is trusted.
        publish(&amqp.channel, &queue, &body, props.clone()).await;
        wait_equal("the first reply", 1, || async {
            queue_counts(&full).await.map_or(0, |c| c.0)
        })
        .await;
    }

    // The hostile producer: 50 requests a second, each answered to the refusing queue.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let hostile = {
        let (stop, sent, channel) = (stop.clone(), sent.clone(), amqp.channel.clone());
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                publish(&channel, &queue, &body, props.clone()).await;
                sent.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Long enough for the refused replies to fill every slot, were they all retried.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut beside =
        one_document_latencies(&client, &queue, &col, Duration::from_secs(4), status_200).await;
    stop.store(true, Ordering::Relaxed);
    hostile.await.unwrap();
    let beside_p99 = p99(&mut beside);
    let sent = sent.load(Ordering::Relaxed);
    let dead = worker.settings.amqp.dead_letter_queue.clone();
    let dead_lettered = queue_counts(&dead).await.map_or(0, |c| c.0) as usize;
    println!(
        "unrelated producer (reply queue of x-max-length {max_length}): p99 {alone_p99:?} \
         alone ({} requests), {beside_p99:?} beside {sent} refused requests ({} requests), \
         {dead_lettered} dead-lettered",
        alone.len(),
        beside.len()
    );
    worker.stop().await;
    amqp.close().await;
    Beside {
        alone_p99,
        beside_p99,
        sent,
        dead_lettered,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_queue_that_refuses_everything_does_not_slow_other_producers() {
    let _alone = ONE_AT_A_TIME.lock().await;
    beside_a_flood(0).await.assert_unharmed();
}

/// Trust is bounded too: a reply queue that took one reply, then refuses every one (full,
/// `x-max-length: 1`), is trusted, but its refused replies waiting to be published again
/// hold at most the trusted budget (half the prefetch), not every slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_queue_that_took_one_reply_then_refuses_everything_does_not_slow_other_producers() {
    let _alone = ONE_AT_A_TIME.lock().await;
    beside_a_flood(1).await.assert_unharmed();
}

/// A reply queue that took replies and then refuses for a while (a quorum queue electing
/// its leader; here a full queue, drained after 2 s) has every refused reply published
/// again, beyond the budget that bounds destinations never seen to take a reply: all are
/// answered, none dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_queue_that_took_replies_has_every_refused_reply_retried() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let col = Collection::create(&[("d", json!({"n": 0}))]).await;
    let mut settings = settings();
    // A budget of 2 refused replies per untrusted destination, 16 per trusted one.
    settings.amqp.prefetch = 32;
    let mut cleanup = Cleanup::of(&settings);
    let replies = cleanup.queue(fresh("destinations.busy"));
    let amqp = Amqp::open().await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    amqp.channel
        .queue_declare(
            replies.as_str().into(),
            QueueDeclareOptions::default(),
            args,
        )
        .await
        .unwrap();
    let worker = Worker::start_with(settings).await;
    let queue = worker.request_queue().to_owned();
    let send = |n: u64| {
        let mut envelope = col.envelope(json!([{"_id": "d", "body": {"n": n}}]));
        envelope["requestId"] = json!(format!("busy-{n}"));
        let props = BasicProperties::default().with_reply_to(replies.as_str().into());
        let (channel, queue) = (amqp.channel.clone(), queue.clone());
        async move {
            publish(
                &channel,
                &queue,
                &serde_json::to_vec(&envelope).unwrap(),
                props,
            )
            .await
        }
    };
    // The first reply is taken (and fills the queue): the queue is trusted.
    send(0).await;
    wait_equal("the first reply", 1, || async {
        queue_counts(&replies).await.map_or(0, |c| c.0)
    })
    .await;
    // Ten more, refused while the queue is full.
    for n in 1..=10 {
        send(n).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut got = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 11 {
        assert!(Instant::now() < deadline, "answered: {got:?}");
        let message = amqp
            .channel
            .basic_get(
                replies.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap();
        match message {
            Some(m) => {
                let body: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
                assert_eq!(body["status"], 200, "{body}");
                got.insert(body["requestId"].as_str().unwrap().to_owned());
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let dead = worker.settings.amqp.dead_letter_queue.clone();
    assert_eq!(
        queue_counts(&dead).await.map_or(0, |c| c.0),
        0,
        "none dead-lettered"
    );
    worker.stop().await;
    amqp.close().await;
}
