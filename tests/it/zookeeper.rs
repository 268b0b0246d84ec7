//! Membership and leader election on a real ZooKeeper (`scripts/stack up`).

use signalpost::cluster::zookeeper::ZkMembership;
use signalpost::cluster::{Membership, NodeInfo};
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
