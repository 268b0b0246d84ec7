// History by time and rewind on bind (issue 16) with the official socket.io-client: the server
// API's `?since=&until=`, the client's `history` event (only for addresses it receives), and
// `rewind` on `POST /server/connect` (a count or `{since}`), on both backends.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startNode, api, connect, fill, waitFor } from './lib/harness.mjs';
import { io } from 'socket.io-client';
import { connect as library, memoryStorage } from '../../clients/js/src/client.js';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Sends `history` with an acknowledgement callback; resolves with the answer. */
const history = (c, req) => new Promise((resolve) => c.socket.emit('history', req, resolve));

test('history by time, the history event and rewind on bind', async () => {
  const node = await startNode();
  const channel = `channel:hist-${Date.now()}`;
  // 30 messages in three batches, each batch stamped later than the one before.
  for (let b = 0; b < 3; b++) {
    await fill(node.url, channel, 10, { from: b * 10 });
    await sleep(20);
  }
  const all = (await api(node.url, 'GET', `/server/mailbox/${channel}?limit=100`)).body.messages;
  assert.equal(all.length, 30);
  assert.ok(all.every((m, i) => i === 0 || all[i - 1].ts <= m.ts), 'stamps follow versions');
  const ts = all.map((m) => m.ts);
  const stamped = (lo, hi = Infinity) => all.filter((m) => m.ts >= lo && m.ts <= hi).map((m) => m.version);

  // The server API by time.
  let r = await api(node.url, 'GET', `/server/mailbox/${channel}?since=${ts[10]}`);
  assert.equal(r.status, 200);
  assert.deepEqual(r.body.messages.map((m) => m.version), stamped(ts[10]));
  r = await api(node.url, 'GET', `/server/mailbox/${channel}?since=${ts[10]}&until=${ts[19]}&limit=4`);
  assert.deepEqual(r.body.messages.map((m) => m.version), stamped(ts[10], ts[19]).slice(0, 4));
  r = await api(node.url, 'GET', `/server/mailbox/${channel}?until=${ts[0] - 1}`);
  assert.deepEqual(r.body.messages, [], 'nothing stamped before the first');
  r = await api(node.url, 'GET', `/server/mailbox/${channel}?since=${ts[29] + 1}`);
  assert.deepEqual(r.body.messages, []);
  r = await api(node.url, 'GET', `/server/mailbox/${channel}?after=3&since=${ts[0]}`);
  assert.equal(r.status, 400);
  assert.match(JSON.stringify(r.body), /not both/);

  // The history event: for an address the client receives only.
  const a = connect(node.url);
  const sa = await a.ready;
  await a.waitFor((e) => e.event === 'synced');
  let h = await history(a, { address: channel, last: 2 });
  assert.match(h.error, /does not receive/, 'not bound yet: refused');
  const bind = await api(node.url, 'POST', '/server/connect', { client: sa.clientId, addresses: [channel] });
  assert.equal(bind.status, 200);
  await a.waitFor((e) => e.event === 'bound');
  h = await history(a, { address: channel, last: 5 });
  assert.deepEqual(h.messages.map((m) => m.version), [26, 27, 28, 29, 30]);
  assert.deepEqual(h.messages.map((m) => m.payload.n), [25, 26, 27, 28, 29]);
  h = await history(a, { address: channel, since: ts[10], limit: 3 });
  assert.deepEqual(h.messages.map((m) => m.version), stamped(ts[10]).slice(0, 3));
  h = await history(a, { address: channel, since: ts[10], until: ts[19] });
  assert.deepEqual(h.messages.map((m) => m.version), stamped(ts[10], ts[19]));
  h = await history(a, { address: channel });
  assert.equal(h.messages.length, 30, 'no bounds: from the oldest kept, at most 100');
  for (const [req, why] of [
    [{ address: channel, last: 0 }, /last must be/],
    [{ address: channel, limit: 5000 }, /limit must be/],
    [{ address: channel, last: 2, since: 1 }, /not both/],
    [{ address: 'channel:elsewhere', last: 1 }, /does not receive/],
    [{ address: 'not an address' }, /./],
    [{ addresses: channel }, /unknown field/],
    ['x', /history/],
  ]) {
    h = await history(a, req);
    assert.match(h.error, why, JSON.stringify(req));
  }
  assert.equal(a.signals(channel).length, 0, 'history answers; it does not deliver');

  // Rewind on bind: a count, then a time.
  const b = connect(node.url);
  const sb = await b.ready;
  await b.waitFor((e) => e.event === 'synced');
  r = await api(node.url, 'POST', '/server/connect', { client: sb.clientId, addresses: [channel], rewind: 3 });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.deepEqual(r.body.bound, [{ address: channel, version: 27 }]);
  await b.waitCount(channel, 3);
  assert.deepEqual(b.signals(channel).map((s) => s.version), [28, 29, 30]);
  const c = connect(node.url);
  const sc = await c.ready;
  await c.waitFor((e) => e.event === 'synced');
  r = await api(node.url, 'POST', '/server/connect', { client: sc.clientId, addresses: [channel], rewind: { since: ts[20] } });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  const want = stamped(ts[20]);
  await c.waitCount(channel, want.length);
  assert.deepEqual(c.signals(channel).map((s) => s.version), want);
  // Then live, in order after the rewound ones.
  await fill(node.url, channel, 2, { from: 100 });
  await b.waitCount(channel, 5);
  await c.waitCount(channel, want.length + 2);
  assert.deepEqual(b.signals(channel).map((s) => s.version), [28, 29, 30, 31, 32]);
  // A binding already in place keeps its start; rewind on disconnect, or a bad one, is refused.
  r = await api(node.url, 'POST', '/server/connect', { client: sb.clientId, addresses: [channel], rewind: 30 });
  assert.deepEqual(r.body.bound, [{ address: channel, version: 27 }]);
  r = await api(node.url, 'POST', '/server/disconnect', { client: sb.clientId, addresses: [channel], rewind: 3 });
  assert.equal(r.status, 400);
  r = await api(node.url, 'POST', '/server/connect', { client: sb.clientId, addresses: ['channel:other'], rewind: 'all' });
  assert.equal(r.status, 400);
  assert.match(JSON.stringify(r.body), /rewind must be/);
  // A client bound while offline gets the rewound messages when it resumes.
  const d = connect(node.url);
  const sd = await d.ready;
  await d.waitFor((e) => e.event === 'synced');
  d.close();
  r = await api(node.url, 'POST', '/server/connect', { client: sd.clientId, addresses: [channel], rewind: 2 });
  assert.equal(r.status, 200);
  const d2 = connect(node.url, { clientId: sd.clientId, resumeToken: sd.resumeToken });
  await d2.ready;
  await d2.waitFor((e) => e.event === 'synced');
  assert.deepEqual(d2.signals(channel).map((s) => s.version), [31, 32]);
  // The client library's history(): the same answers, a refusal as a rejection.
  const lib = library({ io, urls: [node.url], storage: memoryStorage(), socketOptions: { transports: ['websocket'] } });
  await waitFor(() => lib.state === 'live', 10000, 'the library live');
  await assert.rejects(lib.history(channel, { last: 2 }), /does not receive/);
  r = await api(node.url, 'POST', '/server/connect', { client: lib.clientId, addresses: [channel] });
  assert.equal(r.status, 200);
  let got;
  await waitFor(async () => { got = await lib.history(channel, { last: 3 }).catch(() => null); return got; }, 10000, 'history once bound');
  assert.deepEqual(got.map((m) => m.version), [30, 31, 32]);
  got = await lib.history(channel, { since: ts[10], until: ts[19] });
  assert.deepEqual(got.map((m) => m.version), stamped(ts[10], ts[19]));
  await lib.close({ forget: true });

  // One history (or members) request at a time per connection: twenty sent at once, some are
  // refused with a reason; once answered, the next is served again.
  const burst = await Promise.all(Array.from({ length: 20 }, () => history(a, { address: channel, since: ts[5] })));
  const refused = burst.filter((r) => r.error);
  assert.ok(refused.length > 0 && refused.length < 20, `${refused.length} of 20 refused`);
  for (const r of refused) assert.match(r.error, /one history or members request at a time/);
  assert.ok((await history(a, { address: channel, last: 1 })).messages, 'served again');
  for (const x of [a, b, c, d2]) x.close();
  assert.equal((await node.stop()).code, 0);
});
