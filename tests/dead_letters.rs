//! SPEC section 6, dead letters: a request the worker dead-letters says why and whether
//! its update was applied, and `mupdate-worker requeue-dead` moves back only those never
//! applied.

mod support;

use lapin::BasicProperties;
use lapin::types::AMQPValue;
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
