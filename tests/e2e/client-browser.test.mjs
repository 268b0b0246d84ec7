// The client library in headless Chromium: a page on the node's origin loads /socket.io.min.js
// and the library, keeps its identity and cursors in localStorage, reloads (nothing replayed),
// goes away while signals arrive, comes back and gets exactly the missed ones.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startNode, api, fill, waitFor } from './lib/harness.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const library = readFileSync(join(here, '..', '..', 'clients', 'js', 'src', 'client.js'), 'utf8');

const PAGE = `<!doctype html><meta charset="utf-8"><title>signalpost-client test</title>
<script src="/socket.io.min.js"></script>
<script type="module">
  import { connect } from '/signalpost-client.js';
  window.log = [];
  const client = connect({ urls: [location.origin] });
  window.client = client;
  for (const ev of ['session', 'signal', 'gap', 'synced', 'bound', 'state', 'error']) {
    client.on(ev, (d) => { window.log.push({ ev, d: ev === 'error' ? String(d.message) : d }); });
  }
</script>`;

let browser;
before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync',
      // The test page is fulfilled by the test (context.route), which Chromium's local network
      // access checks treat as a public page: they would block its WebSocket to 127.0.0.1.
      '--disable-features=LocalNetworkAccessChecks'],
  });
});
after(async () => { await browser?.close(); });

/** The test page at <node>/client-test.html; the library from the node when it serves it,
 *  else from this checkout. */
async function newContext(node) {
  const context = await browser.newContext();
  await context.route(`${node.url}/client-test.html`, (r) => r.fulfill({ contentType: 'text/html', body: PAGE }));
  const served = (await fetch(`${node.url}/signalpost-client.js`)).status === 200;
  if (!served) await context.route(`${node.url}/signalpost-client.js`, (r) => r.fulfill({ contentType: 'text/javascript', body: library }));
  return context;
}

const log = (page) => page.evaluate(() => window.log);
const signals = async (page, address) => (await log(page)).filter((e) => e.ev === 'signal' && e.d.address === address).map((e) => e.d.version);
/** Waits until the library's main connection runs over WebSocket (it starts long-polling). */
const upgraded = (page, what) => waitFor(() => page.evaluate(() => window.client._main.socket.io.engine.transport.name === 'websocket'), 5000, what);

test('in Chromium: the library resumes from localStorage after a reload and gets exactly the missed signals', async () => {
  const node = await startNode();
  const context = await newContext(node);
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e));
  try {
    const ch = 'channel:browser-lib';
    await page.goto(`${node.url}/client-test.html`);
    await waitFor(async () => (await log(page)).some((e) => e.ev === 'synced'), 10000, 'synced');
    const clientId = await page.evaluate(() => window.client.clientId);
    assert.match(clientId, /^[0-9a-f]{32}$/);
    await api(node.url, 'POST', '/server/connect', { client: clientId, addresses: [ch] });
    await fill(node.url, ch, 5);
    await waitFor(async () => (await signals(page, ch)).length === 5, 10000, '5 signals');
    const key = `signalpost:${node.url}`;
    await waitFor(async () => JSON.parse(await page.evaluate((k) => localStorage.getItem(k), key)).cursors[ch] === 5, 5000, 'cursor in localStorage');

    // A reload: same identity, nothing replayed.
    await page.reload();
    await waitFor(async () => (await log(page)).some((e) => e.ev === 'synced'), 10000, 'synced after reload');
    assert.equal(await page.evaluate(() => window.client.clientId), clientId);
    assert.deepEqual(await signals(page, ch), [], 'nothing replayed after a reload');
    const session = (await log(page)).find((e) => e.ev === 'session').d;
    assert.equal(session.resumed, true);

    // Away while 7 more arrive; back: exactly those 7, in order, then synced. (Leaving is seen
    // at once over WebSocket; a page that leaves while still long-polling is seen only when its
    // heartbeat times out, so the test waits for the upgrade first.)
    await upgraded(page, 'upgraded to WebSocket before leaving');
    await page.goto('about:blank');
    await waitFor(async () => !(await api(node.url, 'GET', `/server/clients/${clientId}`)).body.connected, 5000, 'disconnected');
    await fill(node.url, ch, 7, { from: 5 });
    await page.goto(`${node.url}/client-test.html`);
    await waitFor(async () => (await log(page)).some((e) => e.ev === 'synced'), 10000, 'synced after coming back');
    const events = await log(page);
    assert.deepEqual(await signals(page, ch), [6, 7, 8, 9, 10, 11, 12], 'exactly the missed signals');
    const syncedAt = events.findIndex((e) => e.ev === 'synced');
    assert.ok(events.findLastIndex((e) => e.ev === 'signal') < syncedAt, 'replayed before synced');
    assert.equal(events[syncedAt].d.cursors[ch], 12);
    assert.equal(await page.evaluate(() => window.client.state), 'live');
    await upgraded(page, 'upgraded to WebSocket');
    await waitFor(async () => (await api(node.url, 'GET', `/server/clients/${clientId}`)).body.cursors[ch] === 12, 5000, 'acked');
    assert.deepEqual(errors, [], 'no page errors');
  } finally {
    await context.close();
    await node.stop();
  }
});

test('the node serves the library byte-identical to clients/js/src/client.js', async (t) => {
  const node = await startNode();
  try {
    const res = await fetch(`${node.url}/signalpost-client.js`);
    if (res.status === 404) return t.skip('this build of the node does not serve /signalpost-client.js yet');
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type'), /javascript/);
    assert.equal(await res.text(), library);
  } finally {
    await node.stop();
  }
});
