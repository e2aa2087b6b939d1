#!/usr/bin/env node
// Sends one document:mUpdate (or mUpsert, or mDelete) to mupdate-worker over RabbitMQ and
// waits for its reply: an RPC over AMQP with amqplib.
//
//   node rpc_client.js --index shop --collection products \
//       --documents '[{"_id": "p1", "body": {"price": 10}}]'
//   node rpc_client.js --index shop --collection products --action mDelete --ids '["p1"]'
//
// The request is published to the worker's request queue with `replyTo` (an exclusive
// server-named queue by default, or RabbitMQ's direct reply-to with --reply-queue direct)
// and `correlationId` = the requestId; the reply with that correlationId is awaited at
// most --timeout seconds.
//
// Exit codes: 0 all documents written (200), 1 some failed (206: each is printed),
// 2 bad arguments, 3 the request failed as a whole (its status, error id and message are
// printed), 4 no reply within --timeout, 5 the broker is unreachable or refused the
// request (e.g. no such queue).
'use strict';

const { parseArgs } = require('node:util');
const { randomUUID } = require('node:crypto');
const fs = require('node:fs');
const amqp = require('amqplib');

const DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to';

// What each action does to a document, as the output says it.
const DONE = { mUpdate: 'updated', mUpsert: 'updated', mDelete: 'deleted' };

function usage(message) {
  console.error(`${message}\nusage: node rpc_client.js --index I --collection C ` +
    '(--documents JSON|- | --action mDelete --ids JSON|-) ' +
    '[--queue Q] [--url URL] [--action mUpdate|mUpsert|mDelete] [--refresh wait_for|false] ' +
    '[--timeout SECONDS] [--reply-queue exclusive|direct]');
  process.exit(2);
}

function options() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        url: { type: 'string', default: process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f' },
        queue: { type: 'string', default: process.env.MUPDATE_QUEUE || 'mupdate.requests' },
        index: { type: 'string' },
        collection: { type: 'string' },
        action: { type: 'string', default: 'mUpdate' },
        documents: { type: 'string' },
        ids: { type: 'string' },
        refresh: { type: 'string' },
        timeout: { type: 'string', default: '10' },
        'reply-queue': { type: 'string', default: 'exclusive' },
      },
    }));
  } catch (e) {
    usage(e.message);
  }
  if (!(values.action in DONE)) usage('--action: mUpdate, mUpsert or mDelete');
  // mDelete lists ids (`body.ids`); the others, documents (`body.documents`).
  const listed = values.action === 'mDelete' ? 'ids' : 'documents';
  for (const key of ['index', 'collection', listed]) {
    if (values[key] === undefined) usage(`--${key} is required`);
  }
  if (!['exclusive', 'direct'].includes(values['reply-queue'])) usage('--reply-queue: exclusive or direct');
  if (values.refresh !== undefined && !['wait_for', 'false'].includes(values.refresh)) usage('--refresh: wait_for or false');
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) usage('--timeout: a number of seconds');
  let entries;
  try {
    entries = JSON.parse(values[listed] === '-' ? fs.readFileSync(0, 'utf8') : values[listed]);
  } catch (e) {
    usage(`--${listed} must be a JSON array: ${e.message}`);
  }
  if (!Array.isArray(entries)) usage(`--${listed} must be a JSON array`);
  return { ...values, timeout, body: { [listed]: entries } };
}

function report(reply, done) {
  const { status } = reply;
  const result = reply.result || {};
  const error = reply.error || {};
  if (status === 200 || status === 206) {
    // Kuzzle 1 format: result.hits; v2 format: result.successes and result.errors.
    const hits = result.hits || result.successes || [];
    const errors = error.errors || result.errors || [];
    for (const hit of hits) {
      // mDelete's v2 successes are the deleted ids.
      if (typeof hit === 'string') console.log(`${done} ${hit}`);
      else console.log(`${done} ${hit._id} version ${hit._version} status ${hit.status}`);
    }
    for (const failed of errors) {
      // mDelete's errors are `{_id, reason, status}`; the others echo the document.
      const doc = 'document' in failed ? failed.document : failed;
      const id = doc && typeof doc === 'object' ? doc._id : doc;
      console.log(`failed ${id} status ${failed.status}: ${failed.reason}`);
    }
    console.log(`${status}: ${hits.length} ${done}, ${errors.length} failed`);
    return errors.length === 0 ? 0 : 1;
  }
  console.log(`${status} ${error.id}: ${error.message}`);
  return 3;
}

async function main() {
  const args = options();
  const requestId = randomUUID();
  const envelope = {
    index: args.index,
    collection: args.collection,
    controller: 'document',
    action: args.action,
    requestId,
    body: args.body,
  };
  if (args.refresh !== undefined) envelope.refresh = args.refresh;

  let connection;
  try {
    connection = await amqp.connect(args.url);
  } catch (e) {
    console.error(`cannot connect to ${args.url}: ${e.message}`);
    return 5;
  }
  connection.on('error', () => {}); // reported through the calls that fail
  try {
    // Confirms + mandatory: a request queue that doesn't exist is reported at once
    // instead of as a timeout.
    const channel = await connection.createConfirmChannel();
    let replyTo = DIRECT_REPLY_TO;
    if (args['reply-queue'] === 'exclusive') {
      ({ queue: replyTo } = await channel.assertQueue('', { exclusive: true, autoDelete: true }));
    }
    let resolve;
    const outcome = new Promise((r) => { resolve = r; });
    const timer = setTimeout(() => resolve({ timeout: true }), args.timeout * 1000);
    channel.on('return', (message) => {
      if (message.properties.correlationId === requestId) resolve({ unroutable: true });
    });
    // Direct reply-to: consume the pseudo-queue (no ack) before publishing, on the same
    // channel.
    await channel.consume(replyTo, (message) => {
      if (message && message.properties.correlationId === requestId) resolve({ reply: message.content });
    }, { noAck: true });
    channel.publish('', args.queue, Buffer.from(JSON.stringify(envelope)), {
      contentType: 'application/json',
      correlationId: requestId,
      replyTo,
      persistent: true,
      mandatory: true,
    });
    await channel.waitForConfirms();
    const got = await outcome;
    clearTimeout(timer);
    if (got.unroutable) {
      console.error(`no queue named '${args.queue}' took the request`);
      return 5;
    }
    if (got.timeout) {
      console.error(`no reply to ${requestId} within ${args.timeout} s`);
      return 4;
    }
    return report(JSON.parse(got.reply.toString('utf8')), DONE[args.action]);
  } catch (e) {
    console.error(`broker error: ${e.message}`);
    return 5;
  } finally {
    await connection.close().catch(() => {});
  }
}

main().then((code) => process.exit(code));
