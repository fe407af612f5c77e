// An independent reverse proxy for benchmarks/hcm.py (built-in modules only): the baseline
// the hbonex connection manager is compared with. Downstream it listens on two free ports,
// HTTP/1.1 (node:http) and HTTP/2 over cleartext with prior knowledge (node:http2); every
// request goes to --upstream over HTTP/1.1 through one keep-alive http.Agent (unlimited
// sockets, idle ones reused). Hop-by-hop headers are dropped both ways; bodies are piped.
//
//   node http_proxy.mjs --upstream 127.0.0.1:PORT [--host 127.0.0.1]
//
// First stdout line: {"ready":true,"http1":PORT,"h2c":PORT}. Exits on SIGTERM/SIGINT/SIGHUP
// and when stdin (a pipe) reaches EOF. Upstream failure: 502; no retries.
import http from 'node:http';
import http2 from 'node:http2';
import fs from 'node:fs';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const host = args.host || '127.0.0.1';
const [upHost, upPort] = (() => {
  const i = args.upstream.lastIndexOf(':');
  return [args.upstream.slice(0, i), Number(args.upstream.slice(i + 1))];
})();
const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 1024 });
const HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer',
                     'upgrade', 'http2-settings']);

function requestHeaders(req) {
  const out = {};
  for (const [k, v] of Object.entries(req.headers)) {
    if (k[0] === ':' || HOP.has(k)) continue;
    if (req.httpVersionMajor === 2 && k === 'transfer-encoding') continue;
    out[k] = v;
  }
  if (!out.host && req.headers[':authority']) out.host = req.headers[':authority'];
  return out;
}

function responseHeaders(up, h2) {
  const out = {};
  for (const [k, v] of Object.entries(up.headers)) {
    if (HOP.has(k) || (h2 && k === 'transfer-encoding')) continue;
    out[k] = v;
  }
  return out;
}

function proxy(req, res) {
  const h2 = req.httpVersionMajor === 2;
  const up = http.request({ host: upHost, port: upPort, method: req.method, path: req.url,
                            headers: requestHeaders(req), agent }, (upRes) => {
    res.writeHead(upRes.statusCode, responseHeaders(upRes, h2));
    upRes.pipe(res);
  });
  up.on('error', () => {
    if (!res.headersSent) { res.writeHead(502); res.end(); } else res.destroy();
  });
  req.pipe(up);
}

const h1 = http.createServer({ keepAliveTimeout: 60000 }, proxy);
h1.headersTimeout = 65000;
const h2 = http2.createServer({ settings: { maxConcurrentStreams: 1000 } }, proxy);
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
    console.log(JSON.stringify({ ready: true, http1: h1.address().port, h2c: h2.address().port }));
  });
});
