// A stand-in for socket.io-client's `io` in unit tests: every call makes a FakeSocket that
// records what the library emits and lets the test play the server's part.
export function fakeIo() {
  const sockets = [];
  const io = (url, opts) => {
    const s = new FakeSocket(url, opts);
    sockets.push(s);
    return s;
  };
  io.sockets = sockets;
  /** Resolves with the n-th socket (1-based) once the library opened it. */
  io.nth = (n, ms = 2000) => until(() => sockets[n - 1], ms, `socket #${n}`);
  return io;
}

export class FakeSocket {
  constructor(url, opts) {
    this.url = url;
    this.opts = opts;
    this.auth = opts.auth;
    this.handlers = {};
    this.sent = [];
    this.closed = false;
    this.answer = (event, data) => ({ ok: true }); // what the "server" answers to requests
  }

  on(event, f) {
    (this.handlers[event] ||= []).push(f);
    return this;
  }

  emit(event, data, ack) {
    this.sent.push({ event, data });
    if (ack) setTimeout(() => ack(this.answer(event, data)), 1);
    return this;
  }

  close() { this.closed = true; }

  /** The server sends `event`. */
  send(event, data) {
    for (const f of this.handlers[event] || []) f(data);
  }

  session(clientId = 'c1', { addresses = [], node = 'n1', resumeToken = `rt-${clientId}` } = {}) {
    this.send('session', { clientId, resumeToken, node, addresses, resumed: !!this.auth.clientId });
  }

  signal(address, version, payload = version) {
    this.send('signal', { address, version, id: `${address}/${version}`, ts: Date.now(), payload });
  }

  acks() { return this.sent.filter((x) => x.event === 'ack').map((x) => x.data); }
}

export async function until(f, ms = 2000, what = 'condition') {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
