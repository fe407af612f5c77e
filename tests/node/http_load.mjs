// HTTP load generator for benchmarks/hcm.py (built-in modules only): closed loop, CONNS
// keep-alive connections each with one request in flight, small GETs, every response checked
// (status 200 and a body of exactly --size bytes).
//
//   node http_load.mjs --proto h1|h2 --port PORT [--path /bench] [--conns 1] [--size 64]
//                      [--warmup 1] [--seconds 5] [--max-requests 1000000]
//
// h1: raw node:net sockets, "GET PATH HTTP/1.1" with Host, responses parsed here
// (content-length or chunked). h2: node:http2 sessions over cleartext with prior knowledge,
// one session per connection. Every connection is opened first; then --warmup seconds unrecorded,
// then --seconds (or --max-requests) recorded. The one stdout line is JSON:
//   {"ok":true,"requests":N,"seconds":S,"rps":R,"p50_us":..,"p99_us":..,"conns":C,
//    "all_requests":N_including_warmup}
// or {"ok":false,"error":"..."} (exit code 1). A hard deadline ends a stuck run.
import net from 'node:net';
import http2 from 'node:http2';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const proto = args.proto || 'h1';
const port = Number(args.port);
const path = args.path || '/bench';
const conns = Number(args.conns || 1);
const size = Number(args.size || 64);
const warmup = Number(args.warmup ?? 1) * 1000;
const seconds = Number(args.seconds || 5) * 1000;
const maxRequests = Number(args['max-requests'] || 1000000);
const HOST = '127.0.0.1';

function finish(result) {
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(result.ok ? 0 : 1));
}
function fail(e) { finish({ ok: false, error: String(e && e.message ? e.message : e) }); }
setTimeout(() => fail('hard deadline'), warmup + seconds + 30000).unref();

// ---------------------------------------------------------------- HTTP/1.1 over raw sockets

class H1Conn {
  constructor() {
    this.buf = Buffer.alloc(0);
    this.pending = null;
    this.request = Buffer.from(`GET ${path} HTTP/1.1\r\nHost: ${HOST}:${port}\r\n\r\n`);
  }
  open() {
    return new Promise((resolve, reject) => {
      this.sock = net.connect({ host: HOST, port, noDelay: true }, resolve);
      this.sock.on('error', (e) => (this.pending ? this.pending.reject(e) : reject(e)));
      this.sock.on('close', () => this.pending && this.pending.reject(new Error('connection closed')));
      this.sock.on('data', (d) => this.onData(d));
    });
  }
  get() {
    return new Promise((resolve, reject) => {
      this.pending = { resolve, reject };
      this.sock.write(this.request);
    });
  }
  onData(d) {
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    const r = this.parse();
    if (r === null) return;
    const p = this.pending;
    this.pending = null;
    if (r instanceof Error) p.reject(r); else p.resolve(r);
  }
  parse() { // one complete response off this.buf, or null for "need more"
    const end = this.buf.indexOf('\r\n\r\n');
    if (end < 0) return null;
    const head = this.buf.subarray(0, end).toString('latin1').split('\r\n');
    const status = Number(head[0].split(' ')[1]);
    let length = -1;
    let chunked = false;
    let close = false;
    for (let i = 1; i < head.length; i++) {
      const c = head[i].indexOf(':');
      const name = head[i].slice(0, c).toLowerCase();
      const value = head[i].slice(c + 1).trim().toLowerCase();
      if (name === 'content-length') length = Number(value);
      else if (name === 'transfer-encoding') chunked = value.includes('chunked');
      else if (name === 'connection') close = value.includes('close');
    }
    let pos = end + 4;
    let bodyLen = 0;
    if (chunked) {
      for (;;) {
        const eol = this.buf.indexOf('\r\n', pos);
        if (eol < 0) return null;
        const n = parseInt(this.buf.subarray(pos, eol).toString('latin1'), 16);
        if (n === 0) {
          const fin = this.buf.indexOf('\r\n\r\n', eol);
          if (fin < 0) return null;
          pos = fin + 4;
          break;
        }
        if (this.buf.length < eol + 2 + n + 2) return null;
        bodyLen += n;
        pos = eol + 2 + n + 2;
      }
    } else {
      if (length < 0) return new Error('response without content-length or chunked');
      if (this.buf.length < pos + length) return null;
      bodyLen = length;
      pos += length;
    }
    this.buf = this.buf.subarray(pos);
    if (close) return new Error('server closed the keep-alive connection');
    return { status, bodyLen };
  }
  close() { this.sock.destroy(); }
}

// ---------------------------------------------------------------- HTTP/2, prior knowledge

class H2Conn {
  open() {
    return new Promise((resolve, reject) => {
      this.session = http2.connect(`http://${HOST}:${port}`);
      this.session.on('error', reject);
      this.session.on('connect', resolve);
    });
  }
  get() {
    return new Promise((resolve, reject) => {
      const req = this.session.request({ ':path': path, ':method': 'GET' }, { endStream: true });
      let status = 0;
      let bodyLen = 0;
      req.on('response', (h) => { status = h[':status']; });
      req.on('data', (c) => { bodyLen += c.length; });
      req.on('end', () => resolve({ status, bodyLen }));
      req.on('error', reject);
    });
  }
  close() { this.session.destroy(); }
}

// ---------------------------------------------------------------- the closed loop

async function main() {
  const all = Array.from({ length: conns }, () => (proto === 'h2' ? new H2Conn() : new H1Conn()));
  await Promise.all(all.map((c) => c.open()));
  const samples = [];
  let phase = 'warmup';
  let started = 0n;
  let ended = 0n;
  let count = 0;
  let total = 0;
  const loop = async (c) => {
    while (phase !== 'done') {
      const t0 = process.hrtime.bigint();
      const r = await c.get();
      const t1 = process.hrtime.bigint();
      if (r.status !== 200) throw new Error(`status ${r.status}`);
      if (r.bodyLen !== size) throw new Error(`body of ${r.bodyLen} bytes, expected ${size}`);
      total += 1;
      if (phase === 'measure' && t0 >= started) {
        samples.push(Number(t1 - t0));
        if (++count >= maxRequests) { phase = 'done'; ended = t1; }
      }
    }
  };
  const loops = all.map(loop);
  setTimeout(() => {
    phase = 'measure';
    started = process.hrtime.bigint();
    setTimeout(() => { if (phase !== 'done') { phase = 'done'; ended = process.hrtime.bigint(); } },
               seconds);
  }, warmup);
  await Promise.all(loops);
  for (const c of all) c.close();
  samples.sort((a, b) => a - b);
  const secs = Number(ended - started) / 1e9;
  const at = (q) => samples[Math.min(samples.length - 1, Math.floor(q * (samples.length - 1)))] / 1e3;
  finish({ ok: samples.length > 0, requests: samples.length, seconds: secs,
           rps: samples.length / secs, p50_us: at(0.5), p99_us: at(0.99), conns,
           all_requests: total, ...(samples.length ? {} : { error: 'no responses' }) });
}

main().catch(fail);
