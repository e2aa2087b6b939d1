//! The book (docs/src/, README.md as its landing page), checked without a server: the
//! configuration chapter against config/default.toml (no key undocumented, none stale,
//! each key's default and environment variable as they are),
//! every relative link and `#anchor` of the README and the chapters, and SUMMARY.md
//! against the chapter files. http(s) links, and links leaving the repository (the
//! contract under ../shared/), are not checked: they are not the repository's to keep.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `section.key` of config/default.toml: its assignments, as the `config` crate
/// reads them, and the optional keys it names commented out (`# username = ""`: unset
/// by default).
fn default_keys() -> BTreeSet<String> {
    let text = read(&root().join("config/default.toml"));
    let table: toml::Table = text.parse().expect("config/default.toml is TOML");
    let mut keys = BTreeSet::new();
    for (section, value) in &table {
        let inner = value.as_table().expect("default.toml holds sections only");
        keys.extend(inner.keys().map(|key| format!("{section}.{key}")));
    }
    let mut section = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name);
        } else if let (Some(section), Some(comment)) = (section, line.strip_prefix('#')) {
            let key = comment.split_once('=').map(|(key, _)| key.trim());
            if let Some(key) = key.filter(|k| is_key(k)) {
                keys.insert(format!("{section}.{key}"));
            }
        }
    }
    keys
}

fn is_key(word: &str) -> bool {
    !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The text outside fenced code blocks, and outside inline code when `code` is false.
fn prose(text: &str, code: bool) -> String {
    let mut out = String::new();
    let mut fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fence = !fence;
        } else if !fence {
            out.push_str(line);
            out.push('\n');
        }
    }
    if code {
        return out;
    }
    let mut inline = false;
    out.chars()
        .filter(|&c| {
            if c == '`' {
                inline = !inline;
            }
            !inline && c != '`'
        })
        .collect()
}

/// The `section.key` names in backticks in `text`, for the sections of default.toml.
fn named_keys(text: &str, sections: &BTreeSet<&str>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for span in text.split('`').skip(1).step_by(2) {
        let Some((section, rest)) = span.split_once('.') else {
            continue;
        };
        let key: String = rest
            .chars()
            .take_while(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            .collect();
        if sections.contains(section) && is_key(&key) {
            found.insert(format!("{section}.{key}"));
        }
    }
    found
}

/// The configuration reference: the keys in the first column of the chapter's table.
fn documented_keys(sections: &BTreeSet<&str>) -> BTreeSet<String> {
    let chapter = read(&root().join("docs/src/configuration.md"));
    let first_column: String = prose(&chapter, true)
        .lines()
        .filter_map(|line| line.strip_prefix('|')?.split('|').next())
        .collect::<Vec<_>>()
        .join("\n");
    named_keys(&first_column, sections)
}

#[test]
fn every_key_of_default_toml_is_in_the_configuration_chapter() {
    let keys = default_keys();
    let sections: BTreeSet<&str> = keys.iter().filter_map(|k| k.split('.').next()).collect();
    let documented = documented_keys(&sections);
    let missing: Vec<_> = keys.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "config/default.toml keys missing from the reference table of \
         docs/src/configuration.md (as `section.key` in its first column): {missing:?}"
    );
}

#[test]
fn the_configuration_chapter_names_no_key_default_toml_lacks() {
    let keys = default_keys();
    let sections: BTreeSet<&str> = keys.iter().filter_map(|k| k.split('.').next()).collect();
    let chapter = read(&root().join("docs/src/configuration.md"));
    let named = &documented_keys(&sections) | &named_keys(&prose(&chapter, true), &sections);
    let stale: Vec<_> = named.difference(&keys).collect();
    assert!(
        stale.is_empty(),
        "docs/src/configuration.md names keys config/default.toml doesn't have: {stale:?}"
    );
}

/// A row of the reference table naming one key documents that key's environment
/// variable (`MUPDATE__SECTION__KEY`) and, first in its default column, the value
/// config/default.toml gives it (`""` for an empty string). Rows naming two keys (`a` /
/// `b`) share a default and a variable prefix, and aren't held to either.
#[test]
fn the_reference_table_gives_each_key_its_default_and_variable() {
    let table: toml::Table = read(&root().join("config/default.toml"))
        .parse()
        .expect("config/default.toml is TOML");
    let chapter = read(&root().join("docs/src/configuration.md"));
    let mut checked = 0;
    let mut wrong = Vec::new();
    for row in chapter.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let named: Vec<&str> = cells[0]
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|word| {
                word.split_once('.')
                    .is_some_and(|(s, k)| is_key(s) && is_key(k))
            })
            .collect();
        let [key] = named[..] else { continue };
        let (section, name) = key.split_once('.').unwrap();
        let Some(value) = table.get(section).and_then(|s| s.get(name)) else {
            continue;
        };
        checked += 1;
        let variable = format!("MUPDATE__{}__{}", section, name).to_uppercase();
        if !cells[0].contains(&variable) {
            wrong.push(format!("{key}: its variable is {variable}"));
        }
        let expected = match value {
            toml::Value::String(text) if text.is_empty() => "\"\"".to_owned(),
            toml::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let shown = cells.get(1).and_then(|c| c.split('`').nth(1));
        if shown != Some(expected.as_str()) {
            wrong.push(format!(
                "{key}: default {shown:?}, default.toml says {expected}"
            ));
        }
    }
    assert!(checked > 40, "only {checked} rows of one key found");
    assert!(wrong.is_empty(), "docs/src/configuration.md: {wrong:#?}");
}

/// The README and every Markdown file under docs/src/.
fn book_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut dirs = vec![root().join("docs/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("docs/src/ is readable") {
            let path = entry.expect("docs/src/ is readable").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// `a/b/../c` as `a/c`, without touching the file system; `None` when it climbs out of
/// the repository.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

/// The text of `file` with its mdbook includes (`{{#include PATH}}`, `PATH:anchor`)
/// put in, as the rendered chapter has it; an include that doesn't resolve is `Err`.
fn expanded(file: &Path) -> Result<String, String> {
    let name = file
        .strip_prefix(root())
        .unwrap_or(file)
        .display()
        .to_string();
    let mut out = String::new();
    for line in read(file).lines() {
        let Some(include) = line
            .trim()
            .strip_prefix("{{#include ")
            .and_then(|l| l.strip_suffix("}}"))
        else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let (path, anchor) = match include.split_once(':') {
            Some((path, anchor)) => (path, Some(anchor)),
            None => (include, None),
        };
        let target = file.parent().unwrap().join(path);
        let text = std::fs::read_to_string(&target)
            .map_err(|e| format!("{name}: include {include}: {e}"))?;
        let lines: Vec<&str> = text.lines().collect();
        let range = match anchor {
            None => 0..lines.len(),
            Some(anchor) => {
                let at = |marker: String| lines.iter().position(|l| l.contains(&marker));
                match (
                    at(format!("ANCHOR: {anchor} ")),
                    at(format!("ANCHOR_END: {anchor} ")),
                ) {
                    (Some(start), Some(end)) if start < end => start + 1..end,
                    _ => return Err(format!("{name}: include {include}: no such anchor")),
                }
            }
        };
        for line in &lines[range] {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// A heading's anchor as mdbook and GitHub make it: lower case, spaces to `-`, every
/// other character but letters, digits, `-` and `_` dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                Some(c.to_lowercase().next().unwrap_or(c))
            } else if c.is_whitespace() {
                Some('-')
            } else {
                None
            }
        })
        .collect()
}

/// The anchors of a Markdown file's headings (a repeated one gets `-1`, `-2`…).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for line in prose(text, true).lines() {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if hashes == 0 || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(&line[hashes..]);
        let count = seen.entry(base.clone()).or_default();
        anchors.insert(match *count {
            0 => base,
            n => format!("{base}-{n}"),
        });
        *count += 1;
    }
    anchors
}

/// The targets of the Markdown links and images in `text` (`[text](target)`), outside
/// code.
fn link_targets(text: &str) -> Vec<String> {
    let text = prose(text, false);
    text.match_indices("](")
        .filter_map(|(at, _)| {
            let rest = &text[at + 2..];
            let end = rest.find(')')?;
            let target = rest[..end].split_whitespace().next()?;
            Some(target.to_owned())
        })
        .collect()
}

#[test]
fn every_relative_link_of_the_readme_and_the_book_resolves() {
    let root = root();
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in book_files() {
        let name = file.strip_prefix(&root).unwrap().display().to_string();
        let text = match expanded(&file) {
            Ok(text) => text,
            Err(e) => {
                broken.push(e);
                continue;
            }
        };
        for target in link_targets(&read(&file)) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let linked = if path.is_empty() {
                file.strip_prefix(&root).unwrap().to_path_buf()
            } else {
                let relative = file.parent().unwrap().strip_prefix(&root).unwrap();
                match normalize(&relative.join(path)) {
                    Some(linked) => linked,
                    None => continue, // outside the repository: ../shared/
                }
            };
            checked += 1;
            let full = root.join(&linked);
            if !full.exists() {
                broken.push(format!("{name}: ({target}): no {}", linked.display()));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            let heads = if path.is_empty() {
                anchors(&text)
            } else if full.extension().is_some_and(|e| e == "md") {
                match expanded(&full) {
                    Ok(target_text) => anchors(&target_text),
                    Err(_) => continue, // reported with that file
                }
            } else {
                continue;
            };
            if !heads.contains(anchor) {
                broken.push(format!(
                    "{name}: ({target}): no heading of {} makes #{anchor}",
                    linked.display()
                ));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} relative links found: is the scan broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn summary_lists_every_chapter_and_only_chapters_that_exist() {
    let src = root().join("docs/src");
    let summary = read(&src.join("SUMMARY.md"));
    let listed: BTreeSet<PathBuf> = link_targets(&summary)
        .iter()
        .map(|target| normalize(Path::new(target)).expect("a chapter under docs/src"))
        .collect();
    let chapters: BTreeSet<PathBuf> = book_files()
        .into_iter()
        .filter_map(|f| f.strip_prefix(&src).ok().map(Path::to_path_buf))
        .filter(|f| f != Path::new("SUMMARY.md"))
        .collect();
    let unlisted: Vec<_> = chapters.difference(&listed).collect();
    let missing: Vec<_> = listed.difference(&chapters).collect();
    assert!(
        unlisted.is_empty(),
        "chapters not in SUMMARY.md: {unlisted:?}"
    );
    assert!(
        missing.is_empty(),
        "SUMMARY.md entries without a file: {missing:?}"
    );
}

/// The files under `dir` (recursively), but dependencies' folders.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if !matches!(
                name.to_str(),
                Some("node_modules" | ".venv" | "__pycache__")
            ) {
                files_under(&path, out);
            }
        } else {
            out.push(path);
        }
    }
}

/// The chapters the code, the scripts, the alerts' runbooks and the default
/// configuration point at (`docs/src/operating.md#troubleshooting`): each exists, and
/// its anchor is one of its headings.
#[test]
fn every_chapter_named_outside_the_book_exists() {
    let root = root();
    let mut files = Vec::new();
    for dir in [
        "src", "tests", "benches", "scripts", "ops", "config", "examples", ".ci",
    ] {
        files_under(&root.join(dir), &mut files);
    }
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue; // not text
        };
        let name = file.strip_prefix(&root).unwrap().display().to_string();
        for (at, _) in text.match_indices("docs/src/") {
            let rest = &text[at..];
            let Some(end) = rest.find(".md").map(|i| i + ".md".len()) else {
                continue;
            };
            let path = &rest[..end];
            if !path["docs/src/".len()..end - ".md".len()]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '/'))
            {
                continue; // a folder named in passing (`docs/src/bench/`), not a chapter
            }
            checked += 1;
            let full = root.join(path);
            if !full.exists() {
                broken.push(format!("{name}: no {path}"));
                continue;
            }
            let Some(anchor) = rest[end..].strip_prefix('#') else {
                continue;
            };
            let anchor: String = anchor
                .chars()
                .take_while(|&c| c.is_alphanumeric() || c == '-' || c == '_')
                .collect();
            let heads = expanded(&full)
                .map(|text| anchors(&text))
                .unwrap_or_default();
            if !heads.contains(&anchor) {
                broken.push(format!("{name}: no heading of {path} makes #{anchor}"));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} chapters named: is the scan broken?"
    );
    assert!(
        broken.is_empty(),
        "chapters named but not there:\n{}",
        broken.join("\n")
    );
}
