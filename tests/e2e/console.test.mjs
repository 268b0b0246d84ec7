// The node's console page in headless Chromium: it connects as a Socket.IO client, binds, sends,
// receives, disconnects and resumes with exactly the missed signals and `synced`; it asks for the
// API key on a 401 and never puts the key in a URL. Screenshots go to tests/artifacts/; the one in
// docs/console.png is refreshed with UPDATE_SCREENSHOTS=1.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startNode, api, waitFor, connect as connectOther } from './lib/harness.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..');
const artifacts = join(root, 'tests', 'artifacts');
mkdirSync(artifacts, { recursive: true });

let browser;
before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
});
after(async () => { await browser?.close(); });

/** A fresh page (own context, so own sessionStorage) that records every request and page error. */
async function openPage(url) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const requests = [];
  const errors = [];
  page.on('request', (r) => requests.push({ url: r.url(), headers: r.headers() }));
  page.on('pageerror', (e) => errors.push(e));
  await page.goto(url);
  return { context, page, requests, errors };
}

const byTestId = (page, id) => page.getByTestId(id);

/** The feed rows as data: newest first, like the page shows them. */
function feed(page) {
  return page.$$eval('[data-testid=feed-row]', (rows) => rows.map((r) => ({
    kind: r.dataset.kind,
    address: r.dataset.address,
    version: r.dataset.version === undefined ? undefined : Number(r.dataset.version),
    conn: Number(r.dataset.conn),
    replay: r.dataset.replay === 'true',
    text: r.textContent,
  })));
}

async function waitFeed(page, pred, what, ms = 10000) {
  return waitFor(async () => (await feed(page)).find(pred), ms, what);
}

test('the console: bind, send, receive, disconnect, resume with exactly the missed signals', async () => {
  const node = await startNode();
  const { context, page, errors } = await openPage(node.url);
  try {
    // The page connects and shows its clientId and `synced`.
    const idBox = byTestId(page, 'client-id');
    await waitFor(async () => /^[0-9a-f]{32}$/.test((await idBox.textContent()).trim()), 10000, 'clientId shown');
    const clientId = (await idBox.textContent()).trim();
    await waitFor(async () => (await byTestId(page, 'conn-state').textContent()) === 'live', 10000, 'live');
    await waitFeed(page, (r) => r.kind === 'synced', 'synced after connect');

    // Cluster view: this node leads, healthy, backends listed.
    const nodeRow = page.locator('[data-testid=node-row]');
    await nodeRow.first().waitFor();
    assert.equal(await nodeRow.count(), 1);
    assert.equal(await nodeRow.first().getAttribute('data-leader'), 'true');
    // Each node's connections come from its own /healthz: this page's connection is one.
    await waitFor(async () => (await page.locator('[data-testid=node-connections]').first().textContent()) === '1', 10000, 'connections per node');
    await waitFor(async () => (await byTestId(page, 'health-status').textContent()) === 'ok', 5000, 'health ok');
    assert.equal(await page.locator('[data-testid=backend][data-status=up]').count(), 4);

    // Bind through the page; the page hears `bound`.
    const channel = 'channel:console-demo';
    await byTestId(page, 'channel-input').fill(channel);
    await byTestId(page, 'bind-button').click();
    await waitFeed(page, (r) => r.kind === 'bound' && r.address === channel && r.version === 0, 'bound');
    // The HTTP answer and the socket's `bound` race each other: wait for the answer too.
    await waitFor(async () => /bound channel:console-demo at version 0/.test(await byTestId(page, 'bind-result').textContent()), 5000, 'the bind answer');
    const info = await api(node.url, 'GET', `/server/clients/${clientId}`);
    assert.deepEqual(info.body.addresses, [channel]);

    // A payload that is not JSON is refused by the page itself.
    await byTestId(page, 'target-input').fill(channel);
    await byTestId(page, 'payload-input').fill('{"hello": ');
    await byTestId(page, 'send-button').click();
    assert.match(await byTestId(page, 'payload-error').textContent(), /not valid JSON/);
    assert.equal((await api(node.url, 'GET', `/server/mailbox/${channel}`)).body.head, 0, 'nothing was sent');

    // A server error reason is shown.
    await byTestId(page, 'payload-input').fill('1');
    await byTestId(page, 'target-input').fill('room:x');
    await byTestId(page, 'send-button').click();
    await waitFor(async () => /400: invalid address "room:x"/.test(await byTestId(page, 'send-result').textContent()), 5000, 'error shown');

    // Send through the page; the signal arrives with its version and is acked.
    await byTestId(page, 'target-input').fill(channel);
    await byTestId(page, 'payload-input').fill('{"hello": "console", "n": 1}');
    await byTestId(page, 'send-button').click();
    assert.equal(await byTestId(page, 'payload-error').textContent(), '');
    const first = await waitFeed(page, (r) => r.kind === 'signal' && r.address === channel, 'the signal');
    assert.equal(first.version, 1);
    assert.match(first.text, /\{"hello":"console","n":1\}/);
    // The signal can come before the send's own HTTP answer (on the cluster backend the answer
    // comes back through the queue's reply path): wait for the answer too.
    await waitFor(async () => /appended to channel:console-demo as version 1/.test(await byTestId(page, 'send-result').textContent()), 5000, 'the send answer');
    await waitFor(async () => (await api(node.url, 'GET', `/server/clients/${clientId}`)).body.cursors[channel] === 1, 5000, 'ack stored');

    // "my address" targets the page's own client address.
    await byTestId(page, 'target-me').click();
    assert.equal(await byTestId(page, 'target-input').inputValue(), `client:${clientId}`);
    await byTestId(page, 'payload-input').fill('"to me"');
    await byTestId(page, 'send-button').click();
    await waitFeed(page, (r) => r.kind === 'signal' && r.address === `client:${clientId}` && r.version === 1, 'direct signal');

    // Disconnect, miss 3 messages, reconnect: exactly those 3 are replayed, then `synced`.
    await byTestId(page, 'disconnect-button').click();
    await waitFor(async () => (await byTestId(page, 'conn-state').textContent()) === 'disconnected', 5000, 'disconnected');
    await waitFor(async () => !(await api(node.url, 'GET', `/server/clients/${clientId}`)).body.connected, 5000, 'server saw it');
    for (let i = 2; i <= 4; i++) {
      const r = await api(node.url, 'POST', '/server/enqueue?wait=true', { address: channel, payload: { n: i } });
      assert.equal(r.status, 200);
      assert.equal(r.body.version, i);
    }
    const beforeReconnect = (await feed(page))[0].conn;
    await byTestId(page, 'reconnect-button').click();
    const synced = await waitFeed(page, (r) => r.kind === 'synced' && r.conn > beforeReconnect, 'synced after resume');
    assert.match(synced.text, new RegExp(`synced .*"${channel}":4`));
    assert.equal((await byTestId(page, 'client-id').textContent()).trim(), clientId, 'same identity');
    const replayed = (await feed(page)).filter((r) => r.conn === synced.conn && r.kind === 'signal').reverse();
    assert.deepEqual(replayed.map((r) => [r.address, r.version, r.replay]), [[channel, 2, true], [channel, 3, true], [channel, 4, true]]);
    assert.deepEqual(replayed.map((r) => JSON.parse(r.text.match(/\{"n":\d\}/)[0]).n), [2, 3, 4]);
    await waitFor(async () => (await byTestId(page, 'conn-state').textContent()) === 'live', 5000, 'live again');

    // Live again after synced.
    await api(node.url, 'POST', '/server/enqueue?wait=true', { address: channel, payload: { n: 5 } });
    const live = await waitFeed(page, (r) => r.kind === 'signal' && r.version === 5, 'live signal');
    assert.equal(live.replay, false);

    // Look up the mailbox and the client.
    await byTestId(page, 'lookup-address').fill(channel);
    await byTestId(page, 'lookup-address-button').click();
    await byTestId(page, 'mailbox-head').waitFor();
    assert.equal(await byTestId(page, 'mailbox-head').textContent(), '5');
    assert.deepEqual(await page.$$eval('[data-testid=mailbox-row]', (rows) => rows.map((r) => Number(r.dataset.version))), [5, 4, 3, 2, 1]);
    // By time: the page asks the node for what was appended within the last minute.
    await byTestId(page, 'lookup-range').selectOption('60000');
    const [byTime] = await Promise.all([
      page.waitForRequest((r) => /\/server\/mailbox\/.*\?since=\d+&limit=100$/.test(r.url())),
      byTestId(page, 'lookup-address-button').click(),
    ]);
    assert.ok(Number(new URL(byTime.url()).searchParams.get('since')) > Date.now() - 70_000);
    await waitFor(async () => /appended since/.test(await byTestId(page, 'mailbox-showing').textContent()), 5000, 'a read by time');
    assert.match(await byTestId(page, 'mailbox-showing').textContent(), /^5 appended since .* \(v1–v5\)$/);
    assert.deepEqual(await page.$$eval('[data-testid=mailbox-row]', (rows) => rows.map((r) => Number(r.dataset.version))), [5, 4, 3, 2, 1]);
    await byTestId(page, 'lookup-me').click();
    await byTestId(page, 'lookup-client-button').click();
    await byTestId(page, 'client-bindings').waitFor();
    assert.equal(await byTestId(page, 'client-bindings').textContent(), channel);
    assert.match(await byTestId(page, 'client-connected').textContent(), /^connected/);
    await waitFor(async () => JSON.parse(await byTestId(page, 'client-cursors').textContent())[channel] >= 1, 5000, 'cursors shown');

    // A presence address: the page hears itself join, and the look-up lists the members.
    const room = 'presence:console-room';
    await byTestId(page, 'lookup-range').selectOption('');
    await byTestId(page, 'channel-input').fill(room);
    await byTestId(page, 'bind-button').click();
    const joined = await waitFeed(page, (r) => r.kind === 'joined' && r.address === room, 'joined');
    assert.match(joined.text, /this client became a member/);
    await byTestId(page, 'lookup-address').fill(room);
    await byTestId(page, 'lookup-address-button').click();
    await waitFor(async () => (await page.locator('[data-testid=mailbox-member]').count()) === 1, 5000, 'members listed');
    assert.equal(await page.locator('[data-testid=mailbox-member]').first().getAttribute('data-client'), clientId);
    // Somebody else joins and leaves: the page is told.
    const other = connectOther(node.url);
    const os = await other.ready;
    await api(node.url, 'POST', '/server/connect?wait=true', { client: os.clientId, addresses: [room] });
    await waitFeed(page, (r) => r.kind === 'joined' && r.text.includes(os.clientId), 'the other joined');
    other.close();
    await waitFeed(page, (r) => r.kind === 'left' && r.text.includes(os.clientId), 'the other left');
    assert.equal((await api(node.url, 'POST', '/server/disconnect?wait=true', { client: clientId, addresses: [room] })).status, 200);

    // Rates from /metrics show up after two polls.
    await waitFor(async () => (await byTestId(page, 'rate-appends').getAttribute('data-rate')) !== null, 8000, 'rates');

    // A reload resumes the same client from sessionStorage, with nothing to replay.
    await page.screenshot({ path: join(artifacts, 'console.png'), fullPage: true });
    // docs/console.png is committed: (re)written when missing or with UPDATE_SCREENSHOTS=1, so a
    // plain test run leaves the tree clean.
    const docShot = join(root, 'docs', 'console.png');
    if (process.env.UPDATE_SCREENSHOTS === '1' || !existsSync(docShot)) await page.screenshot({ path: docShot, fullPage: true });
    await page.reload();
    await waitFeed(page, (r) => r.kind === 'synced', 'synced after reload');
    assert.equal((await byTestId(page, 'client-id').textContent()).trim(), clientId);
    const afterReload = await feed(page);
    assert.equal(afterReload.filter((r) => r.kind === 'signal').length, 0, 'nothing replayed after a reload');
    assert.match(afterReload.find((r) => r.kind === 'session').text, /resumed/);
    assert.deepEqual(errors, [], 'no page errors');
  } finally {
    await context.close();
    await node.stop();
  }
});

test('the console asks for the API key, sends it only as a header, never in a URL', async () => {
  // A distinctive key, so finding it in a URL cannot be a coincidence of random query strings.
  const key = 'console-test-key-5b1f0e';
  const node = await startNode({ env: { SIGNALPOST_API_KEY: key } });
  const { context, page, requests, errors } = await openPage(node.url);
  try {
    const panel = byTestId(page, 'apikey-panel');
    await panel.waitFor({ state: 'visible', timeout: 10000 });
    assert.match(await byTestId(page, 'nodes-error').textContent(), /API key/);
    await page.screenshot({ path: join(artifacts, 'console-apikey-asked.png'), fullPage: true });

    // A wrong key is rejected and the page asks again.
    await byTestId(page, 'apikey-input').fill('wrong-key');
    await byTestId(page, 'apikey-save').click();
    await waitFor(async () => /rejected/.test(await byTestId(page, 'apikey-reason').textContent()), 5000, 'rejected');
    assert.equal(await panel.isVisible(), true);

    // The right key: the cluster view shows the nodes.
    await byTestId(page, 'apikey-input').fill(key);
    await byTestId(page, 'apikey-save').click();
    await page.locator('[data-testid=node-row]').first().waitFor({ timeout: 10000 });
    assert.equal(await panel.isVisible(), false);
    assert.equal(await byTestId(page, 'nodes-error').textContent(), '');

    // Bind and send work with the key.
    await waitFor(async () => (await byTestId(page, 'conn-state').textContent()) === 'live', 10000, 'live');
    await byTestId(page, 'channel-input').fill('channel:keyed');
    await byTestId(page, 'bind-button').click();
    await waitFeed(page, (r) => r.kind === 'bound' && r.address === 'channel:keyed', 'bound');
    await byTestId(page, 'target-input').fill('channel:keyed');
    await byTestId(page, 'payload-input').fill('{"with": "key"}');
    await byTestId(page, 'send-button').click();
    await waitFeed(page, (r) => r.kind === 'signal' && r.address === 'channel:keyed' && r.version === 1, 'signal');

    // Kept for the tab: a reload does not ask again.
    await page.reload();
    await page.locator('[data-testid=node-row]').first().waitFor({ timeout: 10000 });
    assert.equal(await panel.isVisible(), false);
    await waitFeed(page, (r) => r.kind === 'synced', 'synced after reload');
    await page.screenshot({ path: join(artifacts, 'console-apikey.png'), fullPage: true });

    const server = requests.filter((r) => new URL(r.url).pathname.startsWith('/server/'));
    assert.ok(server.length > 3);
    for (const r of requests) {
      assert.ok(!r.url.includes(key) && !decodeURIComponent(r.url).includes(key), `key in a URL: ${r.url}`);
    }
    assert.ok(server.some((r) => r.headers.authorization === `Bearer ${key}`), 'the key went as a header');
    assert.ok(server.every((r) => !r.headers.authorization || r.headers.authorization.startsWith('Bearer ')));
    assert.deepEqual(errors, [], 'no page errors');
  } finally {
    await context.close();
    await node.stop();
  }
});

test('/socket.io.min.js is byte-identical to the pinned socket.io-client', async () => {
  const node = await startNode();
  try {
    const res = await fetch(`${node.url}/socket.io.min.js`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type'), /javascript/);
    const served = Buffer.from(await res.arrayBuffer());
    const pkgDir = join(here, 'node_modules', 'socket.io-client');
    const pinned = readFileSync(join(pkgDir, 'dist', 'socket.io.min.js'));
    assert.ok(served.equals(pinned), `served ${served.length} bytes, package has ${pinned.length}`);
    const lock = JSON.parse(readFileSync(join(here, 'package-lock.json'), 'utf8'));
    assert.equal(JSON.parse(readFileSync(join(pkgDir, 'package.json'), 'utf8')).version, lock.packages['node_modules/socket.io-client'].version);
  } finally {
    await node.stop();
  }
});
