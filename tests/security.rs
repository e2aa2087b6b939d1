//! Who may write where (SPEC section 4, rights): broker users created for the test, rules
//! allowing each a different set of indexes and collections, and the answer for every
//! (user × target) pair; the engine shows writes only where the rules allow them. The
//! rules reload on SIGHUP, and a broken rules file keeps the rules in force.

mod support;

use std::process::{Command, Stdio};

use mupdate_worker::client::Client;
use serde_json::{Value, json};
use support::binary::BinaryWorker;
use support::*;

/// A broker user made for one test, deleted on drop.
struct BrokerUser {
    name: String,
    password: String,
}

impl BrokerUser {
    fn create(prefix: &str) -> Self {
        let name = fresh(prefix);
        let password = fresh("pw");
        rabbitmqctl(&["add_user", &name, &password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        BrokerUser { name, password }
    }

    fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }

    /// Sends `envelope` as this user (its `user_id` set, as RabbitMQ requires it to be).
    async fn call(&self, queue: &str, envelope: &Value) -> Value {
        let client = Client::connect(&self.url())
            .await
            .unwrap()
            .with_user_id(Some(self.name.clone()));
        let body = serde_json::to_vec(envelope).unwrap();
        let reply = client
            .request(queue, &body, &fresh("r"), TIMEOUT)
            .await
            .unwrap();
        serde_json::from_slice(&reply).unwrap()
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_user", &self.name]);
    }
}

fn write_rules(path: &std::path::Path, rules: &str) {
    std::fs::write(path, rules).unwrap();
}

/// Three collections: (a, col), (a, other) and (b, col), each holding document `d`.
async fn targets() -> Vec<Collection> {
    let a = Collection::create(&[("d", json!({"n": 0}))]).await;
    let a_other = Collection::create_named(&a.index, "other", &[("d", json!({"n": 0}))]).await;
    let b = Collection::create(&[("d", json!({"n": 0}))]).await;
    vec![a, a_other, b]
}

fn update(target: &Collection, n: u64) -> Value {
    target.envelope(json!([{"_id": "d", "body": {"n": n}}]))
}

#[tokio::test]
async fn each_user_writes_exactly_where_the_rules_allow() {
    let targets = targets().await;
    let (a, a_other, b) = (&targets[0], &targets[1], &targets[2]);
    let (alice, bob, carol) = (
        BrokerUser::create("alice"),
        BrokerUser::create("bob"),
        BrokerUser::create("carol"),
    );
    let dir = tempdir();
    let rules = dir.join("rules.toml");
    // alice: every collection of index a; bob: collection `col` of any index; carol: none.
    write_rules(
        &rules,
        &format!(
            "[[allow]]\nusers = [\"{}\"]\nindexes = [\"{}\"]\ncollections = [\"*\"]\n\n\
             [[allow]]\nusers = [\"bob-*\"]\nindexes = [\"*\"]\ncollections = [\"col\"]\n",
            alice.name, a.index
        ),
    );
    let mut settings = settings();
    settings.security.enabled = true;
    settings.security.rules_file = rules.display().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    settings.metrics.listen = listen.clone();
    let worker = Worker::start_with(settings).await;
    let queue = worker.request_queue().to_owned();

    let matrix = [
        (&alice, a, 200),
        (&alice, a_other, 200),
        (&alice, b, 403),
        (&bob, a, 200),
        (&bob, a_other, 403),
        (&bob, b, 200),
        (&carol, a, 403),
        (&carol, a_other, 403),
        (&carol, b, 403),
    ];
    for (i, (user, target, want)) in matrix.iter().enumerate() {
        let reply = user.call(&queue, &update(target, i as u64 + 1)).await;
        println!(
            "{} × {}/{}: {}",
            user.name, target.index, target.collection, reply["status"]
        );
        assert_eq!(
            reply["status"], *want,
            "{} on {}/{}: {reply}",
            user.name, target.index, target.collection
        );
        if *want == 403 {
            assert_eq!(reply["error"]["id"], "security.rights.forbidden");
            let message = format!(
                "Insufficient permissions to execute the action \"document:mUpdate\" (User \"{}\").",
                user.name
            );
            assert_eq!(reply["error"]["message"], message);
            assert_eq!(reply["result"], Value::Null);
        }
    }
    // Without user_id (a guest connection that doesn't set it): 401.
    let reply = call(&worker, &update(a, 99)).await;
    assert_eq!(reply["status"], 401, "{reply}");
    assert_eq!(reply["error"]["id"], "security.rights.unauthorized");
    assert_eq!(
        reply["error"]["message"],
        "Unauthorized: authentication required to execute the action \"document:mUpdate\"."
    );

    // The engine holds the last allowed write of each target, and nothing forbidden.
    assert_eq!(a.get("d").await.0["n"], 4, "bob's write, after alice's");
    assert_eq!(a_other.get("d").await.0["n"], 2, "alice's write only");
    assert_eq!(b.get("d").await.0["n"], 6, "bob's write only");
    assert_eq!(
        a.get("d").await.0["_kuzzle_info"]["updater"],
        bob.name.as_str()
    );
    for (outcome, count) in [("allowed", 4.0), ("forbidden", 5.0), ("unauthorized", 1.0)] {
        let name = format!("mupdate_rights_checks_total{{outcome=\"{outcome}\"}}");
        assert_eq!(metric(&listen, &name).await, count, "{name}");
    }
    worker.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_rules_and_a_broken_file_keeps_them() {
    let target = Collection::create(&[("d", json!({"n": 0}))]).await;
    let user = BrokerUser::create("dana");
    let dir = tempdir();
    let rules = dir.join("rules.toml");
    write_rules(&rules, "");
    let settings = settings();
    let mut binary = BinaryWorker::spawn(
        worker_command(&settings)
            .env("MUPDATE__SECURITY__ENABLED", "true")
            .env("MUPDATE__SECURITY__RULES_FILE", &rules)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped()),
    );
    let queue = settings.amqp.request_queue.clone();
    wait_consumers(&queue, 1).await;
    let status = |reply: Value| reply["status"].as_u64().unwrap();

    assert_eq!(
        status(user.call(&queue, &update(&target, 1)).await),
        403,
        "no rule yet"
    );
    write_rules(
        &rules,
        &format!(
            "[[allow]]\nusers = [\"{}\"]\nindexes = [\"{}\"]\ncollections = [\"col\"]\n",
            user.name, target.index
        ),
    );
    binary.signal("-HUP");
    // The reload is asynchronous: ask until the answer changes, within a bound.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut n = 1;
    while status(user.call(&queue, &update(&target, n)).await) != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP never took effect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        n += 1;
    }
    assert_eq!(target.get("d").await.0["n"], n);

    // A broken file: the rules in force stay.
    write_rules(&rules, "[[allow]]\nusers = [\"unclosed\"\n");
    binary.signal("-HUP");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(status(user.call(&queue, &update(&target, 100)).await), 200);

    assert_eq!(binary.terminate().await.code(), Some(0));
    let logs = binary.stderr();
    assert!(logs.contains("rights rules reloaded"), "{logs}");
    assert!(logs.contains("rights rules not reloaded"), "{logs}");
    delete_topology(&settings).await;
}

#[tokio::test]
async fn config_shows_the_effective_rules_and_a_broken_file_stops_the_worker() {
    let dir = tempdir();
    let rules = dir.join("rules.toml");
    write_rules(
        &rules,
        "[[allow]]\nusers = [\"etl-*\"]\nindexes = [\"shop\"]\ncollections = [\"*\"]\n",
    );
    let binary = env!("CARGO_BIN_EXE_mupdate-worker");
    let out = Command::new(binary)
        .arg("config")
        .env("MUPDATE__SECURITY__ENABLED", "true")
        .env("MUPDATE__SECURITY__RULES_FILE", &rules)
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        shown["security"]["rules"],
        json!([{"users": ["etl-*"], "indexes": ["shop"], "collections": ["*"]}])
    );
    write_rules(&rules, "not toml [");
    let out = Command::new(binary)
        .env("MUPDATE__SECURITY__ENABLED", "true")
        .env("MUPDATE__SECURITY__RULES_FILE", &rules)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("security.rules_file"));
}
