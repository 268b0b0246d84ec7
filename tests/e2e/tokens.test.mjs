// The token lifecycle and kicks of issue 11 ("safe at the edge"), each tried for real against a
// node: forged, early and expired tokens, RS256 and ES256 keys, a token's user bound to the client
// identity, `kicked` at exp unless refreshed, POST /server/kick and revoke, the per-user
// connection quota, and both across nodes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startNode, api, connect, refusal, waitFor, tempDir, metric, BACKEND, testCluster } from './lib/harness.mjs';
import { hs256, signed, now } from './lib/tokens.mjs';

const clusterOnly = BACKEND !== 'cluster' && 'needs the cluster backend (SIGNALPOST_TEST_BACKEND=cluster)';
const JWT_SECRET = 'attack-test-jwt-secret-0123456789abcdef';

test('tokens: nbf, an empty sub, RS256 and ES256 keys, and the user bound to the client identity', async () => {
  const node = await startNode({ env: { SIGNALPOST_CLIENT_TOKEN_SECRET: JWT_SECRET } });
  assert.match((await refusal(node.url, { token: hs256(JWT_SECRET, { sub: 'u', exp: now() + 60, nbf: now() + 600 }) })).message, /invalid client token/i);
  assert.match((await refusal(node.url, { token: hs256(JWT_SECRET, { sub: '', exp: now() + 60 }) })).message, /sub is empty/);
  const alice = connect(node.url, { token: hs256(JWT_SECRET, { sub: 'alice', exp: now() + 60 }) });
  const a = await alice.ready;
  alice.close();
  // Bob's valid token with Alice's resume token: refused; Alice's own: accepted.
  const stolen = await refusal(node.url, { token: hs256(JWT_SECRET, { sub: 'bob', exp: now() + 60 }), clientId: a.clientId, resumeToken: a.resumeToken });
  assert.match(stolen.message, /invalid resume token/);
  assert.match((await refusal(node.url, { clientId: a.clientId, resumeToken: a.resumeToken })).message, /invalid resume token/);
  const back = connect(node.url, { token: hs256(JWT_SECRET, { sub: 'alice', exp: now() + 60 }), clientId: a.clientId, resumeToken: a.resumeToken });
  assert.equal((await back.ready).clientId, a.clientId);
  back.close();
  await node.stop();

  for (const [alg, type, opts] of [['RS256', 'rsa', { modulusLength: 2048 }], ['ES256', 'ec', { namedCurve: 'P-256' }]]) {
    const { publicKey, privateKey } = generateKeyPairSync(type, opts);
    const file = join(tempDir('key'), 'public.pem');
    writeFileSync(file, publicKey.export({ type: 'spki', format: 'pem' }));
    const n = await startNode({ env: { SIGNALPOST_CLIENT_TOKEN_PUBLIC_KEY: file, SIGNALPOST_REQUIRE_CLIENT_TOKEN: 'true' } });
    const ok = connect(n.url, { token: signed(alg, privateKey, { sub: `user-${alg}`, exp: now() + 60 }) });
    assert.equal((await ok.ready).user, `user-${alg}`, alg);
    ok.close();
    const other = generateKeyPairSync(type, opts).privateKey;
    assert.match((await refusal(n.url, { token: signed(alg, other, { sub: 'x', exp: now() + 60 }) })).message, /invalid client token/, `${alg}: another key`);
    assert.match((await refusal(n.url, { token: hs256(JWT_SECRET, { sub: 'x', exp: now() + 60 }) })).message, /invalid client token/, `${alg}: HS256 is not accepted with a public key`);
    await n.stop();
  }
});

test('a connection ends with `kicked` at its token\'s exp unless refreshed; a bad refresh kicks at once', async () => {
  const node = await startNode({ env: { SIGNALPOST_CLIENT_TOKEN_SECRET: JWT_SECRET } });
  const short = connect(node.url, { token: hs256(JWT_SECRET, { sub: 'carol', exp: now() + 2 }) });
  await short.ready;
  const refreshed = connect(node.url, { token: hs256(JWT_SECRET, { sub: 'carol', exp: now() + 2 }) });
  await refreshed.ready;
  const answer = await refreshed.socket.timeout(5000).emitWithAck('refresh', { token: hs256(JWT_SECRET, { sub: 'carol', exp: now() + 120 }) });
  assert.equal(answer.ok, true);
  const kicked = await short.waitFor((e) => e.event === 'kicked', 10000, 'kicked at exp');
  assert.equal(kicked.data.reason, 'token expired');
  await waitFor(() => !short.socket.connected, 5000, 'the expired connection to close');
  // Past the first token's exp, the refreshed connection is still up and served.
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal(refreshed.socket.connected, true);
  const own = `client:${refreshed.session.clientId}`;
  await api(node.url, 'POST', '/server/enqueue?wait=true', { address: own, payload: 'still here' });
  await refreshed.waitCount(own, 1);
  // A refresh for another user is refused and ends the connection.
  const bad = await refreshed.socket.timeout(5000).emitWithAck('refresh', { token: hs256(JWT_SECRET, { sub: 'mallory', exp: now() + 120 }) });
  assert.match(bad.error, /not for this connection's user/);
  const k = await refreshed.waitFor((e) => e.event === 'kicked', 5000, 'kicked after a bad refresh');
  assert.match(k.data.reason, /refresh refused/);
  await node.stop();
});

test('POST /server/kick closes a client\'s or a user\'s connections; revoke ends its resume', async () => {
  const node = await startNode({ env: { SIGNALPOST_CLIENT_TOKEN_SECRET: JWT_SECRET } });
  const tok = (sub) => hs256(JWT_SECRET, { sub, exp: now() + 600 });
  const d1 = connect(node.url, { token: tok('dave') });
  const d2 = connect(node.url, { token: tok('dave') });
  const e1 = connect(node.url, { token: tok('erin') });
  await Promise.all([d1.ready, d2.ready, e1.ready]);
  const byUser = await api(node.url, 'POST', '/server/kick', { user: 'dave', reason: 'maintenance' });
  assert.deepEqual(byUser.body, { kicked: 2 });
  for (const c of [d1, d2]) {
    const k = await c.waitFor((e) => e.event === 'kicked', 2000, 'kicked');
    assert.equal(k.data.reason, 'maintenance');
    await waitFor(() => !c.socket.connected, 2000, 'closed');
  }
  assert.equal(e1.socket.connected, true, 'another user is untouched');
  const s = e1.session;
  const byClient = await api(node.url, 'POST', '/server/kick', { client: s.clientId, revoke: true });
  assert.deepEqual(byClient.body, { kicked: 1 });
  await e1.waitFor((e) => e.event === 'kicked', 2000, 'kicked');
  const again = await refusal(node.url, { token: tok('erin'), clientId: s.clientId, resumeToken: s.resumeToken });
  assert.match(again.message, /revoked/);
  for (const bad of [{}, { client: 'a', user: 'b' }, { user: '' }, { client: 'x', revoke: 'yes' }, { client: 'x', nope: 1 }]) {
    const r = await api(node.url, 'POST', '/server/kick', bad);
    assert.equal(r.status, 400, JSON.stringify(bad));
    assert.equal(typeof r.body.error, 'string');
  }
  await node.stop();
});

test('signalpost_disconnects_total counts each closed connection by why', async () => {
  const node = await startNode();
  const count = (reason) => metric(node.url, `signalpost_disconnects_total{reason="${reason}"}`);
  const [left, closed, kicked] = [connect(node.url), connect(node.url), connect(node.url)];
  await Promise.all([left.ready, closed.ready, kicked.ready]);
  assert.equal(await count('client_left') + await count('client_closed') + await count('server_closed'), 0);
  left.socket.disconnect(); // Socket.IO's disconnect packet, then the transport closes
  await waitFor(async () => await count('client_left') === 1, 5000, 'client_left');
  closed.socket.io.engine.close(); // the transport alone
  await waitFor(async () => await count('client_closed') === 1, 5000, 'client_closed');
  await api(node.url, 'POST', '/server/kick', { client: kicked.session.clientId });
  await waitFor(async () => await count('server_closed') === 1, 5000, 'server_closed');
  assert.equal(await count('client_left'), 1, 'each close is counted once, under one reason');
  assert.equal(await count('heartbeat_timeout'), 0);
  await node.stop();
});

test('max_connections_per_user kicks the oldest connection with reason quota', async () => {
  const node = await startNode({ env: { SIGNALPOST_CLIENT_TOKEN_SECRET: JWT_SECRET, SIGNALPOST_MAX_CONNECTIONS_PER_USER: '2' } });
  const tok = hs256(JWT_SECRET, { sub: 'frank', exp: now() + 600 });
  const first = connect(node.url, { token: tok });
  await first.ready;
  const second = connect(node.url, { token: tok });
  await second.ready;
  const third = connect(node.url, { token: tok });
  await third.ready;
  const k = await first.waitFor((e) => e.event === 'kicked', 5000, 'the oldest kicked');
  assert.equal(k.data.reason, 'quota');
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(second.socket.connected, true);
  assert.equal(third.socket.connected, true);
  second.close(); third.close();
  await node.stop();
});

test('kick and the per-user quota hold across nodes', { skip: clusterOnly, timeout: 120000 }, async () => {
  const env = { ...testCluster('kick'), SIGNALPOST_RESUME_SECRET: randomBytes(32).toString('hex'), SIGNALPOST_CLIENT_TOKEN_SECRET: JWT_SECRET, SIGNALPOST_MAX_CONNECTIONS_PER_USER: '2' };
  const a = await startNode({ env });
  const b = await startNode({ env });
  await waitFor(async () => (await api(b.url, 'GET', '/server/nodes')).body.nodes?.length === 2, 30000, 'two members');
  const tok = (sub) => hs256(JWT_SECRET, { sub, exp: now() + 600 });
  const g1 = connect(a.url, { token: tok('gina') });
  await g1.ready;
  const g2 = connect(b.url, { token: tok('gina') });
  await g2.ready;
  const g3 = connect(b.url, { token: tok('gina') });
  await g3.ready;
  const q = await g1.waitFor((e) => e.event === 'kicked', 5000, 'the oldest (on the other node) kicked for quota');
  assert.equal(q.data.reason, 'quota');
  const h = connect(b.url, { token: tok('hank') });
  const hs = await h.ready;
  const t0 = Date.now();
  const r = await api(a.url, 'POST', '/server/kick', { client: hs.clientId, reason: 'bye', revoke: true });
  assert.equal(r.body.kicked, 1);
  const k = await h.waitFor((e) => e.event === 'kicked', 1000, 'kicked within 1 s through another node');
  assert.equal(k.data.reason, 'bye');
  await waitFor(() => !h.socket.connected, 1000, 'closed within 1 s');
  const took = Date.now() - t0;
  assert.match((await refusal(a.url, { token: tok('hank'), clientId: hs.clientId, resumeToken: hs.resumeToken })).message, /revoked/);
  test.diagnostic?.(`cluster kick took ${took} ms`);
  g2.close(); g3.close();
  await a.stop();
  await b.stop();
});
