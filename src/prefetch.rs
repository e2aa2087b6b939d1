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
use tokio::sync::Notify;

/// Bytes of request bodies received and not yet settled, shown in a gauge.
pub struct Held {
    bytes: AtomicUsize,
    released: Notify,
    gauge: Gauge,
}

impl Held {
    pub fn new(gauge: Gauge) -> Self {
        Held {
            bytes: AtomicUsize::new(0),
            released: Notify::new(),
            gauge,
        }
    }

    /// Counts `bytes` as held until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>, bytes: usize) -> Hold {
        let now = self.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.gauge.set(i64::try_from(now).unwrap_or(i64::MAX));
        Hold {
            held: self.clone(),
            bytes,
        }
    }

    fn release(&self, bytes: usize) {
        let now = self.bytes.fetch_sub(bytes, Ordering::AcqRel) - bytes;
        self.gauge.set(i64::try_from(now).unwrap_or(i64::MAX));
        self.released.notify_waiters();
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Returns once no more than `most` bytes are held.
    pub async fn until_at_most(&self, most: usize) {
        loop {
            let released = self.released.notified();
            if self.bytes() <= most {
                return;
            }
            released.await;
        }
    }
}

/// A delivery's bytes, held until it is dropped (its task ended, however).
pub struct Hold {
    held: Arc<Held>,
    bytes: usize,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.held.release(self.bytes);
    }
}

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
        sizing.current = sizing.count_for(max_message_bytes);
        sizing
    }

    /// The prefetch for requests of up to `size` bytes.
    fn count_for(&self, size: usize) -> u16 {
        if self.budget == 0 {
            return self.most;
        }
        let count = self.budget / size.max(1);
        u16::try_from(count).unwrap_or(u16::MAX).clamp(1, self.most)
    }

    /// The prefetch to consume with.
    pub fn prefetch(&self) -> u16 {
        self.current
    }

    /// A delivery of `size` bytes arrived, with `held` bytes now held in all: whether to
    /// consume again with another prefetch (then `resize` says which). Lower at once
    /// when larger requests pushed the bytes held past the bound; higher (at least
    /// doubled, or the most) when twice the prefetch of requests in a row were small
    /// enough.
    pub fn received(&mut self, size: usize, held: usize) -> bool {
        if self.budget == 0 {
            return false;
        }
        self.largest = self.largest.max(size);
        self.seen += 1;
        let fits = self.count_for(self.largest);
        if held > self.budget && fits < self.current {
            return true;
        }
        if self.seen < 2 * usize::from(self.current) {
            return false;
        }
        let higher = fits > self.current && fits >= self.current.saturating_mul(2).min(self.most);
        if !higher {
            (self.largest, self.seen) = (0, 0);
        }
        higher
    }

    /// The next consumer's prefetch, from the latest requests; and the bytes that may be
    /// held when it starts, so that its deliveries stay within the bound.
    pub fn resize(&mut self) -> (u16, usize) {
        self.current = self.count_for(self.largest);
        let incoming = usize::from(self.current) * self.largest;
        let start_below = self.budget.saturating_sub(incoming);
        (self.largest, self.seen) = (0, 0);
        (self.current, start_below)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn small_requests_raise_the_prefetch_to_its_most_once_seen() {
        let mut s = Sizing::new(256, 64 * MIB, 16 * MIB);
        assert_eq!(
            s.prefetch(),
            4,
            "as if each request were the largest allowed"
        );
        let resize_at = (1..=8).find(|_| s.received(500, 500));
        assert_eq!(resize_at, Some(8), "after twice the prefetch");
        assert_eq!(s.resize(), (256, 64 * MIB - 256 * 500));
        assert!((0..10_000).all(|_| !s.received(500, 500)), "at its most");
    }

    #[test]
    fn larger_requests_lower_it_once_over_the_bound() {
        let mut s = Sizing::new(256, 64 * MIB, 16 * MIB);
        (1..=8).for_each(|_| _ = s.received(1000, 1000));
        s.resize();
        assert_eq!(s.prefetch(), 256);
        // 2 MiB requests: under the bound nothing changes; past it, 32 of them fit.
        assert!(!s.received(2 * MIB, 60 * MIB));
        assert!(s.received(2 * MIB, 66 * MIB));
        let (prefetch, start_below) = s.resize();
        assert_eq!(prefetch, 32);
        assert_eq!(
            start_below, 0,
            "wait until none is held: 32 × 2 MiB is the bound"
        );
    }

    #[test]
    fn a_request_larger_than_the_bound_goes_alone() {
        let mut s = Sizing::new(256, 4 * MIB, 16 * MIB);
        assert_eq!(s.prefetch(), 1);
        assert!(!s.received(10 * MIB, 10 * MIB), "already one at a time");
        assert_eq!(s.resize(), (1, 0));
    }

    #[test]
    fn without_a_bound_the_prefetch_is_the_configured_one() {
        let mut s = Sizing::new(64, 0, 16 * MIB);
        assert_eq!(s.prefetch(), 64);
        assert!(!s.received(16 * MIB, usize::MAX / 2));
    }

    #[test]
    fn it_rises_in_steps_no_smaller_than_doubling() {
        // 1 MiB requests under a 64 MiB bound: 64 fit, from 4.
        let mut s = Sizing::new(256, 64 * MIB, 16 * MIB);
        let n = (1..=100).find(|_| s.received(MIB, MIB)).unwrap();
        assert_eq!(n, 8);
        assert_eq!(s.resize().0, 64);
        // Then requests of 600 KiB: 109 fit, not twice 64: no re-consume for that.
        assert!((0..1000).all(|_| !s.received(600 << 10, MIB)));
    }

    #[test]
    fn it_rises_again_once_the_large_requests_are_past() {
        let mut s = Sizing::new(256, 64 * MIB, 16 * MIB);
        (1..=8).for_each(|_| _ = s.received(2 * MIB, 2 * MIB));
        assert_eq!(s.resize().0, 32);
        // Large and small mixed: no rise while a large one is among the latest 64.
        let mixed = (0..640).map(|i| if i % 50 == 0 { 2 * MIB } else { 100 });
        assert!(mixed.into_iter().all(|size| !s.received(size, size)));
        let n = (1..=200).find(|_| s.received(100, 100)).unwrap();
        assert!(n <= 128, "within two windows of small ones: {n}");
        assert_eq!(s.resize().0, 256);
    }

    #[tokio::test]
    async fn held_bytes_wake_the_one_waiting_for_room() {
        let held = Arc::new(Held::new(Gauge::default()));
        let first = held.hold(10);
        let _second = held.hold(5);
        let waiting = tokio::spawn({
            let held = held.clone();
            async move { held.until_at_most(5).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(held.bytes(), 5);
    }
}
