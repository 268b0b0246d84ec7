//! Integration tests: every port's contract suite against every backend (the embedded ones
//! here, the cluster ones against the real servers `scripts/stack up` starts), the stack tool,
//! and property tests of the parsers at the edge (`props`).

use signalpost::mailbox::Mailbox;
use signalpost::mailbox::embedded::EmbeddedMailbox;
use signalpost::presence::{MemoryPresence, Presence};
use signalpost::topology::embedded::EmbeddedTopology;
use signalpost::topology::{Cursors, Topology};
use std::sync::Arc;

#[macro_use]
mod contract;
mod props;
mod queue;

#[cfg(feature = "cluster")]
mod kafka;
#[cfg(feature = "cluster")]
mod stack;
#[cfg(feature = "cluster")]
mod zookeeper;

async fn embedded_mailbox(retention_ms: u64) -> (tempfile::TempDir, Arc<dyn Mailbox>) {
    let dir = tempfile::tempdir().unwrap();
    let m = EmbeddedMailbox::open(&dir.path().join("m.redb"), retention_ms).unwrap();
    (dir, Arc::new(m))
}

async fn embedded_topology() -> (tempfile::TempDir, EmbeddedTopology) {
    let dir = tempfile::tempdir().unwrap();
    let t = EmbeddedTopology::open(&dir.path().join("t.redb")).unwrap();
    (dir, t)
}

mod embedded_mailbox {
    use super::*;

    mailbox_suite!(make = super::embedded_mailbox, retention_ms = 1_000);

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let a = contract::mailbox::fresh_address("channel", "reopen");
        {
            let m = EmbeddedMailbox::open(&path, 60_000).unwrap();
            m.append(
                (0..5)
                    .map(|i| contract::mailbox::msg(&a, &format!("r{i}")))
                    .collect(),
            )
            .await
            .unwrap();
        }
        let m = EmbeddedMailbox::open(&path, 60_000).unwrap();
        let again = m
            .append(vec![
                contract::mailbox::msg(&a, "r4"),
                contract::mailbox::msg(&a, "r5"),
            ])
            .await
            .unwrap();
        assert_eq!(
            (again[0].message.version, again[0].duplicate),
            (5, true),
            "ids survive a restart"
        );
        assert_eq!(
            (again[1].message.version, again[1].duplicate),
            (6, false),
            "versions go on after a restart"
        );
    }
}

mod embedded_topology {
    use super::*;

    topology_suite!(make = super::embedded_topology);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_bind_limit() {
        let (_keep, t) = super::embedded_topology().await;
        contract::topology::concurrent_bind_limit(Arc::new(t)).await;
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let c = signalpost::address::ClientId::parse("persist").unwrap();
        let a = contract::mailbox::fresh_address("channel", "persist");
        {
            let t = EmbeddedTopology::open(&path).unwrap();
            Topology::add(
                &t,
                &c,
                &[signalpost::topology::Binding {
                    address: a.clone(),
                    since: 3,
                }],
                contract::topology::LIMIT,
            )
            .await
            .unwrap();
            Cursors::save(&t, &[(c.clone(), a.clone(), 9)], contract::topology::TTL)
                .await
                .unwrap();
        }
        let t = EmbeddedTopology::open(&path).unwrap();
        assert_eq!(
            Topology::get(&t, &c).await.unwrap(),
            vec![signalpost::topology::Binding {
                address: a.clone(),
                since: 3
            }]
        );
        assert_eq!(Cursors::get(&t, &c).await.unwrap().get(&a), Some(&9));
    }

    /// `expire` removes exactly the rows whose time is up, more than one transaction's worth,
    /// counts them, and keeps no time for a row it removed (a later save of the same key is
    /// not removed by the old time).
    #[tokio::test]
    async fn expire_removes_what_ran_out_and_counts_it() {
        use signalpost::topology::ReadMarks;
        let (_keep, t) = super::embedded_topology().await;
        let c = signalpost::address::ClientId::parse("exp-count").unwrap();
        let many: Vec<_> = (0..5000)
            .map(|i| {
                (
                    c.clone(),
                    contract::mailbox::fresh_address("channel", "n"),
                    i + 1,
                )
            })
            .collect();
        Cursors::save(&t, &many, 10).await.unwrap();
        let kept = contract::mailbox::fresh_address("channel", "kept");
        Cursors::save(&t, &[(c.clone(), kept.clone(), 1)], 100)
            .await
            .unwrap();
        ReadMarks::mark(&t, &c, &kept, &[1], 0, 10).await.unwrap();
        let now = signalpost::clock::now_ms();
        assert_eq!(Cursors::expire(&t, now).await.unwrap(), 0);
        assert_eq!(Cursors::expire(&t, now + 12_000).await.unwrap(), 5000);
        assert_eq!(
            Cursors::get(&t, &c).await.unwrap().len(),
            1,
            "the one with 100 s"
        );
        assert_eq!(Cursors::expire(&t, now + 12_000).await.unwrap(), 0, "once");
        // The read mark has its own time.
        assert_eq!(ReadMarks::expire(&t, now + 12_000).await.unwrap(), 1);
        assert!(ReadMarks::marks(&t, &c, &kept).await.unwrap().0.is_empty());
        // Saved again after its removal, a cursor lives its new TTL, not the old one's.
        Cursors::save(&t, &many[..1], 1000).await.unwrap();
        assert_eq!(
            Cursors::expire(&t, now + 200_000).await.unwrap(),
            1,
            "`kept`"
        );
        assert_eq!(Cursors::get(&t, &c).await.unwrap().len(), 1);
    }

    /// A file of an earlier version (cursors with no time) opens, keeps its cursors through an
    /// expiry, and they get a time at their next save.
    #[tokio::test]
    async fn cursors_of_an_earlier_version_stay_until_saved_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let c = signalpost::address::ClientId::parse("old-file").unwrap();
        let a = contract::mailbox::fresh_address("channel", "old");
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let def: redb::TableDefinition<(&str, &str), u64> =
                    redb::TableDefinition::new("cursors");
                let mut t = txn.open_table(def).unwrap();
                t.insert((c.as_str(), a.as_str()), 4).unwrap();
            }
            txn.commit().unwrap();
        }
        let t = EmbeddedTopology::open(&path).unwrap();
        let later = signalpost::clock::now_ms() + 10 * 86_400_000;
        assert_eq!(Cursors::expire(&t, later).await.unwrap(), 0);
        assert_eq!(Cursors::get(&t, &c).await.unwrap().get(&a), Some(&4));
        Cursors::save(&t, &[(c.clone(), a.clone(), 5)], 60)
            .await
            .unwrap();
        assert_eq!(Cursors::expire(&t, later).await.unwrap(), 1);
        assert!(Cursors::get(&t, &c).await.unwrap().is_empty());
    }
}

mod memory_presence {
    use super::*;

    async fn presence() -> Arc<dyn Presence> {
        Arc::new(MemoryPresence::default())
    }

    presence_suite!(make = presence);
}

mod standalone_membership {
    use crate::contract::membership::{Cluster, url_of};
    use signalpost::cluster::{Membership, NodeInfo, Standalone};
    use std::sync::{Arc, OnceLock};

    /// One node: the whole cluster, whatever id is asked for.
    struct One(OnceLock<Arc<dyn Membership>>);

    impl Cluster for One {
        fn member(&self, id: &str) -> Arc<dyn Membership> {
            self.0
                .get_or_init(|| {
                    Arc::new(Standalone::new(NodeInfo {
                        id: id.into(),
                        url: url_of(id),
                        leader: true,
                    }))
                })
                .clone()
        }
        fn leave(&self, _: &str) {}
        fn many(&self) -> bool {
            false
        }
    }

    async fn cluster() -> Box<dyn Cluster> {
        Box::new(One(OnceLock::new()))
    }

    membership_suite!(cluster = cluster);
}

mod local_queue {
    queue_suite!(backend = crate::queue::local);
}

/// The Cassandra backends against a real server (`scripts/stack up`), contact point from
/// `SIGNALPOST_CASSANDRA` (default 127.0.0.1:9042). All tests share the keyspace
/// `signalpost_it` (bucket size 100, so the suites cross buckets) and rely on the suites'
/// fresh addresses and clients, so they run in parallel against one server.
#[cfg(feature = "cluster")]
mod cassandra_support {
    use scylla::client::session::Session;
    use scylla::statement::unprepared::Statement;
    use signalpost::cassandra;
    use signalpost::mailbox::cassandra::{CassandraMailbox, MailboxSettings};
    pub use signalpost::topology::cassandra::{CassandraTopology, Layout};
    use std::sync::{Arc, OnceLock};

    pub const KEYSPACE: &str = "signalpost_it";
    pub const BUCKET_SIZE: u64 = 100;

    pub fn contact_points() -> String {
        std::env::var("SIGNALPOST_CASSANDRA").unwrap_or_else(|_| "127.0.0.1:9042".into())
    }

    /// Applies the schema once per test process (on a thread of its own, since each test has
    /// its own runtime), so parallel tests never race on DDL.
    pub fn schema(keyspace: &'static str) {
        static DONE: OnceLock<std::sync::Mutex<Vec<&'static str>>> = OnceLock::new();
        let done = DONE.get_or_init(Default::default);
        let mut done = done.lock().unwrap();
        if done.contains(&keyspace) {
            return;
        }
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let s = cassandra::connect(&contact_points(), Some(keyspace))
                    .await
                    .expect("Cassandra is up (scripts/stack up)");
                cassandra::apply_schema(&s, keyspace, cassandra::LOCAL_REPLICATION, "it")
                    .await
                    .expect("schema applies");
            })
        })
        .join()
        .unwrap();
        done.push(keyspace);
    }

    pub async fn session(keyspace: &'static str) -> Arc<scylla::client::session::Session> {
        schema(keyspace);
        Arc::new(
            cassandra::connect(&contact_points(), Some(keyspace))
                .await
                .unwrap(),
        )
    }

    pub const SHARDS: u32 = 8;

    /// Settings with a fence scope of their own, so that tests running at once do not fence
    /// each other.
    pub fn settings(retention_ms: u64) -> MailboxSettings {
        let id = uuid::Uuid::new_v4().simple().to_string();
        MailboxSettings {
            keyspace: KEYSPACE.into(),
            retention_ms,
            bucket_size: BUCKET_SIZE,
            shards: SHARDS,
            scope: format!("it-{id}"),
            owner: format!("it-{id}"),
        }
    }

    /// A mailbox as one node has it (its own claims and caches), alone in its fence scope.
    pub async fn mailbox(retention_ms: u64) -> CassandraMailbox {
        mailbox_in(&settings(retention_ms).scope, retention_ms).await
    }

    /// A mailbox in a given fence scope (as another node of the same cluster).
    pub async fn mailbox_in(scope: &str, retention_ms: u64) -> CassandraMailbox {
        let s = session(KEYSPACE).await;
        let mut settings = settings(retention_ms);
        settings.scope = scope.into();
        CassandraMailbox::new(s, &settings).await.unwrap()
    }

    /// A topology whose record of bindings is `client_bindings` (what a keyspace created with
    /// schema file 10 has).
    pub async fn topology() -> CassandraTopology {
        topology_in(Layout::Rows).await
    }

    pub async fn topology_in(layout: Layout) -> CassandraTopology {
        CassandraTopology::with_layout(session(KEYSPACE).await, KEYSPACE, layout)
            .await
            .unwrap()
    }

    /// Cassandra's trace of a read of one partition: the rows it answered, and the lines that
    /// count what it read ("Read 2 live rows and 0 tombstone cells").
    pub async fn traced_read(s: &Session, cql: &str, key: &str) -> (usize, Vec<String>) {
        let mut q = Statement::new(cql.replace("{ks}", KEYSPACE));
        q.set_tracing(true);
        let res = s.query_unpaged(q, (key,)).await.unwrap();
        let id = res.tracing_id().expect("a traced read has a tracing id");
        let rows = res.into_rows_result().unwrap().rows_num();
        // Cassandra writes a trace's events asynchronously, after the answer: the counting line
        // may come a moment after the session is listed (read again for up to 5 s).
        let mut counts = Vec::new();
        for _ in 0..50 {
            let info = s.get_tracing_info(&id).await.unwrap();
            counts = info
                .events
                .iter()
                .filter_map(|e| e.activity.clone())
                .filter(|a| a.contains("live rows and"))
                .collect();
            if !counts.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        (rows, counts)
    }

    pub fn assert_no_tombstones(what: &str, counts: &[String]) {
        assert!(
            !counts.is_empty(),
            "the trace of {what} counts what it read"
        );
        assert_eq!(tombstones(counts), 0, "{what}: {counts:?}");
    }

    /// The tombstone cells a trace's counting lines name, added up.
    pub fn tombstones(counts: &[String]) -> usize {
        counts
            .iter()
            .filter_map(|l| l.strip_suffix(" tombstone cells")?.rsplit(' ').next())
            .map(|n| n.parse::<usize>().expect("a count"))
            .sum()
    }
}

#[cfg(feature = "cluster")]
mod cassandra_mailbox {
    use super::cassandra_support::*;
    use super::*;
    use crate::contract::mailbox::{fresh_address, msg};
    use signalpost::mailbox::MailboxError;

    async fn make(retention_ms: u64) -> ((), Arc<dyn Mailbox>) {
        ((), Arc::new(mailbox(retention_ms).await))
    }

    /// A node's session keeps its own keyspace's schema (writes are batched by replica from the
    /// tokens of its tables' keys) and no other keyspace's: the driver's default, every
    /// keyspace's full schema after each schema change, made a node's start on a Cassandra with
    /// many keyspaces seconds slower.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn the_session_keeps_only_its_own_keyspace_schema() {
        let s = session(KEYSPACE).await;
        let cluster = s.get_cluster_state();
        let token = cluster.compute_token(KEYSPACE, "mailbox_entries", &("client:x", 0i64));
        assert!(token.is_ok(), "{token:?}");
        let fetched: Vec<&str> = cluster.keyspaces_iter().map(|(k, _)| k).collect();
        assert_eq!(fetched, [KEYSPACE]);
        // Tools that only run statements fetch none.
        let bare = signalpost::cassandra::connect(&contact_points(), None)
            .await
            .unwrap();
        assert_eq!(bare.get_cluster_state().keyspaces_iter().count(), 0);
    }

    // Cassandra's TTL counts whole seconds: a 3 s retention leaves room for it.
    mailbox_suite!(
        #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
        make = make,
        retention_ms = 3_000
    );

    /// Checks what writers' appends answered (address, version, id) against what the mailbox
    /// holds: no version given to two messages, every address's versions gap-free, each answer
    /// what is stored, every id once, and exactly the messages sent to it (`sent`).
    async fn check_answers(
        addrs: &[signalpost::address::Address],
        answered: Vec<(
            signalpost::address::Address,
            u64,
            signalpost::address::MessageId,
        )>,
        sent: impl Fn(&signalpost::address::Address) -> std::collections::HashSet<String>,
    ) {
        let mut by_version = std::collections::HashMap::new();
        for (a, v, id) in answered {
            if let Some(prev) = by_version.insert((a.clone(), v), id.clone()) {
                assert_eq!(prev, id, "{a} version {v} given to two messages");
            }
        }
        let reader = mailbox(60_000).await;
        for a in addrs {
            let page = reader.read(a, 0, 10_000).await.unwrap();
            let versions: Vec<u64> = page.messages.iter().map(|m| m.version).collect();
            assert_eq!(
                versions,
                (1..=page.head.head).collect::<Vec<_>>(),
                "gap-free"
            );
            for m in &page.messages {
                if let Some(id) = by_version.get(&(a.clone(), m.version)) {
                    assert_eq!(id, &m.id, "{a} v{} is what the append answered", m.version);
                }
            }
            let mut ids: Vec<String> = page.messages.iter().map(|m| m.id.to_string()).collect();
            let n = ids.len();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), n, "every id appended once to {a}");
            let stored: std::collections::HashSet<String> = ids.into_iter().collect();
            assert_eq!(stored, sent(a), "every message sent to {a} is there, once");
        }
    }

    fn two_writers_id(n: usize, b: usize, i: usize) -> String {
        if (i / 3).is_multiple_of(2) {
            format!("s{b}-{i}")
        } else {
            format!("n{n}-{b}-{i}")
        }
    }

    /// Two mailboxes (as two nodes: separate claims and caches) append to the same addresses at
    /// once, and each, when fenced, takes the shard back at once (the worst a rebalance can do):
    /// every append either fails or is exactly what the mailbox holds, versions stay gap-free and
    /// unique, and a message id sent through both is appended once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn two_writers() {
        let scope = settings(0).scope;
        let nodes = [
            mailbox_in(&scope, 60_000).await,
            mailbox_in(&scope, 60_000).await,
        ];
        let addrs: Vec<_> = (0..3)
            .map(|i| fresh_address("channel", &format!("tw{i}")))
            .collect();
        let shards: Vec<u32> = addrs.iter().map(|a| a.partition(SHARDS)).collect();
        let mut tasks = Vec::new();
        for (n, m) in nodes.iter().enumerate() {
            let (m, addrs, shards) = (m.clone(), addrs.clone(), shards.clone());
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                let mut fenced = 0;
                for b in 0..8 {
                    let batch: Vec<_> = (0..30)
                        .map(|i| msg(&addrs[i % addrs.len()], &two_writers_id(n, b, i)))
                        .collect();
                    loop {
                        match m.append(batch.clone()).await {
                            Ok(out) => {
                                for a in out {
                                    got.push((
                                        a.message.address.clone(),
                                        a.message.version,
                                        a.message.id.clone(),
                                    ));
                                }
                                break;
                            }
                            Err(MailboxError::Fenced(_)) => {
                                fenced += 1;
                                m.claim(&shards).await.expect("claim");
                            }
                            Err(e) => panic!("append: {e}"),
                        }
                    }
                }
                (got, fenced)
            }));
        }
        let mut answered = Vec::new();
        let mut fenced = 0;
        for t in tasks {
            let (got, f) = t.await.unwrap();
            fenced += f;
            answered.extend(got);
        }
        eprintln!("two_writers: {fenced} appends fenced and retried");
        check_answers(&addrs, answered, |a| {
            (0..2)
                .flat_map(|n| (0..8).flat_map(move |b| (0..30).map(move |i| (n, b, i))))
                .filter(|(_, _, i)| &addrs[i % addrs.len()] == a)
                .map(|(n, b, i)| two_writers_id(n, b, i))
                .collect()
        })
        .await;
    }

    /// Two writers, each with three appends in flight at once (the Kafka consumer's pipeline),
    /// most of them of vouched-for new ids (no lookup, so they overlap), some with ids both
    /// writers send; each writer takes the shards back when fenced. An append either fails (fenced,
    /// or behind one that failed) or is exactly what the mailbox holds; versions stay gap-free
    /// and unique; every message is there once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn overlapping_appends_of_two_writers() {
        const TASKS: usize = 3;
        const BATCHES: usize = 6;
        const PER_BATCH: usize = 20;
        let scope = settings(0).scope;
        let nodes = [
            mailbox_in(&scope, 60_000).await,
            mailbox_in(&scope, 60_000).await,
        ];
        let addrs: Vec<_> = (0..3)
            .map(|i| fresh_address("channel", &format!("ov{i}")))
            .collect();
        let mut shards: Vec<u32> = addrs.iter().map(|a| a.partition(SHARDS)).collect();
        shards.sort_unstable();
        shards.dedup();
        // Messages both writers send have the same id; the others are each writer's own.
        let id = |n: usize, t: usize, b: usize, i: usize| {
            if b.is_multiple_of(3) && i.is_multiple_of(4) {
                (format!("s{t}-{b}-{i}"), false)
            } else {
                (format!("n{n}-{t}-{b}-{i}"), true)
            }
        };
        let mut tasks = Vec::new();
        for (n, m) in nodes.iter().enumerate() {
            m.claim(&shards).await.expect("claim");
            let generation = Arc::new(tokio::sync::Mutex::new(0u64));
            for t in 0..TASKS {
                let (m, addrs, shards) = (m.clone(), addrs.clone(), shards.clone());
                let generation = generation.clone();
                tasks.push(tokio::spawn(async move {
                    let (mut got, mut failed) = (Vec::new(), 0);
                    for b in 0..BATCHES {
                        let mut batch: Vec<_> = (0..PER_BATCH)
                            .map(|i| {
                                let (id, minted) = id(n, t, b, i);
                                let mut x = msg(&addrs[i % addrs.len()], &id);
                                x.new_id = minted;
                                x
                            })
                            .collect();
                        loop {
                            let seen = *generation.lock().await;
                            match m.append(batch.clone()).await {
                                Ok(out) => {
                                    got.extend(out.into_iter().map(|a| {
                                        let x = &a.message;
                                        (x.address.clone(), x.version, x.id.clone())
                                    }));
                                    break;
                                }
                                Err(e) => {
                                    failed += 1;
                                    assert!(failed < 5_000, "append keeps failing: {e}");
                                    if let MailboxError::Fenced(_) = e {
                                        // The writer takes the shards back once per fence (as
                                        // its consumer does on a rebalance), not once per task.
                                        let mut g = generation.lock().await;
                                        if *g == seen {
                                            m.claim(&shards).await.expect("claim");
                                            *g += 1;
                                        }
                                    } else {
                                        assert!(matches!(e, MailboxError::Unavailable(_)), "{e}");
                                        tokio::time::sleep(std::time::Duration::from_millis(20))
                                            .await;
                                    }
                                    // A retry is not a first delivery.
                                    for x in &mut batch {
                                        x.new_id = false;
                                    }
                                }
                            }
                        }
                    }
                    (got, failed)
                }));
            }
        }
        let mut answered = Vec::new();
        let mut failed = 0;
        for t in tasks {
            let (got, f) = t.await.unwrap();
            failed += f;
            answered.extend(got);
        }
        eprintln!("overlapping appends: {failed} failed and retried");
        check_answers(&addrs, answered, |a| {
            (0..2)
                .flat_map(|n| (0..TASKS).map(move |t| (n, t)))
                .flat_map(|(n, t)| (0..BATCHES).map(move |b| (n, t, b)))
                .flat_map(|(n, t, b)| (0..PER_BATCH).map(move |i| (n, t, b, i)))
                .filter(|&(_, _, _, i)| &addrs[i % addrs.len()] == a)
                .map(|(n, t, b, i)| id(n, t, b, i).0)
                .collect()
        })
        .await;
    }

    /// A run of overlapping appends (the Kafka consumer's pipeline) keeps its order across a
    /// failure: the writer's shard is claimed by another, so its first append is fenced; the two
    /// started behind it (each once the one before had begun) fail too, and none of the three
    /// is visible. Until the run restarts, its appends are refused without being appended;
    /// after it, the three are appended again in their order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn a_run_keeps_its_order_across_a_failure() {
        use signalpost::mailbox::Run;
        let scope = settings(0).scope;
        let writer = Arc::new(mailbox_in(&scope, 60_000).await);
        let other = mailbox_in(&scope, 60_000).await;
        let a = fresh_address("channel", "run");
        let shard = a.partition(SHARDS);
        let batch = |p: &str| -> Vec<_> { (0..4).map(|i| msg(&a, &format!("{p}{i}"))).collect() };
        writer.append(batch("w")).await.unwrap();
        other.claim(&[shard]).await.unwrap(); // the writer is a zombie from here on
        let run = Arc::new(Run::default());
        let mut under_way = Vec::new();
        for p in ["k", "l", "m"] {
            let (begun, begun_rx) = tokio::sync::oneshot::channel();
            let (w, run, b) = (writer.clone(), run.clone(), batch(p));
            under_way.push(tokio::spawn(
                async move { w.append_in(&run, b, begun).await },
            ));
            let _ = begun_rx.await;
        }
        for t in under_way {
            assert!(
                t.await.unwrap().is_err(),
                "every append behind the fenced one fails"
            );
        }
        assert!(run.failed());
        let reader = mailbox(60_000).await;
        let ids = |page: signalpost::mailbox::Page| -> Vec<String> {
            page.messages.iter().map(|m| m.id.to_string()).collect()
        };
        assert_eq!(
            ids(reader.read(&a, 0, 100).await.unwrap()),
            ["w0", "w1", "w2", "w3"],
            "nothing of the failed run is visible"
        );
        // Refused, not appended, until the run restarts.
        writer.claim(&[shard]).await.unwrap();
        let (begun, _) = tokio::sync::oneshot::channel();
        assert!(writer.append_in(&run, batch("x"), begun).await.is_err());
        run.restart();
        for p in ["k", "l", "m"] {
            let (begun, _) = tokio::sync::oneshot::channel();
            writer.append_in(&run, batch(p), begun).await.unwrap();
        }
        let got = ids(reader.read(&a, 0, 100).await.unwrap());
        let want: Vec<String> = ["w", "k", "l", "m"]
            .iter()
            .flat_map(|p| (0..4).map(move |i| format!("{p}{i}")))
            .collect();
        assert_eq!(
            got, want,
            "appended again in the run's order, nothing twice, no x"
        );
    }

    /// A zombie writer (its shard claimed by another since) is fenced: its append fails, nothing
    /// of it becomes visible, it stays fenced until released, and once released it claims the
    /// shard back and continues after the other writer's messages.
    #[tokio::test]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn zombie_is_fenced() {
        let scope = settings(0).scope;
        let zombie = mailbox_in(&scope, 60_000).await;
        let owner = mailbox_in(&scope, 60_000).await;
        let a = fresh_address("channel", "zombie");
        let shard = a.partition(SHARDS);
        let batch = |p: &str, n: usize| (0..n).map(|i| msg(&a, &format!("{p}{i}"))).collect();
        zombie.append(batch("z", 5)).await.unwrap();
        let out = owner.append(batch("o", 5)).await.unwrap();
        assert_eq!(
            out[0].message.version, 6,
            "the new owner continues the versions"
        );
        for _ in 0..2 {
            match zombie.append(batch("late", 3)).await {
                Err(MailboxError::Fenced(_)) => {}
                other => panic!("the zombie must be fenced, got {other:?}"),
            }
        }
        let fresh = mailbox(60_000).await;
        let page = fresh.read(&a, 0, 100).await.unwrap();
        let ids: Vec<String> = page.messages.iter().map(|m| m.id.to_string()).collect();
        assert_eq!(page.head.head, 10);
        assert_eq!(
            ids,
            ["z0", "z1", "z2", "z3", "z4", "o0", "o1", "o2", "o3", "o4"]
        );
        // The owner keeps appending after the zombie's attempts: its versions are not disturbed.
        let out = owner.append(batch("p", 2)).await.unwrap();
        assert_eq!(out[1].message.version, 12);
        // Given the shard again, the old writer claims it and continues; the other is fenced.
        zombie.claim(&[shard]).await.unwrap();
        let out = zombie.append(batch("late", 3)).await.unwrap();
        let versions: Vec<u64> = out.iter().map(|x| x.message.version).collect();
        assert_eq!(versions, [13, 14, 15]);
        assert!(matches!(
            owner.append(batch("q", 1)).await,
            Err(MailboxError::Fenced(_))
        ));
        let page = fresh.read(&a, 0, 100).await.unwrap();
        let versions: Vec<u64> = page.messages.iter().map(|m| m.version).collect();
        assert_eq!(versions, (1..=15).collect::<Vec<_>>());
    }

    /// A new mailbox (a restarted node, empty caches) continues the versions and still knows the ids.
    #[tokio::test]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn survives_reopen() {
        let a = fresh_address("channel", "reopen");
        let scope = settings(0).scope;
        mailbox_in(&scope, 60_000)
            .await
            .append((0..150).map(|i| msg(&a, &format!("r{i}"))).collect())
            .await
            .unwrap();
        let m = mailbox_in(&scope, 60_000).await;
        let again = m
            .append(vec![msg(&a, "r4"), msg(&a, "r149"), msg(&a, "r150")])
            .await
            .unwrap();
        let got: Vec<(u64, bool)> = again
            .iter()
            .map(|x| (x.message.version, x.duplicate))
            .collect();
        assert_eq!(got, vec![(5, true), (150, true), (151, false)]);
        let h = m.heads(std::slice::from_ref(&a)).await.unwrap();
        assert_eq!((h[0].head, h[0].low), (151, 1));
    }
}

#[cfg(feature = "cluster")]
mod cassandra_presence {
    use super::cassandra_support::*;
    use super::*;
    use crate::contract::presence::{member, seen};
    use scylla::client::session::Session;
    use signalpost::address::{Address, ClientId};
    use signalpost::presence::cassandra::CassandraPresence;

    async fn make() -> Arc<dyn Presence> {
        Arc::new(
            CassandraPresence::new(session(KEYSPACE).await, KEYSPACE)
                .await
                .unwrap(),
        )
    }

    presence_suite!(
        #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
        make = make
    );

    /// A session, a presence on it, and a node id and presence address of their own.
    struct Fresh {
        s: Arc<Session>,
        p: CassandraPresence,
        tag: String,
        node: String,
        room: Address,
    }

    async fn fresh(what: &str) -> Fresh {
        let s = session(KEYSPACE).await;
        let p = CassandraPresence::new(s.clone(), KEYSPACE).await.unwrap();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Fresh {
            node: format!("{what}-{tag}"),
            room: Address::parse(&format!("presence:{what}-{tag}")).unwrap(),
            s,
            p,
            tag,
        }
    }

    const SLOTS_OF_NODE: &str = "SELECT slot, live FROM {ks}.presence_slots WHERE node = ?";
    const ROWS_OF_CLIENT: &str = "SELECT slot, live FROM {ks}.presence_clients WHERE client = ?";

    /// One client reconnects 300 times through a node, joining and leaving a presence address
    /// each time, beside a connection that stays: the partitions the leader reads after the
    /// node died and that a lookup of the client reads hold a few rows and no tombstone (the
    /// tables before file 8 got one per disconnect and per leave, and past 100 000 those reads
    /// failed), and a cleanup by another process still finds the connection that stayed.
    #[tokio::test]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn churn_leaves_no_tombstones() {
        let Fresh {
            s,
            p,
            tag,
            node,
            room,
        } = fresh("churn").await;
        let stay = ClientId::parse(&format!("stay-{tag}")).unwrap();
        let looper = ClientId::parse(&format!("loop-{tag}")).unwrap();
        p.connected(&stay, seen(&node, "stay")).await.unwrap();
        assert!(
            p.join(&room, &member(&stay, None), &node, "stay")
                .await
                .unwrap()
        );
        for i in 0..300 {
            let conn = format!("k{i}");
            p.connected(&looper, seen(&node, &conn)).await.unwrap();
            assert!(
                p.join(&room, &member(&looper, None), &node, &conn)
                    .await
                    .unwrap()
            );
            let up = p.lookup(std::slice::from_ref(&looper)).await.unwrap();
            assert_eq!(up, vec![vec![seen(&node, &conn)]], "round {i}");
            assert!(
                p.leave(&room, &looper, &node, &conn)
                    .await
                    .unwrap()
                    .is_some()
            );
            p.disconnected(&looper, &node, &conn).await.unwrap();
        }
        assert_eq!(
            p.lookup(std::slice::from_ref(&looper)).await.unwrap(),
            vec![vec![]]
        );
        let (rows, counts) = traced_read(&s, SLOTS_OF_NODE, &node).await;
        assert_eq!(
            rows, 2,
            "one slot for the connection that stayed, one reused 300 times"
        );
        assert_no_tombstones("the node's slots", &counts);
        let (rows, counts) = traced_read(&s, ROWS_OF_CLIENT, looper.as_str()).await;
        assert_eq!(rows, 1, "one row, the slot's, overwritten 600 times");
        assert_no_tombstones("the client's rows", &counts);
        let leader = CassandraPresence::new(s.clone(), KEYSPACE).await.unwrap();
        let cleared = leader.clear_node(&node).await.unwrap();
        assert_eq!(cleared.connections, 1);
        let left: Vec<(&str, &str)> = cleared
            .left
            .iter()
            .map(|c| (c.address.as_str(), c.member.client.as_str()))
            .collect();
        assert_eq!(left, [(room.as_str(), stay.as_str())]);
        assert_eq!(leader.lookup(&[stay]).await.unwrap(), vec![vec![]]);
        assert!(leader.members(&room, None, 10).await.unwrap().is_empty());
        assert_eq!(
            traced_read(&s, SLOTS_OF_NODE, &node).await.0,
            0,
            "the partition is gone"
        );
    }

    const LISTED: &str = "SELECT node, slot FROM {ks}.presence_member_slots WHERE address = ?";
    const LEGACY_LISTED: &str = "SELECT client FROM {ks}.presence_members WHERE address = ?";

    /// 300 different clients come to a presence address one after another and leave, beside a
    /// member that stays and a member with two connections: the listing names each member once,
    /// in client order, and the address's member list holds a row per slot and at most one
    /// tombstone, not one per client that left (the list before file 9 got one per client, and
    /// past 100 000 its listing failed for everyone).
    #[tokio::test]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn members_come_and_go_without_tombstones() {
        let Fresh {
            s,
            p,
            tag,
            node,
            room,
        } = fresh("lobby").await;
        let stay = ClientId::parse(&format!("b-stay-{tag}")).unwrap();
        let twice = ClientId::parse(&format!("a-twice-{tag}")).unwrap();
        p.connected(&stay, seen(&node, "stay")).await.unwrap();
        assert!(
            p.join(&room, &member(&stay, Some("s")), &node, "stay")
                .await
                .unwrap()
        );
        for conn in ["t1", "t2"] {
            p.connected(&twice, seen(&node, conn)).await.unwrap();
            p.join(&room, &member(&twice, None), &node, conn)
                .await
                .unwrap();
        }
        for i in 0..300 {
            let (visitor, conn) = (
                ClientId::parse(&format!("c-{i:03}-{tag}")).unwrap(),
                format!("v{i}"),
            );
            p.connected(&visitor, seen(&node, &conn)).await.unwrap();
            assert!(
                p.join(&room, &member(&visitor, None), &node, &conn)
                    .await
                    .unwrap()
            );
            let listed: Vec<String> = p
                .members(&room, None, 10)
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.client.as_str().to_owned())
                .collect();
            assert_eq!(
                listed,
                [twice.as_str(), stay.as_str(), visitor.as_str()],
                "round {i}"
            );
            assert!(
                p.leave(&room, &visitor, &node, &conn)
                    .await
                    .unwrap()
                    .is_some()
            );
            p.disconnected(&visitor, &node, &conn).await.unwrap();
        }
        let members = p.members(&room, None, 10).await.unwrap();
        assert_eq!(members, [member(&twice, None), member(&stay, Some("s"))]);
        // Page by page: the second page continues from the first's.
        assert_eq!(
            p.members(&room, None, 1).await.unwrap(),
            [member(&twice, None)]
        );
        assert_eq!(
            p.members(&room, Some(&twice), 1).await.unwrap(),
            [member(&stay, Some("s"))]
        );
        assert!(p.members(&room, Some(&stay), 1).await.unwrap().is_empty());
        let (rows, counts) = traced_read(&s, LISTED, room.as_str()).await;
        assert_eq!(rows, 3, "a row per connection holding a membership");
        assert!(!counts.is_empty(), "the trace counts what it read");
        assert!(
            tombstones(&counts) <= 1,
            "one key deleted 300 times is one tombstone: {counts:?}"
        );
        let (rows, counts) = traced_read(&s, LEGACY_LISTED, room.as_str()).await;
        assert_eq!(
            (rows, tombstones(&counts)),
            (0, 0),
            "the old list is not written: {counts:?}"
        );
        // A dead node's rows go with its cleanup.
        let cleared = CassandraPresence::new(s.clone(), KEYSPACE)
            .await
            .unwrap()
            .clear_node(&node)
            .await
            .unwrap();
        assert_eq!(cleared.left.len(), 2);
        assert!(p.members(&room, None, 10).await.unwrap().is_empty());
        assert_eq!(traced_read(&s, LISTED, room.as_str()).await.0, 0);
    }

    /// Listing a member list reads the address's whole partition, so listings of one address
    /// that arrive together share reads: 40 at once cost two (the one under way when they came,
    /// and one after it for all the others), and each sees every member.
    #[tokio::test]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn concurrent_listings_share_reads() {
        let Fresh {
            p, tag, node, room, ..
        } = fresh("crowd").await;
        let mut want = Vec::new();
        for i in 0..5 {
            let c = ClientId::parse(&format!("c{i}-{tag}")).unwrap();
            p.connected(&c, seen(&node, &format!("k{i}")))
                .await
                .unwrap();
            p.join(&room, &member(&c, None), &node, &format!("k{i}"))
                .await
                .unwrap();
            want.push(member(&c, None));
        }
        let before = p.member_list_reads();
        let lists =
            futures_util::future::join_all((0..40).map(|_| p.members(&room, None, 10))).await;
        let reads = p.member_list_reads() - before;
        for list in lists {
            assert_eq!(list.unwrap(), want);
        }
        assert!(
            reads <= 2,
            "40 listings at once read the list {reads} times"
        );
        // One that comes after them reads again: nobody is served a list read before it asked.
        let c = ClientId::parse(&format!("c9-{tag}")).unwrap();
        p.connected(&c, seen(&node, "k9")).await.unwrap();
        p.join(&room, &member(&c, None), &node, "k9").await.unwrap();
        want.push(member(&c, None));
        assert_eq!(p.members(&room, None, 10).await.unwrap(), want);
        p.clear_node(&node).await.unwrap();
    }

    /// A node that ran a version before `presence_slots` left its rows in `presence_by_node`
    /// and `presence_members_by_node`: the cleanup still finds and ends them.
    #[tokio::test]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn clears_what_an_earlier_version_left() {
        let s = session(KEYSPACE).await;
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let (node, conn) = (format!("old-{tag}"), "c1");
        let room = format!("presence:old-{tag}");
        let client = format!("old-{tag}");
        let key = format!("{node}/{conn}");
        for (cql, values) in [
            (
                "INSERT INTO {ks}.presence_nodes (shard, node) VALUES (0, ?)",
                vec![node.as_str()],
            ),
            (
                "INSERT INTO {ks}.presence (client, node, connection, since) VALUES (?, ?, ?, 1)",
                vec![&client, &node, conn],
            ),
            (
                "INSERT INTO {ks}.presence_by_node (node, client, connection) VALUES (?, ?, ?)",
                vec![&node, &client, conn],
            ),
            (
                "INSERT INTO {ks}.presence_members_by_node (node, address, client, connection) \
                 VALUES (?, ?, ?, ?)",
                vec![&node, &room, &client, conn],
            ),
            (
                "INSERT INTO {ks}.presence_holders (address, client, connections, user, rev) \
                 VALUES (?, ?, ?, 'u', 1)",
                vec![&room, &client, &key],
            ),
            (
                "INSERT INTO {ks}.presence_members (address, client, user) VALUES (?, ?, 'u') \
                 USING TIMESTAMP 1",
                vec![&room, &client],
            ),
        ] {
            s.query_unpaged(cql.replace("{ks}", KEYSPACE), values)
                .await
                .unwrap();
        }
        let p = CassandraPresence::new(s.clone(), KEYSPACE).await.unwrap();
        let (room, client) = (
            Address::parse(&room).unwrap(),
            ClientId::parse(&client).unwrap(),
        );
        assert_eq!(p.members(&room, None, 10).await.unwrap().len(), 1);
        let seen_old = p.lookup(std::slice::from_ref(&client)).await.unwrap();
        assert_eq!(seen_old[0].len(), 1, "lookups still see its connections");
        assert_eq!(seen_old[0][0].connection, conn);
        let cleared = p.clear_node(&node).await.unwrap();
        assert_eq!(cleared.connections, 1);
        assert_eq!(cleared.left.len(), 1);
        assert_eq!(cleared.left[0].member.user.as_deref(), Some("u"));
        assert_eq!(p.lookup(&[client]).await.unwrap(), vec![vec![]]);
        assert!(p.members(&room, None, 10).await.unwrap().is_empty());
        assert!(!p.nodes().await.unwrap().contains(&node));
    }
}

/// The topology suite against the layout of bindings before schema file 10, which a node
/// keeps using (mirroring every change into `client_bindings`) until `migrate bindings`.
#[cfg(feature = "cluster")]
mod cassandra_topology_legacy {
    use super::cassandra_support::*;

    async fn make() -> ((), CassandraTopology) {
        ((), topology_in(Layout::Legacy).await)
    }

    topology_suite!(
        #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
        make = make
    );
}

#[cfg(feature = "cluster")]
mod cassandra_topology {
    use super::cassandra_support::*;
    use super::*;
    use crate::contract::topology::{LIMIT, TTL};
    use signalpost::topology::Binding;

    async fn make() -> ((), signalpost::topology::cassandra::CassandraTopology) {
        ((), topology().await)
    }

    topology_suite!(
        #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
        make = make
    );

    /// Exact under concurrency only with one row per client (not in the old layout).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn concurrent_bind_limit() {
        crate::contract::topology::concurrent_bind_limit(Arc::new(topology().await)).await;
    }

    /// A client bound to and unbound from 300 different addresses leaves no tombstone in the
    /// partition its bindings are read from (`client_bindings`, one cell rewritten whole); the
    /// table versions before schema file 10 kept the bindings in, read the same way after the
    /// same churn, holds a tombstone per address (so the assertion can fail), and past
    /// 100 000 that read failed and the client could no longer connect.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn bindings_come_and_go_without_tombstones() {
        let s = session(KEYSPACE).await;
        let churn = async |t: &CassandraTopology, tag: &str| {
            let c = signalpost::address::ClientId::parse(&format!(
                "{tag}-{}",
                uuid::Uuid::new_v4().simple()
            ))
            .unwrap();
            let stays = contract::mailbox::fresh_address("channel", "stays");
            t.add(
                &c,
                &[Binding {
                    address: stays.clone(),
                    since: 3,
                }],
                LIMIT,
            )
            .await
            .unwrap();
            for round in 0..30 {
                let batch: Vec<Binding> = (0..10)
                    .map(|i| Binding {
                        address: contract::mailbox::fresh_address(
                            "channel",
                            &format!("v{round}-{i}"),
                        ),
                        since: 0,
                    })
                    .collect();
                assert_eq!(t.add(&c, &batch, LIMIT).await.unwrap().len(), 10);
                let addresses: Vec<_> = batch.into_iter().map(|b| b.address).collect();
                assert_eq!(t.remove(&c, &addresses).await.unwrap(), addresses);
            }
            assert_eq!(
                Topology::get(t, &c).await.unwrap(),
                vec![Binding {
                    address: stays,
                    since: 3
                }]
            );
            c
        };
        let c = churn(&topology_in(Layout::Rows).await, "churn-rows").await;
        let (rows, counts) = traced_read(
            &s,
            "SELECT bindings FROM {ks}.client_bindings WHERE client = ?",
            c.as_str(),
        )
        .await;
        assert_eq!(rows, 1);
        assert_no_tombstones("the bindings of a client that churned", &counts);
        let (rows, counts) = traced_read(
            &s,
            "SELECT address FROM {ks}.client_addresses WHERE client = ?",
            c.as_str(),
        )
        .await;
        assert_eq!(rows, 0, "nothing is written in the table before file 10");
        assert_eq!(tombstones(&counts), 0, "{counts:?}");
        // The layout before file 10, the same churn.
        let c = churn(&topology_in(Layout::Legacy).await, "churn-legacy").await;
        let (rows, counts) = traced_read(
            &s,
            "SELECT address FROM {ks}.client_addresses WHERE client = ?",
            c.as_str(),
        )
        .await;
        assert_eq!(rows, 1);
        assert!(tombstones(&counts) >= 300, "{counts:?}");
    }

    /// A keyspace whose bindings were recorded by versions before schema file 10 keeps that
    /// record until `migrate_bindings`, which catches `client_bindings` up with it; then nodes
    /// read `client_bindings`, and an unbinding there also removes the old row, so that a node
    /// not yet switched does not see it bound either. A new keyspace starts with the rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn migration_keeps_every_binding() {
        use signalpost::address::{Address, ClientId};
        use signalpost::topology::cassandra::migrate_bindings;
        const KS: &str = "signalpost_migrate";
        let s = Arc::new(
            signalpost::cassandra::connect(&contact_points(), Some(KS))
                .await
                .unwrap(),
        );
        s.query_unpaged(format!("DROP KEYSPACE IF EXISTS {KS}"), ())
            .await
            .unwrap();
        let apply = async || {
            signalpost::cassandra::apply_schema(
                &s,
                KS,
                signalpost::cassandra::LOCAL_REPLICATION,
                "it",
            )
            .await
            .unwrap()
        };
        let setting = async || {
            s.query_unpaged(
                format!("SELECT value FROM {KS}.settings WHERE name = 'bindings'"),
                (),
            )
            .await
            .unwrap()
            .into_rows_result()
            .unwrap()
            .maybe_first_row::<(String,)>()
            .unwrap()
            .map(|(v,)| v)
        };
        apply().await;
        assert_eq!(
            setting().await.as_deref(),
            Some("rows"),
            "a new keyspace has rows"
        );
        // As a keyspace of an earlier version: no setting, and applying the schema again (as
        // every node start does) does not add one.
        s.query_unpaged(
            format!("DELETE FROM {KS}.settings WHERE name = 'bindings'"),
            (),
        )
        .await
        .unwrap();
        apply().await;
        assert_eq!(
            setting().await,
            None,
            "an existing keyspace keeps its record"
        );

        let client = |n: &str| ClientId::parse(&format!("mig-{n}")).unwrap();
        let address = |n: &str| Address::parse(&format!("channel:mig-{n}")).unwrap();
        let bind = |n: &str, since: u64| Binding {
            address: address(n),
            since,
        };
        let sorted = |mut v: Vec<Binding>| {
            v.sort_by(|x, y| x.address.cmp(&y.address));
            v
        };
        // Client a: bound by a node of an earlier version (client_addresses only).
        for (n, since) in [("x", 4), ("y", 7)] {
            s.query_unpaged(
                format!(
                    "INSERT INTO {KS}.client_addresses (client, address, since) VALUES (?, ?, ?)"
                ),
                ("mig-a", address(n).as_str(), since as i64),
            )
            .await
            .unwrap();
        }
        // Client b: bound and unbound by a node of this version before the migration.
        let old = CassandraTopology::new(s.clone(), KS).await.unwrap();
        old.add(&client("b"), &[bind("p", 1), bind("q", 2)], LIMIT)
            .await
            .unwrap();
        old.remove(&client("b"), &[address("q")]).await.unwrap();
        // Client c: a row in client_bindings that the record does not have (a node that died
        // between the two writes of an unbinding).
        s.query_unpaged(
            format!("INSERT INTO {KS}.client_bindings (client, bindings, rev) VALUES ('mig-c', {{'channel:mig-z': 1}}, 1)"),
            (),
        )
        .await
        .unwrap();
        assert_eq!(
            sorted(Topology::get(&old, &client("a")).await.unwrap()),
            vec![bind("x", 4), bind("y", 7)],
            "before the migration, client_addresses is the record"
        );
        assert!(Topology::get(&old, &client("c")).await.unwrap().is_empty());

        let done = migrate_bindings(s.clone(), KS).await.unwrap();
        assert_eq!(done.already, Layout::Legacy);
        assert_eq!(done.changed, 2, "a's row written, c's emptied: {done:?}");
        assert_eq!(setting().await.as_deref(), Some("migrated"));
        let new = CassandraTopology::new(s.clone(), KS).await.unwrap();
        assert_eq!(
            sorted(Topology::get(&new, &client("a")).await.unwrap()),
            vec![bind("x", 4), bind("y", 7)]
        );
        assert_eq!(
            Topology::get(&new, &client("b")).await.unwrap(),
            vec![bind("p", 1)]
        );
        assert!(Topology::get(&new, &client("c")).await.unwrap().is_empty());
        // Unbinding after the switch also removes the old row: the node that has not read the
        // settings again yet (`old`) does not see x bound any more.
        assert_eq!(
            new.remove(&client("a"), &[address("x")]).await.unwrap(),
            vec![address("x")]
        );
        assert_eq!(
            Topology::get(&old, &client("a")).await.unwrap(),
            vec![bind("y", 7)]
        );
        assert_eq!(
            Topology::get(&new, &client("a")).await.unwrap(),
            vec![bind("y", 7)]
        );
        // Bound after the switch (in client_bindings only), then a second run: it does nothing,
        // where catching up with client_addresses again would undo that binding.
        new.add(&client("a"), &[bind("w", 9)], LIMIT).await.unwrap();
        let again = migrate_bindings(s.clone(), KS).await.unwrap();
        assert_eq!(
            (again.already, again.changed),
            (Layout::Migrated, 0),
            "{again:?}"
        );
        assert_eq!(
            sorted(Topology::get(&new, &client("a")).await.unwrap()),
            vec![bind("w", 9), bind("y", 7)]
        );
        s.query_unpaged(format!("DROP KEYSPACE IF EXISTS {KS}"), ())
            .await
            .unwrap();
    }

    /// Concurrent saves of one cursor keep the maximum, whatever order they land in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn concurrent_cursor_saves_keep_max() {
        let t = topology().await;
        let c =
            signalpost::address::ClientId::parse(&format!("cc-{}", uuid::Uuid::new_v4().simple()))
                .unwrap();
        let a = contract::mailbox::fresh_address("channel", "cc");
        let mut tasks = Vec::new();
        for v in (1..=200u64).rev() {
            let (t, c, a) = (t.clone(), c.clone(), a.clone());
            tasks.push(tokio::spawn(async move {
                Cursors::save(&t, &[(c, a, v)], TTL).await.unwrap()
            }));
        }
        for x in tasks {
            x.await.unwrap();
        }
        assert_eq!(Cursors::get(&t, &c).await.unwrap().get(&a), Some(&200));
    }

    /// A cursor lives its TTL after its last ack, so a client's cursors partition holds only
    /// what it acked within the retention (before, cursors were never deleted and `connect`
    /// read every address a client had ever acked).
    #[tokio::test]
    #[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
    async fn cursors_expire_after_their_ttl() {
        let t = topology().await;
        let c =
            signalpost::address::ClientId::parse(&format!("ct-{}", uuid::Uuid::new_v4().simple()))
                .unwrap();
        let (old, kept) = (
            contract::mailbox::fresh_address("channel", "old"),
            contract::mailbox::fresh_address("channel", "kept"),
        );
        Cursors::save(&t, &[(c.clone(), old.clone(), 3)], 1)
            .await
            .unwrap();
        Cursors::save(&t, &[(c.clone(), kept.clone(), 5)], TTL)
            .await
            .unwrap();
        let (ttl,): (Option<i32>,) = session(KEYSPACE)
            .await
            .query_unpaged(
                format!(
                    "SELECT TTL(version) FROM {KEYSPACE}.cursors WHERE client = ? AND address = ?"
                ),
                (c.as_str(), kept.as_str()),
            )
            .await
            .unwrap()
            .into_rows_result()
            .unwrap()
            .single_row()
            .unwrap();
        let ttl = ttl.expect("the cursor has a TTL");
        assert!(
            ttl > TTL as i32 - 60 && ttl <= TTL as i32,
            "TTL {ttl} of {TTL}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        let got = Cursors::get(&t, &c).await.unwrap();
        assert_eq!(got.get(&old), None, "the cursor past its TTL is gone");
        assert_eq!(got.get(&kept), Some(&5));
    }
}

/// Append throughput of the Cassandra mailbox against the raw rate of writing the same rows,
/// batched the same way, with no reads and no fence (`CassandraMailbox::write_unfenced`).
/// Prints the numbers; run with
/// `SIGNALPOST_BENCH=1 cargo test --release --test it -- --ignored throughput --nocapture`
/// (without `SIGNALPOST_BENCH` it returns at once, so `--include-ignored` runs stay quick).
/// `signalpost bench --scenario cluster-append` measures the same through Kafka and a node.
#[cfg(feature = "cluster")]
mod throughput {
    use super::cassandra_support::*;
    use crate::contract::mailbox::msg;
    use signalpost::mailbox::Mailbox;
    use signalpost::mailbox::cassandra::{CassandraMailbox, DEFAULT_BUCKET_SIZE};
    use std::time::Instant;

    const KS: &str = "signalpost_bench";

    /// `minted`: ids minted for the messages and vouched for after an explicit claim (no id
    /// lookup), as a Kafka consumer does; otherwise ids given by the sender (looked up).
    async fn run(label: &str, addresses: usize, batches: usize, per_batch: usize, minted: bool) {
        let session = session(KS).await;
        let mut s = settings(30 * 24 * 3600 * 1000);
        s.keyspace = KS.into();
        s.bucket_size = DEFAULT_BUCKET_SIZE;
        let m = CassandraMailbox::new(session.clone(), &s).await.unwrap();
        if minted {
            m.claim(&(0..SHARDS).collect::<Vec<_>>()).await.unwrap();
        }
        let run = uuid::Uuid::new_v4().simple().to_string();
        let addrs = |kind: &str| -> Vec<signalpost::address::Address> {
            (0..addresses)
                .map(|i| {
                    signalpost::address::Address::parse(&format!("channel:{kind}{}-{i}", &run[..8]))
                        .unwrap()
                })
                .collect()
        };
        let make = |addrs: &[signalpost::address::Address], b: usize| -> Vec<_> {
            (0..per_batch)
                .map(|i| {
                    let mut m = msg(
                        &addrs[(b * per_batch + i) % addresses],
                        &format!("m{b}-{i}"),
                    );
                    m.new_id = minted;
                    m
                })
                .collect()
        };
        let total = (batches * per_batch) as f64;
        let fenced = addrs("b");
        let t = Instant::now();
        for b in 0..batches {
            m.append(make(&fenced, b)).await.unwrap();
        }
        let mailbox = t.elapsed().as_secs_f64();
        let raw_addrs = addrs("r");
        let mut counters = std::collections::HashMap::new();
        let t = Instant::now();
        for b in 0..batches {
            m.write_unfenced(make(&raw_addrs, b), &mut counters)
                .await
                .unwrap();
        }
        let raw = t.elapsed().as_secs_f64();
        println!(
            "{label}: {} messages over {addresses} addresses in batches of {per_batch}: \
             mailbox {:.1} s = {:.0} msg/s; the same rows written raw {:.1} s = {:.0} msg/s; ratio {:.2}",
            total as u64,
            mailbox,
            total / mailbox,
            raw,
            total / raw,
            raw / mailbox
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark, needs Cassandra: scripts/stack up, then SIGNALPOST_BENCH=1 cargo test --release --test it -- --ignored throughput --nocapture"]
    async fn cassandra_mailbox_append() {
        if std::env::var_os("SIGNALPOST_BENCH").is_none() {
            eprintln!("skipped: set SIGNALPOST_BENCH=1 to run the benchmark");
            return;
        }
        let n: usize = std::env::var("SIGNALPOST_BENCH_BATCHES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(100);
        run("1000 addresses, sender ids", 1000, n, 1000, false).await;
        run("1000 addresses, minted ids", 1000, n, 1000, true).await;
        run("10 addresses, sender ids", 10, n, 1000, false).await;
        run("10 addresses, minted ids", 10, n, 1000, true).await;
    }
}
