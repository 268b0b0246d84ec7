//! The cluster backend's parts (feature `cluster`): ZooKeeper membership, Kafka topics and
//! queue, the Cassandra stores — built in the order that makes concurrent starts safe.

use super::{NodeError, Parts, Stores};
use crate::cluster::zookeeper::ZkMembership;
use crate::cluster::{Membership, NodeInfo};
use crate::config::Config;
use crate::ingest::kafka::{KafkaQueue, KafkaSettings, Topics};
use crate::mailbox::cassandra::{CassandraMailbox, DEFAULT_BUCKET_SIZE, MailboxSettings};
use crate::presence::cassandra::CassandraPresence;
use crate::topology::cassandra::CassandraTopology;
use std::sync::Arc;
use std::time::Duration;

/// Connects to ZooKeeper, then — under the cluster-wide `bootstrap` lock — creates the Kafka
/// topics and the Cassandra schema and opens the stores, then starts the Kafka queue. The node
/// joins (is listed, contends for leadership, applies operations) when `Parts::join` is called,
/// once it is built.
pub(super) async fn parts(config: &Config, me: NodeInfo) -> Result<Parts, NodeError> {
    let node_id = me.id.clone();
    let zk = Arc::new(ZkMembership::connect(
        &config.zookeeper.connect,
        Duration::from_millis(config.zookeeper.session_timeout_ms),
        &config.zookeeper.root,
        NodeInfo {
            leader: false,
            ..me
        },
    ));
    let membership: Arc<dyn Membership> = zk.clone();
    // Nodes starting together create the topics and the schema one at a time (concurrent
    // CREATE TABLE on several coordinators can disagree on a table's id).
    let bootstrap = membership
        .lock(
            "bootstrap",
            Duration::from_millis(config.zookeeper.lock_timeout_ms),
        )
        .await
        .map_err(|e| NodeError::Service("startup lock", Box::new(e)))?;
    // The mailbox is sharded like the enqueue topic, so the topics come first.
    let topics = Topics::with_prefix(&config.kafka.topic_prefix);
    let shards = KafkaQueue::ensure_topics(&config.kafka.brokers, &topics, config.kafka.partitions)
        .await
        .map_err(|e| NodeError::Service("Kafka topics", Box::new(e)))?;

    let session = Arc::new(
        crate::cassandra::open(&config.cassandra, &node_id)
            .await
            .map_err(|e| NodeError::Service("Cassandra", Box::new(e)))?,
    );
    let ks = &config.cassandra.keyspace;
    let mailbox = CassandraMailbox::new(
        session.clone(),
        &MailboxSettings {
            keyspace: ks.clone(),
            retention_ms: config.retention_ms(),
            bucket_size: DEFAULT_BUCKET_SIZE,
            shards,
            scope: topics.enqueue.clone(),
            owner: node_id.clone(),
        },
    )
    .await
    .map_err(super::store_err)?;
    let topo = CassandraTopology::new(session.clone(), ks)
        .await
        .map_err(super::store_err)?;
    let presence = CassandraPresence::new(session, ks)
        .await
        .map_err(super::store_err)?;
    drop(bootstrap);
    let mailbox = Arc::new(mailbox);
    let stores = Stores {
        mailbox: mailbox.clone(),
        topology: Arc::new(topo.clone()),
        cursors: Arc::new(topo.clone()),
        reads: Arc::new(topo),
        presence: Arc::new(presence),
    };
    let owned = crate::ingest::Owned::default();
    let settings = KafkaSettings {
        brokers: config.kafka.brokers.clone(),
        topics,
        group: config.kafka.group.clone(),
        limits: crate::ingest::parse::Limits {
            max_payload: config.limits.max_payload_bytes,
            max_batch: config.limits.max_batch,
        },
        batch: config.append_batch,
        partitions: shards,
        node: node_id,
        member: Some(membership.membership()),
        claims: Some(mailbox),
        never_commit: false,
        owned: owned.clone(),
    };
    Ok(Parts {
        stores,
        start_queue: Box::new(move |processor, tasks| {
            let queue = KafkaQueue::start(settings, processor, tasks)
                .map_err(|e| NodeError::Service("Kafka queue", Box::new(e)))?;
            Ok(Arc::new(queue))
        }),
        membership,
        join: Some(Box::new(move || zk.join())),
        owned: Some(owned),
        backup: None,
    })
}
