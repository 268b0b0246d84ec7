// scripts/bench-history.mjs — how long a read by append time takes in a big mailbox (issue 16).
//
//   node scripts/bench-history.mjs                 # an embedded node, 1 000 000 messages
//   N=200000 SIGNALPOST_TEST_BACKEND=cluster node scripts/bench-history.mjs   # on the stack
//
// Starts a node (target/release/signalpost, or $SIGNALPOST_BIN), appends N messages to one
// address, then times 30 `GET /server/mailbox/<a>?since=<ts>&limit=100` reads from the first,
// the middle and the end of the mailbox, beside plain reads by version. Needs tests/e2e's
// node_modules (cd tests/e2e && npm ci). A measurement, not a test.
import { startNode, api } from '../tests/e2e/lib/harness.mjs';
const N = Number(process.env.N || 1000000);
const node = await startNode({ env: { SIGNALPOST_CONNECT_RATE_PER_IP: '0' } });
const a = `channel:big-${Date.now()}`;
let next = 0;
const t0 = Date.now();
const worker = async () => { while (next < N) { const from = next; next = Math.min(N, next + 1000); const b = []; for (let j = from; j < next; j++) b.push({ address: a, payload: { j } }); const r = await api(node.url, 'POST', '/server/enqueue', b); if (r.status !== 202) throw new Error(String(r.status)); } };
await Promise.all([worker(), worker()]);
for (;;) { const r = await api(node.url, 'GET', `/server/mailbox/${a}?after=${N - 1}&limit=1`); if (r.body.messages?.length === 1) break; await new Promise((r) => setTimeout(r, 500)); }
console.log(`filled ${N} in ${(Date.now() - t0) / 1000} s`);
for (const at of [1, N / 2, N - 10]) {
  const ts = (await api(node.url, 'GET', `/server/mailbox/${a}?after=${at - 1}&limit=1`)).body.messages[0].ts;
  const times = [];
  let first;
  for (let i = 0; i < 30; i++) { const s = process.hrtime.bigint(); const r = await api(node.url, 'GET', `/server/mailbox/${a}?since=${ts}&limit=100`); times.push(Number(process.hrtime.bigint() - s) / 1e6); first = r.body.messages[0].version; }
  times.sort((x, y) => x - y);
  const plain = []; for (let i = 0; i < 30; i++) { const s = process.hrtime.bigint(); await api(node.url, 'GET', `/server/mailbox/${a}?after=${at - 1}&limit=100`); plain.push(Number(process.hrtime.bigint() - s) / 1e6); }
  plain.sort((x, y) => x - y);
  console.log(`since ts(v${at}) -> first v${first}: median ${times[15].toFixed(2)} ms, max ${times[29].toFixed(2)} ms; a plain read after v${at - 1}: median ${plain[15].toFixed(2)} ms`);
}
await node.stop();
