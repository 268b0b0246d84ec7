// Type declarations of signalpost-client (hand-written; the package is plain ESM JavaScript).
// One file for every entry point: `signalpost-client` (Node: ./index.js; bundlers for the
// browser: ./browser.js, which has no fileStorage) and `signalpost-client/client.js`, the
// self-contained core a node serves to pages at /signalpost-client.js.

/** A delivered message. */
export interface Signal<P = unknown> {
  address: string;
  version: number;
  id: string;
  /** Append time, ms since the epoch. */
  ts: number;
  payload: P;
}

/** Versions `from..=to` of `address` expired before they could be delivered. */
export interface Gap { address: string; from: number; to: number; }
export interface Binding { address: string; version: number; }
export interface Session {
  clientId: string;
  resumeToken: string;
  node: string;
  addresses: string[];
  resumed?: boolean;
  user?: string;
  /** Set when the spare connection took over from a main connection that dropped. */
  promoted?: boolean;
}
export interface Synced { cursors: Record<string, number>; }
export interface Kicked { reason: string; }
/** `joined` / `left`: a client became or stopped being a member of a presence address. */
export interface Member { address: string; client: string; user?: string; }
/** One entry of a member list. */
export interface Listed { client: string; user?: string; }
export interface Reset { reason: string; }

export type State = 'connecting' | 'replaying' | 'live' | 'offline';
export interface StateInfo { url?: string; node?: string; reason?: string; kicked?: string; promoted?: boolean; }
/** Where an event came from: `replay` is true before that connection's `synced`. */
export interface EventInfo { replay: boolean; url: string; }

/** What the client keeps per deployment. */
export interface StoredState {
  clientId: string | null;
  resumeToken: string | null;
  cursors: Record<string, number>;
}

/** A store: synchronous or asynchronous. `remove` is optional (`set(key, null)` otherwise). */
export interface Storage {
  get(key: string): StoredState | null | Promise<StoredState | null>;
  set(key: string, value: StoredState | null): void | Promise<void>;
  remove?(key: string): void | Promise<void>;
}

type Awaitable<T> = T | Promise<T>;
type Handler<T> = (data: T, info?: EventInfo) => Awaitable<void>;

export interface Events {
  session: Handler<Session>;
  signal: Handler<Signal>;
  gap: Handler<Gap>;
  synced: Handler<Synced>;
  bound: Handler<Binding>;
  unbound: Handler<Binding>;
  kicked: Handler<Kicked>;
  joined: Handler<Member>;
  left: Handler<Member>;
  state: (state: State, info: StateInfo) => void;
  /** The stored identity could no longer resume; the client goes on as a new one. */
  reset: Handler<Reset>;
  /** Refused connections, server `error` events, throwing handlers, storage failures. */
  error: (error: Error) => void;
}

export interface ConnectOptions {
  /** Node URLs of one deployment, tried in this order (least recently failed first). */
  urls: string[];
  /** A client JWT, or a function that returns one (called on every connect and before exp). */
  token?: string | (() => Awaitable<string>);
  /** Where identity and cursors live. Default: localStorage in a browser, memory in Node. */
  storage?: Storage;
  /** The storage key is `signalpost:<name>`; default the first url. */
  name?: string;
  /** Keep a second connection to another node, promoted at once when the main one drops. */
  spare?: boolean;
  /** socket.io-client's `io`. Default: the package's, or the page's global `io`. */
  io?: (url: string, options: object) => unknown;
  /** More socket.io-client options (transports, path, withCredentials, extraHeaders, …). */
  socketOptions?: Record<string, unknown>;
  /** ms between acks (one per address, the highest processed version). Default 50. */
  ackInterval?: number;
  /** ms a version that skips ahead waits for the missing ones before a repair. Default 3000. */
  holdMs?: number;
  /** ms: the first retry waits 0..minDelay, later ones double up to maxDelay. Default 250. */
  minDelay?: number;
  /** Default 10000. */
  maxDelay?: number;
  /** ms for one connection attempt. Default 10000. */
  connectTimeout?: number;
  /** ms before exp to refresh a token from the callback (at most half its life). Default 30000. */
  refreshBefore?: number;
  /** ms to wait for the answer to `refresh`, `history`, `read` or `members`. Default 10000. */
  requestTimeout?: number;
}

export interface RefreshAnswer { ok: true; expires: number | null; pending?: boolean; }

export declare class SignalpostClient {
  constructor(options: ConnectOptions);
  /** Known from storage or once the first `session` arrived. */
  readonly clientId: string | null;
  readonly state: State;
  /** The main connection's node URL. */
  readonly url: string | null;
  /** The last version the application has processed, per address. */
  readonly cursors: Record<string, number>;
  on<E extends keyof Events>(event: E, handler: Events[E]): () => void;
  off<E extends keyof Events>(event: E, handler: Events[E]): void;
  refresh(token: string): Promise<RefreshAnswer>;
  /** The messages of an address this client receives, stamped in `since..=until` (ms since the
   *  epoch; at most `limit`, default 100), or the `last` n; oldest first. Not delivered to the
   *  handlers; no cursor moves. */
  history<P = unknown>(address: string, range?: { since?: number; until?: number; last?: number; limit?: number }): Promise<Signal<P>[]>;
  /** Marks single messages read (apart from the ack cursor); 1–1000 versions of an address this
   *  client receives. Resolves with the bytes the client's read state of the address takes. */
  read(address: string, versions: number | number[]): Promise<{ ok: true; bytes: number }>;
  /** The members of a presence address this client receives, by client id (10 000 at most;
   *  `after` pages on, `page: true` resolves with `{ members, truncated }`). */
  members(address: string, options?: { after?: string }): Promise<Listed[]>;
  members(address: string, options: { after?: string; page: true }): Promise<{ members: Listed[]; truncated: boolean }>;
  close(options?: { forget?: boolean }): Promise<void>;
  reconnect(): void;
}

export declare function connect(options: ConnectOptions): SignalpostClient;
export declare function memoryStorage(): Storage;
export declare function webStorage(area?: { getItem(k: string): string | null; setItem(k: string, v: string): void; removeItem(k: string): void }): Storage;
/** A JSON file (Node only; not in the browser entry). */
export declare function fileStorage(path: string): Storage;
/** A JWT's exp in ms since the epoch, read without verifying. */
export declare function tokenExpiry(token: string): number | null;
export declare const VERSION: string;
