//! The broker's ceiling: a consumer that does the worker's broker work and nothing
//! else. It consumes with a prefetch, publishes a well-formed 200 reply (the worker's
//! default v1 shape: `result.total`, `result.hits` with each document's `_id` and, as
//! the worker's `include_source`, its body as `_source`) to `reply_to` with
//! `correlation_id`, on a channel with publisher confirms, and acks each request once
//! its reply is confirmed. Confirms are pipelined: the next delivery is handled while
//! earlier replies await theirs. It touches no engine.
//!
//! It runs as a child process of the benchmark (`--echo-consumer`), so its CPU is read
//! from /proc apart from the driver's, as the worker's is.

use std::io::Read;

use futures_util::StreamExt;
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::Deserialize;
use serde_json::value::RawValue;

const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The parts of an mUpdate envelope a reply repeats.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "requestId")]
    request_id: String,
    #[serde(borrow, default)]
    index: Option<&'a RawValue>,
    #[serde(borrow, default)]
    collection: Option<&'a RawValue>,
    #[serde(borrow, default)]
    volatile: Option<&'a RawValue>,
    #[serde(borrow)]
    body: Documents<'a>,
}

#[derive(Deserialize)]
struct Documents<'a> {
    #[serde(borrow, default)]
    documents: Vec<Document<'a>>,
    /// mDelete's (a mixed scenario's deletes).
    #[serde(borrow, default)]
    ids: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Document<'a> {
    #[serde(borrow)]
    _id: &'a RawValue,
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
}

fn raw(out: &mut Vec<u8>, value: Option<&RawValue>) {
    out.extend_from_slice(value.map_or("null", RawValue::get).as_bytes());
}

/// The reply to `body`: (status, requestId, reply body).
fn reply(body: &[u8]) -> (i16, String, Vec<u8>) {
    let Ok(e) = serde_json::from_slice::<Envelope>(body) else {
        let out = br#"{"status":400,"error":{"status":400,"id":"api.assert.invalid_argument","message":"echo: not an mUpdate envelope"},"result":null}"#;
        return (400, String::new(), out.to_vec());
    };
    let mut out = Vec::with_capacity(body.len() + 128 + e.body.documents.len() * 96);
    out.extend_from_slice(br#"{"requestId":"#);
    out.extend_from_slice(serde_json::to_string(&e.request_id).unwrap().as_bytes());
    out.extend_from_slice(
        br#","status":200,"error":null,"controller":"document","action":"mUpdate","index":"#,
    );
    raw(&mut out, e.index);
    out.extend_from_slice(br#","collection":"#);
    raw(&mut out, e.collection);
    out.extend_from_slice(br#","volatile":"#);
    raw(&mut out, e.volatile);
    out.extend_from_slice(br#","result":{"total":"#);
    let ids = e.body.ids.iter().map(|&_id| Document { _id, body: None });
    let documents: Vec<Document> = e.body.documents.into_iter().chain(ids).collect();
    out.extend_from_slice(documents.len().to_string().as_bytes());
    out.extend_from_slice(br#","hits":["#);
    for (i, d) in documents.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(br#"{"_id":"#);
        raw(&mut out, Some(d._id));
        out.extend_from_slice(br#","_index":"#);
        raw(&mut out, e.index);
        out.extend_from_slice(br#","_type":"#);
        raw(&mut out, e.collection);
        out.extend_from_slice(br#","_version":2,"result":"updated","status":200,"_source":"#);
        raw(&mut out, d.body);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}}");
    (200, e.request_id, out)
}

/// Serves `queue` until the connection fails or the benchmark (its parent) goes away.
pub fn run(url: &str, queue: &str, prefetch: u16) -> ! {
    // Stdin is a pipe from the benchmark: its end means the benchmark has ended.
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let result = runtime.block_on(serve(url, queue, prefetch));
    eprintln!("echo consumer: {result:?}");
    std::process::exit(2);
}

async fn serve(url: &str, queue: &str, prefetch: u16) -> Result<(), lapin::Error> {
    let properties =
        ConnectionProperties::default().with_connection_name("mupdate-bench-echo".into());
    let connection = Connection::connect(url, properties).await?;
    let consume = connection.create_channel().await?;
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    consume
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    let publish = connection.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut deliveries = consume
        .basic_consume(
            queue.into(),
            "mupdate-bench-echo".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        let Some(reply_to) = delivery
            .properties
            .reply_to()
            .as_ref()
            .map(|r| r.to_string())
        else {
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await?;
            continue;
        };
        let (status, request_id, body) = reply(&delivery.data);
        let correlation_id = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map_or(request_id, |c| c.to_string());
        let direct = reply_to.starts_with(DIRECT_REPLY_TO);
        let mut headers = FieldTable::default();
        headers.insert("status".into(), AMQPValue::ShortInt(status));
        let mut properties = BasicProperties::default()
            .with_correlation_id(correlation_id.as_str().into())
            .with_content_type("application/json".into())
            .with_headers(headers);
        if !direct {
            properties = properties.with_delivery_mode(2);
        }
        let confirm = publish
            .basic_publish(
                "".into(),
                reply_to.as_str().into(),
                // As the worker: RabbitMQ counts direct reply-to as unroutable for
                // mandatory publishes, though it delivers them.
                BasicPublishOptions {
                    mandatory: !direct,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await?;
        // Settle once the broker has confirmed the reply, without holding up the next
        // delivery.
        let acker = delivery.acker;
        tokio::spawn(async move {
            let settled = match confirm.await {
                Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => {
                    acker.ack(BasicAckOptions::default()).await
                }
                Ok(Confirmation::Ack(Some(_))) => {
                    acker.reject(BasicRejectOptions { requeue: false }).await
                }
                _ => {
                    acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        })
                        .await
                }
            };
            if let Err(err) = settled {
                eprintln!("echo consumer: settling a request: {err}");
            }
        });
    }
    Ok(())
}
