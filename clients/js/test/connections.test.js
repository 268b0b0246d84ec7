// Connections: failover across urls, the spare and its promotion, kicks, identities that can no
// longer resume, client tokens and their refresh.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { memoryStorage, tokenExpiry } from '../src/client.js';
import { start, live } from './helpers.js';
import { until, sleep } from './fake-io.js';

const jwt = (claims) => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${createHmac('sha256', 'k').update(body).digest('base64url')}`;
};

test('a dropped main connection fails over to the next url with identity and cursors', async () => {
  const t = start();
  const a = await live(t, { addresses: ['channel:a'], cursors: { 'channel:a': 0 } });
  assert.equal(a.url, 'http://a');
  assert.deepEqual(a.auth, {});
  assert.equal(a.opts.reconnection, false);
  a.signal('channel:a', 1);
  await until(() => t.client.cursors['channel:a'] === 1);
  a.send('disconnect', 'transport close');
  assert.equal(t.client.state, 'offline');
  const b = await t.io.nth(2);
  assert.equal(b.url, 'http://b');
  assert.deepEqual(b.auth, { clientId: 'c1', resumeToken: 'rt-c1', cursors: { 'client:c1': 0, 'channel:a': 1 } });
  // b refuses; c is next, then a again (least recently failed first).
  b.send('connect_error', new Error('the node is shutting down; connect to another node'));
  const c = await t.io.nth(3);
  assert.equal(c.url, 'http://c');
  c.send('connect_error', new Error('xhr poll error'));
  const again = await t.io.nth(4, 3000);
  assert.equal(again.url, 'http://a');
  assert.ok(t.got('error').some((e) => /shutting down/.test(e.message)));
});

test('with spare: a second connection to another node; when the main drops, the spare goes on at once', async () => {
  const t = start({ spare: true });
  const a = await live(t, { addresses: ['channel:a'], cursors: { 'channel:a': 5 } });
  const b = await t.io.nth(2);
  assert.equal(b.url, 'http://b', 'the spare goes to another url');
  assert.deepEqual(b.auth.cursors, { 'client:c1': 0, 'channel:a': 5 }, 'with the current cursors: no replay of history');
  b.session('c1', { addresses: ['channel:a'], node: 'n2' });
  b.send('synced', { cursors: { 'client:c1': 0, 'channel:a': 5 } });
  for (const v of [6, 7]) { a.signal('channel:a', v); b.signal('channel:a', v); }
  b.signal('channel:a', 8);
  await until(() => t.versions().length === 3);
  await until(() => a.acks().length);
  assert.deepEqual(b.acks(), [], 'acks go over the main connection only');
  // The main node dies: the spare is the main connection now, with no new handshake.
  a.send('disconnect', 'transport close');
  assert.equal(t.client.state, 'live');
  assert.equal(t.client.url, 'http://b');
  b.signal('channel:a', 9);
  await until(() => t.versions().length === 4);
  assert.deepEqual(t.versions(), [6, 7, 8, 9]);
  await until(() => b.acks().length);
  assert.deepEqual(b.acks().at(-1), { address: 'channel:a', version: 9 });
  assert.ok(t.got('session').at(-1).promoted);
  // A new spare opens on the url that did not fail.
  const c = await t.io.nth(3);
  assert.equal(c.url, 'http://c');
  assert.equal(c.auth.cursors['channel:a'], 9);
});

test('a spare that lands on the main node is closed and tried elsewhere', async () => {
  const t = start({ spare: true, urls: ['http://lb', 'http://x'] });
  await live(t, { node: 'n1' });
  const s = await t.io.nth(2);
  s.session('c1', { node: 'n1' });
  assert.equal(s.closed, true);
  await t.io.nth(3, 3000);
});

test('kicked: surfaced, everything closes, nothing reconnects until reconnect()', async () => {
  const t = start({ spare: true });
  const a = await live(t);
  const b = await t.io.nth(2);
  b.session('c1', { node: 'n2' });
  a.send('kicked', { reason: 'quota' });
  a.send('disconnect', 'io server disconnect');
  await until(() => t.got('kicked').length);
  assert.deepEqual(t.got('kicked'), [{ reason: 'quota' }]);
  assert.equal(t.client.state, 'offline');
  assert.equal(b.closed, true);
  await sleep(100);
  assert.equal(t.io.sockets.length, 2, 'no reconnect after a kick');
  t.client.reconnect();
  const c = await t.io.nth(3);
  assert.equal(c.auth.clientId, 'c1');
});

test('kicked with reconnect (the node rejoined its cluster): a lost connection, connected again', async () => {
  const t = start();
  const a = await live(t, { addresses: ['channel:a'], cursors: { 'channel:a': 0 } });
  a.signal('channel:a', 1);
  await until(() => t.client.cursors['channel:a'] === 1);
  a.send('kicked', { reason: 'the node rejoined the cluster: connect again', reconnect: true });
  a.send('disconnect', 'io server disconnect');
  assert.equal(t.client.state, 'offline');
  const b = await t.io.nth(2, 3000);
  assert.deepEqual(b.auth, { clientId: 'c1', resumeToken: 'rt-c1', cursors: { 'client:c1': 0, 'channel:a': 1 } });
  assert.deepEqual(t.got('kicked'), [], 'not the client\'s doing: no kicked event for the app');
});

test('an identity that can no longer resume is dropped: a `reset` event, then a new client', async () => {
  const storage = memoryStorage();
  storage.set('signalpost:http://a', { clientId: 'old', resumeToken: 'rt', cursors: { 'channel:a': 3 } });
  const t = start({ storage });
  const a = await t.io.nth(1);
  assert.equal(a.auth.clientId, 'old');
  assert.deepEqual(a.auth.cursors, { 'channel:a': 3 });
  a.send('connect_error', new Error('this client was revoked: connect as a new client'));
  const b = await t.io.nth(2);
  assert.deepEqual(b.auth, {});
  await until(() => t.got('reset').length);
  assert.match(t.got('reset')[0].reason, /revoked/);
  b.session('new');
  await until(() => storage.get('signalpost:http://a').clientId === 'new');
  assert.deepEqual(storage.get('signalpost:http://a').cursors, {});
});

test('a fixed client token that is refused stops the client; a token callback is called on each connect', async () => {
  const t = start({ token: 'bad' });
  const a = await t.io.nth(1);
  assert.equal(a.auth.token, 'bad');
  a.send('connect_error', new Error('invalid client token: ExpiredSignature'));
  await sleep(80);
  assert.equal(t.io.sockets.length, 1);
  assert.equal(t.client.state, 'offline');

  let calls = 0;
  const u = start({ token: async () => `t${++calls}` });
  const b = await u.io.nth(1);
  assert.equal(b.auth.token, 't1');
  b.send('connect_error', new Error('invalid client token: bad signature'));
  const c = await u.io.nth(2);
  assert.equal(c.auth.token, 't2');
});

test('with a token callback, a new token is sent with `refresh` before exp', async () => {
  const now = () => Math.floor(Date.now() / 1000);
  const tokens = [];
  const t = start({ token: () => { const tk = jwt({ sub: 'u', exp: now() + 2 }); tokens.push(tk); return tk; } });
  assert.equal(tokenExpiry(jwt({ exp: 1700000000 })), 1700000000000);
  assert.equal(tokenExpiry('not a jwt'), null);
  const a = await live(t);
  assert.equal(a.auth.token, tokens[0]);
  await until(() => a.sent.some((x) => x.event === 'refresh'), 3000, 'refresh');
  const r = a.sent.find((x) => x.event === 'refresh');
  assert.equal(r.data.token, tokens[1]);
  await t.client.close();
});

test('refresh(token) goes to every connection and rejects with the refusal', async () => {
  const t = start({ spare: true });
  const a = await live(t);
  const b = await t.io.nth(2);
  b.session('c1', { node: 'n2' });
  assert.equal((await t.client.refresh('x')).ok, true);
  assert.ok(a.sent.some((x) => x.event === 'refresh' && x.data.token === 'x'));
  assert.ok(b.sent.some((x) => x.event === 'refresh' && x.data.token === 'x'));
  a.answer = () => ({ error: 'token for another user' });
  await assert.rejects(t.client.refresh('y'), /another user/);
});

test('close() acks what was processed and keeps the identity; what was queued comes again', async () => {
  const t = start();
  let block;
  t.client.on('signal', (m) => (m.version === 2 ? new Promise((r) => { block = r; }) : undefined));
  const a = await live(t, { addresses: ['channel:a'], cursors: { 'channel:a': 0 } });
  for (const v of [1, 2, 3]) a.signal('channel:a', v);
  await until(() => block);
  await t.client.close();
  assert.ok(a.closed);
  assert.deepEqual(a.acks(), [{ address: 'channel:a', version: 1 }]);
  block();
  await sleep(10);
  t.client.reconnect();
  const b = await t.io.nth(2);
  assert.equal(b.auth.cursors['channel:a'], 2, 'version 2 was handled after close; 3 was not');
});

test('the Node and bundler entries use socket.io-client by default; only Node has fileStorage', async () => {
  const node = await import('../src/index.js');
  const browser = await import('../src/browser.js');
  assert.equal(typeof node.fileStorage, 'function');
  assert.equal(browser.fileStorage, undefined);
  const client = node.connect({ urls: ['http://127.0.0.1:9'], storage: memoryStorage(), connectTimeout: 2000 });
  const error = await new Promise((resolve) => client.on('error', resolve));
  assert.equal(error.url, 'http://127.0.0.1:9', 'a real connection attempt was refused');
  await client.close();
});

test('a promoted spare tells the app about bindings the dead main never delivered', async () => {
  const t = start({ spare: true });
  const a = await live(t, { addresses: ['channel:old'], cursors: { 'channel:old': 1 } });
  const b = await t.io.nth(2);
  b.session('c1', { addresses: ['channel:old'], node: 'n2' });
  b.send('synced', { cursors: { 'client:c1': 0, 'channel:old': 1 } });
  b.send('bound', { address: 'channel:new', version: 4 }); // the main died before sending these
  b.send('unbound', { address: 'channel:old', version: 1 });
  b.signal('channel:new', 5);
  a.send('disconnect', 'transport close');
  await until(() => t.got('unbound').length && t.versions('channel:new').length);
  assert.deepEqual(t.got('bound'), [{ address: 'channel:new', version: 4 }], 'with the head it was bound at');
  assert.deepEqual(t.got('unbound').map((u) => u.address), ['channel:old']);
  assert.equal(t.client.cursors['channel:old'], undefined);
  assert.equal(t.client.cursors['channel:new'], 5);
});
