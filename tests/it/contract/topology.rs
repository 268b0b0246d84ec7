//! The contract suites every [`Topology`] and [`Cursors`] backend must pass.

use super::mailbox::fresh_address;
use signalpost::address::ClientId;
use signalpost::topology::{Binding, Cursors, Topology};
use std::sync::Arc;

fn fresh_client(tag: &str) -> ClientId {
    ClientId::parse(&format!("{tag}-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

/// A revoked client stays revoked (idempotent); others are not.
pub async fn revocation(t: Arc<dyn Topology>) {
    let (a, b) = (fresh_client("rev"), fresh_client("rev"));
    assert!(!t.revoked(&a).await.unwrap());
    t.revoke(&a).await.unwrap();
    t.revoke(&a).await.unwrap();
    assert!(t.revoked(&a).await.unwrap());
    assert!(!t.revoked(&b).await.unwrap(), "only the revoked client");
}

/// add/get/remove/members, idempotence, and the first `since` wins.
pub async fn bindings(t: Arc<dyn Topology>) {
    let c = fresh_client("topo");
    let (a, b) = (
        fresh_address("channel", "ta"),
        fresh_address("channel", "tb"),
    );
    assert!(t.get(&c).await.unwrap().is_empty());
    let added = t
        .add(
            &c,
            &[
                Binding {
                    address: a.clone(),
                    since: 5,
                },
                Binding {
                    address: b.clone(),
                    since: 0,
                },
            ],
        )
        .await
        .unwrap();
    assert_eq!(added.len(), 2);
    let again = t
        .add(
            &c,
            &[Binding {
                address: a.clone(),
                since: 9,
            }],
        )
        .await
        .unwrap();
    assert!(again.is_empty(), "binding twice adds nothing");
    let mut got = t.get(&c).await.unwrap();
    got.sort_by(|x, y| x.address.cmp(&y.address));
    let mut want = vec![
        Binding {
            address: a.clone(),
            since: 5,
        },
        Binding {
            address: b.clone(),
            since: 0,
        },
    ];
    want.sort_by(|x, y| x.address.cmp(&y.address));
    assert_eq!(got, want, "the first since is kept");
    assert_eq!(t.members(&a, None, 10).await.unwrap(), vec![c.clone()]);
    let removed = t
        .remove(&c, &[a.clone(), fresh_address("channel", "never")])
        .await
        .unwrap();
    assert_eq!(
        removed,
        vec![a.clone()],
        "only bound addresses are reported removed"
    );
    assert!(t.members(&a, None, 10).await.unwrap().is_empty());
    assert_eq!(
        t.get(&c).await.unwrap(),
        vec![Binding {
            address: b.clone(),
            since: 0
        }]
    );
}

/// members pages in client order.
pub async fn members_paging(t: Arc<dyn Topology>) {
    let a = fresh_address("channel", "many");
    let mut clients: Vec<ClientId> = (0..7).map(|i| fresh_client(&format!("m{i}"))).collect();
    for c in &clients {
        t.add(
            c,
            &[Binding {
                address: a.clone(),
                since: 0,
            }],
        )
        .await
        .unwrap();
    }
    clients.sort();
    let mut seen = Vec::new();
    let mut after: Option<ClientId> = None;
    loop {
        let page = t.members(&a, after.as_ref(), 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        after = page.last().cloned();
        seen.extend(page);
    }
    assert_eq!(seen, clients);
}

/// Cursors keep the maximum per client and address.
pub async fn cursors(c: Arc<dyn Cursors>) {
    let client = fresh_client("cur");
    let (a, b) = (
        fresh_address("channel", "ca"),
        fresh_address("client", "cb"),
    );
    assert!(c.get(&client).await.unwrap().is_empty());
    c.save(&[
        (client.clone(), a.clone(), 7),
        (client.clone(), b.clone(), 2),
    ])
    .await
    .unwrap();
    c.save(&[(client.clone(), a.clone(), 3)]).await.unwrap();
    c.save(&[
        (client.clone(), b.clone(), 4),
        (client.clone(), b.clone(), 3),
    ])
    .await
    .unwrap();
    let got = c.get(&client).await.unwrap();
    assert_eq!(got.get(&a), Some(&7), "an older ack never lowers a cursor");
    assert_eq!(got.get(&b), Some(&4));
    assert!(
        c.get(&fresh_client("other")).await.unwrap().is_empty(),
        "cursors are per client"
    );
}
