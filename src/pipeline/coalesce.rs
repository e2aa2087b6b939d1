//! Coalescing: the documents of concurrent requests go to the engine in one `_bulk`
//! call, and its items are split back so each request gets exactly its own, in order.
//!
//! Batches form naturally: while every bulk slot is busy, requests wait in a bounded
//! channel; when a slot frees, everything waiting (up to the document and byte limits)
//! goes in one call. An optional linger waits for more. Requests with
//! `refresh=wait_for` have a lane of their own: their calls spend most of their time
//! waiting for the engine's refresh, not working, so they don't take the other lane's
//! slots, and the others are never made to wait for a refresh.
//!
//! The stored documents an update names are the one part of a call whose cost is not
//! the requests' own bytes: the engine rebuilds each one whole (merging the change in)
//! and holds the new document until the call ends, and builds every asked `_source`
//! into its answer. A 5 KiB request can name a 1 MiB document 200 times (a 1 GiB
//! engine died of 32 such requests in one call, asking their `_source`s), and 20
//! requests of 10 updates of stored 8 MiB documents, with `source: false`, took one
//! down when coalesced. So each lane has a `SourceGate`, half the budget of stored
//! bytes the engine is made to rebuild or return at once (a `wait_for` call holds its
//! share through the refresh: the plain lane's calls don't wait for it); every update
//! item is counted as the largest `_source` seen lately (halving every `HALF_LIFE` once
//! no larger one is seen, and at least `SOURCE_FLOOR`, 128 KiB); a batch stops taking
//! requests at its share, and a call waits for the budget before it takes a call slot.
//! The sizes are learned because they can't be known before the engine answers: from
//! the `_source`s requests ask, and from the few each call asks for the gate
//! (`sample_sources`) among the items that ask none. The floor makes a bound hold from
//! the first call (budget / 128 KiB items at once, 512 a lane by default, times the
//! largest document); before any size is known, `COLD_SOURCES` a lane.
//!
//! A call the engine can't serve is retried here, and before every attempt the requests
//! whose work was handed back (their cancellation token cancelled) leave the batch and
//! are answered `Abandoned`: abandoned work never starts a new engine call. A request
//! always gets an answer from here, so its caller knows when nothing of it is left at
//! the engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::pipeline::bulk::{self, Item};
use crate::storage::{Abandoned, Storage, StorageError};

/// Why a request's items did not come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkError {
    /// The engine refused the call: this status and reason for each of its documents.
    Refused(u16, String),
    /// The request was handed back before its items were sent.
    Abandoned,
}

impl From<Abandoned> for BulkError {
    fn from(_: Abandoned) -> Self {
        BulkError::Abandoned
    }
}

/// Limits of one coalesced bulk call.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_documents: usize,
    pub max_bytes: usize,
    /// Calls at once without refresh; `wait_for` calls may be as many as `queue`.
    pub concurrent_bulks: usize,
    /// With calls under way, another starts only for at least this many documents;
    /// a call starts at once when none is under way. 0: whenever a slot is free.
    pub spread_documents: usize,
    pub linger: Duration,
    /// Requests that may wait for a slot (bounds memory).
    pub queue: usize,
    /// `_source` bytes asked of the engine at once, both lanes together (`SourceGate`).
    pub max_source_bytes: usize,
}

/// The stored bytes the engine is made to rebuild (and return, where a `_source` is
/// asked) at once by the calls of one lane. An update item weighs the largest
/// `_source` seen lately (`Largest`), and never less than `SOURCE_FLOOR`: at most
/// budget / `SOURCE_FLOOR` items are at the engine at once, and fewer while large
/// documents are seen. A call weighing more than the whole budget (one request's own,
/// never split) takes all of it, so it goes alone.
///
/// Each lane has a gate of its own, half the budget each: `wait_for` calls hold theirs
/// through the engine's refresh, and must not make the other lane's calls wait.
pub struct SourceGate {
    /// Units of `UNIT` bytes.
    permits: Arc<Semaphore>,
    units: u32,
    largest: Arc<Largest>,
}

const UNIT: usize = 1024;
/// What an update item weighs at least, whatever its document's size.
pub const SOURCE_FLOOR: usize = 128 * 1024;
/// How fast a large `_source` stops weighing on every call once no larger one is seen:
/// its weight halves every `HALF_LIFE`.
pub const HALF_LIFE: Duration = Duration::from_secs(1);
/// With no `_source` answered for this long (and from the start), sizes are unknown:
/// the gate is cold.
pub const COLD_AFTER: Duration = Duration::from_secs(10);
/// The update items a cold lane sends at once before an answer says how large their
/// documents are (each weighs its lane's budget / `COLD_SOURCES`): a worker started on
/// a backlog of requests naming large documents would otherwise send budget /
/// `SOURCE_FLOOR` of them (512 a lane) in its first calls.
pub const COLD_SOURCES: usize = 32;

/// The largest `_source` seen lately: raised at once by a larger one, halving every
/// `HALF_LIFE` after (down to `SOURCE_FLOOR`). One large document answered once
/// doesn't weigh on every later call for the worker's life; large ones asked again
/// and again keep it up, each answer raising it again. It also knows when a `_source`
/// was last answered at all: before the first, and `COLD_AFTER` after the last, nothing
/// says how large the next ones are (`cold`).
pub struct Largest(std::sync::Mutex<LargestState>);

struct LargestState {
    bytes: usize,
    seen: Instant,
    answered: Option<Instant>,
}

impl Largest {
    fn new() -> Self {
        Largest(std::sync::Mutex::new(LargestState {
            bytes: 0,
            seen: Instant::now(),
            answered: None,
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LargestState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What an asked `_source` weighs at `now`.
    pub fn at(&self, now: Instant) -> usize {
        let state = self.state();
        decayed(state.bytes, now.saturating_duration_since(state.seen)).max(SOURCE_FLOOR)
    }

    /// Whether no `_source` was answered within `COLD_AFTER` of `now`.
    pub fn cold(&self, now: Instant) -> bool {
        self.state()
            .answered
            .is_none_or(|at| now.saturating_duration_since(at) > COLD_AFTER)
    }

    /// Learns the largest `_source` of an answer at `now`, `bytes` (0: it carried none).
    pub fn seen(&self, bytes: usize, now: Instant) {
        let mut state = self.state();
        if bytes == 0 {
            return;
        }
        state.answered = Some(now);
        if bytes >= decayed(state.bytes, now.saturating_duration_since(state.seen)) {
            state.bytes = bytes;
            state.seen = now;
        }
    }
}

/// `bytes` halved once for every `HALF_LIFE` in `since`.
fn decayed(bytes: usize, since: Duration) -> usize {
    let halvings = since.as_nanos() / HALF_LIFE.as_nanos();
    bytes
        .checked_shr(u32::try_from(halvings).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

impl SourceGate {
    pub fn new(budget: usize) -> Self {
        Self::with(budget, Arc::new(Largest::new()))
    }

    /// A gate of its own budget that learns sizes with this one.
    pub fn beside(&self, budget: usize) -> Self {
        Self::with(budget, self.largest.clone())
    }

    fn with(budget: usize, largest: Arc<Largest>) -> Self {
        // At least one `_source` at a time.
        let budget = budget.max(SOURCE_FLOOR);
        let units = u32::try_from(budget / UNIT).unwrap_or(u32::MAX >> 4);
        SourceGate {
            permits: Arc::new(Semaphore::new(units as usize)),
            units,
            largest,
        }
    }

    fn each(&self) -> usize {
        let now = Instant::now();
        let each = self.largest.at(now);
        if self.largest.cold(now) {
            each.max(self.units as usize * UNIT / COLD_SOURCES)
        } else {
            each
        }
    }

    /// Whether no size is known now (`COLD_AFTER`).
    pub fn cold(&self) -> bool {
        self.largest.cold(Instant::now())
    }

    /// The update items one batch may hold (a first request's own may be more).
    pub fn per_call(&self) -> usize {
        (self.units as usize * UNIT / self.each()).max(1)
    }

    /// The units a call of `items` update items holds while the engine answers.
    fn weight(&self, items: usize) -> u32 {
        let bytes = items.saturating_mul(self.each());
        u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .min(self.units)
    }

    /// Waits until a call of `items` update items may go; held until the permit is
    /// dropped.
    pub async fn enter(&self, items: usize) -> Option<OwnedSemaphorePermit> {
        if items == 0 {
            return None;
        }
        // The semaphore is never closed.
        self.permits
            .clone()
            .acquire_many_owned(self.weight(items))
            .await
            .ok()
    }

    /// Learns from an answer's `_source`s.
    pub fn observe(&self, items: &[Item]) {
        let largest = items
            .iter()
            .filter_map(|i| i.get.as_ref()?.source.as_ref())
            .map(|s| s.get().len())
            .max()
            .unwrap_or(0);
        self.largest.seen(largest, Instant::now());
    }
}

struct Job {
    body: Vec<u8>,
    items: usize,
    /// Its items that make the engine rebuild a stored document (updates): what the
    /// source gate weighs. Whole documents and deletes cost the engine their own bytes,
    /// which the call's byte limit bounds.
    rebuilt: usize,
    cancel: CancellationToken,
    done: oneshot::Sender<Result<Vec<Item>, BulkError>>,
}

impl Job {
    fn answer(self, result: Result<Vec<Item>, BulkError>) {
        let _ = self.done.send(result);
    }
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
        // Half the budget each: together, never more than it.
        let half = limits.max_source_bytes / 2;
        let gate = SourceGate::new(half);
        let wait_for_gate = Arc::new(gate.beside(half));
        let (plain, plain_jobs) = mpsc::channel(queue);
        let (wait_for, wait_for_jobs) = mpsc::channel(queue);
        let lane = Lane {
            storage,
            gate: Arc::new(gate),
            wait_for: false,
        };
        tokio::spawn(batch_loop(lane.clone(), limits, plain_jobs));
        let wait_limits = BatchLimits {
            concurrent_bulks: queue,
            spread_documents: 0,
            ..limits
        };
        let lane = Lane {
            wait_for: true,
            gate: wait_for_gate,
            ..lane
        };
        tokio::spawn(batch_loop(lane, wait_limits, wait_for_jobs));
        Coalescer { plain, wait_for }
    }

    /// Sends `items` bulk items (`body`, NDJSON; `rebuilt` of them updates) with
    /// others', and returns their items in order. Once `cancel` is cancelled no new call
    /// carries them; the answer still waits for a call already under way.
    pub async fn submit(
        &self,
        body: Vec<u8>,
        items: usize,
        rebuilt: usize,
        wait_for: bool,
        cancel: &CancellationToken,
    ) -> Result<Vec<Item>, BulkError> {
        let (done, result) = oneshot::channel();
        let job = Job {
            body,
            items,
            rebuilt,
            cancel: cancel.clone(),
            done,
        };
        let lane = if wait_for {
            &self.wait_for
        } else {
            &self.plain
        };
        // `biased`, here and on every wait of a request's path: one seed of the
        // simulation is one run (tests/simulation); handed-back work never goes in.
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(BulkError::Abandoned),
            sent = lane.send(job) => if sent.is_err() {
                return Err(BulkError::Refused(503, "the worker is shutting down".into()));
            },
        }
        result
            .await
            .unwrap_or_else(|_| Err(BulkError::Refused(500, "bulk call abandoned".into())))
    }
}

/// The next job of the lane that still wants a call; the others are answered.
async fn next_live(queue: &mut mpsc::Receiver<Job>) -> Option<Job> {
    loop {
        let job = queue.recv().await?;
        if job.cancel.is_cancelled() {
            job.answer(Err(BulkError::Abandoned));
        } else {
            return Some(job);
        }
    }
}

/// What a lane's calls go through.
#[derive(Clone)]
struct Lane {
    storage: Arc<Storage>,
    gate: Arc<SourceGate>,
    wait_for: bool,
}

async fn batch_loop(lane: Lane, limits: BatchLimits, mut queue: mpsc::Receiver<Job>) {
    let calls = Arc::new(Calls::default());
    let most = limits.concurrent_bulks.max(1);
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match next_live(&mut queue).await {
                Some(job) => job,
                None => return,
            },
        };
        let mut batch = Batch::new(first);
        let linger = tokio::time::sleep(limits.linger);
        tokio::pin!(linger);
        // Take what is waiting; then, while calls are under way, wait for one to end
        // unless the batch is worth a call of its own beside them.
        loop {
            let next = match queue.try_recv() {
                Ok(job) => Some(job),
                Err(_) if limits.linger.is_zero() || linger.is_elapsed() => None,
                Err(_) => tokio::select! {
                    biased;
                    job = queue.recv() => job,
                    _ = &mut linger => None,
                },
            };
            if let Some(job) = next {
                match batch.add(job, &limits, lane.gate.per_call()) {
                    Added::Taken => continue,
                    Added::Full => break,
                    Added::DoesNotFit(job) => {
                        carried = Some(job);
                        break;
                    }
                }
            }
            if may_start(
                calls.running(),
                most,
                batch.documents,
                limits.spread_documents,
            ) {
                break;
            }
            tokio::select! {
                biased;
                _ = calls.ended.notified() => {}
                job = queue.recv() => match job {
                    Some(job) => match batch.add(job, &limits, lane.gate.per_call()) {
                        Added::Taken => {}
                        Added::Full => break,
                        Added::DoesNotFit(job) => {
                            carried = Some(job);
                            break;
                        }
                    },
                    None => break,
                },
            }
        }
        // A full batch (or the lane's end) goes as soon as a call may start and the
        // engine's `_source` budget lets it: a call waiting for the budget holds no slot.
        calls.wait_below(most).await;
        let mut jobs = batch.jobs;
        let Some(permit) = enter(&lane.gate, &mut jobs).await else {
            continue;
        };
        let lane = lane.clone();
        let call = calls.start();
        tokio::spawn(async move {
            send(&lane, jobs, false, Some(permit)).await;
            drop(call);
        });
    }
}

/// Whether a batch of `documents` may go now, with `running` calls under way: at once
/// when none is; beside them when it is worth a call of its own and a slot is free.
fn may_start(running: usize, most: usize, documents: usize, spread: usize) -> bool {
    running == 0 || (running < most && documents >= spread)
}

/// The calls of a lane under way.
#[derive(Default)]
struct Calls {
    running: std::sync::atomic::AtomicUsize,
    ended: tokio::sync::Notify,
}

impl Calls {
    fn running(&self) -> usize {
        self.running.load(std::sync::atomic::Ordering::Acquire)
    }

    fn start(self: &Arc<Self>) -> Call {
        self.running
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Call(self.clone())
    }

    async fn wait_below(&self, most: usize) {
        while self.running() >= most {
            self.ended.notified().await;
        }
    }
}

/// A call under way: counted until dropped.
struct Call(Arc<Calls>);

impl Drop for Call {
    fn drop(&mut self) {
        self.0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.ended.notify_one();
    }
}

/// The jobs of the next call.
struct Batch {
    jobs: Vec<Job>,
    documents: usize,
    /// Of `documents`, those the source gate weighs (`Job::rebuilt`).
    rebuilt: usize,
    bytes: usize,
}

enum Added {
    Taken,
    /// Taken, and the batch is as large as a call may be.
    Full,
    /// Not taken: it would make the call too large.
    DoesNotFit(Job),
}

impl Batch {
    fn new(first: Job) -> Self {
        Batch {
            documents: first.items,
            rebuilt: first.rebuilt,
            bytes: first.body.len(),
            jobs: vec![first],
        }
    }

    /// Takes `job` unless the call would pass a limit: its documents, its bytes, or
    /// `weighed` stored documents rebuilt (`SourceGate::per_call`).
    fn add(&mut self, job: Job, limits: &BatchLimits, weighed: usize) -> Added {
        if job.cancel.is_cancelled() {
            job.answer(Err(BulkError::Abandoned));
            return Added::Taken;
        }
        if self.documents + job.items > limits.max_documents
            || self.bytes + job.body.len() > limits.max_bytes
            || self.rebuilt + job.rebuilt > weighed
        {
            return Added::DoesNotFit(job);
        }
        self.documents += job.items;
        self.rebuilt += job.rebuilt;
        self.bytes += job.body.len();
        self.jobs.push(job);
        if self.documents >= limits.max_documents {
            Added::Full
        } else {
            Added::Taken
        }
    }
}

/// Answers `Abandoned` to the jobs whose work was handed back, and keeps the others.
fn prune(jobs: &mut Vec<Job>) {
    let (gone, kept): (Vec<Job>, Vec<Job>) = std::mem::take(jobs)
        .into_iter()
        .partition(|j| j.cancel.is_cancelled());
    *jobs = kept;
    for job in gone {
        job.answer(Err(BulkError::Abandoned));
    }
}

/// Sleeps `wait`, answering jobs handed back meanwhile; returns early once none is left.
async fn back_off(jobs: &mut Vec<Job>, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while !jobs.is_empty() {
        let handed_back = {
            let cancelled = jobs.iter().map(|j| Box::pin(j.cancel.cancelled()));
            let any = futures_util::future::select_all(cancelled);
            tokio::select! {
                biased;
                _ = any => true,
                _ = tokio::time::sleep_until(deadline) => false,
            }
        };
        if !handed_back {
            return;
        }
        prune(jobs);
    }
}

/// Waits for the engine's `_source` budget for `jobs`, answering jobs handed back
/// meanwhile; `None` once none is left.
async fn enter(gate: &SourceGate, jobs: &mut Vec<Job>) -> Option<Option<OwnedSemaphorePermit>> {
    loop {
        prune(jobs);
        if jobs.is_empty() {
            return None;
        }
        let items: usize = jobs.iter().map(|j| j.rebuilt).sum();
        let cancelled = jobs.iter().map(|j| Box::pin(j.cancel.cancelled()));
        let any = futures_util::future::select_all(cancelled);
        tokio::select! {
            biased;
            _ = any => {}
            permit = gate.enter(items) => return Some(permit),
        }
    }
}

/// Sends one coalesced call, retrying while the engine is unavailable, and answers each
/// job. `resent`: an earlier call with these items may have been applied. A call the
/// engine refuses is tried again job by job, so that one request's refusal isn't every
/// request's. `entered`: the budget, when the first attempt has it already.
async fn send(
    lane: &Lane,
    mut jobs: Vec<Job>,
    mut resent: bool,
    mut entered: Option<Option<OwnedSemaphorePermit>>,
) {
    let storage = &*lane.storage;
    let mut backoff = storage.call_backoff();
    loop {
        prune(&mut jobs);
        if jobs.is_empty() {
            return;
        }
        let permit = match entered.take() {
            Some(permit) => permit,
            None => match enter(&lane.gate, &mut jobs).await {
                Some(permit) => permit,
                None => return,
            },
        };
        let counts: Vec<usize> = jobs.iter().map(|j| j.items).collect();
        let total: usize = counts.iter().sum();
        let mut body = Vec::with_capacity(jobs.iter().map(|j| j.body.len()).sum());
        for job in &jobs {
            body.extend_from_slice(&job.body);
        }
        if resent {
            body = bulk::for_resend(&body);
        }
        let sampled = sample_sources(&mut body, lane.gate.cold());
        storage.metrics().bulk_documents.observe(total as f64);
        // The engine holds the asked `_source`s until its answer is in.
        let answer = storage.bulk_once(&body, lane.wait_for).await;
        drop(permit);
        drop(body);
        match answer {
            Ok(bytes) => {
                match bulk::parse_response(&bytes, total) {
                    Ok(mut items) => {
                        lane.gate.observe(&items);
                        for item in items.iter_mut() {
                            item.resent = resent;
                        }
                        // The sampled `_source`s were the gate's, not their requests'.
                        for &i in &sampled {
                            if let Some(item) = items.get_mut(i) {
                                item.get = None;
                            }
                        }
                        let all_rejected = items.iter().all(Item::is_rejected);
                        storage.bulk_items_answered(all_rejected);
                        for (job, items) in jobs.into_iter().zip(split(items, &counts)) {
                            job.answer(Ok(items));
                        }
                    }
                    Err(reason) => {
                        storage.bulk_items_answered(false);
                        for job in jobs {
                            job.answer(Err(BulkError::Refused(500, reason.clone())));
                        }
                    }
                }
                return;
            }
            Err(err @ (StorageError::Unavailable(_) | StorageError::Refusing(_))) => {
                // A call that may have reached the engine makes what follows a resend;
                // one known unapplied doesn't.
                resent |= matches!(err, StorageError::Unavailable(_));
                let reason = err.to_string();
                let wait = backoff.next().unwrap_or(Duration::from_secs(1));
                storage.metrics().engine_retries.inc();
                warn!(error = %reason, ?wait, "storage engine call failed; retrying");
                back_off(&mut jobs, wait).await;
            }
            Err(StorageError::Refused { status, reason }) if jobs.len() == 1 => {
                for job in jobs {
                    job.answer(Err(BulkError::Refused(status, reason.clone())));
                }
                return;
            }
            Err(StorageError::Refused { .. }) => {
                for job in jobs {
                    Box::pin(send(lane, vec![job], resent, None)).await;
                }
                return;
            }
            Err(other) => {
                for job in jobs {
                    job.answer(Err(BulkError::Refused(500, other.to_string())));
                }
                return;
            }
        }
    }
}

/// Asks the engine for the `_source`s of some items of the call that ask none (the
/// `n` such items, 1 in `SAMPLE_EVERY` of them rounded up, drawn at random), so that the
/// gate learns how large the stored documents are even from requests with `source:
/// false`: every update item makes the engine rebuild its whole stored document and
/// hold it until the call ends, so each weighs the largest one seen lately. Drawn at
/// random across the call, not from fixed places: requests that put a small document
/// where the sample would fall, and large ones elsewhere, are seen all the same, a few
/// calls at most (a 10 % share of large documents in a call of 500 items, 8 drawn:
/// seen at once with a chance of 57 %, within 4 calls of 97 %). It costs the engine 1
/// `_source` in 64 items that ask none (weighed by the gate like any item), and the
/// worker one read and dropped: each sampled item's answer is stripped of it before its
/// request sees it. Their indices among the call's items.
///
/// While the gate is cold (`COLD_AFTER`), up to `COLD_SOURCES` such items of the call
/// ask: nothing is known of the sizes, a cold call is that small unless one request's
/// own items make it larger (those are never split: 200 entries naming one large
/// document would ask for it 200 times), and its answer says the most.
fn sample_sources(body: &mut [u8], cold: bool) -> Vec<usize> {
    let count = |n: usize| {
        if cold {
            n.min(COLD_SOURCES)
        } else {
            n.div_ceil(SAMPLE_EVERY)
        }
    };
    bulk::ask_sources(body, count, |m| fastrand::usize(..m))
}

/// One in this many update items that ask no `_source` asks for one, for the gate.
pub const SAMPLE_EVERY: usize = 64;

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
    fn a_small_batch_waits_for_the_call_under_way_a_large_one_goes_beside_it() {
        // Idle engine: even one document goes at once.
        assert!(may_start(0, 4, 1, 100));
        // Busy: small batches wait (and grow) until a call ends …
        assert!(!may_start(1, 4, 99, 100));
        // … large ones get a call of their own while slots are free …
        assert!(may_start(1, 4, 100, 100));
        assert!(may_start(3, 4, 500, 100));
        // … and never more than the slots.
        assert!(!may_start(4, 4, 500, 100));
        // 0: whenever a slot is free (the wait_for lane).
        assert!(may_start(3, 4, 1, 0));
    }

    #[test]
    fn an_empty_job_gets_no_items() {
        let parts = split(vec![item(0, 200)], &[0, 1]);
        assert!(parts[0].is_empty());
        assert_eq!(parts[1].len(), 1);
    }

    fn job(cancel: &CancellationToken) -> (Job, oneshot::Receiver<Result<Vec<Item>, BulkError>>) {
        let (done, answer) = oneshot::channel();
        let job = Job {
            body: Vec::new(),
            items: 1,
            rebuilt: 1,
            cancel: cancel.clone(),
            done,
        };
        (job, answer)
    }

    fn sourced(size: usize) -> Item {
        let source = "x".repeat(size.saturating_sub(8));
        serde_json::from_value(
            serde_json::json!({"status": 200, "get": {"_source": {"s": source}}}),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn the_source_gate_counts_each_source_as_the_largest_seen() {
        let gate = SourceGate::new(128 << 20);
        // Before any answer, sizes are unknown: a few at a time.
        assert_eq!(gate.per_call(), COLD_SOURCES);
        assert_eq!(SourceGate::new(0).per_call(), 1, "one at a time at least");
        // An answer of small ones: each weighs 128 KiB.
        gate.observe(&[sourced(100)]);
        assert_eq!(gate.per_call(), 1024);
        gate.observe(&[sourced(100), sourced(1 << 20)]);
        assert_eq!(gate.per_call(), 128, "1 MiB each: 128 in 128 MiB");
        gate.observe(&[sourced(10)]);
        assert_eq!(gate.per_call(), 128, "the largest seen lately is kept");
        // Calls hold their share while the engine answers; a call over the whole budget
        // (one request's own) takes all of it and goes alone.
        let first = gate.enter(100).await.unwrap();
        let all = tokio::time::timeout(Duration::from_millis(50), gate.enter(200)).await;
        assert!(all.is_err(), "waits for the first call's share");
        drop(first);
        let all = gate.enter(200).await.unwrap();
        let more = tokio::time::timeout(Duration::from_millis(50), gate.enter(1)).await;
        assert!(more.is_err());
        drop(all);
        assert!(gate.enter(0).await.is_none(), "no source, no wait");
    }

    #[test]
    fn a_large_source_weighs_less_and_less_once_no_larger_one_is_seen() {
        let largest = Largest::new();
        let t0 = Instant::now();
        assert_eq!(largest.at(t0), SOURCE_FLOOR, "nothing seen: the floor");
        largest.seen(16 << 20, t0);
        assert_eq!(largest.at(t0), 16 << 20);
        // Smaller ones meanwhile don't hold it up …
        largest.seen(1 << 20, t0 + HALF_LIFE / 2);
        assert_eq!(
            largest.at(t0 + HALF_LIFE),
            8 << 20,
            "halved after HALF_LIFE"
        );
        assert_eq!(largest.at(t0 + HALF_LIFE * 3), 2 << 20);
        assert_eq!(
            largest.at(t0 + HALF_LIFE * 60),
            SOURCE_FLOOR,
            "down to the floor"
        );
        // … a large one seen again raises it again at once.
        largest.seen(4 << 20, t0 + HALF_LIFE * 3);
        assert_eq!(largest.at(t0 + HALF_LIFE * 3), 4 << 20);
        assert_eq!(largest.at(t0 + HALF_LIFE * 4), 2 << 20);
    }

    #[test]
    fn sizes_are_unknown_before_the_first_source_and_after_a_quiet_spell() {
        let largest = Largest::new();
        let t0 = Instant::now();
        assert!(largest.cold(t0), "nothing answered yet");
        largest.seen(0, t0);
        assert!(largest.cold(t0), "an answer without a _source says nothing");
        largest.seen(10, t0);
        assert!(!largest.cold(t0 + COLD_AFTER));
        assert!(
            largest.cold(t0 + COLD_AFTER + HALF_LIFE),
            "quiet for too long"
        );
        // A cold lane asks its budget / COLD_SOURCES at once, whatever the floor says.
        let gate = SourceGate::new(64 << 20);
        assert_eq!(gate.per_call(), COLD_SOURCES);
        gate.observe(&[sourced(10)]);
        assert_eq!(gate.per_call(), 512);
    }

    #[tokio::test]
    async fn a_lane_waiting_for_its_sources_doesnt_make_the_other_wait() {
        let plain = SourceGate::new(1 << 20);
        let wait_for = plain.beside(1 << 20);
        let all = wait_for.enter(100).await.unwrap();
        let other = tokio::time::timeout(Duration::from_millis(50), plain.enter(8)).await;
        assert!(other.is_ok(), "the plain lane has its own budget");
        drop(all);
        // They learn sizes together.
        wait_for.observe(&[sourced(512 << 10)]);
        assert_eq!(plain.per_call(), 2);
    }

    #[test]
    fn a_batch_stops_at_its_share_of_items_whether_they_ask_sources_or_not() {
        let limits = BatchLimits {
            max_documents: 500,
            max_bytes: 1 << 20,
            concurrent_bulks: 4,
            spread_documents: 0,
            linger: Duration::ZERO,
            queue: 8,
            max_source_bytes: 0,
        };
        let cancel = CancellationToken::new();
        // `items` updates, the first `sources` of them asking for their `_source`.
        let with = |items: usize, sources: usize| {
            let (mut j, answer) = job(&cancel);
            let changes = serde_json::Map::new();
            for i in 0..items {
                let options = bulk::ItemOptions {
                    target: "t",
                    retry_on_conflict: 0,
                    include_source: i < sources,
                    reply_source_bytes: usize::MAX,
                    metadata: None,
                    single: false,
                    ids: crate::pipeline::write::Ids::Random,
                    redelivered: false,
                    echo_written: false,
                };
                bulk::append_update(&mut j.body, &options, "d", &changes, None);
            }
            j.items = items;
            j.rebuilt = items;
            std::mem::forget(answer);
            j
        };
        // A first job may weigh more than the share: a request's own is never split.
        let mut batch = Batch::new(with(150, 150));
        assert!(matches!(
            batch.add(with(1, 1), &limits, 100),
            Added::DoesNotFit(_)
        ));
        // An item that asks no `_source` still makes the engine rebuild its document.
        assert!(matches!(
            batch.add(with(1, 0), &limits, 100),
            Added::DoesNotFit(_)
        ));
        let mut batch = Batch::new(with(60, 0));
        assert!(matches!(batch.add(with(40, 0), &limits, 100), Added::Taken));
        assert!(matches!(
            batch.add(with(1, 1), &limits, 100),
            Added::DoesNotFit(_)
        ));
    }

    #[tokio::test]
    async fn jobs_handed_back_during_a_backoff_are_answered_at_once() {
        let (live, abandoned) = (CancellationToken::new(), CancellationToken::new());
        let (a, mut a_answer) = job(&live);
        let (b, b_answer) = job(&abandoned);
        let mut jobs = vec![a, b];
        let started = tokio::time::Instant::now();
        let handing_back = abandoned.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            handing_back.cancel();
        });
        // The backoff goes on for the job still wanted; the other is answered meanwhile.
        back_off(&mut jobs, Duration::from_millis(300)).await;
        assert_eq!(b_answer.await.unwrap().unwrap_err(), BulkError::Abandoned);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(jobs.len(), 1);
        assert!(
            a_answer.try_recv().is_err(),
            "the live job is not answered yet"
        );
        // Once every job is handed back, the backoff ends early.
        live.cancel();
        let started = tokio::time::Instant::now();
        back_off(&mut jobs, Duration::from_secs(30)).await;
        assert!(jobs.is_empty() && started.elapsed() < Duration::from_secs(1));
        assert_eq!(a_answer.await.unwrap().unwrap_err(), BulkError::Abandoned);
    }
}
