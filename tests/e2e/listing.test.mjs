// `GET /server/presence/<address>` for addresses other than `presence:` ones: the clients bound
// to the address that are connected now, with their connections — answered from the nodes' own
// connections, on either backend (three nodes of a cluster: routing.test.mjs).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startNode, api, connect, waitFor } from './lib/harness.mjs';

test('a bound address lists its connected clients and their connections; unbound or gone, they leave the list', async () => {
  const node = await startNode();
  const self = (await api(node.url, 'GET', '/server/nodes')).body.self;
  const alice = connect(node.url);
  const bob = connect(node.url);
  const [a, b] = [await alice.ready, await bob.ready];
  // Alice twice: a second connection resuming her identity.
  const alice2 = connect(node.url, { clientId: a.clientId, resumeToken: a.resumeToken });
  assert.equal((await alice2.ready).clientId, a.clientId);
  for (const s of [a, b]) {
    assert.equal((await api(node.url, 'POST', '/server/connect', { client: s.clientId, addresses: ['channel:room'] })).status, 200);
  }
  const list = async (address) => (await api(node.url, 'GET', `/server/presence/${address}`)).body;
  await waitFor(async () => (await list('channel:room')).clients.length === 2, 10000, 'both listed');
  const room = await list('channel:room');
  assert.deepEqual(room.clients.map((x) => x.clientId), [a.clientId, b.clientId].sort());
  assert.equal(room.truncated, false);
  const ofAlice = room.clients.find((x) => x.clientId === a.clientId);
  assert.equal(ofAlice.node, self);
  assert.equal(ofAlice.connections.length, 2, 'both of her connections');
  for (const c of ofAlice.connections) {
    assert.equal(c.node, self);
    assert.equal(typeof c.connection, 'string');
    assert.ok(c.since > 0);
  }
  // A client's own address lists that client; an address nobody is bound to lists nobody.
  assert.deepEqual((await list(`client:${b.clientId}`)).clients.map((x) => x.clientId), [b.clientId]);
  assert.deepEqual((await list('channel:nobody')).clients, []);
  // Unbound: off the list at once. Gone: off the list.
  assert.equal((await api(node.url, 'POST', '/server/disconnect', { client: b.clientId, addresses: ['channel:room'] })).status, 200);
  await waitFor(async () => (await list('channel:room')).clients.length === 1, 10000, 'bob unbound');
  alice2.close();
  await waitFor(async () => (await list('channel:room')).clients[0]?.connections.length === 1, 10000, 'one connection of alice left');
  alice.close();
  await waitFor(async () => (await list('channel:room')).clients.length === 0, 10000, 'alice gone');
  bob.close();
  await node.stop();
});
