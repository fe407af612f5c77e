// A small, fast HTTP backend for benchmarks/hcm.py, independent of hbonex (built-in modules
// only): every GET (any path) gets 200 with a fixed body of --size bytes (default 64) and a
// content-length; a request body, if any, is read and dropped.
//
//   node http_backend.mjs [--size 64] [--host 127.0.0.1]
//
// Listens on two free ports: HTTP/1.1 (node:http, keep-alive) and HTTP/2 over cleartext with
// prior knowledge (node:http2 createServer). The first stdout line is the ready line:
//   {"ready":true,"http1":PORT,"h2c":PORT,"size":64}
// Exits on SIGTERM/SIGINT/SIGHUP, and when stdin (a pipe) reaches EOF.
import http from 'node:http';
import http2 from 'node:http2';
import fs from 'node:fs';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const host = args.host || '127.0.0.1';
const size = Number(args.size || 64);
const body = Buffer.alloc(size, 'x');

function handle(req, res) {
  req.resume();
  req.on('end', () => {
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': size });
    res.end(body);
  });
}

const h1 = http.createServer({ keepAliveTimeout: 60000 }, handle);
h1.headersTimeout = 65000;
const h2 = http2.createServer({ settings: { maxConcurrentStreams: 1000 } }, handle);
h2.on('sessionError', () => {});

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

h1.listen(0, host, () => {
  h2.listen(0, host, () => {
    console.log(JSON.stringify({ ready: true, http1: h1.address().port,
                                 h2c: h2.address().port, size }));
  });
});
