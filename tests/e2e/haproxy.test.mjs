// HAProxy in front of three nodes (cluster backend), running the shipped deploy/haproxy.cfg with
// only its listen address and the three node addresses replaced: long-polling clients stick to
// the node that holds their session (and, as proof that this needs the cookie, fail without it);
// WebSocket clients whose node is killed reconnect through HAProxy to another node and resume
// with every version once, in order.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { randomBytes } from 'node:crypto';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { io } from 'socket.io-client';
import { BACKEND, startNode, testCluster, api, waitFor, tempDir, metric } from './lib/harness.mjs';

const skip = BACKEND !== 'cluster' && 'needs the cluster backend (SIGNALPOST_TEST_BACKEND=cluster)';
const here = dirname(fileURLToPath(import.meta.url));
const SHIPPED = join(here, '..', '..', 'deploy', 'haproxy.cfg');
const HAPROXY = '/usr/sbin/haproxy';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** deploy/haproxy.cfg with `bind 127.0.0.1:8080` and the nodes 127.0.0.1:8081..8083 replaced by
 *  the test's. `sticky: false` also removes the SERVERID cookie and balances roundrobin. */
function configFor(nodes, port, { sticky = true } = {}) {
  let cfg = readFileSync(SHIPPED, 'utf8');
  const swap = (from, to) => {
    assert.ok(cfg.includes(from), `deploy/haproxy.cfg contains "${from}"`);
    cfg = cfg.split(from).join(to);
  };
  swap('bind 127.0.0.1:8080', `bind 127.0.0.1:${port}`);
  nodes.forEach((n, i) => swap(`127.0.0.1:${8081 + i}`, new URL(n.url).host));
  if (!sticky) {
    const cookie = /^[ \t]*cookie SERVERID\b.*$/m;
    const balance = /^([ \t]*)balance \w+.*$/m;
    assert.match(cfg, cookie, 'deploy/haproxy.cfg sets the SERVERID cookie');
    assert.match(cfg, balance, 'deploy/haproxy.cfg has a balance line');
    cfg = cfg.replace(cookie, '    # (no stickiness: removed by the test)').replace(balance, '$1balance roundrobin');
  }
  return cfg;
}

// Every HAProxy this file started; killed at the end whatever happened.
const proxies = new Set();
after(() => {
  for (const p of proxies) p.kill('SIGKILL');
});

/** Checks and starts `haproxy -db -f <cfg>`; resolves once it answers /healthz. `lines` collects
 *  its output (the request log and the health-check events) with the time each line arrived. */
async function startHaproxy(cfg, port) {
  const dir = tempDir('haproxy');
  const file = join(dir, 'haproxy.cfg');
  writeFileSync(file, cfg);
  const check = spawnSync(HAPROXY, ['-c', '-f', file], { encoding: 'utf8' });
  assert.equal(check.status, 0, `haproxy -c -f ${file}: ${check.stdout}${check.stderr}`);
  const proc = spawn(HAPROXY, ['-db', '-f', file], { stdio: ['ignore', 'pipe', 'pipe'] });
  proxies.add(proc);
  const lines = [];
  let exited = null;
  proc.on('exit', (code, signal) => { exited = { code, signal }; proxies.delete(proc); });
  for (const stream of [proc.stdout, proc.stderr]) {
    let rest = '';
    stream.on('data', (d) => {
      const parts = (rest + d).split('\n');
      rest = parts.pop();
      const at = Date.now();
      for (const line of parts) lines.push({ at, line });
    });
  }
  const url = `http://127.0.0.1:${port}`;
  await waitFor(async () => {
    if (exited) throw new Error(`haproxy exited (${JSON.stringify(exited)}): ${lines.map((l) => l.line).join('\n')}`);
    try {
      return (await fetch(`${url}/healthz`)).status === 200;
    } catch {
      return false;
    }
  }, 15000, 'HAProxy answering /healthz');
  return {
    url, lines, file,
    /** The request log (`option httplog`): [{ server, status, method, uri, sid }]. */
    requests() {
      const out = [];
      for (const { line } of lines) {
        const m = line.match(/\] (\S+) (\S+)\/(\S+) (\S+) (-?\d+) .*"(\w+) (\S+)/);
        if (!m) continue;
        const uri = m[7];
        const sid = new URL(uri, url).searchParams.get('sid');
        out.push({ server: m[3], status: Number(m[5]), method: m[6], uri, sid });
      }
      return out;
    },
    async stop() {
      if (exited) return;
      const gone = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGTERM');
      await gone;
    },
  };
}

/** Three nodes of one test cluster and HAProxy in front of them with the shipped config;
 *  started once, by the first test that needs them. */
let setup;
function cluster() {
  setup ??= (async () => {
    assert.ok(existsSync(HAPROXY), `HAProxy is not installed (${HAPROXY} is missing): install it with \`apt-get install haproxy\` (scripts/test does)`);
    const env = testCluster('hap', { SIGNALPOST_KAFKA_PARTITIONS: '6' });
    env.SIGNALPOST_RESUME_SECRET = randomBytes(32).toString('hex'); // one for all nodes: resume on any
    const nodes = [];
    for (let i = 0; i < 3; i++) nodes.push(await startNode({ env }));
    for (const node of nodes) {
      await waitFor(async () => (await api(node.url, 'GET', '/server/nodes')).body.nodes?.length === 3, 30000, '3 nodes listed');
    }
    // HAProxy's server n<i+1> is nodes[i] (configFor keeps the order); ids[i] is its node id.
    const ids = await Promise.all(nodes.map(async (n) => (await api(n.url, 'GET', '/server/nodes')).body.self));
    const port = await freePort();
    const hap = await startHaproxy(configFor(nodes, port), port);
    return { env, nodes, ids, hap };
  })();
  return setup;
}

after(async () => {
  if (!setup) return;
  const s = await setup.catch(() => null);
  if (!s) return;
  await s.hap.stop();
  await Promise.all(s.nodes.map((n) => (n.proc.exitCode === null && n.proc.signalCode === null ? n.stop() : null)));
});

/** A socket.io-client connection through `url` that records what it gets, keeps its clientId,
 *  resumeToken and cursors in `socket.auth` (sent again on every reconnection) and acks every
 *  signal. */
function client(url, { transports, reconnection = false, withCredentials = false }) {
  const socket = io(url, {
    transports,
    reconnection,
    reconnectionDelay: 200,
    reconnectionDelayMax: 1000,
    timeout: 5000,
    forceNew: true,
    // In Node, engine.io-client keeps a cookie jar (and so HAProxy's SERVERID cookie) only with
    // withCredentials: true, as a browser does for its own origin.
    withCredentials,
    auth: {},
  });
  const rec = { socket, sessions: [], signals: [], bound: [], errors: [], disconnects: [] };
  socket.on('session', (s) => {
    rec.sessions.push({ at: Date.now(), signalsBefore: rec.signals.length, ...s });
    socket.auth = { clientId: s.clientId, resumeToken: s.resumeToken, cursors: { ...(socket.auth.cursors || {}) } };
  });
  socket.on('signal', (m) => {
    rec.signals.push(m);
    socket.auth.cursors = { ...(socket.auth.cursors || {}), [m.address]: Math.max(m.version, socket.auth.cursors?.[m.address] ?? 0) };
    socket.emit('ack', { address: m.address, version: m.version });
  });
  socket.on('bound', (b) => rec.bound.push(b));
  socket.on('connect_error', (e) => rec.errors.push({ at: Date.now(), message: e.message, description: e.description }));
  socket.on('disconnect', (reason, details) => rec.disconnects.push({ at: Date.now(), reason, description: details?.description?.message ?? details?.description }));
  rec.session = () => rec.sessions.at(-1);
  rec.versions = (address) => rec.signals.filter((m) => m.address === address).map((m) => m.version);
  rec.ready = waitFor(() => {
    if (rec.errors.length) throw new Error(`connect_error: ${rec.errors[0].message} ${rec.errors[0].description ?? ''}`);
    return rec.sessions[0];
  }, 15000, 'session');
  rec.ready.catch(() => {}); // awaited by the tests that expect a session
  rec.close = () => socket.close();
  return rec;
}

/** Six clients through `url` with `options`, each bound to `address` (and told so). */
async function boundClients(url, address, options) {
  const clients = [];
  for (let i = 0; i < 6; i++) {
    const c = client(url, options);
    await c.ready;
    clients.push(c);
  }
  for (const c of clients) {
    const r = await api(url, 'POST', '/server/connect', { client: c.session().clientId, addresses: [address] });
    assert.equal(r.status, 200, JSON.stringify(r.body));
  }
  for (const c of clients) await waitFor(() => c.bound.some((b) => b.address === address), 15000, 'bound');
  return clients;
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

test('HAProxy (deploy/haproxy.cfg): long-polling clients stick to their node, and fail without the cookie', { skip, timeout: 180000 }, async (t) => {
  const { nodes, ids, hap } = await cluster();
  const address = 'channel:hap-poll';
  // Bound through HAProxy (balanced to any node: /server/* carries no cookie).
  const clients = await boundClients(hap.url, address, { transports: ['polling'], withCredentials: true });
  // 20 messages through HAProxy, one request each, each answered with its version.
  for (let i = 0; i < 20; i++) {
    const r = await api(hap.url, 'POST', '/server/enqueue?wait=true', { address, id: `p-${i}`, payload: i });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.version, i + 1);
  }
  for (const [i, c] of clients.entries()) {
    await waitFor(() => c.versions(address).length >= 20, 20000, `20 signals on polling client ${i}`);
    assert.deepEqual(c.versions(address), range(1, 20), `polling client ${i}: every version once, in order`);
    assert.deepEqual(c.signals.map((m) => m.payload), range(0, 19), `polling client ${i}: the payloads in order`);
  }
  await sleep(300); // nothing more arrives
  const perNode = new Map();
  const sids = new Map(); // engine.io sid → client index
  for (const [i, c] of clients.entries()) {
    const s = c.session();
    assert.equal(c.sessions.length, 1, `polling client ${i}: one session`);
    assert.deepEqual(c.errors, [], `polling client ${i}: no connect_error`);
    assert.deepEqual(c.disconnects, [], `polling client ${i}: never disconnected`);
    assert.ok(c.socket.connected, `polling client ${i}: still connected`);
    assert.equal(c.socket.io.engine.transport.name, 'polling', `polling client ${i}: on long-polling`);
    const k = ids.indexOf(s.node);
    assert.ok(k >= 0, `polling client ${i}: session.node ${s.node} is one of the three`);
    // HAProxy's cookie names the node that made the session.
    const jar = c.socket.io.engine._cookieJar;
    assert.ok(jar, 'engine.io-client keeps a cookie jar with withCredentials: true');
    const cookie = [...jar.cookies].find(([name]) => name === 'SERVERID');
    assert.equal(cookie?.[1].value, `n${k + 1}`, `polling client ${i}: SERVERID cookie names its node`);
    // The cluster sees exactly one connection of it, on that node.
    const r = await api(hap.url, 'GET', `/server/clients/${s.clientId}`);
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.connected, true);
    assert.equal(r.body.node, s.node, `polling client ${i}: connected on the node of its session`);
    assert.deepEqual(r.body.connections.map((x) => x.node), [s.node], `polling client ${i}: one connection, on its node`);
    perNode.set(k, (perNode.get(k) || 0) + 1);
    sids.set(c.socket.io.engine.id, i);
  }
  for (const c of clients) c.close();
  await sleep(500); // the aborted polls are logged
  // HAProxy's log: every request of each polling session went to the node of that session.
  const reqs = hap.requests().filter((q) => q.uri.startsWith('/socket.io/'));
  let polls = 0;
  for (const [sid, i] of sids) {
    const mine = reqs.filter((q) => q.sid === sid);
    const servers = [...new Set(mine.map((q) => q.server))];
    const k = ids.indexOf(clients[i].session().node);
    assert.deepEqual(servers, [`n${k + 1}`], `polling client ${i}: all ${mine.length} requests of its session on n${k + 1}`);
    assert.ok(mine.some((q) => q.method === 'POST') && mine.some((q) => q.method === 'GET'), `polling client ${i}: sent and received by polling`);
    assert.ok(mine.filter((q) => q.method === 'GET').every((q) => q.status === 200 || q.status === -1), `polling client ${i}: every poll answered 200 (or aborted at close)`);
    polls += mine.length;
  }
  assert.ok(perNode.size >= 2, `the clients are spread over the nodes (${[...perNode.entries()]})`);
  t.diagnostic(`sticky: 6 long-polling clients through HAProxy, per node ${[0, 1, 2].map((k) => perNode.get(k) || 0).join('/')}, ${polls} polling requests, each on its session's node; 20 messages each, in order, once`);

  // The same file without the cookie (roundrobin): the requests of one session reach different
  // nodes, which do not know it, and every client fails.
  const loosePort = await freePort();
  const loose = await startHaproxy(configFor(nodes, loosePort, { sticky: false }), loosePort);
  const outcomes = [];
  for (let i = 0; i < 6; i++) {
    const c = client(loose.url, { transports: ['polling'], withCredentials: true });
    const outcome = await waitFor(() => {
      if (c.errors.length) return `connect_error: ${c.errors[0].message} (${c.errors[0].description ?? ''})`;
      if (c.disconnects.length) return `disconnect: ${c.disconnects[0].reason} (${c.disconnects[0].description ?? ''})`;
      return null;
    }, 15000, 'the non-sticky client to fail').catch(() => (c.sessions.length ? 'connected' : 'nothing'));
    outcomes.push(outcome);
    c.close();
  }
  await sleep(300);
  const unknown = loose.requests().filter((q) => q.uri.startsWith('/socket.io/') && q.sid && q.status === 400);
  t.diagnostic(`without the cookie (roundrobin): ${outcomes.filter((o) => o !== 'connected').length}/6 polling clients failed (${[...new Set(outcomes)].join('; ')}); ${unknown.length} requests answered 400 by a node that does not know the session`);
  assert.ok(outcomes.every((o) => o !== 'connected'), `without stickiness no polling client works: ${outcomes.join(' | ')}`);
  assert.ok(unknown.length >= 6, 'nodes answered 400 to requests of sessions they do not have');
  await loose.stop();
});

test('HAProxy (deploy/haproxy.cfg): WebSocket clients of a killed node resume through it on another node, every version once', { skip, timeout: 180000 }, async (t) => {
  const { nodes, ids, hap } = await cluster();
  const address = 'channel:hap-ws';
  const clients = await boundClients(hap.url, address, { transports: ['websocket'], reconnection: true });
  const count = ids.map((id) => clients.filter((c) => c.session().node === id).length);
  const appendsBefore = await Promise.all(nodes.map((n) => metric(n.url, 'signalpost_appends_total')));

  // Load through HAProxy: batches of 5 with ids, `?wait=true`; a batch that fails (its node died,
  // or its partition is moving) is sent again with the same ids, so it is appended once.
  let sent = 0;
  let stop = false;
  let retries = 0;
  let longest = 0;
  const failures = new Set();
  const acked = new Map();
  const load = (async () => {
    while (!stop) {
      const batch = Array.from({ length: 5 }, (_, j) => ({ address, id: `w-${sent + j}`, payload: sent + j }));
      const t0 = Date.now();
      for (;;) {
        let r;
        try {
          r = await api(hap.url, 'POST', '/server/enqueue?wait=true', batch);
        } catch (e) {
          r = { status: 0, body: e.message };
        }
        if (r.status === 200) {
          for (const [j, x] of r.body.results.entries()) acked.set(batch[j].id, x.version);
          break;
        }
        retries++;
        failures.add(`${r.status} ${JSON.stringify(r.body).slice(0, 120)}`);
        if (Date.now() - t0 > 60000) throw new Error(`enqueue kept failing for 60 s: ${[...failures].join(' | ')}`);
        await sleep(100);
      }
      longest = Math.max(longest, Date.now() - t0);
      sent += 5;
      await sleep(10);
    }
  })();
  load.catch(() => {});

  // Before: everybody has the first 50.
  await waitFor(() => sent >= 50 && clients.every((c) => c.versions(address).length >= 50), 30000, '50 messages on every client');
  // The node to kill: one that holds clients but does not append this channel's messages (the
  // owner of its Kafka partition), so that messages go on being appended while its clients are
  // away; they must get those on resume, from their cursors.
  const appends = (await Promise.all(nodes.map((n) => metric(n.url, 'signalpost_appends_total')))).map((v, i) => v - appendsBefore[i]);
  const appender = appends.indexOf(Math.max(...appends));
  const candidates = [0, 1, 2].filter((i) => i !== appender && count[i] > 0).sort((a, b) => count[b] - count[a]);
  const k = candidates[0] ?? count.indexOf(Math.max(...count));
  const victim = nodes[k];
  const victimId = ids[k];
  const hit = clients.filter((c) => c.session().node === victimId);
  const spared = clients.filter((c) => c.session().node !== victimId);
  t.diagnostic(`6 WebSocket clients through HAProxy, per node ${count.join('/')}; n${appender + 1} appends the channel; killing n${k + 1} with ${hit.length} of them`);
  const atKill = sent;
  const died = Date.now();
  await victim.kill();
  // During: the victim's clients reconnect through HAProxy (the same URL) and resume elsewhere.
  await waitFor(() => hit.every((c) => c.sessions.length >= 2), 30000, 'the killed node\'s clients resumed');
  const resumedAt = Date.now();
  const mark = sent;
  const failover = hit.map((c) => c.sessions[1].at - died);
  const down = await waitFor(() => hap.lines.find((l) => l.at >= died && l.line.includes(`signalpost/n${k + 1} is DOWN`)), 5000, `HAProxy to mark n${k + 1} DOWN`)
    .catch(() => null);
  // After: 50 more.
  await waitFor(() => sent >= mark + 50, 60000, '50 more messages after the failover');
  stop = true;
  await load;

  // Every acknowledged id at its own version, 1..sent, in order.
  assert.equal(acked.size, sent);
  for (let i = 0; i < sent; i++) assert.equal(acked.get(`w-${i}`), i + 1, `w-${i} appended once, at version ${i + 1}`);
  for (const [i, c] of clients.entries()) {
    await waitFor(() => c.versions(address).length >= sent, 30000, `${sent} signals on client ${i}`);
  }
  await sleep(300); // nothing more arrives
  for (const [i, c] of clients.entries()) {
    assert.deepEqual(c.versions(address), range(1, sent), `client ${i}: every version once, in order, across the failover`);
    assert.ok(c.signals.every((m) => m.payload === m.version - 1), `client ${i}: the payloads match`);
  }
  const replayed = hit.map((c) => c.signals.slice(c.sessions[1].signalsBefore).filter((m) => m.ts < c.sessions[1].at).length);
  for (const [i, c] of hit.entries()) {
    const [first, second] = c.sessions;
    assert.equal(c.sessions.length, 2, `resumed client ${i}: one reconnection`);
    assert.equal(second.clientId, first.clientId, `resumed client ${i}: same clientId`);
    assert.equal(second.resumed, true, `resumed client ${i}: resumed`);
    assert.notEqual(second.node, victimId, `resumed client ${i}: on another node`);
    assert.ok(ids.includes(second.node));
    assert.ok(c.disconnects.length >= 1, `resumed client ${i}: saw its connection drop`);
    const r = await api(hap.url, 'GET', `/server/clients/${first.clientId}`);
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.ok(r.body.connections.some((x) => x.node === second.node), `resumed client ${i}: connected on its new node`);
  }
  for (const [i, c] of spared.entries()) {
    assert.equal(c.sessions.length, 1, `client ${i} of a surviving node: never reconnected`);
    assert.deepEqual(c.disconnects, [], `client ${i} of a surviving node: never disconnected`);
  }
  // Nothing twice in the mailbox.
  const stored = [];
  for (;;) {
    const page = await api(hap.url, 'GET', `/server/mailbox/${address}?limit=1000&after=${stored.length ? stored.at(-1).version : 0}`);
    assert.equal(page.status, 200, JSON.stringify(page.body));
    if (!page.body.messages.length) break;
    stored.push(...page.body.messages);
  }
  assert.deepEqual(stored.map((m) => m.version), range(1, sent), 'mailbox gap-free');
  assert.equal(new Set(stored.map((m) => m.id)).size, sent, 'no id twice');
  for (const c of clients) c.close();

  t.diagnostic(`failover through HAProxy: ${hit.length} clients resumed on another node ${Math.min(...failover)}–${Math.max(...failover)} ms after SIGKILL (all by ${resumedAt - died} ms); HAProxy marked n${k + 1} DOWN ${down ? `${down.at - died} ms` : '(not seen in its log)'} after the kill`);
  t.diagnostic(`${sent} messages: ${atKill} before the kill, ${mark - atKill} acknowledged between the kill and the last resume, ${sent - mark} after; the resumed clients got ${replayed.join('/')} messages appended before they reconnected by replay from their cursors`);
  t.diagnostic(`${retries} enqueue retries (${[...failures].join(' | ') || 'none'}), slowest batch ${longest} ms; every client got every version once, in order`);
  assert.ok(mark > atKill, 'messages were appended while the clients were away');
  assert.ok(down, `HAProxy logged n${k + 1} DOWN: ${hap.lines.filter((l) => /DOWN|WARNING|ALERT/.test(l.line)).map((l) => l.line).join(' | ')}`);
  assert.ok(down.at - died < 3000, `HAProxy took the dead node out within 3 s (${down.at - died} ms)`);
});
