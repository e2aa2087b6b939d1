//! The `mupdate-worker` binary as a child process, for tests that signal it, wait for its
//! exit or read what it wrote.

use std::io::Read;
use std::process::{Child, Command, ExitStatus};
use std::thread::JoinHandle;
use std::time::Duration;

use mupdate_worker::config::Settings;

use super::{TIMEOUT, worker_command};

/// A spawned binary. Its piped stdout and stderr are read on threads until they close.
/// Dropped while still running, it is killed (SIGKILL to its pid); dropped in a failing
/// test, it prints its piped stderr.
pub struct BinaryWorker {
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl BinaryWorker {
    /// The worker on `settings`, as `worker_command` sets it up.
    pub fn start(settings: &Settings) -> Self {
        Self::spawn(&mut worker_command(settings))
    }

    /// Spawns `command`: `worker_command` with more environment or piped stdio, or
    /// another subcommand of the binary.
    pub fn spawn(command: &mut Command) -> Self {
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().map(read_all);
        let stderr = child.stderr.take().map(read_all);
        BinaryWorker {
            child,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `kill <name> <pid>`, `name` being "-TERM", "-INT", "-HUP", "-KILL"...
    pub fn signal(&self, name: &str) {
        let pid = self.pid().to_string();
        let status = Command::new("kill").args([name, &pid]).status().unwrap();
        assert!(status.success(), "kill {name} {pid} failed");
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Its exit status, if it exits within `within`.
    pub async fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its exit status; panics if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.exit_within(timeout).await {
            Some(status) => status,
            None => panic!(
                "the binary (pid {}) still runs after {timeout:?}",
                self.pid()
            ),
        }
    }

    /// SIGTERM, then its exit status within `TIMEOUT`.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("-TERM");
        self.wait_exit(TIMEOUT).await
    }

    /// All it wrote to its piped stdout: blocks until the pipe closes, at its exit.
    pub fn stdout(&mut self) -> String {
        text(self.stdout.take().expect("stdout piped and not read yet"))
    }

    /// All it wrote to its piped stderr: blocks until the pipe closes, at its exit.
    pub fn stderr(&mut self) -> String {
        text(self.stderr.take().expect("stderr piped and not read yet"))
    }
}

impl Drop for BinaryWorker {
    fn drop(&mut self) {
        if self.child.try_wait().is_ok_and(|status| status.is_none()) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking()
            && let Some(stderr) = self.stderr.take()
        {
            eprintln!(
                "stderr of the binary (pid {}):\n{}",
                self.pid(),
                text(stderr)
            );
        }
    }
}

fn read_all(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

fn text(reader: JoinHandle<Vec<u8>>) -> String {
    String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned()
}
