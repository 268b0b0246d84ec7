// Nothing acknowledged is lost when a node is killed with SIGKILL under load, versions stay
// gap-free; and an expired range is reported with `gap`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { BIN, startNode, api, connect, fill, waitFor, refusal, BACKEND, mailbox, tempDir, metric } from './lib/harness.mjs';

test('SIGKILL under load loses nothing acknowledged; versions stay 1..head', async () => {
  let node = await startNode();
  const addresses = Array.from({ length: 8 }, (_, i) => `channel:load-${i}`);
  const acked = new Map(); // id -> { address, version }
  let stop = false;
  const writers = Array.from({ length: 16 }, async (_, w) => {
    for (let i = 0; !stop; i++) {
      const id = `w${w}-${i}`;
      const address = addresses[(w + i) % addresses.length];
      try {
        const r = await api(node.url, 'POST', '/server/enqueue?wait=true', { address, id, payload: { w, i } });
        if (r.status === 200) acked.set(id, r.body);
      } catch { return; }
    }
  });
  await waitFor(() => acked.size > 2000, 20000, '2000 acknowledged appends');
  const killed = await node.kill();
  stop = true;
  await Promise.all(writers);
  assert.equal(killed.signal, 'SIGKILL');
  node = await startNode({ dataDir: node.dataDir });
  const heads = {};
  for (const address of addresses) {
    const seen = [];
    for (let after = 0; ;) {
      const r = await api(node.url, 'GET', `/server/mailbox/${address}?after=${after}&limit=1000`);
      assert.equal(r.status, 200);
      if (r.body.messages.length === 0) { heads[address] = r.body.head; break; }
      seen.push(...r.body.messages);
      after = r.body.messages.at(-1).version;
    }
    assert.deepEqual(seen.map((m) => m.version), Array.from({ length: seen.length }, (_, i) => i + 1), `${address} is gap-free`);
    assert.equal(seen.length, heads[address]);
    const byId = new Map(seen.map((m) => [m.id, m.version]));
    assert.equal(byId.size, seen.length, 'no id twice');
    for (const [id, ack] of acked) {
      if (ack.address === address) assert.equal(byId.get(id), ack.version, `acknowledged ${id} is kept at its version`);
    }
  }
  // Appends go on after the restart, after the head. (On the cluster backend, records Kafka took
  // before the kill may still be applied once the group has rebalanced, so the new version may be
  // higher than head + 1 — but the mailbox stays gap-free.)
  const next = await api(node.url, 'POST', '/server/enqueue?wait=true', { address: addresses[0], payload: 'after' }, {});
  assert.equal(next.status, 200, JSON.stringify(next.body));
  assert.ok(next.body.version > heads[addresses[0]], `${next.body.version} after ${heads[addresses[0]]}`);
  const all = await api(node.url, 'GET', `/server/mailbox/${addresses[0]}?limit=1000`);
  const versions = (await mailbox(node.url, addresses[0])).map((m) => m.version);
  assert.ok(all.body.head >= next.body.version);
  assert.deepEqual(versions, Array.from({ length: versions.length }, (_, i) => i + 1), 'still gap-free');
  await node.stop();
});

test('an expired range is sent as gap, then the rest; resume tokens expire with the retention and open connections get fresh ones', async () => {
  // 4 s, not 1 s: Cassandra counts a TTL from the write's whole second, so with 1 s the two later
  // messages could expire (in 0–1 s) before they are read (seen once in CI). They live ≥ 3 s now.
  const node = await startNode({ env: { SIGNALPOST_RETENTION_SECS: '4', SIGNALPOST_EXPIRY_INTERVAL_MS: '100' } });
  // A connection of the client stays open: it is sent a fresh resume token (`resumeToken`) while
  // the first one ages past the retention.
  const keeper = connect(node.url);
  const s = await keeper.ready;
  const own = `client:${s.clientId}`;
  await fill(node.url, own, 5);
  await new Promise((r) => setTimeout(r, 4500));
  await fill(node.url, own, 2, { from: 5 });
  await waitFor(async () => (await api(node.url, 'GET', `/server/mailbox/${own}`)).body.low === 6, 5000, 'expiry');
  const renewed = keeper.events.filter((e) => e.event === 'resumeToken').map((e) => e.data.resumeToken);
  assert.ok(renewed.length >= 1, 'the open connection got a fresh resume token');
  const old = await refusal(node.url, { clientId: s.clientId, resumeToken: s.resumeToken });
  assert.match(old.message, /resume token expired/);
  keeper.close();
  const b = connect(node.url, { clientId: s.clientId, resumeToken: renewed.at(-1), cursors: { [own]: 0 } });
  await b.ready;
  const synced = await b.waitFor((e) => e.event === 'synced');
  const gap = b.events.find((e) => e.event === 'gap');
  assert.deepEqual(gap.data, { address: own, from: 1, to: 5 });
  assert.deepEqual(b.signals(own).map((x) => x.version), [6, 7]);
  assert.ok(b.events.indexOf(gap) < b.events.findIndex((e) => e.event === 'signal'), 'gap comes before the later versions');
  assert.equal(synced.data.cursors[own], 7);
  b.close();
  await node.stop();
});

test('a data dir whose files went missing, empty or foreign refuses to start instead of starting empty', { skip: BACKEND === 'cluster' && 'the embedded store only' }, async () => {
  const node = await startNode();
  const dir = node.dataDir;
  await fill(node.url, 'channel:kept', 3);
  await node.stop();
  const save = (f) => readFileSync(join(dir, f));
  const originals = Object.fromEntries(['mailbox.redb', 'state.redb', 'resume.secret'].map((f) => [f, save(f)]));
  const refusedWith = async (what) => {
    await assert.rejects(startNode({ dataDir: dir }), (e) => {
      assert.match(e.message, what);
      assert.match(e.message, /refusing to start/);
      return true;
    });
  };
  rmSync(join(dir, 'mailbox.redb'));
  await refusedWith(/mailbox\.redb is missing/);
  writeFileSync(join(dir, 'mailbox.redb'), '');
  await refusedWith(/mailbox\.redb is empty/);
  writeFileSync(join(dir, 'mailbox.redb'), originals['mailbox.redb']);
  rmSync(join(dir, 'state.redb'));
  await refusedWith(/state\.redb is missing/);
  writeFileSync(join(dir, 'state.redb'), originals['state.redb']);
  rmSync(join(dir, 'resume.secret'));
  await refusedWith(/resume\.secret is missing/);
  writeFileSync(join(dir, 'resume.secret'), originals['resume.secret']);
  // Another node's file in its place.
  const other = await startNode();
  await other.stop();
  writeFileSync(join(dir, 'mailbox.redb'), readFileSync(join(other.dataDir, 'mailbox.redb')));
  await refusedWith(/belongs to store/);
  // Restored from the backup: it starts, with every version kept (the next is 4, not 1).
  writeFileSync(join(dir, 'mailbox.redb'), originals['mailbox.redb']);
  const back = await startNode({ dataDir: dir });
  const r = await api(back.url, 'POST', '/server/enqueue?wait=true', { address: 'channel:kept', payload: 'next' });
  assert.equal(r.body.version, 4);
  await back.stop();
});

test('compact gives back the space of what expired and keeps the rest; refused while the node runs', { skip: BACKEND === 'cluster' && 'the embedded store only' }, async () => {
  // What is kept is written once the rest expired, and lives ≥ 4 s: until the node has stopped.
  let node = await startNode({ env: { SIGNALPOST_RETENTION_SECS: '4', SIGNALPOST_EXPIRY_INTERVAL_MS: '200' } });
  const dir = node.dataDir;
  const compact = () => spawnSync(BIN, ['compact', '--data-dir', dir], { encoding: 'utf8' });
  // ~20 MB of messages, then all of them expire.
  const payload = 'x'.repeat(2000);
  for (let i = 0; i < 40; i++) {
    const batch = Array.from({ length: 250 }, (_, j) => ({ address: `channel:gone-${j % 10}`, payload, id: `g-${i}-${j}` }));
    const r = await api(node.url, 'POST', '/server/enqueue?wait=true', batch);
    assert.equal(r.status, 200, JSON.stringify(r.body));
  }
  await waitFor(async () => {
    const r = await api(node.url, 'GET', '/server/mailbox/channel:gone-0');
    return r.body.head === 1000 && r.body.low === 1001;
  }, 20000, 'the messages expired');
  const versions = await fill(node.url, 'channel:kept', 3);
  const running = compact();
  assert.equal(running.status, 1, running.stdout);
  assert.match(running.stderr, /mailbox\.redb is open in a running node: stop the node first/);
  await node.stop();
  const before = statSync(join(dir, 'mailbox.redb')).size;
  const done = compact();
  assert.equal(done.status, 0, done.stderr);
  assert.match(done.stdout, /state\.redb: /);
  const after = statSync(join(dir, 'mailbox.redb')).size;
  // How much of the freed space redb had already cut off the file's end varies (7–18 MB were
  // left); what is live after compacting is three small messages and the heads.
  assert.ok(after < 1e6 && after <= before, `mailbox.redb ${before} -> ${after} bytes`);
  // The sizes it prints are the file's (in MiB, to one decimal).
  const [, from, to] = done.stdout.match(/mailbox\.redb: ([\d.]+) MiB -> ([\d.]+) MiB/).map(Number);
  assert.ok(Math.abs(from - before / 1048576) <= 0.051 && Math.abs(to - after / 1048576) <= 0.051, done.stdout);
  // The store is whole: what was kept reads back, and versions go on after the heads. (Started
  // with the default retention, so that what was kept cannot expire meanwhile.)
  node = await startNode({ dataDir: dir });
  const kept = await api(node.url, 'GET', '/server/mailbox/channel:kept');
  assert.deepEqual(kept.body.messages.map((m) => m.payload), [{ n: 0 }, { n: 1 }, { n: 2 }]);
  assert.deepEqual(kept.body.messages.map((m) => m.version), versions);
  const next = await api(node.url, 'POST', '/server/enqueue?wait=true', { address: 'channel:gone-0', payload: 'after' });
  assert.equal(next.body.version, 1001);
  await node.stop();
  // Not a data dir: refused, and nothing is created there.
  const empty = tempDir();
  const refused = spawnSync(BIN, ['compact', '--data-dir', empty], { encoding: 'utf8' });
  assert.equal(refused.status, 1);
  assert.match(refused.stderr, /not the data dir of an embedded node/);
});

test('a backup of a running node, taken under load, is a data dir a node starts on with everything acknowledged before it', async () => {
  let node = await startNode();
  if (BACKEND === 'cluster') {
    const r = await api(node.url, 'POST', '/server/backup');
    assert.equal(r.status, 404);
    assert.match(r.body.error, /embedded backend/);
    await node.stop();
    return;
  }
  const addresses = Array.from({ length: 4 }, (_, i) => `channel:bk-${i}`);
  // A client bound to one of them, with a cursor.
  const c = connect(node.url);
  const s = await c.ready;
  assert.equal((await api(node.url, 'POST', '/server/connect', { client: s.clientId, addresses: [addresses[0]] })).status, 200);
  const acked = new Map(); // id -> { address, version }
  let stop = false;
  const writers = Array.from({ length: 8 }, async (_, w) => {
    for (let i = 0; !stop; i++) {
      const id = `w${w}-${i}`;
      const r = await api(node.url, 'POST', '/server/enqueue?wait=true', { address: addresses[(w + i) % 4], id, payload: { w, i } });
      if (r.status === 200) acked.set(id, r.body);
    }
  });
  await waitFor(() => acked.size > 1000, 20000, '1000 acknowledged appends');
  await c.waitCount(addresses[0], 50);
  const last = c.signals(addresses[0]).at(-1).version;
  c.socket.emit('ack', { address: addresses[0], version: last });
  await waitFor(async () => (await api(node.url, 'GET', `/server/clients/${s.clientId}`)).body.cursors[addresses[0]] === last, 5000, 'cursor saved');
  const before = new Map(acked);
  const r = await api(node.url, 'POST', '/server/backup');
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.ok(r.body.messages >= before.size, `${r.body.messages} messages in the backup, ${before.size} acknowledged before it`);
  // The command-line tool asks for one too; a second backup is a folder of its own.
  const cli = spawnSync(BIN, ['backup'], { env: { ...process.env, SIGNALPOST_URL: node.url }, encoding: 'utf8' });
  assert.equal(cli.status, 0, cli.stderr);
  assert.notEqual(JSON.parse(cli.stdout).dir, r.body.dir);
  assert.equal(await metric(node.url, 'signalpost_backups_total{outcome="written"}'), 2);
  assert.ok(await metric(node.url, 'signalpost_last_backup_timestamp_seconds') > Date.now() / 1000 - 60);
  stop = true;
  await Promise.all(writers);
  c.close();
  await node.stop();
  // Started on the backup as it is: every address 1..head, everything acknowledged before the
  // backup at its version, the binding and the cursor.
  node = await startNode({ dataDir: r.body.dir });
  for (const address of addresses) {
    const seen = await mailbox(node.url, address);
    assert.deepEqual(seen.map((m) => m.version), Array.from({ length: seen.length }, (_, i) => i + 1), `${address} is gap-free`);
    const byId = new Map(seen.map((m) => [m.id, m.version]));
    for (const [id, ack] of before) {
      if (ack.address === address) assert.equal(byId.get(id), ack.version, `${id}, acknowledged before the backup, is in it`);
    }
  }
  const info = await api(node.url, 'GET', `/server/clients/${s.clientId}`);
  assert.deepEqual(info.body.addresses, [addresses[0]]);
  assert.equal(info.body.cursors[addresses[0]], last);
  // It resumes there: the client's resume token is good (the secret came along).
  const again = connect(node.url, { clientId: s.clientId, resumeToken: s.resumeToken });
  assert.equal((await again.ready).clientId, s.clientId);
  again.close();
  await node.stop();
});
