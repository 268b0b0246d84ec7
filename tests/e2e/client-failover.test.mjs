// The client library on a 3-node cluster (cluster backend only): the main node of six clients
// is killed under load — three with `spare: true`, three without. Every client's application
// gets every version once, in order; the time from the SIGKILL to the first message appended
// after it reaching the application is measured for both kinds.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { connect, memoryStorage } from '../../clients/js/src/client.js';
import { BACKEND, startNode, api, testCluster, waitFor, partition, ownedPartitions } from './lib/harness.mjs';

const skip = BACKEND !== 'cluster' && 'needs the cluster backend (SIGNALPOST_TEST_BACKEND=cluster)';
const PARTITIONS = 6;

const owned = (node) => ownedPartitions(node.url);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function libClient(urls, spare) {
  const client = connect({ urls, spare, io, storage: memoryStorage(), socketOptions: { transports: ['websocket'] } });
  const signals = [];
  const sessions = [];
  client.on('signal', (m) => { signals.push({ version: m.version, ts: m.ts, at: Date.now() }); });
  client.on('session', (s) => sessions.push(s));
  return { client, signals, sessions, spare };
}

test('3 nodes: the main node killed under load, with and without a spare: every version once, in order', { skip, timeout: 240000 }, async (t) => {
  const env = testCluster('libfo', { SIGNALPOST_KAFKA_PARTITIONS: String(PARTITIONS) });
  env.SIGNALPOST_RESUME_SECRET = `secret-${env.SIGNALPOST_CASSANDRA_KEYSPACE}-0123456789abcdef0123456789`;
  const nodes = [];
  for (let i = 0; i < 3; i++) nodes.push(await startNode({ env }));
  const [a, b, c] = nodes;
  // All three listed, and the partitions shared out among them.
  await waitFor(async () => {
    const lists = await Promise.all(nodes.map(owned));
    return lists.every((l) => l.length > 0) && new Set(lists.flat()).size === PARTITIONS && lists.flat().length === PARTITIONS;
  }, 60000, 'partitions shared by the 3 nodes');
  // A channel that node a appends, so that killing b stops no append: what is measured is the client.
  const mine = await owned(a);
  const ch = Array.from({ length: 100 }, (_, i) => `channel:libfo-${i}`).find((x) => mine.includes(partition(x, PARTITIONS)));

  // Six clients whose main connection is on b: three with a spare (on c), three without.
  const urls = [b.url, c.url, a.url];
  const clients = [];
  for (const spare of [true, true, true, false, false, false]) clients.push(libClient(urls, spare));
  await waitFor(() => clients.every((x) => x.client.state === 'live'), 20000, 'all live');
  for (const x of clients) {
    assert.equal(x.client.url, b.url);
    assert.equal((await api(a.url, 'POST', '/server/connect', { client: x.client.clientId, addresses: [ch] })).status, 200);
  }
  for (const x of clients) {
    const want = x.spare ? 2 : 1;
    await waitFor(async () => (await api(a.url, 'GET', `/server/clients/${x.client.clientId}`)).body.connections?.length === want, 20000, `${want} connection(s)`);
  }

  // Load through a: batches of 5 with ?wait=true.
  let sent = 0;
  let stop = false;
  const loadStart = Date.now();
  const load = (async () => {
    while (!stop) {
      const batch = Array.from({ length: 5 }, (_, j) => ({ address: ch, id: `l-${sent + j}`, payload: sent + j }));
      const r = await api(a.url, 'POST', '/server/enqueue?wait=true', batch);
      if (r.status === 200) sent += 5;
      await sleep(5);
    }
  })();
  await waitFor(() => clients.every((x) => x.signals.length >= 100), 30000, '100 signals each');
  const killedAt = Date.now();
  await b.kill();
  await sleep(3000);
  stop = true;
  await load;
  t.diagnostic(`${sent} messages sent through node 1, ${(sent / ((Date.now() - loadStart) / 1000)).toFixed(0)}/s`);

  const times = { true: [], false: [] };
  const latency = { true: [], false: [] }; // that message: append → application
  for (const [i, x] of clients.entries()) {
    await waitFor(() => x.signals.length >= sent, 30000, `client ${i}: ${sent} signals`);
    assert.deepEqual(x.signals.map((s) => s.version), Array.from({ length: sent }, (_, k) => k + 1), `client ${i} (spare: ${x.spare}): every version once, in order`);
    const next = x.signals.find((s) => s.ts > killedAt);
    times[x.spare].push(next.at - killedAt);
    latency[x.spare].push(next.at - next.ts);
    assert.notEqual(x.client.url, b.url, 'on another node now');
  }
  for (const x of clients.filter((y) => y.spare)) {
    assert.equal(x.sessions.at(-1).promoted, true, 'the spare was promoted');
    // …and a new spare opened on the node that is left.
    await waitFor(async () => (await api(a.url, 'GET', `/server/clients/${x.client.clientId}`)).body.connections?.length === 2, 20000, 'a new spare');
  }
  const line = (k) => `${times[k].join(' / ')} ms (append → application ${latency[k].join(' / ')} ms)`;
  t.diagnostic(`SIGKILL → first message appended after it, at the application: with spare ${line(true)}; without ${line(false)}`);
  assert.ok(Math.max(...times.true) < Math.min(...times.false) + 1000, 'the spare is not slower');
  for (const x of clients) await x.client.close();
  await Promise.all([a.stop(), c.stop()]);
});
