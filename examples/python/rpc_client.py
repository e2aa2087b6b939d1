#!/usr/bin/env python3
"""Sends one document:mUpdate (or mUpsert, or mCreate) to mupdate-worker over RabbitMQ and waits for
its reply: an RPC over AMQP with pika.

    python rpc_client.py --index shop --collection products \
        --documents '[{"_id": "p1", "body": {"price": 10}}]'

The request is published to the worker's request queue with `reply_to` (RabbitMQ's
direct reply-to by default, or an exclusive server-named queue with --reply-queue
exclusive) and `correlation_id` = the requestId; the reply with that correlation_id
is awaited at most --timeout seconds.

mCreate takes documents {"body"} or {"_id", "body"}: a document left without an _id gets
one made for it.

Exit codes: 0 all documents written (200), 1 some failed (206: each is printed),
2 bad arguments, 3 the request failed as a whole (its status, error id and message
are printed), 4 no reply within --timeout, 5 the broker is unreachable or refused the
request (e.g. no such queue).
"""

import argparse
import json
import os
import sys
import time
import uuid

import pika
import pika.exceptions

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

# What each action does to a document, as the output says it.
DONE = {"mUpdate": "updated", "mUpsert": "updated", "mCreate": "created"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
                   help="broker URL (env AMQP_URL)")
    p.add_argument("--queue", default=os.environ.get("MUPDATE_QUEUE", "mupdate.requests"),
                   help="the worker's request queue (env MUPDATE_QUEUE)")
    p.add_argument("--index", required=True, help="Kuzzle index")
    p.add_argument("--collection", required=True, help="Kuzzle collection")
    p.add_argument("--action", default="mUpdate", choices=list(DONE))
    p.add_argument("--documents", required=True,
                   help='a JSON array of {"_id", "body"} (mUpsert: {"_id", "changes", "default"}; '
                        'mCreate: {"_id"?, "body"}), or - for stdin')
    p.add_argument("--refresh", choices=["wait_for", "false"], help="wait_for: reply once searchable")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply")
    p.add_argument("--reply-queue", choices=["direct", "exclusive"], default="direct",
                   help="direct reply-to (default) or an exclusive reply queue")
    args = p.parse_args()
    try:
        text = sys.stdin.read() if args.documents == "-" else args.documents
        args.documents = json.loads(text)
        if not isinstance(args.documents, list):
            raise ValueError("not an array")
    except ValueError as e:
        p.error(f"--documents must be a JSON array: {e}")
    return args


def main():
    args = parse_args()
    request_id = str(uuid.uuid4())
    envelope = {
        "index": args.index,
        "collection": args.collection,
        "controller": "document",
        "action": args.action,
        "requestId": request_id,
        "body": {"documents": args.documents},
    }
    if args.refresh:
        envelope["refresh"] = args.refresh

    try:
        connection = pika.BlockingConnection(pika.URLParameters(args.url))
    except pika.exceptions.AMQPError as e:
        print(f"cannot connect to {args.url}: {e!r}", file=sys.stderr)
        return 5
    try:
        channel = connection.channel()
        if args.reply_queue == "direct":
            # Direct reply-to: consume the pseudo-queue (no ack) before publishing, on
            # the same channel.
            reply_to = DIRECT_REPLY_TO
        else:
            declared = channel.queue_declare(queue="", exclusive=True, auto_delete=True)
            reply_to = declared.method.queue
        reply = {}

        def on_reply(_channel, _method, properties, body):
            if properties.correlation_id == request_id:
                reply["body"] = body

        channel.basic_consume(queue=reply_to, on_message_callback=on_reply, auto_ack=True)
        # Confirms + mandatory: a request queue that doesn't exist is reported at once
        # instead of as a timeout.
        channel.confirm_delivery()
        try:
            channel.basic_publish(
                exchange="",
                routing_key=args.queue,
                body=json.dumps(envelope).encode(),
                properties=pika.BasicProperties(
                    content_type="application/json",
                    correlation_id=request_id,
                    reply_to=reply_to,
                    delivery_mode=pika.DeliveryMode.Persistent,
                ),
                mandatory=True,
            )
        except pika.exceptions.UnroutableError:
            print(f"no queue named {args.queue!r} took the request", file=sys.stderr)
            return 5
        except pika.exceptions.NackError:
            print("the broker refused the request", file=sys.stderr)
            return 5

        deadline = time.monotonic() + args.timeout
        while "body" not in reply:
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"no reply to {request_id} within {args.timeout:g} s", file=sys.stderr)
                return 4
            connection.process_data_events(time_limit=min(left, 0.5))
        return report(json.loads(reply["body"]), DONE[args.action])
    except pika.exceptions.AMQPError as e:
        print(f"broker error: {e!r}", file=sys.stderr)
        return 5
    finally:
        if connection.is_open:
            connection.close()


def report(reply, done):
    status = reply.get("status")
    result = reply.get("result") or {}
    error = reply.get("error") or {}
    if status in (200, 206):
        # Kuzzle 1 format: result.hits; v2 format: result.successes and result.errors.
        hits = result.get("hits", result.get("successes", []))
        errors = error.get("errors", result.get("errors", []))
        for hit in hits:
            print(f"{done} {hit.get('_id')} version {hit.get('_version')} status {hit.get('status')}")
        for failed in errors:
            doc = failed.get("document") or {}
            doc_id = doc.get("_id") if isinstance(doc, dict) else doc
            print(f"failed {doc_id} status {failed.get('status')}: {failed.get('reason')}")
        print(f"{status}: {len(hits)} {done}, {len(errors)} failed")
        return 0 if not errors else 1
    print(f"{status} {error.get('id')}: {error.get('message')}")
    return 3


if __name__ == "__main__":
    sys.exit(main())
