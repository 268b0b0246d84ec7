// Test harness: start real signalpost nodes the way a user does (`signalpost serve`), talk to them
// over HTTP, and connect the official socket.io-client.
import { spawn } from 'node:child_process';
import { after } from 'node:test';
import { mkdtempSync, rmSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { io } from 'socket.io-client';

const here = dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.SIGNALPOST_BIN || join(here, '..', '..', '..', 'target', 'release', 'signalpost');

/** A fresh folder under the system's temp dir, deleted when the test file ends (kept when
 *  SIGNALPOST_TEST_KEEP=1, to look at a failed run's data dirs). */
const temps = [];
export function tempDir(tag = 'sp') {
  const dir = mkdtempSync(join(tmpdir(), `signalpost-${tag}-`));
  temps.push(dir);
  return dir;
}

// Every node this test file started; whatever a failing test left running is killed at the end,
// then the file's temp folders are deleted (once no node writes into them any more).
// (A process maps to what it wrote to stderr so far.)
const started = new Map();
after(async () => {
  // A process leaves `started` when it exits, so each one here still has its exit to come.
  const gone = [...started.keys()].map((p) => new Promise((resolve) => {
    p.once('exit', resolve);
    p.kill('SIGKILL');
  }));
  await Promise.all(gone);
  if (process.env.SIGNALPOST_TEST_KEEP === '1') return;
  for (const dir of temps) rmSync(dir, { recursive: true, force: true });
});

/** The backend the tests run on: `embedded` (default) or `cluster` (SIGNALPOST_TEST_BACKEND). */
export const BACKEND = process.env.SIGNALPOST_TEST_BACKEND || 'embedded';

/** On the cluster backend, a node and its restarts (same data dir) get their own keyspace,
 *  topics and consumer group, so tests never see each other's data. */
function clusterEnv(dataDir) {
  if (BACKEND !== 'cluster') return {};
  const tag = dataDir.replace(/[^A-Za-z0-9]/g, '').slice(-12).toLowerCase();
  return {
    SIGNALPOST_BACKEND: 'cluster',
    SIGNALPOST_CASSANDRA_KEYSPACE: `e2e_${tag}`,
    SIGNALPOST_KAFKA_TOPIC_PREFIX: `e2e-${tag}.`,
    SIGNALPOST_KAFKA_GROUP: `e2e-${tag}`,
    SIGNALPOST_KAFKA_PARTITIONS: '2',
    SIGNALPOST_ZOOKEEPER_ROOT: `/e2e-${tag}`,
    SIGNALPOST_CLUSTER_SECRET: CLUSTER_SECRET,
  };
}

/** The node-to-node secret every test cluster shares (at least 32 bytes). */
export const CLUSTER_SECRET = 'e2e-cluster-secret-0123456789abcdef';

/** Produces records straight to Kafka with Kafka's own console producer (`scripts/stack
 *  produce`): `records` are [key, value] pairs, values as objects (sent as JSON). */
export async function produce(topic, records) {
  const script = join(here, '..', '..', '..', 'scripts', 'stack');
  const proc = spawn(script, ['produce', topic], { stdio: ['pipe', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr.on('data', (d) => { err += d; });
  proc.stdin.end(records.map(([k, v]) => `${k}\t${JSON.stringify(v)}\n`).join(''));
  const code = await new Promise((resolve) => proc.on('exit', resolve));
  if (code !== 0) throw new Error(`scripts/stack produce ${topic} exited with ${code}: ${err}`);
}

/** The settings shared by the nodes of one test cluster (cluster backend): their own keyspace,
 *  topics, consumer group and ZooKeeper root, and a 4 s ZooKeeper session; `extra` adds to them. */
export function testCluster(name, extra = {}) {
  const tag = randomBytes(5).toString('hex');
  return {
    SIGNALPOST_CASSANDRA_KEYSPACE: `${name}_${tag}`,
    SIGNALPOST_KAFKA_TOPIC_PREFIX: `${name}-${tag}.`,
    SIGNALPOST_KAFKA_GROUP: `${name}-${tag}`,
    SIGNALPOST_ZOOKEEPER_ROOT: `/${name}-${tag}`,
    SIGNALPOST_ZOOKEEPER_SESSION_TIMEOUT_MS: '4000',
    SIGNALPOST_CLUSTER_SECRET: CLUSTER_SECRET,
    ...extra,
  };
}

/** How long a stopped node may take to exit (its drain is bounded well inside this). */
const STOP_WITHIN_MS = 60000;

/** Starts `signalpost serve` on a free port; resolves once it prints where it listens. */
export async function startNode({ dataDir = tempDir(), env = {}, args = [], listen = '127.0.0.1:0', ready = true } = {}) {
  const proc = spawn(BIN, ['serve', '--listen', listen, '--data-dir', dataDir, ...args], {
    env: { ...process.env, RUST_LOG: process.env.SIGNALPOST_E2E_LOG || 'warn', ...clusterEnv(dataDir), ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  started.set(proc, () => err);
  proc.on('exit', () => started.delete(proc));
  proc.stderr.on('data', (d) => { err += d; });
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`node did not start: ${out} ${err}`)), 60000);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on (https?:\/\/[0-9.]+:\d+)/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`node exited with ${code}: ${err}`)); });
  });
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  // Every test starts from a node that says it is ready, as a user (or a load balancer) would
  // wait: the contract promises that an operation sent then does not time out, and every test's
  // first operation checks it. (HTTPS nodes are checked by their own tests, with their CA.)
  if (ready && url.startsWith('http:')) {
    await waitFor(async () => {
      try { return (await fetch(`${url}/healthz`)).status === 200; } catch { return false; }
    }, 60000, `${url}/healthz to answer 200`);
  }
  return {
    url, dataDir, proc, exited,
    stderr: () => err,
    /** SIGTERM; resolves with the exit status. A node that has not exited `ms` after it (its
     *  drain is bounded well inside that) is killed, and the stop fails with its log. */
    async stop(ms = STOP_WITHIN_MS) {
      proc.kill('SIGTERM');
      let timer;
      const late = new Promise((resolve) => { timer = setTimeout(resolve, ms, 'late'); });
      const r = await Promise.race([exited, late]);
      clearTimeout(timer);
      if (r !== 'late') return r;
      proc.kill('SIGKILL');
      await exited;
      throw new Error(`${url} did not exit within ${ms} ms of SIGTERM; its log:\n${err.slice(-4000)}`);
    },
    async kill() { proc.kill('SIGKILL'); return exited; },
  };
}

/** Calls the server API; resolves { status, body }. */
export async function api(url, method, path, body, { apiKey, raw } = {}) {
  const headers = { 'content-type': 'application/json' };
  if (apiKey) headers.authorization = `Bearer ${apiKey}`;
  const res = await fetch(url + path, {
    method,
    headers,
    body: body === undefined ? undefined : (raw ? body : JSON.stringify(body)),
  });
  const text = await res.text();
  let parsed;
  try { parsed = JSON.parse(text); } catch { parsed = text; }
  return { status: res.status, body: parsed };
}

/** A counter or gauge of a node's `/metrics` without labels (0 when it is not there yet). */
export async function metric(url, name) {
  const text = String((await api(url, 'GET', '/metrics')).body);
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(' ')[1]) : 0;
}

/** A connected socket.io-client with a record of everything it received; `more` are further
 *  socket.io-client options (e.g. `ca`). */
export function connect(url, auth = {}, { transports = ['websocket'], timeout = 10000, ...more } = {}) {
  const socket = io(url, { auth, transports, reconnection: false, forceNew: true, timeout, ...more });
  const rec = { socket, events: [], session: null };
  socket.onAny((event, data) => rec.events.push({ event, data }));
  rec.signals = (address) => rec.events.filter((e) => e.event === 'signal' && (!address || e.data.address === address)).map((e) => e.data);
  rec.waitFor = (pred, ms = 10000, what = 'event') => waitFor(() => rec.events.find(pred), ms, what);
  rec.waitCount = (address, n, ms = 20000) => waitFor(() => rec.signals(address).length >= n, ms, `${n} signals on ${address}`);
  rec.ready = new Promise((resolve, reject) => {
    socket.on('session', (s) => { rec.session = s; resolve(s); });
    socket.on('connect_error', (e) => reject(e));
    socket.on('disconnect', (reason) => reject(new Error(`disconnected before the session event: ${reason}`)));
  });
  rec.close = () => socket.close();
  return rec;
}

/** Every message of a mailbox, in version order, read a page of 1 000 at a time. */
export async function mailbox(url, address) {
  const out = [];
  for (let after = 0; ;) {
    const r = await api(url, 'GET', `/server/mailbox/${encodeURIComponent(address)}?after=${after}&limit=1000`);
    if (r.status !== 200) throw new Error(`reading ${address}: ${r.status} ${JSON.stringify(r.body)}`);
    if (r.body.messages.length === 0) return out;
    out.push(...r.body.messages);
    after = r.body.messages.at(-1).version;
  }
}

/** The end of what each running node logged (warnings and errors by default), for a test that
 *  waited in vain to say why. */
function runningLogs() {
  const logs = [...started].map(([p, err]) => [p.pid, err().slice(-2000)]).filter(([, e]) => e);
  return logs.map(([pid, e]) => `\n--- node ${pid} logged:\n${e}`).join('');
}

/** Polls until `f()` is truthy; on timeout the error carries the running nodes' logs. */
export async function waitFor(f, ms = 10000, what = 'condition') {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}${runningLogs()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The error a connection attempt is refused with. */
export async function refusal(url, auth, opts) {
  const rec = connect(url, auth, opts);
  try {
    await rec.ready;
    throw new Error('connection was accepted');
  } catch (e) {
    return e;
  } finally {
    rec.close();
  }
}

/** Enqueues `n` messages to `address` in batches, waiting for each append. */
export async function fill(url, address, n, { from = 0, apiKey } = {}) {
  const versions = [];
  for (let i = 0; i < n; i += 500) {
    const batch = [];
    for (let j = i; j < Math.min(n, i + 500); j++) batch.push({ address, payload: { n: from + j }, id: `m-${from + j}` });
    const r = await api(url, 'POST', '/server/enqueue?wait=true', batch, { apiKey });
    if (r.status !== 200) throw new Error(`enqueue failed: ${r.status} ${JSON.stringify(r.body)}`);
    versions.push(...r.body.results.map((x) => x.version));
  }
  return versions;
}

/** The partition (of `partitions`) Kafka's murmur2 partitioner gives a record keyed by
 *  `address` (as src/address.rs): which node's consumer appends it, and deals it out when it is
 *  a work address. */
export function partition(address, partitions) {
  const data = Buffer.from(address);
  const M = 0x5bd1e995;
  let h = (0x9747b28c ^ data.length) >>> 0;
  let i = 0;
  for (; i + 4 <= data.length; i += 4) {
    let k = Math.imul(data.readUInt32LE(i), M) >>> 0;
    k = Math.imul((k ^ (k >>> 24)) >>> 0, M) >>> 0;
    h = (Math.imul(h, M) ^ k) >>> 0;
  }
  const rest = data.length - i;
  if (rest >= 3) h = (h ^ (data[i + 2] << 16)) >>> 0;
  if (rest >= 2) h = (h ^ (data[i + 1] << 8)) >>> 0;
  if (rest >= 1) h = Math.imul((h ^ data[i]) >>> 0, M) >>> 0;
  h = Math.imul((h ^ (h >>> 13)) >>> 0, M) >>> 0;
  return ((h ^ (h >>> 15)) & 0x7fffffff) % partitions;
}

/** The enqueue partitions a cluster node's consumer owns now (from its `/healthz`). */
export async function ownedPartitions(url) {
  return (await api(url, 'GET', '/healthz')).body.partitions?.owned || [];
}
