// A work client in its own process, for tests that kill it: connects to argv[2], binds itself to
// the work address argv[3] (through the node's API), prints {clientId} and then {version} for
// every message of it, as JSON lines, and never acks.
import { io } from 'socket.io-client';

const [url, work] = process.argv.slice(2);
const s = io(url, { transports: ['websocket'], reconnection: false, forceNew: true });
s.on('session', async (x) => {
  console.log(JSON.stringify({ clientId: x.clientId }));
  const r = await fetch(`${url}/server/connect`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ client: x.clientId, addresses: [work] }),
  });
  if (r.status !== 200 && r.status !== 202) process.exit(3);
});
s.on('signal', (m) => { if (m.address === work) console.log(JSON.stringify({ version: m.version })); });
s.on('connect_error', () => process.exit(2));
