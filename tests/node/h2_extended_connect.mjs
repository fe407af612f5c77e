// An independent HTTP/2 extended CONNECT client (RFC 8441, websocket over HTTP/2) for the
// connection manager's tests: node:http2 and node:crypto only, plain-text h2c with prior
// knowledge.
//
//   node h2_extended_connect.mjs --url http://127.0.0.1:PORT --path /chat?down=N
//        [--protocol websocket] [--authority ws.test] [--early E] [--bytes B]
//        [--timeout SECONDS]
//
// It waits for the server's SETTINGS (SETTINGS_ENABLE_CONNECT_PROTOCOL must be 1, else it
// prints {"error":"NO_ENABLE_CONNECT_PROTOCOL"}), then sends ONE request
//   :method CONNECT, :protocol P, :scheme http, :path, :authority,
//   sec-websocket-version: 13
// and E random bytes at once (before any response: early data).  On a 200 it sends B more
// random bytes (respecting backpressure), ends its side (END_STREAM) and reads until the
// server's END_STREAM; on any other status it reads the body and waits for the stream to
// close.  One JSON line on stdout:
//   {"status":200,"headers":{...},"sent":n,"sent_sha256":h,"received":n,
//    "received_sha256":h,"end_stream":true,"rst_code":0,"error":null}
// ("sent" counts early and later bytes; "end_stream": the server's END_STREAM arrived;
// "rst_code": the stream's close code as node:http2 reports it, e.g. 0 after a clean end or
// a RST_STREAM(NO_ERROR), 10 for CONNECT_ERROR; "error": the stream error's code, if any).
// Exit code 0 once the line is printed; 3 on timeout.
import http2 from 'node:http2';
import crypto from 'node:crypto';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const url = new URL(args.url);
const path = args.path || '/';
const protocol = args.protocol || 'websocket';
const authority = args.authority || url.host;
const early = Number(args.early || 0);
const bytes = Number(args.bytes || 0);
const timeout = Number(args.timeout || 60) * 1000;
const CHUNK = 64 * 1024;

const deadline = setTimeout(() => {
  console.log(JSON.stringify({ error: 'TIMEOUT' }));
  process.exit(3);
}, timeout);

const sentHash = crypto.createHash('sha256');
const receivedHash = crypto.createHash('sha256');
const result = {
  status: null, headers: null, sent: 0, sent_sha256: null, received: 0,
  received_sha256: null, end_stream: false, rst_code: null, error: null,
};

function finish(session) {
  result.sent_sha256 = sentHash.digest('hex');
  result.received_sha256 = receivedHash.digest('hex');
  console.log(JSON.stringify(result));
  clearTimeout(deadline);
  session.close();
}

function randomChunk(size) {
  const chunk = crypto.randomBytes(size);
  sentHash.update(chunk);
  result.sent += chunk.length;
  return chunk;
}

// Send `total` random bytes, waiting for 'drain' whenever the stream's buffer is full.
function pump(stream, total, done) {
  let left = total;
  const more = () => {
    while (left > 0) {
      const size = Math.min(CHUNK, left);
      left -= size;
      if (!stream.write(randomChunk(size))) {
        stream.once('drain', more);
        return;
      }
    }
    done();
  };
  more();
}

const session = http2.connect(url.origin);
session.on('error', (e) => {
  console.log(JSON.stringify({ error: e.code || String(e) }));
  process.exit(2);
});
session.once('remoteSettings', (settings) => {
  if (!settings.enableConnectProtocol) {
    console.log(JSON.stringify({ error: 'NO_ENABLE_CONNECT_PROTOCOL' }));
    process.exit(2);
  }
  const stream = session.request({
    ':method': 'CONNECT', ':protocol': protocol, ':scheme': 'http', ':path': path,
    ':authority': authority, 'sec-websocket-version': '13',
  }, { endStream: false });
  if (early > 0) stream.write(randomChunk(early));
  stream.on('response', (headers) => {
    result.status = headers[':status'];
    result.headers = Object.fromEntries(Object.entries(headers)
      .filter(([name]) => name !== ':status'));
    if (result.status === 200) {
      pump(stream, bytes, () => stream.end());
    }
  });
  stream.on('data', (chunk) => { receivedHash.update(chunk); result.received += chunk.length; });
  stream.on('end', () => { result.end_stream = true; });
  stream.on('error', (e) => { result.error = e.code || String(e); });
  stream.on('close', () => {
    result.rst_code = stream.rstCode ?? null;
    finish(session);
  });
});
