//! Per-document order within one worker: updates of the same document reach the engine
//! in the order the worker received them, retries and index checks included.
//!
//! Requests are given a turn as they are received, in the consuming channel's order
//! (`Sequencer::turn`, called by the consume loop before the request's task starts). A
//! turn names the documents the request touches (its target's Kuzzle index and collection
//! and each `_id`, of any action: `documents`, mDelete's `ids`, a single form's `_id`,
//! read with a parse that skips everything else) and the turns of the
//! latest earlier requests that touch any of them. Before its first engine call the
//! request waits for those to be over. A request holds its turn until its engine work is
//! over: its task awaits the answer of every call that carries its documents (the
//! coalescer answers a request only once its calls have returned or timed out, whether
//! it was handed back meanwhile or not), and drops the turn after. What a timeout can't
//! promise: an engine that still holds a call past it (a frozen node, resumed later)
//! may apply it after the next request's write; the timeout is the bound
//! (docs/src/guarantees.md, "Timeouts").
//!
//! A turn is over once it is dropped **and** every turn it waits for is over. A request
//! handed back while waiting (its session lost, consumption paused) drops its turn
//! before the earlier ones are over; were its turn over at once, a later request of the
//! same documents (the redelivered copy of either, or a newer one) would wait for
//! nothing, and reach the engine while the earlier request's call is still there: the
//! older write could land last. So such a turn ends only once those it waited for have
//! ended (a task of its own waits for them), and its documents stay in the map until
//! then. Every wait still ends: a turn waits only for earlier turns, each of which ends
//! within its own request's bounds (the engine call's `storage.write_timeout_ms` and its
//! backstop) or, handed back, once those before it do; waits can't form a cycle.
//!
//! What it costs: updates of one document no longer share a bulk call; each waits for the
//! one before it (a hot document's updates go one call at a time). Requests touching
//! different documents are not affected.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio_util::sync::CancellationToken;

/// The turns of the latest request touching each document (by a keyed hash of its
/// index, collection and id: a collision only makes a request wait needlessly).
#[derive(Default)]
pub struct Sequencer {
    /// By keyed hash (`hasher`) already: a fast hash of those is safe.
    latest: Mutex<HashMap<u64, (u64, CancellationToken), foldhash::fast::RandomState>>,
    hasher: std::hash::RandomState,
    next: std::sync::atomic::AtomicU64,
}

/// One request's place in the order of the documents it touches.
pub struct Turn {
    /// Over when cancelled: the turns this one waits for.
    after: Vec<CancellationToken>,
    /// Cancelled when this turn is over (later requests of the same documents may go):
    /// once it is dropped and those it waits for are over (`Drop`).
    over: Option<CancellationToken>,
    keys: Vec<u64>,
    seq: u64,
    sequencer: Arc<Sequencer>,
}

impl Sequencer {
    /// The turn of a request just received, from its bytes. A request whose documents
    /// can't be read this way waits for nothing (it is refused before any engine call).
    pub fn turn(self: &Arc<Self>, body: &[u8]) -> Turn {
        let keys = self.keys(body);
        let seq = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let over = CancellationToken::new();
        let mut after: Vec<(u64, CancellationToken)> = Vec::new();
        {
            let mut latest = self.latest.lock().expect("poisoned");
            for key in &keys {
                if let Some((earlier, before)) = latest.insert(*key, (seq, over.clone()))
                    && !before.is_cancelled()
                {
                    after.push((earlier, before));
                }
            }
        }
        // Waited for in the order of their turns, not of the keys' hashes (keyed at
        // random per process): one seed, one run of tests/simulation.
        after.sort_unstable_by_key(|(earlier, _)| *earlier);
        after.dedup_by_key(|(earlier, _)| *earlier);
        Turn {
            after: after.into_iter().map(|(_, before)| before).collect(),
            over: Some(over),
            keys,
            seq,
            sequencer: self.clone(),
        }
    }

    fn keys(&self, body: &[u8]) -> Vec<u64> {
        let Ok(Lenient(Some(envelope))) = serde_json::from_slice::<Lenient<Envelope<'_>>>(body)
        else {
            return Vec::new();
        };
        let (Some(index), Some(collection)) = (envelope.index, envelope.collection) else {
            return Vec::new();
        };
        // Every id the request may name, whatever its action: `documents[]._id`, mDelete's
        // `ids`, a single form's `_id` (one named by another action only waits needlessly).
        let body = envelope.body.unwrap_or_default();
        let listed = body
            .documents
            .into_iter()
            .flatten()
            .filter_map(|doc| doc.id);
        let ids = body.ids.into_iter().flatten().filter_map(|id| id.0);
        let mut keys: Vec<u64> = listed
            .chain(ids)
            .chain(envelope.id)
            .map(|id| self.hasher.hash_one((&*index, &*collection, &*id)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Documents with a turn not yet over (for tests and the map's bound).
    pub fn tracked(&self) -> usize {
        self.latest.lock().expect("poisoned").len()
    }
}

impl Turn {
    /// Waits until every earlier request touching these documents is over; false when
    /// `cancel` (this request handed back) comes first.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        while let Some(before) = self.after.last() {
            // `biased` (one seed, one run of tests/simulation): handed back wins.
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return false,
                _ = before.cancelled() => { self.after.pop(); }
            }
        }
        true
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(over) = self.over.take() else {
            return;
        };
        let ended = Ended {
            over,
            keys: std::mem::take(&mut self.keys),
            seq: self.seq,
            sequencer: self.sequencer.clone(),
        };
        self.after.retain(|before| !before.is_cancelled());
        if self.after.is_empty() {
            return drop(ended);
        }
        // Handed back before the earlier turns were over: this one is over with them.
        let after = std::mem::take(&mut self.after);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    for before in after {
                        before.cancelled().await;
                    }
                    drop(ended);
                });
            }
            // No runtime (a turn dropped outside the worker): nothing can wait.
            Err(_) => drop(ended),
        }
    }
}

/// A turn ending: later requests of its documents may go once this is dropped.
struct Ended {
    over: CancellationToken,
    keys: Vec<u64>,
    seq: u64,
    sequencer: Arc<Sequencer>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        // The map keeps only turns not over: a document's entry goes with its last turn.
        {
            let mut latest = self.sequencer.latest.lock().expect("poisoned");
            for key in &self.keys {
                if latest.get(key).is_some_and(|(seq, _)| *seq == self.seq) {
                    latest.remove(key);
                }
            }
        }
        self.over.cancel();
    }
}

/// What a turn reads of a request: borrowed where the JSON allows, the rest skipped. Read
/// as `envelope::parse` reads it: a key given twice counts for its last value, and a value
/// of another type is no value (that request is refused later, before any engine call).
#[derive(Default)]
struct Envelope<'a> {
    index: Option<std::borrow::Cow<'a, str>>,
    collection: Option<std::borrow::Cow<'a, str>>,
    /// A single-document form's `_id`.
    id: Option<std::borrow::Cow<'a, str>>,
    body: Option<Body<'a>>,
}

#[derive(Default)]
struct Body<'a> {
    documents: Option<Vec<Document<'a>>>,
    ids: Option<Vec<Text<'a>>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Envelope<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Envelope<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an envelope")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut envelope = Envelope::default();
                while let Some(key) = map.next_key::<Field>()? {
                    match key {
                        Field::Index => envelope.index = map.next_value::<Text<'de>>()?.0,
                        Field::Collection => envelope.collection = map.next_value::<Text<'de>>()?.0,
                        Field::Body => envelope.body = map.next_value::<Lenient<Body<'de>>>()?.0,
                        Field::Id => envelope.id = map.next_value::<Text<'de>>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(envelope)
            }
        }
        deserializer.deserialize_map(Visit(std::marker::PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Body<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Body<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a body")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut body = Body::default();
                while let Some(key) = map.next_key::<Field>()? {
                    match key {
                        Field::Documents => {
                            body.documents = map.next_value::<Lenient<Vec<Document<'de>>>>()?.0;
                        }
                        Field::Ids => body.ids = map.next_value::<Lenient<Vec<Text<'de>>>>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(body)
            }
        }
        deserializer.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// A key a turn reads, told from the others without copying it (a key with escapes is
/// compared unescaped, as `envelope::parse` reads it).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Index,
    Collection,
    Body,
    Id,
    Documents,
    Ids,
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Field;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, key: &str) -> Result<Field, E> {
                Ok(match key {
                    "index" => Field::Index,
                    "collection" => Field::Collection,
                    "body" => Field::Body,
                    "_id" => Field::Id,
                    "documents" => Field::Documents,
                    "ids" => Field::Ids,
                    _ => Field::Other,
                })
            }
        }
        deserializer.deserialize_str(Visit)
    }
}

/// `T` when the value is of `T`'s shape (a map for a map, a sequence for a sequence),
/// `None` for any other value, read past.
struct Lenient<T>(Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                map: M,
            ) -> Result<Self::Value, M::Error> {
                let value = T::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Lenient(Some(value)))
            }
            fn visit_seq<S: serde::de::SeqAccess<'de>>(
                self,
                seq: S,
            ) -> Result<Self::Value, S::Error> {
                let value = T::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                Ok(Lenient(Some(value)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
        }
        deserializer.deserialize_any(Visit(std::marker::PhantomData))
    }
}

/// One entry of `documents`: its `_id` when it is an object with a string `_id`; any other
/// value is read past (it is refused per document later, and touches nothing).
struct Document<'a> {
    id: Option<std::borrow::Cow<'a, str>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Document<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DocumentVisitor(std::marker::PhantomData))
    }
}

struct DocumentVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> serde::de::Visitor<'de> for DocumentVisitor<'a> {
    type Value = Document<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut id = None;
        while let Some(key) = map.next_key::<Field>()? {
            if key == Field::Id {
                id = map.next_value::<Text<'de>>()?.0;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Document { id })
    }

    fn visit_seq<S: serde::de::SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Document { id: None })
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Document { id: None })
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Document { id: None })
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Document { id: None })
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Document { id: None })
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Document { id: None })
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Document { id: None })
    }
}

/// A string, or `None` for any other value.
struct Text<'a>(Option<std::borrow::Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Some(v.into())))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Some(v.to_owned().into())))
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_seq<S: serde::de::SeqAccess<'de>>(
                self,
                mut seq: S,
            ) -> Result<Self::Value, S::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
        }
        deserializer.deserialize_any(Visit(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn request(ids: &[&str]) -> Vec<u8> {
        let documents: Vec<_> = ids
            .iter()
            .map(|id| serde_json::json!({"_id": id, "body": {"n": 1}}))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "index": "i", "collection": "c", "action": "mUpdate",
            "body": {"documents": documents}}))
        .unwrap()
    }

    #[tokio::test]
    async fn a_later_update_of_a_document_waits_for_the_earlier_one() {
        let sequencer = Arc::new(Sequencer::default());
        let first = sequencer.turn(&request(&["a", "b"]));
        let mut second = sequencer.turn(&request(&["b"]));
        let mut other = sequencer.turn(&request(&["c"]));
        let never = CancellationToken::new();
        assert!(other.wait(&never).await, "another document: no wait");
        let waited = tokio::time::timeout(Duration::from_millis(100), second.wait(&never)).await;
        assert!(waited.is_err(), "b is still being updated by the first");
        drop(first);
        assert!(second.wait(&never).await);
        drop((second, other));
        assert_eq!(
            sequencer.tracked(),
            0,
            "nothing kept once every turn is over"
        );
    }

    #[tokio::test]
    async fn a_wait_ends_when_the_request_is_handed_back() {
        let sequencer = Arc::new(Sequencer::default());
        let _first = sequencer.turn(&request(&["a"]));
        let mut second = sequencer.turn(&request(&["a"]));
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(!second.wait(&cancel).await);
    }

    #[tokio::test]
    async fn a_turn_handed_back_while_waiting_ends_only_with_those_before_it() {
        let sequencer = Arc::new(Sequencer::default());
        let never = CancellationToken::new();
        // The first request's call is at the engine; the second waits for it, and is
        // handed back (its session lost): its turn is dropped before the first's.
        let first = sequencer.turn(&request(&["a"]));
        let mut second = sequencer.turn(&request(&["a", "b"]));
        let handed_back = CancellationToken::new();
        handed_back.cancel();
        assert!(!second.wait(&handed_back).await);
        drop(second);
        // A later request of the same document (the second's redelivery, or a newer
        // one) still waits for the first, through the second's turn.
        let mut third = sequencer.turn(&request(&["a"]));
        let waited = tokio::time::timeout(Duration::from_millis(100), third.wait(&never)).await;
        assert!(
            waited.is_err(),
            "the first request's call may still land: the third must wait"
        );
        // The same through the other document the second touched, and for a turn
        // dropped without ever waiting.
        let unwaited = sequencer.turn(&request(&["b"]));
        drop(unwaited);
        let mut fourth = sequencer.turn(&request(&["b"]));
        let waited = tokio::time::timeout(Duration::from_millis(100), fourth.wait(&never)).await;
        assert!(waited.is_err(), "b waits for the first through the second");
        drop(first);
        let both = async { third.wait(&never).await && fourth.wait(&never).await };
        let waited = tokio::time::timeout(Duration::from_secs(5), both).await;
        assert_eq!(waited, Ok(true), "every wait ends once the first is over");
        drop((third, fourth));
        tokio::task::yield_now().await;
        assert_eq!(
            sequencer.tracked(),
            0,
            "nothing kept once every turn is over"
        );
    }

    #[tokio::test]
    async fn requests_that_cant_be_read_wait_for_nothing() {
        let sequencer = Arc::new(Sequencer::default());
        let _first = sequencer.turn(&request(&["a"]));
        for body in [
            &b"not json"[..],
            br#"{"index":"i"}"#,
            br#"{"index":"i","collection":"c","body":{"documents":3}}"#,
        ] {
            let mut turn = sequencer.turn(body);
            assert!(turn.wait(&CancellationToken::new()).await);
        }
    }

    #[test]
    fn a_key_given_twice_counts_for_its_last_value_as_the_envelope_reads_it() {
        let sequencer = Sequencer::default();
        let twice = br#"{"index":"i","collection":"x","collection":"c","body":{"documents":[{"_id":"a","body":{}}],"documents":[{"_id":"x"},{"_id":"a"}]}}"#;
        let once =
            br#"{"index":"i","collection":"c","body":{"documents":[{"_id":"x"},{"_id":"a"}]}}"#;
        assert_eq!(sequencer.keys(twice), sequencer.keys(once));
        assert_eq!(sequencer.keys(once).len(), 2);
        let odd = br#"{"index":"i","collection":"c","body":{"documents":[3,"s",null,[1],{"_id":7},{"_id":"a"}]}}"#;
        assert_eq!(
            sequencer.keys(odd).len(),
            1,
            "only the readable document counts"
        );
    }

    #[test]
    fn keys_written_with_escapes_are_the_keys_they_spell() {
        let sequencer = Sequencer::default();
        let plain = request(&["x"]);
        let escaped = br#"{"\u0069ndex":"i","collectio\u006e":"c","bod\u0079":{"\u0064ocuments":[{"\u005fid":"x"}]}}"#;
        assert_eq!(sequencer.keys(&plain), sequencer.keys(escaped));
        assert_eq!(sequencer.keys(escaped).len(), 1);
    }

    #[test]
    fn the_same_id_in_another_collection_is_another_document() {
        let sequencer = Sequencer::default();
        let a = sequencer.keys(&request(&["x"]));
        let other = br#"{"index":"i","collection":"d","body":{"documents":[{"_id":"x"}]}}"#;
        assert_ne!(a, sequencer.keys(other));
        let escaped =
            br#"{"index":"i","collection":"c","body":{"documents":[{"_id":"\u0078","body":{}}]}}"#;
        assert_eq!(
            a,
            sequencer.keys(escaped),
            "escapes are read as the engine reads them"
        );
    }

    #[test]
    fn every_action_names_its_documents_as_mupdate_does() {
        let sequencer = Sequencer::default();
        let mupdate = sequencer.keys(&request(&["x", "y"]));
        let mdelete =
            br#"{"index":"i","collection":"c","action":"mDelete","body":{"ids":["y",3,"x"]}}"#;
        assert_eq!(sequencer.keys(mdelete), mupdate);
        let x = sequencer.keys(&request(&["x"]));
        for single in [
            &br#"{"index":"i","collection":"c","action":"delete","_id":"x"}"#[..],
            br#"{"index":"i","collection":"c","action":"replace","_id":"x","body":{"n":1}}"#,
            br#"{"index":"i","collection":"c","action":"upsert","_id":"x","body":{"changes":{}}}"#,
        ] {
            assert_eq!(sequencer.keys(single), x);
        }
    }
}
