// `npm pack` in clients/js makes a package that installs into a fresh folder (with its
// socket.io-client dependency from the registry) and works there: imported by name, it
// connects to a node, resumes from a file and receives a signal.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { writeFileSync, readdirSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startNode, api, tempDir } from './lib/harness.mjs';

const run = promisify(execFile);
const pkgDir = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'clients', 'js');

const APP = `
import { connect, fileStorage, VERSION } from 'signalpost-client';
const [url, store] = process.argv.slice(2);
const client = connect({ urls: [url], storage: fileStorage(store), socketOptions: { transports: ['websocket'] } });
const out = { version: VERSION, signals: [] };
client.on('session', (s) => { out.resumed = s.resumed; });
client.on('synced', () => {
  out.clientId = client.clientId;
  fetch(url + '/server/enqueue', { method: 'POST', body: JSON.stringify({ address: 'client:' + client.clientId, payload: 'hi' }) });
});
client.on('signal', (m) => {
  out.signals.push(m.payload);
  // Once the handler has returned: close() sends the ack and writes the cursor.
  setTimeout(async () => { await client.close(); console.log(JSON.stringify(out)); }, 0);
});
// Unref'd: after close() the library holds nothing open, so the process ends by itself.
setTimeout(() => { console.error('no signal'); process.exit(1); }, 15000).unref();
`;

test('npm pack: the package installs into a fresh folder and works there', { timeout: 180000 }, async (t) => {
  const dir = tempDir('client-pack');
  const { stdout } = await run('npm', ['pack', '--json', '--pack-destination', dir], { cwd: pkgDir });
  const [packed] = JSON.parse(stdout);
  const files = packed.files.map((f) => f.path).sort();
  t.diagnostic(`${packed.filename}: ${files.join(', ')} (${packed.size} bytes)`);
  assert.deepEqual(files, ['README.md', 'package.json', 'src/browser.js', 'src/client.js', 'src/file-storage.js', 'src/index.d.ts', 'src/index.js']);

  const app = tempDir('client-app');
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
  writeFileSync(join(app, 'app.mjs'), APP);
  await run('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', join(dir, packed.filename)], { cwd: app });
  assert.ok(readdirSync(join(app, 'node_modules')).includes('socket.io-client'), 'its dependency came along');

  const node = await startNode();
  try {
    const store = join(app, 'state.json');
    const first = JSON.parse((await run(process.execPath, ['app.mjs', node.url, store], { cwd: app })).stdout);
    assert.deepEqual(first.signals, ['hi']);
    assert.equal(first.resumed, false);
    assert.equal(first.version, packed.version);
    const second = JSON.parse((await run(process.execPath, ['app.mjs', node.url, store], { cwd: app })).stdout);
    assert.equal(second.clientId, first.clientId, 'the second run resumed from the file');
    assert.equal(second.resumed, true);
    assert.deepEqual(second.signals, ['hi'], 'the first run\'s signal was not handed again');
    const info = await api(node.url, 'GET', `/server/clients/${first.clientId}`);
    assert.equal(info.body.cursors[`client:${first.clientId}`], 2);
  } finally {
    await node.stop();
  }
});
