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
use signalpost::ingest::kafka::{KafkaQueue, KafkaSettings, ShardClaims, Topics};
use signalpost::ingest::parse::Limits;
use signalpost::ingest::{Command, Outcome, Queue};
use signalpost::mailbox::{Mailbox, NewMessage};
use signalpost::tasks::Tasks;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

fn brokers() -> String {
    std::env::var("SIGNALPOST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Partitions of the test topics: the shard count of the Cassandra test keyspace.
const PARTITIONS: i32 = crate::cassandra_support::SHARDS as i32;

/// Fresh topics under a unique prefix.
async fn topics() -> Topics {
    let t = Topics::with_prefix(&format!("it-{}.", uuid::Uuid::new_v4().simple()));
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let names = [&t.enqueue, &t.connect, &t.disconnect, &t.deadletter];
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, PARTITIONS, TopicReplication::Fixed(1)))
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

use crate::queue::{Store, store as store_with};

fn store() -> Store {
    store_with(1000)
}

/// The `Queue` suite on Kafka: fresh topics and group per backend; a second `start` is a
/// restarted node (same group: it resumes from the committed offsets).
struct Kafka {
    store: Store,
    topics: Topics,
    group: String,
}

#[async_trait::async_trait]
impl crate::contract::queue::Backend for Kafka {
    async fn start(&self) -> Arc<dyn Queue> {
        Arc::new(
            KafkaQueue::start(
                settings(&self.topics, &self.group),
                self.store.processor.clone(),
                &self.store.tasks,
            )
            .unwrap(),
        )
    }
    fn mailbox(&self) -> Arc<dyn Mailbox> {
        self.store.mailbox.clone()
    }
}

async fn backend() -> Box<dyn crate::contract::queue::Backend> {
    Box::new(Kafka {
        store: store(),
        topics: topics().await,
        group: format!("suite-{}", uuid::Uuid::new_v4().simple()),
    })
}

mod suite {
    queue_suite!(
        #[ignore = "needs Kafka: scripts/stack up, then cargo test -- --include-ignored"]
        backend = super::backend
    );
}

/// A node's stores on the cluster backend's mailbox (one Cassandra mailbox per call, as one
/// node has it; all of one test share the fence scope), with an embedded topology.
async fn cluster_store(scope: &str) -> ClusterStore {
    let dir = tempfile::tempdir().unwrap();
    let cassandra = Arc::new(crate::cassandra_support::mailbox_in(scope, 3_600_000).await);
    ClusterStore {
        store: crate::queue::store_on(dir, cassandra.clone(), 1000),
        claims: cassandra,
    }
}

/// A store on the Cassandra mailbox, whose fences the consumer claims (as a cluster node's).
struct ClusterStore {
    store: Store,
    claims: Arc<dyn ShardClaims>,
}

impl std::ops::Deref for ClusterStore {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

impl ClusterStore {
    /// Consumer settings that claim this store's shards.
    fn settings(&self, topics: &Topics, group: &str) -> KafkaSettings {
        KafkaSettings {
            claims: Some(self.claims.clone()),
            ..settings(topics, group)
        }
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
        partitions: PARTITIONS as u32,
        node: format!("it-{group}-{}", uuid::Uuid::new_v4().simple()),
        member: None,
        claims: None,
        never_commit: false,
        owned: Default::default(),
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
    let s = store_with(2);
    let q = KafkaQueue::start(settings(&t, "dl"), s.processor.clone(), &Tasks::default()).unwrap();
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
            (
                "channel:dl".into(),
                r#"{"address":"channel:dl","payload":"\ud800"}"#.into(),
            ),
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
        &[
            (
                "c1".into(),
                r#"{"client":"c1","addresses":"channel:dl"}"#.into(),
            ),
            // Valid, but past the client's binding limit (2): refused when applied.
            (
                "c2".into(),
                r#"{"client":"c2","addresses":["channel:a","channel:b","channel:c"]}"#.into(),
            ),
        ],
    )
    .await;
    let a = Address::parse("channel:dl").unwrap();
    // A record put on a partition its address does not belong to.
    let wrong = (a.partition(PARTITIONS as u32) as i32 + 1) % PARTITIONS;
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    p.send(
        FutureRecord::to(&t.enqueue)
            .key("channel:dl")
            .partition(wrong)
            .payload(r#"{"address":"channel:dl","payload":3}"#),
        Duration::from_secs(5),
    )
    .await
    .expect("produced");
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
    while reasons.len() < 7 {
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
        "lone surrogate",
        "would pass the limit of 2",
        &format!("came through partition {wrong}"),
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
    let q = KafkaQueue::start(settings(&t, "pub"), s.processor.clone(), &Tasks::default()).unwrap();
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
        rewind: None,
        weight: None,
    };
    match &q.publish(vec![bind], true).await.unwrap()[0] {
        Ok(Outcome::Bound { bindings, added }) => assert_eq!((bindings[0].1, *added), (2, 1)),
        other => panic!("{other:?}"),
    }
    q.drain().await;
}

/// The payloads of `address` in version order (asserting gap-free, no id twice).
async fn payloads(m: &dyn Mailbox, address: &Address) -> Vec<i64> {
    versions(m, address).await;
    let page = m.read(address, 0, 100_000).await.unwrap();
    page.messages
        .iter()
        .map(|x| x.payload().get().parse().unwrap())
        .collect()
}

/// On Cassandra, with ids minted per record (the vouched path): a consumer applies records
/// that arrived after it claimed its shards, and dies before every commit; a second consumer
/// (another node) gets them all again and appends none twice, leaves no hole, keeps the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka and Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
async fn a_crash_between_append_and_commit_leaves_no_duplicate_and_no_hole() {
    let t = topics().await;
    let scope = format!("crash-{}", uuid::Uuid::new_v4().simple());
    let (s1, s2) = (cluster_store(&scope).await, cluster_store(&scope).await);
    let stamp = uuid::Uuid::new_v4().simple().to_string();
    let warm = Address::parse(&format!("channel:warm-{stamp}")).unwrap();
    let a = Address::parse(&format!("channel:crash-{stamp}")).unwrap();
    let mut first = s1.settings(&t, "crash");
    first.never_commit = true;
    let q1 = KafkaQueue::start(first, s1.processor.clone(), &Tasks::default()).unwrap();
    // Once a record is applied, the consumer has its partitions and has claimed their shards.
    produce(
        &t.enqueue,
        &[(
            warm.to_string(),
            format!(r#"{{"address":"{warm}","payload":0}}"#),
        )],
    )
    .await;
    until("the warm-up record", async || {
        s1.mailbox.heads(std::slice::from_ref(&warm)).await.unwrap()[0].head == 1
    })
    .await;
    let records: Vec<(String, String)> = (0..300)
        .map(|i| {
            (
                a.to_string(),
                format!(r#"{{"address":"{a}","payload":{i}}}"#),
            )
        })
        .collect();
    produce(&t.enqueue, &records).await;
    until("all 300 by the first", async || {
        s1.mailbox.heads(std::slice::from_ref(&a)).await.unwrap()[0].head >= 300
    })
    .await;
    q1.drain().await;
    drop(q1);
    // A new consumer in the same group reads from the last commit (none): everything again.
    let q2 = KafkaQueue::start(
        s2.settings(&t, "crash"),
        s2.processor.clone(),
        &Tasks::default(),
    )
    .unwrap();
    let m = s2.mailbox.clone();
    until("the second consumer's commit", async || {
        committed(&t, "crash").await >= 301
    })
    .await;
    assert_eq!(
        payloads(&*m, &a).await,
        (0..300).collect::<Vec<_>>(),
        "each record once, in partition order"
    );
    assert_eq!(payloads(&*m, &warm).await, [0]);
    q2.drain().await;
}

/// Offsets committed by `group` over all partitions of the enqueue topic.
async fn committed(t: &Topics, group: &str) -> i64 {
    let (topic, group) = (t.enqueue.clone(), group.to_string());
    tokio::task::spawn_blocking(move || {
        let c: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", &group)
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition(&topic, p);
        }
        c.committed_offsets(tpl, Duration::from_secs(5))
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .filter_map(|e| e.offset().to_raw())
                    .filter(|o| *o > 0)
                    .sum()
            })
            .unwrap_or(0)
    })
    .await
    .unwrap()
}

/// On Cassandra, two consumers (two nodes, each its own mailbox) in one group, the second
/// joining mid-stream so that partitions move while records are applied, half the records with
/// sender ids and half with minted ones: every record appended once, in partition order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka and Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
async fn two_consumers_racing_in_one_group_never_duplicate_a_version() {
    let t = topics().await;
    let scope = format!("race-{}", uuid::Uuid::new_v4().simple());
    let (s1, s2) = (cluster_store(&scope).await, cluster_store(&scope).await);
    let q1 = KafkaQueue::start(
        s1.settings(&t, "race"),
        s1.processor.clone(),
        &Tasks::default(),
    )
    .unwrap();
    let stamp = uuid::Uuid::new_v4().simple().to_string();
    let addrs: Vec<Address> = (0..10)
        .map(|i| Address::parse(&format!("channel:race-{i}-{stamp}")).unwrap())
        .collect();
    let mut records = Vec::new();
    for i in 0..2000 {
        let a = &addrs[i % addrs.len()];
        let id = if i % 2 == 0 {
            format!(r#","id":"r-{i}""#)
        } else {
            String::new()
        };
        records.push((
            a.to_string(),
            format!(r#"{{"address":"{a}","payload":{i}{id}}}"#),
        ));
    }
    let (head, tail) = records.split_at(1000);
    produce(&t.enqueue, head).await;
    // A second consumer joins mid-stream: the group rebalances while records are applied.
    let q2 = KafkaQueue::start(
        s2.settings(&t, "race"),
        s2.processor.clone(),
        &Tasks::default(),
    )
    .unwrap();
    produce(&t.enqueue, tail).await;
    let reader = cluster_store(&scope).await;
    until("all 2000 committed", async || {
        committed(&t, "race").await >= 2000
    })
    .await;
    let mut total = 0;
    for (n, a) in addrs.iter().enumerate() {
        let got = payloads(&*reader.mailbox, a).await;
        let want: Vec<i64> = (0..2000)
            .filter(|i| i % addrs.len() == n)
            .map(|i| i as i64)
            .collect();
        assert_eq!(got, want, "{a}: every record once, in partition order");
        total += got.len();
    }
    assert_eq!(total, 2000);
    q1.drain().await;
    q2.drain().await;
}

/// Issue 13, finding 2: a member joining the group moves only the partitions that must move. The
/// partitions the first member keeps are never taken from it, not even for the moment of the
/// rebalance; the eager protocol (Kafka's default assignors) revoked every partition of every
/// member at each join or leave, which stopped all ingest until the group agreed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: scripts/stack up, then cargo test -- --include-ignored"]
async fn a_member_joining_takes_only_the_partitions_that_move() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let t = topics().await;
    let group = format!("join-{}", uuid::Uuid::new_v4().simple());
    let (s1, s2) = (store(), store());
    let owned = |q: &KafkaQueue| q.partitions().expect("kafka reports partitions").owned;
    let q1 =
        Arc::new(KafkaQueue::start(settings(&t, &group), s1.processor.clone(), &s1.tasks).unwrap());
    until("the first member owns every partition", async || {
        owned(&q1).len() == PARTITIONS as usize
    })
    .await;
    // Watch the first member's partitions, every millisecond, while the second joins.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (q1, stop) = (q1.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                seen.push(owned(&q1));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            seen
        })
    };
    let q2 = KafkaQueue::start(settings(&t, &group), s2.processor.clone(), &s2.tasks).unwrap();
    until("both members own partitions", async || {
        let (a, b) = (owned(&q1), owned(&q2));
        !a.is_empty() && !b.is_empty() && a.len() + b.len() == PARTITIONS as usize
    })
    .await;
    // Cooperative rebalancing takes a second round; let any late move show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = watcher.await.unwrap();
    let kept = owned(&q1);
    assert!(!kept.is_empty() && owned(&q2).len() + kept.len() == PARTITIONS as usize);
    assert!(seen.len() > 100, "watched {} times", seen.len());
    for (i, s) in seen.iter().enumerate() {
        for p in &kept {
            assert!(
                s.contains(p),
                "partition {p}, which the first member kept, was taken from it during the \
                 rebalance (sample {i} of {}: it owned {s:?})",
                seen.len()
            );
        }
    }
    q1.drain().await;
    q2.drain().await;
}
