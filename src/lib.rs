//! mupdate-worker: Kuzzle's `document:mUpdate` over RabbitMQ, applied to Elasticsearch.
//!
//! The layout, whose dependencies go one way:
//! - the pipeline core, [`pipeline`]: a delivery's bytes become an envelope, its documents
//!   bulk items, merged into `_bulk` calls, the bulk items a response, sent to the reply
//!   destination; around it the lifecycle: [`worker`] (one delivery: process, reply,
//!   settle), [`delivery`] (its fate), [`session`] (the broker session), [`prefetch`];
//! - the broker adapter, [`broker`] (AMQP over lapin), which knows nothing of the engine;
//! - the engine adapter, [`storage`] (its port: `storage::port`), which knows nothing of
//!   the broker;
//! - the client tools, [`client`] (`send`, the loader), which know nothing of the worker;
//! - operations: [`config`], [`amqp_url`], [`security`], [`error`], [`metrics`], [`logs`],
//!   [`requeue`] (`requeue-dead`), [`bounded`] and [`backoff`].

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
