//! Coalescing: the documents of concurrent requests go to the engine in one `_bulk`
//! call, and its items are split back so each request gets exactly its own, in order.
//!
//! Batches form naturally: while every bulk slot is busy, requests wait in a bounded
//! channel; when a slot frees, everything waiting (up to the document and byte limits)
//! goes in one call. An optional linger waits for more. Requests with
//! `refresh=wait_for` have a lane of their own: their calls spend most of their time
//! waiting for the engine's refresh, not working, so they don't take the other lane's
//! slots, and the others are never made to wait for a refresh.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::bulk::{self, Item};
use crate::storage::{Storage, StorageError};

/// A refused call: status and reason, for each document it carried.
pub type Refusal = (u16, String);

/// Limits of one coalesced bulk call.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_documents: usize,
    pub max_bytes: usize,
    /// Calls at once without refresh; `wait_for` calls may be as many as `queue`.
    pub concurrent_bulks: usize,
    pub linger: Duration,
    /// Requests that may wait for a slot (bounds memory).
    pub queue: usize,
}

struct Job {
    body: Vec<u8>,
    items: usize,
    done: oneshot::Sender<Result<Vec<Item>, Refusal>>,
}

/// The handle requests submit their bulk items through.
#[derive(Clone)]
pub struct Coalescer {
    plain: mpsc::Sender<Job>,
    wait_for: mpsc::Sender<Job>,
}

impl Coalescer {
    /// Starts the two lanes' batching tasks; they end when every handle is dropped.
    pub fn start(storage: Arc<Storage>, limits: BatchLimits) -> Self {
        let queue = limits.queue.max(1);
        let (plain, plain_jobs) = mpsc::channel(queue);
        let (wait_for, wait_for_jobs) = mpsc::channel(queue);
        tokio::spawn(batch_loop(storage.clone(), limits, false, plain_jobs));
        let wait_limits = BatchLimits {
            concurrent_bulks: queue,
            ..limits
        };
        tokio::spawn(batch_loop(storage, wait_limits, true, wait_for_jobs));
        Coalescer { plain, wait_for }
    }

    /// Sends `items` update actions (`body`, NDJSON) with others', and returns their
    /// items in order.
    pub async fn submit(
        &self,
        body: Vec<u8>,
        items: usize,
        wait_for: bool,
    ) -> Result<Vec<Item>, Refusal> {
        let (done, result) = oneshot::channel();
        let job = Job { body, items, done };
        let lane = if wait_for {
            &self.wait_for
        } else {
            &self.plain
        };
        if lane.send(job).await.is_err() {
            return Err((503, "the worker is shutting down".into()));
        }
        result
            .await
            .unwrap_or_else(|_| Err((500, "bulk call abandoned".into())))
    }
}

async fn batch_loop(
    storage: Arc<Storage>,
    limits: BatchLimits,
    wait_for: bool,
    mut queue: mpsc::Receiver<Job>,
) {
    let slots = Arc::new(Semaphore::new(limits.concurrent_bulks.max(1)));
    let mut carried: Option<Job> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(job) => job,
            None => match queue.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let (mut documents, mut bytes) = (first.items, first.body.len());
        let mut batch = vec![first];
        let fits = |job: &Job, documents: usize, bytes: usize| {
            documents + job.items <= limits.max_documents
                && bytes + job.body.len() <= limits.max_bytes
        };
        let linger = tokio::time::sleep(limits.linger);
        tokio::pin!(linger);
        loop {
            let next = match queue.try_recv() {
                Ok(job) => Some(job),
                Err(_) if limits.linger.is_zero() => None,
                Err(_) => tokio::select! {
                    job = queue.recv() => job,
                    _ = &mut linger => None,
                },
            };
            let Some(job) = next else { break };
            if !fits(&job, documents, bytes) {
                carried = Some(job);
                break;
            }
            documents += job.items;
            bytes += job.body.len();
            batch.push(job);
            if documents >= limits.max_documents {
                break;
            }
        }
        let storage = storage.clone();
        tokio::spawn(async move {
            send(&storage, batch, wait_for).await;
            drop(slot);
        });
    }
}

/// Sends one coalesced call and answers each job. A call the engine refuses is tried
/// again job by job, so that one request's refusal isn't every request's.
async fn send(storage: &Storage, batch: Vec<Job>, wait_for: bool) {
    let counts: Vec<usize> = batch.iter().map(|j| j.items).collect();
    let total: usize = counts.iter().sum();
    let mut body = Vec::with_capacity(batch.iter().map(|j| j.body.len()).sum());
    for job in &batch {
        body.extend_from_slice(&job.body);
    }
    storage.metrics().bulk_documents.observe(total as f64);
    let result = call(storage, &body, total, wait_for).await;
    match result {
        Ok(items) => {
            for (job, items) in batch.into_iter().zip(split(items, &counts)) {
                let _ = job.done.send(Ok(items));
            }
        }
        Err(_) if batch.len() > 1 => {
            for job in batch {
                let result = call(storage, &job.body, job.items, wait_for).await;
                let _ = job.done.send(result);
            }
        }
        Err(refusal) => {
            for job in batch {
                let _ = job.done.send(Err(refusal.clone()));
            }
        }
    }
}

async fn call(
    storage: &Storage,
    body: &[u8],
    items: usize,
    wait_for: bool,
) -> Result<Vec<Item>, Refusal> {
    let bytes = storage.bulk(body, wait_for).await.map_err(|e| match e {
        StorageError::Refused { status, reason } => (status, reason),
        other => (500, other.to_string()),
    })?;
    bulk::parse_response(&bytes, items).map_err(|e| (500, e))
}

/// Splits a call's items into consecutive runs of `counts`: each job's own, in order.
pub fn split(items: Vec<Item>, counts: &[usize]) -> Vec<Vec<Item>> {
    let mut items = items.into_iter();
    counts
        .iter()
        .map(|&n| items.by_ref().take(n).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: usize, status: u16) -> Item {
        let error =
            (status != 200).then(|| serde_json::json!({"type": "x", "reason": id.to_string()}));
        serde_json::from_value(
            serde_json::json!({"status": status, "_version": id, "error": error}),
        )
        .unwrap()
    }

    #[test]
    fn each_job_gets_exactly_its_own_items_in_order() {
        // Three jobs of 2, 3 and 1 items; failures in the first and second.
        let items: Vec<Item> = [(0, 404), (1, 200), (2, 200), (3, 409), (4, 200), (5, 200)]
            .into_iter()
            .map(|(id, status)| item(id, status))
            .collect();
        let parts = split(items, &[2, 3, 1]);
        let versions: Vec<Vec<i64>> = parts
            .iter()
            .map(|p| p.iter().map(|i| i.version.unwrap()).collect())
            .collect();
        assert_eq!(versions, [vec![0, 1], vec![2, 3, 4], vec![5]]);
        assert_eq!(parts[0][0].status, 404);
        assert_eq!(parts[1][1].reason(), "3");
        assert!(parts[2][0].is_success());
    }

    #[test]
    fn an_empty_job_gets_no_items() {
        let parts = split(vec![item(0, 200)], &[0, 1]);
        assert!(parts[0].is_empty());
        assert_eq!(parts[1].len(), 1);
    }
}
