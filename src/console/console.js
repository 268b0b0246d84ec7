// The signalpost console: cluster view, a live client to try the product, and look-ups.
// A browser module, no build step: the client is the project's library (/signalpost-client.js,
// clients/js/src/client.js), which uses the Socket.IO client of /socket.io.min.js (`io`).
import { connect, webStorage } from '/signalpost-client.js';

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = 'signalpost.apiKey';
  const FEED_CAP = 200;
  const POLL_MS = 2000;

  /** Builds an element; children are nodes or strings (always inserted as text, never as HTML). */
  function el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  const pill = (text, kind = '') => el('span', { class: `pill ${kind}`, text });
  const json = (v) => JSON.stringify(v);
  const clock = (ms) => {
    const d = ms ? new Date(ms) : new Date();
    return d.toTimeString().slice(0, 8);
  };
  function setMsg(id, text, kind = '') {
    const m = $(id);
    m.textContent = text || '';
    m.className = `msg ${kind}`;
  }

  // ---------------------------------------------------------------- HTTP and the API key

  const apiKey = {
    get: () => sessionStorage.getItem(KEY_STORE) || '',
    set: (k) => (k ? sessionStorage.setItem(KEY_STORE, k) : sessionStorage.removeItem(KEY_STORE)),
  };

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function askForKey(reason) {
    const panel = $('apikey-panel');
    $('apikey-reason').textContent = reason;
    const wasHidden = panel.hidden;
    panel.hidden = false;
    if (wasHidden) $('apikey-input').focus();
  }

  /** Calls the server API. The key goes only into the Authorization header. */
  async function api(method, path, body) {
    const headers = { accept: 'application/json' };
    if (body !== undefined) headers['content-type'] = 'application/json';
    const key = apiKey.get();
    if (key) headers.authorization = `Bearer ${key}`;
    let res;
    try {
      res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: 'no-store' });
    } catch (e) {
      throw new ApiError(0, `the node did not answer (${e.message})`);
    }
    const text = await res.text();
    let parsed = text;
    try { parsed = JSON.parse(text); } catch { /* not JSON */ }
    if (res.status === 401) {
      askForKey(key
        ? 'The API key was rejected (401). Enter the right key for this deployment.'
        : 'This deployment protects /server/* with an API key (401). Enter it to use the console.');
      throw new ApiError(401, parsed && parsed.error ? `${parsed.error} — enter the API key above` : 'API key required — enter it above');
    }
    if (!res.ok) {
      const reason = parsed && typeof parsed === 'object' && parsed.error ? parsed.error : (text || res.statusText);
      throw new ApiError(res.status, `${res.status}: ${reason}`);
    }
    return parsed;
  }

  $('apikey-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const k = $('apikey-input').value.trim();
    if (!k) { $('apikey-reason').textContent = 'Enter a key first.'; return; }
    apiKey.set(k);
    $('apikey-input').value = '';
    $('apikey-panel').hidden = true;
    refreshCluster();
  });
  $('apikey-clear').addEventListener('click', () => {
    apiKey.set('');
    $('apikey-input').value = '';
    askForKey('No API key is stored in this tab. Enter one if the deployment needs it.');
  });
  $('apikey-open').addEventListener('click', () => {
    const panel = $('apikey-panel');
    if (!panel.hidden) { panel.hidden = true; return; }
    askForKey(apiKey.get()
      ? 'An API key is stored in this tab. Enter a new one to replace it, or forget it.'
      : 'No API key is stored in this tab. Enter one if the deployment needs it.');
  });

  // ---------------------------------------------------------------- Cluster

  let lastSample = null; // { t, appends, deliveries }

  /** Sums every sample of a counter in Prometheus text (with or without labels). */
  function counter(text, name) {
    let sum = 0;
    let seen = false;
    for (const line of text.split('\n')) {
      if (!line.startsWith(name)) continue;
      const rest = line.slice(name.length);
      if (rest[0] !== ' ' && rest[0] !== '{') continue;
      const value = Number(rest.slice(rest[0] === '{' ? rest.indexOf('}') + 1 : 0).trim().split(/\s+/)[0]);
      if (Number.isFinite(value)) { sum += value; seen = true; }
    }
    return seen ? sum : null;
  }

  function showRate(id, now, before, dt) {
    const out = $(id);
    if (now === null) { out.textContent = 'n/a'; return; }
    if (before === null || before === undefined || !(dt > 0)) { out.replaceChildren(el('span', { class: 'wait', text: 'measuring…' })); return; }
    const rate = Math.max(0, now - before) / dt;
    out.replaceChildren(rate >= 100 ? rate.toFixed(0) : rate.toFixed(1), el('small', { text: `  ${now} total` }));
    out.dataset.rate = String(rate);
  }

  async function refreshHealth() {
    try {
      const res = await fetch('/healthz', { cache: 'no-store' });
      const h = await res.json();
      const kind = h.status === 'ok' ? 'ok' : h.status === 'draining' ? 'warn' : 'bad';
      $('health-status').replaceChildren(pill(h.status, kind));
      $('header-health').className = `pill ${kind}`;
      $('header-health').textContent = h.status;
      $('header-node').textContent = `node ${h.node}`;
      $('connections').textContent = String(h.connections ?? '–');
      $('backend-name').textContent = h.backend ? `(${h.backend})` : '';
      const list = Object.entries(h.backends || {}).map(([name, b]) =>
        el('div', { class: 'backend', 'data-testid': 'backend', 'data-name': name, 'data-status': b.status },
          el('span', { class: 'name', text: name }),
          el('span', { class: 'kind', text: b.kind || '' }),
          pill(b.status, b.status === 'up' ? 'ok' : 'bad'),
          b.error ? el('span', { class: 'err', text: b.error }) : null));
      $('backends').replaceChildren(...(list.length ? list : [el('span', { class: 'muted', text: 'no backends reported' })]));
    } catch (e) {
      $('health-status').replaceChildren(pill('unreachable', 'bad'));
      $('header-health').className = 'pill bad';
      $('header-health').textContent = 'unreachable';
    }
  }

  async function refreshMetrics() {
    try {
      const res = await fetch('/metrics', { cache: 'no-store' });
      const text = await res.text();
      const t = performance.now();
      const sample = { t, appends: counter(text, 'signalpost_appends_total'), deliveries: counter(text, 'signalpost_deliveries_total') };
      const dt = lastSample ? (t - lastSample.t) / 1000 : 0;
      showRate('rate-appends', sample.appends, lastSample?.appends, dt);
      showRate('rate-deliveries', sample.deliveries, lastSample?.deliveries, dt);
      lastSample = sample;
    } catch {
      $('rate-appends').textContent = 'n/a';
      $('rate-deliveries').textContent = 'n/a';
    }
  }

  /** A node's /healthz body, or null when it does not answer within 1.5 s. */
  async function nodeHealth(url) {
    if (!url) return null;
    try {
      const r = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(1500) });
      return await r.json();
    } catch {
      return null;
    }
  }

  async function refreshNodes() {
    try {
      const n = await api('GET', '/server/nodes');
      setMsg('nodes-error', '');
      $('node-count').textContent = String(n.nodes.length);
      // Each node's own /healthz (served with CORS) gives its connections and health.
      const healths = await Promise.all(n.nodes.map((node) => nodeHealth(node.url)));
      const rows = n.nodes.map((node, i) => el('tr', { 'data-testid': 'node-row', 'data-node': node.id, 'data-leader': String(!!node.leader) },
        el('td', { class: 'mono' }, node.id, node.id === n.self ? ' ' : '', node.id === n.self ? pill('this node', 'muted') : null),
        el('td', { class: 'mono' }, node.url ? el('a', { href: node.url, text: node.url }) : '–'),
        el('td', {}, node.leader ? pill('leader', 'ok') : pill('follower', 'muted')),
        el('td', { class: 'mono', 'data-testid': 'node-connections', text: healths[i] ? String(healths[i].connections) : '–' }),
        el('td', {}, healths[i] ? pill(healths[i].status, healths[i].status === 'ok' ? 'ok' : 'bad') : pill('no answer', 'bad'))));
      $('nodes').replaceChildren(...(rows.length ? rows : [el('tr', {}, el('td', { colspan: 5, class: 'muted', text: 'no live nodes' }))]));
    } catch (e) {
      setMsg('nodes-error', e.message, 'error');
      $('node-count').textContent = '?';
      if (e.status === 401) $('nodes').replaceChildren(el('tr', {}, el('td', { colspan: 5, class: 'muted', text: 'needs the API key' })));
    }
  }

  let refreshing = false;
  async function refreshCluster() {
    if (refreshing) return;
    refreshing = true;
    try {
      await Promise.all([refreshHealth(), refreshMetrics(), refreshNodes()]);
      $('cluster-updated').textContent = `updated ${clock()}`;
    } finally {
      refreshing = false;
    }
  }

  // ---------------------------------------------------------------- Try it: a signalpost client
  // The page is a client of its node through the project's client library (signalpost-client):
  // identity and cursors per tab in sessionStorage, so a reload resumes; acks after each row.

  const client = connect({ urls: [location.origin], storage: webStorage(sessionStorage), name: 'console' });
  let bindings = [];
  let connNo = 0; // counts sessions, so the feed can tell this connection's events from earlier ones
  let closing = false; // the Disconnect button was pressed

  function setState(text, kind) {
    const s = $('conn-state');
    s.textContent = text;
    s.className = `pill ${kind}`;
    s.dataset.state = text;
    $('disconnect-button').disabled = text === 'disconnected';
  }

  function renderIdentity() {
    const clientId = client.clientId;
    $('client-id').textContent = clientId || '–';
    $('client-id').title = clientId || '–';
    $('own-address').textContent = clientId ? `client:${clientId}` : '–';
    const chips = [];
    if (clientId) chips.push(el('span', { class: 'chip own', title: 'always received', text: `client:${clientId}` }));
    for (const a of bindings) {
      chips.push(el('span', { class: 'chip', 'data-testid': 'binding', 'data-address': a }, a,
        el('button', { type: 'button', title: `unbind ${a}`, 'aria-label': `unbind ${a}`, onclick: () => unbind(a), text: '×' })));
    }
    $('bindings').replaceChildren(...chips);
    const options = [clientId ? `client:${clientId}` : null, ...bindings].filter(Boolean);
    $('target-list').replaceChildren(...options.map((a) => el('option', { value: a })));
  }

  // The feed: newest on top, capped.
  function addRow(kind, { address, version, id, text, replay, ts } = {}) {
    const feed = $('feed');
    $('feed-empty')?.remove();
    const line1 = el('div', { class: 'line1' });
    if (address) line1.append(el('span', { class: 'addr', text: address }));
    if (version !== undefined) line1.append(el('span', { class: 'ver', text: `v${version}` }));
    if (id) line1.append(el('span', { class: 'id', title: id, text: `id ${id}` }));
    if (replay) line1.append(el('span', { class: 'tag', text: 'replay' }));
    const li = el('li', {
      'data-testid': 'feed-row', 'data-kind': kind, 'data-address': address, 'data-version': version,
      'data-conn': String(connNo), 'data-replay': String(!!replay),
    },
    el('span', { class: 'time', text: clock(ts) }),
    el('span', { class: `pill kind k-${kind}`, text: kind }),
    el('div', { class: 'body' }, line1.childNodes.length ? line1 : null, text !== undefined ? el('div', { class: 'payload', text }) : null));
    feed.prepend(li);
    while (feed.children.length > FEED_CAP) feed.lastElementChild.remove();
  }
  $('feed-clear').addEventListener('click', () => $('feed').replaceChildren(el('li', { class: 'empty', id: 'feed-empty', text: 'nothing yet' })));

  const STATES = { connecting: 'warn', replaying: 'warn', live: 'ok', offline: 'bad' };
  client.on('state', (state, info = {}) => {
    if (state === 'replaying') setMsg('conn-error', '');
    if (state === 'offline' && !closing && info.reason && !info.kicked) {
      addRow('state', { text: `disconnected: ${info.reason}` });
      setMsg('conn-error', `connection lost (${info.reason}); reconnecting…`, 'error');
    }
    const text = { connecting: connNo ? 'reconnecting' : 'connecting', replaying: 'connected, replaying', live: 'live', offline: 'disconnected' }[state];
    setState(text, STATES[state]);
  });
  client.on('session', (s) => {
    connNo += 1;
    closing = false;
    bindings = [...(s.addresses || [])];
    $('socket-node').textContent = s.node || '–';
    renderIdentity();
    const how = s.promoted ? 'went on over the spare connection' : s.resumed ? 'resumed' : 'new client';
    addRow('session', { text: `${how} ${s.clientId} on ${s.node}${s.addresses?.length ? `, bound to ${s.addresses.join(', ')}` : ''}` });
  });
  client.on('signal', (m, info) => {
    addRow('signal', { address: m.address, version: m.version, id: m.id, text: json(m.payload), replay: info.replay, ts: m.ts });
  });
  client.on('gap', (g) => addRow('gap', { address: g.address, text: `versions ${g.from}–${g.to} expired before they could be delivered` }));
  client.on('bound', (b) => {
    if (!bindings.includes(b.address)) bindings.push(b.address);
    renderIdentity();
    addRow('bound', { address: b.address, version: b.version, text: `bound at head v${b.version}; what follows arrives live` });
  });
  client.on('unbound', (b) => {
    bindings = bindings.filter((a) => a !== b.address);
    renderIdentity();
    addRow('unbound', { address: b.address, version: b.version, text: `unbound at v${b.version}` });
  });
  client.on('synced', (s) => addRow('synced', { text: `synced ${json(s.cursors || {})}` }));
  for (const kind of ['joined', 'left']) {
    client.on(kind, (m) => addRow(kind, {
      address: m.address,
      text: `${m.client === client.clientId ? 'this client' : m.client}${m.user ? ` (user ${m.user})` : ''} ${kind === 'joined' ? 'became a member' : 'is no longer a member'}`,
    }));
  }
  client.on('kicked', (k) => {
    addRow('error', { text: `kicked: ${k.reason} — press Reconnect to connect again` });
    setMsg('conn-error', `kicked by the server: ${k.reason}`, 'error');
  });
  client.on('reset', (r) => {
    addRow('error', { text: `refused: ${r.reason} — starting as a new client` });
    bindings = [];
    renderIdentity();
  });
  client.on('error', (e) => {
    addRow('error', { text: e.message });
    if (e.url) setMsg('conn-error', `connect error: ${e.message}`, 'error');
  });

  $('disconnect-button').addEventListener('click', () => {
    closing = true;
    client.close();
    addRow('state', { text: 'disconnected (Disconnect pressed)' });
    setMsg('conn-error', '');
  });
  // Resumes with the clientId, resumeToken and cursors kept in sessionStorage.
  $('reconnect-button').addEventListener('click', () => client.reconnect());
  $('forget-button').addEventListener('click', async () => {
    closing = true;
    await client.close({ forget: true });
    bindings = [];
    renderIdentity();
    client.reconnect();
  });

  // Bind / unbind
  function channelOf(v) {
    v = v.trim();
    return v.includes(':') ? v : `channel:${v}`;
  }
  $('bind-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const address = channelOf($('channel-input').value);
    if (!client.clientId) { setMsg('bind-result', 'not connected yet: no clientId', 'error'); return; }
    setMsg('bind-result', `binding ${address}…`);
    try {
      const r = await api('POST', '/server/connect', { client: client.clientId, addresses: [address] });
      const b = (r.bound || []).find((x) => x.address === address);
      setMsg('bind-result', b ? `bound ${address} at version ${b.version}` : `bound ${address}`, 'ok');
      if (!bindings.includes(address)) { bindings.push(address); renderIdentity(); }
      $('target-input').value = address;
    } catch (e) {
      setMsg('bind-result', e.message, 'error');
    }
  });
  async function unbind(address) {
    try {
      await api('POST', '/server/disconnect', { client: client.clientId, addresses: [address] });
      setMsg('bind-result', `unbound ${address}`, 'ok');
    } catch (e) {
      setMsg('bind-result', e.message, 'error');
    }
  }

  // Send
  function parsePayload() {
    const text = $('payload-input').value;
    try {
      const v = JSON.parse(text);
      $('payload-input').classList.remove('invalid');
      setMsg('payload-error', '');
      return { ok: true, value: v };
    } catch (e) {
      $('payload-input').classList.add('invalid');
      setMsg('payload-error', `payload is not valid JSON: ${e.message}`, 'error');
      return { ok: false };
    }
  }
  $('payload-input').addEventListener('input', () => {
    if ($('payload-input').classList.contains('invalid')) parsePayload();
  });
  $('target-me').addEventListener('click', () => {
    if (client.clientId) $('target-input').value = `client:${client.clientId}`;
  });
  $('send-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const p = parsePayload();
    if (!p.ok) { setMsg('send-result', ''); return; }
    const address = $('target-input').value.trim();
    if (!address) { setMsg('send-result', 'enter a target address', 'error'); return; }
    setMsg('send-result', 'sending…');
    try {
      const r = await api('POST', '/server/enqueue?wait=true', { address, payload: p.value });
      setMsg('send-result', `appended to ${r.address} as version ${r.version} (id ${r.id})`, 'ok');
    } catch (e) {
      setMsg('send-result', e.message, 'error');
    }
  });

  // ---------------------------------------------------------------- Look up

  function kv(pairs) {
    return el('div', { class: 'kv' }, pairs.flatMap(([k, v, tid]) => [
      el('span', { class: 'k', text: k }),
      el('span', { class: 'v', 'data-testid': tid }, v instanceof Node ? v : String(v)),
    ]));
  }

  $('mailbox-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const address = $('lookup-address').value.trim();
    setMsg('mailbox-error', '');
    $('mailbox-result').replaceChildren();
    if (!address) { setMsg('mailbox-error', 'enter an address', 'error'); return; }
    const path = `/server/mailbox/${encodeURIComponent(address)}`;
    const within = Number($('lookup-range').value);
    try {
      let page;
      let showing;
      if (within) {
        // History by time: the first 100 appended since then (the node pages by `ts`).
        const since = Date.now() - within;
        page = await api('GET', `${path}?since=${since}&limit=100`);
        showing = `${page.messages.length} appended since ${clock(since)}`;
      } else {
        page = await api('GET', `${path}?after=0&limit=1`);
        if (page.head > 1) page = await api('GET', `${path}?after=${Math.max(0, page.head - 20)}&limit=20`);
        showing = `${page.messages.length} latest`;
      }
      const msgs = [...page.messages].reverse();
      const range = msgs.length ? `v${msgs[msgs.length - 1].version}–v${msgs[0].version}` : 'none';
      // A presence address: its members too (the connected clients bound to it).
      let members = null;
      if (address.startsWith('presence:')) {
        const p = await api('GET', `/server/presence/${encodeURIComponent(address)}`);
        members = [
          el('h3', { text: `members (${p.members.length}${p.truncated ? '+' : ''})` }),
          p.members.length
            ? el('ul', { class: 'members', 'data-testid': 'mailbox-members' }, p.members.map((m) => el('li', {
              class: 'mono', 'data-testid': 'mailbox-member', 'data-client': m.client,
              text: `${m.client}${m.user ? ` (user ${m.user})` : ''}${m.client === client.clientId ? ' — this page' : ''}`,
            })))
            : el('div', { class: 'muted', text: 'nobody connected is bound to it' }),
        ];
      }
      $('mailbox-result').replaceChildren(
        kv([['address', page.address, 'mailbox-address'], ['head', page.head, 'mailbox-head'],
          ['low', page.low ?? '–', 'mailbox-low'], ['showing', `${showing} (${range})`, 'mailbox-showing']]),
        msgs.length
          ? el('table', {},
            el('thead', {}, el('tr', {}, el('th', { text: 'version' }), el('th', { text: 'time' }), el('th', { text: 'id' }), el('th', { text: 'payload' }))),
            el('tbody', {}, msgs.map((m) => el('tr', { 'data-testid': 'mailbox-row', 'data-version': m.version },
              el('td', { class: 'mono', text: m.version }),
              el('td', { class: 'mono', text: clock(m.ts) }),
              el('td', { class: 'mono', title: m.id, text: m.id.length > 14 ? `${m.id.slice(0, 13)}…` : m.id }),
              el('td', { class: 'payload', text: json(m.payload) })))))
          : el('div', { class: 'muted', text: 'no messages kept at this address' }),
        ...(members || []));
    } catch (e) {
      setMsg('mailbox-error', e.message, 'error');
    }
  });

  $('lookup-me').addEventListener('click', () => {
    if (client.clientId) $('lookup-client').value = client.clientId;
  });
  $('client-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const id = $('lookup-client').value.trim();
    setMsg('client-error', '');
    $('client-result').replaceChildren();
    if (!id) { setMsg('client-error', 'enter a client id', 'error'); return; }
    try {
      const c = await api('GET', `/server/clients/${encodeURIComponent(id)}`);
      const conns = c.connections || [];
      $('client-result').replaceChildren(
        kv([['clientId', c.clientId, 'client-clientid'],
          ['connected', pill(c.connected ? 'connected' : 'not connected', c.connected ? 'ok' : 'muted'), 'client-connected'],
          ['node', c.node || '–', 'client-node'],
          ['bindings', c.addresses.length ? c.addresses.join(', ') : 'none', 'client-bindings']]),
        el('h3', { text: 'cursors (highest acked version)' }),
        el('pre', { 'data-testid': 'client-cursors', text: JSON.stringify(c.cursors, null, 2) }),
        conns.length ? el('h3', { style: 'margin-top:10px', text: 'live connections' }) : null,
        conns.length ? el('table', { 'data-testid': 'client-connections' },
          el('thead', {}, el('tr', {}, el('th', { text: 'node' }), el('th', { text: 'connection' }), el('th', { text: 'since' }))),
          el('tbody', {}, conns.map((x) => el('tr', {},
            el('td', { class: 'mono', text: x.node }),
            el('td', { class: 'mono', text: x.connection }),
            el('td', { class: 'mono', text: x.since ? new Date(x.since).toLocaleString() : '–' }))))) : null);
    } catch (e) {
      setMsg('client-error', e.message, 'error');
    }
  });

  // ---------------------------------------------------------------- start
  setState('connecting', 'muted');
  renderIdentity();
  refreshCluster();
  setInterval(refreshCluster, POLL_MS);
})();
