//! Cluster membership: which nodes are live and which one leads. [`Standalone`] is the
//! single-node answer of the embedded default: this node, leading itself; [`zookeeper`] is the
//! cluster's: ephemeral member entries and a Curator-compatible leader latch.

pub mod zookeeper;

use serde::Serialize;

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
}

/// One node alone: it is the whole cluster and its leader.
pub struct Standalone {
    pub me: NodeInfo,
    pub member: tokio::sync::watch::Sender<bool>,
}

impl Standalone {
    pub fn new(me: NodeInfo) -> Self {
        Self {
            me,
            member: tokio::sync::watch::Sender::new(true),
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
}
