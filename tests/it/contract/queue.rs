//! The contract suite every `Queue` backend must pass: a waiting publish answers the applied
//! outcome, a queued one is applied later in order per address, a duplicate id is applied once,
//! a drained queue refuses new work, and nothing answered is lost when the consumer is replaced
//! (a node restarts: the new consumer applies whatever the old one had not).

use serde_json::value::RawValue;
use signalpost::address::{Address, ClientId, MessageId};
use signalpost::ingest::{Command, IngestError, Outcome, Queue};
use signalpost::mailbox::{Mailbox, NewMessage};
use std::sync::Arc;
use std::time::Duration;

/// A queue backend on one store: `start` starts a queue (and its consumer) in front of it; a
/// second `start` after the first queue was drained is the same node restarted.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    async fn start(&self) -> Arc<dyn Queue>;
    fn mailbox(&self) -> Arc<dyn Mailbox>;
}

fn fresh(kind: &str, tag: &str) -> Address {
    Address::parse(&format!("{kind}:{tag}-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

fn enqueue(address: &Address, id: &str) -> Command {
    Command::Enqueue(NewMessage {
        address: address.clone(),
        id: MessageId::parse(id).unwrap(),
        payload: RawValue::from_string(format!("{{\"id\":\"{id}\"}}")).unwrap(),
        new_id: false,
    })
}

/// The ids in `address`'s mailbox, in version order, once it holds `n` (polled: queued work is
/// applied later).
async fn ids_when(m: &dyn Mailbox, address: &Address, n: u64) -> Vec<String> {
    for _ in 0..600 {
        let page = m.read(address, 0, 10_000).await.unwrap();
        if page.head.head >= n {
            let versions: Vec<u64> = page.messages.iter().map(|x| x.version).collect();
            assert_eq!(
                versions,
                (1..=page.head.head).collect::<Vec<_>>(),
                "gap-free"
            );
            return page.messages.iter().map(|x| x.id.to_string()).collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{address} never held {n} messages");
}

/// With `wait`, the answer is the applied outcome: versions for appends, bindings for binds.
pub async fn wait_answers_the_applied_outcome(b: &dyn Backend) {
    let q = b.start().await;
    let a = fresh("channel", "wait");
    let out = q
        .publish(
            (0..5).map(|i| enqueue(&a, &format!("w{i}"))).collect(),
            true,
        )
        .await
        .unwrap();
    let versions: Vec<u64> = out
        .iter()
        .map(|r| match r {
            Ok(Outcome::Appended(x)) => x.message.version,
            other => panic!("a waiting enqueue answered {other:?}"),
        })
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
    let client = ClientId::parse(&format!("qc-{}", uuid::Uuid::new_v4().simple())).unwrap();
    let out = q
        .publish(
            vec![Command::Bind {
                client,
                addresses: vec![a.clone()],
                rewind: None,
                weight: None,
            }],
            true,
        )
        .await
        .unwrap();
    match &out[0] {
        Ok(Outcome::Bound { bindings, added }) => {
            assert_eq!(
                (*added, bindings.clone()),
                (1, vec![(a, 5)]),
                "bound at the head"
            );
        }
        other => panic!("a waiting bind answered {other:?}"),
    }
    q.drain().await;
}

/// Without `wait`, the answer comes once the operation is durably queued (or already applied);
/// operations to one address are applied in the order they were published.
pub async fn queued_operations_apply_in_order_per_address(b: &dyn Backend) {
    let q = b.start().await;
    let (x, y) = (fresh("channel", "ox"), fresh("channel", "oy"));
    let mut want_x = Vec::new();
    let mut want_y = Vec::new();
    for round in 0..3 {
        let mut batch = Vec::new();
        for i in 0..10 {
            let (ix, iy) = (format!("x{round}-{i}"), format!("y{round}-{i}"));
            batch.push(enqueue(&x, &ix));
            batch.push(enqueue(&y, &iy));
            want_x.push(ix);
            want_y.push(iy);
        }
        for r in q.publish(batch, false).await.unwrap() {
            assert!(
                matches!(r, Ok(Outcome::Queued) | Ok(Outcome::Appended(_))),
                "a queued enqueue answered {r:?}"
            );
        }
    }
    let m = b.mailbox();
    assert_eq!(ids_when(&*m, &x, 30).await, want_x);
    assert_eq!(ids_when(&*m, &y, 30).await, want_y);
    q.drain().await;
}

/// The same id to the same address, published twice, is applied once; the second answer names
/// the first append.
pub async fn a_duplicate_id_is_applied_once(b: &dyn Backend) {
    let q = b.start().await;
    let a = fresh("channel", "dup");
    let first = q.publish(vec![enqueue(&a, "d1")], true).await.unwrap();
    let again = q.publish(vec![enqueue(&a, "d1")], true).await.unwrap();
    match (&first[0], &again[0]) {
        (Ok(Outcome::Appended(f)), Ok(Outcome::Appended(s))) => {
            assert!(!f.duplicate && s.duplicate, "the second is the duplicate");
            assert_eq!(f.message.version, s.message.version);
        }
        other => panic!("answers {other:?}"),
    }
    assert_eq!(ids_when(&*b.mailbox(), &a, 1).await, vec!["d1"]);
    q.drain().await;
}

/// A drained queue refuses new work with `Closed`, and what it took before is applied.
pub async fn drain_finishes_and_then_refuses(b: &dyn Backend) {
    let q = b.start().await;
    let a = fresh("channel", "drain");
    q.publish(
        (0..20).map(|i| enqueue(&a, &format!("q{i}"))).collect(),
        false,
    )
    .await
    .unwrap();
    q.drain().await;
    match q.publish(vec![enqueue(&a, "late")], true).await {
        Err(IngestError::Closed) => {}
        other => panic!("a drained queue answered {other:?}"),
    }
    // A restarted node applies whatever the drained one had queued but not applied.
    let again = b.start().await;
    assert_eq!(ids_when(&*b.mailbox(), &a, 20).await.len(), 20);
    again.drain().await;
}
