//! Issue 21: the whole write side of Kuzzle's document controller, on the real servers:
//! create, createOrReplace, replace, delete and their m-forms, and the single `update`
//! and `upsert`; what each writes and answers, in both formats; a replace that never
//! recreates a document deleted meanwhile; per-document order across actions; ids the
//! worker makes for a request that leaves them to it.

mod support;

use mupdate_worker::config::{Format, Settings};
use serde_json::{Value, json};
use support::*;

fn v2() -> Settings {
    let mut s = settings();
    s.response.format = Format::V2;
    s
}

/// An m-form envelope of `action` for this collection.
fn many(col: &Collection, action: &str, documents: Value) -> Value {
    let mut envelope = col.envelope(documents);
    envelope["action"] = json!(action);
    envelope
}

/// A single-document envelope: `_id` (when given) and `body` (when given).
fn one(col: &Collection, action: &str, id: Option<&str>, body: Option<Value>) -> Value {
    let mut envelope = json!({"index": col.index, "collection": col.collection,
                              "controller": "document", "action": action});
    if let Some(id) = id {
        envelope["_id"] = json!(id);
    }
    if let Some(body) = body {
        envelope["body"] = body;
    }
    envelope
}

fn mdelete(col: &Collection, ids: Value) -> Value {
    let mut envelope = many(col, "mDelete", Value::Null);
    envelope["body"] = json!({ "ids": ids });
    envelope
}

async fn exists(col: &Collection, id: &str) -> bool {
    col.get(id).await.1 > 0
}

/// The ids an index holds (refreshed first).
async fn stored_ids(col: &Collection) -> Vec<String> {
    let es = http();
    es.post(format!("{}/{}/_refresh", col.es, path(&col.physical)))
        .send()
        .await
        .unwrap();
    let found: Value = es
        .post(format!("{}/{}/_search", col.es, path(&col.physical)))
        .json(&json!({"size": 100, "_source": false, "sort": ["_doc"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ids: Vec<String> = found["hits"]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

fn summary(successes: &Value) -> Vec<(String, u64, String)> {
    successes
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["_id"].as_str().unwrap_or_default().to_owned(),
                h["status"].as_u64().unwrap(),
                h["result"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn mcreate_creates_new_ids_makes_missing_ones_and_refuses_existing_ones() {
    let col = Collection::create(&[("old", json!({"n": 1}))]).await;
    let worker = Worker::start_with(v2()).await;
    let reply = call(
        &worker,
        &many(
            &col,
            "mCreate",
            json!([{"_id": "a", "body": {"n": 2, "_kuzzle_info": {"author": "forged"}}},
                   {"body": {"n": 3}},
                   {"_id": "old", "body": {"n": 4}},
                   {"_id": "b", "body": 5}]),
        ),
    )
    .await;
    assert_eq!(reply["status"], 200, "{reply}");
    let successes = &reply["result"]["successes"];
    let made = successes[1]["_id"].as_str().unwrap().to_owned();
    assert_eq!(made.len(), 22, "128 bits, URL-safe base64: {made}");
    assert!(
        made.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert_eq!(
        summary(successes),
        [
            ("a".into(), 201, "created".into()),
            (made.clone(), 201, "created".into())
        ]
    );
    assert_eq!(successes[0]["created"], true);
    assert_eq!(successes[0]["_version"], 1);
    // The hit's `_source` is the document as written, metadata (Kuzzle's, never the
    // client's) included.
    assert_eq!(successes[0]["_source"]["n"], 2);
    let info = &successes[0]["_source"]["_kuzzle_info"];
    assert_eq!(
        (&info["author"], &info["updatedAt"], &info["updater"]),
        (&Value::Null, &Value::Null, &Value::Null)
    );
    assert!(info["createdAt"].as_i64().unwrap() > 0);
    let errors = reply["result"]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{reply}");
    assert_eq!(
        (&errors[0]["status"], &errors[0]["reason"]),
        (&json!(400), &json!("document already exists"))
    );
    assert_eq!(errors[0]["document"]["_id"], "old");
    assert_eq!(errors[1]["reason"], "document body must be an object");
    assert_eq!(col.get("old").await.0, json!({"n": 1}), "never overwritten");
    let (a, version) = col.get("a").await;
    assert_eq!((a["n"].as_i64(), version), (Some(2), 1));
    assert_eq!(a["_kuzzle_info"], *info, "stored as answered");
    assert_eq!(col.get(&made).await.0["n"], 3);
    worker.stop().await;
}

#[tokio::test]
async fn mcreate_or_replace_writes_whole_documents_and_says_which_were_created() {
    let col = Collection::create(&[("a", json!({"n": 1, "gone": true}))]).await;
    let worker = Worker::start_with(v2()).await;
    let reply = call(
        &worker,
        &many(
            &col,
            "mCreateOrReplace",
            json!([{"_id": "a", "body": {"n": 2}}, {"_id": "b", "body": {"n": 3}}]),
        ),
    )
    .await;
    assert_eq!(reply["status"], 200, "{reply}");
    let successes = &reply["result"]["successes"];
    assert_eq!(
        summary(successes),
        [
            ("a".into(), 200, "updated".into()),
            ("b".into(), 201, "created".into())
        ]
    );
    assert_eq!(
        (&successes[0]["created"], &successes[1]["created"]),
        (&json!(false), &json!(true))
    );
    let (a, version) = col.get("a").await;
    assert_eq!(
        (a.get("gone"), a["n"].as_i64(), version),
        (None, Some(2), 2)
    );
    // `source: false`, which mCreateOrReplace takes: no `_source` in the hits.
    let mut quiet = many(
        &col,
        "mCreateOrReplace",
        json!([{"_id": "c", "body": {"n": 4}}]),
    );
    quiet["source"] = json!(false);
    let reply = call(&worker, &quiet).await;
    assert!(
        reply["result"]["successes"][0].get("_source").is_none(),
        "{reply}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn mreplace_replaces_existing_documents_whole_and_never_creates_one() {
    let col = Collection::create(&[("a", json!({"n": 1, "gone": true}))]).await;
    let worker = Worker::start_with(v2()).await;
    let reply = call(
        &worker,
        &many(
            &col,
            "mReplace",
            json!([{"_id": "a", "body": {"n": 2, "s": "x"}}, {"_id": "nope", "body": {"n": 3}},
                   {"body": {"n": 4}}]),
        ),
    )
    .await;
    assert_eq!(reply["status"], 200, "{reply}");
    let successes = &reply["result"]["successes"];
    assert_eq!(summary(successes), [("a".into(), 200, "updated".into())]);
    assert_eq!(successes[0]["_source"]["s"], "x");
    let errors = &reply["result"]["errors"];
    assert_eq!(
        (&errors[0]["status"], &errors[0]["reason"]),
        (&json!(404), &json!("document not found")),
        "{reply}"
    );
    assert_eq!(errors[1]["reason"], "document _id must be a string");
    let (a, version) = col.get("a").await;
    assert_eq!(a.get("gone"), None, "replaced whole: {a}");
    assert_eq!((a["n"].as_i64(), version), (Some(2), 2));
    assert!(a["_kuzzle_info"]["createdAt"].as_i64().is_some());
    assert!(!exists(&col, "nope").await, "a replace never creates");
    worker.stop().await;
}

#[tokio::test]
async fn mdelete_deletes_by_id_and_lists_what_it_could_not() {
    let col = Collection::create(&[("a", json!({"n": 1})), ("b", json!({"n": 2}))]).await;
    let worker = Worker::start_with(v2()).await;
    let reply = call(&worker, &mdelete(&col, json!(["a", "nope", 5, "b"]))).await;
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["result"]["successes"], json!(["a", "b"]));
    assert_eq!(
        reply["result"]["errors"],
        json!([{"_id": "nope", "reason": "document not found", "status": 404},
               {"_id": 5, "reason": "document _id must be a string", "status": 400}])
    );
    assert!(stored_ids(&col).await.is_empty());
    // strict: the deletes are done, and the request fails naming them as Kuzzle does.
    let mut strict = mdelete(&col, json!(["a"]));
    strict["strict"] = json!(true);
    let reply = call(&worker, &strict).await;
    assert_eq!(reply["status"], 400, "{reply}");
    assert_eq!(
        reply["error"]["id"],
        "api.process.incomplete_multiple_request"
    );
    assert_eq!(reply["error"]["props"], json!(["delete"]));
    worker.stop().await;
}

#[tokio::test]
async fn the_m_forms_answer_the_seeds_layout_in_v1() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let worker = Worker::start().await;
    let reply = call(
        &worker,
        &many(
            &col,
            "mCreate",
            json!([{"_id": "a", "body": {}}, {"_id": "b", "body": {"n": 2}}]),
        ),
    )
    .await;
    assert_eq!(reply["status"], 206, "{reply}");
    assert_eq!(reply["result"]["total"], 1);
    let hit = &reply["result"]["hits"][0];
    assert_eq!(
        (&hit["_id"], &hit["result"], &hit["status"]),
        (&json!("b"), &json!("created"), &json!(201))
    );
    assert_eq!(hit["_type"], json!(col.collection));
    assert_eq!(reply["error"]["errors"][0]["document"]["_id"], "a");
    assert_eq!(
        reply["error"]["message"],
        "1 of 2 documents could not be created"
    );
    let reply = call(&worker, &mdelete(&col, json!(["a", "b", "nope"]))).await;
    assert_eq!(reply["status"], 206, "{reply}");
    assert_eq!(reply["result"]["total"], 2);
    assert_eq!(reply["result"]["hits"][1]["result"], "deleted");
    // mDelete's failures read as Kuzzle's, in v1 too (no document to echo).
    assert_eq!(
        reply["error"]["errors"],
        json!([{"_id": "nope", "reason": "document not found", "status": 404}])
    );
    worker.stop().await;
}

#[tokio::test]
async fn the_single_forms_answer_one_result_or_the_requests_error() {
    let col = Collection::create(&[("a", json!({"n": 1, "s": "old"}))]).await;
    let worker = Worker::start_with(v2()).await;
    let ask = |action: &'static str, id: Option<&'static str>, body: Option<Value>| {
        one(&col, action, id, body)
    };

    // create: `{_id, _source, _version}`; an existing id is the request's error.
    let reply = call(&worker, &ask("create", Some("c"), Some(json!({"n": 2})))).await;
    assert_eq!(reply["status"], 200, "{reply}");
    let result = &reply["result"];
    assert_eq!(
        (&result["_id"], &result["_version"]),
        (&json!("c"), &json!(1))
    );
    assert_eq!(result["_source"]["n"], 2);
    assert_eq!(result["_source"]["_kuzzle_info"]["updatedAt"], Value::Null);
    assert!(result.get("created").is_none(), "{reply}");
    let reply = call(&worker, &ask("create", Some("c"), Some(json!({"n": 3})))).await;
    assert_eq!(
        (
            &reply["status"],
            &reply["error"]["id"],
            &reply["error"]["message"]
        ),
        (
            &json!(400),
            &json!("services.storage.document_already_exists"),
            &json!("Document already exists.")
        ),
        "{reply}"
    );
    let reply = call(&worker, &ask("create", None, Some(json!({"n": 4})))).await;
    let made = reply["result"]["_id"].as_str().unwrap().to_owned();
    assert_eq!(col.get(&made).await.0["n"], 4);

    // createOrReplace: `created`, and the single form's metadata (updatedAt set).
    let reply = call(
        &worker,
        &ask("createOrReplace", Some("a"), Some(json!({"n": 5}))),
    )
    .await;
    let result = &reply["result"];
    assert_eq!(
        (&result["created"], &result["_version"]),
        (&json!(false), &json!(2)),
        "{reply}"
    );
    let stored = col.get("a").await.0;
    assert_eq!(stored.get("s"), None);
    assert!(
        stored["_kuzzle_info"]["updatedAt"].as_i64().is_some(),
        "{stored}"
    );

    // replace: a missing document is Kuzzle's not_found.
    let reply = call(&worker, &ask("replace", Some("zz"), Some(json!({"n": 6})))).await;
    assert_eq!(
        (
            &reply["status"],
            &reply["error"]["id"],
            &reply["error"]["message"]
        ),
        (
            &json!(404),
            &json!("services.storage.not_found"),
            &json!(format!(
                "Document \"zz\" not found in \"{}\":\"{}\".",
                col.index, col.collection
            ))
        ),
        "{reply}"
    );
    assert_eq!(
        reply["error"]["props"],
        json!(["zz", col.index, col.collection])
    );
    let reply = call(&worker, &ask("replace", Some("c"), Some(json!({"n": 7})))).await;
    assert_eq!(reply["result"]["_source"]["n"], 7, "{reply}");

    // update: the changes and their metadata as `_source` (Kuzzle's default), or the
    // whole stored document with `source: true`.
    let reply = call(&worker, &ask("update", Some("c"), Some(json!({"m": 1})))).await;
    let source = &reply["result"]["_source"];
    assert_eq!(source["m"], 1, "{reply}");
    assert!(source.get("n").is_none(), "only the changes: {reply}");
    assert!(source["_kuzzle_info"]["updatedAt"].as_i64().is_some());
    assert!(
        source["_kuzzle_info"]["createdAt"].as_i64().is_some(),
        "the stored metadata, as Kuzzle answers it: {reply}"
    );
    let mut full = ask("update", Some("c"), Some(json!({"m": 2})));
    full["source"] = json!(true);
    let reply = call(&worker, &full).await;
    assert_eq!(
        (
            &reply["result"]["_source"]["n"],
            &reply["result"]["_source"]["m"]
        ),
        (&json!(7), &json!(2)),
        "{reply}"
    );
    let reply = call(&worker, &ask("update", Some("zz"), Some(json!({"m": 1})))).await;
    assert_eq!(
        reply["error"]["id"], "services.storage.not_found",
        "{reply}"
    );

    // upsert: `{_id, _version, created}`.
    let reply = call(
        &worker,
        &ask(
            "upsert",
            Some("u"),
            Some(json!({"changes": {"n": 8}, "default": {"d": 1}})),
        ),
    )
    .await;
    assert_eq!(
        reply["result"],
        json!({"_id": "u", "_version": 1, "created": true}),
        "{reply}"
    );

    // delete: `{_id}`; a missing one is not_found; no `_id` is the request's error.
    let reply = call(&worker, &ask("delete", Some("u"), None)).await;
    assert_eq!(reply["result"], json!({"_id": "u"}), "{reply}");
    assert!(!exists(&col, "u").await);
    let reply = call(&worker, &ask("delete", Some("u"), None)).await;
    assert_eq!(reply["status"], 404, "{reply}");
    let reply = call(&worker, &ask("delete", None, None)).await;
    assert_eq!(
        (&reply["status"], &reply["error"]["id"]),
        (&json!(400), &json!("api.assert.missing_argument")),
        "{reply}"
    );
    let reply = call(&worker, &ask("replace", Some("c"), None)).await;
    assert_eq!(reply["error"]["id"], "api.assert.body_required", "{reply}");
    worker.stop().await;
}

/// Kuzzle checks that a document exists with one call and writes it with another, so a
/// document deleted in between is written again. The worker's replace write is guarded
/// by the version its check read: the engine refuses it once the document is gone. The
/// worker here waits 300 ms between its check and its write (`bulk_linger_ms`: the write
/// waits for company), and the delete lands in that window, every round; then whatever
/// the order, the document ends deleted.
#[tokio::test]
async fn a_replace_racing_a_delete_never_recreates_the_document() {
    let col = Collection::create(&[]).await;
    let mut settings = v2();
    settings.storage.bulk_linger_ms = 300;
    let worker = Worker::start_with(settings).await;
    let es = http();
    let doc_url = |id: &str| format!("{}/{}/_doc/{id}", col.es, path(&col.physical));
    for round in 0..5 {
        let id = format!("r{round}");
        es.put(doc_url(&id))
            .json(&json!({"n": 0}))
            .send()
            .await
            .unwrap();
        let envelope = one(&col, "replace", Some(&id), Some(json!({"n": round})));
        let replace = call(&worker, &envelope);
        let delete = async {
            // After the check (a few ms), before the write (300 ms).
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let r = es.delete(doc_url(&id)).send().await.unwrap();
            assert!(r.status().is_success(), "deleted while the replace waits");
        };
        let (reply, ()) = tokio::join!(replace, delete);
        assert!(
            !exists(&col, &id).await,
            "round {round}: the deleted document came back ({reply})"
        );
        assert_eq!(
            reply["error"]["id"], "services.storage.not_found",
            "found missing when checked again: {reply}"
        );
    }
    worker.stop().await;
}

/// Requests of the same document are applied in the order the worker received them,
/// whatever their actions: a create, updates, a delete and a create again, published
/// back to back without waiting for replies, end as the last one left it.
#[tokio::test]
async fn the_order_per_document_holds_across_actions() {
    let col = Collection::create(&[]).await;
    let worker = Worker::start_with(v2()).await;
    let amqp = Amqp::open().await;
    let replies = fresh("order-replies");
    amqp.channel
        .queue_declare(
            replies.as_str().into(),
            lapin::options::QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let mut sent = 0;
    for round in 0..10 {
        let id = format!("o{round}");
        let steps = [
            one(&col, "create", Some(&id), Some(json!({"n": 1}))),
            one(&col, "update", Some(&id), Some(json!({"n": 2}))),
            one(&col, "replace", Some(&id), Some(json!({"n": 3}))),
            many(&col, "mDelete", Value::Null),
            one(&col, "create", Some(&id), Some(json!({"n": 4}))),
            one(
                &col,
                "upsert",
                Some(&id),
                Some(json!({"changes": {"m": 5}})),
            ),
        ];
        for (step, mut envelope) in steps.into_iter().enumerate() {
            if step == 3 {
                envelope["body"] = json!({ "ids": [id] });
            }
            let props = lapin::BasicProperties::default()
                .with_reply_to(replies.as_str().into())
                .with_correlation_id(format!("{id}-{step}").into());
            publish(
                &amqp.channel,
                worker.request_queue(),
                &serde_json::to_vec(&envelope).unwrap(),
                props,
            )
            .await;
            sent += 1;
        }
    }
    let answers = next_messages(&amqp.channel, &replies, sent).await;
    for answer in &answers {
        let reply: Value = serde_json::from_slice(&answer.data).unwrap();
        assert_eq!(
            reply["status"], 200,
            "every step finds what the one before left: {reply}"
        );
    }
    for round in 0..10 {
        let (doc, version) = col.get(&format!("o{round}")).await;
        assert_eq!(
            (doc["n"].as_i64(), doc["m"].as_i64()),
            (Some(4), Some(5)),
            "{doc}"
        );
        assert!(version > 0);
    }
    amqp.close().await;
    worker.stop().await;
}

/// A request that leaves its ids to the worker and has an identity of its own
/// (`requestId`) gets the same ids on every delivery: delivered twice (a producer's
/// retry, a redelivery after the first's documents were written), it creates its
/// documents once and answers both deliveries as created. Another request, or the same
/// bytes from another user, gets other ids.
#[tokio::test]
async fn ids_made_for_a_request_are_the_same_on_its_every_delivery() {
    let col = Collection::create(&[]).await;
    let worker = Worker::start_with(v2()).await;
    let mut envelope = many(
        &col,
        "mCreate",
        json!([{"body": {"n": 1}}, {"body": {"n": 2}}]),
    );
    envelope["requestId"] = json!(fresh("req"));
    let first = call(&worker, &envelope).await;
    let again = call(&worker, &envelope).await;
    let ids = |reply: &Value| -> Vec<String> {
        summary(&reply["result"]["successes"])
            .into_iter()
            .map(|(id, status, _)| {
                assert_eq!(status, 201, "{reply}");
                id
            })
            .collect()
    };
    assert_eq!(ids(&first).len(), 2, "{first}");
    assert_eq!(ids(&first), ids(&again), "{again}");
    assert_eq!(stored_ids(&col).await.len(), 2);
    // Another requestId: other ids, other documents.
    envelope["requestId"] = json!(fresh("req"));
    let other = call(&worker, &envelope).await;
    assert_ne!(ids(&first), ids(&other));
    // No identity at all (no requestId; `call` sets a correlation id, not a message
    // id), or an empty one: random ids, each delivery its own documents.
    envelope.as_object_mut().unwrap().remove("requestId");
    let a = call(&worker, &envelope).await;
    let b = call(&worker, &envelope).await;
    assert_ne!(ids(&a), ids(&b));
    envelope["requestId"] = json!("");
    let c = call(&worker, &envelope).await;
    let d = call(&worker, &envelope).await;
    assert_ne!(ids(&c), ids(&d), "an empty requestId identifies nothing");
    assert_eq!(stored_ids(&col).await.len(), 12);
    worker.stop().await;
}

/// A request whose bulk call is given up (its answer held back by a proxy past
/// `storage.write_timeout_ms`, the call applied) and sent again: the resend's answers
/// are read knowing the first call may have done the work.
async fn sent_twice(col: &Collection, envelope: &Value) -> Value {
    let proxy = support::proxy::Proxy::start(&ES_URL).await;
    let mut settings = v2();
    settings.storage.url = proxy.url();
    settings.storage.timeout_ms = 1000;
    settings.storage.write_timeout_ms = 1000;
    settings.storage.retry_max_delay_ms = 200;
    let worker = Worker::start_with(settings).await;
    // The target known to exist: only the bulk call meets the latency.
    let warm = call(
        &worker,
        &one(col, "upsert", Some("warm"), Some(json!({"changes": {}}))),
    )
    .await;
    assert_eq!(warm["status"], 200, "{warm}");
    proxy.set_latency(
        std::time::Duration::ZERO,
        std::time::Duration::from_millis(2500),
    );
    let (reply, ()) = tokio::join!(call(&worker, envelope), async {
        tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
        proxy.set_latency(std::time::Duration::ZERO, std::time::Duration::ZERO);
    });
    worker.stop().await;
    reply
}

/// A delete whose first call was applied finds its document gone when sent again: that
/// is the delete done, not "document not found".
#[tokio::test]
async fn a_delete_sent_again_after_an_uncertain_call_is_a_success() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let reply = sent_twice(&col, &mdelete(&col, json!(["a"]))).await;
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["result"]["successes"], json!(["a"]), "{reply}");
    assert_eq!(reply["result"]["errors"], json!([]), "{reply}");
    assert!(!exists(&col, "a").await);
}

/// A create of ids the worker made for the request, sent again after its first call
/// was applied, finds its own documents: created, once.
#[tokio::test]
async fn a_create_of_made_ids_sent_again_after_an_uncertain_call_is_a_success() {
    let col = Collection::create(&[]).await;
    let mut envelope = many(&col, "mCreate", json!([{"body": {"n": 1}}]));
    envelope["requestId"] = json!(fresh("req"));
    let reply = sent_twice(&col, &envelope).await;
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["result"]["errors"], json!([]), "{reply}");
    let made = reply["result"]["successes"][0]["_id"].as_str().unwrap();
    let mut expected = vec![made.to_owned(), "warm".to_owned()];
    expected.sort();
    assert_eq!(stored_ids(&col).await, expected);
}
