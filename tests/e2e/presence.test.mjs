// Presence addresses (issue 16) with the official socket.io-client: the connected clients bound
// to `presence:<name>` are its members; members are told `joined` and `left`, also when a node
// dies; the `members` event and `GET /server/presence/<address>` list them. On the cluster
// backend the members are on two nodes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { BACKEND, startNode, api, connect, testCluster, waitFor } from './lib/harness.mjs';
import { io } from 'socket.io-client';
import { connect as library, memoryStorage } from '../../clients/js/src/client.js';

const cluster = BACKEND === 'cluster';
const secret = 'presence-test-secret-0123456789abcdef';
const jwt = (sub) => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + 600 })}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
};
const members = (c, req) => new Promise((resolve) => c.socket.emit('members', req, resolve));
/** The `joined`/`left` events a client received, as "joined <client>". */
const changes = (c, room) => c.events
  .filter((e) => (e.event === 'joined' || e.event === 'left') && e.data.address === room)
  .map((e) => `${e.event} ${e.data.client}`);

/** Two nodes of one cluster on the cluster backend (b's env with `bEnv` added; the third
 * element is that env, to restart b with); one node twice on the embedded one. */
async function nodes(name, bEnv = {}) {
  // One resume secret for both nodes: a client may come back on either.
  const env = { SIGNALPOST_CLIENT_TOKEN_SECRET: secret, SIGNALPOST_RESUME_SECRET: `resume-${secret}` };
  if (!cluster) {
    const n = await startNode({ env });
    return [n, n, env];
  }
  const shared = testCluster(name, env);
  const a = await startNode({ env: shared });
  await waitFor(async () => (await api(a.url, 'GET', '/server/nodes')).body.leader, 20000, 'a leader');
  const envB = { ...shared, ...bEnv };
  const b = await startNode({ env: envB });
  await waitFor(async () => (await api(b.url, 'GET', '/server/nodes')).body.nodes?.length === 2, 20000, 'two nodes');
  return [a, b, envB];
}

/** Connects `auth` to `url` and binds its client to `room`; resolves once bound. */
async function member(url, apiUrl, room, auth = {}) {
  const c = connect(url, auth);
  const s = await c.ready;
  await c.waitFor((e) => e.event === 'synced');
  const r = await api(apiUrl, 'POST', '/server/connect?wait=true', { client: s.clientId, addresses: [room] });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  await c.waitFor((e) => e.event === 'bound' && e.data.address === room);
  return { c, id: s.clientId, s };
}

/** Carol (on b) joins `room` and leaves: once Alice was told both, everything before was
 * announced too. Then Alice's changes must be exactly `before` followed by Carol's two. */
async function carolMarks(alice, a, b, room, before, why) {
  const carol = await member(b.url, a.url, room);
  await alice.c.waitFor((e) => e.event === 'joined' && e.data.client === carol.id, 10000, 'carol joins');
  carol.c.close();
  await alice.c.waitFor((e) => e.event === 'left' && e.data.client === carol.id, 10000, 'carol leaves');
  assert.deepEqual(changes(alice.c, room), [...before, `joined ${carol.id}`, `left ${carol.id}`], why);
}

/** Alice on a and Bob (user `bob`) on b become members of `room`; resolves once Alice was told. */
async function aliceAndBob(a, b, room) {
  const alice = await member(a.url, a.url, room);
  const bob = await member(b.url, a.url, room, { token: jwt('bob') });
  await alice.c.waitFor((e) => e.event === 'joined' && e.data.client === bob.id, 10000, 'bob joins');
  return { alice, bob };
}

test('members join and leave once each, whatever their connections; members and the API list them', { timeout: 120000 }, async () => {
  const [a, b] = await nodes('pres');
  const room = `presence:room-${Date.now()}`;
  const alice = await member(a.url, a.url, room, { token: jwt('alice') });
  await alice.c.waitFor((e) => e.event === 'joined' && e.data.client === alice.id, 10000, 'alice sees herself join');
  assert.deepEqual(alice.c.events.find((e) => e.event === 'joined').data, { address: room, client: alice.id, user: 'alice' });

  // Bob, on the other node, without a token (no user).
  const bob = await member(b.url, a.url, room);
  await alice.c.waitFor((e) => e.event === 'joined' && e.data.client === bob.id, 10000, 'alice sees bob join');
  await bob.c.waitFor((e) => e.event === 'joined' && e.data.client === bob.id, 10000, 'bob sees himself join');
  assert.deepEqual(alice.c.events.find((e) => e.event === 'joined' && e.data.client === bob.id).data, { address: room, client: bob.id });

  const sorted = [{ client: alice.id, user: 'alice' }, { client: bob.id }].sort((x, y) => (x.client < y.client ? -1 : 1));
  assert.deepEqual(await members(alice.c, { address: room }), { members: sorted, truncated: false });
  assert.deepEqual(await members(bob.c, { address: room }), { members: sorted, truncated: false });
  for (const n of [a, b]) {
    const r = await api(n.url, 'GET', `/server/presence/${room}`);
    assert.deepEqual(r.body, { address: room, members: sorted, truncated: false });
  }
  const page = await api(a.url, 'GET', `/server/presence/${room}?after=${sorted[0].client}`);
  assert.deepEqual(page.body.members, [sorted[1]]);

  // A presence address delivers messages like a channel.
  assert.equal((await api(a.url, 'POST', '/server/enqueue?wait=true', { address: room, payload: 'hi' })).status, 200);
  await alice.c.waitCount(room, 1);
  await bob.c.waitCount(room, 1);

  // Bob connects a second time (on the first node): still one member, nobody is told.
  const bob2 = connect(a.url, { clientId: bob.id, resumeToken: bob.s.resumeToken });
  await bob2.ready;
  await bob2.waitFor((e) => e.event === 'synced');
  // His first connection goes: he is still a member (the second one holds it).
  bob.c.close();
  await carolMarks(alice, a, b, room, [`joined ${alice.id}`, `joined ${bob.id}`],
    'a second connection and the end of one of two are not announced');
  assert.equal((await members(alice.c, { address: room })).members.length, 2);

  // His last connection goes: he left.
  bob2.close();
  await alice.c.waitFor((e) => e.event === 'left' && e.data.client === bob.id, 10000, 'bob leaves');
  assert.deepEqual((await members(alice.c, { address: room })).members, [{ client: alice.id, user: 'alice' }]);

  // Unbound while connected: left; bound again: joined.
  const dave = await member(b.url, a.url, room);
  await alice.c.waitFor((e) => e.event === 'joined' && e.data.client === dave.id, 10000, 'dave joins');
  assert.equal((await api(a.url, 'POST', '/server/disconnect?wait=true', { client: dave.id, addresses: [room] })).status, 200);
  await alice.c.waitFor((e) => e.event === 'left' && e.data.client === dave.id, 10000, 'dave unbound: left');
  await dave.c.waitFor((e) => e.event === 'unbound');
  const r = await members(dave.c, { address: room });
  assert.match(r.error, /does not receive/, 'an unbound client cannot list the members');
  assert.equal((await api(a.url, 'GET', `/server/presence/${room}`)).body.members.length, 1);

  // Refusals.
  const chan = `channel:plain-${Date.now()}`;
  await api(a.url, 'POST', '/server/connect?wait=true', { client: alice.id, addresses: [chan] });
  await alice.c.waitFor((e) => e.event === 'bound' && e.data.address === chan);
  for (const [req, why] of [
    [{ address: chan }, /only presence: addresses/],
    [{ address: 'presence:elsewhere' }, /does not receive/],
    [{ address: 'nope' }, /invalid address/],
    [{ address: room, after: 'a b' }, /invalid client id/],
    [{ address: room, extra: 1 }, /unknown field/],
    [null, /members/],
  ]) {
    assert.match((await members(alice.c, req)).error, why, JSON.stringify(req));
  }
  assert.equal((await api(a.url, 'GET', `/server/presence/${room}?after=${encodeURIComponent('a b')}`)).status, 400);

  alice.c.close();
  dave.c.close();
  await a.stop();
  if (b !== a) await b.stop();
});

test('a dead node\'s members leave after the leader\'s cleanup', { skip: !cluster && 'needs the cluster backend', timeout: 120000 }, async () => {
  const [a, b] = await nodes('presdead');
  const room = `presence:dead-${Date.now()}`;
  const { alice, bob } = await aliceAndBob(a, b, room);
  const died = Date.now();
  await b.kill();
  bob.c.close();
  const left = await alice.c.waitFor((e) => e.event === 'left' && e.data.client === bob.id, 30000, 'bob left with his node');
  console.log(`# left announced ${Date.now() - died} ms after SIGKILL (ZooKeeper session 4000 ms)`);
  assert.deepEqual(left.data, { address: room, client: bob.id, user: 'bob' });
  assert.deepEqual((await api(a.url, 'GET', `/server/presence/${room}`)).body.members, [{ client: alice.id }]);
  alice.c.close();
  await a.stop();
});

test('a connection is a member from its session on: closing the one before it right then is not a leave', { timeout: 120000 }, async () => {
  const [a, b] = await nodes('presrace');
  const room = `presence:race-${Date.now()}`;
  const { alice, bob } = await aliceAndBob(a, b, room);
  // Bob moves between the nodes ten times; each time his old connection closes the moment the
  // new one has its `session`. The node must hold his membership through the new connection by
  // then, so none of it is announced (it used to join only after sending `session`).
  let previous = bob.c;
  for (let i = 0; i < 10; i++) {
    const next = connect(i % 2 ? b.url : a.url, { clientId: bob.id, resumeToken: bob.s.resumeToken, token: jwt('bob') });
    await next.ready;
    previous.close();
    previous = next;
  }
  await carolMarks(alice, a, b, room, [`joined ${alice.id}`, `joined ${bob.id}`], 'moving between connections is not announced');
  previous.close();
  await alice.c.waitFor((e) => e.event === 'left' && e.data.client === bob.id, 10000, 'bob leaves with his last connection');
  alice.c.close();
  await a.stop();
  if (b !== a) await b.stop();
});

test('a node restarted under its id before the leader saw it go clears what its earlier process left', { skip: !cluster && 'needs the cluster backend', timeout: 120000 }, async () => {
  // b's ZooKeeper session (30 s) outlives its restart, and the restarted process takes over b's
  // entry: the leader never sees b gone, so only b itself can end what its first process held.
  const [a, first, slow] = await nodes('presrestart', { SIGNALPOST_ZOOKEEPER_SESSION_TIMEOUT_MS: '30000' });
  let b = first;
  const room = `presence:restart-${Date.now()}`;
  const { alice, bob } = await aliceAndBob(a, b, room);
  const died = Date.now();
  await b.kill();
  bob.c.close();
  b = await startNode({ dataDir: b.dataDir, env: slow });
  const back = Date.now() - died;
  assert.ok(back < 25000, `b restarted within its old session (${back} ms)`);
  const left = await alice.c.waitFor((e) => e.event === 'left' && e.data.client === bob.id, 10000, 'bob left when b came back');
  assert.ok(Date.now() - died < 30000, 'announced before b\'s old session could expire');
  assert.deepEqual(left.data, { address: room, client: bob.id, user: 'bob' });
  assert.deepEqual((await api(a.url, 'GET', `/server/presence/${room}`)).body.members, [{ client: alice.id }]);
  // The restarted process's own connections are found by the leader's cleanup once b dies for good.
  const carol = await member(b.url, a.url, room, { token: jwt('carol') });
  await alice.c.waitFor((e) => e.event === 'joined' && e.data.client === carol.id, 10000, 'carol joins');
  await b.kill();
  carol.c.close();
  await alice.c.waitFor((e) => e.event === 'left' && e.data.client === carol.id, 60000, 'carol left with her node');
  assert.deepEqual((await api(a.url, 'GET', `/server/presence/${room}`)).body.members, [{ client: alice.id }]);
  alice.c.close();
  await a.stop();
});

test('a node cut off from ZooKeeper past its session closes its connections when it joins again; they come back and are seen', { skip: !cluster && 'needs the cluster backend', timeout: 120000 }, async () => {
  const [a, b] = await nodes('prescut');
  const room = `presence:cut-${Date.now()}`;
  const { alice, bob } = await aliceAndBob(a, b, room);
  // b frozen past its ZooKeeper session (4 s): its entry goes, and the leader (a) clears what it
  // held, announcing that Bob left.
  b.proc.kill('SIGSTOP');
  try {
    await alice.c.waitFor((e) => e.event === 'left' && e.data.client === bob.id, 30000, 'bob left when b\'s session expired');
    assert.equal((await api(a.url, 'GET', `/server/clients/${bob.id}`)).body.connected, false);
  } finally {
    b.proc.kill('SIGCONT');
  }
  // b joins again under a new session. Its connection to Bob survived the freeze, but nothing
  // lists it any more: b closes it, saying why.
  const kicked = await bob.c.waitFor((e) => e.event === 'kicked', 30000, 'bob kicked when b joined again');
  assert.match(kicked.data.reason, /rejoined the cluster/);
  // Bob connects again (to b, with his identity): he is a member again, and a sees him.
  const again = connect(b.url, { clientId: bob.id, resumeToken: bob.s.resumeToken, token: jwt('bob') });
  assert.equal((await again.ready).clientId, bob.id);
  await waitFor(async () => changes(alice.c, room).filter((c) => c === `joined ${bob.id}`).length === 2, 15000, 'bob joined again');
  const seen = await waitFor(async () => {
    const r = (await api(a.url, 'GET', `/server/clients/${bob.id}`)).body;
    return r.connected ? r : null;
  }, 15000, 'bob seen connected from a');
  assert.equal(seen.connections.length, 1, 'only the new connection');
  assert.deepEqual((await api(a.url, 'GET', `/server/presence/${room}`)).body.members.map((m) => m.client).sort(), [alice.id, bob.id].sort());
  again.close();
  alice.c.close();
  await b.stop();
  await a.stop();
});

test('the client library: joined and left handlers, members()', { timeout: 120000 }, async () => {
  const [a, b] = await nodes('preslib');
  const room = `presence:lib-${Date.now()}`;
  const open = (url) => {
    const lib = library({ io, urls: [url], storage: memoryStorage(), socketOptions: { transports: ['websocket'] } });
    const seen = [];
    lib.on('joined', (m) => seen.push(`joined ${m.client}`));
    lib.on('left', (m) => seen.push(`left ${m.client}`));
    return { lib, seen };
  };
  const x = open(a.url);
  const y = open(b.url);
  await waitFor(() => x.lib.state === 'live' && y.lib.state === 'live', 10000, 'both live');
  await assert.rejects(x.lib.members(room), /does not receive/);
  for (const c of [x, y]) {
    assert.equal((await api(a.url, 'POST', '/server/connect?wait=true', { client: c.lib.clientId, addresses: [room] })).status, 200);
    await waitFor(() => c.seen.includes(`joined ${c.lib.clientId}`), 10000, 'joined itself');
  }
  await waitFor(() => x.seen.includes(`joined ${y.lib.clientId}`), 10000, 'x sees y join');
  const ids = [x.lib.clientId, y.lib.clientId].sort();
  assert.deepEqual((await x.lib.members(room)).map((m) => m.client), ids);
  assert.deepEqual(await y.lib.members(room, { after: ids[0], page: true }), { members: [{ client: ids[1] }], truncated: false });
  await y.lib.close();
  await waitFor(() => x.seen.includes(`left ${y.lib.clientId}`), 10000, 'x sees y leave');
  assert.deepEqual((await x.lib.members(room)).map((m) => m.client), [x.lib.clientId]);
  await x.lib.close({ forget: true });
  await a.stop();
  if (b !== a) await b.stop();
});
