// The node's edge: browsers on other origins (`SIGNALPOST_CORS_ORIGINS`) and TLS
// (`SIGNALPOST_TLS_CERT` / `SIGNALPOST_TLS_KEY`).
//
// CORS runs in headless Chromium: a page served by a plain Node http server (a second origin)
// loads the official client from the node and connects with the DEFAULT transports — long-polling
// first (cross-origin XHR, the part CORS governs), then the WebSocket upgrade. A listed origin
// connects and receives; an unlisted one is refused by the browser for lack of a CORS grant.
//
// TLS uses a throwaway CA and a server certificate for 127.0.0.1 (IP SAN) made with the openssl
// CLI; the official socket.io-client and node:https trust that CA through `ca`.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { startNode, api, connect, waitFor, refusal, tempDir, BACKEND, testCluster } from './lib/harness.mjs';

// ---------------------------------------------------------------------------------------------
// Browser and "second origin" pages

let browser;
async function getBrowser() {
  browser ??= await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  return browser;
}
after(async () => { await browser?.close(); });

/** The page a second origin serves: it loads the Socket.IO client from the node and connects
 *  to the node with the default transports, recording what happens in `window.events`. */
function pageHtml(nodeUrl) {
  return `<!doctype html>
<html><head><meta charset="utf-8"><title>second origin</title></head>
<body>
<p>A page on another origin that connects to a signalpost node.</p>
<script src="${nodeUrl}/socket.io.min.js"></script>
<script>
  window.events = [];
  window.ioLoaded = typeof io === 'function';
  if (window.ioLoaded) {
    // Default transports: no \`transports\` option. No reconnection, so a refusal stays one.
    const socket = io(${JSON.stringify(nodeUrl)}, { auth: {}, reconnection: false });
    window.socket = socket;
    const transport = () => (socket.io.engine && socket.io.engine.transport ? socket.io.engine.transport.name : null);
    const push = (event, data) => window.events.push({ event, data, transport: transport() });
    // The manager's 'open' is the engine's: the transport then is the one the session started on.
    socket.io.on('open', () => {
      push('open', transport());
      socket.io.engine.on('upgrade', (t) => push('upgrade', t.name));
    });
    socket.on('connect', () => push('connect', null));
    socket.on('session', (s) => push('session', s));
    socket.on('signal', (m) => {
      push('signal', m);
      socket.emit('ack', { address: m.address, version: m.version });
    });
    socket.on('connect_error', (e) => push('connect_error', { message: String(e && e.message), description: String(e && e.description) }));
    socket.on('disconnect', (reason) => push('disconnect', reason));
  }
</script>
</body></html>`;
}

/** A plain Node http server on 127.0.0.1 (its own origin) serving `pageHtml(target.nodeUrl)` at
 *  `/`; set `nodeUrl` once the node is up (the node needs the page's origin first). */
async function pageServer() {
  const site = { nodeUrl: null, origin: null };
  const server = createServer((req, res) => {
    if (req.url === '/favicon.ico') {
      res.writeHead(204);
      res.end();
    } else if (req.url === '/' || req.url.startsWith('/?')) {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end(pageHtml(site.nodeUrl));
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found');
    }
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  site.origin = `http://127.0.0.1:${server.address().port}`;
  site.close = () => new Promise((resolve) => {
    server.closeAllConnections?.();
    server.close(() => resolve());
  });
  return site;
}

/** Opens `url` in a fresh context; records requests, responses, failed requests and page errors. */
async function openPage(url) {
  const context = await (await getBrowser()).newContext();
  const page = await context.newPage();
  const requests = [];
  const responses = [];
  const failed = [];
  const errors = [];
  const consoleMsgs = [];
  const websockets = [];
  page.on('console', (m) => consoleMsgs.push({ type: m.type(), text: m.text() }));
  page.on('websocket', (ws) => websockets.push(ws.url()));
  // allHeaders() has what went on the wire (Origin included); headers() only the page's own.
  page.on('request', (r) => {
    const rec = { url: r.url(), method: r.method(), headers: r.headers() };
    rec.all = r.allHeaders().then((h) => { rec.headers = h; }, () => {});
    requests.push(rec);
  });
  page.on('response', (r) => responses.push({ url: r.url(), status: r.status(), headers: r.headers(), method: r.request().method() }));
  page.on('requestfailed', (r) => failed.push({ url: r.url(), error: r.failure()?.errorText }));
  page.on('pageerror', (e) => errors.push(e));
  await page.goto(url);
  return { context, page, requests, responses, failed, errors, consoleMsgs, websockets };
}

const pageEvents = (page) => page.evaluate(() => window.events);
const pageEvent = (page, event, ms = 10000) =>
  waitFor(async () => (await pageEvents(page)).find((e) => e.event === event), ms, `page event ${event}`);

/** Requests to the node's Socket.IO endpoint with the given transport. */
const engineRequests = (list, nodeUrl, transport) =>
  list.filter((r) => r.url.startsWith(`${nodeUrl}/socket.io/`) && new URL(r.url).searchParams.get('transport') === transport);
/** The same, once every request's full headers are in. */
async function engineRequestsWithHeaders(list, nodeUrl, transport) {
  const found = engineRequests(list, nodeUrl, transport);
  await Promise.all(found.map((r) => r.all));
  return found;
}

/** A CORS preflight for the polling endpoint, as a browser would send it (Node's fetch lets a
 *  test set `Origin`). */
async function preflight(nodeUrl, origin, method = 'GET', requestHeaders) {
  const headers = { origin, 'access-control-request-method': method };
  if (requestHeaders) headers['access-control-request-headers'] = requestHeaders;
  const res = await fetch(`${nodeUrl}/socket.io/?EIO=4&transport=polling`, { method: 'OPTIONS', headers });
  await res.arrayBuffer();
  return res;
}

/** A polling handshake (`GET /socket.io/?EIO=4&transport=polling`) sent with an `Origin`. */
async function pollingHandshake(nodeUrl, origin) {
  const res = await fetch(`${nodeUrl}/socket.io/?EIO=4&transport=polling`, { headers: { origin } });
  const body = await res.text();
  return { res, body };
}

// ---------------------------------------------------------------------------------------------
// CORS

test('CORS: a page on a listed origin connects with the default transports (polling, then WebSocket) and receives', async () => {
  const site = await pageServer();
  const node = await startNode({ env: { SIGNALPOST_CORS_ORIGINS: JSON.stringify([site.origin]) } });
  site.nodeUrl = node.url;
  assert.notEqual(new URL(site.origin).port, new URL(node.url).port, 'the page is on another origin');
  const { context, page, requests, responses, failed, errors, consoleMsgs, websockets } = await openPage(`${site.origin}/`);
  try {
    assert.equal(await page.evaluate(() => window.ioLoaded), true, 'the page loaded the client from the node');

    const session = await pageEvent(page, 'session', 15000);
    assert.match(session.data.clientId, /^[0-9a-f]{32}$/);
    const open = (await pageEvents(page)).find((e) => e.event === 'open');
    assert.equal(open?.data, 'polling', 'the session started on long-polling');

    // The browser's polling requests went to the node from the page, and the node granted the
    // page's origin on them.
    const polls = await engineRequestsWithHeaders(requests, node.url, 'polling');
    assert.ok(polls.length >= 2, `polling requests: ${polls.map((r) => `${r.method} ${r.url}`).join(', ')}`);
    // (A request whose full headers never came keeps only the provisional ones, without Origin.)
    const withOrigin = polls.filter((r) => r.headers.origin !== undefined);
    assert.ok(withOrigin.length >= 1, 'the polling requests went out with an Origin');
    assert.ok(withOrigin.every((r) => r.headers.origin === site.origin), 'cross-origin requests carry the page origin');
    assert.ok(polls.some((r) => new URL(r.url).searchParams.get('sid')), 'polling went on after the handshake');
    const pollAnswers = engineRequests(responses, node.url, 'polling');
    assert.ok(pollAnswers.length >= 1);
    for (const r of pollAnswers) {
      assert.equal(r.headers['access-control-allow-origin'], site.origin, `${r.method} ${r.url} grants the page origin`);
    }

    // Then the upgrade to WebSocket.
    const upgrade = await pageEvent(page, 'upgrade', 15000);
    assert.equal(upgrade.data, 'websocket');
    assert.equal(await page.evaluate(() => window.socket.io.engine.transport.name), 'websocket');
    const wsUrl = node.url.replace(/^http/, 'ws');
    assert.ok(websockets.some((u) => u.startsWith(`${wsUrl}/socket.io/`) && /transport=websocket/.test(u)), `the page opened a WebSocket to the node: ${websockets}`);

    // Bound from the server side (Node fetch, not the browser); the page receives the signal.
    const bind = await api(node.url, 'POST', '/server/connect', { client: session.data.clientId, addresses: ['channel:cors'] });
    assert.equal(bind.status, 200, JSON.stringify(bind.body));
    const sent = await api(node.url, 'POST', '/server/enqueue?wait=true', { address: 'channel:cors', payload: { x: 1 } });
    assert.equal(sent.status, 200, JSON.stringify(sent.body));
    const signal = await pageEvent(page, 'signal');
    assert.equal(signal.data.address, 'channel:cors');
    assert.equal(signal.data.version, sent.body.version);
    assert.deepEqual(signal.data.payload, { x: 1 });

    // Nothing went wrong on the way.
    const evs = await pageEvents(page);
    assert.deepEqual(evs.filter((e) => e.event === 'connect_error' || e.event === 'disconnect'), []);
    assert.deepEqual(failed.filter((r) => r.url.startsWith(node.url)), [], 'no request to the node failed');
    assert.deepEqual(errors, [], 'no page errors');
    assert.deepEqual(consoleMsgs.filter((m) => m.type === 'error'), [], 'no console errors (CORS or other)');
    // The ack went over the socket: the server stored the cursor.
    await waitFor(async () => (await api(node.url, 'GET', `/server/clients/${session.data.clientId}`)).body.cursors?.['channel:cors'] === sent.body.version,
      5000, 'ack stored');
  } finally {
    await context.close();
    await site.close();
    await node.stop();
  }
});

test('CORS: a page on an unlisted origin gets no grant and no session; preflights answer only listed origins', async () => {
  const listed = await pageServer();
  const unlisted = await pageServer();
  const node = await startNode({ env: { SIGNALPOST_CORS_ORIGINS: JSON.stringify([listed.origin]) } });
  listed.nodeUrl = node.url;
  unlisted.nodeUrl = node.url;
  assert.notEqual(listed.origin, unlisted.origin);
  const { context, page, requests, errors, failed, consoleMsgs } = await openPage(`${unlisted.origin}/`);
  try {
    // The script itself loads (a <script> needs no CORS grant): the failure below is CORS's.
    assert.equal(await page.evaluate(() => window.ioLoaded), true, 'the page loaded the client from the node');
    const refused = await pageEvent(page, 'connect_error', 15000);
    assert.match(refused.data.message, /xhr poll error|poll/i, JSON.stringify(refused.data));
    // The browser did try the polling handshake with its origin.
    const polls = await engineRequestsWithHeaders(requests, node.url, 'polling');
    assert.ok(polls.length >= 1, 'the page tried long-polling');
    // Chromium blocked it for CORS (it names the page origin), and the request failed.
    await waitFor(() => consoleMsgs.find((m) => /blocked by CORS policy/.test(m.text)), 5000, 'the CORS console error');
    const blocked = consoleMsgs.find((m) => /blocked by CORS policy/.test(m.text));
    assert.ok(blocked.text.includes(`from origin '${unlisted.origin}'`), blocked.text);
    assert.ok(blocked.text.includes(node.url), blocked.text);
    assert.ok(failed.some((r) => r.url.startsWith(`${node.url}/socket.io/`)), 'the polling request failed in the browser');
    // ...and never got a session, nor an open engine or an upgrade.
    await new Promise((r) => setTimeout(r, 3000));
    const evs = await pageEvents(page);
    assert.deepEqual(evs.filter((e) => ['session', 'open', 'connect', 'upgrade', 'signal'].includes(e.event)), []);
    assert.deepEqual(errors, [], 'no page errors');

    // Preflights, straight from Node: the listed origin is echoed back, the unlisted one gets nothing.
    const ok = await preflight(node.url, listed.origin);
    assert.ok(ok.status >= 200 && ok.status < 300, `listed preflight answered ${ok.status}`);
    assert.equal(ok.headers.get('access-control-allow-origin'), listed.origin);
    const okPost = await preflight(node.url, listed.origin, 'POST', 'content-type');
    assert.ok(okPost.status >= 200 && okPost.status < 300, `listed POST preflight answered ${okPost.status}`);
    assert.equal(okPost.headers.get('access-control-allow-origin'), listed.origin);
    const no = await preflight(node.url, unlisted.origin);
    assert.equal(no.headers.get('access-control-allow-origin'), null, `unlisted preflight got ${no.headers.get('access-control-allow-origin')}`);

    // The same for the polling handshake itself.
    const hsOk = await pollingHandshake(node.url, listed.origin);
    assert.equal(hsOk.res.status, 200);
    assert.equal(hsOk.res.headers.get('access-control-allow-origin'), listed.origin);
    assert.match(hsOk.body, /"sid"/);
    const hsNo = await pollingHandshake(node.url, unlisted.origin);
    assert.equal(hsNo.res.headers.get('access-control-allow-origin'), null);
  } finally {
    await context.close();
    await listed.close();
    await unlisted.close();
    await node.stop();
  }
});

test('CORS: no grant by default; ["*"] grants every origin', async () => {
  const origin = 'http://127.0.0.1:1';
  const other = 'https://example.test';
  const plain = await startNode();
  try {
    for (const o of [origin, other]) {
      assert.equal((await preflight(plain.url, o)).headers.get('access-control-allow-origin'), null, `default node granted ${o}`);
      assert.equal((await pollingHandshake(plain.url, o)).res.headers.get('access-control-allow-origin'), null);
    }
    // Same-origin (no CORS) clients still connect.
    const c = connect(plain.url);
    await c.ready;
    c.close();
  } finally {
    await plain.stop();
  }
  const any = await startNode({ env: { SIGNALPOST_CORS_ORIGINS: '["*"]' } });
  try {
    for (const o of [origin, other]) {
      const pf = await preflight(any.url, o);
      assert.ok(pf.status >= 200 && pf.status < 300, `preflight answered ${pf.status}`);
      assert.ok(['*', o].includes(pf.headers.get('access-control-allow-origin')), `preflight for ${o}: ${pf.headers.get('access-control-allow-origin')}`);
      const hs = await pollingHandshake(any.url, o);
      assert.equal(hs.res.status, 200);
      assert.ok(['*', o].includes(hs.res.headers.get('access-control-allow-origin')), `handshake for ${o}: ${hs.res.headers.get('access-control-allow-origin')}`);
    }
  } finally {
    await any.stop();
  }
});

// ---------------------------------------------------------------------------------------------
// TLS

/** A throwaway CA and a server certificate for 127.0.0.1 (IP SAN), with the openssl CLI.
 *  Keys are EC P-256 in PKCS#8 (`BEGIN PRIVATE KEY`), which rustls reads. */
function makeCerts() {
  const dir = tempDir('tls');
  const run = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  writeFileSync(join(dir, 'ca.ext'), [
    'basicConstraints=critical,CA:TRUE',
    'keyUsage=critical,keyCertSign,cRLSign',
    'subjectKeyIdentifier=hash',
    '',
  ].join('\n'));
  writeFileSync(join(dir, 'server.ext'), [
    'basicConstraints=critical,CA:FALSE',
    'keyUsage=critical,digitalSignature',
    'extendedKeyUsage=serverAuth',
    'subjectAltName=IP:127.0.0.1',
    'subjectKeyIdentifier=hash',
    'authorityKeyIdentifier=keyid',
    '',
  ].join('\n'));
  run('genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', 'ca.key');
  run('req', '-new', '-key', 'ca.key', '-subj', '/CN=signalpost-test-ca', '-out', 'ca.csr');
  run('x509', '-req', '-in', 'ca.csr', '-signkey', 'ca.key', '-days', '2', '-extfile', 'ca.ext', '-out', 'ca.pem');
  run('genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', 'key.pem');
  run('req', '-new', '-key', 'key.pem', '-subj', '/CN=127.0.0.1', '-out', 'server.csr');
  run('x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-set_serial', '0x5167a1',
    '-days', '2', '-extfile', 'server.ext', '-out', 'cert.pem');
  const key = readFileSync(join(dir, 'key.pem'), 'utf8');
  assert.match(key, /-----BEGIN PRIVATE KEY-----/, 'a PKCS#8 key');
  return { dir, ca: readFileSync(join(dir, 'ca.pem'), 'utf8'), certFile: join(dir, 'cert.pem'), keyFile: join(dir, 'key.pem') };
}

/** The server API over HTTPS, trusting `ca`; resolves { status, headers, body }. */
function httpsApi(url, method, path, body, { ca, apiKey } = {}) {
  return new Promise((resolve, reject) => {
    const headers = { 'content-type': 'application/json' };
    if (apiKey) headers.authorization = `Bearer ${apiKey}`;
    const req = httpsRequest(new URL(path, url), { method, headers, ca, agent: false, timeout: 10000 }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { text += d; });
      res.on('end', () => {
        let parsed;
        try { parsed = JSON.parse(text); } catch { parsed = text; }
        resolve({ status: res.statusCode, headers: res.headers, body: parsed });
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${path} timed out`)));
    req.on('error', reject);
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}

/** Everything a connect_error says about its cause (the ws / tls error sits in `description`). */
function why(e) {
  const d = e?.description;
  return [e?.message, d?.message, d?.code, d?.error?.message, d?.error?.code,
    typeof d === 'string' || typeof d === 'number' ? String(d) : null].filter(Boolean).join(' | ');
}

const CERT_PROBLEM = /certificate|self[- ]signed|unable to verify|issuer|UNABLE_TO|CERT_|DEPTH_ZERO/i;

test('TLS: HTTPS and WSS only, with the configured certificate', async () => {
  const certs = makeCerts();
  const node = await startNode({ env: { SIGNALPOST_TLS_CERT: certs.certFile, SIGNALPOST_TLS_KEY: certs.keyFile } });
  const clients = [];
  try {
    assert.match(node.url, /^https:\/\/127\.0\.0\.1:\d+$/, `the node printed ${node.url}`);
    const port = new URL(node.url).port;

    // The HTTP API over HTTPS, trusting the test CA; ready (200) once the node can apply
    // operations (on the cluster backend, once its Kafka consumer holds its partitions).
    let health;
    await waitFor(async () => {
      health = await httpsApi(node.url, 'GET', '/healthz', undefined, { ca: certs.ca });
      return health.status === 200;
    }, 60000, 'healthz 200 over HTTPS');
    assert.equal(health.body.status, 'ok');

    // WebSocket (wss) with the CA: session, bind over HTTPS, a signal enqueued over HTTPS arrives.
    const ws = connect(node.url, {}, { transports: ['websocket'], ca: certs.ca });
    clients.push(ws);
    const s1 = await ws.ready;
    assert.equal(ws.socket.io.engine.transport.name, 'websocket');
    const bind1 = await httpsApi(node.url, 'POST', '/server/connect', { client: s1.clientId, addresses: ['channel:tls'] }, { ca: certs.ca });
    assert.equal(bind1.status, 200, JSON.stringify(bind1.body));
    const sent1 = await httpsApi(node.url, 'POST', '/server/enqueue?wait=true', { address: 'channel:tls', payload: { over: 'wss' } }, { ca: certs.ca });
    assert.equal(sent1.status, 200, JSON.stringify(sent1.body));
    const sig1 = await ws.waitFor((e) => e.event === 'signal' && e.data.address === 'channel:tls', 10000, 'signal over wss');
    assert.equal(sig1.data.version, sent1.body.version);
    assert.deepEqual(sig1.data.payload, { over: 'wss' });

    // Long-polling only, over HTTPS with the CA: session and a signal.
    const poll = connect(node.url, {}, { transports: ['polling'], ca: certs.ca });
    clients.push(poll);
    const s2 = await poll.ready;
    assert.equal(poll.socket.io.engine.transport.name, 'polling');
    const bind2 = await httpsApi(node.url, 'POST', '/server/connect', { client: s2.clientId, addresses: ['channel:tls-poll'] }, { ca: certs.ca });
    assert.equal(bind2.status, 200, JSON.stringify(bind2.body));
    const sent2 = await httpsApi(node.url, 'POST', '/server/enqueue?wait=true', { address: 'channel:tls-poll', payload: { over: 'https polling' } }, { ca: certs.ca });
    assert.equal(sent2.status, 200);
    const sig2 = await poll.waitFor((e) => e.event === 'signal' && e.data.address === 'channel:tls-poll', 10000, 'signal over polling');
    assert.deepEqual(sig2.data.payload, { over: 'https polling' });

    // Default transports with the CA: polling, then the upgrade to wss.
    const both = connect(node.url, {}, { transports: ['polling', 'websocket'], ca: certs.ca });
    clients.push(both);
    await both.ready;
    await waitFor(() => both.socket.io.engine?.transport?.name === 'websocket', 10000, 'upgrade to websocket over TLS');

    // Without the CA the certificate is not trusted: the connection is refused for that reason,
    // over WebSocket and over polling, and so is an HTTPS request.
    const untrustedWs = await refusal(node.url, {}, { transports: ['websocket'] });
    assert.match(why(untrustedWs), CERT_PROBLEM, `websocket without the CA: ${why(untrustedWs)}`);
    const untrustedPoll = await refusal(node.url, {}, { transports: ['polling'] });
    assert.ok(untrustedPoll instanceof Error, 'polling without the CA is refused');
    assert.equal(untrustedPoll.message, 'xhr poll error');
    await assert.rejects(httpsApi(node.url, 'GET', '/healthz'), (e) => {
      assert.match(`${e.code} ${e.message}`, CERT_PROBLEM);
      return true;
    });

    // Plain HTTP and plain ws:// to the same port get no normal answer.
    const plainHttp = await fetch(`http://127.0.0.1:${port}/healthz`, { signal: AbortSignal.timeout(5000) })
      .then(async (r) => ({ status: r.status, body: await r.text().catch(() => '') }), (e) => ({ error: e }));
    assert.ok(plainHttp.error || plainHttp.status >= 400, `plain http answered ${plainHttp.status}: ${plainHttp.body}`);
    assert.ok(!plainHttp.body || !/"status"\s*:\s*"ok"/.test(plainHttp.body), 'no health answer over plain http');
    const plainWs = await refusal(`http://127.0.0.1:${port}`, {}, { transports: ['websocket'], timeout: 5000 });
    assert.ok(plainWs instanceof Error, 'plain ws:// is refused');
    const plainPoll = await refusal(`http://127.0.0.1:${port}`, {}, { transports: ['polling'], timeout: 5000 });
    assert.ok(plainPoll instanceof Error, 'plain http polling is refused');

    // The node is still fine after the bad attempts.
    await waitFor(async () => {
      const h = await httpsApi(node.url, 'GET', '/healthz', undefined, { ca: certs.ca });
      return h.status === 200 && h.body.connections === 3;
    }, 5000, 'healthz over HTTPS counting the three trusted connections, nothing else');
  } finally {
    for (const c of clients) c.close();
    await node.stop();
  }
});

test('TLS between nodes: a cluster on HTTPS forwards messages over HTTPS, trusting tls_ca', { skip: BACKEND !== 'cluster' && 'needs the cluster backend', timeout: 120000 }, async () => {
  const certs = makeCerts();
  const env = {
    ...testCluster('tlspeers'),
    SIGNALPOST_RESUME_SECRET: 'tls-peers-resume-secret-0123456789abcdef',
    SIGNALPOST_TLS_CERT: certs.certFile,
    SIGNALPOST_TLS_KEY: certs.keyFile,
    SIGNALPOST_TLS_CA: join(certs.dir, 'ca.pem'),
  };
  const a = await startNode({ env });
  const b = await startNode({ env });
  assert.match(a.url, /^https:/);
  await waitFor(async () => (await httpsApi(b.url, 'GET', '/server/nodes', undefined, { ca: certs.ca })).body.nodes?.length === 2, 30000, 'two members');
  for (const n of [a, b]) {
    await waitFor(async () => (await httpsApi(n.url, 'GET', '/healthz', undefined, { ca: certs.ca })).status === 200, 60000, 'ready');
  }
  const clients = [];
  for (const node of [a, b]) {
    const c = connect(node.url, {}, { transports: ['websocket'], ca: certs.ca });
    const s = await c.ready;
    assert.equal((await httpsApi(node.url, 'POST', '/server/connect', { client: s.clientId, addresses: ['channel:tls'] }, { ca: certs.ca })).status, 200);
    clients.push(c);
  }
  for (let i = 0; i < 20; i++) {
    const via = i % 2 ? a : b;
    assert.equal((await httpsApi(via.url, 'POST', '/server/enqueue?wait=true', { address: 'channel:tls', payload: i }, { ca: certs.ca })).status, 200);
  }
  for (const c of clients) {
    await waitFor(() => c.events.filter((e) => e.event === 'signal').length >= 20, 20000, '20 signals');
    assert.deepEqual(c.events.filter((e) => e.event === 'signal').map((e) => e.data.version), [...Array(20).keys()].map((i) => i + 1));
  }
  // Each message was appended on one node; the other node's client got it over the HTTPS link.
  const fromPeers = async (n) => {
    const m = String((await httpsApi(n.url, 'GET', '/metrics', undefined, { ca: certs.ca })).body);
    return Number((/^signalpost_from_peers_total (\d+)/m.exec(m) || [])[1] || 0);
  };
  assert.ok((await fromPeers(a)) + (await fromPeers(b)) >= 20, 'messages crossed between the nodes');
  for (const c of clients) c.socket.close();
  await a.stop();
  await b.stop();
});
