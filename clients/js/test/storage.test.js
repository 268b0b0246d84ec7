// Stores: memory, Web Storage, a JSON file, and the app's own asynchronous store; what the
// client keeps in them and how it resumes from them.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { memoryStorage, webStorage } from '../src/client.js';
import { fileStorage } from '../src/file-storage.js';
import { start, live } from './helpers.js';
import { until, sleep } from './fake-io.js';

// The files' folders, deleted when this file's tests end.
const dirs = [];
const tempFile = (name) => {
  const dir = mkdtempSync(join(tmpdir(), 'sp-client-'));
  dirs.push(dir);
  return join(dir, name);
};
after(() => { for (const d of dirs) rmSync(d, { recursive: true, force: true }); });

test('memoryStorage and webStorage keep JSON values per key', () => {
  const m = memoryStorage();
  m.set('k', { a: 1 });
  assert.deepEqual(m.get('k'), { a: 1 });
  m.remove('k');
  assert.equal(m.get('k'), null);
  const area = new Map();
  const w = webStorage({ getItem: (k) => area.get(k) ?? null, setItem: (k, v) => area.set(k, v), removeItem: (k) => area.delete(k) });
  w.set('k', { b: 2 });
  assert.equal(area.get('k'), '{"b":2}');
  assert.deepEqual(w.get('k'), { b: 2 });
  area.set('bad', '{');
  assert.equal(w.get('bad'), null);
});

test('fileStorage: a restarted process resumes with the stored identity and cursors', async () => {
  const path = tempFile('state.json');
  const t = start({ storage: fileStorage(path), name: 'prod' });
  const a = await live(t, { addresses: ['channel:a'], cursors: { 'channel:a': 0 } });
  for (let v = 1; v <= 50; v++) a.signal('channel:a', v);
  await until(() => t.client.cursors['channel:a'] === 50);
  await t.client.close();
  const saved = JSON.parse(readFileSync(path, 'utf8'));
  assert.deepEqual(saved['signalpost:prod'], { clientId: 'c1', resumeToken: 'rt-c1', cursors: { 'client:c1': 0, 'channel:a': 50 } });
  const u = start({ storage: fileStorage(path), name: 'prod' });
  const b = await u.io.nth(1);
  assert.deepEqual(b.auth, { clientId: 'c1', resumeToken: 'rt-c1', cursors: { 'client:c1': 0, 'channel:a': 50 } });
  await u.client.close({ forget: true });
  assert.equal(JSON.parse(readFileSync(path, 'utf8'))['signalpost:prod'], undefined);
});

test('a corrupt file or store value starts a new client instead of failing', async () => {
  const path = tempFile('state.json');
  writeFileSync(path, '{not json');
  const t = start({ storage: fileStorage(path) });
  const a = await t.io.nth(1);
  assert.deepEqual(a.auth, {});
  assert.ok(t.got('error').some((e) => /fileStorage/.test(e.message)));
  const m = memoryStorage();
  m.set('signalpost:http://a', { clientId: 'c', resumeToken: 'r', cursors: { 'room:x': 1, 'channel:y': -1, 'channel:z': 2 } });
  const u = start({ storage: m });
  assert.deepEqual((await u.io.nth(1)).auth.cursors, { 'channel:z': 2 });
});

test("the app's own asynchronous store: writes are coalesced, the last state wins", async () => {
  const writes = [];
  let value = null;
  const store = {
    get: async () => value,
    set: async (k, v) => { await sleep(15); writes.push(v); value = v; },
  };
  const t = start({ storage: store });
  const a = await live(t, { addresses: ['channel:a'], cursors: { 'channel:a': 0 } });
  for (let v = 1; v <= 100; v++) a.signal('channel:a', v);
  await until(() => value && value.cursors['channel:a'] === 100, 3000);
  assert.ok(writes.length < 20, `${writes.length} writes for 100 signals`);
});
