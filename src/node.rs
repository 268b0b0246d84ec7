//! The node: builds every part from a [`Config`], serves HTTP and Socket.IO on one listener,
//! and drains in a fixed order on shutdown (stop taking work, close client connections, finish
//! queued work, write pending acks).

#[cfg(feature = "cluster")]
mod cluster;
mod datadir;

pub use datadir::{Compacted, compact};

use crate::api::Api;
use crate::cluster::{Membership, NodeInfo, Standalone};
use crate::config::{Backend, Config};
use crate::gateway::acks::AckWriter;
use crate::gateway::{Gate, Gateway, Slots};
use crate::ingest::local::LocalQueue;
use crate::ingest::{Processor, Queue};
use crate::mailbox::Mailbox;
use crate::mailbox::embedded::EmbeddedMailbox;
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::presence::{MemoryPresence, Presence};
use crate::routing::{Fanout, Router};
use crate::security::{Credentials, PeerAuth, TokenKey, load_or_create_secret};
use crate::tasks::{BoxFuture, Tasks};
use crate::topology::embedded::EmbeddedTopology;
use crate::topology::{Cursors, ReadMarks, Topology};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a stopping node waits for its client connections to close (a connection that
/// does not is dropped with the process).
const CLIENTS_CLOSE_WITHIN: Duration = Duration::from_secs(5);
/// How long a stopping node waits for its queue to apply what it took. Nothing is lost past
/// it: a job is answered only once applied, and Kafka gives what was not committed again.
const QUEUE_DRAIN_WITHIN: Duration = Duration::from_secs(10);
/// How long a stopping node waits for its background tasks to return.
const TASKS_GRACE: Duration = Duration::from_secs(10);
/// Tries of the last flush of acks and done work messages (waiting 0.1, 0.2, 0.4 … s between),
/// all within `FINAL_FLUSH_WITHIN`.
const FINAL_FLUSH_TRIES: u32 = 5;
const FINAL_FLUSH_WITHIN: Duration = Duration::from_secs(5);

/// Startup failures.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot use data dir {0}: {1}")]
    DataDir(String, std::io::Error),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    /// (The cause follows as the error's source: `Caused by: …`.)
    #[error("opening the store")]
    Store(#[source] Cause),
    #[error("backend: {0}")]
    Backend(String),
    /// A backend service failed at startup (the cause is kept).
    #[error("starting {0}")]
    Service(&'static str, #[source] Cause),
    #[error("serving: {0}")]
    Serve(std::io::Error),
    #[error("TLS")]
    Tls(#[from] crate::tls::TlsError),
    #[error("client tokens: {0}")]
    Tokens(String),
}

/// The error a startup step failed with.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A store failed to open.
fn store_err(e: impl std::error::Error + Send + Sync + 'static) -> NodeError {
    NodeError::Store(Box::new(e))
}

/// A built node, listening, not yet serving.
pub struct Node {
    api: Arc<Api>,
    /// Every background task of the node.
    tasks: Tasks,
    /// Stops them when the node is dropped without running.
    _stop_on_drop: tokio_util::sync::DropGuard,
    listener: TcpListener,
    tls: Option<crate::tls::Acceptor>,
    addr: SocketAddr,
}

impl Node {
    /// Opens the stores, binds the listener and starts the background tasks.
    pub async fn build(config: Config) -> Result<Self, NodeError> {
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| NodeError::DataDir(dir.display().to_string(), e))?;
        let data_err = |e| NodeError::DataDir(dir.display().to_string(), e);
        if config.backend == Backend::Embedded {
            datadir::check_or_stamp(&dir, config.resume_secret.is_none())?;
        }
        let resume_secret = match &config.resume_secret {
            Some(s) => s.clone().into_bytes(),
            None => load_or_create_secret(&dir, "resume.secret").map_err(data_err)?,
        };
        let node_id = match &config.node_id {
            Some(id) => id.clone(),
            None => node_id_in(&dir).map_err(data_err)?,
        };
        let tls = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
            _ => None,
        };
        let token_key = match (&config.client_token_secret, &config.client_token_public_key) {
            (Some(s), _) => Some(TokenKey::Secret(s.clone())),
            (None, Some(path)) => {
                Some(TokenKey::PublicPem(std::fs::read(path).map_err(|e| {
                    NodeError::Tokens(format!("reading {}: {e}", path.display()))
                })?))
            }
            (None, None) => None,
        };
        let credentials = Credentials::new(
            &resume_secret,
            token_key,
            config.require_client_token,
            config.retention_ms(),
        )
        .map_err(NodeError::Tokens)?;
        let peer_auth = Arc::new(PeerAuth::new(&match &config.cluster_secret {
            Some(s) => s.clone().into_bytes(),
            // A single node serves no node-to-node route; nothing is ever checked with this.
            None => uuid::Uuid::new_v4().as_bytes().to_vec(),
        }));
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| NodeError::Listen(config.listen, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| NodeError::Listen(config.listen, e))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let advertised = config
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{addr}"));
        let metrics = Metrics::install();
        let me = NodeInfo {
            id: node_id.clone(),
            url: advertised.clone(),
            leader: true,
        };
        let tasks = Tasks::default();
        let router = Arc::new(Router::default());
        let parts = match config.backend {
            Backend::Embedded => embedded_parts(&config, me)?,
            #[cfg(feature = "cluster")]
            Backend::Cluster => cluster::parts(&config, me).await?,
            #[cfg(not(feature = "cluster"))]
            Backend::Cluster => {
                return Err(NodeError::Backend(
                    "this binary was built without the cluster backend: build it with `cargo build --release --features cluster`".into(),
                ));
            }
        };
        let Parts {
            stores,
            start_queue,
            membership,
            join,
            owned,
            backup,
        } = parts;
        let Stores {
            mailbox,
            topology,
            cursors,
            reads,
            presence,
        } = stores;
        // The work dispatcher deals only the work addresses of the shards this node's consumer
        // owns (all of them on a single node) and reaches the other nodes through the peers.
        let (work_out, work_rx) = tokio::sync::mpsc::unbounded_channel();
        let work = crate::work::Dispatcher::new(
            &node_id,
            crate::work::Stores {
                mailbox: mailbox.clone(),
                topology: topology.clone(),
                done: reads.clone(),
            },
            crate::work::Settings {
                ack_timeout: Duration::from_millis(config.work_ack_timeout_ms),
                in_flight: config.work_in_flight,
                retention_secs: config.retention_secs,
                at_hand_bytes: config.work_at_hand_bytes,
            },
            owned.map(|owned| crate::work::Link {
                owned,
                lease: membership.lease(),
                out: work_out,
            }),
        );
        let transport = crate::peers::transport::HttpTransport::new(
            &node_id,
            peer_auth.clone(),
            match config.tls.ca.as_ref().or(config.tls.cert.as_ref()) {
                Some(ca) if tls.is_some() => Some(crate::tls::connector(ca)?),
                _ => None,
            },
        );
        let peers = Peers::new(
            crate::peers::Me {
                node: node_id.clone(),
                url: advertised.clone(),
            },
            crate::peers::Links {
                transport: Arc::new(transport),
                router: router.clone(),
                mailbox: mailbox.clone(),
                membership: membership.clone(),
                work: Some(work.clone()),
                metrics: metrics.clone(),
                tasks: tasks.clone(),
            },
        );
        work.start(&tasks);
        spawn_work_link(&peers, work_rx, &tasks);
        // Delivery flows one way: the processor hands what it applied to the other nodes
        // first, then to this node's connections and its work addresses.
        let processor = Arc::new(Processor {
            mailbox: mailbox.clone(),
            topology: topology.clone(),
            fanout: vec![
                peers.clone() as Arc<dyn Fanout>,
                router.clone(),
                work.clone(),
            ],
            metrics: metrics.clone(),
            max_bindings: config.limits.max_bindings_per_client,
        });
        let queue = start_queue(processor, &tasks)?;
        if config.backend == Backend::Cluster {
            peers.start();
        }
        let gw = Arc::new(Gateway {
            peers,
            credentials,
            gate: Gate::new(config.limits.connect_rate_per_ip),
            node_id,
            mailbox,
            topology,
            acks: AckWriter::start(
                cursors.clone(),
                crate::topology::cursor_ttl_secs(config.retention_secs),
                &tasks,
            ),
            cursors,
            reads,
            presence,
            router,
            work,
            metrics,
            connections: Slots::new(config.limits.max_connections),
            draining: AtomicBool::new(false),
            config,
        });
        let api = Arc::new(Api {
            gw: gw.clone(),
            queue,
            membership,
            peer_auth,
            backup,
        });
        spawn_expiry(&gw, &tasks);
        spawn_work(&gw, &tasks);
        spawn_cleanup(&api, &tasks);
        spawn_rejoin(&api, &tasks);
        spawn_gate_sweep(&gw, &tasks);
        {
            let deadlines = gw.gate.deadlines.clone();
            tasks.spawn(async move { deadlines.run().await });
        }
        let left = if api.gw.config.backend == Backend::Cluster {
            clear_own_presence(&api.gw).await?
        } else {
            Vec::new()
        };
        if let Some(join) = join {
            join();
        }
        if !left.is_empty() {
            let gw = api.gw.clone();
            tasks.spawn(async move {
                // Announced once the other nodes have linked to this one: before, it knows
                // nobody's interests, and the announcements would reach no one.
                if !gw.peers.wait_linked(LINK_WAIT).await {
                    tracing::warn!(
                        "not every node linked in time; announcing the leftovers anyway"
                    );
                }
                for change in &left {
                    gw.announce(change);
                }
            });
        }
        Ok(Self {
            api,
            _stop_on_drop: tasks.drop_guard(),
            tasks,
            listener,
            tls,
            addr,
        })
    }

    /// The URL the node serves at (`https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The address the node really listens on (after port 0 was resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// This node's id in the cluster.
    pub fn id(&self) -> &str {
        &self.api.gw.node_id
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        self.serve_until(Box::pin(shutdown)).await
    }

    /// [`Node::run`]'s body, not generic: compiled once, here, rather than again in every crate
    /// that runs a node (the binary, each test binary).
    async fn serve_until(self, shutdown: BoxFuture<()>) -> Result<(), NodeError> {
        let api = self.api.clone();
        let gw = api.gw.clone();
        let (layer, io) = crate::gateway::build(gw.clone());
        let app = crate::api::edge::service(&api, crate::api::routes(api.clone()), layer);
        let drain_io = io.clone();
        let gw2 = gw.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("draining: refusing new work, closing client connections");
            gw2.draining
                .store(true, std::sync::atomic::Ordering::SeqCst);
            bounded(
                "closing client connections",
                CLIENTS_CLOSE_WITHIN,
                drain_io.close(),
            )
            .await;
        };
        let limits = crate::listener::Limits {
            max_connections: gw.config.limits.max_http_connections,
            read_timeout: Duration::from_millis(gw.config.limits.http_read_timeout_ms),
        };
        crate::listener::serve(self.listener, self.tls, limits, app, signal)
            .await
            .map_err(NodeError::Serve)?;
        // Stop = cancel (no new work, no timers) → client connections closed (above) → the queue
        // drained → every task returned → acks and done work messages written.
        bounded("draining the queue", QUEUE_DRAIN_WITHIN, api.queue.drain()).await;
        if !self.tasks.stop(TASKS_GRACE).await {
            tracing::warn!(
                running = self.tasks.running(),
                "some tasks did not stop within {TASKS_GRACE:?}"
            );
        }
        // The last writes, tried again while the store blips (acks and done work messages
        // were acknowledged to clients), but not for longer than FINAL_FLUSH_WITHIN: a store
        // that is down must not hold the stop.
        let last_flush = async {
            let mut wait = Duration::from_millis(100);
            for attempt in 1..=FINAL_FLUSH_TRIES {
                if gw.acks.finish().await & gw.work.flush().await {
                    return true;
                }
                if attempt < FINAL_FLUSH_TRIES {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
            false
        };
        if !tokio::time::timeout(FINAL_FLUSH_WITHIN, last_flush)
            .await
            .unwrap_or(false)
        {
            tracing::error!("acks or done work messages could not be stored before stopping");
        }
        tracing::info!("drained");
        Ok(())
    }
}

/// Waits for one step of a stop, at most `limit`; past it, logs that the step was cut short and
/// lets the stop go on.
async fn bounded(step: &str, limit: Duration, f: impl Future<Output = ()>) {
    if tokio::time::timeout(limit, f).await.is_err() {
        tracing::warn!("{step} had not finished within {limit:?}; stopping anyway");
    }
}

/// What `signalpost serve` runs: builds a node from `config`, says where it listens, and serves
/// until SIGINT or SIGTERM, then drains.
pub fn serve(config: Config) -> BoxFuture<Result<(), NodeError>> {
    Box::pin(async move {
        let data_dir = config.data_dir.clone();
        let node = Node::build(config).await?;
        let url = node.url();
        println!(
            "signalpost node {} listening on {url} (data in {})",
            node.id(),
            data_dir.display()
        );
        println!("open {url}/ in a browser to try it");
        node.run(shutdown_signal()).await
    })
}

/// Logs to stderr, filtered by `RUST_LOG` as a list of `target=level` (or a bare level): the
/// `Targets` filter, which needs no regex engine.
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    const DEFAULT_LOG: &str = "info,socketioxide=warn,engineioxide=warn";
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| DEFAULT_LOG.parse().expect("a valid default"));
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// The stores a node keeps its state in.
struct Stores {
    mailbox: Arc<dyn Mailbox>,
    topology: Arc<dyn Topology>,
    cursors: Arc<dyn Cursors>,
    reads: Arc<dyn ReadMarks>,
    presence: Arc<dyn Presence>,
}

/// What a backend gives a node: its stores, its queue and its membership, and what to call
/// once the node is built (a cluster node joins the cluster then).
struct Parts {
    stores: Stores,
    /// Starts the backend's queue in front of the processor (built last: the processor hands
    /// what it applies to the peers, which need the stores and the membership).
    start_queue: StartQueue,
    membership: Arc<dyn Membership>,
    join: Option<Box<dyn FnOnce() + Send>>,
    /// The shards this node's consumer owns now, on a backend that shards its queue (the work
    /// dispatcher deals only their addresses); None: every address is this node's.
    owned: Option<crate::ingest::Owned>,
    /// Online backups of the store (the embedded backend's).
    backup: Option<Arc<crate::backup::Backup>>,
}

type StartQueue =
    Box<dyn FnOnce(Arc<Processor>, &Tasks) -> Result<Arc<dyn Queue>, NodeError> + Send>;

/// The embedded backend: redb files in the data dir, the in-process queue, a standalone node.
fn embedded_parts(config: &Config, me: NodeInfo) -> Result<Parts, NodeError> {
    let dir = &config.data_dir;
    let cache = config.embedded.cache_mb << 20;
    let mailbox =
        EmbeddedMailbox::open_with_cache(&dir.join("mailbox.redb"), config.retention_ms(), cache)
            .map_err(store_err)?;
    let topo =
        EmbeddedTopology::open_with_cache(&dir.join("state.redb"), cache / 4).map_err(store_err)?;
    let backup = Arc::new(crate::backup::Backup::new(
        dir.clone(),
        mailbox.clone(),
        topo.clone(),
        config.resume_secret.is_none(),
    ));
    let stores = Stores {
        mailbox: Arc::new(mailbox),
        topology: Arc::new(topo.clone()),
        cursors: Arc::new(topo.clone()),
        reads: Arc::new(topo),
        presence: Arc::new(MemoryPresence::default()),
    };
    let batch = config.append_batch;
    Ok(Parts {
        stores,
        start_queue: Box::new(move |processor, tasks| {
            Ok(Arc::new(LocalQueue::start(processor, batch, tasks)))
        }),
        membership: Arc::new(Standalone::new(me)),
        join: None,
        owned: None,
        backup: Some(backup),
    })
}

fn node_id_in(dir: &std::path::Path) -> std::io::Result<String> {
    let path = dir.join("node.id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => {
            let id = format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
            std::fs::write(&path, &id)?;
            Ok(id)
        }
    }
}

/// The leader's cleanup after dead nodes: presence entries of nodes that are not live any more
/// are removed. Driven by durable state (the presence rows), so it is idempotent and a new
/// leader finishes whatever an old one left.
fn spawn_cleanup(api: &Arc<Api>, tasks: &Tasks) {
    if api.gw.config.backend != Backend::Cluster {
        return;
    }
    let (membership, gw) = (api.membership.clone(), api.gw.clone());
    tasks.every(Duration::from_secs(1), move || {
        let (membership, gw) = (membership.clone(), gw.clone());
        async move {
            if !membership.is_leader() {
                return;
            }
            let (Ok(live), Ok(with_entries)) =
                (membership.nodes().await, gw.presence.nodes().await)
            else {
                return;
            };
            for node in with_entries
                .iter()
                .filter(|n| !live.iter().any(|l| &l.id == *n))
            {
                match gw.presence.clear_node(node).await {
                    Ok(cleared) => {
                        gw.metrics.cleaned.increment(cleared.connections);
                        // The members of presence addresses it held alone have left.
                        for change in &cleared.left {
                            gw.announce(change);
                        }
                        tracing::info!(
                            %node,
                            entries = cleared.connections,
                            left = cleared.left.len(),
                            "cleaned up after a dead node"
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, %node, "cleanup failed; will retry"),
                }
            }
        }
    });
}

/// The reason a node that joined the cluster again gives the connections it closes.
pub const REJOIN_REASON: &str = "the node rejoined the cluster: connect again";

/// A node whose coordination session ended (cut off from ZooKeeper past its session timeout)
/// joins again under a new one. Meanwhile the cluster saw it gone, and the leader may have
/// cleared its presence and announced its members left: its connections would be listed
/// nowhere, for as long as they stay. So it closes every connection it holds then (`kicked`
/// with [`REJOIN_REASON`]): each one's own cleanup runs, and the clients connect again, here
/// or on another node, and are registered anew.
fn spawn_rejoin(api: &Arc<Api>, tasks: &Tasks) {
    if api.gw.config.backend != Backend::Cluster {
        return;
    }
    let (mut joins, gw) = (api.membership.joins(), api.gw.clone());
    tasks.spawn(async move {
        let mut seen = *joins.borrow_and_update();
        while joins.changed().await.is_ok() {
            let now = *joins.borrow_and_update();
            if seen > 0 && now > seen {
                let held = gw.gate.registry.all();
                tracing::warn!(
                    connections = held.len(),
                    "joined the cluster again under a new session: closing the connections held before"
                );
                for conn in held {
                    conn.kick_to_reconnect(REJOIN_REASON);
                }
            }
            seen = now;
        }
    });
}

/// How long a node that starts waits for the other nodes to link to it before it announces
/// the `left` of the memberships its earlier process held.
const LINK_WAIT: Duration = Duration::from_secs(15);

/// A node that starts under the id of an earlier process clears what that process left in
/// presence before it takes connections: its connection slots are handed out from zero again,
/// and a slot still naming an old connection would be overwritten, leaving that connection's
/// entry and memberships for nobody to clean up. So if it fails, the node does not start.
/// Returns the memberships that ended, to announce once the node has joined.
async fn clear_own_presence(gw: &Gateway) -> Result<Vec<crate::presence::Change>, NodeError> {
    let node = &gw.node_id;
    let cleared = gw.presence.clear_node(node).await.map_err(|e| {
        NodeError::Service("presence (clearing an earlier process's entries)", e.into())
    })?;
    gw.metrics.cleaned.increment(cleared.connections);
    if cleared.connections > 0 || !cleared.left.is_empty() {
        tracing::info!(
            %node,
            entries = cleared.connections,
            left = cleared.left.len(),
            "cleared what an earlier process of this node left"
        );
    }
    Ok(cleared.left)
}

/// The work addresses' timers: acked versions are stored every 20 ms, and messages held past
/// the ack timeout go to another client (checked 4 times per timeout, at most every second).
fn spawn_work(svc: &Arc<Gateway>, tasks: &Tasks) {
    let work = svc.work.clone();
    tasks.every_to_end(Duration::from_millis(20), move || {
        let work = work.clone();
        async move {
            let _ = work.flush().await;
        }
    });
    let work = svc.work.clone();
    let every = Duration::from_millis((svc.config.work_ack_timeout_ms / 4).clamp(10, 1000));
    tasks.every(every, move || {
        let work = work.clone();
        async move { work.expire(std::time::Instant::now()).await }
    });
}

/// What the work dispatcher sends other nodes goes through the peers; its questions (what the
/// connections of every node hold) are asked of every live member.
fn spawn_work_link(
    peers: &Arc<Peers>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<crate::work::Out>,
    tasks: &Tasks,
) {
    use crate::peers::Deliver;
    use crate::work::{Holder, Out, WorkError};
    let peers = peers.clone();
    tasks.spawn(async move {
        while let Some(out) = rx.recv().await {
            match out {
                Out::To(node, frame) => peers.send_to(&node, &Deliver::Work(frame)),
                Out::All(frame) => peers.broadcast(&Deliver::Work(frame)),
                Out::Held { request, answer } => {
                    let peers = peers.clone();
                    tokio::spawn(async move {
                        let body = serde_json::to_vec(&request).unwrap_or_default();
                        let mut all = Vec::new();
                        let mut failed = None;
                        // Every node must answer: one left out would have its holdings dealt
                        // again.
                        let answers =
                            match peers.ask_every("/internal/work/held", body.into()).await {
                                Ok(answers) => answers,
                                Err(e) => {
                                    let _ = answer.send(Err(WorkError::Unheard(format!(
                                        "what the other nodes' connections hold is unknown: {e}"
                                    ))));
                                    return;
                                }
                            };
                        for (node, got) in answers {
                            match got.and_then(|b| {
                                serde_json::from_slice::<Vec<Holder>>(&b).map_err(|e| e.to_string())
                            }) {
                                Ok(held) => all.extend(held.into_iter().map(|h| Holder {
                                    node: if h.node.is_empty() {
                                        node.clone()
                                    } else {
                                        h.node
                                    },
                                    ..h
                                })),
                                Err(e) => failed = Some(format!("{node}: {e}")),
                            }
                        }
                        let _ = answer.send(match failed {
                            Some(e) => Err(WorkError::Unheard(format!(
                                "what the connections of {e} hold is unknown"
                            ))),
                            None => Ok(all),
                        });
                    });
                }
            }
        }
    });
}

/// Now and then: forgets the handshake allowance of IPs that are quiet again (the per-IP map
/// would grow), and gives connections open for half the retention a fresh resume token (a
/// token expires with the retention).
fn spawn_gate_sweep(svc: &Arc<Gateway>, tasks: &Tasks) {
    let retention = svc.config.retention_ms();
    let every = Duration::from_millis((retention / 4).clamp(250, 3_600_000));
    let weak = Arc::downgrade(svc);
    let mut last_ip_sweep = std::time::Instant::now();
    tasks.every(every.min(Duration::from_secs(10)), move || {
        if let Some(svc) = weak.upgrade() {
            if last_ip_sweep.elapsed() >= Duration::from_secs(10) {
                svc.gate.sweep();
                last_ip_sweep = std::time::Instant::now();
            }
            let now = crate::clock::now_ms();
            for conn in svc.gate.registry.all() {
                conn.renew_resume_token(now, retention / 2);
            }
        }
        std::future::ready(())
    });
}

/// Every `expiry_interval_ms`: removes the messages past the retention, then the cursors and
/// read marks past their TTL (the embedded store's; Cassandra's cells carry their own TTL).
fn spawn_expiry(svc: &Arc<Gateway>, tasks: &Tasks) {
    let every = Duration::from_millis(svc.config.expiry_interval_ms.max(10));
    let (mailbox, cursors, reads, metrics) = (
        svc.mailbox.clone(),
        svc.cursors.clone(),
        svc.reads.clone(),
        svc.metrics.clone(),
    );
    tasks.every(every, move || {
        let (mailbox, cursors, reads, metrics) = (
            mailbox.clone(),
            cursors.clone(),
            reads.clone(),
            metrics.clone(),
        );
        async move {
            let now = crate::clock::now_ms();
            match mailbox.expire(now).await {
                Ok(n) => metrics.expired.increment(n),
                Err(e) => tracing::warn!(error = %e, "expiry failed"),
            }
            for got in [cursors.expire(now).await, reads.expire(now).await] {
                match got {
                    Ok(n) => metrics.expired_state.increment(n),
                    Err(e) => tracing::warn!(error = %e, "expiry of cursors or read marks failed"),
                }
            }
        }
    });
}
