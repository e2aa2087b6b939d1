//! Reply destinations that keep refusing, remembered so that they cost their own
//! requests, not everyone's.
//!
//! A refused reply is published again after a pause (`amqp.reply_attempts`, about 20 s in
//! all), its request holding a prefetch slot meanwhile: right for a quorum reply queue
//! electing a leader, ruinous for a queue that refuses for good (`x-max-length: 0` with
//! `reject-publish`, a full queue): 13 such requests a second would hold every slot of a
//! prefetch of 256, and starve every other producer. So:
//!
//! - **a budget**: of the replies to a destination not trusted (one that never took a
//!   reply, such as a queue of `x-max-length: 0`), at most `per_destination` (a sixteenth
//!   of the prefetch), and `untrusted` (a quarter) in all, wait to be published again at
//!   once; a refused reply beyond it is dead-lettered (`refused`) after its one attempt;
//! - **a larger one for trust earned**: a destination that confirmed a reply within `TRUST`
//!   (a reply queue in use, whose quorum leader is being elected) has up to `per_trusted`
//!   (`TRUSTED` times `per_destination`, half the prefetch) waiting at once, enough for
//!   the replies of a short refusal; but trust is cheap to earn (a queue of `x-max-length:
//!   1` takes one reply, then refuses), so it is finite too: refused replies hold at most
//!   `total` (half the prefetch) slots in all, trusted or not, and the other half is left
//!   to everyone else;
//! - **a memory**: a destination that refused a reply through all its attempts is known to
//!   refuse until `WINDOW` after its latest refusal (confirms in between don't clear it: a
//!   queue drained now and then is not trusted again by that): a reply to it is tried once
//!   and, refused, dead-lettered at once.
//!
//! A destination is a queue name, or the reply exchange and the user (whose routing keys
//! are the user's own under the rights); direct reply-to is not remembered (it is never
//! refused for want of room). At most `MOST` are remembered at once: past that, a
//! destination is not trusted and a refused reply is not retried.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::pipeline::reply::Destination;

/// How long a destination that refused a reply through all its attempts is known to
/// refuse, after its latest refusal.
pub const WINDOW: Duration = Duration::from_secs(30);

/// How long a confirmed reply makes its destination trusted.
pub const TRUST: Duration = Duration::from_secs(60);

/// The most destinations remembered at once (each under 600 bytes).
const MOST: usize = 4096;

/// How many times an untrusted destination's budget a trusted one has.
const TRUSTED: usize = 8;

pub struct Refusing {
    state: Mutex<State>,
    per_destination: usize,
    per_trusted: usize,
    untrusted: usize,
    total: usize,
}

#[derive(Default)]
struct State {
    destinations: HashMap<String, Entry>,
    /// Replies waiting to be published again, all destinations together.
    retrying: usize,
    /// Of them, those given their turn while their destination was not trusted.
    untrusted: usize,
    /// When idle entries were last swept out (at most once a second: a sweep reads all).
    swept: Option<Instant>,
    /// The latest end of a destination's window as known to refuse.
    refusing_until: Option<Instant>,
}

#[derive(Default)]
struct Entry {
    retrying: usize,
    /// Known to refuse until then.
    refusing_until: Option<Instant>,
    /// Its latest confirmed reply.
    confirmed_at: Option<Instant>,
}

impl Entry {
    fn refusing(&self, now: Instant) -> bool {
        self.refusing_until.is_some_and(|until| now < until)
    }

    fn trusted(&self, now: Instant) -> bool {
        self.confirmed_at
            .is_some_and(|at| now.duration_since(at) < TRUST)
    }

    fn idle(&self, now: Instant) -> bool {
        self.retrying == 0 && !self.refusing(now) && !self.trusted(now)
    }
}

/// A reply's turn to be published again, given back when dropped.
pub struct Retrying<'a> {
    refusing: &'a Refusing,
    key: String,
    trusted: bool,
}

impl Drop for Retrying<'_> {
    fn drop(&mut self) {
        let mut state = self.refusing.state.lock().expect("poisoned");
        state.retrying -= 1;
        if !self.trusted {
            state.untrusted -= 1;
        }
        let now = Instant::now();
        if let Some(entry) = state.destinations.get_mut(&self.key) {
            entry.retrying -= 1;
            if entry.idle(now) {
                state.destinations.remove(&self.key);
            }
        }
    }
}

impl Refusing {
    /// The budget follows the prefetch: a sixteenth of it per untrusted destination, a
    /// quarter for them all, eight sixteenths per trusted one, and half in all (at least
    /// one each), so that refusing destinations leave half the slots or more to others.
    pub fn new(prefetch: u16) -> Self {
        let prefetch = usize::from(prefetch);
        let per_destination = (prefetch / 16).max(1);
        let total = (prefetch / 2).max(1);
        Refusing {
            state: Mutex::default(),
            per_destination,
            per_trusted: (TRUSTED * per_destination).min(total),
            untrusted: (prefetch / 4).max(1),
            total,
        }
    }

    /// What a reply's destination is remembered by; `None` for direct reply-to.
    pub fn key(destination: &Destination, user: Option<&str>) -> Option<String> {
        if destination.is_direct() {
            return None;
        }
        // Written out rather than formatted: one is made per reply.
        Some(match destination {
            Destination::ReplyTo(queue) | Destination::Queue(queue) => {
                let mut key = String::with_capacity(2 + queue.len());
                key.push_str("q:");
                key.push_str(queue);
                key
            }
            Destination::Exchange { exchange, .. } => {
                let user = user.unwrap_or("");
                let mut key = String::with_capacity(2 + 20 + 1 + exchange.len() + 1 + user.len());
                key.push_str("x:");
                let _ = write!(key, "{}", exchange.len());
                key.push(':');
                key.push_str(exchange);
                key.push(':');
                key.push_str(user);
                key
            }
        })
    }

    /// Whether `key` is known to refuse: a refusal of a reply to it is final.
    pub fn known(&self, key: &str) -> bool {
        let state = self.state.lock().expect("poisoned");
        let now = Instant::now();
        // None is known past the latest end of a window: no need to look.
        if state.refusing_until.is_none_or(|until| now >= until) {
            return false;
        }
        state.destinations.get(key).is_some_and(|e| e.refusing(now))
    }

    /// `key` refused a reply through all its attempts, or again while known to refuse:
    /// known to refuse for `WINDOW` from now.
    pub fn refused_for_good(&self, key: &str) {
        let mut state = self.state.lock().expect("poisoned");
        let now = Instant::now();
        if let Some(entry) = state.entry(key, now) {
            entry.refusing_until = Some(now + WINDOW);
            state.refusing_until = Some(now + WINDOW);
        }
    }

    /// A reply to `key` was confirmed: it is trusted for `TRUST`.
    pub fn confirmed(&self, key: &str) {
        let mut state = self.state.lock().expect("poisoned");
        let now = Instant::now();
        // Most are known already: one lookup then.
        if let Some(entry) = state.destinations.get_mut(key) {
            entry.confirmed_at = Some(now);
        } else if let Some(entry) = state.entry(key, now) {
            entry.confirmed_at = Some(now);
        }
    }

    /// A turn to publish a refused reply to `key` again, within its budget (the larger
    /// one when `key` is trusted) and the total; `None` when `key` is known to refuse or
    /// a budget is spent.
    pub fn retry(&self, key: &str) -> Option<Retrying<'_>> {
        let mut state = self.state.lock().expect("poisoned");
        let now = Instant::now();
        let spent = state.retrying >= self.total;
        let untrusted_spent = state.untrusted >= self.untrusted;
        let entry = state.entry(key, now)?;
        let trusted = entry.trusted(now);
        let within = !spent
            && if trusted {
                entry.retrying < self.per_trusted
            } else {
                !untrusted_spent && entry.retrying < self.per_destination
            };
        if entry.refusing(now) || !within {
            if entry.idle(now) {
                state.destinations.remove(key);
            }
            return None;
        }
        entry.retrying += 1;
        state.retrying += 1;
        if !trusted {
            state.untrusted += 1;
        }
        Some(Retrying {
            refusing: self,
            key: key.to_owned(),
            trusted,
        })
    }
}

impl State {
    /// The entry of `key`, made if need be; `None` when `MOST` are remembered and none
    /// can be forgotten.
    fn entry(&mut self, key: &str, now: Instant) -> Option<&mut Entry> {
        if !self.destinations.contains_key(key) {
            let due = self
                .swept
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1));
            if self.destinations.len() >= MOST && due {
                self.destinations.retain(|_, entry| !entry.idle(now));
                self.swept = Some(now);
            }
            if self.destinations.len() >= MOST {
                return None;
            }
            self.destinations.insert(key.to_owned(), Entry::default());
        }
        self.destinations.get_mut(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_the_budget_per_destination_and_in_all() {
        // 4 per untrusted destination, 16 for them all, 32 per trusted one, 32 in all.
        let refusing = Refusing::new(64);
        let a: Vec<_> = (0..4).map(|_| refusing.retry("a").unwrap()).collect();
        assert!(refusing.retry("a").is_none(), "a's budget spent");
        let others: Vec<_> = (0..12)
            .map(|i| refusing.retry(&format!("d{}", i % 3)).unwrap())
            .collect();
        assert!(
            refusing.retry("e").is_none(),
            "the untrusted ones' budget spent"
        );
        refusing.confirmed("trusted");
        let trusted: Vec<_> = (0..16)
            .map(|_| refusing.retry("trusted").unwrap())
            .collect();
        assert!(refusing.retry("trusted").is_none(), "the total spent");
        drop(trusted);
        drop(a);
        assert!(refusing.retry("a").is_some(), "given back when dropped");
        drop(others);
        assert_eq!(
            refusing.state.lock().unwrap().destinations.len(),
            1,
            "the trusted one"
        );
        let state = refusing.state.lock().unwrap();
        assert_eq!((state.retrying, state.untrusted), (0, 0));
    }

    #[test]
    fn a_trusted_destination_has_a_larger_but_finite_budget() {
        let refusing = Refusing::new(64); // 4 per untrusted destination, 32 per trusted
        refusing.confirmed("t");
        refusing.confirmed("u");
        let t: Vec<_> = (0..32).map(|_| refusing.retry("t").unwrap()).collect();
        assert!(refusing.retry("t").is_none(), "t's budget spent");
        assert!(
            refusing.retry("u").is_none(),
            "trusted retries count in the total"
        );
        assert!(
            refusing.retry("v").is_none(),
            "and leave nothing to untrusted ones"
        );
        drop(t);
        let u: Vec<_> = (0..32).map(|_| refusing.retry("u").unwrap()).collect();
        drop(u);
        // A small prefetch: still more than an untrusted destination's, within the total.
        let small = Refusing::new(20); // 1 per untrusted destination, 8 per trusted, 10 in all
        small.confirmed("t");
        let t: Vec<_> = (0..8).map(|_| small.retry("t").unwrap()).collect();
        assert!(small.retry("t").is_none(), "t's budget spent");
        let u = small.retry("u");
        assert!(u.is_some() && small.retry("u").is_none(), "u's one turn");
        drop((t, u));
        assert_eq!(small.state.lock().unwrap().retrying, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_refusing_for_good_is_known_until_quiet() {
        let refusing = Refusing::new(256);
        refusing.refused_for_good("full");
        assert!(refusing.known("full"));
        assert!(refusing.retry("full").is_none(), "no retries while known");
        assert!(!refusing.known("other"));
        tokio::time::advance(WINDOW - Duration::from_secs(1)).await;
        refusing.refused_for_good("full");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(refusing.known("full"), "each refusal extends it");
        refusing.confirmed("full");
        assert!(
            refusing.known("full"),
            "a confirm now and then doesn't clear it"
        );
        assert!(refusing.retry("full").is_none(), "nor make it trusted");
        tokio::time::advance(WINDOW).await;
        assert!(!refusing.known("full"), "forgotten once quiet");
        assert!(refusing.retry("full").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn trust_lasts_a_while_after_a_confirm() {
        let refusing = Refusing::new(16); // 1 per destination, 8 per trusted one
        refusing.confirmed("q");
        let held: Vec<_> = (0..8).map(|_| refusing.retry("q").unwrap()).collect();
        drop(held);
        tokio::time::advance(TRUST).await;
        let one = refusing.retry("q");
        assert!(
            one.is_some() && refusing.retry("q").is_none(),
            "budgeted again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded() {
        let refusing = Refusing::new(256);
        for i in 0..2 * MOST {
            refusing.confirmed(&format!("q{i}"));
        }
        assert_eq!(refusing.state.lock().unwrap().destinations.len(), MOST);
        assert!(
            refusing.retry("new").is_none(),
            "full: not trusted, not retried"
        );
        // Once the trust of the first ones is over, newcomers take their place.
        tokio::time::advance(TRUST).await;
        refusing.confirmed("new");
        assert!(refusing.retry("new").is_some());
        assert_eq!(refusing.state.lock().unwrap().destinations.len(), 1);
    }

    #[test]
    fn an_exchange_destination_is_its_users() {
        let exchange = |key: &str| Destination::Exchange {
            exchange: "replies".into(),
            routing_key: key.into(),
        };
        let alice = Refusing::key(&exchange("alice.r1"), Some("alice"));
        let direct = Destination::ReplyTo("amq.rabbitmq.reply-to.g1h2".into());
        assert_eq!(Refusing::key(&direct, Some("alice")), None);
        assert_eq!(alice, Refusing::key(&exchange("alice.r2"), Some("alice")));
        assert_ne!(alice, Refusing::key(&exchange("bob.r1"), Some("bob")));
        let queue = Refusing::key(&Destination::ReplyTo("replies".into()), Some("alice"));
        assert_ne!(alice, queue);
    }
}
