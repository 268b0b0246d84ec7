//! The Kafka queue: HTTP operations are produced to `signals.enqueue` / `signals.connect` /
//! `signals.disconnect` (key = address or client, so one address always lands in one partition
//! and keeps its order), and a consumer group applies them.
//!
//! The consumer takes what is waiting, up to the batch size, validates each record with the same
//! code as HTTP ([`super::parse`]) — a malformed record goes to `signals.deadletter` with the reason
//! — applies the batch through the [`Processor`], and stores the offsets only after the effect is
//! durable (librdkafka commits what is stored every `COMMIT_EVERY_MS`). On the cluster mailbox
//! up to `IN_FLIGHT` batches are under way at once, finished in order. If applying fails (the
//! store is down) the batches behind it fail too, and it applies them again in order with
//! backoff, reading nothing more meanwhile (backpressure: the records wait in Kafka, not in
//! memory). A record applied but not committed (a crash in between) is applied again after a
//! restart or rebalance; that is harmless because appends are idempotent on message id (a
//! record without an id gets the deterministic id `kafka-<topic>-<partition>-<offset>`) and
//! bindings are idempotent.

use super::parse::{self, Invalid, Limits};
use super::{Command, IngestError, Outcome, Processor, Queue};
use crate::address::MessageId;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt as _, StreamExt as _};
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers as _, OwnedMessage};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

mod producer;
use producer::{Producer, Record};

/// The consumer: records the partitions each rebalance assigns, so that the worker releases
/// their mailbox shards (and claims them anew) before it applies records of them.
type Consumer_ = StreamConsumer<Rebalances>;

struct Rebalances {
    /// The enqueue partitions assigned now (shared with the [`KafkaQueue`], which reports them
    /// in `/healthz`).
    assigned: Arc<Mutex<Assignment>>,
    enqueue: String,
    /// The enqueue consumer's: where the owned partitions are published to the node.
    owned: Option<(super::Owned, u32)>,
}

/// What the group gave this consumer.
#[derive(Debug, Default)]
struct Assignment {
    /// Moves at each assignment (0: none yet, the node is not ready).
    generation: u64,
    /// The enqueue partitions owned now.
    owned: Vec<u32>,
    /// Those assigned since the worker last claimed: their shards are claimed before their
    /// records are applied. With cooperative rebalancing a rebalance adds and removes only the
    /// partitions that move; the others keep their claim and go on without a pause.
    to_claim: Vec<u32>,
}

impl rdkafka::ClientContext for Rebalances {}

impl rdkafka::consumer::ConsumerContext for Rebalances {
    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        use rdkafka::consumer::Rebalance;
        let ours = |tpl: &TopicPartitionList| -> Vec<u32> {
            tpl.elements()
                .iter()
                .filter(|e| e.topic() == self.enqueue && e.partition() >= 0)
                .map(|e| e.partition() as u32)
                .collect()
        };
        let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
        // Cooperative (incremental) rebalancing: an Assign carries only the partitions added,
        // a Revoke only those taken away (with the eager protocol a Revoke takes all and the
        // Assign gives all, which this handles the same way).
        match rebalance {
            Rebalance::Assign(tpl) => {
                let added = ours(tpl);
                assigned.generation += 1;
                for p in &added {
                    if !assigned.owned.contains(p) {
                        assigned.owned.push(*p);
                    }
                    if !assigned.to_claim.contains(p) {
                        assigned.to_claim.push(*p);
                    }
                }
                assigned.owned.sort_unstable();
                tracing::info!(added = ?added, owned = ?assigned.owned, "kafka assigned enqueue partitions");
            }
            Rebalance::Revoke(tpl) => {
                let revoked = ours(tpl);
                assigned.owned.retain(|p| !revoked.contains(p));
                assigned.to_claim.retain(|p| !revoked.contains(p));
                if !revoked.is_empty() {
                    tracing::info!(revoked = ?revoked, owned = ?assigned.owned, "kafka revoked enqueue partitions");
                }
            }
            Rebalance::Error(_) => {}
        }
        if let Some((owned, count)) = &self.owned {
            owned.set(*count, &assigned.owned);
        }
    }
}

/// Which of a node's two consumers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// The enqueue topic, in the group `group`.
    Enqueue,
    /// The connect and disconnect topics, in the group `<group>.bindings`. A group of their
    /// own: the cooperative-sticky assignor balances the count of partitions per member over
    /// all the topics of a group, which in one group let one node keep every enqueue partition.
    Bindings,
}

/// A consumer of one feed, in its group.
fn subscribe(
    settings: &KafkaSettings,
    assigned: Arc<Mutex<Assignment>>,
    feed: Feed,
) -> Result<Consumer_, IngestError> {
    let t = &settings.topics;
    let (group, topics) = match feed {
        Feed::Enqueue => (settings.group.clone(), vec![t.enqueue.as_str()]),
        Feed::Bindings => (
            format!("{}.bindings", settings.group),
            vec![t.connect.as_str(), t.disconnect.as_str()],
        ),
    };
    let consumer: Consumer_ = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        // Small requests go out at once (Nagle's algorithm would hold one behind an unacked one).
        .set("socket.nagle.disable", "true")
        .set("group.id", &group)
        // Offsets are stored after a batch is applied ([`Worker::store_offsets`]) and
        // committed by librdkafka in the background: one commit per interval, not per batch.
        .set(
            "enable.auto.commit",
            if settings.never_commit {
                "false"
            } else {
                "true"
            },
        )
        .set("auto.commit.interval.ms", COMMIT_EVERY_MS.to_string())
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // KIP-429: a member joining or leaving moves only the partitions that must move; the
        // others are neither revoked nor paused (the eager default stops every consumer).
        .set("partition.assignment.strategy", "cooperative-sticky")
        // A dead consumer's partitions move after 6 s (the broker's minimum by default).
        .set("session.timeout.ms", "6000")
        // Members learn of a rebalance at their next heartbeat: a short one keeps a join or a
        // leave from pausing the partitions that move for long.
        .set("heartbeat.interval.ms", "500")
        .set("queued.max.messages.kbytes", "16384")
        .create_with_context(Rebalances {
            assigned,
            enqueue: settings.topics.enqueue.clone(),
            owned: (feed == Feed::Enqueue).then(|| (settings.owned.clone(), settings.partitions)),
        })
        .map_err(kerr)?;
    consumer.subscribe(&topics).map_err(kerr)?;
    Ok(consumer)
}

/// How often applied offsets are committed. A node that dies applies again, after its
/// partitions move, at most this much more than it had committed (appends are idempotent). A
/// commit per batch cost Kafka an offset write per batch: ~300/s at 1 000 msg/s.
const COMMIT_EVERY_MS: u64 = 100;

/// Header of an enqueue record whose id the HTTP API minted (the sender gave none).
const MINTED_HEADER: &str = "signalpost-minted";
/// Header naming the node that waits for the operation's outcome (`?wait=true`).
const ORIGIN_HEADER: &str = "signalpost-origin";

/// How long a publisher waits for Kafka to take a record, and for `wait` answers.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(5);
const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The topic names.
#[derive(Debug, Clone)]
pub struct Topics {
    pub enqueue: String,
    pub connect: String,
    pub disconnect: String,
    pub deadletter: String,
}

impl Topics {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            enqueue: format!("{prefix}enqueue"),
            connect: format!("{prefix}connect"),
            disconnect: format!("{prefix}disconnect"),
            deadletter: format!("{prefix}deadletter"),
        }
    }
}

/// Publishers waiting for their operation to be applied, by ticket.
#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<String, Vec<oneshot::Sender<Outcome>>>>,
}

impl Waiters {
    fn register(&self, ticket: String) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ticket)
            .or_default()
            .push(tx);
        rx
    }

    fn resolve(&self, ticket: &str, outcome: &Outcome) {
        let waiting = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(ticket);
        for tx in waiting.into_iter().flatten() {
            let _ = tx.send(outcome.clone());
        }
    }

    fn forget(&self, ticket: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(ticket);
    }
}

/// The node of the publisher waiting for a record, as the record names it (a record produced
/// without `?wait=true` names none).
fn origin_header(m: &OwnedMessage) -> Option<&[u8]> {
    m.headers()?.iter().find(|x| x.key == ORIGIN_HEADER)?.value
}

fn message_ticket(address: &str, id: &str) -> String {
    format!("m\u{0}{address}\u{0}{id}")
}

/// Settings of the Kafka queue.
#[derive(Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topics: Topics,
    pub group: String,
    pub limits: Limits,
    pub batch: usize,
    /// This node's id: the origin of the operations it publishes with `wait`.
    pub node: String,
    /// The node's cluster membership ([`crate::cluster::Membership::membership`]): while it is
    /// false the node is fenced, and the consumer applies nothing (it holds its batch).
    pub member: Option<watch::Receiver<bool>>,
    /// Partitions of the enqueue topic: an enqueue record must come through the partition
    /// Kafka's murmur2 partitioner gives its address ([`crate::address::Address::partition`]).
    pub partitions: u32,
    /// The store's per-shard fences, when it has them (the cluster mailbox).
    pub claims: Option<Arc<dyn ShardClaims>>,
    /// Where the enqueue partitions owned now are published (for the work dispatcher).
    pub owned: super::Owned,
    /// Test hook: apply batches but never commit their offsets (a consumer that dies between
    /// every append and its commit). Always false outside tests.
    pub never_commit: bool,
}

/// A store whose writers are fenced per shard of the enqueue topic (the cluster mailbox): the
/// consumer claims the shards a rebalance gave it before it applies their records, and vouches
/// for the ids it minted for records that came after the claim ([`NewMessage::new_id`]). This is
/// the Kafka consumer's notion, not the storage trait's: a store without fences has none.
///
/// [`NewMessage::new_id`]: crate::mailbox::NewMessage::new_id
#[async_trait::async_trait]
pub trait ShardClaims: Send + Sync + 'static {
    /// Claims `shards` now, anew, fencing any other writer of them; a shard this writer was
    /// fenced from may be appended to again.
    async fn claim(&self, shards: &[u32]) -> Result<(), crate::mailbox::MailboxError>;
}

/// The cluster mailbox's per-shard fences are what the consumer claims.
#[async_trait::async_trait]
impl ShardClaims for crate::mailbox::cassandra::CassandraMailbox {
    async fn claim(&self, shards: &[u32]) -> Result<(), crate::mailbox::MailboxError> {
        crate::mailbox::cassandra::CassandraMailbox::claim(self, shards).await
    }
}

/// The Kafka-backed queue: a producer for publishers, a consumer task applying records.
pub struct KafkaQueue {
    producer: Producer,
    settings: KafkaSettings,
    waiters: Arc<Waiters>,
    stop: watch::Sender<bool>,
    /// Resolves when the consumer task has stopped.
    done: tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    /// The enqueue consumer's assignment (see [`Rebalances`]).
    assigned: Arc<Mutex<Assignment>>,
    /// The bindings consumer's.
    bindings_assigned: Arc<Mutex<Assignment>>,
    /// `signalpost_kafka_produce_seconds`: a publish's produce, until Kafka acknowledged all its
    /// records (one sample per record).
    produce_seconds: metrics::Histogram,
}

fn kerr(e: impl std::fmt::Display) -> IngestError {
    IngestError::Unavailable(format!("kafka: {e}"))
}

/// A topic as one metadata request saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub partitions: usize,
    /// The broker's error for the topic, if any (e.g. its leader is not elected yet).
    pub error: Option<String>,
}

/// The cluster as one metadata request saw it.
#[derive(Debug, Clone, Default)]
pub struct KafkaMetadata {
    /// Ids of the brokers listed (a KRaft broker is listed once the controller has it unfenced).
    pub brokers: Vec<i32>,
    pub topics: BTreeMap<String, TopicInfo>,
}

/// What creating one topic came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicCreated {
    Created,
    /// It existed already (left as it is).
    Existed,
}

/// Kafka's internal topics (`org.apache.kafka.common.internals.Topic`): not the user's.
pub const INTERNAL_TOPICS: &[&str] = &["__consumer_offsets", "__transaction_state"];

/// A Kafka admin connection: creates topics and reads metadata — what a node does at startup
/// ([`KafkaQueue::ensure_topics`]) and what `signalpost stack` does by hand.
pub struct KafkaAdmin {
    admin: Arc<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>>,
}

impl KafkaAdmin {
    /// An admin client for `brokers` (`host:port,…`); it connects on its first request.
    pub fn connect(brokers: &str) -> Result<Self, IngestError> {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .map_err(kerr)?;
        Ok(Self {
            admin: Arc::new(admin),
        })
    }

    /// Creates `topics` (name, partitions; replication factor 1), each answered on its own: a
    /// topic that exists already is [`TopicCreated::Existed`], any other refusal an `Err` with
    /// Kafka's reason. With `validate_only` the controller checks the request and creates
    /// nothing (which proves that a controller answers).
    pub async fn create_topics(
        &self,
        topics: &[(&str, i32)],
        validate_only: bool,
    ) -> Result<Vec<(String, Result<TopicCreated, String>)>, IngestError> {
        use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
        use rdkafka::types::RDKafkaErrorCode;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
            .collect();
        let opts = AdminOptions::new()
            .request_timeout(Some(Duration::from_secs(10)))
            .validate_only(validate_only);
        let results = self.admin.create_topics(&new, &opts).await.map_err(kerr)?;
        Ok(results
            .into_iter()
            .map(|r| match r {
                Ok(name) => (name, Ok(TopicCreated::Created)),
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    (name, Ok(TopicCreated::Existed))
                }
                Err((name, e)) => (name, Err(e.to_string())),
            })
            .collect())
    }

    /// One metadata request: every topic, or only `topic`.
    pub async fn metadata(
        &self,
        topic: Option<&str>,
        timeout: Duration,
    ) -> Result<KafkaMetadata, IngestError> {
        let (admin, topic) = (self.admin.clone(), topic.map(str::to_owned));
        tokio::task::spawn_blocking(move || {
            let md = admin
                .inner()
                .fetch_metadata(topic.as_deref(), timeout)
                .map_err(kerr)?;
            Ok(KafkaMetadata {
                brokers: md.brokers().iter().map(|b| b.id()).collect(),
                topics: md
                    .topics()
                    .iter()
                    .map(|t| {
                        let info = TopicInfo {
                            partitions: t.partitions().len(),
                            error: t
                                .error()
                                .map(|e| rdkafka::types::RDKafkaErrorCode::from(e).to_string()),
                        };
                        (t.name().to_owned(), info)
                    })
                    .collect(),
            })
        })
        .await
        .map_err(kerr)?
    }
}

impl KafkaQueue {
    /// Creates the topics that do not exist yet (`partitions` each for the three operation
    /// topics, one for dead letters); existing topics are left as they are. Returns the
    /// partition count of the enqueue topic as it really is (the mailbox's shard count).
    pub async fn ensure_topics(
        brokers: &str,
        topics: &Topics,
        partitions: i32,
    ) -> Result<u32, IngestError> {
        let admin = KafkaAdmin::connect(brokers)?;
        let wanted = [
            (topics.enqueue.as_str(), partitions),
            (topics.connect.as_str(), partitions),
            (topics.disconnect.as_str(), partitions),
            (topics.deadletter.as_str(), 1),
        ];
        for (t, r) in admin.create_topics(&wanted, false).await? {
            if let Err(e) = r {
                return Err(kerr(format!("creating topic {t}: {e}")));
            }
        }
        let topic = &topics.enqueue;
        // A topic just created may take a moment to show its partitions.
        for _ in 0..40 {
            let md = admin.metadata(Some(topic), Duration::from_secs(10)).await?;
            if let Some(t) = md.topics.get(topic)
                && t.partitions > 0
                && t.error.is_none()
            {
                return Ok(t.partitions as u32);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(kerr(format!("topic {topic} shows no partitions")))
    }

    /// Connects the producer and starts the consumer task.
    pub fn start(
        settings: KafkaSettings,
        processor: Arc<Processor>,
        tasks: &crate::tasks::Tasks,
    ) -> Result<Self, IngestError> {
        let producer = Producer::new(
            ClientConfig::new()
                .set("bootstrap.servers", &settings.brokers)
                .set("socket.nagle.disable", "true")
                .set("acks", "all")
                .set("enable.idempotence", "true")
                // No linger: a record goes out at once, and records batch by themselves while
                // produce requests are in flight (at 1 000 msg/s: produce 2.3 -> 1.2 ms mean, for
                // ~10 % more broker CPU).
                .set("linger.ms", "0")
                // The Java client's partitioner: an address lands where the mailbox expects it.
                .set("partitioner", "murmur2_random")
                .set("message.timeout.ms", "10000"),
        )
        .map_err(kerr)?;
        let assigned = Arc::new(Mutex::new(Assignment::default()));
        let consumer = subscribe(&settings, assigned.clone(), Feed::Enqueue)?;
        let bindings_assigned = Arc::new(Mutex::new(Assignment::default()));
        let bindings = subscribe(&settings, bindings_assigned.clone(), Feed::Bindings)?;
        let waiters = Arc::new(Waiters::default());
        let (stop, stopped) = watch::channel(false);
        let worker = Worker {
            consumer,
            bindings,
            producer: producer.clone(),
            settings: settings.clone(),
            processor,
            run: Default::default(),
            waiters: waiters.clone(),
            never_commit: settings.never_commit,
            fresh_from: HashMap::new(),
            wait_seconds: metrics::histogram!("signalpost_kafka_wait_seconds"),
        };
        // Stopped by `drain` (which waits for it), not cut short by the node's stop.
        let (done_tx, done) = tokio::sync::oneshot::channel();
        tasks.spawn_to_end(async move {
            worker.run(stopped).await;
            let _ = done_tx.send(());
        });
        Ok(Self {
            producer,
            settings,
            waiters,
            stop,
            done: tokio::sync::Mutex::new(Some(done)),
            assigned,
            bindings_assigned,
            produce_seconds: metrics::histogram!("signalpost_kafka_produce_seconds"),
        })
    }

    /// The headers the consumer reads of one outgoing command, if it needs any.
    fn headers(&self, o: &Outgoing<'_>, wait: bool) -> Option<rdkafka::message::OwnedHeaders> {
        use rdkafka::message::{Header, OwnedHeaders};
        if !o.minted && !wait {
            return None;
        }
        let mut h = OwnedHeaders::new_with_capacity(2);
        if o.minted {
            h = h.insert(Header {
                key: MINTED_HEADER,
                value: Some("1"),
            });
        }
        if wait {
            h = h.insert(Header {
                key: ORIGIN_HEADER,
                value: Some(self.settings.node.as_str()),
            });
        }
        Some(h)
    }

    /// Produces a request's records: hands them all to librdkafka at once, then waits once for
    /// all their deliveries ([`producer`]). A full producer queue waits for room. Answers the
    /// records that failed, by index, in order.
    async fn produce_all(
        &self,
        records: &[Outgoing<'_>],
        values: &[u8],
        wait: bool,
    ) -> Vec<(usize, IngestError)> {
        let start = std::time::Instant::now();
        let mut failed = Vec::new();
        for (c, chunk) in records.chunks(producer::MAX_RECORDS).enumerate() {
            let sent = self
                .producer
                .send_all(
                    chunk.iter().map(|o| Record {
                        topic: o.topic,
                        key: o.key.as_bytes(),
                        value: &values[o.value.clone()],
                        headers: self.headers(o, wait),
                    }),
                    PRODUCE_TIMEOUT,
                )
                .await;
            let first = c * producer::MAX_RECORDS;
            failed.extend(sent.into_iter().map(|(i, e)| (first + i, kerr(e))));
        }
        self.produce_seconds
            .record_many(start.elapsed().as_secs_f64(), records.len());
        failed
    }
}

/// One command as a record to produce.
struct Outgoing<'a> {
    topic: &'a str,
    key: std::borrow::Cow<'a, str>,
    /// The value's bytes in the request's one buffer of values.
    value: std::ops::Range<usize>,
    /// An enqueue whose id the API minted (the consumer may skip the id lookup).
    minted: bool,
}

/// Writes `value` as JSON at the end of `buf`; where it went.
fn append_json(buf: &mut Vec<u8>, value: &impl serde::Serialize) -> std::ops::Range<usize> {
    let from = buf.len();
    serde_json::to_writer(&mut *buf, value).expect("serializable");
    from..buf.len()
}

/// An enqueue record's value, serialized straight from the command.
#[derive(serde::Serialize)]
struct EnqueueRecord<'a> {
    address: &'a crate::address::Address,
    payload: &'a serde_json::value::RawValue,
    id: &'a MessageId,
}

impl crate::routing::Replies for KafkaQueue {
    fn resolve_wire(&self, ticket: &str, outcome: &serde_json::value::RawValue) {
        if let Some(o) = Outcome::from_wire(outcome) {
            self.waiters.resolve(ticket, &o);
        }
    }
}

#[async_trait::async_trait]
impl Queue for KafkaQueue {
    async fn publish(
        &self,
        commands: Vec<Command>,
        wait: bool,
    ) -> Result<Vec<Result<Outcome, IngestError>>, IngestError> {
        if *self.stop.borrow() {
            return Err(IngestError::Closed);
        }
        let t = &self.settings.topics;
        let mut sends = Vec::with_capacity(commands.len());
        // Every record's value in one buffer: one allocation per request, not one per record.
        let mut values = Vec::with_capacity(commands.len() * 128);
        let mut tickets = Vec::with_capacity(commands.len());
        for c in &commands {
            let (out, ticket) = match c {
                Command::Enqueue(m) => {
                    let value = EnqueueRecord {
                        address: &m.address,
                        payload: &m.payload,
                        id: &m.id,
                    };
                    let out = Outgoing {
                        topic: &t.enqueue,
                        key: m.address.as_str().into(),
                        value: append_json(&mut values, &value),
                        minted: m.new_id,
                    };
                    // Only a waiting publisher needs the ticket (the consumer derives it too).
                    (
                        out,
                        wait.then(|| message_ticket(m.address.as_str(), m.id.as_str())),
                    )
                }
                Command::Bind {
                    client, addresses, ..
                }
                | Command::Unbind { client, addresses } => {
                    let ticket = format!("b\u{0}{}", uuid::Uuid::new_v4());
                    let (topic, rewind, weight) = match c {
                        Command::Bind { rewind, weight, .. } => (&t.connect, *rewind, *weight),
                        _ => (&t.disconnect, None, None),
                    };
                    let mut value =
                        json!({ "client": client, "addresses": addresses, "ticket": ticket });
                    if let Some(r) = rewind {
                        value["rewind"] = r.to_json();
                    }
                    if let Some(w) = weight {
                        value["weight"] = json!(w);
                    }
                    let out = Outgoing {
                        topic,
                        key: client.to_string().into(),
                        value: append_json(&mut values, &value),
                        minted: false,
                    };
                    (out, wait.then_some(ticket))
                }
            };
            tickets.push(ticket.map(|t| {
                let rx = self.waiters.register(t.clone());
                (t, rx)
            }));
            sends.push(out);
        }
        let failed = self.produce_all(&sends, &values, wait).await;
        let mut out = Vec::with_capacity(commands.len());
        for (waiter, p) in tickets
            .into_iter()
            .zip(producer::outcomes(sends.len(), failed))
        {
            out.push(match (p, waiter) {
                (Err(e), waiter) => {
                    if let Some((ticket, _)) = waiter {
                        self.waiters.forget(&ticket);
                    }
                    Err(e)
                }
                (Ok(()), None) => Ok(Outcome::Queued),
                (Ok(()), Some((ticket, rx))) => {
                    match tokio::time::timeout(WAIT_TIMEOUT, rx).await {
                        Ok(Ok(outcome)) => Ok(outcome),
                        _ => {
                            self.waiters.forget(&ticket);
                            Err(IngestError::Timeout(WAIT_TIMEOUT.as_secs()))
                        }
                    }
                }
            });
        }
        Ok(out)
    }

    async fn drain(&self) {
        let _ = self.stop.send(true);
        if let Some(done) = self.done.lock().await.take() {
            let _ = done.await;
        }
    }

    fn partitions(&self) -> Option<super::Partitions> {
        let mut owned = self
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .owned
            .clone();
        owned.sort_unstable();
        Some(super::Partitions {
            count: self.settings.partitions,
            owned,
        })
    }

    fn ready(&self) -> Result<(), IngestError> {
        let generation =
            |a: &Mutex<Assignment>| a.lock().unwrap_or_else(|p| p.into_inner()).generation;
        if generation(&self.assigned) == 0 || generation(&self.bindings_assigned) == 0 {
            return Err(IngestError::Unavailable(
                "the Kafka consumer has not been given its partitions yet (joining the group)"
                    .into(),
            ));
        }
        Ok(())
    }

    async fn healthy(&self) -> Result<(), IngestError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer.reachable(Duration::from_secs(2)).map_err(kerr)
        })
        .await
        .map_err(kerr)?
    }
}

struct Worker {
    /// The enqueue feed.
    consumer: Consumer_,
    /// The bindings feed (connect, disconnect).
    bindings: Consumer_,
    producer: Producer,
    settings: KafkaSettings,
    processor: Arc<Processor>,
    /// The consumer's appends, kept in order while several batches are under way.
    run: Arc<crate::mailbox::Run>,
    waiters: Arc<Waiters>,
    /// Test hook: apply batches but never commit (a consumer that dies before every commit).
    never_commit: bool,
    /// Enqueue partition → the first offset after this consumer claimed its shard: records
    /// from there on are first deliveries, so minted ids among them are vouched for
    /// ([`crate::mailbox::NewMessage::new_id`]).
    fresh_from: HashMap<i32, i64>,
    /// `signalpost_kafka_wait_seconds`: from a record's produce (its create time) to the start
    /// of the batch that applies it — the time in Kafka and in the consumer's queue.
    wait_seconds: metrics::Histogram,
}

/// Batches the consumer has under way at once: the next batch's appends start while the one
/// before is being made visible (the cluster mailbox keeps their order; see
/// `src/mailbox/cassandra/append.rs`). They are finished — handed out, answered, their offsets
/// stored — in order.
const IN_FLIGHT: usize = 4;

/// A batch whose oldest record waited this long before it started is logged at debug level
/// (`RUST_LOG=signalpost::ingest::kafka=debug`), to find where a latency tail comes from.
const SLOW_MS: i64 = 20;

/// The batches under way, oldest first.
type Flight = FuturesOrdered<std::pin::Pin<Box<dyn std::future::Future<Output = Launched> + Send>>>;

/// A batch under way: its records, its commands, and what applying them durably did (`None`
/// when it had no valid command).
struct Launched {
    batch: Vec<OwnedMessage>,
    prepared: Prepared,
    persisted: Option<super::Persisted>,
}

/// A batch's valid commands, with the ticket and origin of each and the record it came from.
#[derive(Default)]
struct Prepared {
    commands: Vec<Command>,
    tickets: Vec<(Option<String>, Option<String>)>,
    /// The position in the batch of each command's record.
    sources: Vec<usize>,
}

#[derive(Debug, PartialEq, Eq)]
enum Handled {
    Done,
    Fenced,
    /// Not applied, and the queue is stopping.
    Abandoned,
}

/// A record turned into a command, or the reason it was refused.
struct Parsed {
    command: Result<Command, Invalid>,
    ticket: Option<String>,
    /// The node waiting for the outcome, when not this one.
    origin: Option<String>,
}

impl Worker {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        // Only a store that keeps overlapping appends in order (the cluster mailbox) gets more
        // than one batch at a time.
        let depth = if self.settings.claims.is_some() {
            IN_FLIGHT
        } else {
            1
        };
        let mut flight: Flight = FuturesOrdered::new();
        // The last batch launched, until its versions are reserved: the next one waits for it,
        // so that the run's appends reserve in order.
        let mut begun: Option<oneshot::Receiver<()>> = None;
        loop {
            let room = flight.len() < depth && begun.is_none();
            let first = tokio::select! {
                biased;
                _ = stopped.changed() => break,
                Some(done) = flight.next(), if !flight.is_empty() => {
                    match self.finish(done, &mut flight, &stopped).await {
                        Handled::Done => continue,
                        Handled::Fenced => {
                            self.rejoin(&mut flight);
                            continue;
                        }
                        Handled::Abandoned => return,
                    }
                }
                // (Told, or its batch ended — finished, or dropped by a rejoin.)
                _ = async { begun.as_mut().expect("checked").await }, if begun.is_some() => {
                    begun = None;
                    continue;
                }
                m = self.consumer.recv(), if room => m,
                m = self.bindings.recv(), if room => m,
            };
            let first = match first {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            // The batch is what is waiting now: no wait for more. (Waiting 1 ms for each next
            // record kept a batch open while a slow stream trickled in, and delayed its first
            // record by all of it: p50 at 1 000 msg/s 20 ms against 8 without the wait.) Under
            // load batches still grow, with what arrives while the ones before are applied.
            let mut batch = vec![first];
            while batch.len() < self.settings.batch {
                let next = async {
                    tokio::select! {
                        m = self.consumer.recv() => m,
                        m = self.bindings.recv() => m,
                    }
                };
                match next.now_or_never() {
                    Some(Ok(m)) => batch.push(m.detach()),
                    _ => break,
                }
            }
            // Binding changes read heads, a claim resets the writer, and a node that is no
            // member applies nothing: each waits until no batch is under way.
            let bindings = batch
                .iter()
                .any(|m| m.topic() != self.settings.topics.enqueue);
            if bindings || !self.is_member() || self.has_to_claim() {
                match self.finish_all(&mut flight, &stopped).await {
                    Handled::Done => {}
                    Handled::Fenced => {
                        drop(batch);
                        self.rejoin(&mut flight);
                        continue;
                    }
                    Handled::Abandoned => return,
                }
            }
            if !self.wait_until_member(&mut stopped).await {
                return; // stopping while fenced: nothing applied, nothing committed
            }
            self.claim_assigned().await;
            let prepared = self.prepare(&batch).await;
            let (processor, run) = (self.processor.clone(), self.run.clone());
            let (told, told_rx) = oneshot::channel();
            begun = Some(told_rx);
            flight.push_back(Box::pin(async move {
                let persisted = match prepared.commands.is_empty() {
                    true => None,
                    false => Some(
                        processor
                            .persist(prepared.commands.clone(), Some((&run, told)))
                            .await,
                    ),
                };
                Launched {
                    batch,
                    prepared,
                    persisted,
                }
            }));
        }
        // Stopping: what is under way is finished (delivered and its offsets stored), then the
        // offsets are committed.
        if self.finish_all(&mut flight, &stopped).await == Handled::Done && !self.never_commit {
            let _ = self.consumer.commit_consumer_state(CommitMode::Sync);
            let _ = self.bindings.commit_consumer_state(CommitMode::Sync);
        }
    }

    /// Another consumer owns some of these partitions now (this one missed the rebalance): drop
    /// what is under way uncommitted, leave the group and join it again, so that it continues
    /// from the committed offsets of what it is given.
    fn rejoin(&mut self, flight: &mut Flight) {
        tracing::warn!("fenced by another writer: rejoining the consumer group");
        *flight = FuturesOrdered::new();
        self.fresh_from.clear();
        let assigned = self.consumer.context().assigned.clone();
        {
            // Nothing is ours until the group assigns it again.
            let mut a = assigned.lock().unwrap_or_else(|p| p.into_inner());
            a.owned.clear();
            a.to_claim.clear();
        }
        self.settings.owned.set(self.settings.partitions, &[]);
        match subscribe(&self.settings, assigned, Feed::Enqueue) {
            Ok(c) => self.consumer = c,
            Err(e) => tracing::error!(error = %e, "could not rejoin the consumer group"),
        }
    }

    /// Finishes every batch under way, in order.
    async fn finish_all(&self, flight: &mut Flight, stopped: &watch::Receiver<bool>) -> Handled {
        while let Some(done) = flight.next().await {
            let h = self.finish(done, flight, stopped).await;
            if h != Handled::Done {
                return h;
            }
        }
        Handled::Done
    }

    /// Whether the node is a cluster member now (always, without membership).
    fn is_member(&self) -> bool {
        self.settings.member.as_ref().is_none_or(|m| *m.borrow())
    }

    /// Whether a rebalance gave partitions whose shards are not claimed yet.
    fn has_to_claim(&self) -> bool {
        !self
            .consumer
            .context()
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .to_claim
            .is_empty()
    }

    /// Waits while the node is fenced (not a cluster member); false if the queue stops meanwhile.
    async fn wait_until_member(&self, stopped: &mut watch::Receiver<bool>) -> bool {
        let Some(mut member) = self.settings.member.clone() else {
            return true;
        };
        if *member.borrow_and_update() {
            return true;
        }
        tracing::warn!("fenced (not a cluster member): applying nothing until membership is back");
        loop {
            tokio::select! {
                r = member.changed() => {
                    if r.is_err() {
                        return false;
                    }
                    if *member.borrow_and_update() {
                        tracing::info!("a cluster member again: applying");
                        return true;
                    }
                }
                _ = stopped.changed() => return false,
            }
        }
    }

    /// Claims the mailbox shards of newly assigned enqueue partitions, then notes where their
    /// first deliveries begin: the high watermark read after the claim (no record from there on
    /// can have been appended by an earlier owner whose append became visible).
    async fn claim_assigned(&mut self) {
        let partitions = {
            let mut assigned = self
                .consumer
                .context()
                .assigned
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut assigned.to_claim)
        };
        if partitions.is_empty() {
            return;
        }
        for p in &partitions {
            self.fresh_from.remove(&(*p as i32));
        }
        let claimed = match &self.settings.claims {
            Some(c) => c.claim(&partitions).await,
            None => Ok(()),
        };
        if let Err(e) = claimed {
            tracing::warn!(error = %e, "claiming mailbox shards failed; appends will claim them");
            return;
        }
        for &p in &partitions {
            let topic = &self.settings.topics.enqueue;
            match self
                .consumer
                .fetch_watermarks(topic, p as i32, Duration::from_secs(5))
            {
                Ok((_, high)) => {
                    self.fresh_from.insert(p as i32, high);
                }
                Err(e) => tracing::warn!(error = %e, partition = p, "reading the watermark"),
            }
        }
    }

    fn parse(&self, m: &OwnedMessage) -> Parsed {
        let t = &self.settings.topics;
        let bytes = m.payload().unwrap_or_default();
        let limits = self.settings.limits;
        let origin = origin_header(m);
        if m.topic() == t.enqueue {
            let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
            let mut default_id = || {
                MessageId::parse(&format!("kafka-{topic}-{partition}-{offset}"))
                    .expect("a valid id")
            };
            let partitions = self.settings.partitions;
            let minted_by_sender = m.headers().is_some_and(|h| {
                h.iter()
                    .any(|x| x.key == MINTED_HEADER && x.value == Some(b"1".as_slice()))
            });
            let first_delivery = self
                .fresh_from
                .get(&partition)
                .is_some_and(|f| offset >= *f);
            let command = parse::enqueue_one(bytes, limits, &mut default_id).and_then(|mut n| {
                n.new_id = (n.new_id || minted_by_sender) && first_delivery;
                let want = n.address.partition(partitions);
                if want as i32 == partition {
                    Ok(Command::Enqueue(n))
                } else {
                    Err(Invalid::Bad(format!(
                        "record for {} came through partition {partition}, but that address \
                         belongs to partition {want}: key enqueue records with their address \
                         and use Kafka's default (murmur2) partitioner",
                        n.address
                    )))
                }
            });
            // Only a record produced for a waiting publisher names its node: the others need
            // no ticket.
            let ticket = match &command {
                Ok(Command::Enqueue(n)) if origin.is_some() => {
                    Some(message_ticket(n.address.as_str(), n.id.as_str()))
                }
                _ => None,
            };
            return Parsed {
                command,
                ticket,
                origin: self.elsewhere(origin),
            };
        }
        let ticket = serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|v| v.get("ticket").and_then(|t| t.as_str()).map(str::to_string));
        let command =
            parse::binding(bytes, limits).and_then(|b| b.into_command(m.topic() == t.connect));
        Parsed {
            command,
            ticket,
            origin: self.elsewhere(origin),
        }
    }

    /// The waiting node a record names, when it is not this one.
    fn elsewhere(&self, origin: Option<&[u8]>) -> Option<String> {
        let node = String::from_utf8_lossy(origin?).into_owned();
        (node != self.settings.node).then_some(node)
    }

    /// Turns a batch into commands: records the time its records waited, and dead-letters
    /// those that are not valid.
    async fn prepare(&self, batch: &[OwnedMessage]) -> Prepared {
        let now = crate::clock::now_ms() as i64;
        let mut longest = 0;
        for m in batch {
            if let Some(created) = m.timestamp().to_millis() {
                let waited = now.saturating_sub(created).max(0);
                longest = longest.max(waited);
                self.wait_seconds.record(waited as f64 / 1000.0);
            }
        }
        if longest >= SLOW_MS {
            tracing::debug!(
                waited_ms = longest,
                records = batch.len(),
                "slow: a batch's records waited"
            );
        }
        let parsed: Vec<Parsed> = batch.iter().map(|m| self.parse(m)).collect();
        let mut prepared = Prepared::default();
        for (i, (m, p)) in batch.iter().zip(parsed).enumerate() {
            match p.command {
                Ok(c) => {
                    prepared.commands.push(c);
                    prepared.tickets.push((p.ticket, p.origin));
                    prepared.sources.push(i);
                }
                Err(reason) => self.dead_letter(m, &reason.to_string()).await,
            }
        }
        prepared
    }

    /// Finishes the oldest batch under way: hands its messages out, dead-letters what was
    /// refused, answers whoever waits, and stores its offsets. A batch that failed is applied
    /// again alone, with backoff, until it is durable (or the queue stops, or this consumer
    /// is fenced); so are the ones under way behind it, in order.
    async fn finish(
        &self,
        done: Launched,
        flight: &mut Flight,
        stopped: &watch::Receiver<bool>,
    ) -> Handled {
        let Some(results) = done.persisted.as_ref().map(super::Persisted::results) else {
            return self.conclude_one(done, stopped).await;
        };
        let Some(Err(e)) = results.iter().find(|r| r.is_err()) else {
            return self.conclude_one(done, stopped).await;
        };
        if results
            .iter()
            .any(|r| matches!(r, Err(IngestError::Fenced(_))))
        {
            return Handled::Fenced;
        }
        tracing::warn!(error = %e, "applying a Kafka batch failed; retrying");
        // The batches under way behind it failed too, or were refused (the run had failed):
        // once all have ended, the run restarts and each is applied again, in order.
        let behind: Vec<Launched> = flight.collect().await;
        self.run.restart();
        for l in std::iter::once(done).chain(behind) {
            let h = self.conclude_one(l, stopped).await;
            if h != Handled::Done {
                return h;
            }
        }
        Handled::Done
    }

    /// Ends one batch: hands out what it appended, or applies it again until it is durable if
    /// it failed, then concludes it.
    async fn conclude_one(&self, l: Launched, stopped: &watch::Receiver<bool>) -> Handled {
        let results = match l.persisted {
            None => Vec::new(),
            Some(p) if p.results().iter().all(Result::is_ok) => self.processor.deliver(p),
            Some(_) => match self.retry(&l.prepared.commands, stopped).await {
                Ok(r) => r,
                Err(h) => return h,
            },
        };
        self.conclude(&l.batch, &l.prepared, &results).await;
        Handled::Done
    }

    /// Applies commands again until they are durable: `Err` when the queue stops meanwhile or
    /// this consumer is fenced.
    async fn retry(
        &self,
        commands: &[Command],
        stopped: &watch::Receiver<bool>,
    ) -> Result<Vec<Result<Outcome, IngestError>>, Handled> {
        let mut commands = commands.to_vec();
        // A retry is not a first delivery.
        for c in &mut commands {
            if let Command::Enqueue(m) = c {
                m.new_id = false;
            }
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let results = self.processor.apply(commands.clone()).await;
            let Some(Err(e)) = results.iter().find(|r| r.is_err()) else {
                return Ok(results);
            };
            if matches!(e, IngestError::Fenced(_)) {
                return Err(Handled::Fenced);
            }
            tracing::warn!(error = %e, "applying a Kafka batch failed; retrying");
            if *stopped.borrow() {
                return Err(Handled::Abandoned); // not committed: applied again after a restart
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// The end of a batch applied: refused commands are dead-lettered, waiting publishers get
    /// their outcome, and the offsets are stored.
    async fn conclude(
        &self,
        batch: &[OwnedMessage],
        prepared: &Prepared,
        results: &[Result<Outcome, IngestError>],
    ) {
        for (&i, r) in prepared.sources.iter().zip(results) {
            if let Ok(Outcome::Refused(reason)) = r {
                self.dead_letter(&batch[i], reason).await;
            }
        }
        for ((ticket, origin), r) in prepared.tickets.iter().zip(results) {
            if let (Some(t), Ok(outcome)) = (ticket, r) {
                // The node that waits, wherever it is.
                let remote = origin
                    .as_deref()
                    .is_some_and(|o| self.processor.reply_elsewhere(o, t, &|| outcome.to_wire()));
                if !remote {
                    self.waiters.resolve(t, outcome);
                }
            }
        }
        if !self.never_commit {
            self.store_offsets(batch);
        }
    }

    async fn dead_letter(&self, m: &OwnedMessage, reason: &str) {
        let value = json!({
            "reason": reason,
            "topic": m.topic(),
            "partition": m.partition(),
            "offset": m.offset(),
            "key": m.key().map(String::from_utf8_lossy),
            "value": m.payload().map(String::from_utf8_lossy),
        })
        .to_string();
        let record = Record {
            topic: &self.settings.topics.deadletter,
            key: m.key().unwrap_or_default(),
            value: value.as_bytes(),
            headers: None,
        };
        let sent = self
            .producer
            .send_all(std::iter::once(record), PRODUCE_TIMEOUT)
            .await;
        if let Some((_, e)) = sent.first() {
            tracing::error!(error = %e, reason, "could not dead-letter a record");
        }
    }

    /// Marks a batch's records as applied: librdkafka commits the stored offsets every
    /// [`COMMIT_EVERY_MS`], and those of partitions a rebalance takes away before it lets them
    /// go. A partition no longer assigned refuses the store: its new owner applies those
    /// records again, idempotently.
    fn store_offsets(&self, batch: &[OwnedMessage]) {
        let mut next: HashMap<(&str, i32), i64> = HashMap::new();
        for m in batch {
            let e = next.entry((m.topic(), m.partition())).or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        // Each feed's offsets in its own group.
        let mut enqueue = TopicPartitionList::with_capacity(next.len());
        let mut bindings = TopicPartitionList::with_capacity(next.len());
        for ((topic, partition), offset) in next {
            let tpl = if topic == self.settings.topics.enqueue {
                &mut enqueue
            } else {
                &mut bindings
            };
            if let Err(e) =
                tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))
            {
                tracing::warn!(error = %e, "building the commit");
            }
        }
        for (consumer, tpl) in [(&self.consumer, enqueue), (&self.bindings, bindings)] {
            if tpl.count() == 0 {
                continue;
            }
            if let Err(e) = consumer.store_offsets(&tpl) {
                tracing::debug!(error = %e, "storing offsets refused (partition moved)");
            }
        }
    }
}
