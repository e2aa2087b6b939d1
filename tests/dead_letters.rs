//! SPEC section 6, dead letters: a request the worker dead-letters says why and whether
//! its update was applied, and `mupdate-worker requeue-dead` moves back only those never
//! applied.

mod support;

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::AMQPValue;
use lapin::types::FieldTable;
use serde_json::{Value, json};
use support::*;

fn header<'a>(message: &'a lapin::message::Delivery, name: &str) -> Option<&'a AMQPValue> {
    message.properties.headers().as_ref()?.inner().get(name)
}

#[tokio::test]
async fn dead_letters_say_why_and_whether_applied_and_only_unapplied_ones_are_requeued() {
    let col = Collection::create(&[("a", json!({"n": 0}))]).await;
    let worker = Worker::start().await;
    let settings = worker.settings.clone();
    let amqp = Amqp::open().await;
    let nowhere = fresh("no-such-queue");
    let props = || BasicProperties::default().with_reply_to(nowhere.as_str().into());

    // Applied, then its reply can't be routed.
    let mut applied = col.envelope(json!([{"_id": "a", "body": {"n": 1}}]));
    applied["requestId"] = json!("applied");
    // Refused before any update (an unknown action), its reply can't be routed either.
    let mut refused = applied.clone();
    refused["requestId"] = json!("refused");
    refused["action"] = json!("mNothing");
    for envelope in [&applied, &refused] {
        let body = serde_json::to_vec(envelope).unwrap();
        publish(&amqp.channel, worker.request_queue(), &body, props()).await;
    }
    let dead = next_messages(&amqp.channel, &settings.amqp.dead_letter_queue, 2).await;
    let mut seen = Vec::new();
    for message in &dead {
        let body: Value = serde_json::from_slice(&message.data).unwrap();
        let id = body["requestId"].as_str().unwrap().to_owned();
        let reason = match header(message, "x-mupdate-reason") {
            Some(AMQPValue::LongString(r)) => String::from_utf8_lossy(r.as_bytes()).into_owned(),
            other => panic!("no reason on {id}: {other:?}"),
        };
        let was_applied = match header(message, "x-mupdate-applied") {
            Some(AMQPValue::Boolean(b)) => *b,
            other => panic!("no applied header on {id}: {other:?}"),
        };
        // The request as it was published, its properties included.
        assert_eq!(
            message.properties.reply_to().as_ref().unwrap().as_str(),
            nowhere
        );
        seen.push((id, reason, was_applied));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("applied".to_owned(), "unroutable".to_owned(), true),
            ("refused".to_owned(), "unroutable".to_owned(), false),
        ]
    );
    let (doc, _) = col.get("a").await;
    assert_eq!(doc["n"], 1, "the applied one was applied");

    // Both back in the dead-letter queue, then the worker stopped: requeue-dead moves
    // the never-applied one to the request queue and leaves the other.
    let settings = worker.halt().await;
    for message in &dead {
        let mut props = message.properties.clone();
        props = props.with_headers(message.properties.headers().clone().unwrap_or_default());
        publish(
            &amqp.channel,
            &settings.amqp.dead_letter_queue,
            &message.data,
            props,
        )
        .await;
    }
    let output = worker_command(&settings)
        .arg("requeue-dead")
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("moved back 1; left: 1 applied"), "{said}");
    let requeued = next_message(&amqp.channel, &settings.amqp.request_queue).await;
    let body: Value = serde_json::from_slice(&requeued.data).unwrap();
    assert_eq!(body["requestId"], "refused");
    assert!(
        header(&requeued, "x-mupdate-reason").is_none(),
        "the worker's headers are gone"
    );
    let left = next_message(&amqp.channel, &settings.amqp.dead_letter_queue).await;
    let body: Value = serde_json::from_slice(&left.data).unwrap();
    assert_eq!(body["requestId"], "applied");
    assert_eq!(
        queue_counts(&settings.amqp.request_queue).await,
        Some((0, 0))
    );

    amqp.close().await;
    delete_topology(&settings).await;
}

/// A request the broker dead-lettered (a delivery limit, a TTL: here a TTL of 0 in a
/// queue whose dead letters go to the worker's dead-letter queue) carries a producer's
/// headers as they were published: a forged `x-mupdate-applied: false` and
/// `x-mupdate-user-id` must not make `requeue-dead` move it as never applied, nor
/// publish it as that user (found by the adversarial review). With `--unknown` it is
/// moved, the worker's headers and the broker's record gone, no `user_id` taken. One
/// saying `x-mupdate-applied: true` stays, even with `--unknown`.
#[tokio::test]
async fn a_producers_worker_headers_on_a_broker_dead_letter_are_not_believed() {
    let settings = settings();
    let amqp = Amqp::open().await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for queue in [
        &settings.amqp.request_queue,
        &settings.amqp.dead_letter_queue,
    ] {
        amqp.channel
            .queue_declare(queue.as_str().into(), durable, FieldTable::default())
            .await
            .unwrap();
    }
    let expiring = fresh("expiring");
    let mut arguments = FieldTable::default();
    arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(0));
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(settings.amqp.dead_letter_queue.as_str().into()),
    );
    amqp.channel
        .queue_declare(expiring.as_str().into(), durable, arguments)
        .await
        .unwrap();
    let mut forged = FieldTable::default();
    forged.insert("x-mupdate-applied".into(), AMQPValue::Boolean(false));
    forged.insert(
        "x-mupdate-user-id".into(),
        AMQPValue::LongString("admin".into()),
    );
    forged.insert("x-trace".into(), AMQPValue::LongString("t-1".into()));
    let props = BasicProperties::default().with_headers(forged.clone());
    publish(
        &amqp.channel,
        &expiring,
        b"{\"requestId\":\"forged\"}",
        props,
    )
    .await;
    // `x-mupdate-applied: true` is believed wherever it is: it only keeps a message.
    let mut applied = forged;
    applied.insert("x-mupdate-applied".into(), AMQPValue::Boolean(true));
    let props = BasicProperties::default().with_headers(applied);
    publish(&amqp.channel, &expiring, b"{\"requestId\":\"kept\"}", props).await;
    wait_equal("dead-lettered by the broker", Some((2, 0)), || {
        queue_counts(&settings.amqp.dead_letter_queue)
    })
    .await;

    let requeue = |unknown: bool| {
        let mut command = worker_command(&settings);
        command.arg("requeue-dead");
        if unknown {
            command.arg("--unknown");
        }
        let output = command
            .stdout(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let said = requeue(false);
    assert!(
        said.contains("moved back 0; left: 1 applied, 1 of unknown fate"),
        "{said}"
    );
    let said = requeue(true);
    assert!(said.contains("moved back 1; left: 1 applied"), "{said}");
    let moved = next_message(&amqp.channel, &settings.amqp.request_queue).await;
    assert_eq!(moved.properties.user_id(), &None, "no user_id taken");
    assert!(header(&moved, "x-mupdate-user-id").is_none());
    assert!(header(&moved, "x-mupdate-applied").is_none());
    assert!(
        header(&moved, "x-death").is_some(),
        "the broker's record stays"
    );
    assert!(
        header(&moved, "x-trace").is_some(),
        "the request's own stay"
    );

    amqp.channel
        .queue_delete(expiring.as_str().into(), Default::default())
        .await
        .unwrap();
    amqp.close().await;
    delete_topology(&settings).await;
}
