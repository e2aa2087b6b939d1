//! The engine port: the one way the worker sends a call to a node of the storage engine.
//!
//! `Storage` (retries, backoff, the outage clock, node rotation) talks to each node
//! through `EngineNode`, which does one HTTP exchange and nothing else: it sends the call,
//! reads the whole answer, and says how it failed when it did. The HTTP implementation
//! (`Http`, the official `elasticsearch` crate) is the production one; a model of the
//! engine can stand in its place. Deadlines are not the port's: `Storage` bounds every
//! call it makes (module `bounded`), so a node that never answers can't hold it.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use elasticsearch::Elasticsearch;
use elasticsearch::http::Method;
use elasticsearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};

/// One call to a node.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub method: Method,
    pub path: &'a str,
    pub query: &'a [(&'a str, &'a str)],
    /// An NDJSON body, when there is one.
    pub body: Option<&'a [u8]>,
    /// The HTTP client's own timeout for the exchange (connect, send, answer).
    pub timeout: Duration,
}

/// The node answered: its status and its whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The exchange failed before a whole answer came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// What happened, with its causes (a TLS failure's reason is in them).
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Nothing reached the node (its connection was refused or could not be made):
    /// another node may be asked at once, without risk of a double write.
    NeverSent,
    /// No answer within the timeout: the node is slow, not gone; the call may still be
    /// applied.
    TimedOut,
    /// The connection broke during the exchange: the call may have been applied.
    Broken,
}

pub type Exchange<'a> = Pin<Box<dyn Future<Output = Result<Answer, Failure>> + Send + 'a>>;

/// A node of the engine.
pub trait EngineNode: Send + Sync {
    /// Sends `call` and reads its whole answer.
    fn exchange<'a>(&'a self, call: Call<'a>) -> Exchange<'a>;
}

/// A node over HTTP, through the official client.
pub struct Http(pub Elasticsearch);

impl EngineNode for Http {
    fn exchange<'a>(&'a self, call: Call<'a>) -> Exchange<'a> {
        Box::pin(async move {
            let mut headers = HeaderMap::new();
            if call.body.is_some() {
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-ndjson"),
                );
            }
            let sent = self
                .0
                .send(
                    call.method,
                    call.path,
                    headers,
                    Some(call.query),
                    call.body,
                    Some(call.timeout),
                )
                .await;
            let response = sent.map_err(|e| Failure {
                kind: if never_sent(&e) {
                    FailureKind::NeverSent
                } else if e.is_timeout() {
                    FailureKind::TimedOut
                } else {
                    FailureKind::Broken
                },
                message: crate::security::tls::chain(&e),
            })?;
            let status = response.status_code().as_u16();
            let body = response.bytes().await.map_err(|e| Failure {
                kind: if e.is_timeout() {
                    FailureKind::TimedOut
                } else {
                    FailureKind::Broken
                },
                message: e.to_string(),
            })?;
            // Without a copy when the answer came in one piece (a large one: twice its
            // size held at once otherwise).
            Ok(Answer {
                status,
                body: Vec::from(body),
            })
        })
    }
}

/// Whether a call failed before anything was sent: its connection was refused (or could
/// not be made).
fn never_sent(err: &elasticsearch::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(e) = e.downcast_ref::<reqwest::Error>() {
            return e.is_connect();
        }
        source = e.source();
    }
    false
}
