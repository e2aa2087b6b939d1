//! The one way the worker waits on the broker or the engine: every call has a deadline
//! and sees a stop token, so a wait that never ends can't be written. A silent broker, a
//! frozen engine or a connection blocked by an alarm turns into an error after `limit`,
//! and an ended session or shutdown turns it into `Stopped` at once.
//!
//! Review rule: no `.await` on broker or engine I/O outside `bounded` (grep for it).

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Why a bounded call gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Interrupted {
    #[error("{what}: no answer within {limit:?}")]
    TimedOut { what: &'static str, limit: Duration },
    #[error("{what}: given up (stopping)")]
    Stopped { what: &'static str },
}

/// `call`'s output, unless `limit` passes or `stop` is cancelled first.
///
/// A call ready at its first poll (a free permit, an uncontended lock) is answered
/// without a timer or a place among the stop token's waiters: most calls on the reply
/// path are, and those two cost more than the call. `stop` is still looked at first.
pub async fn bounded<F: Future>(
    what: &'static str,
    limit: Duration,
    stop: &CancellationToken,
    call: F,
) -> Result<F::Output, Interrupted> {
    if stop.is_cancelled() {
        return Err(Interrupted::Stopped { what });
    }
    let mut call = std::pin::pin!(call);
    if let std::task::Poll::Ready(done) = futures_util::poll!(call.as_mut()) {
        return Ok(done);
    }
    tokio::select! {
        biased;
        _ = stop.cancelled() => Err(Interrupted::Stopped { what }),
        done = tokio::time::timeout(limit, call) => {
            done.map_err(|_| Interrupted::TimedOut { what, limit })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_that_never_answers_ends_at_its_deadline_or_at_stop() {
        let stop = CancellationToken::new();
        let never = std::future::pending::<()>();
        let limit = Duration::from_secs(3);
        let ended = bounded("test call", limit, &stop, never).await;
        assert_eq!(
            ended,
            Err(Interrupted::TimedOut {
                what: "test call",
                limit
            })
        );
        stop.cancel();
        let ended = bounded("test call", limit, &stop, std::future::pending::<()>()).await;
        assert_eq!(ended, Err(Interrupted::Stopped { what: "test call" }));
        assert_eq!(
            bounded("x", limit, &CancellationToken::new(), async { 7 }).await,
            Ok(7)
        );
        // Stopped first, even when the call would answer at once.
        assert_eq!(
            bounded("ready", limit, &stop, async { 7 }).await,
            Err(Interrupted::Stopped { what: "ready" })
        );
    }
}
