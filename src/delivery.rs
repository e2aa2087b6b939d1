//! One delivery's fate, as a value: the right to settle it (once), and the
//! cancellation token that bounds the life of its work.
//!
//! A `Ticket` is consumed by `settle`, so nothing settles a delivery twice. Its token is
//! a child of the consuming period's and the session's tokens: cancelled when the
//! delivery is handed back (held too long, paused, session lost, shutdown grace over),
//! and then no new engine call starts for it. A ticket dropped unsettled (a panic while
//! handling it) still settles: to the dead-letter exchange when panicking, so a message
//! that crashes its handler can't loop; back to the queue otherwise.

use std::sync::Arc;

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::metrics::Metrics;

/// How a delivery ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Answered: its reply is confirmed.
    Ack,
    /// Handed back to the queue for a later delivery.
    Requeue,
    /// Rejected without requeue: to the queue's dead-letter exchange.
    DeadLetter,
}

/// The broker no longer takes this delivery's settlement: its channel is gone, and the
/// broker redelivers it. A session failure, not a success.
#[derive(Debug, thiserror::Error)]
#[error("could not settle the delivery ({0:?}): its channel is gone")]
pub struct ChannelGone(pub Settlement);

pub struct Ticket {
    acker: Acker,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
    settled: bool,
}

impl Ticket {
    pub fn new(acker: Acker, cancel: CancellationToken, metrics: Arc<Metrics>) -> Self {
        Ticket {
            acker,
            cancel,
            metrics,
            settled: false,
        }
    }

    /// Cancelled once the delivery is handed back: its work must stop.
    pub fn cancel(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Hands the work back: it starts no new engine call from now on.
    pub fn abandon(&self) {
        self.cancel.cancel();
    }

    pub async fn settle(mut self, how: Settlement) -> Result<(), ChannelGone> {
        self.settled = true;
        let settled = send(&self.acker, how).await;
        match settled {
            Ok(true) => Ok(()),
            // Ok(false): the acker was poisoned by the channel's end.
            Ok(false) | Err(_) => Err(ChannelGone(how)),
        }
    }
}

async fn send(acker: &Acker, how: Settlement) -> lapin::Result<bool> {
    match how {
        Settlement::Ack => acker.ack(BasicAckOptions::default()).await,
        Settlement::Requeue => {
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            acker.nack(requeue).await
        }
        Settlement::DeadLetter => acker.reject(BasicRejectOptions { requeue: false }).await,
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.cancel.cancel();
        let how = if std::thread::panicking() {
            self.metrics.panics.inc();
            self.metrics.dead_lettered("panic");
            error!("handling a delivery panicked; rejecting it to the dead-letter exchange");
            Settlement::DeadLetter
        } else {
            Settlement::Requeue
        };
        let acker = self.acker.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = send(&acker, how).await;
            });
        }
    }
}
