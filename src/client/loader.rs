//! The batch loader behind `mupdate-worker send --file`: reads one document per line in
//! its m-form's shape (`{"_id", "body"}` for mUpdate, mReplace, and mCreate and
//! mCreateOrReplace where `_id` may be left out; `{"_id", "changes", "default"}` for
//! mUpsert; for mDelete, an id: `"a"` or `{"_id": "a"}`), sends
//! requests of at most `batch` documents and `max_bytes` bytes with a bounded number in
//! flight, records every failed document, and tallies a summary. Memory stays bounded
//! whatever the file holds: lines are read as they are sent, each with a bounded reader
//! (a line longer than a request may be, a line without an end included, is skipped as
//! it is read, and reported alone with its line number). Documents are passed on as
//! their line wrote them (`RawValue`): numbers of any size or precision stay exact.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::client::{self, Client};

/// What the loader is told to do.
pub struct Job {
    /// An m-form: `mUpdate`, `mUpsert`, `mCreate`, `mCreateOrReplace`, `mReplace` or
    /// `mDelete`.
    pub action: String,
    pub queue: String,
    pub index: String,
    pub collection: String,
    /// Documents a request holds at most (`limits.documents_write_count`).
    pub batch: usize,
    /// Bytes a request's envelope holds at most (`limits.max_message_bytes`).
    pub max_bytes: usize,
    pub in_flight: usize,
    pub refresh: Option<String>,
    pub retry_on_conflict: Option<u32>,
    pub timeout: Duration,
}

/// A request's envelope around its documents: `head`, the documents joined by commas,
/// `tail`.
struct Frame {
    head: String,
    tail: String,
}

impl Frame {
    fn of(job: &Job) -> Frame {
        let envelope = client::envelope(
            &job.action,
            &job.index,
            &job.collection,
            Vec::new(),
            job.refresh.as_deref(),
            job.retry_on_conflict,
        );
        let text = envelope.to_string();
        // Structural: inside a JSON string a quote is escaped, so this can't be in a name.
        let empty = format!("\"{}\":[]", client::listed_key(&job.action));
        let at = text
            .rfind(&empty)
            .map_or(text.len(), |at| at + empty.len() - 1);
        Frame {
            head: text[..at].to_owned(),
            tail: text[at..].to_owned(),
        }
    }

    /// The bytes of an envelope holding documents of `documents` bytes, `count` of them.
    fn size(&self, documents: usize, count: usize) -> usize {
        self.head.len() + self.tail.len() + documents + count.saturating_sub(1)
    }

    fn envelope(&self, documents: &[Document]) -> Vec<u8> {
        let bytes: usize = documents.iter().map(|d| d.sent().get().len()).sum();
        let mut body = Vec::with_capacity(self.size(bytes, documents.len()));
        body.extend_from_slice(self.head.as_bytes());
        for (i, document) in documents.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(document.sent().get().as_bytes());
        }
        body.extend_from_slice(self.tail.as_bytes());
        body
    }
}

/// A document read from the file, as its line wrote it.
struct Document {
    line: u64,
    raw: Box<RawValue>,
    /// What the request carries instead of `raw`: an mDelete line's `_id`, as written.
    id: Option<Box<RawValue>>,
}

impl Document {
    /// What the request carries for this line.
    fn sent(&self) -> &RawValue {
        self.id.as_deref().unwrap_or(&self.raw)
    }
}

/// The id an mDelete line stands for when it is an object: its `_id`, as written
/// (`None`: the line itself is sent, an id or any other value, which the worker answers
/// as Kuzzle does).
fn delete_id(raw: &RawValue) -> Result<Option<Box<RawValue>>, String> {
    if !raw.get().starts_with('{') {
        return Ok(None);
    }
    let mut members: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
    members
        .remove("_id")
        .map(Some)
        .ok_or_else(|| "an id to delete is a JSON string or an object with an _id".into())
}

/// One line of the input, read with at most `limit` bytes held.
#[derive(Debug, PartialEq)]
enum Line {
    Text(String),
    /// Longer than the limit: skipped as it was read; `bytes` long (its end excluded).
    TooLong {
        bytes: u64,
    },
    NotUtf8,
}

/// The next line of `input` (without its `\n`), holding at most `limit` bytes of it in
/// `held` whatever its length: past that, the rest is read and dropped up to its end.
/// `None` at the end of the input.
fn next_line(
    input: &mut impl BufRead,
    limit: usize,
    held: &mut Vec<u8>,
) -> std::io::Result<Option<Line>> {
    held.clear();
    let (mut bytes, mut read_any, mut too_long) = (0u64, false, false);
    loop {
        let available = match input.fill_buf() {
            Ok(available) => available,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if available.is_empty() {
            if !read_any {
                return Ok(None);
            }
            break;
        }
        read_any = true;
        let (chunk, ended) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (&available[..end], true),
            None => (available, false),
        };
        bytes += chunk.len() as u64;
        if !too_long && held.len() + chunk.len() > limit {
            too_long = true;
            held.clear();
            held.shrink_to(limit.min(1 << 20));
        }
        if !too_long {
            // Grown by doubling, never past the limit; past 1 MiB the whole limit is
            // reserved at once where it can be: its untouched pages cost no memory, and a
            // long line is never copied to a buffer twice its size (which, freed, an
            // allocator may keep resident).
            let needed = held.len() + chunk.len();
            if needed > held.capacity() {
                let doubled = held.capacity().saturating_mul(2).max(needed).min(limit);
                if needed <= 1 << 20 || held.try_reserve_exact(limit - held.len()).is_err() {
                    held.reserve_exact(doubled - held.len());
                }
            }
            held.extend_from_slice(chunk);
        }
        let used = chunk.len() + usize::from(ended);
        input.consume(used);
        if ended {
            break;
        }
    }
    if too_long {
        return Ok(Some(Line::TooLong { bytes }));
    }
    Ok(Some(match std::str::from_utf8(held) {
        Ok(text) => Line::Text(text.to_owned()),
        Err(_) => Line::NotUtf8,
    }))
}

/// Counts so far, and at the end.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub lines: u64,
    pub sent: u64,
    /// Documents the action wrote (updated, created, replaced or deleted): `updated` for
    /// every action, as the summary has always named it.
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
    /// Records a failed document: `document` is its JSON text, written as it is.
    fn failure(&mut self, line: Option<u64>, document: &str, status: u16, reason: &str) {
        self.summary.fail(status, reason);
        let reason = Value::from(reason);
        let line = line.map(|n| format!(",\"line\":{n}")).unwrap_or_default();
        let _ = writeln!(
            self.failures,
            "{{\"document\":{document},\"status\":{status},\"reason\":{reason}{line}}}"
        );
    }
}

/// Runs the load from `input`, writing failed documents to `failures` as NDJSON
/// (`{"document", "status", "reason", "line"}`; `line` left out where a reply's error
/// can't be matched to a document sent).
pub async fn run<R, W>(
    client: Arc<Client>,
    job: &Job,
    mut input: R,
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
    let frame = Arc::new(Frame::of(job));
    let deletes = client::listed_key(&job.action) == "ids";
    // The largest document a request can carry alone.
    let max_document = job.max_bytes.saturating_sub(frame.size(0, 1));
    let permits = Arc::new(Semaphore::new(job.in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut batch: Vec<Document> = Vec::with_capacity(job.batch.min(1024));
    let mut batch_bytes = 0;
    let mut held = Vec::new();
    let mut number = 0u64;
    loop {
        if stop.is_cancelled() {
            shared.lock().await.summary.interrupted = true;
            break;
        }
        // Room for the blanks around a document that fits.
        let line = match next_line(&mut input, max_document.saturating_add(1024), &mut held) {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(err) => {
                number += 1;
                let reason = format!("unreadable line: {err}");
                shared
                    .lock()
                    .await
                    .failure(Some(number), "null", 400, &reason);
                break;
            }
        };
        number += 1;
        let text = match line {
            Line::Text(text) => text,
            Line::NotUtf8 => {
                let mut shared = shared.lock().await;
                shared.summary.lines += 1;
                shared.failure(Some(number), "null", 400, "unreadable line: not UTF-8");
                continue;
            }
            Line::TooLong { bytes } => {
                let mut shared = shared.lock().await;
                shared.summary.lines += 1;
                shared.failure(Some(number), "null", 413, &too_large(bytes, job.max_bytes));
                continue;
            }
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        shared.lock().await.summary.lines += 1;
        let raw = match serde_json::from_str::<Box<RawValue>>(text) {
            Ok(raw) => raw,
            Err(err) => {
                let reason = format!("invalid JSON: {err}");
                let document = Value::from(text).to_string();
                shared
                    .lock()
                    .await
                    .failure(Some(number), &document, 400, &reason);
                continue;
            }
        };
        let id = if deletes {
            match delete_id(&raw) {
                Ok(id) => id,
                Err(reason) => {
                    shared
                        .lock()
                        .await
                        .failure(Some(number), raw.get(), 400, &reason);
                    continue;
                }
            }
        } else {
            None
        };
        let size = id.as_deref().unwrap_or(&raw).get().len();
        if size > max_document {
            shared.lock().await.failure(
                Some(number),
                "null",
                413,
                &too_large(size as u64, job.max_bytes),
            );
            continue;
        }
        // The request would grow past its bytes with this one: the batch goes first.
        let full = |batch: &Vec<Document>, extra: usize, count: usize| {
            frame.size(batch_bytes + extra, batch.len() + count) > job.max_bytes
        };
        if !batch.is_empty() && full(&batch, size, 1) {
            let documents = std::mem::take(&mut batch);
            batch_bytes = 0;
            let sent = send(job, &client, &frame, &permits, &shared, &stop, documents).await;
            match sent {
                Some(task) => {
                    tasks.spawn(task);
                }
                None => break,
            }
        }
        batch_bytes += size;
        batch.push(Document {
            line: number,
            raw,
            id,
        });
        if batch.len() >= job.batch {
            let documents = std::mem::take(&mut batch);
            batch_bytes = 0;
            match send(job, &client, &frame, &permits, &shared, &stop, documents).await {
                Some(task) => {
                    tasks.spawn(task);
                }
                None => break,
            }
        }
        while let Some(done) = tasks.try_join_next() {
            let _ = done;
            report.progress(&shared.lock().await.summary);
        }
    }
    if !batch.is_empty() && !shared.lock().await.summary.interrupted {
        shared.lock().await.summary.sent += batch.len() as u64;
        let body = frame.envelope(&batch);
        let (client, shared, queue, timeout) = (
            client.clone(),
            shared.clone(),
            job.queue.clone(),
            job.timeout,
        );
        tasks
            .spawn(async move { send_batch(&client, &queue, body, batch, timeout, &shared).await });
    }
    while tasks.join_next().await.is_some() {
        report.progress(&shared.lock().await.summary);
    }
    let mut shared = shared.lock().await;
    let _ = shared.failures.flush();
    shared.summary.elapsed = started.elapsed();
    shared.summary.clone()
}

fn too_large(bytes: u64, max: usize) -> String {
    format!("the line ({bytes} bytes) is larger than a request may be ({max} bytes)")
}

/// Waits for a slot, then returns the task that sends `documents` (`None`: interrupted).
async fn send<W: Write + Send + 'static>(
    job: &Job,
    client: &Arc<Client>,
    frame: &Frame,
    permits: &Arc<Semaphore>,
    shared: &Arc<Mutex<Shared<W>>>,
    stop: &CancellationToken,
    documents: Vec<Document>,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let permit = tokio::select! {
        permit = permits.clone().acquire_owned() => permit.expect("never closed"),
        _ = stop.cancelled() => {
            shared.lock().await.summary.interrupted = true;
            return None;
        }
    };
    shared.lock().await.summary.sent += documents.len() as u64;
    let body = frame.envelope(&documents);
    let (client, shared) = (client.clone(), shared.clone());
    let (queue, timeout) = (job.queue.clone(), job.timeout);
    Some(async move {
        send_batch(&client, &queue, body, documents, timeout, &shared).await;
        drop(permit);
    })
}

async fn send_batch<W: Write>(
    client: &Client,
    queue: &str,
    body: Vec<u8>,
    documents: Vec<Document>,
    timeout: Duration,
    shared: &Mutex<Shared<W>>,
) {
    let id = uuid::Uuid::new_v4().to_string();
    let reply = client
        .request(queue, &body, &id, timeout)
        .await
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).map_err(|e| e.to_string()));
    drop(body);
    let mut shared = shared.lock().await;
    let reply = match reply {
        Ok(reply) => reply,
        Err(reason) => {
            for document in &documents {
                shared.failure(Some(document.line), document.raw.get(), 504, &reason);
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
            .map(Vec::as_slice)
            .unwrap_or_default();
        // The errors come in the request's order: each is the next document equal to
        // the one it echoes (mDelete's: the next whose id is its `_id`), whose line is
        // then known.
        let mut next = 0;
        for error in errors {
            let status = error["status"].as_u64().unwrap_or(0) as u16;
            let reason = error["reason"].as_str().unwrap_or_default();
            let (echoed, by_id) = match error.get("document") {
                Some(document) => (document, false),
                None => (&error["_id"], true),
            };
            let found = documents[next..].iter().position(|d| {
                let sent = if by_id { d.sent() } else { &*d.raw };
                serde_json::from_str::<Value>(sent.get()).is_ok_and(|v| v == *echoed)
            });
            match found {
                Some(at) => {
                    next += at + 1;
                    let document = &documents[next - 1];
                    // An id is listed as its line wrote it; a document as echoed.
                    let listed = if by_id {
                        document.raw.get().to_owned()
                    } else {
                        echoed.to_string()
                    };
                    shared.failure(Some(document.line), &listed, status, reason);
                }
                None => shared.failure(None, &echoed.to_string(), status, reason),
            }
        }
    } else {
        let reason = reply["error"]["message"]
            .as_str()
            .unwrap_or("request failed")
            .to_owned();
        for document in &documents {
            shared.failure(Some(document.line), document.raw.get(), status, &reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_with_at_most_the_limit_held() {
        let mut long_without_end = b"{\"_id\":\"a\"}\r\n\n".to_vec();
        long_without_end.extend(std::iter::repeat_n(b'x', 100_000));
        let text = [
            &b"ok\n"[..],
            &[b'y'; 50],
            b"\n\xff\xfe\n",
            &long_without_end,
        ]
        .concat();
        let mut input = std::io::BufReader::with_capacity(16, &text[..]);
        let mut held = Vec::new();
        let mut lines = Vec::new();
        while let Some(line) = next_line(&mut input, 20, &mut held).unwrap() {
            assert!(held.capacity() <= 64, "{}", held.capacity());
            lines.push(line);
        }
        assert_eq!(
            lines,
            [
                Line::Text("ok".into()),
                Line::TooLong { bytes: 50 },
                Line::NotUtf8,
                Line::Text("{\"_id\":\"a\"}\r".into()),
                Line::Text(String::new()),
                Line::TooLong { bytes: 100_000 },
            ]
        );
    }

    #[test]
    fn a_limit_too_large_to_reserve_is_grown_to_by_doubling() {
        // Past 1 MiB the limit is reserved at once; this one can't be (no machine has
        // it): the line is still read whole, in a buffer doubled as it grows.
        let text = [&[b'z'; 3 << 20][..], b"\n"].concat();
        let mut input = std::io::BufReader::with_capacity(1 << 16, &text[..]);
        let mut held = Vec::new();
        let line = next_line(&mut input, isize::MAX as usize, &mut held).unwrap();
        assert!(matches!(line, Some(Line::Text(t)) if t.len() == 3 << 20));
        assert!(held.capacity() <= 8 << 20, "{}", held.capacity());
    }

    #[test]
    fn requests_are_framed_exactly_around_their_documents() {
        let job = Job {
            action: "mUpdate".into(),
            queue: "q".into(),
            index: "i\"documents\":[]".into(),
            collection: "c".into(),
            batch: 10,
            max_bytes: 1000,
            in_flight: 1,
            refresh: Some("wait_for".into()),
            retry_on_conflict: None,
            timeout: Duration::from_secs(1),
        };
        let frame = Frame::of(&job);
        let documents: Vec<Document> = [
            r#"{"_id":"a","body":{"n":12345678901234567890123}}"#,
            "[1, 2]",
        ]
        .iter()
        .enumerate()
        .map(|(i, text)| Document {
            line: i as u64,
            raw: serde_json::from_str(text).unwrap(),
            id: None,
        })
        .collect();
        let body = frame.envelope(&documents);
        let bytes: usize = documents.iter().map(|d| d.raw.get().len()).sum();
        assert_eq!(body.len(), frame.size(bytes, 2));
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.contains(
                r#""documents":[{"_id":"a","body":{"n":12345678901234567890123}},[1, 2]]"#
            ),
            "{text}"
        );
        let envelope: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(envelope["index"], "i\"documents\":[]");
        assert_eq!(envelope["refresh"], "wait_for");
        assert_eq!(envelope["body"]["documents"].as_array().unwrap().len(), 2);
        assert_eq!(frame.envelope(&[]).len(), frame.size(0, 0));
    }

    #[test]
    fn an_mdelete_request_lists_each_line_s_id_as_written() {
        let job = Job {
            action: "mDelete".into(),
            queue: "q".into(),
            index: "i".into(),
            collection: "c".into(),
            batch: 10,
            max_bytes: 1000,
            in_flight: 1,
            refresh: None,
            retry_on_conflict: None,
            timeout: Duration::from_secs(1),
        };
        let frame = Frame::of(&job);
        let documents: Vec<Document> = [r#""a""#, r#"{"x":[1],"_id":"b"}"#, "5"]
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let raw: Box<RawValue> = serde_json::from_str(text).unwrap();
                let id = delete_id(&raw).unwrap();
                Document {
                    line: i as u64,
                    raw,
                    id,
                }
            })
            .collect();
        let body = frame.envelope(&documents);
        let bytes: usize = documents.iter().map(|d| d.sent().get().len()).sum();
        assert_eq!(body.len(), frame.size(bytes, 3));
        let envelope: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(envelope["action"], "mDelete");
        assert_eq!(envelope["body"], json!({"ids": ["a", "b", 5]}));
        let raw: Box<RawValue> = serde_json::from_str(r#"{"id":"a"}"#).unwrap();
        assert!(delete_id(&raw).unwrap_err().contains("_id"));
    }

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
