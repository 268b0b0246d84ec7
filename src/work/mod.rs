//! Work addresses (`work:<name>`): each message goes to exactly **one** connected bound client,
//! chosen in proportion to its binding's weight, which acknowledges it with `ack` when it is
//! done. A message not acked within `work_ack_timeout_ms`, or whose client's connection closes
//! first, goes to a connected bound client again; a message is never held by two clients at
//! once; with nobody connected, messages wait.
//!
//! The [`Dispatcher`] is a [`Fanout`]: the processor hands it what it appended, like the router.
//! It keeps one `Queue` per work address in memory — which versions wait, which are held by
//! whom and until when, which are done — and stores only the done set, durably: a roaring bitmap
//! kept as the read marks of a reserved name no client can have (`done_key`), so it is as
//! compact and as expiring as read state. A node that starts again (or loads a queue for the
//! first time) takes every kept version that is not done as waiting: nothing held survives its
//! connections. The argument for why this holds, and what the cluster needs beyond it, is in
//! `docs/architecture.md` ("Work addresses").

pub mod cluster;

use crate::address::{Address, ClientId, Kind};
use crate::mailbox::{Mailbox, Message};
use crate::presence::Change;
use crate::routing::{Fanout, Offered};
use crate::topology::{ReadMarks, Topology};
use roaring::RoaringTreemap;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub use cluster::{Frame, HeldRequest, Holder, Link, Out};
use cluster::{Holding, RemoteConn};

/// A connection that takes work: the gateway's connection.
pub trait Worker: Send + Sync + 'static {
    /// A unique id (the connection id).
    fn id(&self) -> &str;
    fn client(&self) -> &ClientId;
    /// Sends the message to the client as a `signal`; false when the connection is closed.
    fn give(&self, address: &Address, message: &Arc<Message>) -> bool;
    /// The node the connection is on, when it is not this one.
    fn node(&self) -> Option<&str> {
        None
    }
    /// Whether it still takes work of `address` (open, and bound to it). Asked under the
    /// dispatcher's lock as it joins, so that a connection closed or unbound while its join
    /// read the weight (its `leave` finding nothing to remove) is not left a taker.
    fn takes(&self, _address: &Address) -> bool {
        true
    }
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
    /// Bytes of appended messages the node's work queues keep at hand, all together
    /// (`work_at_hand_bytes`, 64 MiB by default; a message counts its signal's length and
    /// `AT_HAND_OVERHEAD`): past it, messages are read back from the mailbox when dealt. It was
    /// 1 024 messages per queue: a queue whose takers fell that far behind its appends read
    /// each message back, and on the cluster backend those reads cost Cassandra more than the
    /// appends did (`bench --scenario work`: 100 000 messages dealt at 8 k/s instead of 20 k/s).
    pub at_hand_bytes: usize,
}

/// One bound client with connections up.
struct Taker {
    client: ClientId,
    weight: u32,
    conns: Vec<Arc<dyn Worker>>,
    /// Smooth weighted round robin: the credit, within ± the queue's total weight × in-flight.
    current: i64,
    held: usize,
    /// When it last acked (or joined).
    active: Instant,
}

struct Held {
    client: ClientId,
    conn: String,
    /// The node of the connection, when it is not this one.
    node: Option<String>,
    deadline: Instant,
}

/// One work address.
#[derive(Default)]
struct Queue {
    loaded: bool,
    /// The node's lease epoch when it was loaded: once the lease has begun again since (it ran
    /// out: other nodes may have dealt the address meanwhile), it is loaded again.
    epoch: u64,
    /// The highest version known to exist.
    head: u64,
    waiting: RoaringTreemap,
    held: HashMap<u64, Held>,
    done: RoaringTreemap,
    takers: Vec<Taker>,
    /// Recently appended messages, so a dispatch needs no read (dropped once done).
    recent: AtHand,
    /// The nodes that adopted the address (asked with `adopt`), each with the term of its
    /// question, in the order the questions came and none released since. The last deals the
    /// address now, as far as this node knows: what a connection here is given from now on is
    /// acked to it, whoever sent the message (a former dealer's `Give` may arrive after the
    /// move). A list, not one name: a former dealer's question may arrive after the next
    /// dealer's, and its [`Frame::Released`] then gives the address back to the next dealer.
    dealers: Vec<(String, u64)>,
    /// Per node, the highest term it released: a question of that term or before that arrives
    /// later adopts nothing.
    released: HashMap<String, u64>,
    /// What this node dealt before the address moved away, kept until each one's deadline: a
    /// `Give` of it may still be on its way to the connection's node, which would not know of
    /// it yet when the next dealer asks, so this node tells ([`Holder::dealt`]).
    parted: HashMap<u64, Held>,
}

/// What a message kept at hand costs beyond its signal (the map entry and the message's fields).
const AT_HAND_OVERHEAD: usize = 160;

/// A queue's messages kept at hand, counted against the node's [`Settings::at_hand_bytes`] (the count is
/// shared by the node's queues and given back when a message goes, or the queue).
#[derive(Default)]
struct AtHand {
    messages: HashMap<u64, Arc<Message>>,
    /// The node's count (set by the first [`AtHand::keep`]).
    total: Option<Arc<std::sync::atomic::AtomicUsize>>,
}

impl AtHand {
    fn cost(m: &Message) -> usize {
        m.signal.get().len() + AT_HAND_OVERHEAD
    }

    /// Keeps `m` if the node's count `total` stays within `budget` with it.
    fn keep(
        &mut self,
        m: &Arc<Message>,
        total: &Arc<std::sync::atomic::AtomicUsize>,
        budget: usize,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let cost = Self::cost(m);
        let total = self.total.get_or_insert_with(|| total.clone());
        if total
            .fetch_update(Relaxed, Relaxed, |t| {
                (t + cost <= budget).then_some(t + cost)
            })
            .is_err()
        {
            return;
        }
        if let Some(old) = self.messages.insert(m.version, m.clone()) {
            total.fetch_sub(Self::cost(&old), Relaxed);
        }
    }

    fn get(&self, version: u64) -> Option<&Arc<Message>> {
        self.messages.get(&version)
    }

    fn remove(&mut self, version: u64) {
        if let (Some(m), Some(total)) = (self.messages.remove(&version), &self.total) {
            total.fetch_sub(Self::cost(&m), std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn clear(&mut self) {
        let bytes: usize = self.messages.drain().map(|(_, m)| Self::cost(&m)).sum();
        if let Some(total) = &self.total {
            total.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Drop for AtHand {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Queue {
    /// The node that deals the address now, as far as this node knows (see `dealers`).
    fn dealer(&self) -> Option<String> {
        self.dealers.last().map(|(node, _)| node.clone())
    }

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
        // Bounded both ways: while a full, silent taker loses its turns its credit stops at the
        // cap, and the ones that take them instead stop at the floor, so once it is back it is
        // ahead by at most a few rounds of in-flight messages, not by every message it missed.
        let cap = total * in_flight as i64;
        for t in self.takers.iter_mut().filter(|t| connected(t)) {
            t.current = (t.current + t.weight as i64).min(cap);
        }
        let c = &mut self.takers[chosen].current;
        *c = (*c - total).max(-cap);
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
                    node: conn.node().map(str::to_string),
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

    /// Takes the connections `gone` picks off the takers (a taker left with none is dropped, and
    /// with no taker left nothing is kept at hand). The clients whose connections they were.
    fn drop_conns(&mut self, gone: impl Fn(&dyn Worker) -> bool) -> Vec<ClientId> {
        let mut clients = Vec::new();
        for t in &mut self.takers {
            let before = t.conns.len();
            t.conns.retain(|c| !gone(c.as_ref()));
            if t.conns.len() != before {
                clients.push(t.client.clone());
            }
        }
        self.takers.retain(|t| !t.conns.is_empty());
        if self.takers.is_empty() {
            self.recent.clear();
        }
        clients
    }

    /// The held versions `lost` picks wait again; whether there were any.
    fn release_where(&mut self, lost: impl Fn(&Held) -> bool) -> bool {
        let versions: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, h)| lost(h))
            .map(|(v, _)| *v)
            .collect();
        for v in &versions {
            self.release(*v);
        }
        !versions.is_empty()
    }

    /// The address is dealt by another node now: its state is dropped (loaded again, with what
    /// every node's connections hold, if it comes back), but what it held is kept as `parted`
    /// for the next dealer's question: [`Queue::stale`], and its done versions and messages at
    /// hand go too.
    fn disown(&mut self) {
        self.stale();
        self.done.clear();
        self.recent.clear();
    }

    /// Another node dealt the address for a while and gives it back (its question released,
    /// or it left the cluster): what this node knew of the queue is stale, so it is loaded
    /// again, with what every node's connections hold, before it deals. What it held is kept as
    /// `parted` (the load counts it where nobody reports otherwise); done versions are kept
    /// (an ack is final), and so are the messages at hand.
    fn stale(&mut self) {
        self.loaded = false;
        self.waiting.clear();
        self.parted.extend(self.held.drain());
        for t in &mut self.takers {
            t.held = 0;
        }
    }

    /// `node` no longer deals the address, as of its question of `upto` (all of them for a
    /// node that left): it is dropped from `dealers`. Returns the dealer named now, if that
    /// changed.
    fn unname(&mut self, node: &str, upto: u64) -> Option<Option<String>> {
        let was = self.dealer();
        self.dealers.retain(|(n, t)| !(n == node && *t <= upto));
        let now = self.dealer();
        (was.as_deref() == Some(node) && now != was).then_some(now)
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

/// Why a work queue could not be loaded, or the states of its versions read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkError {
    /// The address's shard moved to another node while this one asked.
    #[error("the address is dealt by another node now")]
    Moved,
    /// The node is stopping.
    #[error("the node is stopping")]
    Stopping,
    /// What some node's connections hold is unknown: it did not answer, or who the nodes are is.
    #[error("{0}")]
    Unheard(String),
    /// A store read failed.
    #[error("{0}")]
    Store(String),
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
    /// This node's id (the dealer named in [`Holding`]s).
    node: String,
    queues: Mutex<HashMap<Address, Queue>>,
    mailbox: Arc<dyn Mailbox>,
    topology: Arc<dyn Topology>,
    done_store: Arc<dyn ReadMarks>,
    settings: Settings,
    /// On the cluster backend: which addresses are dealt here, and the way to the other nodes.
    link: Option<Link>,
    /// What this node's connections hold, from which dealer: `(address, version)` → holding.
    holdings: Mutex<HashMap<(Address, u64), Holding>>,
    /// Done versions not stored yet, per address (written by [`Dispatcher::flush`]).
    unsaved: Mutex<HashMap<Address, Vec<u64>>>,
    /// Addresses whose done versions a [`Dispatcher::flush`] is storing now.
    saving: Mutex<HashSet<Address>>,
    /// The count of this node's questions with `adopt` (each one's term). It starts at the
    /// clock's microseconds, so a restarted node's questions come after its earlier ones (the
    /// other nodes keep the highest term each node released, and adopt nothing at or before it).
    terms: std::sync::atomic::AtomicU64,
    /// The term of this node's latest question per address, until it is released: at once when
    /// the shard moved while it asked, else once the address is dealt elsewhere (the sweep). A
    /// question names this node the dealer wherever it was answered, and a dealer named before
    /// it there deals nothing until it is released, so none may be left unreleased. One entry per
    /// work address this node loaded while it has the address's shard.
    asked: Mutex<HashMap<Address, u64>>,
    /// Bytes the queues keep at hand, all together ([`Settings::at_hand_bytes`]).
    at_hand: Arc<std::sync::atomic::AtomicUsize>,
    /// Each address's turn to dispatch, held by one dispatch of it at a time, so its messages
    /// leave in the order they were assigned; other addresses dispatch meanwhile.
    turns: Mutex<Turns>,
    /// Frames from other nodes, handled in order by [`Dispatcher::start`]'s task.
    inbox: mpsc::UnboundedSender<(String, Frame)>,
    inbox_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, Frame)>>>,
}

/// The addresses being dispatched, or waited for (see [`Dispatcher::turn`]).
#[derive(Default)]
struct Turns {
    live: HashMap<Address, std::sync::Weak<tokio::sync::Mutex<()>>>,
    sweep_at: usize,
}

/// What a dispatcher reads and writes.
pub struct Stores {
    pub mailbox: Arc<dyn Mailbox>,
    pub topology: Arc<dyn Topology>,
    /// The done sets are stored as read marks (`done_key`).
    pub done: Arc<dyn ReadMarks>,
}

impl Dispatcher {
    /// `link`: the cluster's, or None for a node that deals every work address itself.
    pub fn new(node: &str, stores: Stores, settings: Settings, link: Option<Link>) -> Arc<Self> {
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        Arc::new_cyclic(|me| Self {
            inbox,
            inbox_rx: Mutex::new(Some(inbox_rx)),
            me: me.clone(),
            node: node.to_string(),
            queues: Default::default(),
            mailbox: stores.mailbox,
            topology: stores.topology,
            done_store: stores.done,
            settings,
            link,
            holdings: Default::default(),
            unsaved: Default::default(),
            saving: Default::default(),
            turns: Default::default(),
            terms: crate::clock::now_us().into(),
            asked: Default::default(),
            at_hand: Default::default(),
        })
    }

    fn me(&self) -> Option<Arc<Self>> {
        self.me.upgrade()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Address, Queue>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn holdings(&self) -> MutexGuard<'_, HashMap<(Address, u64), Holding>> {
        self.holdings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells every node (and this one) that this node no longer deals `address`: its question
    /// of `term`, and any before, name it the dealer no more.
    fn release(&self, address: &Address, term: u64) {
        self.send(Out::All(Frame::Released {
            address: address.clone(),
            term,
        }));
        let _ = self.released(address, &self.node, term);
    }

    /// `node` no longer deals `address` as of its question of `term`: if it was the dealer
    /// named here, the one named before it is again, and what this node's connections hold is
    /// acked to that one. True when that one is this node (it may deal again).
    fn released(&self, address: &Address, node: &str, term: u64) -> bool {
        let mut m = self.lock();
        let Some(q) = m.get_mut(address) else {
            return false;
        };
        let r = q.released.entry(node.to_string()).or_default();
        *r = (*r).max(term);
        self.unnamed(address, q, node, term)
    }

    /// `node` is no longer the dealer of `address` named here (its question of `upto`
    /// released, or it left): what this node's connections hold is acked to the one named
    /// before it, and if that is this node, its queue is loaded again before it deals. True
    /// then (it may deal again). Under the queues' lock.
    fn unnamed(&self, address: &Address, q: &mut Queue, node: &str, upto: u64) -> bool {
        let Some(Some(next)) = q.unname(node, upto) else {
            return false;
        };
        for ((a, _), h) in self.holdings().iter_mut() {
            if a == address && h.from == node {
                h.from = next.clone();
            }
        }
        if next != self.node {
            return false;
        }
        q.stale();
        true
    }

    fn asked(&self) -> MutexGuard<'_, HashMap<Address, u64>> {
        self.asked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `address`'s turn to dispatch: the one every dispatch of it waits for while another holds it.
    fn turn(&self, address: &Address) -> Arc<tokio::sync::Mutex<()>> {
        let mut t = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(turn) = t.live.get(address).and_then(std::sync::Weak::upgrade) {
            return turn;
        }
        // Turns nobody holds or waits for are dropped once the map has doubled since the
        // last sweep (so sweeping costs O(1) per turn made).
        if t.live.len() >= t.sweep_at {
            t.live.retain(|_, w| w.strong_count() > 0);
            t.sweep_at = (2 * t.live.len()).max(64);
        }
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        t.live.insert(address.clone(), Arc::downgrade(&turn));
        turn
    }

    /// Whether this node deals `address` now: its consumer owns the address's shard, and its
    /// lease as a cluster member holds.
    fn owns(&self, address: &Address) -> bool {
        self.lease_held() && self.link.as_ref().is_none_or(|l| l.owned.owns(address))
    }

    /// Whether this node's lease as a cluster member holds (always, alone).
    fn lease_held(&self) -> bool {
        self.link.as_ref().is_none_or(|l| l.lease.held())
    }

    /// The node's lease epoch (0 alone): a queue loaded in an earlier one is stale.
    fn epoch(&self) -> u64 {
        self.link.as_ref().map_or(0, |l| l.lease.epoch())
    }

    fn send(&self, out: Out) {
        if let Some(l) = &self.link {
            let _ = l.out.send(out);
        }
    }

    /// Asks the other nodes what their connections hold of `address` (none on a single node);
    /// this node's own are added. With `adopt`, the term of this question, by which every node
    /// adopts this one as the address's dealer.
    async fn ask_held(
        &self,
        address: &Address,
        adopt: Option<u64>,
    ) -> Result<Vec<Holder>, WorkError> {
        let mut all = self.held_here(address, adopt.map(|t| (self.node.as_str(), t)));
        if let Some(l) = &self.link {
            let (answer, got) = tokio::sync::oneshot::channel();
            let request = HeldRequest {
                address: address.clone(),
                adopt: adopt.is_some(),
                term: adopt.unwrap_or(0),
            };
            l.out
                .send(Out::Held { request, answer })
                .map_err(|_| WorkError::Stopping)?;
            all.extend(got.await.map_err(|_| WorkError::Stopping)??);
        }
        Ok(all)
    }

    /// A holding of one of this node's connections, acked to `from`: noted before the message
    /// is sent (the client may ack at once), under the queue's lock (see [`Self::held_here`]).
    fn holding(&self, conn: &dyn Worker, from: String) -> Holding {
        Holding {
            conn: conn.id().to_string(),
            client: conn.client().clone(),
            from,
            deadline: Instant::now() + self.settings.ack_timeout + GRACE,
            acked: false,
        }
    }

    /// What this node's connections hold of `address`, and what this node dealt of it that may
    /// not have reached its holder yet; with `dealer` (a node and the term of its question),
    /// acks go to that node from now on, unless it has released that term already.
    pub fn held_here(&self, address: &Address, mut dealer: Option<(&str, u64)>) -> Vec<Holder> {
        let mut out = Vec::new();
        // Under the queue's lock, as dispatch and `Give` note a holding with the dealer they
        // read: one noted before this has its dealer changed below, one after reads it.
        let mut m = self.lock();
        if let Some(q) = m.get_mut(address) {
            if let Some((d, term)) = dealer {
                if q.released.get(d).is_some_and(|r| *r >= term) {
                    // Its question came after its release: it deals the address no more.
                    dealer = None;
                } else {
                    q.dealers.retain(|(n, _)| n != d);
                    q.dealers.push((d.to_string(), term));
                }
            }
            for (v, h) in q.held.iter().chain(q.parted.iter()) {
                if !q.done.contains(*v) {
                    out.push(Holder {
                        version: *v,
                        client: h.client.clone(),
                        conn: h.conn.clone(),
                        node: h.node.clone().unwrap_or_else(|| self.node.clone()),
                        acked: false,
                        dealt: true,
                    });
                }
            }
        }
        let mut h = self.holdings();
        out.extend(
            h.iter_mut()
                .filter(|((a, _), _)| a == address)
                .map(|((_, v), hold)| {
                    if let Some((d, _)) = dealer {
                        hold.from = d.to_string();
                    }
                    Holder {
                        version: *v,
                        client: hold.client.clone(),
                        conn: hold.conn.clone(),
                        node: self.node.clone(),
                        acked: hold.acked,
                        dealt: false,
                    }
                }),
        );
        out
    }

    /// Loads a queue's state once, when this node starts dealing it: every kept version not
    /// done waits, except those a connection holds (on the cluster, asked of every node first).
    async fn load(&self, address: &Address) -> Result<(), WorkError> {
        let epoch = self.epoch();
        if let Some(q) = self.lock().get_mut(address) {
            if q.loaded && q.epoch == epoch {
                return Ok(());
            }
            // Loaded before this node's lease ran out (a pause past its session): others may
            // have dealt the address since, unknown to this node, which asked nobody then.
            if q.loaded {
                q.stale();
            }
        }
        let term = 1 + self
            .terms
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.asked().insert(address.clone(), term);
        let loaded = self.adopt(address, term, epoch).await;
        if loaded.is_err() && !self.owns(address) {
            // The shard moved while this asked: the next dealer's question may have come
            // first at some node, which this one's then overruled. (A question that failed
            // otherwise, some node not answering, is asked again with a new term, which
            // replaces it wherever it was answered; the sweep releases the latest once the
            // shard has moved.)
            {
                let mut asked = self.asked();
                if asked.get(address) == Some(&term) {
                    asked.remove(address);
                }
            }
            self.release(address, term);
        }
        loaded
    }

    /// [`Self::load`]'s question (of `term`, in the lease's `epoch`) and the rest of its reads.
    async fn adopt(&self, address: &Address, term: u64, epoch: u64) -> Result<(), WorkError> {
        let asked = self.ask_held(address, Some(term)).await;
        if !self.owns(address) {
            return Err(WorkError::Moved);
        }
        let mut holders = asked?;
        // Where the connections are is the truth; what a former dealer says it gave counts only
        // for versions nobody reports (its `Give` still on the way).
        holders.sort_by_key(|h| h.dealt);
        let (done, _) = self
            .done_store
            .marks(&done_key(), address)
            .await
            .map_err(|e| WorkError::Store(e.to_string()))?;
        let h = self
            .mailbox
            .heads(std::slice::from_ref(address))
            .await
            .map_err(|e| WorkError::Store(e.to_string()))?[0];
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
        let deadline = Instant::now() + self.settings.ack_timeout;
        let mut acked = Vec::new();
        for h in holders {
            if h.acked {
                // Acked while its dealer was going: done (its ack may never have arrived).
                q.done.insert(h.version);
                q.held.remove(&h.version);
                acked.push(h.version);
                continue;
            }
            if q.done.contains(h.version) || q.held.contains_key(&h.version) {
                continue;
            }
            if let Some(t) = q.takers.iter_mut().find(|t| t.client == h.client) {
                t.held += 1;
            }
            q.held.insert(
                h.version,
                Held {
                    client: h.client,
                    conn: h.conn,
                    node: (h.node != self.node).then_some(h.node),
                    deadline,
                },
            );
        }
        q.waiting -= &q.done;
        for v in q.held.keys() {
            q.waiting.remove(*v);
        }
        // What it dealt before, if it deals again: taken into account above (its own answer).
        q.parted.clear();
        q.loaded = true;
        q.epoch = epoch;
        drop(m);
        self.unsaved(address, acked);
        Ok(())
    }

    /// A connection of this node, of a client bound to `address`, is up (set-up or bound): it
    /// takes work. `weight` is its binding's, when the caller has it (else it is read).
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
        let taker = |joined| Frame::Taker {
            address: address.clone(),
            client: conn.client().clone(),
            conn: conn.id().to_string(),
            weight,
            joined,
        };
        self.send(Out::All(taker(true)));
        if !self.add_taker(address, conn.clone(), weight) {
            // Closed or unbound meanwhile, and its leave came first: the other nodes forget
            // it again (the link keeps the frames' order).
            self.send(Out::All(taker(false)));
            return;
        }
        self.dispatch(address).await;
    }

    /// Adds a connection to a queue's takers, unless it no longer takes the address; whether
    /// it was added.
    fn add_taker(&self, address: &Address, conn: Arc<dyn Worker>, weight: u32) -> bool {
        let mut m = self.lock();
        if !conn.takes(address) {
            return false;
        }
        let q = m.entry(address.clone()).or_default();
        match q.takers.iter_mut().find(|t| &t.client == conn.client()) {
            Some(t) => {
                t.weight = weight;
                if !t.conns.iter().any(|c| c.id() == conn.id()) {
                    t.conns.push(conn);
                }
            }
            None => {
                // What the client holds already counts against its room: a taker told again
                // after its node's link was made anew (its holdings kept) starts with them.
                let held = q
                    .held
                    .values()
                    .filter(|h| &h.client == conn.client())
                    .count();
                q.takers.push(Taker {
                    client: conn.client().clone(),
                    weight,
                    conns: vec![conn],
                    current: 0,
                    held,
                    active: Instant::now(),
                })
            }
        }
        true
    }

    /// A connection of this node stops taking work of `address` (closed, or unbound): what it
    /// was sent and has not acked waits again, and goes to another.
    pub async fn leave(&self, address: &Address, conn: &str) {
        let client = self.drop_conn(address, conn);
        self.holdings()
            .retain(|(a, _), h| !(a == address && h.conn == conn));
        if let Some(client) = client {
            self.send(Out::All(Frame::Taker {
                address: address.clone(),
                client,
                conn: conn.to_string(),
                weight: 0,
                joined: false,
            }));
        }
        self.dispatch(address).await;
    }

    /// Takes a connection off a queue's takers; what it holds waits again. The client, when
    /// the connection was a taker.
    fn drop_conn(&self, address: &Address, conn: &str) -> Option<ClientId> {
        let mut m = self.lock();
        let q = m.get_mut(address)?;
        let client = q.drop_conns(|c| c.id() == conn).pop();
        q.release_where(|h| h.conn == conn);
        q.parted.retain(|_, h| h.conn != conn);
        client
    }

    /// Whether `client` holds `version` of `address` through a connection of this node, not
    /// acked yet (what [`Self::ack`] takes).
    pub fn holds(&self, address: &Address, client: &ClientId, version: u64) -> bool {
        self.holdings()
            .get(&(address.clone(), version))
            .is_some_and(|h| &h.client == client && !h.acked)
    }

    /// `ack` of a work message from a connection of this node: done, if this client holds it
    /// (told to its dealer when that is another node).
    pub async fn ack(
        &self,
        address: &Address,
        client: &ClientId,
        version: u64,
    ) -> Result<(), NotHeld> {
        let refused = || NotHeld {
            address: address.clone(),
            version,
        };
        let key = (address.clone(), version);
        let from = {
            let mut h = self.holdings();
            match h.get_mut(&key) {
                Some(hold) if &hold.client == client && !hold.acked => {
                    if hold.from == self.node {
                        h.remove(&key).map(|h| h.from)
                    } else {
                        // Kept (acked) until its deadline: if its dealer goes before the ack
                        // reaches it, the next dealer learns it from here.
                        hold.acked = true;
                        Some(hold.from.clone())
                    }
                }
                _ => None,
            }
        }
        .ok_or_else(refused)?;
        if from == self.node {
            return self
                .done(address, client, version)
                .await
                .map_err(|_| refused());
        }
        self.send(Out::To(
            from,
            Frame::Ack {
                address: address.clone(),
                client: client.clone(),
                version,
            },
        ));
        Ok(())
    }

    /// A version is done, if `client` holds it here (or, while the queue is not loaded, on its
    /// node's word: the load that follows skips it).
    async fn done(&self, address: &Address, client: &ClientId, version: u64) -> Result<(), ()> {
        {
            let mut m = self.lock();
            let q = m.entry(address.clone()).or_default();
            if q.loaded {
                if q.held.get(&version).is_none_or(|h| &h.client != client) {
                    return Err(());
                }
                if let Some(t) = q.unhold(version) {
                    t.active = Instant::now();
                }
            }
            q.done.insert(version);
            q.waiting.remove(version);
            q.recent.remove(version);
            q.parted.remove(&version);
        }
        self.unsaved(address, [version]);
        self.dispatch(address).await;
        Ok(())
    }

    /// Takes a frame from the dispatcher of another node (`from`), handled in order.
    pub fn receive(&self, from: &str, frame: Frame) {
        let _ = self.inbox.send((from.to_string(), frame));
    }

    /// Starts handling frames from other nodes, in the order they came, until the node stops.
    pub fn start(self: &Arc<Self>, tasks: &crate::tasks::Tasks) {
        let Some(mut rx) = self
            .inbox_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let me = Arc::downgrade(self);
        tasks.spawn(async move {
            while let Some((from, frame)) = rx.recv().await {
                let Some(me) = me.upgrade() else { return };
                me.on_frame(&from, frame).await;
            }
        });
    }

    /// A frame from the dispatcher of another node (`from`).
    async fn on_frame(&self, from: &str, frame: Frame) {
        match frame {
            Frame::Taker {
                address,
                client,
                conn,
                weight,
                joined: true,
            } => {
                let Some(link) = self.link.as_ref() else {
                    return;
                };
                let remote = RemoteConn {
                    id: conn,
                    client,
                    node: from.to_string(),
                    out: link.out.clone(),
                    lease: link.lease.clone(),
                };
                self.add_taker(&address, Arc::new(remote), weight_of(weight as u64));
                self.dispatch_later(address);
            }
            Frame::Taker {
                address,
                conn,
                joined: false,
                ..
            }
            | Frame::Gone { address, conn } => {
                self.drop_conn(&address, &conn);
                self.dispatch_later(address);
            }
            Frame::Give {
                address,
                conn,
                version,
                signal,
                lease_ms,
            } => {
                // A sender whose lease has ended since may have been paused past its session,
                // and the version dealt elsewhere meanwhile: refused (the dealer, if it still
                // is one, deals that version again; the connection still takes work).
                let refused = cluster::lease_ended(lease_ms);
                let message = if refused {
                    tracing::warn!(%address, version, from, "work: a Give whose sender's lease had ended; refused");
                    None
                } else {
                    Message::from_signal(signal)
                };
                // Noted before it is sent (the client may ack at once), under the queue's lock,
                // acked to the node that deals the address now: the one that sent it, unless
                // another adopted the address since (it sent this before the shard moved).
                let (local, dealer) = {
                    let m = self.lock();
                    let q = m.get(&address);
                    let dealer = q
                        .and_then(|q| q.dealer())
                        .unwrap_or_else(|| from.to_string());
                    let local = q.and_then(|q| {
                        q.takers
                            .iter()
                            .flat_map(|t| t.conns.iter())
                            .find(|c| c.id() == conn && c.node().is_none())
                            .cloned()
                    });
                    if let (Some(c), Some(_)) = (&local, &message) {
                        self.holdings().insert(
                            (address.clone(), version),
                            self.holding(c.as_ref(), dealer.clone()),
                        );
                    }
                    (local, dealer)
                };
                let given = match (local, message) {
                    (Some(c), Some(m)) => c.give(&address, &Arc::new(m)),
                    _ => false,
                };
                if !given {
                    self.holdings().remove(&(address.clone(), version));
                    // Refused: that version goes out again; else the connection is gone here.
                    let gone = || {
                        if refused {
                            Frame::Refused {
                                address: address.clone(),
                                conn: conn.clone(),
                                version,
                            }
                        } else {
                            Frame::Gone {
                                address: address.clone(),
                                conn: conn.clone(),
                            }
                        }
                    };
                    if dealer != from {
                        self.send(Out::To(dealer.clone(), gone()));
                    }
                    self.send(Out::To(from.to_string(), gone()));
                }
            }
            Frame::Refused {
                address,
                conn,
                version,
            } => {
                let released = {
                    let mut m = self.lock();
                    m.get_mut(&address).is_some_and(|q| {
                        if q.parted.get(&version).is_some_and(|h| h.conn == conn) {
                            q.parted.remove(&version);
                        }
                        let held = q.held.get(&version).is_some_and(|h| h.conn == conn);
                        if held {
                            q.release(version);
                        }
                        held
                    })
                };
                if released {
                    self.dispatch_later(address);
                }
            }
            Frame::Revoke {
                address,
                conn,
                version,
            } => {
                let key = (address, version);
                let mut h = self.holdings();
                if h.get(&key).is_some_and(|h| h.conn == conn) {
                    h.remove(&key);
                }
            }
            Frame::Ack {
                address,
                client,
                version,
            } => {
                if self.done(&address, &client, version).await.is_err() {
                    tracing::debug!(%address, version, %client, "work: a late ack from another node");
                }
            }
            Frame::Released { address, term } => {
                // Dealt here again, if this node's question is the one named now: loaded again
                // first (it asks every node), off this task, which handles every node's frames.
                if self.released(&address, from, term) {
                    self.dispatch_later(address);
                }
            }
        }
    }

    /// A peer linked to this node (it can be sent frames now): it is told every connection of
    /// this node that takes work.
    pub fn peer_linked(&self, node: &str) {
        let m = self.lock();
        for (address, q) in m.iter() {
            for t in &q.takers {
                for c in t.conns.iter().filter(|c| c.node().is_none()) {
                    self.send(Out::To(
                        node.to_string(),
                        Frame::Taker {
                            address: address.clone(),
                            client: t.client.clone(),
                            conn: c.id().to_string(),
                            weight: t.weight,
                            joined: true,
                        },
                    ));
                }
            }
        }
    }

    /// The link to `node` is made anew: its takers are forgotten (it tells them again), what
    /// they hold stays held until acked or timed out. With `dead` (it left the membership),
    /// what they hold waits again.
    pub fn peer_lost(&self, node: &str, dead: bool) {
        let touched: Vec<Address> = {
            let mut m = self.lock();
            let mut touched = Vec::new();
            for (a, q) in m.iter_mut() {
                let mut changed = !q.drop_conns(|c| c.node() == Some(node)).is_empty();
                if dead {
                    changed |= q.release_where(|h| h.node.as_deref() == Some(node));
                    // It deals nothing now: if it was named the dealer here, the one before it
                    // is again (none of its questions is recorded as released: a restarted
                    // node asks with later terms).
                    changed |= self.unnamed(a, q, node, u64::MAX);
                }
                if changed {
                    touched.push(a.clone());
                }
            }
            touched
        };
        // Off the caller's task (the peers' tick).
        for a in touched {
            self.dispatch_later(a);
        }
    }

    /// [`Self::dispatch`] on a task of its own: for callers that must not wait for it (a
    /// dispatch may load the queue first, which asks every node), such as the task that
    /// handles every node's frames, or the peers' tick.
    fn dispatch_later(&self, address: Address) {
        if let (Ok(rt), Some(me)) = (tokio::runtime::Handle::try_current(), self.me()) {
            rt.spawn(async move { me.dispatch(&address).await });
        }
    }

    /// Done versions for the next [`Dispatcher::flush`] to store.
    fn unsaved(&self, address: &Address, versions: impl IntoIterator<Item = u64>) {
        let mut versions = versions.into_iter().peekable();
        if versions.peek().is_some() {
            self.unsaved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(address.clone())
                .or_default()
                .extend(versions);
        }
    }

    /// Stores the done versions acked since the last call (run every few ms). False when some
    /// could not be stored (they are kept for the next call).
    pub async fn flush(&self) -> bool {
        let mut stored = true;
        let unsaved = std::mem::take(&mut *self.unsaved.lock().unwrap_or_else(|p| p.into_inner()));
        self.saving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(unsaved.keys().cloned());
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
                    self.unsaved(&address, chunk.iter().copied());
                    stored = false;
                }
            }
            self.saving
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&address);
        }
        stored
    }

    /// Run every second or so: messages held past the ack timeout wait again (their holders'
    /// nodes are told); a queue whose shard moved away stops being dealt here, one whose shard
    /// came here with takers starts.
    pub async fn expire(&self, now: Instant) {
        // Addresses with done versions not stored yet (their queues are kept).
        let storing: HashSet<Address> = {
            let unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
            let saving = self.saving.lock().unwrap_or_else(|p| p.into_inner());
            unsaved.keys().chain(saving.iter()).cloned().collect()
        };
        let touched: Vec<Address> = {
            let mut m = self.lock();
            for q in m.values_mut() {
                // Past its deadline a version's next dealer has taken it back.
                q.parted.retain(|_, h| h.deadline > now);
            }
            // A queue nobody here takes from, with nothing held and nothing left to store, is
            // dropped: it is loaded again from the store when it is wanted (a taker, a status
            // read), and the node's memory does not grow with every work address ever used.
            m.retain(|a, q| {
                !q.takers.is_empty()
                    || !q.held.is_empty()
                    || !q.parted.is_empty()
                    || storing.contains(a)
            });
            let mut touched = Vec::new();
            for (a, q) in m.iter_mut() {
                if !self.owns(a) {
                    if q.loaded {
                        // Dealt elsewhere now: what is held is known where it is held.
                        tracing::info!(address = %a, "work: no longer dealt here");
                        q.disown();
                    }
                    continue;
                }
                if !q.loaded {
                    if !q.takers.is_empty() {
                        touched.push(a.clone());
                    }
                    continue;
                }
                let late: Vec<u64> = q
                    .held
                    .iter()
                    .filter(|(_, h)| h.deadline <= now)
                    .map(|(v, _)| *v)
                    .collect();
                if late.is_empty() && !q.waiting.is_empty() && !q.takers.is_empty() {
                    // Waiting for a full taker whose turn it was: past the stall, its turn goes
                    // to one with room.
                    touched.push(a.clone());
                }
                if !late.is_empty() {
                    for v in late {
                        if let Some(h) = q.held.get(&v) {
                            let revoke = Frame::Revoke {
                                address: a.clone(),
                                conn: h.conn.clone(),
                                version: v,
                            };
                            match &h.node {
                                Some(n) => self.send(Out::To(n.clone(), revoke)),
                                None => {
                                    self.holdings().remove(&(a.clone(), v));
                                }
                            }
                        }
                        q.release(v);
                    }
                    touched.push(a.clone());
                }
            }
            touched
        };
        self.holdings().retain(|_, h| h.deadline > now);
        // Addresses dealt elsewhere now: this node's question of each is released (the queue
        // may be gone already; the question is not forgotten with it).
        let moved: Vec<(Address, u64)> = {
            let mut asked = self.asked();
            let moved: Vec<_> = asked
                .iter()
                .filter(|(a, _)| !self.owns(a))
                .map(|(a, t)| (a.clone(), *t))
                .collect();
            for (a, _) in &moved {
                asked.remove(a);
            }
            moved
        };
        for (a, term) in moved {
            self.release(&a, term);
        }
        for a in touched {
            self.dispatch(&a).await;
        }
    }

    /// The states of some versions of a work address: from its queue where it is dealt, else
    /// from the stored done set and what the connections of every node hold.
    pub async fn states(
        &self,
        address: &Address,
        versions: &[u64],
    ) -> Result<Vec<State>, WorkError> {
        if self.owns(address) {
            match self.load(address).await {
                Ok(()) => {
                    if let Some(q) = self.lock().get(address) {
                        return Ok(versions.iter().map(|v| q.state(*v)).collect());
                    }
                    // Dropped since (its shard moved and the sweep took it): asked below.
                }
                // Moved while it loaded: asked below, as on a node that does not deal it.
                Err(WorkError::Moved) => {}
                Err(e) => return Err(e),
            }
        }
        let mut held: HashMap<u64, ClientId> = HashMap::new();
        let mut acked = RoaringTreemap::new();
        let mut holders = self.ask_held(address, None).await?;
        // What the connections' nodes say is applied last: it wins over what a dealer says.
        holders.sort_by_key(|h| !h.dealt);
        for h in holders {
            if h.acked {
                acked.insert(h.version);
            } else {
                held.insert(h.version, h.client);
            }
        }
        let (mut done, _) = self
            .done_store
            .marks(&done_key(), address)
            .await
            .map_err(|e| WorkError::Store(e.to_string()))?;
        done |= acked;
        Ok(versions
            .iter()
            .map(|v| match held.get(v) {
                _ if done.contains(*v) => State::Done,
                Some(c) => State::Assigned(c.clone()),
                None => State::Waiting,
            })
            .collect())
    }

    /// Hands waiting messages to takers with room, reading from the mailbox those not at hand.
    /// Only where the address is dealt; its queue is loaded first.
    async fn dispatch(&self, address: &Address) {
        if !self.owns(address) {
            return;
        }
        let _one_at_a_time = self.turn(address).lock_owned().await;
        // Again: the shard may have moved while this waited for the one before (a load now
        // would make this node the dealer again at every node).
        if !self.owns(address) {
            return;
        }
        loop {
            // Loaded (again, if the lease began again since: see `load`).
            if let Err(e) = self.load(address).await {
                tracing::warn!(error = %e, %address, "work: loading the queue failed; retrying");
                return;
            }
            let (sends, mut at_hand) = {
                let mut m = self.lock();
                // Asked again under the lock each round: once the shard has moved, the next
                // dealer's question (which takes this lock) sees everything assigned here.
                if !self.owns(address) {
                    return;
                }
                let Some(q) = m.get_mut(address) else { return };
                if !q.loaded || q.epoch != self.epoch() {
                    // Made stale, or the lease began again, since the load: load again.
                    continue;
                }
                // Another node's question named it the dealer after this node's own: either
                // this node's consumer has not heard yet that the shard moved (a *zombie*,
                // paused past its session), and that node deals now, or that node's question
                // is a late one, which it releases (and this node deals again, see
                // `Frame::Released`). Either way nothing is dealt here meanwhile.
                if q.dealer().is_some_and(|d| d != self.node) {
                    return;
                }
                let sends = q.assign(&self.settings, Instant::now());
                let at_hand: HashMap<u64, Arc<Message>> = sends
                    .iter()
                    .filter_map(|(_, v)| q.recent.get(*v).map(|m| (*v, m.clone())))
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
            // Versions whose read failed: they wait again, and the next dispatch (at the
            // latest the next `expire`, within a second) reads them again.
            let mut unread = RoaringTreemap::new();
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
                    Err(e) => {
                        tracing::warn!(error = %e, %address, "work: reading messages failed; they wait again");
                        unread.insert_range(from..=to);
                    }
                }
            }
            // Noted before they are sent (the client may ack at once), under the queue's lock
            // and with the dealer it names: if the shard moved meanwhile, acks go to the next
            // dealer, which learnt of these from this node's answer (`held_here`).
            {
                let m = self.lock();
                let dealer = m.get(address).and_then(|q| q.dealer());
                let mut holdings = self.holdings();
                for (conn, v) in sends.iter().filter(|(c, _)| c.node().is_none()) {
                    if at_hand.contains_key(v) {
                        let from = dealer.clone().unwrap_or_else(|| self.node.clone());
                        holdings.insert((address.clone(), *v), self.holding(conn.as_ref(), from));
                    }
                }
            }
            let mut failed = Vec::new();
            let mut closed: Vec<String> = Vec::new();
            for (conn, v) in &sends {
                let Some(m) = at_hand.get(v) else {
                    // Not read: it waits again. Read and not there: expired meanwhile, so not
                    // sendable; it stops waiting.
                    failed.push((*v, unread.contains(*v)));
                    continue;
                };
                // The lease is checked again just before it leaves: a node paused since it
                // assigned the version (past its session, so the cluster may have dealt it
                // elsewhere since) gives nothing once it wakes. A `Give` carries the lease's
                // end, checked there.
                let lease = self.lease_held();
                if !lease || !conn.give(address, m) {
                    self.holdings().remove(&(address.clone(), *v));
                    failed.push((*v, true));
                    if lease {
                        // The connection refused: it is closed.
                        closed.push(conn.id().to_string());
                    }
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
                    // Not given: nobody holds it (also if the shard moved meanwhile).
                    q.parted.remove(&v);
                    if retry {
                        q.release(v);
                    } else {
                        q.unhold(v);
                        q.waiting.remove(v);
                        q.recent.remove(v);
                    }
                }
            }
            if !unread.is_empty() {
                // The store failed: not again at once (`expire` comes back to it).
                return;
            }
            // Loop to hand the released versions to others.
            tokio::task::yield_now().await;
        }
    }
}

/// How long past its ack timeout a holding is remembered where the connection is (the dealer's
/// revoke normally ends it first).
const GRACE: Duration = Duration::from_secs(1);

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
                if !q.takers.is_empty() {
                    q.recent
                        .keep(msg, &self.at_hand, self.settings.at_hand_bytes);
                }
                if !touched.contains(&msg.address) {
                    touched.push(msg.address.clone());
                }
            }
        }
        if touched.is_empty() {
            return Offered::default();
        }
        // Dispatch off the processor's path, each address on its own (one waiting for a read
        // does not hold up the others).
        for a in touched {
            self.dispatch_later(a);
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

    /// A budget of messages at hand that no test fills (the node's default).
    pub(super) const AT_HAND_BYTES: usize = 64 << 20;

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
            at_hand_bytes: AT_HAND_BYTES,
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

    /// A mailbox whose next `fail` reads fail (a store that times out now and then), and whose
    /// reads wait while `gate` is locked for writing (a slow store).
    pub(super) struct FlakyReads {
        inner: crate::mailbox::embedded::EmbeddedMailbox,
        fail: std::sync::atomic::AtomicUsize,
        pub(super) gate: Arc<tokio::sync::RwLock<()>>,
        /// Reads begun (counted before they wait for `gate`).
        pub(super) begun: std::sync::atomic::AtomicUsize,
    }

    impl FlakyReads {
        pub(super) fn open(path: &std::path::Path) -> Arc<Self> {
            Arc::new(FlakyReads {
                inner: crate::mailbox::embedded::EmbeddedMailbox::open(path, 3_600_000).unwrap(),
                fail: 0.into(),
                gate: Default::default(),
                begun: 0.into(),
            })
        }
    }

    #[async_trait::async_trait]
    impl Mailbox for FlakyReads {
        async fn append(
            &self,
            batch: Vec<crate::mailbox::NewMessage>,
        ) -> Result<Vec<crate::mailbox::Appended>, crate::mailbox::MailboxError> {
            self.inner.append(batch).await
        }
        async fn read(
            &self,
            address: &Address,
            after: u64,
            limit: usize,
        ) -> Result<crate::mailbox::Page, crate::mailbox::MailboxError> {
            use std::sync::atomic::Ordering::SeqCst;
            self.begun.fetch_add(1, SeqCst);
            let _open = self.gate.read().await;
            if self
                .fail
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(crate::mailbox::MailboxError::Unavailable(
                    "injected read failure".into(),
                ));
            }
            self.inner.read(address, after, limit).await
        }
        async fn heads(
            &self,
            addresses: &[Address],
        ) -> Result<Vec<crate::mailbox::Head>, crate::mailbox::MailboxError> {
            self.inner.heads(addresses).await
        }
        async fn expire(&self, now_ms: u64) -> Result<u64, crate::mailbox::MailboxError> {
            self.inner.expire(now_ms).await
        }
        async fn healthy(&self) -> Result<(), crate::mailbox::MailboxError> {
            self.inner.healthy().await
        }
    }

    /// Version `v` of `address` as appended (payload `1`).
    fn message(address: &str, v: u64) -> Arc<Message> {
        let payload = serde_json::value::RawValue::from_string("1".into()).unwrap();
        let id = crate::address::MessageId::parse(&format!("m{v}")).unwrap();
        Arc::new(Message::new(
            Address::parse(address).unwrap(),
            v,
            id,
            0,
            &payload,
        ))
    }

    /// A connection that records the versions it is given; `closed`, it takes nothing.
    pub(super) struct Recorder {
        id: String,
        pub(super) client: ClientId,
        got: Mutex<Vec<u64>>,
        closed: std::sync::atomic::AtomicBool,
    }
    impl Recorder {
        /// A connection of `client`, named as its client.
        pub(super) fn new(client: &str) -> Arc<Self> {
            Self::conn(client, client)
        }
        /// The connection `id` of `client`.
        pub(super) fn conn(id: &str, client: &str) -> Arc<Self> {
            Arc::new(Self {
                id: id.into(),
                client: ClientId::parse(client).unwrap(),
                got: Mutex::new(Vec::new()),
                closed: false.into(),
            })
        }
        /// The versions given so far, in order.
        pub(super) fn got(&self) -> Vec<u64> {
            self.got.lock().unwrap().clone()
        }
    }
    impl Worker for Recorder {
        fn id(&self) -> &str {
            &self.id
        }
        fn takes(&self, _: &Address) -> bool {
            !self.closed.load(std::sync::atomic::Ordering::SeqCst)
        }
        fn client(&self) -> &ClientId {
            &self.client
        }
        fn give(&self, _: &Address, m: &Arc<Message>) -> bool {
            self.got.lock().unwrap().push(m.version);
            true
        }
    }

    /// A dispatcher on one node, and three messages of `work:w` appended while nobody took
    /// work (so none is at hand: dealing them reads the store).
    async fn three_waiting() -> (tempfile::TempDir, Arc<FlakyReads>, Arc<Dispatcher>, Address) {
        three_waiting_with(settings(10)).await
    }

    async fn three_waiting_with(
        settings: Settings,
    ) -> (tempfile::TempDir, Arc<FlakyReads>, Arc<Dispatcher>, Address) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let mailbox = FlakyReads::open(&path.join("m.redb"));
        let topo = Arc::new(
            crate::topology::embedded::EmbeddedTopology::open(&path.join("t.redb")).unwrap(),
        );
        let d = Dispatcher::new(
            "n",
            Stores {
                mailbox: mailbox.clone(),
                topology: topo.clone(),
                done: topo,
            },
            settings,
            None,
        );
        let w = Address::parse("work:w").unwrap();
        // Appended while nobody takes work: not kept at hand, so dealing them reads the store.
        mailbox
            .append(
                (1..=3)
                    .map(|i| crate::mailbox::NewMessage {
                        address: w.clone(),
                        id: crate::address::MessageId::parse(&format!("m{i}")).unwrap(),
                        payload: serde_json::value::RawValue::from_string("1".into()).unwrap(),
                        new_id: false,
                    })
                    .collect(),
            )
            .await
            .unwrap();
        (dir, mailbox, d, w)
    }

    /// Messages that must be read back from the store to be dealt, and the read fails: they
    /// wait again and are dealt at the next pass, not dropped from the queue.
    #[tokio::test]
    async fn messages_whose_read_failed_wait_and_are_dealt_later() {
        let (_dir, mailbox, d, w) = three_waiting().await;
        mailbox.fail.store(1, std::sync::atomic::Ordering::SeqCst);
        let r = Recorder::new("c");
        d.join(&w, r.clone(), Some(1)).await;
        assert!(r.got().is_empty(), "the read failed: nothing sent");
        assert_eq!(
            d.states(&w, &[1, 2, 3]).await.unwrap(),
            vec![State::Waiting; 3]
        );
        // The next pass (the node's `expire`, every second) reads them again.
        d.expire(Instant::now()).await;
        assert_eq!(r.got(), vec![1, 2, 3]);
        let held = State::Assigned(r.client.clone());
        assert_eq!(d.states(&w, &[1, 2, 3]).await.unwrap(), vec![held; 3]);
    }

    /// An address whose dispatch waits for a slow read does not hold up another's: each
    /// address has its own turn (one lock for all held every work address behind the read).
    #[tokio::test]
    async fn a_dispatch_waiting_for_a_read_holds_up_no_other_address() {
        use std::sync::atomic::Ordering::SeqCst;
        let (_dir, mailbox, d, w) = three_waiting().await;
        let other = Address::parse("work:other").unwrap();
        let fast = Recorder::new("fast");
        d.join(&other, fast.clone(), Some(1)).await;
        // `work:w`'s messages are not at hand: its dispatch reads them, and the read waits.
        let slow_store = mailbox.gate.clone().write_owned().await;
        let slow = Recorder::new("slow");
        let joined = tokio::spawn({
            let (d, w, slow) = (d.clone(), w.clone(), slow.clone());
            async move { d.join(&w, slow, Some(1)).await }
        });
        while mailbox.begun.load(SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A message for the other address, appended now (at hand: no read).
        d.deliver(&[message("work:other", 1)], 0);
        let given = async {
            while fast.got().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let before_the_read = tokio::time::timeout(Duration::from_secs(10), given)
            .await
            .is_ok();
        assert!(slow.got().is_empty(), "work:w's read still waits");
        drop(slow_store);
        joined.await.unwrap();
        assert!(
            before_the_read,
            "the other address was dealt while work:w's read waited"
        );
        assert_eq!(fast.got(), vec![1]);
        assert_eq!(slow.got(), vec![1, 2, 3]);
    }

    /// The node's `work_at_hand_bytes`: a message appended while a client takes work is dealt
    /// from memory while the budget has room for it, and read back from the store (and still
    /// dealt, in order) when it has none.
    #[tokio::test]
    async fn what_is_kept_at_hand_follows_the_nodes_setting() {
        use std::sync::atomic::Ordering::SeqCst;
        for (budget, reads) in [(AT_HAND_BYTES, 0), (0, 1)] {
            let (_dir, mailbox, d, w) = three_waiting_with(Settings {
                at_hand_bytes: budget,
                ..settings(10)
            })
            .await;
            let r = Recorder::new("c");
            d.join(&w, r.clone(), Some(1)).await;
            assert_eq!(
                r.got(),
                vec![1, 2, 3],
                "the three waiting, read from the store"
            );
            let before = mailbox.begun.load(SeqCst);
            let appended = mailbox
                .append(vec![crate::mailbox::NewMessage {
                    address: w.clone(),
                    id: crate::address::MessageId::parse("m4").unwrap(),
                    payload: serde_json::value::RawValue::from_string("4".into()).unwrap(),
                    new_id: false,
                }])
                .await
                .unwrap();
            d.deliver(&[appended[0].message.clone()], 0);
            tokio::time::timeout(Duration::from_secs(10), async {
                while r.got().len() < 4 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the fourth is dealt");
            assert_eq!(r.got(), vec![1, 2, 3, 4]);
            assert_eq!(
                mailbox.begun.load(SeqCst) - before,
                reads,
                "reads to deal the fourth with a budget of {budget} bytes"
            );
        }
    }

    /// Messages kept at hand count against the node's budget, shared by its queues: past it
    /// they are not kept, and what a queue gives back (a message done, the queue cleared or
    /// dropped) makes room again.
    #[test]
    fn messages_at_hand_keep_to_the_nodes_budget() {
        use std::sync::atomic::Ordering::SeqCst;
        let total: Arc<std::sync::atomic::AtomicUsize> = Default::default();
        let cost = AtHand::cost(&message("work:a", 1));
        let budget = 3 * cost;
        let (mut a, mut b) = (AtHand::default(), AtHand::default());
        for v in 1..=2 {
            a.keep(&message("work:a", v), &total, budget);
        }
        b.keep(&message("work:b", 1), &total, budget);
        b.keep(&message("work:b", 2), &total, budget);
        assert_eq!(total.load(SeqCst), budget, "three kept");
        assert!(
            a.get(2).is_some() && b.get(1).is_some() && b.get(2).is_none(),
            "the fourth not"
        );
        a.keep(&message("work:a", 2), &total, budget);
        assert_eq!(total.load(SeqCst), budget, "kept again: counted once");
        a.remove(1);
        b.keep(&message("work:b", 2), &total, budget);
        assert!(b.get(2).is_some(), "room again once one is done");
        b.clear();
        assert_eq!(total.load(SeqCst), cost, "a's one left");
        drop(a);
        assert_eq!(total.load(SeqCst), 0, "a dropped queue gives its back");
    }

    /// A dispatch waiting for an address's turn gets the turn its holder holds, and turns
    /// nobody holds are swept away (the map does not grow with every address ever dealt).
    #[tokio::test]
    async fn an_address_has_one_turn_and_idle_turns_are_swept() {
        let (_dir, _mailbox, d, w) = three_waiting().await;
        let held = d.turn(&w);
        assert!(Arc::ptr_eq(&held, &d.turn(&w)), "one turn per address");
        for i in 0..1000 {
            d.turn(&Address::parse(&format!("work:a{i}")).unwrap());
        }
        let t = d.turns.lock().unwrap();
        assert!(t.live.len() <= 128, "{} turns kept", t.live.len());
        assert!(
            t.live.get(&w).is_some_and(|t| t.strong_count() > 0),
            "a held turn stays"
        );
    }

    /// A taker forgotten while what it holds stays held (its node's link was made anew) and
    /// told again: it starts with what it holds counted, so it is not given more than its room.
    #[tokio::test]
    async fn a_taker_told_again_counts_what_it_holds() {
        let (_dir, _mailbox, d, w) = three_waiting().await;
        let r = Recorder::new("c");
        d.join(&w, r.clone(), Some(1)).await;
        assert_eq!(r.got(), vec![1, 2, 3]);
        // Forgotten as `peer_lost` forgets a linked node's takers: its holdings stay.
        d.lock().get_mut(&w).unwrap().drop_conns(|_| true);
        d.join(&w, r.clone(), Some(1)).await;
        let m = d.lock();
        let q = m.get(&w).unwrap();
        assert_eq!(q.held.len(), 3);
        assert_eq!(q.takers[0].held, 3, "what it holds counts against its room");
    }

    /// A connection that closed (or was unbound) while its join read the weight is not made a
    /// taker: its leave came first and found nothing, so it would have stayed one for good.
    #[tokio::test]
    async fn a_connection_closed_before_its_join_takes_nothing() {
        let (_dir, _mailbox, d, w) = three_waiting().await;
        let gone = Recorder::new("gone");
        gone.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        d.leave(&w, gone.id()).await;
        d.join(&w, gone.clone(), Some(1)).await;
        assert!(gone.got().is_empty());
        assert!(
            d.lock().get(&w).is_none_or(|q| q.takers.is_empty()),
            "not a taker"
        );
        // The next connection gets everything.
        let r = Recorder::new("c");
        d.join(&w, r.clone(), Some(1)).await;
        assert_eq!(r.got(), vec![1, 2, 3]);
        assert!(gone.got().is_empty());
    }

    /// A taker that was full and silent for a long while, back and acking at once: it gets
    /// its turns again, but not a run of every turn it missed while the other waits.
    #[test]
    fn a_taker_back_from_a_long_stall_is_not_owed_every_turn_it_missed() {
        let in_flight = 2;
        let mut q = queue(&[1, 1], 0);
        let stall = Duration::from_millis(50);
        let now = Instant::now() + Duration::from_secs(10);
        // k0 full and silent: 1 000 turns go to k1 (which acks each at once).
        q.takers[0].held = in_flight;
        q.takers[0].active = now - Duration::from_secs(5);
        for _ in 0..1000 {
            assert_eq!(q.pick(in_flight, stall, now), Some(1));
        }
        // k0 is back: both ack at once from now on.
        q.takers[0].held = 0;
        q.takers[0].active = now;
        let picks: Vec<usize> = (0..40)
            .map(|_| q.pick(in_flight, stall, now).unwrap())
            .collect();
        let run = picks.iter().take_while(|i| **i == 0).count();
        assert!(
            run <= 2 * in_flight + 1,
            "k0 took {run} turns in a row: {picks:?}"
        );
        // And then they alternate.
        let tail = &picks[run..];
        assert!(tail.windows(2).all(|w| w[0] != w[1]), "{picks:?}");
    }

    /// A queue nobody takes from, with nothing held, is dropped once its done versions are
    /// stored, and loaded again from the store when wanted (nothing done is dealt again).
    #[tokio::test]
    async fn an_idle_queue_is_dropped_once_its_done_set_is_stored() {
        let (_dir, _mailbox, d, w) = three_waiting().await;
        let r = Recorder::new("c");
        d.join(&w, r.clone(), Some(1)).await;
        assert_eq!(r.got(), vec![1, 2, 3]);
        d.expire(Instant::now()).await;
        assert!(d.lock().contains_key(&w), "a taker holds its messages");
        for v in 1..=3 {
            d.ack(&w, &r.client, v).await.unwrap();
        }
        d.leave(&w, r.id()).await;
        d.expire(Instant::now()).await;
        assert!(
            d.lock().contains_key(&w),
            "its done versions are not stored yet"
        );
        assert!(d.flush().await);
        d.expire(Instant::now()).await;
        assert!(!d.lock().contains_key(&w), "dropped");
        assert_eq!(
            d.states(&w, &[1, 2, 3]).await.unwrap(),
            vec![State::Done; 3]
        );
        let again = Recorder::new("c2");
        d.join(&w, again.clone(), Some(1)).await;
        d.expire(Instant::now()).await;
        assert!(
            d.lock().contains_key(&w),
            "kept while someone takes from it"
        );
        assert!(again.got().is_empty(), "nothing done is dealt again");
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
