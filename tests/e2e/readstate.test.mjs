// Read state (issue 16) with the official socket.io-client: the `read` event marks single
// messages read, `GET /server/clients/<id>/read/<address>` answers the ranges read and the count
// unread, stored compressed; on both backends.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startNode, api, connect, fill, waitFor, metric, BACKEND } from './lib/harness.mjs';
import { io } from 'socket.io-client';
import { connect as library, memoryStorage } from '../../clients/js/src/client.js';

/** Sends `read` with an acknowledgement callback; resolves with the answer. */
const read = (c, req) => new Promise((resolve) => c.socket.emit('read', req, resolve));

/** A connected client bound to `channel`, which then holds `n` messages the client got. */
async function boundReader(url, channel, n) {
  const a = connect(url);
  const s = await a.ready;
  await a.waitFor((e) => e.event === 'synced');
  assert.equal((await api(url, 'POST', '/server/connect', { client: s.clientId, addresses: [channel] })).status, 200);
  await a.waitFor((e) => e.event === 'bound');
  await fill(url, channel, n);
  await a.waitCount(channel, n);
  return { a, s };
}

test('read marks are forgotten the retention after the last read: by TTL on Cassandra, by the expiry task embedded', async () => {
  const node = await startNode({ env: { SIGNALPOST_RETENTION_SECS: '4', SIGNALPOST_EXPIRY_INTERVAL_MS: '100' } });
  const channel = `channel:reads-expire-${Date.now()}`;
  const { a, s } = await boundReader(node.url, channel, 3);
  assert.equal((await read(a, { address: channel, versions: [1, 2] })).ok, true);
  const state = async () => (await api(node.url, 'GET', `/server/clients/${s.clientId}/read/${encodeURIComponent(channel)}`)).body;
  const marked = await state();
  assert.deepEqual(marked.read, [[1, 2]]);
  assert.ok(marked.bytes > 0);
  // `bytes` is what is stored: the row itself is gone, not only hidden below the mailbox's low.
  await waitFor(async () => (await state()).bytes === 0, 9000, 'the marks row expires');
  if (BACKEND !== 'cluster') assert.ok((await metric(node.url, 'signalpost_expired_state_total')) >= 1);
  a.close();
  await node.stop();
});

test('read marks single messages; the server API answers ranges and unread, compressed', async () => {
  const node = await startNode();
  const channel = `channel:reads-${Date.now()}`;
  const { a, s } = await boundReader(node.url, channel, 10);
  const state = async (address = channel) => (await api(node.url, 'GET', `/server/clients/${s.clientId}/read/${encodeURIComponent(address)}`)).body;

  let st = await state();
  assert.deepEqual({ ...st, bytes: undefined }, { address: channel, head: 10, unread: 10, read: [], bytes: undefined });
  let r = await read(a, { address: channel, versions: [1, 2, 5] });
  assert.equal(r.ok, true, JSON.stringify(r));
  r = await read(a, { address: channel, versions: [2, 3, 9] });
  assert.equal(r.ok, true);
  st = await state();
  assert.deepEqual(st.read, [[1, 3], [5, 5], [9, 9]]);
  assert.equal(st.unread, 5);
  assert.equal(st.head, 10);
  assert.ok(st.bytes > 0 && st.bytes < 200, `${st.bytes} bytes`);
  // Reads of the own address work too; the ack cursor is apart.
  const own = `client:${s.clientId}`;
  await fill(node.url, own, 3);
  await a.waitCount(own, 3);
  assert.equal((await read(a, { address: own, versions: [2] })).ok, true);
  assert.deepEqual((await state(own)).read, [[2, 2]]);
  assert.equal((await api(node.url, 'GET', `/server/clients/${s.clientId}`)).body.cursors[channel] ?? 0, 0, 'read is not ack');

  // Refusals: an `error` event, and the callback's {error}.
  const errorsBefore = a.events.filter((e) => e.event === 'error').length;
  for (const [req, why] of [
    [{ address: 'channel:elsewhere', versions: [1] }, /does not receive/],
    [{ address: channel, versions: [11] }, /does not exist/],
    [{ address: channel, versions: [0] }, /does not exist/],
    [{ address: channel, versions: [] }, /1 to 1000/],
    [{ address: channel, versions: [-1] }, /read/],
    [{ address: channel }, /missing field/],
    [{ address: channel, versions: [1], extra: 1 }, /unknown field/],
  ]) {
    r = await read(a, req);
    assert.match(r.error, why, JSON.stringify(req));
  }
  await a.waitFor(() => a.events.filter((e) => e.event === 'error').length >= errorsBefore + 7, 5000, 'error events');
  assert.deepEqual((await state()).read, [[1, 3], [5, 5], [9, 9]], 'refused reads change nothing');
  // Without a callback, as the contract has it: stored all the same.
  a.socket.emit('read', { address: channel, versions: [10] });
  const end = Date.now() + 5000;
  while (Date.now() < end && (await state()).unread !== 4) await new Promise((res) => setTimeout(res, 50));
  assert.equal((await state()).unread, 4);
  // The API refuses what is not an address or a client.
  assert.equal((await api(node.url, 'GET', `/server/clients/${s.clientId}/read/nope`)).status, 400);
  assert.equal((await api(node.url, 'GET', `/server/clients/${encodeURIComponent('a b')}/read/${channel}`)).status, 400);

  // Every other message of 100 000, marked 1 000 at a time: stored compressed.
  const big = `channel:reads-big-${Date.now()}`;
  assert.equal((await api(node.url, 'POST', '/server/connect', { client: s.clientId, addresses: [big] })).status, 200);
  await a.waitFor((e) => e.event === 'bound' && e.data.address === big);
  for (let i = 0; i < 100; i++) {
    const batch = Array.from({ length: 1000 }, (_, j) => ({ address: big, payload: i * 1000 + j }));
    assert.equal((await api(node.url, 'POST', '/server/enqueue?wait=true', batch)).status, 200);
  }
  for (let from = 1; from <= 100_000; from += 2000) {
    const versions = Array.from({ length: 1000 }, (_, k) => from + 2 * k);
    r = await read(a, { address: big, versions });
    assert.equal(r.ok, true, JSON.stringify(r));
  }
  st = await state(big);
  assert.equal(st.head, 100_000);
  assert.equal(st.unread, 50_000);
  assert.equal(st.read.length, 50_000);
  assert.deepEqual(st.read.slice(0, 2), [[1, 1], [3, 3]]);
  console.log(`every other message of 100 000 read: ${st.bytes} bytes stored`);
  assert.ok(st.bytes < 20_000, `${st.bytes} bytes`);

  // The client library's read(): marks, and a refusal as a rejection.
  const lib = library({ io, urls: [node.url], storage: memoryStorage(), socketOptions: { transports: ['websocket'] } });
  await waitFor(() => lib.state === 'live', 10000, 'the library live');
  await assert.rejects(lib.read(channel, [1]), /does not receive/);
  assert.equal((await api(node.url, 'POST', '/server/connect?wait=true', { client: lib.clientId, addresses: [channel] })).status, 200);
  let answer;
  await waitFor(async () => { answer = await lib.read(channel, [4, 6]).catch(() => null); return answer; }, 10000, 'read once bound');
  assert.equal(answer.ok, true);
  assert.ok(answer.bytes > 0);
  await assert.rejects(lib.read(channel, [99]), /does not exist/);
  const mine = (await api(node.url, 'GET', `/server/clients/${lib.clientId}/read/${channel}`)).body;
  assert.deepEqual(mine.read, [[4, 4], [6, 6]]);
  await lib.close({ forget: true });
  a.close();
  assert.equal((await node.stop()).code, 0);
});
