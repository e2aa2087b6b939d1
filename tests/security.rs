//! Who may write where (SPEC section 4, rights): broker users created for the test, rules
//! allowing each a different set of indexes and collections, and the answer for every
//! (user × target) pair; the engine shows writes only where the rules allow them. The
//! rules reload on SIGHUP, and a broken rules file keeps the rules in force.

mod support;

use std::process::{Command, Stdio};

use lapin::BasicProperties;
use lapin::types::AMQPValue;
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
        let name =
            format!("mupdate_rights_checks_total{{action=\"mUpdate\",outcome=\"{outcome}\"}}");
        assert_eq!(metric(&listen, &name).await, count, "{name}");
    }
    worker.stop().await;
}

/// A valid envelope of `action` on `target`, about the document `id` (which exists for
/// the actions that need it: update, replace and delete forms).
fn envelope_of(action: &str, target: &Collection, id: &str, n: u64) -> Value {
    let mut envelope = json!({"index": target.index, "collection": target.collection,
                              "controller": "document", "action": action});
    let body = json!({"n": n});
    match action {
        "mDelete" => envelope["body"] = json!({"ids": [id]}),
        "mUpsert" => {
            envelope["body"] = json!({"documents": [{"_id": id, "changes": body, "default": {}}]})
        }
        "upsert" => {
            envelope["_id"] = json!(id);
            envelope["body"] = json!({"changes": body, "default": {}});
        }
        "delete" => envelope["_id"] = json!(id),
        multi if multi.starts_with('m') => {
            envelope["body"] = json!({"documents": [{"_id": id, "body": body}]})
        }
        _ => {
            envelope["_id"] = json!(id);
            envelope["body"] = body;
        }
    }
    envelope
}

/// The actions whose document must exist beforehand.
fn needs_document(action: &str) -> bool {
    !matches!(
        action,
        "mCreate" | "create" | "mCreateOrReplace" | "createOrReplace" | "mUpsert" | "upsert"
    )
}

/// Issue 21: a rule's `actions` (glob patterns on Kuzzle's action names) say which
/// writes it allows; a rule without them allows the updates only (mUpdate, mUpsert,
/// update, upsert), as every rule did before the worker took the other actions. Every
/// (user × action) pair: allowed ones write (the engine shows it), refused ones get
/// Kuzzle's 403 naming `document:<action>` and write nothing; the rights metric counts
/// each check under its action.
#[tokio::test]
async fn a_rules_actions_say_which_writes_it_allows() {
    let actions: Vec<&str> = mupdate_worker::pipeline::envelope::Action::names().collect();
    let (legacy, creator, multi, root) = (
        BrokerUser::create("legacy"),
        BrokerUser::create("creator"),
        BrokerUser::create("multi"),
        BrokerUser::create("root"),
    );
    let users = [&legacy, &creator, &multi, &root];
    // One document per (user, action) that needs one, so that each write shows alone.
    let ids: Vec<String> = users
        .iter()
        .flat_map(|u| actions.iter().map(move |a| format!("{}-{a}", u.name)))
        .collect();
    let docs: Vec<(&str, Value)> = ids
        .iter()
        .map(|id| (id.as_str(), json!({"n": 0})))
        .collect();
    let target = Collection::create(&docs).await;
    let dir = tempdir();
    let rules = dir.join("rules.toml");
    let rule = |user: &BrokerUser, actions: &str| {
        format!(
            "[[allow]]\nusers = [\"{}\"]\nindexes = [\"{}\"]\ncollections = [\"*\"]\n{actions}\n",
            user.name, target.index
        )
    };
    write_rules(
        &rules,
        &[
            rule(&legacy, ""),
            rule(&creator, "actions = [\"mCreate\", \"create\"]"),
            rule(&multi, "actions = [\"m*\"]"),
            rule(&root, "actions = [\"*\"]"),
        ]
        .concat(),
    );
    let mut settings = settings();
    settings.security.enabled = true;
    settings.security.rules_file = rules.display().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    settings.metrics.listen = listen.clone();
    let worker = Worker::start_with(settings).await;
    let queue = worker.request_queue().to_owned();

    let allowed = |user: &BrokerUser, action: &str| {
        if user.name == legacy.name {
            ["mUpdate", "mUpsert", "update", "upsert"].contains(&action)
        } else if user.name == creator.name {
            ["mCreate", "create"].contains(&action)
        } else if user.name == multi.name {
            action.starts_with('m')
        } else {
            true
        }
    };
    let (mut allowed_count, mut forbidden_count) = (
        std::collections::HashMap::<&str, f64>::new(),
        std::collections::HashMap::<&str, f64>::new(),
    );
    for user in users {
        for &action in &actions {
            let id = if needs_document(action) {
                format!("{}-{action}", user.name)
            } else {
                fresh("new")
            };
            let reply = user
                .call(&queue, &envelope_of(action, &target, &id, 7))
                .await;
            let allow = allowed(user, action);
            println!("{} × {action}: {}", user.name, reply["status"]);
            let (stored, found) = target.get(&id).await;
            if allow {
                assert!(
                    reply["status"]
                        .as_u64()
                        .is_some_and(|s| (200..300).contains(&s)),
                    "{} may {action}: {reply}",
                    user.name
                );
                assert_eq!(reply["error"], Value::Null, "{reply}");
                if action.ends_with("elete") {
                    assert_eq!(found, 0, "{action} deleted {id}");
                } else {
                    assert_eq!(stored["n"], 7, "{action} wrote {id}");
                }
                *allowed_count.entry(action).or_default() += 1.0;
            } else {
                assert_eq!(
                    reply["status"], 403,
                    "{} may not {action}: {reply}",
                    user.name
                );
                assert_eq!(reply["error"]["id"], "security.rights.forbidden");
                let message = format!(
                    "Insufficient permissions to execute the action \"document:{action}\" (User \"{}\").",
                    user.name
                );
                assert_eq!(reply["error"]["message"], message);
                assert_eq!(reply["action"], action);
                if needs_document(action) {
                    assert_eq!(stored["n"], 0, "{action} refused: {id} untouched");
                } else {
                    assert_eq!(found, 0, "{action} refused: {id} not created");
                }
                *forbidden_count.entry(action).or_default() += 1.0;
            }
        }
    }
    // In particular: a rule written before issue 21 allows no delete.
    assert!(!allowed(&legacy, "mDelete") && !allowed(&legacy, "delete"));
    for &action in &actions {
        for (outcome, counts) in [("allowed", &allowed_count), ("forbidden", &forbidden_count)] {
            let name =
                format!("mupdate_rights_checks_total{{action=\"{action}\",outcome=\"{outcome}\"}}");
            let want = counts.get(action).copied().unwrap_or(0.0);
            assert_eq!(metric(&listen, &name).await, want, "{name}");
        }
    }
    worker.stop().await;
}

/// A reload on SIGHUP takes a rule's new `actions`: a rule without them refuses a
/// delete; given `actions = ["*Delete", "delete", "m*"]`, the same user deletes.
#[tokio::test]
async fn sighup_picks_up_a_rules_actions() {
    let target = Collection::create(&[("d1", json!({"n": 0})), ("d2", json!({"n": 0}))]).await;
    let user = BrokerUser::create("erin");
    let dir = tempdir();
    let rules = dir.join("rules.toml");
    let rule = |actions: &str| {
        format!(
            "[[allow]]\nusers = [\"{}\"]\nindexes = [\"{}\"]\ncollections = [\"*\"]\n{actions}\n",
            user.name, target.index
        )
    };
    write_rules(&rules, &rule(""));
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

    let delete = envelope_of("delete", &target, "d1", 0);
    assert_eq!(
        status(user.call(&queue, &delete).await),
        403,
        "no actions: no delete"
    );
    let update = envelope_of("mUpdate", &target, "d2", 1);
    assert_eq!(
        status(user.call(&queue, &update).await),
        200,
        "no actions: updates"
    );

    write_rules(&rules, &rule("actions = [\"*Delete\", \"delete\", \"m*\"]"));
    binary.signal("-HUP");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        match status(user.call(&queue, &delete).await) {
            200 => break,
            403 => {}
            other => panic!("delete after the reload: {other}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP never took effect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(target.get("d1").await.1, 0, "deleted");
    let update = envelope_of("mUpdate", &target, "d2", 2);
    assert_eq!(status(user.call(&queue, &update).await), 200, "m*: updates");
    let single = envelope_of("update", &target, "d2", 3);
    assert_eq!(
        status(user.call(&queue, &single).await),
        403,
        "no single update now"
    );
    assert_eq!(target.get("d2").await.0["n"], 2);

    assert_eq!(binary.terminate().await.code(), Some(0));
    delete_topology(&settings).await;
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
        "[[allow]]\nusers = [\"etl-*\"]\nindexes = [\"shop\"]\ncollections = [\"*\"]\n\
         [[reply]]\nusers = [\"etl-*\"]\nqueues = [\"{user}.replies\"]\n",
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
    assert_eq!(
        shown["security"]["reply_rules"],
        json!([{"users": ["etl-*"], "queues": ["{user}.replies"]}])
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

/// Where a reply may go is part of the rules (SPEC section 5): a producer allowed its
/// index but naming another application's queue in `reply_to` gets no reply there; its
/// request is dead-lettered unapplied with a 403 saying why (401 without a user). Its own
/// queue (named after it, by default) and direct reply-to get the reply, with the
/// verified user in `x-mupdate-user-id`; on the reply exchange its routing key is
/// prefixed with its name, so a forged requestId reaches only its own bindings.
#[tokio::test]
async fn replies_go_only_where_the_callers_rules_allow() {
    let target = Collection::create(&[("d", json!({"n": 0}))]).await;
    let alice = BrokerUser::create("alice");
    let dir = tempdir();
    let rules = dir.join("rules.toml");
    write_rules(
        &rules,
        &format!(
            "[[allow]]\nusers = [\"{}\", \"guest\"]\nindexes = [\"{}\"]\ncollections = [\"*\"]\n",
            alice.name, target.index
        ),
    );
    let mut settings = settings();
    settings.security.enabled = true;
    settings.security.rules_file = rules.display().to_string();
    settings.amqp.reply_exchange = fresh("mupdate.reply-exchange");
    let mut cleanup = support::cleanup::Cleanup::of(&settings);
    let other_app = cleanup.queue(fresh("billing.commands"));
    let own = cleanup.queue(format!("{}.replies", alice.name));
    let victim_binding = cleanup.queue(fresh("victim"));
    let own_binding = cleanup.queue(fresh("alice-bound"));
    let amqp = Amqp::open().await;
    let exchange = settings.amqp.reply_exchange.clone();
    amqp.channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    for (queue, key) in [
        (&other_app, None),
        (&own, None),
        (&victim_binding, Some("victim.#".to_owned())),
        (&own_binding, Some(format!("{}.#", alice.name))),
    ] {
        amqp.channel
            .queue_declare(
                queue.as_str().into(),
                Default::default(),
                Default::default(),
            )
            .await
            .unwrap();
        if let Some(key) = key {
            amqp.channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    Default::default(),
                    Default::default(),
                )
                .await
                .unwrap();
        }
    }
    let worker = Worker::start_with(settings).await;
    let queue = worker.request_queue().to_owned();
    let dead = worker.settings.amqp.dead_letter_queue.clone();
    let as_alice = Amqp::open_at(&alice.url()).await;
    let send = |amqp: &Amqp, user: Option<&str>, reply_to: Option<&str>, id: &str, n: u64| {
        let mut envelope = update(&target, n);
        envelope["requestId"] = json!(id);
        let mut props = BasicProperties::default();
        if let Some(user) = user {
            props = props.with_user_id(user.into());
        }
        if let Some(to) = reply_to {
            props = props.with_reply_to(to.into());
        }
        let channel = amqp.channel.clone();
        let queue = queue.clone();
        async move {
            publish(
                &channel,
                &queue,
                &serde_json::to_vec(&envelope).unwrap(),
                props,
            )
            .await
        }
    };

    // Another application's queue: dead-lettered unapplied with a 403, nothing published.
    send(
        &as_alice,
        Some(&alice.name),
        Some(&other_app),
        "to-billing",
        1,
    )
    .await;
    let letter = get(&amqp, &dead).await;
    assert_eq!(header(&letter, "x-mupdate-reason"), "reply_forbidden");
    assert_eq!(
        letter.properties.headers().as_ref().unwrap().inner()["x-mupdate-applied"],
        AMQPValue::Boolean(false)
    );
    assert_eq!(header(&letter, "x-mupdate-user-id"), alice.name);
    let error: Value = serde_json::from_str(&header(&letter, "x-mupdate-error")).unwrap();
    assert_eq!(error["status"], 403, "{error}");
    assert_eq!(error["id"], "security.rights.forbidden");
    let message = format!(
        "Insufficient permissions to have a reply sent to the queue \"{other_app}\" (User \"{}\").",
        alice.name
    );
    assert_eq!(error["message"], message);
    assert_eq!(target.get("d").await.0["n"], 0, "not applied");

    // Its own queue: the reply, with the verified user.
    send(&as_alice, Some(&alice.name), Some(&own), "to-own", 2).await;
    let reply = get(&amqp, &own).await;
    let body: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(
        (body["status"].clone(), body["requestId"].clone()),
        (json!(200), json!("to-own"))
    );
    assert_eq!(header(&reply, "x-mupdate-user-id"), alice.name);
    assert_eq!(target.get("d").await.0["n"], 2);

    // The reply exchange, with a requestId naming another application's binding: routed
    // under alice's name.
    send(&as_alice, Some(&alice.name), None, "victim.r1", 3).await;
    let reply = get(&amqp, &own_binding).await;
    assert_eq!(
        reply.routing_key.as_str(),
        format!("{}.victim.r1", alice.name)
    );
    let body: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(body["requestId"], "victim.r1");

    // Without a user: a queue or the exchange is a 401, dead-lettered.
    send(&amqp, None, Some(&other_app), "anonymous-1", 4).await;
    send(&amqp, None, None, "victim.anonymous-2", 5).await;
    for _ in 0..2 {
        let letter = get(&amqp, &dead).await;
        assert_eq!(header(&letter, "x-mupdate-reason"), "reply_unauthorized");
        let error: Value = serde_json::from_str(&header(&letter, "x-mupdate-error")).unwrap();
        assert_eq!(error["id"], "security.rights.unauthorized", "{error}");
    }
    // Direct reply-to: always.
    let reply = alice.call(&queue, &update(&target, 6)).await;
    assert_eq!(reply["status"], 200, "{reply}");

    // Nothing ever reached the other application or its binding.
    for queue in [&other_app, &victim_binding] {
        assert_eq!(queue_counts(queue).await.unwrap().0, 0, "{queue}");
    }
    assert_eq!(target.get("d").await.0["n"], 6);
    worker.stop().await;
    as_alice.close().await;
    let _ = amqp
        .channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    amqp.close().await;
}

/// The next message of `queue`, within the test timeout (basic.get: no consumer left
/// behind).
async fn get(amqp: &Amqp, queue: &str) -> lapin::message::Delivery {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let got = amqp
            .channel
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap();
        if let Some(message) = got {
            return message.delivery;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing in {queue}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A string header of a message.
fn header(message: &lapin::message::Delivery, name: &str) -> String {
    let headers = message.properties.headers().as_ref().expect("headers");
    match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        other => panic!("header {name}: {other:?}"),
    }
}
