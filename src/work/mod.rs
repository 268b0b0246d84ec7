//! Work addresses (`work:<name>`): each message goes to exactly **one** connected bound client,
//! chosen in proportion to its binding's weight, which acknowledges it with `ack` when it is
//! done. A message not acked within `work_ack_timeout_ms`, or whose client's connection closes
//! first, goes to a connected bound client again; a message is never held by two clients at
//! once; with nobody connected, messages wait.
//!
//! The [`Dispatcher`] is a [`Fanout`]: the processor hands it what it appended, like the router.
//! It keeps one [`Queue`] per work address in memory — which versions wait, which are held by
//! whom and until when, which are done — and stores only the done set, durably: a roaring bitmap
//! kept as the read marks of a reserved name no client can have ([`done_key`]), so it is as
//! compact and as expiring as read state. A node that starts again (or loads a queue for the
//! first time) takes every kept version that is not done as waiting: nothing held survives its
//! connections. The argument for why this holds, and what the cluster needs beyond it, is in
//! `docs/architecture.md` ("Work addresses").

use crate::address::{Address, ClientId, Kind};
use crate::mailbox::{Mailbox, Message};
use crate::presence::Change;
use crate::routing::{Fanout, Offered};
use crate::topology::{ReadMarks, Topology};
use roaring::RoaringTreemap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A connection that takes work: the gateway's connection.
pub trait Worker: Send + Sync + 'static {
    /// A unique id (the connection id).
    fn id(&self) -> &str;
    fn client(&self) -> &ClientId;
    /// Sends the message to the client as a `signal`; false when the connection is closed.
    fn give(&self, address: &Address, message: &Arc<Message>) -> bool;
}

/// A work message's state, as `GET /server/mailbox/work:<name>` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Waiting,
    Assigned(ClientId),
    Done,
}

impl State {
    /// `{"state": ..., "client"?: ...}` fields.
    pub fn fields(&self) -> serde_json::Value {
        match self {
            State::Waiting => serde_json::json!({ "state": "waiting" }),
            State::Assigned(c) => serde_json::json!({ "state": "assigned", "client": c }),
            State::Done => serde_json::json!({ "state": "done" }),
        }
    }
}

/// The name the done set of a work address is stored under (as read marks): `*` is not allowed
/// in a client id, so no client's read marks can be it.
pub(crate) fn done_key() -> ClientId {
    ClientId::reserved("*work-done")
}

/// Settings of the dispatcher.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long a client may hold a message before it goes to another.
    pub ack_timeout: Duration,
    /// Most messages one client holds at once per unit of its weight (more wait, or go to
    /// others): a client of weight 3 holds up to three times as many as one of weight 1, so
    /// when both are busy and equally fast they still take work 1:3.
    pub in_flight: usize,
    /// The retention, for the stored done set's lifetime (s).
    pub retention_secs: u64,
}

/// One bound client with connections up.
struct Taker {
    client: ClientId,
    weight: u32,
    conns: Vec<Arc<dyn Worker>>,
    /// Smooth weighted round robin.
    current: i64,
    held: usize,
    /// When it last acked (or joined).
    active: Instant,
}

struct Held {
    client: ClientId,
    conn: String,
    deadline: Instant,
}

/// One work address.
#[derive(Default)]
struct Queue {
    loaded: bool,
    /// The highest version known to exist.
    head: u64,
    waiting: RoaringTreemap,
    held: HashMap<u64, Held>,
    done: RoaringTreemap,
    takers: Vec<Taker>,
    /// Recently appended messages, so a dispatch needs no read (dropped once done).
    recent: HashMap<u64, Arc<Message>>,
}

/// Most appended messages a queue keeps at hand (payloads may be 64 KiB each); the rest are read
/// back from the mailbox when dealt.
const RECENT_CAP: usize = 1024;

impl Queue {
    /// Picks the next taker, by smooth weighted round robin over every connected taker (each
    /// gains its weight in credit per pick; the one picked pays the total), so the split follows
    /// the weights also when the takers are busy: when the taker whose turn it is holds its
    /// share of `in_flight` and acked within `stall`, dispatch waits for it; one that is full
    /// and silent longer loses its turn to the next with room (a stuck client does not stall
    /// the others until its messages time out). Its index, or None to wait.
    fn pick(&mut self, in_flight: usize, stall: Duration, now: Instant) -> Option<usize> {
        let room = |t: &Taker| t.held < in_flight * t.weight as usize;
        let connected = |t: &Taker| !t.conns.is_empty();
        let best = |takers: &[Taker], with_room: bool| {
            takers
                .iter()
                .enumerate()
                .filter(|(_, t)| connected(t) && (!with_room || room(t)))
                .max_by_key(|(i, t)| (t.current + t.weight as i64, std::cmp::Reverse(*i)))
                .map(|(i, _)| i)
        };
        let turn = best(&self.takers, false)?;
        let chosen = if room(&self.takers[turn]) {
            turn
        } else if now.duration_since(self.takers[turn].active) < stall {
            return None;
        } else {
            best(&self.takers, true)?
        };
        let total: i64 = self
            .takers
            .iter()
            .filter(|t| connected(t))
            .map(|t| t.weight as i64)
            .sum();
        let cap = total * in_flight as i64;
        for t in self.takers.iter_mut().filter(|t| connected(t)) {
            t.current = (t.current + t.weight as i64).min(cap);
        }
        self.takers[chosen].current -= total;
        Some(chosen)
    }

    /// Assigns waiting versions to takers with room; what to send, to whom.
    fn assign(&mut self, s: &Settings, now: Instant) -> Vec<(Arc<dyn Worker>, u64)> {
        let mut out = Vec::new();
        if !self.loaded {
            return out;
        }
        let stall = (s.ack_timeout / 20).clamp(Duration::from_millis(50), Duration::from_secs(1));
        while let Some(v) = self.waiting.min() {
            let Some(i) = self.pick(s.in_flight, stall, now) else {
                break;
            };
            self.waiting.remove(v);
            let t = &mut self.takers[i];
            t.held += 1;
            let conn = t.conns[0].clone();
            self.held.insert(
                v,
                Held {
                    client: t.client.clone(),
                    conn: conn.id().to_string(),
                    deadline: now + s.ack_timeout,
                },
            );
            out.push((conn, v));
        }
        out
    }

    /// Ends a version's holding, counting it off its holder's share; the holder's taker.
    fn unhold(&mut self, v: u64) -> Option<&mut Taker> {
        let h = self.held.remove(&v)?;
        let t = self.takers.iter_mut().find(|t| t.client == h.client)?;
        t.held = t.held.saturating_sub(1);
        Some(t)
    }

    /// Takes a version back from its holder: it waits again.
    fn release(&mut self, v: u64) {
        if self.held.contains_key(&v) {
            self.unhold(v);
            if !self.done.contains(v) {
                self.waiting.insert(v);
            }
        }
    }

    fn state(&self, v: u64) -> State {
        if self.done.contains(v) {
            State::Done
        } else if let Some(h) = self.held.get(&v) {
            State::Assigned(h.client.clone())
        } else {
            State::Waiting
        }
    }
}

/// Why an `ack` of a work message was refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "version {version} of {address} is not held by this client (done, timed out, or given to another)"
)]
pub struct NotHeld {
    pub address: Address,
    pub version: u64,
}

/// The work addresses of this node.
pub struct Dispatcher {
    me: std::sync::Weak<Dispatcher>,
    queues: Mutex<HashMap<Address, Queue>>,
    mailbox: Arc<dyn Mailbox>,
    topology: Arc<dyn Topology>,
    done_store: Arc<dyn ReadMarks>,
    settings: Settings,
    /// Done versions not stored yet, per address (written by [`Dispatcher::flush`]).
    unsaved: Mutex<HashMap<Address, Vec<u64>>>,
    /// Held by one dispatch at a time, so messages leave in the order they were assigned.
    dispatching: tokio::sync::Mutex<()>,
}

impl Dispatcher {
    pub fn new(
        mailbox: Arc<dyn Mailbox>,
        topology: Arc<dyn Topology>,
        done_store: Arc<dyn ReadMarks>,
        settings: Settings,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            queues: Default::default(),
            mailbox,
            topology,
            done_store,
            settings,
            unsaved: Default::default(),
            dispatching: Default::default(),
        })
    }

    fn me(&self) -> Option<Arc<Self>> {
        self.me.upgrade()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Address, Queue>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads a queue's state from the stores once: every kept version not done waits.
    async fn load(&self, address: &Address) -> Result<(), String> {
        if self.lock().get(address).is_some_and(|q| q.loaded) {
            return Ok(());
        }
        let (done, _) = self
            .done_store
            .marks(&done_key(), address)
            .await
            .map_err(|e| e.to_string())?;
        let h = self
            .mailbox
            .heads(std::slice::from_ref(address))
            .await
            .map_err(|e| e.to_string())?[0];
        let mut m = self.lock();
        let q = m.entry(address.clone()).or_default();
        if q.loaded {
            return Ok(());
        }
        // Appends that arrived while this read raised `head`; they wait too.
        q.head = q.head.max(h.head);
        if h.low <= q.head {
            q.waiting.insert_range(h.low..=q.head);
        }
        q.done |= done;
        q.waiting -= &q.done;
        q.loaded = true;
        Ok(())
    }

    /// A connection of a client bound to `address` is up (set-up or bound): it takes work.
    /// `weight` is its binding's, when the caller has it (else it is read).
    pub async fn join(&self, address: &Address, conn: Arc<dyn Worker>, weight: Option<u32>) {
        let weight = match weight {
            Some(w) => w,
            None => match self.topology.get(conn.client()).await {
                Ok(bindings) => bindings
                    .iter()
                    .find(|b| &b.address == address)
                    .map_or(1, |b| weight_of(b.since)),
                Err(e) => {
                    tracing::warn!(error = %e, %address, "work: reading the weight failed; 1");
                    1
                }
            },
        };
        if let Err(e) = self.load(address).await {
            tracing::warn!(error = %e, %address, "work: loading the queue failed");
        }
        {
            let mut m = self.lock();
            let q = m.entry(address.clone()).or_default();
            match q.takers.iter_mut().find(|t| &t.client == conn.client()) {
                Some(t) => {
                    t.weight = weight;
                    if !t.conns.iter().any(|c| c.id() == conn.id()) {
                        t.conns.push(conn);
                    }
                }
                None => q.takers.push(Taker {
                    client: conn.client().clone(),
                    weight,
                    conns: vec![conn],
                    current: 0,
                    held: 0,
                    active: Instant::now(),
                }),
            }
        }
        self.dispatch(address).await;
    }

    /// A connection stops taking work of `address` (closed, or unbound): what it was sent and
    /// has not acked waits again, and goes to another.
    pub async fn leave(&self, address: &Address, conn: &str) {
        {
            let mut m = self.lock();
            let Some(q) = m.get_mut(address) else { return };
            for t in &mut q.takers {
                t.conns.retain(|c| c.id() != conn);
            }
            q.takers.retain(|t| !t.conns.is_empty());
            if q.takers.is_empty() {
                q.recent.clear();
            }
            let lost: Vec<u64> = q
                .held
                .iter()
                .filter(|(_, h)| h.conn == conn)
                .map(|(v, _)| *v)
                .collect();
            for v in lost {
                q.release(v);
            }
        }
        self.dispatch(address).await;
    }

    /// `ack` of a work message: done, if this client holds it.
    pub async fn ack(
        &self,
        address: &Address,
        client: &ClientId,
        version: u64,
    ) -> Result<(), NotHeld> {
        {
            let mut m = self.lock();
            let q = m.get_mut(address);
            let Some(q) = q.filter(|q| q.held.get(&version).is_some_and(|h| &h.client == client))
            else {
                return Err(NotHeld {
                    address: address.clone(),
                    version,
                });
            };
            if let Some(t) = q.unhold(version) {
                t.active = Instant::now();
            }
            q.done.insert(version);
            q.recent.remove(&version);
            self.unsaved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(address.clone())
                .or_default()
                .push(version);
        }
        self.dispatch(address).await;
        Ok(())
    }

    /// Stores the done versions acked since the last call (run every few ms).
    pub async fn flush(&self) {
        let unsaved = std::mem::take(&mut *self.unsaved.lock().unwrap_or_else(|p| p.into_inner()));
        let ttl = self.settings.retention_secs.min(u32::MAX as u64) as u32;
        for (address, versions) in unsaved {
            let low = match self.mailbox.heads(std::slice::from_ref(&address)).await {
                Ok(h) => h[0].low,
                Err(_) => 0,
            };
            for chunk in versions.chunks(1000) {
                if let Err(e) = self
                    .done_store
                    .mark(&done_key(), &address, chunk, low, ttl)
                    .await
                {
                    tracing::warn!(error = %e, %address, "work: storing done versions failed; retrying");
                    self.unsaved
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(address.clone())
                        .or_default()
                        .extend_from_slice(chunk);
                }
            }
        }
    }

    /// Messages held past the ack timeout wait again (run every second or so).
    pub async fn expire(&self, now: Instant) {
        let touched: Vec<Address> = {
            let mut m = self.lock();
            let mut touched = Vec::new();
            for (a, q) in m.iter_mut() {
                let late: Vec<u64> = q
                    .held
                    .iter()
                    .filter(|(_, h)| h.deadline <= now)
                    .map(|(v, _)| *v)
                    .collect();
                if !late.is_empty() {
                    for v in late {
                        q.release(v);
                    }
                    touched.push(a.clone());
                }
            }
            touched
        };
        for a in touched {
            self.dispatch(&a).await;
        }
    }

    /// The states of some versions of a work address.
    pub async fn states(&self, address: &Address, versions: &[u64]) -> Result<Vec<State>, String> {
        self.load(address).await?;
        let m = self.lock();
        let q = m.get(address).ok_or("no such queue")?;
        Ok(versions.iter().map(|v| q.state(*v)).collect())
    }

    /// Hands waiting messages to takers with room, reading from the mailbox those not at hand.
    async fn dispatch(&self, address: &Address) {
        let _one_at_a_time = self.dispatching.lock().await;
        loop {
            let (sends, mut at_hand) = {
                let mut m = self.lock();
                let Some(q) = m.get_mut(address) else { return };
                let sends = q.assign(&self.settings, Instant::now());
                let at_hand: HashMap<u64, Arc<Message>> = sends
                    .iter()
                    .filter_map(|(_, v)| q.recent.get(v).map(|m| (*v, m.clone())))
                    .collect();
                (sends, at_hand)
            };
            if sends.is_empty() {
                return;
            }
            // Read what is not at hand, a run of versions at a time.
            let mut missing: Vec<u64> = sends
                .iter()
                .map(|(_, v)| *v)
                .filter(|v| !at_hand.contains_key(v))
                .collect();
            missing.sort_unstable();
            let mut i = 0;
            while i < missing.len() {
                let from = missing[i];
                let mut to = from;
                while i + 1 < missing.len() && missing[i + 1] - to < 100 {
                    i += 1;
                    to = missing[i];
                }
                i += 1;
                match self
                    .mailbox
                    .read(address, from - 1, (to - from + 1) as usize)
                    .await
                {
                    Ok(page) => {
                        for m in page.messages {
                            at_hand.insert(m.version, m);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, %address, "work: reading messages failed"),
                }
            }
            let mut failed = Vec::new();
            let mut closed: Vec<String> = Vec::new();
            for (conn, v) in &sends {
                let given = match at_hand.get(v) {
                    Some(m) => conn.give(address, m),
                    // Expired meanwhile (or unreadable): not sendable; it stops waiting.
                    None => {
                        failed.push((*v, false));
                        continue;
                    }
                };
                if !given {
                    failed.push((*v, true));
                    closed.push(conn.id().to_string());
                }
            }
            if failed.is_empty() {
                return;
            }
            {
                let mut m = self.lock();
                let Some(q) = m.get_mut(address) else { return };
                // A connection that refused is closed: it takes nothing more (its `leave` follows).
                for t in &mut q.takers {
                    t.conns.retain(|c| !closed.iter().any(|id| id == c.id()));
                }
                for (v, retry) in failed {
                    if retry {
                        q.release(v);
                    } else {
                        q.unhold(v);
                        q.waiting.remove(v);
                    }
                }
            }
            // Loop to hand the released versions to others.
            tokio::task::yield_now().await;
        }
    }
}

/// The weight a work binding stores: a work address has no cursor and no replay, so its
/// binding's `since` holds the weight (1–1000; 0, from before, counts as 1).
pub fn weight_of(since: u64) -> u32 {
    since.clamp(1, MAX_WEIGHT as u64) as u32
}

/// The largest weight a binding may carry.
pub const MAX_WEIGHT: u32 = 1000;

/// The processor hands the dispatcher what it appended; binding changes reach it through the
/// connections ([`Dispatcher::join`], [`Dispatcher::leave`]).
impl Fanout for Dispatcher {
    fn deliver(&self, messages: &[Arc<Message>], _appended_us: u64) -> Offered {
        let mut touched: Vec<Address> = Vec::new();
        {
            let mut m = self.lock();
            for msg in messages {
                if msg.address.kind() != Kind::Work {
                    continue;
                }
                let q = m.entry(msg.address.clone()).or_default();
                q.head = q.head.max(msg.version);
                if q.loaded && !q.done.contains(msg.version) && !q.held.contains_key(&msg.version) {
                    q.waiting.insert(msg.version);
                }
                // Kept at hand only while someone may take it soon: a queue nobody takes from
                // holds no payloads in memory.
                if !q.takers.is_empty() && q.recent.len() < RECENT_CAP {
                    q.recent.insert(msg.version, msg.clone());
                }
                if !touched.contains(&msg.address) {
                    touched.push(msg.address.clone());
                }
            }
        }
        if touched.is_empty() {
            return Offered::default();
        }
        // Dispatch off the processor's path.
        if let (Ok(rt), Some(me)) = (tokio::runtime::Handle::try_current(), self.me()) {
            rt.spawn(async move {
                for a in touched {
                    me.dispatch(&a).await;
                }
            });
        }
        Offered::default()
    }
    fn bound(&self, _client: &ClientId, _bindings: &[(Address, u64)]) {}
    fn unbound(&self, _client: &ClientId, _removed: &[(Address, u64)]) {}
    fn presence(&self, _change: &Change) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sink(String, ClientId);
    impl Worker for Sink {
        fn id(&self) -> &str {
            &self.0
        }
        fn client(&self) -> &ClientId {
            &self.1
        }
        fn give(&self, _: &Address, _: &Arc<Message>) -> bool {
            true
        }
    }

    fn queue(weights: &[u32], waiting: u64) -> Queue {
        let mut q = Queue {
            loaded: true,
            ..Default::default()
        };
        q.waiting.insert_range(1..=waiting);
        for (i, w) in weights.iter().enumerate() {
            let c = ClientId::parse(&format!("c{i}")).unwrap();
            q.takers.push(Taker {
                client: c.clone(),
                weight: *w,
                conns: vec![Arc::new(Sink(format!("k{i}"), c))],
                current: 0,
                held: 0,
                active: Instant::now(),
            });
        }
        q
    }

    fn settings(in_flight: usize) -> Settings {
        Settings {
            ack_timeout: Duration::from_secs(10),
            in_flight,
            retention_secs: 60,
        }
    }

    /// Counts per taker of what `assign` dealt.
    fn counts(q: &Queue) -> Vec<usize> {
        q.takers
            .iter()
            .map(|t| q.held.values().filter(|h| h.client == t.client).count())
            .collect()
    }

    #[test]
    fn deals_in_proportion_to_weight_and_never_twice() {
        let mut q = queue(&[1, 3], 4000);
        let sent = q.assign(&settings(10_000), Instant::now());
        assert_eq!(sent.len(), 4000);
        assert_eq!(counts(&q), vec![1000, 3000]);
        assert!(q.waiting.is_empty());
        // Interleaved, not in runs: of any 4 in a row, one goes to the weight-1 taker.
        for w in sent.chunks(4) {
            assert_eq!(w.iter().filter(|(c, _)| c.id() == "k0").count(), 1);
        }
    }

    #[test]
    fn a_full_taker_holds_its_turn_while_active_and_loses_it_when_silent() {
        let s = settings(2);
        let now = Instant::now();
        let mut q = queue(&[1, 1], 100);
        assert_eq!(q.assign(&s, now).len(), 4, "two each, then both full");
        // One ack frees the first taker: it takes one, then the second's turn waits for it.
        let v = *q.held.iter().find(|(_, h)| h.conn == "k0").unwrap().0;
        q.held.remove(&v);
        q.takers[0].held -= 1;
        let got = q.assign(&s, now);
        assert_eq!(got.len(), 1);
        assert!(
            q.assign(&s, now).is_empty(),
            "the full, active taker's turn waits"
        );
        // Silent past the stall: its turn goes to the one with room.
        q.held.retain(|_, h| h.conn != "k0");
        q.takers[0].held = 0;
        let later = now + Duration::from_secs(5);
        let got = q.assign(&s, later);
        assert_eq!(
            got.len(),
            2,
            "{got:?}",
            got = got
                .iter()
                .map(|(c, v)| (c.id().to_string(), *v))
                .collect::<Vec<_>>()
        );
        assert!(got.iter().all(|(c, _)| c.id() == "k0"));
    }

    #[test]
    fn released_versions_wait_again_and_done_ones_do_not() {
        let mut q = queue(&[1], 3);
        q.assign(&settings(10), Instant::now());
        q.done.insert(2);
        for v in 1..=3 {
            q.release(v);
        }
        assert_eq!(q.waiting.iter().collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(q.takers[0].held, 0);
        assert_eq!((q.state(1), q.state(2)), (State::Waiting, State::Done));
    }
}
