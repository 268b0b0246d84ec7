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

/// This node's right to act as a member, in time. Each answer from the coordinator renews it:
/// the session was alive when the request left, so the coordinator cannot expire it before a
/// whole session timeout after that, and the lease runs out at two thirds of one. It is checked
/// where the node acts ([`Lease::held`], no waiting), so a node that wakes from a pause past its
/// session (SIGSTOP, a long GC-like stall, a frozen VM) acts no more at once — before its
/// coordination client has noticed anything — while the cluster may already have taken it for
/// dead and handed its work to others. `epoch` counts the times the lease began again after it
/// had run out: what the node knew before that may have been changed by others meanwhile.
#[derive(Clone)]
pub struct Lease(Arc<LeaseState>);

struct LeaseState {
    origin: std::time::Instant,
    /// Nanoseconds after `origin` until which the lease holds (0: it does not).
    until: std::sync::atomic::AtomicU64,
    epoch: std::sync::atomic::AtomicU64,
}

impl Lease {
    /// A lease not held yet (renewed once the node has registered).
    pub fn new() -> Self {
        Self::until(0)
    }

    /// A lease that never runs out: one node alone.
    pub fn forever() -> Self {
        Self::until(u64::MAX)
    }

    fn until(until: u64) -> Self {
        Self(Arc::new(LeaseState {
            origin: std::time::Instant::now(),
            until: until.into(),
            epoch: 0.into(),
        }))
    }

    fn nanos(&self, at: std::time::Instant) -> u64 {
        at.saturating_duration_since(self.0.origin).as_nanos() as u64
    }

    /// Whether the node may act as a member now.
    pub fn held(&self) -> bool {
        self.remaining() > Duration::ZERO
    }

    /// How long the lease still holds (zero when it does not).
    pub fn remaining(&self) -> Duration {
        let until = self.0.until.load(std::sync::atomic::Ordering::SeqCst);
        Duration::from_nanos(until.saturating_sub(self.nanos(std::time::Instant::now())))
    }

    /// How many times the lease began again after it had run out or ended.
    pub fn epoch(&self) -> u64 {
        self.0.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The coordinator answered a request sent at `sent`: the lease holds until `sent + valid`
    /// (if that is later than now and than what it held until).
    pub fn renew(&self, sent: std::time::Instant, valid: Duration) {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.nanos(std::time::Instant::now());
        let until = self.nanos(sent).saturating_add(valid.as_nanos() as u64);
        let before = self.0.until.load(SeqCst);
        if until <= now || until <= before {
            return;
        }
        if before <= now {
            // Begins again: the new epoch is seen before the lease is.
            self.0.epoch.fetch_add(1, SeqCst);
        }
        self.0.until.store(until, SeqCst);
    }

    /// The session is lost or closing: the lease ends now.
    pub fn end(&self) {
        self.0.until.store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Default for Lease {
    fn default() -> Self {
        Self::new()
    }
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
    /// This node's lease as a member ([`Lease`]): held while the coordinator keeps answering.
    fn lease(&self) -> Lease;
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

    fn lease(&self) -> Lease {
        Lease::forever()
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

#[cfg(test)]
mod tests {
    use super::Lease;
    use std::time::{Duration, Instant};

    #[test]
    fn a_lease_holds_from_an_answer_and_begins_again_after_it_ran_out() {
        let lease = Lease::new();
        assert!(!lease.held(), "not held before the first answer");
        lease.renew(Instant::now(), Duration::from_secs(60));
        assert!(lease.held());
        assert_eq!(lease.epoch(), 1, "begun");
        lease.renew(Instant::now(), Duration::from_secs(60));
        assert_eq!(lease.epoch(), 1, "renewed while held: the same epoch");
        // An answer to a request sent long ago (the node was paused while it waited) proves
        // nothing about now.
        lease.end();
        let sent = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        lease.renew(sent, Duration::from_millis(20));
        assert!(
            !lease.held(),
            "renewed from a request older than the lease's length"
        );
        assert_eq!(lease.epoch(), 1);
        // Nor does an earlier end than the one held move it back.
        lease.renew(Instant::now(), Duration::from_secs(60));
        assert_eq!(lease.epoch(), 2, "begun again after it ended");
        lease.renew(Instant::now(), Duration::from_millis(1));
        assert!(
            lease.remaining() > Duration::from_secs(59),
            "{:?}",
            lease.remaining()
        );
        assert!(Lease::forever().held());
    }
}
