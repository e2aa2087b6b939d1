//! TLS against the real servers. RabbitMQ gets a TLS listener at runtime on a free port
//! (and certificate login through `rabbitmq_auth_mechanism_ssl`); Elasticsearch, whose
//! test distribution has no TLS, is reached through an nginx that this file starts in
//! front of it, terminating TLS and checking basic auth and client certificates. Every
//! certificate is generated per test with the openssl CLI; listeners, broker settings,
//! users, nginx and files are undone by guards, failed test or not. Tests that change
//! the broker hold `servers_lock` for their whole run.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mupdate_worker::config::Settings;
use serde_json::json;
use support::binary::BinaryWorker;
use support::*;

const OPENSSL: &str = "/usr/bin/openssl";
/// How long a worker that must not become ready is watched.
const WATCH: Duration = Duration::from_secs(4);

// ------------------------------------------------------------------ certificates

/// A test CA with a server certificate for 127.0.0.1 and localhost, client
/// certificates, and an unrelated CA: files in a temporary directory, removed on drop.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(fresh("mupdate-tls"));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki { dir };
        // The broker's node runs as user rabbitmq: it must reach the directory.
        pki.run("chmod", &["0755", "."]);
        pki.ca("ca", "mupdate test CA");
        pki.ca("other-ca", "unrelated test CA");
        pki.ec_key("server.key");
        pki.sign(
            "server",
            "/CN=localhost",
            "ca",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        // Readable by the broker alone (and root: nginx runs as root here).
        pki.run("chmod", &["0600", "server.key"]);
        let _ = Command::new("chown")
            .args(["rabbitmq:", &pki.path("server.key")])
            .status();
        pki
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    fn run(&self, program: &str, args: &[&str]) -> Vec<u8> {
        let out = Command::new(program)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn openssl(&self, args: &[&str]) {
        self.run(OPENSSL, args);
    }

    /// A P-256 key, PKCS#8 PEM.
    fn ec_key(&self, file: &str) {
        let curve = "ec_paramgen_curve:P-256";
        self.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            curve,
            "-out",
            file,
        ]);
    }

    fn ca(&self, name: &str, cn: &str) {
        let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
        self.ec_key(&key);
        self.openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
        ]);
    }

    /// `{name}.pem`: `{name}.key`'s certificate for `subject`, signed by CA `ca`.
    fn sign(&self, name: &str, subject: &str, ca: &str, extensions: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(self.dir.join(&ext), extensions).unwrap();
        let (csr, key) = (format!("{name}.csr"), format!("{name}.key"));
        self.openssl(&["req", "-new", "-key", &key, "-out", &csr, "-subj", subject]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    }

    /// A client certificate with common name `cn`, signed by CA `ca`: its PEM file and
    /// its key (PKCS#8 EC, or a traditional PKCS#1 RSA key with `rsa`).
    fn client(&self, cn: &str, ca: &str, rsa: bool) -> (String, String) {
        let name = format!("client-{cn}-{ca}");
        let key = format!("{name}.key");
        if rsa {
            self.openssl(&["genrsa", "-traditional", "-out", &key, "2048"]);
        } else {
            self.ec_key(&key);
        }
        self.sign(
            &name,
            &format!("/CN={cn}"),
            ca,
            "extendedKeyUsage=clientAuth\n",
        );
        (self.path(&format!("{name}.pem")), self.path(&key))
    }

    /// The lines of a key that must never be shown: its file's base64 lines and those of
    /// its PKCS#8 form (what the worker hands the TLS stack).
    fn secret_lines(&self, key: &str) -> Vec<String> {
        let pkcs8 = self.run(OPENSSL, &["pkey", "-in", key]);
        let file = std::fs::read(key).unwrap();
        [file, pkcs8]
            .iter()
            .flat_map(|pem| {
                String::from_utf8_lossy(pem)
                    .lines()
                    .filter(|l| !l.starts_with("-----") && l.len() > 16)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ------------------------------------------------------------------ the broker

/// rabbitmqctl's output (through services.sh, which knows the node).
fn rabbitmqctl_out(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let out = Command::new(script)
        .args(["rabbitmqctl", "-q"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn eval(expression: &str) -> String {
    rabbitmqctl_out(&["eval", expression])
}

fn rabbitmq_plugins(args: &[&str]) -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    Command::new(script)
        .arg("rabbitmq-plugins")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
        .is_ok()
}

/// A TLS listener of the broker on 127.0.0.1, a free port: the test CA's server
/// certificate, peers verified against the test CA (a certificate is not required).
/// Stopped on drop.
struct TlsListener {
    port: u16,
}

impl TlsListener {
    fn start(pki: &Pki) -> Self {
        let port = free_port();
        eval(&format!(
            "rabbit_networking:start_ssl_listener({{\"127.0.0.1\", {port}}}, \
             [{{cacertfile, \"{}\"}}, {{certfile, \"{}\"}}, {{keyfile, \"{}\"}}, \
              {{verify, verify_peer}}, {{fail_if_no_peer_cert, false}}], 1).",
            pki.path("ca.pem"),
            pki.path("server.pem"),
            pki.path("server.key"),
        ));
        let listener = TlsListener { port };
        assert!(listening(port), "the broker listens with TLS on {port}");
        listener
    }

    /// The broker's connections on this listener: `user`, `auth_mechanism`, `ssl`,
    /// `peer_cert_subject`, tab-separated, one a line.
    fn connections(&self) -> Vec<String> {
        rabbitmqctl_out(&[
            "list_connections",
            "port",
            "user",
            "auth_mechanism",
            "ssl",
            "peer_cert_subject",
        ])
        .lines()
        .filter_map(|l| {
            l.strip_prefix(&format!("{}\t", self.port))
                .map(str::to_owned)
        })
        .collect()
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh"))
            .args(["rabbitmqctl", "-q", "eval"])
            .arg(format!(
                "rabbit_networking:stop_tcp_listener({{\"127.0.0.1\", {}}}).",
                self.port
            ))
            .stdout(Stdio::null())
            .status();
    }
}

/// Certificate login on the broker: the `rabbitmq_auth_mechanism_ssl` plugin, EXTERNAL
/// offered, the user name taken from the certificate's common name, `ssl_options` with
/// `verify_peer` (the plugin refuses to log anyone in otherwise: "TLS configuration is
/// unsafe"), and a user of that name (no password) with every permission on `/`. Drop
/// puts back what was there.
struct CertLogin {
    user: String,
    plugin_enabled_here: bool,
    /// `application:get_env` of each setting changed, as printed: `[{Key, Value}]`.
    before: String,
}

/// The broker settings certificate login changes, and their values for the test.
const CERT_LOGIN_SETTINGS: &str = "[{auth_mechanisms, ['PLAIN', 'AMQPLAIN', 'EXTERNAL']}, \
     {ssl_cert_login_from, common_name}, {ssl_options, [{verify, verify_peer}]}]";

impl CertLogin {
    fn enable(user: &str) -> Self {
        let plugin = "rabbitmq_auth_mechanism_ssl";
        let plugin_enabled_here = !rabbitmq_plugins(&["is_enabled", plugin]);
        // One eval each way: every rabbitmqctl call costs a second or two.
        let before = eval(&format!(
            "[{{K, application:get_env(rabbit, K)}} || {{K, _}} <- {CERT_LOGIN_SETTINGS}]."
        ));
        let mut login = CertLogin {
            user: user.to_owned(),
            plugin_enabled_here: false,
            before,
        };
        if plugin_enabled_here {
            assert!(rabbitmq_plugins(&["enable", plugin]), "enable {plugin}");
            login.plugin_enabled_here = true;
        }
        eval(&format!(
            "[application:set_env(rabbit, K, V) || {{K, V}} <- {CERT_LOGIN_SETTINGS}]."
        ));
        rabbitmqctl(&["add_user", user, &uuid::Uuid::new_v4().to_string()]);
        rabbitmqctl(&["clear_password", user]);
        rabbitmqctl(&["set_permissions", "-p", "/", user, ".*", ".*", ".*"]);
        login
    }
}

impl Drop for CertLogin {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
        let quiet = |args: &[&str]| {
            let _ = Command::new(script)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&["rabbitmqctl", "-q", "delete_user", &self.user]);
        let restore = format!(
            "[case V of {{ok, X}} -> application:set_env(rabbit, K, X); \
              undefined -> application:unset_env(rabbit, K) end || {{K, V}} <- {}].",
            self.before
        );
        quiet(&["rabbitmqctl", "-q", "eval", &restore]);
        if self.plugin_enabled_here {
            quiet(&["rabbitmq-plugins", "disable", "rabbitmq_auth_mechanism_ssl"]);
        }
    }
}

// ------------------------------------------------------------------ the engine's proxy

/// nginx on 127.0.0.1, a free port, in front of the engine: TLS with the test CA's
/// server certificate, a client certificate of the test CA required, basic auth
/// checked, then `proxy_pass http://127.0.0.1:9200`. Its own configuration and logs in
/// a directory of the PKI's; ended by its pid on drop.
struct Nginx {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Nginx {
    fn start(pki: &Pki, user: &str, password: &str) -> Self {
        let binary = if Path::new("/usr/sbin/nginx").exists() {
            "/usr/sbin/nginx"
        } else {
            "nginx"
        };
        if Command::new(binary)
            .arg("-v")
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            // What CI's fresh machine lacks; installed by the project's script.
            services(&["tools"]);
        }
        let dir = pki.dir.join(fresh("nginx"));
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let hash = pki.run(OPENSSL, &["passwd", "-apr1", password]);
        let htpasswd = format!("{user}:{}", String::from_utf8_lossy(&hash).trim());
        std::fs::write(dir.join("htpasswd"), htpasswd).unwrap();
        let port = free_port();
        let d = dir.to_string_lossy();
        let conf = format!(
            "daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  client_max_body_size 0;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {server};
    ssl_certificate_key {server_key};
    ssl_client_certificate {ca};
    ssl_verify_client on;
    auth_basic \"engine\";
    auth_basic_user_file {d}/htpasswd;
    location / {{
      proxy_pass http://127.0.0.1:9200;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Authorization \"\";
    }}
  }}
}}
",
            server = pki.path("server.pem"),
            server_key = pki.path("server.key"),
            ca = pki.path("ca.pem"),
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut nginx = Nginx { port, dir, child };
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !listening(port) {
            if let Some(status) = nginx.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default();
                panic!("nginx exited ({status}): {log}");
            }
            assert!(std::time::Instant::now() < deadline, "nginx did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        nginx
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ the worker

/// The worker binary on `settings`' queues with `env`, metrics on `listen`.
fn spawn_worker(
    settings: &Settings,
    env: &[(&str, &str)],
    listen: &str,
    log: &str,
) -> BinaryWorker {
    BinaryWorker::spawn(
        worker_command(settings)
            .envs(env.iter().copied())
            .env("MUPDATE__METRICS__LISTEN", listen)
            .env("RUST_LOG", log)
            .stderr(Stdio::piped()),
    )
}

/// A log line holding every one of `words` (case aside), printed: the log says why.
fn says(logs: &str, words: &[&str]) {
    let line = logs.lines().find(|line| {
        let line = line.to_lowercase();
        words.iter().all(|w| line.contains(&w.to_lowercase()))
    });
    match line {
        Some(line) => println!("the log says: {line}"),
        None => panic!("no log line says {words:?}:\n{logs}"),
    }
}

/// `/readyz` answers 503 all along `WATCH`.
async fn stays_unready(listen: &str) {
    wait_readyz(listen, 503).await;
    let until = tokio::time::Instant::now() + WATCH;
    while tokio::time::Instant::now() < until {
        assert_eq!(readyz(listen).await, 503, "the worker must stay unready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One mUpdate through the worker on `queue`: 200, and the document changed.
async fn round_trip(queue: &str) {
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let mut envelope = col.envelope(json!([{"_id": "a", "body": {"n": 2}}]));
    envelope["refresh"] = json!("wait_for");
    let reply = call_queue(queue, &serde_json::to_vec(&envelope).unwrap()).await;
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["result"]["hits"][0]["_version"], 2, "{reply}");
    let (source, version) = col.get("a").await;
    assert_eq!((source["n"].clone(), version), (json!(2), 2));
}

// ------------------------------------------------------------------ the broker over TLS

#[tokio::test]
async fn amqps_with_a_ca_bundle_round_trips() {
    let _servers = servers_lock().await;
    let pki = Pki::new();
    let listener = TlsListener::start(&pki);
    let mut settings = settings();
    // guest may log in from loopback, which a TLS connection from 127.0.0.1 is.
    settings.amqp.url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", listener.port);
    settings.amqp.tls_ca_file = pki.path("ca.pem");
    let worker = Worker::start_with(settings).await;
    let connections = listener.connections();
    assert!(
        connections
            .iter()
            .any(|c| c.starts_with("guest\tPLAIN\ttrue")),
        "the worker's connection is TLS, PLAIN login: {connections:?}"
    );
    round_trip(worker.request_queue()).await;
    worker.stop().await;
}

#[tokio::test]
async fn certificate_login_with_external_round_trips_and_an_unknown_client_ca_is_refused() {
    let _servers = servers_lock().await;
    let pki = Pki::new();
    let listener = TlsListener::start(&pki);
    let user = fresh("tls-user");
    let _login = CertLogin::enable(&user);
    let (cert, key) = pki.client(&user, "ca", false);
    let url = format!(
        "amqps://127.0.0.1:{}/%2f?auth_mechanism=external",
        listener.port
    );
    let settings = settings();
    let env = [
        ("MUPDATE__AMQP__URL", url.as_str()),
        ("MUPDATE__AMQP__TLS_CA_FILE", &pki.path("ca.pem")),
        ("MUPDATE__AMQP__TLS_CERT_FILE", &cert),
        ("MUPDATE__AMQP__TLS_KEY_FILE", &key),
    ];
    let listen = format!("127.0.0.1:{}", free_port());
    let mut worker = spawn_worker(&settings, &env, &listen, "debug");
    wait_readyz(&listen, 200).await;
    let connections = listener.connections();
    assert!(
        connections
            .iter()
            .any(|c| c.starts_with(&format!("{user}\tEXTERNAL\ttrue\tCN={user}"))),
        "logged in as the certificate's common name: {connections:?}"
    );

    // `mupdate-worker send` logs in the same way, and gets its reply.
    let col = Collection::create(&[("a", json!({"n": 1}))]).await;
    let mut send = Command::new(env!("CARGO_BIN_EXE_mupdate-worker"));
    send.args([
        "send",
        "--index",
        &col.index,
        "--collection",
        &col.collection,
    ])
    .args([
        "--documents",
        "-",
        "--refresh",
        "wait_for",
        "--timeout",
        "30",
    ])
    .env("MUPDATE__AMQP__REQUEST_QUEUE", &settings.amqp.request_queue)
    .envs(env.iter().copied())
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = send.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(br#"{"_id": "a", "body": {"n": 2}}"#)
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(reply["status"], 200, "{reply}");
    let (source, version) = col.get("a").await;
    assert_eq!((source["n"].clone(), version), (json!(2), 2));

    // A client certificate from a CA the broker doesn't trust: refused at the
    // handshake; that worker stays unready and says why.
    let (other_cert, other_key) = pki.client(&user, "other-ca", false);
    let other_settings = support::settings();
    let other_env = [
        ("MUPDATE__AMQP__URL", url.as_str()),
        ("MUPDATE__AMQP__TLS_CA_FILE", &pki.path("ca.pem")),
        ("MUPDATE__AMQP__TLS_CERT_FILE", &other_cert),
        ("MUPDATE__AMQP__TLS_KEY_FILE", &other_key),
    ];
    let other_listen = format!("127.0.0.1:{}", free_port());
    let mut refused = spawn_worker(&other_settings, &other_env, &other_listen, "warn");
    stays_unready(&other_listen).await;
    assert!(metric(&other_listen, "mupdate_broker_reconnects_total").await >= 1.0);
    refused.terminate().await;
    let refused_text = refused.stderr();
    let tls_port = format!("TLS connection to 127.0.0.1:{}", listener.port);
    says(&refused_text, &["reconnecting", &tls_port, "unknown ca"]);

    worker.terminate().await;
    let text = worker.stderr();
    for secret in pki
        .secret_lines(&key)
        .iter()
        .chain(&pki.secret_lines(&other_key))
    {
        assert!(!text.contains(secret.as_str()), "a key line in the logs");
        assert!(
            !refused_text.contains(secret.as_str()),
            "a key line in the logs"
        );
    }
    delete_topology(&settings).await;
    delete_topology(&other_settings).await;
}

#[tokio::test]
async fn a_broker_certificate_from_another_ca_keeps_the_worker_unready() {
    let _servers = servers_lock().await;
    let pki = Pki::new();
    let listener = TlsListener::start(&pki);
    let settings = settings();
    // Only the TLS port: a plain-text attempt could only go there, and be refused.
    let url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", listener.port);
    let env = [
        ("MUPDATE__AMQP__URL", url.as_str()),
        ("MUPDATE__AMQP__TLS_CA_FILE", &pki.path("other-ca.pem")),
    ];
    let listen = format!("127.0.0.1:{}", free_port());
    let mut worker = spawn_worker(&settings, &env, &listen, "warn");
    stays_unready(&listen).await;
    assert!(
        metric(&listen, "mupdate_broker_reconnects_total").await >= 1.0,
        "it retries"
    );
    assert_eq!(metric(&listen, "mupdate_broker_up").await, 0.0);
    assert!(
        listener.connections().is_empty(),
        "no connection was opened"
    );
    worker.terminate().await;
    let text = worker.stderr();
    let tls_port = format!("TLS connection to 127.0.0.1:{}", listener.port);
    says(
        &text,
        &[
            "broker connection lost; reconnecting",
            &tls_port,
            "certificate verify failed",
        ],
    );
    assert_eq!(
        queue_counts(&settings.amqp.request_queue).await,
        None,
        "nothing was declared: the worker never got in"
    );
}

// ------------------------------------------------------------------ the engine over TLS

const ENGINE_USER: &str = "mupdate";

fn https_settings(pki: &Pki, nginx: &Nginx, password: &str) -> Settings {
    let mut settings = settings();
    let (cert, key) = pki.client("engine-client", "ca", true);
    settings.storage.url = nginx.url();
    settings.storage.tls_ca_file = pki.path("ca.pem");
    settings.storage.tls_cert_file = cert;
    settings.storage.tls_key_file = key;
    settings.storage.username = Some(ENGINE_USER.into());
    settings.storage.password = Some(password.into());
    settings
}

fn storage_env(settings: &Settings) -> Vec<(&'static str, String)> {
    let s = &settings.storage;
    vec![
        ("MUPDATE__STORAGE__URL", s.url.clone()),
        ("MUPDATE__STORAGE__TLS_CA_FILE", s.tls_ca_file.clone()),
        ("MUPDATE__STORAGE__TLS_CERT_FILE", s.tls_cert_file.clone()),
        ("MUPDATE__STORAGE__TLS_KEY_FILE", s.tls_key_file.clone()),
        ("MUPDATE__STORAGE__USERNAME", s.username.clone().unwrap()),
        ("MUPDATE__STORAGE__PASSWORD", s.password.clone().unwrap()),
    ]
}

#[tokio::test]
async fn https_through_nginx_with_basic_auth_and_a_client_certificate_round_trips() {
    let pki = Pki::new();
    let password = uuid::Uuid::new_v4().simple().to_string();
    let nginx = Nginx::start(&pki, ENGINE_USER, &password);
    let mut settings = https_settings(&pki, &nginx, &password);
    let listen = format!("127.0.0.1:{}", free_port());
    settings.metrics.listen = listen.clone();
    let worker = Worker::start_with(settings).await;
    wait_readyz(&listen, 200).await;
    round_trip(worker.request_queue()).await;
    worker.stop().await;
    let access = nginx.access_log();
    assert!(
        access
            .lines()
            .any(|l| l.contains(&format!(" - {ENGINE_USER} [")) && l.contains("\"POST /_bulk")),
        "the bulk call went through the proxy, authenticated: {access}"
    );
}

#[tokio::test]
async fn wrong_engine_credentials_keep_the_worker_unready() {
    let pki = Pki::new();
    let password = uuid::Uuid::new_v4().simple().to_string();
    let nginx = Nginx::start(&pki, ENGINE_USER, &password);
    let wrong = uuid::Uuid::new_v4().simple().to_string();
    let settings = https_settings(&pki, &nginx, &wrong);
    let env = storage_env(&settings);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let listen = format!("127.0.0.1:{}", free_port());
    // Debug level: the engine client's own logs are in too.
    let mut worker = spawn_worker(&settings, &env, &listen, "debug");
    wait_consumers(&settings.amqp.request_queue, 1).await;
    stays_unready(&listen).await;
    assert_eq!(metric(&listen, "mupdate_broker_up").await, 1.0);
    assert_eq!(metric(&listen, "mupdate_engine_up").await, 0.0);
    worker.terminate().await;
    let text = worker.stderr();
    says(&text, &["storage engine does not answer", "HTTP 401"]);
    assert!(
        nginx.access_log().contains("\" 401 "),
        "refused by the proxy: {}",
        nginx.access_log()
    );
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{ENGINE_USER}:{wrong}"));
    for secret in [wrong.as_str(), basic.as_str()]
        .into_iter()
        .map(str::to_owned)
        .chain(pki.secret_lines(&settings.storage.tls_key_file))
    {
        assert!(!text.contains(&secret), "a secret in the logs: {secret}");
    }
    delete_topology(&settings).await;
}

#[tokio::test]
async fn an_engine_certificate_from_another_ca_keeps_the_worker_unready() {
    let pki = Pki::new();
    let password = uuid::Uuid::new_v4().simple().to_string();
    let nginx = Nginx::start(&pki, ENGINE_USER, &password);
    let mut settings = https_settings(&pki, &nginx, &password);
    settings.storage.tls_ca_file = pki.path("other-ca.pem");
    let env = storage_env(&settings);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut worker = spawn_worker(&settings, &env, &listen, "warn");
    wait_consumers(&settings.amqp.request_queue, 1).await;
    stays_unready(&listen).await;
    assert_eq!(metric(&listen, "mupdate_engine_up").await, 0.0);
    worker.terminate().await;
    let text = worker.stderr();
    says(
        &text,
        &[
            "storage engine does not answer",
            "certificate verify failed",
        ],
    );
    // No request reached the proxy, in TLS or in plain text (which nginx would log as
    // a 400 on its TLS port).
    assert_eq!(nginx.access_log(), "", "no request: {}", nginx.error_log());
    delete_topology(&settings).await;
}

// ------------------------------------------------------------------ settings

#[test]
fn bad_tls_files_stop_the_worker_with_exit_code_2_naming_the_key() {
    let pki = Pki::new();
    let (cert, key) = pki.client("bad-files", "ca", false);
    let (_, other_key) = pki.client("bad-files-other", "ca", false);
    let garbage = pki.path("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let encrypted = pki.path("encrypted.key");
    pki.run(
        OPENSSL,
        &[
            "pkey",
            "-in",
            &key,
            "-aes256",
            "-passout",
            "pass:secret",
            "-out",
            &encrypted,
        ],
    );
    let missing = pki.path("missing.pem");
    let amqps = (
        "MUPDATE__AMQP__URL",
        "amqps://guest:guest@127.0.0.1:5671/%2f",
    );
    let https = ("MUPDATE__STORAGE__URL", "https://127.0.0.1:9201");
    let ca = pki.path("ca.pem");
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![amqps, ("MUPDATE__AMQP__TLS_CA_FILE", &missing)],
            "amqp.tls_ca_file",
        ),
        (
            vec![amqps, ("MUPDATE__AMQP__TLS_CA_FILE", &garbage)],
            "amqp.tls_ca_file",
        ),
        (
            vec![amqps, ("MUPDATE__AMQP__TLS_CA_FILE", &key)],
            "amqp.tls_ca_file",
        ),
        (
            vec![
                amqps,
                ("MUPDATE__AMQP__TLS_CERT_FILE", &missing),
                ("MUPDATE__AMQP__TLS_KEY_FILE", &key),
            ],
            "amqp.tls_cert_file",
        ),
        (
            vec![
                amqps,
                ("MUPDATE__AMQP__TLS_CERT_FILE", &garbage),
                ("MUPDATE__AMQP__TLS_KEY_FILE", &key),
            ],
            "amqp.tls_cert_file",
        ),
        (
            vec![
                amqps,
                ("MUPDATE__AMQP__TLS_CERT_FILE", &cert),
                ("MUPDATE__AMQP__TLS_KEY_FILE", &garbage),
            ],
            "amqp.tls_key_file",
        ),
        (
            vec![
                amqps,
                ("MUPDATE__AMQP__TLS_CERT_FILE", &cert),
                ("MUPDATE__AMQP__TLS_KEY_FILE", &other_key),
            ],
            "amqp.tls_key_file",
        ),
        (
            vec![
                amqps,
                ("MUPDATE__AMQP__TLS_CERT_FILE", &cert),
                ("MUPDATE__AMQP__TLS_KEY_FILE", &encrypted),
            ],
            "amqp.tls_key_file",
        ),
        (
            vec![amqps, ("MUPDATE__AMQP__TLS_CERT_FILE", &cert)],
            "amqp.tls_key_file",
        ),
        // TLS files with a plain-text URL would silently not be used.
        (
            vec![("MUPDATE__AMQP__TLS_CA_FILE", &ca)],
            "amqp.tls_ca_file",
        ),
        (
            vec![(
                "MUPDATE__AMQP__URL",
                "amqps://127.0.0.1:5671/%2f?auth_mechanism=external",
            )],
            "amqp.url",
        ),
        (
            vec![https, ("MUPDATE__STORAGE__TLS_CA_FILE", &missing)],
            "storage.tls_ca_file",
        ),
        (
            vec![https, ("MUPDATE__STORAGE__TLS_CA_FILE", &garbage)],
            "storage.tls_ca_file",
        ),
        (
            vec![
                https,
                ("MUPDATE__STORAGE__TLS_CERT_FILE", &cert),
                ("MUPDATE__STORAGE__TLS_KEY_FILE", &missing),
            ],
            "storage.tls_key_file",
        ),
        (
            vec![
                https,
                ("MUPDATE__STORAGE__TLS_CERT_FILE", &cert),
                ("MUPDATE__STORAGE__TLS_KEY_FILE", &other_key),
            ],
            "storage.tls_key_file",
        ),
        (
            vec![("MUPDATE__STORAGE__TLS_CA_FILE", &ca)],
            "storage.tls_ca_file",
        ),
    ];
    let secrets: Vec<String> = pki
        .secret_lines(&key)
        .into_iter()
        .chain(pki.secret_lines(&other_key))
        .collect();
    for (env, name) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_mupdate-worker"))
            .envs(env.iter().copied())
            .env("MUPDATE__METRICS__LISTEN", "")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(stderr.contains(name), "{env:?} names {name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!stderr.contains("guest:guest"), "{stderr}");
        for secret in &secrets {
            assert!(!stderr.contains(secret.as_str()), "a key line: {stderr}");
        }
    }
}

#[test]
fn the_configuration_output_shows_tls_paths_but_no_secret() {
    let pki = Pki::new();
    let (cert, key) = pki.client("config", "ca", false);
    let ca = pki.path("ca.pem");
    let out = Command::new(env!("CARGO_BIN_EXE_mupdate-worker"))
        .arg("config")
        .env(
            "MUPDATE__AMQP__URL",
            "amqps://user:amqp-secret-1@127.0.0.1:5671/%2f",
        )
        .env("MUPDATE__AMQP__TLS_CA_FILE", &ca)
        .env("MUPDATE__AMQP__TLS_CERT_FILE", &cert)
        .env("MUPDATE__AMQP__TLS_KEY_FILE", &key)
        .env("MUPDATE__STORAGE__URL", "https://127.0.0.1:9201")
        .env("MUPDATE__STORAGE__TLS_CA_FILE", &ca)
        .env("MUPDATE__STORAGE__TLS_CERT_FILE", &cert)
        .env("MUPDATE__STORAGE__TLS_KEY_FILE", &key)
        .env("MUPDATE__STORAGE__USERNAME", "mupdate")
        .env("MUPDATE__STORAGE__PASSWORD", "engine-secret-2")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(config["amqp"]["tls_key_file"], key.as_str());
    assert_eq!(config["storage"]["tls_cert_file"], cert.as_str());
    assert_eq!(config["storage"]["tls_ca_file"], ca.as_str());
    for secret in ["amqp-secret-1", "engine-secret-2"]
        .into_iter()
        .map(str::to_owned)
        .chain(pki.secret_lines(&key))
    {
        assert!(!text.contains(&secret), "{secret} in {text}");
    }
}
