//! The Cassandra mailbox: bucketed partitions with a static head as the compare-and-set fence.
//!
//! Tables (see `schema/002_tables.cql` and `docs/cassandra.md`):
//! - `mailbox_messages` ((address, bucket), version) with `head` STATIC: the messages, and the
//!   authority on the last version of each bucket;
//! - `mailbox_heads` address → head: a hint of the last version (monotonic by write timestamp);
//! - `mailbox_ids` ((address, id), version): candidate versions of a message id, written before
//!   the append and checked against the message row;
//! - `mailbox_config`: the bucket size, fixed for the life of the keyspace.
//!
//! An append of one address writes the new rows of one bucket as ONE conditional
//! single-partition batch (`… IF head = expected`): one Paxos round per address and bucket, not
//! per message. Versions are assigned in memory from the known head; a failed condition means
//! another writer appended, so the head is refreshed and the rest retried. Within one process
//! appends to one address are serialized by an async mutex, which also holds the cached head.

use super::storage_err as st;
use super::{Appended, Head, Mailbox, MailboxError, Message, NewMessage, Page, now_ms};
use crate::address::{Address, MessageId};
use futures_util::{StreamExt, TryStreamExt, stream};
use scylla::client::session::Session;
use scylla::response::query_result::QueryResult;
use scylla::serialize::SerializationError;
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::statement::Consistency;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, CqlValue};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Default number of versions per bucket partition (fixed per keyspace once written).
pub const DEFAULT_BUCKET_SIZE: u64 = 10_000;
/// Addresses appended concurrently within one `append` call.
const ADDRESS_CONCURRENCY: usize = 64;
/// Requests in flight for the ids of one address (lookups and candidate writes).
const ID_CONCURRENCY: usize = 32;
/// Ids per `IN` lookup.
const IDS_PER_LOOKUP: usize = 50;
/// Rows in one conditional batch, and their payload bytes (Cassandra refuses batches over
/// `batch_size_fail_threshold`, 1 MiB here).
const MAX_BATCH_ROWS: usize = 1000;
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Conditional batches that may fail on one address within one call before it gives up.
const MAX_CONFLICTS: usize = 16;
/// Cached per-address state is dropped (those not in use) past this many addresses.
const CACHE_MAX: usize = 1 << 18;

fn unavailable(e: impl std::fmt::Display) -> MailboxError {
    MailboxError::Unavailable(e.to_string())
}

/// The Cassandra-backed mailbox (a cheap clone of a shared handle).
#[derive(Clone)]
pub struct CassandraMailbox(Arc<Inner>);

struct Inner {
    session: Arc<Session>,
    ttl_secs: i32,
    bucket_size: u64,
    st: Statements,
    /// Per address: the async mutex serializing this process's appends, holding the head this
    /// process knows to be the latest (None: unknown, read it from Cassandra).
    writers: Mutex<HashMap<Address, Arc<tokio::sync::Mutex<Option<u64>>>>>,
    /// Per address: the lowest bucket that may still hold a live row (only ever grows).
    low_buckets: Mutex<HashMap<Address, u64>>,
}

struct Statements {
    insert_message: PreparedStatement,
    cas_head: PreparedStatement,
    static_head_serial: PreparedStatement,
    static_head: PreparedStatement,
    hint: PreparedStatement,
    set_hint: PreparedStatement,
    ids_lookup: PreparedStatement,
    ids_insert: PreparedStatement,
    read_one: PreparedStatement,
    page: PreparedStatement,
    first_live: PreparedStatement,
    health: PreparedStatement,
}

/// One statement's values in the conditional batch: a message row or the head update.
enum BatchRow<'a> {
    Message(&'a str, i64, i64, &'a str, CqlTimestamp, &'a str, i32),
    Head(i64, &'a str, i64, Option<i64>),
}

impl SerializeRow for BatchRow<'_> {
    fn serialize(
        &self,
        ctx: &RowSerializationContext<'_>,
        writer: &mut RowWriter,
    ) -> Result<(), SerializationError> {
        match *self {
            BatchRow::Message(a, b, v, id, ts, p, ttl) => {
                (a, b, v, id, ts, p, ttl).serialize(ctx, writer)
            }
            BatchRow::Head(h, a, b, e) => (h, a, b, e).serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// A message waiting for a version, with the positions in the caller's batch it answers.
struct Pending {
    msg: NewMessage,
    slots: Vec<usize>,
}

impl CassandraMailbox {
    /// Prepares the statements and fixes the bucket size: the one already stored in the
    /// keyspace wins over `bucket_size`. The schema must have been applied
    /// ([`crate::cassandra::open`]).
    pub async fn new(
        session: Arc<Session>,
        keyspace: &str,
        retention_ms: u64,
        bucket_size: u64,
    ) -> Result<Self, MailboxError> {
        if !crate::cassandra::valid_keyspace(keyspace) {
            return Err(st(format!("invalid keyspace {keyspace:?}")));
        }
        let ks = keyspace;
        let prep = |cql: String, consistency: Option<Consistency>| {
            let session = session.clone();
            async move {
                let mut p = session.prepare(cql).await.map_err(unavailable)?;
                if let Some(c) = consistency {
                    p.set_consistency(c);
                }
                Ok::<_, MailboxError>(p)
            }
        };
        let mut config = prep(
            format!("INSERT INTO {ks}.mailbox_config (name, value) VALUES ('bucket_size', ?) IF NOT EXISTS"),
            None,
        )
        .await?;
        config.set_is_idempotent(true);
        session
            .execute_unpaged(&config, (bucket_size.max(1) as i64,))
            .await
            .map_err(unavailable)?;
        let read_config = prep(
            format!("SELECT value FROM {ks}.mailbox_config WHERE name = 'bucket_size'"),
            Some(Consistency::Serial),
        )
        .await?;
        let stored = one_bigint(&session, &read_config, ()).await?;
        let bucket_size = match stored {
            Some(v) if v > 0 => v as u64,
            _ => return Err(st("mailbox_config has no bucket_size")),
        };
        let mut s = Statements {
            insert_message: prep(
                format!(
                    "INSERT INTO {ks}.mailbox_messages (address, bucket, version, id, ts, payload) \
                     VALUES (?, ?, ?, ?, ?, ?) USING TTL ?"
                ),
                None,
            )
            .await?,
            cas_head: prep(
                format!(
                    "UPDATE {ks}.mailbox_messages SET head = ? WHERE address = ? AND bucket = ? IF head = ?"
                ),
                None,
            )
            .await?,
            static_head_serial: prep(
                format!(
                    "SELECT head FROM {ks}.mailbox_messages WHERE address = ? AND bucket = ? LIMIT 1"
                ),
                Some(Consistency::Serial),
            )
            .await?,
            static_head: prep(
                format!(
                    "SELECT head FROM {ks}.mailbox_messages WHERE address = ? AND bucket = ? LIMIT 1"
                ),
                None,
            )
            .await?,
            hint: prep(
                format!("SELECT head FROM {ks}.mailbox_heads WHERE address = ?"),
                None,
            )
            .await?,
            set_hint: prep(
                format!(
                    "UPDATE {ks}.mailbox_heads USING TIMESTAMP ? SET head = ? WHERE address = ?"
                ),
                None,
            )
            .await?,
            ids_lookup: prep(
                format!(
                    "SELECT id, version FROM {ks}.mailbox_ids WHERE address = ? AND id IN ?"
                ),
                None,
            )
            .await?,
            ids_insert: prep(
                format!(
                    "INSERT INTO {ks}.mailbox_ids (address, id, version) VALUES (?, ?, ?) USING TTL ?"
                ),
                None,
            )
            .await?,
            read_one: prep(
                format!(
                    "SELECT id, ts, payload FROM {ks}.mailbox_messages \
                     WHERE address = ? AND bucket = ? AND version = ?"
                ),
                None,
            )
            .await?,
            page: prep(
                format!(
                    "SELECT version, id, ts, payload FROM {ks}.mailbox_messages \
                     WHERE address = ? AND bucket = ? AND version >= ? AND version <= ? LIMIT ?"
                ),
                None,
            )
            .await?,
            first_live: prep(
                format!(
                    "SELECT version FROM {ks}.mailbox_messages \
                     WHERE address = ? AND bucket = ? AND version > 0 LIMIT 1"
                ),
                None,
            )
            .await?,
            health: prep("SELECT release_version FROM system.local".into(), None).await?,
        };
        // Plain writes and reads may be retried by the driver; the conditional batch may not.
        for p in [
            &mut s.insert_message,
            &mut s.set_hint,
            &mut s.ids_insert,
            &mut s.static_head,
            &mut s.static_head_serial,
            &mut s.hint,
            &mut s.ids_lookup,
            &mut s.read_one,
            &mut s.page,
            &mut s.first_live,
            &mut s.health,
        ] {
            p.set_is_idempotent(true);
        }
        let ttl_secs = retention_ms.div_ceil(1000).clamp(1, 630_720_000) as i32;
        Ok(Self(Arc::new(Inner {
            session,
            ttl_secs,
            bucket_size,
            st: s,
            writers: Mutex::new(HashMap::new()),
            low_buckets: Mutex::new(HashMap::new()),
        })))
    }

    /// The bucket size in use (the one stored in the keyspace).
    pub fn bucket_size(&self) -> u64 {
        self.0.bucket_size
    }
}

impl Inner {
    /// The bucket holding `version` (≥ 1).
    fn bucket(&self, version: u64) -> u64 {
        (version.max(1) - 1) / self.bucket_size
    }

    fn writer(&self, address: &Address) -> Arc<tokio::sync::Mutex<Option<u64>>> {
        let mut map = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= CACHE_MAX && !map.contains_key(address) {
            map.retain(|_, w| Arc::strong_count(w) > 1);
        }
        map.entry(address.clone()).or_default().clone()
    }

    async fn hint(&self, address: &Address) -> Result<u64, MailboxError> {
        let hint = one_bigint(&self.session, &self.st.hint, (address.as_str(),)).await?;
        Ok(hint.unwrap_or(0).max(0) as u64)
    }

    async fn static_head(
        &self,
        address: &Address,
        bucket: u64,
        serial: bool,
    ) -> Result<Option<u64>, MailboxError> {
        let stmt = if serial {
            &self.st.static_head_serial
        } else {
            &self.st.static_head
        };
        let head = one_bigint(&self.session, stmt, (address.as_str(), bucket as i64)).await?;
        Ok(head.map(|h| h as u64))
    }

    /// The true head of an address: from the hint, walk the static heads forward while buckets
    /// are full. `serial` (writers) reads at SERIAL, which also finishes any Paxos round left in
    /// flight (a writer that timed out or died mid-append), so the answer is definite.
    async fn resolve_head(&self, address: &Address, serial: bool) -> Result<u64, MailboxError> {
        let hint = self.hint(address).await?;
        let mut bucket = if hint == 0 { 0 } else { self.bucket(hint) };
        loop {
            let full = (bucket + 1) * self.bucket_size;
            match self.static_head(address, bucket, serial).await? {
                None if hint > bucket * self.bucket_size => {
                    return Err(st(format!(
                        "mailbox of {address}: head hint {hint} but bucket {bucket} has no head"
                    )));
                }
                None => return Ok(bucket * self.bucket_size),
                Some(h) if h >= full => bucket += 1,
                Some(h) => return Ok(h),
            }
        }
    }

    async fn read_message(
        &self,
        address: &Address,
        version: u64,
    ) -> Result<Option<Message>, MailboxError> {
        let res = self
            .session
            .execute_unpaged(
                &self.st.read_one,
                (
                    address.as_str(),
                    self.bucket(version) as i64,
                    version as i64,
                ),
            )
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(st)?;
        let row: Option<(Option<&str>, Option<CqlTimestamp>, Option<&str>)> =
            res.maybe_first_row().map_err(st)?;
        match row {
            Some((Some(id), ts, Some(payload))) => Ok(Some(build(
                address,
                version,
                id,
                ts.map(|t| t.0).unwrap_or(0),
                payload,
            )?)),
            _ => Ok(None),
        }
    }

    /// Which of `ids` were appended to `address` at a version ≤ `known` and still exist: a
    /// candidate counts only if the message row at its version carries the id.
    async fn find_appended(
        &self,
        address: &Address,
        ids: Vec<MessageId>,
        known: u64,
    ) -> Result<HashMap<MessageId, Arc<Message>>, MailboxError> {
        if known == 0 || ids.is_empty() {
            return Ok(HashMap::new());
        }
        let chunks: Vec<Vec<MessageId>> = ids.chunks(IDS_PER_LOOKUP).map(|c| c.to_vec()).collect();
        let candidates: Vec<Vec<(String, u64)>> = stream::iter(chunks)
            .map(|chunk| async move {
                let list: Vec<&str> = chunk.iter().map(|i| i.as_str()).collect();
                let res = self
                    .session
                    .execute_unpaged(&self.st.ids_lookup, (address.as_str(), list))
                    .await
                    .map_err(unavailable)?
                    .into_rows_result()
                    .map_err(st)?;
                let mut out = Vec::new();
                for row in res.rows::<(&str, i64)>().map_err(st)? {
                    let (id, v) = row.map_err(st)?;
                    if v > 0 && (v as u64) <= known {
                        out.push((id.to_owned(), v as u64));
                    }
                }
                Ok::<_, MailboxError>(out)
            })
            .buffer_unordered(ID_CONCURRENCY)
            .try_collect()
            .await?;
        let mut by_id: HashMap<String, Vec<u64>> = HashMap::new();
        for (id, v) in candidates.into_iter().flatten() {
            by_id.entry(id).or_default().push(v);
        }
        let checks = by_id.into_iter().map(|(id, mut versions)| async move {
            versions.sort_unstable();
            for v in versions {
                if let Some(m) = self.read_message(address, v).await?
                    && m.id.as_str() == id
                {
                    return Ok::<_, MailboxError>(Some(m));
                }
            }
            Ok(None)
        });
        let found: Vec<Option<Message>> = stream::iter(checks)
            .buffer_unordered(ID_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(found
            .into_iter()
            .flatten()
            .map(|m| (m.id.clone(), Arc::new(m)))
            .collect())
    }

    /// Writes the candidate rows (id → intended version) of a chunk before its conditional batch.
    async fn write_candidates(
        &self,
        address: &Address,
        chunk: &[Pending],
        first: u64,
    ) -> Result<(), MailboxError> {
        // Futures are built first (not in a combinator's closure) so the async-trait futures
        // that hold them stay `Send` for any lifetime.
        let writes: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, p)| {
                self.session.execute_unpaged(
                    &self.st.ids_insert,
                    (
                        address.as_str(),
                        p.msg.id.as_str(),
                        (first + i as u64) as i64,
                        self.ttl_secs,
                    ),
                )
            })
            .collect();
        stream::iter(writes)
            .buffer_unordered(ID_CONCURRENCY)
            .map_err(unavailable)
            .try_for_each(|_| async { Ok(()) })
            .await
    }

    /// One conditional batch: rows `known + 1 ..` of one bucket and the head moved to the last,
    /// if the head is still `known`. Ok(None) when applied, Ok(Some(current)) when not.
    async fn cas_batch(
        &self,
        address: &Address,
        chunk: &[Pending],
        known: u64,
        ts: u64,
    ) -> Result<Option<Option<u64>>, MailboxError> {
        let first = known + 1;
        let last = known + chunk.len() as u64;
        let bucket = self.bucket(first) as i64;
        let expected = if known.is_multiple_of(self.bucket_size) {
            None
        } else {
            Some(known as i64)
        };
        let mut batch = Batch::new(BatchType::Unlogged);
        let mut values = Vec::with_capacity(chunk.len() + 1);
        for (i, p) in chunk.iter().enumerate() {
            batch.append_statement(self.st.insert_message.clone());
            values.push(BatchRow::Message(
                address.as_str(),
                bucket,
                (first + i as u64) as i64,
                p.msg.id.as_str(),
                CqlTimestamp(ts as i64),
                p.msg.payload.get(),
                self.ttl_secs,
            ));
        }
        batch.append_statement(self.st.cas_head.clone());
        values.push(BatchRow::Head(
            last as i64,
            address.as_str(),
            bucket,
            expected,
        ));
        let res = self
            .session
            .batch(&batch, values)
            .await
            .map_err(unavailable)?;
        lwt_outcome(res, "head")
    }

    async fn append_address(
        &self,
        address: Address,
        items: Vec<(usize, NewMessage)>,
    ) -> Result<Vec<(usize, Appended)>, MailboxError> {
        let lock = self.writer(&address);
        let mut cached = lock.lock().await;
        let mut known = match *cached {
            Some(h) => h,
            None => self.resolve_head(&address, true).await?,
        };
        // Duplicates within the batch answer with the first occurrence.
        let mut pending: Vec<Pending> = Vec::new();
        let mut index: HashMap<MessageId, usize> = HashMap::new();
        for (slot, msg) in items {
            match index.get(&msg.id) {
                Some(&i) => pending[i].slots.push(slot),
                None => {
                    index.insert(msg.id.clone(), pending.len());
                    pending.push(Pending {
                        msg,
                        slots: vec![slot],
                    });
                }
            }
        }
        let mut out = Vec::new();
        let push = |out: &mut Vec<(usize, Appended)>, slots: &[usize], m: &Arc<Message>, dup| {
            for (k, &slot) in slots.iter().enumerate() {
                out.push((
                    slot,
                    Appended {
                        message: m.clone(),
                        duplicate: dup || k > 0,
                    },
                ));
            }
        };
        let now = now_ms();
        let mut conflicts = 0;
        let mut check_ids = true;
        while !pending.is_empty() {
            if check_ids {
                // After learning `known`: any id appended at ≤ known has its candidate row
                // written before that append, hence before we learned it.
                let ids = pending.iter().map(|p| p.msg.id.clone()).collect();
                let found = self.find_appended(&address, ids, known).await?;
                if !found.is_empty() {
                    pending.retain(|p| match found.get(&p.msg.id) {
                        Some(m) => {
                            push(&mut out, &p.slots, m, true);
                            false
                        }
                        None => true,
                    });
                }
                check_ids = false;
                continue;
            }
            // The next chunk: one bucket, bounded rows and bytes.
            let room = (self.bucket(known + 1) + 1) * self.bucket_size - known;
            let mut n = 0;
            let mut bytes = 0;
            for p in &pending {
                let size = p.msg.payload.get().len() + p.msg.id.as_str().len() + 64;
                if n as u64 >= room
                    || n >= MAX_BATCH_ROWS
                    || (n > 0 && bytes + size > MAX_BATCH_BYTES)
                {
                    break;
                }
                n += 1;
                bytes += size;
            }
            let chunk = &pending[..n];
            let written = async {
                self.write_candidates(&address, chunk, known + 1).await?;
                self.cas_batch(&address, chunk, known, now).await
            }
            .await;
            match written {
                Ok(None) => {
                    for (i, p) in pending.drain(..n).enumerate() {
                        let m = Arc::new(Message::new(
                            address.clone(),
                            known + 1 + i as u64,
                            p.msg.id,
                            now,
                            &p.msg.payload,
                        ));
                        push(&mut out, &p.slots, &m, false);
                    }
                    known += n as u64;
                    *cached = Some(known);
                }
                Ok(Some(current)) => {
                    // Another writer appended: learn the true head and re-check the ids.
                    *cached = None;
                    conflicts += 1;
                    if conflicts >= MAX_CONFLICTS {
                        return Err(MailboxError::Unavailable(format!(
                            "address {address} is being written concurrently by another writer \
                             ({conflicts} conflicting appends); try again"
                        )));
                    }
                    let bucket_end = (self.bucket(known + 1) + 1) * self.bucket_size;
                    known = match current {
                        Some(h) if h < bucket_end && h > known => h,
                        _ => self.resolve_head(&address, true).await?,
                    };
                    check_ids = true;
                }
                Err(e) => {
                    // The outcome is unknown: forget the head, so the next append reads it at
                    // SERIAL (which settles this batch one way or the other).
                    *cached = None;
                    return Err(e);
                }
            }
        }
        if cached.is_some() {
            let hint = self
                .session
                .execute_unpaged(
                    &self.st.set_hint,
                    (known as i64, known as i64, address.as_str()),
                )
                .await;
            if let Err(e) = hint {
                tracing::warn!(%address, head = known, "mailbox head hint not written: {e}");
            }
        }
        Ok(out)
    }

    /// The oldest version still kept (`head + 1` when none is): rows expire in version order, so
    /// the buckets with a live row are a suffix of `0..=bucket(head)`.
    async fn low(&self, address: &Address, head: u64) -> Result<u64, MailboxError> {
        if head == 0 {
            return Ok(1);
        }
        let hb = self.bucket(head);
        let cached = self
            .low_buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(address)
            .copied()
            .unwrap_or(0)
            .min(hb);
        let first = |b: u64| async move {
            let v = one_bigint(
                &self.session,
                &self.st.first_live,
                (address.as_str(), b as i64),
            )
            .await?;
            Ok::<_, MailboxError>(v.map(|v| v as u64))
        };
        let mut found = None;
        if let Some(v) = first(cached).await? {
            found = Some((cached, v));
        } else {
            // Binary search for the first bucket in (cached, hb] with a live row.
            let (mut lo, mut hi) = (cached + 1, hb + 1);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                match first(mid).await? {
                    Some(v) => {
                        found = Some((mid, v));
                        hi = mid;
                    }
                    None => lo = mid + 1,
                }
            }
        }
        let (bucket, low) = found.unwrap_or((hb, head + 1));
        let mut map = self.low_buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= CACHE_MAX {
            map.clear();
        }
        let entry = map.entry(address.clone()).or_insert(0);
        *entry = (*entry).max(bucket);
        Ok(low)
    }

    async fn head_of(&self, address: &Address) -> Result<Head, MailboxError> {
        let head = self.resolve_head(address, false).await?;
        let low = self.low(address, head).await?;
        Ok(Head { head, low })
    }

    async fn read(
        &self,
        address: &Address,
        after: u64,
        limit: usize,
    ) -> Result<Page, MailboxError> {
        let head = self.head_of(address).await?;
        let start = after.saturating_add(1).max(head.low);
        let mut messages = Vec::new();
        if limit == 0 || start > head.head {
            return Ok(Page { head, messages });
        }
        let mut bucket = self.bucket(start);
        while messages.len() < limit && bucket <= self.bucket(head.head) {
            let want = (limit - messages.len()).min(i32::MAX as usize) as i32;
            let res = self
                .session
                .execute_unpaged(
                    &self.st.page,
                    (
                        address.as_str(),
                        bucket as i64,
                        start as i64,
                        head.head as i64,
                        want,
                    ),
                )
                .await
                .map_err(unavailable)?
                .into_rows_result()
                .map_err(st)?;
            type PageRow<'a> = (
                Option<i64>,
                Option<&'a str>,
                Option<CqlTimestamp>,
                Option<&'a str>,
            );
            for row in res.rows::<PageRow<'_>>().map_err(st)? {
                if let (Some(v), Some(id), ts, Some(payload)) = row.map_err(st)? {
                    let ts = ts.map(|t| t.0).unwrap_or(0);
                    messages.push(Arc::new(build(address, v as u64, id, ts, payload)?));
                }
            }
            bucket += 1;
        }
        Ok(Page { head, messages })
    }
}

/// Whether a lightweight transaction applied: Ok(None) if it did, Ok(Some(current value of
/// `column`)) if not.
fn lwt_outcome(res: QueryResult, column: &str) -> Result<Option<Option<u64>>, MailboxError> {
    let rows = res.into_rows_result().map_err(st)?;
    let specs = rows.column_specs();
    let applied_at = specs
        .get_by_name("[applied]")
        .map(|(i, _)| i)
        .ok_or_else(|| st("conditional batch answered without [applied]"))?;
    let column_at = specs.get_by_name(column).map(|(i, _)| i);
    let row: scylla::value::Row = rows.first_row().map_err(st)?;
    let applied = matches!(
        row.columns.get(applied_at),
        Some(Some(CqlValue::Boolean(true)))
    );
    if applied {
        return Ok(None);
    }
    let current = column_at
        .and_then(|i| row.columns.get(i))
        .and_then(|v| match v {
            Some(CqlValue::BigInt(h)) => Some(*h as u64),
            _ => None,
        });
    Ok(Some(current))
}

fn build(
    address: &Address,
    version: u64,
    id: &str,
    ts: i64,
    payload: &str,
) -> Result<Message, MailboxError> {
    let id = MessageId::parse(id).map_err(st)?;
    let payload = RawValue::from_string(payload.to_owned()).map_err(st)?;
    Ok(Message::new(
        address.clone(),
        version,
        id,
        ts.max(0) as u64,
        &payload,
    ))
}

/// The single bigint column of a query's first row (`None` for no row or a null).
async fn one_bigint(
    session: &Session,
    stmt: &PreparedStatement,
    values: impl SerializeRow,
) -> Result<Option<i64>, MailboxError> {
    let row: Option<(Option<i64>,)> = session
        .execute_unpaged(stmt, values)
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(st)?
        .maybe_first_row()
        .map_err(st)?;
    Ok(row.and_then(|r| r.0))
}

#[async_trait::async_trait]
impl Mailbox for CassandraMailbox {
    async fn append(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>, MailboxError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let n = batch.len();
        let mut groups: Vec<(Address, Vec<(usize, NewMessage)>)> = Vec::new();
        let mut by_address: HashMap<Address, usize> = HashMap::new();
        for (slot, m) in batch.into_iter().enumerate() {
            let g = *by_address.entry(m.address.clone()).or_insert_with(|| {
                groups.push((m.address.clone(), Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push((slot, m));
        }
        let inner = &self.0;
        let done: Vec<Vec<(usize, Appended)>> = stream::iter(groups)
            .map(|(address, items)| inner.append_address(address, items))
            .buffer_unordered(ADDRESS_CONCURRENCY)
            .try_collect()
            .await?;
        let mut out: Vec<Option<Appended>> = (0..n).map(|_| None).collect();
        for (slot, a) in done.into_iter().flatten() {
            out[slot] = Some(a);
        }
        out.into_iter()
            .map(|a| a.ok_or_else(|| st("append lost a result")))
            .collect()
    }

    async fn read(
        &self,
        address: &Address,
        after: u64,
        limit: usize,
    ) -> Result<Page, MailboxError> {
        self.0.read(address, after, limit).await
    }

    async fn heads(&self, addresses: &[Address]) -> Result<Vec<Head>, MailboxError> {
        let futs: Vec<_> = addresses.iter().map(|a| self.0.head_of(a)).collect();
        stream::iter(futs)
            .buffered(ADDRESS_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Cassandra removes expired messages itself (every row is written `USING TTL` retention);
    /// there is nothing to do here, so this returns 0.
    async fn expire(&self, _now_ms: u64) -> Result<u64, MailboxError> {
        Ok(0)
    }

    async fn healthy(&self) -> Result<(), MailboxError> {
        self.0
            .session
            .execute_unpaged(&self.0.st.health, ())
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}
