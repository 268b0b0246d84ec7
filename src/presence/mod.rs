//! Presence: which clients are connected now, and on which node; and the *members* of each
//! `presence:` address — its bound clients with at least one connection up.
//!
//! Entries are per connection (a client may hold several), so a disconnect of one connection does
//! not hide another. Membership is per connection too: [`Presence::join`] and
//! [`Presence::leave`] say when a client *became* or *stopped being* a member (its first
//! connection joined, its last one left), which is when `joined` and `left` are announced, and
//! [`Presence::clear_node`] returns the members a dead node's connections held alone. [`MemoryPresence`] is the single-node backend: a node's own connections are
//! all there is, so memory is the truth and nothing survives a restart (which is correct: after a
//! restart, nobody is connected). `cassandra` is the cluster's backend. The contract suite every
//! backend passes is in `tests/it/contract/presence.rs` (compiled only for the tests).

#[cfg(feature = "cluster")]
pub mod cassandra;

use crate::address::{Address, ClientId};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Where one connection of a client is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Seen {
    pub node: String,
    pub connection: String,
    /// When it connected (ms since epoch).
    pub since: u64,
}

/// A member of a presence address: a client, and the user of the connection that made it one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    pub client: ClientId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A change of membership, as announced to the members (`joined` / `left`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub address: Address,
    pub member: Member,
    pub joined: bool,
}

impl Change {
    /// The client event's name.
    pub fn event(&self) -> &'static str {
        if self.joined { "joined" } else { "left" }
    }

    /// The client event's data: `{address, client, user?}`.
    pub fn data(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "address": self.address, "client": self.member.client });
        if let Some(u) = &self.member.user {
            v["user"] = serde_json::json!(u);
        }
        v
    }
}

/// What [`Presence::clear_node`] removed.
#[derive(Debug, Default)]
pub struct Cleared {
    /// Connection entries.
    pub connections: u64,
    /// Memberships that ended with them (to announce as `left`).
    pub left: Vec<Change>,
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence is unavailable: {0}")]
    Unavailable(String),
}

/// Cluster-wide presence.
///
/// Contract: after `connected` returns, `lookup` shows the connection until `disconnected` or
/// `clear_node` for its node returns; both are idempotent. A client is a member of a presence
/// address from the first `join` of one of its connections until the last of them has left
/// (by `leave` or `clear_node`); exactly one call reports each start and each end, whichever
/// nodes the connections are on, and `members` lists the members.
#[async_trait::async_trait]
pub trait Presence: Send + Sync + 'static {
    async fn connected(&self, client: &ClientId, seen: Seen) -> Result<(), PresenceError>;
    async fn disconnected(
        &self,
        client: &ClientId,
        node: &str,
        connection: &str,
    ) -> Result<(), PresenceError>;
    /// The live connections of each client, in the order asked (empty = not connected).
    async fn lookup(&self, clients: &[ClientId]) -> Result<Vec<Vec<Seen>>, PresenceError>;
    /// Removes every entry and membership of a node (cleanup after it died).
    async fn clear_node(&self, node: &str) -> Result<Cleared, PresenceError>;
    /// A connection of `member.client` joins `address`; true when the client became a member
    /// (no other connection of it was one). Idempotent.
    async fn join(
        &self,
        address: &Address,
        member: &Member,
        node: &str,
        connection: &str,
    ) -> Result<bool, PresenceError>;
    /// A connection leaves `address`; the member when the client stopped being one (it was its
    /// last connection there). Idempotent.
    async fn leave(
        &self,
        address: &Address,
        client: &ClientId,
        node: &str,
        connection: &str,
    ) -> Result<Option<Member>, PresenceError>;
    /// The members of `address`, ordered by client id, after `after`, at most `limit`.
    async fn members(
        &self,
        address: &Address,
        after: Option<&ClientId>,
        limit: usize,
    ) -> Result<Vec<Member>, PresenceError>;
    /// The nodes that may have entries — every node that has some, and perhaps nodes whose
    /// entries all went, until cleared (to find the ones left by dead nodes).
    async fn nodes(&self) -> Result<Vec<String>, PresenceError>;
}

/// Most members one answer lists (`members`, `GET /server/presence/<presence address>`).
pub const MEMBERS_PAGE: usize = 10_000;

/// One page of the members of `address` after `after`, and whether more follow.
pub async fn members_page(
    presence: &dyn Presence,
    address: &Address,
    after: Option<&ClientId>,
) -> Result<(Vec<Member>, bool), PresenceError> {
    let mut list = presence.members(address, after, MEMBERS_PAGE + 1).await?;
    let truncated = list.len() > MEMBERS_PAGE;
    list.truncate(MEMBERS_PAGE);
    Ok((list, truncated))
}

/// In-memory presence for a single node.
#[derive(Default)]
pub struct MemoryPresence {
    map: Mutex<HashMap<ClientId, Vec<Seen>>>,
    /// address → client → (user, the connections `node/connection` that hold the membership).
    members: Mutex<HashMap<Address, BTreeMap<ClientId, Holders>>>,
}

/// The user a member joined with, and its connections that are members.
struct Holders {
    user: Option<String>,
    connections: Vec<(String, String)>,
}

#[async_trait::async_trait]
impl Presence for MemoryPresence {
    async fn connected(&self, client: &ClientId, seen: Seen) -> Result<(), PresenceError> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let list = m.entry(client.clone()).or_default();
        if !list
            .iter()
            .any(|s| s.node == seen.node && s.connection == seen.connection)
        {
            list.push(seen);
        }
        Ok(())
    }

    async fn disconnected(
        &self,
        client: &ClientId,
        node: &str,
        connection: &str,
    ) -> Result<(), PresenceError> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = m.get_mut(client) {
            list.retain(|s| !(s.node == node && s.connection == connection));
            if list.is_empty() {
                m.remove(client);
            }
        }
        Ok(())
    }

    async fn lookup(&self, clients: &[ClientId]) -> Result<Vec<Vec<Seen>>, PresenceError> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Ok(clients
            .iter()
            .map(|c| m.get(c).cloned().unwrap_or_default())
            .collect())
    }

    async fn clear_node(&self, node: &str) -> Result<Cleared, PresenceError> {
        let mut cleared = Cleared::default();
        {
            let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
            m.retain(|_, list| {
                let before = list.len();
                list.retain(|s| s.node != node);
                cleared.connections += (before - list.len()) as u64;
                !list.is_empty()
            });
        }
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        for (address, clients) in m.iter_mut() {
            clients.retain(|client, h| {
                h.connections.retain(|(n, _)| n != node);
                let keep = !h.connections.is_empty();
                if !keep {
                    cleared.left.push(Change {
                        address: address.clone(),
                        member: Member {
                            client: client.clone(),
                            user: h.user.take(),
                        },
                        joined: false,
                    });
                }
                keep
            });
        }
        m.retain(|_, clients| !clients.is_empty());
        Ok(cleared)
    }

    async fn join(
        &self,
        address: &Address,
        member: &Member,
        node: &str,
        connection: &str,
    ) -> Result<bool, PresenceError> {
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let h = m
            .entry(address.clone())
            .or_default()
            .entry(member.client.clone())
            .or_insert_with(|| Holders {
                user: member.user.clone(),
                connections: Vec::new(),
            });
        let first = h.connections.is_empty();
        if !h
            .connections
            .iter()
            .any(|(n, c)| n == node && c == connection)
        {
            h.connections.push((node.into(), connection.into()));
        }
        Ok(first)
    }

    async fn leave(
        &self,
        address: &Address,
        client: &ClientId,
        node: &str,
        connection: &str,
    ) -> Result<Option<Member>, PresenceError> {
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let Some(clients) = m.get_mut(address) else {
            return Ok(None);
        };
        let Some(h) = clients.get_mut(client) else {
            return Ok(None);
        };
        h.connections
            .retain(|(n, c)| !(n == node && c == connection));
        if !h.connections.is_empty() {
            return Ok(None);
        }
        let user = clients.remove(client).and_then(|h| h.user);
        if clients.is_empty() {
            m.remove(address);
        }
        Ok(Some(Member {
            client: client.clone(),
            user,
        }))
    }

    async fn members(
        &self,
        address: &Address,
        after: Option<&ClientId>,
        limit: usize,
    ) -> Result<Vec<Member>, PresenceError> {
        use std::ops::Bound;
        let m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let Some(clients) = m.get(address) else {
            return Ok(Vec::new());
        };
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(clients
            .range::<ClientId, _>((from, Bound::Unbounded))
            .take(limit)
            .map(|(c, h)| Member {
                client: c.clone(),
                user: h.user.clone(),
            })
            .collect())
    }

    async fn nodes(&self) -> Result<Vec<String>, PresenceError> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut n: Vec<String> = m.values().flatten().map(|s| s.node.clone()).collect();
        n.sort();
        n.dedup();
        Ok(n)
    }
}
