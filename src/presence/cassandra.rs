//! Presence on Cassandra: `presence` (by client) and `presence_by_node` (by node, for cleanup
//! after a dead node). Both rows are written when a connection is set up and deleted when it
//! closes; the leader deletes a dead node's rows (`clear_node`), which is idempotent. The nodes
//! that may have rows are listed in `presence_nodes` (one small partition), so finding dead
//! nodes never scans the tombstones of closed connections.

use super::{Presence, PresenceError, Seen};
use crate::address::ClientId;
use crate::cassandra::Kind;
use futures_util::future::try_join_all;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use std::sync::Arc;

fn unavailable(e: impl std::fmt::Display) -> PresenceError {
    PresenceError::Unavailable(format!("cassandra: {e}"))
}

/// Cluster-wide presence in a Cassandra keyspace (schema `003_presence.cql`, `004_presence_nodes.cql`).
#[derive(Clone)]
pub struct CassandraPresence(Arc<Inner>);

struct Inner {
    session: Arc<Session>,
    insert: PreparedStatement,
    insert_by_node: PreparedStatement,
    delete: PreparedStatement,
    delete_by_node: PreparedStatement,
    lookup: PreparedStatement,
    of_node: PreparedStatement,
    drop_node: PreparedStatement,
    nodes: PreparedStatement,
    add_node: PreparedStatement,
    forget_node: PreparedStatement,
}

impl CassandraPresence {
    pub async fn new(session: Arc<Session>, keyspace: &str) -> Result<Self, PresenceError> {
        if !crate::cassandra::valid_keyspace(keyspace) {
            return Err(unavailable(format!("invalid keyspace {keyspace:?}")));
        }
        let ks = keyspace;
        let prep = async |cql: String| {
            crate::cassandra::prepare(&session, cql, Kind::Idempotent)
                .await
                .map_err(unavailable)
        };
        Ok(Self(Arc::new(Inner {
            insert: prep(format!(
                "INSERT INTO {ks}.presence (client, node, connection, since) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            insert_by_node: prep(format!(
                "INSERT INTO {ks}.presence_by_node (node, client, connection) VALUES (?, ?, ?)"
            ))
            .await?,
            delete: prep(format!(
                "DELETE FROM {ks}.presence WHERE client = ? AND node = ? AND connection = ?"
            ))
            .await?,
            delete_by_node: prep(format!(
                "DELETE FROM {ks}.presence_by_node WHERE node = ? AND client = ? AND connection = ?"
            ))
            .await?,
            lookup: prep(format!(
                "SELECT node, connection, since FROM {ks}.presence WHERE client = ?"
            ))
            .await?,
            of_node: prep(format!(
                "SELECT client, connection FROM {ks}.presence_by_node WHERE node = ?"
            ))
            .await?,
            drop_node: prep(format!("DELETE FROM {ks}.presence_by_node WHERE node = ?")).await?,
            nodes: prep(format!(
                "SELECT node FROM {ks}.presence_nodes WHERE shard = 0"
            ))
            .await?,
            add_node: prep(format!(
                "INSERT INTO {ks}.presence_nodes (shard, node) VALUES (0, ?)"
            ))
            .await?,
            forget_node: prep(format!(
                "DELETE FROM {ks}.presence_nodes WHERE shard = 0 AND node = ?"
            ))
            .await?,
            session,
        })))
    }
}

#[async_trait::async_trait]
impl Presence for CassandraPresence {
    async fn connected(&self, client: &ClientId, seen: Seen) -> Result<(), PresenceError> {
        let i = &self.0;
        let c = client.as_str();
        let (n, conn) = (seen.node.as_str(), seen.connection.as_str());
        // The node is listed first, then the row by node: a crash in between leaves a row the
        // cleanup can find.
        // Listed at every connect, not once per process: a node the leader cleared after it
        // lost its session and that came back must be listed again.
        i.session
            .execute_unpaged(&i.add_node, (n,))
            .await
            .map_err(unavailable)?;
        i.session
            .execute_unpaged(&i.insert_by_node, (n, c, conn))
            .await
            .map_err(unavailable)?;
        i.session
            .execute_unpaged(&i.insert, (c, n, conn, seen.since as i64))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn disconnected(
        &self,
        client: &ClientId,
        node: &str,
        connection: &str,
    ) -> Result<(), PresenceError> {
        let i = &self.0;
        let c = client.as_str();
        i.session
            .execute_unpaged(&i.delete, (c, node, connection))
            .await
            .map_err(unavailable)?;
        i.session
            .execute_unpaged(&i.delete_by_node, (node, c, connection))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn lookup(&self, clients: &[ClientId]) -> Result<Vec<Vec<Seen>>, PresenceError> {
        let i = &self.0;
        try_join_all(clients.iter().map(|c| async move {
            let res = i
                .session
                .execute_unpaged(&i.lookup, (c.as_str(),))
                .await
                .map_err(unavailable)?;
            let rows = res.into_rows_result().map_err(unavailable)?;
            let mut out = Vec::new();
            for r in rows.rows::<(String, String, i64)>().map_err(unavailable)? {
                let (node, connection, since) = r.map_err(unavailable)?;
                out.push(Seen {
                    node,
                    connection,
                    since: since.max(0) as u64,
                });
            }
            Ok::<_, PresenceError>(out)
        }))
        .await
    }

    async fn clear_node(&self, node: &str) -> Result<u64, PresenceError> {
        let i = &self.0;
        let res = i
            .session
            .execute_unpaged(&i.of_node, (node,))
            .await
            .map_err(unavailable)?;
        let rows = res.into_rows_result().map_err(unavailable)?;
        let mut entries = Vec::new();
        for r in rows.rows::<(String, String)>().map_err(unavailable)? {
            entries.push(r.map_err(unavailable)?);
        }
        try_join_all(entries.iter().map(|(client, conn)| async move {
            i.session
                .execute_unpaged(&i.delete, (client.as_str(), node, conn.as_str()))
                .await
                .map_err(unavailable)
        }))
        .await?;
        i.session
            .execute_unpaged(&i.drop_node, (node,))
            .await
            .map_err(unavailable)?;
        i.session
            .execute_unpaged(&i.forget_node, (node,))
            .await
            .map_err(unavailable)?;
        Ok(entries.len() as u64)
    }

    async fn nodes(&self) -> Result<Vec<String>, PresenceError> {
        let i = &self.0;
        let res = i
            .session
            .execute_unpaged(&i.nodes, ())
            .await
            .map_err(unavailable)?;
        let rows = res.into_rows_result().map_err(unavailable)?;
        let mut out = Vec::new();
        for r in rows.rows::<(String,)>().map_err(unavailable)? {
            out.push(r.map_err(unavailable)?.0);
        }
        out.sort();
        Ok(out)
    }
}
