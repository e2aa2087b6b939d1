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
pub mod bulk;
pub mod client;
pub mod coalesce;
pub mod config;
pub mod delivery;
pub mod envelope;
pub mod error;
pub mod logs;
pub mod metrics;
pub mod order;
pub mod prefetch;
pub mod reply;
pub mod requeue;
pub mod response;
pub mod security;
pub mod session;
pub mod storage;
pub mod update;
pub mod worker;
