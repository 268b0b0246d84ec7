//! Cross-node routing: every node tells every other node which addresses its connected clients
//! want (its *interests*), and a node that appends forwards each message only to the nodes that
//! want its address. Binding changes go to every node (the client's node applies them), and the
//! answer to a `?wait=true` operation goes to the node that waits for it.
//!
//! Transport ([`transport`]): HTTP/1.1 between nodes on their public listener, every request
//! signed with the shared `cluster_secret` ([`crate::security::PeerAuth`]: HMAC over method, path,
//! sender, time, nonce and body; replays refused). A receiver serves these routes ([`routes`]) only
//! on the cluster backend, only to a sender in the membership list, and reaches a sender only at
//! the URL the membership lists for it — never at a URL a request names. The frames are in
//! [`wire`]; the unit tests link nodes in-process through a transport of their own.
//! - `POST /internal/want` — `{node, url, session, snapshot, add, remove}`: the sender's interests
//!   (a full snapshot under a new session, then changes; an empty change is the heartbeat).
//!   `409` when the receiver does not know the session (it restarted, or dropped the sender after a
//!   failed delivery): the sender sends a snapshot again and then **repairs its clients from the
//!   mailbox**, so whatever was not forwarded meanwhile is delivered by version, never skipped.
//! - `POST /internal/deliver` — an array of frames, each `{signals: {signals, appended_us}}`,
//!   `{bound}`, `{unbound}`, `{presence}`, `{work}` (between work dispatchers) or `{applied}`,
//!   sent in order over one keep-alive connection per peer by one task per peer; the frames that
//!   queue while a request is in flight go in the next.
//!
//! Why no message is lost at a handover: a connection subscribes locally, then [`Peers::want`]
//! waits until every linked peer acknowledged its addresses, and only then are the heads read
//! and the replay started. A message appended before a peer knew the interest was appended
//! before the heads were read, so the replay has it; after, it is forwarded. A peer not linked
//! yet gets a snapshot later and the node repairs after it.

pub mod client;
pub mod routes;
#[cfg(test)]
mod tests;
pub mod transport;
pub mod wire;

use crate::address::{Address, ClientId};
use crate::cluster::Membership;
use crate::mailbox::{Mailbox, Message};
use crate::metrics::Metrics;
use crate::presence::{Change, Member};
use crate::routing::{Fanout, Offered, Replies, Router};
use crate::tasks::Tasks;
use crate::work::Dispatcher;
use bytes::Bytes;
use serde_json::value::RawValue;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use transport::{Transport, TransportError};
pub use wire::{Deliver, Want};

/// Frames waiting for one peer; past this the peer is dropped (it repairs from the mailbox).
const PEER_QUEUE: usize = 4096;
/// How often links are checked (membership, heartbeats, snapshots).
const TICK: Duration = Duration::from_millis(500);
/// Every how many ticks addresses no connection wants any more are un-announced.
const SWEEP_EVERY: u32 = 20;
/// How long a want may take before its peer is treated as unlinked.
const WANT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a batch of frames may take to be taken by a peer before it is dropped.
const DELIVER_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames sent to a peer in one request at most (those that queued meanwhile).
const FRAMES_PER_REQUEST: usize = 256;
/// How long a control call to a peer (kick, a user's connections) may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// What this node knows of a peer that wants messages from it.
struct Downstream {
    session: String,
    wants: HashSet<Address>,
    tx: mpsc::Sender<Bytes>,
}

/// This node's link to a peer it sends its interests to.
#[derive(Clone)]
struct Upstream {
    url: String,
    session: String,
}

#[derive(Default)]
struct Interests {
    /// Addresses this node announced (wanted by a local connection, until swept).
    announced: HashSet<Address>,
    /// Of those, the ones every linked peer acknowledged.
    confirmed: HashSet<Address>,
    /// Peers linked: id → link.
    linked: HashMap<String, Upstream>,
}

/// Who this node is to its peers.
pub struct Me {
    pub node: String,
    /// The URL the membership lists for this node.
    pub url: String,
}

/// Cross-node routing of one node.
pub struct Peers {
    node: String,
    url: String,
    transport: Arc<dyn Transport>,
    /// The live members other than this node (id → URL), as last read from the membership.
    members: RwLock<HashMap<String, String>>,
    /// The live members as the last [`Peers::tick`] read them: a member gone from the next
    /// read has died (`members` is read again by every question to all nodes as well, so it
    /// cannot tell a departure it has already taken in).
    ticked: Mutex<HashSet<String>>,
    /// Where messages and binding changes from other nodes are delivered (local only).
    router: Arc<Router>,
    /// Heads are read from it to repair local connections after a link.
    mailbox: Arc<dyn Mailbox>,
    membership: Arc<dyn Membership>,
    /// The work dispatcher, told of peers linked and lost and given their work frames.
    work: Option<Arc<Dispatcher>>,
    metrics: Metrics,
    tasks: Tasks,
    /// Peers that want messages from this node.
    downstream: RwLock<HashMap<String, Downstream>>,
    /// Whether links are kept ([`Peers::start`]); a single node keeps no interests at all.
    started: AtomicBool,
    /// Address → the peers that want it.
    wanted_by: RwLock<HashMap<Address, Vec<String>>>,
    interests: Mutex<Interests>,
    /// Wants are sent under the read side, a sweep (which un-announces) under the write side,
    /// so a sweep never removes an address that a connection is announcing meanwhile.
    announcing: tokio::sync::RwLock<()>,
}

/// What a node's peers link needs from the rest of the node.
pub struct Links {
    pub transport: Arc<dyn Transport>,
    pub router: Arc<Router>,
    pub mailbox: Arc<dyn Mailbox>,
    pub membership: Arc<dyn Membership>,
    pub work: Option<Arc<Dispatcher>>,
    pub metrics: Metrics,
    pub tasks: Tasks,
}

impl Peers {
    pub fn new(me: Me, links: Links) -> Arc<Self> {
        Arc::new(Self {
            node: me.node,
            url: me.url,
            transport: links.transport,
            members: Default::default(),
            ticked: Default::default(),
            router: links.router,
            mailbox: links.mailbox,
            membership: links.membership,
            work: links.work,
            metrics: links.metrics,
            tasks: links.tasks,
            downstream: Default::default(),
            started: Default::default(),
            wanted_by: Default::default(),
            interests: Default::default(),
            announcing: Default::default(),
        })
    }

    /// Starts keeping the links to the other live nodes (until the node's tasks stop).
    pub fn start(self: &Arc<Self>) {
        self.started.store(true, Ordering::SeqCst);
        let me = self.clone();
        let mut ticks = 0u32;
        self.tasks.every(TICK, move || {
            let me = me.clone();
            ticks = ticks.wrapping_add(1);
            let sweep = ticks.is_multiple_of(SWEEP_EVERY);
            async move {
                me.tick().await;
                if sweep {
                    me.sweep().await;
                }
            }
        });
    }

    fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    fn want_frame(
        &self,
        session: &str,
        snapshot: bool,
        add: Vec<Address>,
        remove: Vec<Address>,
    ) -> Want {
        Want {
            node: self.node.clone(),
            url: self.url.clone(),
            session: session.to_string(),
            snapshot,
            add,
            remove,
        }
    }

    /// A request to `url` that must be answered within `limit`.
    async fn post(
        &self,
        url: &str,
        path: &str,
        body: Bytes,
        limit: Duration,
    ) -> Result<(u16, Bytes), TransportError> {
        tokio::time::timeout(limit, self.transport.post(url, path, body))
            .await
            .unwrap_or_else(|_| {
                Err(TransportError::Timeout {
                    url: url.into(),
                    ms: limit.as_millis() as u64,
                })
            })
    }

    /// Sends a want; whether the peer took it (200).
    async fn post_want(&self, url: &str, want: &Want) -> bool {
        let Ok(body) = serde_json::to_vec(want) else {
            return false;
        };
        matches!(
            self.post(url, "/internal/want", Bytes::from(body), WANT_TIMEOUT)
                .await,
            Ok((200, _))
        )
    }

    /// Makes sure every linked peer knows this node wants `addresses` (subscribed locally
    /// before). Returns once they acknowledged, or once a peer that did not answer in time was
    /// unlinked (it repairs this node's clients when it links again).
    pub async fn want(&self, addresses: &[Address]) {
        if !self.started() {
            return;
        }
        let _announcing = self.announcing.read().await;
        let (links, add) = {
            let mut i = self.interests.lock().unwrap_or_else(|p| p.into_inner());
            let add: Vec<Address> = addresses
                .iter()
                .filter(|a| !i.confirmed.contains(*a))
                .cloned()
                .collect();
            if add.is_empty() {
                return;
            }
            i.announced.extend(add.iter().cloned());
            (i.linked.clone(), add)
        };
        let sends = links.into_iter().map(|(id, link)| {
            let want = self.want_frame(&link.session, false, add.clone(), Vec::new());
            async move {
                let ok = self.post_want(&link.url, &want).await;
                (id, link.session, ok)
            }
        });
        let results = futures_util::future::join_all(sends).await;
        let mut i = self.interests.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = true;
        for (id, session, ok) in results {
            if !ok {
                all = false;
                if i.linked.get(&id).is_some_and(|l| l.session == session) {
                    tracing::info!(peer = %id, "peer did not take a want: unlinked");
                    i.linked.remove(&id);
                }
            }
        }
        if all {
            i.confirmed.extend(add);
        }
    }

    /// [`Peers::want`], then catch the local connections of `addresses` up from the mailbox (for
    /// a binding made while connected: what was appended before the peers knew is repaired, and
    /// a rewound binding gets the messages before its head). A node without peers only catches
    /// up.
    pub fn want_then_catch_up(self: &Arc<Self>, addresses: Vec<Address>) {
        let me = self.clone();
        let linked = self.started();
        self.tasks.spawn(async move {
            if linked {
                me.want(&addresses).await;
            }
            me.catch_up(addresses).await;
        });
    }

    /// Links to live nodes not linked yet (snapshot, then repair), heartbeats the others.
    async fn tick(&self) {
        let Ok(live) = self.refresh_members().await else {
            return;
        };
        let departed = self.departed(&live);
        if let Some(work) = &self.work {
            // A node that left the membership is dead to its work: what its connections held
            // goes to others.
            for gone in &departed {
                work.peer_lost(gone, true);
            }
        }
        // Peers that left the membership get nothing more from this node.
        let gone: Vec<(String, String)> = self
            .downstream
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(id, _)| !live.contains_key(*id))
            .map(|(id, d)| (id.clone(), d.session.clone()))
            .collect();
        for (id, session) in gone {
            self.drop_peer(&id, &session);
        }
        let (linked, announced) = {
            let mut i = self.interests.lock().unwrap_or_else(|p| p.into_inner());
            i.linked.retain(|id, _| live.contains_key(id));
            (i.linked.clone(), i.announced.clone())
        };
        let mut relinked = false;
        for (id, url) in live {
            if let Some(link) = linked.get(&id) {
                let beat = self.want_frame(&link.session, false, Vec::new(), Vec::new());
                if self.post_want(&url, &beat).await {
                    continue;
                }
                self.interests
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .linked
                    .remove(&id);
            }
            // Link: a snapshot of everything announced, under a new session. The peer tells
            // this node its work takers again once it has the snapshot.
            if let Some(work) = &self.work {
                work.peer_lost(&id, false);
            }
            let session = uuid::Uuid::new_v4().simple().to_string();
            let snap = self.want_frame(
                &session,
                true,
                announced.iter().cloned().collect(),
                Vec::new(),
            );
            if self.post_want(&url, &snap).await {
                tracing::info!(peer = %id, addresses = snap.add.len(), "linked to peer");
                self.interests
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .linked
                    .insert(id, Upstream { url, session });
                relinked = true;
            }
        }
        if relinked {
            // Whatever a peer appended before it knew our interests: from the mailbox.
            let all: Vec<Address> = self.router.wanted();
            self.catch_up(all).await;
        }
    }

    /// Announces that addresses no local connection wants any more are not wanted.
    async fn sweep(&self) {
        let _announcing = self.announcing.write().await;
        let wanted: HashSet<Address> = self.router.wanted().into_iter().collect();
        let (links, remove) = {
            let mut i = self.interests.lock().unwrap_or_else(|p| p.into_inner());
            let remove: Vec<Address> = i
                .announced
                .iter()
                .filter(|a| !wanted.contains(*a))
                .cloned()
                .collect();
            for a in &remove {
                i.announced.remove(a);
                i.confirmed.remove(a);
            }
            (i.linked.clone(), remove)
        };
        if remove.is_empty() {
            return;
        }
        for (_, link) in links {
            let want = self.want_frame(&link.session, false, Vec::new(), remove.clone());
            self.post_want(&link.url, &want).await;
        }
    }

    /// Reads the heads of `addresses` and lets the local connections repair up to them.
    async fn catch_up(&self, addresses: Vec<Address>) {
        for chunk in addresses.chunks(1000) {
            match self.mailbox.heads(chunk).await {
                Ok(heads) => {
                    let known: Vec<(Address, u64)> = chunk
                        .iter()
                        .cloned()
                        .zip(heads.into_iter().map(|h| h.head))
                        .collect();
                    self.router.catch_up(&known);
                }
                Err(e) => tracing::warn!(error = %e, "catching up after a link: heads"),
            }
        }
    }

    // ---- the receiving side of wants, and forwarding ----

    /// The URL of a live member other than this node, from the membership (read again when
    /// the node is not among the members last seen: it may have just joined).
    pub async fn member_url(&self, node: &str) -> Option<String> {
        if let Some(url) = self
            .members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
        {
            return Some(url.clone());
        }
        self.refresh_members().await.ok()?.get(node).cloned()
    }

    /// Waits, up to `within`, until every other live member has linked to this node (sent it
    /// the snapshot of what it wants), so that what this node sends from then on reaches the
    /// nodes that want it: a node that just joined knows nobody's interests yet. Whether they
    /// all had.
    pub async fn wait_linked(&self, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        loop {
            if let Ok(live) = self.membership.nodes().await {
                let down = self.downstream.read().unwrap_or_else(|p| p.into_inner());
                let mut others = live.iter().filter(|n| n.id != self.node);
                // Until it is listed, no other node can have linked to it.
                let listed = live.iter().any(|n| n.id == self.node);
                if listed && others.all(|n| down.contains_key(&n.id)) {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads the live members other than this node (id → URL) from the membership, and keeps
    /// them as the list [`Peers::member_url`] answers from.
    async fn refresh_members(
        &self,
    ) -> Result<HashMap<String, String>, crate::cluster::ClusterError> {
        let live: HashMap<String, String> = self
            .membership
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.id != self.node)
            .map(|n| (n.id, n.url))
            .collect();
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = live.clone();
        Ok(live)
    }

    /// The members of the last tick that are not in `live`, which the next tick compares with.
    fn departed(&self, live: &HashMap<String, String>) -> Vec<String> {
        let now: HashSet<String> = live.keys().cloned().collect();
        let before = std::mem::replace(
            &mut *self.ticked.lock().unwrap_or_else(|p| p.into_inner()),
            now,
        );
        before
            .into_iter()
            .filter(|n| !live.contains_key(n))
            .collect()
    }

    /// Handles `POST /internal/want` from the member `want.node`, reached at `url` (the
    /// membership's URL of it, never the one in the request): 200, or 409 when the session is
    /// unknown.
    pub fn on_want(self: &Arc<Self>, want: Want, url: String) -> u16 {
        let mut down = self.downstream.write().unwrap_or_else(|p| p.into_inner());
        let mut index = self.wanted_by.write().unwrap_or_else(|p| p.into_inner());
        if want.snapshot {
            if let Some(old) = down.remove(&want.node) {
                unindex(&mut index, &want.node, old.wants.iter());
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            self.tasks.spawn(self.clone().send_loop(
                want.node.clone(),
                url,
                want.session.clone(),
                rx,
            ));
            down.insert(
                want.node.clone(),
                Downstream {
                    session: want.session.clone(),
                    wants: HashSet::new(),
                    tx,
                },
            );
            if let Some(work) = &self.work {
                work.peer_linked(&want.node);
            }
        }
        let Some(d) = down.get_mut(&want.node) else {
            return 409;
        };
        if d.session != want.session {
            return 409;
        }
        for a in want.add {
            if d.wants.insert(a.clone()) {
                index.entry(a).or_default().push(want.node.clone());
            }
        }
        for a in &want.remove {
            if d.wants.remove(a) {
                unindex(&mut index, &want.node, std::iter::once(a));
            }
        }
        200
    }

    /// Forgets a peer (its deliveries failed or its queue is full); its next heartbeat gets 409.
    fn drop_peer(&self, node: &str, session: &str) {
        let mut down = self.downstream.write().unwrap_or_else(|p| p.into_inner());
        if down.get(node).is_some_and(|d| d.session == session)
            && let Some(old) = down.remove(node)
        {
            let mut index = self.wanted_by.write().unwrap_or_else(|p| p.into_inner());
            unindex(&mut index, node, old.wants.iter());
            tracing::warn!(peer = %node, "dropped a peer link; it repairs from the mailbox");
        }
    }

    /// Sends one peer's frames in order, one request at a time.
    async fn send_loop(
        self: Arc<Self>,
        node: String,
        url: String,
        session: String,
        mut rx: mpsc::Receiver<Bytes>,
    ) {
        let mut queued = Vec::new();
        while rx.recv_many(&mut queued, FRAMES_PER_REQUEST).await > 0 {
            // Whatever queued while the previous request was in flight goes in one request:
            // a JSON array of the frames, in order.
            let mut body =
                Vec::with_capacity(queued.iter().map(|f| f.len() + 1).sum::<usize>() + 1);
            body.push(b'[');
            for (i, frame) in queued.drain(..).enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(&frame);
            }
            body.push(b']');
            let sent = self
                .post(
                    &url,
                    "/internal/deliver",
                    Bytes::from(body),
                    DELIVER_TIMEOUT,
                )
                .await;
            if !matches!(sent, Ok((200, _))) {
                self.drop_peer(&node, &session);
                return;
            }
        }
    }

    /// Queues a frame for one peer (dropped if the peer is not linked to this node).
    pub fn send_to(&self, node: &str, frame: &Deliver) {
        let Ok(body) = serde_json::to_vec(frame) else {
            return;
        };
        let full = {
            let down = self.downstream.read().unwrap_or_else(|p| p.into_inner());
            match down.get(node) {
                Some(d) => {
                    d.tx.try_send(Bytes::from(body))
                        .is_err()
                        .then(|| d.session.clone())
                }
                None => None,
            }
        };
        if let Some(session) = full {
            self.drop_peer(node, &session);
        }
    }

    /// Forwards appended messages to the peers that want their addresses: one frame per peer.
    pub fn forward(&self, messages: &[Arc<Message>], appended_us: u64) {
        let mut per_peer: HashMap<String, Vec<Box<RawValue>>> = HashMap::new();
        {
            let index = self.wanted_by.read().unwrap_or_else(|p| p.into_inner());
            if index.is_empty() {
                return;
            }
            for m in messages {
                if let Some(peers) = index.get(&m.address) {
                    for p in peers {
                        per_peer
                            .entry(p.clone())
                            .or_default()
                            .push(m.signal.clone());
                    }
                }
            }
        }
        for (peer, signals) in per_peer {
            self.metrics.forwarded.increment(signals.len() as u64);
            self.send_to(
                &peer,
                &Deliver::Signals {
                    signals,
                    appended_us,
                },
            );
        }
    }

    /// Sends a binding change to every peer (the client's node applies it).
    pub fn broadcast(&self, frame: &Deliver) {
        let peers: Vec<String> = self
            .downstream
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for p in peers {
            self.send_to(&p, frame);
        }
    }

    /// Handles `POST /internal/deliver` from the member `sender` (local delivery only: never
    /// forwarded again); the answers of `?wait=true` operations go to `replies` (this node's
    /// queue).
    pub fn on_deliver(&self, sender: &str, frame: Deliver, replies: &dyn Replies) {
        match frame {
            Deliver::Signals {
                signals,
                appended_us,
            } => {
                let msgs: Vec<Arc<Message>> = signals
                    .into_iter()
                    .filter_map(|s| Message::from_signal(s).map(Arc::new))
                    .collect();
                self.metrics.from_peers.increment(msgs.len() as u64);
                let offered = self.router.deliver(&msgs, appended_us);
                if appended_us > 0 {
                    let took = crate::clock::now_us().saturating_sub(appended_us);
                    self.metrics
                        .handoff_peer
                        .record_many(took as f64 / 1e6, offered.messages);
                }
            }
            Deliver::Bound { client, bindings } => self.router.bound(&client, &bindings),
            Deliver::Unbound { client, removed } => self.router.unbound(&client, &removed),
            Deliver::Presence {
                address,
                client,
                user,
                joined,
            } => self.router.presence(&Change {
                address,
                member: Member { client, user },
                joined,
            }),
            Deliver::Work(frame) => {
                if let Some(work) = &self.work {
                    work.receive(sender, frame);
                }
            }
            Deliver::Applied { ticket, outcome } => replies.resolve_wire(&ticket, &outcome),
        }
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A signed request to one member (a control call: kick, connections of a user); the answer's
    /// body when it is 200.
    pub async fn ask(&self, node: &str, path: &str, body: Bytes) -> Result<Bytes, String> {
        let url = self
            .member_url(node)
            .await
            .ok_or_else(|| format!("{node} is not a live member"))?;
        self.ask_at(&url, path, body).await
    }

    /// A signed control request to the member at `url`.
    async fn ask_at(&self, url: &str, path: &str, body: Bytes) -> Result<Bytes, String> {
        match self.post(url, path, body, ASK_TIMEOUT).await {
            Ok((200, b)) => Ok(b),
            Ok((status, b)) => Err(format!("{status}: {}", String::from_utf8_lossy(&b))),
            Err(e) => Err(e.to_string()),
        }
    }

    /// [`Peers::ask`] of every live member other than this node, at once. A single node asks
    /// nobody; when the members cannot be listed, nobody is asked either (a warning is logged):
    /// for answers that may be partial. [`Peers::ask_every`] where they may not.
    pub async fn ask_all(&self, path: &str, body: Bytes) -> Vec<(String, Result<Bytes, String>)> {
        if !self.started() {
            return Vec::new();
        }
        self.ask_every(path, body).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "asking the other nodes: membership unavailable");
            Vec::new()
        })
    }

    /// [`Peers::ask`] of every live member other than this node, at once, or an error when
    /// who they are is unknown: the members cannot be listed, or this node's links have not
    /// started. For a question whose answer must come from every node (what the connections
    /// of a work address hold, before it is dealt again).
    pub async fn ask_every(
        &self,
        path: &str,
        body: Bytes,
    ) -> Result<Vec<(String, Result<Bytes, String>)>, String> {
        if !self.started() {
            return Err("this node has not joined the other nodes yet".into());
        }
        let live = self
            .refresh_members()
            .await
            .map_err(|e| format!("the members are unknown: {e}"))?;
        let asks = live.into_iter().map(|(n, url)| {
            let body = body.clone();
            async move {
                let r = self.ask_at(&url, path, body).await;
                (n, r)
            }
        });
        Ok(futures_util::future::join_all(asks).await)
    }
}

fn unindex<'a>(
    index: &mut HashMap<Address, Vec<String>>,
    node: &str,
    addresses: impl Iterator<Item = &'a Address>,
) {
    for a in addresses {
        if let Some(list) = index.get_mut(a) {
            list.retain(|n| n != node);
            if list.is_empty() {
                index.remove(a);
            }
        }
    }
}

/// What the processor appends or binds here also goes to the nodes that want it, and the
/// answers of operations published on another node go back there.
impl Fanout for Peers {
    fn deliver(&self, messages: &[Arc<Message>], appended_us: u64) -> Offered {
        self.forward(messages, appended_us);
        Offered::default()
    }
    fn bound(&self, client: &ClientId, bindings: &[(Address, u64)]) {
        self.broadcast(&Deliver::Bound {
            client: client.clone(),
            bindings: bindings.to_vec(),
        })
    }
    fn unbound(&self, client: &ClientId, removed: &[(Address, u64)]) {
        self.broadcast(&Deliver::Unbound {
            client: client.clone(),
            removed: removed.to_vec(),
        })
    }
    /// To the nodes that want the address (where its members are connected).
    fn presence(&self, change: &Change) {
        let peers: Vec<String> = {
            let index = self.wanted_by.read().unwrap_or_else(|p| p.into_inner());
            index.get(&change.address).cloned().unwrap_or_default()
        };
        if peers.is_empty() {
            return;
        }
        let frame = Deliver::Presence {
            address: change.address.clone(),
            client: change.member.client.clone(),
            user: change.member.user.clone(),
            joined: change.joined,
        };
        for p in peers {
            self.send_to(&p, &frame);
        }
    }
    fn reply(&self, node: &str, ticket: &str, outcome: &dyn Fn() -> Option<Box<RawValue>>) -> bool {
        if node == self.node || !self.started() {
            return false;
        }
        if let Some(outcome) = outcome() {
            self.send_to(
                node,
                &Deliver::Applied {
                    ticket: ticket.into(),
                    outcome,
                },
            );
        }
        true
    }
}
