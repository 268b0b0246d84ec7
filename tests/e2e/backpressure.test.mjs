// A client that stops reading gets backpressure, not unbounded buffering: the node notices the full
// socket buffer, stops queueing for it, and later serves it from the mailbox, in order, with
// nothing lost and nothing twice. The connection limit refuses with a clear connect_error.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startNode, api, connect, refusal, waitFor, metric, BACKEND } from './lib/harness.mjs';

test('a client that stops reading is caught up from the mailbox, in order, once', async () => {
  const node = await startNode();
  const c = connect(node.url);
  const s = await c.ready;
  await c.waitFor((e) => e.event === 'synced');
  const own = `client:${s.clientId}`;
  const tcp = c.socket.io.engine.transport.ws._socket;
  tcp.pause(); // stop reading: the kernel buffers fill, then the node's socket buffer
  const pad = 'x'.repeat(2000);
  const total = 20000;
  const writesBefore = await metric(node.url, 'signalpost_log_write_seconds_count');
  for (let i = 0; i < total; i += 1000) {
    const batch = Array.from({ length: 1000 }, (_, j) => ({ address: own, payload: { n: i + j, pad } }));
    const r = await api(node.url, 'POST', '/server/enqueue?wait=true', batch);
    assert.equal(r.status, 200);
  }
  if (BACKEND === 'embedded') {
    // Every answered request waited for at least one synchronous log write, and each is timed.
    const writes = (await metric(node.url, 'signalpost_log_write_seconds_count')) - writesBefore;
    assert.ok(writes >= total / 1000, `log writes timed: ${writes}`);
  }
  await waitFor(async () => (await metric(node.url, 'signalpost_lagged_total')) > 0, 10000, 'the node to notice the slow client');
  assert.ok(c.signals(own).length < total, 'the client had not read everything yet');
  tcp.resume();
  await c.waitCount(own, total, 60000);
  const got = c.signals(own).map((x) => x.version);
  assert.equal(got.length, total, 'nothing twice');
  assert.deepEqual(got, Array.from({ length: total }, (_, i) => i + 1), 'in order, nothing lost');
  c.close();
  await node.stop();
});

test('the connection limit refuses with a reason', async () => {
  const node = await startNode({ env: { SIGNALPOST_MAX_CONNECTIONS: '2' } });
  const a = connect(node.url);
  const b = connect(node.url);
  await a.ready;
  await b.ready;
  const e = await refusal(node.url, {});
  assert.match(e.message, /too many connections on this node \(limit 2\)/);
  a.close();
  await waitFor(async () => (await api(node.url, 'GET', '/healthz')).body.connections === 1, 5000, 'the slot to free');
  const c = connect(node.url);
  await c.ready;
  b.close();
  c.close();
  await node.stop();
});

test('a burst of handshakes cannot pass the connection limit', async () => {
  // Every handshake is checked against the cap and takes its slot in the same step: twelve at
  // once against a cap of three get three sessions and nine refusals, never more sessions.
  const node = await startNode({ env: { SIGNALPOST_MAX_CONNECTIONS: '3' } });
  const burst = Array.from({ length: 12 }, () => connect(node.url));
  const results = await Promise.allSettled(burst.map((c) => c.ready));
  const accepted = results.filter((r) => r.status === 'fulfilled').length;
  const refused = results.filter((r) => r.status === 'rejected');
  assert.equal(accepted, 3, `accepted ${accepted} of 12 under a cap of 3`);
  for (const r of refused) assert.match(r.reason.message, /too many connections on this node \(limit 3\)/);
  assert.equal((await api(node.url, 'GET', '/healthz')).body.connections, 3);
  for (const c of burst) c.close();
  await waitFor(async () => (await api(node.url, 'GET', '/healthz')).body.connections === 0, 5000, 'every slot to free');
  await node.stop();
});
