// The command-line tools against a real node: each prints JSON, errors print the server's reason
// and exit non-zero, `tail` follows addresses as a Socket.IO client.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BIN, startNode, tempDir, waitFor } from './lib/harness.mjs';

function run(url, args, env = {}) {
  const r = spawnSync(BIN, args, { env: { ...process.env, SIGNALPOST_URL: url, ...env }, encoding: 'utf8' });
  let json = null;
  try { json = JSON.parse(r.stdout.trim().split('\n').at(-1)); } catch { /* not JSON */ }
  return { code: r.status, out: r.stdout, err: r.stderr, json };
}

test('enqueue, bind, unbind, mailbox, client, nodes', async () => {
  const node = await startNode();
  let r = run(node.url, ['enqueue', 'channel:cli', '{"a":1}', '--wait', '--id', 'first']);
  assert.equal(r.code, 0, r.err);
  assert.deepEqual(r.json, { id: 'first', address: 'channel:cli', version: 1 });
  r = run(node.url, ['enqueue', 'channel:cli', '{"a":1}', '--wait', '--id', 'first']);
  assert.equal(r.json.version, 1, 'the same id is appended once');

  const file = join(tempDir('cli'), 'm.jsonl');
  writeFileSync(file, Array.from({ length: 1200 }, (_, i) => JSON.stringify({ n: i })).join('\n') + '\n');
  r = run(node.url, ['enqueue', 'channel:cli', '--file', file, '--wait']);
  assert.equal(r.code, 0, r.err);
  assert.match(r.err, /1200 messages sent/);
  const mixed = join(tempDir('cli'), 'mixed.jsonl');
  writeFileSync(mixed, '{"address":"channel:other","payload":1}\n\n{"address":"client:x","payload":"hi","id":"k"}\n');
  assert.equal(run(node.url, ['enqueue', '--file', mixed]).code, 0);

  r = run(node.url, ['mailbox', 'channel:cli', '--after', '1199', '--limit', '5']);
  assert.equal(r.json.head, 1201);
  assert.deepEqual(r.json.messages.map((m) => m.version), [1200, 1201]);
  assert.deepEqual(r.json.messages.map((m) => m.payload.n), [1198, 1199]);

  r = run(node.url, ['bind', 'c1', 'channel:cli', 'channel:other']);
  assert.equal(r.code, 0, r.err);
  assert.deepEqual(r.json.bound.map((b) => [b.address, b.version]), [['channel:cli', 1201], ['channel:other', 1]]);
  r = run(node.url, ['client', 'c1']);
  assert.deepEqual(r.json.addresses.sort(), ['channel:cli', 'channel:other']);
  assert.equal(r.json.connected, false);
  r = run(node.url, ['unbind', 'c1', 'channel:other']);
  assert.deepEqual(r.json.unbound, ['channel:other']);
  r = run(node.url, ['nodes']);
  assert.equal(r.json.nodes.length, 1);
  assert.equal(r.json.leader, r.json.nodes[0].id);
  await node.stop();
});

test('errors print the reason and exit non-zero', async () => {
  const node = await startNode({ env: { SIGNALPOST_API_KEY: 'cli-key-0123456789abcdef' } });
  let r = run(node.url, ['nodes']);
  assert.equal(r.code, 1);
  assert.match(r.err, /401.*API key/);
  r = run(node.url, ['enqueue', 'room:x', '1'], { SIGNALPOST_API_KEY: 'cli-key-0123456789abcdef' });
  assert.equal(r.code, 1);
  assert.match(r.err, /400: invalid address "room:x"/);
  r = run(node.url, ['enqueue', 'channel:x', '{oops'], { SIGNALPOST_API_KEY: 'cli-key-0123456789abcdef' });
  assert.equal(r.code, 1);
  assert.match(r.err, /payload is not JSON/);
  r = run(node.url, ['mailbox', 'channel:bad name'], { SIGNALPOST_API_KEY: 'cli-key-0123456789abcdef' });
  assert.equal(r.code, 1);
  assert.match(r.err, /invalid address/);
  r = run('http://127.0.0.1:1', ['nodes']);
  assert.equal(r.code, 1);
  assert.match(r.err, /connecting to 127.0.0.1:1/);
  for (const sub of ['enqueue', 'bind', 'unbind', 'mailbox', 'client', 'nodes', 'tail', 'bench', 'serve']) {
    const h = run(node.url, [sub, '--help']);
    assert.equal(h.code, 0);
    assert.match(h.out, /Example/, `${sub} --help has an example`);
  }
  await node.stop();
});

test('tail prints signals of its addresses as JSON lines', async () => {
  const node = await startNode();
  const tail = spawn(BIN, ['tail', 'channel:t', 'channel:u', '--count', '3'], { env: { ...process.env, SIGNALPOST_URL: node.url } });
  let out = '';
  let err = '';
  tail.stdout.on('data', (d) => { out += d; });
  tail.stderr.on('data', (d) => { err += d; });
  const exited = new Promise((r) => tail.on('exit', r));
  await waitFor(() => /tailing/.test(err), 10000, 'tail to start');
  run(node.url, ['enqueue', 'channel:t', '{"x":1}']);
  run(node.url, ['enqueue', 'channel:nope', '{"x":9}']);
  run(node.url, ['enqueue', 'channel:u', '"two"']);
  run(node.url, ['enqueue', 'channel:t', '[3]']);
  assert.equal(await exited, 0, err);
  const lines = out.trim().split('\n').map((l) => JSON.parse(l));
  assert.deepEqual(lines.map((l) => [l.address, l.version, l.payload]), [['channel:t', 1, { x: 1 }], ['channel:u', 1, 'two'], ['channel:t', 2, [3]]]);
  // The tail's throwaway client left no bindings behind.
  const id = err.match(/as client (\S+)/)[1];
  assert.deepEqual(JSON.parse(spawnSync(BIN, ['client', id], { env: { ...process.env, SIGNALPOST_URL: node.url }, encoding: 'utf8' }).stdout).addresses, []);
  await node.stop();
});
