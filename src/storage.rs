//! The storage engine (Elasticsearch or OpenSearch) over HTTP: index existence and the
//! `_bulk` call, with capped exponential backoff while the engine is unreachable or
//! busy. Knows nothing of AMQP or of Kuzzle envelopes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use elasticsearch::Elasticsearch;
use elasticsearch::auth::{ClientCertificate, Credentials};
use elasticsearch::cert::CertificateValidation;
use elasticsearch::http::headers::{ACCEPT_ENCODING, AUTHORIZATION, HeaderValue};
use elasticsearch::http::transport::{SingleNodeConnectionPool, Transport, TransportBuilder};
use elasticsearch::http::{Method, Url};

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{Layout, StorageSettings};
use crate::metrics::Metrics;
use crate::security::tls::StorageTls;

mod nodes;
pub mod port;

use crate::bounded::bounded;

/// Engine calls are bounded by their own timeouts (a write already sent is not given up
/// at shutdown: the grace bounds the wait for it, see `session`), not by a stop token.
static NEVER: std::sync::LazyLock<CancellationToken> =
    std::sync::LazyLock::new(CancellationToken::new);
/// How far past the HTTP client's timeout the backstop bound lies.
const BOUND_MARGIN: Duration = Duration::from_secs(1);

pub use nodes::Node;
use nodes::Nodes;
use port::FailureKind;

/// Where a stored document is in its shard's history (`versions`): a write guarded by
/// it is refused once the document has changed (or gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub seq_no: u64,
    pub primary_term: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Worth retrying: the engine is down, slow or overloaded, and the call may have
    /// been applied (it timed out, or its connection broke once sent, or a proxy's 5xx).
    #[error("storage engine unavailable: {0}")]
    Unavailable(String),
    /// Worth retrying, and the call is known not to have been applied: nothing reached
    /// any node, or the engine refused the whole call (429, 401, 503). A resend after
    /// it is no resend (`coalesce::send`).
    #[error("storage engine unavailable: {0}")]
    Refusing(String),
    /// The engine refused the call itself; retrying would not help. `status` and
    /// `reason` are what a caller may be told (`refusal`).
    #[error("{reason}")]
    Refused { status: u16, reason: String },
    #[error("storage configuration: {0}")]
    Config(String),
    /// The work this call was for was handed back: no new call is started for it.
    #[error("abandoned: the request was handed back")]
    Abandoned,
}

impl StorageError {
    fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::Unavailable(_) | StorageError::Refusing(_)
        )
    }
}

/// A request's work was handed back (its delivery requeued, its session lost, or the
/// shutdown grace over) before it was done: nothing more is sent for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned;

/// Whether a request's target can be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexState {
    Exists,
    UnknownIndex,
    UnknownCollection,
}

pub struct Storage {
    nodes: Nodes,
    /// Reads, and the point past which a write counts as slow.
    timeout: Duration,
    /// How long a write already sent is awaited before it is given up (and sent again).
    write_timeout: Duration,
    backoff: ExponentialBuilder,
    cache_for: Duration,
    /// Physical indexes seen to exist, and when.
    known: Mutex<HashMap<String, Instant>>,
    /// Kuzzle 2's layout: bulk items must target an alias, so none creates an index.
    require_alias: bool,
    /// Since when every call has failed as unavailable; `None` while the engine answers.
    down_since: Mutex<Option<Instant>>,
    /// Whether the last unavailability was an overload (429, or a bulk call whose every
    /// item was rejected): then a health call proves nothing, and `ping` asks `_bulk`.
    overload: std::sync::atomic::AtomicBool,
    metrics: Arc<Metrics>,
}

/// The nodes of `settings.url`, over HTTP.
pub fn http_nodes(settings: &StorageSettings) -> Result<Vec<Node>, StorageError> {
    let nodes = settings
        .urls()
        .map(|u| {
            let url =
                Url::parse(u).map_err(|e| StorageError::Config(format!("storage.url: {e}")))?;
            let name = match (url.host_str(), url.port_or_known_default()) {
                (Some(host), Some(port)) => format!("{host}:{port}"),
                _ => return Err(StorageError::Config(format!("storage.url: no host in {u}"))),
            };
            let engine = port::Http(Elasticsearch::new(transport(settings, url)?));
            Ok(Node::new(name, Box::new(engine)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(nodes)
}

impl Storage {
    pub fn new(settings: &StorageSettings, metrics: Arc<Metrics>) -> Result<Self, StorageError> {
        Self::with_nodes(settings, http_nodes(settings)?, metrics)
    }

    /// On the nodes given (each behind the engine port) rather than those of
    /// `settings.url`.
    pub fn with_nodes(
        settings: &StorageSettings,
        nodes: Vec<Node>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StorageError> {
        if nodes.is_empty() {
            return Err(StorageError::Config("storage.url lists no node".into()));
        }
        let backoff = backoff(settings);
        Ok(Storage {
            nodes: Nodes::new(nodes, &metrics),
            timeout: Duration::from_millis(settings.timeout_ms),
            write_timeout: Duration::from_millis(
                settings.write_timeout_ms.max(settings.timeout_ms),
            ),
            backoff,
            cache_for: Duration::from_millis(settings.index_cache_ms),
            known: Mutex::new(HashMap::new()),
            down_since: Mutex::new(None),
            overload: std::sync::atomic::AtomicBool::new(false),
            require_alias: settings.layout == Layout::Kuzzle2,
            metrics,
        })
    }

    /// One HTTP call, given up after `timeout`; transport failures, 5xx and 429 are
    /// `Unavailable`.
    async fn call_once(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
        judged_by_items: bool,
    ) -> Result<(u16, Vec<u8>), StorageError> {
        let mut tried = 0;
        let call = port::Call {
            method,
            path,
            query,
            body,
            timeout,
        };
        let (status, bytes) = loop {
            let node = self.nodes.pick();
            // The HTTP client's own timeout covers connecting, sending and the body; the
            // bound is the module-wide rule (`bounded`), a little past it.
            let exchange = node.engine.exchange(call);
            let exchanged =
                match bounded("an engine call", timeout + BOUND_MARGIN, &NEVER, exchange).await {
                    Ok(exchanged) => exchanged,
                    Err(interrupted) => {
                        self.answered(false);
                        return Err(StorageError::Unavailable(interrupted.to_string()));
                    }
                };
            match exchanged {
                Ok(answer) => {
                    node.answered(&self.metrics);
                    break (answer.status, answer.body);
                }
                Err(failure) => {
                    // A node too slow to answer is still a node; one that refused or
                    // broke the connection is left out for a while.
                    if failure.kind != FailureKind::TimedOut {
                        node.failed(&self.metrics);
                    }
                    tried += 1;
                    // Nothing reached that node: the next one is asked at once.
                    if failure.kind == FailureKind::NeverSent && tried < self.nodes.len() {
                        continue;
                    }
                    self.answered(false);
                    if failure.kind == FailureKind::NeverSent {
                        return Err(StorageError::Refusing(failure.message));
                    }
                    return Err(StorageError::Unavailable(failure.message));
                }
            }
        };
        // A 429 is an engine too busy to take the call, a 5xx one that can't serve: both
        // an outage (SPEC section 6: the broker is the buffer). A 401 is one that refuses
        // the worker's credentials (wrong, or changed on the engine), which no request
        // can fix: retried like an outage, the worker unready meanwhile. A bulk call's
        // answer is judged by its items too (`bulk_items_answered`).
        // During an overload a read answering proves nothing of writes.
        use std::sync::atomic::Ordering::Relaxed;
        let up = status < 500 && status != 401 && status != 429;
        let read = method != Method::Post;
        if !up {
            self.answered(false);
        } else if !(judged_by_items || read && self.overload.load(Relaxed)) {
            self.answered(true);
        }
        if status == 429 {
            self.overload.store(true, Relaxed);
        } else if up && !read && !judged_by_items {
            self.overload.store(false, Relaxed);
        }
        if status == 401 {
            return Err(StorageError::Refusing(
                "HTTP 401: the engine refused the worker's credentials (storage.username and \
                 password, storage.api_key, or the client certificate)"
                    .into(),
            ));
        }
        if status >= 500 || status == 429 {
            let reason = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
            let reason = format!("HTTP {status}: {reason}");
            // The engine's own refusals of a whole call; other 5xx (a proxy's 502 or 504
            // after it forwarded the call) may hide an applied one.
            if matches!(status, 429 | 503) {
                return Err(StorageError::Refusing(reason));
            }
            return Err(StorageError::Unavailable(reason));
        }
        Ok((status, bytes))
    }

    /// Records whether the engine answered, for `engine_up` and `unavailable_for`.
    fn answered(&self, up: bool) {
        self.metrics.set_engine_up(up);
        let mut since = self.down_since.lock().expect("poisoned");
        match (up, *since) {
            (true, _) => *since = None,
            (false, None) => *since = Some(Instant::now()),
            (false, Some(_)) => {}
        }
    }

    /// How long every call has been failing as unavailable, if it has.
    pub fn unavailable_for(&self) -> Option<Duration> {
        self.down_since
            .lock()
            .expect("poisoned")
            .map(|since| since.elapsed())
    }

    /// `call_once`, retried for as long as the engine is unavailable and `cancel` isn't
    /// cancelled: cancelled, no new attempt starts (`Abandoned`).
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&[u8]>,
        cancel: &CancellationToken,
    ) -> Result<(u16, Vec<u8>), StorageError> {
        let attempt = || async {
            if cancel.is_cancelled() {
                return Err(StorageError::Abandoned);
            }
            self.call_once(method, path, query, body, self.timeout, false)
                .await
        };
        attempt
            .retry(self.backoff)
            .sleep(cancellable_sleep(cancel.clone()))
            .when(StorageError::is_transient)
            .notify(|err, wait| {
                self.metrics.engine_retries.inc();
                tracing::warn!(error = %err, ?wait, "storage engine call failed; retrying");
            })
            .await
    }

    async fn exists(
        &self,
        pattern: &str,
        cancel: &CancellationToken,
    ) -> Result<bool, StorageError> {
        let path = format!("/{}", encode_path(pattern));
        let query = [("allow_no_indices", "false"), ("expand_wildcards", "open")];
        match self.call(Method::Head, &path, &query, None, cancel).await? {
            (200, _) => Ok(true),
            (404, _) => Ok(false),
            (status, body) => Err(refusal(status, &body)),
        }
    }

    /// Whether `target` exists; if not, whether any index of the Kuzzle index does
    /// (`index_pattern`, the template with `*` for the collection: only built on a miss).
    pub async fn index_state(
        &self,
        target: &str,
        index_pattern: impl FnOnce() -> Option<String>,
        cancel: &CancellationToken,
    ) -> Result<IndexState, StorageError> {
        if let Some(seen) = self.known.lock().expect("poisoned").get(target)
            && seen.elapsed() < self.cache_for
        {
            return Ok(IndexState::Exists);
        }
        // Boxed: a cached answer is the rule, and this call's future would otherwise
        // make every request's task as large as it is.
        if Box::pin(self.exists(target, cancel)).await? {
            self.known
                .lock()
                .expect("poisoned")
                .insert(target.to_owned(), Instant::now());
            return Ok(IndexState::Exists);
        }
        match index_pattern() {
            Some(pattern) if Box::pin(self.exists(&pattern, cancel)).await? => {
                Ok(IndexState::UnknownCollection)
            }
            _ => Ok(IndexState::UnknownIndex),
        }
    }

    /// The `_seq_no` and `_primary_term` of each of `ids` in `target` (`None`: missing),
    /// read in real time (`_mget`, no `_source`): what a replace's write is guarded by.
    /// Retried while the engine is unavailable, until `cancel`.
    pub async fn versions(
        &self,
        target: &str,
        ids: &[&str],
        cancel: &CancellationToken,
    ) -> Result<Vec<Option<Version>>, StorageError> {
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            _id: &'a str,
            _source: bool,
        }
        #[derive(serde::Deserialize)]
        struct Found {
            #[serde(default)]
            found: bool,
            _seq_no: Option<u64>,
            _primary_term: Option<u64>,
            /// A document the engine could not read (a shard unavailable): neither
            /// found nor missing.
            error: Option<serde_json::Value>,
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            docs: Vec<Found>,
        }
        let docs: Vec<Doc> = ids
            .iter()
            .map(|&_id| Doc {
                _id,
                _source: false,
            })
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({ "docs": docs })).unwrap_or_default();
        let path = format!("/{}/_mget", encode_path(target));
        let query = [("realtime", "true")];
        // A read: GET with a body, as the engine takes it.
        match self
            .call(Method::Get, &path, &query, Some(&body), cancel)
            .await?
        {
            (200, bytes) => {
                let answer: Answer =
                    serde_json::from_slice(&bytes).map_err(|e| StorageError::Refused {
                        status: 500,
                        reason: format!("unreadable _mget answer: {e}"),
                    })?;
                if let Some(error) = answer.docs.iter().find_map(|d| d.error.as_ref()) {
                    let kind = error["type"].as_str().unwrap_or("error");
                    return Err(StorageError::Refused {
                        status: 503,
                        reason: format!("the engine could not read a document's version ({kind})"),
                    });
                }
                if answer.docs.len() != ids.len() {
                    return Err(StorageError::Refused {
                        status: 500,
                        reason: "the _mget answer does not list every id".into(),
                    });
                }
                Ok(answer
                    .docs
                    .into_iter()
                    .map(|d| match (d.found, d._seq_no, d._primary_term) {
                        (true, Some(seq_no), Some(primary_term)) => Some(Version {
                            seq_no,
                            primary_term,
                        }),
                        _ => None,
                    })
                    .collect())
            }
            (status, body) => Err(refusal(status, &body)),
        }
    }

    /// The backoff between attempts of one call, for callers that retry themselves.
    pub fn call_backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        self.backoff.build()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// What a bulk call's items say of the engine, once it answered 200: every item
    /// rejected (429/503 items) is an overload, and counts toward the pause as an outage
    /// does; anything else is an engine that works.
    pub fn bulk_items_answered(&self, all_rejected: bool) {
        self.overload
            .store(all_rejected, std::sync::atomic::Ordering::Relaxed);
        self.answered(!all_rejected);
    }

    /// One health call, not retried: whether the engine answers. Updates `engine_up`.
    /// After an overload, `_cluster/health` answering proves nothing: the call is a
    /// `_bulk` of one update to an alias that can't exist (`require_alias`, so nothing is
    /// ever written or created), which a busy engine or its proxy refuses with a 429.
    pub async fn ping(&self) -> bool {
        let answered = self.unavailable_for().is_none();
        let call = if self.overload.load(std::sync::atomic::Ordering::Relaxed) {
            let query = [("require_alias", "true"), ("timeout", "2s")];
            let body = PROBE_BULK.as_bytes();
            self.call_once(
                Method::Post,
                "/_bulk",
                &query,
                Some(body),
                self.timeout,
                false,
            )
            .await
        } else {
            let query = [("timeout", "2s")];
            self.call_once(
                Method::Get,
                "/_cluster/health",
                &query,
                None,
                self.timeout,
                false,
            )
            .await
        };
        match call {
            Ok(_) => true,
            Err(err) => {
                // Said once per outage (requests' retries say it on their own).
                if answered {
                    tracing::warn!(error = %err, "storage engine does not answer; unready");
                }
                false
            }
        }
    }

    /// One `_bulk` call with an NDJSON body, not retried (the coalescer retries, choosing
    /// each time which requests still want it); the engine's response body.
    pub async fn bulk_once(&self, body: &[u8], wait_for: bool) -> Result<Vec<u8>, StorageError> {
        let mut query: Vec<(&str, &str)> = Vec::with_capacity(2);
        if wait_for {
            query.push(("refresh", "wait_for"));
        }
        if self.require_alias {
            query.push(("require_alias", "true"));
        }
        let started = Instant::now();
        // A write already sent is not given up at `timeout`: the engine may still apply
        // it, after a resend and after the next update of the same document (a stale
        // write). Past `timeout` the engine counts as slow (toward the pause), and the
        // call is awaited until `write_timeout`.
        let call = self.call_once(
            Method::Post,
            "/_bulk",
            &query,
            Some(body),
            self.write_timeout,
            true,
        );
        tokio::pin!(call);
        let result = tokio::select! {
            biased;
            result = &mut call => result,
            _ = tokio::time::sleep(self.timeout) => {
                self.metrics.slow_writes.inc();
                self.answered(false);
                tracing::warn!(timeout = ?self.timeout, "storage engine slow: a write is not answered yet; still waiting for it");
                call.await
            }
        };
        self.metrics
            .bulk_seconds
            .observe(started.elapsed().as_secs_f64());
        match result? {
            (200, bytes) => Ok(bytes),
            (status, bytes) => {
                self.answered(true);
                Err(refusal(status, &bytes))
            }
        }
    }
}

/// The health call after an overload: one update of an alias no one can have made (its
/// name starts with `.mupdate-probe`), refused item by item under `require_alias`.
const PROBE_BULK: &str =
    "{\"update\":{\"_index\":\".mupdate-probe-alias\",\"_id\":\"probe\"}}\n{\"doc\":{}}\n";

/// One node's transport, with the TLS files and credentials of `settings`.
fn transport(settings: &StorageSettings, url: Url) -> Result<Transport, StorageError> {
    let mut builder = TransportBuilder::new(SingleNodeConnectionPool::new(url));
    builder = if settings.compression {
        builder.request_body_compression(true)
    } else {
        // Compressing costs the engine and the worker CPU; over a LAN it buys little.
        builder.header(ACCEPT_ENCODING, HeaderValue::from_static("identity"))
    };
    let tls = StorageTls::load(settings).map_err(|e| StorageError::Config(e.to_string()))?;
    if let Some(ca) = tls.ca {
        builder = builder.cert_validation(CertificateValidation::Full(ca));
    }
    let credentials = if let Some(key) = settings.api_key.as_ref().filter(|k| !k.is_empty()) {
        Some(Credentials::EncodedApiKey(key.clone()))
    } else if let Some(user) = settings.username.as_ref().filter(|u| !u.is_empty()) {
        let password = settings.password.clone().unwrap_or_default();
        Some(Credentials::Basic(user.clone(), password))
    } else {
        None
    };
    match (tls.identity, credentials) {
        (Some(pkcs12), credentials) => {
            // The client's credentials slot holds the certificate: an API key or basic
            // auth goes along as a default Authorization header.
            let certificate = ClientCertificate::Pkcs12(pkcs12, Some(String::new()));
            builder = builder.auth(Credentials::Certificate(certificate));
            if let Some(value) = credentials.as_ref().and_then(authorization) {
                builder = builder.header(AUTHORIZATION, value);
            }
        }
        (None, Some(credentials)) => builder = builder.auth(credentials),
        (None, None) => {}
    }
    builder
        .build()
        .map_err(|e| StorageError::Config(e.to_string()))
}

/// A backoff sleep that ends early when `cancel` is cancelled.
fn cancellable_sleep(
    cancel: CancellationToken,
) -> impl Fn(Duration) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + 'static
{
    move |wait| {
        let cancel = cancel.clone();
        Box::pin(async move {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        })
    }
}

/// The engine's backoff: capped exponential with jitter (the cap included), without a
/// limit on tries.
pub fn backoff(settings: &StorageSettings) -> ExponentialBuilder {
    crate::backoff::jittered(
        Duration::from_millis(settings.retry_min_delay_ms),
        Duration::from_millis(settings.retry_max_delay_ms),
    )
}

/// The Authorization header of basic auth or an API key, marked sensitive (never
/// printed by the HTTP stack's debug output).
fn authorization(credentials: &Credentials) -> Option<HeaderValue> {
    use base64::Engine;
    let text = match credentials {
        Credentials::Basic(user, password) => {
            let pair =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {pair}")
        }
        Credentials::EncodedApiKey(key) => format!("ApiKey {key}"),
        _ => return None,
    };
    let mut value = HeaderValue::from_str(&text).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// A call the engine refused (a 4xx other than 401 and 429), as its callers may be told
/// it: the engine's own `error.reason` when the request caused it (a body it can't
/// parse); a generic reason when the refusal concerns the worker's own engine account
/// (`error::engine_refused_worker`) or the answer is not the engine's (a proxy's page):
/// its details are logged here, never echoed.
fn refusal(status: u16, body: &[u8]) -> StorageError {
    use crate::error::{ENGINE_REFUSED_WORKER, ENGINE_REFUSED_WORKER_STATUS, ENGINE_TOO_LARGE};
    let error = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .map(|mut v| v["error"].take());
    let kind = error
        .as_ref()
        .and_then(|e| e["type"].as_str())
        .unwrap_or("");
    let reason = error.as_ref().and_then(|e| e["reason"].as_str());
    match reason {
        Some(reason) if !crate::error::engine_refused_worker(status, kind) => {
            StorageError::Refused {
                status,
                reason: reason.to_owned(),
            }
        }
        _ => {
            let shown = String::from_utf8_lossy(&body[..body.len().min(1024)]);
            tracing::warn!(
                status,
                body = %crate::logs::Untrusted(&shown),
                "the storage engine refused the worker's call; callers are told it without these details"
            );
            if status == 413 {
                StorageError::Refused {
                    status,
                    reason: ENGINE_TOO_LARGE.into(),
                }
            } else {
                StorageError::Refused {
                    status: ENGINE_REFUSED_WORKER_STATUS,
                    reason: ENGINE_REFUSED_WORKER.into(),
                }
            }
        }
    }
}

/// Percent-encodes an index name for a URL path, keeping `*` for patterns.
fn encode_path(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.*~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_are_path_encoded() {
        assert_eq!(encode_path("&shop.products"), "%26shop.products");
        assert_eq!(encode_path("&shop.*"), "%26shop.*");
        assert_eq!(encode_path("é"), "%C3%A9");
    }

    #[test]
    fn only_the_engines_reasons_about_the_request_reach_callers() {
        use crate::error::{ENGINE_REFUSED_WORKER, ENGINE_TOO_LARGE};
        let said = |status, body: &str| match refusal(status, body.as_bytes()) {
            StorageError::Refused { status, reason } => (status, reason),
            other => panic!("{other}"),
        };
        assert_eq!(
            said(
                400,
                r#"{"error":{"type":"x_content_parse_exception","reason":"bad"},"status":400}"#
            ),
            (400, "bad".to_owned())
        );
        let named = r#"{"error":{"type":"security_exception","reason":"action [indices:data/write/bulk] is unauthorized for user [mupdate] with effective roles [writer]"},"status":403}"#;
        assert_eq!(said(403, named), (503, ENGINE_REFUSED_WORKER.to_owned()));
        assert_eq!(
            said(400, &named.replace("403", "400")),
            (503, ENGINE_REFUSED_WORKER.to_owned())
        );
        let page =
            "<html><body><h1>403 Forbidden</h1><hr><center>nginx/1.25.3</center></body></html>";
        assert_eq!(said(403, page), (503, ENGINE_REFUSED_WORKER.to_owned()));
        assert_eq!(said(404, page), (503, ENGINE_REFUSED_WORKER.to_owned()));
        assert_eq!(said(404, ""), (503, ENGINE_REFUSED_WORKER.to_owned()));
        assert_eq!(said(413, page), (413, ENGINE_TOO_LARGE.to_owned()));
        assert_eq!(
            said(400, r#"{"error":"an old engine's string","status":400}"#),
            (503, ENGINE_REFUSED_WORKER.to_owned())
        );
    }
}

/// `Storage` over nodes that are models of the engine port (no server): how it moves
/// between nodes by the kind of failure. The real servers' side of this is
/// tests/cluster.rs.
#[cfg(test)]
mod port_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::port::{Answer, Call, EngineNode, Exchange, Failure, FailureKind};
    use super::*;

    /// A node that always answers the same way, counting its calls.
    struct Scripted {
        answer: Result<Answer, Failure>,
        calls: Arc<AtomicUsize>,
    }

    impl EngineNode for Scripted {
        fn exchange<'a>(&'a self, _call: Call<'a>) -> Exchange<'a> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let answer = self.answer.clone();
            Box::pin(async move { answer })
        }
    }

    fn failing(kind: FailureKind) -> Result<Answer, Failure> {
        Err(Failure {
            kind,
            message: format!("{kind:?}"),
        })
    }

    fn storage(answers: Vec<Result<Answer, Failure>>) -> (Storage, Vec<Arc<AtomicUsize>>) {
        let settings = crate::config::Settings::defaults().storage;
        let mut counts = Vec::new();
        let nodes = answers
            .into_iter()
            .enumerate()
            .map(|(i, answer)| {
                let calls = Arc::new(AtomicUsize::new(0));
                counts.push(calls.clone());
                Node::new(format!("node-{i}"), Box::new(Scripted { answer, calls }))
            })
            .collect();
        let storage = Storage::with_nodes(&settings, nodes, Arc::new(Metrics::new())).unwrap();
        (storage, counts)
    }

    fn calls(counts: &[Arc<AtomicUsize>]) -> Vec<usize> {
        counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    #[tokio::test]
    async fn a_call_that_never_left_goes_to_the_next_node_at_once() {
        let ok = Ok(Answer {
            status: 200,
            body: b"{}".to_vec(),
        });
        let (storage, counts) = storage(vec![failing(FailureKind::NeverSent), ok]);
        let answer = storage.bulk_once(b"{}\n", false).await.unwrap();
        assert_eq!(answer, b"{}");
        assert_eq!(calls(&counts), [1, 1]);
        assert!(storage.unavailable_for().is_none());
    }

    #[tokio::test]
    async fn a_call_that_may_have_landed_is_not_sent_elsewhere() {
        for kind in [FailureKind::TimedOut, FailureKind::Broken] {
            let ok = Ok(Answer {
                status: 200,
                body: b"{}".to_vec(),
            });
            let (storage, counts) = storage(vec![failing(kind), ok]);
            let err = storage.bulk_once(b"{}\n", false).await.unwrap_err();
            assert!(
                matches!(err, StorageError::Unavailable(_)),
                "{kind:?}: {err}"
            );
            assert_eq!(calls(&counts), [1, 0], "{kind:?}");
            assert!(storage.unavailable_for().is_some(), "{kind:?}");
        }
    }

    #[tokio::test]
    async fn a_call_known_unapplied_is_told_from_one_that_may_have_landed() {
        let answered = |status: u16| {
            Ok(Answer {
                status,
                body: b"{}".to_vec(),
            })
        };
        for (first, unapplied) in [
            (failing(FailureKind::NeverSent), true),
            (answered(429), true),
            (answered(503), true),
            (answered(401), true),
            (answered(502), false),
            (failing(FailureKind::Broken), false),
        ] {
            // One node: nothing to go on to.
            let (storage, _) = storage(vec![first]);
            let err = storage.bulk_once(b"{}\n", false).await.unwrap_err();
            assert_eq!(matches!(err, StorageError::Refusing(_)), unapplied, "{err}");
            assert!(err.is_transient(), "{err}");
        }
    }

    #[tokio::test]
    async fn a_version_the_engine_could_not_read_is_neither_found_nor_missing() {
        let answer = |docs: &str| {
            Ok(Answer {
                status: 200,
                body: format!("{{\"docs\":[{docs}]}}").into_bytes(),
            })
        };
        let never = CancellationToken::new();
        let (engine, _) = storage(vec![answer(
            r#"{"_id":"a","_seq_no":4,"_primary_term":1,"found":true},{"_id":"b","found":false}"#,
        )]);
        let found = engine.versions("t", &["a", "b"], &never).await.unwrap();
        let a = Version {
            seq_no: 4,
            primary_term: 1,
        };
        assert_eq!(found, [Some(a), None]);
        let (engine, _) = storage(vec![answer(
            r#"{"_id":"a","error":{"type":"no_shard_available_action_exception"}}"#,
        )]);
        let err = engine.versions("t", &["a"], &never).await.unwrap_err();
        assert!(
            matches!(err, StorageError::Refused { status: 503, .. }),
            "{err}"
        );
    }
}
