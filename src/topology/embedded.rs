//! Topology and cursors in redb: `bindings` (client, address) → since and `cursors` (client,
//! address) → version. Each call is one transaction. (Versions before the twenty-third session
//! also kept the reverse, `members` (address, client); opening a file drops that table.)
//!
//! Cursors and read marks live a TTL after their last write, as Cassandra's cells do: each
//! write also records when its row runs out, in `expires` (kind, client, address) → ms and in
//! its mirror ordered by time, `expiring` (kind, ms, client, address), so that
//! [`Cursors::expire`] and [`ReadMarks::expire`] read only the rows whose time is up. Rows
//! written before these tables existed have no time and stay until they are written again.
//!
//! Cursor saves (a batch of acks every few milliseconds) are committed without an fsync except
//! at most once every [`CURSOR_SYNC_EVERY`]; a durable commit of any kind (a bind, the next
//! durable save, [`Cursors::sync`] at stop, closing the file) makes the ones before it durable
//! too. Acks are never answered, so a crash costs at most that interval's acks: their clients
//! are sent those messages again on resume. Every other write is durable when it returns.

use super::storage_err as st;
use super::{Binding, Cursors, ReadMarks, Topology, TopologyError, first_of_each, within_limit};
use crate::address::{Address, ClientId};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BINDINGS: TableDefinition<(&str, &str), u64> = TableDefinition::new("bindings");
/// The reverse of `bindings` that earlier versions kept; dropped on open.
const MEMBERS: TableDefinition<(&str, &str), ()> = TableDefinition::new("members");
const CURSORS: TableDefinition<(&str, &str), u64> = TableDefinition::new("cursors");
/// (client, address) → the versions read, a roaring bitmap ([`super::encode_marks`]).
const READS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("reads");
/// Revoked client → when (ms since epoch).
const REVOKED: TableDefinition<&str, u64> = TableDefinition::new("revoked");
/// (kind, client, address) → when the row runs out (ms since epoch).
const EXPIRES: TableDefinition<(u8, &str, &str), u64> = TableDefinition::new("expires");
/// The same ordered by time within each kind: (kind, ms, client, address).
const EXPIRING: TableDefinition<(u8, u64, &str, &str), ()> = TableDefinition::new("expiring");

/// The kinds of row that expire: which table a time in `expires` is for.
#[derive(Clone, Copy)]
enum Kind {
    Cursor = 0,
    Reads = 1,
}

/// At most this many rows go per expiry transaction (a short write lock).
const EXPIRE_CHUNK: usize = 4096;

/// The times of one write transaction's rows (the two tables, opened once).
struct Times<'t> {
    by_key: redb::Table<'t, (u8, &'static str, &'static str), u64>,
    by_time: redb::Table<'t, (u8, u64, &'static str, &'static str), ()>,
}

impl<'t> Times<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, TopologyError> {
        Ok(Self {
            by_key: txn.open_table(EXPIRES).map_err(st)?,
            by_time: txn.open_table(EXPIRING).map_err(st)?,
        })
    }

    /// The row of `kind` runs out at `until` (and no longer when it did before). A row written
    /// again within the same step of [`until`] costs one read here.
    fn set(
        &mut self,
        kind: Kind,
        client: &str,
        address: &str,
        until: u64,
    ) -> Result<(), TopologyError> {
        let key = (kind as u8, client, address);
        let before = self.by_key.get(key).map_err(st)?.map(|g| g.value());
        if before == Some(until) {
            return Ok(());
        }
        if let Some(before) = before {
            self.by_time
                .remove((kind as u8, before, client, address))
                .map_err(st)?;
        }
        self.by_key.insert(key, until).map_err(st)?;
        self.by_time
            .insert((kind as u8, until, client, address), ())
            .map_err(st)?;
        Ok(())
    }
}

/// Removes the rows of `keys` from `table` (cursors or read marks) in `txn`.
fn remove_rows<'k, V: redb::Value + 'static>(
    txn: &WriteTransaction,
    table: TableDefinition<'_, (&'static str, &'static str), V>,
    keys: impl Iterator<Item = (&'k str, &'k str)>,
) -> Result<(), TopologyError> {
    let mut t = txn.open_table(table).map_err(st)?;
    for key in keys {
        t.remove(key).map_err(st)?;
    }
    Ok(())
}

/// When a row written now with `ttl_secs` runs out: after its TTL and one expiry bucket of a
/// mailbox with that retention (so the done marks of a work address outlive its messages,
/// which the embedded mailbox keeps up to a bucket past the retention), rounded up to a step
/// of 1/1024 of the TTL (at least a second), so that the many writes of a busy row within one
/// step (a client acking every message, 20 ms apart) leave its time as it is. 31 days: a step
/// of 43 minutes, a bucket of 60 s.
fn until(ttl_secs: u32) -> u64 {
    let ttl = u64::from(ttl_secs) * 1000;
    let step = (ttl / 1024).max(1000);
    crate::clock::now_ms()
        .saturating_add(ttl)
        .saturating_add(crate::mailbox::embedded::expiry_bucket_ms(ttl))
        .div_ceil(step)
        .saturating_mul(step)
}

/// How often at most a cursor save is durable (see the module's documentation).
pub const CURSOR_SYNC_EVERY: Duration = Duration::from_secs(1);

/// The redb-backed topology and cursors (one file, a cheap clone of a shared handle).
#[derive(Clone)]
pub struct EmbeddedTopology {
    db: Arc<Database>,
    /// When a cursor save was last durable; `None` until the first.
    cursors_synced: Arc<Mutex<Option<Instant>>>,
}

impl EmbeddedTopology {
    /// Opens (or creates) the file, with redb's default cache (1 GiB).
    pub fn open(path: &Path) -> Result<Self, TopologyError> {
        Self::open_with_cache(path, 1 << 30)
    }

    /// Opens (or creates) the file, caching at most `cache_bytes` of its pages in memory.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, TopologyError> {
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(st)?;
        let txn = db.begin_write().map_err(st)?;
        {
            txn.open_table(BINDINGS).map_err(st)?;
            txn.delete_table(MEMBERS).map_err(st)?;
            txn.open_table(CURSORS).map_err(st)?;
            txn.open_table(REVOKED).map_err(st)?;
            txn.open_table(READS).map_err(st)?;
            txn.open_table(EXPIRES).map_err(st)?;
            txn.open_table(EXPIRING).map_err(st)?;
        }
        txn.commit().map_err(st)?;
        Ok(Self {
            db: Arc::new(db),
            cursors_synced: Arc::new(Mutex::new(None)),
        })
    }

    /// Copies every table into `to` (a write transaction of another redb file) as they are at
    /// one moment (a read transaction). Blocking.
    pub fn backup_into(&self, to: &redb::WriteTransaction) -> Result<(), TopologyError> {
        let from = self.db.begin_read().map_err(st)?;
        use crate::mailbox::embedded::copy_table;
        copy_table(&from, to, BINDINGS).map_err(st)?;
        copy_table(&from, to, CURSORS).map_err(st)?;
        copy_table(&from, to, REVOKED).map_err(st)?;
        copy_table(&from, to, READS).map_err(st)?;
        copy_table(&from, to, EXPIRES).map_err(st)?;
        copy_table(&from, to, EXPIRING).map_err(st)?;
        Ok(())
    }

    /// Removes the rows of `kind` whose time is up by `now`, a chunk per transaction.
    async fn expire_kind(&self, kind: Kind, now: u64) -> Result<u64, TopologyError> {
        self.blocking(move |db| {
            let mut removed = 0u64;
            loop {
                let txn = db.begin_write().map_err(st)?;
                let n;
                {
                    let mut times = Times::open(&txn)?;
                    let mut due: Vec<(u64, String, String)> = Vec::new();
                    let k = kind as u8;
                    for e in times
                        .by_time
                        .range((k, 0, "", "")..(k, now.saturating_add(1), "", ""))
                        .map_err(st)?
                        .take(EXPIRE_CHUNK)
                    {
                        let (key, _) = e.map_err(st)?;
                        let (_, at, c, a) = key.value();
                        due.push((at, c.to_owned(), a.to_owned()));
                    }
                    n = due.len();
                    for (at, c, a) in &due {
                        times
                            .by_time
                            .remove((k, *at, c.as_str(), a.as_str()))
                            .map_err(st)?;
                        times
                            .by_key
                            .remove((k, c.as_str(), a.as_str()))
                            .map_err(st)?;
                    }
                    let keys = due.iter().map(|(_, c, a)| (c.as_str(), a.as_str()));
                    match kind {
                        Kind::Cursor => remove_rows(&txn, CURSORS, keys)?,
                        Kind::Reads => remove_rows(&txn, READS, keys)?,
                    }
                }
                txn.commit().map_err(st)?;
                removed += n as u64;
                if n < EXPIRE_CHUNK {
                    return Ok(removed);
                }
            }
        })
        .await
    }

    /// A small read (one key or one client's short range) runs on the calling thread: redb
    /// answers it from its page cache in microseconds, where the hop to tokio's blocking pool
    /// and back (waking a pool thread, parking it, waking the task) cost more CPU than the read.
    /// Writes (a synchronous commit) take the pool.
    fn read<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, TopologyError>,
    ) -> Result<T, TopologyError> {
        f(&self.db)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, TopologyError> + Send + 'static,
    ) -> Result<T, TopologyError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(st)?
    }
}

#[async_trait::async_trait]
impl Topology for EmbeddedTopology {
    async fn revoke(&self, client: &ClientId) -> Result<(), TopologyError> {
        let client = client.clone();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(st)?;
            {
                let mut t = txn.open_table(REVOKED).map_err(st)?;
                if t.get(client.as_str()).map_err(st)?.is_none() {
                    t.insert(client.as_str(), crate::clock::now_ms())
                        .map_err(st)?;
                }
            }
            txn.commit().map_err(st)
        })
        .await
    }

    async fn revoked(&self, client: &ClientId) -> Result<bool, TopologyError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(st)?;
            let t = txn.open_table(REVOKED).map_err(st)?;
            Ok(t.get(client.as_str()).map_err(st)?.is_some())
        })
    }

    async fn get(&self, client: &ClientId) -> Result<Vec<Binding>, TopologyError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(st)?;
            let t = txn.open_table(BINDINGS).map_err(st)?;
            let mut out = Vec::new();
            for e in t.range((client.as_str(), "")..).map_err(st)? {
                let (k, v) = e.map_err(st)?;
                let (c, a) = k.value();
                if c != client.as_str() {
                    break;
                }
                out.push(Binding {
                    address: Address::parse(a).map_err(st)?,
                    since: v.value(),
                });
            }
            Ok(out)
        })
    }

    async fn add(
        &self,
        client: &ClientId,
        bindings: &[Binding],
        limit: usize,
    ) -> Result<Vec<Binding>, TopologyError> {
        let (client, bindings) = (client.clone(), bindings.to_vec());
        self.blocking(move |db| {
            // One write transaction at a time: the count and the inserts are one step.
            let txn = db.begin_write().map_err(st)?;
            let mut added = Vec::new();
            {
                let mut b = txn.open_table(BINDINGS).map_err(st)?;
                for bind in first_of_each(&bindings, |b| &b.address) {
                    if b.get((client.as_str(), bind.address.as_str()))
                        .map_err(st)?
                        .is_none()
                    {
                        added.push(bind.clone());
                    }
                }
                if !added.is_empty() {
                    let mut held = 0;
                    for e in b.range((client.as_str(), "")..).map_err(st)? {
                        if e.map_err(st)?.0.value().0 != client.as_str() {
                            break;
                        }
                        held += 1;
                    }
                    within_limit(&client, held, added.len(), limit)?;
                }
                for bind in &added {
                    b.insert((client.as_str(), bind.address.as_str()), bind.since)
                        .map_err(st)?;
                }
            }
            txn.commit().map_err(st)?;
            Ok(added)
        })
        .await
    }

    async fn remove(
        &self,
        client: &ClientId,
        addresses: &[Address],
    ) -> Result<Vec<Address>, TopologyError> {
        let (client, addresses) = (client.clone(), addresses.to_vec());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(st)?;
            let mut removed = Vec::new();
            {
                let mut b = txn.open_table(BINDINGS).map_err(st)?;
                for a in addresses {
                    if b.remove((client.as_str(), a.as_str()))
                        .map_err(st)?
                        .is_some()
                    {
                        removed.push(a);
                    }
                }
            }
            txn.commit().map_err(st)?;
            Ok(removed)
        })
        .await
    }
}

/// One writer at a time (redb's write transaction), so a read-modify-write loses nothing.
/// Marks below `low` go at the next mark; a row not marked for `ttl_secs` goes at the next
/// [`ReadMarks::expire`].
#[async_trait::async_trait]
impl ReadMarks for EmbeddedTopology {
    async fn mark(
        &self,
        client: &ClientId,
        address: &Address,
        versions: &[u64],
        low: u64,
        ttl_secs: u32,
    ) -> Result<usize, TopologyError> {
        let (client, address, versions) = (client.clone(), address.clone(), versions.to_vec());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(st)?;
            let size;
            {
                let mut t = txn.open_table(READS).map_err(st)?;
                let key = (client.as_str(), address.as_str());
                let stored = t.get(key).map_err(st)?.map(|g| g.value().to_vec());
                let merged = super::merge_marks(stored.as_deref(), &versions, low)?;
                size = merged.len();
                t.insert(key, merged.as_slice()).map_err(st)?;
                Times::open(&txn)?.set(Kind::Reads, key.0, key.1, until(ttl_secs))?;
            }
            txn.commit().map_err(st)?;
            Ok(size)
        })
        .await
    }

    async fn marks(
        &self,
        client: &ClientId,
        address: &Address,
    ) -> Result<(roaring::RoaringTreemap, usize), TopologyError> {
        let (client, address) = (client.clone(), address.clone());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(st)?;
            let t = txn.open_table(READS).map_err(st)?;
            match t.get((client.as_str(), address.as_str())).map_err(st)? {
                Some(g) => Ok((super::decode_marks(g.value())?, g.value().len())),
                None => Ok((roaring::RoaringTreemap::new(), 0)),
            }
        })
        .await
    }

    async fn expire(&self, now_ms: u64) -> Result<u64, TopologyError> {
        self.expire_kind(Kind::Reads, now_ms).await
    }
}

/// A save that does not lower a cursor keeps it `ttl_secs` longer, as a Cassandra cell written
/// at the version as its timestamp does; the next [`Cursors::expire`] after that removes it.
#[async_trait::async_trait]
impl Cursors for EmbeddedTopology {
    async fn save(
        &self,
        acks: &[(ClientId, Address, u64)],
        ttl_secs: u32,
    ) -> Result<(), TopologyError> {
        let acks = acks.to_vec();
        let until = until(ttl_secs);
        let synced = self.cursors_synced.clone();
        self.blocking(move |db| {
            let mut txn = db.begin_write().map_err(st)?;
            // Decided with the write lock held, so decisions come in the order of the commits.
            let durable = {
                let mut at = synced.lock().unwrap_or_else(|p| p.into_inner());
                let due = at.is_none_or(|t| t.elapsed() >= CURSOR_SYNC_EVERY);
                if due {
                    *at = Some(Instant::now());
                }
                due
            };
            if !durable {
                txn.set_durability(Durability::None).map_err(st)?;
            }
            {
                let mut t = txn.open_table(CURSORS).map_err(st)?;
                let mut times = Times::open(&txn)?;
                for (c, a, v) in &acks {
                    let key = (c.as_str(), a.as_str());
                    let cur = t.get(key).map_err(st)?.map(|g| g.value()).unwrap_or(0);
                    if *v > cur {
                        t.insert(key, *v).map_err(st)?;
                    }
                    if *v > 0 && *v >= cur {
                        times.set(Kind::Cursor, key.0, key.1, until)?;
                    }
                }
            }
            txn.commit().map_err(st)
        })
        .await
    }

    /// One empty durable commit: it makes the non-durable cursor saves before it durable.
    async fn sync(&self) -> Result<(), TopologyError> {
        self.blocking(|db| {
            let txn = db.begin_write().map_err(st)?;
            txn.commit().map_err(st)
        })
        .await
    }

    async fn get(&self, client: &ClientId) -> Result<HashMap<Address, u64>, TopologyError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(st)?;
            let t = txn.open_table(CURSORS).map_err(st)?;
            let mut out = HashMap::new();
            for e in t.range((client.as_str(), "")..).map_err(st)? {
                let (k, v) = e.map_err(st)?;
                let (c, a) = k.value();
                if c != client.as_str() {
                    break;
                }
                out.insert(Address::parse(a).map_err(st)?, v.value());
            }
            Ok(out)
        })
    }

    async fn expire(&self, now_ms: u64) -> Result<u64, TopologyError> {
        self.expire_kind(Kind::Cursor, now_ms).await
    }
}

#[cfg(test)]
mod tests {
    use super::{Cursors, EmbeddedTopology, until};
    use crate::address::{Address, ClientId};

    /// The cursor of (c, a) in a copy of the file as it is on disk now (what a crash would
    /// leave: redb opens it at its last durable commit).
    async fn after_a_crash(path: &std::path::Path, c: &ClientId, a: &Address) -> Option<u64> {
        let image = path.with_extension("image.redb");
        std::fs::copy(path, &image).unwrap();
        let t = EmbeddedTopology::open(&image).unwrap();
        t.get(c).await.unwrap().get(a).copied()
    }

    #[tokio::test]
    async fn cursor_saves_are_durable_once_a_second_and_at_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let t = EmbeddedTopology::open(&path).unwrap();
        let (c, a) = (
            ClientId::parse("c").unwrap(),
            Address::parse("client:c").unwrap(),
        );
        let save = |v: u64| {
            let t = t.clone();
            let (c, a) = (c.clone(), a.clone());
            async move { t.save(&[(c, a, v)], 3600).await.unwrap() }
        };
        // The first save is durable; the next, within the interval, is not yet.
        save(1).await;
        save(2).await;
        assert_eq!(t.get(&c).await.unwrap()[&a], 2, "seen at once");
        assert_eq!(after_a_crash(&path, &c, &a).await, Some(1));
        // `sync` makes it durable.
        t.sync().await.unwrap();
        assert_eq!(after_a_crash(&path, &c, &a).await, Some(2));
        // After the interval, a save is durable on its own.
        save(3).await;
        assert_eq!(after_a_crash(&path, &c, &a).await, Some(2));
        tokio::time::sleep(super::CURSOR_SYNC_EVERY).await;
        save(4).await;
        assert_eq!(after_a_crash(&path, &c, &a).await, Some(4));
        // Closing the file makes the last non-durable save durable too.
        save(5).await;
        drop(t);
        let t = EmbeddedTopology::open(&path).unwrap();
        assert_eq!(t.get(&c).await.unwrap()[&a], 5);
    }

    #[test]
    fn a_rows_time_is_its_ttl_and_a_mailbox_bucket_rounded_up_to_a_step() {
        let ttl = 31 * 24 * 3600u32;
        let (ttl_ms, step) = (u64::from(ttl) * 1000, u64::from(ttl) * 1000 / 1024);
        let bucket = crate::mailbox::embedded::expiry_bucket_ms(ttl_ms);
        assert_eq!(bucket, 60_000);
        let before = crate::clock::now_ms();
        let at = until(ttl);
        let after = crate::clock::now_ms();
        assert_eq!(at % step, 0, "on a step");
        assert!(
            at >= before + ttl_ms + bucket,
            "at least the TTL and a bucket"
        );
        assert!(at < after + ttl_ms + bucket + step, "at most a step more");
        // Short TTLs step by whole seconds.
        assert_eq!(until(1) % 1000, 0);
        assert!(until(1) <= crate::clock::now_ms() + 2100);
    }
}
