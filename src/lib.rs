//! mupdate-worker: Kuzzle's `document:mUpdate` over RabbitMQ, applied to Elasticsearch.
//!
//! The layout, whose dependencies go one way:
//! - the pipeline core, [`pipeline`]: a delivery's bytes become an envelope, its documents
//!   bulk items, merged into `_bulk` calls, the bulk items a response, sent to the reply
//!   destination;
//! - the lifecycle around it, [`lifecycle`]: `worker` (one delivery: process, reply,
//!   settle), `delivery` (its fate), `session` (the broker session), `prefetch`; it
//!   reaches the broker only through its port (`broker::port`) and the engine through
//!   `storage` (whose port is `storage::port`);
//! - the broker adapter, [`broker`] (its port, `broker::port`, and lapin behind it), which
//!   knows nothing of the engine;
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
pub mod error;
pub mod lifecycle;
pub mod logs;
pub mod metrics;
pub mod pipeline;
pub mod requeue;
pub mod security;
pub mod storage;
