//! Presence on Cassandra, kept without deletes (schema `008_presence_slots.cql`). Each
//! connection of a node has a *slot*, a small integer this process hands out and reuses once the
//! connection is gone. The slot's row in `presence_slots` (by node, for the cleanup after a dead
//! node) is overwritten — never deleted — at connect, at each join or leave of a presence address
//! and at disconnect; the connection's row in `presence_clients` (by client, for lookups) is keyed
//! by node and slot and overwritten at connect (up) and disconnect (gone, expiring after a day).
//! So neither partition collects a tombstone per connection: a node's holds at most its peak of
//! concurrent connections, a client's one row per slot it got, and the leader's `clear_node` and
//! a lookup read them in one request however many connections came and went. The nodes that may
//! have rows are listed in `presence_nodes` (one small partition). The tables an earlier version
//! wrote instead (`presence`, `presence_by_node`, `presence_members_by_node`) are still read, for
//! nodes that ran it.
//!
//! Members of presence addresses (schema `007_presence_members.cql`): a join or leave is one
//! compare-and-set on the `(address, client)` row of the connections holding the membership,
//! plus the write of the connection's slot and of its row in the address's member list — it
//! never reads the member list. The member list (`presence_member_slots`, schema
//! `009_presence_member_slots.cql`) is keyed by the node and slot of each connection holding a
//! membership: a leave deletes that key, and since slots are reused the deletes of an address
//! land on the same few keys, so its partition holds at most one row or tombstone per slot
//! however many clients came and went. A listing reads it whole and answers each client once,
//! in client order. The list an earlier version kept (`presence_members`, one row per client,
//! deleted when it stopped being a member) is still read, and a client's row there is deleted
//! at its last leave.

use super::{Change, Cleared, Member, Presence, PresenceError, Seen};
use crate::address::{Address, ClientId};
use crate::cassandra::Kind;
use futures_util::future::try_join_all;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn unavailable(e: impl std::fmt::Display) -> PresenceError {
    PresenceError::Unavailable(format!("cassandra: {e}"))
}

/// Cluster-wide presence in a Cassandra keyspace (schema files 3, 4, 7 and 8).
#[derive(Clone)]
pub struct CassandraPresence(Arc<Inner>);

struct Inner {
    session: Arc<Session>,
    /// The slots of the connections this process holds, per node (one, except in tests).
    slots: Mutex<HashMap<String, NodeSlots>>,
    /// The member lists of large addresses as a first page read them, for the pages after it
    /// (see [`SNAPSHOT_TTL`]).
    snapshots: Mutex<HashMap<String, (Instant, Arc<MemberList>)>>,
    /// Per address being listed: the last read of its member list and when it started, behind
    /// a lock that one reader at a time holds (see [`CassandraPresence::read_listed`]).
    listings: Mutex<HashMap<String, Listing>>,
    /// How many times a member list was read from Cassandra.
    listed_reads: std::sync::atomic::AtomicU64,
    /// The write time (µs) of the last write or delete of a slot's rows (its slot, client and
    /// member-list rows) or of a node's partitions: they take the time now or one more, so this
    /// process's writes of a slot settle in the order they were made, even when the driver's
    /// retry of one lands after the next.
    stamp: std::sync::atomic::AtomicI64,
    client_write: PreparedStatement,
    lookup: PreparedStatement,
    legacy_delete: PreparedStatement,
    legacy_lookup: PreparedStatement,
    slot_write: PreparedStatement,
    slots_of_node: PreparedStatement,
    slots_drop_node: PreparedStatement,
    legacy_of_node: PreparedStatement,
    legacy_drop_node: PreparedStatement,
    nodes: PreparedStatement,
    add_node: PreparedStatement,
    forget_node: PreparedStatement,
    holders: PreparedStatement,
    holders_insert: PreparedStatement,
    holders_update: PreparedStatement,
    listed_add: PreparedStatement,
    listed_remove: PreparedStatement,
    listed_drop_node: PreparedStatement,
    listed: PreparedStatement,
    legacy_member: PreparedStatement,
    legacy_member_remove: PreparedStatement,
    legacy_members: PreparedStatement,
    legacy_held_of_node: PreparedStatement,
    legacy_held_drop_node: PreparedStatement,
}

/// One node's slots in this process.
#[derive(Default)]
struct NodeSlots {
    /// By connection id.
    held: HashMap<String, Slot>,
    /// Slots given back, lowest reused first, so the partition stays as small as it can.
    free: BTreeSet<i32>,
    /// The next slot never used.
    next: i32,
}

/// A connection's slot and what its row says.
struct Slot {
    n: i32,
    client: String,
    /// When it connected (ms since epoch).
    since: i64,
    /// Whether the connection is up (between `connected` and `disconnected`).
    live: bool,
    /// What the client's row (`presence_clients`) says: up or not.
    client_row_live: bool,
    /// The presence addresses it holds, with the user each was joined with.
    memberships: BTreeMap<String, Option<String>>,
    /// The addresses whose member list has this slot's row, as last written.
    listed: BTreeSet<String>,
    /// Held while the row is written, so the writes of one slot go out one at a time and the
    /// last one carries the latest state.
    write: Arc<tokio::sync::Mutex<()>>,
}

/// A member list: client → user, in client order.
type MemberList = BTreeMap<String, Option<String>>;

/// The last read of an address's member list and when it started, behind the lock its reader
/// holds.
type Listing = Arc<tokio::sync::Mutex<Option<(Instant, Arc<MemberList>)>>>;

/// Takes an address's entry out of `listings` when the last listing of it is done, or dropped
/// (a request given up halfway).
struct ListingTurn<'a> {
    presence: &'a CassandraPresence,
    address: &'a str,
    entry: Listing,
}

impl Drop for ListingTurn<'_> {
    fn drop(&mut self) {
        let mut all = self
            .presence
            .0
            .listings
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // The map's and this one: nobody else is waiting.
        if Arc::strong_count(&self.entry) == 2 {
            all.remove(self.address);
        }
    }
}

/// How long the pages after the first of a large member list (`after`) are answered from the
/// list the first page read, instead of reading the address's whole partition again for each
/// (the partition is in slot order, not client order). A listing of many pages shows the list
/// as it was up to this long ago, as paging through a changing list does anyway.
const SNAPSHOT_TTL: Duration = Duration::from_secs(5);

/// How many such lists a process keeps at most (one of 100 000 members is roughly 10 MB).
const MAX_SNAPSHOTS: usize = 8;

/// How many times a join or leave retries its compare-and-set before it answers unavailable.
const CAS_ATTEMPTS: usize = 20;

/// How long (s) a membership row with no connections is kept.
const EMPTY_HOLDERS_TTL: i32 = 86_400;

/// The connections holding one membership, and the row's revision.
struct Holders {
    connections: Vec<String>,
    user: Option<String>,
    rev: i64,
}

impl CassandraPresence {
    pub async fn new(session: Arc<Session>, keyspace: &str) -> Result<Self, PresenceError> {
        if !crate::cassandra::valid_keyspace(keyspace) {
            return Err(unavailable(format!("invalid keyspace {keyspace:?}")));
        }
        let ks = keyspace;
        let prep_as = async |cql: String, kind: Kind| {
            crate::cassandra::prepare(&session, cql, kind)
                .await
                .map_err(unavailable)
        };
        let prep = async |cql: String| prep_as(cql, Kind::Idempotent).await;
        Ok(Self(Arc::new(Inner {
            client_write: prep(format!(
                "INSERT INTO {ks}.presence_clients \
                 (client, node, slot, connection, since, live) VALUES (?, ?, ?, ?, ?, ?) \
                 USING TIMESTAMP ? AND TTL ?"
            ))
            .await?,
            lookup: prep(format!(
                "SELECT node, connection, since, live FROM {ks}.presence_clients WHERE client = ?"
            ))
            .await?,
            legacy_delete: prep(format!(
                "DELETE FROM {ks}.presence WHERE client = ? AND node = ? AND connection = ?"
            ))
            .await?,
            legacy_lookup: prep(format!(
                "SELECT node, connection, since FROM {ks}.presence WHERE client = ?"
            ))
            .await?,
            slot_write: prep(format!(
                "INSERT INTO {ks}.presence_slots \
                 (node, slot, client, connection, live, memberships) VALUES (?, ?, ?, ?, ?, ?) \
                 USING TIMESTAMP ?"
            ))
            .await?,
            slots_of_node: prep(format!(
                "SELECT slot, client, connection, live, memberships FROM {ks}.presence_slots \
                 WHERE node = ?"
            ))
            .await?,
            slots_drop_node: prep(format!(
                "DELETE FROM {ks}.presence_slots USING TIMESTAMP ? WHERE node = ?"
            ))
            .await?,
            legacy_of_node: prep(format!(
                "SELECT client, connection FROM {ks}.presence_by_node WHERE node = ?"
            ))
            .await?,
            legacy_drop_node: prep(format!("DELETE FROM {ks}.presence_by_node WHERE node = ?"))
                .await?,
            nodes: prep(format!(
                "SELECT node FROM {ks}.presence_nodes WHERE shard = 0"
            ))
            .await?,
            add_node: prep(format!(
                "INSERT INTO {ks}.presence_nodes (shard, node) VALUES (0, ?)"
            ))
            .await?,
            forget_node: prep(format!(
                "DELETE FROM {ks}.presence_nodes WHERE shard = 0 AND node = ?"
            ))
            .await?,
            holders: prep_as(
                format!(
                    "SELECT connections, user, rev FROM {ks}.presence_holders \
                     WHERE address = ? AND client = ?"
                ),
                Kind::Serial,
            )
            .await?,
            holders_insert: prep_as(
                format!(
                    "INSERT INTO {ks}.presence_holders (address, client, connections, user, rev) \
                     VALUES (?, ?, ?, ?, ?) IF NOT EXISTS"
                ),
                Kind::Once,
            )
            .await?,
            holders_update: prep_as(
                format!(
                    "UPDATE {ks}.presence_holders USING TTL ? \
                     SET connections = ?, user = ?, rev = ? \
                     WHERE address = ? AND client = ? IF rev = ?"
                ),
                Kind::Once,
            )
            .await?,
            listed_add: prep(format!(
                "INSERT INTO {ks}.presence_member_slots (address, node, slot, client, user) \
                 VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            listed_remove: prep(format!(
                "DELETE FROM {ks}.presence_member_slots USING TIMESTAMP ? \
                 WHERE address = ? AND node = ? AND slot = ?"
            ))
            .await?,
            listed_drop_node: prep(format!(
                "DELETE FROM {ks}.presence_member_slots USING TIMESTAMP ? \
                 WHERE address = ? AND node = ?"
            ))
            .await?,
            listed: prep(format!(
                "SELECT client, user FROM {ks}.presence_member_slots WHERE address = ?"
            ))
            .await?,
            legacy_member: prep(format!(
                "SELECT client FROM {ks}.presence_members WHERE address = ? AND client = ?"
            ))
            .await?,
            legacy_member_remove: prep(format!(
                "DELETE FROM {ks}.presence_members USING TIMESTAMP ? \
                 WHERE address = ? AND client = ?"
            ))
            .await?,
            legacy_members: prep(format!(
                "SELECT client, user FROM {ks}.presence_members \
                 WHERE address = ? AND client > ? LIMIT ?"
            ))
            .await?,
            legacy_held_of_node: prep(format!(
                "SELECT address, client, connection FROM {ks}.presence_members_by_node \
                 WHERE node = ?"
            ))
            .await?,
            legacy_held_drop_node: prep(format!(
                "DELETE FROM {ks}.presence_members_by_node WHERE node = ?"
            ))
            .await?,
            slots: Mutex::default(),
            snapshots: Mutex::default(),
            listings: Mutex::default(),
            listed_reads: Default::default(),
            stamp: Default::default(),
            session,
        })))
    }
}

#[async_trait::async_trait]
impl Presence for CassandraPresence {
    async fn connected(&self, client: &ClientId, seen: Seen) -> Result<(), PresenceError> {
        let i = &self.0;
        let c = client.as_str();
        let (n, conn) = (seen.node.as_str(), seen.connection.as_str());
        // The node is listed first, then the connection's slot, then the client's row: a crash
        // in between leaves a row the cleanup can find.
        // Listed at every connect, not once per process: a node the leader cleared after it
        // lost its session and that came back must be listed again.
        self.exec(&i.add_node, (n,)).await?;
        self.update_slot(n, conn, Some(c), |s| {
            s.live = true;
            s.since = seen.since as i64;
        })
        .await
    }

    async fn disconnected(
        &self,
        _client: &ClientId,
        node: &str,
        connection: &str,
    ) -> Result<(), PresenceError> {
        self.update_slot(node, connection, None, |s| s.live = false)
            .await
    }

    async fn lookup(&self, clients: &[ClientId]) -> Result<Vec<Vec<Seen>>, PresenceError> {
        let i = &self.0;
        try_join_all(clients.iter().map(|c| async move {
            let c = c.as_str();
            let (rows, legacy) = futures_util::try_join!(
                self.rows::<(String, String, i64, bool)>(&i.lookup, (c,)),
                self.rows::<(String, String, i64)>(&i.legacy_lookup, (c,)),
            )?;
            let live = rows.into_iter().filter(|r| r.3).map(|r| (r.0, r.1, r.2));
            Ok::<_, PresenceError>(
                live.chain(legacy)
                    .map(|(node, connection, since)| Seen {
                        node,
                        connection,
                        since: since.max(0) as u64,
                    })
                    .collect(),
            )
        }))
        .await
    }

    async fn clear_node(&self, node: &str) -> Result<Cleared, PresenceError> {
        let i = &self.0;
        let slots: Vec<SlotRow> = self.rows(&i.slots_of_node, (node,)).await?;
        // Rows of the tables an earlier version wrote instead of the slots (schema files 3 and
        // 7), for a node that ran it.
        let mut held: Vec<(String, String, String)> =
            self.rows(&i.legacy_held_of_node, (node,)).await?;
        let legacy: Vec<(String, String)> = self.rows(&i.legacy_of_node, (node,)).await?;
        let mut entries = Vec::new();
        // The addresses whose member list has rows of this node.
        let mut listed: BTreeSet<String> = BTreeSet::new();
        for (slot, client, conn, live, memberships) in slots {
            let (Some(client), Some(conn)) = (client, conn) else {
                continue;
            };
            if client.is_empty() {
                continue;
            }
            for a in memberships.as_deref().unwrap_or("").split(' ') {
                if !a.is_empty() {
                    held.push((a.to_owned(), client.clone(), conn.clone()));
                    listed.insert(a.to_owned());
                }
            }
            if live == Some(true) {
                entries.push((client, slot, conn));
            }
        }
        // Memberships first: the rows that name them go with the partitions below.
        let mut left = Vec::new();
        for (address, client, conn) in &held {
            let (Ok(address), Ok(client)) = (Address::parse(address), ClientId::parse(client))
            else {
                continue;
            };
            if let Some(member) = self.release(&address, &client, node, conn).await? {
                left.push(Change {
                    address,
                    member,
                    joined: false,
                });
            }
        }
        try_join_all(
            listed
                .iter()
                .map(|a| self.exec(&i.listed_drop_node, (self.stamp(), a.as_str(), node))),
        )
        .await?;
        try_join_all(entries.iter().map(|(client, slot, conn)| {
            self.write_client_row(client, node, *slot, conn, 0, false)
        }))
        .await?;
        try_join_all(legacy.iter().map(|(client, conn)| {
            self.exec(&i.legacy_delete, (client.as_str(), node, conn.as_str()))
        }))
        .await?;
        self.exec(&i.slots_drop_node, (self.stamp(), node)).await?;
        for drop in [&i.legacy_held_drop_node, &i.legacy_drop_node] {
            self.exec(drop, (node,)).await?;
        }
        // This process's slots of that node start over (a node clears itself at startup).
        self.slots().remove(node);
        self.exec(&i.forget_node, (node,)).await?;
        Ok(Cleared {
            connections: (entries.len() + legacy.len()) as u64,
            left,
        })
    }

    async fn join(
        &self,
        address: &Address,
        member: &Member,
        node: &str,
        connection: &str,
    ) -> Result<bool, PresenceError> {
        let i = &self.0;
        let (a, c) = (address.as_str(), member.client.as_str());
        // The slot (and the member list's row) first: a node that dies after the transaction
        // leaves it for the cleanup to find.
        self.update_slot(node, connection, Some(c), |s| {
            s.memberships.insert(a.to_owned(), member.user.clone());
        })
        .await?;
        let key = format!("{node}/{connection}");
        for _ in 0..CAS_ATTEMPTS {
            let current = self.holders(address, &member.client).await?;
            // Some(whether the client became a member) once the transaction applied.
            let outcome = match current {
                Some(h) if h.connections.contains(&key) => return Ok(false),
                None => {
                    let rev = next_rev(0);
                    let res = self
                        .exec(
                            &i.holders_insert,
                            (a, c, key.as_str(), member.user.as_deref(), rev),
                        )
                        .await?;
                    applied(res)?.then_some(true)
                }
                Some(h) => {
                    let first = h.connections.is_empty();
                    let mut connections = h.connections;
                    connections.push(key.clone());
                    let user = if first { member.user.clone() } else { h.user };
                    let rev = next_rev(h.rev);
                    let res = self
                        .exec(
                            &i.holders_update,
                            (0i32, connections.join(" "), user, rev, a, c, h.rev),
                        )
                        .await?;
                    applied(res)?.then_some(first)
                }
            };
            if let Some(first) = outcome {
                return Ok(first);
            }
        }
        Err(contended(address, &member.client))
    }

    async fn leave(
        &self,
        address: &Address,
        client: &ClientId,
        node: &str,
        connection: &str,
    ) -> Result<Option<Member>, PresenceError> {
        let left = self.release(address, client, node, connection).await?;
        self.update_slot(node, connection, None, |s| {
            s.memberships.remove(address.as_str());
        })
        .await?;
        Ok(left)
    }

    async fn members(
        &self,
        address: &Address,
        after: Option<&ClientId>,
        limit: usize,
    ) -> Result<Vec<Member>, PresenceError> {
        let i = &self.0;
        let a = address.as_str();
        let next = after.is_some();
        let after = after.map_or("", ClientId::as_str);
        let legacy_limit = limit.clamp(1, i32::MAX as usize) as i32;
        let listed = async {
            if next && let Some(list) = self.snapshot(a) {
                return Ok(list);
            }
            let list = self.read_listed(a).await?;
            if list.len() > limit {
                self.keep_snapshot(a, &list);
            }
            Ok(list)
        };
        let (listed, legacy) = futures_util::try_join!(
            listed,
            self.rows::<(String, Option<String>)>(&i.legacy_members, (a, after, legacy_limit)),
        )?;
        let mut by_client: MemberList = listed
            .range::<str, _>((Bound::Excluded(after), Bound::Unbounded))
            .take(limit)
            .map(|(c, u)| (c.clone(), u.clone()))
            .collect();
        for (client, user) in legacy {
            by_client.entry(client).or_insert(user);
        }
        Ok(by_client
            .into_iter()
            .filter_map(|(client, user)| {
                Some(Member {
                    client: ClientId::parse(&client).ok()?,
                    user,
                })
            })
            .take(limit)
            .collect())
    }

    async fn nodes(&self) -> Result<Vec<String>, PresenceError> {
        let rows: Vec<(String,)> = self.rows(&self.0.nodes, ()).await?;
        let mut out: Vec<String> = rows.into_iter().map(|(n,)| n).collect();
        out.sort();
        Ok(out)
    }
}

/// A revision that is later than `prev` and, where the clock allows, the time now (µs): the
/// revisions of `presence_holders`, and the write time of a delete from the old member list.
fn next_rev(prev: i64) -> i64 {
    (crate::clock::now_us() as i64).max(prev + 1)
}

fn applied(res: scylla::response::query_result::QueryResult) -> Result<bool, PresenceError> {
    crate::cassandra::applied(res).map_err(unavailable)
}

fn contended(address: &Address, client: &ClientId) -> PresenceError {
    PresenceError::Unavailable(format!(
        "membership of {client} in {address}: {CAS_ATTEMPTS} conflicting writes in a row"
    ))
}

/// A user to write: left unset when there is none, as a null would write a tombstone (the key
/// it goes to was deleted before, so no earlier user shows through).
fn user_cell(user: &Option<String>) -> scylla::value::MaybeUnset<&str> {
    scylla::value::MaybeUnset::from_option(user.as_deref())
}

/// A row of `presence_slots`: slot, client, connection, live, memberships.
type SlotRow = (
    i32,
    Option<String>,
    Option<String>,
    Option<bool>,
    Option<String>,
);

/// How long (s) the row of a connection that is gone stays in `presence_clients`: it is
/// overwritten when the client gets the same slot again, and expires otherwise.
const GONE_TTL: i32 = 86_400;

impl CassandraPresence {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeSlots>> {
        self.0
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A write time (µs) later than any this process gave before.
    fn stamp(&self) -> i64 {
        use std::sync::atomic::Ordering;
        let now = crate::clock::now_us() as i64;
        let prev = self
            .0
            .stamp
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        now.max(prev + 1)
    }

    /// Changes what a connection's slot says and writes its row. A connection without a slot
    /// gets one when `client` is given (connect, join); otherwise there is nothing to change.
    async fn update_slot(
        &self,
        node: &str,
        connection: &str,
        client: Option<&str>,
        change: impl FnOnce(&mut Slot),
    ) -> Result<(), PresenceError> {
        let write = {
            let mut all = self.slots();
            let ns = all.entry(node.to_owned()).or_default();
            let slot = match (ns.held.contains_key(connection), client) {
                (true, _) => ns.held.get_mut(connection),
                (false, None) => None,
                (false, Some(client)) => {
                    let n = ns.free.pop_first().unwrap_or_else(|| {
                        ns.next += 1;
                        ns.next - 1
                    });
                    Some(ns.held.entry(connection.to_owned()).or_insert(Slot {
                        n,
                        client: client.to_owned(),
                        since: 0,
                        live: false,
                        client_row_live: false,
                        memberships: BTreeMap::new(),
                        listed: BTreeSet::new(),
                        write: Arc::default(),
                    }))
                }
            };
            let Some(slot) = slot else { return Ok(()) };
            change(slot);
            slot.write.clone()
        };
        self.write_slot(node, connection, write).await
    }

    /// Writes a slot's row as it is when its turn comes (a write queued behind this one
    /// carries any later change), and gives the slot back once the row says it is free.
    async fn write_slot(
        &self,
        node: &str,
        connection: &str,
        write: Arc<tokio::sync::Mutex<()>>,
    ) -> Result<(), PresenceError> {
        let _turn = write.lock().await;
        let row = self
            .slots()
            .get(node)
            .and_then(|ns| ns.held.get(connection))
            .filter(|s| Arc::ptr_eq(&s.write, &write))
            .map(|s| {
                let memberships = s.memberships.keys().map(String::as_str);
                let row = (s.n, s.client.clone(), s.since, s.live);
                let unlist: Vec<String> = s
                    .listed
                    .iter()
                    .filter(|a| !s.memberships.contains_key(*a))
                    .cloned()
                    .collect();
                let list: Vec<(String, Option<String>)> = s
                    .memberships
                    .iter()
                    .filter(|(a, _)| !s.listed.contains(*a))
                    .map(|(a, u)| (a.clone(), u.clone()))
                    .collect();
                (
                    row,
                    memberships.collect::<Vec<_>>().join(" "),
                    s.client_row_live != s.live,
                    (unlist, list),
                )
            });
        // Gone: cleared meanwhile, or given back by the write before this one.
        let Some(((n, client, since, live), memberships, client_row, (unlist, list))) = row else {
            return Ok(());
        };
        let i = &self.0;
        // Off the member lists before the slot stops naming the memberships, onto them after it
        // names them: a crash in between leaves no row the cleanup would not find.
        try_join_all(
            unlist
                .iter()
                .map(|a| self.exec(&i.listed_remove, (self.stamp(), a.as_str(), node, n))),
        )
        .await?;
        // The client's row says "up" only while the slot names the connection: written after
        // the slot when it comes up, before the slot when it goes.
        if client_row && !live {
            self.write_client_row(&client, node, n, connection, since, false)
                .await?;
        }
        let free = !live && memberships.is_empty();
        let (client_now, conn) = if free {
            ("", "")
        } else {
            (client.as_str(), connection)
        };
        self.exec(
            &i.slot_write,
            (node, n, client_now, conn, live, memberships, self.stamp()),
        )
        .await?;
        try_join_all(list.iter().map(|(a, user)| {
            self.exec(
                &i.listed_add,
                (
                    a.as_str(),
                    node,
                    n,
                    client.as_str(),
                    user_cell(user),
                    self.stamp(),
                ),
            )
        }))
        .await?;
        if client_row && live {
            self.write_client_row(&client, node, n, connection, since, true)
                .await?;
        }
        let mut all = self.slots();
        let Some(ns) = all.get_mut(node) else {
            return Ok(());
        };
        if let Some(s) = ns.held.get_mut(connection)
            && Arc::ptr_eq(&s.write, &write)
        {
            s.client_row_live = live;
            for a in &unlist {
                s.listed.remove(a);
            }
            s.listed.extend(list.into_iter().map(|(a, _)| a));
            if free && !s.live && s.memberships.is_empty() {
                ns.held.remove(connection);
                ns.free.insert(n);
            }
        }
        Ok(())
    }

    /// Writes a connection's row in `presence_clients`: up, or gone (kept a day).
    async fn write_client_row(
        &self,
        client: &str,
        node: &str,
        slot: i32,
        connection: &str,
        since: i64,
        live: bool,
    ) -> Result<(), PresenceError> {
        let i = &self.0;
        let ttl = if live { 0 } else { GONE_TTL };
        self.exec(
            &i.client_write,
            (
                client,
                node,
                slot,
                connection,
                since,
                live,
                self.stamp(),
                ttl,
            ),
        )
        .await?;
        Ok(())
    }

    /// Runs a statement once (the driver retries what its kind allows).
    async fn exec(
        &self,
        stmt: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<scylla::response::query_result::QueryResult, PresenceError> {
        self.0
            .session
            .execute_unpaged(stmt, values)
            .await
            .map_err(unavailable)
    }

    /// Every row a statement answers.
    async fn rows<T>(
        &self,
        stmt: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<T>, PresenceError>
    where
        T: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        let res = self.exec(stmt, values).await?;
        let rows = res.into_rows_result().map_err(unavailable)?;
        rows.rows::<T>()
            .map_err(unavailable)?
            .map(|r| r.map_err(unavailable))
            .collect()
    }

    /// How many times this process read a member list from Cassandra (listings that arrived
    /// while one was being read share the next read).
    pub fn member_list_reads(&self) -> u64 {
        self.0
            .listed_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The member list of `address`, read after this call began. Listings of one address
    /// arriving while its list is being read wait, and the first of them to go next reads it
    /// once for all of them: however many connections ask (`members` costs a whole partition
    /// read), an address has at most one read under way and one waiting per process.
    async fn read_listed(&self, address: &str) -> Result<Arc<MemberList>, PresenceError> {
        let arrived = Instant::now();
        let turn = ListingTurn {
            presence: self,
            address,
            entry: {
                let mut all = self.0.listings.lock().unwrap_or_else(|p| p.into_inner());
                all.entry(address.to_owned()).or_default().clone()
            },
        };
        let mut last = turn.entry.lock().await;
        if let Some((started, list)) = &*last
            && *started >= arrived
        {
            return Ok(list.clone());
        }
        let started = Instant::now();
        self.0
            .listed_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rows = self
            .all_rows::<(String, Option<String>)>(&self.0.listed, (address,))
            .await?;
        // One entry per client (a client with connections on several slots has a row for each),
        // in client order.
        let mut list: MemberList = BTreeMap::new();
        for (client, user) in rows {
            list.entry(client).or_insert(user);
        }
        let list = Arc::new(list);
        *last = Some((started, list.clone()));
        Ok(list)
    }

    /// The member list of `address` a first page read lately, if any.
    fn snapshot(&self, address: &str) -> Option<Arc<MemberList>> {
        let all = self.0.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        let (at, list) = all.get(address)?;
        (at.elapsed() < SNAPSHOT_TTL).then(|| list.clone())
    }

    /// Keeps a member list for the pages after the first, dropping the ones that expired (and,
    /// when there are still too many, the oldest).
    fn keep_snapshot(&self, address: &str, list: &Arc<MemberList>) {
        let mut all = self.0.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|_, (at, _)| at.elapsed() < SNAPSHOT_TTL);
        if all.len() >= MAX_SNAPSHOTS
            && let Some(oldest) = all
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
        {
            all.remove(&oldest);
        }
        all.insert(address.to_owned(), (Instant::now(), list.clone()));
    }

    /// Every row a statement answers, a page at a time (for partitions that may be large).
    async fn all_rows<T>(
        &self,
        stmt: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<T>, PresenceError>
    where
        T: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + 'static,
    {
        use futures_util::TryStreamExt;
        self.0
            .session
            .execute_iter(stmt.clone(), values)
            .await
            .map_err(unavailable)?
            .rows_stream::<T>()
            .map_err(unavailable)?
            .map_err(unavailable)
            .try_collect()
            .await
    }

    async fn holders(
        &self,
        address: &Address,
        client: &ClientId,
    ) -> Result<Option<Holders>, PresenceError> {
        let i = &self.0;
        let res = self
            .exec(&i.holders, (address.as_str(), client.as_str()))
            .await?;
        let rows = res.into_rows_result().map_err(unavailable)?;
        let row = rows
            .maybe_first_row::<(Option<String>, Option<String>, Option<i64>)>()
            .map_err(unavailable)?;
        Ok(row.map(|(connections, user, rev)| Holders {
            connections: connections
                .unwrap_or_default()
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            user,
            rev: rev.unwrap_or(0),
        }))
    }

    /// Removes a connection from a membership (compare-and-set); the member when it was the
    /// last one, after taking the member off the list.
    async fn release(
        &self,
        address: &Address,
        client: &ClientId,
        node: &str,
        connection: &str,
    ) -> Result<Option<Member>, PresenceError> {
        let i = &self.0;
        let (a, c) = (address.as_str(), client.as_str());
        let key = format!("{node}/{connection}");
        for _ in 0..CAS_ATTEMPTS {
            let Some(h) = self.holders(address, client).await? else {
                return Ok(None);
            };
            if !h.connections.contains(&key) {
                return Ok(None);
            }
            let rest: Vec<&str> = h
                .connections
                .iter()
                .filter(|k| **k != key)
                .map(String::as_str)
                .collect();
            let rev = next_rev(h.rev);
            // A row whose last connection left stays a day (longer than any clock skew between
            // nodes), so the next join's revision is later than this removal's.
            let ttl: i32 = if rest.is_empty() {
                EMPTY_HOLDERS_TTL
            } else {
                0
            };
            let res = self
                .exec(
                    &i.holders_update,
                    (ttl, rest.join(" "), h.user.as_deref(), rev, a, c, h.rev),
                )
                .await?;
            if !applied(res)? {
                continue;
            }
            if !rest.is_empty() {
                return Ok(None);
            }
            // The row an earlier version listed the client in, if it did: deleted only where it
            // exists, so this list collects no tombstone per client either.
            let legacy: Vec<(String,)> = self.rows(&i.legacy_member, (a, c)).await?;
            if !legacy.is_empty() {
                self.exec(&i.legacy_member_remove, (rev, a, c)).await?;
            }
            return Ok(Some(Member {
                client: client.clone(),
                user: h.user,
            }));
        }
        Err(contended(address, client))
    }
}
