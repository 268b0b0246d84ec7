// The client contract end to end with the official socket.io-client: connect, bind, receive,
// ack, miss 1 000 messages, resume on a restarted node, get exactly the missing ones, `synced`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startNode, api, connect, fill, waitFor } from './lib/harness.mjs';

for (const transport of ['websocket', 'polling']) {
  test(`resume after a node restart over ${transport}`, async () => {
    let node = await startNode();
    const opts = { transports: [transport] };
    const channel = `channel:news-${transport}`;
    const a = connect(node.url, {}, opts);
    const session = await a.ready;
    assert.match(session.clientId, /^[A-Za-z0-9._~@+=-]+$/);
    assert.ok(session.resumeToken.length > 20);
    assert.deepEqual(session.addresses, []);
    await a.waitFor((e) => e.event === 'synced');

    // Bind through the server API: the client hears `bound` with the channel's head.
    await fill(node.url, channel, 3);
    const bind = await api(node.url, 'POST', '/server/connect', { client: session.clientId, addresses: [channel] });
    assert.equal(bind.status, 200, JSON.stringify(bind.body));
    const bound = await a.waitFor((e) => e.event === 'bound');
    assert.deepEqual(bound.data, { address: channel, version: 3 });

    // Live delivery, to the channel and to the client's own address.
    await fill(node.url, channel, 5, { from: 3 });
    const own = `client:${session.clientId}`;
    const direct = await api(node.url, 'POST', '/server/enqueue?wait=true', { address: own, payload: { hello: 'you' } });
    assert.equal(direct.status, 200);
    await a.waitCount(channel, 5);
    await a.waitCount(own, 1);
    const got = a.signals(channel);
    assert.deepEqual(got.map((s) => s.version), [4, 5, 6, 7, 8]);
    assert.deepEqual(got.map((s) => s.payload.n), [3, 4, 5, 6, 7]);
    for (const s of got) {
      assert.equal(s.address, channel);
      assert.equal(typeof s.id, 'string');
      assert.ok(s.ts > 1.6e12);
    }
    assert.deepEqual(a.signals(own)[0].payload, { hello: 'you' });
    a.socket.emit('ack', { address: channel, version: 8 });
    a.socket.emit('ack', { address: own, version: 1 });
    await waitFor(async () => (await api(node.url, 'GET', `/server/clients/${session.clientId}`)).body.cursors[channel] === 8, 5000, 'cursor saved');
    const info = await api(node.url, 'GET', `/server/clients/${session.clientId}`);
    assert.equal(info.body.connected, true);
    assert.deepEqual(info.body.addresses, [channel]);
    a.close();
    await waitFor(async () => !(await api(node.url, 'GET', `/server/clients/${session.clientId}`)).body.connected, 5000, 'disconnected');

    // Miss 1 000 messages, restart the node (SIGTERM drains and exits 0), and resume.
    await fill(node.url, channel, 1000, { from: 100 });
    const status = await node.stop();
    assert.equal(status.code, 0, 'SIGTERM drains and exits 0');
    node = await startNode({ dataDir: node.dataDir });
    const b = connect(node.url, { clientId: session.clientId, resumeToken: session.resumeToken }, opts);
    const again = await b.ready;
    assert.equal(again.clientId, session.clientId);
    assert.deepEqual(again.addresses, [channel]);
    // (If this waits in vain, the error carries the node's log; this says what the client got.)
    const synced = await b.waitFor((e) => e.event === 'synced', 20000).catch((e) => {
      console.log(`got ${b.signals(channel).length} of 1000 replayed signals, ${b.events.length} events`);
      throw e;
    });
    const replay = b.signals(channel);
    assert.equal(replay.length, 1000, 'exactly the missing messages');
    assert.deepEqual(replay.map((s) => s.version), Array.from({ length: 1000 }, (_, i) => 9 + i));
    assert.deepEqual(replay.map((s) => s.payload.n), Array.from({ length: 1000 }, (_, i) => 100 + i));
    assert.equal(b.signals(own).length, 0, 'the acked direct message is not sent again');
    assert.deepEqual(synced.data.cursors, { [channel]: 1008, [own]: 1 });
    const syncedAt = b.events.findIndex((e) => e.event === 'synced');
    assert.equal(b.events.filter((e, i) => e.event === 'signal' && i > syncedAt).length, 0, 'synced comes after the replay');

    // After synced, live again.
    await fill(node.url, channel, 2, { from: 5000 });
    await b.waitCount(channel, 1002);
    assert.deepEqual(b.signals(channel).slice(-2).map((s) => s.version), [1009, 1010]);
    b.close();
    assert.equal((await node.stop()).code, 0);
  });
}

test('cursors given in auth win over stored acks, and unbind reaches the client', async () => {
  const node = await startNode();
  const a = connect(node.url);
  const s = await a.ready;
  a.close();
  const ch = 'channel:cur';
  await api(node.url, 'POST', '/server/connect', { client: s.clientId, addresses: [ch] });
  await fill(node.url, ch, 10);
  const b = connect(node.url, { clientId: s.clientId, resumeToken: s.resumeToken, cursors: { [ch]: 6 } });
  await b.ready;
  await b.waitFor((e) => e.event === 'synced');
  assert.deepEqual(b.signals(ch).map((x) => x.version), [7, 8, 9, 10]);
  const r = await api(node.url, 'POST', '/server/disconnect', { client: s.clientId, addresses: [ch] });
  assert.equal(r.status, 200);
  const unbound = await b.waitFor((e) => e.event === 'unbound');
  assert.deepEqual(unbound.data, { address: ch, version: 10 });
  await fill(node.url, ch, 3, { from: 10 });
  await api(node.url, 'POST', '/server/enqueue?wait=true', { address: `client:${s.clientId}`, payload: 'marker' });
  await b.waitCount(`client:${s.clientId}`, 1);
  assert.equal(b.signals(ch).length, 4, 'nothing arrives from an unbound channel');
  b.close();
  await node.stop();
});

test('two connections of one client both receive, each in order', async () => {
  const node = await startNode();
  const a = connect(node.url);
  const s = await a.ready;
  const b = connect(node.url, { clientId: s.clientId, resumeToken: s.resumeToken });
  await b.ready;
  await api(node.url, 'POST', '/server/connect', { client: s.clientId, addresses: ['channel:both'] });
  await a.waitFor((e) => e.event === 'bound');
  await b.waitFor((e) => e.event === 'bound');
  await fill(node.url, 'channel:both', 50);
  await a.waitCount('channel:both', 50);
  await b.waitCount('channel:both', 50);
  const want = Array.from({ length: 50 }, (_, i) => i + 1);
  assert.deepEqual(a.signals('channel:both').map((x) => x.version), want);
  assert.deepEqual(b.signals('channel:both').map((x) => x.version), want);
  a.close();
  b.close();
  await node.stop();
});
