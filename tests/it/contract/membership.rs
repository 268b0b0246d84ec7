//! The contract suite every `Membership` backend must pass: a member lists itself with its URL
//! and leads when alone; among several exactly one leads, and when it leaves another takes over
//! and the one that left is fenced (not a member, not leading); cluster-wide mutexes exclude,
//! time out with a clear error, and pass on when released.

use signalpost::cluster::{ClusterError, Membership};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A cluster to make members in (fresh for each test).
pub trait Cluster: Send + Sync {
    /// The member `id` (its URL `http://<id>.test:8080`), joined. A single-node backend has one
    /// member whatever the id: it answers the same node again.
    fn member(&self, id: &str) -> Arc<dyn Membership>;
    /// Ends the member's session: it leaves the cluster.
    fn leave(&self, id: &str);
    /// Whether the backend can have more than one member.
    fn many(&self) -> bool;
}

pub fn url_of(id: &str) -> String {
    format!("http://{id}.test:8080")
}

/// Polls `f` until it holds (15 s at most).
pub async fn until<F: AsyncFn() -> bool>(what: &str, f: F) {
    for _ in 0..300 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Alone, a member lists itself (with its URL), leads, and is a member.
pub async fn lists_itself_leads_alone(c: &dyn Cluster) {
    let a = c.member("node-a");
    until("a to list itself as leader", async || {
        a.nodes().await.is_ok_and(|n| n.len() == 1 && n[0].leader)
    })
    .await;
    let seen = a.nodes().await.unwrap();
    assert_eq!(
        (seen[0].id.as_str(), seen[0].url.clone()),
        ("node-a", url_of("node-a"))
    );
    assert!(a.is_leader());
    assert!(*a.membership().borrow(), "a joined node is a member");
    assert!(a.lease().held(), "a joined node holds its lease");
    assert_eq!(*a.joins().borrow(), 1, "registered once");
}

/// Two members: one leader; the leader leaves, the other takes over, the one that left is
/// fenced. A single-node backend has nobody to hand over to: it checks that its one node keeps
/// leading when asked again.
pub async fn hand_over(c: &dyn Cluster) {
    let a = c.member("node-a");
    until("a to lead", async || a.is_leader()).await;
    if !c.many() {
        let again = c.member("node-b");
        assert!(
            again.is_leader() && a.is_leader(),
            "a single node always leads"
        );
        return;
    }
    let b = c.member("node-b");
    until("both listed", async || {
        b.nodes().await.is_ok_and(|n| n.len() == 2)
    })
    .await;
    let seen = b.nodes().await.unwrap();
    assert_eq!(
        seen.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        vec!["node-a", "node-b"],
        "sorted by id"
    );
    assert_eq!(
        seen.iter()
            .filter(|n| n.leader)
            .map(|n| n.id.as_str())
            .collect::<Vec<_>>(),
        vec!["node-a"],
        "the first to join leads, alone"
    );
    assert_eq!(seen[1].url, url_of("node-b"));
    assert!(!b.is_leader(), "one leader at a time");
    let fenced = a.membership();
    let lease = a.lease();
    assert!(lease.held(), "a member holds its lease");
    c.leave("node-a");
    assert!(!lease.held(), "a node that left holds no lease, at once");
    until("b to lead", async || b.is_leader()).await;
    until("a gone from the list", async || {
        b.nodes().await.is_ok_and(|n| n.len() == 1)
    })
    .await;
    let seen = b.nodes().await.unwrap();
    assert_eq!((seen[0].id.as_str(), seen[0].leader), ("node-b", true));
    assert!(!*fenced.borrow(), "a node that left is not a member");
    assert!(!a.is_leader(), "a node that left does not lead");
}

/// [`locks`] between two members of one cluster.
pub async fn locks_between_members(c: &dyn Cluster) {
    locks(c.member("node-a"), c.member("node-b")).await;
}

/// `a` and `b` are two members of one cluster (for `Standalone`, the same node twice: a single
/// node's locks exclude its own tasks).
pub async fn locks(a: Arc<dyn Membership>, b: Arc<dyn Membership>) {
    let name = format!(
        "contract-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let short = Duration::from_millis(300);
    let held = a.lock(&name, Duration::from_secs(10)).await.unwrap();
    // While `a` holds it, `b` waits and gives up with LockTimeout, naming the lock.
    match b.lock(&name, short).await {
        Err(ClusterError::LockTimeout { name: n, waited_ms }) => {
            assert_eq!(n, name);
            assert_eq!(waited_ms, 300);
        }
        Err(e) => panic!("expected LockTimeout, got {e}"),
        Ok(_) => panic!("two holders of one lock"),
    }
    // Another name is independent.
    drop(b.lock(&format!("{name}-other"), short).await.unwrap());
    // A waiter that is still waiting gets it once released.
    let waiter = {
        let b = b.clone();
        let name = name.clone();
        tokio::spawn(async move { b.lock(&name, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter got the lock while it was held"
    );
    drop(held);
    let second = waiter.await.unwrap().unwrap();
    drop(second);
    // Under contention from both sides, never two holders at once.
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let m = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (name, inside, most) = (name.clone(), inside.clone(), most.clone());
        tasks.push(tokio::spawn(async move {
            let _g = m.lock(&name, Duration::from_secs(20)).await.unwrap();
            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            inside.fetch_sub(1, Ordering::SeqCst);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(most.load(Ordering::SeqCst), 1, "two holders at once");
    // Bad names are refused with a reason.
    assert!(matches!(
        a.lock("../x", short).await,
        Err(ClusterError::LockName(_))
    ));
}
