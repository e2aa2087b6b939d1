//! SPEC section 7: logs hold one event a line; strings that come from clients are escaped
//! and truncated, and a log that is not a terminal gets no colour codes. The real binary,
//! its stderr a file, against the real broker and engine.

mod support;

use std::process::Stdio;

use serde_json::{Value, json};
use support::binary::BinaryWorker;
use support::cleanup::Cleanup;
use support::*;

/// The longest line a log may hold here: `logs::LINE_MAX` and its cut marker.
const LINE_BOUND: usize = 8192 + 64;

/// A requestId that would write lines of its own, then 20,000 characters.
fn forged_id() -> String {
    format!(
        "x\nFORGED INFO replied request_id=victim status=200\n\u{1b}[31m{}",
        "y".repeat(20_000)
    )
}

/// Runs the binary at RUST_LOG=debug in `format`, its stderr and stdout a file, sends it
/// the forged requests (a valid one, one refused, one whose document is missing), stops
/// it and returns what it logged.
async fn log_of_forged_requests(format: &str) -> String {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let settings = settings();
    let _cleanup = Cleanup::of(&settings);
    let dir = tempdir();
    let log_path = dir.join("worker.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut command = worker_command(&settings);
    command
        .env("RUST_LOG", "debug")
        .env("MUPDATE__LOG__FORMAT", format)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log));
    let mut worker = BinaryWorker::spawn(&mut command);
    wait_consumers(&settings.amqp.request_queue, 1).await;

    let queue = &settings.amqp.request_queue;
    let mut valid = col.envelope(json!([{"_id": "a", "body": {"n": 2}},
                                        {"_id": "missing\nFORGED", "body": {}}]));
    valid["requestId"] = json!(forged_id());
    let reply = call_queue(queue, &serde_json::to_vec(&valid).unwrap()).await;
    assert_eq!(reply["status"], 206, "{reply}");
    let mut refused = valid.clone();
    refused["index"] = json!("Bad\nFORGED INFO index");
    let reply = call_queue(queue, &serde_json::to_vec(&refused).unwrap()).await;
    assert_eq!(reply["status"], 400);

    assert!(worker.terminate().await.success());
    std::fs::read_to_string(&log_path).unwrap()
}

fn assert_one_event_a_line(log: &str) {
    assert!(!log.contains('\u{1b}'), "no escape code in a file: {log}");
    for line in log.lines() {
        assert!(
            !line.trim_start().starts_with("FORGED") && !line.starts_with('y'),
            "a forged line: {line}"
        );
        assert!(line.len() <= LINE_BOUND, "a line of {} bytes", line.len());
    }
    // The forged id is in the log, escaped and cut: a few hundred bytes of it.
    let mentions: Vec<&str> = log.lines().filter(|l| l.contains("FORGED INFO")).collect();
    assert!(
        !mentions.is_empty(),
        "the requests were logged at debug: {log}"
    );
    for line in mentions {
        assert!(line.len() < 2048, "a line of {} bytes: {line}", line.len());
    }
}

#[tokio::test]
async fn a_forged_request_id_writes_no_line_of_its_own_in_text_logs() {
    let log = log_of_forged_requests("text").await;
    assert_one_event_a_line(&log);
    assert!(
        log.contains("x\\nFORGED INFO replied request_id=victim"),
        "escaped: {log}"
    );
}

#[tokio::test]
async fn a_forged_request_id_writes_no_line_of_its_own_in_json_logs() {
    let log = log_of_forged_requests("json").await;
    assert_one_event_a_line(&log);
    for line in log.lines() {
        let event: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(event.is_object());
    }
}
