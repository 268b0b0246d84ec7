//! `signalpost stack` — the protocol side of `scripts/stack` — against the real servers
//! (`scripts/stack up`): the binary is run as the script runs it, and what it says is checked
//! against the servers themselves. Fresh topic and keyspace names, so it runs beside the rest.

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::process::Command;
use std::time::Duration;

fn kafka() -> String {
    std::env::var("SIGNALPOST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn zookeeper() -> String {
    std::env::var("SIGNALPOST_ZOOKEEPER").unwrap_or_else(|_| "127.0.0.1:2181".into())
}

fn cassandra() -> String {
    crate::cassandra_support::contact_points()
}

/// What `signalpost stack ARGS…` did.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn stack(args: &[&str]) -> Ran {
    let out = Command::new(env!("CARGO_BIN_EXE_signalpost"))
        .arg("stack")
        .args(args)
        .output()
        .expect("run signalpost");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Like [`stack`], asserting success.
fn stack_ok(args: &[&str]) -> String {
    let r = stack(args);
    assert_eq!(r.code, Some(0), "stack {args:?}: {}{}", r.stdout, r.stderr);
    r.stdout
}

/// A local port nothing listens on (bound, then let go).
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    addr
}

#[test]
#[ignore = "needs Cassandra, Kafka and ZooKeeper: scripts/stack up, then cargo test -- --include-ignored"]
fn probes_answer_when_the_servers_do_and_say_why_not_when_not() {
    let out = stack_ok(&["probe", "cassandra", "--addr", &cassandra()]);
    assert!(
        out.starts_with("Cassandra 5.") && out.lines().count() == 1,
        "{out}"
    );
    let out = stack_ok(&["probe", "kafka", "--addr", &kafka()]);
    let count = out.trim_end().strip_suffix(" topics");
    assert!(count.is_some_and(|n| n.parse::<usize>().is_ok()), "{out}");
    let out = stack_ok(&["probe", "zookeeper", "--addr", &zookeeper()]);
    assert!(
        out.starts_with("imok, ") && out.trim_end().ends_with(" ZooKeeper 3.9.5"),
        "{out}"
    );

    let nobody = closed_port();
    for (server, says) in [
        ("cassandra", "cannot connect to Cassandra at "),
        ("kafka", "kafka: "),
        ("zookeeper", "zookeeper: ruok: "),
    ] {
        let r = stack(&["probe", server, "--addr", &nobody]);
        assert_eq!(r.code, Some(1), "{server}: {}{}", r.stdout, r.stderr);
        assert!(r.stdout.is_empty(), "{server}: {}", r.stdout);
        assert!(r.stderr.starts_with(says), "{server}: {}", r.stderr);
    }
}

/// Partition counts of `topics` as the broker reports them (0: not there), once all are there
/// or after 10 s.
fn partitions(topics: &[&str]) -> Vec<usize> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let mut counts = Vec::new();
    for _ in 0..40 {
        let md = c.fetch_metadata(None, Duration::from_secs(5)).unwrap();
        counts = topics
            .iter()
            .map(|name| {
                md.topics()
                    .iter()
                    .find(|t| t.name() == *name && t.error().is_none())
                    .map_or(0, |t| t.partitions().len())
            })
            .collect();
        if counts.iter().all(|n| *n > 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    counts
}

#[test]
#[ignore = "needs Kafka: scripts/stack up, then cargo test -- --include-ignored"]
fn topics_creates_what_is_missing_and_leaves_what_exists() {
    let name = format!("it-stack-{}", uuid::Uuid::new_v4().simple());
    let dead = format!("{name}.dl");
    let out = stack_ok(&[
        "topics",
        "--addr",
        &kafka(),
        &format!("{name}:3"),
        &format!("{dead}:1"),
    ]);
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        [
            format!("created topic {name}"),
            format!("created topic {dead}")
        ]
    );
    assert_eq!(partitions(&[&name, &dead]), [3, 1]);

    // Again, with another count for one: nothing is created, the difference is reported.
    let out = stack_ok(&[
        "topics",
        "--addr",
        &kafka(),
        &format!("{name}:5"),
        &format!("{dead}:1"),
    ]);
    assert_eq!(
        out,
        format!(
            "note: topic {name} exists with 3 partitions (wanted 5); left as it is\n\
             topics present: {name} {dead}\n"
        )
    );
    assert_eq!(partitions(&[&name]), [3]);

    let r = stack(&[
        "topics",
        "--addr",
        &kafka(),
        "no-count",
        &format!("{name}:0"),
    ]);
    assert_eq!(r.code, Some(2), "a usage error: {}", r.stderr);

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for r in rt
        .block_on(admin.delete_topics(&[&name, &dead], &AdminOptions::new()))
        .unwrap()
    {
        r.expect("topic deleted");
    }
}

#[test]
#[ignore = "needs Cassandra: scripts/stack up, then cargo test -- --include-ignored"]
fn cql_creates_a_table_in_a_fresh_keyspace_and_reads_a_row_back() {
    let ks = format!("it_stack_{}", uuid::Uuid::new_v4().simple());
    let addr = cassandra();
    let ddl = "-- {keyspace} and {replication} are filled in; this comment is dropped\n\
               CREATE KEYSPACE {keyspace} WITH replication = {replication};\n\
               CREATE TABLE {keyspace}.t (k text PRIMARY KEY, v int); /* a; comment */\n\
               INSERT INTO {keyspace}.t (k, v) VALUES ('a;b', 7);\n\
               INSERT INTO {keyspace}.t (k, v) VALUES ('it''s', 8)";
    let out = stack_ok(&[
        "cql",
        "--addr",
        &addr,
        "--set",
        &format!("keyspace={ks}"),
        "--set",
        &format!("replication={}", signalpost::cassandra::LOCAL_REPLICATION),
        ddl,
    ]);
    assert_eq!(out, "4 statements done\n");

    let out = stack_ok(&[
        "cql",
        "--addr",
        &addr,
        "-k",
        &ks,
        "SELECT k, v FROM t WHERE k = 'a;b'; SELECT v, k FROM t WHERE k = 'it''s'",
    ]);
    assert_eq!(out, "k | v\na;b | 7\n(1 rows)\nv | k\n8 | it's\n(1 rows)\n");

    let r = stack(&["cql", "--addr", &addr, "-k", &ks, "SELECT nope FROM t"]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("nope") && r.stderr.ends_with("\n  in: SELECT nope FROM t\n"),
        "{}",
        r.stderr
    );

    let out = stack_ok(&["cql", "--addr", &addr, &format!("DROP KEYSPACE {ks}")]);
    assert_eq!(out, "1 statement done\n");
}
