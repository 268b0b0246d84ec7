//! The embedded mailbox: redb tables in one file under the data dir, a write-ahead log beside it
//! (`super::wal`), and the messages of the last few milliseconds in memory.
//!
//! Tables:
//! - `messages`: (address, version) → ts, id and the signal JSON;
//! - `heads`: address → last version (kept after expiry so versions never restart);
//! - `ids`: (address, message id) → version, for idempotent sends;
//! - `expiry`: (time bucket, address) → highest version appended in that bucket, so the expiry
//!   task finds old messages without scanning every address;
//! - `log`: the log generation to replay after a crash (`node::datadir` keeps its own `meta`).
//!
//! **An append** (one writer: a mutex) assigns versions from a cache of heads, writes the batch's
//! new messages to the log as one record in one synchronous write, then puts them in memory
//! (`Pending`), where reads find them at once, and answers. It never waits for redb.
//!
//! **The applier** (a thread of the mailbox) writes what is pending to redb in large
//! transactions, non-durably, and then drops it from memory; reads look at memory first and
//! redb second, so a message is always in one or the other. Every [`CHECKPOINT_BYTES`] of log or
//! [`CHECKPOINT_AGE`] it makes a checkpoint: the writer moves to the other of two log files under
//! the next generation, and the applier's next transaction is durable and records that
//! generation, so the older file is free to be written over.
//!
//! **Opening** replays the log files of the generation redb names and of the next one, each
//! message past its address's durable head, in one durable commit.

use super::storage_err as st;
use super::wal::Wal;
use super::{Appended, Appends, Head, Mailbox, MailboxError, Message, NewMessage, Page};
use crate::address::{Address, MAX_ID_LEN, MAX_NAME_LEN, MessageId};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::value::RawValue;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The mailbox's maps, hashed with foldhash: SipHash was a tenth of the applier's time. Their
/// keys are addresses and ids from the server API (behind its key), and the hasher is seeded
/// per process.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const HEADS: TableDefinition<&str, u64> = TableDefinition::new("heads");
const IDS: TableDefinition<(&str, &str), u64> = TableDefinition::new("ids");
const EXPIRY: TableDefinition<(u64, &str), u64> = TableDefinition::new("expiry");
const LOG_TABLE: TableDefinition<&str, u64> = TableDefinition::new("log");
/// The `log` key of the generation whose log file holds what redb's durable state may lack.
const LOG_GENERATION: &str = "log_generation";

/// Log bytes after which the applier makes a checkpoint.
pub const CHECKPOINT_BYTES: u64 = 8 << 20;
/// Bytes of each log file zero-filled when the node opens the mailbox: a checkpoint's worth and a
/// step of growth more, so a log file has its working size at once instead of growing a
/// mebibyte at a time under publishes (each step a mebibyte of zeros and an fsync, ~2.5 ms
/// here, which the appends of that moment waited for).
pub const LOG_RESERVE: u64 = CHECKPOINT_BYTES + (1 << 20);
/// Time after which the applier makes a checkpoint (bounds what a replay has to do, and redb's
/// pages not yet synced).
pub const CHECKPOINT_AGE: Duration = Duration::from_secs(5);
/// Bytes of messages in memory, not yet in redb, past which appends wait for the applier: an
/// eighth of the store's cache ([`EmbeddedMailbox::open_with_cache`]; 32 MiB with the node's
/// default), within these bounds. The applier stores when a quarter of it is pending
/// ([`Pending::full`]), so a larger budget gives larger transactions, each B-tree page copied
/// and written once for more messages. Under batched publishes to 1 000 addresses, 16 MiB (a
/// store every ~0.2 s) against 32 MiB with 1 s windows: 137–140 k against 145–155 k msg/s, peak
/// RSS 380 against 464 MiB; 64 MiB gained nothing more for another 110 MiB (docs/benchmarks.md,
/// fifteenth session).
const PENDING_BYTES_MIN: usize = 4 << 20;
const PENDING_BYTES_MAX: usize = 64 << 20;
/// Payload bytes up to which a batch is appended on the calling task's thread instead of a
/// thread of tokio's blocking pool (see [`Inner::inline`]).
const INLINE_BYTES: usize = 256 << 10;
/// The most a message's signal (what [`Pending`] counts) adds to its payload: 128 bytes for the
/// field names, the address's kind, the two numbers and the punctuation, the longest name, and
/// the longest id with every byte escaped (`\u00XX`, 6 bytes).
const SIGNAL_ENVELOPE_MAX: usize = 128 + MAX_NAME_LEN + 6 * MAX_ID_LEN;
/// How long the applier lets appended messages gather before it stores them when many come:
/// one redb transaction per window, not per append, so each B-tree page a window touches is
/// copied, checksummed and written once for all its messages (readers find the pending ones in
/// memory meanwhile). Under single publishes to 1 000 addresses, a 20 ms window left the applier
/// 30 % of the node's CPU, 250 ms 20 %, 1 s 13 %.
const APPLY_WINDOW: Duration = Duration::from_millis(1000);
/// The window when at most [`APPLY_FEW`] messages are pending: a large store in one go delays
/// the appends of its moment (at 1 000 msg/s, the p99 of an append went from 1.4 ms with 20 ms
/// windows to 1.6–2.0 ms with 500 ms ones), while a small one costs little whenever it comes.
const APPLY_WINDOW_FEW: Duration = Duration::from_millis(20);
const APPLY_FEW: usize = 128;
/// Pending messages (or a quarter of the pending budget in bytes) at which the applier stores
/// them without waiting for the window to end ([`Pending::full`]).
const APPLY_MAX_MESSAGES: usize = 262_144;
/// Most addresses whose heads are read on the calling thread rather than in the blocking pool.
const INLINE_HEADS: usize = 16;
/// Largest number of cached heads before the cache is dropped and refilled from disk.
const HEAD_CACHE_MAX: usize = 1 << 20;
/// Most expiry buckets handled in one expiry transaction.
const EXPIRE_BATCH: usize = 4096;

/// The redb-backed mailbox (a cheap clone of a shared handle; the last clone dropped stops the
/// applier after it stored everything, durably).
#[derive(Clone)]
pub struct EmbeddedMailbox(Arc<Handle>);

struct Handle {
    inner: Arc<Inner>,
    applier: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.wake.notify_all();
        if let Some(t) = lock(&self.applier).take() {
            let _ = t.join();
        }
    }
}

struct Inner {
    db: Database,
    retention_ms: u64,
    bucket_ms: u64,
    /// The single writer.
    writer: Mutex<Writer>,
    /// Appended and not yet in redb.
    pending: Mutex<Pending>,
    /// Wakes the applier (something pending, or stop) and appends waiting for room.
    wake: Condvar,
    /// Bytes in the log file being written (read by the applier for its checkpoint rule).
    log_bytes: AtomicU64,
    /// Why appends are refused until a restart replays the log: a log write failed (the log may
    /// hold a record the heads in memory do not), or the applier could not store.
    broken: Mutex<Option<String>>,
    stop: AtomicBool,
    /// `signalpost_log_write_seconds`: each batch's synchronous log write.
    log_write: metrics::Histogram,
    /// `signalpost_checkpoint_seconds`: each checkpoint's durable redb commit.
    checkpoint: metrics::Histogram,
    #[cfg(test)]
    fail_after: std::sync::atomic::AtomicUsize,
}

struct Writer {
    /// The last version given out per address (pending or stored).
    heads: HashMap<Address, u64>,
    /// The two log files; the one of `generation % 2` is written.
    logs: [Wal; 2],
    generation: u64,
    /// The record being built (kept to reuse its allocation).
    record: Vec<u8>,
}

/// Messages appended (in the log) and not yet in redb.
struct Pending {
    /// Not yet taken by the applier, in append order.
    fresh: Vec<Arc<Message>>,
    /// Every pending message per address, in version order (taken by the applier or not).
    by_address: HashMap<Address, VecDeque<Arc<Message>>>,
    /// The ids of `fresh`, and of the messages the applier took and is storing: it takes the
    /// first map with `fresh` and drops it whole once they are stored, instead of removing
    /// each id (a hash and a probe each, under this lock: a tenth of the applier's time).
    ids: HashMap<(Address, MessageId), Arc<Message>>,
    ids_taken: HashMap<(Address, MessageId), Arc<Message>>,
    bytes: usize,
    /// The budget: appends wait while more than this is pending.
    max_bytes: usize,
    /// Messages appended since the mailbox opened, and how many of the first of them are
    /// stored: a backup waits for `stored` to reach what `appended` was when it began.
    appended: u64,
    stored: u64,
    /// Store what is pending now, without waiting for the window to end (a backup waits).
    flush: bool,
}

impl Pending {
    /// Whether the applier should store now rather than let more gather: enough messages, or
    /// enough bytes, are waiting.
    fn full(&self) -> bool {
        self.fresh.len() >= APPLY_MAX_MESSAGES || self.bytes >= self.max_bytes / 4
    }

    /// The pending message of this id, if any.
    fn by_id(&self, key: &(Address, MessageId)) -> Option<&Arc<Message>> {
        self.ids.get(key).or_else(|| self.ids_taken.get(key))
    }

    /// Takes the messages not yet taken (for the applier to store), with their ids.
    fn take(&mut self) -> Vec<Arc<Message>> {
        if self.ids_taken.is_empty() {
            std::mem::swap(&mut self.ids, &mut self.ids_taken);
        } else {
            // The last store failed and left its messages here (appends are refused then).
            let ids = std::mem::take(&mut self.ids);
            self.ids_taken.extend(ids);
        }
        std::mem::take(&mut self.fresh)
    }

    fn last(&self, address: &Address) -> Option<u64> {
        self.by_address
            .get(address)
            .and_then(|q| q.back())
            .map(|m| m.version)
    }
}

/// One address's messages of a batch, in the order they were given.
type Group<'a> = (&'a Address, Vec<&'a Arc<Message>>);

/// `msgs` grouped by address, the addresses in key order and each one's messages in the order
/// given — their version order, as an address's messages are appended, logged and taken in it.
/// (One hash per message where sorting the batch compared addresses ~log2(n) times each.)
fn by_address(msgs: &[Arc<Message>]) -> Vec<Group<'_>> {
    let mut at: HashMap<&Address, usize> = HashMap::default();
    let mut groups: Vec<Group<'_>> = Vec::new();
    for m in msgs {
        let i = *at.entry(&m.address).or_insert_with(|| {
            groups.push((&m.address, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(m);
    }
    groups.sort_unstable_by(|a, b| a.0.cmp(b.0));
    groups
}

fn log_path(path: &Path, generation: u64) -> PathBuf {
    path.with_extension(format!("wal-{}", generation % 2))
}

/// The span of one expiry bucket for `retention_ms`: messages expire a bucket at a time, so a
/// message is kept at least the retention and at most one bucket longer.
pub fn expiry_bucket_ms(retention_ms: u64) -> u64 {
    (retention_ms / 16).clamp(100, 60_000)
}

impl EmbeddedMailbox {
    /// Opens (or creates) the mailbox file, with redb's default cache (1 GiB).
    pub fn open(path: &Path, retention_ms: u64) -> Result<Self, MailboxError> {
        Self::open_inner(path, retention_ms, 1 << 30, 0)
    }

    /// Opens (or creates) the mailbox file and replays its log; redb caches at most
    /// `cache_bytes` of its pages in memory (the bound on the store's share of the node's
    /// memory, whatever the file's size). Each of the two log files is zero-filled to
    /// [`LOG_RESERVE`] at once (18 MiB of disk for both), so that no append waits for a log to
    /// grow; [`EmbeddedMailbox::open`] (tests) reserves nothing.
    pub fn open_with_cache(
        path: &Path,
        retention_ms: u64,
        cache_bytes: usize,
    ) -> Result<Self, MailboxError> {
        Self::open_inner(path, retention_ms, cache_bytes, LOG_RESERVE)
    }

    fn open_inner(
        path: &Path,
        retention_ms: u64,
        cache_bytes: usize,
        log_reserve: u64,
    ) -> Result<Self, MailboxError> {
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(st)?;
        let txn = db.begin_write().map_err(st)?;
        let generation = {
            txn.open_table(MESSAGES).map_err(st)?;
            txn.open_table(HEADS).map_err(st)?;
            txn.open_table(IDS).map_err(st)?;
            txn.open_table(EXPIRY).map_err(st)?;
            let t = txn.open_table(LOG_TABLE).map_err(st)?;
            t.get(LOG_GENERATION).map_err(st)?.map_or(0, |g| g.value())
        };
        txn.commit().map_err(st)?;
        // What redb's durable state may lack: the log of its generation, then the next one's
        // (written after a checkpoint began and before it was durable).
        let (mut log_a, replay_a) =
            Wal::open(&log_path(path, generation), generation).map_err(st)?;
        let (mut log_b, replay_b) =
            Wal::open(&log_path(path, generation + 1), generation + 1).map_err(st)?;
        log_a.reserve(log_reserve).map_err(st)?;
        log_b.reserve(log_reserve).map_err(st)?;
        let mut messages = Vec::new();
        for record in replay_a.iter().chain(&replay_b) {
            for entry in LogEntries(record) {
                let (address, version, value) = entry?;
                let address = Address::parse(address).map_err(st)?;
                messages.push(Arc::new(decode(&address, version, value)?));
            }
        }
        let mut inner = Inner {
            db,
            retention_ms,
            bucket_ms: expiry_bucket_ms(retention_ms),
            writer: Mutex::new(Writer {
                heads: HashMap::default(),
                // logs[g % 2] is the file of generation g.
                logs: if generation % 2 == 0 {
                    [log_a, log_b]
                } else {
                    [log_b, log_a]
                },
                generation: generation + 2,
                record: Vec::new(),
            }),
            pending: Mutex::new(Pending {
                fresh: Vec::new(),
                by_address: HashMap::default(),
                ids: HashMap::default(),
                ids_taken: HashMap::default(),
                bytes: 0,
                max_bytes: (cache_bytes / 8).clamp(PENDING_BYTES_MIN, PENDING_BYTES_MAX),
                appended: 0,
                stored: 0,
                flush: false,
            }),
            wake: Condvar::new(),
            log_bytes: AtomicU64::new(0),
            broken: Mutex::new(None),
            stop: AtomicBool::new(false),
            log_write: metrics::histogram!(crate::metrics::LOG_WRITE),
            checkpoint: metrics::histogram!("signalpost_checkpoint_seconds"),
            #[cfg(test)]
            fail_after: std::sync::atomic::AtomicUsize::new(usize::MAX),
        };
        // Durable: the replayed messages, and the generation after both files (so both are
        // free: the one written next starts over).
        let (applied, stored) = inner.store(&by_address(&messages), Some(generation + 2))?;
        if !messages.is_empty() {
            tracing::info!(
                records = replay_a.len() + replay_b.len(),
                replayed = applied,
                already_stored = stored,
                "mailbox log replayed"
            );
        }
        {
            let w = inner.writer.get_mut().unwrap_or_else(|p| p.into_inner());
            // Both files are free now; the one of the new generation is written from its start.
            let g = w.generation;
            w.logs[(g % 2) as usize].restart(g);
        }
        let inner = Arc::new(inner);
        let worker = inner.clone();
        let applier = std::thread::Builder::new()
            .name("mailbox-applier".into())
            .spawn(move || worker.apply_loop())
            .map_err(st)?;
        Ok(Self(Arc::new(Handle {
            inner,
            applier: Mutex::new(Some(applier)),
        })))
    }

    /// Copies the mailbox into `to` (a write transaction of another redb file) as it is once
    /// every message appended before this call is stored: one moment's state, each address's
    /// versions 1..head, appends going on meanwhile. Returns the messages copied. Blocking.
    pub fn backup_into(&self, to: &redb::WriteTransaction) -> Result<u64, MailboxError> {
        let inner = &self.0.inner;
        {
            let mut p = lock(&inner.pending);
            let target = p.appended;
            while p.stored < target {
                if let Some(e) = inner.refused() {
                    return Err(e);
                }
                if inner.stop.load(Ordering::SeqCst) {
                    return Err(MailboxError::Storage("the mailbox is closing".into()));
                }
                p.flush = true;
                inner.wake.notify_all();
                p = inner
                    .wake
                    .wait_timeout(p, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let from = inner.db.begin_read().map_err(st)?;
        let messages = copy_table(&from, to, MESSAGES).map_err(st)?;
        copy_table(&from, to, HEADS).map_err(st)?;
        copy_table(&from, to, IDS).map_err(st)?;
        copy_table(&from, to, EXPIRY).map_err(st)?;
        // The copy has no log: a node opening it starts its logs afresh at this generation.
        copy_table(&from, to, LOG_TABLE).map_err(st)?;
        Ok(messages)
    }

    #[cfg(test)]
    fn fail_after(&self, n: usize) {
        self.0
            .inner
            .fail_after
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies every row of a table as `from` sees it into `to` (the table is created there, empty
/// when `from` has none). Returns the rows copied. For backups (`crate::backup`), of this store
/// and of the topology's.
pub fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &redb::ReadTransaction,
    to: &redb::WriteTransaction,
    def: TableDefinition<K, V>,
) -> Result<u64, redb::Error> {
    let mut dst = to.open_table(def)?;
    let src = match from.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut n = 0;
    for row in src.iter()? {
        let (k, v) = row?;
        dst.insert(k.value(), v.value())?;
        n += 1;
    }
    Ok(n)
}

/// A log record's entries: `address length u16 | address | version u64 | value length u32 | value`.
struct LogEntries<'a>(&'a [u8]);

impl<'a> Iterator for LogEntries<'a> {
    type Item = Result<(&'a str, u64, &'a [u8]), MailboxError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let bad = || MailboxError::Storage("corrupt mailbox log entry".into());
        let mut take = |n: usize| -> Result<&'a [u8], MailboxError> {
            let (a, b) = self.0.split_at_checked(n).ok_or_else(bad)?;
            self.0 = b;
            Ok(a)
        };
        let entry = (|| {
            let n = u16::from_le_bytes(take(2)?.try_into().map_err(|_| bad())?) as usize;
            let address = std::str::from_utf8(take(n)?).map_err(|_| bad())?;
            let version = u64::from_le_bytes(take(8)?.try_into().map_err(|_| bad())?);
            let n = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad())?) as usize;
            Ok((address, version, take(n)?))
        })();
        if entry.is_err() {
            self.0 = &[];
        }
        Some(entry)
    }
}

fn log_entry(out: &mut Vec<u8>, address: &str, version: u64, value: &[u8]) {
    out.extend_from_slice(&(address.len() as u16).to_le_bytes());
    out.extend_from_slice(address.as_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Whether `batch` is appended on the calling thread. The append of a small batch is a
    /// synchronous log write of a few KiB (~0.25 ms on this project's machine, waiting on the
    /// disk, not the CPU); handing it to the blocking pool and back cost more than that in CPU
    /// (waking a pool thread, parking it, waking the task again: ~10 % of the node's CPU at
    /// 1 000 single publishes/s, measured with perf). A large batch, or one that could have to
    /// wait for the applier (backpressure), still goes to the pool, so a runtime thread never
    /// waits long. The embedded queue appends one batch at a time, so this holds at most one
    /// of the runtime's threads.
    fn inline(&self, batch: &[NewMessage]) -> bool {
        let payload: usize = batch.iter().map(|m| m.payload.get().len()).sum();
        // Memory counts signals, not payloads: bound what this batch can add.
        let most = payload + batch.len() * SIGNAL_ENVELOPE_MAX;
        let p = lock(&self.pending);
        payload <= INLINE_BYTES && p.bytes + most <= p.max_bytes
    }

    fn refused(&self) -> Option<MailboxError> {
        lock(&self.broken).as_ref().map(|why| {
            MailboxError::Storage(format!(
                "{why}: appends stop until a restart replays the mailbox log"
            ))
        })
    }

    fn append_blocking(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>, MailboxError> {
        let mut w = lock(&self.writer);
        if let Some(e) = self.refused() {
            return Err(e);
        }
        let w = &mut *w;
        let now = crate::clock::stamp_ms();
        let mut out = Vec::with_capacity(batch.len());
        let mut fresh: Vec<Arc<Message>> = Vec::with_capacity(batch.len());
        let mut touched: HashMap<Address, u64> = HashMap::default();
        w.record.clear();
        {
            // Held while deciding: the applier drops a message from memory only after it is in
            // redb, and not while this is held, so each message is seen in one place or the other.
            let pending = lock(&self.pending);
            let txn = self.db.begin_read().map_err(st)?;
            let messages = txn.open_table(MESSAGES).map_err(st)?;
            let heads = txn.open_table(HEADS).map_err(st)?;
            let ids = txn.open_table(IDS).map_err(st)?;
            let mut in_batch: HashMap<(Address, MessageId), Arc<Message>> = HashMap::default();
            let mut buf = Vec::new();
            for m in batch {
                #[cfg(test)]
                if out.len() >= self.fail_after.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(MailboxError::Storage("injected failure".into()));
                }
                let key = (m.address.clone(), m.id.clone());
                if let Some(orig) = in_batch.get(&key) {
                    out.push(Appended {
                        message: orig.clone(),
                        duplicate: true,
                    });
                    continue;
                }
                if let Some(orig) = pending.by_id(&key) {
                    out.push(Appended {
                        message: orig.clone(),
                        duplicate: true,
                    });
                    continue;
                }
                // A minted id was never sent before (the in-process queue delivers once).
                let existing = if m.new_id {
                    None
                } else {
                    ids.get((m.address.as_str(), m.id.as_str()))
                        .map_err(st)?
                        .map(|g| g.value())
                };
                if let Some(v) = existing
                    && let Some(raw) = messages.get((m.address.as_str(), v)).map_err(st)?
                {
                    out.push(Appended {
                        message: Arc::new(decode(&m.address, v, raw.value())?),
                        duplicate: true,
                    });
                    continue;
                }
                let head = match touched.get(&m.address).or_else(|| w.heads.get(&m.address)) {
                    Some(h) => *h,
                    None => match pending.last(&m.address) {
                        Some(h) => h,
                        None => heads
                            .get(m.address.as_str())
                            .map_err(st)?
                            .map_or(0, |g| g.value()),
                    },
                };
                let version = head + 1;
                let msg = Arc::new(Message::new(
                    m.address.clone(),
                    version,
                    m.id,
                    now,
                    &m.payload,
                ));
                encode(&msg, &mut buf);
                log_entry(&mut w.record, msg.address.as_str(), version, &buf);
                touched.insert(msg.address.clone(), version);
                in_batch.insert(key, msg.clone());
                fresh.push(msg.clone());
                out.push(Appended {
                    message: msg,
                    duplicate: false,
                });
            }
        }
        if fresh.is_empty() {
            return Ok(out);
        }
        // In the log before anyone can see it: a reader never sees what a crash could take back.
        let g = (w.generation % 2) as usize;
        let started = Instant::now();
        let written = w.logs[g].append(&w.record);
        self.log_write.record(started.elapsed());
        if let Err(e) = written {
            let why = format!("writing the mailbox log failed ({e})");
            tracing::error!("{why}");
            *lock(&self.broken) = Some(why);
            return Err(st(format_args!("writing the mailbox log: {e}")));
        }
        self.log_bytes.store(w.logs[g].written(), Ordering::Relaxed);
        {
            let mut p = lock(&self.pending);
            for m in &fresh {
                p.bytes += m.signal.get().len();
                p.ids.insert((m.address.clone(), m.id.clone()), m.clone());
                p.by_address
                    .entry(m.address.clone())
                    .or_default()
                    .push_back(m.clone());
            }
            // The applier waits for its window to end, for stop, or for this: the first
            // message after it went idle, or memory filling up.
            let idle = p.fresh.is_empty();
            p.appended += fresh.len() as u64;
            p.fresh.extend(fresh);
            if idle || p.full() {
                self.wake.notify_all();
            }
            // Backpressure: the applier is behind by too much.
            while p.bytes > p.max_bytes && !self.stop.load(Ordering::SeqCst) {
                p = self
                    .wake
                    .wait_timeout(p, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        if w.heads.len() + touched.len() > HEAD_CACHE_MAX {
            w.heads.clear();
        }
        w.heads.extend(touched);
        Ok(out)
    }

    /// Writes messages to redb in one transaction: each one past its address's stored head
    /// (so a replay may include what is stored already). Non-durable, unless `checkpoint` names
    /// the log generation to record, durably. Returns (stored now, stored before).
    fn store(
        &self,
        groups: &[Group<'_>],
        checkpoint: Option<u64>,
    ) -> Result<(u64, u64), MailboxError> {
        let mut txn = self.db.begin_write().map_err(st)?;
        if checkpoint.is_none() {
            txn.set_durability(Durability::None).map_err(st)?;
        }
        let (mut applied, mut skipped) = (0, 0);
        {
            let mut messages = txn.open_table(MESSAGES).map_err(st)?;
            let mut heads = txn.open_table(HEADS).map_err(st)?;
            let mut ids = txn.open_table(IDS).map_err(st)?;
            let mut expiry = txn.open_table(EXPIRY).map_err(st)?;
            // This address's (expiry bucket, highest version in it): one or two per address.
            let mut buckets: Vec<(u64, u64)> = Vec::new();
            let mut buf = Vec::new();
            // Address by address in key order: consecutive inserts land on the same leaves,
            // still in the CPU's cache.
            for (address, msgs) in groups {
                let stored = heads
                    .get(address.as_str())
                    .map_err(st)?
                    .map_or(0, |g| g.value());
                let mut head = stored;
                for m in msgs {
                    if m.version <= head {
                        skipped += 1;
                        continue;
                    }
                    if m.version != head + 1 {
                        return Err(MailboxError::Storage(format!(
                            "{address} version {} does not follow the stored head {head}",
                            m.version
                        )));
                    }
                    encode(m, &mut buf);
                    messages
                        .insert((address.as_str(), m.version), buf.as_slice())
                        .map_err(st)?;
                    ids.insert((address.as_str(), m.id.as_str()), m.version)
                        .map_err(st)?;
                    head = m.version;
                    let b = m.ts / self.bucket_ms;
                    match buckets.iter_mut().find(|(x, _)| *x == b) {
                        Some(e) => e.1 = m.version,
                        None => buckets.push((b, m.version)),
                    }
                    applied += 1;
                }
                if head != stored {
                    heads.insert(address.as_str(), head).map_err(st)?;
                }
                // An entry already there for (bucket, address) has a version at most the
                // stored head, so below these: they replace it.
                for (bucket, version) in buckets.drain(..) {
                    expiry
                        .insert((bucket, address.as_str()), version)
                        .map_err(st)?;
                }
            }
        }
        if let Some(g) = checkpoint {
            let mut t = txn.open_table(LOG_TABLE).map_err(st)?;
            t.insert(LOG_GENERATION, g).map_err(st)?;
        }
        txn.commit().map_err(st)?;
        Ok((applied, skipped))
    }

    /// The applier thread: stores what is pending, checkpoints, and at stop stores the rest
    /// durably.
    fn apply_loop(&self) {
        let mut last_checkpoint = Instant::now();
        let mut last_store = Instant::now();
        let mut dirty = false;
        loop {
            let stopping = self.stop.load(Ordering::SeqCst);
            let due = dirty
                && (stopping
                    || last_checkpoint.elapsed() >= CHECKPOINT_AGE
                    || self.log_bytes.load(Ordering::Relaxed) >= CHECKPOINT_BYTES);
            if lock(&self.broken).is_some() {
                if stopping {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let next = if due {
                // Later appends go to the other file, under the next generation; everything in
                // this one is pending or stored, and the durable commit below covers it.
                let mut w = lock(&self.writer);
                w.generation += 1;
                let g = w.generation;
                w.logs[(g % 2) as usize].restart(g);
                self.log_bytes.store(0, Ordering::Relaxed);
                Some(g)
            } else {
                None
            };
            let (batch, upto) = {
                let mut p = lock(&self.pending);
                if next.is_none() {
                    if p.fresh.is_empty() {
                        if stopping {
                            return;
                        }
                        let _ = self.wake.wait_timeout(p, Duration::from_millis(50));
                        continue;
                    }
                    // Let appends gather (a short window when few come, a long one when many
                    // do), unless stopping or memory fills.
                    let window = if p.fresh.len() <= APPLY_FEW {
                        APPLY_WINDOW_FEW
                    } else {
                        APPLY_WINDOW
                    };
                    let age = last_store.elapsed();
                    if !stopping && age < window && !p.full() && !p.flush {
                        let _ = self.wake.wait_timeout(p, window - age);
                        continue;
                    }
                }
                p.flush = false;
                (p.take(), p.appended)
            };
            if batch.is_empty() && next.is_none() {
                continue;
            }
            let groups = by_address(&batch);
            let started = Instant::now();
            let result = self.store(&groups, next);
            last_store = Instant::now();
            if next.is_some() {
                self.checkpoint.record(last_store - started);
            }
            match result {
                Ok(_) => {
                    dirty = next.is_none();
                    if next.is_some() {
                        last_checkpoint = Instant::now();
                    }
                }
                Err(e) => {
                    let why = format!("storing appended messages failed ({e})");
                    tracing::error!("{why}");
                    *lock(&self.broken) = Some(why);
                    // They stay in memory (readable); a restart stores them from the log.
                    continue;
                }
            }
            // Stored: drop them from memory (each address's oldest pending are these), and
            // free them after the lock.
            let bytes: usize = batch.iter().map(|m| m.signal.get().len()).sum();
            let ids = {
                let mut p = lock(&self.pending);
                for (address, msgs) in &groups {
                    if let Some(q) = p.by_address.get_mut(*address) {
                        for m in msgs {
                            if q.front().is_some_and(|x| x.version == m.version) {
                                q.pop_front();
                            }
                        }
                        if q.is_empty() {
                            p.by_address.remove(*address);
                        }
                    }
                }
                p.bytes -= bytes;
                p.stored = upto;
                std::mem::take(&mut p.ids_taken)
            };
            self.wake.notify_all();
            drop(ids);
        }
    }

    /// This address's pending messages after `after` (at most `limit`), and its pending head.
    fn pending_after(
        &self,
        address: &Address,
        after: u64,
        limit: usize,
    ) -> (Vec<Arc<Message>>, Option<u64>) {
        let p = lock(&self.pending);
        match p.by_address.get(address) {
            None => (Vec::new(), None),
            Some(q) => (
                q.iter()
                    .filter(|m| m.version > after)
                    .take(limit)
                    .cloned()
                    .collect(),
                q.back().map(|m| m.version),
            ),
        }
    }

    fn read_blocking(
        &self,
        address: &Address,
        after: u64,
        limit: usize,
    ) -> Result<Page, MailboxError> {
        // Memory first, then redb: a message leaves memory only once it is in redb.
        let (pending, pending_head) = self.pending_after(address, after, limit);
        let txn = self.db.begin_read().map_err(st)?;
        let messages = txn.open_table(MESSAGES).map_err(st)?;
        let heads = txn.open_table(HEADS).map_err(st)?;
        let mut head = head_in(&heads, &messages, address)?;
        let start = after.saturating_add(1).max(head.low);
        let mut out = Vec::with_capacity(limit.min(1024));
        if limit > 0 && start <= head.head {
            for entry in messages
                .range((address.as_str(), start)..=(address.as_str(), u64::MAX))
                .map_err(st)?
            {
                let (k, v) = entry.map_err(st)?;
                out.push(Arc::new(decode(address, k.value().1, v.value())?));
                if out.len() >= limit {
                    break;
                }
            }
        }
        let last = out.last().map_or(start.saturating_sub(1), |m| m.version);
        for m in pending {
            if out.len() >= limit {
                break;
            }
            if m.version > last {
                out.push(m);
            }
        }
        if let Some(h) = pending_head {
            head.head = head.head.max(h);
        }
        Ok(Page {
            head,
            messages: out,
        })
    }

    fn heads_blocking(&self, addresses: &[Address]) -> Result<Vec<Head>, MailboxError> {
        let pending: Vec<Option<u64>> = {
            let p = lock(&self.pending);
            addresses.iter().map(|a| p.last(a)).collect()
        };
        let txn = self.db.begin_read().map_err(st)?;
        let messages = txn.open_table(MESSAGES).map_err(st)?;
        let heads = txn.open_table(HEADS).map_err(st)?;
        addresses
            .iter()
            .zip(pending)
            .map(|(a, p)| {
                let mut h = head_in(&heads, &messages, a)?;
                if let Some(p) = p {
                    h.head = h.head.max(p);
                }
                Ok(h)
            })
            .collect()
    }

    fn expire_blocking(&self, now: u64) -> Result<u64, MailboxError> {
        let cutoff = now.saturating_sub(self.retention_ms);
        // Every message in bucket b has ts < (b + 1) * bucket_ms; expire whole buckets only.
        let last_bucket = (cutoff / self.bucket_ms).checked_sub(1);
        let Some(last_bucket) = last_bucket else {
            return Ok(0);
        };
        let _writer = lock(&self.writer);
        let mut removed = 0;
        loop {
            let txn = self.db.begin_write().map_err(st)?;
            let done;
            {
                let mut messages = txn.open_table(MESSAGES).map_err(st)?;
                let mut ids = txn.open_table(IDS).map_err(st)?;
                let mut expiry = txn.open_table(EXPIRY).map_err(st)?;
                let mut due: Vec<(u64, String, u64)> = Vec::new();
                for entry in expiry.range((0, "")..(last_bucket + 1, "")).map_err(st)? {
                    let (k, v) = entry.map_err(st)?;
                    let (b, a) = k.value();
                    due.push((b, a.to_owned(), v.value()));
                    if due.len() >= EXPIRE_BATCH {
                        break;
                    }
                }
                done = due.len() < EXPIRE_BATCH;
                for (bucket, addr, max_version) in &due {
                    let mut gone = Vec::new();
                    for entry in messages
                        .range((addr.as_str(), 0)..=(addr.as_str(), *max_version))
                        .map_err(st)?
                    {
                        let (k, v) = entry.map_err(st)?;
                        gone.push((k.value().1, decode_id(v.value())?));
                    }
                    for (version, id) in &gone {
                        messages.remove((addr.as_str(), *version)).map_err(st)?;
                        // Only drop the id if it still points at this version.
                        let same = ids
                            .get((addr.as_str(), id.as_str()))
                            .map_err(st)?
                            .map(|g| g.value())
                            == Some(*version);
                        if same {
                            ids.remove((addr.as_str(), id.as_str())).map_err(st)?;
                        }
                    }
                    removed += gone.len() as u64;
                    expiry.remove((*bucket, addr.as_str())).map_err(st)?;
                }
            }
            txn.commit().map_err(st)?;
            if done {
                return Ok(removed);
            }
        }
    }
}

fn head_in(
    heads: &impl ReadableTable<&'static str, u64>,
    messages: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    address: &Address,
) -> Result<Head, MailboxError> {
    let head = heads
        .get(address.as_str())
        .map_err(st)?
        .map(|g| g.value())
        .unwrap_or(0);
    let low = match messages
        .range((address.as_str(), 0)..=(address.as_str(), u64::MAX))
        .map_err(st)?
        .next()
    {
        Some(first) => first.map_err(st)?.0.value().1,
        None => head + 1,
    };
    Ok(Head { head, low })
}

/// The flag on a stored value's id length saying that the JSON after the id is the payload
/// alone (the signal is rebuilt from the key and the fields on reading): the rest of the signal
/// repeats the key, the id and the time, which made each value ~2.5 times the size of a small
/// payload, and the stored bytes are what the applier's B-tree inserts and page writes cost.
/// Values without it (written before) hold the whole signal. Ids are far shorter than this bit.
const PAYLOAD_ONLY: u16 = 0x8000;

/// Stored value (in redb and in the log): ts (u64 LE), id length | [`PAYLOAD_ONLY`] (u16 LE),
/// id, payload JSON.
fn encode(m: &Message, buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&m.ts.to_le_bytes());
    buf.extend_from_slice(&(m.id.as_str().len() as u16 | PAYLOAD_ONLY).to_le_bytes());
    buf.extend_from_slice(m.id.as_str().as_bytes());
    buf.extend_from_slice(m.payload_json().as_bytes());
}

fn corrupt_record() -> MailboxError {
    MailboxError::Storage("corrupt mailbox record".into())
}

/// A stored value's (ts, id, JSON, whether the JSON is the payload alone).
fn split(raw: &[u8]) -> Result<(u64, &str, &str, bool), MailboxError> {
    let bad = corrupt_record;
    if raw.len() < 10 {
        return Err(bad());
    }
    let ts = u64::from_le_bytes(raw[0..8].try_into().map_err(|_| bad())?);
    let n = u16::from_le_bytes(raw[8..10].try_into().map_err(|_| bad())?);
    let (n, payload_only) = ((n & !PAYLOAD_ONLY) as usize, n & PAYLOAD_ONLY != 0);
    let id = std::str::from_utf8(raw.get(10..10 + n).ok_or_else(bad)?).map_err(|_| bad())?;
    let json = std::str::from_utf8(&raw[10 + n..]).map_err(|_| bad())?;
    Ok((ts, id, json, payload_only))
}

fn decode_id(raw: &[u8]) -> Result<String, MailboxError> {
    Ok(split(raw)?.1.to_owned())
}

fn decode(address: &Address, version: u64, raw: &[u8]) -> Result<Message, MailboxError> {
    let (ts, id, json, payload_only) = split(raw)?;
    if !payload_only {
        let signal = RawValue::from_string(json.to_owned()).map_err(st)?;
        return Message::from_signal(signal)
            .filter(|m| &m.address == address && m.version == version)
            .ok_or_else(corrupt_record);
    }
    let id = MessageId::parse(id).map_err(st)?;
    let payload: &RawValue = serde_json::from_str(json).map_err(st)?;
    Ok(Message::new(address.clone(), version, id, ts, payload))
}

#[async_trait::async_trait]
impl Mailbox for EmbeddedMailbox {
    async fn append(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>, MailboxError> {
        match self.append_now(batch) {
            Ok(out) => out,
            Err(batch) => {
                let this = self.0.inner.clone();
                run_blocking(move || this.append_blocking(batch)).await
            }
        }
    }

    fn append_now(&self, batch: Vec<NewMessage>) -> Result<Appends, Vec<NewMessage>> {
        if batch.is_empty() {
            return Ok(Ok(Vec::new()));
        }
        if self.0.inner.inline(&batch) {
            Ok(self.0.inner.append_blocking(batch))
        } else {
            Err(batch)
        }
    }

    async fn read(
        &self,
        address: &Address,
        after: u64,
        limit: usize,
    ) -> Result<Page, MailboxError> {
        let this = self.0.inner.clone();
        let address = address.clone();
        run_blocking(move || this.read_blocking(&address, after, limit)).await
    }

    async fn heads(&self, addresses: &[Address]) -> Result<Vec<Head>, MailboxError> {
        // A few point reads (a connection's own addresses, one bind) are answered from redb's
        // page cache in microseconds, less than a hop to the blocking pool and back costs;
        // many take the pool.
        if addresses.len() <= INLINE_HEADS {
            return self.0.inner.heads_blocking(addresses);
        }
        let this = self.0.inner.clone();
        let addresses = addresses.to_vec();
        run_blocking(move || this.heads_blocking(&addresses)).await
    }

    async fn expire(&self, now_ms: u64) -> Result<u64, MailboxError> {
        let this = self.0.inner.clone();
        run_blocking(move || this.expire_blocking(now_ms)).await
    }

    async fn healthy(&self) -> Result<(), MailboxError> {
        if let Some(e) = self.0.inner.refused() {
            return Err(e);
        }
        self.0.inner.db.begin_read().map(|_| ()).map_err(st)
    }
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MailboxError> + Send + 'static,
) -> Result<T, MailboxError> {
    tokio::task::spawn_blocking(f).await.map_err(st)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::MessageId;

    fn msg(address: &Address, id: &str) -> NewMessage {
        NewMessage {
            address: address.clone(),
            id: MessageId::parse(id).unwrap(),
            payload: serde_json::value::RawValue::from_string("1".into()).unwrap(),
            new_id: false,
        }
    }

    /// The applier's grouping: addresses in key order, each one's messages in the order given,
    /// every message once.
    #[test]
    fn a_batch_is_grouped_by_address_in_key_order() {
        let payload = serde_json::value::RawValue::from_string("1".into()).unwrap();
        let m = |a: &str, v: u64| {
            let a = Address::parse(a).unwrap();
            Arc::new(Message::new(
                a,
                v,
                MessageId::parse(&format!("i{v}")).unwrap(),
                0,
                &payload,
            ))
        };
        let batch = vec![
            m("channel:b", 7),
            m("channel:a", 1),
            m("channel:b", 8),
            m("client:z", 3),
            m("channel:a", 2),
            m("channel:b", 9),
        ];
        let groups = by_address(&batch);
        let got: Vec<(&str, Vec<u64>)> = groups
            .iter()
            .map(|(a, ms)| (a.as_str(), ms.iter().map(|m| m.version).collect()))
            .collect();
        assert_eq!(
            got,
            [
                ("channel:a", vec![1, 2]),
                ("channel:b", vec![7, 8, 9]),
                ("client:z", vec![3])
            ]
        );
        assert!(by_address(&[]).is_empty());
    }

    /// Heads of a few addresses are read on the calling thread, of many in the pool: the same
    /// answers either way, pending messages included.
    #[tokio::test]
    async fn heads_are_the_same_inline_and_in_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let m = EmbeddedMailbox::open(&dir.path().join("m.redb"), 3_600_000).unwrap();
        let all: Vec<Address> = (0..INLINE_HEADS + 4)
            .map(|i| Address::parse(&format!("channel:h{i}")).unwrap())
            .collect();
        for (i, a) in all.iter().enumerate() {
            let batch = (0..=i).map(|j| msg(a, &format!("m{j}"))).collect();
            m.append(batch).await.unwrap();
        }
        let many: Vec<u64> = m
            .heads(&all)
            .await
            .unwrap()
            .iter()
            .map(|h| h.head)
            .collect();
        let expected: Vec<u64> = (1..=all.len() as u64).collect();
        assert_eq!(many, expected);
        let few = &all[all.len() - 3..];
        let heads: Vec<u64> = m.heads(few).await.unwrap().iter().map(|h| h.head).collect();
        assert_eq!(heads, expected[expected.len() - 3..]);
    }

    /// The node's mailbox opens both log files at their working size, and appends do not
    /// grow them; a test mailbox reserves nothing.
    #[tokio::test]
    async fn the_node_opens_its_logs_at_their_working_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let lens = || [0, 1].map(|g| std::fs::metadata(log_path(&path, g)).unwrap().len());
        let m = EmbeddedMailbox::open_with_cache(&path, 3_600_000, 64 << 20).unwrap();
        assert_eq!(lens(), [LOG_RESERVE; 2]);
        let a = Address::parse("channel:a").unwrap();
        for i in 0..50 {
            m.append(vec![msg(&a, &format!("m{i}"))]).await.unwrap();
        }
        assert_eq!(lens(), [LOG_RESERVE; 2]);
        drop(m);
        let bare = dir.path().join("bare.redb");
        drop(EmbeddedMailbox::open(&bare, 3_600_000).unwrap());
        assert_eq!(std::fs::metadata(log_path(&bare, 0)).unwrap().len(), 0);
    }

    /// The memory messages may wait in for the applier is an eighth of the store's cache,
    /// between 4 and 64 MiB; the applier stores when a quarter of that is pending.
    #[test]
    fn the_pending_budget_follows_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        for (i, (cache_mb, budget_mb)) in [(8, 4), (16, 4), (128, 16), (256, 32), (1024, 64)]
            .into_iter()
            .enumerate()
        {
            let m = EmbeddedMailbox::open_inner(
                &dir.path().join(format!("m{i}.redb")),
                3_600_000,
                cache_mb << 20,
                0,
            )
            .unwrap();
            let mut p = lock(&m.0.inner.pending);
            assert_eq!(p.max_bytes, budget_mb << 20, "cache {cache_mb} MiB");
            p.bytes = p.max_bytes / 4 - 1;
            assert!(!p.full());
            p.bytes += 1;
            assert!(p.full());
            p.bytes = 0;
        }
    }

    /// A batch too large to append on the calling thread, or one that could have to wait for
    /// the applier, goes to the blocking pool; either way versions continue without a gap and a
    /// resent id is a duplicate of its first append.
    #[tokio::test]
    async fn large_batches_take_the_pool_and_versions_continue_across_both_paths() {
        let dir = tempfile::tempdir().unwrap();
        let m = EmbeddedMailbox::open(&dir.path().join("m.redb"), 3_600_000).unwrap();
        let a = Address::parse("channel:a").unwrap();
        let big = |id: &str| NewMessage {
            payload: serde_json::value::RawValue::from_string(format!(
                "\"{}\"",
                "x".repeat(INLINE_BYTES / 2)
            ))
            .unwrap(),
            ..msg(&a, id)
        };
        // Near the backpressure limit even one small message goes to the pool: its signal
        // could take memory past the limit, and waiting for the applier must not hold a
        // runtime thread. (Set before any append, while the applier has nothing to change.)
        let one = [msg(&a, "n")];
        let max = lock(&m.0.inner.pending).max_bytes;
        lock(&m.0.inner.pending).bytes = max - SIGNAL_ENVELOPE_MAX;
        assert!(!m.0.inner.inline(&one));
        lock(&m.0.inner.pending).bytes = max - SIGNAL_ENVELOPE_MAX - 1;
        assert!(m.0.inner.inline(&one));
        lock(&m.0.inner.pending).bytes = 0;
        let small = vec![msg(&a, "s1"), msg(&a, "s2")];
        assert!(m.0.inner.inline(&small));
        let r = m.append(small).await.unwrap();
        assert_eq!((r[0].message.version, r[1].message.version), (1, 2));
        let large = vec![big("b1"), big("b2"), big("b3")];
        assert!(!m.0.inner.inline(&large), "over INLINE_BYTES");
        let r = m.append(large).await.unwrap();
        let versions: Vec<u64> = r.iter().map(|x| x.message.version).collect();
        assert_eq!(versions, [3, 4, 5]);
        let r = m.append(vec![msg(&a, "b2"), msg(&a, "s3")]).await.unwrap();
        assert!(r[0].duplicate);
        assert_eq!(r[0].message.version, 4);
        assert_eq!((r[1].duplicate, r[1].message.version), (false, 6));
        let page = m.read(&a, 0, 10).await.unwrap();
        let ids: Vec<&str> = page.messages.iter().map(|x| x.id.as_str()).collect();
        assert_eq!(ids, ["s1", "s2", "b1", "b2", "b3", "s3"]);
    }

    /// What a crash (SIGKILL, power loss) leaves on disk: the files as written so far, copied
    /// while the mailbox is open. redb's non-durable commits are not in its file's header.
    fn crash_image(from: &Path, to: &Path) {
        for ext in ["redb", "wal-0", "wal-1"] {
            std::fs::copy(from.with_extension(ext), to.with_extension(ext)).unwrap();
        }
    }

    /// The head of `a` in a crash image's redb file opened without its log files.
    async fn redb_alone_head(image: &Path, a: &Address) -> u64 {
        let bare = image.with_extension("bare.redb");
        std::fs::copy(image, &bare).unwrap();
        let m = EmbeddedMailbox::open(&bare, 3_600_000).unwrap();
        m.heads(std::slice::from_ref(a)).await.unwrap()[0].head
    }

    async fn versions(m: &EmbeddedMailbox, a: &Address) -> Vec<(u64, String)> {
        let page = m.read(a, 0, 1000).await.unwrap();
        page.messages
            .iter()
            .map(|x| (x.version, x.id.as_str().to_owned()))
            .collect()
    }

    /// Values written before the payload-only encoding (the whole signal after the id) read as
    /// they did, beside new ones; their ids still find them; new values hold the payload alone
    /// and read back as the same signal.
    #[tokio::test]
    async fn values_holding_the_whole_signal_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let a = Address::parse("channel:a").unwrap();
        let payload = RawValue::from_string(r#"{"k": [1, "x"]}"#.into()).unwrap();
        let old = Message::new(
            a.clone(),
            1,
            MessageId::parse("old").unwrap(),
            1234,
            &payload,
        );
        drop(EmbeddedMailbox::open(&path, 3_600_000).unwrap());
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut value = old.ts.to_le_bytes().to_vec();
                value.extend_from_slice(&3u16.to_le_bytes());
                value.extend_from_slice(b"old");
                value.extend_from_slice(old.signal.get().as_bytes());
                let mut t = txn.open_table(MESSAGES).unwrap();
                t.insert(("channel:a", 1), value.as_slice()).unwrap();
                txn.open_table(HEADS)
                    .unwrap()
                    .insert("channel:a", 1)
                    .unwrap();
                let mut ids = txn.open_table(IDS).unwrap();
                ids.insert(("channel:a", "old"), 1).unwrap();
            }
            txn.commit().unwrap();
        }
        let m = EmbeddedMailbox::open(&path, 3_600_000).unwrap();
        let r = m
            .append(vec![msg(&a, "old"), msg(&a, "new")])
            .await
            .unwrap();
        assert!(r[0].duplicate);
        assert_eq!(r[0].message.signal.get(), old.signal.get());
        assert_eq!((r[1].duplicate, r[1].message.version), (false, 2));
        let new = r[1].message.signal.get().to_owned();
        drop(m);

        let m = EmbeddedMailbox::open(&path, 3_600_000).unwrap();
        let page = m.read(&a, 0, 10).await.unwrap();
        let signals: Vec<&str> = page.messages.iter().map(|x| x.signal.get()).collect();
        assert_eq!(signals, [old.signal.get(), new.as_str()]);
        assert_eq!(page.messages[0].payload_json(), r#"{"k": [1, "x"]}"#);
        let txn = m.0.inner.db.begin_read().unwrap();
        let t = txn.open_table(MESSAGES).unwrap();
        let stored = t.get(("channel:a", 2)).unwrap().unwrap();
        assert_eq!(
            split(stored.value()).unwrap(),
            (page.messages[1].ts, "new", "1", true)
        );
    }

    /// A minted id skips the lookup on its first append, but is indexed like any other: sent
    /// again (by whoever learned it from the answer), while pending and once stored, it is a
    /// duplicate with its first version.
    #[tokio::test]
    async fn a_minted_id_sent_again_is_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let a = Address::parse("channel:a").unwrap();
        let minted = |id: &MessageId| NewMessage {
            id: id.clone(),
            new_id: true,
            ..msg(&a, "x")
        };
        let (first, second) = (MessageId::generate(), MessageId::generate());
        assert!(
            first < second,
            "minted ids sort in the order they were made"
        );
        let m = EmbeddedMailbox::open(&path, 3_600_000).unwrap();
        let r = m
            .append(vec![minted(&first), minted(&second)])
            .await
            .unwrap();
        assert_eq!((r[0].message.version, r[1].message.version), (1, 2));
        let again = m.append(vec![msg(&a, second.as_str())]).await.unwrap();
        assert!(again[0].duplicate);
        assert_eq!(again[0].message.version, 2);
        drop(m);
        // Stored in redb now (a clean stop stores everything).
        let m = EmbeddedMailbox::open(&path, 3_600_000).unwrap();
        let again = m.append(vec![msg(&a, first.as_str())]).await.unwrap();
        assert!(again[0].duplicate);
        assert_eq!(again[0].message.version, 1);
        assert_eq!(m.heads(std::slice::from_ref(&a)).await.unwrap()[0].head, 2);
    }

    #[tokio::test]
    async fn a_crash_keeps_every_logged_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (live, copy) = (dir.path().join("live.redb"), dir.path().join("copy.redb"));
        let (a, b) = (
            Address::parse("channel:a").unwrap(),
            Address::parse("channel:b").unwrap(),
        );
        let m = EmbeddedMailbox::open(&live, 3_600_000).unwrap();
        for round in 0..5 {
            let batch = (0..20)
                .map(|i| msg(if i % 3 == 0 { &b } else { &a }, &format!("r{round}-{i}")))
                .collect();
            m.append(batch).await.unwrap();
        }
        let expected_a = versions(&m, &a).await;
        let expected_b = versions(&m, &b).await;
        assert_eq!(expected_a.len() + expected_b.len(), 100);
        crash_image(&live, &copy);
        // Without the log, redb alone lost them (so the log is what keeps them).
        assert_eq!(redb_alone_head(&copy, &a).await, 0);
        // With it, every message is back at its version, ids still deduplicate, and versions go on.
        let r = EmbeddedMailbox::open(&copy, 3_600_000).unwrap();
        assert_eq!(versions(&r, &a).await, expected_a);
        assert_eq!(versions(&r, &b).await, expected_b);
        let again = r
            .append(vec![msg(&a, "r0-1"), msg(&a, "new")])
            .await
            .unwrap();
        assert!(again[0].duplicate);
        assert_eq!(again[0].message.version, 1);
        assert_eq!(again[1].message.version, expected_a.len() as u64 + 1);
        // A second crash right after the replay: the replay was durable.
        crash_image(&copy, &dir.path().join("copy2.redb"));
        let r2 = EmbeddedMailbox::open(&dir.path().join("copy2.redb"), 3_600_000).unwrap();
        assert_eq!(versions(&r2, &a).await.len(), expected_a.len() + 1);
    }

    #[tokio::test]
    async fn after_a_checkpoint_only_the_new_generation_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let (live, copy) = (dir.path().join("live.redb"), dir.path().join("copy.redb"));
        let a = Address::parse("channel:a").unwrap();
        let m = EmbeddedMailbox::open(&live, 3_600_000).unwrap();
        m.append((0..50).map(|i| msg(&a, &format!("x{i}"))).collect())
            .await
            .unwrap();
        // The applier checkpoints (durable, next generation, the other log file); the next
        // batches are logged there.
        tokio::time::sleep(CHECKPOINT_AGE + Duration::from_millis(200)).await;
        m.append(vec![msg(&a, "y0")]).await.unwrap();
        m.append(vec![msg(&a, "z0"), msg(&a, "z1")]).await.unwrap();
        crash_image(&live, &copy);
        // redb alone holds up to the checkpoint.
        assert_eq!(redb_alone_head(&copy, &a).await, 50);
        let r = EmbeddedMailbox::open(&copy, 3_600_000).unwrap();
        let got = versions(&r, &a).await;
        assert_eq!(got.len(), 53);
        assert_eq!(
            got.iter().map(|x| x.0).collect::<Vec<_>>(),
            (1..=53).collect::<Vec<_>>()
        );
        assert_eq!(got[50].1, "y0");
        assert_eq!(got[52].1, "z1");
    }

    /// A crash after the writer moved to the next log file and before the checkpoint that
    /// frees the older one was durable: both files are replayed, older first.
    #[tokio::test]
    async fn both_log_files_are_replayed_when_a_checkpoint_did_not_finish() {
        let dir = tempfile::tempdir().unwrap();
        let (live, copy) = (dir.path().join("live.redb"), dir.path().join("copy.redb"));
        let a = Address::parse("channel:a").unwrap();
        let m = EmbeddedMailbox::open(&live, 3_600_000).unwrap();
        m.append((0..3).map(|i| msg(&a, &format!("old{i}"))).collect())
            .await
            .unwrap();
        crash_image(&live, &copy);
        drop(m);
        // In the image, the writer had moved on: versions 4 and 5 in the next generation's file.
        let generation = {
            let db = Database::open(&copy).unwrap();
            let txn = db.begin_read().unwrap();
            let t = txn.open_table(LOG_TABLE).unwrap();
            t.get(LOG_GENERATION).unwrap().unwrap().value()
        };
        let (mut next, old) = Wal::open(&log_path(&copy, generation + 1), generation + 1).unwrap();
        assert!(old.is_empty());
        let mut record = Vec::new();
        let mut buf = Vec::new();
        for v in [4u64, 5] {
            let id = MessageId::parse(&format!("new{v}")).unwrap();
            let payload = RawValue::from_string("2".into()).unwrap();
            let m = Message::new(a.clone(), v, id, crate::clock::now_ms(), &payload);
            encode(&m, &mut buf);
            log_entry(&mut record, a.as_str(), v, &buf);
        }
        next.append(&record).unwrap();
        drop(next);
        let r = EmbeddedMailbox::open(&copy, 3_600_000).unwrap();
        let got = versions(&r, &a).await;
        let ids: Vec<&str> = got.iter().map(|x| x.1.as_str()).collect();
        assert_eq!(ids, ["old0", "old1", "old2", "new4", "new5"]);
        assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        // And the next append continues after them.
        let out = r.append(vec![msg(&a, "after")]).await.unwrap();
        assert_eq!(out[0].message.version, 6);
    }

    /// Reads while the applier moves messages from memory to redb: every page is whole and in
    /// order, up to its head, and no head goes back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_see_every_message_while_it_moves_to_redb() {
        let dir = tempfile::tempdir().unwrap();
        let m = EmbeddedMailbox::open(&dir.path().join("m.redb"), 3_600_000).unwrap();
        let a = Address::parse("channel:a").unwrap();
        let writer = {
            let (m, a) = (m.clone(), a.clone());
            tokio::spawn(async move {
                for round in 0..200 {
                    m.append((0..10).map(|i| msg(&a, &format!("{round}-{i}"))).collect())
                        .await
                        .unwrap();
                }
            })
        };
        let mut last_head = 0;
        let mut reads = 0;
        while last_head < 2000 {
            let page = m.read(&a, 0, 5000).await.unwrap();
            let v: Vec<u64> = page.messages.iter().map(|x| x.version).collect();
            assert_eq!(
                v,
                (1..=page.head.head).collect::<Vec<_>>(),
                "every message up to the head"
            );
            assert!(page.head.head >= last_head, "the head never goes back");
            let h = m.heads(std::slice::from_ref(&a)).await.unwrap()[0].head;
            assert!(h >= page.head.head, "heads agree with reads");
            last_head = page.head.head;
            reads += 1;
        }
        writer.await.unwrap();
        assert!(reads > 1);
    }

    #[tokio::test]
    async fn failed_batch_leaves_no_trace_and_versions_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let a = Address::parse("channel:crash").unwrap();
        {
            let m = EmbeddedMailbox::open(&path, 60_000).unwrap();
            m.append((0..3).map(|i| msg(&a, &format!("a{i}"))).collect())
                .await
                .unwrap();
            m.fail_after(5);
            let err = m
                .append((0..10).map(|i| msg(&a, &format!("b{i}"))).collect())
                .await;
            assert!(err.is_err());
            assert_eq!(m.heads(std::slice::from_ref(&a)).await.unwrap()[0].head, 3);
        }
        // Reopen, as after a crash: the failed batch left nothing, and versions go on from 3.
        let m = EmbeddedMailbox::open(&path, 60_000).unwrap();
        let out = m
            .append((0..10).map(|i| msg(&a, &format!("b{i}"))).collect())
            .await
            .unwrap();
        let versions: Vec<u64> = out.iter().map(|x| x.message.version).collect();
        assert_eq!(versions, (4..=13).collect::<Vec<_>>());
        assert!(out.iter().all(|x| !x.duplicate));
    }

    /// A backup begun while messages are pending (the applier's long window) waits for them
    /// to be stored, and copies them.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_backup_copies_what_is_still_pending() {
        let dir = tempfile::tempdir().unwrap();
        let mb = EmbeddedMailbox::open(&dir.path().join("m.redb"), 3_600_000).unwrap();
        let a = Address::parse("channel:a").unwrap();
        let batch = (0..1000).map(|i| msg(&a, &format!("i{i}"))).collect();
        mb.append(batch).await.unwrap();
        {
            let p = lock(&mb.0.inner.pending);
            assert_eq!(
                (p.appended, p.stored),
                (1000, 0),
                "pending when the backup begins"
            );
        }
        let copy = Database::create(dir.path().join("copy.redb")).unwrap();
        let txn = copy.begin_write().unwrap();
        let copied = tokio::task::block_in_place(|| mb.backup_into(&txn)).unwrap();
        txn.commit().unwrap();
        assert_eq!(copied, 1000);
        let r = copy.begin_read().unwrap();
        assert_eq!(
            r.open_table(HEADS)
                .unwrap()
                .get("channel:a")
                .unwrap()
                .unwrap()
                .value(),
            1000
        );
        assert_eq!(
            redb::ReadableTableMetadata::len(&r.open_table(IDS).unwrap()).unwrap(),
            1000
        );
    }
}
