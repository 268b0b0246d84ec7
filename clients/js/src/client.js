// signalpost-client, the core: one client identity over one main connection (and an optional
// spare) to the nodes in `urls`. It keeps clientId, resumeToken and cursors in `storage`, hands
// each version of an address to the application once and in order, acks after the handler
// returns, fails over across `urls` with backoff and jitter, and refreshes the client token.
//
// Self-contained ESM with no imports, so a browser can load this very file (a node serves it
// at /signalpost-client.js). `io` is options.io or the global `io` of /socket.io.min.js;
// ./index.js (Node) and ./browser.js (bundlers) pass socket.io-client's own. The design and
// the arguments for it: docs/client.md in the signalpost repository.

export const VERSION = '0.1.0';

/** Whether an address is a work address (each message dealt to one client; `ack` = done). */
const isWork = (address) => typeof address === 'string' && address.startsWith('work:');

const DEFAULTS = {
  ackInterval: 50, // ms: one ack per address per interval, with the highest processed version
  holdMs: 3000, // ms a version that skips ahead may wait for the missing ones before a repair
  minDelay: 250, // ms: the first retry after a drop waits 0..minDelay (jitter), then doubles
  maxDelay: 10000, // ms: the longest wait between attempts
  connectTimeout: 10000, // ms for one connection attempt
  refreshBefore: 30000, // ms before the token's exp to fetch a new one (at most half its life)
  requestTimeout: 10000, // ms to wait for the answer to `refresh`, `history`, `read` or `members`
};

// ------------------------------------------------------------------------------------ storage

/** A store in memory: lost with the process (Node default). */
export function memoryStorage() {
  const m = new Map();
  return {
    get: (key) => (m.has(key) ? JSON.parse(m.get(key)) : null),
    set: (key, value) => { m.set(key, JSON.stringify(value)); },
    remove: (key) => { m.delete(key); },
  };
}

/** A store in a Web Storage area: `localStorage` (the browser default) or `sessionStorage`. */
export function webStorage(area = globalThis.localStorage) {
  return {
    get: (key) => {
      try { return JSON.parse(area.getItem(key)); } catch { return null; }
    },
    set: (key, value) => area.setItem(key, JSON.stringify(value)),
    remove: (key) => area.removeItem(key),
  };
}

function defaultStorage() {
  try {
    if (globalThis.localStorage) return webStorage(globalThis.localStorage);
  } catch { /* localStorage refused (e.g. a sandboxed frame): fall back to memory */ }
  return memoryStorage();
}

const ADDRESS = /^(client|channel|presence|work):[A-Za-z0-9._~@+=-]{1,200}$/;

/** The usable part of what a store held: a well-formed identity and cursors, or nothing. */
function cleanState(s) {
  const out = { clientId: null, resumeToken: null, cursors: {} };
  if (!s || typeof s !== 'object') return out;
  if (typeof s.clientId === 'string' && typeof s.resumeToken === 'string') {
    out.clientId = s.clientId;
    out.resumeToken = s.resumeToken;
    for (const [a, v] of Object.entries(s.cursors || {})) {
      if (ADDRESS.test(a) && Number.isSafeInteger(v) && v >= 0) out.cursors[a] = v;
    }
  }
  return out;
}

// -------------------------------------------------------------------------------------- tokens

/** The `exp` of a JWT in ms since the epoch, read without verifying; null if it has none. */
export function tokenExpiry(token) {
  try {
    const part = String(token).split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const exp = JSON.parse(atob(part + '='.repeat((4 - (part.length % 4)) % 4))).exp;
    return typeof exp === 'number' ? exp * 1000 : null;
  } catch {
    return null;
  }
}

/** A connect_error after which the stored identity can never resume again. */
const IDENTITY_GONE = /resume token expired|revoked|invalid resume token/i;
/** A connect_error about the client token. */
const TOKEN_REFUSED = /client token/i;

// -------------------------------------------------------------------------------------- client

/** Connects to a signalpost deployment; see docs/client.md for every option and event. */
export function connect(options) {
  return new SignalpostClient(options);
}

export class SignalpostClient {
  constructor(options = {}) {
    const urls = options.urls;
    if (!Array.isArray(urls) || urls.length === 0 || !urls.every((u) => typeof u === 'string')) {
      throw new TypeError('signalpost-client: options.urls must be a non-empty array of node URLs');
    }
    this._io = options.io || globalThis.io;
    if (typeof this._io !== 'function') {
      throw new TypeError('signalpost-client: no Socket.IO client: pass options.io or load /socket.io.min.js first');
    }
    this._opts = { ...DEFAULTS, ...options, urls: [...urls] };
    this._storage = options.storage || defaultStorage();
    this._key = `signalpost:${options.name || urls[0]}`;
    this._handlers = new Map(); // event → [handler]
    this._ident = { clientId: null, resumeToken: null };
    this._done = new Map(); // address → highest version processed by the app (stored, acked)
    this._seen = new Map(); // address → highest version taken into the queue (dedupe)
    this._held = new Map(); // address → [{lo, hi, item, conn}] that skipped ahead, by lo
    this._queue = []; // what the app gets, in arrival order, one at a time
    this._pumping = false;
    this._acks = new Map(); // address → version to ack at the next tick
    this._timers = new Set();
    this._ackTimer = null;
    this._refreshTimer = null;
    this._main = null;
    this._spare = null;
    this._attempts = { main: 0, spare: 0 };
    this._failedAt = new Map(); // url → when a connection to it last failed
    this._bindings = new Set(); // bound addresses, as the app was told
    this._state = 'offline';
    this._stopped = false;
    this._token = typeof options.token === 'function' ? null : options.token || null;
    this._saving = null;
    this._writing = false;
    this._dirty = false;
    this._seq = 0;
    this._ready = this._load();
    this._ready.then(() => { if (!this._stopped && !this._main) this._open('main'); });
  }

  /** The client id, once known (from storage or the first `session`). */
  get clientId() { return this._ident.clientId; }
  /** `connecting`, `replaying`, `live` or `offline`. */
  get state() { return this._state; }
  /** The node URL of the main connection, if any. */
  get url() { return this._main ? this._main.url : null; }
  /** The last version the application has processed, per address. */
  get cursors() { return Object.fromEntries(this._done); }

  /** Adds a handler; returns a function that removes it. */
  on(event, handler) {
    if (typeof handler !== 'function') throw new TypeError('handler must be a function');
    if (!this._handlers.has(event)) this._handlers.set(event, []);
    this._handlers.get(event).push(handler);
    return () => this.off(event, handler);
  }

  off(event, handler) {
    const list = this._handlers.get(event);
    if (list) this._handlers.set(event, list.filter((h) => h !== handler));
  }

  /** Sends a new client token to every open connection (the server's `refresh`); resolves
   *  with the main connection's answer `{ ok: true, expires }`, rejects with the refusal. */
  async refresh(token) {
    if (typeof this._opts.token !== 'function') this._token = token;
    const conns = [this._main, this._spare].filter((c) => c && c.session && !c.closed);
    const answers = await Promise.all(conns.map((c) => this._request(c, 'refresh', { token }).then((a) => {
      if (a && a.ok) c.token = token;
      return a;
    })));
    this._scheduleRefresh();
    const a = answers[0];
    if (a && !a.ok) throw new Error(a.error || 'refresh refused');
    return a || { ok: true, expires: tokenExpiry(token), pending: true };
  }

  /** Reads an address's history on the main connection (the server's `history`): the messages
   *  stamped in `since..=until` (ms; `limit`, default 100), or the `last` n, oldest first.
   *  Only for an address this client receives. Resolves with the messages; they are not
   *  handed to the `signal` handlers and move no cursor. Rejects with the server's reason. */
  async history(address, { since, until, last, limit } = {}) {
    const req = { address };
    for (const [k, v] of Object.entries({ since, until, last, limit })) if (v !== undefined) req[k] = v;
    const a = await this._ask('history', req);
    if (!a || !Array.isArray(a.messages)) throw new Error((a && a.error) || 'history refused');
    return a.messages;
  }

  /** Marks single messages read (the server's `read`; apart from the ack cursor): `versions`
   *  of an address this client receives, 1–1000 at a time. Resolves with `{ ok, bytes }`,
   *  rejects with the server's reason. */
  async read(address, versions) {
    const a = await this._ask('read', { address, versions: Array.isArray(versions) ? versions : [versions] });
    if (!a || !a.ok) throw new Error((a && a.error) || 'read refused');
    return a;
  }

  /** The members of a presence address this client receives (the server's `members`), by
   *  client id: resolves with `[{ client, user? }]`. Over 10 000 members come a page at a time:
   *  pass `{ after: <last client> }` for the next (the answer of `{ page: true }` calls is
   *  `{ members, truncated }`). Rejects with the server's reason. */
  async members(address, { after, page = false } = {}) {
    const req = { address };
    if (after !== undefined) req.after = after;
    const a = await this._ask('members', req);
    if (!a || !Array.isArray(a.members)) throw new Error((a && a.error) || 'members refused');
    return page ? a : a.members;
  }

  /** A request with an answer on the main connection, once it is connected. */
  async _ask(event, req) {
    await this._ready;
    const conn = this._main;
    if (!conn || !conn.session || conn.closed) throw new Error('not connected');
    return this._request(conn, event, req);
  }

  /** Stops: acks what was processed, closes every connection, keeps the stored identity
   *  (`{ forget: true }` deletes it). `reconnect()` starts again. */
  async close({ forget = false } = {}) {
    this._stopped = true;
    await this._ready;
    this._flushAcks();
    this._stopTimers();
    this._queue = [];
    this._held.clear();
    this._seen = new Map(this._done); // what was queued but not processed comes again
    for (const c of [this._main, this._spare]) if (c) this._shut(c);
    this._main = this._spare = null;
    this._setState('offline', { reason: 'closed' });
    if (forget) {
      this._ident = { clientId: null, resumeToken: null };
      this._done.clear();
      this._seen.clear();
      this._bindings.clear();
      await (this._storage.remove ? this._storage.remove(this._key) : this._storage.set(this._key, null));
    } else {
      await this._save();
    }
  }

  /** Connects again after close() or a kick (or reconnects now), with the stored identity. */
  reconnect() {
    for (const c of [this._main, this._spare]) if (c) this._shut(c);
    this._main = this._spare = null;
    this._stopTimers();
    this._stopped = false;
    this._attempts = { main: 0, spare: 0 };
    this._ready.then(() => { if (!this._stopped && !this._main) this._open('main'); });
  }

  // ------------------------------------------------------------------------------ connections

  async _load() {
    let s = null;
    try { s = await this._storage.get(this._key); } catch (e) { this._error(e); }
    const c = cleanState(s);
    this._ident = { clientId: c.clientId, resumeToken: c.resumeToken };
    for (const [a, v] of Object.entries(c.cursors)) { this._done.set(a, v); this._seen.set(a, v); }
  }

  /** Opens the main or the spare connection to the next URL. */
  async _open(role) {
    const conn = { id: ++this._seq, url: this._pickUrl(role), socket: null, session: null, synced: false, closed: false, view: new Map(), token: null };
    this[`_${role}`] = conn;
    if (role === 'main') this._setState('connecting', { url: conn.url });
    let token = this._token;
    if (typeof this._opts.token === 'function') {
      try {
        token = await this._opts.token();
      } catch (e) {
        this._error(e);
        return this._lost(conn, 'token callback failed');
      }
    }
    if (conn.closed) return;
    conn.token = token;
    const auth = {};
    if (token) auth.token = token;
    if (this._ident.clientId) {
      auth.clientId = this._ident.clientId;
      auth.resumeToken = this._ident.resumeToken;
      auth.cursors = Object.fromEntries(this._seen);
    }
    const socket = this._io(conn.url, {
      ...this._opts.socketOptions,
      auth,
      reconnection: false,
      forceNew: true,
      timeout: this._opts.connectTimeout,
    });
    conn.socket = socket;
    const on = (event, f) => socket.on(event, (data) => { if (!conn.closed) f(data); });
    on('connect_error', (err) => this._onConnectError(conn, err));
    on('disconnect', (reason) => this._lost(conn, reason));
    on('session', (s) => this._onSession(conn, s));
    on('signal', (m) => {
      // A work address deals each message to one client: no order across versions, no cursor.
      if (isWork(m.address)) return this._push({ kind: 'signal', data: m, app: true, conn, address: m.address, version: m.version, work: true });
      this._offer(conn, m.address, m.version, m.version, { kind: 'signal', data: m });
    });
    on('gap', (g) => this._offer(conn, g.address, g.from, g.to, { kind: 'gap', data: g }));
    on('bound', (b) => this._onBound(conn, b));
    on('unbound', (b) => this._onUnbound(conn, b));
    on('synced', (s) => this._onSynced(conn, s));
    on('kicked', (k) => this._onKicked(conn, k));
    on('resumeToken', (r) => { if (r && r.resumeToken) { this._ident.resumeToken = r.resumeToken; this._save(); } });
    on('error', (e) => this._error(new Error(e && e.message ? e.message : String(e))));
    for (const ev of ['joined', 'left']) on(ev, (d) => { if (conn === this._main) this._push({ kind: ev, data: d, app: true }); });
  }

  /** Main: the least recently failed URL, in the order given. Spare: the same, but never the main's. */
  _pickUrl(role) {
    const avoid = role === 'spare' && this._main ? this._main.url : null;
    const urls = this._opts.urls.filter((u) => u !== avoid);
    const list = urls.length ? urls : this._opts.urls;
    return list.reduce((best, u) => ((this._failedAt.get(u) || 0) < (this._failedAt.get(best) || 0) ? u : best), list[0]);
  }

  _delay(role) {
    const n = this._attempts[role]++;
    const base = Math.min(this._opts.maxDelay, this._opts.minDelay * 2 ** n);
    return n === 0 ? Math.random() * base : base / 2 + (Math.random() * base) / 2;
  }

  _later(ms, f) {
    const t = setTimeout(() => { this._timers.delete(t); f(); }, ms);
    this._timers.add(t);
    return t;
  }

  _stopTimers() {
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    this._ackTimer = this._refreshTimer = null;
  }

  /** Closes a connection on purpose: its events are ignored from now on. */
  _shut(conn) {
    conn.closed = true;
    if (conn.socket) conn.socket.close();
  }

  _onConnectError(conn, err) {
    const message = err && err.message ? err.message : String(err);
    const e = new Error(`${conn.url}: ${message}`);
    e.url = conn.url;
    e.cause = err;
    this._error(e);
    if (conn === this._main && this._ident.clientId && IDENTITY_GONE.test(message)) {
      this._shut(conn);
      this._main = null;
      this._forgetIdentity(message);
      return this._open('main');
    }
    if (TOKEN_REFUSED.test(message) && typeof this._opts.token !== 'function') {
      // A fixed token the node refuses will be refused again: wait for refresh() or reconnect().
      this._shut(conn);
      if (conn === this._main) {
        this._main = null;
        if (this._spare) this._shut(this._spare);
        this._spare = null;
        this._setState('offline', { reason: message });
      } else {
        this._spare = null;
      }
      return;
    }
    this._lost(conn, message);
  }

  /** The stored identity can no longer resume: start again as a new client. */
  _forgetIdentity(reason) {
    if (this._spare) this._shut(this._spare);
    this._spare = null;
    this._ident = { clientId: null, resumeToken: null };
    this._done.clear();
    this._seen.clear();
    this._held.clear();
    this._acks.clear();
    this._bindings.clear();
    this._save();
    this._push({ kind: 'reset', data: { reason }, app: true });
  }

  /** A connection ended (or never opened): promote the spare, or try again after a while. */
  _lost(conn, reason) {
    if (conn.closed) return;
    this._shut(conn);
    if (reason !== 'io client disconnect') this._failedAt.set(conn.url, Date.now());
    if (conn === this._spare) {
      this._spare = null;
      if (!this._stopped) this._later(this._delay('spare'), () => this._openSpare());
      return;
    }
    if (conn !== this._main) return;
    this._main = null;
    if (this._stopped) return this._setState('offline', { reason });
    const spare = this._spare;
    if (spare) {
      // Promotion: the spare is already connected (or connecting) with the same identity
      // and has been receiving the same messages; it simply becomes the main connection.
      this._spare = null;
      this._main = spare;
      this._attempts.spare = 0;
      if (spare.session) this._becomeMain(spare, true);
      else this._setState('connecting', { url: spare.url, reason });
      this._later(this._delay('spare'), () => this._openSpare());
      return;
    }
    this._setState('offline', { reason });
    this._later(this._delay('main'), () => { if (!this._stopped && !this._main) this._open('main'); });
  }

  _openSpare() {
    if (this._stopped || this._spare || !this._opts.spare || this._opts.urls.length < 2) return;
    if (!this._main || !this._main.synced || !this._ident.clientId) return; // opened again at synced
    this._open('spare');
  }

  // ------------------------------------------------------------------------------ server events

  _onSession(conn, s) {
    if (this._ident.clientId && s.clientId !== this._ident.clientId) {
      if (conn !== this._main) return this._lost(conn, 'the spare got another identity');
      this._forgetIdentity('the node started a new client');
    }
    this._ident = { clientId: s.clientId, resumeToken: s.resumeToken };
    this._save();
    conn.session = s;
    // What this connection receives: address → the head it was bound at, when it says so.
    conn.view = new Map([...(s.addresses || []), `client:${s.clientId}`].map((a) => [a, null]));
    if (conn === this._main) return this._becomeMain(conn, false);
    if (this._main && this._main.session && this._main.session.node === s.node) {
      this._failedAt.set(conn.url, Date.now()); // the same node as the main: useless as a spare
      return this._lost(conn, 'the spare reached the main node');
    }
    this._scheduleRefresh();
  }

  /** `conn` is the main connection now and has a session: tell the app, bring acks over. */
  _becomeMain(conn, promoted) {
    const s = conn.session;
    const bindings = s.addresses ? new Set(s.addresses) : new Set();
    if (promoted) {
      // What the promoted connection knows beats what the old main had told the app.
      for (const a of conn.view.keys()) if (!a.startsWith('client:')) bindings.add(a);
      for (const a of [...bindings]) if (!conn.view.has(a)) bindings.delete(a);
    }
    this._push({ kind: 'session', data: { ...s, ...(promoted ? { promoted: true } : {}) }, app: true, conn });
    if (promoted) {
      const tell = (kind, a) => this._push({ kind, data: { address: a, version: conn.view.get(a) ?? this._seen.get(a) ?? 0 }, app: true, conn, address: a });
      for (const a of bindings) if (!this._bindings.has(a)) tell('bound', a);
      for (const a of this._bindings) if (!bindings.has(a)) tell('unbound', a);
    }
    this._bindings = bindings;
    this._setState(conn.synced ? 'live' : 'replaying', { url: conn.url, node: s.node, promoted });
    this._flushAcks();
    this._scheduleRefresh();
  }

  /** A signal (lo = hi = version) or a gap (lo..hi) from one connection. */
  _offer(conn, address, lo, hi, item) {
    const c = this._seen.get(address);
    if (c !== undefined && hi <= c) return; // already taken (from the other connection)
    if (c !== undefined && lo > c + 1) return this._hold(conn, address, lo, hi, item);
    if (item.kind === 'gap' && c !== undefined && lo <= c) item = { ...item, data: { ...item.data, from: c + 1 } };
    this._seen.set(address, hi);
    this._push({ ...item, app: true, conn, address, version: hi });
    this._release(address);
  }

  /** A version that skips ahead waits for the ones before it; if they do not come in time,
   *  the connection that sent it is dropped, and its resume replays from the cursor. */
  _hold(conn, address, lo, hi, item) {
    if (!this._held.has(address)) this._held.set(address, []);
    const held = this._held.get(address);
    held.push({ lo, hi, item, conn });
    held.sort((x, y) => x.lo - y.lo);
    if (held.length === 1) {
      this._later(this._opts.holdMs, () => {
        const still = this._held.get(address);
        if (!still || !still.length) return;
        this._held.delete(address);
        this._error(new Error(`${address}: version ${still[0].lo} came before ${(this._seen.get(address) || 0) + 1} without a gap; resuming to repair`));
        for (const x of new Set(still.map((h) => h.conn))) this._lost(x, 'repair');
      });
    }
  }

  _release(address) {
    const held = this._held.get(address);
    while (held && held.length && held[0].lo <= (this._seen.get(address) || 0) + 1) {
      const h = held.shift();
      this._offer(h.conn, address, h.lo, h.hi, h.item);
    }
    if (held && !held.length) this._held.delete(address);
  }

  _onBound(conn, b) {
    // (A work address has no cursor to start.)
    const fresh = !conn.view.has(b.address) && !isWork(b.address);
    conn.view.set(b.address, b.version);
    if (fresh) {
      // Nothing at or before the binding's head will come for this binding.
      const c = this._seen.get(b.address);
      if (c === undefined || c < b.version) this._seen.set(b.address, b.version);
      this._release(b.address);
    }
    const app = conn === this._main && !this._bindings.has(b.address);
    if (app) this._bindings.add(b.address);
    this._push({ kind: 'bound', data: b, app, fresh, conn, address: b.address, version: b.version });
  }

  _onUnbound(conn, b) {
    conn.view.delete(b.address);
    const app = conn === this._main && this._bindings.has(b.address);
    if (app) this._bindings.delete(b.address);
    this._push({ kind: 'unbound', data: b, app, conn, address: b.address });
  }

  _onSynced(conn, s) {
    conn.synced = true;
    const cursors = (s && s.cursors) || {};
    for (const [a, v] of Object.entries(cursors)) if (!this._seen.has(a)) this._seen.set(a, v);
    if (conn === this._main) this._push({ kind: 'synced', data: { cursors }, app: true, conn });
    else this._attempts.spare = 0;
  }

  _onKicked(conn, k) {
    // A kick that is not the client's doing (`reconnect: true`: the node rejoined its cluster)
    // is a lost connection: connect again, as after any other.
    if (k && k.reconnect) return this._lost(conn, `kicked: ${k.reason}`);
    // After other kicks nothing reconnects by itself: a quota or a revocation would only kick again.
    this._stopped = true;
    this._stopTimers();
    this._flushAcks();
    for (const c of [this._main, this._spare]) if (c) this._shut(c);
    this._main = this._spare = null;
    this._setState('offline', { reason: 'kicked', kicked: k && k.reason });
    this._push({ kind: 'kicked', data: k, app: true, conn });
  }

  // ----------------------------------------------------------------------- handing to the app

  _push(item) {
    if (item.conn) item.info = { replay: !item.conn.synced, url: item.conn.url };
    this._queue.push(item);
    if (!this._pumping) this._pump();
  }

  async _pump() {
    this._pumping = true;
    while (this._queue.length) {
      const it = this._queue.shift();
      if (it.app) await this._dispatch(it.kind, it.data, it.info);
      this._after(it);
    }
    this._pumping = false;
  }

  async _dispatch(event, data, info) {
    for (const h of this._handlers.get(event) || []) {
      try {
        const r = h(data, info);
        if (r && typeof r.then === 'function') await r;
      } catch (e) {
        if (event === 'error') continue;
        this._error(e); // the handler's own failure; the event counts as handled
      }
    }
  }

  /** What follows the app's handling of an event: cursors, acks, state. */
  _after(it) {
    switch (it.kind) {
      case 'signal':
        if (it.work) {
          // Done once the handler returned: acked at once, each version on its own.
          const c = it.conn && !it.conn.closed ? it.conn : this._main;
          if (c && c.socket && !this._stopped) c.socket.emit('ack', { address: it.address, version: it.version });
          break;
        }
      // falls through
      case 'gap':
        this._advance(it.address, it.version);
        if (!this._stopped) {
          this._acks.set(it.address, this._done.get(it.address));
          if (!this._ackTimer) this._ackTimer = this._later(this._opts.ackInterval, () => { this._ackTimer = null; this._flushAcks(); });
        }
        this._save();
        break;
      case 'bound':
        if (it.fresh) this._advance(it.address, it.version);
        this._save();
        break;
      case 'unbound':
        if (!this._viewed(it.address)) {
          // No connection receives it any more: forget its cursor (a later binding starts anew).
          this._done.delete(it.address);
          this._seen.delete(it.address);
          this._acks.delete(it.address);
          this._save();
        }
        break;
      case 'synced':
        for (const [a, v] of Object.entries(it.data.cursors)) if (!this._done.has(a)) this._done.set(a, v);
        for (const a of [...this._done.keys()]) if (!this._viewed(a)) { this._done.delete(a); this._seen.delete(a); }
        this._save();
        if (it.conn === this._main && !it.conn.closed) {
          this._attempts.main = 0;
          this._setState('live', { url: it.conn.url, node: it.conn.session && it.conn.session.node });
          this._openSpare();
        }
        break;
      default:
    }
  }

  /** The app has processed `address` up to `version` (and so it must never come again). */
  _advance(address, version) {
    if (!(this._done.get(address) >= version)) this._done.set(address, version);
    if (!(this._seen.get(address) >= version)) this._seen.set(address, version);
  }

  _viewed(address) {
    return [this._main, this._spare].some((c) => c && !c.closed && c.view.has(address));
  }

  _flushAcks() {
    const main = this._main;
    if (!main || !main.session || main.closed || !this._acks.size) return;
    for (const [address, version] of this._acks) main.socket.emit('ack', { address, version });
    this._acks.clear();
  }

  /** Writes identity and cursors. A synchronous store (localStorage) is written before this
   *  returns; writes asked for while an asynchronous one is under way are coalesced. */
  _save() {
    this._dirty = true;
    if (this._writing) return this._saving;
    this._writing = true;
    this._saving = (async () => {
      try {
        while (this._dirty) {
          this._dirty = false;
          const state = { clientId: this._ident.clientId, resumeToken: this._ident.resumeToken, cursors: Object.fromEntries(this._done) };
          try {
            const r = this._storage.set(this._key, state);
            if (r && typeof r.then === 'function') await r;
          } catch (e) {
            this._error(e);
          }
        }
      } finally {
        this._writing = false;
      }
    })();
    return this._saving;
  }

  _setState(state, info = {}) {
    if (state === this._state && !info.promoted) return;
    this._state = state;
    this._dispatch('state', state, info);
  }

  _error(e) {
    this._dispatch('error', e);
  }

  // --------------------------------------------------------------------------------- requests

  _request(conn, event, data) {
    return new Promise((resolve) => {
      const t = setTimeout(() => resolve({ ok: false, error: `no answer to ${event} within ${this._opts.requestTimeout} ms` }), this._opts.requestTimeout);
      conn.socket.emit(event, data, (answer) => { clearTimeout(t); resolve(answer); });
    });
  }

  /** With a token callback: fetch a new token and send `refresh` shortly before `exp`. */
  _scheduleRefresh() {
    if (typeof this._opts.token !== 'function') return;
    if (this._refreshTimer) { clearTimeout(this._refreshTimer); this._timers.delete(this._refreshTimer); }
    const exps = [this._main, this._spare].filter((c) => c && c.session && !c.closed).map((c) => tokenExpiry(c.token)).filter(Boolean);
    if (!exps.length) return;
    const left = Math.min(...exps) - Date.now();
    const wait = Math.max(0, left - Math.min(this._opts.refreshBefore, left / 2));
    this._refreshTimer = this._later(wait, async () => {
      this._refreshTimer = null;
      try {
        await this.refresh(await this._opts.token());
      } catch (e) {
        this._error(e);
        if (!this._stopped) this._refreshTimer = this._later(Math.min(5000, Math.max(500, left / 4)), () => this._scheduleRefresh());
      }
    });
  }
}
