//! The Cassandra mailbox: bucketed message rows tagged with their writer's epoch, a head per
//! address and epoch, and a fence per shard checked once per batch.
//!
//! Tables (see `schema/002_tables.cql` and `docs/cassandra.md`):
//! - `mailbox_entries` ((address, bucket), version, epoch DESC): the messages; per version the
//!   row of the highest epoch is the message;
//! - `mailbox_head_marks` ((address), epoch DESC): the head; the row of the highest epoch wins;
//! - `mailbox_id_index` ((address), id, version): candidate versions of a message id;
//! - `mailbox_fences` ((scope), shard): the epoch of each shard's current writer;
//! - `mailbox_config`: the bucket size and the shard count, fixed for the life of the keyspace.
//!
//! One writer per shard (the consumer of that partition of the enqueue topic) appends with
//! versions assigned in memory from the heads it knows: per address and batch ONE unlogged
//! write of the message rows and their id candidates, then ONE serial read of the fences for
//! the whole batch, then the head marks. No lightweight transaction per address. The
//! reasoning is in `docs/architecture.md` ("The append fence").

mod append;
mod fence;
mod group_read;

use super::storage_err as st;
use super::{Appended, Head, Mailbox, MailboxError, Message, NewMessage, Page};
use crate::address::{Address, MessageId};
use crate::cassandra::Kind;
use futures_util::{StreamExt, TryStreamExt, stream};
use scylla::client::session::Session;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Default number of versions per bucket partition (fixed per keyspace once written).
pub const DEFAULT_BUCKET_SIZE: u64 = 10_000;
/// Addresses read or written concurrently within one call.
const ADDRESS_CONCURRENCY: usize = 64;
/// Cached per-address state is dropped past this many addresses.
const CACHE_MAX: usize = 1 << 18;

fn unavailable(e: impl std::fmt::Display) -> MailboxError {
    MailboxError::Unavailable(e.to_string())
}

/// How a mailbox is set up.
#[derive(Debug, Clone)]
pub struct MailboxSettings {
    pub keyspace: String,
    pub retention_ms: u64,
    /// Versions per bucket; the value already stored in the keyspace wins.
    pub bucket_size: u64,
    /// Partitions of the enqueue topic. Stored on first use; a different value later is an
    /// error, because the shard of an address must never change. 0: whatever is stored.
    pub shards: u32,
    /// The fence's scope: the enqueue topic's name. Every writer of the keyspace's mailboxes
    /// must use the same one.
    pub scope: String,
    /// Who claims shards (the node id), recorded in the fence rows.
    pub owner: String,
}

/// The Cassandra-backed mailbox (a cheap clone of a shared handle).
#[derive(Clone)]
pub struct CassandraMailbox(Arc<Inner>);

struct Inner {
    session: Arc<Session>,
    keyspace: String,
    ttl_secs: i32,
    bucket_size: u64,
    shards: u32,
    st: Statements,
    fences: fence::Fences,
    /// The writer's claims and known heads; an append holds it while it reserves versions.
    writer: tokio::sync::Mutex<append::WriterState>,
    /// What failed appends left for the next one to settle.
    failed: Mutex<append::Failed>,
    /// Per address: the lowest bucket that may still hold a live row (only ever grows).
    low_buckets: Mutex<HashMap<Address, u64>>,
}

struct Statements {
    insert_entry: PreparedStatement,
    insert_id: PreparedStatement,
    set_mark: PreparedStatement,
    mark: PreparedStatement,
    ids_lookup: PreparedStatement,
    versions: PreparedStatement,
    page: PreparedStatement,
    tail: PreparedStatement,
    first_live: PreparedStatement,
    health: PreparedStatement,
}

/// A row of `mailbox_entries` as read.
struct Entry {
    version: u64,
    epoch: i64,
    id: String,
    ts: i64,
    payload: String,
}

type EntryRow<'a> = (
    i64,
    i64,
    Option<&'a str>,
    Option<CqlTimestamp>,
    Option<&'a str>,
);

impl CassandraMailbox {
    /// Claims `shards` of the enqueue topic now, anew, fencing any other writer of them; a shard
    /// this writer was fenced from may be appended to again (a Kafka consumer calls it for the
    /// partitions a rebalance gave it, before applying their records).
    pub async fn claim(&self, shards: &[u32]) -> Result<(), MailboxError> {
        self.0.claim(shards).await
    }

    /// Prepares the statements and fixes the bucket size and shard count in the keyspace. The
    /// schema must have been applied ([`crate::cassandra::open`]).
    pub async fn new(session: Arc<Session>, s: &MailboxSettings) -> Result<Self, MailboxError> {
        let ks = s.keyspace.as_str();
        if !crate::cassandra::valid_keyspace(ks) {
            return Err(st(format!("invalid keyspace {ks:?}")));
        }
        let prep = async |cql: String| {
            crate::cassandra::prepare(&session, cql, Kind::Idempotent)
                .await
                .map_err(unavailable)
        };
        let bucket_size = fixed_config(&session, ks, "bucket_size", s.bucket_size.max(1)).await?;
        let shards = fixed_config(&session, ks, "shards", u64::from(s.shards)).await?;
        if s.shards != 0 && shards != u64::from(s.shards) {
            return Err(st(format!(
                "keyspace {ks} was set up for an enqueue topic of {shards} partitions, but it \
                 has {}; the partition of an address must never change (see docs/kafka.md)",
                s.shards
            )));
        }
        let st = Statements {
            insert_entry: prep(format!(
                "INSERT INTO {ks}.mailbox_entries (address, bucket, version, epoch, id, ts, payload) \
                 VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            insert_id: prep(format!(
                "INSERT INTO {ks}.mailbox_id_index (address, id, version) VALUES (?, ?, ?) USING TTL ?"
            ))
            .await?,
            set_mark: prep(format!(
                "INSERT INTO {ks}.mailbox_head_marks (address, epoch, head) VALUES (?, ?, ?) \
                 USING TIMESTAMP ?"
            ))
            .await?,
            mark: prep(format!(
                "SELECT epoch, head FROM {ks}.mailbox_head_marks WHERE address = ? LIMIT 1"
            ))
            .await?,
            ids_lookup: prep(format!(
                "SELECT id, version FROM {ks}.mailbox_id_index WHERE address = ? AND id IN ?"
            ))
            .await?,
            versions: prep(format!(
                "SELECT version, epoch, id, ts, payload FROM {ks}.mailbox_entries \
                 WHERE address = ? AND bucket = ? AND version IN ?"
            ))
            .await?,
            page: prep(format!(
                "SELECT version, epoch, id, ts, payload FROM {ks}.mailbox_entries \
                 WHERE address = ? AND bucket = ? AND version >= ? AND version <= ? LIMIT ?"
            ))
            .await?,
            tail: prep(format!(
                "SELECT version, epoch, id, ts, payload FROM {ks}.mailbox_entries \
                 WHERE address = ? AND bucket = ? AND version > ? LIMIT ?"
            ))
            .await?,
            first_live: prep(format!(
                "SELECT version FROM {ks}.mailbox_entries \
                 WHERE address = ? AND bucket = ? AND version > 0 LIMIT 1"
            ))
            .await?,
            health: prep("SELECT release_version FROM system.local".into()).await?,
        };
        let fences = fence::Fences::new(session.clone(), ks, &s.scope, &s.owner).await?;
        let ttl_secs = s.retention_ms.div_ceil(1000).clamp(1, 630_720_000) as i32;
        Ok(Self(Arc::new(Inner {
            session,
            keyspace: ks.to_owned(),
            ttl_secs,
            bucket_size,
            shards: shards as u32,
            st,
            fences,
            writer: Default::default(),
            failed: Default::default(),
            low_buckets: Mutex::new(HashMap::new()),
        })))
    }

    /// The bucket size in use (the one stored in the keyspace).
    pub fn bucket_size(&self) -> u64 {
        self.0.bucket_size
    }

    /// Benchmark baseline: writes the rows an append of `batch` writes — message rows and id
    /// candidates in one unlogged batch per address, then the head marks — batched the same way,
    /// with versions from a local counter and no reads, no fence and no idempotency. Use
    /// addresses nothing else writes. Returns the number of messages written.
    pub async fn write_unfenced(
        &self,
        batch: Vec<NewMessage>,
        counters: &mut HashMap<Address, u64>,
    ) -> Result<usize, MailboxError> {
        self.0.write_unfenced(batch, counters).await
    }
}

/// A value of `mailbox_config`: written if absent (unless `want` is 0), then read back at
/// SERIAL (the first writer wins).
async fn fixed_config(
    session: &Session,
    ks: &str,
    name: &str,
    want: u64,
) -> Result<u64, MailboxError> {
    if want > 0 {
        let insert = crate::cassandra::prepare(
            session,
            format!("INSERT INTO {ks}.mailbox_config (name, value) VALUES (?, ?) IF NOT EXISTS"),
            Kind::Once,
        )
        .await
        .map_err(unavailable)?;
        session
            .execute_unpaged(&insert, (name, want as i64))
            .await
            .map_err(unavailable)?;
    }
    let read = crate::cassandra::prepare(
        session,
        format!("SELECT value FROM {ks}.mailbox_config WHERE name = ?"),
        Kind::Serial,
    )
    .await
    .map_err(unavailable)?;
    match one_bigint(session, &read, (name,)).await? {
        Some(v) if v > 0 => Ok(v as u64),
        _ => Err(st(format!("mailbox_config has no {name}"))),
    }
}

impl Inner {
    /// The bucket holding `version` (≥ 1).
    fn bucket(&self, version: u64) -> u64 {
        (version.max(1) - 1) / self.bucket_size
    }

    /// The last version of `bucket`.
    fn bucket_end(&self, bucket: u64) -> u64 {
        (bucket + 1) * self.bucket_size
    }

    fn shard(&self, address: &Address) -> u32 {
        address.partition(self.shards)
    }

    /// The head mark of the highest epoch: (epoch, head), (0, 0) for a new address.
    async fn mark(&self, address: &Address) -> Result<(i64, u64), MailboxError> {
        let row: Option<(i64, Option<i64>)> =
            first_row(&self.session, &self.st.mark, (address.as_str(),)).await?;
        Ok(row.map_or((0, 0), |(e, h)| (e, h.unwrap_or(0).max(0) as u64)))
    }

    /// Runs an entries query and returns its rows, highest epoch first within a version.
    async fn entries(
        &self,
        stmt: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<Entry>, MailboxError> {
        let res = self
            .session
            .execute_unpaged(stmt, values)
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(st)?;
        let mut out = Vec::new();
        for row in res.rows::<EntryRow<'_>>().map_err(st)? {
            if let (v, e, Some(id), ts, Some(payload)) = row.map_err(st)? {
                out.push(Entry {
                    version: v.max(0) as u64,
                    epoch: e,
                    id: id.to_owned(),
                    ts: ts.map_or(0, |t| t.0),
                    payload: payload.to_owned(),
                });
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
        Ok(low.min(head + 1))
    }

    async fn head_of(&self, address: &Address) -> Result<Head, MailboxError> {
        let (_, head) = self.mark(address).await?;
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
        let mut next = after.saturating_add(1).max(head.low);
        let mut messages = Vec::new();
        while messages.len() < limit && next <= head.head {
            let bucket = self.bucket(next);
            let end = self.bucket_end(bucket).min(head.head);
            // A version may have superseded rows of lower epochs: ask for a few more.
            let want = (limit - messages.len()).min(100_000);
            let ask = (want + want / 8 + 1) as i32;
            let rows = self
                .entries(
                    &self.st.page,
                    (
                        address.as_str(),
                        bucket as i64,
                        next as i64,
                        end as i64,
                        ask,
                    ),
                )
                .await?;
            let full = rows.len() >= ask as usize;
            let mut last = None;
            for e in rows {
                if last == Some(e.version) || messages.len() >= limit {
                    continue;
                }
                last = Some(e.version);
                messages.push(Arc::new(build(address, &e)?));
            }
            next = match (full, last) {
                (true, Some(v)) => v + 1,
                _ => end + 1,
            };
        }
        Ok(Page { head, messages })
    }
}

fn build(address: &Address, e: &Entry) -> Result<Message, MailboxError> {
    let id = MessageId::parse(&e.id).map_err(st)?;
    let payload = RawValue::from_string(e.payload.clone()).map_err(st)?;
    Ok(Message::new(
        address.clone(),
        e.version,
        id,
        e.ts.max(0) as u64,
        &payload,
    ))
}

/// A query's first row (`None` when there is none).
async fn first_row<R>(
    session: &Session,
    stmt: &PreparedStatement,
    values: impl SerializeRow,
) -> Result<Option<R>, MailboxError>
where
    R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
{
    session
        .execute_unpaged(stmt, values)
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(st)?
        .maybe_first_row()
        .map_err(st)
}

/// The single bigint column of a query's first row (`None` for no row or a null).
async fn one_bigint(
    session: &Session,
    stmt: &PreparedStatement,
    values: impl SerializeRow,
) -> Result<Option<i64>, MailboxError> {
    let row: Option<(Option<i64>,)> = first_row(session, stmt, values).await?;
    Ok(row.and_then(|r| r.0))
}

#[async_trait::async_trait]
impl Mailbox for CassandraMailbox {
    async fn append(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>, MailboxError> {
        self.0.append(batch, None).await
    }

    async fn append_in(
        &self,
        run: &super::Run,
        batch: Vec<NewMessage>,
        begun: tokio::sync::oneshot::Sender<()>,
    ) -> Result<Vec<Appended>, MailboxError> {
        self.0.append(batch, Some((run, begun))).await
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
