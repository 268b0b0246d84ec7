//! `signalpost stack`: the protocol side of `scripts/stack` (which only launches the servers) —
//! readiness probes for Cassandra, Kafka and ZooKeeper, Kafka topic creation and a small CQL
//! client, through the crate's own clients: the scylla session of [`signalpost::cassandra`], the
//! rdkafka admin of [`signalpost::ingest::kafka`], and ZooKeeper's four-letter words.
//!
//! Each command prints one line per fact on stdout and exits 0, or prints why on stderr and
//! exits 1 (a probe: the server does not really answer yet).

use signalpost::cassandra;
use signalpost::ingest::IngestError;
use signalpost::ingest::kafka::{INTERNAL_TOPICS, KafkaAdmin, TopicCreated};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a probe may take in all before it counts as "not answering".
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting and each exchange of a probe.
const STEP_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, clap::Args)]
pub struct StackArgs {
    #[command(subcommand)]
    command: StackCommand,
}

#[derive(Debug, clap::Subcommand)]
enum StackCommand {
    /// Exit 0 and print one line if the server answers a real request of its own protocol:
    /// Cassandra a CQL query, Kafka a metadata request listing a broker and a validate-only
    /// CreateTopics its controller answers, ZooKeeper `ruok` (imok) and `srvr` (serving).
    ///
    /// Example: signalpost stack probe kafka --addr 127.0.0.1:9092
    Probe {
        server: Server,
        /// host:port [default: 127.0.0.1 and the server's port: 9042, 9092, 2181]
        #[arg(long)]
        addr: Option<String>,
    },
    /// Create the Kafka topics that do not exist (replication factor 1); a topic that exists with
    /// another partition count is reported and left as it is.
    ///
    /// Example: signalpost stack topics signals.enqueue:8 signals.deadletter:1
    Topics {
        /// The broker, host:port
        #[arg(long, default_value = "127.0.0.1:9092")]
        addr: String,
        /// NAME:PARTITIONS
        #[arg(required = true, value_parser = parse_topic)]
        topics: Vec<(String, i32)>,
    },
    /// Run CQL statements (split at `;` outside quotes and comments) and print the rows.
    ///
    /// Example: signalpost stack cql -k signalpost "SELECT * FROM schema_migrations"
    Cql {
        /// A Cassandra contact point, host:port
        #[arg(long, default_value = "127.0.0.1:9042")]
        addr: String,
        /// The keyspace to use first
        #[arg(short, long)]
        keyspace: Option<String>,
        /// Replace {KEY} with VALUE in the text (repeatable)
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting)]
        set: Vec<(String, String)>,
        /// The statements (several arguments are joined by newlines; a text may begin with a
        /// `--` comment)
        #[arg(required = true, allow_hyphen_values = true)]
        text: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Server {
    Cassandra,
    Kafka,
    Zookeeper,
}

impl Server {
    fn default_addr(self) -> &'static str {
        match self {
            Server::Cassandra => "127.0.0.1:9042",
            Server::Kafka => "127.0.0.1:9092",
            Server::Zookeeper => "127.0.0.1:2181",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Server::Cassandra => "cassandra",
            Server::Kafka => "kafka",
            Server::Zookeeper => "zookeeper",
        }
    }
}

/// Why a command did not succeed; the message is printed as it is.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Cassandra(#[from] cassandra::CassandraError),
    #[error("{message}\n  in: {statement}")]
    Cql { message: String, statement: String },
}

fn kafka(e: IngestError) -> StackError {
    match e {
        IngestError::Unavailable(m) => StackError::Failed(m),
        e => StackError::Failed(format!("kafka: {e}")),
    }
}

fn parse_topic(s: &str) -> Result<(String, i32), String> {
    let bad = || format!("{s:?}: expected NAME:PARTITIONS, e.g. signals.enqueue:8");
    let (name, n) = s.rsplit_once(':').ok_or_else(bad)?;
    match n.parse::<i32>() {
        Ok(n) if n >= 1 && !name.is_empty() => Ok((name.to_owned(), n)),
        _ => Err(bad()),
    }
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

pub async fn run(args: StackArgs) -> Result<(), StackError> {
    match args.command {
        StackCommand::Probe { server, addr } => {
            let addr = addr.as_deref().unwrap_or(server.default_addr());
            let answer = tokio::time::timeout(PROBE_TIMEOUT, probe(server, addr))
                .await
                .map_err(|_| {
                    StackError::Failed(format!(
                        "{}: no answer from {addr} in {} s",
                        server.name(),
                        PROBE_TIMEOUT.as_secs()
                    ))
                })??;
            println!("{answer}");
            Ok(())
        }
        StackCommand::Topics { addr, topics } => {
            for line in ensure_topics(&addr, &topics).await? {
                println!("{line}");
            }
            Ok(())
        }
        StackCommand::Cql {
            addr,
            keyspace,
            set,
            text,
        } => cql(&addr, keyspace.as_deref(), &set, &text.join("\n")).await,
    }
}

/// The one-line summary of a server that answers, or why it does not.
async fn probe(server: Server, addr: &str) -> Result<String, StackError> {
    match server {
        Server::Cassandra => {
            let session = cassandra::connect(addr, None).await?;
            let version = cassandra::release_version(&session).await?;
            Ok(format!("Cassandra {version}"))
        }
        Server::Kafka => {
            let admin = KafkaAdmin::connect(addr).map_err(kafka)?;
            let md = admin.metadata(None, STEP_TIMEOUT).await.map_err(kafka)?;
            if md.brokers.is_empty() {
                return Err(StackError::Failed("kafka: no broker listed yet".into()));
            }
            // KRaft answers a Metadata request with a live broker as "controller" (requests are
            // forwarded), so ask the controller itself: a CreateTopics it only validates.
            let check = [("signalpost-stack-probe", 1)];
            for (_, r) in admin.create_topics(&check, true).await.map_err(kafka)? {
                r.map_err(|e| StackError::Failed(format!("kafka: no controller yet: {e}")))?;
            }
            let user = md
                .topics
                .keys()
                .filter(|t| !INTERNAL_TOPICS.contains(&t.as_str()))
                .count();
            Ok(format!("{user} topics"))
        }
        Server::Zookeeper => {
            let ruok = four_letter_word(addr, "ruok").await?;
            if ruok != "imok" {
                return Err(StackError::Failed(format!(
                    "zookeeper: ruok answered {ruok:?}"
                )));
            }
            // `ruok` only says the process listens; `srvr` says whether it serves requests.
            let srvr = four_letter_word(addr, "srvr").await?;
            let field = |key: &str| {
                srvr.lines()
                    .filter_map(|l| l.split_once(": "))
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.trim().to_owned())
            };
            let mode = field("Mode")
                .ok_or_else(|| StackError::Failed("zookeeper: not serving requests yet".into()))?;
            let version = field("Zookeeper version").unwrap_or_else(|| "?".into());
            let version = version.split('-').next().unwrap_or_default();
            Ok(format!("imok, {mode}, ZooKeeper {version}"))
        }
    }
}

/// Sends a ZooKeeper four-letter word and reads the answer to its end.
async fn four_letter_word(addr: &str, word: &str) -> Result<String, StackError> {
    let failed = |e: &dyn std::fmt::Display| StackError::Failed(format!("zookeeper: {word}: {e}"));
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(word.as_bytes()).await?;
        s.shutdown().await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&got).into_owned())
    };
    match tokio::time::timeout(STEP_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(failed(&format!("{e} ({addr})"))),
        Err(_) => Err(failed(&format!("no answer from {addr}"))),
    }
}

/// Creates the missing topics; the lines to print, or why some could not be created.
async fn ensure_topics(addr: &str, wanted: &[(String, i32)]) -> Result<Vec<String>, StackError> {
    let admin = KafkaAdmin::connect(addr).map_err(kafka)?;
    let have = admin
        .metadata(None, Duration::from_secs(10))
        .await
        .map_err(kafka)?
        .topics;
    let mut lines = Vec::new();
    let mut missing = Vec::new();
    for (name, partitions) in wanted {
        match have.get(name) {
            Some(t) if t.partitions != *partitions as usize => lines.push(format!(
                "note: topic {name} exists with {} partitions (wanted {partitions}); left as it is",
                t.partitions
            )),
            Some(_) => {}
            None => missing.push((name.as_str(), *partitions)),
        }
    }
    if missing.is_empty() {
        let names: Vec<&str> = wanted.iter().map(|(n, _)| n.as_str()).collect();
        lines.push(format!("topics present: {}", names.join(" ")));
        return Ok(lines);
    }
    let mut refused = Vec::new();
    for (name, r) in admin.create_topics(&missing, false).await.map_err(kafka)? {
        match r {
            Ok(TopicCreated::Created) => lines.push(format!("created topic {name}")),
            Ok(TopicCreated::Existed) => lines.push(format!("topic {name} exists")),
            Err(e) => refused.push(format!("{name}: {e}")),
        }
    }
    if refused.is_empty() {
        Ok(lines)
    } else {
        lines.push(format!(
            "kafka: creating topics failed: {}",
            refused.join("; ")
        ));
        Err(StackError::Failed(lines.join("\n")))
    }
}

/// Runs each statement of `text` (with `{KEY}` replaced), printing rows as `a | b` lines.
async fn cql(
    addr: &str,
    keyspace: Option<&str>,
    set: &[(String, String)],
    text: &str,
) -> Result<(), StackError> {
    let mut text = text.to_owned();
    for (k, v) in set {
        text = text.replace(&format!("{{{k}}}"), v);
    }
    let statements = split_cql(&text);
    if statements.is_empty() {
        return Err(StackError::Failed("cql: no statement given".into()));
    }
    let session = cassandra::connect(addr, None).await?;
    if let Some(ks) = keyspace {
        session
            .use_keyspace(ks, true)
            .await
            .map_err(|e| StackError::Failed(format!("cql: using keyspace {ks:?}: {e}")))?;
    }
    let mut without_rows = 0;
    for stmt in &statements {
        let failed = |message: String| StackError::Cql {
            message,
            statement: stmt
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .chars()
                .take(200)
                .collect(),
        };
        let result = session
            .query_unpaged(stmt.as_str(), ())
            .await
            .map_err(|e| failed(e.to_string()))?;
        for w in result.warnings() {
            eprintln!("warning: {w}");
        }
        if !result.is_rows() {
            without_rows += 1;
            continue;
        }
        let rows = result
            .into_rows_result()
            .map_err(|e| failed(e.to_string()))?;
        let names: Vec<&str> = rows.column_specs().iter().map(|c| c.name()).collect();
        println!("{}", names.join(" | "));
        let mut n = 0;
        for row in rows
            .rows::<scylla::value::Row>()
            .map_err(|e| failed(e.to_string()))?
        {
            let row = row.map_err(|e| failed(e.to_string()))?;
            let cells: Vec<String> = row.columns.iter().map(cell).collect();
            println!("{}", cells.join(" | "));
            n += 1;
        }
        println!("({n} rows)");
    }
    if without_rows > 0 {
        let s = if without_rows == 1 { "" } else { "s" };
        println!("{without_rows} statement{s} done");
    }
    Ok(())
}

/// A value as a person reads it: text as it is, everything else in CQL literal syntax.
fn cell(v: &Option<scylla::value::CqlValue>) -> String {
    use scylla::value::CqlValue;
    match v {
        None => "null".into(),
        Some(CqlValue::Text(s) | CqlValue::Ascii(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// The statements of a CQL text: comments (`--` and `//` to the end of the line, `/* … */`)
/// dropped, split at `;` outside string literals (`'…'`, `$$…$$`) and quoted names (`"…"`),
/// each trimmed; empty ones left out. (A doubled quote inside a literal, `'it''s'`, closes and
/// reopens it, which keeps the split right.)
pub fn split_cql(text: &str) -> Vec<String> {
    fn push(out: &mut Vec<String>, cur: &mut String) {
        let s = cur.trim();
        if !s.is_empty() {
            out.push(s.to_owned());
        }
        cur.clear();
    }
    let (mut out, mut cur) = (Vec::new(), String::new());
    let mut quote: Option<&str> = None;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if let Some(q) = quote {
            let n = if rest.starts_with(q) {
                quote = None;
                q.len()
            } else {
                c.len_utf8()
            };
            cur.push_str(&rest[..n]);
            rest = &rest[n..];
            continue;
        }
        let n = if rest.starts_with("$$") {
            quote = Some("$$");
            cur.push_str("$$");
            2
        } else if c == '\'' || c == '"' {
            quote = Some(&rest[..1]);
            cur.push(c);
            1
        } else if rest.starts_with("--") || rest.starts_with("//") {
            rest.find('\n').unwrap_or(rest.len())
        } else if rest.starts_with("/*") {
            cur.push(' ');
            rest.find("*/").map_or(rest.len(), |j| j + 2)
        } else if c == ';' {
            push(&mut out, &mut cur);
            1
        } else {
            cur.push(c);
            c.len_utf8()
        };
        rest = &rest[n..];
    }
    push(&mut out, &mut cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_semicolons_and_trims() {
        assert_eq!(
            split_cql("  SELECT 1 FROM a;\nSELECT 2 FROM b ;; \n SELECT 3 FROM c"),
            ["SELECT 1 FROM a", "SELECT 2 FROM b", "SELECT 3 FROM c"]
        );
        assert!(split_cql(" ;\n ; ").is_empty());
        assert!(split_cql("").is_empty());
    }

    #[test]
    fn keeps_semicolons_inside_quotes() {
        assert_eq!(
            split_cql(r#"INSERT INTO t (k, "we;ird") VALUES ('a;b', 'it''s; ok'); SELECT 1"#),
            [
                r#"INSERT INTO t (k, "we;ird") VALUES ('a;b', 'it''s; ok')"#,
                "SELECT 1"
            ]
        );
        assert_eq!(
            split_cql("CREATE FUNCTION f() AS $$ return 1; $$; SELECT 2"),
            ["CREATE FUNCTION f() AS $$ return 1; $$", "SELECT 2"]
        );
        // An unterminated literal runs to the end (the server then says what is wrong).
        assert_eq!(split_cql("SELECT 'a;b"), ["SELECT 'a;b"]);
    }

    #[test]
    fn drops_comments() {
        let text = "-- a comment; with a semicolon\nCREATE TABLE t (k int PRIMARY KEY); // trailing; too\n\
                    /* a block;\n comment */ SELECT k FROM t -- the end";
        assert_eq!(
            split_cql(text),
            ["CREATE TABLE t (k int PRIMARY KEY)", "SELECT k FROM t"]
        );
        // Comment markers inside literals are text.
        assert_eq!(
            split_cql("INSERT INTO t (v) VALUES ('-- not; a comment /* x */')"),
            ["INSERT INTO t (v) VALUES ('-- not; a comment /* x */')"]
        );
        assert_eq!(split_cql("SELECT 1 /* open"), ["SELECT 1"]);
    }

    #[test]
    fn splits_the_schema_files_like_the_node() {
        for (file, text) in cassandra::SCHEMA {
            let ours: Vec<String> = split_cql(text)
                .iter()
                .map(|s| s.replace("{keyspace}", "ks"))
                .collect();
            let node = cassandra::statements(text, "ks", "{replication}");
            assert_eq!(ours, node, "{file}");
        }
    }

    #[test]
    fn parses_topics_and_settings() {
        assert_eq!(
            parse_topic("signals.enqueue:8"),
            Ok(("signals.enqueue".into(), 8))
        );
        assert_eq!(parse_topic("a:b:2"), Ok(("a:b".into(), 2)));
        for bad in ["x", "x:0", ":3", "x:-1", "x:y"] {
            assert!(parse_topic(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_setting("replication={'a': 1}"),
            Ok(("replication".into(), "{'a': 1}".into()))
        );
        assert!(parse_setting("=v").is_err() && parse_setting("kv").is_err());
    }
}
