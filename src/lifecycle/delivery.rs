//! One delivery's fate, as a value: the right to settle it (once), and the
//! cancellation token that bounds the life of its work.
//!
//! A `Ticket` is consumed by `settle`, so nothing settles a delivery twice. Its token is
//! a child of the consuming period's and the session's tokens: cancelled when the
//! delivery is handed back (held too long, paused, session lost, shutdown grace over),
//! and then no new engine call starts for it. A ticket dropped unsettled (a panic while
//! handling it) still settles: to the dead-letter exchange when panicking, so a message
//! that crashes its handler can't loop; back to the queue otherwise. A settlement dropped
//! while under way (a timeout or a `select!` around it) completes all the same.
//!
//! Acks of one channel go together (`Acks`): the answered deliveries at the front of
//! the channel's unsettled ones are acked with one `multiple` ack, the others one by
//! one, so a burst of answers (a bulk call's requests) costs the broker one frame.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::broker::port::{self, Acker};
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

/// The unsettled deliveries of one consuming channel, for acking them together.
#[derive(Clone)]
pub struct Acks(Arc<Unsettled>);

struct Unsettled {
    /// By delivery tag, every delivery taken from the channel and not yet settled.
    held: Mutex<BTreeMap<u64, Held<Answer>>>,
    wake: Arc<Notify>,
}

enum Held<A> {
    Working,
    /// To be acked: with what (the acker, and whom to tell whether it was).
    Answered(A),
}

type Answer = (Arc<dyn Acker>, oneshot::Sender<bool>);

impl Drop for Unsettled {
    fn drop(&mut self) {
        // The sender task ends with the last handle.
        self.wake.notify_one();
    }
}

impl Acks {
    /// For a new channel: starts the task that sends its acks.
    pub fn start() -> Self {
        let wake = Arc::new(Notify::new());
        let acks = Acks(Arc::new(Unsettled {
            held: Mutex::new(BTreeMap::new()),
            wake: wake.clone(),
        }));
        let unsettled = Arc::downgrade(&acks.0);
        tokio::spawn(send_acks(unsettled, wake));
        acks
    }

    /// A delivery taken from the channel, in the channel's order: before anything else
    /// is done with it, so that no `multiple` ack can cover it unsettled.
    pub fn taken(&self, tag: u64) {
        self.lock().insert(tag, Held::Working);
    }

    fn answered(&self, tag: u64, acker: Arc<dyn Acker>) -> oneshot::Receiver<bool> {
        let (told, acked) = oneshot::channel();
        self.lock().insert(tag, Held::Answered((acker, told)));
        self.0.wake.notify_one();
        acked
    }

    /// Settled otherwise (requeued, rejected), once the broker was told.
    fn forget(&self, tag: u64) {
        self.lock().remove(&tag);
        self.0.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Held<Answer>>> {
        self.0.held.lock().expect("poisoned")
    }
}

/// Sends the acks of answered deliveries: one `multiple` ack for those at the front,
/// one ack each for the others.
async fn send_acks(unsettled: Weak<Unsettled>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        // Let the rest of a burst of answers arrive.
        tokio::task::yield_now().await;
        let Some(unsettled) = unsettled.upgrade() else {
            return;
        };
        let (front, others) = answered(&mut unsettled.held.lock().expect("poisoned"));
        drop(unsettled);
        if let Some((last, _)) = front.last() {
            let multiple = front.len() > 1;
            let acked = matches!(bounded_ack(last.ack(multiple)).await, Ok(Ok(true)));
            for (_, told) in front {
                let _ = told.send(acked);
            }
        }
        for (acker, told) in others {
            let acked = matches!(bounded_ack(acker.ack(false)).await, Ok(Ok(true)));
            let _ = told.send(acked);
        }
    }
}

/// Takes the answered deliveries out of `held`: those before any still worked on (in
/// tag order), and the others.
fn answered<A>(held: &mut BTreeMap<u64, Held<A>>) -> (Vec<A>, Vec<A>) {
    let mut front = Vec::new();
    while let Some(entry) = held.first_entry() {
        if !matches!(entry.get(), Held::Answered(_)) {
            break;
        }
        if let Held::Answered(answer) = entry.remove() {
            front.push(answer);
        }
    }
    let later: Vec<u64> = held
        .iter()
        .filter(|(_, h)| matches!(h, Held::Answered(_)))
        .map(|(tag, _)| *tag)
        .collect();
    let others = later
        .into_iter()
        .filter_map(|tag| match held.remove(&tag) {
            Some(Held::Answered(answer)) => Some(answer),
            _ => None,
        })
        .collect();
    (front, others)
}

pub struct Ticket {
    tag: u64,
    acker: Arc<dyn Acker>,
    acks: Acks,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
    settled: bool,
}

impl Ticket {
    /// For a delivery `acks` was told of (`Acks::taken`).
    pub fn new(
        tag: u64,
        acker: Arc<dyn Acker>,
        acks: Acks,
        cancel: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Self {
        Ticket {
            tag,
            acker,
            acks,
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

    /// Settles the delivery. Dropped before it is over (a `select!`, a timeout, a task
    /// aborted), the settlement still completes: an ack is already the ack task's to
    /// send, and a nack or reject under way is finished by a task of its own, which then
    /// forgets the delivery (`Settling`). It never stays "worked on" in `Acks`, where it
    /// would hold back the `multiple` acks of every later delivery.
    pub async fn settle(mut self, how: Settlement) -> Result<(), ChannelGone> {
        self.settled = true;
        let settled = if how == Settlement::Ack {
            let acked = self.acks.answered(self.tag, self.acker.clone());
            Ok(acked.await.unwrap_or(false))
        } else {
            Settling::start(self.acker.clone(), how, self.acks.clone(), self.tag)
                .finish()
                .await
        };
        match settled {
            Ok(true) => Ok(()),
            // Ok(false): the acker was poisoned by the channel's end.
            Ok(false) | Err(_) => Err(ChannelGone(how)),
        }
    }
}

/// A nack or reject on its way to the broker: its delivery is forgotten by `Acks` once
/// it was sent (or failed), whether the settlement was awaited to its end or dropped
/// before (then a task of its own finishes it). Neither forgotten before it was sent (a
/// `multiple` ack could cover the delivery, and lose it) nor sent twice (a second nack of
/// one tag closes the channel).
struct Settling {
    sending: Option<port::Call<'static, bool>>,
    acks: Acks,
    tag: u64,
}

impl Settling {
    fn start(acker: Arc<dyn Acker>, how: Settlement, acks: Acks, tag: u64) -> Self {
        let sending: port::Call<'static, bool> = Box::pin(async move { send(&*acker, how).await });
        Settling {
            sending: Some(sending),
            acks,
            tag,
        }
    }

    async fn finish(mut self) -> Result<bool, port::Error> {
        let Some(sending) = self.sending.as_mut() else {
            return Ok(false);
        };
        let sent = sending.await;
        self.sending = None;
        self.acks.forget(self.tag);
        sent
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        let Some(sending) = self.sending.take() else {
            return;
        };
        let (acks, tag) = (self.acks.clone(), self.tag);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = sending.await;
                acks.forget(tag);
            });
        }
    }
}

/// The most an ack, nack or reject may take to be handed to the connection (a broker
/// that reads nothing more, or a connection gone silent, holds it).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

/// `settle`, bounded by `SETTLE`: past it, the channel counts as gone.
async fn bounded_ack(
    settle: impl std::future::Future<Output = Result<bool, port::Error>>,
) -> Result<Result<bool, port::Error>, crate::bounded::Interrupted> {
    let never = tokio_util::sync::CancellationToken::new();
    crate::bounded::bounded("settle a delivery", SETTLE, &never, settle).await
}

async fn send(acker: &dyn Acker, how: Settlement) -> Result<bool, port::Error> {
    let sent = bounded_ack(send_unbounded(acker, how)).await;
    sent.unwrap_or(Ok(false))
}

async fn send_unbounded(acker: &dyn Acker, how: Settlement) -> Result<bool, port::Error> {
    match how {
        Settlement::Ack => acker.ack(false).await,
        Settlement::Requeue => acker.requeue().await,
        Settlement::DeadLetter => acker.reject().await,
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
        let (acker, acks, tag) = (self.acker.clone(), self.acks.clone(), self.tag);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = send(&*acker, how).await;
                acks.forget(tag);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn held(states: &[(u64, Option<&'static str>)]) -> BTreeMap<u64, Held<&'static str>> {
        states
            .iter()
            .map(|(tag, answer)| (*tag, answer.map_or(Held::Working, Held::Answered)))
            .collect()
    }

    /// Its nack is answered once `open` is notified; counts the nacks.
    struct Gated {
        open: Arc<Notify>,
        nacks: std::sync::atomic::AtomicUsize,
    }

    impl Acker for Gated {
        fn ack(&self, _multiple: bool) -> port::Call<'_, bool> {
            Box::pin(async { Ok(true) })
        }
        fn requeue(&self) -> port::Call<'_, bool> {
            self.nacks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async {
                self.open.notified().await;
                Ok(true)
            })
        }
        fn reject(&self) -> port::Call<'_, bool> {
            self.requeue()
        }
    }

    #[tokio::test]
    async fn a_settlement_dropped_under_way_still_ends_and_is_forgotten() {
        let acks = Acks::start();
        acks.taken(1);
        acks.taken(2);
        let acker = Arc::new(Gated {
            open: Arc::new(Notify::new()),
            nacks: Default::default(),
        });
        let ticket = Ticket::new(
            1,
            acker.clone(),
            acks.clone(),
            CancellationToken::new(),
            Arc::new(Metrics::new()),
        );
        // Dropped while its nack is on its way (a timeout, a select, an abort).
        let settling = ticket.settle(Settlement::Requeue);
        let dropped = tokio::time::timeout(Duration::from_millis(50), settling).await;
        assert!(dropped.is_err(), "the nack is not answered yet");
        // Not forgotten before it is sent: a `multiple` ack must not cover it yet.
        assert!(matches!(acks.lock().get(&1), Some(Held::Working)));
        acker.open.notify_one();
        let forgotten = async {
            while acks.lock().contains_key(&1) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let waited = tokio::time::timeout(Duration::from_secs(5), forgotten).await;
        assert!(
            waited.is_ok(),
            "a settlement dropped under way still ends, and its delivery is forgotten"
        );
        assert_eq!(
            acker.nacks.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "sent once"
        );
        assert_eq!(acks.lock().keys().copied().collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn answered_deliveries_at_the_front_go_together_the_others_alone() {
        let mut h = held(&[
            (1, Some("a")),
            (2, Some("b")),
            (3, None),
            (4, Some("d")),
            (5, None),
        ]);
        let (front, others) = answered(&mut h);
        assert_eq!(front, ["a", "b"]);
        assert_eq!(others, ["d"]);
        // What is still worked on stays, and blocks no later ack.
        assert_eq!(h.keys().copied().collect::<Vec<_>>(), [3, 5]);
    }

    #[test]
    fn a_delivery_still_worked_on_is_never_covered_by_a_multiple_ack() {
        let mut h = held(&[(7, None), (8, Some("h")), (9, Some("i"))]);
        let (front, others) = answered(&mut h);
        assert!(
            front.is_empty(),
            "8 and 9 can't be acked up to 9: 7 would go too"
        );
        assert_eq!(others, ["h", "i"]);
        assert!(matches!(h.get(&7), Some(Held::Working)));
    }
}
