// Bounded memory (issue 13, finding 5): the embedded node's memory does not grow with its store.
// redb caches the pages it reads and writes, 1 GiB per file by default, so a node's RSS used to
// follow `mailbox.redb` up to that size; `store_cache_mb` bounds it. Here a node with a 16 MiB
// cache takes 256 MiB of messages and reads them all back, and its RSS must stay under a bound
// far below the data's size (with redb's old default it does not: see docs/reliability.md).
//
// SIGNALPOST_E2E_CACHE_MB sets the cache (default 16); SIGNALPOST_E2E_FILL_MB the data (256).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { startNode, api, BACKEND } from './lib/harness.mjs';

const CACHE_MB = Number(process.env.SIGNALPOST_E2E_CACHE_MB || 16);
const FILL_MB = Number(process.env.SIGNALPOST_E2E_FILL_MB || 256);
// What a node needs besides the store's cache (measured ~60 MiB at rest with a few connections),
// plus the cache and the allocator's slack on top of it.
const BOUND_MB = 96 + 2 * CACHE_MB;

const rssMb = (pid) => Number(readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+) kB/)[1]) / 1024;

test(`an embedded node with a ${CACHE_MB} MiB store cache stays under ${BOUND_MB} MiB with ${FILL_MB} MiB of messages`, { skip: BACKEND !== 'embedded' && 'the cache bound is the embedded store\'s', timeout: 600_000 }, async () => {
  const node = await startNode({ env: { SIGNALPOST_STORE_CACHE_MB: String(CACHE_MB) } });
  const before = rssMb(node.proc.pid);
  const filler = 'x'.repeat(4000);
  const addresses = Array.from({ length: 256 }, (_, i) => `channel:mem-${i}`);
  const total = Math.ceil((FILL_MB * 1024 * 1024) / 4096);
  let peak = before;
  for (let sent = 0; sent < total; sent += 500) {
    const batch = [];
    for (let j = sent; j < Math.min(total, sent + 500); j++) batch.push({ address: addresses[j % addresses.length], payload: { j, filler } });
    const r = await api(node.url, 'POST', '/server/enqueue?wait=true', batch);
    assert.equal(r.status, 200, `enqueue: ${r.status}`);
    peak = Math.max(peak, rssMb(node.proc.pid));
  }
  // Read every message back: the pages go through the cache again.
  let read = 0;
  for (const a of addresses) {
    for (let after = 0; ;) {
      const r = await api(node.url, 'GET', `/server/mailbox/${encodeURIComponent(a)}?after=${after}&limit=1000`);
      assert.equal(r.status, 200);
      read += r.body.messages.length;
      if (r.body.messages.length === 0 || after + r.body.messages.length >= r.body.head) break;
      after += r.body.messages.length;
    }
    peak = Math.max(peak, rssMb(node.proc.pid));
  }
  assert.equal(read, total, 'every message reads back');
  console.log(`RSS ${before.toFixed(0)} MiB at start, ${peak.toFixed(0)} MiB at most, with ${FILL_MB} MiB of messages and a ${CACHE_MB} MiB cache`);
  assert.ok(peak < BOUND_MB, `RSS reached ${peak.toFixed(0)} MiB (bound ${BOUND_MB} MiB)`);
  assert.equal((await node.stop()).code, 0);
});
