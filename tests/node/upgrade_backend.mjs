// An HTTP/1.1 Upgrade (websocket handshake) backend for the connection manager's tests,
// independent of hbonex: node:http's 'upgrade' event, built-in modules only.
//
//   node upgrade_backend.mjs [--host 127.0.0.1]
//
// The first stdout line is the ready line {"ready":true,"port":P,"h2c":Q}: P is node:http,
// Q an h2c listener (prior knowledge, node:http2 with SETTINGS_ENABLE_CONNECT_PROTOCOL) where
// an extended CONNECT (RFC 8441) with :protocol X is the same upgrade of type X, answered
// 200 instead of 101 (its record's "upgrade" is X, "h2": true).  For an upgrade request
// (any path but /refuse):
//   * it answers 101 Switching Protocols (Upgrade: the request's, Connection: Upgrade);
//   * it reads the connection to the client's EOF (the bytes after the request head
//     included), hashing them;
//   * only then (so the client must still read after its half-close) it writes ?down=N
//     random bytes, half-closes and prints one JSON line:
//     {"upgrade":"websocket","path":...,"headers":{...},"received":n,"received_sha256":h,
//      "sent":N,"sent_sha256":h}
// /refuse answers 403 with a 6-byte body and closes (no switch).  An ordinary request gets
// 200 "plain\n".  Exits on SIGTERM/SIGINT/SIGHUP, and when stdin (a pipe) reaches EOF.
import http from 'node:http';
import http2 from 'node:http2';
import crypto from 'node:crypto';
import fs from 'node:fs';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const host = args.host || '127.0.0.1';

const server = http.createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': 6 });
    res.end('plain\n');
  });
});

server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/refuse') {
    socket.end('HTTP/1.1 403 Forbidden\r\ncontent-length: 6\r\nconnection: close\r\n\r\nnope!\n');
    return;
  }
  const down = Number(url.searchParams.get('down') || '0');
  const hash = crypto.createHash('sha256');
  let received = 0;
  hash.update(head);
  received += head.length;
  socket.write('HTTP/1.1 101 Switching Protocols\r\n'
               + `Upgrade: ${req.headers.upgrade}\r\nConnection: Upgrade\r\n\r\n`);
  socket.on('data', (chunk) => { hash.update(chunk); received += chunk.length; });
  socket.on('end', () => {
    const payload = crypto.randomBytes(down);
    socket.end(payload);
    console.log(JSON.stringify({
      upgrade: req.headers.upgrade, path: req.url, headers: req.headers,
      received, received_sha256: hash.digest('hex'),
      sent: down, sent_sha256: crypto.createHash('sha256').update(payload).digest('hex'),
    }));
  });
  socket.on('error', (e) => console.error(JSON.stringify({ event: 'error', error: e.code })));
});

// The same upgrade over HTTP/2: an extended CONNECT stream instead of a switched socket.
const h2server = http2.createServer({ settings: { enableConnectProtocol: true } });
h2server.on('stream', (stream, headers) => {
  const protocol = headers[':protocol'];
  if (headers[':method'] !== 'CONNECT' || !protocol) {
    stream.respond({ ':status': 200, 'content-length': 6 });
    stream.end('plain\n');
    return;
  }
  const url = new URL(headers[':path'], 'http://x');
  if (url.pathname === '/refuse') {
    stream.respond({ ':status': 403, 'content-length': 6 });
    stream.end('nope!\n');
    return;
  }
  const down = Number(url.searchParams.get('down') || '0');
  const hash = crypto.createHash('sha256');
  let received = 0;
  stream.respond({ ':status': 200 });
  stream.on('data', (chunk) => { hash.update(chunk); received += chunk.length; });
  stream.on('end', () => {
    const payload = crypto.randomBytes(down);
    stream.end(payload);
    console.log(JSON.stringify({
      upgrade: protocol, h2: true, path: headers[':path'], headers,
      received, received_sha256: hash.digest('hex'),
      sent: down, sent_sha256: crypto.createHash('sha256').update(payload).digest('hex'),
    }));
  });
  stream.on('error', (e) => console.error(JSON.stringify({ event: 'error', error: e.code })));
});

function bye() { process.exit(0); }
process.on('SIGTERM', bye);
process.on('SIGINT', bye);
process.on('SIGHUP', bye);
let st;
try { st = fs.fstatSync(0); } catch { st = null; }
if (st && (st.isFIFO() || st.isSocket())) {
  process.stdin.on('data', () => {});
  process.stdin.on('end', bye);
  process.stdin.on('error', bye);
  process.stdin.resume();
}

server.listen(0, host, () => {
  h2server.listen(0, host, () => {
    console.log(JSON.stringify({
      ready: true, port: server.address().port, h2c: h2server.address().port,
    }));
  });
});
