//! An HTTP/1.1-aware proxy in front of Elasticsearch for tests: forwards every request,
//! except that, while switched on, it answers every `_bulk` call itself with a
//! whole-request 429 (a busy engine), or every request with a 503 (an engine that is
//! down but whose port answers). Nothing it answers itself reaches the engine.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What Elasticsearch answers when its write queue is full.
pub const REJECTED: &str =
    r#"{"error":{"type":"es_rejected_execution_exception","reason":"rejected"},"status":429}"#;
const UNAVAILABLE: &str = r#"{"error":{"type":"master_not_discovered_exception","reason":"test: the engine is down"},"status":503}"#;

pub struct HttpFault {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
}

/// Answers a request itself (`status`, `content-type`, body) instead of forwarding it:
/// called with the request's method, path and body.
pub type Responder = dyn Fn(&str, &str, &[u8]) -> Option<(u16, String, String)> + Send + Sync;

#[derive(Default)]
struct Shared {
    /// While set, asked first for every request.
    responder: std::sync::Mutex<Option<Arc<Responder>>>,
    reject_bulk: AtomicBool,
    down: AtomicBool,
    /// `_bulk` calls answered 429, and requests answered 503.
    rejected: AtomicUsize,
    unavailable: AtomicUsize,
    stop: CancellationToken,
}

impl HttpFault {
    /// Listens on a free loopback port, forwarding to `target` (`host:port` or a URL).
    pub async fn start(target: &str) -> HttpFault {
        let target = target
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let accepting = shared.clone();
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = accepting.stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => continue,
                    },
                };
                let (target, shared) = (target.clone(), accepting.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = shared.stop.cancelled() => {}
                        _ = serve(client, &target, &shared) => {}
                    }
                });
            }
        });
        HttpFault { addr, shared }
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// While on, every `POST …/_bulk` is answered 429 (`REJECTED`), not forwarded.
    pub fn reject_bulk(&self, on: bool) {
        self.shared.reject_bulk.store(on, Ordering::SeqCst);
    }

    /// While set, `responder` may answer any request itself (an engine's 403 naming a
    /// user, a proxy's HTML page); what it leaves (`None`) goes on as before.
    pub fn answer_with(&self, responder: Option<Arc<Responder>>) {
        *self.shared.responder.lock().unwrap() = responder;
    }

    /// While on, every request is answered 503, not forwarded.
    pub fn down(&self, on: bool) {
        self.shared.down.store(on, Ordering::SeqCst);
    }

    /// `_bulk` calls answered 429 so far.
    pub fn rejected(&self) -> usize {
        self.shared.rejected.load(Ordering::SeqCst)
    }

    /// Requests answered 503 so far.
    pub fn unavailable(&self) -> usize {
        self.shared.unavailable.load(Ordering::SeqCst)
    }
}

impl Drop for HttpFault {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// One client connection: its requests in turn, each answered here or forwarded over
/// one upstream connection of its own.
async fn serve(client: TcpStream, target: &str, shared: &Shared) {
    let (read, mut write) = client.into_split();
    let mut client = BufReader::new(read);
    let mut upstream: Option<BufReader<TcpStream>> = None;
    loop {
        let Some(request) = read_message(&mut client, false, false).await else {
            return;
        };
        let (method, path) = request_line(&request.head);
        let responder = shared.responder.lock().unwrap().clone();
        let body_start = request
            .raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(request.raw.len(), |at| at + 4);
        let custom =
            responder.and_then(|answer| answer(&method, &path, &request.raw[body_start..]));
        if let Some((status, content_type, body)) = custom {
            let response = format!(
                "HTTP/1.1 {status} Test\r\ncontent-type: {content_type}\r\n\
                 x-elastic-product: Elasticsearch\r\ncontent-length: {}\r\n\r\n{body}",
                if method == "HEAD" { 0 } else { body.len() }
            );
            let response = if method == "HEAD" {
                response[..response.len() - body.len()].to_owned()
            } else {
                response
            };
            if write.write_all(response.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        let answer = if shared.down.load(Ordering::SeqCst) {
            shared.unavailable.fetch_add(1, Ordering::SeqCst);
            Some((503, "Service Unavailable", UNAVAILABLE))
        } else if shared.reject_bulk.load(Ordering::SeqCst)
            && method == "POST"
            && path.split('?').next().unwrap_or("").ends_with("/_bulk")
        {
            shared.rejected.fetch_add(1, Ordering::SeqCst);
            Some((429, "Too Many Requests", REJECTED))
        } else {
            None
        };
        if let Some((status, reason, body)) = answer {
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n\
                 x-elastic-product: Elasticsearch\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if write.write_all(response.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        if upstream.is_none() {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            upstream = Some(BufReader::new(server));
        }
        let server = upstream.as_mut().unwrap();
        if server.get_mut().write_all(&request.raw).await.is_err() {
            return;
        }
        let Some(response) = read_message(server, true, method == "HEAD").await else {
            return;
        };
        if write.write_all(&response.raw).await.is_err() {
            return;
        }
        if response.close || request.close {
            let _ = write.shutdown().await;
            return;
        }
    }
}

struct Message {
    /// The head (start line and headers), lowercased header names not guaranteed.
    head: String,
    /// Every byte of it, as read.
    raw: Vec<u8>,
    /// `Connection: close`, or a response delimited by the end of the stream.
    close: bool,
}

fn request_line(head: &str) -> (String, String) {
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    (method, path)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}

/// One HTTP/1.1 message: its head, then a body delimited by `content-length`, chunked
/// encoding, or (responses only) the end of the stream. None at the end of the stream.
async fn read_message<R: tokio::io::AsyncRead + Unpin>(
    from: &mut BufReader<R>,
    response: bool,
    head_request: bool,
) -> Option<Message> {
    let mut raw = Vec::new();
    loop {
        let start = raw.len();
        if from.read_until(b'\n', &mut raw).await.ok()? == 0 {
            return None;
        }
        if &raw[start..] == b"\r\n" || &raw[start..] == b"\n" {
            if start == 0 {
                // Stray blank line between messages.
                raw.clear();
                continue;
            }
            break;
        }
    }
    let head = String::from_utf8_lossy(&raw).into_owned();
    let mut close = header(&head, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
    let status: u16 = if response {
        head.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    } else {
        0
    };
    let no_body = head_request || status == 204 || status == 304 || (100..200).contains(&status);
    if no_body {
        // No body.
    } else if header(&head, "transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        loop {
            let start = raw.len();
            if from.read_until(b'\n', &mut raw).await.ok()? == 0 {
                return None;
            }
            let line = String::from_utf8_lossy(&raw[start..]).into_owned();
            let size =
                usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16).ok()?;
            if size == 0 {
                // Trailers, up to a blank line.
                loop {
                    let start = raw.len();
                    if from.read_until(b'\n', &mut raw).await.ok()? == 0 {
                        return None;
                    }
                    if raw[start..].trim_ascii().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = raw.len();
            raw.resize(start + size + 2, 0);
            from.read_exact(&mut raw[start..]).await.ok()?;
        }
    } else if let Some(length) = header(&head, "content-length") {
        let length: usize = length.parse().ok()?;
        let start = raw.len();
        raw.resize(start + length, 0);
        from.read_exact(&mut raw[start..]).await.ok()?;
    } else if response {
        from.read_to_end(&mut raw).await.ok()?;
        close = true;
    }
    Some(Message { head, raw, close })
}
