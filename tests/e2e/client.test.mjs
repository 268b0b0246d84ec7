// The client library (clients/js, `signalpost-client`) against real nodes, on either backend:
// a restarted process resumes from its stored identity and cursors with exactly what it missed,
// acks are coalesced and cursors stored after the handler; failover across urls while a node is
// killed and restarted; kicks (no reconnect loop) and revocation (a new identity); a token from
// a callback, refreshed before exp.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { io } from 'socket.io-client';
import { connect, memoryStorage } from '../../clients/js/src/client.js';
import { fileStorage } from '../../clients/js/src/file-storage.js';
import { startNode, api, fill, waitFor, tempDir } from './lib/harness.mjs';
import { hs256 } from './lib/tokens.mjs';

/** A library client whose every emit is recorded, with a record of every event it hands over. */
function open(options) {
  const sent = [];
  const spy = (url, opts) => {
    const s = io(url, opts);
    const emit = s.emit.bind(s);
    s.emit = (event, ...args) => { sent.push({ url, event, data: args[0] }); return emit(event, ...args); };
    return s;
  };
  const client = connect({ io: spy, storage: memoryStorage(), socketOptions: { transports: ['websocket'] }, ...options });
  const events = [];
  for (const ev of ['session', 'signal', 'gap', 'synced', 'bound', 'unbound', 'kicked', 'state', 'reset', 'error']) {
    client.on(ev, (data) => events.push({ ev, data, at: Date.now() }));
  }
  const got = (ev) => events.filter((e) => e.ev === ev).map((e) => e.data);
  return {
    client, sent, events, got,
    versions: (address) => got('signal').filter((m) => m.address === address).map((m) => m.version),
    acks: () => sent.filter((x) => x.event === 'ack').map((x) => x.data),
    until: (f, ms = 20000, what = 'condition') => waitFor(f, ms, what),
  };
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

test('a restarted process resumes from its stored identity and cursors with exactly what it missed; acks coalesced', async (t) => {
  const node = await startNode();
  const path = join(tempDir('client-store'), 'signalpost.json');
  const ch = 'channel:lib-resume';
  const a = open({ urls: [node.url], storage: fileStorage(path) });
  const handled = [];
  a.client.on('signal', async (m) => { await new Promise((r) => setImmediate(r)); handled.push(m.version); });
  await a.until(() => a.client.state === 'live', 10000, 'live');
  const clientId = a.client.clientId;
  assert.match(clientId, /^[0-9a-f]{32}$/);
  assert.equal((await api(node.url, 'POST', '/server/connect', { client: clientId, addresses: [ch] })).status, 200);
  await a.until(() => a.got('bound').length, 10000, 'bound');
  await fill(node.url, ch, 300);
  await a.until(() => handled.length === 300, 20000, '300 handled');
  assert.deepEqual(a.versions(ch), range(1, 300), 'each version once, in order');
  await a.until(async () => (await api(node.url, 'GET', `/server/clients/${clientId}`)).body.cursors[ch] === 300, 5000, 'cursor acked');
  const acks = a.acks().filter((x) => x.address === ch);
  assert.ok(acks.length < 60, `acks coalesced: ${acks.length} for 300 signals`);
  t.diagnostic(`${acks.length} acks for 300 signals handled`);
  assert.deepEqual(acks.map((x) => x.version), [...acks.map((x) => x.version)].sort((x, y) => x - y), 'acks only go up');
  await a.client.close();
  assert.equal(JSON.parse(readFileSync(path, 'utf8'))[`signalpost:${node.url}`].cursors[ch], 300, 'cursor stored');

  // While "the process" is gone: 40 more, and the node restarts.
  await fill(node.url, ch, 40, { from: 300 });
  const stopped = await node.stop();
  assert.equal(stopped.code, 0);
  const again = await startNode({ dataDir: node.dataDir, listen: new URL(node.url).host });
  const b = open({ urls: [again.url], storage: fileStorage(path) });
  await b.until(() => b.got('synced').length, 20000, 'synced');
  assert.equal(b.client.clientId, clientId, 'same identity');
  assert.equal(b.got('session')[0].resumed, true);
  assert.deepEqual(b.versions(ch), range(301, 340), 'exactly the missed versions');
  assert.equal(b.got('synced')[0].cursors[ch], 340);
  await b.client.close();
  await again.stop();
});

test('failover across urls: a dead url is skipped; a killed node is retried until it is back, and nothing is lost', async () => {
  const node = await startNode();
  const dead = `http://127.0.0.1:${await freePort()}`;
  const ch = 'channel:lib-failover';
  const c = open({ urls: [dead, node.url], maxDelay: 800 });
  await c.until(() => c.client.state === 'live', 10000, 'live');
  assert.equal(c.client.url, node.url);
  assert.ok(c.got('error').some((e) => e.url === dead), 'the dead url was tried first');
  await api(node.url, 'POST', '/server/connect', { client: c.client.clientId, addresses: [ch] });
  await fill(node.url, ch, 20);
  await c.until(() => c.versions(ch).length === 20);
  await node.kill();
  await c.until(() => c.client.state === 'offline', 5000, 'offline');
  const restarted = await startNode({ dataDir: node.dataDir, listen: new URL(node.url).host });
  await fill(restarted.url, ch, 30, { from: 20 });
  await c.until(() => c.versions(ch).length === 50, 20000, 'resumed');
  assert.deepEqual(c.versions(ch), range(1, 50));
  const states = c.got('state');
  assert.ok(states.indexOf('offline') < states.lastIndexOf('live'), `states: ${states.join(' ')}`);
  await c.client.close();
  await restarted.stop();
});

test('kicked: surfaced, no reconnect until reconnect(); after a revoke the client starts as a new one', async () => {
  const node = await startNode();
  const c = open({ urls: [node.url], minDelay: 50 });
  await c.until(() => c.client.state === 'live', 10000, 'live');
  const first = c.client.clientId;
  const k = await api(node.url, 'POST', '/server/kick', { client: first, reason: 'maintenance' });
  assert.deepEqual(k.body, { kicked: 1 });
  await c.until(() => c.got('kicked').length, 5000, 'kicked');
  assert.deepEqual(c.got('kicked'), [{ reason: 'maintenance' }]);
  assert.equal(c.client.state, 'offline');
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal((await api(node.url, 'GET', `/server/clients/${first}`)).body.connected, false, 'no reconnect after a kick');
  assert.equal(c.events.filter((e) => e.ev === 'session').length, 1);

  c.client.reconnect();
  await c.until(() => c.got('session').length === 2, 10000, 'resumed');
  assert.equal(c.client.clientId, first);

  await api(node.url, 'POST', '/server/kick', { client: first, revoke: true });
  await c.until(() => c.got('kicked').length === 2, 5000, 'kicked again');
  c.client.reconnect();
  await c.until(() => c.got('reset').length, 10000, 'reset');
  assert.match(c.got('reset')[0].reason, /revoked/);
  await c.until(() => c.client.state === 'live', 10000, 'live as a new client');
  assert.notEqual(c.client.clientId, first);
  const own = `client:${c.client.clientId}`;
  await api(node.url, 'POST', '/server/enqueue?wait=true', { address: own, payload: 'hello' });
  await c.until(() => c.versions(own).length === 1);
  await c.client.close();
  await node.stop();
});

test('a token from a callback, fetched on connect and refreshed before exp: the connection outlives the first token', async () => {
  const secret = 'client-lib-test-jwt-secret-0123456789';
  const node = await startNode({ env: { SIGNALPOST_CLIENT_TOKEN_SECRET: secret, SIGNALPOST_REQUIRE_CLIENT_TOKEN: 'true' } });
  let calls = 0;
  const token = async () => { calls += 1; return hs256(secret, { sub: 'erin', exp: Math.floor(Date.now() / 1000) + 4 }); };
  const c = open({ urls: [node.url], token });
  await c.until(() => c.client.state === 'live', 10000, 'live');
  assert.equal(c.got('session')[0].user, 'erin');
  const started = Date.now();
  await c.until(() => Date.now() - started > 11000, 15000, '11 s');
  assert.deepEqual(c.got('kicked'), [], 'never kicked: refreshed before each exp');
  assert.ok(calls >= 3, `callback called ${calls} times`);
  assert.ok(c.sent.filter((x) => x.event === 'refresh').length >= 2);
  const own = `client:${c.client.clientId}`;
  await api(node.url, 'POST', '/server/enqueue?wait=true', { address: own, payload: 'still here' });
  await c.until(() => c.versions(own).length === 1, 5000, 'delivered after the first token expired');
  await c.client.close();
  await node.stop();
});


async function freePort() {
  const { createServer } = await import('node:net');
  const s = createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}
