//! One Socket.IO connection's delivery state: for each address it receives, the last version
//! delivered and the highest version known to exist.
//!
//! Live messages are emitted straight from the router's call when the connection is `Live` and
//! the message is the next version. Anything else — the replay after connect, a version that
//! skips ahead, a socket buffer that is full (a slow client) — switches the connection to
//! `Repairing`, and one repair task pages the missing versions out of the mailbox, waiting for
//! the socket to drain between emits. So memory per connection stays bounded, a slow client never
//! stalls the router, and a client never sees a hole or a duplicate. When the repair catches up it
//! switches back to `Live` (and, the first time, sends `synced`). Around each Engine.IO ping a
//! connection whose buffer was full lately emits nothing, so the ping finds room
//! (`super::heartbeat`).

use super::Gateway;
use super::heartbeat::PingRoom;
use crate::address::{Address, ClientId, Kind};
use crate::mailbox::Message;
use crate::presence::{Change, Member};
use crate::routing::Subscriber;
use serde_json::json;
use socketioxide::extract::SocketRef;
use socketioxide::{SendError, SocketError};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// How many times (a second apart) a failed presence join or leave is tried again.
const PRESENCE_RETRIES: usize = 60;

/// How long a kicked connection stays open after `kicked` was queued, for the event to leave.
const KICK_CLOSE_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connected, reading bindings and heads; nothing is emitted yet.
    Setup,
    /// The repair task owns emitting (replay after connect, or catching up).
    Repairing,
    /// The router emits directly.
    Live,
    Closed,
}

#[derive(Debug, Clone, Copy)]
struct Track {
    delivered: u64,
    known: u64,
}

impl Track {
    /// A track delivered up to `start`. A work address's is never behind: its messages are
    /// dealt out by the dispatcher ([`crate::work`]), not replayed or offered by the router.
    fn starting(address: &Address, start: u64) -> Self {
        let start = if address.kind() == Kind::Work {
            u64::MAX
        } else {
            start
        };
        Track {
            delivered: start,
            known: start,
        }
    }
}

struct State {
    phase: Phase,
    tracks: HashMap<Address, Track>,
    repairing: bool,
    synced: bool,
    /// Control events (`bound`, `unbound`, `gap`) waiting for room in the socket buffer.
    pending: VecDeque<(&'static str, serde_json::Value)>,
    unbound_in_setup: HashSet<Address>,
    out: Outlet,
    /// This connection's place under the node's connection cap, given back at close.
    slot: Option<super::Slot>,
    /// Acks taken without counting against the event rate: at most one per event emitted
    /// ([`Conn::ack_earned`]).
    earned_acks: u64,
}

impl State {
    /// Open, and bound to `address`.
    fn takes(&self, address: &Address) -> bool {
        self.phase != Phase::Closed && self.tracks.contains_key(address)
    }
}

enum Step {
    Wait,
    Read(Address, u64),
    Done,
}

enum Emit {
    Sent,
    Full,
    Closed,
}

/// A connection as the router and the gateway see it.
pub struct Conn {
    /// A random id of this node's own (never the Engine.IO session id, which lets whoever
    /// knows it poll the session).
    id: String,
    client: ClientId,
    /// The user of the JWT it connected with.
    user: Option<String>,
    /// When its token expires (ms since epoch; `u64::MAX` without a token); `refresh` moves it.
    expires_ms: AtomicU64,
    /// When it connected (ms since epoch).
    since: u64,
    /// Events it may send (acks, refresh, …), when limited; how many were refused since it last
    /// kept within the rate for a second, and when the last one was (ms since epoch).
    events: Option<governor::DefaultDirectRateLimiter>,
    refused: AtomicU32,
    last_refused_ms: AtomicU64,
    /// When the resume token it holds was issued (ms since epoch).
    token_issued_ms: AtomicU64,
    /// Set by the first kick: its events are dropped, and it closes shortly.
    kicked: std::sync::atomic::AtomicBool,
    /// Set while a `history` or `members` request of this connection is being answered: one
    /// at a time, so a connection cannot turn its event allowance into many store reads at once.
    asking: std::sync::atomic::AtomicBool,
    svc: Arc<Gateway>,
    me: Weak<Conn>,
    state: Mutex<State>,
    /// The presence addresses this connection is a member of; the lock orders its joins and
    /// leaves (see [`Conn::sync_presence`]).
    memberships: tokio::sync::Mutex<Memberships>,
}

/// What a connection holds of presence addresses, as far as it knows.
#[derive(Default)]
struct Memberships {
    /// Joined: the store said so.
    held: HashSet<Address>,
    /// A join the store refused, not since confirmed: it may have taken effect all the same
    /// (a write that timed out), so the connection leaves these too when it no longer wants
    /// them.
    unsure: HashSet<Address>,
}

impl Memberships {
    /// Whether the store may hold `a` otherwise than `want` says: a join or leave is due.
    fn differs(&self, a: &Address, want: bool) -> bool {
        let has = self.held.contains(a) || (!want && self.unsure.contains(a));
        want != has
    }

    fn joined(&mut self, a: &Address) {
        self.held.insert(a.clone());
        self.unsure.remove(a);
    }

    fn join_failed(&mut self, a: &Address) {
        self.unsure.insert(a.clone());
    }

    fn left(&mut self, a: &Address) {
        self.held.remove(a);
        self.unsure.remove(a);
    }
}

/// A connection's deadline is its token's expiry; past it, it is kicked ("token expired").
impl super::deadlines::Due for Conn {
    fn due_ms(&self) -> u64 {
        self.expires_ms()
    }

    fn set_due_ms(&self, ms: u64) {
        self.expires_ms.store(ms, Ordering::SeqCst);
    }

    fn expire(&self) {
        self.kick("token expired");
    }
}

/// Where a connection's packets go: its socket, and the ping's room in the socket's buffer.
struct Outlet {
    socket: Option<SocketRef>,
    room: PingRoom,
    /// Events emitted so far (the repair loop's measure of progress).
    sent: u64,
}

impl Outlet {
    /// Emits now, or says the buffer is full — also while it is kept free for a ping.
    fn emit(&mut self, event: &str, data: &(impl serde::Serialize + ?Sized)) -> Emit {
        let Some(s) = &self.socket else {
            return Emit::Closed;
        };
        // (The clock is read only for a connection whose buffer has been full: the fan-out's
        // path to a connection that keeps up stays as it was.)
        if self.room.was_full() && self.room.hold(Instant::now()) {
            return Emit::Full;
        }
        match s.emit(event, data) {
            Ok(()) => {
                self.sent += 1;
                Emit::Sent
            }
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                self.room.full(Instant::now());
                Emit::Full
            }
            Err(_) => Emit::Closed,
        }
    }
}

impl Conn {
    /// A connection in `Setup`, receiving its own address from `own_cursor`.
    pub fn new(
        svc: Arc<Gateway>,
        socket: SocketRef,
        id: &super::handshake::Identity,
        own_cursor: u64,
    ) -> Arc<Self> {
        let client = id.client.clone();
        let events =
            std::num::NonZeroU32::new(svc.config.limits.event_rate_per_connection).map(|n| {
                governor::RateLimiter::direct_with_clock(
                    governor::Quota::per_second(n),
                    svc.gate.clock.clone(),
                )
            });
        let own = Address::of_client(&client);
        let ping_interval = Duration::from_millis(svc.config.ping_interval_ms);
        let mut tracks = HashMap::new();
        tracks.insert(own.clone(), Track::starting(&own, own_cursor));
        Arc::new_cyclic(|me| Conn {
            id: uuid::Uuid::new_v4().simple().to_string(),
            client,
            user: id.user.as_ref().map(|u| u.id.clone()),
            expires_ms: AtomicU64::new(id.user.as_ref().map_or(u64::MAX, |u| u.expires_ms)),
            since: crate::clock::now_ms(),
            events,
            refused: AtomicU32::new(0),
            last_refused_ms: AtomicU64::new(0),
            kicked: Default::default(),
            asking: Default::default(),
            token_issued_ms: AtomicU64::new(crate::clock::now_ms()),
            svc,
            me: me.clone(),
            state: Mutex::new(State {
                phase: Phase::Setup,
                tracks,
                repairing: false,
                synced: false,
                pending: VecDeque::new(),
                unbound_in_setup: HashSet::new(),
                out: Outlet {
                    socket: Some(socket),
                    room: PingRoom::new(Instant::now(), ping_interval),
                    sent: 0,
                },
                slot: None,
                earned_acks: 0,
            }),
            memberships: Default::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The user of the JWT it connected with.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// When it connected (ms since epoch).
    pub fn since(&self) -> u64 {
        self.since
    }

    /// When its token expires (ms since epoch; `u64::MAX` without one).
    pub fn expires_ms(&self) -> u64 {
        self.expires_ms.load(Ordering::SeqCst)
    }

    /// Whether one more event from the client is taken: `Ok`, or `Err(first)` when it is
    /// refused (`first` for the first refusal of a burst, which the client is told about; a
    /// flood is not answered event by event). A `charged` event must be within the
    /// connection's rate, and a connection refused a whole second's worth of events in one
    /// burst is closed (`kicked` `flood`); a burst ends once the connection has had no event
    /// refused for a second (the count used to run for the connection's whole life, so a
    /// client with a short burst now and then was closed in the end). An event not charged is
    /// taken unless the connection was kicked.
    pub fn allow_event(&self, charged: bool) -> Result<(), bool> {
        if self.kicked.load(Ordering::SeqCst) {
            return Err(false);
        }
        let Some(limiter) = self.events.as_ref().filter(|_| charged) else {
            return Ok(());
        };
        let now = || crate::clock::now_ms();
        if limiter.check().is_ok() {
            if self.refused.load(Ordering::Relaxed) > 0
                && now().saturating_sub(self.last_refused_ms.load(Ordering::Relaxed)) > 1000
            {
                self.refused.store(0, Ordering::SeqCst);
            }
            return Ok(());
        }
        self.last_refused_ms.store(now(), Ordering::Relaxed);
        self.svc.metrics.events_refused.increment(1);
        let refused = self.refused.fetch_add(1, Ordering::SeqCst) + 1;
        if refused >= self.svc.config.limits.event_rate_per_connection {
            self.kick("flood: too many events");
        }
        Err(refused == 1)
    }

    /// Sends a fresh resume token (`resumeToken` `{resumeToken}`) when the one the client holds
    /// was issued more than `older_than_ms` ago, so that a connection that stays open longer
    /// than the retention can still resume once it drops.
    pub fn renew_resume_token(&self, now_ms: u64, older_than_ms: u64) {
        let issued = self.token_issued_ms.load(Ordering::SeqCst);
        if now_ms.saturating_sub(issued) <= older_than_ms {
            return;
        }
        let socket = {
            let st = self.lock();
            if st.phase == Phase::Closed {
                return;
            }
            st.out.socket.clone()
        };
        let Some(socket) = socket else { return };
        let token = self
            .svc
            .credentials
            .resume_token(&self.client, self.user(), now_ms);
        if socket
            .emit("resumeToken", &json!({ "resumeToken": token }))
            .is_ok()
        {
            self.token_issued_ms.store(now_ms, Ordering::SeqCst);
        }
    }

    /// Sends `kicked` `{reason}` and closes the connection; false when it was closed or kicked
    /// already. The close follows the event after a moment (`KICK_CLOSE_DELAY`): closing at
    /// once can drop the event still in the socket's buffer.
    pub fn kick(&self, reason: &str) -> bool {
        self.kick_with(json!({ "reason": reason }))
    }

    /// [`Conn::kick`] for a reason that is not the client's: `kicked` `{reason, reconnect:
    /// true}` tells it to connect again (the client library does so by itself).
    pub fn kick_to_reconnect(&self, reason: &str) -> bool {
        self.kick_with(json!({ "reason": reason, "reconnect": true }))
    }

    fn kick_with(&self, kicked: serde_json::Value) -> bool {
        let socket = {
            let st = self.lock();
            if st.phase == Phase::Closed || self.kicked.swap(true, Ordering::SeqCst) {
                return false;
            }
            st.out.socket.clone()
        };
        let Some(socket) = socket else { return false };
        self.svc.metrics.kicked.increment(1);
        let _ = socket.emit("kicked", &kicked);
        tokio::spawn(async move {
            tokio::time::sleep(KICK_CLOSE_DELAY).await;
            let _ = socket.disconnect();
        });
        true
    }

    /// Adds the client's bindings found at connect (skipping any unbound meanwhile).
    /// Returns the addresses added, to subscribe.
    pub fn add_initial(&self, starts: Vec<(Address, u64)>) -> Vec<Address> {
        let mut st = self.lock();
        let mut added = Vec::new();
        for (a, start) in starts {
            if st.unbound_in_setup.contains(&a) || st.tracks.contains_key(&a) {
                continue;
            }
            st.tracks.insert(a.clone(), Track::starting(&a, start));
            added.push(a);
        }
        added
    }

    /// Every address this connection receives, with the last version delivered.
    pub fn cursors(&self) -> Vec<(Address, u64)> {
        self.lock()
            .tracks
            .iter()
            .map(|(a, t)| (a.clone(), t.delivered))
            .collect()
    }

    pub fn receives(&self, address: &Address) -> bool {
        self.lock().tracks.contains_key(address)
    }

    /// Whether an ack of `version` of `address` (not a work address) answers what this
    /// connection was sent: within what it was delivered, while fewer acks were taken so than
    /// events emitted to it. Each event emitted earns one such ack, whatever the order the
    /// acks are handled in (each event is handled on its own task).
    pub fn ack_earned(&self, address: &Address, version: u64) -> bool {
        if address.kind() == Kind::Work {
            return false;
        }
        let mut st = self.lock();
        let within = st
            .tracks
            .get(address)
            .is_some_and(|t| version <= t.delivered);
        if !within || st.earned_acks >= st.out.sent {
            return false;
        }
        st.earned_acks += 1;
        true
    }

    /// Raises what is known to exist (heads read at connect).
    pub fn raise_known(&self, heads: &[(Address, u64)]) {
        let mut st = self.lock();
        for (a, h) in heads {
            if let Some(t) = st.tracks.get_mut(a) {
                t.known = t.known.max(*h);
            }
        }
    }

    /// Sends `session` and starts the replay, which ends with `synced`.
    pub fn start(&self, session: &serde_json::Value) {
        let mut st = self.lock();
        if st.phase != Phase::Setup {
            return;
        }
        // The socket buffer is empty right after connect, so this cannot be refused for room.
        if let Emit::Closed = st.out.emit("session", session) {
            return;
        }
        self.repair(&mut st);
    }

    /// Brings this connection's membership of each presence address in line with what it is
    /// now: a member while it is open and receives the address. Called after anything that may
    /// change that (setup, `bound`, `unbound`, close), in any order: each call reads the state
    /// when it runs, under the connection's membership lock, so the last one settles it. Joins
    /// and leaves that start or end the client's membership are announced to the members.
    /// A join or leave the store refused is tried again every second, up to a minute.
    pub async fn sync_presence(&self, addresses: &[Address]) {
        let failed = self.sync_presence_once(addresses).await;
        if failed.is_empty() {
            return;
        }
        if let Some(me) = self.me.upgrade() {
            tokio::spawn(async move {
                let mut failed = failed;
                for _ in 0..PRESENCE_RETRIES {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    failed = me.sync_presence_once(&failed).await;
                    if failed.is_empty() {
                        return;
                    }
                }
                tracing::warn!(addresses = ?failed, "presence: gave up syncing membership");
            });
        }
    }

    /// One pass of [`Conn::sync_presence`]; the addresses whose join or leave failed.
    async fn sync_presence_once(&self, addresses: &[Address]) -> Vec<Address> {
        let mut failed = Vec::new();
        let mut held = self.memberships.lock().await;
        for a in addresses {
            let want = self.lock().takes(a);
            if !held.differs(a, want) {
                continue;
            }
            let svc = &self.svc;
            let (node, conn) = (svc.node_id.as_str(), self.id.as_str());
            let change = if want {
                let member = Member {
                    client: self.client.clone(),
                    user: self.user.clone(),
                };
                match svc.presence.join(a, &member, node, conn).await {
                    Ok(first) => {
                        held.joined(a);
                        first.then_some(Change {
                            address: a.clone(),
                            member,
                            joined: true,
                        })
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, address = %a, "presence join failed; retrying");
                        held.join_failed(a);
                        failed.push(a.clone());
                        None
                    }
                }
            } else {
                match svc.presence.leave(a, &self.client, node, conn).await {
                    Ok(last) => {
                        held.left(a);
                        last.map(|member| Change {
                            address: a.clone(),
                            member,
                            joined: false,
                        })
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, address = %a, "presence leave failed; retrying");
                        failed.push(a.clone());
                        None
                    }
                }
            };
            if let Some(change) = change {
                svc.announce(&change);
            }
        }
        failed
    }

    /// Syncs this connection's membership of a presence address in the background.
    fn spawn_sync_presence(&self, address: &Address) {
        if address.kind() != Kind::Presence {
            return;
        }
        if let Some(me) = self.me.upgrade() {
            let a = address.clone();
            tokio::spawn(async move { me.sync_presence(&[a]).await });
        }
    }

    /// Takes the connection's one slot for a read request (`history`, `members`); None while
    /// another is being answered. The slot is given back when the guard drops.
    pub fn ask(&self) -> Option<Asking<'_>> {
        self.asking
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Asking(&self.asking))
    }

    pub fn is_closed(&self) -> bool {
        self.lock().phase == Phase::Closed
    }

    /// Keeps the connection's slot under the cap until it closes.
    pub fn hold(&self, slot: Option<super::Slot>) {
        let mut st = self.lock();
        if st.phase != Phase::Closed {
            st.slot = slot;
        }
    }

    /// Stops all delivery; returns the addresses to unsubscribe (`None` when already closed).
    pub fn close(&self) -> Option<Vec<Address>> {
        let mut st = self.lock();
        if st.phase == Phase::Closed {
            return None;
        }
        st.phase = Phase::Closed;
        st.out.socket = None;
        st.slot = None;
        st.pending.clear();
        Some(st.tracks.keys().cloned().collect())
    }

    fn repair(&self, st: &mut State) {
        if st.phase == Phase::Closed {
            return;
        }
        st.phase = Phase::Repairing;
        if !st.repairing {
            st.repairing = true;
            if let Some(me) = self.me.upgrade() {
                tokio::spawn(me.run_repair());
            }
        }
    }

    /// Emits a control event now, or queues it behind a full buffer (the repair task sends it).
    fn control(&self, st: &mut State, event: &'static str, data: serde_json::Value) {
        if st.pending.is_empty() {
            match st.out.emit(event, &data) {
                Emit::Sent | Emit::Closed => return,
                Emit::Full => {}
            }
        }
        st.pending.push_back((event, data));
        self.repair(st);
    }

    /// The repair loop: flush queued control events, then page each address that is behind out
    /// of the mailbox, until nothing is behind.
    async fn run_repair(self: Arc<Self>) {
        let svc = self.svc.clone();
        let page_size = svc.config.replay_page;
        let mut carry: VecDeque<Arc<Message>> = VecDeque::new();
        let mut backoff = Duration::from_micros(500);
        // Events emitted when the buffer was last found full.
        let mut sent_at_wait = None;
        loop {
            let (next, sent) = {
                let mut st = self.lock();
                let next = self.step(&mut st, &mut carry);
                (next, st.out.sent)
            };
            let (address, after) = match next {
                Step::Done => return,
                Step::Read(a, v) => (a, v),
                Step::Wait if sent_at_wait != Some(sent) => {
                    // The buffer filled after taking more: most often the socket's writer task
                    // has not run since these emits woke it (on this thread). Let it run; it
                    // drains the whole buffer into the socket at once.
                    sent_at_wait = Some(sent);
                    backoff = Duration::from_micros(500);
                    tokio::task::yield_now().await;
                    continue;
                }
                Step::Wait => {
                    // Still full with nothing taken since: the client reads slowly (or the
                    // buffer is kept for a ping). Wait for it, longer each time.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                    continue;
                }
            };
            backoff = Duration::from_micros(500);
            let page = match svc.mailbox.read(&address, after, page_size).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, %address, "replay read failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if !self.take_page(&address, after, page, &mut carry) {
                // Known to exist but not readable yet: give the store a moment.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Applies a page read after `after`: a `gap` for expired versions, then emits what fits.
    /// Returns false when the page had nothing although more is known to exist.
    fn take_page(
        &self,
        address: &Address,
        after: u64,
        page: crate::mailbox::Page,
        carry: &mut VecDeque<Arc<Message>>,
    ) -> bool {
        let mut st = self.lock();
        let Some(t) = st.tracks.get_mut(address) else {
            return true;
        };
        if t.delivered != after {
            return true;
        }
        t.known = t.known.max(page.head.head);
        if after + 1 < page.head.low {
            let to = page.head.low - 1;
            t.delivered = to;
            self.svc.metrics.gaps.increment(1);
            self.control(
                &mut st,
                "gap",
                json!({ "address": address, "from": after + 1, "to": to }),
            );
        } else if page.messages.is_empty() {
            return false;
        }
        carry.extend(page.messages);
        self.emit_run(&mut st, carry);
        true
    }

    /// One step of the repair loop under the lock: flush what waits, then pick the next address
    /// that is behind, or finish (sending `synced` the first time) and go live.
    fn step(&self, st: &mut State, carry: &mut VecDeque<Arc<Message>>) -> Step {
        if st.phase == Phase::Closed {
            st.repairing = false;
            return Step::Done;
        }
        while let Some((event, data)) = st.pending.front() {
            match st.out.emit(event, data) {
                Emit::Sent => {
                    st.pending.pop_front();
                }
                Emit::Full => return Step::Wait,
                Emit::Closed => {
                    st.repairing = false;
                    return Step::Done;
                }
            }
        }
        if !carry.is_empty() && self.emit_run(st, carry) {
            return Step::Wait;
        }
        if let Some((a, t)) = st.tracks.iter().find(|(_, t)| t.delivered < t.known) {
            return Step::Read(a.clone(), t.delivered);
        }
        if !st.synced {
            // (A work address has no cursor: its messages are dealt out, not replayed.)
            let cursors: serde_json::Map<String, serde_json::Value> = st
                .tracks
                .iter()
                .filter(|(a, _)| a.kind() != Kind::Work)
                .map(|(a, t)| (a.to_string(), json!(t.delivered)))
                .collect();
            match st.out.emit("synced", &json!({ "cursors": cursors })) {
                Emit::Sent => st.synced = true,
                Emit::Full => return Step::Wait,
                Emit::Closed => {
                    st.repairing = false;
                    return Step::Done;
                }
            }
        }
        st.phase = Phase::Live;
        st.repairing = false;
        Step::Done
    }

    /// Emits carried messages in order; returns true when the socket buffer filled up.
    fn emit_run(&self, st: &mut State, carry: &mut VecDeque<Arc<Message>>) -> bool {
        let mut sent = 0;
        let mut full = false;
        while let Some(m) = carry.front() {
            let Some(t) = st.tracks.get(&m.address).copied() else {
                carry.clear();
                break;
            };
            if m.version <= t.delivered {
                carry.pop_front();
                continue;
            }
            if m.version != t.delivered + 1 {
                carry.clear();
                break;
            }
            match st.out.emit("signal", &*m.signal) {
                Emit::Sent => {
                    if let Some(t) = st.tracks.get_mut(&m.address) {
                        t.delivered = m.version;
                    }
                    carry.pop_front();
                    sent += 1;
                }
                Emit::Full => {
                    full = true;
                    break;
                }
                Emit::Closed => {
                    carry.clear();
                    break;
                }
            }
        }
        self.svc.metrics.replayed.increment(sent);
        self.svc.metrics.deliveries.increment(sent);
        full
    }
}

impl Subscriber for Conn {
    fn id(&self) -> &str {
        &self.id
    }

    fn client(&self) -> &ClientId {
        &self.client
    }

    fn offer(&self, address: &Address, messages: &[Arc<Message>]) {
        let Some(last) = messages.last() else { return };
        let mut st = self.lock();
        let live = st.phase == Phase::Live;
        let State { tracks, out, .. } = &mut *st;
        let Some(t) = tracks.get_mut(address) else {
            return;
        };
        t.known = t.known.max(last.version);
        if !live {
            return;
        }
        let mut sent = 0;
        let mut behind = false;
        for m in messages {
            if m.version <= t.delivered {
                continue;
            }
            if m.version != t.delivered + 1 {
                behind = true;
                break;
            }
            match out.emit("signal", &*m.signal) {
                Emit::Sent => {
                    t.delivered = m.version;
                    sent += 1;
                }
                Emit::Full => {
                    self.svc.metrics.lagged.increment(1);
                    behind = true;
                    break;
                }
                Emit::Closed => break,
            }
        }
        self.svc.metrics.deliveries.increment(sent);
        if behind {
            self.repair(&mut st);
        }
    }

    fn bound(&self, address: &Address, since: u64) {
        let mut st = self.lock();
        if st.phase == Phase::Closed || st.tracks.contains_key(address) {
            return;
        }
        st.unbound_in_setup.remove(address);
        st.tracks
            .insert(address.clone(), Track::starting(address, since));
        if st.phase != Phase::Setup {
            self.control(
                &mut st,
                "bound",
                json!({ "address": address, "version": since }),
            );
        }
        drop(st);
        if let Some(me) = self.me.upgrade() {
            let me: Arc<dyn Subscriber> = me;
            self.svc
                .router
                .subscribe(&me, std::slice::from_ref(address));
            // Bound on another node's say-so: make sure the other nodes forward this address,
            // then catch up from the mailbox on whatever they appended before they knew.
            self.svc.peers.want_then_catch_up(vec![address.clone()]);
        }
        self.spawn_sync_presence(address);
        if address.kind() == Kind::Work
            && let Some(me) = self.me.upgrade()
        {
            let a = address.clone();
            tokio::spawn(async move {
                let work = me.svc.work.clone();
                if me.receives(&a) && !me.is_closed() {
                    work.join(&a, me, None).await;
                }
            });
        }
    }

    fn known(&self, address: &Address, head: u64) {
        let mut st = self.lock();
        let behind = match st.tracks.get_mut(address) {
            Some(t) => {
                t.known = t.known.max(head);
                t.delivered < t.known
            }
            None => false,
        };
        if behind && st.phase != Phase::Setup && st.phase != Phase::Closed {
            self.repair(&mut st);
        }
    }

    fn unbound(&self, address: &Address, head: u64) {
        if address.client().as_ref() == Some(&self.client) {
            return; // a client always receives its own address
        }
        let mut st = self.lock();
        if st.phase == Phase::Closed {
            return;
        }
        let was = st.tracks.remove(address).is_some();
        if st.phase == Phase::Setup {
            st.unbound_in_setup.insert(address.clone());
        } else if was {
            self.control(
                &mut st,
                "unbound",
                json!({ "address": address, "version": head }),
            );
        }
        drop(st);
        self.svc
            .router
            .unsubscribe(&self.id, std::slice::from_ref(address));
        self.spawn_sync_presence(address);
        if address.kind() == Kind::Work {
            let (work, a, id) = (self.svc.work.clone(), address.clone(), self.id.clone());
            tokio::spawn(async move { work.leave(&a, &id).await });
        }
    }

    fn presence(&self, change: &Change) {
        let mut st = self.lock();
        if !st.tracks.contains_key(&change.address) {
            return;
        }
        match st.phase {
            Phase::Live | Phase::Repairing => {
                self.control(&mut st, change.event(), change.data());
            }
            // Nothing goes out before `session`: the change waits in the queue the replay
            // flushes first (the connection's own `joined` comes this way).
            Phase::Setup => st.pending.push_back((change.event(), change.data())),
            Phase::Closed => {}
        }
    }
}

/// A connection's read request being answered ([`Conn::ask`]).
pub struct Asking<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The dispatcher deals messages of work addresses to connections one by one.
impl crate::work::Worker for Conn {
    fn id(&self) -> &str {
        &self.id
    }

    fn client(&self) -> &ClientId {
        &self.client
    }

    fn takes(&self, address: &Address) -> bool {
        self.lock().takes(address)
    }

    fn give(&self, address: &Address, message: &Arc<Message>) -> bool {
        let mut st = self.lock();
        if !st.takes(address) {
            return false;
        }
        if st.pending.is_empty() {
            match st.out.emit("signal", &*message.signal) {
                Emit::Sent => {
                    self.svc.metrics.deliveries.increment(1);
                    return true;
                }
                Emit::Closed => return false,
                Emit::Full => {}
            }
        }
        // Behind a full buffer: queued like a control event, sent by the repair task.
        match serde_json::from_str(message.signal.get()) {
            Ok(v) => {
                st.pending.push_back(("signal", v));
                self.repair(&mut st);
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Memberships;
    use crate::address::Address;

    /// A join the store refused may have taken effect (a write that timed out after it was
    /// applied): it is retried while the address is wanted, and left once it is not, so the
    /// store keeps no membership of a connection that is gone.
    #[test]
    fn a_refused_join_is_retried_and_left() {
        let a = Address::parse("presence:lobby").unwrap();
        let mut m = Memberships::default();
        assert!(m.differs(&a, true), "not joined yet");
        assert!(!m.differs(&a, false), "nothing to leave");
        m.join_failed(&a);
        assert!(m.differs(&a, true), "the join is tried again");
        assert!(m.differs(&a, false), "and left when no longer wanted");
        m.joined(&a);
        assert!(!m.differs(&a, true));
        assert!(m.differs(&a, false));
        m.left(&a);
        assert!(!m.differs(&a, false), "left: nothing more to do");
        assert!(m.differs(&a, true));
    }
}
