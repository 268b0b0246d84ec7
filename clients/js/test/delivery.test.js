// Handing versions to the application: once, in order, from whichever connection brings them
// first; acks after the handler, coalesced per address; gaps; versions that skip ahead.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { start, live } from './helpers.js';
import { until, sleep } from './fake-io.js';

test('signals are handed in order and acked after the handler, one ack per address per tick', async () => {
  const t = start();
  let release;
  const gate = new Promise((r) => { release = r; });
  const processed = [];
  t.client.on('signal', async (m) => {
    if (m.address !== 'channel:a') return;
    if (m.version === 1) await gate; // the handler of version 1 takes its time
    processed.push(m.version);
  });
  const s = await live(t, { addresses: ['channel:a'], cursors: { 'channel:a': 0 } });
  for (let v = 1; v <= 30; v++) s.signal('channel:a', v);
  s.signal('client:c1', 1);
  await sleep(60);
  assert.deepEqual(s.acks(), [], 'nothing acked while the first handler runs');
  assert.deepEqual(t.client.cursors['channel:a'], 0);
  release();
  await until(() => processed.length === 30);
  await until(() => s.acks().some((a) => a.address === 'client:c1'));
  const acks = s.acks();
  assert.ok(acks.length <= 4, `coalesced: ${JSON.stringify(acks)}`);
  assert.deepEqual(acks.filter((a) => a.address === 'channel:a').at(-1), { address: 'channel:a', version: 30 });
  assert.deepEqual(processed, Array.from({ length: 30 }, (_, i) => i + 1));
  assert.equal(t.client.cursors['channel:a'], 30);
  assert.deepEqual(t.storage.get('signalpost:http://a').cursors, { 'client:c1': 1, 'channel:a': 30 });
});

test('versions at or below the cursor are dropped; a gap moves the cursor and is acked', async () => {
  const t = start();
  const s = await live(t, { addresses: ['channel:a'], cursors: { 'channel:a': 2 } });
  s.signal('channel:a', 1);
  s.signal('channel:a', 2);
  s.signal('channel:a', 3);
  s.signal('channel:a', 3);
  s.send('gap', { address: 'channel:a', from: 4, to: 6 });
  s.send('gap', { address: 'channel:a', from: 5, to: 6 });
  s.signal('channel:a', 7);
  await until(() => t.versions().length === 2);
  assert.deepEqual(t.versions(), [3, 7]);
  assert.deepEqual(t.got('gap'), [{ address: 'channel:a', from: 4, to: 6 }]);
  await until(() => s.acks().length);
  assert.deepEqual(s.acks(), [{ address: 'channel:a', version: 7 }]);
});

test('a version that skips ahead waits for the missing ones, then all go in order', async () => {
  const t = start({ spare: true });
  const main = await live(t, { addresses: ['channel:a'], cursors: { 'channel:a': 3 } });
  const spare = await t.io.nth(2);
  spare.session('c1', { addresses: ['channel:a'], node: 'n2' });
  spare.signal('channel:a', 6); // cannot happen with in-order connections, but if it does…
  await sleep(20);
  assert.deepEqual(t.versions(), [], 'held back');
  main.signal('channel:a', 4);
  main.signal('channel:a', 5);
  await until(() => t.versions().length === 3);
  main.signal('channel:a', 6);
  await sleep(20);
  assert.deepEqual(t.versions(), [4, 5, 6]);
});

test('a hole that is not filled in time drops the connection that skipped, and resumes from the cursor', async () => {
  const t = start({ holdMs: 50 });
  const s = await live(t, { addresses: ['channel:a'], cursors: { 'channel:a': 3 } });
  s.signal('channel:a', 4);
  s.signal('channel:a', 7);
  const again = await t.io.nth(2, 1000);
  assert.equal(s.closed, true);
  assert.equal(again.auth.cursors['channel:a'], 4);
  assert.ok(t.got('error').some((e) => /without a gap/.test(e.message)));
  again.session('c1', { addresses: ['channel:a'] });
  for (const v of [5, 6, 7]) again.signal('channel:a', v);
  await until(() => t.versions().length === 4);
  assert.deepEqual(t.versions(), [4, 5, 6, 7]);
});

test('synced comes after the replayed signals are handled, and the state goes live then', async () => {
  const t = start();
  const order = [];
  t.client.on('signal', async (m) => { await sleep(5); order.push(`signal ${m.version}`); });
  t.client.on('synced', () => order.push('synced'));
  t.client.on('state', (s) => order.push(s));
  const s = await t.io.nth(1);
  s.session('c1', { addresses: ['channel:a'] });
  s.signal('channel:a', 1);
  s.signal('channel:a', 2);
  s.send('synced', { cursors: { 'channel:a': 2, 'client:c1': 0 } });
  await until(() => order.includes('live'));
  assert.deepEqual(order, ['connecting', 'replaying', 'signal 1', 'signal 2', 'synced', 'live']);
  assert.equal(t.events.find((e) => e.ev === 'signal').info.replay, true);
});

test('a throwing handler is reported with `error` and the version counts as handled', async () => {
  const t = start();
  t.client.on('signal', (m) => { if (m.version === 1) throw new Error('boom'); });
  const s = await live(t, { addresses: ['channel:a'], cursors: { 'channel:a': 0 } });
  s.signal('channel:a', 1);
  s.signal('channel:a', 2);
  await until(() => t.client.cursors['channel:a'] === 2);
  assert.ok(t.got('error').some((e) => e.message === 'boom'));
});

test('bound and unbound: the cursor starts at the binding head; each reaches the app once', async () => {
  const t = start({ spare: true });
  const main = await live(t, {});
  const spare = await t.io.nth(2);
  spare.session('c1', { node: 'n2' });
  spare.send('synced', { cursors: { 'client:c1': 0 } });
  spare.send('bound', { address: 'channel:n', version: 10 });
  spare.signal('channel:n', 11);
  main.send('bound', { address: 'channel:n', version: 10 });
  main.signal('channel:n', 11);
  main.signal('channel:n', 12);
  spare.signal('channel:n', 12);
  main.send('unbound', { address: 'channel:n', version: 12 });
  await until(() => t.got('unbound').length === 1);
  assert.equal(t.client.cursors['channel:n'], 12, 'kept while the spare still receives it');
  spare.send('unbound', { address: 'channel:n', version: 12 });
  await sleep(20);
  assert.deepEqual(t.got('bound'), [{ address: 'channel:n', version: 10 }]);
  assert.deepEqual(t.got('unbound'), [{ address: 'channel:n', version: 12 }]);
  assert.deepEqual(t.versions('channel:n'), [11, 12]);
  assert.equal(t.client.cursors['channel:n'], undefined, 'forgotten once no connection receives it');
});

test('a work address: each message handed as it comes, acked on its own once handled, no cursor', async () => {
  const t = start();
  const handled = [];
  t.client.on('signal', (m) => { if (m.address === 'work:w') handled.push(m.version); });
  const s = await live(t, { addresses: ['work:w'], cursors: {} });
  for (const v of [5, 2, 9]) s.signal('work:w', v);
  await until(() => handled.length === 3);
  assert.deepEqual(handled, [5, 2, 9], 'dealt out, not held back for the versions between');
  await until(() => s.acks().length === 3);
  assert.deepEqual(s.acks(), [5, 2, 9].map((version) => ({ address: 'work:w', version })), 'one ack per message');
  assert.equal(t.client.cursors['work:w'], undefined, 'no cursor');
});
