//! Kuzzle's rights model on the broker's identity: when `security.enabled`, a request
//! is denied unless an allow rule matches its AMQP `user_id` (verified by RabbitMQ), its
//! Kuzzle index and its collection. Rules are glob patterns, read from
//! `security.rules_file`, and reloaded on SIGHUP (a file that doesn't load keeps the
//! rules in force).
//!
//! ```toml
//! [[allow]]
//! users = ["etl-*"]          # broker user names
//! indexes = ["shop"]          # Kuzzle indexes
//! collections = ["*"]         # Kuzzle collections
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use crate::config::SecuritySettings;
use crate::error::RequestError;

/// One allow rule, as written in the rules file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub users: Vec<String>,
    pub indexes: Vec<String>,
    pub collections: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    allow: Vec<Rule>,
}

/// A rule ready to match.
struct Compiled {
    users: GlobSet,
    indexes: GlobSet,
    collections: GlobSet,
}

/// A set of allow rules, as written and compiled.
pub struct Rules {
    written: Vec<Rule>,
    compiled: Vec<Compiled>,
}

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
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Rules {
            written: file.allow,
            compiled,
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

    fn allows(&self, user: &str, index: &str, collection: &str) -> bool {
        self.compiled.iter().any(|rule| {
            rule.users.is_match(user)
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
        if self.current().allows(user, index, collection) {
            Ok(())
        } else {
            let action = format!("document:{action}");
            let user = user.to_owned();
            Err((Verdict::Forbidden, RequestError::Forbidden { action, user }))
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
