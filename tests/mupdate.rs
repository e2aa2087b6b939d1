//! The worker end to end against the real RabbitMQ and Elasticsearch: one test per
//! behaviour of SPEC sections 1 to 5, each on fresh queues and indexes.

mod support;

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use mupdate_worker::config::Format;
use serde_json::{Value, json};
use support::*;

#[tokio::test]
async fn all_documents_updated_is_a_200_in_the_seeds_shape() {
    let col = Collection::create(&[
        ("p1", json!({"price": 1, "name": "chair"})),
        ("p2", json!({"stock": 5, "name": "table"})),
    ])
    .await;
    let worker = Worker::start().await;
    let mut envelope = col.envelope(json!([
        {"_id": "p1", "body": {"price": 10, "_kuzzle_info": {"author": "forged", "updatedAt": 1}}},
        {"_id": "p2", "body": {"stock": 0}}]));
    envelope["requestId"] = json!("r-42");
    envelope["volatile"] = json!({"trace": "x"});
    envelope["jwt"] = json!("secret-token");
    let before = now_ms();
    let reply = call(&worker, &envelope).await;

    assert_eq!(reply["status"], 200);
    assert_eq!(reply["error"], Value::Null);
    assert_eq!(reply["requestId"], "r-42");
    assert_eq!(reply["index"], col.index.as_str());
    assert_eq!(reply["collection"], "col");
    assert_eq!(
        (reply["controller"].as_str(), reply["action"].as_str()),
        (Some("document"), Some("mUpdate"))
    );
    assert_eq!(reply["volatile"], json!({"trace": "x"}));
    assert!(reply.get("jwt").is_none());
    assert_eq!(reply["result"]["total"], 2);
    let hits = reply["result"]["hits"].as_array().unwrap();
    assert_eq!(hits[0]["_id"], "p1");
    assert_eq!(hits[1]["_id"], "p2");
    for hit in hits {
        assert_eq!(hit["_index"], col.index.as_str());
        assert_eq!(hit["_type"], "col");
        assert_eq!(hit["_version"], 2);
        assert_eq!(hit["result"], "updated");
        assert_eq!(hit["status"], 200);
        assert_eq!(hit["_shards"]["successful"], 1);
    }
    assert_eq!(hits[0]["_source"]["price"], 10);
    assert_eq!(hits[0]["_source"]["name"], "chair");

    let (p1, version) = col.get("p1").await;
    assert_eq!(version, 2);
    assert_eq!(
        (p1["price"].as_i64(), p1["name"].as_str()),
        (Some(10), Some("chair"))
    );
    let info = &p1["_kuzzle_info"];
    assert!(
        info.get("author").is_none(),
        "client metadata dropped: {info}"
    );
    assert!(info["updatedAt"].as_i64().unwrap() >= before);
    assert_eq!(info["updater"], Value::Null);
    let (p2, _) = col.get("p2").await;
    assert_eq!(
        (p2["stock"].as_i64(), p2["name"].as_str()),
        (Some(0), Some("table"))
    );
    worker.stop().await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn a_mix_of_failures_is_a_206_with_hits_and_errors_in_order() {
    let col = Collection::create(&[("a", json!({"n": 1})), ("b", json!({"n": 1}))]).await;
    let worker = Worker::start().await;
    let docs = json!([
        {"_id": "a", "body": {"n": 2}},
        {"_id": "missing", "body": {"n": 2}},
        {"_id": "b", "body": "not an object"},
        {"_id": 7, "body": {"n": 2}},
        {"body": {"n": 2}},
        {"_id": "b", "body": {"n": "not a number"}},
        {"_id": "b", "body": {"n": 3}}]);
    let reply = call(&worker, &col.envelope(docs.clone())).await;
    assert_eq!(reply["status"], 206);
    let hits: Vec<&str> = reply["result"]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["_id"].as_str().unwrap())
        .collect();
    assert_eq!(hits, ["a", "b"]);
    assert_eq!(reply["result"]["total"], 2);
    let error = &reply["error"];
    assert_eq!(error["status"], 206);
    assert_eq!(error["id"], "services.storage.incomplete_update");
    assert_eq!(error["message"], "5 of 7 documents could not be updated");
    assert_eq!(error["count"], 5);
    let errors = error["errors"].as_array().unwrap();
    let expect = [
        (1, 404, "document not found"),
        (2, 400, "document body must be an object"),
        (3, 400, "document _id must be a string"),
        (4, 400, "document _id must be a string"),
    ];
    for (i, (doc, status, reason)) in expect.into_iter().enumerate() {
        assert_eq!(errors[i]["document"], docs[doc], "error {i}");
        assert_eq!(errors[i]["status"], status, "error {i}");
        assert_eq!(errors[i]["reason"], reason, "error {i}");
    }
    assert!(errors[4]["document"].get("_id").is_some());
    assert_eq!(errors[4]["status"], 400);
    assert!(
        errors[4]["reason"]
            .as_str()
            .unwrap()
            .contains("failed to parse")
    );
    assert!(
        errors[3]["document"].get("_id").is_none(),
        "sent without _id, echoed without"
    );
    assert_eq!(col.get("b").await.0["n"], 3);
    worker.stop().await;
}

#[tokio::test]
async fn all_documents_failing_is_still_a_206() {
    let col = Collection::create(&[]).await;
    let worker = Worker::start().await;
    let reply = call(
        &worker,
        &col.envelope(json!([{"_id": "x", "body": {}}, {"_id": "y", "body": {}}])),
    )
    .await;
    assert_eq!(reply["status"], 206);
    assert_eq!(reply["result"]["total"], 0);
    assert_eq!(reply["error"]["count"], 2);
    worker.stop().await;
}

#[tokio::test]
async fn an_empty_documents_array_is_a_200_with_total_0() {
    let worker = Worker::start().await;
    // No index exists: an empty request never reaches the engine.
    let envelope = json!({"index": "nowhere", "collection": "c", "controller": "document",
                          "action": "mUpdate", "body": {"documents": []}});
    let reply = call(&worker, &envelope).await;
    assert_eq!(reply["status"], 200);
    assert_eq!(reply["result"], json!({"total": 0, "hits": []}));
    worker.stop().await;
}

/// One test per row of SPEC section 4: the envelope, then the status and error id.
macro_rules! whole_request_error {
    ($($name:ident: $envelope:expr => $status:expr, $id:expr;)*) => {$(
        #[tokio::test]
        async fn $name() {
            let worker = Worker::start().await;
            let envelope: Value = $envelope;
            let reply = call_bytes(&worker, &bytes(&envelope)).await;
            assert_eq!(reply["status"], $status, "{reply}");
            assert_eq!(reply["error"]["status"], $status, "{reply}");
            assert_eq!(reply["error"]["id"], $id, "{reply}");
            assert!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert_eq!(reply["result"], Value::Null);
            worker.stop().await;
        }
    )*};
}

/// Raw bytes stand as a JSON string marked `raw:`; everything else is serialized.
fn bytes(envelope: &Value) -> Vec<u8> {
    match envelope.as_str().and_then(|s| s.strip_prefix("raw:")) {
        Some(raw) => raw.as_bytes().to_vec(),
        None => serde_json::to_vec(envelope).unwrap(),
    }
}

fn valid() -> Value {
    json!({"index": "shop", "collection": "products", "controller": "document",
           "action": "mUpdate", "body": {"documents": [{"_id": "p1", "body": {"a": 1}}]}})
}

fn with(key: &str, value: Value) -> Value {
    let mut v = valid();
    v[key] = value;
    v
}

fn without(key: &str) -> Value {
    let mut v = valid();
    v.as_object_mut().unwrap().remove(key);
    v
}

whole_request_error! {
    body_not_json_is_400_invalid_argument: json!("raw:{not json") => 400, "api.assert.invalid_argument";
    body_not_an_object_is_400_invalid_argument: json!([1, 2, 3]) => 400, "api.assert.invalid_argument";
    unknown_controller_is_404_controller_not_found: with("controller", json!("auth")) => 404, "api.process.controller_not_found";
    unknown_action_is_404_action_not_found: with("action", json!("mSearch")) => 404, "api.process.action_not_found";
    missing_index_is_400_missing_argument: without("index") => 400, "api.assert.missing_argument";
    missing_collection_is_400_missing_argument: without("collection") => 400, "api.assert.missing_argument";
    invalid_index_name_is_400: with("index", json!("ShOp")) => 400, "services.storage.invalid_index_name";
    wildcard_index_name_is_400: with("index", json!("*")) => 400, "services.storage.invalid_index_name";
    invalid_collection_name_is_400: with("collection", json!("a,b")) => 400, "services.storage.invalid_collection_name";
    reserved_index_is_400_index_reserved: with("index", json!("%kuzzle")) => 400, "services.storage.index_reserved";
    missing_body_is_400_body_required: without("body") => 400, "api.assert.body_required";
    missing_documents_is_400_missing_argument: with("body", json!({})) => 400, "api.assert.missing_argument";
    documents_not_an_array_is_400_invalid_type: with("body", json!({"documents": "x"})) => 400, "api.assert.invalid_type";
    request_id_not_a_string_is_400_invalid_type: with("requestId", json!(42)) => 400, "api.assert.invalid_type";
    invalid_refresh_is_400_invalid_argument: with("refresh", json!("now")) => 400, "services.storage.invalid_argument";
    invalid_retry_on_conflict_is_400_invalid_argument: with("retryOnConflict", json!(1000)) => 400, "services.storage.invalid_argument";
    mistyped_retry_on_conflict_is_400_invalid_type: with("retryOnConflict", json!("3x")) => 400, "api.assert.invalid_type";
    too_many_documents_is_413_write_limit_exceeded: with("body", json!({"documents":
        (0..201).map(|i| json!({"_id": i.to_string(), "body": {}})).collect::<Vec<_>>()}))
        => 413, "services.storage.write_limit_exceeded";
}

#[tokio::test]
async fn message_larger_than_the_limit_is_413_body_too_large() {
    let mut settings = settings();
    settings.limits.max_message_bytes = 1024;
    let worker = Worker::start_with(settings).await;
    let big = with("volatile", json!({"pad": "x".repeat(2000)}));
    let reply = call(&worker, &big).await;
    assert_eq!(reply["status"], 413);
    assert_eq!(reply["error"]["id"], "api.assert.body_too_large");
    worker.stop().await;
}

#[tokio::test]
async fn unknown_index_is_412_and_creates_no_index() {
    let worker = Worker::start().await;
    let index = fresh("nothere");
    let mut envelope = with("index", json!(index));
    envelope["collection"] = json!("c");
    let reply = call(&worker, &envelope).await;
    assert_eq!(reply["status"], 412);
    assert_eq!(reply["error"]["id"], "services.storage.unknown_index");
    assert!(
        !index_exists(&format!("&{index}.c")).await,
        "no index was created"
    );
    worker.stop().await;
}

#[tokio::test]
async fn unknown_collection_is_412_unknown_collection() {
    let col = Collection::create(&[]).await;
    let worker = Worker::start().await;
    let mut envelope = col.envelope(json!([{"_id": "a", "body": {}}]));
    envelope["collection"] = json!("other");
    let reply = call(&worker, &envelope).await;
    assert_eq!(reply["status"], 412);
    assert_eq!(reply["error"]["id"], "services.storage.unknown_collection");
    assert!(!index_exists(&format!("&{}.other", col.index)).await);
    worker.stop().await;
}

#[tokio::test]
async fn refresh_wait_for_makes_the_update_searchable_once_replied() {
    // Refreshes every 5 s: without wait_for, a search right after the reply misses it.
    let col = Collection::create_with(
        &[("a", json!({"tag": "old"}))],
        json!({"refresh_interval": "5s"}),
    )
    .await;
    let worker = Worker::start().await;
    let mut envelope = col.envelope(json!([{"_id": "a", "body": {"tag": "fresh"}}]));
    envelope["refresh"] = json!("wait_for");
    let reply = call(&worker, &envelope).await;
    assert_eq!(reply["status"], 200);
    assert_eq!(reply["refresh"], "wait_for");
    let found: Value = http()
        .post(format!("{ES_URL}/{}/_search", path(&col.physical)))
        .json(&json!({"query": {"term": {"tag.keyword": "fresh"}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["hits"]["total"]["value"], 1, "{found}");
    worker.stop().await;
}

/// Sends `n` one-document requests for document `a` at once, each setting its own field.
async fn concurrent_updates(
    worker: &Worker,
    col: &Collection,
    n: usize,
    retries: u32,
) -> Vec<Value> {
    let client = mupdate_worker::client::Client::connect(AMQP_URL)
        .await
        .unwrap();
    let client = &client;
    let calls = (0..n).map(|i| {
        let mut envelope = col.envelope(json!([{"_id": "a", "body": {format!("f{i}"): i}}]));
        envelope["retryOnConflict"] = json!(retries);
        async move {
            let id = format!("c{i}");
            let reply = client
                .request(
                    worker.request_queue(),
                    &serde_json::to_vec(&envelope).unwrap(),
                    &id,
                    TIMEOUT,
                )
                .await
                .unwrap();
            serde_json::from_slice::<Value>(&reply).unwrap()
        }
    });
    futures_util::future::join_all(calls).await
}

#[tokio::test]
async fn retry_on_conflict_lets_concurrent_updates_of_one_document_all_land() {
    let col = Collection::create(&[("a", json!({}))]).await;
    let worker = Worker::start().await;
    let n = 60;
    let replies = concurrent_updates(&worker, &col, n, 10).await;
    for reply in &replies {
        assert_eq!(reply["status"], 200, "{reply}");
        assert_eq!(reply["retryOnConflict"], 10);
    }
    let (source, version) = col.get("a").await;
    for i in 0..n {
        assert_eq!(source[format!("f{i}")], i, "update {i} landed");
    }
    assert_eq!(version, 1 + n as u64);
    worker.stop().await;
}

#[tokio::test]
async fn without_retry_on_conflict_conflicts_surface_as_409_items() {
    // A 1 MB document: each update reads, merges and writes it again, which widens the
    // window in which another update of it can land between the read and the write.
    let col = Collection::create(&[("a", json!({"pad": "x ".repeat(500_000)}))]).await;
    // Conflicts need calls that overlap: every slot used, however small the batch.
    let mut settings = settings();
    settings.storage.bulk_spread_documents = 0;
    let worker = Worker::start_with(settings).await;
    // Conflicts need two updates of one document to overlap. The worker's own calls
    // overlap rarely on a fast engine, so writers beside it update the same document
    // straight at the engine (retrying their own conflicts) for as long as the test runs.
    let stop = tokio_util::sync::CancellationToken::new();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let stop = stop.clone();
            let url = format!(
                "{ES_URL}/{}/_update/a?retry_on_conflict=1000",
                path(&col.physical)
            );
            tokio::spawn(async move {
                let http = http();
                let mut n = 0u64;
                while !stop.is_cancelled() && n < 100_000 {
                    let body = json!({"doc": {format!("w{w}"): n}});
                    let _ = http.post(&url).json(&body).send().await;
                    n += 1;
                }
            })
        })
        .collect();
    let mut conflicts = 0;
    // Bounded rounds: stop at the first that surfaced a conflict.
    for _ in 0..10 {
        for reply in concurrent_updates(&worker, &col, 60, 0).await {
            if reply["status"] == 206 {
                let error = &reply["error"]["errors"][0];
                assert_eq!(error["status"], 409, "{reply}");
                assert!(
                    error["reason"]
                        .as_str()
                        .unwrap()
                        .contains("version conflict")
                );
                conflicts += 1;
            } else {
                assert_eq!(reply["status"], 200, "{reply}");
            }
        }
        if conflicts > 0 {
            break;
        }
    }
    stop.cancel();
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(conflicts > 0, "no conflict surfaced");
    worker.stop().await;
}

/// A private queue to receive replies on.
async fn reply_queue(amqp: &Amqp) -> String {
    amqp.channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .name()
        .to_string()
}

/// Publishes `envelope` with `props` and `reply_to` a private queue; returns the reply.
async fn call_with_reply_to(
    worker: &Worker,
    envelope: &Value,
    props: BasicProperties,
) -> lapin::message::Delivery {
    let amqp = Amqp::open().await;
    let queue = reply_queue(&amqp).await;
    let props = props.with_reply_to(queue.as_str().into());
    publish(
        &amqp.channel,
        worker.request_queue(),
        &bytes(envelope),
        props,
    )
    .await;
    let reply = next_message(&amqp.channel, &queue).await;
    amqp.close().await;
    reply
}

fn header_status(delivery: &lapin::message::Delivery) -> Option<i64> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get("status")? {
        AMQPValue::ShortInt(s) => Some(i64::from(*s)),
        AMQPValue::LongInt(s) => Some(i64::from(*s)),
        AMQPValue::ShortShortInt(s) => Some(i64::from(*s)),
        _ => None,
    }
}

#[tokio::test]
async fn a_reply_goes_to_the_named_reply_to_queue() {
    let worker = Worker::start().await;
    let reply = call_with_reply_to(
        &worker,
        &with("requestId", json!("named-1")),
        BasicProperties::default(),
    )
    .await;
    assert_eq!(
        reply.properties.correlation_id().as_ref().unwrap().as_str(),
        "named-1"
    );
    assert_eq!(
        reply.properties.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*reply.properties.delivery_mode(), Some(2), "persistent");
    let body: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(header_status(&reply), body["status"].as_i64());
    assert_eq!(body["requestId"], "named-1");
    worker.stop().await;
}

#[tokio::test]
async fn a_reply_goes_to_direct_reply_to() {
    let worker = Worker::start().await;
    // The client consumes amq.rabbitmq.reply-to and publishes with it as reply_to.
    let reply = call(&worker, &with("requestId", json!("direct-1"))).await;
    assert_eq!(reply["requestId"], "direct-1");
    worker.stop().await;
}

#[tokio::test]
async fn without_reply_to_the_reply_goes_to_the_default_reply_queue() {
    let worker = Worker::start().await;
    let amqp = Amqp::open().await;
    let props = BasicProperties::default().with_correlation_id("from-correlation".into());
    publish(
        &amqp.channel,
        worker.request_queue(),
        &bytes(&valid()),
        props,
    )
    .await;
    let reply = next_message(&amqp.channel, &worker.settings.amqp.reply_queue).await;
    let body: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(
        body["requestId"], "from-correlation",
        "requestId from correlation_id"
    );
    assert_eq!(
        reply.properties.correlation_id().as_ref().unwrap().as_str(),
        "from-correlation"
    );
    amqp.close().await;
    worker.stop().await;
}

#[tokio::test]
async fn with_a_reply_exchange_replies_are_routed_by_request_id() {
    let amqp = Amqp::open().await;
    let exchange = fresh("mupdate.replies.x");
    amqp.channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let queue = reply_queue(&amqp).await;
    amqp.channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "routed-1".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut settings = settings();
    settings.amqp.reply_exchange = exchange.clone();
    let worker = Worker::start_with(settings).await;
    let props = BasicProperties::default().with_message_id("routed-1".into());
    publish(
        &amqp.channel,
        worker.request_queue(),
        &bytes(&valid()),
        props,
    )
    .await;
    let reply = next_message(&amqp.channel, &queue).await;
    let body: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(body["requestId"], "routed-1", "requestId from message_id");
    amqp.close().await;
    worker.stop().await;
}

#[tokio::test]
async fn without_any_id_a_uuid_request_id_is_generated() {
    let worker = Worker::start().await;
    let reply = call_with_reply_to(&worker, &valid(), BasicProperties::default()).await;
    let body: Value = serde_json::from_slice(&reply.data).unwrap();
    let id = body["requestId"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    assert_eq!(
        reply.properties.correlation_id().as_ref().unwrap().as_str(),
        id
    );
    worker.stop().await;
}

#[tokio::test]
async fn the_authenticated_user_id_becomes_the_updater() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let worker = Worker::start().await;
    // RabbitMQ refuses a user_id other than the connection's user: guest.
    let props = BasicProperties::default().with_user_id("guest".into());
    let envelope = col.envelope(json!([{"_id": "a", "body": {"n": 2}}]));
    let reply = call_with_reply_to(&worker, &envelope, props).await;
    let body: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(body["status"], 200, "{body}");
    assert_eq!(col.get("a").await.0["_kuzzle_info"]["updater"], "guest");
    worker.stop().await;
}

#[tokio::test]
async fn v2_format_lists_successes_and_errors_and_strict_makes_failures_a_400() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let mut settings = settings();
    settings.response.format = Format::V2;
    let worker = Worker::start_with(settings).await;
    let envelope =
        col.envelope(json!([{"_id": "a", "body": {"n": 2}}, {"_id": "zz", "body": {"n": 2}}]));
    let reply = call(&worker, &envelope).await;
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["error"], Value::Null);
    let successes = reply["result"]["successes"].as_array().unwrap();
    assert_eq!(successes.len(), 1);
    assert_eq!(successes[0]["_id"], "a");
    assert_eq!(successes[0]["_version"], 2);
    assert_eq!(successes[0]["_source"]["n"], 2);
    assert_eq!(reply["result"]["errors"][0]["status"], 404);

    let mut strict = envelope.clone();
    strict["strict"] = json!(true);
    let reply = call(&worker, &strict).await;
    assert_eq!(reply["status"], 400, "{reply}");
    assert_eq!(
        reply["error"]["id"],
        "api.process.incomplete_multiple_request"
    );
    // Kuzzle 2's shape: no result, the failed documents in the error.
    assert_eq!(reply["result"], Value::Null);
    assert_eq!(
        reply["error"]["message"],
        "At least one of the mUpdate actions failed."
    );
    assert_eq!(reply["error"]["count"], 1);
    assert_eq!(reply["error"]["errors"][0]["document"]["_id"], "zz");
    assert_eq!(reply["error"]["errors"][0]["status"], 404);
    worker.stop().await;
}

#[tokio::test]
async fn a_request_is_acked_only_after_its_reply_is_confirmed() {
    let amqp = Amqp::open().await;
    // A reply queue that is full and refuses more: the broker nacks the worker's reply.
    let queue = fresh("mupdate.full-replies");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    amqp.channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    publish(&amqp.channel, &queue, b"filler", BasicProperties::default()).await;
    let mut settings = settings();
    settings.amqp.prefetch = 1;
    // Refused replies are retried until the shutdown grace hands the request back.
    settings.amqp.reply_attempts = 1000;
    settings.worker.shutdown_timeout_ms = 1000;
    let worker = Worker::start_with(settings).await;
    let props = BasicProperties::default().with_reply_to(queue.as_str().into());
    publish(
        &amqp.channel,
        worker.request_queue(),
        &bytes(&with("requestId", json!("held"))),
        props,
    )
    .await;

    // The reply can't be confirmed: stopping the worker puts the request back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settings = worker.halt().await;
    let request_queue = settings.amqp.request_queue.clone();
    assert_eq!(
        queue_counts(&request_queue).await.unwrap().0,
        1,
        "not acked without a confirmed reply"
    );

    // Make room: now the reply is confirmed, and only then the request acked.
    assert_eq!(next_message(&amqp.channel, &queue).await.data, b"filler");
    let worker = Worker::start_with(settings).await;
    let reply = next_message(&amqp.channel, &queue).await;
    let body: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(body["requestId"], "held");
    let settings = worker.halt().await;
    assert_eq!(
        queue_counts(&request_queue).await.unwrap().0,
        0,
        "acked once the reply was confirmed"
    );
    delete_topology(&settings).await;
    delete_queues(&[&queue]).await;
    amqp.close().await;
}

/// Beside a live Kuzzle 2 (`storage.layout = "kuzzle2"`): writes go through the alias
/// `@&{index}.{collection}`; an index without that alias is one Kuzzle doesn't know, so
/// it is an unknown collection, and nothing is created.
#[tokio::test]
async fn the_kuzzle2_layout_writes_through_the_alias_and_leaves_other_indexes_alone() {
    let known = Collection::create(&[("a", json!({"n": 1}))]).await;
    let alias = format!("@{}", known.physical);
    let r = http()
        .put(format!(
            "{ES_URL}/{}/_alias/{}",
            path(&known.physical),
            path(&alias).replace('@', "%40")
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let unknown = Collection::create(&[("a", json!({"n": 1}))]).await;
    let mut settings = settings();
    settings.storage.layout = mupdate_worker::config::Layout::Kuzzle2;
    let worker = Worker::start_with(settings).await;

    let reply = call(
        &worker,
        &known.envelope(json!([{"_id": "a", "body": {"n": 2}}])),
    )
    .await;
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(known.get("a").await.0["n"], 2);

    let reply = call(
        &worker,
        &unknown.envelope(json!([{"_id": "a", "body": {"n": 2}}])),
    )
    .await;
    assert_eq!(reply["status"], 412, "{reply}");
    assert_eq!(reply["error"]["id"], "services.storage.unknown_index");
    assert_eq!(
        unknown.get("a").await.0["n"],
        1,
        "the index without alias is untouched"
    );
    assert!(!index_exists(&format!("@{}", unknown.physical)).await);

    let mut other = known.envelope(json!([{"_id": "a", "body": {"n": 3}}]));
    other["collection"] = json!("nope");
    let reply = call(&worker, &other).await;
    assert_eq!(reply["status"], 412, "{reply}");
    assert_eq!(reply["error"]["id"], "services.storage.unknown_collection");
    worker.stop().await;
}

/// Numbers in a document body reach the engine as the producer wrote them: what the
/// worker stores is what the same partial update sent straight to the engine stores
/// (Kuzzle's default mapping, `dynamic: false`, keeps `_source` as written), and the
/// reply's `_source` says the same. Without exact numbers the big integer became
/// `1.2345678901234568E22`.
#[tokio::test]
async fn numbers_reach_the_engine_exactly_as_written() {
    let col = Collection::create_on(
        &ES_URL,
        &[("via-worker", json!({"k": 0})), ("direct", json!({"k": 0}))],
        json!({"mappings": {"dynamic": false, "properties": {}}}),
    )
    .await;
    let worker = Worker::start().await;
    let numbers = r#"{"big": 12345678901234567890123, "negative": -98765432109876543210987,
        "decimal": 3.14159265358979323846264338327950288, "exponent": 6.02214076e23,
        "small": 1E-7, "whole": 10.0, "nested": {"list": [18446744073709551616, 0.30000000000000004441]}}"#;
    let envelope = format!(
        r#"{{"index": "{}", "collection": "{}", "controller": "document", "action": "mUpdate",
            "body": {{"documents": [{{"_id": "via-worker", "body": {numbers}}}]}}}}"#,
        col.index, col.collection
    );
    let reply = call_bytes(&worker, envelope.as_bytes()).await;
    assert_eq!(reply["status"], 200, "{reply}");
    let direct = http()
        .post(format!(
            "{}/{}/_update/direct?refresh=true",
            col.es,
            path(&col.physical)
        ))
        .header("content-type", "application/json")
        .body(format!(r#"{{"doc": {numbers}}}"#))
        .send()
        .await
        .unwrap();
    assert!(
        direct.status().is_success(),
        "{}",
        direct.text().await.unwrap()
    );

    // The stored `_source` as the engine returns it, text for text.
    let stored = |id: &'static str| {
        let url = format!("{}/{}/_source/{id}", col.es, path(&col.physical));
        async move { http().get(url).send().await.unwrap().text().await.unwrap() }
    };
    let (via_worker, direct) = (stored("via-worker").await, stored("direct").await);
    let fields = [
        "12345678901234567890123",
        "-98765432109876543210987",
        "3.14159265358979323846264338327950288",
        "6.02214076e23",
        "1E-7",
        "10.0",
        "18446744073709551616",
        "0.30000000000000004441",
    ];
    for field in fields {
        assert_eq!(
            via_worker.contains(field),
            direct.contains(field),
            "{field}: worker stored {via_worker}, direct stored {direct}"
        );
    }
    assert!(
        via_worker.contains("12345678901234567890123"),
        "the big integer as written: {via_worker}"
    );
    // The reply's `_source` is the engine's, as written too.
    let echoed = reply["result"]["hits"][0]["_source"]["big"].to_string();
    assert_eq!(echoed, "12345678901234567890123", "{reply}");
    worker.stop().await;
}
