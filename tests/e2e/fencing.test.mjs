// A node that loses its ZooKeeper session fences itself: while ZooKeeper is away it appends
// nothing (what is enqueued waits in Kafka), and when ZooKeeper is back it rejoins and applies
// everything once, in order (cluster backend; stops and starts the stack's ZooKeeper).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BACKEND, startNode, api, waitFor } from './lib/harness.mjs';

const skip = BACKEND !== 'cluster' && 'needs the cluster backend (SIGNALPOST_TEST_BACKEND=cluster)';
const stack = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'scripts', 'stack');

test('ZooKeeper away: the node fences itself, then rejoins and applies everything once', { skip, timeout: 180000 }, async () => {
  const node = await startNode({ env: { SIGNALPOST_ZOOKEEPER_SESSION_TIMEOUT_MS: '4000' } });
  const address = 'channel:fence';
  const first = await api(node.url, 'POST', '/server/enqueue?wait=true', { address, id: 'f-0', payload: 0 });
  assert.equal(first.status, 200, JSON.stringify(first.body));
  try {
    execFileSync(stack, ['down', 'zookeeper'], { stdio: 'ignore' });
    await waitFor(async () => (await api(node.url, 'GET', '/healthz')).body.backends?.membership?.status === 'down', 20000, 'membership down');
    // Enqueued while fenced: durably queued in Kafka, not appended.
    for (let i = 1; i <= 20; i++) {
      const r = await api(node.url, 'POST', '/server/enqueue', { address, id: `f-${i}`, payload: i });
      assert.equal(r.status, 202);
    }
    await new Promise((r) => setTimeout(r, 3000));
    const during = await api(node.url, 'GET', `/server/mailbox/${address}`);
    assert.equal(during.body.head, first.body.version, 'nothing appended while fenced');
  } finally {
    execFileSync(stack, ['up', 'zookeeper'], { stdio: 'ignore' });
  }
  const t0 = Date.now();
  await waitFor(async () => (await api(node.url, 'GET', `/server/mailbox/${address}`)).body.head === first.body.version + 20, 60000, 'the queued messages applied after ZooKeeper is back');
  console.log(`# applied ${Date.now() - t0} ms after ZooKeeper was up again`);
  const page = await api(node.url, 'GET', `/server/mailbox/${address}?limit=100`);
  assert.deepEqual(page.body.messages.map((m) => m.id), Array.from({ length: 21 }, (_, i) => `f-${i}`), 'each once, in order');
  await waitFor(async () => (await api(node.url, 'GET', '/healthz')).status === 200, 20000, 'healthy again');
  const nodes = await api(node.url, 'GET', '/server/nodes');
  assert.equal(nodes.body.nodes.length, 1, 'registered again');
  await node.stop();
});
