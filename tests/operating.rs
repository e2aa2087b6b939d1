//! What an operator relies on: metrics, health, logs, configuration checks.

mod support;

use std::process::{Command, Stdio};

use serde_json::{Value, json};
use support::binary::BinaryWorker;
use support::*;

#[tokio::test]
async fn metrics_count_a_known_sequence_of_requests() {
    let col = Collection::create(&[("a", json!({"n": 1})), ("b", json!({"n": 1}))]).await;
    let mut settings = settings();
    let listen = format!("127.0.0.1:{}", free_port());
    settings.metrics.listen = listen.clone();
    // Without metadata, an update that changes nothing is a noop.
    settings.storage.kuzzle_metadata = false;
    let worker = Worker::start_with(settings).await;
    // 200: one updated, one unchanged (noop).
    call(
        &worker,
        &col.envelope(json!([{"_id": "a", "body": {"n": 2}}, {"_id": "b", "body": {"n": 1}}])),
    )
    .await;
    // 206: one not found, one invalid.
    call(
        &worker,
        &col.envelope(json!([{"_id": "zz", "body": {}}, {"_id": "a", "body": 1}])),
    )
    .await;
    // 400.
    call_bytes(&worker, b"not json").await;

    // A request is counted once its ack is sent, just after its reply reached the
    // client: none is in flight once the last one is counted.
    wait_metric(&listen, "mupdate_requests_in_flight", 0.0).await;
    let http = http();
    assert_eq!(
        metric(
            &listen,
            "mupdate_requests_total{action=\"mUpdate\",status=\"200\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &listen,
            "mupdate_requests_total{action=\"mUpdate\",status=\"206\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &listen,
            "mupdate_requests_total{action=\"unknown\",status=\"400\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &listen,
            "mupdate_documents_total{action=\"mUpdate\",outcome=\"updated\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &listen,
            "mupdate_documents_total{action=\"mUpdate\",outcome=\"noop\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &listen,
            "mupdate_documents_total{action=\"mUpdate\",outcome=\"not_found\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &listen,
            "mupdate_documents_total{action=\"mUpdate\",outcome=\"invalid\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&listen, "mupdate_request_duration_seconds_count").await,
        3.0
    );
    assert!(metric(&listen, "mupdate_bulk_duration_seconds_count").await >= 2.0);
    assert_eq!(metric(&listen, "mupdate_broker_up").await, 1.0);
    assert_eq!(metric(&listen, "mupdate_engine_up").await, 1.0);
    let health = http
        .get(format!("http://{listen}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(readyz(&listen).await, 200);
    let listen_env = listen.clone();
    let check = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_mupdate-worker"))
            .arg("ready")
            .env("MUPDATE__METRICS__LISTEN", listen_env)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(check.status.success(), "`mupdate-worker ready` agrees");
    worker.stop().await;
}

#[tokio::test]
async fn json_log_lines_parse_and_carry_the_request_id() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let settings = settings();
    let mut binary = BinaryWorker::spawn(
        worker_command(&settings)
            .env("MUPDATE__LOG__FORMAT", "json")
            // A line per request is at debug: at info (the default) it cost 10 % of the
            // worker's CPU per one-document request.
            .env("RUST_LOG", "debug")
            .stderr(Stdio::piped()),
    );
    wait_consumers(&settings.amqp.request_queue, 1).await;
    let client = mupdate_worker::client::Client::connect(AMQP_URL)
        .await
        .unwrap();
    let mut envelope = col.envelope(json!([{"_id": "a", "body": {"n": 2}}]));
    envelope["requestId"] = json!("logged-42");
    client
        .request(
            &settings.amqp.request_queue,
            &serde_json::to_vec(&envelope).unwrap(),
            "logged-42",
            TIMEOUT,
        )
        .await
        .unwrap();
    binary.terminate().await;
    let logs = binary.stderr();
    let parsed: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let replied = parsed
        .iter()
        .find(|l| l["fields"]["message"] == "replied")
        .expect("a 'replied' line");
    assert_eq!(replied["span"]["request_id"], "logged-42", "{replied}");
    assert_eq!(replied["span"]["documents"], 1);
    assert_eq!(replied["fields"]["status"], 200);
    delete_topology(&settings).await;
}

/// Each invalid setting: exit code 2 and a message naming its key.
#[test]
fn invalid_settings_stop_the_worker_with_exit_code_2_naming_the_key() {
    let cases = [
        ("MUPDATE__AMQP__URL", "http://127.0.0.1:5672", "amqp.url"),
        ("MUPDATE__STORAGE__URL", "not a url", "storage.url"),
        ("MUPDATE__RESPONSE__FORMAT", "xml", "response.format"),
        ("MUPDATE__LOG__FORMAT", "xml", "log.format"),
        ("MUPDATE__AMQP__PREFETCH", "0", "amqp.prefetch"),
        (
            "MUPDATE__STORAGE__INDEX_TEMPLATE",
            "{collection}",
            "storage.index_template",
        ),
        ("MUPDATE__METRICS__LISTEN", "everywhere", "metrics.listen"),
    ];
    for (key, value, name) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_mupdate-worker"))
            .env(key, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}={value}: {stderr}");
        assert!(stderr.contains(name), "{key}={value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test]
async fn a_missing_reply_exchange_keeps_the_worker_unready_until_it_exists() {
    let exchange = fresh("mupdate.replies.missing");
    let mut settings = settings();
    settings.amqp.reply_exchange = exchange.clone();
    let listen = format!("127.0.0.1:{}", free_port());
    settings.metrics.listen = listen.clone();
    let token = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(mupdate_worker::lifecycle::session::run(
        settings.clone(),
        token.clone(),
    ));
    wait_readyz(&listen, 503).await;
    assert_eq!(
        queue_consumers(&settings.amqp.request_queue)
            .await
            .unwrap_or(0),
        0,
        "takes no request"
    );
    let amqp = Amqp::open().await;
    let auto_delete = lapin::options::ExchangeDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    amqp.channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            auto_delete,
            Default::default(),
        )
        .await
        .unwrap();
    wait_readyz(&listen, 200).await;
    token.cancel();
    tokio::time::timeout(TIMEOUT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = amqp
        .channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    amqp.close().await;
    delete_topology(&settings).await;
}

/// A W3C `traceparent` on a request is carried to its reply's headers and into the
/// request's log span, so a producer's trace continues through the worker.
#[tokio::test]
async fn a_traceparent_reaches_the_reply_and_the_logs() {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let settings = settings();
    let mut binary = BinaryWorker::spawn(
        worker_command(&settings)
            .env("MUPDATE__LOG__FORMAT", "json")
            // The line per answered request is at debug.
            .env("RUST_LOG", "debug")
            .stderr(Stdio::piped()),
    );
    wait_consumers(&settings.amqp.request_queue, 1).await;
    let amqp = Amqp::open().await;
    let replies = fresh("trace-replies");
    amqp.channel
        .queue_declare(
            replies.as_str().into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "traceparent".into(),
        lapin::types::AMQPValue::LongString(trace.into()),
    );
    let props = lapin::BasicProperties::default()
        .with_reply_to(replies.as_str().into())
        .with_headers(headers);
    let body = serde_json::to_vec(&col.envelope(json!([{"_id": "a", "body": {"n": 2}}]))).unwrap();
    publish(&amqp.channel, &settings.amqp.request_queue, &body, props).await;
    let reply = next_message(&amqp.channel, &replies).await;
    let carried = reply
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("traceparent").cloned());
    assert_eq!(
        carried,
        Some(lapin::types::AMQPValue::LongString(trace.into()))
    );
    binary.terminate().await;
    let logs = binary.stderr();
    let replied: Value = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "replied")
        .expect("a 'replied' line");
    assert_eq!(replied["span"]["traceparent"], trace, "{replied}");
    delete_queues(&[&replies]).await;
    amqp.close().await;
    delete_topology(&settings).await;
}

/// `amqp.url` lists several broker nodes: one that doesn't answer is skipped, and the
/// node in use shows in a metric, without credentials.
#[tokio::test]
async fn an_unreachable_broker_node_is_skipped_for_the_next() {
    let mut settings = settings();
    let dead = free_port();
    settings.amqp.url = format!("amqp://guest:guest@127.0.0.1:{dead}/%2f,{AMQP_URL}");
    let listen = format!("127.0.0.1:{}", free_port());
    settings.metrics.listen = listen.clone();
    let worker = Worker::start_with(settings).await;
    let reply = call_bytes(&worker, b"not json").await;
    assert_eq!(reply["status"], 400);
    let up = metric(&listen, "mupdate_broker_node{node=\"127.0.0.1:5672\"}").await;
    assert_eq!(up, 1.0);
    let down = format!("mupdate_broker_node{{node=\"127.0.0.1:{dead}\"}}");
    assert_eq!(metric(&listen, &down).await, 0.0);
    worker.stop().await;
}

/// `worker.max_processing_bytes` bounds the request bytes in process: requests larger
/// than it are each processed alone (so none shares a bulk call), and all answered.
#[tokio::test]
async fn request_bytes_in_process_are_bounded() {
    let docs: Vec<(String, Value)> = (0..12).map(|i| (format!("d{i}"), json!({}))).collect();
    let docs: Vec<(&str, Value)> = docs
        .iter()
        .map(|(id, v)| (id.as_str(), v.clone()))
        .collect();
    let col = Collection::create(&docs).await;
    let mut settings = settings();
    let listen = format!("127.0.0.1:{}", free_port());
    settings.metrics.listen = listen.clone();
    settings.worker.max_processing_bytes = 4096;
    let worker = Worker::start_with(settings).await;
    let client = mupdate_worker::client::Client::connect(AMQP_URL)
        .await
        .unwrap();
    let big = "x".repeat(6000);
    let calls = (0..12).map(|i| {
        let envelope = col.envelope(json!([{"_id": format!("d{i}"), "body": {"big": big}}]));
        let client = &client;
        let queue = worker.request_queue();
        async move {
            let reply = client
                .request(
                    queue,
                    &serde_json::to_vec(&envelope).unwrap(),
                    &format!("b{i}"),
                    TIMEOUT,
                )
                .await
                .unwrap();
            serde_json::from_slice::<Value>(&reply).unwrap()
        }
    });
    for reply in futures_util::future::join_all(calls).await {
        assert_eq!(reply["status"], 200, "{reply}");
    }
    assert_eq!(
        metric(&listen, "mupdate_bulk_documents_count").await,
        12.0,
        "one request in process at a time: a bulk call each"
    );
    worker.stop().await;
}

/// `amqp.max_held_bytes` bounds the bytes of requests held: large requests lower the
/// consumer's prefetch, so the broker keeps the rest queued, and small ones raise it
/// back to `amqp.prefetch`.
#[tokio::test]
async fn held_request_bytes_choose_the_prefetch() {
    let ids: Vec<String> = (0..30).map(|i| format!("d{i}")).collect();
    let docs: Vec<(&str, Value)> = ids.iter().map(|id| (id.as_str(), json!({}))).collect();
    let col = Collection::create(&docs).await;
    let mut settings = settings();
    let listen = format!("127.0.0.1:{}", free_port());
    settings.metrics.listen = listen.clone();
    settings.amqp.max_held_bytes = 4 << 20;
    // One request in process at a time, so that the others are held meanwhile.
    settings.worker.max_processing_bytes = 4096;
    let most = settings.amqp.prefetch;
    let worker = Worker::start_with(settings).await;
    let client = mupdate_worker::client::Client::connect(AMQP_URL)
        .await
        .unwrap();
    let requests = |envelopes: Vec<Value>, tag: &'static str| {
        let (client, queue) = (&client, worker.request_queue());
        futures_util::future::join_all(envelopes.into_iter().enumerate().map(
            move |(i, envelope)| async move {
                let body = serde_json::to_vec(&envelope).unwrap();
                let reply = client
                    .request(queue, &body, &format!("{tag}{i}"), TIMEOUT)
                    .await
                    .unwrap();
                serde_json::from_slice::<Value>(&reply).unwrap()
            },
        ))
    };

    // The most held while 30 requests of 512 KiB are answered: 7 of them fit in 4 MiB.
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn({
        let (listen, sampling) = (listen.clone(), sampling.clone());
        async move {
            let (mut held, mut in_flight) = (0.0f64, 0.0f64);
            while !sampling.is_cancelled() {
                let text = metrics_text(&listen).await;
                held = held.max(sample(&text, "mupdate_held_bytes"));
                in_flight = in_flight.max(sample(&text, "mupdate_requests_in_flight"));
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            (held, in_flight)
        }
    });
    let big = "x".repeat(512 << 10);
    let envelopes = ids
        .iter()
        .map(|id| col.envelope(json!([{"_id": id, "body": {"big": big}}])))
        .collect();
    for reply in requests(envelopes, "big").await {
        assert_eq!(reply["status"], 200, "{reply}");
    }
    sampling.cancel();
    let (held, in_flight) = sampler.await.unwrap();
    println!("large requests: at most {held} bytes and {in_flight} requests held");
    assert!(held > 0.0 && held <= (4 << 20) as f64, "{held} bytes held");
    assert!(in_flight <= 8.0, "{in_flight} requests held");
    let prefetch = metric(&listen, "mupdate_prefetch").await;
    assert!((1.0..=7.0).contains(&prefetch), "prefetch {prefetch}");

    // Small requests: the prefetch rises (at most four times in each change, once twice
    // the prefetch of them were seen) to the most again.
    let envelopes = (0..300)
        .map(|i| col.envelope(json!([{"_id": format!("d{}", i % 30), "body": {"n": i}}])))
        .collect();
    for reply in requests(envelopes, "small").await {
        assert_eq!(reply["status"], 200, "{reply}");
    }
    assert_eq!(metric(&listen, "mupdate_prefetch").await, f64::from(most));
    worker.stop().await;
}

/// systemd's notify protocol, as a `Type=notify` unit hears it (packaging/debian/): READY=1
/// with the queue once consuming, a STATUS= saying why when consumption pauses (here an
/// engine that refuses every connection), and STOPPING=1 on SIGTERM with the time the
/// shutdown may take (systemd waits that long whatever its TimeoutStopSec=), then exit 0.
#[tokio::test]
async fn systemd_hears_ready_a_pause_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = std::env::temp_dir().join(format!("notify-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&dir).unwrap();
    let socket_path = dir.join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let mut settings = settings();
    settings.storage.url = format!("http://127.0.0.1:{}", free_port());
    let mut binary = BinaryWorker::spawn(
        worker_command(&settings)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("MUPDATE__WORKER__PAUSE_AFTER_MS", "300")
            .stderr(Stdio::piped()),
    );
    let mut heard = Vec::new();
    let listen_until = |wanted: &str, heard: &mut Vec<String>| {
        let deadline = std::time::Instant::now() + TIMEOUT;
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < deadline {
            if heard.iter().any(|h| h.contains(wanted)) {
                return;
            }
            if let Ok(n) = socket.recv(&mut buf) {
                heard.push(String::from_utf8_lossy(&buf[..n]).replace('\n', " "));
            }
        }
        panic!("no {wanted:?} in {heard:?} within {TIMEOUT:?}");
    };
    let queue = &settings.amqp.request_queue;
    listen_until(&format!("READY=1 STATUS=consuming {queue}"), &mut heard);
    listen_until(
        "STATUS=paused: the storage engine has been unavailable too long",
        &mut heard,
    );
    binary.signal("-TERM");
    // With the shutdown's bound: the default 30 s grace, the 1.5 s margin, 5 s more.
    listen_until("STOPPING=1 EXTEND_TIMEOUT_USEC=36500000", &mut heard);
    let status = binary
        .exit_within(TIMEOUT)
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}: {}", binary.stderr());
    std::fs::remove_dir_all(&dir).unwrap();
    delete_topology(&settings).await;
}
