//! Topology and cursors in Cassandra (see `schema/002_tables.cql`, `schema/010_client_bindings.cql`
//! and `docs/cassandra.md`):
//! - `client_bindings` ((client)) → a frozen map address → since, and `rev`: the bindings of a
//!   client, one cell rewritten whole by compare-and-set on `rev`, so that unbinding leaves no
//!   tombstone however many different addresses come and go;
//! - `address_clients` ((address), client) → since: the same, by address, which versions before
//!   file 10 listed an address's clients from; written only in the `Legacy` layout, for them
//!   (this version asks the nodes for their connections instead: nothing stored per address);
//! - `cursors` ((client), address) → version, written `USING TIMESTAMP version AND TTL` the
//!   retention and a day;
//! - `client_addresses` ((client), address) → since: where versions before file 10 recorded
//!   bindings, one row per binding (a tombstone per unbinding).
//!
//! Which of the two client-side tables is the record is the keyspace's [`Layout`], from its
//! `settings`: `Rows` (a keyspace created with file 10), `Migrated` (after `signalpost migrate
//! bindings`), otherwise `Legacy`. In `Legacy`, a node does what versions before file 10 did
//! (`INSERT … IF NOT EXISTS` per new binding: the first `since` wins) and mirrors every change
//! into `client_bindings`, so that [`migrate_bindings`] only has to catch up with what older
//! versions wrote. A node in `Legacy` looks at the settings again every [`LAYOUT_RECHECK`].
//!
//! In `Legacy`, `add` writes the record, then the reverse row (bindings already present are only
//! re-written in the reverse table, which repairs a reverse row lost by a crash between the two
//! writes), and `remove` deletes the reverse row, then changes the record. A cursor is one plain
//! write whose write timestamp is the version, so Cassandra's last-write-wins keeps the highest
//! version whatever the order of concurrent saves — no read and no lightweight transaction.
//! The bindings limit is checked inside the compare-and-set of `add`, on the map it replaces.

use super::storage_err as st;
use super::{Binding, Cursors, ReadMarks, Topology, TopologyError, first_of_each, within_limit};
use crate::address::{Address, ClientId};
use crate::cassandra::Kind;
use futures_util::{StreamExt, TryStreamExt, stream};
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, CqlValue};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requests in flight within one call.
const CONCURRENCY: usize = 32;
/// Cursor rows per single-partition batch.
const CURSORS_PER_BATCH: usize = 100;
/// Compare-and-set attempts on a client's bindings row before a call answers unavailable.
const CAS_ATTEMPTS: u32 = 50;
/// How often a node in [`Layout::Legacy`] reads the keyspace's settings again.
pub const LAYOUT_RECHECK: Duration = Duration::from_secs(30);

fn unavailable(e: impl std::fmt::Display) -> TopologyError {
    TopologyError::Unavailable(e.to_string())
}

/// A client's bindings as `client_bindings` stores them: address → since.
type Map = BTreeMap<String, i64>;

/// Where a keyspace records the bindings of a client (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `client_addresses` is the record, mirrored into `client_bindings`.
    Legacy,
    /// `client_bindings` is the record, since [`migrate_bindings`]: an unbinding also deletes
    /// what `client_addresses` still holds of it.
    Migrated,
    /// `client_bindings` is the record, and `client_addresses` never was (a keyspace created
    /// with schema file 10).
    Rows,
}

impl Layout {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Layout::Legacy,
            1 => Layout::Migrated,
            _ => Layout::Rows,
        }
    }

    /// The `settings` value (`bindings`) that says this layout.
    fn setting(self) -> Option<&'static str> {
        match self {
            Layout::Legacy => None,
            Layout::Migrated => Some(crate::cassandra::BINDINGS_MIGRATED),
            Layout::Rows => Some(crate::cassandra::BINDINGS_AS_ROWS),
        }
    }
}

/// The Cassandra-backed topology and cursors (a cheap clone of a shared handle).
#[derive(Clone)]
pub struct CassandraTopology(Arc<Inner>);

struct Inner {
    session: Arc<Session>,
    /// The [`Layout`] as a number (`Legacy` 0, `Migrated` 1, `Rows` 2); it never goes back.
    layout: AtomicU8,
    /// When the settings were last read, or None when the layout was given and is not re-read.
    checked: Option<Mutex<Instant>>,
    setting: PreparedStatement,
    map_get: PreparedStatement,
    map_serial: PreparedStatement,
    map_insert: PreparedStatement,
    map_update: PreparedStatement,
    get: PreparedStatement,
    claim: PreparedStatement,
    reverse: PreparedStatement,
    unreverse: PreparedStatement,
    unbind: PreparedStatement,
    cursor_save: PreparedStatement,
    cursor_get: PreparedStatement,
    revoke: PreparedStatement,
    revoked: PreparedStatement,
    marks_serial: PreparedStatement,
    marks_get: PreparedStatement,
    marks_insert: PreparedStatement,
    marks_update: PreparedStatement,
}

impl CassandraTopology {
    /// Prepares the statements and reads the keyspace's [`Layout`]; the schema must have been
    /// applied ([`crate::cassandra::open`]).
    pub async fn new(session: Arc<Session>, keyspace: &str) -> Result<Self, TopologyError> {
        let t = Self::prepare(session, keyspace, None).await?;
        let layout = t.read_layout().await?;
        t.0.layout.store(layout as u8, Ordering::Release);
        Ok(t)
    }

    /// The same with a layout given, never re-read (tests, and [`migrate_bindings`]).
    pub async fn with_layout(
        session: Arc<Session>,
        keyspace: &str,
        layout: Layout,
    ) -> Result<Self, TopologyError> {
        Self::prepare(session, keyspace, Some(layout)).await
    }

    async fn prepare(
        session: Arc<Session>,
        keyspace: &str,
        layout: Option<Layout>,
    ) -> Result<Self, TopologyError> {
        if !crate::cassandra::valid_keyspace(keyspace) {
            return Err(st(format!("invalid keyspace {keyspace:?}")));
        }
        let ks = keyspace;
        let prep = async |cql: String, kind: Kind| {
            crate::cassandra::prepare(&session, cql, kind)
                .await
                .map_err(unavailable)
        };
        let map_select = format!("SELECT bindings, rev FROM {ks}.client_bindings WHERE client = ?");
        let inner = Inner {
            layout: AtomicU8::new(layout.unwrap_or(Layout::Legacy) as u8),
            checked: layout.is_none().then(|| Mutex::new(Instant::now())),
            setting: prep(
                format!("SELECT value FROM {ks}.settings WHERE name = ?"),
                Kind::Idempotent,
            )
            .await?,
            map_get: prep(map_select.clone(), Kind::Idempotent).await?,
            map_serial: prep(map_select, Kind::Serial).await?,
            map_insert: prep(
                format!(
                    "INSERT INTO {ks}.client_bindings (client, bindings, rev) VALUES (?, ?, 1) \
                     IF NOT EXISTS"
                ),
                Kind::Once,
            )
            .await?,
            map_update: prep(
                format!(
                    "UPDATE {ks}.client_bindings SET bindings = ?, rev = ? WHERE client = ? IF rev = ?"
                ),
                Kind::Once,
            )
            .await?,
            get: prep(
                format!("SELECT address, since FROM {ks}.client_addresses WHERE client = ?"),
                Kind::Idempotent,
            )
            .await?,
            claim: prep(
                format!(
                    "INSERT INTO {ks}.client_addresses (client, address, since, bound_at) \
                     VALUES (?, ?, ?, ?) IF NOT EXISTS"
                ),
                Kind::Once,
            )
            .await?,
            reverse: prep(
                format!(
                    "INSERT INTO {ks}.address_clients (address, client, since, bound_at) VALUES (?, ?, ?, ?)"
                ),
                Kind::Idempotent,
            )
            .await?,
            unreverse: prep(
                format!("DELETE FROM {ks}.address_clients WHERE address = ? AND client = ?"),
                Kind::Idempotent,
            )
            .await?,
            unbind: prep(
                format!("DELETE FROM {ks}.client_addresses WHERE client = ? AND address = ?"),
                Kind::Idempotent,
            )
            .await?,
            cursor_save: prep(
                format!(
                    "INSERT INTO {ks}.cursors (client, address, version) VALUES (?, ?, ?) \
                     USING TIMESTAMP ? AND TTL ?"
                ),
                Kind::Idempotent,
            )
            .await?,
            cursor_get: prep(
                format!("SELECT address, version FROM {ks}.cursors WHERE client = ?"),
                Kind::Idempotent,
            )
            .await?,
            revoke: prep(
                format!("INSERT INTO {ks}.revoked_clients (client, at) VALUES (?, ?)"),
                Kind::Idempotent,
            )
            .await?,
            revoked: prep(
                format!("SELECT client FROM {ks}.revoked_clients WHERE client = ?"),
                Kind::Idempotent,
            )
            .await?,
            marks_serial: prep(
                format!("SELECT marks, rev FROM {ks}.read_marks WHERE client = ? AND address = ?"),
                Kind::Serial,
            )
            .await?,
            marks_get: prep(
                format!("SELECT marks, rev FROM {ks}.read_marks WHERE client = ? AND address = ?"),
                Kind::Idempotent,
            )
            .await?,
            marks_insert: prep(
                format!(
                    "INSERT INTO {ks}.read_marks (client, address, marks, rev) VALUES (?, ?, ?, 1) \
                     IF NOT EXISTS USING TTL ?"
                ),
                Kind::Once,
            )
            .await?,
            marks_update: prep(
                format!(
                    "UPDATE {ks}.read_marks USING TTL ? SET marks = ?, rev = ? \
                     WHERE client = ? AND address = ? IF rev = ?"
                ),
                Kind::Once,
            )
            .await?,
            session,
        };
        Ok(Self(Arc::new(inner)))
    }

    /// The keyspace's layout as its settings say now.
    async fn read_layout(&self) -> Result<Layout, TopologyError> {
        let res = self
            .0
            .session
            .execute_unpaged(&self.0.setting, (crate::cassandra::BINDINGS_SETTING,))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(st)?;
        let value = res.maybe_first_row::<(Option<String>,)>().map_err(st)?;
        let value = value.and_then(|(v,)| v);
        Ok([Layout::Rows, Layout::Migrated]
            .into_iter()
            .find(|l| l.setting() == value.as_deref())
            .unwrap_or(Layout::Legacy))
    }

    /// The layout to use for a call: `Legacy` reads the settings again once every
    /// [`LAYOUT_RECHECK`] (a failed read keeps `Legacy`, which stays correct: see the module docs).
    async fn layout(&self) -> Layout {
        let now = Layout::from_u8(self.0.layout.load(Ordering::Acquire));
        if now != Layout::Legacy {
            return now;
        }
        let Some(checked) = &self.0.checked else {
            return Layout::Legacy;
        };
        let due = {
            let mut at = checked.lock().unwrap_or_else(|p| p.into_inner());
            let due = at.elapsed() >= LAYOUT_RECHECK;
            if due {
                *at = Instant::now();
            }
            due
        };
        if due {
            match self.read_layout().await {
                Ok(Layout::Legacy) => {}
                Ok(layout) => {
                    tracing::info!("bindings: client_bindings is the record from now on");
                    self.0.layout.store(layout as u8, Ordering::Release);
                    return layout;
                }
                Err(e) => tracing::warn!("bindings: reading the settings failed: {e}"),
            }
        }
        Layout::Legacy
    }

    /// The bindings `client_addresses` records for a client.
    async fn legacy_bindings(&self, client: &ClientId) -> Result<Vec<Binding>, TopologyError> {
        let mut rows = self
            .0
            .session
            .execute_iter(self.0.get.clone(), (client.as_str(),))
            .await
            .map_err(unavailable)?
            .rows_stream::<(String, Option<i64>)>()
            .map_err(st)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().await {
            let (address, since) = row.map_err(unavailable)?;
            out.push(Binding {
                address: Address::parse(&address).map_err(st)?,
                since: since.unwrap_or(0).max(0) as u64,
            });
        }
        Ok(out)
    }

    /// A client's `client_bindings` row: its map and `rev`, or None when it has none.
    async fn map_row(
        &self,
        serial: bool,
        client: &ClientId,
    ) -> Result<Option<(Map, i64)>, TopologyError> {
        let stmt = if serial {
            &self.0.map_serial
        } else {
            &self.0.map_get
        };
        let res = self
            .0
            .session
            .execute_unpaged(stmt, (client.as_str(),))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(st)?;
        let row = res
            .maybe_first_row::<(Option<Map>, Option<i64>)>()
            .map_err(st)?;
        Ok(row.map(|(m, r)| (m.unwrap_or_default(), r.unwrap_or(0))))
    }

    /// Writes a client's map if its `rev` is still `rev` (None: if it has no row); whether it did.
    async fn put_map(
        &self,
        client: &ClientId,
        rev: Option<i64>,
        map: &Map,
    ) -> Result<bool, TopologyError> {
        let res = match rev {
            None => self
                .0
                .session
                .execute_unpaged(&self.0.map_insert, (client.as_str(), map))
                .await
                .map_err(unavailable)?,
            Some(rev) => self
                .0
                .session
                .execute_unpaged(&self.0.map_update, (map, rev + 1, client.as_str(), rev))
                .await
                .map_err(unavailable)?,
        };
        crate::cassandra::applied(res).map_err(st)
    }

    /// Changes a client's map by compare-and-set: `change` gets the stored map, changes it and
    /// says what it did; after a lost race it runs again on a fresh (`SERIAL`) read. The row is
    /// written when the map changed, or always with `always` (which moves `rev`, so a
    /// [`migrate_bindings`] that read before this call does not overwrite it).
    async fn change_map<T>(
        &self,
        client: &ClientId,
        always: bool,
        mut change: impl FnMut(&mut Map) -> T,
    ) -> Result<T, TopologyError> {
        for attempt in 0..CAS_ATTEMPTS {
            let row = self.map_row(attempt > 0, client).await?;
            let rev = row.as_ref().map(|(_, r)| *r);
            let before = row.map(|(m, _)| m).unwrap_or_default();
            let mut map = before.clone();
            let out = change(&mut map);
            if !always && map == before {
                return Ok(out);
            }
            if self.put_map(client, rev, &map).await? {
                return Ok(out);
            }
            backoff(attempt).await;
        }
        Err(conflicted(client))
    }

    /// Makes a client's map equal to what `client_addresses` records ([`migrate_bindings`]);
    /// whether it had to change it.
    async fn catch_up(&self, client: &ClientId) -> Result<bool, TopologyError> {
        for attempt in 0..CAS_ATTEMPTS {
            // The row first, then the record: a change that lands between the two moves `rev`,
            // and the write below fails and reads again.
            let row = self.map_row(true, client).await?;
            let record: Map = self
                .legacy_bindings(client)
                .await?
                .into_iter()
                .map(|b| (b.address.as_str().to_owned(), b.since as i64))
                .collect();
            if row.as_ref().is_some_and(|(m, _)| *m == record)
                || (row.is_none() && record.is_empty())
            {
                return Ok(false);
            }
            if self.put_map(client, row.map(|(_, r)| r), &record).await? {
                return Ok(true);
            }
            backoff(attempt).await;
        }
        Err(conflicted(client))
    }

    /// Runs `stmt` once with each of `values`, [`CONCURRENCY`] at a time.
    async fn exec_each<V: scylla::serialize::row::SerializeRow>(
        &self,
        stmt: &PreparedStatement,
        values: Vec<V>,
    ) -> Result<(), TopologyError> {
        let session = &self.0.session;
        let futs: Vec<_> = values
            .into_iter()
            .map(|v| async move {
                session
                    .execute_unpaged(stmt, v)
                    .await
                    .map(|_| ())
                    .map_err(unavailable)
            })
            .collect();
        stream::iter(futs)
            .buffered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Writes the reverse rows of a client's bindings.
    async fn reverse_write(
        &self,
        client: &ClientId,
        bindings: &[(Binding, bool)],
    ) -> Result<(), TopologyError> {
        let now = CqlTimestamp(crate::clock::now_ms() as i64);
        let rows: Vec<_> = bindings
            .iter()
            .map(|(b, _)| (b.address.as_str(), client.as_str(), b.since as i64, now))
            .collect();
        self.exec_each(&self.0.reverse, rows).await
    }

    /// Deletes the reverse rows of a client's bindings to `addresses`.
    async fn reverse_delete(
        &self,
        client: &ClientId,
        addresses: &[Address],
    ) -> Result<(), TopologyError> {
        let rows: Vec<_> = addresses
            .iter()
            .map(|a| (a.as_str(), client.as_str()))
            .collect();
        self.exec_each(&self.0.unreverse, rows).await
    }

    /// Claims new bindings in `client_addresses` (the first `since` wins); each with the
    /// `since` kept and whether it is new. The rows are claimed one by one, so the limit is
    /// checked against a read before them: concurrent binds may pass it by one call's worth
    /// until `migrate bindings` makes the one-row record the rule.
    async fn legacy_add(
        &self,
        client: &ClientId,
        wanted: &[&Binding],
        limit: usize,
    ) -> Result<Vec<(Binding, bool)>, TopologyError> {
        let existing: HashMap<Address, u64> = self
            .legacy_bindings(client)
            .await?
            .into_iter()
            .map(|b| (b.address, b.since))
            .collect();
        let more = wanted
            .iter()
            .filter(|b| !existing.contains_key(&b.address))
            .count();
        within_limit(client, existing.len(), more, limit)?;
        let now = CqlTimestamp(crate::clock::now_ms() as i64);
        let inner = &self.0;
        let futs: Vec<_> = wanted
            .iter()
            .map(|b| {
                let known = existing.get(&b.address).copied();
                async move {
                    let (since, new) = match known {
                        Some(since) => (since, false),
                        None => {
                            let res = inner
                                .session
                                .execute_unpaged(
                                    &inner.claim,
                                    (client.as_str(), b.address.as_str(), b.since as i64, now),
                                )
                                .await
                                .map_err(unavailable)?;
                            match claim_outcome(res)? {
                                None => (b.since, true),
                                Some(since) => (since, false),
                            }
                        }
                    };
                    let kept = Binding {
                        address: b.address.clone(),
                        since,
                    };
                    Ok::<_, TopologyError>((kept, new))
                }
            })
            .collect();
        stream::iter(futs).buffered(CONCURRENCY).try_collect().await
    }

    /// Deletes `client_addresses` rows of a client that are there (a point delete each, so the
    /// table gets no tombstone for rows it never had).
    async fn legacy_remove(
        &self,
        client: &ClientId,
        addresses: &[Address],
    ) -> Result<(), TopologyError> {
        let bound: Vec<Address> = self
            .legacy_bindings(client)
            .await?
            .into_iter()
            .map(|b| b.address)
            .filter(|a| addresses.contains(a))
            .collect();
        self.legacy_delete(client, &bound).await
    }

    /// Deletes `client_addresses` rows of a client.
    async fn legacy_delete(
        &self,
        client: &ClientId,
        bound: &[Address],
    ) -> Result<(), TopologyError> {
        let rows: Vec<_> = bound
            .iter()
            .map(|a| (client.as_str(), a.as_str()))
            .collect();
        self.exec_each(&self.0.unbind, rows).await
    }
}

/// What a change of a client's row answers after [`CAS_ATTEMPTS`] lost races.
fn conflicted(client: &ClientId) -> TopologyError {
    TopologyError::Unavailable(format!(
        "bindings of {client}: {CAS_ATTEMPTS} conflicting writes in a row"
    ))
}

/// A short random pause after a lost compare-and-set, longer with each attempt.
async fn backoff(attempt: u32) {
    let max_us = 200 * (u128::from(attempt) + 1);
    let us = uuid::Uuid::new_v4().as_u128() % max_us;
    tokio::time::sleep(Duration::from_micros(us as u64)).await;
}

/// What [`migrate_bindings`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The layout the keyspace had: anything but `Legacy` means there was nothing to do.
    pub already: Layout,
    /// Clients looked at (a client with rows in both tables counts twice).
    pub clients: u64,
    /// Clients whose `client_bindings` row was written.
    pub changed: u64,
}

/// Makes `client_bindings` the record of bindings in a keyspace whose record was
/// `client_addresses` (`signalpost migrate bindings`; run once every node runs a version with
/// `schema/010_client_bindings.cql`): every client's row is made equal to what
/// `client_addresses` records (by compare-and-set, so changes nodes make meanwhile are kept),
/// then the settings say `migrated`, and nodes switch within [`LAYOUT_RECHECK`]. A keyspace
/// that is past that is left as it is (run twice, the second run does nothing).
pub async fn migrate_bindings(
    session: Arc<Session>,
    keyspace: &str,
) -> Result<Migrated, TopologyError> {
    let t = CassandraTopology::with_layout(session.clone(), keyspace, Layout::Legacy).await?;
    let mut done = Migrated {
        // After the switch `client_addresses` is no longer the record: catching up with it
        // again would undo what was bound since.
        already: t.read_layout().await?,
        clients: 0,
        changed: 0,
    };
    if done.already != Layout::Legacy {
        return Ok(done);
    }
    for table in ["client_addresses", "client_bindings"] {
        let select = if table == "client_addresses" {
            format!("SELECT DISTINCT client FROM {keyspace}.{table}")
        } else {
            format!("SELECT client FROM {keyspace}.{table}")
        };
        let scan = crate::cassandra::prepare(&session, select, Kind::Idempotent)
            .await
            .map_err(unavailable)?;
        let clients = session
            .execute_iter(scan, ())
            .await
            .map_err(unavailable)?
            .rows_stream::<(String,)>()
            .map_err(st)?;
        let changed: Vec<bool> = clients
            .map(|row| {
                let t = &t;
                async move {
                    let (client,) = row.map_err(unavailable)?;
                    t.catch_up(&ClientId::parse(&client).map_err(st)?).await
                }
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        done.clients += changed.len() as u64;
        done.changed += changed.iter().filter(|c| **c).count() as u64;
    }
    crate::cassandra::put_setting(
        &session,
        keyspace,
        crate::cassandra::BINDINGS_SETTING,
        crate::cassandra::BINDINGS_MIGRATED,
    )
    .await
    .map_err(unavailable)?;
    Ok(done)
}

#[async_trait::async_trait]
impl Topology for CassandraTopology {
    async fn revoke(&self, client: &ClientId) -> Result<(), TopologyError> {
        let at = CqlTimestamp(crate::clock::now_ms() as i64);
        self.0
            .session
            .execute_unpaged(&self.0.revoke, (client.as_str(), at))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn revoked(&self, client: &ClientId) -> Result<bool, TopologyError> {
        let rows = self
            .0
            .session
            .execute_unpaged(&self.0.revoked, (client.as_str(),))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(st)?;
        Ok(rows.rows_num() > 0)
    }

    async fn get(&self, client: &ClientId) -> Result<Vec<Binding>, TopologyError> {
        match self.layout().await {
            Layout::Legacy => self.legacy_bindings(client).await,
            Layout::Migrated | Layout::Rows => {
                let map = self.map_row(false, client).await?.unwrap_or_default().0;
                map.into_iter()
                    .map(|(a, since)| {
                        Ok(Binding {
                            address: Address::parse(&a).map_err(st)?,
                            since: since.max(0) as u64,
                        })
                    })
                    .collect()
            }
        }
    }

    async fn add(
        &self,
        client: &ClientId,
        bindings: &[Binding],
        limit: usize,
    ) -> Result<Vec<Binding>, TopologyError> {
        // One entry per address, the first one asked for.
        let wanted = first_of_each(bindings, |b| &b.address);
        let layout = self.layout().await;
        let kept: Vec<(Binding, bool)> = match layout {
            Layout::Legacy => {
                let kept = self.legacy_add(client, &wanted, limit).await?;
                self.change_map(client, true, |m| {
                    for (b, _) in &kept {
                        m.entry(b.address.as_str().to_owned())
                            .or_insert(b.since as i64);
                    }
                })
                .await?;
                kept
            }
            Layout::Migrated | Layout::Rows => {
                // The limit is checked on the row the compare-and-set writes over.
                self.change_map(client, false, |m| {
                    let more = wanted
                        .iter()
                        .filter(|b| !m.contains_key(b.address.as_str()))
                        .count();
                    within_limit(client, m.len(), more, limit)?;
                    Ok(wanted
                        .iter()
                        .map(|b| match m.get(b.address.as_str()) {
                            Some(since) => (
                                Binding {
                                    address: b.address.clone(),
                                    since: (*since).max(0) as u64,
                                },
                                false,
                            ),
                            None => {
                                m.insert(b.address.as_str().to_owned(), b.since as i64);
                                ((*b).clone(), true)
                            }
                        })
                        .collect())
                })
                .await??
            }
        };
        if layout == Layout::Legacy {
            // For nodes of earlier versions, which list an address's clients from this table.
            self.reverse_write(client, &kept).await?;
        }
        Ok(kept
            .into_iter()
            .filter_map(|(b, new)| new.then_some(b))
            .collect())
    }

    async fn remove(
        &self,
        client: &ClientId,
        addresses: &[Address],
    ) -> Result<Vec<Address>, TopologyError> {
        let asked: Vec<Address> = first_of_each(addresses, |a| a)
            .into_iter()
            .cloned()
            .collect();
        let drop_asked = |m: &mut Map| -> Vec<Address> {
            asked
                .iter()
                .filter(|a| m.remove(a.as_str()).is_some())
                .cloned()
                .collect()
        };
        match self.layout().await {
            Layout::Legacy => {
                let bound: Vec<Address> = self
                    .legacy_bindings(client)
                    .await?
                    .into_iter()
                    .map(|b| b.address)
                    .collect();
                let gone: Vec<Address> = asked
                    .iter()
                    .filter(|a| bound.contains(a))
                    .cloned()
                    .collect();
                self.reverse_delete(client, &gone).await?;
                self.legacy_delete(client, &gone).await?;
                self.change_map(client, true, drop_asked).await?;
                Ok(gone)
            }
            layout => {
                let gone = self.change_map(client, false, drop_asked).await?;
                if layout == Layout::Migrated {
                    // Rows the earlier record holds for these addresses, so that a node not
                    // yet switched does not see them bound.
                    self.legacy_remove(client, &asked).await?;
                }
                Ok(gone)
            }
        }
    }
}

/// Ok(None) if the binding was claimed, Ok(Some(since already stored)) if it existed.
fn claim_outcome(
    res: scylla::response::query_result::QueryResult,
) -> Result<Option<u64>, TopologyError> {
    Ok(
        match crate::cassandra::conditional(res, Some("since")).map_err(st)? {
            Ok(()) => None,
            Err(Some(CqlValue::BigInt(since))) => Some(since.max(0) as u64),
            Err(_) => Some(0),
        },
    )
}

/// How many times a mark retries its compare-and-set before it answers unavailable.
const MARK_ATTEMPTS: usize = 20;

impl CassandraTopology {
    async fn marks_row(
        &self,
        serial: bool,
        client: &ClientId,
        address: &Address,
    ) -> Result<Option<(Vec<u8>, i64)>, TopologyError> {
        let stmt = if serial {
            &self.0.marks_serial
        } else {
            &self.0.marks_get
        };
        let res = self
            .0
            .session
            .execute_unpaged(stmt, (client.as_str(), address.as_str()))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(st)?;
        let row = res
            .maybe_first_row::<(Option<Vec<u8>>, Option<i64>)>()
            .map_err(st)?;
        Ok(row.map(|(m, r)| (m.unwrap_or_default(), r.unwrap_or(0))))
    }
}

/// Compare-and-set on `rev` (a lightweight transaction per mark): a mark that raced another
/// reads again and merges again, so neither is lost.
#[async_trait::async_trait]
impl ReadMarks for CassandraTopology {
    async fn mark(
        &self,
        client: &ClientId,
        address: &Address,
        versions: &[u64],
        low: u64,
        ttl_secs: u32,
    ) -> Result<usize, TopologyError> {
        let ttl = ttl_secs.clamp(1, i32::MAX as u32) as i32;
        for _ in 0..MARK_ATTEMPTS {
            let current = self.marks_row(true, client, address).await?;
            let merged =
                super::merge_marks(current.as_ref().map(|(m, _)| m.as_slice()), versions, low)?;
            let res = match current {
                None => self
                    .0
                    .session
                    .execute_unpaged(
                        &self.0.marks_insert,
                        (client.as_str(), address.as_str(), &merged, ttl),
                    )
                    .await
                    .map_err(unavailable)?,
                Some((_, rev)) => self
                    .0
                    .session
                    .execute_unpaged(
                        &self.0.marks_update,
                        (
                            ttl,
                            &merged,
                            rev + 1,
                            client.as_str(),
                            address.as_str(),
                            rev,
                        ),
                    )
                    .await
                    .map_err(unavailable)?,
            };
            if crate::cassandra::applied(res).map_err(st)? {
                return Ok(merged.len());
            }
        }
        Err(TopologyError::Unavailable(format!(
            "read marks of {client} on {address}: {MARK_ATTEMPTS} conflicting writes in a row"
        )))
    }

    async fn marks(
        &self,
        client: &ClientId,
        address: &Address,
    ) -> Result<(roaring::RoaringTreemap, usize), TopologyError> {
        match self.marks_row(false, client, address).await? {
            Some((m, _)) if !m.is_empty() => Ok((super::decode_marks(&m)?, m.len())),
            _ => Ok((roaring::RoaringTreemap::new(), 0)),
        }
    }

    /// Each row is written with its TTL: Cassandra drops it, nothing to do here.
    async fn expire(&self, _now_ms: u64) -> Result<u64, TopologyError> {
        Ok(0)
    }
}

#[async_trait::async_trait]
impl Cursors for CassandraTopology {
    async fn save(
        &self,
        acks: &[(ClientId, Address, u64)],
        ttl_secs: u32,
    ) -> Result<(), TopologyError> {
        // The highest ack per (client, address), grouped by client (one partition each). Each
        // cell lives `ttl_secs` after its last ack, so a client's partition holds the addresses
        // it acked within the retention (and their expired cells until compaction).
        let ttl = ttl_secs.min(i32::MAX as u32) as i32;
        let mut by_client: BTreeMap<&ClientId, BTreeMap<&Address, u64>> = BTreeMap::new();
        for (c, a, v) in acks {
            let e = by_client.entry(c).or_default().entry(a).or_insert(0);
            *e = (*e).max(*v);
        }
        let mut batches = Vec::new();
        for (client, acks) in by_client {
            let acks: Vec<(&Address, u64)> = acks.into_iter().filter(|(_, v)| *v > 0).collect();
            for chunk in acks.chunks(CURSORS_PER_BATCH) {
                let mut batch = Batch::new(BatchType::Unlogged);
                batch.set_is_idempotent(true);
                let mut values = Vec::with_capacity(chunk.len());
                for (a, v) in chunk {
                    batch.append_statement(self.0.cursor_save.clone());
                    let v = (*v).min(i64::MAX as u64) as i64;
                    values.push((client.as_str(), a.as_str(), v, v, ttl));
                }
                batches.push((batch, values));
            }
        }
        let inner = &self.0;
        let futs: Vec<_> = batches
            .into_iter()
            .map(|(batch, values)| async move {
                inner
                    .session
                    .batch(&batch, values)
                    .await
                    .map(|_| ())
                    .map_err(unavailable)
            })
            .collect();
        stream::iter(futs)
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn get(&self, client: &ClientId) -> Result<HashMap<Address, u64>, TopologyError> {
        let mut rows = self
            .0
            .session
            .execute_iter(self.0.cursor_get.clone(), (client.as_str(),))
            .await
            .map_err(unavailable)?
            .rows_stream::<(String, Option<i64>)>()
            .map_err(st)?;
        let mut out = HashMap::new();
        while let Some(row) = rows.next().await {
            let (address, version) = row.map_err(unavailable)?;
            if let Some(v) = version {
                out.insert(Address::parse(&address).map_err(st)?, v.max(0) as u64);
            }
        }
        Ok(out)
    }

    /// Each cell is written with its TTL: Cassandra drops it, nothing to do here.
    async fn expire(&self, _now_ms: u64) -> Result<u64, TopologyError> {
        Ok(0)
    }
}
