// Long replays finish (issue 13, finding 3): a client that missed a million messages resumes and
// reads them at its own pace, slower than the node can send, while Engine.IO pings keep coming.
// Before the fix the node's ping met a socket buffer kept full by the replay and the node closed
// the connection as a heartbeat timeout (cut at ~550 000 of 1 000 000).
//
// SIGNALPOST_E2E_REPLAY sets the number of messages (default 1 000 000); the node pings every
// 2 s here instead of every 25 s, so every second of the replay is a chance to fail.
//
// The second test reads the socket at a fixed byte rate. A ping queued behind more bytes than the
// client reads within the ping timeout cannot be answered in time: before the node capped its
// sockets' unsent bytes (TCP_NOTSENT_LOWAT), Linux let a full connection's send buffer grow to
// 4 MiB, and a ping waited behind it (the first test then failed now and then, at ~3.5 s).
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

/** Resumes `session` on `node` and reads its replay of `n` messages, pacing reads with `pace(ws)`
 * once the WebSocket opens (it returns a function that stops the pacing). */
async function replay(node, session, n, pace) {
  const own = `client:${session.clientId}`;
  const socket = io(node.url, {
    auth: { clientId: session.clientId, resumeToken: session.resumeToken },
    transports: ['websocket'], reconnection: false, forceNew: true,
  });
  const started = Date.now();
  let last = 0;
  let misordered = 0;
  // Two requests in flight may be applied in either order: versions are what is ordered, and
  // each payload must come once.
  const seen = new Uint8Array(n);
  let pings = 0;
  const outcome = await new Promise((resolve) => {
    socket.on('signal', (s) => {
      if (s.address !== own || s.version !== last + 1 || seen[s.payload.n]) misordered++;
      seen[s.payload.n] = 1;
      last = s.version;
    });
    socket.on('synced', (s) => resolve({ synced: s }));
    socket.on('disconnect', (reason) => resolve({ disconnect: reason }));
    socket.on('connect_error', (e) => resolve({ disconnect: e.message }));
    socket.io.on('ping', () => { pings++; });
    socket.io.on('open', () => {
      const stop = pace(socket.io.engine.transport.ws);
      socket.io.engine.on('close', stop);
    });
  });
  const secs = (Date.now() - started) / 1000;
  console.log(`replayed ${last} of ${n} in ${secs.toFixed(1)} s (${Math.round(last / secs)} msg/s), ${pings} pings answered`);
  assert.equal(outcome.disconnect, undefined, `cut off after ${last} of ${n} messages, ${secs.toFixed(1)} s: ${outcome.disconnect}`);
  assert.equal(last, n, 'every missed message');
  assert.equal(misordered, 0, 'each exactly once and in order');
  assert.equal(seen.reduce((a, b) => a + b, 0), n, 'every payload');
  assert.equal(outcome.synced.cursors[own], n);
  assert.ok(pings >= Math.floor(secs / (PING / 1000)) - 2, `the node kept pinging during the replay (${pings} in ${secs.toFixed(1)} s)`);
  socket.close();
}

/** A node with the short ping, and a client of it that missed `n` messages. */
async function missed(n) {
  const node = await startNode({ env: { SIGNALPOST_PING_INTERVAL_MS: PING, SIGNALPOST_PING_TIMEOUT_MS: PONG } });
  const first = connect(node.url);
  const session = await first.ready;
  await first.waitFor((e) => e.event === 'synced');
  first.close();
  await fillFast(node.url, `client:${session.clientId}`, n);
  return { node, session };
}

const embeddedOnly = BACKEND !== 'embedded' && 'the embedded node is enough: the socket side is the same on both backends';

test(`a replay of ${N} messages to a reader slower than the node finishes`, { skip: embeddedOnly, timeout: 900_000 }, async () => {
  const { node, session } = await missed(N);
  let inTick = 0;
  await replay(node, session, N, (ws) => {
    // Read slower than the client could: the WebSocket stops reading for part of every 40 ms
    // (or reads at most RATE messages a second), so the node's socket buffer stays full for the
    // whole replay.
    if (RATE) ws.on('message', () => { if (++inTick >= RATE / 25) ws.pause(); });
    const pace = setInterval(() => {
      if (RATE) {
        inTick = 0;
        ws.resume();
        return;
      }
      ws.pause();
      setTimeout(() => ws.resume(), 40 - READ_MS);
    }, 40);
    return () => clearInterval(pace);
  });
  assert.equal((await node.stop()).code, 0);
});

test('a ping reaches a reader that slows to 1 MB/s within the ping timeout', { skip: embeddedOnly, timeout: 300_000 }, async () => {
  const n = 100_000; // ~11 MB: ~11 s of reading, five pings
  const fast = 300; // ms of reading at full speed first, which lets the kernel grow its buffers
  const perTick = 40_000; // then bytes per 40 ms
  const { node, session } = await missed(n);
  await replay(node, session, n, (ws) => {
    // The TCP socket under the WebSocket: once a tick's bytes are read, it reads no more until
    // the next tick (a read is at most 64 KiB, so the rate is 1.0-1.6 MB/s).
    const tcp = ws._socket;
    const slowFrom = Date.now() + fast;
    let read = 0;
    tcp.on('data', (chunk) => {
      read += chunk.length;
      if (read >= perTick && Date.now() >= slowFrom) tcp.pause();
    });
    const pace = setInterval(() => {
      read = 0;
      tcp.resume();
    }, 40);
    return () => clearInterval(pace);
  });
  assert.equal((await node.stop()).code, 0);
});
