//! SPEC section 6, per-document order: within one worker, updates of the same document
//! land in the order the worker received them, whatever the concurrency inside it (index
//! checks racing on a fresh index, coalesced calls side by side).

mod support;

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::{Value, json};
use support::*;

/// A producer that doesn't wait publishes 300 updates of one document in a row; each
/// reply's `_version` is the engine's order of application: it must be the order of
/// publication, and the document ends with the last update.
#[tokio::test]
async fn updates_of_one_document_land_in_the_order_they_were_received() {
    let col = Collection::create(&[("a", json!({"n": -1})), ("b", json!({"n": -1}))]).await;
    let mut settings = settings();
    settings.amqp.prefetch = 256;
    settings.amqp.max_held_bytes = 0;
    // Several calls side by side, as soon as any is worth it.
    settings.storage.bulk_spread_documents = 1;
    settings.storage.concurrent_bulks = 8;
    let worker = Worker::start_with(settings).await;
    let amqp = Amqp::open().await;
    let replies = fresh("order.replies");
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
        // Every other request also touches "b", so that batches differ.
        let mut documents = vec![json!({"_id": "a", "body": {"n": i}})];
        if i % 2 == 0 {
            documents.push(json!({"_id": "b", "body": {"n": i}}));
        }
        let mut envelope = col.envelope(json!(documents));
        envelope["requestId"] = json!(format!("order-{i}"));
        let props = BasicProperties::default().with_reply_to(replies.as_str().into());
        publish(
            &amqp.channel,
            worker.request_queue(),
            &serde_json::to_vec(&envelope).unwrap(),
            props,
        )
        .await;
    }

    let mut version_of_a = vec![0i64; N];
    for message in next_messages(&amqp.channel, &replies, N).await {
        let reply: Value = serde_json::from_slice(&message.data).unwrap();
        assert_eq!(reply["status"], 200, "{reply}");
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
    assert!(
        out_of_order.is_empty(),
        "requests applied before an earlier one (request, version before, its version): {out_of_order:?}"
    );
    let (a, _) = col.get("a").await;
    assert_eq!(a["n"], N - 1);

    amqp.close().await;
    delete_queues(&[&replies]).await;
    worker.stop().await;
}
