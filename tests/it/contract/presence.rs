//! The contract suite every `Presence` backend must pass.
use signalpost::address::ClientId;
use signalpost::presence::{Presence, Seen};
use std::sync::Arc;

fn seen(node: &str, conn: &str) -> Seen {
    Seen {
        node: node.into(),
        connection: conn.into(),
        since: 1,
    }
}

pub async fn connect_disconnect_clear(p: Arc<dyn Presence>) {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (a, b) = (
        ClientId::parse(&format!("pa-{tag}")).unwrap(),
        ClientId::parse(&format!("pb-{tag}")).unwrap(),
    );
    let (n1, n2) = (format!("n1-{tag}"), format!("n2-{tag}"));
    p.connected(&a, seen(&n1, "c1")).await.unwrap();
    p.connected(&a, seen(&n1, "c1")).await.unwrap();
    p.connected(&a, seen(&n2, "c2")).await.unwrap();
    p.connected(&b, seen(&n1, "c3")).await.unwrap();
    let got = p.lookup(&[a.clone(), b.clone()]).await.unwrap();
    assert_eq!(
        got[0].len(),
        2,
        "connected is idempotent, one entry per connection"
    );
    assert_eq!(got[1], vec![seen(&n1, "c3")]);
    let nodes = p.nodes().await.unwrap();
    assert!(nodes.contains(&n1) && nodes.contains(&n2), "{nodes:?}");
    p.disconnected(&a, &n2, "c2").await.unwrap();
    p.disconnected(&a, &n2, "c2").await.unwrap();
    assert_eq!(
        p.lookup(std::slice::from_ref(&a)).await.unwrap()[0],
        vec![seen(&n1, "c1")]
    );
    assert_eq!(p.clear_node(&n1).await.unwrap(), 2);
    assert_eq!(
        p.lookup(&[a, b]).await.unwrap(),
        vec![vec![], vec![]],
        "a dead node's entries are gone"
    );
    assert!(
        !p.nodes().await.unwrap().contains(&n1),
        "a cleared node has no entries"
    );
    assert_eq!(
        p.clear_node(&n1).await.unwrap(),
        0,
        "clearing again is a no-op"
    );
}
