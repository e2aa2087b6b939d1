// A stand-in for uWebSockets.js (which Kuzzle fetches as a GitHub tarball, out of reach
// here): the part of its HTTP API that Kuzzle's HTTP entry point
// (lib/core/network/protocols/httpwsProtocol.js) uses, on node:http. Test harness only:
// no WebSocket (disable it in .kuzzlerc), no multipart parsing, no backpressure (node
// buffers what it can't send yet, so every write "succeeds").
//
//   App().any(pattern, handler(res, req))   every method, every path ("/*" only)
//   App().listen(port, cb(listenSocket|false))
//   req: getHeader, forEach, getUrl, getQuery, getMethod
//   res: onData, onAborted, cork, writeStatus, writeHeader, write, tryEnd, end,
//        onWritable, getWriteOffset, getRemoteAddressAsText
"use strict";

const http = require("node:http");

// uWS binds every interface; the harness listens on loopback only unless told otherwise.
const HOST = process.env.UWS_SHIM_HOST || "127.0.0.1";

const text = (value) => (typeof value === "string" ? value : Buffer.from(value).toString());
// Kuzzle writes Buffers, strings and ArrayBuffers.
const bytes = (value) => (value === undefined ? undefined : Buffer.from(value));

// The request, as uWS hands it to a handler: headers by lower-case name, the path
// without its query, the query without its "?", the method in lower case.
class HttpRequest {
  constructor(incoming) {
    const url = incoming.url || "/";
    const q = url.indexOf("?");
    this._url = q === -1 ? url : url.slice(0, q);
    this._query = q === -1 ? "" : url.slice(q + 1);
    this._method = incoming.method.toLowerCase();
    this._headers = incoming.headers; // node: lower-case names, repeated ones joined
  }

  getHeader(name) {
    const value = this._headers[name.toLowerCase()];
    return value === undefined ? "" : String(value);
  }

  forEach(cb) {
    for (const [name, value] of Object.entries(this._headers)) cb(name, String(value));
  }

  getUrl() {
    return this._url;
  }

  getQuery() {
    return this._query;
  }

  getMethod() {
    return this._method;
  }
}

// The response: status and headers are collected until the first byte of the body.
class HttpResponse {
  constructor(incoming, outgoing) {
    this._in = incoming;
    this._out = outgoing;
    this._offset = 0;
    this._ended = false;
    outgoing.on("close", () => {
      if (!this._ended && this._onAborted) this._onAborted();
    });
  }

  // Body chunks as ArrayBuffers, then an empty last one (also for a request without
  // a body, as Kuzzle expects); none once the response is sent (uWS closes then).
  onData(cb) {
    this._in.on("data", (chunk) => {
      if (this._ended) return;
      cb(chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.length), false);
    });
    this._in.on("end", () => {
      if (!this._ended) cb(new ArrayBuffer(0), true);
    });
    return this;
  }

  onAborted(cb) {
    this._onAborted = cb;
    return this;
  }

  // uWS batches syscalls in a cork; node needs nothing of the kind.
  cork(cb) {
    cb();
    return this;
  }

  writeStatus(status) {
    this._out.statusCode = parseInt(text(status), 10);
    return this;
  }

  writeHeader(name, value) {
    this._out.appendHeader(text(name), text(value));
    return this;
  }

  write(chunk) {
    const data = bytes(chunk);
    this._offset += data.length;
    this._out.write(data);
    return true;
  }

  // Sends `chunk`, and ends the response once `totalSize` bytes are out:
  // [ok, done] as uWS answers it (always ok: node buffers).
  tryEnd(chunk, totalSize) {
    const data = bytes(chunk);
    if (this._offset + data.length >= totalSize) {
      this.end(data);
      return [true, true];
    }
    this.write(data);
    return [true, false];
  }

  end(chunk) {
    const data = bytes(chunk);
    if (data) this._offset += data.length;
    this._ended = true;
    this._out.end(data);
    return this;
  }

  // Never called: writes never fail here.
  onWritable(cb) {
    this._onWritable = cb;
    return this;
  }

  getWriteOffset() {
    return this._offset;
  }

  getRemoteAddressAsText() {
    return Buffer.from(this._in.socket.remoteAddress || "");
  }
}

class TemplatedApp {
  constructor() {
    this._handler = null;
    this._server = http.createServer((incoming, outgoing) => {
      if (!this._handler) {
        outgoing.statusCode = 404;
        outgoing.end();
        return;
      }
      this._handler(new HttpResponse(incoming, outgoing), new HttpRequest(incoming));
    });
  }

  any(pattern, handler) {
    if (pattern !== "/*") throw new Error(`uws-shim: only "/*" is routed, not ${pattern}`);
    this._handler = handler;
    return this;
  }

  ws() {
    throw new Error("uws-shim: no WebSocket; set server.protocols.websocket.enabled to false");
  }

  listen(port, cb) {
    this._server.once("error", () => cb(false));
    this._server.listen(port, HOST, () => cb(this._server));
    return this;
  }
}

module.exports = {
  App: () => new TemplatedApp(),
  // Compression modes Kuzzle reads when parsing its WebSocket options.
  DISABLED: 0,
  SHARED_COMPRESSOR: 1,
};
