//! Membership and leader election on a real ZooKeeper (`scripts/stack up`).

use crate::contract::membership::{Cluster, until, url_of};
use signalpost::cluster::zookeeper::ZkMembership;
use signalpost::cluster::{Membership, NodeInfo};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn zookeeper() -> String {
    std::env::var("SIGNALPOST_ZOOKEEPER").unwrap_or_else(|_| "127.0.0.1:2181".into())
}

fn member(root: &str, id: &str) -> ZkMembership {
    let me = NodeInfo {
        id: id.into(),
        url: url_of(id),
        leader: false,
    };
    ZkMembership::start(&zookeeper(), Duration::from_secs(4), root, me)
}

/// Members under a fresh root of the real ZooKeeper.
struct Zk {
    root: String,
    members: Mutex<HashMap<String, Arc<ZkMembership>>>,
}

impl Cluster for Zk {
    fn member(&self, id: &str) -> Arc<dyn Membership> {
        let m = Arc::new(member(&self.root, id));
        self.members.lock().unwrap().insert(id.into(), m.clone());
        m
    }
    fn leave(&self, id: &str) {
        if let Some(m) = self.members.lock().unwrap().get(id) {
            m.leave();
        }
    }
    fn many(&self) -> bool {
        true
    }
}

async fn cluster() -> Box<dyn Cluster> {
    Box::new(Zk {
        root: format!("/it-{}", uuid::Uuid::new_v4().simple()),
        members: Default::default(),
    })
}

membership_suite!(
    #[ignore = "needs ZooKeeper: scripts/stack up, then cargo test -- --include-ignored"]
    cluster = cluster
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ZooKeeper: scripts/stack up, then cargo test -- --include-ignored"]
async fn a_connected_node_locks_before_it_joins() {
    let root = format!("/it-{}", uuid::Uuid::new_v4().simple());
    let me = NodeInfo {
        id: "node-a".into(),
        url: "http://node-a.test:8080".into(),
        leader: false,
    };
    // Connected, not joined: it can lock, but it is not listed and does not lead.
    let a = ZkMembership::connect(&zookeeper(), Duration::from_secs(4), &root, me);
    let held = a.lock("bootstrap", Duration::from_secs(10)).await.unwrap();
    let b = member(&root, "node-b");
    until("b to lead", async || b.is_leader()).await;
    let listed = b.nodes().await.unwrap();
    assert_eq!(
        listed.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        vec!["node-b"]
    );
    assert!(!a.is_leader());
    assert!(!*a.membership().borrow(), "a member before joining");
    assert!(!a.lease().held(), "a lease before joining");
    // b waits for the startup lock while a holds it.
    let waiting = tokio::spawn(async move { b.lock("bootstrap", Duration::from_secs(20)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "b locked while a held it");
    drop(held);
    waiting.await.unwrap().unwrap();
    // Joined: listed and a member.
    a.join();
    until("a a member", async || *a.membership().borrow()).await;
    assert!(a.lease().held(), "a member holds its lease");
}

/// The lease is renewed while the session lasts: it holds long past its own length (two thirds
/// of the session timeout), each renewal a read of this node's entry by its own session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ZooKeeper: scripts/stack up, then cargo test -- --include-ignored"]
async fn the_lease_is_renewed_while_the_session_lasts() {
    let root = format!("/it-{}", uuid::Uuid::new_v4().simple());
    let a = member(&root, "node-a");
    until("a a member", async || *a.membership().borrow()).await;
    let lease = a.lease();
    let epoch = lease.epoch();
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(lease.held(), "the lease ran out while the session lasted");
    }
    assert_eq!(
        lease.epoch(),
        epoch,
        "held throughout: it never began again"
    );
    assert!(
        lease.remaining() <= Duration::from_millis(2_667),
        "at most two thirds of the 4 s session: {:?}",
        lease.remaining()
    );
}
