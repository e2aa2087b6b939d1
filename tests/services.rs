//! The servers the suite runs against are the real ones, and behave as the worker
//! relies on: partial updates with retry_on_conflict, publisher confirms, manual acks.

mod support;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use support::*;

#[tokio::test]
async fn the_engine_is_a_real_elasticsearch_or_opensearch() {
    // The integ-test distribution has no `GET /` (module rest-root); node info has the version.
    let info: Value = http()
        .get(format!(
            "{ES_URL}/_nodes/_local?filter_path=nodes.*.version,nodes.*.build_flavor"
        ))
        .send()
        .await
        .expect("an engine at MUPDATE_TEST_ES_URL (default 127.0.0.1:9200)")
        .json()
        .await
        .unwrap();
    let node = info["nodes"].as_object().unwrap().values().next().unwrap();
    let version = node["version"].as_str().unwrap();
    // Elasticsearch 7, 8, 9, OpenSearch 2, 3: the engines of scripts/versions.env.
    let major = version.split('.').next().unwrap();
    assert!(["7", "8", "9", "2", "3"].contains(&major), "{version}");
    // The matrix (scripts/conformance.sh) names the version it started: the tests must
    // be talking to that engine, not to another on a default port.
    if let Ok(want) = std::env::var("MUPDATE_TEST_ENGINE_VERSION") {
        assert_eq!(version, want, "the engine at {ES_URL}");
    }
}

#[test]
fn the_broker_is_a_real_rabbitmq() {
    // lapin doesn't expose the server properties: read them from the broker's
    // Connection.Start, the first frame it sends after the protocol header.
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect("127.0.0.1:5672").expect("a broker on 5672");
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    socket.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    let mut header = [0u8; 7];
    socket.read_exact(&mut header).unwrap();
    let size = u32::from_be_bytes(header[3..7].try_into().unwrap()) as usize;
    let mut frame = vec![0u8; size];
    socket.read_exact(&mut frame).unwrap();
    assert_eq!(header[0], 1, "a method frame");
    assert_eq!(&frame[..4], &[0, 10, 0, 10], "connection.start");
    let text = String::from_utf8_lossy(&frame);
    assert!(text.contains("productS\0\0\0\x08RabbitMQ"), "{text}");
    assert!(text.contains("version"), "{text}");
}

#[tokio::test]
async fn a_bulk_update_merges_fields_bumps_the_version_and_404s_a_missing_id() {
    let col = Collection::create(&[("a", json!({"x": 1, "keep": "k"}))]).await;
    let body = format!(
        "{}\n{}\n{}\n{}\n",
        json!({"update": {"_index": col.physical, "_id": "a", "retry_on_conflict": 3}}),
        json!({"doc": {"y": 2}}),
        json!({"update": {"_index": col.physical, "_id": "missing", "retry_on_conflict": 3}}),
        json!({"doc": {"y": 2}}),
    );
    let response: Value = http()
        .post(format!("{ES_URL}/_bulk"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(response["items"][0]["update"]["status"], 200);
    assert_eq!(response["items"][1]["update"]["status"], 404);
    let (source, version) = col.get("a").await;
    assert_eq!(source, json!({"x": 1, "keep": "k", "y": 2}));
    assert_eq!(version, 2);
    let physical = col.physical.clone();
    drop(col);
    assert!(!index_exists(&physical).await, "the test index is deleted");
}

#[tokio::test]
async fn a_confirmed_message_is_consumed_with_a_manual_ack_byte_for_byte() {
    let amqp = Amqp::open().await;
    let queue = fresh("services.bytes");
    amqp.channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let bytes: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    publish(&amqp.channel, &queue, &bytes, BasicProperties::default()).await;
    let mut consumer = amqp
        .channel
        .basic_consume(
            queue.as_str().into(),
            "bytes".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(TIMEOUT, consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delivery.data, bytes);
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    let (ready, _) = queue_counts(&queue).await.unwrap();
    assert_eq!(ready, 0);
    amqp.close().await;
    delete_queues(&[&queue]).await;
}
