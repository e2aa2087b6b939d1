//! The `mupdate-worker` binary as people and scripts use it.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
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
