//! Typed settings: `config/default.toml` (compiled in), an optional file, then
//! `MUPDATE__<SECTION>__<KEY>` environment variables. Validated once, at start-up.

use std::path::Path;

use serde::{Deserialize, Serialize};

const DEFAULTS: &str = include_str!("../config/default.toml");

/// The most `amqp.max_unconfirmed_replies` may say (a semaphore's permits; more is
/// refused): above any prefetch, which is 16 bits.
pub const MOST_UNCONFIRMED_REPLIES: usize = 65_536;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub storage: StorageSettings,
    pub response: ResponseSettings,
    pub limits: Limits,
    pub metrics: MetricsSettings,
    pub worker: WorkerSettings,
    pub log: LogSettings,
    pub security: SecuritySettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SecuritySettings {
    pub enabled: bool,
    pub rules_file: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AmqpSettings {
    pub url: String,
    pub request_queue: String,
    pub reply_queue: String,
    pub reply_exchange: String,
    pub prefetch: u16,
    pub max_held_bytes: usize,
    pub declare: bool,
    pub queue_type: QueueType,
    pub delivery_limit: u32,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub reply_attempts: u32,
    pub max_unconfirmed_replies: usize,
    pub confirm_timeout_ms: u64,
    /// PEM CA bundle trusted for an `amqps://` broker ("" = the system's).
    pub tls_ca_file: String,
    /// PEM client certificate (chain) and its unencrypted private key ("" = none).
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    Quorum,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct StorageSettings {
    pub url: String,
    pub index_template: String,
    pub layout: Layout,
    pub username: Option<String>,
    pub password: Option<String>,
    pub api_key: Option<String>,
    pub kuzzle_metadata: bool,
    pub default_retry_on_conflict: u32,
    pub timeout_ms: u64,
    pub write_timeout_ms: u64,
    pub retry_min_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    pub item_retries: u32,
    pub index_cache_ms: u64,
    pub bulk_max_documents: usize,
    pub bulk_max_bytes: usize,
    pub concurrent_bulks: usize,
    pub bulk_spread_documents: usize,
    pub bulk_linger_ms: u64,
    /// Stored-document bytes the engine may be made to rebuild or return at once
    /// (coalesce.rs, `SourceGate`).
    pub max_source_bytes: usize,
    pub compression: bool,
    /// PEM CA bundle trusted for `https://` nodes ("" = the system's).
    pub tls_ca_file: String,
    /// PEM client certificate (chain) and its unencrypted private key ("" = none).
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

/// Where a Kuzzle index and collection live in the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// The physical index `storage.index_template` names.
    Template,
    /// Kuzzle 2's: the alias `@&{index}.{collection}`, which must exist; writes go
    /// through it and never create an index.
    Kuzzle2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    V1,
    V2,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ResponseSettings {
    pub format: Format,
    pub include_source: bool,
    /// `_source` bytes one reply may carry; past it, none (write.rs).
    pub max_source_bytes: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Limits {
    pub documents_write_count: usize,
    pub max_message_bytes: usize,
    pub max_retry_on_conflict: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MetricsSettings {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WorkerSettings {
    pub threads: usize,
    pub shutdown_timeout_ms: u64,
    pub max_hold_ms: u64,
    pub pause_after_ms: u64,
    pub max_processing_bytes: usize,
    pub answered_window_ms: u64,
    pub answered_max_bytes: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A setting that can't be used, named by its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl Settings {
    /// Defaults, then `file` when given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let settings: Settings = builder
            .add_source(
                config::Environment::with_prefix("MUPDATE")
                    .separator("__")
                    // Verbatim: a string key keeps "0123" or "TRUE" as written; a
                    // numeric or boolean key still reads its string as a number.
                    .try_parsing(false),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// The compiled-in defaults alone.
    pub fn defaults() -> Self {
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("config/default.toml is valid");
        settings
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.amqp.urls().next().is_none() {
            return invalid("amqp.url", "must name at least one broker");
        }
        for url in self.amqp.urls() {
            if !url.starts_with("amqp://") && !url.starts_with("amqps://") {
                return invalid("amqp.url", "must be amqp:// or amqps:// URLs");
            }
        }
        if self.amqp.request_queue.is_empty() {
            return invalid("amqp.request_queue", "must not be empty");
        }
        if self.amqp.delivery_limit > 0 && self.amqp.queue_type != QueueType::Quorum {
            return invalid("amqp.delivery_limit", "needs amqp.queue_type = \"quorum\"");
        }
        if !(1..=MOST_UNCONFIRMED_REPLIES).contains(&self.amqp.max_unconfirmed_replies) {
            return invalid("amqp.max_unconfirmed_replies", "must be from 1 to 65536");
        }
        if self.amqp.confirm_timeout_ms == 0 {
            return invalid("amqp.confirm_timeout_ms", "must be at least 1");
        }
        if self.amqp.reply_attempts == 0 {
            return invalid("amqp.reply_attempts", "must be at least 1");
        }
        if self.amqp.prefetch == 0 {
            return invalid("amqp.prefetch", "must be at least 1");
        }
        for url in self.storage.urls() {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return invalid("storage.url", "must be http:// or https:// URLs");
            }
        }
        if self.storage.layout == Layout::Template
            && let Err(reason) = check_index_template(&self.storage.index_template)
        {
            return Err(ConfigError::Invalid {
                key: "storage.index_template",
                reason,
            });
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return invalid(
                "metrics.listen",
                "must be host:port (an IP address), or \"\" for none",
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return invalid(
                "log.level",
                "must be a level (error, warn, info, debug, trace) or a filter",
            );
        }
        if self.security.enabled && self.security.rules_file.is_empty() {
            return invalid(
                "security.rules_file",
                "must name the rules file when security.enabled is true",
            );
        }
        if self.storage.write_timeout_ms < self.storage.timeout_ms {
            return invalid(
                "storage.write_timeout_ms",
                "must be at least storage.timeout_ms: a write already sent is awaited at least as \
                 long as a read",
            );
        }
        if self.storage.retry_min_delay_ms > self.storage.retry_max_delay_ms {
            return invalid(
                "storage.retry_min_delay_ms",
                "must not exceed storage.retry_max_delay_ms",
            );
        }
        if self.storage.concurrent_bulks == 0 {
            return invalid("storage.concurrent_bulks", "must be at least 1");
        }
        if self.storage.bulk_max_documents < self.limits.documents_write_count {
            return invalid(
                "storage.bulk_max_documents",
                "must be at least limits.documents_write_count: a request is never split",
            );
        }
        if self.limits.documents_write_count == 0 {
            return invalid("limits.documents_write_count", "must be at least 1");
        }
        if self.storage.default_retry_on_conflict > self.limits.max_retry_on_conflict {
            return invalid(
                "storage.default_retry_on_conflict",
                "must not exceed limits.max_retry_on_conflict",
            );
        }
        self.validate_tls()
    }

    /// The TLS settings' consistency, without reading their files (`tls::check` does).
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let amqp = &self.amqp;
        let amqp_urls: Vec<&str> = amqp.urls().collect();
        for url in &amqp_urls {
            if let Err(reason) = crate::amqp_url::parse(url) {
                return invalid("amqp.url", reason);
            }
        }
        let amqps = amqp_urls.iter().all(|u| u.starts_with("amqps://"));
        let amqp_files = [
            ("amqp.tls_ca_file", &amqp.tls_ca_file),
            ("amqp.tls_cert_file", &amqp.tls_cert_file),
            ("amqp.tls_key_file", &amqp.tls_key_file),
        ];
        for (key, file) in amqp_files {
            if !file.is_empty() && !amqps {
                return invalid(
                    key,
                    "is set but amqp.url is not amqps://: the connection would not use TLS".into(),
                );
            }
        }
        if amqp_urls.iter().any(|u| crate::amqp_url::external_login(u))
            && amqp.tls_cert_file.is_empty()
        {
            return invalid(
                "amqp.url",
                "auth_mechanism=external logs in with the client certificate: \
                 set amqp.tls_cert_file and amqp.tls_key_file"
                    .into(),
            );
        }
        let storage = &self.storage;
        let https = storage.urls().all(|u| u.starts_with("https://"));
        let storage_files = [
            ("storage.tls_ca_file", &storage.tls_ca_file),
            ("storage.tls_cert_file", &storage.tls_cert_file),
            ("storage.tls_key_file", &storage.tls_key_file),
        ];
        for (key, file) in storage_files {
            if !file.is_empty() && !https {
                return invalid(
                    key,
                    "is set but a storage.url node is not https://: it would not use TLS".into(),
                );
            }
        }
        let pairs = [
            (
                "amqp.tls_cert_file",
                &amqp.tls_cert_file,
                "amqp.tls_key_file",
                &amqp.tls_key_file,
            ),
            (
                "storage.tls_cert_file",
                &storage.tls_cert_file,
                "storage.tls_key_file",
                &storage.tls_key_file,
            ),
        ];
        for (cert_key, cert, key_key, key) in pairs {
            if !cert.is_empty() && key.is_empty() {
                return invalid(key_key, format!("must be set with {cert_key}"));
            }
            if cert.is_empty() && !key.is_empty() {
                return invalid(cert_key, format!("must be set with {key_key}"));
            }
        }
        Ok(())
    }

    /// The settings as TOML-ready JSON with every secret replaced.
    pub fn redacted(&self) -> serde_json::Value {
        let mut copy = self.clone();
        copy.amqp.url = copy
            .amqp
            .urls()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",");
        copy.storage.url = copy
            .storage
            .urls()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",");
        for secret in [&mut copy.storage.password, &mut copy.storage.api_key] {
            if secret.is_some() {
                *secret = Some("<redacted>".into());
            }
        }
        serde_json::to_value(copy).unwrap_or_default()
    }
}

impl AmqpSettings {
    /// The broker nodes' URLs (several nodes of one cluster, comma-separated).
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.url.split(',').map(str::trim).filter(|u| !u.is_empty())
    }
}

/// Kuzzle 2's alias of a collection's index.
pub const KUZZLE2_ALIAS: &str = "@&{index}.{collection}";

impl StorageSettings {
    /// The name requests are written to: the template, or Kuzzle 2's alias.
    pub fn target_template(&self) -> &str {
        match self.layout {
            Layout::Template => &self.index_template,
            Layout::Kuzzle2 => KUZZLE2_ALIAS,
        }
    }

    /// The engine's node URLs.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.url.split(',').map(str::trim).filter(|u| !u.is_empty())
    }
}

/// A part of `storage.index_template`: literal text or a placeholder.
#[derive(Debug, PartialEq)]
enum Part<'a> {
    Text(&'a str),
    Index,
    Collection,
}

/// The template's parts, read as `envelope::target_index` reads it: `{index}` and
/// `{collection}` are placeholders, any other brace is text.
fn template_parts(template: &str) -> Vec<Part<'_>> {
    let mut parts = Vec::new();
    let (mut rest, mut text_start) = (template, 0);
    let mut at = 0;
    while at < rest.len() {
        let placeholder = if rest[at..].starts_with("{index}") {
            Some((Part::Index, "{index}".len()))
        } else if rest[at..].starts_with("{collection}") {
            Some((Part::Collection, "{collection}".len()))
        } else {
            None
        };
        match placeholder {
            Some((part, len)) => {
                if text_start < at {
                    parts.push(Part::Text(&rest[text_start..at]));
                }
                parts.push(part);
                rest = &rest[at + len..];
                (at, text_start) = (0, 0);
            }
            None => at += rest[at..].chars().next().map_or(1, char::len_utf8),
        }
    }
    if text_start < rest.len() {
        parts.push(Part::Text(&rest[text_start..]));
    }
    parts
}

/// Characters Elasticsearch refuses in an index name (upper case letters too).
const ENGINE_FORBIDDEN: &[char] = &['\\', '/', '*', '?', '"', '<', '>', '|', ' ', ',', '#', ':'];

/// Whether `storage.index_template` gives every Kuzzle index and collection a physical
/// index of its own: `{index}` and `{collection}` once each, the text between them holding
/// a `.` (which no Kuzzle index name holds: the `.` found first after `{index}`, or last
/// before it, is the separator's, so the names are read back unambiguously), and text the
/// engine takes in an index name.
pub fn check_index_template(template: &str) -> Result<(), String> {
    let parts = template_parts(template);
    let count = |wanted: &Part| parts.iter().filter(|p| *p == wanted).count();
    if count(&Part::Index) != 1 {
        return Err("must contain {index} exactly once".into());
    }
    if count(&Part::Collection) != 1 {
        return Err(
            "must contain {collection} exactly once: without it every collection of \
                    an index shares one physical index, and rules per collection protect \
                    nothing"
                .into(),
        );
    }
    let placeholders: Vec<usize> = parts
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p, Part::Index | Part::Collection))
        .map(|(i, _)| i)
        .collect();
    let between: String = parts[placeholders[0] + 1..placeholders[1]]
        .iter()
        .map(|p| match p {
            Part::Text(text) => *text,
            _ => "",
        })
        .collect();
    if !between.contains('.') {
        return Err(format!(
            "must separate {{index}} and {{collection}} by text holding a \".\" (now {between:?}): \
             index names can't hold one, collection names and the other characters can, so \
             (a, b-c) and (a-b, c) would share \"{{index}}-{{collection}}\""
        ));
    }
    for part in &parts {
        if let Part::Text(text) = part
            && let Some(c) = text
                .chars()
                .find(|c| c.is_uppercase() || c.is_control() || ENGINE_FORBIDDEN.contains(c))
        {
            return Err(format!(
                "holds {c:?}, which the engine refuses in an index name"
            ));
        }
    }
    if let Some(Part::Text(prefix)) = parts.first()
        && prefix.starts_with(['_', '-', '+'])
    {
        return Err("must not start with '_', '-' or '+': the engine refuses such names".into());
    }
    Ok(())
}

/// Removes the password of `scheme://user:password@host…`, for logs and `config`,
/// whatever it holds: the user information ends at the URL's last `@` (a password may
/// hold `/`, `#`, `?`, `:` or `@` unencoded; an `@` further on, in a path, makes more
/// than the password hidden, never less).
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    match rest.rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{}{user}:<redacted>{}", &url[..scheme_end + 3], &rest[at..])
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_spec_defaults() {
        let s = Settings::defaults();
        assert_eq!(s.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.amqp.request_queue, "mupdate.requests");
        assert_eq!(s.amqp.reply_queue, "mupdate.replies");
        assert_eq!(s.amqp.reply_exchange, "");
        assert_eq!(s.storage.url, "http://127.0.0.1:9200");
        assert_eq!(s.storage.index_template, "&{index}.{collection}");
        assert!(s.storage.username.is_none() && s.storage.password.is_none());
        assert!(s.storage.kuzzle_metadata);
        assert_eq!(s.response.format, Format::V1);
        assert!(s.response.include_source);
        assert_eq!(s.limits.documents_write_count, 200);
        assert_eq!(s.limits.max_message_bytes, 16_777_216);
        assert_eq!(s.limits.max_retry_on_conflict, 100);
        assert_eq!(s.metrics.listen, "127.0.0.1:9464");
        // Nothing is dropped by default: unanswerable requests are dead-lettered.
        assert_eq!(s.amqp.dead_letter_exchange, "mupdate.dlx");
        assert_eq!(s.amqp.dead_letter_queue, "mupdate.requests.dead");
        s.validate().unwrap();
    }

    #[test]
    fn url_passwords_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:<redacted>@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("http://127.0.0.1:9200"), "http://127.0.0.1:9200");
    }

    #[test]
    fn url_passwords_are_redacted_whatever_they_hold() {
        for password in [
            "a/b", "a@b", "a:b", "a#b", "a?b", "/@:#?", "p%2Fq", "@", "/",
        ] {
            for (scheme, host) in [
                ("amqp://", "@127.0.0.1:5672/%2f"),
                ("https://", "@es.example:9200"),
                ("amqps://", "@node/vhost?heartbeat=10#x"),
            ] {
                let url = format!("{scheme}bob:{password}{host}");
                assert_eq!(
                    redact_url(&url),
                    format!("{scheme}bob:<redacted>{host}"),
                    "{url}"
                );
            }
        }
        assert_eq!(
            redact_url("amqp://bob@host/%2f"),
            "amqp://bob:<redacted>@host/%2f"
        );
        assert_eq!(redact_url("no url at all"), "no url at all");
    }

    #[test]
    fn index_templates_must_separate_index_and_collection() {
        for good in [
            "&{index}.{collection}",
            "{index}.{collection}",
            "kuzzle-{index}.{collection}-v1",
            "{collection}.{index}",
            "x{index}--.--{collection}",
        ] {
            assert_eq!(check_index_template(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("{index}", "{collection} exactly once"),
            ("{collection}", "{index} exactly once"),
            ("{index}-{collection}", "separate"),
            ("{index}{collection}", "separate"),
            ("{collection}_{index}", "separate"),
            ("{index}.{collection}.{index}", "{index} exactly once"),
            (
                "{index}.{collection}{collection}",
                "{collection} exactly once",
            ),
            ("&{index}.{ collection}", "{collection} exactly once"),
            ("Shop-{index}.{collection}", "refuses"),
            ("{index}.{collection}/x", "refuses"),
            ("_{index}.{collection}", "must not start"),
        ] {
            let err = check_index_template(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let mut s = Settings::defaults();
        s.storage.index_template = "{index}-{collection}".into();
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("storage.index_template"), "{err}");
        s.storage.layout = Layout::Kuzzle2;
        s.validate().expect("unused with the kuzzle2 layout");
    }

    proptest::proptest! {
        /// An accepted template never gives two (index, collection) pairs one index.
        #[test]
        fn accepted_templates_name_one_index_per_collection(
            (collection_first, prefix, between, suffix) in
                (proptest::bool::ANY, "[a&.-]{0,2}", "[a.-]{0,3}", "[a.-]{0,2}"),
            pairs in proptest::collection::vec(("[ab][ab-]{0,2}", "[ab][ab.-]{0,2}"), 2..12),
        ) {
            let (first, second) = if collection_first {
                ("{collection}", "{index}")
            } else {
                ("{index}", "{collection}")
            };
            let template = format!("{prefix}{first}{between}{second}{suffix}");
            proptest::prop_assume!(check_index_template(&template).is_ok());
            let mut seen = std::collections::HashMap::new();
            for (index, collection) in pairs {
                let target = crate::pipeline::envelope::target_index(&template, &index, &collection);
                let before = seen.insert(target.clone(), (index.clone(), collection.clone()));
                if let Some(before) = before {
                    proptest::prop_assert_eq!(before, (index, collection), "{}", target);
                }
            }
        }
    }

    #[test]
    fn zero_prefetch_is_refused_by_key() {
        let mut s = Settings::defaults();
        s.amqp.prefetch = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("amqp.prefetch"), "{err}");
    }

    /// The bound is a semaphore's permits: past tokio's most, it would panic at start.
    #[test]
    fn unconfirmed_replies_are_bounded_both_ways() {
        for bad in [0, MOST_UNCONFIRMED_REPLIES + 1, usize::MAX] {
            let mut s = Settings::defaults();
            s.amqp.max_unconfirmed_replies = bad;
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains("amqp.max_unconfirmed_replies"), "{err}");
        }
    }
}
