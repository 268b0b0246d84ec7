//! Ingest: the operations central infrastructure sends (enqueue, bind, unbind), the queue they
//! travel through, and the [`Processor`] that applies them.
//!
//! A [`Queue`] takes commands and answers once they are durably queued; its consumer side hands
//! batches to the processor and commits them only after their effect is durable. [`local`] is the
//! in-process queue of the embedded default: its consumer is the processor itself, so a command
//! is answered once applied (durably appended or bound), which is stronger than queued.

#[cfg(feature = "cluster")]
pub mod kafka;
pub mod local;
pub mod parse;
pub mod wire;

use crate::address::{Address, ClientId};
use crate::mailbox::{Appended, Appends, Mailbox, MailboxError, NewMessage, Run};
use crate::metrics::Metrics;
use crate::routing::{Fanout, Offered};
use crate::topology::{Binding, Topology, TopologyError};
use std::sync::Arc;
use std::time::Instant;

/// One operation from central infrastructure.
#[derive(Debug, Clone)]
pub enum Command {
    Enqueue(NewMessage),
    Bind {
        client: ClientId,
        addresses: Vec<Address>,
        /// Where newly bound addresses start, when not at their head.
        rewind: Option<Rewind>,
        /// The share of the work of its `work:` addresses (default 1).
        weight: Option<u32>,
    },
    Unbind {
        client: ClientId,
        addresses: Vec<Address>,
    },
}

/// How far back a new binding starts: the client receives these earlier messages of each
/// newly bound address before the live ones (`"rewind": n` or `"rewind": {"since": ms}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewind {
    /// The last `n` messages.
    Last(u64),
    /// The messages stamped at or after this time (ms since the epoch).
    Since(u64),
}

impl Rewind {
    /// As it is written in a bind body or record.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            Rewind::Last(n) => serde_json::json!(n),
            Rewind::Since(t) => serde_json::json!({ "since": t }),
        }
    }
}

/// What applying a command did.
#[derive(Debug, Clone)]
pub enum Outcome {
    Appended(Appended),
    /// The bindings now in place for the command's addresses: `(address, since)`; `added` says
    /// which were new.
    Bound {
        bindings: Vec<(Address, u64)>,
        added: usize,
    },
    Unbound {
        removed: Vec<(Address, u64)>,
    },
    /// Durably queued; applied later by a consumer (Kafka, `wait = false`).
    Queued,
    /// Not applied, for a reason that retrying does not change (e.g. the client holds as many
    /// bindings as it may): an HTTP 400 with the reason, a dead-letter record for Kafka.
    Refused(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Mailbox(#[from] MailboxError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("the queue is closed (the node is shutting down)")]
    Closed,
    #[error("timed out after {0} s waiting for the operation to become durable")]
    Timeout(u64),
    #[error("the queue is unavailable: {0}")]
    Unavailable(String),
    /// This writer was fenced by another ([`MailboxError::Fenced`]): it must not apply more.
    #[error(transparent)]
    Fenced(MailboxError),
}

impl IngestError {
    /// A mailbox failure as the processor reports it: fenced, or the store's own failure.
    fn of_mailbox(e: MailboxError) -> Self {
        match e {
            MailboxError::Fenced(_) => IngestError::Fenced(e),
            e => IngestError::Mailbox(e),
        }
    }
}

/// The enqueue partitions (mailbox shards) this node's consumer owns now. The Kafka queue sets
/// them at each rebalance; the work dispatcher ([`crate::work`]) deals out only the `work:`
/// addresses of the shards owned here, so each has one dispatcher at a time.
#[derive(Clone, Default)]
pub struct Owned(Arc<std::sync::RwLock<(u32, Vec<u32>)>>);

impl Owned {
    /// Now `owned` of `count` partitions.
    pub fn set(&self, count: u32, owned: &[u32]) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = (count, owned.to_vec());
    }

    /// Whether the partition of `address` is owned here (none is before the first assignment).
    pub fn owns(&self, address: &Address) -> bool {
        let g = self.0.read().unwrap_or_else(|p| p.into_inner());
        g.0 > 0 && g.1.contains(&address.partition(g.0))
    }
}

/// A partitioned queue's partitions, as seen by one node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Partitions {
    /// Partitions of the enqueue topic.
    pub count: u32,
    /// Those this node's consumer is assigned now, ascending.
    pub owned: Vec<u32>,
}

/// The producer side of the ingest queue. A queue also takes the answers other nodes send for
/// its waiting publishers ([`crate::routing::Replies`]).
#[async_trait::async_trait]
pub trait Queue: crate::routing::Replies {
    /// Publishes commands; resolves once they are durably queued (`Outcome::Queued`), or, with
    /// `wait`, once they are applied (the real outcome). The local queue always applies them
    /// before answering.
    async fn publish(
        &self,
        commands: Vec<Command>,
        wait: bool,
    ) -> Result<Vec<Result<Outcome, IngestError>>, IngestError>;
    /// Stops taking commands and finishes the ones taken.
    async fn drain(&self);
    /// The partitions of the enqueue topic and those this node's consumer owns now, for queues
    /// that are partitioned (shown in `/healthz`; the benchmark tells local from cross-node
    /// deliveries by them).
    fn partitions(&self) -> Option<Partitions> {
        None
    }
    async fn healthy(&self) -> Result<(), IngestError>;
    /// Whether operations published now get applied: a queue with a consumer group is not ready
    /// until its consumer has been given its partitions (`/healthz` answers 503 before).
    fn ready(&self) -> Result<(), IngestError> {
        Ok(())
    }
}

/// A batch applied durably, its new messages not yet handed out ([`Processor::persist`]).
pub struct Persisted {
    results: Vec<Result<Outcome, IngestError>>,
    fresh: Vec<Arc<crate::mailbox::Message>>,
}

impl Persisted {
    /// One result per command, in order.
    pub fn results(&self) -> &[Result<Outcome, IngestError>] {
        &self.results
    }
}

/// Applies batches of commands: appends, then binding changes, then hands the appended messages
/// and binding changes to each fan-out (the other nodes first, then this node's connections).
pub struct Processor {
    pub mailbox: Arc<dyn Mailbox>,
    pub topology: Arc<dyn Topology>,
    pub fanout: Vec<Arc<dyn Fanout>>,
    pub metrics: Metrics,
    /// Most bindings one client may hold.
    pub max_bindings: usize,
}

impl Processor {
    /// Applies a batch; one result per command, in order. Every `Ok` is durable.
    pub async fn apply(&self, commands: Vec<Command>) -> Vec<Result<Outcome, IngestError>> {
        let persisted = self.persist(commands, None).await;
        self.deliver(persisted)
    }

    /// The durable part of [`Processor::apply`]: appends the batch's messages, then applies its
    /// binding changes (each handed to the fan-outs as it applies). [`Processor::deliver`] hands
    /// the new messages out; a caller with several batches under way delivers them in order,
    /// and appends them as one [`Run`] (`begun`: see [`Mailbox::append_in`]).
    ///
    /// [`Mailbox::append_in`]: crate::mailbox::Mailbox::append_in
    pub async fn persist(
        &self,
        commands: Vec<Command>,
        run: Option<(&Run, tokio::sync::oneshot::Sender<()>)>,
    ) -> Persisted {
        let mut results: Vec<Option<Result<Outcome, IngestError>>> = vec![None; commands.len()];
        let mut appends = Vec::new();
        let mut slots = Vec::new();
        let mut others = Vec::new();
        for (i, c) in commands.into_iter().enumerate() {
            match c {
                Command::Enqueue(m) => {
                    appends.push(m);
                    slots.push(i);
                }
                other => others.push((i, other)),
            }
        }
        let mut fresh = Vec::new();
        if !appends.is_empty() {
            let started = Instant::now();
            self.metrics.append_batch.record(appends.len() as f64);
            let n = appends.len();
            let appended = match run {
                Some((run, begun)) => self.mailbox.append_in(run, appends, begun).await,
                None => self.mailbox.append(appends).await,
            };
            let (out, new) = self.appended(appended, n, started);
            fresh = new;
            for (slot, r) in slots.into_iter().zip(out) {
                results[slot] = Some(r);
            }
        }
        for (i, c) in others {
            results[i] = Some(self.apply_binding(c).await);
        }
        Persisted {
            results: results
                .into_iter()
                .map(|r| r.expect("every command has a result"))
                .collect(),
            fresh,
        }
    }

    /// [`Processor::apply`] at once, on the calling thread and without an await, when every
    /// command is an enqueue and the mailbox can append them so ([`Mailbox::append_now`]);
    /// the commands back, untouched, otherwise. Nothing can cancel it between the append and
    /// the hand-out. The caller must not run it beside another apply.
    pub fn apply_now(
        &self,
        commands: Vec<Command>,
    ) -> Result<Vec<Result<Outcome, IngestError>>, Vec<Command>> {
        if commands.is_empty() || !commands.iter().all(|c| matches!(c, Command::Enqueue(_))) {
            return Err(commands);
        }
        let appends: Vec<NewMessage> = commands
            .into_iter()
            .filter_map(|c| match c {
                Command::Enqueue(m) => Some(m),
                _ => None,
            })
            .collect();
        let n = appends.len();
        let started = Instant::now();
        match self.mailbox.append_now(appends) {
            Err(back) => Err(back.into_iter().map(Command::Enqueue).collect()),
            Ok(appended) => {
                self.metrics.append_batch.record(n as f64);
                let (results, fresh) = self.appended(appended, n, started);
                Ok(self.deliver(Persisted { results, fresh }))
            }
        }
    }

    /// The results of an append of `n` messages begun at `started`, in order, and its new
    /// (not duplicate) messages; counts both.
    fn appended(
        &self,
        appended: Appends,
        n: usize,
        started: Instant,
    ) -> (
        Vec<Result<Outcome, IngestError>>,
        Vec<Arc<crate::mailbox::Message>>,
    ) {
        match appended {
            Ok(out) => {
                self.metrics
                    .append_seconds
                    .record(started.elapsed().as_secs_f64());
                let mut fresh = Vec::with_capacity(out.len());
                let results = out
                    .into_iter()
                    .map(|a| {
                        if a.duplicate {
                            self.metrics.duplicates.increment(1);
                        } else {
                            fresh.push(a.message.clone());
                        }
                        Ok(Outcome::Appended(a))
                    })
                    .collect();
                self.metrics.appends.increment(fresh.len() as u64);
                (results, fresh)
            }
            Err(e) => {
                tracing::warn!(error = %e, "append failed");
                let results = (0..n)
                    .map(|_| Err(IngestError::of_mailbox(e.clone())))
                    .collect();
                (results, Vec::new())
            }
        }
    }

    /// Hands a persisted batch's new messages to each fan-out; returns the batch's results.
    pub fn deliver(&self, persisted: Persisted) -> Vec<Result<Outcome, IngestError>> {
        let Persisted { results, fresh } = persisted;
        if !fresh.is_empty() {
            let appended_us = crate::clock::now_us();
            let mut offered = Offered::default();
            for f in &self.fanout {
                let o = f.deliver(&fresh, appended_us);
                offered.deliveries += o.deliveries;
                offered.messages += o.messages;
            }
            let took = crate::clock::now_us().saturating_sub(appended_us);
            self.metrics
                .handoff_local
                .record_many(took as f64 / 1e6, offered.messages);
            let now = crate::clock::now_ms();
            for m in &fresh {
                self.metrics
                    .delivery_seconds
                    .record(now.saturating_sub(m.ts) as f64 / 1000.0);
            }
        }
        results
    }

    /// Hands the answer of a `?wait=true` operation to the fan-out that reaches the node `node`
    /// whose publisher waits; false when that node is this one.
    pub fn reply_elsewhere(
        &self,
        node: &str,
        ticket: &str,
        outcome: &dyn Fn() -> Option<Box<serde_json::value::RawValue>>,
    ) -> bool {
        self.fanout.iter().any(|f| f.reply(node, ticket, outcome))
    }

    async fn apply_binding(&self, c: Command) -> Result<Outcome, IngestError> {
        match c {
            Command::Bind {
                client,
                addresses,
                rewind,
                weight,
            } => {
                let heads = self
                    .mailbox
                    .heads(&addresses)
                    .await
                    .map_err(IngestError::of_mailbox)?;
                let mut want: Vec<Binding> = Vec::with_capacity(addresses.len());
                for (a, h) in addresses.iter().zip(&heads) {
                    let kept = h.low.saturating_sub(1);
                    let since = match rewind {
                        // A work address has no cursor: its binding keeps the weight there.
                        _ if a.kind() == crate::address::Kind::Work => weight.unwrap_or(1) as u64,
                        None => h.head,
                        Some(Rewind::Last(n)) => h.head.saturating_sub(n).max(kept),
                        Some(Rewind::Since(t)) => {
                            crate::mailbox::history::first_since(&*self.mailbox, a, *h, t)
                                .await
                                .map_err(IngestError::of_mailbox)?
                                - 1
                        }
                    };
                    want.push(Binding {
                        address: a.clone(),
                        since,
                    });
                }
                // The topology checks the limit in the same step as it binds.
                let added = match self.topology.add(&client, &want, self.max_bindings).await {
                    Err(e @ TopologyError::TooMany { .. }) => {
                        return Ok(Outcome::Refused(e.to_string()));
                    }
                    r => r?,
                };
                self.metrics.bindings.increment(added.len() as u64);
                // What is reported is the head, also for a work address (whose `since` is its
                // weight).
                let head_of = |a: &Address, since: u64| match a.kind() {
                    crate::address::Kind::Work => addresses
                        .iter()
                        .position(|x| x == a)
                        .map_or(0, |i| heads[i].head),
                    _ => since,
                };
                let new: Vec<(Address, u64)> = added
                    .iter()
                    .map(|b| (b.address.clone(), head_of(&b.address, b.since)))
                    .collect();
                for f in &self.fanout {
                    f.bound(&client, &new);
                }
                // Report every requested binding with its real `since` (existing ones keep
                // theirs): when all were new, `added` says it; otherwise read them back.
                if new.len() == addresses.len() {
                    return Ok(Outcome::Bound {
                        added: new.len(),
                        bindings: new,
                    });
                }
                let all = self.topology.get(&client).await?;
                let bindings = addresses
                    .iter()
                    .filter_map(|a| {
                        all.iter()
                            .find(|b| &b.address == a)
                            .map(|b| (a.clone(), head_of(a, b.since)))
                    })
                    .collect();
                Ok(Outcome::Bound {
                    bindings,
                    added: new.len(),
                })
            }
            Command::Unbind { client, addresses } => {
                let removed = self.topology.remove(&client, &addresses).await?;
                let heads = self
                    .mailbox
                    .heads(&removed)
                    .await
                    .map_err(IngestError::of_mailbox)?;
                let removed: Vec<(Address, u64)> = removed
                    .into_iter()
                    .zip(heads)
                    .map(|(a, h)| (a, h.head))
                    .collect();
                self.metrics.unbindings.increment(removed.len() as u64);
                for f in &self.fanout {
                    f.unbound(&client, &removed);
                }
                Ok(Outcome::Unbound { removed })
            }
            Command::Enqueue(_) => unreachable!("appends are applied in bulk"),
        }
    }
}
