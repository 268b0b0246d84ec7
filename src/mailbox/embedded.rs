//! The embedded mailbox: redb tables in one file under the data dir.
//!
//! Tables:
//! - `messages`: (address, version) → ts, id and the signal JSON;
//! - `heads`: address → last version (kept after expiry so versions never restart);
//! - `ids`: (address, message id) → version, for idempotent sends;
//! - `expiry`: (time bucket, address) → highest version appended in that bucket, so the expiry
//!   task finds old messages without scanning every address.
//!
//! One writer: appends are serialized by a mutex (redb allows one write transaction anyway), a
//! batch is one transaction, and versions are assigned in memory from a cache of heads that is
//! updated only after the commit succeeded. A crash mid-batch leaves the previous commit intact.

use super::storage_err as st;
use super::{Appended, Head, Mailbox, MailboxError, Message, NewMessage, Page};
use crate::address::{Address, MessageId};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const HEADS: TableDefinition<&str, u64> = TableDefinition::new("heads");
const IDS: TableDefinition<(&str, &str), u64> = TableDefinition::new("ids");
const EXPIRY: TableDefinition<(u64, &str), u64> = TableDefinition::new("expiry");

/// Largest number of cached heads before the cache is dropped and refilled from disk.
const HEAD_CACHE_MAX: usize = 1 << 20;
/// Most expiry buckets handled in one expiry transaction.
const EXPIRE_BATCH: usize = 4096;

/// The redb-backed mailbox (a cheap clone of a shared handle).
#[derive(Clone)]
pub struct EmbeddedMailbox(Arc<Inner>);

struct Inner {
    db: Arc<Database>,
    retention_ms: u64,
    bucket_ms: u64,
    /// Heads known to be committed; guarded by the single-writer mutex.
    writer: Mutex<HashMap<Address, u64>>,
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
        {
            txn.open_table(MESSAGES).map_err(st)?;
            txn.open_table(HEADS).map_err(st)?;
            txn.open_table(IDS).map_err(st)?;
            txn.open_table(EXPIRY).map_err(st)?;
        }
        txn.commit().map_err(st)?;
        Ok(Self(Arc::new(Inner {
            db: Arc::new(db),
            retention_ms,
            bucket_ms: (retention_ms / 16).clamp(100, 60_000),
            writer: Mutex::new(HashMap::new()),
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

impl Inner {
    fn append_blocking(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>, MailboxError> {
        let mut cache = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let now = crate::clock::stamp_ms();
        let txn = self.db.begin_write().map_err(st)?;
        let mut out = Vec::with_capacity(batch.len());
        let mut touched: HashMap<Address, u64> = HashMap::new();
        {
            let mut messages = txn.open_table(MESSAGES).map_err(st)?;
            let mut heads = txn.open_table(HEADS).map_err(st)?;
            let mut ids = txn.open_table(IDS).map_err(st)?;
            let mut expiry = txn.open_table(EXPIRY).map_err(st)?;
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
                let existing = ids
                    .get((m.address.as_str(), m.id.as_str()))
                    .map_err(st)?
                    .map(|g| g.value());
                if let Some(v) = existing
                    && let Some(raw) = messages.get((m.address.as_str(), v)).map_err(st)?
                {
                    let orig = Arc::new(decode(&m.address, v, raw.value())?);
                    out.push(Appended {
                        message: orig,
                        duplicate: true,
                    });
                    continue;
                }
                let head = match touched.get(&m.address).or_else(|| cache.get(&m.address)) {
                    Some(h) => *h,
                    None => heads
                        .get(m.address.as_str())
                        .map_err(st)?
                        .map(|g| g.value())
                        .unwrap_or(0),
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
                messages
                    .insert((msg.address.as_str(), version), buf.as_slice())
                    .map_err(st)?;
                ids.insert((msg.address.as_str(), msg.id.as_str()), version)
                    .map_err(st)?;
                touched.insert(msg.address.clone(), version);
                in_batch.insert(key, msg.clone());
                out.push(Appended {
                    message: msg,
                    duplicate: false,
                });
            }
            let bucket = now / self.bucket_ms;
            for (address, head) in &touched {
                heads.insert(address.as_str(), *head).map_err(st)?;
                expiry
                    .insert((bucket, address.as_str()), *head)
                    .map_err(st)?;
            }
        }
        txn.commit().map_err(st)?;
        if cache.len() + touched.len() > HEAD_CACHE_MAX {
            cache.clear();
        }
        cache.extend(touched);
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
