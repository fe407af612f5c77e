#!/usr/bin/env node
// h2tunnel.mjs -- an independent HBONE peer built only on Node's built-in
// modules (node:http2, node:net, node:tls, node:crypto, node:fs, node:stream).
// No npm packages; Node >= 18.
//
// HBONE = TCP carried in HTTP/2 CONNECT streams over mutual TLS (Istio
// ambient / ztunnel, port 15008 by convention).  This script is used by the
// hbonex interop tests (as a CONNECT client against the Python server, and as
// a CONNECT server behind the Python client) and by the benchmark as a
// Node-to-Node baseline.
//
// Subcommands (see tests/node/README.md):
//
//   server  --listen HOST:PORT [--max-streams N] [--require-spiffe-prefix P]
//   forward --listen HOST:PORT --server HOST:PORT --target HOST:PORT
//           [--server-spiffe URI] [--max-streams N]
//   client  --server HOST:PORT --target HOST:PORT --streams N --bytes B
//           [--server-spiffe URI] [--concurrency C] [--chunk BYTES]
//           [--timeout SECONDS]
//
// Common: --ca FILE --cert FILE --key FILE (mTLS, TLS >= 1.3, ALPN h2),
//         [--no-stdin-watch] [--no-decouple]  (see the Decoupler comment)
//
// stdout carries JSON lines only (ready line, and for `client` one line per
// stream plus a final summary).  stderr carries JSON log lines.
//
// Lifetime: exits cleanly (code 0) on SIGTERM / SIGINT / SIGHUP, and -- when stdin is a
// pipe or socket -- when stdin reaches EOF, so a dying parent that spawned us
// with stdin=PIPE never leaves us behind.  stdin that is /dev/null or a TTY is
// *not* watched (otherwise a child started with inherited /dev/null stdin
// would exit immediately); pass --no-stdin-watch to disable watching entirely.

import http2 from 'node:http2';
import net from 'node:net';
import tls from 'node:tls';
import crypto from 'node:crypto';
import fs from 'node:fs';
import { Duplex } from 'node:stream';

const {
  NGHTTP2_NO_ERROR,
  NGHTTP2_CANCEL,
  NGHTTP2_REFUSED_STREAM,
  NGHTTP2_CONNECT_ERROR,
  HTTP2_HEADER_METHOD,
  HTTP2_HEADER_AUTHORITY,
  HTTP2_HEADER_STATUS,
} = http2.constants;

// ztunnel-like HTTP/2 tuning.
const INITIAL_STREAM_WINDOW = 4 * 1024 * 1024; // SETTINGS_INITIAL_WINDOW_SIZE
const CONNECTION_WINDOW = 16 * 1024 * 1024; // via session.setLocalWindowSize
const MAX_FRAME_SIZE = 1024 * 1024; // node allows 16384 .. 2**24-1
const DEFAULT_MAX_STREAMS = 200;
// Node refuses new streams (ENHANCE_YOUR_CALM) once a session's tracked memory
// exceeds this many MB; the default (10) is too small for 16 MiB windows.
const MAX_SESSION_MEMORY_MB = 256;

const H2_ERROR_NAMES = {
  0x0: 'NO_ERROR',
  0x1: 'PROTOCOL_ERROR',
  0x2: 'INTERNAL_ERROR',
  0x3: 'FLOW_CONTROL_ERROR',
  0x4: 'SETTINGS_TIMEOUT',
  0x5: 'STREAM_CLOSED',
  0x6: 'FRAME_SIZE_ERROR',
  0x7: 'REFUSED_STREAM',
  0x8: 'CANCEL',
  0x9: 'COMPRESSION_ERROR',
  0xa: 'CONNECT_ERROR',
  0xb: 'ENHANCE_YOUR_CALM',
  0xc: 'INADEQUATE_SECURITY',
  0xd: 'HTTP_1_1_REQUIRED',
};
const h2ErrorName = (code) => H2_ERROR_NAMES[code] ?? `0x${Number(code).toString(16)}`;

// ---------------------------------------------------------------- utilities

// Best short name for an error: prefer the underlying cause (e.g. the TLS /
// SPIFFE failure behind an ERR_HTTP2_STREAM_CANCEL).
function errName(err) {
  if (!err) return null;
  const c = err.cause;
  if (c && (c.code || c.message)) return c.code || c.message;
  return err.code || err.message || String(err);
}

// Abort a TCP socket with RST when possible (tunnel failure), else just destroy.
function abortSocket(sock) {
  if (sock.destroyed) return;
  if (typeof sock.resetAndDestroy === 'function' && !sock.connecting) sock.resetAndDestroy();
  else sock.destroy();
}

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function log(obj) {
  process.stderr.write(JSON.stringify({ t: new Date().toISOString(), ...obj }) + '\n');
}

function die(msg) {
  process.stderr.write(`h2tunnel: ${msg}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const flags = new Set(['no-stdin-watch', 'no-decouple']);
  const opts = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) die(`unexpected argument: ${a}`);
    let key = a.slice(2);
    let val;
    const eq = key.indexOf('=');
    if (eq >= 0) {
      val = key.slice(eq + 1);
      key = key.slice(0, eq);
    } else if (flags.has(key)) {
      val = true;
    } else {
      if (i + 1 >= argv.length) die(`missing value for --${key}`);
      val = argv[++i];
    }
    opts[key] = val;
  }
  return opts;
}

// "127.0.0.1:80", "[::1]:80", "localhost:80" -> {host, port}
function parseHostPort(s, what) {
  let m = /^\[([^\]]+)\]:(\d+)$/.exec(s);
  if (!m) m = /^([^:\[\]]+):(\d+)$/.exec(s);
  if (!m) die(`bad ${what} address (want HOST:PORT or [V6]:PORT): ${s}`);
  const port = Number(m[2]);
  if (!(port >= 0 && port <= 65535)) die(`bad port in ${what}: ${s}`);
  return { host: m[1], port };
}

function formatHostPort(host, port) {
  return net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`;
}

function intOpt(opts, key, dflt) {
  if (opts[key] === undefined) {
    if (dflt === undefined) die(`--${key} is required`);
    return dflt;
  }
  const n = Number(opts[key]);
  if (!Number.isInteger(n) || n < 0) die(`--${key} must be a non-negative integer`);
  return n;
}

function loadTls(opts) {
  for (const k of ['ca', 'cert', 'key']) if (!opts[k]) die(`--${k} FILE is required`);
  return {
    ca: fs.readFileSync(opts.ca),
    cert: fs.readFileSync(opts.cert),
    key: fs.readFileSync(opts.key),
    minVersion: 'TLSv1.3',
    ALPNProtocols: ['h2'],
  };
}

function h2Settings(maxStreams) {
  return {
    initialWindowSize: INITIAL_STREAM_WINDOW,
    maxFrameSize: MAX_FRAME_SIZE,
    maxConcurrentStreams: maxStreams,
    enablePush: false,
  };
}

// URI SANs out of a peer certificate's `subjectaltname` string, e.g.
// 'URI:spiffe://cluster.local/ns/default/sa/x, IP Address:127.0.0.1'.
// Node JSON-quotes values containing special characters ('URI:"a,b"').
function uriSans(cert) {
  const san = cert && cert.subjectaltname;
  if (!san) return [];
  const uris = [];
  const re = /(?:^|, )URI:("(?:[^"\\]|\\.)*"|[^,]*)/g;
  let m;
  while ((m = re.exec(san)) !== null) {
    let v = m[1];
    if (v.startsWith('"')) {
      try { v = JSON.parse(v); } catch { /* keep raw */ }
    }
    uris.push(v);
  }
  return uris;
}

function setupLifetime(opts, cleanup) {
  let exiting = false;
  const bye = (why) => {
    if (exiting) return;
    exiting = true;
    log({ event: 'exit', reason: why });
    try { cleanup(); } catch { /* ignore */ }
    process.exit(0);
  };
  process.on('SIGTERM', () => bye('SIGTERM'));
  process.on('SIGINT', () => bye('SIGINT'));
  process.on('SIGHUP', () => bye('SIGHUP'));
  if (!opts['no-stdin-watch']) {
    let st;
    try { st = fs.fstatSync(0); } catch { st = null; }
    if (st && (st.isFIFO() || st.isSocket())) {
      process.stdin.on('data', () => {}); // discard whatever the parent writes
      process.stdin.on('end', () => bye('stdin closed'));
      process.stdin.on('error', () => bye('stdin error'));
      process.stdin.resume();
    }
  }
  // stdout is a pipe to the parent; if it goes away, so do we.
  process.stdout.on('error', () => bye('stdout error'));
}

// ---------------------------------------------------------------- decoupler
//
// Why this exists: node:http2 stops reading its socket while one of its own
// socket writes is still in progress (Http2Session::MaybeStopReading in
// src/node_http2.cc: `want_read == 0 || is_write_in_progress()`).  When two
// node:http2 peers both push bulk data (e.g. an echo tunnel) with windows
// larger than the kernel socket buffers (16 MiB connection window here), both
// end up with a pending write into a full socket while neither reads:
// a permanent deadlock (observed: 3 streams x 10 MB through an echo target).
//
// The fix: put a tiny JS Duplex between TLS and the TCP socket that accepts
// every write at once (queuing it in the net.Socket's writable buffer), so
// the session's writes always complete and it keeps reading.  The extra
// memory is bounded by HTTP/2 flow control (what the peer lets us send: at
// most its connection window plus control frames).  Reads still apply
// backpressure (pause the TCP socket when TLS/http2 stops reading).
// --no-decouple turns this off (plain node:http2 over TLS over TCP).
class Decoupler extends Duplex {
  constructor(inner) {
    super({ allowHalfOpen: true, readableHighWaterMark: 256 * 1024, writableHighWaterMark: 256 * 1024 });
    this.inner = inner;
    this.peer = inner.remoteAddress ? formatHostPort(inner.remoteAddress, inner.remotePort) : null;
    inner.on('data', (d) => { if (!this.push(d)) inner.pause(); });
    inner.on('end', () => this.push(null));
    inner.on('error', (err) => this.destroy(err));
    inner.on('close', () => this.destroy());
    inner.on('connect', () => {
      this.peer = formatHostPort(inner.remoteAddress, inner.remotePort);
      this.emit('connect');
    });
  }

  _read() { this.inner.resume(); }

  _write(chunk, encoding, cb) {
    if (this.inner.destroyed) { cb(new Error('socket destroyed')); return; }
    this.inner.write(chunk);
    cb();
  }

  _writev(chunks, cb) {
    if (this.inner.destroyed) { cb(new Error('socket destroyed')); return; }
    for (const { chunk } of chunks) this.inner.write(chunk);
    cb();
  }

  _final(cb) { this.inner.end(); cb(); }

  _destroy(err, cb) { this.inner.destroy(); cb(err); }
}

// Peer "ip:port" of an http2 session (works with and without the Decoupler).
function sessionPeer(session) {
  const sock = session.socket;
  if (sock && sock.remoteAddress) return formatHostPort(sock.remoteAddress, sock.remotePort);
  try {
    const shim = sock && sock.ssl && sock.ssl._parentWrap && sock.ssl._parentWrap.stream;
    if (shim && shim.peer) return shim.peer;
  } catch { /* internal layout changed; not important */ }
  return null;
}

// ------------------------------------------------------------------- server

function runServer(opts) {
  const tlsOpts = loadTls(opts);
  const listen = parseHostPort(opts.listen ?? die('--listen is required'), '--listen');
  const maxStreams = intOpt(opts, 'max-streams', DEFAULT_MAX_STREAMS);
  const prefix = opts['require-spiffe-prefix'];
  let tunnelSeq = 0;

  const server = http2.createSecureServer({
    ...tlsOpts,
    requestCert: true,
    rejectUnauthorized: true,
    allowHTTP1: false,
    settings: h2Settings(maxStreams),
    maxSessionMemory: MAX_SESSION_MEMORY_MB,
  });

  server.on('unknownProtocol', (sock) => {
    log({ event: 'reject', reason: 'ALPN did not select h2' });
    sock.destroy();
  });
  server.on('tlsClientError', (err) => {
    log({ event: 'tls_error', error: err.code || err.message });
  });

  // Upstream sockets of each session, so that they die with it.
  const upstreamsOf = new WeakMap();

  server.on('session', (session) => {
    const sock = session.socket;
    const peer = sessionPeer(session);
    const ids = uriSans(sock.getPeerCertificate());
    if (prefix !== undefined && !ids.some((u) => u.startsWith(prefix))) {
      log({ event: 'reject', reason: 'client SPIFFE ID does not match prefix', peer, uris: ids, prefix });
      // Tear the whole connection down; in-flight/queued streams fail.
      session.destroy();
      return;
    }
    upstreamsOf.set(session, new Set());
    try { session.setLocalWindowSize(CONNECTION_WINDOW); } catch (e) { log({ event: 'warn', error: String(e) }); }
    log({ event: 'session', peer, uris: ids, local_window: session.state.effectiveLocalWindowSize });
    session.on('error', (err) => log({ event: 'session_error', peer, error: err.code || err.message }));
    session.on('close', () => {
      const ups = upstreamsOf.get(session);
      log({ event: 'session_closed', peer, open_upstreams: ups ? ups.size : 0 });
      if (ups) for (const u of ups) u.destroy();
    });
  });

  server.on('stream', (stream, headers) => {
    const id = ++tunnelSeq;
    const method = headers[HTTP2_HEADER_METHOD];
    const authority = headers[HTTP2_HEADER_AUTHORITY];
    const forwarded = headers.forwarded;
    stream.on('error', () => {}); // reported via 'close' / rstCode below
    if (method !== 'CONNECT') {
      log({ event: 'tunnel', id, method, authority, status: 405 });
      if (!stream.destroyed) stream.respond({ [HTTP2_HEADER_STATUS]: 405 }, { endStream: true });
      return;
    }
    let target;
    {
      let m = /^\[([^\]]+)\]:(\d+)$/.exec(authority || '');
      if (!m) m = /^([^:\[\]]+):(\d+)$/.exec(authority || '');
      if (m && Number(m[2]) <= 65535) target = { host: m[1], port: Number(m[2]) };
    }
    if (!target) {
      log({ event: 'tunnel', id, authority, status: 400, reason: 'bad authority' });
      if (!stream.destroyed) stream.respond({ [HTTP2_HEADER_STATUS]: 400 }, { endStream: true });
      return;
    }

    const upstream = net.connect({ host: target.host, port: target.port, allowHalfOpen: true });
    upstream.setNoDelay(true);
    const ups = upstreamsOf.get(stream.session);
    if (ups) {
      ups.add(upstream);
      upstream.on('close', () => ups.delete(upstream));
    }
    let status = null;
    let logged = false;
    let upstreamError = null;
    const finish = (extra) => {
      if (logged) return;
      logged = true;
      log({
        event: 'tunnel', id, authority, forwarded, status,
        bytes_up: upstream.bytesWritten, // client -> target
        bytes_down: upstream.bytesRead, // target -> client
        rst: stream.rstCode === undefined ? null : h2ErrorName(stream.rstCode),
        upstream_error: upstreamError,
        ...extra,
      });
    };

    upstream.once('connect', () => {
      if (stream.destroyed || stream.closed) { upstream.destroy(); return; }
      status = 200;
      stream.respond({ [HTTP2_HEADER_STATUS]: 200 });
      // Both pipes keep their default {end: true}: END_STREAM from the client
      // becomes a FIN to the target, FIN from the target becomes END_STREAM.
      // allowHalfOpen on both sides keeps the other direction flowing.
      stream.pipe(upstream);
      upstream.pipe(stream);
    });

    upstream.on('error', (err) => {
      upstreamError = err.code || err.message;
      if (status === null) {
        status = 503;
        if (!stream.destroyed && !stream.closed) {
          stream.respond({ [HTTP2_HEADER_STATUS]: 503 }, { endStream: true });
        }
      } else if (!stream.destroyed && !stream.closed) {
        // Abnormal upstream close (e.g. TCP RST): RFC 9113 8.5 says CONNECT_ERROR.
        stream.close(NGHTTP2_CONNECT_ERROR);
      }
      finish();
    });
    upstream.on('close', () => finish());

    stream.on('close', () => {
      // Client reset (or session died) -> abort the target connection.
      if (stream.rstCode !== NGHTTP2_NO_ERROR || !stream.readableEnded) {
        upstream.destroy();
      }
    });
  });

  // With the Decoupler we accept TCP ourselves and hand the shim to the
  // http2 secure server (which does the TLS handshake, client-cert checks
  // and ALPN exactly as if it had accepted the socket itself).
  const listener = opts['no-decouple']
    ? server
    : net.createServer((raw) => {
      raw.setNoDelay(true);
      server.emit('connection', new Decoupler(raw));
    });
  setupLifetime(opts, () => listener.close());
  listener.on('error', (err) => die(`listen failed: ${err.message}`));
  listener.listen(listen.port, listen.host, () => {
    const a = listener.address();
    out({ ready: true, mode: 'server', host: a.address, port: a.port });
  });
}

// ------------------------------------------------------- client-side session

function makeCheckServerIdentity(expected) {
  // Without --server-spiffe only the chain is verified (against --ca), like
  // ztunnel which never checks hostnames; with it, the URI SAN must equal it.
  return (hostname, cert) => {
    if (expected === undefined) return undefined;
    const ids = uriSans(cert);
    if (ids.includes(expected)) return undefined;
    const err = new Error(`server SPIFFE ID mismatch: want ${expected}, got ${JSON.stringify(ids)}`);
    err.code = 'ERR_SPIFFE_MISMATCH';
    return err;
  };
}

function connectSession(opts, tlsOpts, server, maxStreams) {
  const authority = `https://${formatHostPort(server.host, server.port)}`;
  const connOpts = {
    ...tlsOpts,
    host: server.host,
    port: server.port,
    servername: net.isIP(server.host) ? undefined : server.host,
    rejectUnauthorized: true,
    checkServerIdentity: makeCheckServerIdentity(opts['server-spiffe']),
    settings: h2Settings(maxStreams),
    maxSessionMemory: MAX_SESSION_MEMORY_MB,
  };
  if (!opts['no-decouple']) {
    // TLS over the Decoupler over TCP (see the Decoupler comment).
    connOpts.createConnection = () => {
      const raw = net.connect({ host: server.host, port: server.port });
      raw.setNoDelay(true);
      return tls.connect({ ...connOpts, socket: new Decoupler(raw) });
    };
  }
  const session = http2.connect(authority, connOpts);
  session.once('connect', () => {
    try { session.setLocalWindowSize(CONNECTION_WINDOW); } catch (e) { log({ event: 'warn', error: String(e) }); }
  });
  return session;
}

// Resolves (with null) once the peer's first SETTINGS frame arrived, or with
// the session's error / a 'closed' marker if the session died first.
function remoteSettled(session) {
  return new Promise((resolve) => {
    session.once('remoteSettings', () => resolve(null));
    session.once('error', (err) => resolve(err));
    session.once('close', () => resolve(new Error('session closed')));
  });
}

// ------------------------------------------------------------------ forward

function runForward(opts) {
  const tlsOpts = loadTls(opts);
  const listen = parseHostPort(opts.listen ?? die('--listen is required'), '--listen');
  const server = parseHostPort(opts.server ?? die('--server is required'), '--server');
  const target = parseHostPort(opts.target ?? die('--target is required'), '--target');
  const targetAuthority = formatHostPort(target.host, target.port);
  const maxStreams = intOpt(opts, 'max-streams', DEFAULT_MAX_STREAMS);
  let seq = 0;

  // ONE shared session, (re)created lazily (after a GOAWAY, error or close).
  // When the peer's SETTINGS_MAX_CONCURRENT_STREAMS is reached we simply rely
  // on queuing: nghttp2 (underneath node:http2) holds the HEADERS of new
  // requests until a stream slot frees up, so no extra sessions are opened.
  // Requests are only issued once the server's SETTINGS have arrived (before
  // that node assumes 100 concurrent streams and a smaller server limit would
  // get them refused), and a REFUSED_STREAM before any response (never
  // processed by the server, RFC 9113 8.7) is retried, up to MAX_ATTEMPTS.
  const MAX_ATTEMPTS = 5;
  let current = null; // { session, settled: Promise }
  const getSession = () => {
    if (current && !current.session.closed && !current.session.destroyed) return current;
    const s = connectSession(opts, tlsOpts, server, maxStreams);
    const entry = { session: s, settled: remoteSettled(s) };
    current = entry;
    const forget = () => { if (current === entry) current = null; };
    s.on('error', (err) => { log({ event: 'session_error', error: errName(err) }); forget(); });
    s.on('goaway', (code) => { log({ event: 'goaway', code: h2ErrorName(code) }); forget(); });
    s.on('close', forget);
    s.once('connect', () => {
      const c = s.socket.getPeerCertificate();
      log({ event: 'session', server: formatHostPort(server.host, server.port), uris: uriSans(c) });
    });
    return entry;
  };

  const tcp = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (sock) => {
    const id = ++seq;
    const peer = formatHostPort(sock.remoteAddress, sock.remotePort);
    const headers = {
      [HTTP2_HEADER_METHOD]: 'CONNECT',
      [HTTP2_HEADER_AUTHORITY]: targetAuthority,
      forwarded: `for="${peer}"`,
    };
    sock.setNoDelay(true);
    let req = null;
    let status = null;
    let error = null;
    let logged = false;
    let attempts = 0;
    let bytesUp = 0;
    let bytesDown = 0;
    const finish = () => {
      if (logged) return;
      logged = true;
      log({
        event: 'tunnel', id, peer, authority: targetAuthority, status,
        bytes_up: bytesUp, bytes_down: bytesDown,
        rst: !req || req.rstCode === undefined ? null : h2ErrorName(req.rstCode),
        attempts, error,
      });
    };

    sock.on('error', (err) => {
      error = error ?? `downstream ${err.code || err.message}`;
      if (req && !req.closed) req.close(NGHTTP2_CANCEL);
    });
    sock.on('close', () => {
      // Downstream went away without a clean FIN both ways -> reset the stream.
      if (req && !req.closed && !(sock.readableEnded && sock.writableFinished)) req.close(NGHTTP2_CANCEL);
      if (!req) finish();
    });

    const attempt = async () => {
      attempts++;
      const entry = getSession();
      const sessionErr = await entry.settled;
      if (sock.destroyed) return; // downstream gave up meanwhile
      let r;
      try {
        r = entry.session.request(headers, { endStream: false });
      } catch (err) {
        // Session died before settling (connect/TLS/SPIFFE failure: no retry,
        // report it), or e.g. ERR_HTTP2_OUT_OF_STREAMS (retry on a new one).
        if (current === entry) current = null;
        if (attempts < MAX_ATTEMPTS && !sessionErr) { attempt(); return; }
        error = errName(sessionErr) ?? errName(err);
        abortSocket(sock);
        finish();
        return;
      }
      req = r;
      r.on('response', (h) => {
        status = Number(h[HTTP2_HEADER_STATUS]);
        if (status !== 200) {
          abortSocket(sock);
          if (!r.closed) r.close(NGHTTP2_CANCEL);
          return;
        }
        sock.on('data', (d) => { bytesUp += d.length; });
        r.on('data', (d) => { bytesDown += d.length; });
        // Default {end: true} on both: FIN <-> END_STREAM, with allowHalfOpen
        // keeping the other direction open.  pipe() resumes the paused socket.
        sock.pipe(r);
        r.pipe(sock);
      });
      r.on('error', (err) => { error = errName(err); });
      r.on('close', () => {
        if (status === null && r.rstCode === NGHTTP2_REFUSED_STREAM && attempts < MAX_ATTEMPTS && !sock.destroyed) {
          log({ event: 'retry', id, reason: 'REFUSED_STREAM', attempts });
          error = null;
          req = null;
          attempt();
          return;
        }
        // Reset / failed stream -> abort the TCP client with RST.  A clean
        // close leaves the socket to finish flushing (r.pipe(sock) ends it).
        if (r.rstCode !== NGHTTP2_NO_ERROR || status !== 200) abortSocket(sock);
        finish();
      });
    };
    attempt();
  });

  setupLifetime(opts, () => { tcp.close(); if (current) current.session.destroy(); });
  tcp.on('error', (err) => die(`listen failed: ${err.message}`));
  tcp.listen(listen.port, listen.host, () => {
    const a = tcp.address();
    out({ ready: true, mode: 'forward', host: a.address, port: a.port });
  });
}

// ------------------------------------------------------------------- client

function runClient(opts) {
  const tlsOpts = loadTls(opts);
  const server = parseHostPort(opts.server ?? die('--server is required'), '--server');
  const target = parseHostPort(opts.target ?? die('--target is required'), '--target');
  const targetAuthority = formatHostPort(target.host, target.port);
  const nStreams = intOpt(opts, 'streams', 1);
  const nBytes = intOpt(opts, 'bytes');
  const concurrency = Math.max(1, intOpt(opts, 'concurrency', nStreams) || nStreams);
  const chunkSize = Math.max(1, intOpt(opts, 'chunk', 64 * 1024));
  const timeout = Number(opts.timeout ?? 0);

  const t0 = process.hrtime.bigint();
  const session = connectSession(opts, tlsOpts, server, DEFAULT_MAX_STREAMS);
  let sessionError = null;
  session.on('error', (err) => { sessionError = errName(err); });

  let ok = 0;
  let failed = 0;
  let totalSent = 0;
  let totalReceived = 0;
  let next = 0;
  let finished = 0;
  const reported = new Set();

  const report = (r) => {
    if (reported.has(r.stream)) return;
    reported.add(r.stream);
    out(r);
    if (r.status === 200 && !r.error) ok++; else failed++;
    totalSent += r.sent;
    totalReceived += r.received;
    finished++;
    if (finished === nStreams) done();
    else launch();
  };

  const done = () => {
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    out({
      done: true, ok, failed,
      seconds: Number(secs.toFixed(6)),
      bytes_sent: totalSent, bytes_received: totalReceived,
    });
    session.destroy();
    process.exit(failed === 0 ? 0 : 1);
  };

  function runStream(i) {
    const sentHash = crypto.createHash('sha256');
    const recvHash = crypto.createHash('sha256');
    let status = null;
    let sent = 0;
    let received = 0;
    let error = null;
    const result = () => {
      const r = {
        stream: i, status, sent, sent_sha256: sentHash.digest('hex'),
        received, received_sha256: recvHash.digest('hex'),
      };
      if (error) r.error = error;
      return r;
    };

    let req;
    try {
      req = session.request(
        { [HTTP2_HEADER_METHOD]: 'CONNECT', [HTTP2_HEADER_AUTHORITY]: targetAuthority },
        { endStream: false },
      );
    } catch (err) {
      // Typically ERR_HTTP2_INVALID_SESSION: report why the session died.
      error = sessionError ?? errName(err);
      report(result());
      return;
    }

    req.on('data', (d) => { received += d.length; recvHash.update(d); });
    req.on('error', (err) => { error = error ?? errName(err); });
    req.on('close', () => {
      const rst = req.rstCode !== undefined && req.rstCode !== NGHTTP2_NO_ERROR;
      if (status === null) {
        // Never got a response: session failure (TLS, SPIFFE mismatch, ...) or reset.
        error = sessionError ?? error ?? (rst ? h2ErrorName(req.rstCode) : 'no response');
      } else if (status === 200) {
        if (rst) error = h2ErrorName(req.rstCode);
        else if (!req.readableEnded) error = error ?? 'closed before END_STREAM';
        else if (sent < nBytes) error = error ?? 'closed before all bytes were sent';
      }
      report(result());
    });
    req.on('response', async (headers) => {
      status = Number(headers[HTTP2_HEADER_STATUS]);
      if (status !== 200) {
        // Send nothing; drain whatever body the peer sends, end our side, and
        // bound the wait in case the peer never ends its side.
        req.resume();
        req.end();
        setTimeout(() => { if (!req.closed) req.close(NGHTTP2_CANCEL); }, 5000).unref();
        return;
      }
      // Send B random bytes, respecting backpressure, then half-close.
      try {
        while (sent < nBytes) {
          if (req.destroyed || req.closed) return;
          const chunk = crypto.randomBytes(Math.min(chunkSize, nBytes - sent));
          sentHash.update(chunk);
          sent += chunk.length;
          if (!req.write(chunk)) {
            await new Promise((resolve) => {
              const go = () => { req.off('drain', go); req.off('close', go); resolve(); };
              req.on('drain', go);
              req.on('close', go);
            });
          }
        }
        if (!req.destroyed && !req.closed) req.end();
      } catch (err) {
        error = error ?? (err.code || err.message);
      }
    });
  }

  function launch() {
    while (next < nStreams && next - finished < concurrency) runStream(next++);
  }

  setupLifetime(opts, () => session.destroy());
  if (timeout > 0) {
    setTimeout(() => {
      log({ event: 'timeout', seconds: timeout });
      for (let i = 0; i < nStreams; i++) {
        if (!reported.has(i)) {
          out({ stream: i, status: null, sent: 0, sent_sha256: null, received: 0, received_sha256: null, error: 'timeout' });
          failed++;
        }
      }
      out({ done: true, ok, failed, timeout: true });
      process.exit(1);
    }, timeout * 1000).unref();
  }
  // Open streams only once the server's SETTINGS (its stream limit) are known;
  // beyond that limit nghttp2 queues the requests.
  remoteSettled(session).then((err) => {
    if (err) sessionError = sessionError ?? errName(err);
    else {
      out({
        ready: true, mode: 'client',
        server: formatHostPort(server.host, server.port),
        uris: uriSans(session.socket.getPeerCertificate()),
        remote_settings: session.remoteSettings,
      });
    }
    if (nStreams === 0) done();
    else launch();
  });
}

// --------------------------------------------------------------------- main

const [mode, ...rest] = process.argv.slice(2);
const opts = parseArgs(rest);
switch (mode) {
  case 'server': runServer(opts); break;
  case 'forward': runForward(opts); break;
  case 'client': runClient(opts); break;
  default:
    process.stderr.write('usage: h2tunnel.mjs server|forward|client [options] (see tests/node/README.md)\n');
    process.exit(2);
}
