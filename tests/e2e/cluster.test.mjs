// Nodes of one cluster (cluster backend): each lists the others with one leader; presence is
// cluster-wide; when a node dies, the leader clears its clients' presence within the ZooKeeper
// session timeout plus a few seconds.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BACKEND, startNode, api, connect, testCluster, waitFor } from './lib/harness.mjs';

const skip = BACKEND !== 'cluster' && 'needs the cluster backend (SIGNALPOST_TEST_BACKEND=cluster)';

test('two nodes: membership, leader, cluster-wide presence, cleanup after a dead node', { skip, timeout: 120000 }, async () => {
  const shared = testCluster('two');
  const a = await startNode({ env: shared });
  await waitFor(async () => (await api(a.url, 'GET', '/server/nodes')).body.leader, 20000, 'a leader');
  const b = await startNode({ env: shared });
  const both = await waitFor(async () => {
    const r = await api(b.url, 'GET', '/server/nodes');
    return r.status === 200 && r.body.nodes.length === 2 ? r.body : null;
  }, 20000, 'both nodes listed');
  assert.equal(both.nodes.filter((n) => n.leader).length, 1, 'one leader');
  const idA = (await api(a.url, 'GET', '/server/nodes')).body.self;
  assert.equal(both.leader, idA, 'the first node leads');
  assert.deepEqual(both.nodes.map((n) => n.url).sort(), [a.url, b.url].sort());

  // A client on b is seen as connected, on b, from a.
  const c = connect(b.url);
  const s = await c.ready;
  await api(a.url, 'POST', '/server/connect', { client: s.clientId, addresses: ['channel:two'] });
  const idB = (await api(b.url, 'GET', '/server/nodes')).body.self;
  const seen = await waitFor(async () => {
    const r = await api(a.url, 'GET', `/server/clients/${s.clientId}`);
    return r.body.connected ? r.body : null;
  }, 10000, 'presence seen from the other node');
  assert.equal(seen.node, idB);
  const p = await api(a.url, 'GET', '/server/presence/channel:two');
  assert.deepEqual(p.body.clients.map((x) => [x.clientId, x.node]), [[s.clientId, idB]]);

  // b dies: within the session timeout plus a few seconds the leader has cleaned its presence.
  const died = Date.now();
  await b.kill();
  c.close();
  await waitFor(async () => !(await api(a.url, 'GET', `/server/clients/${s.clientId}`)).body.connected, 30000, 'cleanup');
  const took = Date.now() - died;
  console.log(`# dead node cleaned up ${took} ms after SIGKILL (session timeout 4000 ms)`);
  assert.ok(took < 15000, `cleaned in ${took} ms`);
  const nodes = (await api(a.url, 'GET', '/server/nodes')).body;
  assert.deepEqual(nodes.nodes.map((n) => n.id), [idA]);
  await a.stop();
});

test('the leader dies before cleaning up after a dead node: the next leader cleans up after both', { skip, timeout: 120000 }, async () => {
  const shared = testCluster('lead');
  const a = await startNode({ env: shared });
  await waitFor(async () => (await api(a.url, 'GET', '/server/nodes')).body.leader, 20000, 'a leader');
  const b = await startNode({ env: shared });
  const c = await startNode({ env: shared });
  await waitFor(async () => (await api(c.url, 'GET', '/server/nodes')).body.nodes?.length === 3, 20000, 'three nodes');
  const onA = connect(a.url);
  const onB = connect(b.url);
  const [sa, sb] = [await onA.ready, await onB.ready];
  await waitFor(async () => (await api(c.url, 'GET', `/server/clients/${sb.clientId}`)).body.connected, 10000, 'presence of b\'s client');
  // b dies, and the leader a right after it, before b's session has even expired.
  await b.kill();
  await a.kill();
  onA.close();
  onB.close();
  const died = Date.now();
  await waitFor(async () => {
    const [x, y] = await Promise.all([sa, sb].map((s) => api(c.url, 'GET', `/server/clients/${s.clientId}`)));
    return !x.body.connected && !y.body.connected;
  }, 40000, 'the new leader cleaned up after both');
  console.log(`# new leader cleaned up after the old leader and another node ${Date.now() - died} ms after they died`);
  const nodes = (await api(c.url, 'GET', '/server/nodes')).body;
  assert.equal(nodes.nodes.length, 1);
  assert.equal(nodes.leader, nodes.self, 'the survivor leads');
  await c.stop();
});
