//! The contract suite every `Presence` backend must pass.
use signalpost::address::{Address, ClientId};
use signalpost::presence::{Member, Presence, Seen};
use std::sync::Arc;

/// Where a connection is, as the suite writes it (`since` 1).
pub fn seen(node: &str, conn: &str) -> Seen {
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
    assert_eq!(p.clear_node(&n1).await.unwrap().connections, 2);
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
        p.clear_node(&n1).await.unwrap().connections,
        0,
        "clearing again is a no-op"
    );
}

pub fn member(client: &ClientId, user: Option<&str>) -> Member {
    Member {
        client: client.clone(),
        user: user.map(str::to_owned),
    }
}

fn clients(members: &[Member]) -> Vec<&str> {
    members.iter().map(|m| m.client.as_str()).collect()
}

/// A client is a member from its first connection's join to its last connection's leave;
/// only those two report; both are idempotent; the list pages by client id.
pub async fn members_join_and_leave_once(p: Arc<dyn Presence>) {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let room = Address::parse(&format!("presence:room-{tag}")).unwrap();
    let other = Address::parse(&format!("presence:other-{tag}")).unwrap();
    let (a, b) = (
        ClientId::parse(&format!("a-{tag}")).unwrap(),
        ClientId::parse(&format!("b-{tag}")).unwrap(),
    );
    let (n1, n2) = (format!("n1-{tag}"), format!("n2-{tag}"));
    let ma = member(&a, Some("alice"));
    assert!(
        p.join(&room, &ma, &n1, "c1").await.unwrap(),
        "first connection"
    );
    assert!(!p.join(&room, &ma, &n1, "c1").await.unwrap(), "idempotent");
    assert!(
        !p.join(&room, &ma, &n2, "c2").await.unwrap(),
        "a second connection, on another node: still one member"
    );
    assert!(p.join(&room, &member(&b, None), &n2, "c3").await.unwrap());
    assert!(p.members(&other, None, 10).await.unwrap().is_empty());
    let all = p.members(&room, None, 10).await.unwrap();
    assert_eq!(
        all,
        vec![ma.clone(), member(&b, None)],
        "ordered by client id"
    );
    assert_eq!(
        clients(&p.members(&room, None, 1).await.unwrap()),
        [a.as_str()]
    );
    assert_eq!(
        clients(&p.members(&room, Some(&a), 10).await.unwrap()),
        [b.as_str()],
        "the page after a"
    );
    assert_eq!(
        p.leave(&room, &a, &n1, "c1").await.unwrap(),
        None,
        "c2 holds it"
    );
    assert_eq!(
        p.leave(&room, &a, &n1, "c1").await.unwrap(),
        None,
        "idempotent"
    );
    assert_eq!(
        p.leave(&room, &a, &n2, "c2").await.unwrap(),
        Some(ma.clone()),
        "the last connection: left, with the user it joined with"
    );
    assert_eq!(p.leave(&room, &a, &n2, "c2").await.unwrap(), None);
    assert_eq!(
        clients(&p.members(&room, None, 10).await.unwrap()),
        [b.as_str()]
    );
    // Back again: a member again, and listed.
    assert!(
        p.join(&room, &member(&a, Some("alice2")), &n1, "c4")
            .await
            .unwrap()
    );
    let all = p.members(&room, None, 10).await.unwrap();
    assert_eq!(all[0], member(&a, Some("alice2")));
    assert_eq!(
        p.leave(&room, &a, &n1, "c4").await.unwrap().map(|m| m.user),
        Some(Some("alice2".into()))
    );
    assert_eq!(
        p.leave(&room, &b, &n2, "c3").await.unwrap(),
        Some(member(&b, None))
    );
    assert!(p.members(&room, None, 10).await.unwrap().is_empty());
}

/// Eight connections of one client join at once, on four nodes, then leave at once: exactly
/// one join reports the start and exactly one leave the end.
pub async fn racing_connections_announce_once(p: Arc<dyn Presence>) {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let room = Address::parse(&format!("presence:race-{tag}")).unwrap();
    let c = ClientId::parse(&format!("c-{tag}")).unwrap();
    for round in 0..3 {
        let joins = (0..8).map(|i| {
            let (p, room, m) = (p.clone(), room.clone(), member(&c, None));
            tokio::spawn(async move {
                p.join(&room, &m, &format!("n{}", i % 4), &format!("r{round}-{i}"))
                    .await
                    .unwrap()
            })
        });
        let firsts = futures_util::future::join_all(joins)
            .await
            .into_iter()
            .filter(|r| *r.as_ref().unwrap())
            .count();
        assert_eq!(firsts, 1, "round {round}: one join starts the membership");
        assert_eq!(p.members(&room, None, 10).await.unwrap().len(), 1);
        let leaves = (0..8).map(|i| {
            let (p, room, c) = (p.clone(), room.clone(), c.clone());
            tokio::spawn(async move {
                p.leave(&room, &c, &format!("n{}", i % 4), &format!("r{round}-{i}"))
                    .await
                    .unwrap()
            })
        });
        let lasts = futures_util::future::join_all(leaves)
            .await
            .into_iter()
            .filter(|r| r.as_ref().unwrap().is_some())
            .count();
        assert_eq!(lasts, 1, "round {round}: one leave ends the membership");
        assert!(p.members(&room, None, 10).await.unwrap().is_empty());
    }
}

/// Clearing a dead node ends the memberships only its connections held, and reports those.
pub async fn a_dead_nodes_members_leave(p: Arc<dyn Presence>) {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let room = Address::parse(&format!("presence:dead-{tag}")).unwrap();
    let (a, b) = (
        ClientId::parse(&format!("a-{tag}")).unwrap(),
        ClientId::parse(&format!("b-{tag}")).unwrap(),
    );
    let (dead, live) = (format!("dead-{tag}"), format!("live-{tag}"));
    p.connected(&a, seen(&dead, "c1")).await.unwrap();
    assert!(
        p.join(&room, &member(&a, Some("u")), &dead, "c1")
            .await
            .unwrap()
    );
    p.connected(&b, seen(&dead, "c2")).await.unwrap();
    assert!(p.join(&room, &member(&b, None), &dead, "c2").await.unwrap());
    p.connected(&b, seen(&live, "c3")).await.unwrap();
    assert!(!p.join(&room, &member(&b, None), &live, "c3").await.unwrap());
    let cleared = p.clear_node(&dead).await.unwrap();
    assert_eq!(cleared.connections, 2);
    let left: Vec<(&str, &str, bool)> = cleared
        .left
        .iter()
        .map(|c| (c.address.as_str(), c.member.client.as_str(), c.joined))
        .collect();
    assert_eq!(
        left,
        vec![(room.as_str(), a.as_str(), false)],
        "b is still on the live node"
    );
    assert_eq!(cleared.left[0].member.user.as_deref(), Some("u"));
    assert_eq!(
        clients(&p.members(&room, None, 10).await.unwrap()),
        [b.as_str()]
    );
    assert!(
        p.clear_node(&dead).await.unwrap().left.is_empty(),
        "idempotent"
    );
    assert_eq!(
        p.leave(&room, &b, &live, "c3").await.unwrap(),
        Some(member(&b, None))
    );
}
