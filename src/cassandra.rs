//! Cassandra plumbing shared by the cluster backends: connecting a [`Session`] from contact
//! points, and applying `schema/*.cql` idempotently at startup.
//!
//! The schema files are compiled in (`include_str!`), so a node never depends on files next to
//! its binary. Each file is split into statements (see `schema/001_keyspace.cql` for the rules),
//! `{keyspace}` and `{replication}` are filled in, and every statement is run in order; all of
//! them are `CREATE … IF NOT EXISTS`, so applying them at every start is harmless. After each
//! file a row is written to `schema_migrations`. The driver waits for schema agreement after
//! each DDL statement.
//!
//! Consistency: everything runs at `LOCAL_QUORUM`; lightweight transactions use `SERIAL` (a
//! claim of a mailbox shard and the fence read must be linearizable across data centres too).

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::{Consistency, SerialConsistency};
use std::time::Duration;

/// How a prepared statement may be retried and at what consistency it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Safe to retry: running it twice changes nothing (plain reads, upserts, deletes).
    Idempotent,
    /// Not retried by the driver: a lightweight transaction whose second run could answer
    /// differently than the first.
    Once,
    /// A linearizable read (`SERIAL`: sees every committed lightweight transaction); retried.
    Serial,
}

/// Prepares `cql` with the retry and consistency policy of its [`Kind`] — the one place where
/// the backends' statements get that policy.
pub async fn prepare(
    session: &Session,
    cql: String,
    kind: Kind,
) -> Result<scylla::statement::prepared::PreparedStatement, scylla::errors::PrepareError> {
    let mut p = session.prepare(cql).await?;
    p.set_is_idempotent(kind != Kind::Once);
    if kind == Kind::Serial {
        p.set_consistency(Consistency::Serial);
    }
    Ok(p)
}

/// The schema files, in the order they are applied.
pub const SCHEMA: &[(&str, &str)] = &[
    (
        "001_keyspace.cql",
        include_str!("../schema/001_keyspace.cql"),
    ),
    ("002_tables.cql", include_str!("../schema/002_tables.cql")),
    (
        "003_presence.cql",
        include_str!("../schema/003_presence.cql"),
    ),
    (
        "004_presence_nodes.cql",
        include_str!("../schema/004_presence_nodes.cql"),
    ),
    (
        "005_revoked_clients.cql",
        include_str!("../schema/005_revoked_clients.cql"),
    ),
    (
        "006_read_marks.cql",
        include_str!("../schema/006_read_marks.cql"),
    ),
    (
        "007_presence_members.cql",
        include_str!("../schema/007_presence_members.cql"),
    ),
    (
        "008_presence_slots.cql",
        include_str!("../schema/008_presence_slots.cql"),
    ),
    (
        "009_presence_member_slots.cql",
        include_str!("../schema/009_presence_member_slots.cql"),
    ),
    (
        "010_client_bindings.cql",
        include_str!("../schema/010_client_bindings.cql"),
    ),
];

/// The outcome of a lightweight transaction (`… IF …`): `Ok(())` when it was applied, else the
/// current value of `column` that the answer carries (None when it has no such column or value).
pub fn conditional(
    res: scylla::response::query_result::QueryResult,
    column: Option<&str>,
) -> Result<Result<(), Option<scylla::value::CqlValue>>, String> {
    let rows = res.into_rows_result().map_err(|e| e.to_string())?;
    let specs = rows.column_specs();
    let at = specs
        .get_by_name("[applied]")
        .map(|(i, _)| i)
        .ok_or("a conditional write answered without [applied]")?;
    let current = column.and_then(|c| specs.get_by_name(c)).map(|(i, _)| i);
    let mut row: scylla::value::Row = rows.first_row().map_err(|e| e.to_string())?;
    if matches!(
        row.columns.get(at),
        Some(Some(scylla::value::CqlValue::Boolean(true)))
    ) {
        return Ok(Ok(()));
    }
    Ok(Err(current.and_then(|i| row.columns.get_mut(i)?.take())))
}

/// Whether a lightweight transaction was applied ([`conditional`]).
pub fn applied(res: scylla::response::query_result::QueryResult) -> Result<bool, String> {
    Ok(conditional(res, None)?.is_ok())
}

/// The default replication map for one local node.
pub const LOCAL_REPLICATION: &str = "{'class': 'SimpleStrategy', 'replication_factor': 1}";

/// Cassandra connection and schema failures.
#[derive(Debug, thiserror::Error)]
pub enum CassandraError {
    #[error("no Cassandra contact point given")]
    NoContactPoints,
    #[error(
        "invalid keyspace name {0:?}: must be 1-48 characters of [a-z0-9_], starting with a letter"
    )]
    BadKeyspace(String),
    #[error("cannot connect to Cassandra at {contact_points}: {source}")]
    Connect {
        contact_points: String,
        #[source]
        source: scylla::errors::NewSessionError,
    },
    #[error("applying schema {file} failed at statement {statement:?}: {message}")]
    Schema {
        file: &'static str,
        statement: String,
        message: String,
    },
    #[error("Cassandra request failed: {0}")]
    Request(String),
}

/// Where and how to connect: the configuration's `[cassandra]` section.
pub use crate::config::CassandraConfig;

impl CassandraConfig {
    /// Contact points as a list (blanks dropped; a missing port means 9042).
    pub fn nodes(&self) -> Vec<String> {
        split_contact_points(&self.contact_points)
    }
}

/// Splits `"a:9042, b"` into `["a:9042", "b:9042"]`.
pub fn split_contact_points(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let has_port = match p.rsplit_once(':') {
                // `[::1]:9042`, `host:9042`; a bare IPv6 address has several colons and no brackets.
                Some((h, port)) => {
                    port.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']'))
                }
                None => false,
            };
            if has_port {
                p.to_owned()
            } else {
                format!("{p}:9042")
            }
        })
        .collect()
}

/// A keyspace name Cassandra accepts unquoted (we substitute it into CQL text).
pub fn valid_keyspace(ks: &str) -> bool {
    !ks.is_empty()
        && ks.len() <= 48
        && ks.as_bytes()[0].is_ascii_lowercase()
        && ks
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Connects a session (no keyspace selected: statements name their keyspace).
///
/// `keyspace` is the one keyspace whose schema the driver fetches and keeps current (token-aware
/// routing computes tokens from its tables' partition keys); `None` fetches no schema at all, for
/// tools that only run statements. By default the driver would fetch every keyspace's full
/// schema at connect and again after each schema change: on a Cassandra that holds many
/// keyspaces, a node's start (about 20 `CREATE TABLE`s) then took seconds longer for each
/// hundred keyspaces there (docs/cassandra.md).
pub async fn connect(
    contact_points: &str,
    keyspace: Option<&str>,
) -> Result<Session, CassandraError> {
    let nodes = split_contact_points(contact_points);
    if nodes.is_empty() {
        return Err(CassandraError::NoContactPoints);
    }
    let profile = ExecutionProfile::builder()
        .consistency(Consistency::LocalQuorum)
        .serial_consistency(Some(SerialConsistency::Serial))
        .request_timeout(Some(Duration::from_secs(12)))
        .build();
    let builder = SessionBuilder::new()
        .known_nodes(&nodes)
        .connection_timeout(Duration::from_secs(5))
        .default_execution_profile_handle(profile.into_handle());
    let builder = match keyspace {
        Some(ks) => builder.keyspaces_to_fetch([ks]),
        None => builder.fetch_schema_metadata(false),
    };
    builder
        .build()
        .await
        .map_err(|source| CassandraError::Connect {
            contact_points: contact_points.to_owned(),
            source,
        })
}

/// The server's `release_version` (from `system.local`): a real query, so an answer means the
/// node serves CQL requests (`signalpost stack probe cassandra`).
pub async fn release_version(session: &Session) -> Result<String, CassandraError> {
    let request = |e: &dyn std::fmt::Display| CassandraError::Request(e.to_string());
    let (version,) = session
        .query_unpaged("SELECT release_version FROM system.local", ())
        .await
        .map_err(|e| request(&e))?
        .into_rows_result()
        .map_err(|e| request(&e))?
        .single_row::<(String,)>()
        .map_err(|e| request(&e))?;
    Ok(version)
}

/// The statements of one schema file with placeholders filled in.
pub fn statements(text: &str, keyspace: &str, replication: &str) -> Vec<String> {
    let body: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .map(|l| format!("{l}\n"))
        .collect();
    body.split_inclusive(";\n")
        .map(|s| s.trim().trim_end_matches(';').trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.replace("{keyspace}", keyspace)
                .replace("{replication}", replication)
        })
        .collect()
}

/// Applies every schema file to `keyspace` (creating it), idempotently.
pub async fn apply_schema(
    session: &Session,
    keyspace: &str,
    replication: &str,
    applied_by: &str,
) -> Result<(), CassandraError> {
    if !valid_keyspace(keyspace) {
        return Err(CassandraError::BadKeyspace(keyspace.to_owned()));
    }
    // A keyspace that no earlier version wrote bindings in starts with the bindings as rows
    // (file 10); an older one keeps its record until `signalpost migrate bindings`.
    let fresh = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables \
             WHERE keyspace_name = ? AND table_name = 'client_addresses'",
            (keyspace,),
        )
        .await
        .map_err(|e| CassandraError::Request(e.to_string()))?
        .into_rows_result()
        .map_err(|e| CassandraError::Request(e.to_string()))?
        .rows_num()
        == 0;
    for (file, text) in SCHEMA {
        for stmt in statements(text, keyspace, replication) {
            session
                .query_unpaged(stmt.as_str(), ())
                .await
                .map_err(|e| CassandraError::Schema {
                    file,
                    statement: stmt.chars().take(120).collect(),
                    message: e.to_string(),
                })?;
        }
        let now = scylla::value::CqlTimestamp(crate::clock::now_ms() as i64);
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {keyspace}.schema_migrations (file, applied_at, applied_by) VALUES (?, ?, ?)"
                ),
                (*file, now, applied_by),
            )
            .await
            .map_err(|e| CassandraError::Request(e.to_string()))?;
    }
    if fresh {
        put_setting(session, keyspace, BINDINGS_SETTING, BINDINGS_AS_ROWS).await?;
    }
    Ok(())
}

/// Writes a row of the keyspace's `settings` (`schema/010_client_bindings.cql`).
pub async fn put_setting(
    session: &Session,
    keyspace: &str,
    name: &str,
    value: &str,
) -> Result<(), CassandraError> {
    session
        .query_unpaged(
            format!("INSERT INTO {keyspace}.settings (name, value) VALUES (?, ?)"),
            (name, value),
        )
        .await
        .map_err(|e| CassandraError::Request(e.to_string()))?;
    Ok(())
}

/// The `settings` row that says where bindings are recorded (`schema/010_client_bindings.cql`).
pub const BINDINGS_SETTING: &str = "bindings";
/// Its value when `client_bindings` is the record and always was (a keyspace created with file 10).
pub const BINDINGS_AS_ROWS: &str = "rows";
/// Its value when `client_bindings` became the record (`signalpost migrate bindings`).
pub const BINDINGS_MIGRATED: &str = "migrated";

/// Connects and applies the schema: what a node does at startup.
pub async fn open(config: &CassandraConfig, node: &str) -> Result<Session, CassandraError> {
    if !valid_keyspace(&config.keyspace) {
        return Err(CassandraError::BadKeyspace(config.keyspace.clone()));
    }
    let session = connect(&config.contact_points, Some(&config.keyspace)).await?;
    apply_schema(&session, &config.keyspace, &config.replication, node).await?;
    Ok(session)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contact_points() {
        assert_eq!(
            split_contact_points(" 127.0.0.1:9042, host2 ,,[::1]:9043"),
            vec!["127.0.0.1:9042", "host2:9042", "[::1]:9043"]
        );
        assert!(split_contact_points(" , ").is_empty());
    }

    #[test]
    fn schema_splits_into_statements() {
        for (file, text) in SCHEMA {
            let stmts = statements(text, "ks_1", LOCAL_REPLICATION);
            assert!(!stmts.is_empty(), "{file}");
            for s in &stmts {
                assert!(s.starts_with("CREATE "), "{file}: {s}");
                assert!(!s.contains('{') || s.contains("'class'"), "{file}: {s}");
                assert!(!s.contains("{keyspace}") && !s.contains(';'), "{file}: {s}");
            }
        }
        assert!(valid_keyspace("it_1a") && !valid_keyspace("1a") && !valid_keyspace("A"));
    }
}
