// Readiness: /healthz answers 200 only when the node can apply operations (on the cluster
// backend, once its Kafka consumer holds its partitions), and the first operations sent right
// after the first 200 do not time out (they used to: 503 after 5 s on a fresh cluster node).
// Also: the `workers` setting sizes the runtime a node runs on.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { availableParallelism } from 'node:os';
import { startNode, api, connect, metric, waitFor } from './lib/harness.mjs';

test('the first bind and enqueue right after the first 200 from /healthz are applied', async (t) => {
  for (let round = 0; round < 2; round++) {
    // A fresh node, then the same node restarted (its consumer group has a departed member).
    const node = await startNode({ ready: false, dataDir: round === 0 ? undefined : t.dataDir });
    t.dataDir = node.dataDir;
    const statuses = [];
    const start = Date.now();
    await waitFor(async () => {
      const r = await api(node.url, 'GET', '/healthz');
      statuses.push(r.status);
      if (r.status !== 200) assert.equal(r.status, 503);
      return r.status === 200;
    }, 60000, 'healthz 200');
    const c = connect(node.url);
    const s = await c.ready;
    const bind = await api(node.url, 'POST', '/server/connect', { client: s.clientId, addresses: ['channel:ready'] });
    assert.equal(bind.status, 200, JSON.stringify(bind.body));
    const put = await api(node.url, 'POST', '/server/enqueue?wait=true', { address: 'channel:ready', payload: round });
    assert.equal(put.status, 200, JSON.stringify(put.body));
    await c.waitCount('channel:ready', 1);
    t.diagnostic(`round ${round}: ready ${Date.now() - start} ms after the node printed its address; ${statuses.filter((x) => x === 503).length} answers of 503 before`);
    c.close();
    await node.stop();
  }
});

test('`workers` sizes the node\'s runtime, and a node with one worker serves', async () => {
  const cores = availableParallelism();
  for (const [workers, want] of [[undefined, cores], [1, 1], [3, 3]]) {
    const env = workers === undefined ? {} : { SIGNALPOST_WORKERS: String(workers) };
    const node = await startNode({ env });
    try {
      assert.equal(await metric(node.url, 'signalpost_runtime_workers'), want, `workers=${workers}`);
      const c = connect(node.url);
      const s = await c.ready;
      const put = await api(node.url, 'POST', '/server/enqueue?wait=true', { address: `client:${s.clientId}`, payload: workers ?? 0 });
      assert.equal(put.status, 200, JSON.stringify(put.body));
      await c.waitCount(`client:${s.clientId}`, 1);
      c.close();
    } finally {
      const { code } = await node.stop();
      assert.equal(code, 0);
    }
  }
});
