//! The Socket.IO gateway: handshake, session, resume and replay, live delivery, acks.
//!
//! Thin: the connect middleware decides the identity ([`handshake`]); the connect handler sets up
//! a [`conn::Conn`] (register with the router first, then read bindings, cursors and heads, so
//! nothing appended meanwhile slips through), sends `session` and starts the replay.

pub mod acks;
pub mod conn;
pub mod deadlines;
pub mod events;
pub mod handshake;
mod heartbeat;
mod quota;
pub mod registry;

use crate::address::{Address, Kind};
use crate::config::Config;
use crate::mailbox::Mailbox;
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::presence::Presence;
use crate::presence::Seen;
use crate::routing::Router;
use crate::routing::Subscriber;
use crate::security::AuthError;
use crate::security::Credentials;
use crate::topology::{Cursors, ReadMarks, Topology};
use axum::extract::ConnectInfo;
use axum::response::IntoResponse;
use conn::Conn;
use handshake::Identity;
use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{Extension, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::socket::DisconnectReason;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Builds the Socket.IO layer for the node.
pub fn build(svc: Arc<Gateway>) -> (socketioxide::layer::SocketIoLayer, SocketIo) {
    let (layer, io) = SocketIo::builder()
        .max_buffer_size(256)
        .ping_interval(Duration::from_millis(svc.config.ping_interval_ms))
        .ping_timeout(Duration::from_millis(svc.config.ping_timeout_ms))
        // Clients send little (acks); a small read buffer keeps idle connections cheap.
        .ws_read_buffer_size(1024)
        .with_state(svc)
        .build_layer();
    io.ns("/", on_connect.with(authenticate));
    (layer, io)
}

/// The headers the Socket.IO engine reads from a request, past the CORS layer: the WebSocket
/// key of an upgrade and the content type of a polling POST.
const ENGINE_HEADERS: [axum::http::HeaderName; 2] = [
    axum::http::header::SEC_WEBSOCKET_KEY,
    axum::http::header::CONTENT_TYPE,
];

/// Copies out of hyper's read buffer the URI and the few headers the Socket.IO engine reads,
/// and drops the rest (it runs after the CORS layer, which needs `Origin`).
///
/// hyper parses headers as slices of its connection read buffer (16 KiB after the first read),
/// and socketioxide keeps every socket's request parts for the socket's lifetime, so without
/// this each idle connection pinned that whole buffer. Copying the few header bytes lets the
/// buffer go once the connection is upgraded, and keeping only the engine's own headers saves
/// what a browser sends besides (cookies, user agent, languages: often a kilobyte or more)
/// (measured: see docs/benchmarks.md, `idle`).
pub fn detach_request(req: axum::extract::Request) -> axum::extract::Request {
    let (mut parts, body) = req.into_parts();
    let mut headers = axum::http::HeaderMap::with_capacity(ENGINE_HEADERS.len());
    for name in ENGINE_HEADERS {
        if let Some(v) = parts.headers.get(&name)
            && let Ok(v) = axum::http::HeaderValue::from_bytes(v.as_bytes())
        {
            headers.insert(name, v);
        }
    }
    parts.headers = headers;
    if let Ok(uri) = parts.uri.to_string().parse() {
        parts.uri = uri;
    }
    axum::extract::Request::from_parts(parts, body)
}

#[derive(Debug)]
struct Refused(String);
impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything the Socket.IO side uses; the node builds it, and the server API reads the same
/// stores through it. The trait objects are `Send + Sync` and safe to call concurrently; the
/// atomics are plain counters and flags.
pub struct Gateway {
    pub config: Config,
    pub node_id: String,
    pub mailbox: Arc<dyn Mailbox>,
    pub topology: Arc<dyn Topology>,
    pub cursors: Arc<dyn Cursors>,
    /// Which single messages each client marked read (`read`).
    pub reads: Arc<dyn ReadMarks>,
    pub presence: Arc<dyn Presence>,
    /// Local routing table (internally locked).
    pub router: Arc<Router>,
    /// The work addresses: which connection holds which message.
    pub work: Arc<crate::work::Dispatcher>,
    /// Routing to and from the other nodes.
    pub peers: Arc<Peers>,
    pub credentials: Credentials,
    pub metrics: Metrics,
    pub acks: Arc<acks::AckWriter>,
    /// Connections by client and user (kicks, quotas) and the handshake rate per IP.
    pub gate: Gate,
    /// Open Socket.IO connections on this node: one permit each, taken when the handshake is
    /// accepted and given back when the socket is gone, so the cap holds under a burst.
    pub connections: Slots,
    /// Set once shutdown began: new work is refused.
    pub draining: std::sync::atomic::AtomicBool,
}

impl Gateway {
    /// Tells the members of a presence address, on this node and the others, who joined or
    /// left.
    pub fn announce(&self, change: &crate::presence::Change) {
        use crate::routing::Fanout;
        self.metrics.presence_changes.increment(1);
        self.router.presence(change);
        Fanout::presence(&*self.peers, change);
    }
}

/// The connection cap of a node: a slot is taken when a handshake is accepted (where the cap
/// is checked) and given back when the connection closes, so a burst of handshakes cannot pass
/// the cap between the check and the count.
pub struct Slots {
    free: Arc<tokio::sync::Semaphore>,
    max: usize,
}

/// One connection's place under the cap.
#[derive(Clone)]
pub struct Slot(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

impl Slots {
    pub fn new(max: usize) -> Self {
        let max = max.min(tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            free: Arc::new(tokio::sync::Semaphore::new(max)),
            max,
        }
    }

    /// A slot, unless every one is taken.
    pub fn take(&self) -> Option<Slot> {
        self.free
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| Slot(Arc::new(p)))
    }

    /// Connections holding a slot now.
    pub fn open(&self) -> usize {
        self.max - self.free.available_permits()
    }
}

/// What the gateway keeps beside the connections themselves: who is connected (for kicks and
/// quotas) and the handshakes per client IP.
pub struct Gate {
    pub registry: registry::Registry,
    /// When the connections' client tokens expire (the node runs [`deadlines::Deadlines::run`]).
    pub deadlines: Arc<deadlines::Deadlines<Conn>>,
    per_ip: Option<governor::DefaultKeyedRateLimiter<IpAddr>>,
    /// The one clock of every connection's event limiter. Making a clock reads the CPU's
    /// features (`cpuid`, which traps to the hypervisor in a VM): one per connection cost a
    /// tenth of the CPU of connection setup.
    pub clock: governor::clock::DefaultClock,
}

impl Gate {
    pub fn new(connects_per_ip: u32) -> Self {
        Self {
            registry: Default::default(),
            deadlines: Default::default(),
            per_ip: std::num::NonZeroU32::new(connects_per_ip)
                .map(|n| governor::RateLimiter::keyed(governor::Quota::per_second(n))),
            clock: Default::default(),
        }
    }

    /// Forgets IPs whose allowance is full again (run now and then: the map grows per IP).
    pub fn sweep(&self) {
        if let Some(l) = &self.per_ip {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

async fn authenticate(
    s: SocketRef,
    TryData(auth): TryData<Value>,
    State(svc): State<Arc<Gateway>>,
) -> Result<(), Refused> {
    let refuse = |m: String| {
        svc.metrics.refused.increment(1);
        Err(Refused(m))
    };
    if svc.draining.load(Ordering::SeqCst) {
        return refuse("the node is shutting down; connect to another node".into());
    }
    if let (Some(limiter), Some(ConnectInfo(peer))) = (
        &svc.gate.per_ip,
        s.req_parts().extensions.get::<ConnectInfo<SocketAddr>>(),
    ) && limiter.check_key(&peer.ip()).is_err()
    {
        return refuse(format!(
            "too many connections from {} (limit {} per second); retry later",
            peer.ip(),
            svc.config.limits.connect_rate_per_ip
        ));
    }
    let Some(slot) = svc.connections.take() else {
        return refuse(format!(
            "too many connections on this node (limit {})",
            svc.config.limits.max_connections
        ));
    };
    let auth = match auth {
        Ok(v) => v,
        Err(e) => return refuse(format!("auth must be a JSON object: {e}")),
    };
    let id = match handshake::identify(Some(&auth), &svc.credentials, crate::clock::now_ms()) {
        Ok(id) => id,
        Err(e) => return refuse(e.to_string()),
    };
    if id.resumed {
        match svc.topology.revoked(&id.client).await {
            Ok(false) => {}
            Ok(true) => return refuse(AuthError::Revoked.to_string()),
            Err(e) => return refuse(format!("cannot check the client now: {e}")),
        }
    }
    s.extensions.insert(id);
    s.extensions.insert(slot);
    Ok(())
}

async fn on_connect(
    s: SocketRef,
    Extension(id): Extension<Identity>,
    State(svc): State<Arc<Gateway>>,
) {
    svc.metrics.connections.increment(1.0);
    svc.metrics.connects.increment(1);
    if let Err(e) = setup(&s, &id, &svc).await {
        tracing::warn!(error = %e, client = %id.client, "connection setup failed");
        let _ = s.emit("error", &json!({ "message": format!("setup failed: {e}") }));
        s.clone().disconnect().ok();
    }
}

async fn setup(s: &SocketRef, id: &Identity, svc: &Arc<Gateway>) -> Result<(), String> {
    let own = Address::of_client(&id.client);
    let stored = if id.resumed {
        svc.cursors
            .get(&id.client)
            .await
            .map_err(|e| e.to_string())?
    } else {
        Default::default()
    };
    let start = |a: &Address, default: u64| {
        id.cursors
            .get(a)
            .or_else(|| stored.get(a))
            .copied()
            .unwrap_or(default)
    };
    let conn = Conn::new(svc.clone(), s.clone(), id, start(&own, 0));
    // The connection holds its slot until it closes.
    conn.hold(s.extensions.remove::<Slot>());
    let sub: Arc<dyn Subscriber> = conn.clone();
    // Register before reading bindings and heads: whatever changes meanwhile reaches the conn.
    svc.router.register(sub.clone());
    svc.router.subscribe(&sub, std::slice::from_ref(&own));
    svc.gate.registry.add(&conn);
    {
        let (c1, svc2) = (conn.clone(), svc.clone());
        s.on_disconnect(async move |reason: DisconnectReason| {
            svc2.metrics.disconnects[reason_index(reason)].increment(1);
            tracing::debug!(client = %c1.client(), %reason, "connection closed");
            cleanup(&c1, &svc2).await
        });
    }
    if !s.connected() {
        // Gone while we read its cursors: the disconnect handler came too late to run.
        cleanup(&conn, svc).await;
        return Ok(());
    }
    events::listen(s, &conn, svc);
    let bindings = svc
        .topology
        .get(&id.client)
        .await
        .map_err(|e| e.to_string())?;
    let added = conn.add_initial(
        bindings
            .iter()
            .map(|b| (b.address.clone(), start(&b.address, b.since)))
            .collect(),
    );
    // Work addresses take no replay: their messages are dealt out once the session is out.
    let work: Vec<(Address, u32)> = bindings
        .iter()
        .filter(|b| b.address.kind() == Kind::Work && added.contains(&b.address))
        .map(|b| (b.address.clone(), crate::work::weight_of(b.since)))
        .collect();
    svc.router.subscribe(&sub, &added);
    let addrs: Vec<Address> = conn.cursors().into_iter().map(|(a, _)| a).collect();
    // The other nodes forward these addresses here from now on; what they appended before is
    // below the heads read next, so the replay has it.
    svc.peers.want(&addrs).await;
    let heads = svc.mailbox.heads(&addrs).await.map_err(|e| e.to_string())?;
    conn.raise_known(
        &addrs
            .iter()
            .cloned()
            .zip(heads.iter().map(|h| h.head))
            .collect::<Vec<_>>(),
    );
    let seen = Seen {
        node: svc.node_id.clone(),
        connection: conn.id().to_string(),
        since: conn.since(),
    };
    svc.presence
        .connected(&id.client, seen)
        .await
        .map_err(|e| e.to_string())?;
    if conn.is_closed() {
        // Closed while the entry was written: `cleanup` may have removed it before it landed.
        // Removing it again, now that it has, is harmless.
        presence_gone(&conn, svc).await;
        return Ok(());
    }
    let bound: Vec<&Address> = addrs.iter().filter(|a| **a != own).collect();
    let user = id.user.as_ref().map(|u| u.id.as_str());
    let mut session = json!({
        "clientId": id.client,
        "resumeToken": svc.credentials.resume_token(&id.client, user, crate::clock::now_ms()),
        "node": svc.node_id,
        "addresses": bound,
        "resumed": id.resumed,
    });
    if let Some(user) = user {
        session["user"] = json!(user);
    }
    // Joined before `session`: once a connection is set up, its client is a member through it,
    // so the end of another of its connections is not announced as a leave. Its own `joined`
    // waits in the connection's queue and follows `session`.
    let presence: Vec<Address> = addrs
        .iter()
        .filter(|a| a.kind() == Kind::Presence)
        .cloned()
        .collect();
    if !presence.is_empty() {
        conn.sync_presence(&presence).await;
    }
    conn.start(&session);
    for (a, weight) in work {
        svc.work.join(&a, conn.clone(), Some(weight)).await;
    }
    if id.user.is_some() {
        svc.gate.deadlines.watch(&conn);
        if conn.is_closed() {
            // Closed during the setup, and `cleanup` may have run before the entry was made.
            svc.gate.deadlines.forget(&conn);
        }
        if svc.config.limits.max_connections_per_user > 0 {
            tokio::spawn(quota::enforce(svc.clone(), conn.clone()));
        }
    }
    Ok(())
}

/// Where `reason` is in [`crate::metrics::DISCONNECT_REASONS`].
fn reason_index(reason: DisconnectReason) -> usize {
    match reason {
        DisconnectReason::TransportClose => 0,
        DisconnectReason::ClientNSDisconnect => 1,
        DisconnectReason::TransportError => 2,
        DisconnectReason::HeartbeatTimeout => 3,
        DisconnectReason::PacketParsingError => 4,
        DisconnectReason::MultipleHttpPollingError => 5,
        DisconnectReason::ServerNSDisconnect => 6,
        DisconnectReason::ClosingServer => 7,
    }
}

async fn cleanup(conn: &Arc<Conn>, svc: &Arc<Gateway>) {
    let Some(addrs) = conn.close() else { return };
    svc.router.unregister(&**conn, &addrs);
    for a in addrs.iter().filter(|a| a.kind() == Kind::Work) {
        svc.work.leave(a, conn.id()).await;
    }
    let presence: Vec<Address> = addrs
        .into_iter()
        .filter(|a| a.kind() == Kind::Presence)
        .collect();
    if !presence.is_empty() {
        conn.sync_presence(&presence).await;
    }
    svc.gate.registry.remove(conn);
    svc.gate.deadlines.forget(conn);
    svc.metrics.connections.decrement(1.0);
    presence_gone(conn, svc).await;
}

/// Removes a connection's presence entry; a failure is logged (what is left is cleared when the
/// leader finds the node gone, or when it restarts).
async fn presence_gone(conn: &Conn, svc: &Gateway) {
    if let Err(e) = svc
        .presence
        .disconnected(conn.client(), &svc.node_id, conn.id())
        .await
    {
        tracing::warn!(error = %e, "presence update failed");
    }
}

/// The refusal of a WebSocket upgrade of the Socket.IO endpoint whose `Origin` is neither the
/// node's own nor one of `cors_origins`: browsers apply no CORS to WebSockets, so without this
/// check a page on any origin could connect with `transports: ["websocket"]`. Clients that are
/// not browsers send no `Origin` and are not affected.
pub fn ws_origin_refusal(
    origins: &[String],
    req: &axum::extract::Request,
) -> Option<axum::response::Response> {
    let h = req.headers();
    let upgrade = h
        .get(axum::http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let origin = h
        .get(axum::http::header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    let (true, Some(origin)) = (upgrade, origin) else {
        return None;
    };
    let host = h
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let same = origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host));
    let listed = origins
        .iter()
        .any(|o| o == "*" || o.trim_end_matches('/') == origin);
    if same || listed {
        return None;
    }
    let reason = format!("WebSocket from origin {origin} refused: not listed in cors_origins");
    Some(
        (
            axum::http::StatusCode::FORBIDDEN,
            axum::Json(json!({ "error": reason })),
        )
            .into_response(),
    )
}

/// CORS for the Socket.IO endpoint (the node's edge applies it there only): pages from `origins`
/// (or any, with `"*"`) may connect with the default transports; no other origin and no other
/// path gets a grant (the server API is for servers, not pages). Credentials are allowed (the
/// origin is echoed, never `*`), so a page with `withCredentials: true` keeps a load balancer's
/// sticky-session cookie; signalpost itself authenticates with the handshake's `auth`, never
/// with cookies.
pub fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let any = origins.iter().any(|o| o == "*");
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _| {
            any || list.contains(origin)
        }))
        .allow_credentials(true)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([axum::http::header::CONTENT_TYPE])
        .max_age(Duration::from_secs(600))
}
