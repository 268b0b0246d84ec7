//! The embedded mailbox's applier workload, timed on redb (the store the node uses) and on fjall
//! (an LSM store), each in a fresh folder: batched publishes to 1 000 addresses as the applier
//! writes them — transactions of `--per-store` messages grouped by address in key order, each
//! message a `messages` insert ((address, version) → time, id, payload) and an `ids` insert
//! ((address, id) → version), each address's head read and written and its expiry bucket
//! written, every `--durable-every`th transaction durable (a checkpoint) and the others not.
//! Then it reads back: whole mailboxes in version order (a client's recovery), heads and ids
//! one by one (an append's lookups).
//!
//! It reports wall time and the process's CPU time (all threads, so an LSM's background
//! flushes and compactions count), before and after the store's background work settles.

use std::path::Path;
use std::time::{Duration, Instant};

const ADDRESSES: usize = 1000;
const PAYLOAD: &[u8] = br#"{"bp_s":1234567,"bp_t":1764893000000000}"#;
const ID_FLAG: u16 = 0x8000;

struct Opts {
    per_store: usize,
    stores: usize,
    durable_every: usize,
    dir: std::path::PathBuf,
}

/// One address's messages of a transaction: (version, id).
type Group = (String, Vec<(u64, String)>);

/// The messages of one transaction, grouped by address in key order, as the applier stores
/// them; versions continue per address, ids are time-ordered UUID-like strings.
struct Feed {
    names: Vec<String>,
    heads: Vec<u64>,
    seq: u64,
    rng: u64,
}

impl Feed {
    fn new() -> Self {
        let mut names: Vec<String> = (0..ADDRESSES)
            .map(|a| format!("channel:p-1a2b3c4d-{a}"))
            .collect();
        names.sort();
        Feed {
            names,
            heads: vec![0; ADDRESSES],
            seq: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn next(&mut self, n: usize, ms: u64) -> Vec<Group> {
        let mut groups: Vec<Group> = self.names.iter().map(|a| (a.clone(), Vec::new())).collect();
        for i in 0..n {
            let a = (self.seq as usize + i) % ADDRESSES;
            self.heads[a] += 1;
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let s = self.seq + i as u64;
            let id = format!(
                "{:08x}-{:04x}-7{:03x}-8{:03x}-{:012x}",
                (ms >> 16) as u32,
                ms & 0xffff,
                (s >> 12) & 0xfff,
                s & 0xfff,
                self.rng & 0xffff_ffff_ffff
            );
            groups[a].1.push((self.heads[a], id));
        }
        self.seq += n as u64;
        // Only the addresses this transaction has messages for, as the applier's groups.
        groups.retain(|(_, m)| !m.is_empty());
        groups
    }
}

fn value(ts: u64, id: &str, buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&ts.to_le_bytes());
    buf.extend_from_slice(&(id.len() as u16 | ID_FLAG).to_le_bytes());
    buf.extend_from_slice(id.as_bytes());
    buf.extend_from_slice(PAYLOAD);
}

/// CPU seconds of this process so far (all threads).
fn cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn disk(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        n += if m.is_dir() { disk(&e.path()) } else { m.len() };
    }
    n
}

/// What a store is asked to do.
trait Store {
    fn name(&self) -> &'static str;
    fn store(&mut self, groups: &[Group], ts: u64, durable: bool);
    /// The whole mailbox of an address, in version order: how many messages.
    fn read_all(&self, address: &str) -> usize;
    fn head(&self, address: &str) -> u64;
    fn id(&self, address: &str, id: &str) -> Option<u64>;
}

mod on_redb {
    use super::*;
    use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

    const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
    const HEADS: TableDefinition<&str, u64> = TableDefinition::new("heads");
    const IDS: TableDefinition<(&str, &str), u64> = TableDefinition::new("ids");
    const EXPIRY: TableDefinition<(u64, &str), u64> = TableDefinition::new("expiry");

    pub struct Redb(Database);

    pub fn open(dir: &Path) -> Redb {
        let db = redb::Builder::new()
            .set_cache_size(256 << 20)
            .create(dir.join("m.redb"))
            .unwrap();
        Redb(db)
    }

    impl Store for Redb {
        fn name(&self) -> &'static str {
            "redb"
        }

        fn store(&mut self, groups: &[Group], ts: u64, durable: bool) {
            let mut txn = self.0.begin_write().unwrap();
            if !durable {
                txn.set_durability(Durability::None).unwrap();
            }
            {
                let mut messages = txn.open_table(MESSAGES).unwrap();
                let mut heads = txn.open_table(HEADS).unwrap();
                let mut ids = txn.open_table(IDS).unwrap();
                let mut expiry = txn.open_table(EXPIRY).unwrap();
                let mut buf = Vec::new();
                for (a, msgs) in groups {
                    let stored = heads.get(a.as_str()).unwrap().map_or(0, |g| g.value());
                    let mut head = stored;
                    for (v, id) in msgs {
                        assert_eq!(*v, head + 1);
                        value(ts, id, &mut buf);
                        messages.insert((a.as_str(), *v), buf.as_slice()).unwrap();
                        ids.insert((a.as_str(), id.as_str()), *v).unwrap();
                        head = *v;
                    }
                    heads.insert(a.as_str(), head).unwrap();
                    expiry.insert((ts / 3_600_000, a.as_str()), head).unwrap();
                }
            }
            txn.commit().unwrap();
        }

        fn read_all(&self, address: &str) -> usize {
            let txn = self.0.begin_read().unwrap();
            let t = txn.open_table(MESSAGES).unwrap();
            let mut n = 0;
            for e in t.range((address, 0)..=(address, u64::MAX)).unwrap() {
                let (_, v) = e.unwrap();
                n += usize::from(!v.value().is_empty());
            }
            n
        }

        fn head(&self, address: &str) -> u64 {
            let txn = self.0.begin_read().unwrap();
            let t = txn.open_table(HEADS).unwrap();
            t.get(address).unwrap().map_or(0, |g| g.value())
        }

        fn id(&self, address: &str, id: &str) -> Option<u64> {
            let txn = self.0.begin_read().unwrap();
            let t = txn.open_table(IDS).unwrap();
            t.get((address, id)).unwrap().map(|g| g.value())
        }
    }
}

mod on_fjall {
    use super::*;
    use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

    pub struct Fjall {
        db: Database,
        messages: Keyspace,
        heads: Keyspace,
        ids: Keyspace,
        expiry: Keyspace,
    }

    pub fn open(dir: &Path) -> Fjall {
        let db = Database::builder(dir.join("fjall"))
            .cache_size(256 << 20)
            .open()
            .unwrap();
        let ks = |n: &str| db.keyspace(n, KeyspaceCreateOptions::default).unwrap();
        Fjall {
            messages: ks("messages"),
            heads: ks("heads"),
            ids: ks("ids"),
            expiry: ks("expiry"),
            db,
        }
    }

    /// (address, x) as a key that sorts by address, then x.
    fn key(address: &str, x: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(address.len() + 1 + x.len());
        k.extend_from_slice(address.as_bytes());
        k.push(0);
        k.extend_from_slice(x);
        k
    }

    fn num(v: &[u8]) -> u64 {
        u64::from_be_bytes(v.try_into().unwrap())
    }

    impl Store for Fjall {
        fn name(&self) -> &'static str {
            "fjall"
        }

        fn store(&mut self, groups: &[Group], ts: u64, durable: bool) {
            let mut b = self.db.batch();
            let mut buf = Vec::new();
            for (a, msgs) in groups {
                let stored = self.heads.get(a.as_bytes()).unwrap().map_or(0, |v| num(&v));
                let mut head = stored;
                for (v, id) in msgs {
                    assert_eq!(*v, head + 1);
                    value(ts, id, &mut buf);
                    b.insert(&self.messages, key(a, &v.to_be_bytes()), buf.as_slice());
                    b.insert(&self.ids, key(a, id.as_bytes()), v.to_be_bytes());
                    head = *v;
                }
                b.insert(&self.heads, a.as_bytes(), head.to_be_bytes());
                let mut k = (ts / 3_600_000).to_be_bytes().to_vec();
                k.extend_from_slice(a.as_bytes());
                b.insert(&self.expiry, k, head.to_be_bytes());
            }
            b.commit().unwrap();
            if durable {
                self.db.persist(PersistMode::SyncData).unwrap();
            }
        }

        fn read_all(&self, address: &str) -> usize {
            let from = key(address, &0u64.to_be_bytes());
            let to = key(address, &u64::MAX.to_be_bytes());
            let mut n = 0;
            for g in self.messages.range(from..=to) {
                let (_, v) = g.into_inner().unwrap();
                n += usize::from(!v.is_empty());
            }
            n
        }

        fn head(&self, address: &str) -> u64 {
            self.heads
                .get(address.as_bytes())
                .unwrap()
                .map_or(0, |v| num(&v))
        }

        fn id(&self, address: &str, id: &str) -> Option<u64> {
            self.ids
                .get(key(address, id.as_bytes()))
                .unwrap()
                .map(|v| num(&v))
        }
    }
}

fn run(mut s: Box<dyn Store>, o: &Opts, dir: &Path) {
    let mut feed = Feed::new();
    let (cpu0, t0) = (cpu(), Instant::now());
    let mut in_store = Duration::ZERO;
    let mut sample: Vec<(String, String, u64)> = Vec::new();
    for i in 0..o.stores {
        let ts = 1_764_893_000_000 + i as u64 * 200;
        let groups = feed.next(o.per_store, ts);
        if i % 7 == 3 {
            for (a, m) in groups.iter().step_by(97) {
                sample.push((a.clone(), m[0].1.clone(), m[0].0));
            }
        }
        let t = Instant::now();
        s.store(&groups, ts, (i + 1) % o.durable_every == 0);
        in_store += t.elapsed();
    }
    let (cpu1, wall) = (cpu(), t0.elapsed());
    let n = (o.per_store * o.stores) as f64;
    // Let background work (an LSM's flushes and compactions) run out: until a second passes
    // with no CPU used, at most 60 s.
    let t1 = Instant::now();
    let mut last = cpu();
    while t1.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(1));
        let now = cpu();
        if now - last < 0.02 {
            break;
        }
        last = now;
    }
    let cpu2 = cpu();
    println!(
        "{}: {} messages in {} transactions ({} durable): {:.2} s in the stores ({:.2} µs per message), {:.2} s wall; CPU {:.2} µs per message, {:.2} with background work settled ({:.1} s after); on disk {:.0} MiB",
        s.name(),
        n,
        o.stores,
        o.stores / o.durable_every,
        in_store.as_secs_f64(),
        in_store.as_secs_f64() * 1e6 / n,
        wall.as_secs_f64(),
        (cpu1 - cpu0) * 1e6 / n,
        (cpu2 - cpu0) * 1e6 / n,
        t1.elapsed().as_secs_f64(),
        disk(dir) as f64 / 1048576.0
    );
    let names = Feed::new().names;
    let t = Instant::now();
    let mut read = 0;
    for a in names.iter().step_by(10) {
        read += s.read_all(a);
    }
    let reads = t.elapsed();
    let t = Instant::now();
    let mut heads = 0;
    for a in &names {
        heads += s.head(a);
    }
    let head_t = t.elapsed();
    let t = Instant::now();
    for (a, id, v) in &sample {
        assert_eq!(s.id(a, id), Some(*v), "{a} {id}");
    }
    let id_t = t.elapsed();
    assert_eq!(heads, n as u64);
    println!(
        "{}: read {} messages of 100 mailboxes in version order: {:.3} µs per message; {} heads one by one: {:.2} µs each; {} ids one by one: {:.2} µs each",
        s.name(),
        read,
        reads.as_secs_f64() * 1e6 / read as f64,
        names.len(),
        head_t.as_secs_f64() * 1e6 / names.len() as f64,
        sample.len(),
        id_t.as_secs_f64() * 1e6 / sample.len() as f64
    );
}

fn main() {
    let mut o = Opts {
        per_store: 50_000,
        stores: 60,
        durable_every: 5,
        dir: std::env::temp_dir(),
    };
    let mut only: Option<String> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--per-store" => o.per_store = v.parse().unwrap(),
            "--stores" => o.stores = v.parse().unwrap(),
            "--durable-every" => o.durable_every = v.parse().unwrap(),
            "--dir" => o.dir = v.into(),
            "--only" => only = Some(v),
            a => panic!("unknown argument {a}"),
        }
        i += 2;
    }
    for name in ["redb", "fjall"] {
        if only.as_deref().is_some_and(|x| x != name) {
            continue;
        }
        let dir = o
            .dir
            .join(format!("store-compare-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s: Box<dyn Store> = match name {
            "redb" => Box::new(on_redb::open(&dir)),
            _ => Box::new(on_fjall::open(&dir)),
        };
        run(s, &o, &dir);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
