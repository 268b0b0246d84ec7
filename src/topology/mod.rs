//! Topology — which client is bound to which addresses — and cursors — the highest version each
//! client acked per address.
//!
//! A binding remembers the head of the address when it was made: a client that never acked that
//! address resumes from there (it gets what came after its binding, not the whole history).
//! Both are durable before a call returns. [`embedded`] keeps them in redb; the suite every backend
//! passes is `tests/it/contract/topology.rs` (compiled only for the tests).

#[cfg(feature = "cluster")]
pub mod cassandra;
pub mod embedded;

use crate::address::{Address, ClientId};
use std::collections::HashMap;

/// One binding of a client to an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub address: Address,
    /// The address's head when the binding was made.
    pub since: u64,
}

/// Maps a backend's own error to [`TopologyError::Storage`] (shared by every backend).
pub(crate) fn storage_err(e: impl std::fmt::Display) -> TopologyError {
    TopologyError::Storage(e.to_string())
}

/// Topology and cursor failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TopologyError {
    #[error("topology storage failed: {0}")]
    Storage(String),
    #[error("topology is unavailable: {0}")]
    Unavailable(String),
}

/// Bindings between clients and addresses.
///
/// Contract (checked by `tests/it/contract/topology.rs`): `add` is idempotent and keeps the first `since` of an
/// existing binding; `remove` of a missing binding is a no-op; `get` and `members` reflect every
/// call that returned; everything survives a restart.
#[async_trait::async_trait]
pub trait Topology: Send + Sync + 'static {
    /// The addresses a client is bound to, sorted by address.
    async fn get(&self, client: &ClientId) -> Result<Vec<Binding>, TopologyError>;
    /// Binds a client; returns the bindings that are new (already-bound addresses are left as they were).
    async fn add(
        &self,
        client: &ClientId,
        bindings: &[Binding],
    ) -> Result<Vec<Binding>, TopologyError>;
    /// Unbinds a client; returns the addresses that were bound.
    async fn remove(
        &self,
        client: &ClientId,
        addresses: &[Address],
    ) -> Result<Vec<Address>, TopologyError>;
    /// Up to `limit` clients bound to an address, sorted by client id, after `after` (for paging).
    async fn members(
        &self,
        address: &Address,
        after: Option<&ClientId>,
        limit: usize,
    ) -> Result<Vec<ClientId>, TopologyError>;
    /// Revokes a client identity: its resume tokens stop working (idempotent, for good).
    async fn revoke(&self, client: &ClientId) -> Result<(), TopologyError>;
    /// Whether a client identity was revoked.
    async fn revoked(&self, client: &ClientId) -> Result<bool, TopologyError>;
}

/// The highest version each client acked, per address.
///
/// Contract: `save` keeps the maximum (an older ack never lowers a cursor); `get` reflects every
/// `save` that returned, across restarts.
#[async_trait::async_trait]
pub trait Cursors: Send + Sync + 'static {
    async fn save(&self, acks: &[(ClientId, Address, u64)]) -> Result<(), TopologyError>;
    async fn get(&self, client: &ClientId) -> Result<HashMap<Address, u64>, TopologyError>;
}
