//! The batch loader behind `mupdate-worker send --file`: reads one document per line
//! (`{"_id", "body"}` for mUpdate, `{"_id", "changes", "default"}` for mUpsert), sends
//! requests of at most `batch` documents with a bounded number in flight,
//! records every failed document, and tallies a summary. Memory stays bounded whatever
//! the file's size: lines are read as they are sent.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::client::{self, Client};

/// What the loader is told to do.
pub struct Job {
    /// `mUpdate` or `mUpsert`.
    pub action: String,
    pub queue: String,
    pub index: String,
    pub collection: String,
    pub batch: usize,
    pub in_flight: usize,
    pub refresh: Option<String>,
    pub retry_on_conflict: Option<u32>,
    pub timeout: Duration,
}

impl Job {
    fn envelope(&self, documents: Vec<Value>) -> Value {
        client::envelope(
            &self.action,
            &self.index,
            &self.collection,
            documents,
            self.refresh.as_deref(),
            self.retry_on_conflict,
        )
    }
}

/// Counts so far, and at the end.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub lines: u64,
    pub sent: u64,
    pub updated: u64,
    pub failed: u64,
    /// "status reason" (reason of the first failure with that status) → count.
    pub failed_by_status: BTreeMap<u16, (String, u64)>,
    pub interrupted: bool,
    pub elapsed: Duration,
}

impl Summary {
    pub fn done(&self) -> u64 {
        self.updated + self.failed
    }

    pub fn rate(&self) -> f64 {
        self.done() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn fail(&mut self, status: u16, reason: &str) {
        self.failed += 1;
        let entry = self
            .failed_by_status
            .entry(status)
            .or_insert_with(|| (reason.to_owned(), 0));
        entry.1 += 1;
    }

    pub fn to_json(&self) -> Value {
        let by_status: serde_json::Map<String, Value> = self
            .failed_by_status
            .iter()
            .map(|(status, (reason, n))| {
                (status.to_string(), json!({"count": n, "example": reason}))
            })
            .collect();
        json!({"lines": self.lines, "sent": self.sent, "updated": self.updated,
               "failed": self.failed, "failed_by_status": by_status,
               "interrupted": self.interrupted, "elapsed_seconds": self.elapsed.as_secs_f64(),
               "documents_per_second": self.rate()})
    }
}

/// Where progress and failures go.
pub trait Report: Send + Sync {
    /// Called after each batch's reply with the counts so far.
    fn progress(&self, summary: &Summary);
}

struct Shared<W> {
    summary: Summary,
    failures: W,
}

impl<W: Write> Shared<W> {
    fn failure(&mut self, line: Option<u64>, document: &Value, status: u16, reason: &str) {
        self.summary.fail(status, reason);
        let mut record = json!({"document": document, "status": status, "reason": reason});
        if let Some(line) = line {
            record["line"] = line.into();
        }
        let _ = writeln!(self.failures, "{record}");
    }
}

/// Runs the load from `input`, writing failed documents to `failures` as NDJSON
/// (`{"document", "status", "reason"}`, plus `line` for unreadable lines).
pub async fn run<R, W>(
    client: Arc<Client>,
    job: &Job,
    input: R,
    failures: W,
    report: &dyn Report,
    stop: CancellationToken,
) -> Summary
where
    R: BufRead,
    W: Write + Send + 'static,
{
    let started = Instant::now();
    let shared = Arc::new(Mutex::new(Shared {
        summary: Summary::default(),
        failures,
    }));
    let permits = Arc::new(Semaphore::new(job.in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut batch: Vec<Value> = Vec::with_capacity(job.batch);
    let mut lines = input.lines();
    let mut number = 0u64;
    loop {
        if stop.is_cancelled() {
            shared.lock().await.summary.interrupted = true;
            break;
        }
        let line = match lines.next() {
            Some(Ok(line)) => line,
            Some(Err(err)) => {
                number += 1;
                let reason = format!("unreadable line: {err}");
                shared
                    .lock()
                    .await
                    .failure(Some(number), &Value::Null, 400, &reason);
                continue;
            }
            None => break,
        };
        number += 1;
        if line.trim().is_empty() {
            continue;
        }
        shared.lock().await.summary.lines += 1;
        match serde_json::from_str::<Value>(&line) {
            Ok(document) => batch.push(document),
            Err(err) => {
                let reason = format!("invalid JSON: {err}");
                shared
                    .lock()
                    .await
                    .failure(Some(number), &Value::String(line), 400, &reason);
            }
        }
        if batch.len() >= job.batch {
            let documents = std::mem::replace(&mut batch, Vec::with_capacity(job.batch));
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit.expect("never closed"),
                _ = stop.cancelled() => {
                    shared.lock().await.summary.interrupted = true;
                    break;
                }
            };
            shared.lock().await.summary.sent += documents.len() as u64;
            let (client, shared) = (client.clone(), shared.clone());
            let envelope = job.envelope(documents);
            let (queue, timeout) = (job.queue.clone(), job.timeout);
            tasks.spawn(async move {
                send_batch(&client, &queue, envelope, timeout, &shared).await;
                drop(permit);
            });
        }
        while let Some(done) = tasks.try_join_next() {
            let _ = done;
            report.progress(&shared.lock().await.summary);
        }
    }
    if !batch.is_empty() && !shared.lock().await.summary.interrupted {
        shared.lock().await.summary.sent += batch.len() as u64;
        let envelope = job.envelope(batch);
        let (client, shared, queue, timeout) = (
            client.clone(),
            shared.clone(),
            job.queue.clone(),
            job.timeout,
        );
        tasks.spawn(async move { send_batch(&client, &queue, envelope, timeout, &shared).await });
    }
    while tasks.join_next().await.is_some() {
        report.progress(&shared.lock().await.summary);
    }
    let mut shared = shared.lock().await;
    let _ = shared.failures.flush();
    shared.summary.elapsed = started.elapsed();
    shared.summary.clone()
}

async fn send_batch<W: Write>(
    client: &Client,
    queue: &str,
    envelope: Value,
    timeout: Duration,
    shared: &Mutex<Shared<W>>,
) {
    let id = uuid::Uuid::new_v4().to_string();
    let body = serde_json::to_vec(&envelope).unwrap_or_default();
    let documents = envelope["body"]["documents"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let reply = client
        .request(queue, &body, &id, timeout)
        .await
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).map_err(|e| e.to_string()));
    let mut shared = shared.lock().await;
    let reply = match reply {
        Ok(reply) => reply,
        Err(reason) => {
            for document in &documents {
                shared.failure(None, document, 504, &reason);
            }
            return;
        }
    };
    let status = reply["status"].as_u64().unwrap_or(0) as u16;
    let result = &reply["result"];
    if (200..300).contains(&status) && !result.is_null() {
        let updated = result["hits"]
            .as_array()
            .or_else(|| result["successes"].as_array())
            .map_or(0, Vec::len);
        shared.summary.updated += updated as u64;
        let errors = reply["error"]["errors"]
            .as_array()
            .or_else(|| result["errors"].as_array())
            .cloned()
            .unwrap_or_default();
        for error in &errors {
            let status = error["status"].as_u64().unwrap_or(0) as u16;
            let reason = error["reason"].as_str().unwrap_or_default();
            shared.failure(None, &error["document"], status, reason);
        }
    } else {
        let reason = reply["error"]["message"]
            .as_str()
            .unwrap_or("request failed")
            .to_owned();
        for document in &documents {
            shared.failure(None, document, status, &reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_groups_failures_by_status() {
        let mut s = Summary::default();
        s.fail(404, "document not found");
        s.fail(404, "document not found");
        s.fail(400, "invalid JSON");
        s.updated = 7;
        s.elapsed = Duration::from_secs(2);
        assert_eq!(s.done(), 10);
        assert_eq!(s.rate(), 5.0);
        let j = s.to_json();
        assert_eq!(j["failed_by_status"]["404"]["count"], 2);
        assert_eq!(j["failed_by_status"]["400"]["example"], "invalid JSON");
    }
}
