//! Hostile input: whatever arrives gets a clear error reply, nothing crashes, no request
//! reaches an index it names indirectly, and secrets stay out of replies and logs.

mod support;

use std::process::Stdio;

use serde_json::{Value, json};
use support::binary::BinaryWorker;
use support::*;

async fn assert_rejected(worker: &Worker, body: &[u8], status: u64, id: &str) -> Value {
    let reply = call_bytes(worker, body).await;
    assert_eq!(reply["status"], status, "{reply}");
    assert_eq!(reply["error"]["id"], id, "{reply}");
    assert_eq!(reply["result"], Value::Null);
    reply
}

#[tokio::test]
async fn arbitrary_bytes_and_invalid_utf8_get_a_400() {
    let worker = Worker::start().await;
    for body in [
        &b"\xff\xfe\x00garbage"[..],
        b"",
        b"null",
        b"\"a string\"",
        b"{\"index\": \"\xc3\x28\"}",
    ] {
        assert_rejected(&worker, body, 400, "api.assert.invalid_argument").await;
    }
    // The worker is still there for a good request.
    let reply = call(
        &worker,
        &json!({"index": "a", "collection": "b", "controller": "document",
                                      "action": "mUpdate", "body": {"documents": []}}),
    )
    .await;
    assert_eq!(reply["status"], 200);
    worker.stop().await;
}

#[tokio::test]
async fn a_message_over_the_default_limit_gets_a_413() {
    let worker = Worker::start().await;
    let huge = vec![b' '; 16 * 1024 * 1024 + 1];
    assert_rejected(&worker, &huge, 413, "api.assert.body_too_large").await;
    worker.stop().await;
}

#[tokio::test]
async fn deep_nesting_gets_a_400() {
    let worker = Worker::start().await;
    let deep = format!(
        r#"{{"index":"a","collection":"b","controller":"document","action":"mUpdate","volatile":{}{}}}"#,
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    assert_rejected(&worker, deep.as_bytes(), 400, "api.assert.invalid_argument").await;
    let deep_body = format!(
        r#"{{"index":"a","collection":"b","controller":"document","action":"mUpdate","body":{{"documents":[{{"_id":"x","body":{}1{}}}]}}}}"#,
        r#"{"a":"#.repeat(10_000),
        "}".repeat(10_000)
    );
    assert_rejected(
        &worker,
        deep_body.as_bytes(),
        400,
        "api.assert.invalid_argument",
    )
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn names_that_would_widen_or_escape_the_target_are_refused_and_touch_nothing() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let worker = Worker::start().await;
    let long = "x".repeat(200);
    let cases: [(&str, &str, &str); 10] = [
        ("index", "*", "services.storage.invalid_index_name"),
        ("index", "_all", "services.storage.invalid_index_name"),
        ("index", "a,b", "services.storage.invalid_index_name"),
        ("index", "../x", "services.storage.invalid_index_name"),
        ("index", "%kuzzle", "services.storage.index_reserved"),
        ("index", "ShOp", "services.storage.invalid_index_name"),
        ("index", &long, "services.storage.invalid_index_name"),
        (
            "collection",
            "*",
            "services.storage.invalid_collection_name",
        ),
        (
            "collection",
            "col,other",
            "services.storage.invalid_collection_name",
        ),
        (
            "collection",
            &long,
            "services.storage.invalid_collection_name",
        ),
    ];
    for (key, name, id) in cases {
        let mut envelope = col.envelope(json!([{"_id": "a", "body": {"n": 666}}]));
        envelope[key] = json!(name);
        let reply = call(&worker, &envelope).await;
        assert_eq!(reply["status"], 400, "{key} {name}: {reply}");
        assert_eq!(reply["error"]["id"], id, "{key} {name}");
    }
    let (source, version) = col.get("a").await;
    assert_eq!(
        (source["n"].as_i64(), version),
        (Some(1), 1),
        "the real index was never reached"
    );
    worker.stop().await;
}

/// A canary collection a placeholder-shaped name would expand to: `&{index}.{collection}`
/// with index `{collection}` and collection `orders` used to reach `&orders.orders`.
#[tokio::test]
async fn names_shaped_like_placeholders_are_invalid_and_reach_no_other_index() {
    let canary = Collection::create(&[("a", json!({"n": 1}))]).await;
    let worker = Worker::start().await;
    let mut index_only = settings();
    index_only.storage.index_template = "{index}".into();
    let index_only = Worker::start_with(index_only).await;
    for (key, name, id) in [
        (
            "index",
            "{collection}",
            "services.storage.invalid_index_name",
        ),
        ("index", "{index}", "services.storage.invalid_index_name"),
        ("index", "a{index}", "services.storage.invalid_index_name"),
        ("index", "x}", "services.storage.invalid_index_name"),
        ("index", "{", "services.storage.invalid_index_name"),
        (
            "collection",
            "{index}",
            "services.storage.invalid_collection_name",
        ),
        (
            "collection",
            "{collection}",
            "services.storage.invalid_collection_name",
        ),
    ] {
        for worker in [&worker, &index_only] {
            let mut envelope = canary.envelope(json!([{"_id": "a", "body": {"n": 666}}]));
            envelope[key] = json!(name);
            if key == "index" {
                // What the name would have expanded to.
                envelope["collection"] = json!(canary.index);
            }
            let reply = call(worker, &envelope).await;
            assert_eq!(reply["status"], 400, "{key} {name}: {reply}");
            assert_eq!(reply["error"]["id"], id, "{key} {name}");
        }
    }
    let (source, version) = canary.get("a").await;
    assert_eq!(
        (source["n"].as_i64(), version),
        (Some(1), 1),
        "the canary is untouched"
    );
    worker.stop().await;
    index_only.stop().await;
}

#[tokio::test]
async fn dotted_metadata_keys_cant_forge_the_updater() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let worker = Worker::start().await;
    let envelope = col.envelope(json!([{"_id": "a", "body": {
        "n": 2, "_kuzzle_info.updater": "admin", "_kuzzle_info.author": "admin",
        "_kuzzle_info": {"updater": "admin"}}}]));
    let reply = call(&worker, &envelope).await;
    assert_eq!(reply["status"], 200, "{reply}");
    http()
        .post(format!("{ES_URL}/{}/_refresh", path(&col.physical)))
        .send()
        .await
        .unwrap();
    let found: Value = http()
        .post(format!("{ES_URL}/{}/_search", path(&col.physical)))
        .json(&json!({"query": {"bool": {"should": [
            {"term": {"_kuzzle_info.updater": "admin"}},
            {"term": {"_kuzzle_info.author": "admin"}}]}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["hits"]["total"]["value"], 0, "{found}");
    let (source, _) = col.get("a").await;
    assert_eq!(source["n"], 2);
    assert_eq!(source["_kuzzle_info"]["updater"], Value::Null);
    worker.stop().await;
}

#[tokio::test]
async fn secrets_appear_in_neither_replies_nor_logs() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let settings = settings();
    let mut binary = BinaryWorker::spawn(
        worker_command(&settings)
            .env("MUPDATE__STORAGE__USERNAME", "elastic")
            .env("MUPDATE__STORAGE__PASSWORD", "storage-pass-s3cret")
            .env("RUST_LOG", "trace")
            .stderr(Stdio::piped()),
    );
    wait_consumers(&settings.amqp.request_queue, 1).await;
    let client = mupdate_worker::client::Client::connect(AMQP_URL)
        .await
        .unwrap();
    let mut good = col.envelope(json!([{"_id": "a", "body": {"n": 2}}]));
    good["jwt"] = json!("jwt-token-s3cret");
    let mut bad = good.clone();
    bad["refresh"] = json!("nope");
    for (i, envelope) in [good, bad].iter().enumerate() {
        let reply = client
            .request(
                &settings.amqp.request_queue,
                &serde_json::to_vec(envelope).unwrap(),
                &format!("s{i}"),
                TIMEOUT,
            )
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&reply);
        assert!(!text.contains("s3cret"), "{text}");
    }
    assert_eq!(binary.terminate().await.code(), Some(0));
    let logs = binary.stderr();
    assert!(logs.contains("replied"), "the request was logged: {logs}");
    assert!(!logs.contains("s3cret"), "a secret in the logs");
    delete_topology(&settings).await;
}

/// Whatever RUST_LOG says (here everything at trace, lapin's returned messages named
/// explicitly), no document body, reply body or `_source` reaches the logs: not from an
/// unroutable reply (which the broker returns whole), not from failed documents.
#[tokio::test]
async fn no_body_reaches_the_logs_at_any_level() {
    let col = Collection::create(&[("a", json!({"kept": "SOURCE-MARK"}))]).await;
    let settings = settings();
    let mut binary = BinaryWorker::spawn(
        worker_command(&settings)
            .env("RUST_LOG", "trace,lapin::returned_messages=trace")
            .stderr(Stdio::piped()),
    );
    wait_consumers(&settings.amqp.request_queue, 1).await;
    let envelope = col.envelope(json!([
        {"_id": "a", "body": {"n": "BODY-MARK"}},
        {"_id": "missing", "body": {"n": "FAILED-MARK"}}]));
    let amqp = Amqp::open().await;
    // Unroutable: the broker returns the whole reply, `_source` included.
    let props = lapin::BasicProperties::default()
        .with_reply_to(fresh("no-such-queue").as_str().into())
        .with_message_id("unroutable".into());
    let body = serde_json::to_vec(&envelope).unwrap();
    publish(&amqp.channel, &settings.amqp.request_queue, &body, props).await;
    let reply = call_queue(&settings.amqp.request_queue, &body).await;
    assert_eq!(reply["status"], 206, "{reply}");
    let dead = next_message(&amqp.channel, &settings.amqp.dead_letter_queue).await;
    assert_eq!(
        dead.data, body,
        "the unroutable request was dead-lettered as sent"
    );
    amqp.close().await;
    assert_eq!(binary.terminate().await.code(), Some(0));
    let logs = binary.stderr();
    assert!(logs.contains("TRACE"), "trace logging was on");
    for mark in ["SOURCE-MARK", "BODY-MARK", "FAILED-MARK"] {
        // As text, or as the list of byte values a `Debug` of the payload prints.
        let bytes: Vec<String> = mark.bytes().map(|b| b.to_string()).collect();
        assert!(!logs.contains(mark), "{mark} in the logs");
        let found = logs
            .lines()
            .find(|l| l.contains(&bytes.join(", ")))
            .map(|l| l.chars().take(400).collect::<String>());
        assert!(found.is_none(), "{mark} as bytes in the logs: {found:?}");
    }
    delete_topology(&settings).await;
}
