//! A fault-injecting TCP proxy for tests: forwards every connection to a target, can
//! delay each direction (like netem: data read at t is written at t + latency, in order),
//! freeze every connection (nothing forwarded, nothing closed: a hung process or a long GC
//! pause as seen from outside), cut every open connection, and go down (its port refuses
//! connections, as a stopped target's would) and up again.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    /// Latency of data going to the target, then of data coming back.
    latency: Mutex<(Duration, Duration)>,
    /// Cancelled by `cut`, which puts a fresh one in place for later connections.
    cut: Mutex<CancellationToken>,
    /// Cancelled on drop: the parent of every `cut` token.
    stop: CancellationToken,
    /// While true, nothing is forwarded either way and new connections are held
    /// unanswered (accepted, never connected through): the target looks frozen.
    frozen: tokio::sync::watch::Sender<bool>,
    /// While true, the port is closed (connections are refused) and every connection
    /// open when it went down was cut: the target looks stopped.
    down: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    /// Listens on 127.0.0.1 on a free port, forwarding every connection to `target`
    /// (e.g. "127.0.0.1:9200").
    /// Forwards to `target`: `host:port`, or a URL (`http://host:port/`).
    pub async fn start(target: &str) -> Proxy {
        let target = target.trim_start_matches("http://").trim_end_matches('/');
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            latency: Mutex::new((Duration::ZERO, Duration::ZERO)),
            cut: Mutex::new(stop.child_token()),
            stop,
            frozen: tokio::sync::watch::Sender::new(false),
            down: tokio::sync::watch::Sender::new(false),
        });
        tokio::spawn(accept(listener, target.to_owned(), shared.clone()));
        Proxy { addr, shared }
    }

    /// "127.0.0.1:PORT"
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, bytes going to the target (`up`) and back (`down`) are each held
    /// this long before being forwarded, in order, per connection; a connection's close
    /// is forwarded after the data before it. `Duration::ZERO`: no delay for new data.
    pub fn set_latency(&self, up: Duration, down: Duration) {
        *self.shared.latency.lock().unwrap() = (up, down);
    }

    /// From now on nothing is forwarded, either way, on any connection, and new
    /// connections are accepted but not connected through: like `kill -STOP` of the
    /// target, without touching the target (which other tests share).
    pub fn freeze(&self) {
        self.shared.frozen.send_replace(true);
    }

    /// Forwards again what was held by `freeze`, in order.
    pub fn thaw(&self) {
        self.shared.frozen.send_replace(false);
    }

    /// Closes every connection open now (both sides); new ones are accepted as usual.
    pub fn cut(&self) {
        let fresh = self.shared.stop.child_token();
        std::mem::replace(&mut *self.shared.cut.lock().unwrap(), fresh).cancel();
    }

    /// From now on the proxy's port refuses connections, and every open one is cut: like
    /// a stopped target, without stopping it (other tests share it). Its address stays
    /// the same.
    pub fn down(&self) {
        self.shared.down.send_replace(true);
        self.cut();
    }

    /// Listens again on the same port after `down`.
    pub fn up(&self) {
        self.shared.down.send_replace(false);
    }
}

impl Drop for Proxy {
    /// Stops accepting and closes every connection.
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

async fn accept(listener: TcpListener, target: String, shared: Arc<Shared>) {
    let addr = listener.local_addr().unwrap();
    let mut listener = Some(listener);
    let mut down = shared.down.subscribe();
    loop {
        if *down.borrow_and_update() {
            // Closed: connections to the port are refused until `up`.
            listener = None;
            tokio::select! {
                _ = shared.stop.cancelled() => return,
                _ = down.wait_for(|down| !*down) => {}
            }
            continue;
        }
        let Some(open) = listener.as_ref() else {
            listener = Some(rebind(addr).await);
            continue;
        };
        let client = tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = down.changed() => continue,
            accepted = open.accept() => match accepted {
                Ok((client, _)) => client,
                Err(_) => continue,
            },
        };
        let cut = shared.cut.lock().unwrap().clone();
        let (target, shared) = (target.clone(), shared.clone());
        tokio::spawn(async move {
            // Dropping the sockets, when cut, closes both sides.
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = forward(client, &target, &shared) => {}
            }
        });
    }
}

/// Listens on `addr` again (its port was ours a moment ago), within a bounded wait.
async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) if Instant::now() > deadline => panic!("the proxy's port {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Both directions of one connection, until both have closed.
async fn forward(client: TcpStream, target: &str, shared: &Shared) {
    thawed(&shared.frozen).await;
    // Accepted just as the proxy went down: closed, as if refused.
    if *shared.down.borrow() {
        return;
    }
    // A target that refuses (it is down) closes the client's connection at once.
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pipe(client_read, server_write, &shared.frozen, || shared
            .latency
            .lock()
            .unwrap()
            .0),
        pipe(server_read, client_write, &shared.frozen, || shared
            .latency
            .lock()
            .unwrap()
            .1),
    );
}

/// Copies `from` to `to`, each chunk held for the latency in force when it was read.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    frozen: &tokio::sync::watch::Sender<bool>,
    latency: impl Fn() -> Duration,
) {
    // An empty chunk stands for the end of the stream (or a read error).
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let _ = chunks.send((Instant::now() + latency(), buf[..n].to_vec()));
            if n == 0 {
                return;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            thawed(frozen).await;
            if chunk.is_empty() || to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Returns once the proxy is not frozen.
async fn thawed(frozen: &tokio::sync::watch::Sender<bool>) {
    let mut state = frozen.subscribe();
    let _ = state.wait_for(|frozen| !*frozen).await;
}
