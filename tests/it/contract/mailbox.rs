//! The contract suite every [`Mailbox`] backend must pass. Backends' tests call these functions
//! with a fresh store (the embedded one in `tests/it`, the Cassandra one against a real server).
//! Each function panics with a message saying which promise broke.

use serde_json::value::RawValue;
use signalpost::address::{Address, MessageId};
use signalpost::mailbox::{Mailbox, NewMessage};
use std::collections::HashMap;
use std::sync::Arc;

/// A unique address for one test, so suites can share a store.
pub fn fresh_address(kind: &str, tag: &str) -> Address {
    Address::parse(&format!("{kind}:{tag}-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

/// A message with the given id and a small payload naming it.
pub fn msg(address: &Address, id: &str) -> NewMessage {
    NewMessage {
        address: address.clone(),
        id: MessageId::parse(id).unwrap(),
        payload: RawValue::from_string(format!("{{\"n\":\"{id}\"}}")).unwrap(),
        new_id: false,
    }
}

/// Versions are 1, 2, 3… per address with no gap and never twice, in batch order, also when
/// several callers append to the same addresses at once. `minted`: every message's id is
/// vouched for as new ([`NewMessage::new_id`]), which lets a writer skip the id lookup (and the
/// Cassandra mailbox overlap the appends).
pub async fn gap_free(m: Arc<dyn Mailbox>, minted: bool) {
    let addrs: Vec<Address> = (0..5)
        .map(|i| fresh_address("channel", &format!("gf{i}")))
        .collect();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let m = m.clone();
        let addrs = addrs.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for b in 0..10 {
                let batch: Vec<NewMessage> = (0..25)
                    .map(|i| {
                        let mut m = msg(&addrs[(i + b) % addrs.len()], &format!("t{t}-b{b}-i{i}"));
                        m.new_id = minted;
                        m
                    })
                    .collect();
                let out = m.append(batch).await.expect("append");
                assert_eq!(out.len(), 25, "one result per message");
                // Within a batch, versions of one address increase in batch order.
                let mut last: HashMap<Address, u64> = HashMap::new();
                for a in &out {
                    assert!(!a.duplicate);
                    let prev = last.insert(a.message.address.clone(), a.message.version);
                    assert!(
                        prev.is_none_or(|p| p < a.message.version),
                        "batch order kept"
                    );
                    mine.push((
                        a.message.address.clone(),
                        a.message.version,
                        a.message.id.clone(),
                    ));
                }
            }
            mine
        }));
    }
    let mut all: HashMap<Address, Vec<u64>> = HashMap::new();
    let mut ids = HashMap::new();
    for t in tasks {
        for (a, v, id) in t.await.unwrap() {
            all.entry(a.clone()).or_default().push(v);
            ids.insert((a, v), id);
        }
    }
    for a in &addrs {
        let mut vs = all.remove(a).unwrap_or_default();
        vs.sort_unstable();
        let n = vs.len() as u64;
        assert_eq!(
            vs,
            (1..=n).collect::<Vec<_>>(),
            "versions of {a} are 1..={n} with no gap or repeat"
        );
        let page = m.read(a, 0, 10_000).await.unwrap();
        assert_eq!(page.head.head, n);
        let read: Vec<u64> = page.messages.iter().map(|x| x.version).collect();
        assert_eq!(
            read,
            (1..=n).collect::<Vec<_>>(),
            "read returns every version in order"
        );
        for x in &page.messages {
            assert_eq!(&x.address, a);
            assert_eq!(
                Some(&x.id),
                ids.get(&(a.clone(), x.version)),
                "stored id matches append result"
            );
        }
    }
}

/// `append_now` either appends at once, with the promises of `append` (versions after what
/// `append` gave, ids kept, readable at once), or gives the batch back untouched and appends
/// nothing.
pub async fn append_now(m: Arc<dyn Mailbox>) {
    let a = fresh_address("channel", "now");
    m.append(vec![msg(&a, "n1")]).await.expect("append");
    let batch = vec![msg(&a, "n2"), msg(&a, "n3"), msg(&a, "n1")];
    match m.append_now(batch) {
        Ok(out) => {
            let out = out.expect("append_now");
            let got: Vec<(u64, bool)> = out
                .iter()
                .map(|x| (x.message.version, x.duplicate))
                .collect();
            assert_eq!(
                got,
                vec![(2, false), (3, false), (1, true)],
                "as append would"
            );
            let page = m.read(&a, 0, 10).await.expect("read");
            let ids: Vec<String> = page.messages.iter().map(|x| x.id.to_string()).collect();
            assert_eq!(ids, ["n1", "n2", "n3"], "readable at once, in order");
        }
        Err(back) => {
            let ids: Vec<String> = back.iter().map(|x| x.id.to_string()).collect();
            assert_eq!(ids, ["n2", "n3", "n1"], "given back untouched");
            let page = m.read(&a, 0, 10).await.expect("read");
            assert_eq!(page.messages.len(), 1, "nothing appended");
        }
    }
}

/// The same id to the same address is appended once, within a batch and across batches; the
/// repeat answers with the original version. The same id to another address is a new message.
pub async fn idempotent(m: Arc<dyn Mailbox>) {
    let a = fresh_address("channel", "idem");
    let b = fresh_address("client", "idem");
    let out = m
        .append(vec![msg(&a, "x"), msg(&a, "y"), msg(&a, "x"), msg(&b, "x")])
        .await
        .unwrap();
    let v: Vec<(u64, bool)> = out
        .iter()
        .map(|o| (o.message.version, o.duplicate))
        .collect();
    assert_eq!(v, vec![(1, false), (2, false), (1, true), (1, false)]);
    let again = m.append(vec![msg(&a, "y"), msg(&a, "z")]).await.unwrap();
    assert_eq!((again[0].message.version, again[0].duplicate), (2, true));
    assert_eq!(
        again[0].message.payload().get(),
        "{\"n\":\"y\"}",
        "duplicate carries the original"
    );
    assert_eq!((again[1].message.version, again[1].duplicate), (3, false));
    assert_eq!(m.read(&a, 0, 100).await.unwrap().messages.len(), 3);
}

/// Reads page through a mailbox after any version, and report the head.
pub async fn paging(m: Arc<dyn Mailbox>) {
    let a = fresh_address("channel", "page");
    for chunk in 0..5 {
        let batch = (0..50)
            .map(|i| msg(&a, &format!("m{}", chunk * 50 + i)))
            .collect();
        m.append(batch).await.unwrap();
    }
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let page = m.read(&a, after, 64).await.unwrap();
        assert_eq!(page.head.head, 250);
        assert!(page.messages.len() <= 64);
        let Some(last) = page.messages.last() else {
            break;
        };
        after = last.version;
        seen.extend(page.messages.iter().map(|x| x.version));
    }
    assert_eq!(seen, (1..=250).collect::<Vec<_>>());
    let tail = m.read(&a, 240, 100).await.unwrap();
    assert_eq!(
        tail.messages.iter().map(|x| x.version).collect::<Vec<_>>(),
        (241..=250).collect::<Vec<_>>()
    );
    assert!(m.read(&a, 250, 100).await.unwrap().messages.is_empty());
    assert!(m.read(&a, 0, 0).await.unwrap().messages.is_empty());
    let unknown = fresh_address("channel", "none");
    let h = m.heads(&[unknown.clone(), a.clone()]).await.unwrap();
    assert_eq!((h[0].head, h[0].low), (0, 1));
    assert_eq!((h[1].head, h[1].low), (250, 1));
}

/// Stamps never go back within a mailbox, and history by time finds exactly the messages
/// stamped in a range, and the last `n`.
pub async fn history(m: Arc<dyn Mailbox>) {
    use signalpost::mailbox::history;
    let a = fresh_address("channel", "hist");
    // Five batches of 40, each at least 3 ms after the one before.
    for b in 0..5 {
        let batch = (0..40).map(|i| msg(&a, &format!("h{b}-{i}"))).collect();
        m.append(batch).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let all = m.read(&a, 0, 1000).await.unwrap().messages;
    assert_eq!(all.len(), 200);
    assert!(
        all.windows(2).all(|w| w[0].ts <= w[1].ts),
        "stamps in version order"
    );
    let ts: Vec<u64> = all.iter().map(|x| x.ts).collect();
    let versions =
        |p: &signalpost::mailbox::Page| p.messages.iter().map(|x| x.version).collect::<Vec<_>>();
    let stamped = |lo: u64, hi: u64| {
        all.iter()
            .filter(|x| x.ts >= lo && x.ts <= hi)
            .map(|x| x.version)
            .collect::<Vec<_>>()
    };
    // From each batch's first stamp: the messages stamped at or after it, in order.
    for b in 0..5 {
        let since = ts[b * 40];
        let page = history::between(&*m, &a, Some(since), None, 1000)
            .await
            .unwrap();
        assert_eq!(versions(&page), stamped(since, u64::MAX), "since {since}");
        assert_eq!(page.head.head, 200);
    }
    // A closed range, a limit, and ranges before and after everything.
    let (lo, hi) = (ts[40], ts[119]);
    let page = history::between(&*m, &a, Some(lo), Some(hi), 1000)
        .await
        .unwrap();
    assert_eq!(versions(&page), stamped(lo, hi));
    let page = history::between(&*m, &a, Some(lo), Some(hi), 7)
        .await
        .unwrap();
    assert_eq!(versions(&page), stamped(lo, hi)[..7].to_vec());
    let page = history::between(&*m, &a, None, Some(ts[0].saturating_sub(1)), 10)
        .await
        .unwrap();
    assert!(page.messages.is_empty(), "nothing before the first");
    let page = history::between(&*m, &a, Some(ts[199] + 1), None, 10)
        .await
        .unwrap();
    assert!(page.messages.is_empty(), "nothing after the last");
    let head = m.heads(std::slice::from_ref(&a)).await.unwrap()[0];
    assert_eq!(
        history::first_since(&*m, &a, head, ts[199] + 1)
            .await
            .unwrap(),
        201
    );
    assert_eq!(history::first_since(&*m, &a, head, 0).await.unwrap(), 1);
    // The last n.
    let page = history::last(&*m, &a, 5).await.unwrap();
    assert_eq!(versions(&page), (196..=200).collect::<Vec<_>>());
    let page = history::last(&*m, &a, 500).await.unwrap();
    assert_eq!(versions(&page).len(), 200);
    let empty = fresh_address("channel", "hist-none");
    assert!(
        history::last(&*m, &empty, 3)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    assert!(
        history::between(&*m, &empty, Some(1), None, 3)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
}

/// A payload comes back byte for byte, inside the client-facing signal.
pub async fn payload_roundtrip(m: Arc<dyn Mailbox>) {
    let a = fresh_address("client", "rt");
    let payload = r#"{"text":"grüße \"quoted\" ✓","list":[1,2.5,null,true],"nested":{"a":{}}}"#;
    let nm = NewMessage {
        address: a.clone(),
        id: MessageId::parse("rt-1").unwrap(),
        payload: RawValue::from_string(payload.into()).unwrap(),
        new_id: false,
    };
    let out = m.append(vec![nm]).await.unwrap();
    let ts = out[0].message.ts;
    assert!(ts > 1_600_000_000_000, "ts is ms since epoch");
    let read = m.read(&a, 0, 10).await.unwrap();
    let got = &read.messages[0];
    assert_eq!(got.payload().get(), payload);
    assert_eq!(got.ts, ts);
    let signal: serde_json::Value = serde_json::from_str(got.signal.get()).unwrap();
    assert_eq!(signal["address"], a.as_str());
    assert_eq!(signal["version"], 1);
    assert_eq!(signal["id"], "rt-1");
    assert_eq!(signal["ts"], ts);
}

/// One large append — more messages and bytes than one write to the store takes at once, over
/// many addresses, a second append on top — is stored whole: every address has versions 1..=n
/// in batch order, each with its own id and payload, and the ids are found again as duplicates.
pub async fn large_append(m: Arc<dyn Mailbox>) {
    let addrs: Vec<Address> = (0..40)
        .map(|i| fresh_address("client", &format!("la{i}")))
        .collect();
    let filler = "x".repeat(700);
    let make = |round: usize, i: usize, minted: bool| {
        let a = &addrs[(i * 7 + round) % addrs.len()];
        let id = format!("r{round}-{i}");
        NewMessage {
            address: a.clone(),
            id: MessageId::parse(&id).unwrap(),
            payload: RawValue::from_string(format!("{{\"id\":\"{id}\",\"f\":\"{filler}\"}}"))
                .unwrap(),
            new_id: minted,
        }
    };
    let mut expected: HashMap<Address, Vec<String>> = HashMap::new();
    for round in 0..2 {
        let batch: Vec<NewMessage> = (0..1_200).map(|i| make(round, i, round == 0)).collect();
        for nm in &batch {
            expected
                .entry(nm.address.clone())
                .or_default()
                .push(nm.id.as_str().to_owned());
        }
        let out = m.append(batch).await.expect("a large append");
        assert_eq!(out.len(), 1_200);
        assert!(out.iter().all(|a| !a.duplicate));
    }
    for a in &addrs {
        let ids = &expected[a];
        let page = m.read(a, 0, 10_000).await.unwrap();
        assert_eq!(page.head.head, ids.len() as u64, "head of {a}");
        let versions: Vec<u64> = page.messages.iter().map(|x| x.version).collect();
        assert_eq!(
            versions,
            (1..=ids.len() as u64).collect::<Vec<_>>(),
            "{a}: 1..=n"
        );
        for (x, id) in page.messages.iter().zip(ids) {
            assert_eq!(x.id.as_str(), id, "{a} v{}: batch order", x.version);
            assert!(x.payload().get().contains(&format!("\"id\":\"{id}\"")));
        }
    }
    // Sent again (not vouched for), the first round answers as duplicates, at their versions.
    let again: Vec<NewMessage> = (0..1_200).map(|i| make(0, i, false)).collect();
    let out = m.append(again).await.expect("the repeat");
    assert!(
        out.iter().all(|a| a.duplicate),
        "every repeat is a duplicate"
    );
}

/// Messages older than the retention are removed by `expire`; the head stays, reads start at
/// `low`, new appends continue the versions, and an expired id may be sent again.
pub async fn retention(m: Arc<dyn Mailbox>, retention_ms: u64) {
    let a = fresh_address("channel", "ttl");
    m.append((0..10).map(|i| msg(&a, &format!("old{i}"))).collect())
        .await
        .unwrap();
    let appended_at = signalpost::clock::now_ms();
    // Nothing expires before the retention has passed.
    m.expire(appended_at).await.unwrap();
    assert_eq!(m.read(&a, 0, 100).await.unwrap().messages.len(), 10);
    // Wait long enough for any backend's expiry granularity.
    tokio::time::sleep(std::time::Duration::from_millis(retention_ms * 2 + 300)).await;
    let fresh = m.append(vec![msg(&a, "new0")]).await.unwrap();
    assert_eq!(fresh[0].message.version, 11);
    m.expire(signalpost::clock::now_ms()).await.unwrap();
    let page = m.read(&a, 0, 100).await.unwrap();
    assert_eq!(page.head.head, 11, "the head outlives expiry");
    assert_eq!(
        page.head.low, 11,
        "old versions are gone, the new one is kept"
    );
    assert_eq!(
        page.messages.iter().map(|x| x.version).collect::<Vec<_>>(),
        vec![11]
    );
    let again = m.append(vec![msg(&a, "old0")]).await.unwrap();
    assert_eq!(
        (again[0].message.version, again[0].duplicate),
        (12, false),
        "an expired id is new again"
    );
}
