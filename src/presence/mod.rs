//! Presence: which clients are connected now, and on which node.
//!
//! Entries are per connection (a client may hold several), so a disconnect of one connection does
//! not hide another. [`MemoryPresence`] is the single-node backend: a node's own connections are
//! all there is, so memory is the truth and nothing survives a restart (which is correct: after a
//! restart, nobody is connected). [`cassandra`] is the cluster's backend. The contract suite every
//! backend passes is in `tests/it/contract/presence.rs` (compiled only for the tests).

#[cfg(feature = "cluster")]
pub mod cassandra;

use crate::address::ClientId;
use std::collections::HashMap;
use std::sync::Mutex;

/// Where one connection of a client is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Seen {
    pub node: String,
    pub connection: String,
    /// When it connected (ms since epoch).
    pub since: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence is unavailable: {0}")]
    Unavailable(String),
}

/// Cluster-wide presence.
///
/// Contract: after `connected` returns, `lookup` shows the connection until `disconnected` or
/// `clear_node` for its node returns; both are idempotent.
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
    /// Removes every entry of a node (cleanup after it died); returns how many were removed.
    async fn clear_node(&self, node: &str) -> Result<u64, PresenceError>;
    /// The nodes that may have entries — every node that has some, and perhaps nodes whose
    /// entries all went, until cleared (to find the ones left by dead nodes).
    async fn nodes(&self) -> Result<Vec<String>, PresenceError>;
}

/// In-memory presence for a single node.
#[derive(Default)]
pub struct MemoryPresence {
    map: Mutex<HashMap<ClientId, Vec<Seen>>>,
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

    async fn clear_node(&self, node: &str) -> Result<u64, PresenceError> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        m.retain(|_, list| {
            let before = list.len();
            list.retain(|s| s.node != node);
            n += (before - list.len()) as u64;
            !list.is_empty()
        });
        Ok(n)
    }

    async fn nodes(&self) -> Result<Vec<String>, PresenceError> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut n: Vec<String> = m.values().flatten().map(|s| s.node.clone()).collect();
        n.sort();
        n.dedup();
        Ok(n)
    }
}
