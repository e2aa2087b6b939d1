//! Hostile input: whatever arrives gets a clear error reply, nothing crashes, no request
//! reaches an index it names indirectly, and secrets stay out of replies and logs.

mod support;

use std::process::{Command, Stdio};

use serde_json::{Value, json};
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

#[tokio::test]
async fn secrets_appear_in_neither_replies_nor_logs() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let settings = settings();
    let mut child = worker_command(&settings)
        .env("MUPDATE__STORAGE__USERNAME", "elastic")
        .env("MUPDATE__STORAGE__PASSWORD", "storage-pass-s3cret")
        .env("RUST_LOG", "trace")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logs = stderr_lines(&mut child);
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
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let logs = logs.join().unwrap().join("\n");
    assert!(logs.contains("replied"), "the request was logged: {logs}");
    assert!(!logs.contains("s3cret"), "a secret in the logs");
    delete_topology(&settings).await;
}
