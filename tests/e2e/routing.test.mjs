// Three nodes of one cluster (cluster backend): messages reach every bound client on every node,
// in order, once; `?wait=true` answers on whichever node was asked; `bound` reaches a client on
// another node; a node with no interested client receives no live traffic; a client whose node
// is killed reconnects to another and resumes with exactly what it missed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BACKEND, startNode, api, connect, testCluster, waitFor, produce, metric, mailbox } from './lib/harness.mjs';

const skip = BACKEND !== 'cluster' && 'needs the cluster backend (SIGNALPOST_TEST_BACKEND=cluster)';

/** Shared settings of one test cluster: six partitions, and one resume secret so that a
 *  resume token is valid on every node. */
function cluster(name) {
  const env = testCluster(name, { SIGNALPOST_KAFKA_PARTITIONS: '6' });
  return { ...env, SIGNALPOST_RESUME_SECRET: `secret-${env.SIGNALPOST_CASSANDRA_KEYSPACE}-0123456789abcdef0123456789` };
}

async function startCluster(env, n) {
  const nodes = [];
  for (let i = 0; i < n; i++) nodes.push(await startNode({ env }));
  for (const node of nodes) {
    await waitFor(async () => (await api(node.url, 'GET', '/server/nodes')).body.nodes?.length === n, 30000, `${n} nodes listed`);
  }
  return nodes;
}

/** Asserts a client got exactly versions 1..n of `address`, in order. */
function exactlyOnce(rec, address, n, who) {
  const got = rec.signals(address).map((s) => s.version);
  assert.deepEqual(got, Array.from({ length: n }, (_, i) => i + 1), `${who}: every version once, in order`);
}

test('three nodes: every bound client on every node gets every message once, in order', { skip, timeout: 180000 }, async () => {
  const env = cluster('route');
  const nodes = await startCluster(env, 3);
  // Two clients on each node.
  const clients = [];
  for (const node of nodes) {
    for (let k = 0; k < 2; k++) {
      const c = connect(node.url);
      await c.ready;
      clients.push({ c, node });
    }
  }
  // Bound through one node; the `bound` event reaches each client on its own node.
  for (const [i, { c }] of clients.entries()) {
    const bind = await api(nodes[i % 3].url, 'POST', '/server/connect', { client: c.session.clientId, addresses: ['channel:shared'] });
    assert.equal(bind.status, 200, JSON.stringify(bind.body));
  }
  for (const { c } of clients) {
    await c.waitFor((e) => e.event === 'bound' && e.data.address === 'channel:shared', 15000, 'bound on the client\'s node');
  }
  // Any node lists every bound client, wherever it is connected (each node answers for its own
  // connections); an unbound one goes from the list.
  const byNode = new Map(await Promise.all(nodes.map(async (n) => [(await api(n.url, 'GET', '/server/nodes')).body.self, n])));
  for (const node of nodes) {
    const listed = (await api(node.url, 'GET', '/server/presence/channel:shared')).body;
    assert.equal(listed.truncated, false);
    assert.equal(listed.failed, undefined, JSON.stringify(listed.failed));
    assert.deepEqual(listed.clients.map((x) => x.clientId), clients.map(({ c }) => c.session.clientId).sort());
    for (const x of listed.clients) {
      const { node: at } = clients.find(({ c }) => c.session.clientId === x.clientId);
      assert.equal(byNode.get(x.node), at, `${x.clientId} listed on the node it is connected to`);
      assert.equal(x.connections.length, 1);
    }
  }
  const leaving = clients[4].c;
  assert.equal((await api(nodes[0].url, 'POST', '/server/disconnect', { client: leaving.session.clientId, addresses: ['channel:shared'] })).status, 200);
  await leaving.waitFor((e) => e.event === 'unbound' && e.data.address === 'channel:shared', 15000, 'unbound');
  const left = (await api(nodes[1].url, 'GET', '/server/presence/channel:shared')).body.clients.map((x) => x.clientId);
  assert.equal(left.length, 5);
  assert.ok(!left.includes(leaving.session.clientId), 'the unbound client is not listed');
  // Bound again (at version 0: nothing was sent yet), for what follows.
  assert.equal((await api(nodes[0].url, 'POST', '/server/connect', { client: leaving.session.clientId, addresses: ['channel:shared'] })).status, 200);
  await waitFor(async () => (await api(nodes[2].url, 'GET', '/server/presence/channel:shared')).body.clients.length === 6, 15000, 'listed again');
  // 300 messages through all three nodes, `?wait=true`: each answers with the version.
  const before = await Promise.all(nodes.map((n) => metric(n.url, 'signalpost_from_peers_total')));
  const versions = new Set();
  for (let i = 0; i < 30; i++) {
    const node = nodes[i % 3];
    const batch = Array.from({ length: 10 }, (_, j) => ({ address: 'channel:shared', id: `s-${i}-${j}`, payload: { i, j } }));
    const r = await api(node.url, 'POST', '/server/enqueue?wait=true', batch);
    assert.equal(r.status, 200, `wait=true on node ${i % 3}: ${JSON.stringify(r.body)}`);
    for (const x of r.body.results) versions.add(x.version);
  }
  assert.equal(versions.size, 300, 'every wait=true answer has its own version');
  // 60 more produced straight to Kafka by Kafka's own producer (as central infrastructure does),
  // and a binding through the connect topic: the 7th client, on node 2, joins the channel.
  const late = connect(nodes[1].url);
  await late.ready;
  const topics = env.SIGNALPOST_KAFKA_TOPIC_PREFIX;
  await produce(`${topics}connect`, [[late.session.clientId, { client: late.session.clientId, addresses: ['channel:shared'] }]]);
  await late.waitFor((e) => e.event === 'bound' && e.data.address === 'channel:shared', 30000, 'bound through Kafka');
  await produce(`${topics}enqueue`, Array.from({ length: 60 }, (_, i) => ['channel:shared', { address: 'channel:shared', id: `k-${i}`, payload: { kafka: i } }]));
  for (const [i, { c }] of clients.entries()) {
    await c.waitCount('channel:shared', 360, 30000);
    exactlyOnce(c, 'channel:shared', 360, `client ${i}`);
    assert.deepEqual(c.signals('channel:shared').slice(300).map((s) => s.payload.kafka), Array.from({ length: 60 }, (_, k) => k), `client ${i}: Kafka's records in their order`);
  }
  // The late client's cursor began at the binding: it has what came after, in order.
  await late.waitCount('channel:shared', 60, 30000);
  assert.deepEqual(late.signals('channel:shared').map((s) => s.version), Array.from({ length: 60 }, (_, k) => 301 + k), 'bound through Kafka: versions 301..360');
  late.close();
  const after = await Promise.all(nodes.map((n) => metric(n.url, 'signalpost_from_peers_total')));
  console.log(`# shared channel (HTTP + Kafka), clients on all 3 nodes: messages received from peers per node ${after.map((v, i) => v - before[i]).join(' / ')}`);

  // Interested clients on one node only: the others receive no live traffic for the addresses.
  // Six channels, so that some belong to partitions of the other nodes (their messages are
  // appended there and forwarded to node 3).
  const solo = connect(nodes[2].url);
  await solo.ready;
  const soloChannels = Array.from({ length: 6 }, (_, k) => `channel:solo-${k}`);
  await api(nodes[0].url, 'POST', '/server/connect', { client: solo.session.clientId, addresses: soloChannels });
  await solo.waitFor((e) => e.event === 'bound' && e.data.address === soloChannels[5], 15000, 'bound');
  const base = await Promise.all(nodes.map((n) => metric(n.url, 'signalpost_from_peers_total')));
  const fwd = await Promise.all(nodes.map((n) => metric(n.url, 'signalpost_forwarded_total')));
  for (let i = 0; i < 30; i++) {
    const batch = soloChannels.map((address, j) => ({ address, payload: { i, j } }));
    assert.equal((await api(nodes[i % 3].url, 'POST', '/server/enqueue', batch)).status, 202);
  }
  for (const ch of soloChannels) {
    await solo.waitCount(ch, 30, 30000);
    exactlyOnce(solo, ch, 30, `solo ${ch}`);
  }
  const got = await Promise.all(nodes.map(async (n, i) => (await metric(n.url, 'signalpost_from_peers_total')) - base[i]));
  const sent = await Promise.all(nodes.map(async (n, i) => (await metric(n.url, 'signalpost_forwarded_total')) - fwd[i]));
  console.log(`# 6 channels with their only client on node 3, 180 messages: received from peers per node ${got.join(' / ')}; forwarded per node ${sent.join(' / ')}`);
  assert.equal(got[0], 0, 'node 1 has no interested client: no live traffic');
  assert.equal(got[1], 0, 'node 2 has no interested client: no live traffic');
  assert.ok(sent[0] + sent[1] > 0, 'some channels were appended on other nodes');
  assert.equal(got[2], sent[0] + sent[1], 'node 3 received exactly what the others forwarded');
  assert.equal(sent[2], 0, 'node 3 forwarded nothing');
  for (const { c } of clients) c.close();
  solo.close();
  await Promise.all(nodes.map((n) => n.stop()));
});

test('a node killed under load: its clients resume on another node with exactly what they missed', { skip, timeout: 180000 }, async () => {
  const env = cluster('fail');
  const nodes = await startCluster(env, 3);
  const [a, b] = nodes;
  // Three clients on b, bound to a channel.
  const first = [];
  for (let k = 0; k < 3; k++) {
    const c = connect(b.url);
    await c.ready;
    first.push(c);
  }
  for (const c of first) {
    assert.equal((await api(a.url, 'POST', '/server/connect', { client: c.session.clientId, addresses: ['channel:fo'] })).status, 200);
  }
  for (const c of first) await c.waitFor((e) => e.event === 'bound', 15000, 'bound');
  // Load through a; kill b in the middle of it.
  let sent = 0;
  let stop = false;
  const acked = new Map(); // id → version, from the `?wait=true` answers
  const load = (async () => {
    while (!stop && sent < 600) {
      const batch = Array.from({ length: 10 }, (_, j) => ({ address: 'channel:fo', id: `fo-${sent + j}`, payload: sent + j }));
      const r = await api(a.url, 'POST', '/server/enqueue?wait=true', batch);
      if (r.status === 200) {
        for (const [j, x] of r.body.results.entries()) acked.set(batch[j].id, x.version);
        sent += 10;
      }
    }
  })();
  await waitFor(() => first.every((c) => c.signals('channel:fo').length >= 100), 30000, '100 messages on b\'s clients');
  const idB = (await api(b.url, 'GET', '/server/nodes')).body.self;
  const died = Date.now();
  await b.kill();
  // Each client reconnects to another node with its id, resume token and cursors.
  const resumed = [];
  for (const c of first) {
    const seen = c.signals('channel:fo').map((s) => s.version);
    const last = seen.at(-1) ?? 0;
    const r = connect(nodes[2].url, {
      clientId: c.session.clientId,
      resumeToken: c.session.resumeToken,
      cursors: { 'channel:fo': last },
    });
    await r.ready;
    resumed.push({ r, seen });
  }
  const failover = Date.now() - died;
  // The leader removes b's presence entries: within the ZooKeeper timeout (4 s) plus a few seconds.
  await waitFor(async () => {
    const r = await api(a.url, 'GET', `/server/clients/${first[0].session.clientId}`);
    return r.status === 200 && r.body.connections.every((x) => x.node !== idB);
  }, 12000, 'the dead node\'s presence cleaned up');
  console.log(`# dead node's presence cleaned up ${Date.now() - died} ms after SIGKILL (ZooKeeper session timeout 4000 ms)`);
  await load;
  stop = true;
  for (const [i, { r, seen }] of resumed.entries()) {
    await r.waitCount('channel:fo', sent - seen.length, 30000);
    const all = [...seen, ...r.signals('channel:fo').map((s) => s.version)];
    assert.deepEqual(all, Array.from({ length: sent }, (_, k) => k + 1), `client ${i}: no hole, no duplicate across the failover`);
  }
  console.log(`# failover: ${resumed.length} clients resumed on another node ${failover} ms after their node was killed`);
  // Nothing acknowledged is lost: every acknowledged id is in the mailbox at the version it was
  // acknowledged with, and the mailbox is gap-free.
  const kept = await mailbox(a.url, 'channel:fo');
  assert.deepEqual(kept.map((m) => m.version), Array.from({ length: kept.length }, (_, i) => i + 1), 'gap-free');
  const stored = new Map(kept.map((m) => [m.id, m.version]));
  assert.equal(acked.size, sent);
  for (const [id, version] of acked) assert.equal(stored.get(id), version, `acknowledged ${id} at ${version}`);
  // The clients are seen connected on their new node, from any node.
  const idC = (await api(nodes[2].url, 'GET', '/server/nodes')).body.self;
  await waitFor(async () => {
    const r = await api(a.url, 'GET', `/server/clients/${first[0].session.clientId}`);
    return r.body.connected && r.body.node === idC;
  }, 20000, 'presence on the new node');
  for (const { r } of resumed) r.close();
  await Promise.all([a.stop(), nodes[2].stop()]);
});

test('a node joins and another leaves under load: clients get every version once, in order', { skip, timeout: 180000 }, async () => {
  const env = cluster('rebal');
  const [a, b] = await startCluster(env, 2);
  const watchers = [];
  for (const node of [a, b]) {
    const c = connect(node.url);
    await c.ready;
    assert.equal((await api(a.url, 'POST', '/server/connect', { client: c.session.clientId, addresses: ['channel:rb'] })).status, 200);
    await c.waitFor((e) => e.event === 'bound', 15000, 'bound');
    watchers.push(c);
  }
  let sent = 0;
  let stop = false;
  const load = (async () => {
    while (!stop) {
      const batch = Array.from({ length: 5 }, (_, j) => ({ address: 'channel:rb', id: `rb-${sent + j}`, payload: sent + j }));
      const r = await api(a.url, 'POST', '/server/enqueue?wait=true', batch);
      if (r.status === 200) sent += 5;
    }
  })();
  await waitFor(() => sent >= 100, 30000, '100 sent');
  const c = await startNode({ env }); // joins: the group rebalances
  await waitFor(() => sent >= 250, 60000, '250 sent');
  await b.stop(); // leaves (drains): the group rebalances again; its client is gone with it
  await waitFor(() => sent >= 400, 60000, '400 sent');
  stop = true;
  await load;
  const w = watchers[0];
  await w.waitCount('channel:rb', sent, 30000);
  exactlyOnce(w, 'channel:rb', sent, 'the client on the node that stayed');
  // (More than a page of 1 000 may have been sent while the nodes came and went.)
  const kept = await mailbox(a.url, 'channel:rb');
  assert.deepEqual(kept.map((m) => m.version), Array.from({ length: sent }, (_, i) => i + 1), 'gap-free');
  assert.equal(new Set(kept.map((m) => m.id)).size, sent, 'no id twice');
  for (const x of watchers) x.close();
  await Promise.all([a.stop(), c.stop()]);
});
