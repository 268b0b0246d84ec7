//! The Kafka queue against a real broker (`scripts/stack up`): dead-lettering, offsets committed
//! only after the effect is durable, `wait` answers, and two consumers racing in one group.
//! Each test uses its own topics and group, so tests run in parallel against one broker.

use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use signalpost::address::{Address, ClientId, MessageId};
use signalpost::ingest::kafka::{KafkaQueue, KafkaSettings, Topics};
use signalpost::ingest::parse::Limits;
use signalpost::ingest::{Command, Outcome, Processor, Queue};
use signalpost::mailbox::embedded::EmbeddedMailbox;
use signalpost::mailbox::{Mailbox, NewMessage};
use signalpost::metrics::Metrics;
use signalpost::routing::Router;
use signalpost::topology::embedded::EmbeddedTopology;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

fn brokers() -> String {
    std::env::var("SIGNALPOST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Fresh topics (4 partitions each) under a unique prefix.
async fn topics() -> Topics {
    let t = Topics::with_prefix(&format!("it-{}.", uuid::Uuid::new_v4().simple()));
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let names = [&t.enqueue, &t.connect, &t.disconnect, &t.deadletter];
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, 4, TopicReplication::Fixed(1)))
        .collect();
    for r in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .expect("create topics")
    {
        r.expect("topic created");
    }
    t
}

struct Store {
    _dir: tempfile::TempDir,
    mailbox: Arc<dyn Mailbox>,
    processor: Arc<Processor>,
}

fn store() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let mailbox: Arc<dyn Mailbox> =
        Arc::new(EmbeddedMailbox::open(&dir.path().join("m.redb"), 3_600_000).unwrap());
    let topology = Arc::new(EmbeddedTopology::open(&dir.path().join("t.redb")).unwrap());
    let processor = Arc::new(Processor {
        mailbox: mailbox.clone(),
        topology,
        router: Arc::new(Router::default()),
        metrics: Metrics::install(),
    });
    Store {
        _dir: dir,
        mailbox,
        processor,
    }
}

fn settings(topics: &Topics, group: &str) -> KafkaSettings {
    KafkaSettings {
        brokers: brokers(),
        topics: topics.clone(),
        group: group.into(),
        limits: Limits {
            max_payload: 64,
            max_batch: 100,
        },
        batch: 500,
        partitions: 4,
        stop_before_commit: false,
    }
}

async fn produce(topic: &str, records: &[(String, String)]) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    for (k, v) in records {
        p.send(
            FutureRecord::to(topic).key(k).payload(v),
            Duration::from_secs(5),
        )
        .await
        .expect("produced");
    }
}

/// Waits until `f` holds, polling.
async fn until<F: AsyncFn() -> bool>(what: &str, f: F) {
    for _ in 0..600 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Every version 1..=head of `address`, with ids; asserts no gap and no id twice.
async fn versions(m: &dyn Mailbox, address: &Address) -> Vec<String> {
    let page = m.read(address, 0, 100_000).await.unwrap();
    let vs: Vec<u64> = page.messages.iter().map(|x| x.version).collect();
    assert_eq!(
        vs,
        (1..=page.head.head).collect::<Vec<_>>(),
        "{address} is gap-free"
    );
    let ids: Vec<String> = page.messages.iter().map(|x| x.id.to_string()).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "no id twice in {address}"
    );
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: scripts/stack up, then cargo test -- --include-ignored"]
async fn malformed_records_are_dead_lettered_and_the_rest_applied() {
    let t = topics().await;
    let s = store();
    let q = KafkaQueue::start(settings(&t, "dl"), s.processor.clone()).unwrap();
    let good = r#"{"address":"channel:dl","payload":{"ok":1},"id":"good-1"}"#;
    let big = format!(
        r#"{{"address":"channel:dl","payload":"{}"}}"#,
        "x".repeat(100)
    );
    produce(
        &t.enqueue,
        &[
            ("channel:dl".into(), "not json".into()),
            (
                "channel:dl".into(),
                r#"{"address":"room:x","payload":1}"#.into(),
            ),
            ("channel:dl".into(), big),
            ("channel:dl".into(), good.into()),
            (
                "channel:dl".into(),
                r#"{"address":"channel:dl","payload":2}"#.into(),
            ),
        ],
    )
    .await;
    produce(
        &t.connect,
        &[(
            "c1".into(),
            r#"{"client":"c1","addresses":"channel:dl"}"#.into(),
        )],
    )
    .await;
    let a = Address::parse("channel:dl").unwrap();
    until("two appends", async || {
        s.mailbox.heads(std::slice::from_ref(&a)).await.unwrap()[0].head == 2
    })
    .await;
    let ids = versions(&*s.mailbox, &a).await;
    assert_eq!(ids[0], "good-1");
    assert!(
        ids[1].starts_with(&format!("kafka-{}-", t.enqueue)),
        "a record without id gets a deterministic one: {}",
        ids[1]
    );

    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[&t.deadletter]).unwrap();
    let mut reasons = Vec::new();
    while reasons.len() < 4 {
        let m = tokio::time::timeout(Duration::from_secs(20), c.recv())
            .await
            .expect("a dead letter")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert!(
            v["offset"].is_i64() && v["topic"].is_string() && v["value"].is_string(),
            "{v}"
        );
        reasons.push(v["reason"].as_str().unwrap().to_string());
    }
    reasons.sort();
    let joined = reasons.join(" | ");
    for want in [
        "invalid JSON",
        "invalid address \"room:x\"",
        "over the limit of 64",
        "addresses must be an array",
    ] {
        assert!(joined.contains(want), "{want} in {joined}");
    }
    q.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: scripts/stack up, then cargo test -- --include-ignored"]
async fn publish_answers_queued_or_applied() {
    let t = topics().await;
    let s = store();
    let q = KafkaQueue::start(settings(&t, "pub"), s.processor.clone()).unwrap();
    let a = Address::parse("channel:pub").unwrap();
    let msg = |id: &str| {
        Command::Enqueue(NewMessage {
            address: a.clone(),
            id: MessageId::parse(id).unwrap(),
            payload: serde_json::value::RawValue::from_string("1".into()).unwrap(),
            new_id: false,
        })
    };
    let r = q.publish(vec![msg("p1")], false).await.unwrap();
    assert!(matches!(r[0], Ok(Outcome::Queued)));
    let r = q.publish(vec![msg("p2"), msg("p1")], true).await.unwrap();
    match (&r[0], &r[1]) {
        (Ok(Outcome::Appended(x)), Ok(Outcome::Appended(y))) => {
            // The repeat answers the original version (whichever of its two records was applied
            // while it waited).
            assert_eq!(
                (x.message.version, y.message.version),
                (2, 1),
                "p1 keeps its version"
            );
        }
        other => panic!("{other:?}"),
    }
    let bind = Command::Bind {
        client: ClientId::parse("pc").unwrap(),
        addresses: vec![a.clone()],
    };
    match &q.publish(vec![bind], true).await.unwrap()[0] {
        Ok(Outcome::Bound { bindings, added }) => assert_eq!((bindings[0].1, *added), (2, 1)),
        other => panic!("{other:?}"),
    }
    q.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: scripts/stack up, then cargo test -- --include-ignored"]
async fn a_crash_between_append_and_commit_leaves_no_duplicate_and_no_hole() {
    let t = topics().await;
    let s = store();
    let a = Address::parse("channel:crash").unwrap();
    let records: Vec<(String, String)> = (0..300)
        .map(|i| {
            (
                a.to_string(),
                format!(r#"{{"address":"{a}","payload":{i},"id":"c-{i}"}}"#),
            )
        })
        .collect();
    produce(&t.enqueue, &records).await;
    // The first consumer applies a batch, then "crashes" before committing.
    let mut first = settings(&t, "crash");
    first.stop_before_commit = true;
    let q1 = KafkaQueue::start(first, s.processor.clone()).unwrap();
    until("the first batch", async || {
        s.mailbox.heads(std::slice::from_ref(&a)).await.unwrap()[0].head > 0
    })
    .await;
    q1.drain().await;
    drop(q1);
    let applied = s.mailbox.heads(std::slice::from_ref(&a)).await.unwrap()[0].head;
    // A new consumer in the same group reads from the last commit (none): everything again.
    let q2 = KafkaQueue::start(settings(&t, "crash"), s.processor.clone()).unwrap();
    until("all 300", async || {
        s.mailbox.heads(std::slice::from_ref(&a)).await.unwrap()[0].head >= 300
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids = versions(&*s.mailbox, &a).await;
    assert_eq!(
        ids.len(),
        300,
        "the {applied} applied before the crash were not appended twice"
    );
    assert_eq!(
        ids,
        (0..300).map(|i| format!("c-{i}")).collect::<Vec<_>>(),
        "in partition order"
    );
    q2.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: scripts/stack up, then cargo test -- --include-ignored"]
async fn two_consumers_racing_in_one_group_never_duplicate_a_version() {
    let t = topics().await;
    let s = store();
    let q1 = KafkaQueue::start(settings(&t, "race"), s.processor.clone()).unwrap();
    let addrs: Vec<Address> = (0..10)
        .map(|i| Address::parse(&format!("channel:race-{i}")).unwrap())
        .collect();
    let mut records = Vec::new();
    for i in 0..2000 {
        let a = &addrs[i % addrs.len()];
        records.push((
            a.to_string(),
            format!(r#"{{"address":"{a}","payload":{i},"id":"r-{i}"}}"#),
        ));
    }
    let (head, tail) = records.split_at(1000);
    produce(&t.enqueue, head).await;
    // A second consumer joins mid-stream: the group rebalances while records are applied.
    let q2 = KafkaQueue::start(settings(&t, "race"), s.processor.clone()).unwrap();
    produce(&t.enqueue, tail).await;
    until("all 2000", async || {
        let h = s.mailbox.heads(&addrs).await.unwrap();
        h.iter().map(|x| x.head).sum::<u64>() >= 2000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut total = 0;
    for (n, a) in addrs.iter().enumerate() {
        let ids = versions(&*s.mailbox, a).await;
        let want: Vec<String> = (0..2000)
            .filter(|i| i % addrs.len() == n)
            .map(|i| format!("r-{i}"))
            .collect();
        assert_eq!(ids, want, "{a}: every record once, in partition order");
        total += ids.len();
    }
    assert_eq!(total, 2000);
    q1.drain().await;
    q2.drain().await;
}
