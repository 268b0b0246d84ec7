//! The embedded mailbox: redb tables in one file under the data dir, and a write-ahead log beside
//! it ([`super::wal`]).
//!
//! Tables:
//! - `messages`: (address, version) → ts, id and the signal JSON;
//! - `heads`: address → last version (kept after expiry so versions never restart);
//! - `ids`: (address, message id) → version, for idempotent sends;
//! - `expiry`: (time bucket, address) → highest version appended in that bucket, so the expiry
//!   task finds old messages without scanning every address;
//! - `log`: the log generation to replay after a crash (`node::datadir` keeps its own `meta`).
//!
//! One writer: appends are serialized by a mutex (redb allows one write transaction anyway), a
//! batch is one transaction, and versions are assigned in memory from a cache of heads that is
//! updated only after the commit succeeded. A crash mid-batch leaves the previous commit intact.
//!
//! Durability: a batch is written to the log (one record, one `fdatasync`) *before* its redb
//! transaction commits, non-durably; nothing is visible to a reader before it is in the log. At a
//! checkpoint (every [`CHECKPOINT_BYTES`] of log or [`CHECKPOINT_AGE`], whichever first) the
//! batch's own commit is durable instead, records the next log generation, and the log starts
//! over. Opening the mailbox replays the log's records past each address's durable head.

use super::storage_err as st;
use super::wal::Wal;
use super::{Appended, Head, Mailbox, MailboxError, Message, NewMessage, Page};
use crate::address::{Address, MessageId};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const HEADS: TableDefinition<&str, u64> = TableDefinition::new("heads");
const IDS: TableDefinition<(&str, &str), u64> = TableDefinition::new("ids");
const EXPIRY: TableDefinition<(u64, &str), u64> = TableDefinition::new("expiry");
const LOG_TABLE: TableDefinition<&str, u64> = TableDefinition::new("log");
/// The `meta` key of the log generation that holds what redb's durable state may lack.
const LOG_GENERATION: &str = "log_generation";

/// Log bytes after which the next batch commits durably and the log starts over.
pub const CHECKPOINT_BYTES: u64 = 8 << 20;
/// Time after which the next batch commits durably (bounds the redb pages not yet synced, and
/// the work of a replay).
pub const CHECKPOINT_AGE: Duration = Duration::from_secs(1);
/// A batch whose log record would be larger than this commits durably instead of being logged.
const MAX_RECORD: usize = 32 << 20;

/// Largest number of cached heads before the cache is dropped and refilled from disk.
const HEAD_CACHE_MAX: usize = 1 << 20;
/// Most expiry buckets handled in one expiry transaction.
const EXPIRE_BATCH: usize = 4096;

struct Writer {
    heads: HashMap<Address, u64>,
    log: Wal,
    /// The generation the log writes; redb's `meta` says the same.
    generation: u64,
    last_checkpoint: Instant,
    /// The record being built (kept to reuse its allocation).
    record: Vec<u8>,
}

/// The redb-backed mailbox (a cheap clone of a shared handle).
#[derive(Clone)]
pub struct EmbeddedMailbox(Arc<Inner>);

struct Inner {
    db: Arc<Database>,
    retention_ms: u64,
    bucket_ms: u64,
    /// The single writer: heads known to be committed, and the log.
    writer: Mutex<Writer>,
    /// A batch reached the log but not redb: the heads in memory are no longer known to be
    /// right, so appends are refused until a restart replays the log.
    broken: AtomicBool,
    #[cfg(test)]
    fail_after: std::sync::atomic::AtomicUsize,
}

impl EmbeddedMailbox {
    /// Opens (or creates) the mailbox file, with redb's default cache (1 GiB).
    pub fn open(path: &Path, retention_ms: u64) -> Result<Self, MailboxError> {
        Self::open_with_cache(path, retention_ms, 1 << 30)
    }

    /// Opens (or creates) the mailbox file; redb caches at most `cache_bytes` of its pages in
    /// memory (the bound on the store's share of the node's memory, whatever the file's size).
    pub fn open_with_cache(
        path: &Path,
        retention_ms: u64,
        cache_bytes: usize,
    ) -> Result<Self, MailboxError> {
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(st)?;
        let txn = db.begin_write().map_err(st)?;
        let (log, generation) = {
            let mut messages = txn.open_table(MESSAGES).map_err(st)?;
            let mut heads = txn.open_table(HEADS).map_err(st)?;
            let mut ids = txn.open_table(IDS).map_err(st)?;
            let mut expiry = txn.open_table(EXPIRY).map_err(st)?;
            let mut meta = txn.open_table(LOG_TABLE).map_err(st)?;
            let generation = meta
                .get(LOG_GENERATION)
                .map_err(st)?
                .map_or(0, |g| g.value());
            let (log, records) = Wal::open(&path.with_extension("wal"), generation).map_err(st)?;
            let bucket_ms = bucket_ms(retention_ms);
            let mut tables = Tables {
                messages: &mut messages,
                heads: &mut heads,
                ids: &mut ids,
                expiry: &mut expiry,
            };
            let (mut replayed, mut skipped) = (0, 0);
            for r in &records {
                let (n, k) = tables.replay(r, bucket_ms)?;
                replayed += n;
                skipped += k;
            }
            if !records.is_empty() {
                tracing::info!(
                    records = records.len(),
                    replayed,
                    already_stored = skipped,
                    "mailbox log replayed"
                );
            }
            meta.insert(LOG_GENERATION, generation + 1).map_err(st)?;
            (log, generation + 1)
        };
        // Durable (the default): the replayed messages and the new generation.
        txn.commit().map_err(st)?;
        let mut log = log;
        log.restart(generation);
        Ok(Self(Arc::new(Inner {
            db: Arc::new(db),
            retention_ms,
            bucket_ms: bucket_ms(retention_ms),
            writer: Mutex::new(Writer {
                heads: HashMap::new(),
                log,
                generation,
                last_checkpoint: Instant::now(),
                record: Vec::new(),
            }),
            broken: AtomicBool::new(false),
            #[cfg(test)]
            fail_after: std::sync::atomic::AtomicUsize::new(usize::MAX),
        })))
    }

    #[cfg(test)]
    fn fail_after(&self, n: usize) {
        self.0
            .fail_after
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }
}

fn bucket_ms(retention_ms: u64) -> u64 {
    (retention_ms / 16).clamp(100, 60_000)
}

/// The tables an append writes.
struct Tables<'a, 't> {
    messages: &'a mut Table<'t, (&'static str, u64), &'static [u8]>,
    heads: &'a mut Table<'t, &'static str, u64>,
    ids: &'a mut Table<'t, (&'static str, &'static str), u64>,
    expiry: &'a mut Table<'t, (u64, &'static str), u64>,
}

impl Tables<'_, '_> {
    fn head(&self, address: &str) -> Result<u64, MailboxError> {
        Ok(self
            .heads
            .get(address)
            .map_err(st)?
            .map_or(0, |g| g.value()))
    }

    /// Writes one message row (`value` as [`encode`] made it) and its id.
    fn insert(
        &mut self,
        address: &str,
        version: u64,
        id: &str,
        value: &[u8],
    ) -> Result<(), MailboxError> {
        self.messages
            .insert((address, version), value)
            .map_err(st)?;
        self.ids.insert((address, id), version).map_err(st)?;
        Ok(())
    }

    /// Moves the heads (and their expiry bucket) to what a batch appended.
    fn set_heads(
        &mut self,
        touched: &HashMap<Address, u64>,
        bucket: u64,
    ) -> Result<(), MailboxError> {
        for (address, head) in touched {
            self.heads.insert(address.as_str(), *head).map_err(st)?;
            self.expiry
                .insert((bucket, address.as_str()), *head)
                .map_err(st)?;
        }
        Ok(())
    }

    /// Applies one log record: each message past its address's stored head. Returns (applied,
    /// already stored).
    fn replay(&mut self, record: &[u8], bucket_ms: u64) -> Result<(u64, u64), MailboxError> {
        let (mut applied, mut skipped) = (0, 0);
        let mut touched: HashMap<Address, u64> = HashMap::new();
        let mut ts = 0;
        for entry in LogEntries(record) {
            let (address, version, value) = entry?;
            let head = match touched.get(address) {
                Some(h) => *h,
                None => self.head(address)?,
            };
            if version <= head {
                skipped += 1;
                continue;
            }
            if version != head + 1 {
                return Err(MailboxError::Storage(format!(
                    "the mailbox log has {address} version {version} after head {head}"
                )));
            }
            let (t, id, _) = split(value)?;
            ts = t;
            self.insert(address, version, id, value)?;
            let address = Address::parse(address).map_err(st)?;
            touched.insert(address, version);
            applied += 1;
        }
        // One batch, one stamp: its messages share `ts` and so the expiry bucket.
        self.set_heads(&touched, ts / bucket_ms)?;
        Ok((applied, skipped))
    }
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

impl Inner {
    fn append_blocking(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>, MailboxError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if self.broken.load(Ordering::SeqCst) {
            return Err(MailboxError::Storage(
                "an earlier batch was logged but not stored: restart the node to replay the log"
                    .into(),
            ));
        }
        let w = &mut *w;
        let size: usize = batch
            .iter()
            .map(|m| m.address.as_str().len() + m.id.as_str().len() + m.payload.get().len() + 128)
            .sum();
        // This batch's commit is durable (a checkpoint) or logged.
        let checkpoint = w.log.written() >= CHECKPOINT_BYTES
            || w.last_checkpoint.elapsed() >= CHECKPOINT_AGE
            || size > MAX_RECORD;
        let now = crate::clock::stamp_ms();
        let mut txn = self.db.begin_write().map_err(st)?;
        if !checkpoint {
            txn.set_durability(Durability::None).map_err(st)?;
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut touched: HashMap<Address, u64> = HashMap::new();
        w.record.clear();
        {
            let mut messages = txn.open_table(MESSAGES).map_err(st)?;
            let mut heads = txn.open_table(HEADS).map_err(st)?;
            let mut ids = txn.open_table(IDS).map_err(st)?;
            let mut expiry = txn.open_table(EXPIRY).map_err(st)?;
            let mut tables = Tables {
                messages: &mut messages,
                heads: &mut heads,
                ids: &mut ids,
                expiry: &mut expiry,
            };
            let mut in_batch: HashMap<(Address, MessageId), Arc<Message>> = HashMap::new();
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
                let existing = tables
                    .ids
                    .get((m.address.as_str(), m.id.as_str()))
                    .map_err(st)?
                    .map(|g| g.value());
                if let Some(v) = existing
                    && let Some(raw) = tables.messages.get((m.address.as_str(), v)).map_err(st)?
                {
                    let orig = Arc::new(decode(&m.address, v, raw.value())?);
                    out.push(Appended {
                        message: orig,
                        duplicate: true,
                    });
                    continue;
                }
                let head = match touched.get(&m.address).or_else(|| w.heads.get(&m.address)) {
                    Some(h) => *h,
                    None => tables.head(m.address.as_str())?,
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
                tables.insert(msg.address.as_str(), version, msg.id.as_str(), &buf)?;
                if !checkpoint {
                    log_entry(&mut w.record, msg.address.as_str(), version, &buf);
                }
                touched.insert(msg.address.clone(), version);
                in_batch.insert(key, msg.clone());
                out.push(Appended {
                    message: msg,
                    duplicate: false,
                });
            }
            tables.set_heads(&touched, now / self.bucket_ms)?;
            if checkpoint {
                let mut meta = txn.open_table(LOG_TABLE).map_err(st)?;
                meta.insert(LOG_GENERATION, w.generation + 1).map_err(st)?;
            }
        }
        if !checkpoint && !w.record.is_empty() {
            // In the log before it is visible: a reader never sees what a crash could take back.
            if let Err(e) = w.log.append(&w.record) {
                let _ = txn.abort();
                return Err(st(format_args!("writing the mailbox log: {e}")));
            }
        }
        if let Err(e) = txn.commit() {
            if !checkpoint && !w.record.is_empty() {
                self.broken.store(true, Ordering::SeqCst);
                tracing::error!(error = %e, "a logged batch was not stored; appends stop until a restart replays the log");
            }
            return Err(st(e));
        }
        if checkpoint {
            w.generation += 1;
            w.log.restart(w.generation);
            w.last_checkpoint = Instant::now();
        }
        if w.heads.len() + touched.len() > HEAD_CACHE_MAX {
            w.heads.clear();
        }
        w.heads.extend(touched);
        Ok(out)
    }

    fn read_blocking(
        &self,
        address: &Address,
        after: u64,
        limit: usize,
    ) -> Result<Page, MailboxError> {
        let txn = self.db.begin_read().map_err(st)?;
        let messages = txn.open_table(MESSAGES).map_err(st)?;
        let heads = txn.open_table(HEADS).map_err(st)?;
        let head = head_in(&heads, &messages, address)?;
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
        Ok(Page {
            head,
            messages: out,
        })
    }

    fn heads_blocking(&self, addresses: &[Address]) -> Result<Vec<Head>, MailboxError> {
        let txn = self.db.begin_read().map_err(st)?;
        let messages = txn.open_table(MESSAGES).map_err(st)?;
        let heads = txn.open_table(HEADS).map_err(st)?;
        addresses
            .iter()
            .map(|a| head_in(&heads, &messages, a))
            .collect()
    }

    fn expire_blocking(&self, now: u64) -> Result<u64, MailboxError> {
        let cutoff = now.saturating_sub(self.retention_ms);
        // Every message in bucket b has ts < (b + 1) * bucket_ms; expire whole buckets only.
        let last_bucket = (cutoff / self.bucket_ms).checked_sub(1);
        let Some(last_bucket) = last_bucket else {
            return Ok(0);
        };
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
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

/// Stored value: ts (u64 LE), id length (u16 LE), id, signal JSON.
fn encode(m: &Message, buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&m.ts.to_le_bytes());
    buf.extend_from_slice(&(m.id.as_str().len() as u16).to_le_bytes());
    buf.extend_from_slice(m.id.as_str().as_bytes());
    buf.extend_from_slice(m.signal.get().as_bytes());
}

fn split(raw: &[u8]) -> Result<(u64, &str, &str), MailboxError> {
    let bad = || MailboxError::Storage("corrupt mailbox record".into());
    if raw.len() < 10 {
        return Err(bad());
    }
    let ts = u64::from_le_bytes(raw[0..8].try_into().map_err(|_| bad())?);
    let n = u16::from_le_bytes(raw[8..10].try_into().map_err(|_| bad())?) as usize;
    let id = std::str::from_utf8(raw.get(10..10 + n).ok_or_else(bad)?).map_err(|_| bad())?;
    let json = std::str::from_utf8(&raw[10 + n..]).map_err(|_| bad())?;
    Ok((ts, id, json))
}

fn decode_id(raw: &[u8]) -> Result<String, MailboxError> {
    Ok(split(raw)?.1.to_owned())
}

fn decode(address: &Address, version: u64, raw: &[u8]) -> Result<Message, MailboxError> {
    let (ts, id, json) = split(raw)?;
    let id = MessageId::parse(id).map_err(st)?;
    let signal = RawValue::from_string(json.to_owned()).map_err(st)?;
    Ok(Message {
        address: address.clone(),
        version,
        id,
        ts,
        signal,
    })
}

#[async_trait::async_trait]
impl Mailbox for EmbeddedMailbox {
    async fn append(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>, MailboxError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let this = self.0.clone();
        run_blocking(move || this.append_blocking(batch)).await
    }

    async fn read(
        &self,
        address: &Address,
        after: u64,
        limit: usize,
    ) -> Result<Page, MailboxError> {
        let this = self.0.clone();
        let address = address.clone();
        run_blocking(move || this.read_blocking(&address, after, limit)).await
    }

    async fn heads(&self, addresses: &[Address]) -> Result<Vec<Head>, MailboxError> {
        let this = self.0.clone();
        let addresses = addresses.to_vec();
        run_blocking(move || this.heads_blocking(&addresses)).await
    }

    async fn expire(&self, now_ms: u64) -> Result<u64, MailboxError> {
        let this = self.0.clone();
        run_blocking(move || this.expire_blocking(now_ms)).await
    }

    async fn healthy(&self) -> Result<(), MailboxError> {
        if self.0.broken.load(Ordering::SeqCst) {
            return Err(MailboxError::Storage(
                "a logged batch was not stored: restart the node to replay the mailbox log".into(),
            ));
        }
        self.0.db.begin_read().map(|_| ()).map_err(st)
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

    /// What a crash (SIGKILL, power loss) leaves on disk: the files as written so far, copied
    /// while the mailbox is open. redb's non-durable commits are not in its file's header.
    fn crash_image(from: &Path, to: &Path) {
        for ext in ["redb", "wal"] {
            std::fs::copy(from.with_extension(ext), to.with_extension(ext)).unwrap();
        }
    }

    async fn versions(m: &EmbeddedMailbox, a: &Address) -> Vec<(u64, String)> {
        let page = m.read(a, 0, 1000).await.unwrap();
        page.messages
            .iter()
            .map(|x| (x.version, x.id.as_str().to_owned()))
            .collect()
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
        std::fs::copy(&copy, dir.path().join("bare.redb")).unwrap();
        let bare = EmbeddedMailbox::open(&dir.path().join("bare.redb"), 3_600_000).unwrap();
        assert_eq!(
            bare.heads(std::slice::from_ref(&a)).await.unwrap()[0].head,
            0
        );
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
        tokio::time::sleep(CHECKPOINT_AGE + Duration::from_millis(100)).await;
        // This batch is the checkpoint (durable, next generation); the next one is logged from
        // the start of the log, over the older generation's records.
        m.append(vec![msg(&a, "y0")]).await.unwrap();
        m.append(vec![msg(&a, "z0"), msg(&a, "z1")]).await.unwrap();
        crash_image(&live, &copy);
        // redb alone holds up to the checkpoint.
        std::fs::copy(&copy, dir.path().join("bare.redb")).unwrap();
        let bare = EmbeddedMailbox::open(&dir.path().join("bare.redb"), 3_600_000).unwrap();
        assert_eq!(
            bare.heads(std::slice::from_ref(&a)).await.unwrap()[0].head,
            51
        );
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
}
