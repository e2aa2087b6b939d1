//! SPEC section 8, `document:mUpsert`: an existing document gets `changes` merged, a
//! missing one is created from `default` and `changes` with the creation metadata;
//! per-document errors; both response formats; the same limits as mUpdate.

mod support;

use mupdate_worker::config::Format;
use serde_json::{Value, json};
use support::*;

fn upsert(col: &Collection, documents: Value) -> Value {
    let mut envelope = col.envelope(documents);
    envelope["action"] = json!("mUpsert");
    envelope
}

#[tokio::test]
async fn existing_documents_are_merged_and_missing_ones_created() {
    let col = Collection::create(&[("a", json!({"n": 1, "keep": true}))]).await;
    let worker = Worker::start().await;
    let reply = call(
        &worker,
        &upsert(
            &col,
            json!([
                {"_id": "a", "changes": {"n": 2}, "default": {"n": 0, "fresh": true}},
                {"_id": "b", "changes": {"n": 3}, "default": {"n": 0, "fresh": true}},
                {"_id": "c", "changes": {"n": 4}}]),
        ),
    )
    .await;
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["action"], "mUpsert");
    let hits = reply["result"]["hits"].as_array().unwrap();
    let summary: Vec<(&str, u64, bool)> = hits
        .iter()
        .map(|h| {
            let id = h["_id"].as_str().unwrap();
            (
                id,
                h["status"].as_u64().unwrap(),
                h["created"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("a", 200, false), ("b", 201, true), ("c", 201, true)]
    );

    let (a, version) = col.get("a").await;
    assert_eq!(
        (a["n"].as_i64(), a["keep"].as_bool(), version),
        (Some(2), Some(true), 2)
    );
    assert!(
        a.get("fresh").is_none(),
        "default only applies to a created document"
    );
    let (b, version) = col.get("b").await;
    assert_eq!(version, 1);
    assert_eq!(b["n"], 3, "changes win over default");
    assert_eq!(b["fresh"], true);
    let info = &b["_kuzzle_info"];
    assert_eq!(info["author"], Value::Null);
    assert!(info["createdAt"].as_i64().unwrap() > 0);
    assert!(
        info.get("updatedAt").is_none(),
        "created, never updated: {b}"
    );
    assert_eq!(col.get("c").await.0["n"], 4);
    // The hit carries the document as stored.
    assert_eq!(hits[1]["_source"]["fresh"], true);
    worker.stop().await;
}

#[tokio::test]
async fn invalid_entries_are_per_document_errors_in_place() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let worker = Worker::start().await;
    let documents = json!([
        {"_id": "a", "changes": 1},
        {"_id": "a", "changes": {"n": 2}, "default": [1]},
        {"changes": {"n": 2}},
        {"_id": "a", "body": {"n": 2}},
        {"_id": "a", "changes": {"n": 5}}]);
    let reply = call(&worker, &upsert(&col, documents.clone())).await;
    assert_eq!(reply["status"], 206, "{reply}");
    let errors = reply["error"]["errors"].as_array().unwrap();
    let reasons: Vec<&str> = errors
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "document changes must be an object",
            "document default must be an object",
            "document _id must be a string",
            "document changes must be an object",
        ]
    );
    for (error, sent) in errors.iter().zip(documents.as_array().unwrap()) {
        assert_eq!(error["status"], 400);
        assert_eq!(&error["document"], sent, "each document as sent");
    }
    assert_eq!(reply["result"]["total"], 1);
    assert_eq!(col.get("a").await.0["n"], 5);
    worker.stop().await;
}

#[tokio::test]
async fn v2_successes_say_created_and_strict_names_the_action() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let mut settings = settings();
    settings.response.format = Format::V2;
    let worker = Worker::start_with(settings).await;
    let reply = call(
        &worker,
        &upsert(
            &col,
            json!([{"_id": "a", "changes": {"n": 2}}, {"_id": "b", "changes": {"n": 1}}]),
        ),
    )
    .await;
    assert_eq!(reply["status"], 200, "{reply}");
    let successes = &reply["result"]["successes"];
    assert_eq!(successes[0]["created"], false);
    assert_eq!(successes[0]["status"], 200);
    assert_eq!(successes[1]["created"], true);
    assert_eq!(successes[1]["status"], 201);
    assert_eq!(successes[1]["_source"]["n"], 1);

    let mut strict = upsert(&col, json!([{"_id": "a", "changes": 3}]));
    strict["strict"] = json!(true);
    let reply = call(&worker, &strict).await;
    assert_eq!(reply["status"], 400, "{reply}");
    assert_eq!(
        reply["error"]["message"],
        "At least one of the mUpsert actions failed."
    );
    assert_eq!(reply["result"], Value::Null);
    worker.stop().await;
}

#[tokio::test]
async fn limits_and_unknown_collections_apply_as_for_mupdate() {
    let col = Collection::create(&[]).await;
    let worker = Worker::start().await;
    let many: Vec<Value> = (0..201)
        .map(|i| json!({"_id": format!("d{i}"), "changes": {}}))
        .collect();
    let reply = call(&worker, &upsert(&col, json!(many))).await;
    assert_eq!(reply["status"], 413);
    assert_eq!(
        reply["error"]["id"],
        "services.storage.write_limit_exceeded"
    );
    let mut unknown = upsert(&col, json!([{"_id": "a", "changes": {}}]));
    unknown["collection"] = json!("nope");
    let reply = call(&worker, &unknown).await;
    assert_eq!(reply["status"], 412);
    assert_eq!(reply["error"]["id"], "services.storage.unknown_collection");
    assert!(
        !index_exists(&format!("&{}.nope", col.index)).await,
        "no index created"
    );
    worker.stop().await;
}
