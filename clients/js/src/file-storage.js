// fileStorage(path): identity and cursors in a JSON file (Node only), one entry per deployment
// key. Writes go to a temporary file that is then renamed over the old one, one at a time, so
// the file always holds a whole, recent state.
import { readFile, writeFile, rename } from 'node:fs/promises';

export function fileStorage(path) {
  let data = null;
  let chain = Promise.resolve();
  async function load() {
    if (data) return data;
    try {
      data = JSON.parse(await readFile(path, 'utf8'));
      if (!data || typeof data !== 'object') data = {};
    } catch (e) {
      data = {};
      if (e.code !== 'ENOENT') throw new Error(`fileStorage ${path}: ${e.message}`);
    }
    return data;
  }
  async function write() {
    const tmp = `${path}.${process.pid}.tmp`;
    await writeFile(tmp, JSON.stringify(data));
    await rename(tmp, path);
  }
  /** Runs `f` after every earlier write, whether or not that one failed. */
  const then = (f) => (chain = chain.catch(() => {}).then(f));
  return {
    async get(key) { return (await load())[key] ?? null; },
    set: (key, value) => then(async () => { await load().catch(() => {}); data[key] = value; await write(); }),
    remove: (key) => then(async () => { await load().catch(() => {}); delete data[key]; await write(); }),
  };
}
