//! An unrelated producer's latencies, for tests that check one producer can't slow
//! others down (a refusing reply queue, the engine's `_source` budget).

use std::time::{Duration, Instant};

use mupdate_worker::client::Client;
use serde_json::{Value, json};

use super::{Collection, fresh};

/// The p99 of `latencies` (the largest but one in a hundred).
pub fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort();
    let at = (latencies.len() * 99).div_ceil(100).max(1) - 1;
    latencies[at]
}

/// One-document updates of `col`'s document `d`, one after the other for `during`: their
/// latencies (a request unanswered within 10 s counts 10 s). `check` sees each reply.
pub async fn one_document_latencies(
    client: &Client,
    queue: &str,
    col: &Collection,
    during: Duration,
    check: impl Fn(&Value),
) -> Vec<Duration> {
    let patience = Duration::from_secs(10);
    let end = Instant::now() + during;
    let mut seen = Vec::new();
    let mut n = 0;
    while Instant::now() < end {
        n += 1;
        let id = fresh("plain");
        let mut envelope = col.envelope(json!([{"_id": "d", "body": {"n": n}}]));
        envelope["requestId"] = json!(id);
        let body = serde_json::to_vec(&envelope).unwrap();
        let started = Instant::now();
        match client.request(queue, &body, &id, patience).await {
            Ok(reply) => {
                check(&serde_json::from_slice(&reply).unwrap());
                seen.push(started.elapsed());
            }
            Err(_) => seen.push(patience),
        }
    }
    seen
}
