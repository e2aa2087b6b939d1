//! Capped exponential backoff with jitter, the one shape every retry loop of the worker
//! uses (engine calls, broker reconnection).
//!
//! backon's jitter adds a random part of the current delay *on top of* it, so a builder
//! capped at `max` waits up to twice `max`. Here the exponential part is capped at half of
//! `max` and the jitter added to it: every wait lies in `[min, max)`, and workers that
//! failed together still spread their retries.

use std::time::Duration;

use backon::ExponentialBuilder;

/// Waits from `min` doubling, each one less than `max` jitter included, without a limit on
/// tries.
pub fn jittered(min: Duration, max: Duration) -> ExponentialBuilder {
    let half = max / 2;
    ExponentialBuilder::default()
        .with_min_delay(min.min(half))
        .with_max_delay(half)
        .with_jitter()
        .without_max_times()
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder;

    #[test]
    fn no_wait_exceeds_the_cap_jitter_included() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(5000));
        for _ in 0..200 {
            let waits: Vec<Duration> = jittered(min, max).build().take(40).collect();
            assert!(waits.iter().all(|w| *w >= min && *w <= max), "{waits:?}");
            // It still grows to the cap's neighbourhood.
            assert!(waits[30..].iter().all(|w| *w >= max / 2));
        }
    }

    #[test]
    fn a_minimum_above_half_the_cap_still_stays_under_it() {
        let waits: Vec<Duration> = jittered(Duration::from_secs(4), Duration::from_secs(5))
            .build()
            .take(10)
            .collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(5)));
    }
}
