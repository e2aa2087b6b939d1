//! What the worker tells systemd (a `Type=notify` service, packaging/): READY=1 once it
//! consumes, STATUS= lines as it pauses or reconnects, STOPPING=1 when a shutdown starts.
//! Where `NOTIFY_SOCKET` is unset (a terminal, a container, the tests) each call does
//! nothing. A notification that can't be sent is logged, never an error: the service
//! manager waiting for READY=1 times the start out, which says more than the worker could.

use tracing::debug;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        debug!(error = %err, "cannot notify the service manager");
    }
}

/// Consuming `queue`: the start-up is over (systemd's start job completes), and again
/// after each pause or reconnection.
pub fn consuming(queue: &str) {
    let status = format!("consuming {queue}");
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Not consuming, for `why` (the engine unavailable, replies blocked, the broker lost).
pub fn not_consuming(why: &str) {
    send(&[NotifyState::Status(why)]);
}

/// A shutdown has started: systemd shows the unit as deactivating.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}
