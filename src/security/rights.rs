//! Kuzzle's rights model on the broker's identity: when `security.enabled`, a request
//! is denied unless an allow rule matches its AMQP `user_id` (verified by RabbitMQ), its
//! Kuzzle action, its index and its collection. Rules are glob patterns, read from
//! `security.rules_file`, and reloaded on SIGHUP (a file that doesn't load keeps the
//! rules in force).
//!
//! ```toml
//! [[allow]]
//! users = ["etl-*"]          # broker user names
//! indexes = ["shop"]          # Kuzzle indexes
//! collections = ["*"]         # Kuzzle collections
//! actions = ["m*"]            # Kuzzle actions; without it, DEFAULT_ACTIONS
//!
//! [[reply]]
//! users = ["etl-*"]
//! queues = ["{user}.*", "shared-replies"]   # where their replies may go
//! ```
//!
//! Where a reply may go is part of the rules too: the worker publishes with its own
//! broker rights, so a `reply_to` is checked against the queues the user's `[[reply]]`
//! rules allow (`{user}` stands for the user's name), by default a queue named after the
//! user (`{user}` or `{user}.*`); direct reply-to is always allowed. On
//! `amqp.reply_exchange`, the routing key is prefixed with the user (`{user}.{key}`), so
//! a caller reaches only the bindings of its own name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use crate::config::SecuritySettings;
use crate::error::RequestError;
use crate::pipeline::envelope::Action;
use crate::pipeline::reply::{Destination, SHORT_STRING_MAX};

/// One allow rule, as written in the rules file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub users: Vec<String>,
    pub indexes: Vec<String>,
    pub collections: Vec<String>,
    /// Glob patterns on the Kuzzle action names (`mCreate`, `delete`, `m*`); each must
    /// name at least one action the worker takes. Absent: `DEFAULT_ACTIONS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions: Option<Vec<String>>,
}

/// What a rule without `actions` allows: what every rule allowed when the worker only
/// updated documents, so that a rules file written then allows no creation, replacement
/// or deletion now.
pub const DEFAULT_ACTIONS: [&str; 4] = ["mUpdate", "mUpsert", "update", "upsert"];

/// Where the replies of some users may go, as written in the rules file: glob patterns
/// on `reply_to` queue names, `{user}` standing for the user's name.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplyRule {
    pub users: Vec<String>,
    pub queues: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    allow: Vec<Rule>,
    #[serde(default)]
    reply: Vec<ReplyRule>,
}

/// The reply queues of a user no `[[reply]]` rule names: those named after it.
pub const DEFAULT_REPLY_QUEUES: [&str; 2] = ["{user}", "{user}.*"];

/// A rule ready to match.
struct Compiled {
    users: GlobSet,
    indexes: GlobSet,
    collections: GlobSet,
    /// The Kuzzle action names its patterns match, out of those the worker takes.
    actions: Vec<&'static str>,
}

/// A reply rule ready to match its users; its queue patterns are compiled per user
/// (`{user}` is the user's name, escaped).
struct CompiledReply {
    users: GlobSet,
    queues: Vec<String>,
}

/// A set of allow rules, as written and compiled.
pub struct Rules {
    written: Vec<Rule>,
    written_replies: Vec<ReplyRule>,
    compiled: Vec<Compiled>,
    replies: Vec<CompiledReply>,
    /// Each user's reply queue patterns, compiled on its first request (compiling costs
    /// about 0.1 ms; matching, well under a microsecond). Emptied when `REPLY_USERS` are
    /// held; gone with these rules on reload.
    reply_sets: Mutex<HashMap<String, Arc<GlobSet>>>,
}

/// The most users whose reply queue patterns are held compiled at once.
const REPLY_USERS: usize = 1024;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct RulesError {
    pub path: PathBuf,
    pub reason: String,
}

fn globs(patterns: &[String], what: &str) -> Result<GlobSet, String> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = Glob::new(pattern).map_err(|e| format!("{what} pattern \"{pattern}\": {e}"))?;
        set.add(glob);
    }
    set.build().map_err(|e| e.to_string())
}

/// The action names a rule's `actions` patterns allow (`DEFAULT_ACTIONS` without any).
/// A pattern that names no action the worker takes is refused: a typo (`mupdate`)
/// would otherwise allow nothing, silently.
fn actions(patterns: Option<&[String]>) -> Result<Vec<&'static str>, String> {
    let Some(patterns) = patterns else {
        return Ok(DEFAULT_ACTIONS.to_vec());
    };
    let mut allowed = Vec::new();
    for pattern in patterns {
        let glob = Glob::new(pattern)
            .map_err(|e| format!("action pattern \"{pattern}\": {e}"))?
            .compile_matcher();
        let named: Vec<&'static str> = Action::names().filter(|n| glob.is_match(n)).collect();
        if named.is_empty() {
            let known = Action::names().collect::<Vec<_>>().join(", ");
            return Err(format!(
                "action pattern \"{pattern}\" names no action the worker takes ({known})"
            ));
        }
        allowed.extend(named);
    }
    allowed.sort_unstable();
    allowed.dedup();
    Ok(allowed)
}

impl Rules {
    /// Parses rules from TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: RulesFile = toml_from_str(text)?;
        let compiled = file
            .allow
            .iter()
            .map(|rule| {
                Ok(Compiled {
                    users: globs(&rule.users, "user")?,
                    indexes: globs(&rule.indexes, "index")?,
                    collections: globs(&rule.collections, "collection")?,
                    actions: actions(rule.actions.as_deref())?,
                })
            })
            .collect::<Result<_, String>>()?;
        let replies = file
            .reply
            .iter()
            .map(|rule| {
                // A pattern must compile for any user: checked here with a plain name.
                for queue in &rule.queues {
                    Glob::new(&queue.replace("{user}", "u"))
                        .map_err(|e| format!("queue pattern \"{queue}\": {e}"))?;
                }
                Ok(CompiledReply {
                    users: globs(&rule.users, "user")?,
                    queues: rule.queues.clone(),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Rules {
            written: file.allow,
            written_replies: file.reply,
            compiled,
            replies,
            reply_sets: Mutex::default(),
        })
    }

    /// Reads and parses a rules file.
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let error = |reason: String| RulesError {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        Self::parse(&text).map_err(error)
    }

    /// The rules as written, for `mupdate-worker config`.
    pub fn written(&self) -> &[Rule] {
        &self.written
    }

    /// The `[[reply]]` rules as written, for `mupdate-worker config`.
    pub fn written_replies(&self) -> &[ReplyRule] {
        &self.written_replies
    }

    /// Whether `user`'s replies may go to the queue `queue`: a pattern of the `[[reply]]`
    /// rules naming the user matches it, or, when none names the user, a default one.
    fn allows_reply_queue(&self, user: &str, queue: &str) -> bool {
        let held = self.reply_sets.lock().expect("poisoned").get(user).cloned();
        let set = match held {
            Some(set) => set,
            None => {
                let set = Arc::new(self.reply_set(user));
                let mut sets = self.reply_sets.lock().expect("poisoned");
                if sets.len() >= REPLY_USERS {
                    sets.clear();
                }
                sets.insert(user.to_owned(), set.clone());
                set
            }
        };
        set.is_match(queue)
    }

    /// `user`'s reply queue patterns, compiled: those of the `[[reply]]` rules naming it,
    /// or the default ones when none does.
    fn reply_set(&self, user: &str) -> GlobSet {
        let mut named = false;
        let mut patterns = Vec::new();
        for rule in self.replies.iter().filter(|r| r.users.is_match(user)) {
            named = true;
            patterns.extend(rule.queues.iter().map(String::as_str));
        }
        if !named {
            patterns.extend(DEFAULT_REPLY_QUEUES);
        }
        let user = globset::escape(user);
        let mut set = GlobSetBuilder::new();
        for pattern in patterns {
            // Each pattern compiled with a plain name when loaded: with a name escaped,
            // too. Backslashes are plain characters (`escape` quotes with brackets):
            // a user named `\` must not turn `{user}.*` into `\.*`.
            let glob = globset::GlobBuilder::new(&pattern.replace("{user}", &user))
                .backslash_escape(false)
                .build();
            if let Ok(glob) = glob {
                set.add(glob);
            }
        }
        set.build().unwrap_or_else(|_| GlobSet::empty())
    }

    fn allows(&self, user: &str, action: &str, index: &str, collection: &str) -> bool {
        self.compiled.iter().any(|rule| {
            rule.users.is_match(user)
                && rule.actions.contains(&action)
                && rule.indexes.is_match(index)
                && rule.collections.is_match(collection)
        })
    }
}

/// TOML through the `config` crate the settings already use.
fn toml_from_str<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| e.to_string())
}

/// What a rights check came to, for the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Unauthorized,
    Forbidden,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Unauthorized => "unauthorized",
            Verdict::Forbidden => "forbidden",
        }
    }
}

/// The rules in force, swapped whole on reload.
pub struct Rights {
    path: PathBuf,
    rules: RwLock<Arc<Rules>>,
}

impl Rights {
    /// `None` when rights are off. With them on, the rules file must load.
    pub fn from_settings(settings: &SecuritySettings) -> Result<Option<Self>, RulesError> {
        if !settings.enabled {
            return Ok(None);
        }
        let path = PathBuf::from(&settings.rules_file);
        let rules = Rules::load(&path)?;
        Ok(Some(Rights {
            path,
            rules: RwLock::new(Arc::new(rules)),
        }))
    }

    pub fn current(&self) -> Arc<Rules> {
        self.rules.read().expect("poisoned").clone()
    }

    /// Reads the rules file again; on failure the rules in force stay.
    pub fn reload(&self) -> Result<usize, RulesError> {
        let rules = Rules::load(&self.path)?;
        let count = rules.written.len();
        *self.rules.write().expect("poisoned") = Arc::new(rules);
        Ok(count)
    }

    /// Whether `user` (the AMQP `user_id`) may run `action` on `index` and `collection`.
    pub fn check(
        &self,
        user: Option<&str>,
        action: &str,
        index: &str,
        collection: &str,
    ) -> Result<(), (Verdict, RequestError)> {
        let Some(user) = user.filter(|u| !u.is_empty()) else {
            let action = format!("document:{action}");
            return Err((Verdict::Unauthorized, RequestError::Unauthorized(action)));
        };
        if self.current().allows(user, action, index, collection) {
            Ok(())
        } else {
            let action = format!("document:{action}");
            let user = user.to_owned();
            Err((Verdict::Forbidden, RequestError::Forbidden { action, user }))
        }
    }

    /// Where `user`'s reply may go, from the destination the request asked for: direct
    /// reply-to and the configured reply queue as they are; a `reply_to` queue only where
    /// the user's rules allow it; on the reply exchange, the routing key prefixed with the
    /// user (`{user}.{key}`, cut to a short string), so that only the bindings of its own
    /// name are reached. Without a user, only direct reply-to and the reply queue.
    pub fn reply_destination(
        &self,
        user: Option<&str>,
        destination: Destination,
    ) -> Result<Destination, (Verdict, RequestError)> {
        if destination.is_direct() {
            return Ok(destination);
        }
        let asked = match &destination {
            Destination::Queue(_) => return Ok(destination),
            Destination::ReplyTo(queue) => format!("queue \"{queue}\""),
            Destination::Exchange { exchange, .. } => format!("exchange \"{exchange}\""),
        };
        let Some(user) = user.filter(|u| !u.is_empty()) else {
            return Err((
                Verdict::Unauthorized,
                RequestError::ReplyUnauthorized(asked),
            ));
        };
        let forbidden = || {
            let user = user.to_owned();
            let error = RequestError::ReplyForbidden {
                destination: asked.clone(),
                user,
            };
            (Verdict::Forbidden, error)
        };
        match destination {
            Destination::ReplyTo(queue) if self.current().allows_reply_queue(user, &queue) => {
                Ok(Destination::ReplyTo(queue))
            }
            Destination::Exchange {
                exchange,
                routing_key,
            } if user.len() < SHORT_STRING_MAX => {
                let mut key = format!("{user}.{routing_key}");
                let mut end = SHORT_STRING_MAX.min(key.len());
                while !key.is_char_boundary(end) {
                    end -= 1;
                }
                key.truncate(end);
                Ok(Destination::Exchange {
                    exchange,
                    routing_key: key,
                })
            }
            _ => Err(forbidden()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
        [[allow]]
        users = ["etl-*"]
        indexes = ["shop"]
        collections = ["products", "orders-*"]

        [[allow]]
        users = ["admin"]
        indexes = ["*"]
        collections = ["*"]
    "#;

    fn rights(text: &str) -> Rights {
        Rights {
            path: PathBuf::new(),
            rules: RwLock::new(Arc::new(Rules::parse(text).unwrap())),
        }
    }

    fn verdict(r: &Rights, user: Option<&str>, index: &str, collection: &str) -> Verdict {
        match r.check(user, "mUpdate", index, collection) {
            Ok(()) => Verdict::Allowed,
            Err((verdict, _)) => verdict,
        }
    }

    #[test]
    fn rules_allow_by_user_index_and_collection_and_deny_the_rest() {
        let r = rights(RULES);
        use Verdict::*;
        assert_eq!(verdict(&r, Some("etl-1"), "shop", "products"), Allowed);
        assert_eq!(verdict(&r, Some("etl-1"), "shop", "orders-2026"), Allowed);
        assert_eq!(verdict(&r, Some("etl-1"), "shop", "users"), Forbidden);
        assert_eq!(verdict(&r, Some("etl-1"), "other", "products"), Forbidden);
        assert_eq!(verdict(&r, Some("guest"), "shop", "products"), Forbidden);
        assert_eq!(verdict(&r, Some("admin"), "any", "thing"), Allowed);
        assert_eq!(verdict(&r, None, "shop", "products"), Unauthorized);
        assert_eq!(verdict(&r, Some(""), "shop", "products"), Unauthorized);
        // No rule at all: everything is denied.
        assert_eq!(verdict(&rights(""), Some("admin"), "a", "b"), Forbidden);
    }

    fn may(r: &Rights, user: &str, action: &str) -> bool {
        r.check(Some(user), action, "shop", "products").is_ok()
    }

    #[test]
    fn a_rule_without_actions_allows_the_updates_only() {
        let r = rights(RULES);
        for action in ["mUpdate", "mUpsert", "update", "upsert"] {
            assert!(may(&r, "etl-1", action), "{action}");
            assert!(may(&r, "admin", action), "{action}");
        }
        for action in Action::names().filter(|a| !DEFAULT_ACTIONS.contains(a)) {
            assert!(!may(&r, "etl-1", action), "{action}");
            assert!(!may(&r, "admin", action), "{action}");
        }
        assert_eq!(DEFAULT_ACTIONS.len(), 4);
    }

    #[test]
    fn a_rules_actions_are_glob_patterns_on_kuzzles_action_names() {
        let r = rights(
            r#"
            [[allow]]
            users = ["creator"]
            indexes = ["*"]
            collections = ["*"]
            actions = ["mCreate", "create"]

            [[allow]]
            users = ["multi"]
            indexes = ["*"]
            collections = ["*"]
            actions = ["m*"]

            [[allow]]
            users = ["root"]
            indexes = ["*"]
            collections = ["*"]
            actions = ["*"]

            [[allow]]
            users = ["nothing"]
            indexes = ["*"]
            collections = ["*"]
            actions = []

            # Two rules of one user add up; the other fields still count.
            [[allow]]
            users = ["creator"]
            indexes = ["shop"]
            collections = ["products"]
            actions = ["*Delete", "delete"]
            "#,
        );
        for action in Action::names() {
            let creates = matches!(action, "mCreate" | "create");
            let deletes = matches!(action, "mDelete" | "delete");
            assert_eq!(may(&r, "creator", action), creates || deletes, "{action}");
            assert_eq!(
                may(&r, "multi", action),
                action.starts_with('m'),
                "{action}"
            );
            assert!(may(&r, "root", action), "{action}");
            assert!(!may(&r, "nothing", action), "{action}");
        }
        let elsewhere = r.check(Some("creator"), "mDelete", "shop", "orders");
        assert!(
            elsewhere.is_err(),
            "the delete rule is for shop/products only"
        );
        // Action names are Kuzzle's, case and all.
        assert!(!may(&r, "multi", "MUPDATE"));
        // A refusal names the action asked.
        let (verdict, err) = r
            .check(Some("creator"), "mReplace", "shop", "x")
            .unwrap_err();
        assert_eq!(verdict, Verdict::Forbidden);
        assert_eq!(err.status_and_id(), (403, "security.rights.forbidden"));
        assert_eq!(
            err.to_string(),
            "Insufficient permissions to execute the action \"document:mReplace\" (User \"creator\")."
        );
    }

    #[test]
    fn an_action_pattern_that_names_no_action_is_refused() {
        let rule = |actions: &str| {
            format!(
                "[[allow]]\nusers = [\"a\"]\nindexes = [\"*\"]\ncollections = [\"*\"]\nactions = {actions}\n"
            )
        };
        for bad in [r#"["mupdate"]"#, r#"["mGet"]"#, r#"["mUpdate", "search"]"#] {
            let err = Rules::parse(&rule(bad)).err().expect(bad);
            assert!(err.contains("names no action the worker takes"), "{err}");
        }
        let err = Rules::parse(&rule(r#"["m[*"]"#)).err().unwrap();
        assert!(err.contains("action pattern"), "{err}");
        assert!(Rules::parse(&rule(r#""mUpdate""#)).is_err(), "a list");
        // As written: `actions` shown only where it is written.
        let rules = Rules::parse(&(rule(r#"["m*"]"#) + RULES)).unwrap();
        assert_eq!(rules.written()[0].actions, Some(vec!["m*".to_owned()]));
        assert_eq!(rules.written()[1].actions, None);
        let shown = serde_json::to_value(&rules.written()[1]).unwrap();
        assert!(shown.get("actions").is_none(), "{shown}");
    }

    #[test]
    fn refusals_carry_kuzzles_ids_and_messages() {
        let r = rights(RULES);
        let (_, err) = r.check(Some("bob"), "mUpdate", "shop", "x").unwrap_err();
        assert_eq!(err.status_and_id(), (403, "security.rights.forbidden"));
        assert_eq!(
            err.to_string(),
            "Insufficient permissions to execute the action \"document:mUpdate\" (User \"bob\")."
        );
        let (_, err) = r.check(None, "mUpdate", "shop", "x").unwrap_err();
        assert_eq!(err.status_and_id(), (401, "security.rights.unauthorized"));
        assert_eq!(
            err.to_string(),
            "Unauthorized: authentication required to execute the action \"document:mUpdate\"."
        );
    }

    fn to(
        rights: &Rights,
        user: Option<&str>,
        destination: Destination,
    ) -> Result<Destination, Verdict> {
        rights
            .reply_destination(user, destination)
            .map_err(|(verdict, _)| verdict)
    }

    fn queue(name: &str) -> Destination {
        Destination::ReplyTo(name.to_owned())
    }

    #[test]
    fn replies_go_to_queues_named_after_the_user_unless_rules_say_otherwise() {
        let text = format!(
            "{RULES}\n[[reply]]\nusers = [\"admin\"]\nqueues = [\"shared.*\", \"{{user}}-inbox\"]\n\n\
             [[reply]]\nusers = [\"direct-only\"]\nqueues = []\n"
        );
        let r = rights(&text);
        use Verdict::*;
        // By default: the user's own name, and below it.
        assert!(to(&r, Some("etl-1"), queue("etl-1")).is_ok());
        assert!(to(&r, Some("etl-1"), queue("etl-1.replies")).is_ok());
        assert_eq!(
            to(&r, Some("etl-1"), queue("etl-2.replies")),
            Err(Forbidden)
        );
        assert_eq!(
            to(&r, Some("etl-1"), queue("billing.commands")),
            Err(Forbidden)
        );
        assert_eq!(to(&r, Some("etl-1"), queue("etl-1x")), Err(Forbidden));
        // A name's glob characters are its own, not patterns.
        assert_eq!(
            to(&r, Some("etl-*"), queue("etl-1.replies")),
            Err(Forbidden)
        );
        assert!(to(&r, Some("etl-*"), queue("etl-*.replies")).is_ok());
        // Rules naming a user replace the default.
        assert!(to(&r, Some("admin"), queue("shared.x")).is_ok());
        assert!(to(&r, Some("admin"), queue("admin-inbox")).is_ok());
        assert_eq!(
            to(&r, Some("admin"), queue("admin.replies")),
            Err(Forbidden)
        );
        assert_eq!(
            to(&r, Some("direct-only"), queue("direct-only")),
            Err(Forbidden)
        );
        // Direct reply-to and the configured reply queue: anyone, even anonymous.
        let direct = queue("amq.rabbitmq.reply-to.g1h2AA");
        assert!(to(&r, Some("direct-only"), direct.clone()).is_ok());
        assert!(to(&r, None, direct).is_ok());
        assert!(to(&r, None, Destination::Queue("mupdate.replies".into())).is_ok());
        assert_eq!(to(&r, None, queue("etl-1")), Err(Unauthorized));
        assert_eq!(to(&r, Some(""), queue("etl-1")), Err(Unauthorized));
    }

    /// A user's name is taken literally in its patterns, backslashes included (as an
    /// escape, `\` made `{user}.*` match every queue starting with `.`, and `\*` made
    /// `{user}` match any bracketed name).
    #[test]
    fn a_users_name_is_literal_in_its_reply_patterns() {
        let rules = Rules::parse("").unwrap();
        assert!(rules.allows_reply_queue("\\", "\\.replies"));
        assert!(!rules.allows_reply_queue("\\", ".other-app"));
        assert!(!rules.allows_reply_queue("\\", "x.other-app"));
        assert!(rules.allows_reply_queue("\\*", "\\*"));
        assert!(!rules.allows_reply_queue("\\*", "[anything]"));
        assert!(!rules.allows_reply_queue("\\*", "*"));
        assert!(rules.allows_reply_queue("a*", "a*.r"));
        assert!(!rules.allows_reply_queue("a*", "ab.r"));
    }

    #[test]
    fn compiled_reply_patterns_are_held_for_a_bounded_number_of_users() {
        let rules = Rules::parse("").unwrap();
        for i in 0..=REPLY_USERS {
            let user = format!("u{i}");
            assert!(rules.allows_reply_queue(&user, &format!("{user}.replies")));
            assert!(
                !rules.allows_reply_queue(&user, "other.replies"),
                "held: same answer"
            );
        }
        assert!(rules.reply_sets.lock().unwrap().len() <= REPLY_USERS);
    }

    #[test]
    fn on_the_reply_exchange_a_routing_key_is_the_users_own() {
        let r = rights(RULES);
        let exchange = |key: &str| Destination::Exchange {
            exchange: "replies".into(),
            routing_key: key.into(),
        };
        assert_eq!(
            to(&r, Some("etl-1"), exchange("victim.r1")),
            Ok(exchange("etl-1.victim.r1"))
        );
        assert_eq!(to(&r, None, exchange("r1")), Err(Verdict::Unauthorized));
        // Cut to a short string, on a character boundary.
        let routed = to(&r, Some("etl-1"), exchange(&"é".repeat(127))).unwrap();
        let (_, key) = routed.route();
        assert!(
            key.len() <= SHORT_STRING_MAX && key.starts_with("etl-1."),
            "{key}"
        );
        let long_user = "u".repeat(SHORT_STRING_MAX);
        assert_eq!(
            to(&r, Some(&long_user), exchange("r1")),
            Err(Verdict::Forbidden)
        );
    }

    #[test]
    fn a_refused_destination_says_so_in_kuzzles_terms() {
        let r = rights(RULES);
        let (_, err) = r
            .reply_destination(Some("bob"), queue("billing.commands"))
            .unwrap_err();
        assert_eq!(err.status_and_id(), (403, "security.rights.forbidden"));
        assert_eq!(
            err.to_string(),
            "Insufficient permissions to have a reply sent to the queue \"billing.commands\" (User \"bob\")."
        );
        let (_, err) = r
            .reply_destination(None, queue("billing.commands"))
            .unwrap_err();
        assert_eq!(err.status_and_id(), (401, "security.rights.unauthorized"));
        assert!(Rules::parse("[[reply]]\nusers = [\"a\"]\nqueues = [\"[\"]").is_err());
    }

    #[test]
    fn a_bad_rules_file_is_refused_with_its_reason() {
        assert!(
            Rules::parse("[[allow]]\nusers = [\"a\"]\n").is_err(),
            "fields missing"
        );
        assert!(
            Rules::parse("[[allow]]\nusers = [\"[\"]\nindexes = []\ncollections = []").is_err()
        );
        assert!(
            Rules::parse("[[deny]]\nusers = []").is_err(),
            "unknown table"
        );
        assert!(Rules::load(Path::new("/nonexistent/rules.toml")).is_err());
    }
}
