//! The run's trace: events with their virtual time since the run began, and a hash of
//! them all (the same seed twice must give the same hash).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Clone)]
pub struct Trace(Arc<Mutex<Inner>>);

struct Inner {
    start: Instant,
    events: Vec<(Duration, String)>,
    /// Whether to print each event as it happens (`--seed N`).
    echo: bool,
}

impl Trace {
    pub fn new(echo: bool) -> Self {
        Trace(Arc::new(Mutex::new(Inner {
            start: Instant::now(),
            events: Vec::new(),
            echo,
        })))
    }

    pub fn event(&self, what: String) {
        let mut inner = self.0.lock().unwrap();
        let at = inner.start.elapsed();
        if inner.echo {
            println!("{:>12.3?} {what}", at);
        }
        inner.events.push((at, what));
    }

    pub fn now(&self) -> Duration {
        self.0.lock().unwrap().start.elapsed()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().events.len()
    }

    /// SipHash with fixed keys (`DefaultHasher::new`): the same in every process.
    pub fn hash(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.0.lock().unwrap().events.hash(&mut hasher);
        hasher.finish()
    }

    /// The last `n` events, one a line.
    pub fn tail(&self, n: usize) -> String {
        let inner = self.0.lock().unwrap();
        let from = inner.events.len().saturating_sub(n);
        inner.events[from..]
            .iter()
            .map(|(at, what)| format!("{:>12.3?} {what}\n", at))
            .collect()
    }
}
