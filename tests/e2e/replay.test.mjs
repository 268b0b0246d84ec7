// Long replays finish (issue 13, finding 3): a client that missed a million messages resumes and
// reads them at its own pace, slower than the node can send, while Engine.IO pings keep coming.
// Before the fix the node's ping met a socket buffer kept full by the replay and the node closed
// the connection as a heartbeat timeout (cut at ~550 000 of 1 000 000).
//
// SIGNALPOST_E2E_REPLAY sets the number of messages (default 1 000 000); the node pings every
// 2 s here instead of every 25 s, so every second of the replay is a chance to fail.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { startNode, api, connect, BACKEND } from './lib/harness.mjs';

const N = Number(process.env.SIGNALPOST_E2E_REPLAY || 1_000_000);
// Of every 40 ms the client's WebSocket reads for this many (SIGNALPOST_E2E_REPLAY_READ_MS).
const READ_MS = Number(process.env.SIGNALPOST_E2E_REPLAY_READ_MS || 3);
// Or, with SIGNALPOST_E2E_REPLAY_RATE, read at most that many messages per second.
const RATE = Number(process.env.SIGNALPOST_E2E_REPLAY_RATE || 0);
// The node's ping interval and timeout (ms); SIGNALPOST_E2E_PING=25000,20000 is the default's.
const [PING, PONG] = (process.env.SIGNALPOST_E2E_PING || '2000,1500').split(',');

/** Appends `n` messages to `address`, 1 000 per request, two requests in flight. */
async function fillFast(url, address, n) {
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const from = next;
      next = Math.min(n, next + 1000);
      const batch = [];
      for (let j = from; j < next; j++) batch.push({ address, payload: { n: j } });
      const r = await api(url, 'POST', '/server/enqueue', batch);
      if (r.status !== 202) throw new Error(`enqueue failed: ${r.status} ${JSON.stringify(r.body).slice(0, 200)}`);
    }
  };
  await Promise.all([worker(), worker()]);
  // Queued operations are applied in order; the head tells when all are in.
  const end = Date.now() + 300_000;
  for (;;) {
    const r = await api(url, 'GET', `/server/mailbox/${encodeURIComponent(address)}?after=${n - 1}&limit=1`);
    if (r.status === 200 && r.body.messages.length === 1) return;
    if (Date.now() > end) throw new Error('the mailbox did not fill');
    await new Promise((res) => setTimeout(res, 200));
  }
}

test(`a replay of ${N} messages to a reader slower than the node finishes`, { skip: BACKEND !== 'embedded' && 'the embedded node is enough: the socket side is the same on both backends', timeout: 900_000 }, async () => {
  const node = await startNode({ env: { SIGNALPOST_PING_INTERVAL_MS: PING, SIGNALPOST_PING_TIMEOUT_MS: PONG } });
  const first = connect(node.url);
  const session = await first.ready;
  await first.waitFor((e) => e.event === 'synced');
  first.close();
  const own = `client:${session.clientId}`;
  await fillFast(node.url, own, N);

  const socket = io(node.url, {
    auth: { clientId: session.clientId, resumeToken: session.resumeToken },
    transports: ['websocket'], reconnection: false, forceNew: true,
  });
  const started = Date.now();
  let last = 0;
  let misordered = 0;
  // Two requests in flight may be applied in either order: versions are what is ordered, and
  // each payload must come once.
  const seen = new Uint8Array(N);
  let pings = 0;
  let inTick = 0;
  const outcome = await new Promise((resolve) => {
    socket.on('signal', (s) => {
      if (s.address !== own || s.version !== last + 1 || seen[s.payload.n]) misordered++;
      seen[s.payload.n] = 1;
      if (RATE && ++inTick >= RATE / 25) socket.io.engine.transport.ws.pause();
      last = s.version;
    });
    socket.on('synced', (s) => resolve({ synced: s }));
    socket.on('disconnect', (reason) => resolve({ disconnect: reason }));
    socket.on('connect_error', (e) => resolve({ disconnect: e.message }));
    socket.io.on('ping', () => { pings++; });
    // Read slower than the client could: the WebSocket stops reading for part of every 40 ms, so
    // the node's socket buffer stays full for the whole replay.
    socket.io.on('open', () => {
      const ws = socket.io.engine.transport.ws;
      const pace = setInterval(() => {
        if (RATE) {
          inTick = 0;
          ws.resume();
          return;
        }
        ws.pause();
        setTimeout(() => ws.resume(), 40 - READ_MS);
      }, 40);
      socket.io.engine.on('close', () => clearInterval(pace));
    });
  });
  const secs = (Date.now() - started) / 1000;
  console.log(`replayed ${last} of ${N} in ${secs.toFixed(1)} s (${Math.round(last / secs)} msg/s), ${pings} pings answered`);
  assert.equal(outcome.disconnect, undefined, `cut off after ${last} of ${N} messages, ${secs.toFixed(1)} s: ${outcome.disconnect}`);
  assert.equal(last, N, 'every missed message');
  assert.equal(misordered, 0, 'each exactly once and in order');
  assert.equal(seen.reduce((a, b) => a + b, 0), N, 'every payload');
  assert.equal(outcome.synced.cursors[own], N);
  assert.ok(pings >= Math.floor(secs / (PING / 1000)) - 2, `the node kept pinging during the replay (${pings} in ${secs.toFixed(1)} s)`);
  socket.close();
  assert.equal((await node.stop()).code, 0);
});
