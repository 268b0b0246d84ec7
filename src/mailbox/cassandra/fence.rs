//! The writer fence of the Cassandra mailbox: one epoch per shard (a partition of the enqueue
//! topic) in `mailbox_fences`.
//!
//! A writer claims a shard with a lightweight transaction that moves its epoch one up, and
//! tags every row it writes with that epoch. After writing a batch it reads every shard's epoch
//! at SERIAL — one Paxos read per batch, however many addresses and shards the batch touched,
//! shared with the batches that finished writing while the read before was under way — and makes
//! the batch visible (moves the heads) only if its epochs are still current. Why this holds is in
//! `docs/architecture.md` ("The append fence").

use super::group_read::GroupRead;
use super::{st, unavailable};
use crate::cassandra::Kind;
use crate::mailbox::MailboxError;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use std::collections::HashMap;
use std::sync::Arc;

/// Conditional updates that may lose to a concurrent claim before `claim` gives up.
const CLAIM_ATTEMPTS: usize = 8;

pub(super) struct Fences {
    session: Arc<Session>,
    /// The fence rows' partition: every shard of the mailbox (the enqueue topic's name).
    scope: String,
    owner: String,
    read_one: PreparedStatement,
    read_all: PreparedStatement,
    insert: PreparedStatement,
    update: PreparedStatement,
    /// The appends under way share their reads of the epochs ([`Fences::current`]).
    reads: GroupRead<Result<Arc<Epochs>, MailboxError>>,
}

/// Shard → epoch.
pub(super) type Epochs = HashMap<u32, i64>;

impl Fences {
    pub(super) async fn new(
        session: Arc<Session>,
        keyspace: &str,
        scope: &str,
        owner: &str,
    ) -> Result<Self, MailboxError> {
        let prep = async |cql: String, kind: Kind| {
            crate::cassandra::prepare(&session, cql, kind)
                .await
                .map_err(unavailable)
        };
        let ks = keyspace;
        Ok(Self {
            read_one: prep(
                format!("SELECT epoch FROM {ks}.mailbox_fences WHERE scope = ? AND shard = ?"),
                Kind::Serial,
            )
            .await?,
            read_all: prep(
                format!("SELECT shard, epoch FROM {ks}.mailbox_fences WHERE scope = ?"),
                Kind::Serial,
            )
            .await?,
            insert: prep(
                format!(
                    "INSERT INTO {ks}.mailbox_fences (scope, shard, epoch, owner, claimed_at) \
                     VALUES (?, ?, 1, ?, ?) IF NOT EXISTS"
                ),
                Kind::Once,
            )
            .await?,
            update: prep(
                format!(
                    "UPDATE {ks}.mailbox_fences SET epoch = ?, owner = ?, claimed_at = ? \
                     WHERE scope = ? AND shard = ? IF epoch = ?"
                ),
                Kind::Once,
            )
            .await?,
            session,
            scope: scope.to_string(),
            owner: owner.to_string(),
            reads: GroupRead::new(),
        })
    }

    /// Claims `shard`: its epoch moves one up, fencing every earlier claim. Returns the new epoch.
    pub(super) async fn claim(&self, shard: u32) -> Result<i64, MailboxError> {
        let now = CqlTimestamp(crate::mailbox::now_ms() as i64);
        for _ in 0..CLAIM_ATTEMPTS {
            let current =
                super::one_bigint(&self.session, &self.read_one, (&self.scope, shard as i32))
                    .await?;
            let (applied, epoch) = match current {
                None => {
                    let res = self
                        .session
                        .execute_unpaged(
                            &self.insert,
                            (&self.scope, shard as i32, &self.owner, now),
                        )
                        .await
                        .map_err(unavailable)?;
                    (applied(res)?, 1)
                }
                Some(e) => {
                    let res = self
                        .session
                        .execute_unpaged(
                            &self.update,
                            (e + 1, &self.owner, now, &self.scope, shard as i32, e),
                        )
                        .await
                        .map_err(unavailable)?;
                    (applied(res)?, e + 1)
                }
            };
            if applied {
                tracing::info!(shard, epoch, owner = %self.owner, "claimed mailbox shard");
                return Ok(epoch);
            }
        }
        Err(MailboxError::Unavailable(format!(
            "shard {shard} is being claimed by other writers at the same time; try again"
        )))
    }

    /// The current epoch of every claimed shard, from a SERIAL read (linearizable with claims)
    /// that started after this call: one read serves every append that asked while the read
    /// before it was under way.
    pub(super) async fn current(&self) -> Result<Arc<Epochs>, MailboxError> {
        self.reads
            .get(|| async { self.read_current().await.map(Arc::new) })
            .await
    }

    async fn read_current(&self) -> Result<Epochs, MailboxError> {
        let res = self
            .session
            .execute_unpaged(&self.read_all, (&self.scope,))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(st)?;
        let mut out = HashMap::new();
        for row in res.rows::<(i32, Option<i64>)>().map_err(st)? {
            let (shard, epoch) = row.map_err(st)?;
            out.insert(shard as u32, epoch.unwrap_or(0));
        }
        Ok(out)
    }
}

/// Whether a lightweight transaction applied.
fn applied(res: scylla::response::query_result::QueryResult) -> Result<bool, MailboxError> {
    let rows = res.into_rows_result().map_err(st)?;
    let at = rows
        .column_specs()
        .get_by_name("[applied]")
        .map(|(i, _)| i)
        .ok_or_else(|| st("conditional write answered without [applied]"))?;
    let row: scylla::value::Row = rows.first_row().map_err(st)?;
    Ok(matches!(
        row.columns.get(at),
        Some(Some(scylla::value::CqlValue::Boolean(true)))
    ))
}
