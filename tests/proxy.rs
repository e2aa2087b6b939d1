//! The test proxy (tests/support/proxy.rs) in front of Elasticsearch: it forwards,
//! delays each direction by the latency set, cuts open connections, and stops on drop.

mod support;

use std::time::{Duration, Instant};

use support::proxy::Proxy;
use support::*;

async fn health(client: &reqwest::Client, proxy: &Proxy) -> reqwest::Result<u16> {
    let r = client
        .get(format!("{}/_cluster/health", proxy.url()))
        .send()
        .await?;
    let status = r.status().as_u16();
    r.text().await?;
    Ok(status)
}

#[tokio::test]
async fn forwards_delays_cuts_and_stops() {
    let proxy = Proxy::start("127.0.0.1:9200").await;
    assert_eq!(proxy.url(), format!("http://{}", proxy.addr()));
    // One client: its keep-alive connection is reused from one request to the next.
    let client = http();
    assert_eq!(health(&client, &proxy).await.unwrap(), 200);

    let (up, down) = (Duration::from_millis(300), Duration::from_millis(400));
    proxy.set_latency(up, down);
    let started = Instant::now();
    assert_eq!(health(&client, &proxy).await.unwrap(), 200);
    let took = started.elapsed();
    assert!(took >= up + down, "took {took:?}");

    proxy.set_latency(Duration::ZERO, Duration::ZERO);
    let started = Instant::now();
    assert_eq!(health(&client, &proxy).await.unwrap(), 200);
    assert!(started.elapsed() < up + down, "no delay any more");

    // A request in flight on the open connection fails when it is cut, well before
    // its reply would have come back; a new connection then works as before.
    proxy.set_latency(Duration::ZERO, Duration::from_secs(5));
    let in_flight = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url());
        async move { client.get(format!("{url}/_cluster/health")).send().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    proxy.cut();
    let cut = tokio::time::timeout(Duration::from_secs(3), in_flight)
        .await
        .expect("the cut request fails at once")
        .unwrap();
    assert!(cut.is_err(), "{cut:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    proxy.set_latency(Duration::ZERO, Duration::ZERO);
    assert_eq!(health(&client, &proxy).await.unwrap(), 200);

    // Dropped: the port refuses connections (within a bounded wait).
    let addr = proxy.addr();
    drop(proxy);
    let deadline = Instant::now() + TIMEOUT;
    while tokio::net::TcpStream::connect(&addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the proxy still listens");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_frozen_proxy_forwards_nothing_until_thawed() {
    let proxy = Proxy::start("127.0.0.1:9200").await;
    let client = http();
    assert_eq!(health(&client, &proxy).await.unwrap(), 200);
    proxy.freeze();
    let held = tokio::time::timeout(Duration::from_millis(800), health(&client, &proxy)).await;
    assert!(held.is_err(), "a frozen target answers nothing");
    let fresh = reqwest::Client::new();
    let call = tokio::spawn({
        let url = format!("{}/_cluster/health", proxy.url());
        async move { fresh.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!call.is_finished(), "a new connection is held too");
    proxy.thaw();
    let status = tokio::time::timeout(Duration::from_secs(10), call).await;
    assert_eq!(status.unwrap().unwrap().unwrap(), 200);
}

#[tokio::test]
async fn a_proxy_that_is_down_refuses_and_cuts_until_up() {
    let proxy = Proxy::start("127.0.0.1:9200").await;
    let client = http();
    assert_eq!(health(&client, &proxy).await.unwrap(), 200);
    proxy.set_latency(Duration::ZERO, Duration::from_secs(5));
    let in_flight = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url());
        async move { client.get(format!("{url}/_cluster/health")).send().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.down();
    let cut = tokio::time::timeout(Duration::from_secs(3), in_flight).await;
    assert!(cut.expect("cut at once").unwrap().is_err());
    proxy.set_latency(Duration::ZERO, Duration::ZERO);
    // The port refuses (within a bounded wait: the listener closes as it notices).
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let connected = tokio::net::TcpStream::connect(proxy.addr()).await;
        match connected {
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
                break;
            }
            Ok(_) => assert!(Instant::now() < deadline, "the proxy still listens"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.up();
    let deadline = Instant::now() + TIMEOUT;
    while health(&http(), &proxy).await.is_err() {
        assert!(Instant::now() < deadline, "the proxy listens again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
