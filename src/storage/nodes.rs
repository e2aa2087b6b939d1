//! The engine's nodes, as `storage.url` lists them: calls go round the nodes in turn,
//! leaving out for a while a node whose connection was refused or broken (1 s, doubling
//! up to 10 s while it keeps failing). A node left out is tried again when its time is
//! up, and is back in turn as soon as it answers. With every node left out, the one due
//! first is called anyway: the caller's retries and backoff then decide.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::port::EngineNode;
use crate::metrics::Metrics;

const FIRST_TIME_OUT: Duration = Duration::from_secs(1);
const LONGEST_TIME_OUT: Duration = Duration::from_secs(10);

pub struct Node {
    pub engine: Box<dyn EngineNode>,
    /// `host:port`, for logs and metrics (no credentials).
    pub name: String,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    /// Failures in a row.
    failures: u32,
    /// Left out until then.
    out_until: Option<Instant>,
}

impl Health {
    fn time_out(failures: u32) -> Duration {
        (FIRST_TIME_OUT * 2u32.saturating_pow(failures.saturating_sub(1))).min(LONGEST_TIME_OUT)
    }
}

impl Node {
    pub fn new(name: String, engine: Box<dyn EngineNode>) -> Self {
        Node {
            engine,
            name,
            health: Mutex::new(Health::default()),
        }
    }

    /// The node answered (whatever its status): back in turn.
    pub fn answered(&self, metrics: &Metrics) {
        let mut health = self.health.lock().expect("poisoned");
        if health.failures > 0 {
            tracing::info!(node = %self.name, "storage engine node answers again");
            metrics.set_engine_node(&self.name, true);
        }
        *health = Health::default();
    }

    /// The node refused or broke a connection: left out for a while.
    pub fn failed(&self, metrics: &Metrics) {
        let mut health = self.health.lock().expect("poisoned");
        health.failures = health.failures.saturating_add(1);
        let time_out = Health::time_out(health.failures);
        health.out_until = Some(Instant::now() + time_out);
        if health.failures == 1 {
            tracing::warn!(node = %self.name, ?time_out, "storage engine node failed; leaving it out for a while");
            metrics.set_engine_node(&self.name, false);
        }
    }

    /// When the node may be called again (`None`: now).
    fn out_until(&self, now: Instant) -> Option<Instant> {
        let health = self.health.lock().expect("poisoned");
        health.out_until.filter(|until| *until > now)
    }
}

pub struct Nodes {
    nodes: Vec<Node>,
    next: AtomicUsize,
}

impl Nodes {
    /// At least one node.
    pub fn new(nodes: Vec<Node>, metrics: &Metrics) -> Self {
        assert!(!nodes.is_empty(), "storage.url lists no node");
        for node in &nodes {
            metrics.set_engine_node(&node.name, true);
        }
        Nodes {
            nodes,
            next: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The node to call next: the next in turn not left out, else the one due first.
    pub fn pick(&self) -> &Node {
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.nodes.len();
        let mut due_first: Option<(Instant, &Node)> = None;
        for i in 0..n {
            let node = &self.nodes[(start + i) % n];
            match node.out_until(now) {
                None => return node,
                Some(until) => {
                    if due_first.is_none_or(|(first, _)| until < first) {
                        due_first = Some((until, node));
                    }
                }
            }
        }
        due_first.map_or(&self.nodes[start % n], |(_, node)| node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use elasticsearch::http::transport::Transport;

    fn nodes(names: &[&str], metrics: &Metrics) -> Nodes {
        let nodes = names
            .iter()
            .map(|name| {
                let transport = Transport::single_node(&format!("http://{name}")).unwrap();
                let engine =
                    crate::storage::port::Http(elasticsearch::Elasticsearch::new(transport));
                Node::new((*name).to_owned(), Box::new(engine))
            })
            .collect();
        Nodes::new(nodes, metrics)
    }

    fn picks(nodes: &Nodes, n: usize) -> Vec<String> {
        (0..n).map(|_| nodes.pick().name.clone()).collect()
    }

    #[test]
    fn nodes_are_called_in_turn() {
        let metrics = Metrics::new();
        let nodes = nodes(&["a:1", "b:2", "c:3"], &metrics);
        assert_eq!(picks(&nodes, 4), ["a:1", "b:2", "c:3", "a:1"]);
    }

    #[test]
    fn a_failed_node_is_left_out_until_it_answers_again() {
        let metrics = Metrics::new();
        let nodes = nodes(&["a:1", "b:2", "c:3"], &metrics);
        nodes.nodes[1].failed(&metrics);
        assert!(picks(&nodes, 6).iter().all(|name| name != "b:2"));
        assert!(
            metrics
                .encode()
                .contains("mupdate_engine_node_up{node=\"b:2\"} 0")
        );
        nodes.nodes[1].answered(&metrics);
        assert!(picks(&nodes, 3).contains(&"b:2".to_owned()));
        assert!(
            metrics
                .encode()
                .contains("mupdate_engine_node_up{node=\"b:2\"} 1")
        );
    }

    #[test]
    fn with_every_node_left_out_the_one_due_first_is_called() {
        let metrics = Metrics::new();
        let nodes = nodes(&["a:1", "b:2"], &metrics);
        nodes.nodes[0].failed(&metrics);
        nodes.nodes[0].failed(&metrics);
        nodes.nodes[1].failed(&metrics);
        assert_eq!(picks(&nodes, 3), ["b:2", "b:2", "b:2"]);
    }

    #[test]
    fn the_time_out_doubles_up_to_its_cap() {
        let secs: Vec<u64> = (1..7).map(|n| Health::time_out(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 10, 10]);
        assert_eq!(Health::time_out(u32::MAX), LONGEST_TIME_OUT);
    }
}
