//! The consumer's prefetch, sized by bytes: RabbitMQ bounds a consumer's unacked
//! deliveries by count only (`prefetch_size` is not implemented), so the worker chooses
//! the count from the sizes of the requests it receives, to keep the bytes it holds near
//! `amqp.max_held_bytes`.
//!
//! A consumer's prefetch is fixed when it starts consuming; to change it the worker
//! cancels the consumer, keeps working on what it holds, and consumes again. It starts
//! low (as if every request could be `limits.max_message_bytes`), rises once enough
//! requests have shown they are smaller, and falls when larger ones push the bytes held
//! past the bound. What can still exceed it: a burst of requests larger than any seen
//! before, at most the prefetch in force times `limits.max_message_bytes`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::metrics::gauge::Gauge;

/// Bytes of request bodies received and not yet settled, shown in a gauge.
pub struct Held {
    bytes: AtomicUsize,
    gauge: Gauge,
}

impl Held {
    pub fn new(gauge: Gauge) -> Self {
        Held {
            bytes: AtomicUsize::new(0),
            gauge,
        }
    }

    /// Counts `bytes` as held until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>, bytes: usize) -> Hold {
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        self.gauge.inc_by(gauge_value(bytes));
        Hold {
            held: self.clone(),
            bytes,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

fn gauge_value(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// A delivery's bytes, held until it is dropped (its task ended, however).
pub struct Hold {
    held: Arc<Held>,
    bytes: usize,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.held.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.held.gauge.dec_by(gauge_value(self.bytes));
    }
}

/// How much the prefetch may grow in one change: a few requests in a row that happen
/// to be small among larger ones don't open the whole `amqp.prefetch` to the next
/// large ones.
const MOST_GROWTH: u16 = 4;

/// Chooses the prefetch of each consumer and tells when to choose again.
#[derive(Debug)]
pub struct Sizing {
    /// `amqp.prefetch`: the most, whatever the sizes.
    most: u16,
    /// `amqp.max_held_bytes`; 0: no bound, always `most`.
    budget: usize,
    /// The prefetch of the consumer in force.
    current: u16,
    /// The largest of the latest requests (up to twice the prefetch of them), and how
    /// many those are: enough of them to believe the requests are that small.
    largest: usize,
    seen: usize,
}

impl Sizing {
    pub fn new(most: u16, budget: usize, max_message_bytes: usize) -> Self {
        let mut sizing = Sizing {
            most,
            budget,
            current: most,
            largest: 0,
            seen: 0,
        };
        sizing.current = sizing.count_for(max_message_bytes, budget);
        sizing
    }

    /// How many requests of up to `size` bytes fit in `room` bytes (at least one).
    fn count_for(&self, size: usize, room: usize) -> u16 {
        if self.budget == 0 {
            return self.most;
        }
        let count = room / size.max(1);
        u16::try_from(count).unwrap_or(u16::MAX).clamp(1, self.most)
    }

    /// The prefetch to consume with.
    pub fn prefetch(&self) -> u16 {
        self.current
    }

    /// A delivery of `size` bytes arrived, with `held` bytes now held in all: whether to
    /// consume again with another prefetch (then `resize` says which). Lower at once
    /// when larger requests pushed the bytes held past the bound; higher when twice the
    /// prefetch of requests in a row were small enough for at least twice as many.
    pub fn received(&mut self, size: usize, held: usize) -> bool {
        if self.budget == 0 {
            return false;
        }
        self.observe(size);
        let fits = self.count_for(self.largest, self.budget);
        if held > self.budget && fits < self.current {
            return true;
        }
        if self.seen < 2 * usize::from(self.current) {
            return false;
        }
        // Never higher while the bytes held fill the bound: the next consumer would be
        // given one delivery more (one at least), on top of those still held, at each
        // change, without end while they are held.
        let higher = held < self.budget
            && fits > self.current
            && fits >= self.current.saturating_mul(2).min(self.most);
        if !higher {
            (self.largest, self.seen) = (0, 0);
        }
        higher
    }

    /// A delivery of `size` bytes arrived after the decision to change: its size counts
    /// toward the next prefetch, nothing else.
    pub fn observe(&mut self, size: usize) {
        self.largest = self.largest.max(size);
        self.seen += 1;
    }

    /// The next consumer's prefetch: as many of the latest requests' largest as fit in
    /// the room `held` bytes leave (at least one), and no more than `MOST_GROWTH` times
    /// the prefetch in force.
    pub fn resize(&mut self, held: usize) -> u16 {
        if self.largest > 0 {
            let room = self.budget.saturating_sub(held);
            let grown = self.current.saturating_mul(MOST_GROWTH);
            self.current = self.count_for(self.largest, room).min(grown);
        }
        (self.largest, self.seen) = (0, 0);
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn small_requests_raise_the_prefetch_in_steps_up_to_its_most() {
        let mut s = Sizing::new(256, 64 * MIB, 16 * MIB);
        assert_eq!(
            s.prefetch(),
            4,
            "as if each request were the largest allowed"
        );
        let mut steps = vec![];
        let mut n = 0;
        while s.prefetch() < 256 && n < 10_000 {
            n += 1;
            if s.received(500, 500) {
                steps.push((n, s.resize(500)));
            }
        }
        assert_eq!(
            steps,
            [(8, 16), (40, 64), (168, 256)],
            "after twice each prefetch"
        );
        assert!((0..10_000).all(|_| !s.received(500, 500)), "at its most");
    }

    #[test]
    fn it_never_rises_while_the_bytes_held_fill_the_bound() {
        // Small requests, but stuck ones hold the whole budget: no new consumer (each
        // would take one more), however many arrive.
        let mut s = Sizing::new(16, 4 * MIB, 16 * MIB);
        assert_eq!(s.prefetch(), 1);
        assert!((0..1000).all(|_| !s.received(500, 4 * MIB)));
        // Once they are settled, after twice the prefetch of small ones.
        assert!(!s.received(500, 500));
        assert!(s.received(500, 500), "it rises again");
    }

    #[test]
    fn larger_requests_lower_it_once_over_the_bound() {
        let mut s = at_most(256, 64 * MIB);
        // 2 MiB requests: under the bound nothing changes; past it, 32 of them fit.
        assert!(!s.received(2 * MIB, 60 * MIB));
        assert!(s.received(2 * MIB, 66 * MIB));
        assert_eq!(s.resize(0), 32);
        assert!(!s.received(2 * MIB, 64 * MIB), "at the bound, not past it");
    }

    #[test]
    fn the_room_left_by_what_is_held_sizes_the_next_consumer() {
        let mut s = at_most(256, 64 * MIB);
        assert!(s.received(2 * MIB, 66 * MIB));
        assert_eq!(
            s.resize(40 * MIB),
            12,
            "24 MiB of room: 12 requests of 2 MiB"
        );
        let mut s = at_most(256, 64 * MIB);
        assert!(s.received(2 * MIB, 66 * MIB));
        assert_eq!(s.resize(66 * MIB), 1, "no room: one at a time, never none");
    }

    #[test]
    fn a_large_request_received_after_the_decision_to_rise_counts() {
        let mut s = Sizing::new(256, 64 * MIB, 16 * MIB);
        let rise = (1..=8).map(|_| s.received(MIB, MIB)).last();
        assert_eq!(rise, Some(true));
        // Still in the cancelled consumer's buffer: the largest allowed.
        s.observe(16 * MIB);
        assert_eq!(s.resize(16 * MIB), 3, "48 MiB of room for 16 MiB requests");
    }

    #[test]
    fn a_request_larger_than_the_bound_goes_alone() {
        let mut s = Sizing::new(256, 4 * MIB, 16 * MIB);
        assert_eq!(s.prefetch(), 1);
        assert!(!s.received(10 * MIB, 10 * MIB), "already one at a time");
        assert_eq!(s.resize(10 * MIB), 1);
    }

    #[test]
    fn without_a_bound_the_prefetch_is_the_configured_one() {
        let mut s = Sizing::new(64, 0, 16 * MIB);
        assert_eq!(s.prefetch(), 64);
        assert!(!s.received(16 * MIB, usize::MAX / 2));
    }

    #[test]
    fn no_rise_while_a_large_request_is_among_the_latest() {
        let mut s = Sizing::new(256, 64 * MIB, 16 * MIB);
        (1..=8).for_each(|_| _ = s.received(2 * MIB, 2 * MIB));
        assert_eq!(s.resize(2 * MIB), 16);
        let mut s = at_most(256, 64 * MIB);
        assert!(s.received(2 * MIB, 66 * MIB));
        assert_eq!(s.resize(0), 32);
        // One 2 MiB request in every 50: every window of 64 has one.
        let mixed = (0..640).map(|i| if i % 50 == 0 { 2 * MIB } else { 100 });
        assert!(mixed.into_iter().all(|size| !s.received(size, size)));
        let n = (1..=200).find(|_| s.received(100, 100)).unwrap();
        assert!(n <= 128, "within two windows of small ones: {n}");
        assert_eq!(s.resize(0), 128, "four times, not all at once");
    }

    /// A sizing whose prefetch has risen to `prefetch`.
    fn at_most(prefetch: u16, budget: usize) -> Sizing {
        let s = Sizing::new(prefetch, budget, 100);
        assert_eq!(s.prefetch(), prefetch);
        s
    }

    #[test]
    fn held_bytes_are_counted_until_each_hold_ends() {
        let held = Arc::new(Held::new(Gauge::default()));
        let first = held.hold(10);
        let second = held.hold(5);
        assert_eq!((held.bytes(), held.gauge.get()), (15, 15));
        drop(first);
        assert_eq!((held.bytes(), held.gauge.get()), (5, 5));
        drop(second);
        assert_eq!((held.bytes(), held.gauge.get()), (0, 0));
    }
}
