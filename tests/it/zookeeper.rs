//! Membership and leader election on a real ZooKeeper (`scripts/stack up`).

use signalpost::cluster::zookeeper::ZkMembership;
use signalpost::cluster::{Membership, NodeInfo};
use std::sync::Arc;
use std::time::Duration;

fn zookeeper() -> String {
    std::env::var("SIGNALPOST_ZOOKEEPER").unwrap_or_else(|_| "127.0.0.1:2181".into())
}

fn member(root: &str, id: &str) -> ZkMembership {
    let me = NodeInfo {
        id: id.into(),
        url: format!("http://{id}.test:8080"),
        leader: false,
    };
    ZkMembership::start(&zookeeper(), Duration::from_secs(4), root, me)
}

async fn until<F: AsyncFn() -> bool>(what: &str, f: F) {
    for _ in 0..300 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ZooKeeper: scripts/stack up, then cargo test -- --include-ignored"]
async fn nodes_register_one_leads_and_a_new_leader_follows_the_old() {
    let root = format!("/it-{}", uuid::Uuid::new_v4().simple());
    let a = member(&root, "node-a");
    until("a to lead", async || a.is_leader()).await;
    let b = member(&root, "node-b");
    until("both registered", async || {
        b.nodes().await.map(|n| n.len() == 2).unwrap_or(false)
    })
    .await;
    let seen = b.nodes().await.unwrap();
    assert_eq!(
        seen.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        vec!["node-a", "node-b"]
    );
    assert_eq!(
        seen.iter()
            .filter(|n| n.leader)
            .map(|n| n.id.as_str())
            .collect::<Vec<_>>(),
        vec!["node-a"]
    );
    assert_eq!(seen[1].url, "http://node-b.test:8080");
    assert!(!b.is_leader(), "one leader at a time");
    // The leader leaves: its entry and latch go with its session, and b takes over.
    a.leave();
    until("b to lead", async || b.is_leader()).await;
    until("a gone", async || {
        b.nodes().await.map(|n| n.len() == 1).unwrap_or(false)
    })
    .await;
    let seen = b.nodes().await.unwrap();
    assert_eq!((seen[0].id.as_str(), seen[0].leader), ("node-b", true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ZooKeeper: scripts/stack up, then cargo test -- --include-ignored"]
async fn cluster_locks_exclude_across_sessions() {
    let root = format!("/it-{}", uuid::Uuid::new_v4().simple());
    let a: Arc<dyn Membership> = Arc::new(member(&root, "node-a"));
    let b: Arc<dyn Membership> = Arc::new(member(&root, "node-b"));
    signalpost::cluster::contract::locks(a, b).await;
}

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
    // b waits for the startup lock while a holds it.
    let waiting = tokio::spawn(async move { b.lock("bootstrap", Duration::from_secs(20)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "b locked while a held it");
    drop(held);
    waiting.await.unwrap().unwrap();
    // Joined: listed and a member.
    a.join();
    until("a a member", async || *a.membership().borrow()).await;
}
