//! A dead letter's and a reply's properties travel in one AMQP frame, no larger than the
//! connection's negotiated `frame_max` (RabbitMQ closes the whole connection over a
//! larger one). A request whose own headers already fill the frame is dead-lettered
//! once, without them, and the worker goes on answering others.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::BasicConsumeOptions;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use support::*;

fn header<'a>(message: &'a lapin::message::Delivery, name: &str) -> Option<&'a AMQPValue> {
    message.properties.headers().as_ref()?.inner().get(name)
}

/// The bytes of a content header frame's payload with these properties: class id,
/// weight and body size (12 bytes), then the properties as lapin writes them.
fn header_payload(props: &BasicProperties) -> usize {
    let write = lapin::protocol::basic::gen_properties(props);
    12 + write(Vec::new().into()).unwrap().position as usize
}

/// `base` with a `pad` header making its header frame's payload exactly `payload` bytes.
fn padded(base: BasicProperties, headers: FieldTable, payload: usize) -> BasicProperties {
    let with = |n: usize| {
        let mut headers = headers.clone();
        headers.insert("pad".into(), AMQPValue::LongString(vec![b'p'; n].into()));
        base.clone().with_headers(headers)
    };
    let empty = header_payload(&with(0));
    let props = with(payload - empty);
    assert_eq!(header_payload(&props), payload);
    props
}

#[tokio::test]
async fn a_request_whose_headers_fill_the_frame_is_dead_lettered_once_and_others_answered() {
    headers_near_the_frame_limit_dead_lettered_once(0).await;
}

/// RabbitMQ takes a header frame up to 8 bytes over `frame_max` from a publisher and
/// delivers it as it is. lapin closed the consuming connection over it, before the worker
/// saw the request, at each delivery: on a classic queue (the default), for ever (4
/// reconnects in 8 s seen). The vendored lapin reads it (vendor/README.md): it is
/// dead-lettered once, like any request whose reply goes nowhere, and nothing reconnects.
#[tokio::test]
async fn a_request_whose_headers_pass_the_frame_by_rabbitmqs_8_bytes_is_read_and_dead_lettered() {
    headers_near_the_frame_limit_dead_lettered_once(8).await;
}

/// A request whose header frame is `over` bytes past the largest AMQP allows (frame_max
/// less the frame's 8 bytes), its reply going nowhere: dead-lettered once, without its
/// headers, and the next request answered by the same session.
async fn headers_near_the_frame_limit_dead_lettered_once(over: usize) {
    let mut settings = settings();
    let listen = format!("127.0.0.1:{}", free_port());
    settings.metrics.listen = listen.clone();
    let worker = Worker::start_with(settings.clone()).await;
    let amqp = Amqp::open().await;
    let frame_max = amqp.connection.configuration().frame_max() as usize;
    println!("negotiated frame_max: {frame_max}");

    // RabbitMQ takes it. Its reply goes nowhere, so it is dead-lettered.
    let mut own = FieldTable::default();
    own.insert("mine".into(), AMQPValue::LongString("kept".into()));
    own.insert(
        "x-mupdate-user-id".into(),
        AMQPValue::LongString("forged".into()),
    );
    let nowhere = fresh("no-such-queue");
    let base = BasicProperties::default()
        .with_reply_to(nowhere.as_str().into())
        .with_message_id("hostile".into());
    let hostile = padded(base, own, frame_max - 8 + over);
    let body = json!({"requestId": "hostile", "controller": "document", "action": "mNothing",
        "index": "i", "collection": "c", "body": {"documents": []}});
    publish(
        &amqp.channel,
        worker.request_queue(),
        &serde_json::to_vec(&body).unwrap(),
        hostile,
    )
    .await;

    let mut letters = amqp
        .channel
        .basic_consume(
            settings.amqp.dead_letter_queue.as_str().into(),
            "frame-test".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let dead = tokio::time::timeout(Duration::from_secs(20), letters.next())
        .await
        .expect("a dead letter in time")
        .unwrap()
        .unwrap();
    let said: Value = serde_json::from_slice(&dead.data).unwrap();
    assert_eq!(said["requestId"], "hostile");
    assert_eq!(
        header(&dead, "x-mupdate-reason"),
        Some(&AMQPValue::LongString("unroutable".into()))
    );
    assert_eq!(
        header(&dead, "x-mupdate-headers-dropped"),
        Some(&AMQPValue::Boolean(true))
    );
    assert_eq!(
        header(&dead, "pad"),
        None,
        "the request's headers are dropped"
    );
    assert_eq!(header(&dead, "x-mupdate-user-id"), None);
    assert_eq!(
        dead.properties.message_id().as_ref().map(|m| m.as_str()),
        Some("hostile"),
        "its other properties are kept"
    );

    // Another request is answered promptly, by the same session.
    let col = Collection::create(&[("a", json!({"n": 0}))]).await;
    let started = Instant::now();
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        call(
            &worker,
            &col.envelope(json!([{"_id": "a", "body": {"n": 1}}])),
        ),
    )
    .await
    .expect("another request answered within 10 s");
    assert_eq!(reply["status"], 200, "{reply}");
    println!("answered in {:?}", started.elapsed());
    assert_eq!(
        metric(&listen, "mupdate_broker_reconnects_total").await,
        0.0
    );
    // Dead-lettered once, and gone from the request queue.
    let again = tokio::time::timeout(Duration::from_secs(1), letters.next()).await;
    assert!(again.is_err(), "a second dead letter: {again:?}");
    wait_equal("the worker consuming again", Some((0, 1)), || {
        queue_counts(&settings.amqp.request_queue)
    })
    .await;

    amqp.close().await;
    worker.stop().await;
}
