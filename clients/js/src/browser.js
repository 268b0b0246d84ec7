// signalpost-client for bundlers building for the browser (the package's "browser" export):
// the core of ./client.js with socket.io-client's `io` as the default transport. Pages without
// a bundler load ./client.js itself (the node serves it) after /socket.io.min.js.
import { io } from 'socket.io-client';
import { connect as connectCore } from './client.js';

export { memoryStorage, webStorage, tokenExpiry, SignalpostClient, VERSION } from './client.js';

/** Connects to a signalpost deployment; see docs/client.md. */
export function connect(options = {}) {
  return connectCore({ ...options, io: options.io || io });
}
