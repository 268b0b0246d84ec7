// Bad input on every endpoint and event: a 4xx with a reason (or an `error` event), never a
// crash; the node answers normally afterwards.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startNode, api, connect } from './lib/harness.mjs';

test('every endpoint answers bad input with a 4xx and a reason', async () => {
  const node = await startNode({ env: { SIGNALPOST_MAX_PAYLOAD_BYTES: '1024', SIGNALPOST_MAX_BATCH: '10' } });
  const cases = [
    ['POST', '/server/enqueue', '{not json', 400, /invalid JSON/],
    ['POST', '/server/enqueue', '{"payload":1}', 400, /address is required/],
    ['POST', '/server/enqueue', '{"address":"channel:a"}', 400, /payload is required/],
    ['POST', '/server/enqueue', '{"address":"room:a","payload":1}', 400, /invalid address "room:a"/],
    ['POST', '/server/enqueue', '{"address":"channel:a b","payload":1}', 400, /invalid address "channel:a b"/],
    ['POST', '/server/enqueue', `{"address":"channel:${'x'.repeat(201)}","payload":1}`, 400, /invalid address/],
    ['POST', '/server/enqueue', '{"address":5,"payload":1}', 400, /address must be a string/],
    ['POST', '/server/enqueue', '{"address":"channel:a","payload":1,"id":7}', 400, /id must be a string/],
    ['POST', '/server/enqueue', '{"address":"channel:a","payload":1,"id":""}', 400, /invalid message id/],
    ['POST', '/server/enqueue', `{"address":"channel:a","payload":"${'y'.repeat(2000)}"}`, 413, /over the limit of 1024/],
    ['POST', '/server/enqueue', '[]', 400, /empty/],
    ['POST', '/server/enqueue', JSON.stringify(Array(11).fill({ address: 'channel:a', payload: 1 })), 400, /over the limit of 10/],
    ['POST', '/server/enqueue', '[{"address":"channel:a","payload":1},{"address":"nope","payload":1}]', 400, /\[1\]: invalid address "nope"/],
    ['POST', '/server/enqueue?wait=maybe', '{"address":"channel:a","payload":1}', 400, /wait must be/],
    ['POST', '/server/connect', '{"client":"c","addresses":"channel:a"}', 400, /addresses must be an array/],
    ['POST', '/server/connect', '{"client":"c","addresses":[]}', 400, /1 to 10 addresses/],
    ['POST', '/server/connect', '{"client":"c c","addresses":["channel:a"]}', 400, /invalid client id/],
    ['POST', '/server/connect', '{"client":"c","addresses":["x"]}', 400, /invalid address "x"/],
    ['POST', '/server/connect', '{"client":"c","addresses":["client:c"]}', 400, /own address/],
    ['POST', '/server/connect', '{"client":"c"}', 400, /addresses/],
    ['POST', '/server/disconnect', '{"client":1,"addresses":["channel:a"]}', 400, /client must be a string/],
    ['GET', '/server/mailbox/nope', undefined, 400, /invalid address "nope"/],
    ['GET', '/server/mailbox/channel:a?after=-1', undefined, 400, /after/],
    ['GET', '/server/mailbox/channel:a?limit=0', undefined, 400, /limit must be/],
    ['GET', '/server/clients/a%20b', undefined, 400, /invalid client id/],
    ['GET', '/server/presence/bad', undefined, 400, /invalid address/],
    ['GET', '/server/nothing', undefined, 404, /no such/],
  ];
  for (const [method, path, body, status, reason] of cases) {
    const r = await api(node.url, method, path, body, { raw: true });
    assert.equal(r.status, status, `${method} ${path} ${body}: ${JSON.stringify(r.body)}`);
    assert.match(r.body.error, reason, `${method} ${path}`);
  }
  const ok = await api(node.url, 'POST', '/server/enqueue?wait=true', { address: 'channel:a', payload: 1 });
  assert.equal(ok.status, 200);
  assert.equal(ok.body.version, 1, 'no bad request appended anything');
  assert.equal((await api(node.url, 'GET', '/healthz')).status, 200);
  await node.stop();
});

test('bad socket events get an error event and the connection goes on', async () => {
  const node = await startNode();
  const c = connect(node.url);
  const s = await c.ready;
  await c.waitFor((e) => e.event === 'synced');
  c.socket.emit('ack', 'nonsense');
  c.socket.emit('ack', { address: 'nope', version: 1 });
  c.socket.emit('ack', { address: 'channel:not-bound', version: 1 });
  c.socket.emit('ack', { address: `client:${s.clientId}`, version: -5 });
  c.socket.emit('no-such-event', { x: 1 });
  const errs = () => c.events.filter((e) => e.event === 'error');
  await c.waitFor(() => errs().length >= 4);
  // Each event is handled on its own task, so the answers may come in any order.
  const messages = errs().map((e) => e.data.message);
  for (const want of [/ack needs/, /invalid address "nope"/, /channel:not-bound, which this client does not receive/]) {
    assert.ok(messages.some((m) => want.test(m)), `${want} in ${JSON.stringify(messages)}`);
  }
  assert.equal(messages.filter((m) => /ack needs/.test(m)).length, 2, 'both malformed acks are answered');
  await api(node.url, 'POST', '/server/enqueue', { address: `client:${s.clientId}`, payload: 'still here' });
  await c.waitCount(`client:${s.clientId}`, 1);
  c.close();
  await node.stop();
});
