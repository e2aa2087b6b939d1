//! The layout's one-way dependencies (docs/src/architecture.md, "Layout"), read from the sources: the
//! `crate::` paths of each module outside its comments and unit tests. A new import
//! against the grain fails here with the file that made it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The place a module belongs to: `pipeline`, `lifecycle`, `broker`, `storage`,
/// `client`, `tls`, `rights`, or the module's own name for the others.
fn place(module: &str) -> String {
    let mut parts = module.split('/');
    let first = parts.next().unwrap_or_default();
    match (first, parts.next()) {
        ("security", Some(inner)) => inner.to_owned(),
        _ => first.to_owned(),
    }
}

/// Each source file's place, with the places its code names through `crate::`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
            let path = entry.expect("src/ is readable").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap().to_string_lossy();
        let module = relative
            .trim_end_matches(".rs")
            .trim_end_matches("/mod")
            .to_owned();
        // Unit-test modules of their own (`port_tests`) are not the layout's either.
        if module == "main" || module == "lib" || module.ends_with("_tests") {
            continue;
        }
        let from = place(&module);
        let text = std::fs::read_to_string(&file).unwrap();
        // The unit tests sit at the end of a file; their imports are not the layout's.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let named = found.entry(from.clone()).or_default();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (at, _) in line.match_indices("crate::") {
                let path: String = line[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let module = path.split("::").take(2).collect::<Vec<_>>().join("/");
                let to = place(&module);
                if to != from {
                    named.insert(to);
                }
            }
        }
    }
    found
}

/// The imports against the grain, as `from -> to`.
fn against_the_grain(found: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    let forbidden: &[(&str, &[&str])] = &[
        // Settings know nothing of who reads them.
        ("config", &["tls", "client", "broker", "storage"]),
        ("tls", &["client", "broker", "storage"]),
        // A leaf: config, tls and the client all read URLs through it.
        (
            "amqp_url",
            &["config", "tls", "client", "broker", "storage", "pipeline"],
        ),
        ("pipeline", &["broker", "client", "lifecycle"]),
        ("broker", &["storage", "client"]),
        ("lifecycle", &["client"]),
        ("storage", &["broker", "client", "pipeline"]),
    ];
    let mut wrong = BTreeSet::new();
    for (from, not) in forbidden {
        for to in found.get(*from).into_iter().flatten() {
            if not.contains(&to.as_str()) {
                wrong.insert(format!("{from} -> {to}"));
            }
        }
    }
    // The worker knows nothing of its client tools.
    for (from, to) in found {
        if from != "client" && to.contains("client") {
            wrong.insert(format!("{from} -> client"));
        }
    }
    wrong
}

#[test]
fn dependencies_go_one_way() {
    let found = imports();
    assert!(
        found.contains_key("pipeline") && found.contains_key("client"),
        "the places are read: {found:?}"
    );
    let wrong = against_the_grain(&found);
    assert!(wrong.is_empty(), "imports against the layout: {wrong:?}");
}

#[test]
fn client_config_and_tls_form_no_circle() {
    let found = imports();
    let names = |from: &str| found.get(from).cloned().unwrap_or_default();
    assert!(names("client").contains("tls") && names("client").contains("config"));
    assert!(names("tls").contains("config"));
    assert!(!names("config").contains("tls") && !names("config").contains("client"));
    assert!(!names("tls").contains("client"));
}
