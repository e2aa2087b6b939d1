//! The operations files against real tools: `ops/prometheus/alerts.yml` through
//! promtool, and, with a real Prometheus scraping a worker that served some traffic,
//! every expression of the alert rules and of `ops/grafana/mupdate-worker.json`.
//! promtool and prometheus come from `scripts/ops.sh` (installed when missing).

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

/// The scrape job the alert rules expect.
const JOB: &str = "mupdate-worker";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `scripts/ops.sh ARGS`, which must succeed; its stdout, trimmed.
fn ops_sh(args: &[&str]) -> String {
    let out = Command::new(root().join("scripts/ops.sh"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "scripts/ops.sh {args:?} failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    let promtool = ops_sh(&["bin", "promtool"]);
    let dir = root().join("ops/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    }
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(root().join("ops/grafana/mupdate-worker.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// `(panel title, expression)` of every target of every panel.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    panels(dashboard)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| Some((title.clone(), t["expr"].as_str()?.to_owned())))
        })
        .collect()
}

/// A dashboard expression as Prometheus can run it: the template variables filled in
/// as Grafana would for this job, all instances.
fn fill_in(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$job", JOB)
        .replace("$instance", ".*")
        .replace("$action", ".*")
}

/// Grafana's import contract: a `${DS_PROMETHEUS}` input every query uses, unique panel
/// ids, a position for each panel, and expressions where the test below finds them.
#[test]
fn the_dashboard_is_importable_and_every_query_uses_its_datasource_input() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36, "schemaVersion");
    assert_eq!(d["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(d["__inputs"][0]["pluginId"], "prometheus");
    let ds = json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});
    let mut ids = std::collections::HashSet::new();
    for p in panels(&d) {
        let title = &p["title"];
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        for key in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        assert!(p["gridPos"]["x"].as_u64().unwrap() + p["gridPos"]["w"].as_u64().unwrap() <= 24);
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"], ds, "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"], ds, "{title}");
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()), "{title}");
            assert!(t["refId"].is_string(), "{title}");
        }
    }
    for var in d["templating"]["list"].as_array().unwrap() {
        assert_eq!(var["datasource"], ds, "variable {}", var["name"]);
    }
    // The panels the operations guide promises.
    let exprs = dashboard_exprs(&d)
        .into_iter()
        .map(|(_, e)| e)
        .collect::<Vec<_>>()
        .join("\n");
    for metric in [
        "mupdate_requests_total",
        "mupdate_documents_total",
        "sum by (action) (rate(mupdate_requests_total",
        "sum by (action, status) (rate(mupdate_requests_total",
        "sum by (action, outcome) (rate(mupdate_documents_total",
        "histogram_quantile(0.50, sum by (le) (rate(mupdate_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(mupdate_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(mupdate_request_duration_seconds_bucket",
        "mupdate_bulk_documents_bucket",
        "mupdate_requests_in_flight",
        "mupdate_engine_retries_total",
        "mupdate_broker_reconnects_total",
        "mupdate_requests_dead_lettered_total",
        "mupdate_consumption_paused",
        "mupdate_engine_up",
        "mupdate_broker_up",
    ] {
        assert!(exprs.contains(metric), "no panel shows {metric}");
    }
}

/// Issue 21: the request, document and rights counters carry the Kuzzle action
/// (`action`), the 12 names the worker takes and `unknown` for a request whose action
/// it never read or doesn't take, so a dashboard shows each action's rates; a request
/// naming any other action adds no series of its own.
#[tokio::test]
async fn a_worker_counts_requests_and_documents_by_action() {
    wait_servers().await;
    let col = Collection::create(&[("a", json!({"n": 0})), ("gone", json!({"n": 0}))]).await;
    let mut settings = settings();
    let listen = format!("127.0.0.1:{}", free_port());
    settings.metrics.listen = listen.clone();
    let worker = Worker::start_with(settings).await;
    let with_action = |action: &str, body: Value| {
        let mut envelope = col.envelope(json!([]));
        envelope["action"] = json!(action);
        envelope["body"] = body;
        envelope
    };
    // mCreate: two documents created, twice over (200 each time).
    for round in 0..2 {
        let documents = json!([{"_id": format!("c{round}"), "body": {}}, {"body": {}}]);
        let reply = call(
            &worker,
            &with_action("mCreate", json!({"documents": documents})),
        )
        .await;
        assert_eq!(reply["status"], 200, "{reply}");
    }
    // mUpdate: one updated.
    let reply = call(
        &worker,
        &col.envelope(json!([{"_id": "a", "body": {"n": 1}}])),
    )
    .await;
    assert_eq!(reply["status"], 200, "{reply}");
    // mDelete: one deleted, one not found.
    let reply = call(
        &worker,
        &with_action("mDelete", json!({"ids": ["gone", "nope"]})),
    )
    .await;
    let delete_status = reply["status"].as_u64().unwrap();
    // Actions the worker doesn't take, and bytes that are no envelope: `unknown`.
    let mut unknown = std::collections::BTreeMap::<u64, f64>::new();
    for action in ["mGet", "search", "x".repeat(300).as_str()] {
        let reply = call(&worker, &with_action(action, json!({"documents": []}))).await;
        *unknown
            .entry(reply["status"].as_u64().unwrap())
            .or_default() += 1.0;
    }
    let reply = call_bytes(&worker, b"not json").await;
    *unknown
        .entry(reply["status"].as_u64().unwrap())
        .or_default() += 1.0;
    wait_metric(&listen, "mupdate_requests_in_flight", 0.0).await;

    let text = metrics_text(&listen).await;
    let mut want = vec![
        (
            "mupdate_requests_total{action=\"mCreate\",status=\"200\"}".to_owned(),
            2.0,
        ),
        (
            "mupdate_requests_total{action=\"mUpdate\",status=\"200\"}".to_owned(),
            1.0,
        ),
        (
            format!("mupdate_requests_total{{action=\"mDelete\",status=\"{delete_status}\"}}"),
            1.0,
        ),
        (
            "mupdate_documents_total{action=\"mCreate\",outcome=\"created\"}".to_owned(),
            4.0,
        ),
        (
            "mupdate_documents_total{action=\"mUpdate\",outcome=\"updated\"}".to_owned(),
            1.0,
        ),
        (
            "mupdate_documents_total{action=\"mDelete\",outcome=\"deleted\"}".to_owned(),
            1.0,
        ),
        (
            "mupdate_documents_total{action=\"mDelete\",outcome=\"not_found\"}".to_owned(),
            1.0,
        ),
    ];
    for (status, count) in &unknown {
        want.push((
            format!("mupdate_requests_total{{action=\"unknown\",status=\"{status}\"}}"),
            *count,
        ));
    }
    for (name, count) in &want {
        assert_eq!(sample(&text, name), *count, "{name} in\n{text}");
    }
    // Every series of these counters: one of the expected above, with a bounded label.
    let known: Vec<&str> = mupdate_worker::pipeline::envelope::Action::names()
        .chain(["unknown"])
        .collect();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("mupdate_requests_total{") || l.starts_with("mupdate_documents_total{")
        })
        .collect();
    assert_eq!(series.len(), want.len(), "{series:?}");
    for line in series {
        let action = line
            .split("action=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("no action label: {line}"));
        assert!(known.contains(&action), "{line}");
    }
    worker.stop().await;
}

/// The left side of an alert's top-level comparison (`a > 0.05` → `a`), or what
/// `absent(…)` looks for: the expression whose data the alert's condition is about.
fn inner(expr: &str) -> String {
    let expr = expr.trim();
    if let Some(arg) = expr
        .strip_prefix("absent(")
        .and_then(|e| e.strip_suffix(')'))
    {
        return arg.trim().to_owned();
    }
    let bytes = expr.as_bytes();
    let (mut depth, mut quote) = (0i32, None::<u8>);
    for (i, &b) in bytes.iter().enumerate() {
        match (quote, b) {
            (Some(q), _) if b == q && bytes[i - 1] != b'\\' => quote = None,
            (Some(_), _) => {}
            (None, b'"' | b'\'' | b'`') => quote = Some(b),
            (None, b'(' | b'{' | b'[') => depth += 1,
            (None, b')' | b'}' | b']') => depth -= 1,
            (None, b'=' | b'!') if depth == 0 && bytes.get(i + 1) == Some(&b'=') => {
                return expr[..i].trim().to_owned();
            }
            (None, b'>' | b'<') if depth == 0 => return expr[..i].trim().to_owned(),
            _ => {}
        }
    }
    panic!("no top-level comparison in {expr}")
}

#[test]
fn inner_expressions_are_the_left_of_the_comparison() {
    assert_eq!(inner(r#"up{job="a"} == 0"#), r#"up{job="a"}"#);
    assert_eq!(inner("absent(up{job=\"a\"})"), "up{job=\"a\"}");
    assert_eq!(
        inner("sum by (a) (rate(x{s!~\"2..\"}[5m])) / sum(rate(x[5m]))\n  > 0.05"),
        "sum by (a) (rate(x{s!~\"2..\"}[5m])) / sum(rate(x[5m]))"
    );
    assert_eq!(inner("x{a=\">\"} >= 48"), "x{a=\">\"}");
}

/// A Prometheus server on a free loopback port, scraping `target` every second and
/// evaluating `ops/prometheus/alerts.yml`; stopped by its pid and its storage removed on
/// drop.
struct Prometheus {
    child: Child,
    url: String,
    dir: TempDir,
}

impl Prometheus {
    async fn start(target: &str) -> Self {
        let binary = ops_sh(&["bin", "prometheus"]);
        let dir = tempdir();
        let config = dir.join("prometheus.yml");
        let rules = root().join("ops/prometheus/alerts.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [{rules:?}]\n\
                 scrape_configs:\n\
                 \x20 - job_name: {JOB}\n\
                 \x20   static_configs: [{{targets: [{target:?}]}}]\n"
            ),
        )
        .unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let prometheus = Prometheus {
            child,
            url: format!("http://{listen}"),
            dir,
        };
        prometheus.wait_ready().await;
        prometheus
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let ready = http()
                .get(format!("{}/-/ready", self.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus not ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let body: Value = http()
            .get(format!("{}/api/v1/{path}", self.url))
            .query(params)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body
    }

    /// An instant query's result, or Prometheus' error.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let body = self.api("query", &[("query", expr)]).await;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(match &body["data"]["result"] {
            Value::Array(samples) => samples.clone(),
            scalar => vec![scalar.clone()],
        })
    }

    /// Waits until `expr` runs without error and returns data.
    async fn wait_data(&self, expr: &str) -> Vec<Value> {
        self.wait_result(expr, true).await
    }

    /// Waits until `expr` runs without error and returns data (`data`) or none.
    async fn wait_result(&self, expr: &str, data: bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let samples = self
                .query(expr)
                .await
                .unwrap_or_else(|e| panic!("{expr}: {e}"));
            if samples.is_empty() != data {
                return samples;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{expr}: want data {data}, got {samples:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until `expr`'s only sample is `value`.
    async fn wait_value(&self, expr: &str, value: f64) {
        let only = move || async move {
            let got = self.query(expr).await.unwrap();
            got.first()
                .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
        };
        wait_equal(expr, Some(value), only).await;
    }

    /// The alerting rules, once each has been evaluated.
    async fn evaluated_rules(&self) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let body = self.api("rules", &[("type", "alert")]).await;
            let rules: Vec<Value> = body["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            if !rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown") {
                return rules;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "rules never evaluated: {body}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One round of traffic: three 200s, a 206, a 400 (no envelope: action `unknown`), an
/// mUpdate of a collection that doesn't exist (a whole-request error of a known action),
/// and a request whose `reply_to` queue doesn't exist (dead-lettered as unroutable).
/// The status of the mUpdate that failed.
async fn traffic(worker: &Worker, col: &Collection, round: u64) -> u64 {
    for id in ["a", "b", "c"] {
        let reply = call(
            worker,
            &col.envelope(json!([{"_id": id, "body": {"round": round}}])),
        )
        .await;
        assert_eq!(reply["status"], 200, "{reply}");
    }
    let reply = call(
        worker,
        &col.envelope(json!([{"_id": "a", "body": {"n": round}}, {"_id": "missing", "body": {}}])),
    )
    .await;
    assert_eq!(reply["status"], 206, "{reply}");
    let reply = call_bytes(worker, b"not json").await;
    assert_eq!(reply["status"], 400, "{reply}");
    let mut elsewhere = col.envelope(json!([{"_id": "a", "body": {}}]));
    elsewhere["collection"] = json!(fresh("no-such-collection"));
    let reply = call(worker, &elsewhere).await;
    let failed = reply["status"].as_u64().unwrap();
    assert!(failed >= 400, "{reply}");
    let amqp = Amqp::open().await;
    let props = lapin::BasicProperties::default()
        .with_reply_to(fresh("no-such-reply-queue").as_str().into());
    let body = serde_json::to_vec(&col.envelope(json!([{"_id": "b", "body": {"x": 1}}]))).unwrap();
    publish(&amqp.channel, worker.request_queue(), &body, props).await;
    amqp.close().await;
    failed
}

/// What each alert's condition is after `traffic` ran twice on a healthy worker: only
/// the failing-requests alert's, 2 of 6 requests (the 400 and the unknown collection)
/// being non-2xx in the second round. The others legitimately return no data (their
/// inner expression is checked instead): the worker is scraped, consuming, its engine
/// answers, it isn't paused, one dead letter in 5 minutes is under the rate, its
/// requests are fast and few, 1 of 5 mUpdate failing is under half.
fn condition_holds(alert: &str) -> bool {
    match alert {
        "MupdateRequestsFailing" => true,
        "MupdateWorkerDown"
        | "MupdateWorkerAbsent"
        | "MupdateBrokerUnavailable"
        | "MupdateEngineUnavailable"
        | "MupdateConsumptionPaused"
        | "MupdateRequestsDeadLettered"
        | "MupdateActionFailing"
        | "MupdateRequestLatencyHigh"
        | "MupdateRequestsHeld" => false,
        other => panic!("alert {other}: say here whether its condition holds after the traffic"),
    }
}

#[tokio::test]
async fn prometheus_scrapes_the_worker_and_runs_every_dashboard_and_alert_expression() {
    wait_servers().await;
    let col = Collection::create(&[
        ("a", json!({"n": 0})),
        ("b", json!({"n": 0})),
        ("c", json!({"n": 0})),
    ])
    .await;
    let mut settings = settings();
    let listen = format!("127.0.0.1:{}", free_port());
    settings.metrics.listen = listen.clone();
    let worker = Worker::start_with(settings).await;
    wait_readyz(&listen, 200).await;
    let prometheus = Prometheus::start(&listen).await;
    let selector = format!("job=\"{JOB}\", instance=\"{listen}\"");
    prometheus
        .wait_value(&format!("up{{{selector}}}"), 1.0)
        .await;

    // Two rounds, each scraped before the next: counters' series then exist before
    // their second increase, so rates over them see it.
    for round in 1..=2 {
        let failed = traffic(&worker, &col, round).await;
        let dead = "mupdate_requests_dead_lettered_total{reason=\"unroutable\"}";
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while metric(&listen, dead).await < round as f64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never dead-lettered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let n = round as f64;
        let failed = format!("mupdate_requests_total{{action=\"mUpdate\", status=\"{failed}\"");
        for (series, want) in [
            (
                "mupdate_requests_total{action=\"mUpdate\", status=\"200\"",
                3.0 * n,
            ),
            (
                "mupdate_requests_total{action=\"mUpdate\", status=\"206\"",
                n,
            ),
            (
                "mupdate_requests_total{action=\"unknown\", status=\"400\"",
                n,
            ),
            (failed.as_str(), n),
            (
                "mupdate_requests_dead_lettered_total{reason=\"unroutable\"",
                n,
            ),
        ] {
            let expr = format!("{series}, {selector}}}");
            prometheus.wait_value(&expr, want).await;
        }
    }

    // The worker's series are all in Prometheus, with the job and instance labels.
    let text = metrics_text(&listen).await;
    let exposed: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    assert!(exposed.len() > 20, "{text}");
    let body = prometheus
        .api(
            "label/__name__/values",
            &[("match[]", &format!("{{{selector}}}"))],
        )
        .await;
    let stored: std::collections::BTreeSet<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let missing: Vec<_> = exposed.difference(&stored).collect();
    assert!(missing.is_empty(), "not in prometheus: {missing:?}");

    // Every metric the dashboard and the rules name is one the worker exposes.
    let rules = prometheus.evaluated_rules().await;
    let rule_file = std::fs::read_to_string(root().join("ops/prometheus/alerts.yml")).unwrap();
    assert_eq!(
        rules.len(),
        rule_file.matches("- alert:").count(),
        "every rule loaded"
    );
    let d = dashboard();
    let dash = dashboard_exprs(&d);
    let all_exprs: Vec<String> = dash
        .iter()
        .map(|(_, e)| e.clone())
        .chain(
            rules
                .iter()
                .map(|r| r["query"].as_str().unwrap().to_owned()),
        )
        .collect();
    for expr in &all_exprs {
        for name in metric_names(expr) {
            assert!(
                stored.contains(name.as_str()),
                "{name} (in {expr}) is not a metric of the worker"
            );
        }
    }

    // Every dashboard expression runs and, after this traffic, has data.
    for (title, expr) in &dash {
        let filled = fill_in(expr);
        assert!(!filled.contains('$'), "{title}: unknown variable in {expr}");
        let samples = prometheus.wait_data(&filled).await;
        assert!(!samples.is_empty(), "{title}: {filled}");
    }
    // The template variables' queries find this job and this worker.
    for var in d["templating"]["list"].as_array().unwrap() {
        let def = var["definition"].as_str().unwrap();
        let (metric, label) = def
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .and_then(|d| d.rsplit_once(','))
            .unwrap_or_else(|| panic!("a label_values(metric, label) query: {def}"));
        let body = prometheus
            .api(
                &format!("label/{}/values", label.trim()),
                &[("match[]", &fill_in(metric))],
            )
            .await;
        let values = body["data"].as_array().unwrap();
        let want = match label.trim() {
            "job" => JOB,
            "action" => "mUpdate",
            _ => &listen,
        };
        assert!(
            values.iter().any(|v| v == want),
            "{def}: {values:?}, not {want}"
        );
    }

    // Every alert rule is healthy, runs, returns data exactly when its condition holds
    // (and is then pending), and its inner expression has data.
    for rule in &rules {
        let (name, expr) = (
            rule["name"].as_str().unwrap(),
            rule["query"].as_str().unwrap(),
        );
        assert_eq!(rule["health"], "ok", "{name}: {}", rule["lastError"]);
        let holds = condition_holds(name);
        // Rates over a few seconds of samples are extrapolated: wait for them to settle.
        let samples = prometheus.wait_result(expr, holds).await;
        let inner = inner(expr);
        prometheus.wait_data(&inner).await;
        if holds {
            assert_eq!(samples[0]["metric"]["instance"], listen.as_str(), "{name}");
        }
    }
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let rules = prometheus.evaluated_rules().await;
        let states: Vec<(String, String)> = rules
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap().into(),
                    r["state"].as_str().unwrap().into(),
                )
            })
            .collect();
        let want = |name: &str| {
            if condition_holds(name) {
                "pending"
            } else {
                "inactive"
            }
        };
        if states.iter().all(|(name, state)| state == want(name)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rule states: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    drop(prometheus);
    worker.stop().await;
}

/// The `mupdate_…` metric names an expression mentions.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("mupdate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}
