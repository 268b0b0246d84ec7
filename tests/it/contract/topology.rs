//! The contract suites every [`Topology`], [`Cursors`] and read-marks backend must pass.

use super::mailbox::fresh_address;
use signalpost::address::{Address, ClientId};
use signalpost::topology::{Binding, Cursors, ReadMarks, Topology, TopologyError};
use std::sync::Arc;

/// A limit on bindings per client that the tests below do not reach.
pub const LIMIT: usize = 1000;
/// How long the tests' cursors are kept (longer than any test).
pub const TTL: u32 = 3600;

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

/// add/get/remove, idempotence, and the first `since` wins.
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
            LIMIT,
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
            LIMIT,
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
    let removed = t
        .remove(&c, &[a.clone(), fresh_address("channel", "never")])
        .await
        .unwrap();
    assert_eq!(
        removed,
        vec![a.clone()],
        "only bound addresses are reported removed"
    );
    assert_eq!(
        t.get(&c).await.unwrap(),
        vec![Binding {
            address: b.clone(),
            since: 0
        }]
    );
}

/// Binds and unbinds of one client that run at once are all kept (two nodes may handle the
/// same client together), and of several binds of one address exactly one is new and its
/// `since` is the one kept.
pub async fn concurrent_binds(t: Arc<dyn Topology>) {
    let c = fresh_client("conc");
    let addresses: Vec<Address> = (0..16)
        .map(|i| fresh_address("channel", &format!("c{i}")))
        .collect();
    let shared = fresh_address("channel", "shared");
    let mut tasks = Vec::new();
    for (i, a) in addresses.iter().enumerate() {
        let (t, c, a) = (t.clone(), c.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            t.add(
                &c,
                &[Binding {
                    address: a,
                    since: i as u64,
                }],
                LIMIT,
            )
            .await
            .unwrap()
        }));
    }
    for since in 100..108u64 {
        let (t, c, a) = (t.clone(), c.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            t.add(&c, &[Binding { address: a, since }], LIMIT)
                .await
                .unwrap()
        }));
    }
    let mut new_shared = Vec::new();
    for task in tasks {
        for b in task.await.unwrap() {
            if b.address == shared {
                new_shared.push(b.since);
            }
        }
    }
    assert_eq!(new_shared.len(), 1, "one bind of the shared address is new");
    let got = t.get(&c).await.unwrap();
    assert_eq!(got.len(), 17, "every concurrent bind is kept: {got:?}");
    let kept = got.iter().find(|b| b.address == shared).unwrap();
    assert_eq!(
        kept.since, new_shared[0],
        "the since of the bind that was new"
    );
    for (i, a) in addresses.iter().enumerate() {
        assert!(got.contains(&Binding {
            address: a.clone(),
            since: i as u64
        }));
    }
    // Half of them unbound at once, beside binds of the shared address again.
    let mut tasks = Vec::new();
    for a in addresses.iter().step_by(2) {
        let (t, c, a) = (t.clone(), c.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            assert_eq!(
                t.remove(&c, std::slice::from_ref(&a)).await.unwrap(),
                vec![a]
            );
        }));
    }
    for since in 200..204u64 {
        let (t, c, a) = (t.clone(), c.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            assert!(
                t.add(&c, &[Binding { address: a, since }], LIMIT)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut left: Vec<Address> = t
        .get(&c)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.address)
        .collect();
    left.sort();
    let mut want: Vec<Address> = addresses.iter().skip(1).step_by(2).cloned().collect();
    want.push(shared.clone());
    want.sort();
    assert_eq!(left, want);
}

fn channels(tag: &str, n: usize) -> Vec<Binding> {
    (0..n)
        .map(|i| Binding {
            address: fresh_address("channel", &format!("{tag}{i}")),
            since: i as u64,
        })
        .collect()
}

/// `add` refuses what would pass the limit and changes nothing then; addresses already held
/// do not count, so binding them again at the limit passes.
pub async fn bind_limit(t: Arc<dyn Topology>) {
    let c = fresh_client("limit");
    let held = channels("l", 3);
    assert_eq!(t.add(&c, &held, 4).await.unwrap().len(), 3);
    let two_more = channels("m", 2);
    match t.add(&c, &two_more, 4).await {
        Err(TopologyError::TooMany {
            held: 3,
            more: 2,
            limit: 4,
            ..
        }) => {}
        other => panic!("expected TooMany, got {other:?}"),
    }
    assert_eq!(
        t.get(&c).await.unwrap().len(),
        3,
        "a refused bind binds none"
    );
    // Held ones again beside one new: only the new one counts.
    let mut mixed = held.clone();
    mixed.push(two_more[0].clone());
    assert_eq!(
        t.add(&c, &mixed, 4).await.unwrap(),
        vec![two_more[0].clone()]
    );
    // At the limit: held ones again pass, a new one does not.
    assert!(t.add(&c, &held, 4).await.unwrap().is_empty());
    assert!(matches!(
        t.add(&c, &two_more[1..], 4).await,
        Err(TopologyError::TooMany { held: 4, .. })
    ));
    // Unbinding makes room.
    t.remove(&c, std::slice::from_ref(&held[0].address))
        .await
        .unwrap();
    assert_eq!(t.add(&c, &two_more[1..], 4).await.unwrap().len(), 1);
    assert_eq!(t.get(&c).await.unwrap().len(), 4);
}

/// Binds of one client that run at once (on several nodes) cannot pass the limit together:
/// of 12 concurrent binds of a new address each under a limit of 5, exactly 5 are kept.
pub async fn concurrent_bind_limit(t: Arc<dyn Topology>) {
    let c = fresh_client("climit");
    let mut tasks = Vec::new();
    for b in channels("x", 12) {
        let (t, c) = (t.clone(), c.clone());
        tasks.push(tokio::spawn(async move { t.add(&c, &[b], 5).await }));
    }
    let (mut kept, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(added) => kept += added.len(),
            Err(TopologyError::TooMany { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((kept, refused), (5, 7));
    assert_eq!(t.get(&c).await.unwrap().len(), 5);
}

/// Cursors keep the maximum per client and address.
pub async fn cursors(c: Arc<dyn Cursors>) {
    let client = fresh_client("cur");
    let (a, b) = (
        fresh_address("channel", "ca"),
        fresh_address("client", "cb"),
    );
    assert!(c.get(&client).await.unwrap().is_empty());
    c.save(
        &[
            (client.clone(), a.clone(), 7),
            (client.clone(), b.clone(), 2),
        ],
        TTL,
    )
    .await
    .unwrap();
    c.save(&[(client.clone(), a.clone(), 3)], TTL)
        .await
        .unwrap();
    c.save(
        &[
            (client.clone(), b.clone(), 4),
            (client.clone(), b.clone(), 3),
        ],
        TTL,
    )
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

/// Read marks: added, never lost to a concurrent mark, dropped below `low`, compressed.
pub async fn read_marks(r: Arc<dyn signalpost::topology::ReadMarks>) {
    let client = ClientId::parse(&format!("rm-{}", uuid::Uuid::new_v4().simple())).unwrap();
    let a = Address::parse(&format!("channel:rm-{}", uuid::Uuid::new_v4().simple())).unwrap();
    let got = |m: roaring::RoaringTreemap| m.iter().collect::<Vec<u64>>();
    assert_eq!(
        r.marks(&client, &a).await.unwrap().1,
        0,
        "nothing marked yet"
    );
    r.mark(&client, &a, &[5, 1, 3], 1, 3600).await.unwrap();
    r.mark(&client, &a, &[3, 7], 1, 3600).await.unwrap();
    assert_eq!(got(r.marks(&client, &a).await.unwrap().0), vec![1, 3, 5, 7]);
    // Versions below `low` expired with their messages: dropped, also those marked now.
    r.mark(&client, &a, &[2, 9], 4, 3600).await.unwrap();
    assert_eq!(got(r.marks(&client, &a).await.unwrap().0), vec![5, 7, 9]);
    // Eight marks at once (as from two nodes): none is lost.
    let b = Address::parse(&format!("channel:rm2-{}", uuid::Uuid::new_v4().simple())).unwrap();
    let tasks: Vec<_> = (0..8u64)
        .map(|k| {
            let (r, client, b) = (r.clone(), client.clone(), b.clone());
            tokio::spawn(async move {
                for round in 0..5u64 {
                    let vs: Vec<u64> = (0..10).map(|i| 1 + k + 8 * (round * 10 + i)).collect();
                    r.mark(&client, &b, &vs, 1, 3600).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        got(r.marks(&client, &b).await.unwrap().0),
        (1..=400).collect::<Vec<u64>>()
    );
    // Every other message of 100 000: stored compressed.
    let c = Address::parse(&format!("channel:rm3-{}", uuid::Uuid::new_v4().simple())).unwrap();
    let odd: Vec<u64> = (1..=100_000).step_by(2).collect();
    let mut size = 0;
    for chunk in odd.chunks(1000) {
        size = r.mark(&client, &c, chunk, 1, 3600).await.unwrap();
    }
    let (marks, stored) = r.marks(&client, &c).await.unwrap();
    assert_eq!((marks.len(), stored), (50_000, size));
    assert!(size < 20_000, "50 000 marks in {size} bytes");
}

/// Cursors and read marks are forgotten a TTL after the last write that kept them, and not
/// before; a later write with a longer TTL keeps the row. (Cassandra's cells expire by
/// themselves; the embedded store removes them at `expire`, so the test calls it.) The short
/// TTL is 3 s: Cassandra counts a TTL from the write's whole second, so a cell of 1 s may be
/// gone at once.
pub async fn expiry<T: Cursors + ReadMarks>(t: Arc<T>) {
    const SHORT: u32 = 3;
    let client = fresh_client("exp");
    let [gone, renewed, kept] = ["gone", "renewed", "kept"].map(|n| fresh_address("channel", n));
    let expire = |t: Arc<T>| async move {
        let now = signalpost::clock::now_ms();
        Cursors::expire(&*t, now).await.unwrap();
        ReadMarks::expire(&*t, now).await.unwrap();
    };
    let ack = |a: &Address, v: u64| (client.clone(), a.clone(), v);
    Cursors::save(&*t, &[ack(&gone, 3), ack(&renewed, 4)], SHORT)
        .await
        .unwrap();
    Cursors::save(&*t, &[ack(&renewed, 5), ack(&kept, 2)], TTL)
        .await
        .unwrap();
    let marks = [
        (&gone, 1, SHORT),
        (&renewed, 1, SHORT),
        (&renewed, 2, TTL),
        (&kept, 1, TTL),
    ];
    for (a, v, ttl) in marks {
        ReadMarks::mark(&*t, &client, a, &[v], 0, ttl)
            .await
            .unwrap();
    }
    let read = |t: Arc<T>, a: Address| {
        let client = client.clone();
        async move {
            let m = ReadMarks::marks(&*t, &client, &a).await.unwrap().0;
            m.iter().collect::<Vec<u64>>()
        }
    };
    expire(t.clone()).await;
    let got = Cursors::get(&*t, &client).await.unwrap();
    assert_eq!(got.len(), 3, "nothing goes before its time: {got:?}");
    assert_eq!(read(t.clone(), gone.clone()).await, vec![1]);

    tokio::time::sleep(std::time::Duration::from_millis(4500)).await;
    expire(t.clone()).await;
    let got = Cursors::get(&*t, &client).await.unwrap();
    assert_eq!(got.get(&gone), None, "past its TTL");
    assert_eq!(got.get(&renewed), Some(&5), "kept by the later ack");
    assert_eq!(got.get(&kept), Some(&2));
    assert_eq!(
        read(t.clone(), gone).await,
        Vec::<u64>::new(),
        "past its TTL"
    );
    assert_eq!(
        read(t.clone(), renewed).await,
        vec![1, 2],
        "kept by the later mark"
    );
    assert_eq!(read(t, kept).await, vec![1]);
}
