// An independent HTTP/2 client (node:http2 only, plain-text h2c with prior knowledge):
// opens ONE session to --url's origin and sends --count concurrent GET requests for
// --url with ?size=N appended (N = --base-size + i). Prints one JSON line per response:
//   {"i":0,"status":200,"bytes":1000,"sha256":"..."}
// and a final {"done":true,"sessions":1}. Exits non-zero on any stream error.
// With --post-size N, each request is instead a POST of N + i random bytes to --url, and
// its line adds "sent" (the body's sha256) and "received" (the response's
// x-received-sha256 header, i.e. what the backend hashed).
import http2 from 'node:http2';
import crypto from 'node:crypto';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const url = new URL(args.url);
const count = Number(args.count || 1);
const baseSize = Number(args['base-size'] || 100);

let sessions = 0;
const session = http2.connect(url.origin);
sessions += 1;
session.on('error', (e) => { console.error(JSON.stringify({ error: String(e) })); process.exit(2); });

const postSize = args['post-size'] === undefined ? null : Number(args['post-size']);

function request(i) {
  return new Promise((resolve, reject) => {
    const body = postSize === null ? null : crypto.randomBytes(postSize + i);
    const req = session.request(body === null
      ? { ':path': `${url.pathname}?size=${baseSize + i}` }
      : { ':method': 'POST', ':path': url.pathname, 'content-length': body.length });
    const hash = crypto.createHash('sha256');
    let bytes = 0;
    let status = 0;
    let received;
    req.on('response', (h) => { status = h[':status']; received = h['x-received-sha256']; });
    req.on('data', (chunk) => { bytes += chunk.length; hash.update(chunk); });
    req.on('end', () => {
      const line = { i, status, bytes, sha256: hash.digest('hex') };
      if (body !== null) {
        line.sent = crypto.createHash('sha256').update(body).digest('hex');
        line.received = received;
      }
      resolve(line);
    });
    req.on('error', reject);
    req.end(body === null ? undefined : body);
  });
}

const deadline = setTimeout(() => { console.error('timeout'); process.exit(3); }, 30000);
Promise.all(Array.from({ length: count }, (_, i) => request(i))).then((results) => {
  for (const r of results) console.log(JSON.stringify(r));
  console.log(JSON.stringify({ done: true, sessions }));
  clearTimeout(deadline);
  session.close();
}, (e) => { console.error(JSON.stringify({ error: String(e) })); process.exit(1); });
