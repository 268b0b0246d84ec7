// Work addresses (issue 16) with the official socket.io-client: each message of `work:<name>`
// goes to exactly one connected bound client, in proportion to its binding's weight; an ack means
// done; a message not acked in time, or whose client dies first, goes to another; with nobody
// connected, messages wait; the mailbox read shows each message's state. Both backends; on the
// cluster backend also 3 nodes with takers on every node, and the death of a taker's node and of
// the node that deals the address out.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { BACKEND, startNode, api, connect, waitFor, testCluster, partition, ownedPartitions, mailbox } from './lib/harness.mjs';

const embedded = BACKEND !== 'cluster';
const skip = false;

/** A connected client bound to `work` with `weight`; acks every signal of it when `acks`. */
async function worker(url, work, { weight, acks = true } = {}) {
  const c = connect(url);
  const s = await c.ready;
  await c.waitFor((e) => e.event === 'synced');
  const body = { client: s.clientId, addresses: [work] };
  if (weight !== undefined) body.weight = weight;
  const r = await api(url, 'POST', '/server/connect?wait=true', body);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  await c.waitFor((e) => e.event === 'bound' && e.data.address === work);
  if (acks) c.socket.on('signal', (m) => { if (m.address === work) c.socket.emit('ack', { address: work, version: m.version }); });
  return { c, id: s.clientId, s, versions: () => c.signals(work).map((m) => m.version) };
}

async function send(url, work, n, from = 0) {
  for (let i = 0; i < n; i += 500) {
    const batch = Array.from({ length: Math.min(500, n - i) }, (_, j) => ({ address: work, payload: { n: from + i + j } }));
    const r = await api(url, 'POST', '/server/enqueue?wait=true', batch);
    assert.equal(r.status, 200, JSON.stringify(r.body));
  }
}

test('weights 1 and 3 split 4 000 messages 1:3 (±5 %), each to exactly one client, all done', { skip, timeout: 120000 }, async () => {
  // These clients ack 4 000 messages within a few seconds, far past a rate of 100 events per
  // second per connection: acks of work messages a client holds are not charged to it (they
  // were, and a fast worker's acks were dropped, then it was closed as a flood).
  const node = await startNode({ env: { SIGNALPOST_EVENT_RATE_PER_CONNECTION: '100' } });
  const work = `work:split-${Date.now()}`;
  const a = await worker(node.url, work, { weight: 1 });
  const b = await worker(node.url, work, { weight: 3 });
  await send(node.url, work, 4000);
  await waitFor(() => a.versions().length + b.versions().length >= 4000, 30000, '4 000 deliveries').catch(async (e) => { console.log('#', a.versions().length, b.versions().length, JSON.stringify((await mailbox(node.url, work)).filter((m) => m.state !== 'done').slice(0, 3))); throw e; });
  await new Promise((r) => setTimeout(r, 200));
  const [va, vb] = [a.versions(), b.versions()];
  assert.equal(va.length + vb.length, 4000, 'nothing twice');
  assert.deepEqual([...va, ...vb].sort((x, y) => x - y), Array.from({ length: 4000 }, (_, i) => i + 1), 'every message once');
  console.log(`# weight 1: ${va.length}, weight 3: ${vb.length}`);
  assert.ok(Math.abs(va.length - 1000) <= 50, `weight 1 took ${va.length} of 4000 (1000 ± 5 %)`);
  // Each client sees its own versions in increasing order.
  for (const v of [va, vb]) assert.deepEqual(v, [...v].sort((x, y) => x - y));
  // All done, stored: the mailbox read says so.
  await waitFor(async () => (await mailbox(node.url, work)).every((m) => m.state === 'done'), 10000, 'all done');
  // An ack of a message the client does not hold is refused with an error event.
  a.c.socket.emit('ack', { address: work, version: vb[0] });
  const err = await a.c.waitFor((e) => e.event === 'error');
  assert.match(err.data.message, /is not held by this client/);
  // A weight out of range is refused.
  for (const weight of [0, 1001, 'x', 1.5]) {
    const r = await api(node.url, 'POST', '/server/connect', { client: a.id, addresses: [work], weight });
    assert.equal(r.status, 400, JSON.stringify(weight));
    assert.match(r.body.error, /weight must be a whole number from 1 to 1000/);
  }
  const r = await api(node.url, 'POST', '/server/disconnect', { client: a.id, addresses: [work], weight: 2 });
  assert.equal(r.status, 400);
  a.c.close();
  b.c.close();
  assert.equal((await node.stop()).code, 0);
});

test('waiting with nobody connected; a killed client\'s messages go to another, none done twice, none lost; timeouts; restart', { skip, timeout: 120000 }, async () => {
  const node = await startNode({ env: { SIGNALPOST_WORK_ACK_TIMEOUT_MS: '1500' } });
  const work = `work:jobs-${Date.now()}`;
  await send(node.url, work, 20);
  let st = await mailbox(node.url, work);
  assert.deepEqual(new Set(st.map((m) => m.state)), new Set(['waiting']), 'nobody bound: they wait');

  // A client in a child process takes messages and never acks; then it is killed.
  const script = fileURLToPath(new URL('./lib/work-holder.mjs', import.meta.url));
  const child = spawn(process.execPath, [script, node.url, work], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d) => { out += d; });
  const held = await waitFor(() => {
    const lines = out.split('\n').filter(Boolean).map((l) => JSON.parse(l));
    const got = lines.filter((l) => l.version).map((l) => l.version);
    return got.length >= 20 ? { client: lines[0].clientId, got } : null;
  }, 15000, 'the holder took the 20 waiting messages');
  assert.deepEqual(held.got, Array.from({ length: 20 }, (_, i) => i + 1));
  st = await mailbox(node.url, work);
  assert.ok(st.every((m) => m.state === 'assigned' && m.client === held.client), JSON.stringify(st.slice(0, 2)));

  // Another client, acking; it gets nothing while the holder holds everything.
  const b = await worker(node.url, work);
  child.kill('SIGKILL');
  await waitFor(() => b.versions().length >= 20, 15000, 'the killed client\'s messages went to the other');
  assert.deepEqual(b.versions(), held.got, 'each once, in order');
  await waitFor(async () => (await mailbox(node.url, work)).every((m) => m.state === 'done'), 10000, 'all done');

  // A client that does not ack: after the timeout its message goes to another.
  const slow = await worker(node.url, work, { acks: false });
  b.c.close();
  await waitFor(async () => !(await api(node.url, 'GET', `/server/clients/${b.id}`)).body.connected, 5000, 'b gone');
  await send(node.url, work, 1, 100);
  const first = await slow.c.waitFor((e) => e.event === 'signal' && e.data.version === 21, 5000, 'the slow one has 21');
  assert.equal(first.data.payload.n, 100);
  st = await mailbox(node.url, work);
  assert.deepEqual([st[20].state, st[20].client], ['assigned', slow.id]);
  const c = await worker(node.url, work);
  await waitFor(() => c.versions().includes(21), 10000, 'after the timeout, 21 went to c');
  await waitFor(async () => (await mailbox(node.url, work))[20].state === 'done', 5000, '21 done');
  // The slow one's late ack is refused: the message is no longer its.
  slow.c.socket.emit('ack', { address: work, version: 21 });
  await slow.c.waitFor((e) => e.event === 'error', 5000, 'a late ack refused');

  // Restart: done stays done, and what was not done waits again.
  await send(node.url, work, 1, 200);
  await waitFor(async () => (await mailbox(node.url, work))[21]?.state === 'done', 5000, '22 done');
  slow.c.close();
  c.c.close();
  assert.equal((await node.stop()).code, 0);
  const again = await startNode({ dataDir: node.dataDir, env: { SIGNALPOST_WORK_ACK_TIMEOUT_MS: '1500' } });
  await send(again.url, work, 1, 300);
  st = await mailbox(again.url, work);
  assert.deepEqual(st.map((m) => m.state), [...Array(22).fill('done'), 'waiting']);
  const d = await worker(again.url, work);
  await waitFor(() => d.versions().length === 1, 5000, 'the waiting one delivered');
  assert.deepEqual(d.versions(), [23]);
  d.c.close();
  assert.equal((await again.stop()).code, 0);
});

test('acks of work messages a client does not hold are charged to its event rate: a flood of them is refused, and the client closed', { skip, timeout: 60000 }, async () => {
  const node = await startNode({ env: { SIGNALPOST_EVENT_RATE_PER_CONNECTION: '50' } });
  const work = `work:flood-${Date.now()}`;
  const honest = await worker(node.url, work);
  const flood = await worker(node.url, work, { acks: false });
  await send(node.url, work, 20);
  await waitFor(() => honest.versions().length + flood.versions().length >= 20, 10000, '20 given');
  // Versions it never held (and the ones it holds, again and again once acked).
  for (let i = 0; i < 400; i++) flood.c.socket.emit('ack', { address: work, version: 1000 + i });
  const err = await flood.c.waitFor((e) => e.event === 'error' && /rate limit/.test(e.data.message), 5000, 'a rate-limit error');
  assert.match(err.data.message, /at most 50 events per second/);
  const k = await flood.c.waitFor((e) => e.event === 'kicked', 5000, 'the flooder kicked');
  assert.match(k.data.reason, /flood/);
  // What it held goes to the honest worker, which acks it: all done.
  await waitFor(async () => (await mailbox(node.url, work)).every((m) => m.state === 'done'), 15000, 'all done');
  assert.equal(honest.versions().length, 20);
  honest.c.close();
  await node.stop();
});

test('3 nodes: takers on every node share by weight; a taker\'s node and the dealing node die; none lost, none twice', { skip: embedded && 'cluster backend only', timeout: 240000 }, async () => {
  const PARTITIONS = 6;
  const env = testCluster('work3', {
    SIGNALPOST_KAFKA_PARTITIONS: String(PARTITIONS),
    SIGNALPOST_EVENT_RATE_PER_CONNECTION: '100',
    SIGNALPOST_WORK_ACK_TIMEOUT_MS: '60000',
  });
  const nodes = [];
  for (let i = 0; i < 3; i++) nodes.push(await startNode({ env }));
  await waitFor(async () => {
    const lists = await Promise.all(nodes.map((n) => ownedPartitions(n.url)));
    return lists.every((l) => l.length > 0) && lists.flat().length === PARTITIONS && new Set(lists.flat()).size === PARTITIONS;
  }, 60000, 'partitions shared by the 3 nodes');
  // A work address that node a deals out (its consumer owns the address's partition).
  const [a, b, c] = nodes;
  const mine = await ownedPartitions(a.url);
  const work = Array.from({ length: 200 }, (_, i) => `work:w3-${Date.now()}-${i}`).find((x) => mine.includes(partition(x, PARTITIONS)));

  // One taker on each node, weights 1, 1, 2; the messages are sent through b.
  const wa = await worker(a.url, work, { weight: 1 });
  const wb = await worker(b.url, work, { weight: 1 });
  const wc = await worker(c.url, work, { weight: 2 });
  await new Promise((r) => setTimeout(r, 500));
  await send(b.url, work, 2000);
  const all = () => [...wa.versions(), ...wb.versions(), ...wc.versions()];
  await waitFor(() => all().length >= 2000, 30000, '2 000 deliveries');
  await new Promise((r) => setTimeout(r, 300));
  const counts = [wa, wb, wc].map((w) => w.versions().length);
  console.log(`# weights 1/1/2 on nodes a/b/c: ${counts.join(' / ')}`);
  assert.deepEqual(all().sort((x, y) => x - y), Array.from({ length: 2000 }, (_, i) => i + 1), 'every message once, on one node');
  for (const [n, want] of [[counts[0], 500], [counts[1], 500], [counts[2], 1000]]) assert.ok(Math.abs(n - want) <= 100, `${counts} (500/500/1000 ± 5 % of 2 000)`);
  // Done, as any node reads it (c does not deal this address: it asks the others).
  await waitFor(async () => (await mailbox(c.url, work)).every((m) => m.state === 'done'), 10000, 'all done, read on c');

  // A taker's node dies while its client holds messages: they go to the others.
  wc.c.close();
  const script = fileURLToPath(new URL('./lib/work-holder.mjs', import.meta.url));
  const child = spawn(process.execPath, [script, c.url, work], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d) => { out += d; });
  const holder = await waitFor(() => out.includes('clientId') && JSON.parse(out.split('\n')[0]).clientId, 10000, 'the holder connected');
  await waitFor(async () => (await api(c.url, 'GET', `/server/clients/${holder}`)).body.addresses?.includes(work), 10000, 'the holder bound');
  await new Promise((r) => setTimeout(r, 500));
  await send(b.url, work, 300, 2000);
  const held = await waitFor(() => {
    const got = out.split('\n').filter(Boolean).map((l) => JSON.parse(l)).filter((l) => l.version).map((l) => l.version);
    return got.length > 0 && all().length + got.length >= 2300 ? got : null;
  }, 15000, 'the 300 dealt, some to the holder on c').catch((e) => { console.log('#', all().length, out.split('\n').length); throw e; });
  let st = await mailbox(a.url, work);
  assert.ok(held.every((v) => st[v - 1].state === 'assigned'), 'the holder\'s are assigned');
  const before = new Set(all());
  await c.kill();
  child.kill('SIGKILL');
  await waitFor(() => held.every((v) => wa.versions().includes(v) || wb.versions().includes(v)), 30000, 'the dead node\'s held messages went to a and b');
  assert.ok(held.every((v) => !before.has(v)), 'none of them had gone to another before');
  const got = [...wa.versions(), ...wb.versions(), ...wc.versions()];
  assert.equal(got.length, new Set(got).size, 'none twice');
  await waitFor(async () => (await mailbox(a.url, work)).every((m) => m.state === 'done'), 10000, 'all 2 300 done');

  // The dealing node dies while a client on b holds messages: b deals now, and keeps them
  // that client's until it acks them (the ack timeout is a minute): none goes to another.
  const hb = await worker(b.url, work, { acks: false });
  await new Promise((r) => setTimeout(r, 500));
  await send(b.url, work, 40, 3000);
  await waitFor(() => all().length + hb.versions().length >= 2340, 10000, 'the 40 dealt');
  const kept = hb.versions();
  assert.ok(kept.length > 0, 'the holder on b got some');
  // Every other message acked and its ack stored, so that a's death loses no ack.
  await waitFor(async () => (await mailbox(a.url, work)).every((m) => m.state === 'done' || kept.includes(m.version)), 10000, 'the others done');
  await a.kill();
  // b takes a's partition (after a's Kafka session ends) and deals from there on.
  await waitFor(async () => (await ownedPartitions(b.url)).length === PARTITIONS, 60000, 'b owns every partition');
  await send(b.url, work, 40, 4000);
  await waitFor(() => all().length + hb.versions().length >= 2380, 20000, 'the next 40 dealt by b');
  assert.ok(kept.every((v) => !all().includes(v)), 'what the holder held went to nobody else');
  for (const v of kept) hb.c.socket.emit('ack', { address: work, version: v });
  await waitFor(async () => (await mailbox(b.url, work)).every((m) => m.state === 'done' || hb.versions().includes(m.version)), 10000, 'acked: done');
  for (const v of hb.versions().filter((v) => !kept.includes(v))) hb.c.socket.emit('ack', { address: work, version: v });
  await waitFor(async () => (await mailbox(b.url, work)).every((m) => m.state === 'done'), 10000, 'all 2 380 done');
  const last = [...all(), ...hb.versions()];
  assert.equal(last.length, new Set(last).size, 'none twice');
  assert.equal(last.length, 2380, 'none lost');
  for (const w of [wa, wb, hb]) w.c.close();
  await b.stop();
});

test('2 nodes: a client connected on both is one taker (its weight counts once); each message goes to one of its connections', { skip: embedded && 'cluster backend only', timeout: 120000 }, async () => {
  const env = testCluster('work2', { SIGNALPOST_EVENT_RATE_PER_CONNECTION: '100' });
  env.SIGNALPOST_RESUME_SECRET = `secret-${env.SIGNALPOST_CASSANDRA_KEYSPACE}-0123456789abcdef0123456789`;
  const a = await startNode({ env });
  const b = await startNode({ env });
  const work = `work:twice-${Date.now()}`;
  const one = await worker(a.url, work, { weight: 1 });
  const two = await worker(a.url, work, { weight: 1 });
  // `two` connects a second time, on node b (the library's spare connection, or a second tab).
  const again = connect(b.url, { clientId: two.id, resumeToken: two.s.resumeToken });
  await again.ready;
  await again.waitFor((e) => e.event === 'synced');
  again.socket.on('signal', (m) => { if (m.address === work) again.socket.emit('ack', { address: work, version: m.version }); });
  await waitFor(async () => (await api(a.url, 'GET', `/server/clients/${two.id}`)).body.connections?.length === 2, 10000, 'two connections');
  await new Promise((r) => setTimeout(r, 500));
  await send(a.url, work, 1000);
  const twos = () => [...two.versions(), ...again.signals(work).map((m) => m.version)];
  await waitFor(() => one.versions().length + twos().length >= 1000, 30000, '1 000 deliveries');
  await new Promise((r) => setTimeout(r, 300));
  const all = [...one.versions(), ...twos()].sort((x, y) => x - y);
  assert.deepEqual(all, Array.from({ length: 1000 }, (_, i) => i + 1), 'each message once, over the three connections');
  console.log(`# one: ${one.versions().length}; two: ${two.versions().length} on a + ${again.signals(work).length} on b`);
  assert.ok(Math.abs(one.versions().length - 500) <= 50, `weight 1 each: ${one.versions().length} / ${twos().length}`);
  await waitFor(async () => (await mailbox(b.url, work)).every((m) => m.state === 'done'), 10000, 'all done');
  for (const c of [one.c, two.c, again]) c.close();
  await a.stop();
  await b.stop();
});

test('the client library takes work: its handler runs once per message, and each is acked (done)', { skip, timeout: 60000 }, async () => {
  const { io } = await import('socket.io-client');
  const { connect: library, memoryStorage } = await import('../../clients/js/src/client.js');
  const node = await startNode({ env: { SIGNALPOST_EVENT_RATE_PER_CONNECTION: '100' } });
  const work = `work:lib-${Date.now()}`;
  const open = () => {
    const lib = library({ io, urls: [node.url], storage: memoryStorage(), socketOptions: { transports: ['websocket'] } });
    const got = [];
    lib.on('signal', (m) => { if (m.address === work) got.push(m.version); });
    return { lib, got };
  };
  const [x, y] = [open(), open()];
  await waitFor(() => x.lib.state === 'live' && y.lib.state === 'live', 10000, 'both live');
  for (const c of [x, y]) {
    const r = await api(node.url, 'POST', '/server/connect?wait=true', { client: c.lib.clientId, addresses: [work], weight: 2 });
    assert.equal(r.status, 200);
  }
  await new Promise((r) => setTimeout(r, 100));
  await send(node.url, work, 300);
  await waitFor(() => x.got.length + y.got.length >= 300, 15000, '300 handled');
  assert.deepEqual([...x.got, ...y.got].sort((a, b) => a - b), Array.from({ length: 300 }, (_, i) => i + 1), 'each once');
  assert.ok(x.got.length > 100 && y.got.length > 100, `${x.got.length} / ${y.got.length}`);
  await waitFor(async () => (await mailbox(node.url, work)).every((m) => m.state === 'done'), 10000, 'all done');
  await x.lib.close({ forget: true });
  await y.lib.close({ forget: true });
  assert.equal((await node.stop()).code, 0);
});
