//! Issue 19, item 8: the loader (`send --file`) sizes its requests by bytes as well as by
//! count; a line too large for any request is reported alone, with its line number, and
//! its neighbours are sent; its memory stays bounded whatever the file holds, a line
//! without an end included. The real binary against the real broker and engine.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

fn loader(
    queue: &str,
    col: &Collection,
    input: &std::path::Path,
    failures: &std::path::Path,
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mupdate-worker"));
    command
        .args([
            "send",
            "--index",
            &col.index,
            "--collection",
            &col.collection,
        ])
        .arg("--file")
        .arg(input)
        .arg("--failures")
        .arg(failures)
        .env("MUPDATE__AMQP__REQUEST_QUEUE", queue)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

async fn output(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn records(failures: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(failures)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn a_line_too_large_for_any_request_is_reported_alone_and_its_neighbours_are_sent() {
    let col = Collection::create(&[("a", json!({"n": 1})), ("c", json!({"n": 1}))]).await;
    let worker = Worker::start().await;
    let dir = tempdir();
    let (input, failures) = (dir.join("in.ndjson"), dir.join("failures.ndjson"));
    let huge = "x".repeat(20 << 20);
    let lines = [
        json!({"_id": "a", "body": {"n": 2}}).to_string(),
        json!({"_id": "b", "body": {"s": huge}}).to_string(),
        json!({"_id": "c", "body": {"n": 2}}).to_string(),
        json!({"_id": "missing", "body": {"n": 2}}).to_string(),
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = output(loader(worker.request_queue(), &col, &input, &failures)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&summary["lines"], &summary["updated"], &summary["failed"]),
        (&json!(4), &json!(2), &json!(2)),
        "{summary}"
    );
    let listed = records(&failures);
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(
        (&listed[0]["line"], &listed[0]["status"]),
        (&json!(2), &json!(413))
    );
    // A document the worker could not update: its line is known too.
    assert_eq!(
        (&listed[1]["line"], &listed[1]["status"]),
        (&json!(4), &json!(404))
    );
    assert_eq!(col.get("a").await.0["n"], 2);
    assert_eq!(col.get("c").await.0["n"], 2);
    worker.stop().await;
}

#[tokio::test]
async fn requests_are_sized_by_bytes_as_well_as_by_count() {
    let col = Collection::create(&[]).await;
    let mut settings = settings();
    settings.limits.max_message_bytes = 8192;
    let worker = Worker::start_with(settings).await;
    let dir = tempdir();
    let (input, failures) = (dir.join("in.ndjson"), dir.join("failures.ndjson"));
    let mut command = loader(worker.request_queue(), &col, &input, &failures);
    command
        .env("MUPDATE__LIMITS__MAX_MESSAGE_BYTES", "8192")
        .args(["--action", "mUpsert"]);
    // 40 upserts of about 1 KiB: 40 KiB in all, under the count limit (200).
    let upserts: String = (0..40)
        .map(|i| {
            format!(
                "{}\n",
                json!({"_id": format!("d{i}"), "changes": {"s": "y".repeat(1000)}, "default": {}})
            )
        })
        .collect();
    std::fs::write(&input, upserts).unwrap();
    let out = output(command).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{summary} {stderr}");
    assert_eq!(
        (&summary["updated"], &summary["failed"]),
        (&json!(40), &json!(0)),
        "{summary}"
    );
    assert!(records(&failures).is_empty());
    assert_eq!(
        col.get("d39").await.0["s"].as_str().map(str::len),
        Some(1000)
    );
    worker.stop().await;
}

/// Waits for its command and writes the command's peak RSS (KiB) to the file it is given
/// first: the kernel's `ru_maxrss`, counted from the command's start to its exit.
const MEASURE: &str = "import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], 'w') as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)";

/// Runs the loader on `input` and returns its exit code, stdout and peak RSS. Neither a
/// poll of `/proc/PID/status` (it misses the end of a short run) nor this process's
/// `wait4` will do: a child started from this process (vfork and exec) begins its
/// `ru_maxrss` at this process's own peak, which another test running beside this one
/// makes tens of MiB. So a small Python process starts the loader and reports it. The
/// loader's stdout and stderr go to files (a pipe read only after the exit would stop a
/// loader that writes more than it holds), and both run in a process group of their own,
/// killed whole if they outlast the test's bound.
async fn run_measured(command: Command) -> Measured {
    use std::os::unix::process::CommandExt;
    let dir = tempdir();
    let (figure, output, errors) = (dir.join("peak-kib"), dir.join("stdout"), dir.join("stderr"));
    let mut measured = Command::new("python3");
    measured
        .arg("-c")
        .arg(MEASURE)
        .arg(&figure)
        .arg(command.get_program())
        .args(command.get_args())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&output).unwrap())
        .stderr(std::fs::File::create(&errors).unwrap())
        .process_group(0);
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => measured.env(key, value),
            None => measured.env_remove(key),
        };
    }
    let mut child = measured.spawn().unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let group = i32::try_from(child.id()).unwrap();
            // SAFETY: kill(2) with a negated pid signals that process group, ours.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            let _ = child.wait();
            panic!(
                "the loader still ran after {TIMEOUT:?}; its stderr:\n{}",
                lossy(&errors)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let (stdout, stderr) = (lossy(&output), lossy(&errors));
    let Some(kib) = std::fs::read_to_string(&figure)
        .ok()
        .and_then(|figure| figure.trim().parse::<u64>().ok())
    else {
        panic!("no peak RSS measured ({status}); stderr:\n{stderr}");
    };
    Measured {
        code: status.code(),
        stdout,
        stderr,
        peak: kib * 1024,
    }
}

/// What `run_measured` saw of a run: its exit code, its output and its peak RSS (bytes).
struct Measured {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    peak: u64,
}

/// A file's text, whatever its bytes (empty when it can't be read).
fn lossy(file: &std::path::Path) -> String {
    String::from_utf8_lossy(&std::fs::read(file).unwrap_or_default()).into_owned()
}

#[tokio::test]
async fn a_200_mib_line_without_an_end_costs_bounded_memory() {
    let col = Collection::create(&[]).await;
    let queue = fresh("mupdate.requests");
    let dir = tempdir();
    let (empty, input, failures) = (
        dir.join("empty.ndjson"),
        dir.join("in.ndjson"),
        dir.join("failures.ndjson"),
    );
    std::fs::write(&empty, b"").unwrap();
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
        file.write_all(br#"{"_id":"a","body":{"s":""#).unwrap();
        let chunk = vec![b'z'; 1 << 20];
        for _ in 0..200 {
            file.write_all(&chunk).unwrap();
        }
    }
    // The loader's own footprint (its libraries, its runtime, the broker connection).
    let empty_run = run_measured(loader(&queue, &col, &empty, &failures)).await;
    assert_eq!(empty_run.code, Some(0), "stderr:\n{}", empty_run.stderr);
    let baseline = empty_run.peak;
    let run = run_measured(loader(&queue, &col, &input, &failures)).await;
    assert_eq!(run.code, Some(1), "stderr:\n{}", run.stderr);
    let peak = run.peak;
    let extra = peak.saturating_sub(baseline);
    eprintln!(
        "loader peak RSS: {} MiB on an empty file, {} MiB on a 200 MiB line without an end",
        baseline >> 20,
        peak >> 20
    );
    assert!(baseline > 0, "measured");
    // At most the line limit (limits.max_message_bytes, 16 MiB) and a margin.
    assert!(
        extra < 24 << 20,
        "{} MiB more than on an empty file",
        extra >> 20
    );
    let summary: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}; stderr:\n{}", run.stdout, run.stderr));
    assert_eq!(
        (&summary["lines"], &summary["failed"]),
        (&json!(1), &json!(1)),
        "stderr:\n{}",
        run.stderr
    );
    let listed = records(&failures);
    assert_eq!(
        (&listed[0]["line"], &listed[0]["status"]),
        (&json!(1), &json!(413))
    );
    delete_queues(&[&queue]).await;
}

/// Issue 21: the loader takes every m-form. mCreate, mReplace and mCreateOrReplace read
/// documents a line as mUpdate does; a document the action refuses is listed with its
/// line (an id that exists for mCreate, a missing one for mReplace).
#[tokio::test]
async fn the_loader_creates_replaces_and_writes_with_every_m_form() {
    let col = Collection::create(&[("a", json!({"n": 1, "old": true}))]).await;
    let worker = Worker::start().await;
    let dir = tempdir();
    let (input, failures) = (dir.join("in.ndjson"), dir.join("failures.ndjson"));
    let cases = [
        // (action, lines, written, the failed line and its status)
        (
            "mCreate",
            vec![
                json!({"_id": "c1", "body": {"n": 1}}),
                json!({"_id": "a", "body": {"n": 9}}),
                json!({"body": {"n": 3}}),
            ],
            2,
            Some((2, 400)),
        ),
        (
            "mReplace",
            vec![
                json!({"_id": "nope", "body": {"n": 2}}),
                json!({"_id": "a", "body": {"n": 2}}),
            ],
            1,
            Some((1, 404)),
        ),
        (
            "mCreateOrReplace",
            vec![
                json!({"_id": "c1", "body": {"n": 4}}),
                json!({"_id": "c2", "body": {"n": 5}}),
            ],
            2,
            None,
        ),
    ];
    for (action, lines, written, failed) in cases {
        let text: Vec<String> = lines.iter().map(Value::to_string).collect();
        std::fs::write(&input, text.join("\n")).unwrap();
        let mut command = loader(worker.request_queue(), &col, &input, &failures);
        command.args(["--action", action]);
        let out = output(command).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (&summary["updated"], &summary["failed"]),
            (&json!(written), &json!(usize::from(failed.is_some()))),
            "{action}: {summary} {stderr}"
        );
        let listed = records(&failures);
        match failed {
            Some((line, status)) => {
                assert_eq!(listed.len(), 1, "{action}: {listed:?}");
                assert_eq!(
                    (&listed[0]["line"], &listed[0]["status"]),
                    (&json!(line), &json!(status)),
                    "{action}: {listed:?}"
                );
                assert_eq!(out.status.code(), Some(1), "{action}");
            }
            None => assert!(listed.is_empty() && out.status.success(), "{listed:?}"),
        }
    }
    let (a, _) = col.get("a").await;
    assert_eq!(
        (a["n"].as_i64(), a.get("old")),
        (Some(2), None),
        "replaced whole"
    );
    assert_eq!(col.get("c1").await.0["n"], 4);
    assert_eq!(col.get("c2").await.0["n"], 5);
    worker.stop().await;
}

/// Issue 21: `--action mDelete` reads one id a line, a JSON string or an object with an
/// `_id`; an id that can't be deleted is listed as its line wrote it, with its line
/// number, and so is a line that names no id (never sent).
#[tokio::test]
async fn the_loader_deletes_one_id_a_line_and_lists_those_it_could_not() {
    let docs: Vec<(String, Value)> = (0..300)
        .map(|i| (format!("d{i}"), json!({"n": i})))
        .collect();
    let refs: Vec<(&str, Value)> = docs
        .iter()
        .map(|(id, v)| (id.as_str(), v.clone()))
        .collect();
    let col = Collection::create(&refs).await;
    let worker = Worker::start().await;
    let dir = tempdir();
    let (input, failures) = (dir.join("ids.ndjson"), dir.join("failures.ndjson"));
    let mut lines: Vec<String> = (0..300)
        .map(|i| match i % 2 {
            0 => json!(format!("d{i}")).to_string(),
            _ => json!({"_id": format!("d{i}"), "note": "kept out"}).to_string(),
        })
        .collect();
    lines.insert(100, json!({"_id": "nope"}).to_string());
    lines.insert(200, json!({"id": "d0"}).to_string());
    lines.insert(250, "5".to_owned());
    std::fs::write(&input, lines.join("\n")).unwrap();
    let mut command = loader(worker.request_queue(), &col, &input, &failures);
    command.args(["--action", "mDelete"]);
    let out = output(command).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&summary["lines"], &summary["updated"], &summary["failed"]),
        (&json!(303), &json!(300), &json!(3)),
        "{summary}"
    );
    assert!(stderr.contains("300 deleted, 3 failed"), "{stderr}");
    let mut listed = records(&failures);
    listed.sort_by_key(|f| f["line"].as_u64());
    let listed: Vec<(Value, Value, Value)> = listed
        .into_iter()
        .map(|f| {
            (
                f["line"].clone(),
                f["document"].clone(),
                f["status"].clone(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            (json!(101), json!({"_id": "nope"}), json!(404)),
            (json!(201), json!({"id": "d0"}), json!(400)),
            (json!(251), json!(5), json!(400)),
        ]
    );
    for id in ["d0", "d1", "d299"] {
        assert_eq!(col.get(id).await.1, 0, "{id} deleted");
    }
    worker.stop().await;
}

/// A single form sends one document: the loader refuses it before reading anything.
#[tokio::test]
async fn the_loader_takes_only_m_forms() {
    let col = Collection::create(&[]).await;
    let queue = fresh("mupdate.requests");
    let dir = tempdir();
    let (input, failures) = (dir.join("in.ndjson"), dir.join("failures.ndjson"));
    std::fs::write(&input, "\"a\"\n").unwrap();
    let mut command = loader(&queue, &col, &input, &failures);
    command.args(["--action", "delete", "--timeout", "2"]);
    let out = output(command).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--file sends m-forms"), "{stderr}");
}
