//! What the worker tells systemd (a `Type=notify` service, packaging/): READY=1 once it
//! consumes, STATUS= lines as it pauses or reconnects, STOPPING=1 with the time the
//! shutdown may take when one starts.
//!
//! Where `NOTIFY_SOCKET` is unset (a terminal, a container, the tests) each call does
//! nothing. Otherwise the notifications go, in order, through a thread of their own: a
//! datagram send blocks while the service manager's queue is full, and the worker's
//! runtime (one thread by default) must never wait on it. A notification that can't be
//! sent is logged (the first failure at warn), never an error: the service manager
//! waiting for READY=1 times the start out, which says more than the worker could.

use std::sync::OnceLock;
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// The notifier thread's queue; `None` where there is no service manager to tell.
fn notifier() -> Option<&'static Sender<Vec<String>>> {
    static NOTIFIER: OnceLock<Option<Sender<Vec<String>>>> = OnceLock::new();
    NOTIFIER
        .get_or_init(|| {
            std::env::var_os("NOTIFY_SOCKET")?;
            let (sender, receiver) = channel::<Vec<String>>();
            let spawned = std::thread::Builder::new()
                .name("sd-notify".into())
                .spawn(move || {
                    let mut warned = false;
                    for lines in receiver {
                        let states: Vec<_> =
                            lines.iter().map(|l| NotifyState::Custom(l)).collect();
                        match sd_notify::notify(&states) {
                            Ok(()) => {}
                            Err(err) if !warned => {
                                warned = true;
                                warn!(error = %err, "cannot notify the service manager (NOTIFY_SOCKET)");
                            }
                            Err(err) => debug!(error = %err, "cannot notify the service manager"),
                        }
                    }
                });
            spawned.ok().map(|_| sender)
        })
        .as_ref()
}

fn send(lines: Vec<String>) {
    if let Some(notifier) = notifier() {
        // The thread only ends with the process: a send can't fail before.
        let _ = notifier.send(lines);
    }
}

/// A STATUS= value on one line (a datagram's lines are its assignments).
fn status(text: &str) -> String {
    format!("STATUS={}", text.replace('\n', " "))
}

/// Consuming `queue`: the start-up is over (systemd's start job completes), and again
/// after each pause or reconnection (harmless: systemd acts on READY=1 while starting).
pub fn consuming(queue: &str) {
    send(vec![
        "READY=1".into(),
        status(&format!("consuming {queue}")),
    ]);
}

/// Consumption paused, for `why` (the engine unavailable, replies blocked).
pub fn paused(why: &str) {
    send(vec![status(&format!("paused: {why}"))]);
}

/// No broker connection: the worker is trying the next node, or again after a pause.
pub fn reconnecting() {
    send(vec![status("no broker connection; reconnecting")]);
}

/// A shutdown has started and ends `within` (the grace and the margin to exit): systemd
/// shows the unit as deactivating and waits at least that long before its SIGKILL,
/// whatever its TimeoutStopSec= (a `worker.shutdown_timeout_ms` raised past it).
pub fn stopping(within: Duration) {
    let extend = within + Duration::from_secs(5);
    send(vec![
        "STOPPING=1".into(),
        format!("EXTEND_TIMEOUT_USEC={}", extend.as_micros()),
        status("stopping"),
    ]);
}
