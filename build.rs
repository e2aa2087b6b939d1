//! Names the commit the binary is built from, for `mupdate-worker --version`, the start-up
//! log and the `mupdate_build_info` metric: `MUPDATE_GIT_COMMIT` (12 hex digits, with
//! `-modified` when the sources differ from it), taken from the environment when set (a
//! build without the repository, e.g. a container's, passes it in), else from `git`, else
//! `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The sources the binary is built from: a change to one of them makes the commit
/// `-modified` (and re-runs this script).
const SOURCES: &[&str] = &[
    "src",
    "build.rs",
    "Cargo.toml",
    "Cargo.lock",
    "config",
    "vendor",
];

fn main() {
    println!("cargo:rerun-if-env-changed=MUPDATE_GIT_COMMIT");
    let commit = match std::env::var("MUPDATE_GIT_COMMIT") {
        Ok(given) if !given.is_empty() => given,
        _ => from_git().unwrap_or_else(|| "unknown".to_owned()),
    };
    println!("cargo:rustc-env=MUPDATE_GIT_COMMIT={commit}");
}

fn from_git() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // A new commit moves HEAD, or the branch it names (a loose ref, or packed), and
    // always appends to HEAD's log. Only paths that exist: cargo re-runs the script on
    // every build for one that doesn't.
    let mut watched = vec![
        "HEAD".to_owned(),
        "logs/HEAD".to_owned(),
        "packed-refs".to_owned(),
    ];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for path in watched {
        if let Some(file) = git(&["rev-parse", "--git-path", &path])
            && std::path::Path::new(&file).exists()
        {
            println!("cargo:rerun-if-changed={file}");
        }
    }
    for source in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    // Without optional locks: a `git commit` beside a build never meets index.lock.
    let mut status = vec!["--no-optional-locks", "status", "--porcelain", "--"];
    status.extend(SOURCES);
    let modified = git(&status).is_some_and(|changes| !changes.is_empty());
    Some(if modified {
        format!("{commit}-modified")
    } else {
        commit
    })
}
