//! Cluster membership: which nodes are live and which one leads, and cluster-wide mutexes.
//! [`Standalone`] is the single-node answer of the embedded default: this node, leading itself,
//! with in-process mutexes; `zookeeper` is the cluster's: ephemeral member entries, a
//! Curator-compatible leader latch and Curator-compatible locks. The suite both pass is
//! `tests/it/contract/membership.rs` (compiled only for the tests).

#[cfg(feature = "cluster")]
pub mod zookeeper;

use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A live node as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub id: String,
    /// Its HTTP address (what clients and peers use).
    pub url: String,
    pub leader: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster coordination is unavailable: {0}")]
    Unavailable(String),
    #[error("cluster lock {name:?} not acquired within {waited_ms} ms: another node holds it")]
    LockTimeout { name: String, waited_ms: u64 },
    #[error("invalid lock name {0:?}: use 1 to 64 of a-z, 0-9, '-' and '_'")]
    LockName(String),
}

/// A cluster-wide mutex held by this node; released when dropped (or when the node's
/// coordination session ends, which also fences the node).
pub struct ClusterLock {
    _held: Box<dyn Send + Sync>,
}

impl ClusterLock {
    fn new(held: impl Send + Sync + 'static) -> Self {
        Self {
            _held: Box::new(held),
        }
    }
}

fn check_lock_name(name: &str) -> Result<(), ClusterError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ClusterError::LockName(name.into()))
    }
}

fn lock_timeout(name: &str, timeout: Duration) -> ClusterError {
    ClusterError::LockTimeout {
        name: name.into(),
        waited_ms: timeout.as_millis() as u64,
    }
}

/// Membership and leadership.
#[async_trait::async_trait]
pub trait Membership: Send + Sync + 'static {
    /// The live nodes, sorted by id, with the leader marked.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, ClusterError>;
    /// Whether this node leads now (and so does the cleanup after dead nodes).
    fn is_leader(&self) -> bool;
    /// Whether this node is a member now; false while it is fenced (its coordination session
    /// lost or expiring): it must then neither append nor clean up.
    fn membership(&self) -> tokio::sync::watch::Receiver<bool>;
    /// How many times this node has registered as a member (0 before it first did). More than
    /// one means a coordination session ended and the node joined again under a new one: the
    /// cluster saw it gone meanwhile, and the leader may have cleaned up after it.
    fn joins(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Takes the cluster-wide mutex `name`, waiting at most `timeout`
    /// ([`ClusterError::LockTimeout`] past it). Held until the guard is dropped.
    async fn lock(&self, name: &str, timeout: Duration) -> Result<ClusterLock, ClusterError>;
}

/// One node alone: it is the whole cluster and its leader.
pub struct Standalone {
    pub me: NodeInfo,
    pub member: tokio::sync::watch::Sender<bool>,
    joins: tokio::sync::watch::Sender<u64>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Standalone {
    pub fn new(me: NodeInfo) -> Self {
        Self {
            me,
            member: tokio::sync::watch::Sender::new(true),
            joins: tokio::sync::watch::Sender::new(1),
            locks: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl Membership for Standalone {
    async fn nodes(&self) -> Result<Vec<NodeInfo>, ClusterError> {
        Ok(vec![self.me.clone()])
    }

    fn is_leader(&self) -> bool {
        true
    }

    fn membership(&self) -> tokio::sync::watch::Receiver<bool> {
        self.member.subscribe()
    }

    fn joins(&self) -> tokio::sync::watch::Receiver<u64> {
        self.joins.subscribe()
    }

    async fn lock(&self, name: &str, timeout: Duration) -> Result<ClusterLock, ClusterError> {
        check_lock_name(name)?;
        let mutex = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        tokio::time::timeout(timeout, mutex.lock_owned())
            .await
            .map(ClusterLock::new)
            .map_err(|_| lock_timeout(name, timeout))
    }
}
