//! The `mupdate-worker` binary as people and scripts use it.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use support::binary::BinaryWorker;
use support::*;

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mupdate-worker"))
}

#[tokio::test]
async fn send_round_trip_prints_the_reply_and_exits_by_status() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let worker = Worker::start().await;
    let queue = worker.request_queue().to_owned();
    let (index, collection) = (col.index.clone(), col.collection.clone());
    let run = move |docs: &'static str| {
        let mut child = binary()
            .args([
                "send",
                "--index",
                &index,
                "--collection",
                &collection,
                "--documents",
                "-",
            ])
            .args(["--refresh", "wait_for", "--timeout", "20"])
            .env("MUPDATE__AMQP__REQUEST_QUEUE", &queue)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(docs.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let ok = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run("{\"_id\":\"a\",\"body\":{\"n\":2}}\n")
    })
    .await
    .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let reply: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(reply["status"], 200);
    assert_eq!(reply["result"]["hits"][0]["_source"]["n"], 2);

    let partial = tokio::task::spawn_blocking(move || {
        run("[{\"_id\":\"a\",\"body\":{\"n\":3}},{\"_id\":\"b\",\"body\":{}}]")
    })
    .await
    .unwrap();
    let reply: Value = serde_json::from_slice(&partial.stdout).unwrap();
    assert_eq!(reply["status"], 206);
    assert!(partial.status.success(), "206 is a 2xx");
    worker.stop().await;
}

#[tokio::test]
async fn send_exits_non_zero_on_an_error_reply() {
    let worker = Worker::start().await;
    let mut file = std::env::temp_dir();
    file.push(format!("{}.json", fresh("envelope")));
    std::fs::write(&file, br#"{"controller":"document","action":"mUpdate","index":"ShOp","collection":"c","body":{"documents":[]}}"#).unwrap();
    let queue = worker.request_queue().to_owned();
    let path = file.clone();
    let out = tokio::task::spawn_blocking(move || {
        binary()
            .args(["send", "--timeout", "20"])
            .arg(&path)
            .env("MUPDATE__AMQP__REQUEST_QUEUE", &queue)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(!out.status.success());
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"]["id"], "services.storage.invalid_index_name");
    worker.stop().await;
}

#[test]
fn config_prints_the_effective_settings_without_secrets() {
    let out = binary()
        .arg("config")
        .env(
            "MUPDATE__AMQP__URL",
            "amqp://bob:hunter2@127.0.0.1:5672/%2f",
        )
        .env("MUPDATE__STORAGE__PASSWORD", "s3cret")
        .env("MUPDATE__AMQP__PREFETCH", "7")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("hunter2") && !text.contains("s3cret"),
        "{text}"
    );
    let settings: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(settings["amqp"]["prefetch"], 7);
    assert_eq!(settings["storage"]["password"], "<redacted>");
}

/// SPEC section 7: environment values are taken verbatim where the key is a string; a
/// number or a boolean is read as one where the key is.
#[test]
fn environment_values_are_strings_where_the_key_is_a_string() {
    let out = binary()
        .arg("config")
        .env("MUPDATE__AMQP__REQUEST_QUEUE", "0123")
        .env("MUPDATE__AMQP__REPLY_QUEUE", "1e5")
        .env("MUPDATE__AMQP__DEAD_LETTER_QUEUE", "TRUE")
        .env("MUPDATE__AMQP__PREFETCH", "64")
        .env("MUPDATE__STORAGE__COMPRESSION", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let settings: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(settings["amqp"]["request_queue"], "0123");
    assert_eq!(settings["amqp"]["reply_queue"], "1e5");
    assert_eq!(settings["amqp"]["dead_letter_queue"], "TRUE");
    assert_eq!(settings["amqp"]["prefetch"], 64);
    assert_eq!(settings["storage"]["compression"], true);
}

/// SPEC section 7: a password or a user name that looks like a number stays as written.
#[test]
fn credentials_that_look_like_numbers_stay_as_written() {
    let out = binary()
        .arg("config")
        .env("MUPDATE__STORAGE__USERNAME", "0123")
        .env("MUPDATE__STORAGE__PASSWORD", "0123")
        .env("MUPDATE__AMQP__REPLY_EXCHANGE", "007")
        .output()
        .unwrap();
    assert!(out.status.success());
    let settings: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(settings["storage"]["username"], "0123");
    assert_eq!(settings["storage"]["password"], "<redacted>");
    assert_eq!(settings["amqp"]["reply_exchange"], "007");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("\"123\""), "{text}");
}

/// Issue 19: a template under which two (index, collection) pairs share one physical index
/// (or every collection of an index shares one) stops the worker at start, with the reason.
#[test]
fn an_ambiguous_index_template_stops_the_worker_with_exit_code_2() {
    for (template, why) in [
        ("{index}", "{collection} exactly once"),
        ("{index}-{collection}", "(a, b-c) and (a-b, c)"),
        ("{index}{collection}", "separate {index} and {collection}"),
    ] {
        // `config` loads and checks the settings as `run` does, and ends.
        let out = binary()
            .arg("config")
            .env("MUPDATE__STORAGE__INDEX_TEMPLATE", template)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{template}: {stderr}");
        assert!(
            stderr.contains("storage.index_template") && stderr.contains(why),
            "{template}: {stderr}"
        );
    }
    let out = binary()
        .arg("config")
        .env(
            "MUPDATE__STORAGE__INDEX_TEMPLATE",
            "kuzzle-{index}.{collection}",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_invalid_setting_stops_the_worker_with_exit_code_2() {
    let out = binary()
        .arg("config")
        .env("MUPDATE__AMQP__PREFETCH", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("amqp.prefetch"));
}

/// Indexes `n` documents `d0…` with `{"seed": i}` into the collection, in one bulk.
async fn seed(col: &Collection, n: usize) {
    let mut body = String::new();
    for i in 0..n {
        body.push_str(&format!(
            "{}\n{}\n",
            json!({"index": {"_index": col.physical, "_id": format!("d{i}")}}),
            json!({"seed": i})
        ));
    }
    let r = http()
        .post(format!("{ES_URL}/_bulk?refresh=true"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

#[tokio::test]
async fn the_loader_applies_every_good_line_and_lists_exactly_the_bad_ones() {
    let col = Collection::create(&[]).await;
    seed(&col, 10_000).await;
    let worker = Worker::start().await;
    let dir = std::env::temp_dir();
    let input = dir.join(format!("{}.ndjson", fresh("updates")));
    let failures = dir.join(format!("{}.ndjson", fresh("failures")));
    let mut lines = String::new();
    let mut bad = Vec::new();
    for i in 0..10_000 {
        let line = match i % 1000 {
            7 => "{not json".to_owned(),
            8 => json!({"body": {"v": i}}).to_string(),
            9 => json!({"_id": format!("nope{i}"), "body": {"v": i}}).to_string(),
            _ => json!({"_id": format!("d{i}"), "body": {"v": i}}).to_string(),
        };
        if (7..=9).contains(&(i % 1000)) {
            bad.push(line.clone());
        }
        lines.push_str(&line);
        lines.push('\n');
    }
    std::fs::write(&input, lines).unwrap();
    let queue = worker.request_queue().to_owned();
    let (index, collection) = (col.index.clone(), col.collection.clone());
    let (input_path, failures_path) = (input.clone(), failures.clone());
    let out = tokio::task::spawn_blocking(move || {
        binary()
            .args([
                "send",
                "--index",
                &index,
                "--collection",
                &collection,
                "--file",
            ])
            .arg(&input_path)
            .arg("--failures")
            .arg(&failures_path)
            .env("MUPDATE__AMQP__REQUEST_QUEUE", &queue)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "failures make exit code 1: {stderr}"
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["lines"], 10_000);
    assert_eq!(summary["updated"], 9_970, "{summary}");
    assert_eq!(summary["failed"], 30);
    assert_eq!(summary["failed_by_status"]["400"]["count"], 20);
    assert_eq!(summary["failed_by_status"]["404"]["count"], 10);
    assert!(stderr.contains("9970 updated, 30 failed"), "{stderr}");

    let listed: Vec<Value> = std::fs::read_to_string(&failures)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut listed_lines: Vec<String> = listed
        .iter()
        .map(|f| match &f["document"] {
            Value::String(raw) => raw.clone(),
            doc => doc.to_string(),
        })
        .collect();
    let mut expected = bad.clone();
    listed_lines.sort();
    expected.sort();
    assert_eq!(
        listed_lines, expected,
        "the failures file lists exactly the bad lines"
    );

    http()
        .post(format!("{ES_URL}/{}/_refresh", path(&col.physical)))
        .send()
        .await
        .unwrap();
    let updated: Value = http()
        .post(format!("{ES_URL}/{}/_count", path(&col.physical)))
        .json(&json!({"query": {"exists": {"field": "v"}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        updated["count"], 9_970,
        "every good update is in the engine"
    );
    assert_eq!(col.get("d1234").await.0["v"], 1234);
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&failures);
    worker.stop().await;
}

#[tokio::test]
async fn the_loader_shows_a_progress_bar_on_a_terminal() {
    let col = Collection::create(&[]).await;
    seed(&col, 1_000).await;
    let worker = Worker::start().await;
    let input = std::env::temp_dir().join(format!("{}.ndjson", fresh("updates")));
    let lines: String = (0..1_000)
        .map(|i| format!("{}\n", json!({"_id": format!("d{i}"), "body": {"v": i}})))
        .collect();
    std::fs::write(&input, lines).unwrap();
    let command = format!(
        "MUPDATE__AMQP__REQUEST_QUEUE={} {} send --index {} --collection {} --file {} --refresh wait_for --in-flight 1",
        worker.request_queue(),
        env!("CARGO_BIN_EXE_mupdate-worker"),
        col.index,
        col.collection,
        input.display()
    );
    // `script` runs the command on a pseudo-terminal and copies what it draws.
    let out = tokio::task::spawn_blocking(move || {
        Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("documents,") && screen.contains("left"),
        "a progress bar: {screen}"
    );
    assert!(screen.contains("1000 updated, 0 failed"), "{screen}");
    let _ = std::fs::remove_file(&input);
    worker.stop().await;
}

#[tokio::test]
async fn ctrl_c_stops_the_loader_cleanly_and_says_what_was_sent() {
    let col = Collection::create(&[]).await;
    seed(&col, 1_000).await;
    let worker = Worker::start().await;
    let input = std::env::temp_dir().join(format!("{}.ndjson", fresh("updates")));
    // 20,000 lines over 1,000 documents, sent one request at a time with wait_for: slow.
    let lines: String = (0..20_000)
        .map(|i| {
            format!(
                "{}\n",
                json!({"_id": format!("d{}", i % 1000), "body": {"v": i}})
            )
        })
        .collect();
    std::fs::write(&input, lines).unwrap();
    let mut loader = BinaryWorker::spawn(
        binary()
            .args([
                "send",
                "--index",
                &col.index,
                "--collection",
                &col.collection,
                "--file",
            ])
            .arg(&input)
            .args(["--refresh", "wait_for", "--in-flight", "1"])
            .env("MUPDATE__AMQP__REQUEST_QUEUE", worker.request_queue())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    loader.signal("-INT");
    let status = loader.wait_exit(TIMEOUT).await;
    let stderr = loader.stderr();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let summary: Value = serde_json::from_str(&loader.stdout()).unwrap();
    assert_eq!(summary["interrupted"], true);
    let sent = summary["sent"].as_u64().unwrap();
    assert!(sent > 0 && sent < 20_000, "{summary}");
    assert_eq!(
        summary["updated"].as_u64().unwrap() + summary["failed"].as_u64().unwrap(),
        sent,
        "every sent document accounted for"
    );
    let _ = std::fs::remove_file(&input);
    worker.stop().await;
}

#[tokio::test]
async fn the_loader_upserts_with_action_mupsert() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let worker = Worker::start().await;
    let dir = tempdir();
    let file = dir.join("upserts.ndjson");
    let lines: Vec<String> = (0..250)
        .map(|i| {
            json!({"_id": if i == 0 { "a".to_owned() } else { format!("new{i}") },
                        "changes": {"n": i + 100}, "default": {"fresh": true}})
            .to_string()
        })
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let (queue, index) = (worker.request_queue().to_owned(), col.index.clone());
    let out = tokio::task::spawn_blocking(move || {
        binary()
            .args([
                "send",
                "--index",
                &index,
                "--collection",
                "col",
                "--action",
                "mUpsert",
            ])
            .arg("--file")
            .arg(&file)
            .env("MUPDATE__AMQP__REQUEST_QUEUE", &queue)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["failed"], 0, "{summary}");
    let (a, _) = col.get("a").await;
    assert_eq!(
        (a["n"].as_i64(), a.get("fresh")),
        (Some(100), None),
        "updated, not created"
    );
    let (created, _) = col.get("new249").await;
    assert_eq!(
        (created["n"].as_i64(), created["fresh"].as_bool()),
        (Some(349), Some(true))
    );
    worker.stop().await;
}

/// Runs `send` with `args` on `col`, `stdin` as its input: exit code and printed reply.
async fn send_action(queue: &str, col: &Collection, args: &[&str], stdin: &str) -> (i32, Value) {
    let mut command = binary();
    command
        .args([
            "send",
            "--index",
            &col.index,
            "--collection",
            &col.collection,
        ])
        .args(["--refresh", "wait_for", "--timeout", "20"])
        .args(args)
        .env("MUPDATE__AMQP__REQUEST_QUEUE", queue)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let stdin = stdin.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let reply = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        json!({"stdout": String::from_utf8_lossy(&out.stdout),
               "stderr": String::from_utf8_lossy(&out.stderr)})
    });
    (out.status.code().unwrap_or(-1), reply)
}

/// Issue 21: `send --action` takes every write of Kuzzle's document controller, its
/// documents in the m-form's shape (ids for mDelete), a single form's one document
/// sent as `_id` and `body`.
#[tokio::test]
async fn send_builds_every_action_from_its_documents() {
    let col = Collection::create(&[
        ("a", json!({"n": 1})),
        ("b", json!({"n": 1})),
        ("r", json!({"n": 1, "old": true})),
    ])
    .await;
    let worker = Worker::start().await;
    let queue = worker.request_queue().to_owned();
    let send = |args: &'static [&'static str], stdin: &'static str| {
        let (queue, col) = (&queue, &col);
        async move { send_action(queue, col, args, stdin).await }
    };

    let (code, reply) = send(
        &["--action", "mCreate", "--documents", "-"],
        r#"[{"_id": "c", "body": {"n": 3}}, {"body": {"n": 4}}]"#,
    )
    .await;
    assert_eq!((code, &reply["status"]), (0, &json!(200)), "{reply}");
    assert_eq!(reply["result"]["hits"].as_array().unwrap().len(), 2);
    assert_eq!(col.get("c").await.0["n"], 3);

    let (code, reply) = send(
        &["--action", "create", "--documents", "-"],
        r#"{"_id": "d", "body": {"n": 5}}"#,
    )
    .await;
    assert_eq!((code, &reply["result"]["_id"]), (0, &json!("d")), "{reply}");
    assert_eq!(col.get("d").await.0["n"], 5);

    // --id stands for the document's own.
    let (code, reply) = send(
        &["--action", "replace", "--id", "r", "--documents", "-"],
        r#"{"body": {"m": 1}}"#,
    )
    .await;
    assert_eq!(code, 0, "{reply}");
    let (r, _) = col.get("r").await;
    assert_eq!((r["m"].as_i64(), r.get("old")), (Some(1), None), "{r}");

    let (code, reply) = send(
        &["--action", "upsert", "--documents", "-"],
        r#"{"_id": "e", "changes": {"n": 6}, "default": {"fresh": true}}"#,
    )
    .await;
    assert_eq!(
        (code, &reply["result"]["created"]),
        (0, &json!(true)),
        "{reply}"
    );
    assert_eq!(col.get("e").await.0["fresh"], true);

    let (code, reply) = send(
        &["--action", "update", "--documents", "-"],
        r#"{"_id": "a", "body": {"n": 7}}"#,
    )
    .await;
    assert_eq!(code, 0, "{reply}");
    assert_eq!(col.get("a").await.0["n"], 7);

    let (code, reply) = send(
        &["--action", "mCreateOrReplace", "--documents", "-"],
        "{\"_id\": \"a\", \"body\": {\"w\": 1}}\n{\"_id\": \"f\", \"body\": {\"w\": 2}}\n",
    )
    .await;
    assert_eq!(code, 0, "{reply}");
    let (a, f) = (col.get("a").await.0, col.get("f").await.0);
    assert_eq!(
        (&a["w"], a.get("n"), &f["w"]),
        (&json!(1), None, &json!(2)),
        "{a}"
    );

    let (code, reply) = send(&["--action", "delete", "--id", "b"], "").await;
    assert_eq!((code, &reply["result"]["_id"]), (0, &json!("b")), "{reply}");
    assert_eq!(col.get("b").await.1, 0, "deleted");

    // mDelete: ids as JSON strings or objects with an `_id`; one missing is a 404.
    let (code, reply) = send(
        &["--action", "mDelete", "--documents", "-"],
        r#"["c", {"_id": "d"}, "nope"]"#,
    )
    .await;
    assert_eq!((code, &reply["status"]), (0, &json!(206)), "{reply}");
    assert_eq!(
        reply["error"]["errors"],
        json!([{"_id": "nope", "reason": "document not found", "status": 404}])
    );
    assert_eq!((col.get("c").await.1, col.get("d").await.1), (0, 0));

    // A single form takes one document; a name the worker doesn't take is refused.
    let (code, reply) = send(
        &["--action", "replace", "--documents", "-"],
        r#"[{"_id": "a", "body": {}}, {"_id": "e", "body": {}}]"#,
    )
    .await;
    assert_eq!(code, 1, "{reply}");
    assert!(
        reply["stderr"]
            .as_str()
            .unwrap()
            .contains("takes one document"),
        "{reply}"
    );
    let (code, reply) = send(&["--action", "mFrobnicate", "--documents", "-"], "[]").await;
    assert_eq!(code, 2, "{reply}");
    worker.stop().await;
}
