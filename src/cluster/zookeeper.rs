//! Membership and leadership on ZooKeeper.
//!
//! Each node keeps one ZooKeeper session (its heartbeat, `zookeeper_session_timeout_ms`) and with
//! it an ephemeral entry `<root>/nodes/<node id>` holding `{id, url}`, and contends a leader latch
//! under `<root>/leader` with Curator's recipe (`LockPrefix::new_curator(dir, "latch-")`): the
//! owner of the lowest sequence leads. When the session expires the entry and the latch go with
//! it; the node reconnects with a new session, registers again and contends again. A node that
//! is not connected answers `nodes()` with an error, so `/healthz` and `/server/nodes` say so.
//!
//! Cluster-wide mutexes are Curator-compatible locks under `<root>/locks/<name>` (ephemeral
//! sequential entries: a dead holder's lock goes with its session). A node may connect first and
//! join later ([`ZkMembership::connect`], [`ZkMembership::join`]): it can take locks (the startup
//! lock around topic and schema creation) before it is listed as a member.

use super::{
    ClusterError, ClusterLock, Lease, Membership, NodeInfo, check_lock_name, lock_timeout,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use zookeeper_client as zk;

/// This node's membership in a ZooKeeper-coordinated cluster.
pub struct ZkMembership {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    root: String,
    me: NodeInfo,
    /// The live session's client, `None` while (re)connecting.
    client: Mutex<Option<zk::Client>>,
    leader: AtomicBool,
    /// Whether this node is a member now: registered, and its session connected. False from
    /// the moment the connection is lost (the session may be expiring): the node is fenced.
    member: tokio::sync::watch::Sender<bool>,
    /// Renewed by every answer to [`renew`]'s request while registered; ended with `member`.
    lease: Lease,
    /// Whether to register and contend (see [`ZkMembership::join`]).
    joined: tokio::sync::watch::Sender<bool>,
    /// Registrations so far, one per session that registered ([`Membership::joins`]).
    joins: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// The session is over (it ended, or the node left): no lease, no member, no leader, no
    /// client.
    fn out(&self) {
        self.lease.end();
        self.member.send_replace(false);
        self.leader.store(false, Ordering::SeqCst);
        self.client.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

fn unavailable(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Unavailable(format!("zookeeper: {e}"))
}

impl ZkMembership {
    /// Connects, registers and contends in the background; `root` is e.g. `/signalpost`.
    pub fn start(connect: &str, session_timeout: Duration, root: &str, me: NodeInfo) -> Self {
        let m = Self::connect(connect, session_timeout, root, me);
        m.join();
        m
    }

    /// Connects in the background without registering (locks work, the node is not a member
    /// and does not contend for leadership) until [`ZkMembership::join`].
    pub fn connect(connect: &str, session_timeout: Duration, root: &str, me: NodeInfo) -> Self {
        let shared = Arc::new(Shared {
            root: root.trim_end_matches('/').to_string(),
            me,
            client: Mutex::new(None),
            leader: AtomicBool::new(false),
            member: tokio::sync::watch::Sender::new(false),
            lease: Lease::new(),
            joined: tokio::sync::watch::Sender::new(false),
            joins: tokio::sync::watch::Sender::new(0),
        });
        let task = tokio::spawn(run(shared.clone(), connect.to_string(), session_timeout));
        Self { shared, task }
    }

    /// Registers this node and contends for leadership (now, and in every later session).
    pub fn join(&self) {
        self.shared.joined.send_replace(true);
    }

    /// Leaves the cluster: closes the session, so the entry and the latch go at once.
    pub fn leave(&self) {
        self.task.abort();
        self.shared.out();
    }
}

impl Drop for ZkMembership {
    fn drop(&mut self) {
        self.leave();
    }
}

/// One session at a time: connect, register, contend, and start again when it ends.
async fn run(shared: Arc<Shared>, connect: String, session_timeout: Duration) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match session(&shared, &connect, session_timeout).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => tracing::warn!(error = %e, "zookeeper session ended; reconnecting"),
        }
        shared.out();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(
    shared: &Shared,
    connect: &str,
    session_timeout: Duration,
) -> Result<(), zk::Error> {
    let client = zk::Client::connector()
        .with_session_timeout(session_timeout)
        .connect(connect)
        .await?;
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let nodes_dir = format!("{}/nodes", shared.root);
    let leader_dir = format!("{}/leader", shared.root);
    client.mkdir(&nodes_dir, &persistent).await?;
    client.mkdir(&leader_dir, &persistent).await?;
    *shared.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(client.clone());
    let mut states = client.state_watcher();
    let mut joined = shared.joined.subscribe();
    tokio::select! {
        j = joined.wait_for(|j| *j) => { j.map_err(|_| zk::Error::ClientClosed)?; }
        e = ended(shared, &mut states, false) => return Err(e),
    }
    let entry = format!("{nodes_dir}/{}", shared.me.id);
    let data = serde_json::to_vec(&shared.me).unwrap_or_default();
    let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    let sent = std::time::Instant::now();
    match client.create(&entry, &data, &ephemeral).await {
        Ok(_) => {}
        Err(zk::Error::NodeExists) => {
            // Left by this node's previous session, not expired yet: replace it.
            client.delete(&entry, None).await.or_else(|e| {
                if e == zk::Error::NoNode {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
            client.create(&entry, &data, &ephemeral).await?;
        }
        Err(e) => return Err(e),
    }
    shared.member.send_replace(true);
    shared.lease.renew(sent, lease_for(&client));
    let _renewing = AbortOnDrop(tokio::spawn(renew(
        client.clone(),
        entry.clone(),
        shared.lease.clone(),
    )));
    shared.joins.send_modify(|n| *n += 1);
    tracing::info!(node = %shared.me.id, "joined the cluster");
    let prefix = zk::LockPrefix::new_curator(&leader_dir, "latch-")?;
    let options = zk::LockOptions::new(zk::Acls::anyone_all());
    let latch = tokio::select! {
        l = client.lock(prefix, shared.me.id.as_bytes(), options) => Some(l?.into_owned()),
        e = ended(shared, &mut states, true) => return Err(e),
    };
    shared.leader.store(true, Ordering::SeqCst);
    tracing::info!(node = %shared.me.id, "leading the cluster");
    let e = ended(shared, &mut states, true).await;
    drop(latch);
    Err(e)
}

/// How long an answer from ZooKeeper lets this node act as a member: two thirds of the
/// negotiated session timeout (the server expires the session no sooner than a whole timeout
/// after it last heard from it; the third left covers the clocks of other nodes that check a
/// lease's end carried in a frame, and the time the cluster takes to act on an expiry).
fn lease_for(client: &zk::Client) -> Duration {
    client.session_timeout() * 2 / 3
}

/// Renews the lease every quarter of the session timeout while the session lasts: a read of
/// this node's own entry, which must still be this session's (an expired session's request
/// fails, and an entry of another session is not this node's membership).
async fn renew(client: zk::Client, entry: String, lease: Lease) {
    let valid = lease_for(&client);
    let session = client.session_id();
    loop {
        let sent = std::time::Instant::now();
        match tokio::time::timeout(valid, client.check_stat(&entry)).await {
            Ok(Ok(Some(stat))) if stat.ephemeral_owner == session.0 => lease.renew(sent, valid),
            Ok(Ok(_)) => {
                tracing::warn!(%entry, "this node's entry is gone or another session's: fenced");
                lease.end();
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "zookeeper lease renewal failed"),
            Err(_) => tracing::debug!("zookeeper lease renewal unanswered"),
        }
        tokio::time::sleep(client.session_timeout() / 4).await;
    }
}

/// Aborts its task when dropped (the session's helpers end with the session).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows the session's state until it is over (expired, closed, or refused): while the
/// connection is lost the node is not a member (fenced); when it is back, it is again — if it
/// has `registered` (before that, it is no member either way).
async fn ended(shared: &Shared, states: &mut zk::StateWatcher, registered: bool) -> zk::Error {
    loop {
        let s = states.changed().await;
        if s.is_terminated() {
            shared.lease.end();
            shared.member.send_replace(false);
            return zk::Error::SessionExpired;
        }
        let connected = s == zk::SessionState::SyncConnected && registered;
        if !connected {
            shared.lease.end();
        }
        if shared.member.send_replace(connected) != connected {
            if connected {
                tracing::info!(node = %shared.me.id, "zookeeper connection back: unfenced");
            } else {
                tracing::warn!(node = %shared.me.id, "zookeeper connection lost: fenced");
            }
        }
    }
}

/// The sequence number at the end of a latch node's name (`…latch-0000000012`).
fn sequence(name: &str) -> Option<u64> {
    name.rsplit('-').next()?.parse().ok()
}

#[async_trait::async_trait]
impl Membership for ZkMembership {
    async fn nodes(&self) -> Result<Vec<NodeInfo>, ClusterError> {
        let client = self
            .shared
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| unavailable("not connected"))?;
        let nodes_dir = format!("{}/nodes", self.shared.root);
        let leader_dir = format!("{}/leader", self.shared.root);
        let mut latches = client
            .list_children(&leader_dir)
            .await
            .map_err(unavailable)?;
        latches.sort_by_key(|n| sequence(n).unwrap_or(u64::MAX));
        let mut leader = None;
        for l in latches {
            match client.get_data(&format!("{leader_dir}/{l}")).await {
                Ok((data, _)) => {
                    leader = Some(String::from_utf8_lossy(&data).into_owned());
                    break;
                }
                Err(zk::Error::NoNode) => continue,
                Err(e) => return Err(unavailable(e)),
            }
        }
        let mut out = Vec::new();
        for child in client
            .list_children(&nodes_dir)
            .await
            .map_err(unavailable)?
        {
            match client.get_data(&format!("{nodes_dir}/{child}")).await {
                Ok((data, _)) => {
                    if let Ok(mut n) = serde_json::from_slice::<NodeInfo>(&data) {
                        n.leader = leader.as_deref() == Some(n.id.as_str());
                        out.push(n);
                    }
                }
                Err(zk::Error::NoNode) => continue,
                Err(e) => return Err(unavailable(e)),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Whether this node holds the leader latch now (and is connected).
    fn is_leader(&self) -> bool {
        self.shared.leader.load(Ordering::SeqCst) && *self.shared.member.borrow()
    }

    fn membership(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shared.member.subscribe()
    }

    fn joins(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.joins.subscribe()
    }

    fn lease(&self) -> Lease {
        self.shared.lease.clone()
    }

    async fn lock(&self, name: &str, timeout: Duration) -> Result<ClusterLock, ClusterError> {
        check_lock_name(name)?;
        let deadline = tokio::time::Instant::now() + timeout;
        // A node (re)connecting waits for its session within the same deadline.
        let client = loop {
            if let Some(c) = self
                .shared
                .client
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                break c;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(unavailable("not connected"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let dir = format!("{}/locks/{name}", self.shared.root);
        let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        client.mkdir(&dir, &persistent).await.map_err(unavailable)?;
        let prefix = zk::LockPrefix::new_curator(&dir, "lock-").map_err(unavailable)?;
        let options = zk::LockOptions::new(zk::Acls::anyone_all());
        // Cancellation-safe: a waiter that gives up leaves no entry behind.
        match tokio::time::timeout_at(
            deadline,
            client.lock(prefix, self.shared.me.id.as_bytes(), options),
        )
        .await
        {
            Ok(Ok(held)) => Ok(ClusterLock::new(held.into_owned())),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(lock_timeout(name, timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn latch_sequence() {
        assert_eq!(super::sequence("_c_1b2f-latch-0000000012"), Some(12));
        assert_eq!(super::sequence("junk"), None);
    }
}
