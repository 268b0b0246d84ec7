// Shared set-up of the unit tests: a client on a fake io that records every event it hands over.
import { connect, memoryStorage } from '../src/client.js';
import { fakeIo } from './fake-io.js';

export function start(options = {}) {
  const io = fakeIo();
  const storage = options.storage || memoryStorage();
  const client = connect({ urls: ['http://a', 'http://b', 'http://c'], io, storage, minDelay: 10, ackInterval: 20, ...options });
  const events = [];
  for (const ev of ['session', 'signal', 'gap', 'synced', 'bound', 'unbound', 'kicked', 'joined', 'left', 'state', 'error', 'reset']) {
    client.on(ev, (data, info) => events.push({ ev, data, info }));
  }
  const got = (ev) => events.filter((e) => e.ev === ev).map((e) => e.data);
  const versions = (address) => got('signal').filter((m) => !address || m.address === address).map((m) => m.version);
  return { client, io, storage, events, got, versions };
}

/** Opens the main connection of `t` and brings it to `synced` with `cursors`. */
export async function live(t, { clientId = 'c1', addresses = [], cursors = {}, node = 'n1' } = {}) {
  const s = await t.io.nth(t.io.sockets.length + 1);
  s.session(clientId, { addresses, node });
  s.send('synced', { cursors: { [`client:${clientId}`]: 0, ...cursors } });
  return s;
}
