//! Topology and cursors in Cassandra (see `schema/002_tables.cql` and `docs/cassandra.md`):
//! - `client_addresses` ((client), address) → since: the bindings of a client;
//! - `address_clients` ((address), client) → since: the same, by address (members, in client order);
//! - `cursors` ((client), address) → version, written `USING TIMESTAMP version`.
//!
//! `add` claims each new binding with `INSERT … IF NOT EXISTS` (one Paxos round per binding that
//! is not there yet: the first `since` wins even between concurrent calls), then writes the
//! reverse row. Bindings already present are only re-written in the reverse table (which repairs
//! a reverse row lost by a crash between the two writes). `remove` deletes the reverse row, then
//! the binding. A cursor is one plain write whose write timestamp is the version, so Cassandra's
//! last-write-wins keeps the highest version whatever the order of concurrent saves — no read and
//! no lightweight transaction.

use super::storage_err as st;
use super::{Binding, Cursors, ReadMarks, Topology, TopologyError};
use crate::address::{Address, ClientId};
use crate::cassandra::Kind;
use futures_util::{StreamExt, TryStreamExt, stream};
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, CqlValue};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Requests in flight within one call.
const CONCURRENCY: usize = 32;
/// Cursor rows per single-partition batch.
const CURSORS_PER_BATCH: usize = 100;

fn unavailable(e: impl std::fmt::Display) -> TopologyError {
    TopologyError::Unavailable(e.to_string())
}

/// The Cassandra-backed topology and cursors (a cheap clone of a shared handle).
#[derive(Clone)]
pub struct CassandraTopology(Arc<Inner>);

struct Inner {
    session: Arc<Session>,
    get: PreparedStatement,
    claim: PreparedStatement,
    reverse: PreparedStatement,
    unreverse: PreparedStatement,
    unbind: PreparedStatement,
    members_first: PreparedStatement,
    members_after: PreparedStatement,
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
    /// Prepares the statements; the schema must have been applied ([`crate::cassandra::open`]).
    pub async fn new(session: Arc<Session>, keyspace: &str) -> Result<Self, TopologyError> {
        if !crate::cassandra::valid_keyspace(keyspace) {
            return Err(st(format!("invalid keyspace {keyspace:?}")));
        }
        let ks = keyspace;
        let prep = async |cql: String, kind: Kind| {
            crate::cassandra::prepare(&session, cql, kind)
                .await
                .map_err(unavailable)
        };
        let inner = Inner {
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
            members_first: prep(
                format!("SELECT client FROM {ks}.address_clients WHERE address = ? LIMIT ?"),
                Kind::Idempotent,
            )
            .await?,
            members_after: prep(
                format!(
                    "SELECT client FROM {ks}.address_clients WHERE address = ? AND client > ? LIMIT ?"
                ),
                Kind::Idempotent,
            )
            .await?,
            cursor_save: prep(
                format!(
                    "INSERT INTO {ks}.cursors (client, address, version) VALUES (?, ?, ?) USING TIMESTAMP ?"
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

    async fn bindings(&self, client: &ClientId) -> Result<Vec<Binding>, TopologyError> {
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
        self.bindings(client).await
    }

    async fn add(
        &self,
        client: &ClientId,
        bindings: &[Binding],
    ) -> Result<Vec<Binding>, TopologyError> {
        let existing: HashMap<Address, u64> = self
            .bindings(client)
            .await?
            .into_iter()
            .map(|b| (b.address, b.since))
            .collect();
        // One entry per address, the first one asked for.
        let mut wanted: Vec<&Binding> = Vec::new();
        for b in bindings {
            if !wanted.iter().any(|w| w.address == b.address) {
                wanted.push(b);
            }
        }
        let now = CqlTimestamp(crate::clock::now_ms() as i64);
        let inner = &self.0;
        let futs: Vec<_> = wanted
            .into_iter()
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
                    inner
                        .session
                        .execute_unpaged(
                            &inner.reverse,
                            (b.address.as_str(), client.as_str(), since as i64, now),
                        )
                        .await
                        .map_err(unavailable)?;
                    Ok::<_, TopologyError>(new.then(|| b.clone()))
                }
            })
            .collect();
        let results: Vec<Option<Binding>> = stream::iter(futs)
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
        Ok(results.into_iter().flatten().collect())
    }

    async fn remove(
        &self,
        client: &ClientId,
        addresses: &[Address],
    ) -> Result<Vec<Address>, TopologyError> {
        let bound: HashMap<Address, u64> = self
            .bindings(client)
            .await?
            .into_iter()
            .map(|b| (b.address, b.since))
            .collect();
        let mut gone: Vec<Address> = Vec::new();
        for a in addresses {
            if bound.contains_key(a) && !gone.contains(a) {
                gone.push(a.clone());
            }
        }
        let inner = &self.0;
        let futs: Vec<_> = gone
            .iter()
            .map(|a| async move {
                inner
                    .session
                    .execute_unpaged(&inner.unreverse, (a.as_str(), client.as_str()))
                    .await
                    .map_err(unavailable)?;
                inner
                    .session
                    .execute_unpaged(&inner.unbind, (client.as_str(), a.as_str()))
                    .await
                    .map_err(unavailable)?;
                Ok::<_, TopologyError>(())
            })
            .collect();
        stream::iter(futs)
            .buffered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(gone)
    }

    async fn members(
        &self,
        address: &Address,
        after: Option<&ClientId>,
        limit: usize,
    ) -> Result<Vec<ClientId>, TopologyError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = limit.min(i32::MAX as usize) as i32;
        let res = match after {
            None => {
                self.0
                    .session
                    .execute_unpaged(&self.0.members_first, (address.as_str(), limit))
                    .await
            }
            Some(c) => {
                self.0
                    .session
                    .execute_unpaged(&self.0.members_after, (address.as_str(), c.as_str(), limit))
                    .await
            }
        }
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(st)?;
        res.rows::<(&str,)>()
            .map_err(st)?
            .map(|r| ClientId::parse(r.map_err(st)?.0).map_err(st))
            .collect()
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
}

#[async_trait::async_trait]
impl Cursors for CassandraTopology {
    async fn save(&self, acks: &[(ClientId, Address, u64)]) -> Result<(), TopologyError> {
        // The highest ack per (client, address), grouped by client (one partition each).
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
                    values.push((client.as_str(), a.as_str(), v, v));
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
}
