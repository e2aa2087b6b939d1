//! The client examples (`examples/python/rpc_client.py`, `examples/node/rpc_client.js`)
//! against a worker on fresh queues: a 200, a 206, a whole-request error, a timeout, a
//! queue that doesn't exist and bad arguments, each with its output and exit code; and
//! one more action each (issue 21): Python's mCreate, Node's mDelete. Their
//! dependencies come from `scripts/ops.sh` (a venv under .services/, `npm ci`).

mod support;

use std::path::PathBuf;
use std::process::Stdio;

use serde_json::json;
use support::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `scripts/ops.sh ARGS`, which must succeed; its stdout, trimmed.
async fn ops_sh(args: &[&str]) -> String {
    let out = tokio::process::Command::new(root().join("scripts/ops.sh"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "scripts/ops.sh {args:?} failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// An example client: its interpreter and script.
struct Client {
    program: String,
    script: PathBuf,
}

impl Client {
    async fn python() -> Self {
        Client {
            program: ops_sh(&["python"]).await,
            script: root().join("examples/python/rpc_client.py"),
        }
    }

    async fn node() -> Self {
        ops_sh(&["install", "examples"]).await;
        Client {
            program: "node".into(),
            script: root().join("examples/node/rpc_client.js"),
        }
    }

    /// Runs the client with `args`: its exit code, stdout and stderr.
    async fn run(&self, args: &[&str]) -> (i32, String, String) {
        let child = tokio::process::Command::new(&self.program)
            .arg(&self.script)
            .args(args)
            .env("AMQP_URL", AMQP_URL)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{args:?} did not end"))
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

async fn exercise(client: Client) {
    wait_servers().await;
    let col = Collection::create(&[("a", json!({"n": 1})), ("b", json!({"n": 1}))]).await;
    let worker = Worker::start().await;
    let queue = worker.request_queue().to_owned();
    let target = |index: &str, documents: String| -> Vec<String> {
        [
            "--queue",
            &queue,
            "--index",
            index,
            "--collection",
            &col.collection,
            "--documents",
            &documents,
        ]
        .map(str::to_owned)
        .to_vec()
    };

    for (n, reply) in [(2, "direct"), (3, "exclusive")] {
        // 200: every document updated, exit 0.
        let mut args = target(
            &col.index,
            json!([{"_id": "a", "body": {"n": n}}]).to_string(),
        );
        args.extend(["--refresh", "wait_for", "--reply-queue", reply].map(str::to_owned));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = client.run(&args).await;
        assert_eq!(code, 0, "{reply}: {out}{err}");
        assert!(out.contains("updated a version "), "{out}");
        assert!(out.contains("200: 1 updated, 0 failed"), "{out}");
        assert_eq!(col.get("a").await.0["n"], n);

        // 206: the failed document printed with its status and reason, exit 1.
        let mut args = target(
            &col.index,
            json!([{"_id": "b", "body": {"n": n}}, {"_id": "missing", "body": {}}]).to_string(),
        );
        args.extend(["--reply-queue", reply].map(str::to_owned));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = client.run(&args).await;
        assert_eq!(code, 1, "{reply}: {out}{err}");
        assert!(out.contains("updated b version "), "{out}");
        assert!(
            out.contains("failed missing status 404: document not found"),
            "{out}"
        );
        assert!(out.contains("206: 1 updated, 1 failed"), "{out}");

        // A whole-request error: status, id and message, exit 3.
        let mut args = target(
            &fresh("nosuchindex"),
            json!([{"_id": "a", "body": {}}]).to_string(),
        );
        args.extend(["--reply-queue", reply].map(str::to_owned));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = client.run(&args).await;
        assert_eq!(code, 3, "{reply}: {out}{err}");
        assert!(
            out.contains("412 services.storage.unknown_index: The index"),
            "{out}"
        );
    }

    // No reply in time (a queue no worker consumes): exit 4.
    let idle = fresh("examples-idle");
    let amqp = Amqp::open().await;
    amqp.channel
        .queue_declare(idle.as_str().into(), Default::default(), Default::default())
        .await
        .unwrap();
    amqp.close().await;
    let args = target(&col.index, "[]".into());
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args[1] = &idle;
    args.extend(["--timeout", "1"]);
    let started = std::time::Instant::now();
    let (code, out, err) = client.run(&args).await;
    assert_eq!(code, 4, "{out}{err}");
    assert!(err.contains("no reply to "), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    delete_queues(&[&idle]).await;

    // A request queue that doesn't exist: the broker returns the request, exit 5.
    let missing = fresh("examples-missing");
    args[1] = &missing;
    let (code, out, err) = client.run(&args).await;
    assert_eq!(code, 5, "{out}{err}");
    assert!(err.contains("no queue named"), "{err}");

    // Documents that aren't a JSON array: exit 2.
    let (code, out, err) = client
        .run(&["--index", "x", "--collection", "y", "--documents", "{}"])
        .await;
    assert_eq!(code, 2, "{out}{err}");

    worker.stop().await;
}

#[tokio::test]
async fn the_python_client_reports_200_206_errors_and_timeouts() {
    exercise(Client::python().await).await;
}

#[tokio::test]
async fn the_node_client_reports_200_206_errors_and_timeouts() {
    exercise(Client::node().await).await;
}

/// `args` with the queue, index and collection of `worker` and `col` in front.
fn on(worker: &Worker, col: &Collection, args: &[&str]) -> Vec<String> {
    let mut all = [
        "--queue",
        worker.request_queue(),
        "--index",
        &col.index,
        "--collection",
        &col.collection,
    ]
    .map(str::to_owned)
    .to_vec();
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

#[tokio::test]
async fn the_python_client_creates_documents_with_mcreate() {
    let client = Client::python().await;
    wait_servers().await;
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let worker = Worker::start().await;
    let documents = json!([{"_id": "c", "body": {"n": 2}}, {"body": {"n": 3}},
                           {"_id": "a", "body": {"n": 4}}])
    .to_string();
    let args = on(
        &worker,
        &col,
        &["--action", "mCreate", "--documents", &documents],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = client.run(&args).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("created c version 1 status 201"), "{out}");
    assert!(
        out.contains("failed a status 400: document already exists"),
        "{out}"
    );
    assert!(out.contains("206: 2 created, 1 failed"), "{out}");
    assert_eq!(col.get("c").await.0["n"], 2);
    assert_eq!(col.get("a").await.0["n"], 1, "left as it was");
    worker.stop().await;
}

#[tokio::test]
async fn the_node_client_deletes_documents_with_mdelete() {
    let client = Client::node().await;
    wait_servers().await;
    let col = Collection::create(&[("a", json!({"n": 1})), ("b", json!({"n": 1}))]).await;
    let worker = Worker::start().await;
    let ids = json!(["a", "missing"]).to_string();
    let args = on(&worker, &col, &["--action", "mDelete", "--ids", &ids]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = client.run(&args).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("deleted a version "), "{out}");
    assert!(
        out.contains("failed missing status 404: document not found"),
        "{out}"
    );
    assert!(out.contains("206: 1 deleted, 1 failed"), "{out}");
    assert_eq!((col.get("a").await.1, col.get("b").await.1), (0, 1));
    // mDelete takes --ids, not --documents: a bad argument.
    let args = on(&worker, &col, &["--action", "mDelete", "--documents", "[]"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = client.run(&args).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("--ids is required"), "{err}");
    worker.stop().await;

    // Format v2: mDelete's successes are the deleted ids.
    let mut settings = settings();
    settings.response.format = mupdate_worker::config::Format::V2;
    let worker = Worker::start_with(settings).await;
    let ids = json!(["b", "missing"]).to_string();
    let args = on(&worker, &col, &["--action", "mDelete", "--ids", &ids]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = client.run(&args).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("deleted b\n"), "{out}");
    assert!(
        out.contains("failed missing status 404: document not found"),
        "{out}"
    );
    assert!(out.contains("200: 1 deleted, 1 failed"), "{out}");
    assert_eq!(col.get("b").await.1, 0);
    worker.stop().await;
}
