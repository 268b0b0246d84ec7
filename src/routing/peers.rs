//! Cross-node routing: every node tells every other node which addresses its connected clients
//! want (its *interests*), and a node that appends forwards each message only to the nodes that
//! want its address. Binding changes go to every node (the client's node applies them), and the
//! answer to a `?wait=true` operation goes to the node that waits for it.
//!
//! Transport: HTTP/1.1 between nodes on their public listener, every request signed with the
//! shared `cluster_secret` ([`crate::security::PeerAuth`]: HMAC over method, path, sender, time,
//! nonce and body; replays refused). A receiver serves these routes only on the cluster backend,
//! only to a sender in the membership list, and reaches a sender only at the URL the membership
//! lists for it — never at a URL a request names.
//! - `POST /internal/want` — `{node, url, session, snapshot, add, remove}`: the sender's interests
//!   (a full snapshot under a new session, then changes; an empty change is the heartbeat).
//!   `409` when the receiver does not know the session (it restarted, or dropped the sender after a
//!   failed delivery): the sender sends a snapshot again and then **repairs its clients from the
//!   mailbox**, so whatever was not forwarded meanwhile is delivered by version, never skipped.
//! - `POST /internal/deliver` — an array of frames, each `{signals: {signals, appended_us}}`,
//!   `{bound}`, `{unbound}` or `{applied}`, sent in order over one keep-alive connection per peer
//!   by one task per peer; the frames that queue while a request is in flight go in the next.
//!
//! Why no message is lost at a handover: a connection subscribes locally, then [`Peers::want`]
//! waits until every linked peer acknowledged its addresses, and only then are the heads read
//! and the replay started. A message appended before a peer knew the interest was appended
//! before the heads were read, so the replay has it; after, it is forwarded. A peer not linked
//! yet gets a snapshot later and the node repairs after it.

use crate::address::{Address, ClientId};
use crate::cluster::Membership;
use crate::mailbox::{Mailbox, Message};
use crate::metrics::Metrics;
use crate::routing::Replies;
use crate::routing::Router;
use crate::security::PeerAuth;
use crate::tools::client::Http;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// Frames waiting for one peer; past this the peer is dropped (it repairs from the mailbox).
const PEER_QUEUE: usize = 4096;
/// How often links are checked (membership, heartbeats, snapshots).
const TICK: Duration = Duration::from_millis(500);
/// How long a want may take before its peer is treated as unlinked.
const WANT_TIMEOUT: Duration = Duration::from_secs(2);
/// Frames sent to a peer in one request at most (those that queued meanwhile).
const FRAMES_PER_REQUEST: usize = 256;
/// How long a control call to a peer (kick, a user's connections) may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// Keep-alive connections kept per peer for wants and heartbeats.
const IDLE_PER_PEER: usize = 4;

/// `POST /internal/want`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Want {
    pub node: String,
    pub url: String,
    pub session: String,
    #[serde(default)]
    pub snapshot: bool,
    #[serde(default)]
    pub add: Vec<Address>,
    #[serde(default)]
    pub remove: Vec<Address>,
}

/// `POST /internal/deliver`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deliver {
    Signals {
        signals: Vec<Box<RawValue>>,
        /// When the sender's append was durable (its wall clock, µs): the receiver measures the
        /// hop (`signalpost_append_to_handoff_seconds{route="peer"}`).
        #[serde(default)]
        appended_us: u64,
    },
    Bound {
        client: ClientId,
        bindings: Vec<(Address, u64)>,
    },
    Unbound {
        client: ClientId,
        removed: Vec<(Address, u64)>,
    },
    /// The answer of a `?wait=true` operation, as the ingest side wrote it
    /// (`ingest::wire`): opaque here, handed to this node's [`Replies`].
    Applied {
        ticket: String,
        outcome: Box<RawValue>,
    },
}

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

/// Cross-node routing of one node.
pub struct Peers {
    node: String,
    url: String,
    auth: Arc<PeerAuth>,
    /// The roots peers' HTTPS certificates are checked against (when nodes speak TLS).
    tls: Option<tokio_rustls::TlsConnector>,
    /// The live members other than this node (id → URL), as last read from the membership.
    members: RwLock<HashMap<String, String>>,
    router: Arc<Router>,
    mailbox: Arc<dyn Mailbox>,
    membership: Arc<dyn Membership>,
    replies: Mutex<Option<Weak<dyn Replies>>>,
    metrics: Metrics,
    /// Peers that want messages from this node.
    downstream: RwLock<HashMap<String, Downstream>>,
    /// Whether links are kept ([`Peers::start`]); a single node keeps no interests at all.
    started: std::sync::atomic::AtomicBool,
    /// Address → the peers that want it.
    wanted_by: RwLock<HashMap<Address, Vec<String>>>,
    interests: Mutex<Interests>,
    /// Keep-alive connections for wants and heartbeats, by peer URL.
    idle: Mutex<HashMap<String, Vec<Http>>>,
    /// Wants are sent under the read side, a sweep (which un-announces) under the write side,
    /// so a sweep never removes an address that a connection is announcing meanwhile.
    announcing: tokio::sync::RwLock<()>,
}

/// Who this node is to its peers, and how it proves it.
pub struct Me {
    pub node: String,
    /// The URL the membership lists for this node.
    pub url: String,
    /// Signs this node's requests with the cluster secret, checks its peers'.
    pub auth: Arc<PeerAuth>,
    /// The roots to trust when peers speak HTTPS.
    pub tls: Option<tokio_rustls::TlsConnector>,
}

impl Peers {
    pub fn new(
        me: Me,
        router: Arc<Router>,
        mailbox: Arc<dyn Mailbox>,
        membership: Arc<dyn Membership>,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            node: me.node,
            url: me.url,
            auth: me.auth,
            tls: me.tls,
            members: Default::default(),
            router,
            mailbox,
            membership,
            replies: Mutex::new(None),
            metrics,
            downstream: Default::default(),
            started: Default::default(),
            wanted_by: Default::default(),
            interests: Default::default(),
            idle: Default::default(),
            announcing: Default::default(),
        })
    }

    /// Where `applied` answers go (the queue whose publishers wait for them).
    pub fn set_replies(&self, replies: Weak<dyn Replies>) {
        *self.replies.lock().unwrap_or_else(|p| p.into_inner()) = Some(replies);
    }

    /// Starts the task that keeps the links to the other live nodes.
    pub fn start(self: &Arc<Self>) {
        self.started
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut sweep = 0u32;
            loop {
                tokio::time::sleep(TICK).await;
                let Some(me) = weak.upgrade() else { return };
                me.tick().await;
                sweep += 1;
                if sweep.is_multiple_of(20) {
                    me.sweep().await;
                }
            }
        });
    }

    /// Makes sure every linked peer knows this node wants `addresses` (subscribed locally
    /// before). Returns once they acknowledged, or once a peer that did not answer in time was
    /// unlinked (it repairs this node's clients when it links again).
    pub async fn want(&self, addresses: &[Address]) {
        if !self.started.load(std::sync::atomic::Ordering::SeqCst) {
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
            let add = add.clone();
            async move {
                let want = Want {
                    node: self.node.clone(),
                    url: self.url.clone(),
                    session: link.session.clone(),
                    snapshot: false,
                    add,
                    remove: Vec::new(),
                };
                let ok = tokio::time::timeout(WANT_TIMEOUT, self.post_want(&link.url, &want))
                    .await
                    .map(|r| r == Ok(200))
                    .unwrap_or(false);
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
    /// a binding made while connected: what was appended before the peers knew is repaired).
    pub fn want_then_catch_up(self: &Arc<Self>, addresses: Vec<Address>) {
        if !self.started.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            me.want(&addresses).await;
            me.catch_up(addresses).await;
        });
    }

    async fn post_want(&self, url: &str, want: &Want) -> Result<u16, String> {
        let body = Bytes::from(serde_json::to_vec(want).map_err(|e| e.to_string())?);
        // A kept connection first (a client's connect waits on this); the peer may have closed
        // it meanwhile, so a failure there is retried once on a new connection.
        let kept = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(url)
            .and_then(Vec::pop);
        let (http, status) = match kept {
            Some(mut h) => match h.call("POST", "/internal/want", Some(body.clone())).await {
                Ok((status, _)) => (h, status),
                Err(_) => self.want_on_new(url, body).await?,
            },
            None => self.want_on_new(url, body).await?,
        };
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let kept = idle.entry(url.to_string()).or_default();
            if kept.len() < IDLE_PER_PEER {
                kept.push(http);
            }
        }
        Ok(status)
    }

    /// A new connection to a peer, signing as this node.
    async fn connect(&self, url: &str) -> Result<Http, String> {
        Http::connect_tls(url, None, self.tls.as_ref())
            .await
            .map(|h| h.signed(self.auth.clone(), &self.node))
            .map_err(|e| e.to_string())
    }

    async fn want_on_new(&self, url: &str, body: Bytes) -> Result<(Http, u16), String> {
        let mut http = self.connect(url).await?;
        let (status, _) = http
            .call("POST", "/internal/want", Some(body))
            .await
            .map_err(|e| e.to_string())?;
        Ok((http, status))
    }

    /// Links to live nodes not linked yet (snapshot, then repair), heartbeats the others.
    async fn tick(self: &Arc<Self>) {
        let Ok(live) = self.refresh_members().await else {
            return;
        };
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
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|url, _| live.values().any(|u| u == url));
        let (linked, announced) = {
            let mut i = self.interests.lock().unwrap_or_else(|p| p.into_inner());
            i.linked.retain(|id, _| live.contains_key(id));
            (i.linked.clone(), i.announced.clone())
        };
        let mut relinked = false;
        for (id, url) in live {
            if let Some(link) = linked.get(&id) {
                let beat = Want {
                    node: self.node.clone(),
                    url: self.url.clone(),
                    session: link.session.clone(),
                    snapshot: false,
                    add: Vec::new(),
                    remove: Vec::new(),
                };
                if self.post_want(&url, &beat).await == Ok(200) {
                    continue;
                }
                self.interests
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .linked
                    .remove(&id);
            }
            // Link: a snapshot of everything announced, under a new session.
            let session = uuid::Uuid::new_v4().simple().to_string();
            let snap = Want {
                node: self.node.clone(),
                url: self.url.clone(),
                session: session.clone(),
                snapshot: true,
                add: announced.iter().cloned().collect(),
                remove: Vec::new(),
            };
            if self.post_want(&url, &snap).await == Ok(200) {
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
            let want = Want {
                node: self.node.clone(),
                url: self.url.clone(),
                session: link.session,
                snapshot: false,
                add: Vec::new(),
                remove: remove.clone(),
            };
            let _ = self.post_want(&link.url, &want).await;
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
            tokio::spawn(
                self.clone()
                    .send_loop(want.node.clone(), url, want.session.clone(), rx),
            );
            down.insert(
                want.node.clone(),
                Downstream {
                    session: want.session.clone(),
                    wants: HashSet::new(),
                    tx,
                },
            );
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

    /// Sends one peer's frames in order over one keep-alive connection.
    async fn send_loop(
        self: Arc<Self>,
        node: String,
        url: String,
        session: String,
        mut rx: mpsc::Receiver<Bytes>,
    ) {
        let mut http: Option<Http> = None;
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
            let body = Bytes::from(body);
            if http.is_none() {
                http = self.connect(&url).await.ok();
            }
            let ok = match http.as_mut() {
                Some(h) => matches!(
                    h.call("POST", "/internal/deliver", Some(body)).await,
                    Ok((200, _))
                ),
                None => false,
            };
            if !ok {
                self.drop_peer(&node, &session);
                return;
            }
        }
    }

    fn send_to(&self, node: &str, frame: &Deliver) {
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

    /// Sends the answer of a `?wait=true` operation to the node waiting for it.
    pub fn reply(&self, node: &str, ticket: &str, outcome: Box<RawValue>) {
        self.send_to(
            node,
            &Deliver::Applied {
                ticket: ticket.into(),
                outcome,
            },
        );
    }

    /// Handles `POST /internal/deliver` (local delivery only: never forwarded again).
    pub fn on_deliver(&self, frame: Deliver) {
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
                let offered = self.router.deliver_local(&msgs);
                if appended_us > 0 {
                    let took = crate::clock::now_us().saturating_sub(appended_us);
                    self.metrics
                        .handoff_peer
                        .record_many(took as f64 / 1e6, offered.messages);
                }
            }
            Deliver::Bound { client, bindings } => self.router.bound_local(&client, &bindings),
            Deliver::Unbound { client, removed } => self.router.unbound_local(&client, &removed),
            Deliver::Applied { ticket, outcome } => {
                let replies = self
                    .replies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .and_then(Weak::upgrade);
                if let Some(r) = replies {
                    r.resolve_wire(&ticket, &outcome);
                }
            }
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
        let mut http = self.connect(url).await?;
        match tokio::time::timeout(ASK_TIMEOUT, http.call("POST", path, Some(body))).await {
            Ok(Ok((200, b))) => Ok(b),
            Ok(Ok((status, b))) => Err(format!("{status}: {}", String::from_utf8_lossy(&b))),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {ASK_TIMEOUT:?}")),
        }
    }

    /// [`Peers::ask`] of every live member other than this node, at once. A single node asks
    /// nobody.
    pub async fn ask_all(&self, path: &str, body: Bytes) -> Vec<(String, Result<Bytes, String>)> {
        if !self.started.load(std::sync::atomic::Ordering::SeqCst) {
            return Vec::new();
        }
        let live = match self.refresh_members().await {
            Ok(live) => live,
            Err(e) => {
                tracing::warn!(error = %e, "asking the other nodes: membership unavailable");
                return Vec::new();
            }
        };
        let asks = live.into_iter().map(|(n, url)| {
            let body = body.clone();
            async move {
                let r = self.ask_at(&url, path, body).await;
                (n, r)
            }
        });
        futures_util::future::join_all(asks).await
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

/// Router hooks: what the processor appends or binds is also sent to the peers.
impl crate::routing::Remote for Peers {
    fn forward(&self, messages: &[Arc<Message>], appended_us: u64) {
        Peers::forward(self, messages, appended_us)
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
    fn reply(&self, node: &str, ticket: &str, outcome: Box<RawValue>) {
        Peers::reply(self, node, ticket, outcome)
    }
    fn node(&self) -> &str {
        &self.node
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::MessageId;

    /// Every frame survives the trip between nodes (raw signals are not re-parsed on the way).
    #[test]
    fn frames_round_trip() {
        let a = Address::parse("channel:x").unwrap();
        let payload = RawValue::from_string(r#"{"k":[1,"é"]}"#.into()).unwrap();
        let m = Message::new(a.clone(), 7, MessageId::parse("m-7").unwrap(), 42, &payload);
        let frames = [
            Deliver::Signals {
                signals: vec![m.signal.clone()],
                appended_us: 9,
            },
            Deliver::Applied {
                ticket: "t".into(),
                outcome: RawValue::from_string(r#"{"refused":{"reason":"r"}}"#.into()).unwrap(),
            },
            Deliver::Bound {
                client: ClientId::parse("c").unwrap(),
                bindings: vec![(a.clone(), 3)],
            },
        ];
        for f in frames {
            let bytes = serde_json::to_vec(&f).unwrap();
            let back: Deliver = serde_json::from_slice(&bytes).unwrap();
            match back {
                Deliver::Signals {
                    signals: s,
                    appended_us,
                } => {
                    assert_eq!(appended_us, 9);
                    let got = Message::from_signal(s[0].clone()).unwrap();
                    assert_eq!((got.version, got.ts, got.id.as_str()), (7, 42, "m-7"));
                    assert_eq!(got.payload().get(), payload.get());
                }
                Deliver::Applied { ticket, outcome } => {
                    assert_eq!(ticket, "t");
                    assert_eq!(outcome.get(), r#"{"refused":{"reason":"r"}}"#);
                }
                Deliver::Bound { bindings, .. } => assert_eq!(bindings, vec![(a.clone(), 3)]),
                Deliver::Unbound { .. } => unreachable!(),
            }
        }
    }
}
