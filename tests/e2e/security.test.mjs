// Refusals: forged resume tokens, bad or missing JWTs, the API key, and bad handshake data all
// get a clear `connect_error` or 401, and the node goes on serving.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { startNode, api, connect, refusal } from './lib/harness.mjs';

function jwt(secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}
const now = () => Math.floor(Date.now() / 1000);

test('a forged or foreign resume token is refused and yields nothing', async () => {
  const node = await startNode();
  const a = connect(node.url);
  const s = await a.ready;
  await api(node.url, 'POST', '/server/enqueue?wait=true', { address: `client:${s.clientId}`, payload: 'secret' });
  a.close();
  const forged = await refusal(node.url, { clientId: s.clientId, resumeToken: 'AAAA' + s.resumeToken.slice(4) });
  assert.match(forged.message, /invalid resume token/);
  const other = connect(node.url);
  const o = await other.ready;
  const foreign = await refusal(node.url, { clientId: s.clientId, resumeToken: o.resumeToken });
  assert.match(foreign.message, /invalid resume token/);
  assert.match((await refusal(node.url, { clientId: s.clientId })).message, /needs auth.resumeToken/);
  assert.match((await refusal(node.url, { cursors: { 'bad address': 1 } })).message, /auth.cursors/);
  assert.match((await refusal(node.url, { clientId: 'has space', resumeToken: 'x' })).message, /invalid client id/);
  // The node still serves the rightful owner.
  const back = connect(node.url, { clientId: s.clientId, resumeToken: s.resumeToken });
  await back.ready;
  await back.waitFor((e) => e.event === 'synced');
  assert.deepEqual(back.signals().map((x) => x.payload), ['secret']);
  back.close();
  other.close();
  await node.stop();
});

test('client JWTs are checked when the deployment requires them', async () => {
  const secret = 'jwt-test-secret-0123456789abcdef0123';
  const node = await startNode({ env: { SIGNALPOST_CLIENT_TOKEN_SECRET: secret, SIGNALPOST_REQUIRE_CLIENT_TOKEN: 'true' } });
  assert.match((await refusal(node.url, {})).message, /token is required/);
  assert.match((await refusal(node.url, { token: 'not.a.jwt' })).message, /invalid client token/);
  assert.match((await refusal(node.url, { token: jwt('wrong', { sub: 'u1', exp: now() + 60 }) })).message, /invalid client token/);
  assert.match((await refusal(node.url, { token: jwt(secret, { sub: 'u1', exp: now() - 600 }) })).message, /invalid client token.*[Ee]xpired/);
  const ok = connect(node.url, { token: jwt(secret, { sub: 'user-1', exp: now() + 60 }) });
  const s = await ok.ready;
  assert.equal(s.user, 'user-1');
  ok.close();
  await node.stop();
});

test('the API key guards /server/* and nothing else', async () => {
  const node = await startNode({ env: { SIGNALPOST_API_KEY: 'k3y-0123456789abcdef' } });
  const body = { address: 'channel:x', payload: 1 };
  const no = await api(node.url, 'POST', '/server/enqueue', body);
  assert.equal(no.status, 401);
  assert.match(no.body.error, /API key/);
  assert.equal((await api(node.url, 'POST', '/server/enqueue', body, { apiKey: 'wrong' })).status, 401);
  assert.equal((await api(node.url, 'GET', '/server/nodes')).status, 401);
  // A backup (which writes the whole store to disk) is asked for with the key only.
  assert.equal((await api(node.url, 'POST', '/server/backup')).status, 401);
  assert.equal((await api(node.url, 'POST', '/server/backup', undefined, { apiKey: 'wrong' })).status, 401);
  // Every /server path, an unknown one too, needs the key before anything else is said.
  assert.equal((await api(node.url, 'GET', '/server/nothing')).status, 401);
  assert.equal((await api(node.url, 'GET', '/server')).status, 401);
  assert.equal((await api(node.url, 'POST', '/server/enqueue', body, { apiKey: 'k3y-0123456789abcdef' })).status, 202);
  assert.equal((await api(node.url, 'GET', '/healthz')).status, 200);
  // A path that is no endpoint is simply not there, key or not.
  const nothing = await api(node.url, 'GET', '/nothing');
  assert.equal(nothing.status, 404);
  assert.match(nothing.body.error, /no such endpoint/);
  assert.equal((await api(node.url, 'GET', '/serverless')).status, 404);
  await node.stop();
});
