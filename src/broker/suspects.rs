//! Direct reply-to addresses under suspicion of closing the connection a reply to them
//! is published on.
//!
//! RabbitMQ 3.10 answers a publish to a direct reply-to address it can't decode (such
//! as `amq.rabbitmq.reply-to.g1.ZmFrZQ==`) with a connection error, 541
//! `INTERNAL_ERROR`: the whole connection the replies go on closes, the session is
//! lost, and the request comes back. Published the same way again, it would close the
//! next connection too, for ever (`tests/promises.rs`,
//! `a_crafted_direct_reply_to_address_costs_no_other_request`). So:
//!
//! - an address a reply was being published to when the broker closed the replies'
//!   connection with an error of its own (a code of 500 or more) is **suspect**: the
//!   closing may be its doing, or another reply's;
//! - the next reply to a suspect address goes on a connection opened for it alone
//!   (`Broker::publish_reply_quarantined`): confirmed, the address is cleared; closed
//!   over it, the address is **proven** to close connections, and its request is
//!   dead-lettered (`refused`);
//! - a reply to a proven address is not published: its request is dead-lettered.
//!
//! A crafted address so costs one session, then one connection of its own. At most
//! `MOST` addresses are remembered: past that, suspects are forgotten first (a forgotten
//! one costs a session again, then is suspect again).

use std::collections::HashMap;
use std::sync::Mutex;

/// The most addresses remembered at once (each a short string: under 300 bytes).
const MOST: usize = 4096;

/// What is known of a direct reply-to address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspicion {
    /// A reply to it was under way when the broker closed the connection.
    Suspect,
    /// The broker closed a connection of its own over a reply to it.
    Proven,
}

#[derive(Default)]
pub struct Suspects {
    known: Mutex<HashMap<String, Suspicion>>,
}

impl Suspects {
    pub fn of(&self, address: &str) -> Option<Suspicion> {
        self.lock().get(address).copied()
    }

    /// A reply to `address` was under way when the broker closed the connection.
    pub fn suspect(&self, address: &str) {
        let mut known = self.lock();
        if known.contains_key(address) {
            return;
        }
        make_room(&mut known);
        known.insert(address.to_owned(), Suspicion::Suspect);
    }

    /// A reply to `address` went through on a connection of its own.
    pub fn cleared(&self, address: &str) {
        self.lock().remove(address);
    }

    /// The broker closed a connection of its own over a reply to `address`.
    pub fn proven(&self, address: &str) {
        let mut known = self.lock();
        if !known.contains_key(address) {
            make_room(&mut known);
        }
        known.insert(address.to_owned(), Suspicion::Proven);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Suspicion>> {
        self.known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Below `MOST` entries: a suspect forgotten first, else any.
fn make_room(known: &mut HashMap<String, Suspicion>) {
    if known.len() < MOST {
        return;
    }
    let victim = known
        .iter()
        .find(|(_, s)| **s == Suspicion::Suspect)
        .or_else(|| known.iter().next())
        .map(|(address, _)| address.clone());
    if let Some(victim) = victim {
        known.remove(&victim);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspect_then_cleared_or_proven() {
        let s = Suspects::default();
        assert_eq!(s.of("a"), None);
        s.suspect("a");
        assert_eq!(s.of("a"), Some(Suspicion::Suspect));
        s.cleared("a");
        assert_eq!(s.of("a"), None);
        s.suspect("b");
        s.proven("b");
        s.suspect("b");
        assert_eq!(
            s.of("b"),
            Some(Suspicion::Proven),
            "a suspicion doesn't undo a proof"
        );
    }

    #[test]
    fn at_most_most_addresses_suspects_forgotten_first() {
        let s = Suspects::default();
        s.proven("proven");
        for i in 0..MOST + 10 {
            s.suspect(&format!("suspect-{i}"));
        }
        assert_eq!(s.lock().len(), MOST);
        assert_eq!(s.of("proven"), Some(Suspicion::Proven));
    }
}
