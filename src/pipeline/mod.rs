//! The pipeline core, in the order a request goes through it: its [`envelope`] is parsed
//! and validated, its documents checked and turned into [`bulk`] items ([`write`]),
//! merged with those of concurrent requests into one `_bulk` call ([`coalesce`]) in
//! per-document [`order`], the bulk items mapped to the [`response`], and the [`reply`]'s
//! destination and key chosen. It knows nothing of the broker; it reaches the engine only
//! through `storage::Storage`.

pub mod bulk;
pub mod coalesce;
pub mod envelope;
pub mod order;
pub mod reply;
pub mod response;
pub mod write;
