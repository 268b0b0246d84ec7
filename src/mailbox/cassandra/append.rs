//! Appending to the Cassandra mailbox under the per-shard fence.
//!
//! An append has two parts. Under the writer lock (claims and known heads), briefly:
//! 1. every shard the batch touches is claimed, unless this writer already holds it;
//! 2. per address (concurrently): the head is known, or adopted (the highest-epoch mark, plus
//!    any rows written past it by an earlier writer, copied into this epoch); ids already
//!    appended are answered as duplicates; the rest get the next versions, and the head this
//!    writer knows moves past them at once, so the next append can reserve its own;
//!    the append takes its turn, behind the one before.
//!
//! Then, outside the lock and beside the appends before and after it:
//! 3. the message rows and id candidates are written, in as few unlogged batches as the size
//!    limits allow (all addresses together);
//! 4. a SERIAL read of the fences begun after the rows were written (shared with the appends
//!    that finished writing meanwhile): if another writer claimed one of the shards meanwhile,
//!    the append fails with [`MailboxError::Fenced`] and nothing of it becomes visible;
//! 5. it waits for the turn before it to end, and fails if that one failed (its versions
//!    follow that one's);
//! 6. the head marks move (one unlogged batch), and only then does `append` answer and end its
//!    turn.
//!
//! So the marks move in the order versions were reserved, while the rows and the fence reads of
//! consecutive appends overlap. A failed append records what it leaves unknown ([`Failed`]);
//! the next append to take the lock waits until every append in flight has ended, then forgets
//! the heads and claims concerned ([`Inner::settle`]) — an append in flight never races one
//! that reserves versions afresh. A batch with ids that must be looked up waits the same way, so
//! the lookup sees every earlier row.
//!
//! Appends of a [`Run`] (the Kafka consumer's batches) start one after another's reservation,
//! and once one fails the run refuses the rest until its owner restarts it: none is made visible
//! before the failed one is appended again, so the order of versions is the order of the run.

use super::{ADDRESS_CONCURRENCY, CACHE_MAX, Entry, Inner, st, unavailable};
use crate::address::{Address, MessageId};
use crate::mailbox::{Appended, MailboxError, Message, NewMessage, Run, now_ms};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::{StreamExt, TryStreamExt, stream};
use scylla::cluster::ClusterState;
use scylla::serialize::SerializationError;
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::statement::batch::{Batch, BatchType};
use scylla::value::CqlTimestamp;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Messages (each a message row and an id candidate) in one unlogged batch, and their bytes
/// (an over-estimate of Cassandra's own count): under a stock Cassandra's documented
/// `batch_size_fail_threshold` (50 KiB), so that no batch of several messages can meet it.
const MAX_BATCH_MESSAGES: usize = 500;
const MAX_BATCH_BYTES: usize = 40 * 1024;
/// Ids per lookup of the id index (one partition, clustering `IN`).
const IDS_PER_LOOKUP: usize = 200;
/// Rows per read when adopting rows written past the head.
const SCAN_LIMIT: usize = 1000;
/// An append slower than this is logged at debug level with the time of each step
/// (`RUST_LOG=signalpost::mailbox::cassandra::append=debug`), to find where a latency tail
/// comes from.
const SLOW: Duration = Duration::from_millis(20);

/// A shard this writer holds.
#[derive(Clone, Copy)]
struct Claim {
    epoch: i64,
    /// Whether messages vouched for ([`NewMessage::new_id`]) may skip the id lookup: only
    /// under an explicit claim ([`Inner::claim`], after which the caller vouches), and only
    /// until this writer adopts an earlier writer's rows in the shard.
    trust_new_ids: bool,
}

/// The end of an append's turn: true when the append was made visible. It resolves only after
/// the turn before it has, so the last one's end means that no append is in flight.
type Turn = Shared<BoxFuture<'static, bool>>;

/// What the writer holds between appends.
#[derive(Default)]
pub(super) struct WriterState {
    claims: HashMap<u32, Claim>,
    /// Shards another writer claimed from this one: refused until released.
    fenced: HashSet<u32>,
    /// Address → its head, as reserved by this writer under its current claim (marked, or
    /// being marked by an append in flight).
    heads: HashMap<Address, u64>,
    /// The turn of the last append that reserved versions.
    tail: Option<Turn>,
}

impl WriterState {
    /// After a failed append (its outcome unknown): learn the heads again, and vouched ids of
    /// these shards are looked up from now on (a retry is not a first delivery).
    fn unknown_outcome<'a>(&mut self, shards: impl Iterator<Item = &'a u32>) {
        self.heads.clear();
        for s in shards {
            if let Some(c) = self.claims.get_mut(s) {
                c.trust_new_ids = false;
            }
        }
    }

    /// Whether an append may still be writing.
    fn in_flight(&self) -> bool {
        self.tail.as_ref().is_some_and(|t| t.peek().is_none())
    }
}

/// What appends that failed outside the writer lock leave for the next one to settle.
#[derive(Default)]
pub(super) struct Failed {
    /// Shards whose appends' outcome is unknown.
    unknown: HashSet<u32>,
    /// Shards another writer claimed.
    lost: HashSet<u32>,
}

impl Failed {
    fn is_empty(&self) -> bool {
        self.unknown.is_empty() && self.lost.is_empty()
    }
}

/// One address's part of an append, reserved under the writer lock.
struct Reserved {
    address: Address,
    /// The head as marked before this append (what needs no new mark).
    marked: u64,
    /// The head before this append's new messages (after adopting, if any).
    base: u64,
    /// The new messages, to take the versions after `base`, and their slots.
    fresh: Vec<Pending>,
    /// The new messages' time stamp (ms since the epoch).
    ts: u64,
    /// The answers: duplicates, and the new messages as they will be stored.
    out: Vec<(usize, Appended)>,
}

impl Reserved {
    fn head(&self) -> u64 {
        self.base + self.fresh.len() as u64
    }
}

/// One statement's values in a write batch.
enum Row<'a> {
    Entry(&'a str, i64, i64, i64, &'a str, CqlTimestamp, &'a str, i32),
    Id(&'a str, &'a str, i64, i32),
    /// address, epoch, head (also the write's time stamp)
    Mark(&'a str, i64, i64),
}

impl SerializeRow for Row<'_> {
    fn serialize(
        &self,
        ctx: &RowSerializationContext<'_>,
        writer: &mut RowWriter,
    ) -> Result<(), SerializationError> {
        match *self {
            Row::Entry(a, b, v, e, id, ts, p, ttl) => {
                (a, b, v, e, id, ts, p, ttl).serialize(ctx, writer)
            }
            Row::Id(a, id, v, ttl) => (a, id, v, ttl).serialize(ctx, writer),
            Row::Mark(a, epoch, head) => (a, epoch, head, head).serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// A message row to write.
struct NewRow<'a> {
    version: u64,
    id: &'a str,
    payload: &'a str,
    ts: i64,
}

/// A message waiting for a version, with the positions in the caller's batch it answers.
struct Pending {
    msg: NewMessage,
    slots: Vec<usize>,
}

impl Inner {
    /// Appends `batch`; with a run ([`crate::mailbox::Run`]), as its next append: refused if
    /// the run failed, `begun` told once the versions are reserved, and the run failed if this
    /// append fails.
    pub(super) async fn append(
        &self,
        batch: Vec<NewMessage>,
        run: Option<(&Run, oneshot::Sender<()>)>,
    ) -> Result<Vec<Appended>, MailboxError> {
        let (run, begun) = run.unzip();
        let out = self.append_reserved(batch, run, begun).await;
        if out.is_err()
            && let Some(run) = run
        {
            run.fail();
        }
        out
    }

    async fn append_reserved(
        &self,
        batch: Vec<NewMessage>,
        run: Option<&Run>,
        begun: Option<oneshot::Sender<()>>,
    ) -> Result<Vec<Appended>, MailboxError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let n = batch.len();
        let lookups = batch.iter().any(|m| !m.new_id);
        let groups = group(batch);

        let mut state = self.writer.lock().await;
        let failed = !self.failed().is_empty();
        let crowded = state.heads.len() + groups.len() > CACHE_MAX;
        if failed || crowded || (lookups && state.in_flight()) {
            self.settle(&mut state).await;
            if crowded {
                state.heads.clear();
            }
        }
        // (After settling: every append before this one has ended, and a failed one has failed
        // the run.)
        if run.is_some_and(Run::failed) {
            return Err(Run::refusal());
        }

        // 1. Claims.
        let mut claims: HashMap<u32, Claim> = HashMap::new();
        for (address, _) in &groups {
            let shard = self.shard(address);
            if claims.contains_key(&shard) {
                continue;
            }
            let claim = match state.claims.get(&shard) {
                Some(&c) => c,
                None if state.fenced.contains(&shard) => {
                    return Err(MailboxError::Fenced(format!(
                        "shard {shard} was claimed by another writer; this one appends to it \
                         again only once it is given the shard anew"
                    )));
                }
                None => {
                    let c = Claim {
                        epoch: self.fences.claim(shard).await?,
                        trust_new_ids: false,
                    };
                    state.claims.insert(shard, c);
                    state.heads.retain(|a, _| self.shard(a) != shard);
                    c
                }
            };
            claims.insert(shard, claim);
        }
        let epochs: HashMap<u32, i64> = claims.iter().map(|(s, c)| (*s, c.epoch)).collect();

        // 2. Versions.
        let finds: Vec<_> = groups
            .into_iter()
            .map(|(address, items)| {
                let known = state.heads.get(&address).copied();
                let claim = claims[&self.shard(&address)];
                self.find(address, items, known, claim)
            })
            .collect();
        let found: Vec<Result<(Reserved, bool), MailboxError>> = stream::iter(finds)
            .buffer_unordered(ADDRESS_CONCURRENCY)
            .collect()
            .await;
        let found = match found.into_iter().collect::<Result<Vec<_>, _>>() {
            Ok(f) => f,
            Err(e) => {
                // Nothing was reserved, but adopting may have copied rows: the heads are learnt
                // again once the appends in flight have ended.
                self.failed().unknown.extend(epochs.keys().copied());
                return Err(e);
            }
        };
        let mut reserved = Vec::with_capacity(found.len());
        for (r, adopted) in found {
            // Adopting an earlier writer's rows ends the trust in vouched ids for the shard:
            // those rows may be records that are delivered again, vouched for, later.
            if adopted && let Some(c) = state.claims.get_mut(&self.shard(&r.address)) {
                c.trust_new_ids = false;
            }
            state.heads.insert(r.address.clone(), r.head());
            reserved.push(r);
        }
        let (end, before) = take_turn(&mut state);
        drop(state);
        if let Some(begun) = begun {
            let _ = begun.send(());
        }

        match self.commit(&reserved, &epochs, before).await {
            Ok(()) => {
                let _ = end.send(true);
            }
            Err(e) => {
                // (A fenced append has also recorded the shards it lost.)
                self.failed().unknown.extend(epochs.keys().copied());
                // The run fails before the turn ends, so that an append that waits for the
                // turns before it sees the failure.
                if let Some(run) = run {
                    run.fail();
                }
                let _ = end.send(false);
                return Err(e);
            }
        }
        let mut out: Vec<Option<Appended>> = (0..n).map(|_| None).collect();
        for r in reserved {
            for (slot, a) in r.out {
                out[slot] = Some(a);
            }
        }
        out.into_iter()
            .map(|a| a.ok_or_else(|| st("append lost a result")))
            .collect()
    }

    /// Steps 3 to 6 of an append whose versions are reserved: rows, fence, the turn before,
    /// marks.
    async fn commit(
        &self,
        reserved: &[Reserved],
        epochs: &HashMap<u32, i64>,
        before: Option<Turn>,
    ) -> Result<(), MailboxError> {
        let rows: Vec<(&Address, Vec<NewRow<'_>>, i64)> = reserved
            .iter()
            .filter(|r| !r.fresh.is_empty())
            .map(|r| {
                let rows = r
                    .fresh
                    .iter()
                    .enumerate()
                    .map(|(i, p)| NewRow {
                        version: r.base + 1 + i as u64,
                        id: p.msg.id.as_str(),
                        payload: p.msg.payload.get(),
                        ts: r.ts as i64,
                    })
                    .collect();
                (&r.address, rows, epochs[&self.shard(&r.address)])
            })
            .collect();
        let started = Instant::now();
        self.write_rows(&rows).await?;
        let written = started.elapsed();

        // 4. The fence.
        let current = self.fences.current().await?;
        let fenced = started.elapsed();
        let lost: Vec<u32> = epochs
            .iter()
            .filter(|(s, e)| current.get(s) != Some(e))
            .map(|(s, _)| *s)
            .collect();
        if !lost.is_empty() {
            self.failed().lost.extend(lost.iter().copied());
            tracing::warn!(shards = ?lost, "fenced: another writer claimed these shards");
            return Err(MailboxError::Fenced(format!(
                "another writer claimed shard(s) {lost:?} of the enqueue topic; this batch was \
                 not made visible"
            )));
        }

        // 5. The turn before.
        if let Some(before) = before
            && !before.await
        {
            return Err(MailboxError::Unavailable(
                "an earlier append of this writer failed, and this one's versions follow it: \
                 not made visible (its outcome is unknown; appending it again is safe)"
                    .into(),
            ));
        }

        // 6. Heads.
        let turned = started.elapsed();
        let marks: Vec<(&str, i64, i64)> = reserved
            .iter()
            .filter(|r| r.head() != r.marked)
            .map(|r| {
                let epoch = epochs[&self.shard(&r.address)];
                (r.address.as_str(), epoch, r.head() as i64)
            })
            .collect();
        self.write_marks(&marks).await?;
        let total = started.elapsed();
        if total >= SLOW {
            tracing::debug!(
                rows = ?written,
                fence = ?(fenced - written),
                turn = ?(turned - fenced),
                marks = ?(total - turned),
                addresses = reserved.len(),
                "slow: an append's steps"
            );
        }
        Ok(())
    }

    /// Waits (holding the writer lock, so that no append starts) until no append is in flight,
    /// then forgets what failed appends left unknown: the heads, the trust in vouched ids of
    /// their shards, and the claims other writers took.
    async fn settle(&self, state: &mut WriterState) {
        if let Some(tail) = state.tail.take() {
            tail.await;
        }
        let failed = std::mem::take(&mut *self.failed());
        if !failed.unknown.is_empty() {
            state.unknown_outcome(failed.unknown.iter());
        }
        if !failed.lost.is_empty() {
            for s in &failed.lost {
                state.claims.remove(s);
                state.fenced.insert(*s);
            }
            state
                .heads
                .retain(|a, _| !failed.lost.contains(&self.shard(a)));
        }
    }

    fn failed(&self) -> std::sync::MutexGuard<'_, Failed> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Step 2 for one address: learn the head, answer duplicates, keep the new messages. Also
    /// says whether rows of an earlier writer were adopted.
    async fn find(
        &self,
        address: Address,
        items: Vec<(usize, NewMessage)>,
        known: Option<u64>,
        claim: Claim,
    ) -> Result<(Reserved, bool), MailboxError> {
        let epoch = claim.epoch;
        let (marked, head) = match known {
            Some(h) => (h, h),
            None => self.adopt(&address, epoch).await?,
        };
        let adopted = head != marked;
        // Duplicates within the batch answer with the first occurrence.
        let total = items.len();
        let mut pending: Vec<Pending> = Vec::new();
        let mut index: HashMap<MessageId, usize> = HashMap::new();
        for (slot, msg) in items {
            match index.get(&msg.id) {
                Some(&i) => pending[i].slots.push(slot),
                None => {
                    index.insert(msg.id.clone(), pending.len());
                    pending.push(Pending {
                        msg,
                        slots: vec![slot],
                    });
                }
            }
        }
        let mut out = Vec::with_capacity(total);
        let trust = claim.trust_new_ids && !adopted;
        let ids: Vec<&str> = pending
            .iter()
            .filter(|p| !(trust && p.msg.new_id))
            .map(|p| p.msg.id.as_str())
            .collect();
        let found = self.find_appended(&address, &ids, head).await?;
        if !found.is_empty() {
            pending.retain(|p| match found.get(p.msg.id.as_str()) {
                Some(m) => {
                    answer(&mut out, &p.slots, m, true);
                    false
                }
                None => true,
            });
        }
        // The new messages' answers, with the versions they will have.
        let now = crate::clock::stamp_ms();
        for (i, p) in pending.iter().enumerate() {
            let m = Arc::new(Message::new(
                address.clone(),
                head + 1 + i as u64,
                p.msg.id.clone(),
                now,
                &p.msg.payload,
            ));
            answer(&mut out, &p.slots, &m, false);
        }
        let reserved = Reserved {
            address,
            marked,
            base: head,
            fresh: pending,
            ts: now,
            out,
        };
        Ok((reserved, adopted))
    }

    /// The head of an address this writer does not know: the highest-epoch mark, then the rows
    /// written past it, in version order without a hole, whose epoch is at least the mark's and
    /// below this writer's — an earlier writer's batch that passed its fence but whose mark may
    /// still be on its way, so that a reader may see it. They are copied into `epoch` with their
    /// id candidates, so that no older writer's late row can change them. Rows below the mark's
    /// epoch are a fenced writer's (they would have been adopted by the mark's writer had they
    /// passed the fence); rows of this writer's epoch are its own failed attempts: neither is
    /// adopted, and both are overwritten. Returns (marked head, head).
    async fn adopt(&self, address: &Address, epoch: i64) -> Result<(u64, u64), MailboxError> {
        let (mark_epoch, marked) = self.mark(address).await?;
        let mut head = marked;
        let mut adopted: Vec<Entry> = Vec::new();
        loop {
            let bucket = self.bucket(head + 1);
            let rows = self
                .entries(
                    &self.st.tail,
                    (
                        address.as_str(),
                        bucket as i64,
                        head as i64,
                        SCAN_LIMIT as i32,
                    ),
                )
                .await?;
            let n = rows.len();
            let mut last = None;
            let mut hole = false;
            for e in rows {
                if last == Some(e.version) {
                    continue; // a lower epoch of a version already taken
                }
                last = Some(e.version);
                if e.version != head + 1 || e.epoch < mark_epoch || e.epoch >= epoch {
                    hole = true;
                    break;
                }
                head += 1;
                adopted.push(e);
            }
            if hole || (n < SCAN_LIMIT && head != self.bucket_end(bucket)) {
                break;
            }
            if n == 0 {
                break;
            }
        }
        if !adopted.is_empty() {
            let older = adopted.iter().filter(|e| e.epoch < epoch).count();
            tracing::info!(
                %address, from = marked + 1, to = head, epoch, older,
                "adopting rows written past the head"
            );
            let rows: Vec<NewRow<'_>> = adopted
                .iter()
                .map(|e| NewRow {
                    version: e.version,
                    id: &e.id,
                    payload: &e.payload,
                    ts: e.ts,
                })
                .collect();
            self.write_rows(&[(address, rows, epoch)]).await?;
        }
        Ok((marked, head))
    }

    /// Which of `ids` were appended to `address` at a version ≤ `head`: a candidate counts only
    /// if the message at its version carries the id.
    async fn find_appended(
        &self,
        address: &Address,
        ids: &[&str],
        head: u64,
    ) -> Result<HashMap<String, Arc<Message>>, MailboxError> {
        if head == 0 || ids.is_empty() {
            return Ok(HashMap::new());
        }
        let lookups: Vec<_> = ids
            .chunks(IDS_PER_LOOKUP)
            .map(|chunk| {
                self.session
                    .execute_unpaged(&self.st.ids_lookup, (address.as_str(), chunk.to_vec()))
            })
            .collect();
        let answers: Vec<_> = stream::iter(lookups)
            .buffer_unordered(ADDRESS_CONCURRENCY)
            .map_err(unavailable)
            .try_collect()
            .await?;
        let mut by_id: HashMap<String, Vec<u64>> = HashMap::new();
        let mut by_bucket: HashMap<u64, Vec<i64>> = HashMap::new();
        for res in answers {
            let rows = res.into_rows_result().map_err(st)?;
            for row in rows.rows::<(&str, i64)>().map_err(st)? {
                let (id, v) = row.map_err(st)?;
                if v > 0 && (v as u64) <= head {
                    by_id.entry(id.to_owned()).or_default().push(v as u64);
                    by_bucket.entry(self.bucket(v as u64)).or_default().push(v);
                }
            }
        }
        if by_id.is_empty() {
            return Ok(HashMap::new());
        }
        let mut at: HashMap<u64, Entry> = HashMap::new();
        for (bucket, versions) in by_bucket {
            let rows = self
                .entries(
                    &self.st.versions,
                    (address.as_str(), bucket as i64, versions),
                )
                .await?;
            for e in rows {
                at.entry(e.version).or_insert(e); // highest epoch first
            }
        }
        let mut found = HashMap::new();
        for (id, mut versions) in by_id {
            versions.sort_unstable();
            if let Some(e) = versions
                .iter()
                .filter_map(|v| at.get(v))
                .find(|e| e.id == id)
            {
                found.insert(id, Arc::new(super::build(address, e)?));
            }
        }
        Ok(found)
    }

    /// Writes the message rows of an append (with their id candidates), each address's tagged
    /// with its shard's epoch, in as few unlogged batches as the size limits allow, the batches
    /// concurrently. A batch holds only message rows whose partition has the same first replica
    /// and starts with one of them (the driver routes a batch by its first statement), so its
    /// coordinator holds every message row of it (an id candidate's partition, the address's,
    /// may be elsewhere). On one Cassandra node that is one batch for the rows of many
    /// addresses where there was one per address (see docs/cassandra.md).
    async fn write_rows(
        &self,
        writes: &[(&Address, Vec<NewRow<'_>>, i64)],
    ) -> Result<(), MailboxError> {
        let cluster = self.session.get_cluster_state();
        let mut items = Vec::new();
        for (address, rows, epoch) in writes {
            let a = address.as_str();
            let mut replica = None;
            let mut bucket = None;
            for r in rows {
                let b = self.bucket(r.version) as i64;
                if bucket != Some(b) {
                    bucket = Some(b);
                    replica = self.first_replica(&cluster, "mailbox_entries", &(a, b));
                }
                let size = r.payload.len() + 2 * (r.id.len() + a.len()) + 96;
                let id = Row::Id(a, r.id, r.version as i64, self.ttl_secs);
                let ts = CqlTimestamp(r.ts);
                let entry = Row::Entry(
                    a,
                    b,
                    r.version as i64,
                    *epoch,
                    r.id,
                    ts,
                    r.payload,
                    self.ttl_secs,
                );
                // The entry first: the driver routes a batch by its first statement's token.
                items.push((replica, size, [entry, id]));
            }
        }
        let batches = pack(items, MAX_BATCH_MESSAGES, MAX_BATCH_BYTES);
        self.write_batches(
            batches
                .into_iter()
                .map(|b| b.into_iter().flatten().collect()),
        )
        .await
    }

    /// Writes head marks `(address, epoch, head)`, `USING TIMESTAMP head`: one unlogged batch
    /// per first replica (and per [`MAX_BATCH_MESSAGES`]), concurrently.
    async fn write_marks(&self, marks: &[(&str, i64, i64)]) -> Result<(), MailboxError> {
        let cluster = self.session.get_cluster_state();
        let items = marks.iter().map(|&(a, epoch, head)| {
            let replica = self.first_replica(&cluster, "mailbox_head_marks", &(a,));
            (replica, a.len() + 64, Row::Mark(a, epoch, head))
        });
        self.write_batches(pack(items, MAX_BATCH_MESSAGES, MAX_BATCH_BYTES))
            .await
    }

    /// Sends unlogged batches of rows, concurrently.
    async fn write_batches(
        &self,
        batches: impl IntoIterator<Item = Vec<Row<'_>>>,
    ) -> Result<(), MailboxError> {
        let requests: Vec<_> = batches
            .into_iter()
            .map(|values| {
                let mut batch = Batch::new(BatchType::Unlogged);
                for v in &values {
                    batch.append_statement(match v {
                        Row::Id(..) => self.st.insert_id.clone(),
                        Row::Entry(..) => self.st.insert_entry.clone(),
                        Row::Mark(..) => self.st.set_mark.clone(),
                    });
                }
                batch.set_is_idempotent(true);
                async move { self.session.batch(&batch, values).await }
            })
            .collect();
        stream::iter(requests)
            .buffer_unordered(ADDRESS_CONCURRENCY)
            .map_err(unavailable)
            .try_for_each(|_| async { Ok(()) })
            .await
    }

    /// The first replica (host id) of a partition of `table`, by its key; `None` when the
    /// driver cannot tell (its schema metadata lacks the table): such rows batch together.
    fn first_replica(
        &self,
        cluster: &ClusterState,
        table: &str,
        key: &dyn SerializeRow,
    ) -> Option<uuid::Uuid> {
        let token = cluster.compute_token(&self.keyspace, table, key).ok()?;
        let replicas = cluster.get_token_endpoints(&self.keyspace, table, token);
        replicas.first().map(|(node, _)| node.host_id)
    }

    /// Claims `shards` anew (see [`crate::mailbox::Mailbox::claim`]).
    pub(super) async fn claim(&self, shards: &[u32]) -> Result<(), MailboxError> {
        let mut state = self.writer.lock().await;
        self.settle(&mut state).await;
        for s in shards {
            state.claims.remove(s);
            state.fenced.remove(s);
        }
        state.heads.retain(|a, _| !shards.contains(&self.shard(a)));
        for &s in shards {
            let epoch = self.fences.claim(s).await?;
            state.claims.insert(
                s,
                Claim {
                    epoch,
                    trust_new_ids: true,
                },
            );
        }
        Ok(())
    }

    /// See [`super::CassandraMailbox::write_unfenced`].
    pub(super) async fn write_unfenced(
        &self,
        batch: Vec<NewMessage>,
        counters: &mut HashMap<Address, u64>,
    ) -> Result<usize, MailboxError> {
        let n = batch.len();
        let now = now_ms() as i64;
        let groups: Vec<(Address, u64, Vec<NewMessage>)> = group(batch)
            .into_iter()
            .map(|(a, items)| {
                let c = counters.entry(a.clone()).or_insert(0);
                let first = *c;
                *c += items.len() as u64;
                (a, first, items.into_iter().map(|(_, m)| m).collect())
            })
            .collect();
        let rows: Vec<(&Address, Vec<NewRow<'_>>, i64)> = groups
            .iter()
            .map(|(address, first, msgs)| {
                let rows = msgs
                    .iter()
                    .enumerate()
                    .map(|(i, m)| NewRow {
                        version: first + 1 + i as u64,
                        id: m.id.as_str(),
                        payload: m.payload.get(),
                        ts: now,
                    })
                    .collect();
                (address, rows, 0)
            })
            .collect();
        self.write_rows(&rows).await?;
        let marks: Vec<(&str, i64, i64)> = groups
            .iter()
            .map(|(address, first, msgs)| (address.as_str(), 0, (first + msgs.len() as u64) as i64))
            .collect();
        self.write_marks(&marks).await?;
        Ok(n)
    }
}

/// Packs `(key, bytes, item)` into batches: items of one key only, in the order they came, at
/// most `max_items` and — unless one item alone is larger — `max_bytes` per batch.
fn pack<K: PartialEq, T>(
    items: impl IntoIterator<Item = (K, usize, T)>,
    max_items: usize,
    max_bytes: usize,
) -> Vec<Vec<T>> {
    let mut open: Vec<(K, usize, Vec<T>)> = Vec::new();
    let mut full = Vec::new();
    for (key, bytes, item) in items {
        let i = match open.iter().position(|(k, _, _)| *k == key) {
            Some(i) => i,
            None => {
                open.push((key, 0, Vec::new()));
                open.len() - 1
            }
        };
        let (_, size, batch) = &mut open[i];
        if batch.len() >= max_items || (!batch.is_empty() && *size + bytes > max_bytes) {
            full.push(std::mem::take(batch));
            *size = 0;
        }
        *size += bytes;
        batch.push(item);
    }
    full.extend(open.into_iter().map(|(_, _, b)| b));
    full
}

/// Answers `slots` with `m` (all but the first a duplicate of it).
fn answer(out: &mut Vec<(usize, Appended)>, slots: &[usize], m: &Arc<Message>, dup: bool) {
    for (k, &slot) in slots.iter().enumerate() {
        out.push((
            slot,
            Appended {
                message: m.clone(),
                duplicate: dup || k > 0,
            },
        ));
    }
}

/// Takes the next turn: its end (to send) and the turn before it (to wait for).
fn take_turn(state: &mut WriterState) -> (oneshot::Sender<bool>, Option<Turn>) {
    let (end, ended) = oneshot::channel::<bool>();
    let before = state.tail.take();
    let chained = before.clone();
    let turn: Turn = async move {
        let earlier = match chained {
            Some(t) => t.await,
            None => true,
        };
        ended.await.unwrap_or(false) && earlier
    }
    .boxed()
    .shared();
    state.tail = Some(turn);
    (end, before)
}

/// Groups a batch by address, in order of first appearance, keeping each message's position.
fn group(batch: Vec<NewMessage>) -> Vec<(Address, Vec<(usize, NewMessage)>)> {
    let mut groups: Vec<(Address, Vec<(usize, NewMessage)>)> = Vec::new();
    let mut by_address: HashMap<Address, usize> = HashMap::new();
    for (slot, m) in batch.into_iter().enumerate() {
        let g = *by_address.entry(m.address.clone()).or_insert_with(|| {
            groups.push((m.address.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push((slot, m));
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::pack;

    #[test]
    fn pack_keeps_keys_apart_and_order_within_a_key() {
        let items = [
            (1, 10, "a"),
            (2, 10, "b"),
            (1, 10, "c"),
            (3, 10, "d"),
            (2, 10, "e"),
        ];
        let batches = pack(items, 10, 1000);
        assert_eq!(batches, vec![vec!["a", "c"], vec!["b", "e"], vec!["d"]]);
    }

    #[test]
    fn pack_respects_the_count_and_the_bytes() {
        // Count: 5 items of one key, 2 per batch.
        let batches = pack((0..5).map(|i| ((), 1, i)), 2, 1000);
        assert_eq!(batches, vec![vec![0, 1], vec![2, 3], vec![4]]);
        // Bytes: 40 + 40 fit in 100, a third does not; an item larger than the limit goes alone.
        let items = [
            ((), 40, "a"),
            ((), 40, "b"),
            ((), 40, "c"),
            ((), 500, "big"),
            ((), 1, "d"),
        ];
        let batches = pack(items, 100, 100);
        assert_eq!(
            batches,
            vec![vec!["a", "b"], vec!["c"], vec!["big"], vec!["d"]]
        );
    }

    #[test]
    fn pack_places_every_item_once() {
        let items: Vec<(u8, usize, u32)> = (0..1000)
            .map(|i| ((i % 7) as u8, (i % 13) as usize * 30, i))
            .collect();
        let batches = pack(items, 17, 400);
        let mut seen: Vec<u32> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        for b in &batches {
            assert!(!b.is_empty() && b.len() <= 17);
            assert!(b.windows(2).all(|w| w[0] % 7 == w[1] % 7 && w[0] < w[1]));
            let bytes: usize = b.iter().map(|i| (*i % 13) as usize * 30).sum();
            assert!(b.len() == 1 || bytes <= 400, "{b:?} holds {bytes} bytes");
        }
    }
}
