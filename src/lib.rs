//! mupdate-worker: Kuzzle's `document:mUpdate` over RabbitMQ, applied to Elasticsearch.
//!
//! The pipeline reads in one direction: a delivery's bytes become an [`envelope`],
//! its documents a [`bulk`] body sent by [`storage`], the bulk items a [`response`],
//! published by [`broker`] to the [`reply`] destination, then settled ([`worker`],
//! [`delivery`]); [`session`] keeps the broker connection alive around it.

pub mod amqp_url;
pub mod backoff;
pub mod bounded;
pub mod broker;
pub mod client;
pub mod config;
pub mod delivery;
pub mod error;
pub mod logs;
pub mod metrics;
pub mod pipeline;
pub mod prefetch;
pub mod requeue;
pub mod security;
pub mod session;
pub mod storage;
pub mod worker;

// The pipeline modules at their former paths, only for `worker.rs` and `broker/`, whose
// paths are fixed once the broker port's branch (which rewrites them) is merged.
pub use pipeline::{bulk, coalesce, envelope, order, reply, response, update};
