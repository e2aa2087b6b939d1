//! The lifecycle around the pipeline: the broker session ([`session`]: nodes, consume,
//! pause, reconnect, shutdown), the consumer's prefetch ([`prefetch`]), one delivery
//! processed, answered and settled ([`worker`]), its fate ([`delivery`]: settled once,
//! its work's cancellation), and what systemd is told of it ([`systemd`]). It talks to the broker through `broker::port` and to
//! the engine through `storage`, so that a model of both can run it
//! (`session::run_with`).

pub mod delivery;
pub mod prefetch;
pub mod session;
pub mod systemd;
pub mod worker;
