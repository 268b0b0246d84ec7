// signalpost-client for Node (and bundlers that do not pick ./browser.js): the core of
// ./client.js with socket.io-client's `io` as the default transport, plus fileStorage.
import { io } from 'socket.io-client';
import { connect as connectCore } from './client.js';

export { memoryStorage, webStorage, tokenExpiry, SignalpostClient, VERSION } from './client.js';
export { fileStorage } from './file-storage.js';

/** Connects to a signalpost deployment; see docs/client.md. */
export function connect(options = {}) {
  return connectCore({ ...options, io: options.io || io });
}
