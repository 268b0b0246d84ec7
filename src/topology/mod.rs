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
    /// A bind refused by [`Topology::add`]: the client would hold more bindings than allowed.
    #[error("client {client} holds {held} bindings; {more} more would pass the limit of {limit}")]
    TooMany {
        client: String,
        held: usize,
        more: usize,
        limit: usize,
    },
}

/// Whether a client holding `held` bindings may take `more` new ones under `limit` (shared by
/// every backend's [`Topology::add`]).
pub(crate) fn within_limit(
    client: &ClientId,
    held: usize,
    more: usize,
    limit: usize,
) -> Result<(), TopologyError> {
    if more > 0 && held + more > limit {
        return Err(TopologyError::TooMany {
            client: client.to_string(),
            held,
            more,
            limit,
        });
    }
    Ok(())
}

/// The first of `items` for each address, in their order (a bind naming an address twice
/// binds it once, with the first `since`; shared by the backends).
pub(crate) fn first_of_each<T>(items: &[T], address: impl Fn(&T) -> &Address) -> Vec<&T> {
    let mut out: Vec<&T> = Vec::new();
    for item in items {
        if !out.iter().any(|o| address(o) == address(item)) {
            out.push(item);
        }
    }
    out
}

/// Bindings between clients and addresses.
///
/// Contract (checked by `tests/it/contract/topology.rs`): `add` is idempotent and keeps the first `since` of an
/// existing binding; `add` never lets a client hold more than its `limit`, also when binds of
/// one client run at once on several nodes; `remove` of a missing binding is a no-op; `get`
/// reflects every call that returned, also of calls for one client that ran at once;
/// everything survives a restart.
/// (Which clients are bound to an address is not stored: each node knows its own connections'
/// bindings, `GET /server/presence/<address>`.)
#[async_trait::async_trait]
pub trait Topology: Send + Sync + 'static {
    /// The addresses a client is bound to, sorted by address.
    async fn get(&self, client: &ClientId) -> Result<Vec<Binding>, TopologyError>;
    /// Binds a client; returns the bindings that are new (already-bound addresses are left as
    /// they were). When the new ones would make the client hold more than `limit` bindings it
    /// changes nothing and fails with [`TopologyError::TooMany`]; the check and the write are
    /// one step, so concurrent binds cannot pass the limit together.
    async fn add(
        &self,
        client: &ClientId,
        bindings: &[Binding],
        limit: usize,
    ) -> Result<Vec<Binding>, TopologyError>;
    /// Unbinds a client; returns the addresses that were bound.
    async fn remove(
        &self,
        client: &ClientId,
        addresses: &[Address],
    ) -> Result<Vec<Address>, TopologyError>;
    /// Revokes a client identity: its resume tokens stop working (idempotent, for good).
    async fn revoke(&self, client: &ClientId) -> Result<(), TopologyError>;
    /// Whether a client identity was revoked.
    async fn revoked(&self, client: &ClientId) -> Result<bool, TopologyError>;
}

/// Which single messages each client has read, per address (the `read` event), apart from the
/// ack cursor: a compressed bitmap of versions (roaring) per client and address.
///
/// Contract: `mark` adds versions and never loses one that another `mark` added, also when
/// two nodes mark for one client at once; versions below `low` (expired with their messages)
/// are dropped; `marks` reflects every `mark` that returned, across restarts, until the row
/// was not marked for its `ttl_secs` (then it is gone: by its TTL in Cassandra, at the first
/// [`ReadMarks::expire`] after that in the embedded store).
#[async_trait::async_trait]
pub trait ReadMarks: Send + Sync + 'static {
    /// Adds `versions` to what `client` has read of `address` and drops those below `low`;
    /// the row lives `ttl_secs` after the last mark. Returns the bytes stored.
    async fn mark(
        &self,
        client: &ClientId,
        address: &Address,
        versions: &[u64],
        low: u64,
        ttl_secs: u32,
    ) -> Result<usize, TopologyError>;
    /// What `client` has read of `address`, and the bytes it takes.
    async fn marks(
        &self,
        client: &ClientId,
        address: &Address,
    ) -> Result<(roaring::RoaringTreemap, usize), TopologyError>;
    /// Removes the rows not marked for their `ttl_secs` by `now_ms` (ms since the epoch);
    /// returns how many. A backend whose rows carry their own TTL removes nothing here.
    async fn expire(&self, now_ms: u64) -> Result<u64, TopologyError>;
}

/// A read-marks bitmap as stored (roaring's portable format).
pub fn encode_marks(marks: &roaring::RoaringTreemap) -> Vec<u8> {
    let mut out = Vec::with_capacity(marks.serialized_size());
    marks
        .serialize_into(&mut out)
        .expect("writing to a Vec cannot fail");
    out
}

/// A stored read-marks bitmap.
pub fn decode_marks(bytes: &[u8]) -> Result<roaring::RoaringTreemap, TopologyError> {
    roaring::RoaringTreemap::deserialize_from(bytes).map_err(storage_err)
}

/// `stored` with `versions` added and what is below `low` dropped.
pub fn merge_marks(
    stored: Option<&[u8]>,
    versions: &[u64],
    low: u64,
) -> Result<Vec<u8>, TopologyError> {
    let mut marks = match stored {
        Some(b) => decode_marks(b)?,
        None => roaring::RoaringTreemap::new(),
    };
    marks.extend(versions.iter().copied().filter(|v| *v >= low));
    marks.remove_range(..low);
    Ok(encode_marks(&marks))
}

/// How long a cursor is kept after its last ack: the retention and a day. Every message at
/// or below a cursor was appended before it was acked, so it expires (with the retention)
/// before the cursor does; a client that comes back after that starts where the mailbox
/// starts, which is where the cursor would have put it. Capped at Cassandra's longest TTL.
pub fn cursor_ttl_secs(retention_secs: u64) -> u32 {
    const CASSANDRA_MAX_TTL: u64 = 20 * 365 * 24 * 3600;
    retention_secs
        .saturating_add(24 * 3600)
        .min(CASSANDRA_MAX_TTL) as u32
}

/// The highest version each client acked, per address.
///
/// Contract: `save` keeps the maximum (an older ack never lowers a cursor); `get` reflects every
/// `save` that returned, and after a restart every `save` before the last [`Cursors::sync`]
/// (a backend may make a save durable a little later: the embedded one within a second). A cursor is forgotten `ttl_secs` after its last save
/// that did not lower it (so a client's cursors do not pile up for ever): Cassandra drops it by
/// its TTL, the embedded store at the first [`Cursors::expire`] after that.
#[async_trait::async_trait]
pub trait Cursors: Send + Sync + 'static {
    async fn save(
        &self,
        acks: &[(ClientId, Address, u64)],
        ttl_secs: u32,
    ) -> Result<(), TopologyError>;
    /// Makes every cursor saved so far durable, for a backend whose saves may not be on their
    /// own (the embedded one; see its module). Called once more when the node stops.
    async fn sync(&self) -> Result<(), TopologyError> {
        Ok(())
    }
    async fn get(&self, client: &ClientId) -> Result<HashMap<Address, u64>, TopologyError>;
    /// Removes the cursors whose time ran out by `now_ms` (ms since the epoch); returns how
    /// many. A backend whose rows carry their own TTL removes nothing here.
    async fn expire(&self, now_ms: u64) -> Result<u64, TopologyError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_outlives_the_retention_by_a_day_within_cassandras_longest_ttl() {
        assert_eq!(cursor_ttl_secs(30 * 24 * 3600), 31 * 24 * 3600);
        assert_eq!(cursor_ttl_secs(5), 5 + 24 * 3600);
        assert_eq!(
            cursor_ttl_secs(u64::MAX),
            630_720_000,
            "Cassandra refuses more"
        );
    }

    #[test]
    fn only_new_bindings_count_against_the_limit() {
        let c = ClientId::parse("c").unwrap();
        assert!(
            within_limit(&c, 4, 0, 4).is_ok(),
            "nothing new at the limit"
        );
        assert!(within_limit(&c, 3, 1, 4).is_ok());
        match within_limit(&c, 3, 2, 4) {
            Err(e @ TopologyError::TooMany { .. }) => assert_eq!(
                e.to_string(),
                "client c holds 3 bindings; 2 more would pass the limit of 4"
            ),
            other => panic!("{other:?}"),
        }
    }
}
