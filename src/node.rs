//! The node: builds every part from a [`Config`], serves HTTP and Socket.IO on one listener,
//! and drains in a fixed order on shutdown (stop taking work, close client connections, finish
//! queued work, write pending acks).

use crate::cluster::{Membership, NodeInfo, Standalone};
use crate::config::{Backend, Config};
use crate::gateway::acks::AckWriter;
use crate::ingest::local::LocalQueue;
use crate::ingest::{Processor, Queue};
use crate::mailbox::Mailbox;
use crate::mailbox::embedded::EmbeddedMailbox;
use crate::metrics::Metrics;
use crate::presence::{MemoryPresence, Presence};
use crate::routing::Router;
use crate::security::{Credentials, load_or_create_secret};
use crate::topology::embedded::EmbeddedTopology;
use crate::topology::{Cursors, Topology};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Duration;
use tokio::net::TcpListener;

/// Everything the gateway and the API share. Each field documents its concurrency: the trait
/// objects are `Send + Sync` and safe to call concurrently; the atomics are plain counters/flags.
pub struct Services {
    pub config: Config,
    pub node_id: String,
    pub mailbox: Arc<dyn Mailbox>,
    pub topology: Arc<dyn Topology>,
    pub cursors: Arc<dyn Cursors>,
    pub presence: Arc<dyn Presence>,
    pub membership: Arc<dyn Membership>,
    /// Local routing table (internally locked).
    pub router: Arc<Router>,
    pub queue: Arc<dyn Queue>,
    pub credentials: Credentials,
    pub metrics: Metrics,
    pub acks: Arc<AckWriter>,
    /// Open Socket.IO connections on this node.
    pub connections: AtomicUsize,
    /// Set once shutdown began: new work is refused.
    pub draining: AtomicBool,
}

impl Services {
    /// Which implementation backs a part, for `/healthz` and the page.
    pub fn backend_kind(&self, part: &str) -> &'static str {
        match (self.config.backend, part) {
            (Backend::Embedded, "queue") => "in-process",
            (Backend::Embedded, "membership") => "standalone",
            (Backend::Embedded, _) => "redb",
            (Backend::Cluster, "mailbox" | "topology") => "cassandra",
            (Backend::Cluster, "queue") => "kafka",
            (Backend::Cluster, _) => "zookeeper",
        }
    }
}

/// Startup failures.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot use data dir {0}: {1}")]
    DataDir(String, std::io::Error),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("opening the embedded store: {0}")]
    Store(String),
    #[error("the cluster backend is not available in this build yet; use --backend embedded")]
    ClusterUnsupported,
    #[error("serving: {0}")]
    Serve(std::io::Error),
}

/// A built node, listening, not yet serving.
pub struct Node {
    svc: Arc<Services>,
    listener: TcpListener,
    addr: SocketAddr,
}

impl Node {
    /// Opens the stores, binds the listener and starts the background tasks.
    pub async fn build(config: Config) -> Result<Self, NodeError> {
        if config.backend == Backend::Cluster {
            return Err(NodeError::ClusterUnsupported);
        }
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| NodeError::DataDir(dir.display().to_string(), e))?;
        let data_err = |e| NodeError::DataDir(dir.display().to_string(), e);
        let resume_secret = match &config.resume_secret {
            Some(s) => s.clone().into_bytes(),
            None => load_or_create_secret(&dir, "resume.secret").map_err(data_err)?,
        };
        let node_id = match &config.node_id {
            Some(id) => id.clone(),
            None => node_id_in(&dir).map_err(data_err)?,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| NodeError::Listen(config.listen, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| NodeError::Listen(config.listen, e))?;
        let metrics = Metrics::install();
        let mailbox: Arc<dyn Mailbox> = Arc::new(
            EmbeddedMailbox::open(&dir.join("mailbox.redb"), config.retention_ms())
                .map_err(|e| NodeError::Store(e.to_string()))?,
        );
        let topo = EmbeddedTopology::open(&dir.join("state.redb"))
            .map_err(|e| NodeError::Store(e.to_string()))?;
        let topology: Arc<dyn Topology> = Arc::new(topo.clone());
        let cursors: Arc<dyn Cursors> = Arc::new(topo);
        let router = Arc::new(Router::default());
        let processor = Arc::new(Processor {
            mailbox: mailbox.clone(),
            topology: topology.clone(),
            router: router.clone(),
            metrics: metrics.clone(),
        });
        let queue: Arc<dyn Queue> = Arc::new(LocalQueue::start(processor, config.append_batch));
        let me = NodeInfo {
            id: node_id.clone(),
            url: format!("http://{addr}"),
            leader: true,
        };
        let svc = Arc::new(Services {
            credentials: Credentials::new(
                &resume_secret,
                config.client_token_secret.as_deref(),
                config.require_client_token,
            ),
            node_id,
            mailbox,
            topology,
            acks: AckWriter::start(cursors.clone()),
            cursors,
            presence: Arc::new(MemoryPresence::default()),
            membership: Arc::new(Standalone { me }),
            router,
            queue,
            metrics,
            connections: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            config,
        });
        spawn_expiry(svc.clone());
        Ok(Self {
            svc,
            listener,
            addr,
        })
    }

    /// The address the node really listens on (after port 0 was resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn services(&self) -> &Arc<Services> {
        &self.svc
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        let svc = self.svc.clone();
        let (layer, io) = crate::gateway::build(svc.clone());
        let app =
            crate::api::routes(svc.clone())
                .layer(layer)
                .layer(axum::middleware::map_request(
                    crate::gateway::detach_request,
                ));
        let drain_io = io.clone();
        let svc2 = svc.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("draining: refusing new work, closing client connections");
            svc2.draining
                .store(true, std::sync::atomic::Ordering::SeqCst);
            drain_io.close().await;
        };
        axum::serve(self.listener, app)
            .with_graceful_shutdown(signal)
            .await
            .map_err(NodeError::Serve)?;
        svc.queue.drain().await;
        svc.acks.flush().await;
        tracing::info!("drained");
        Ok(())
    }
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

fn spawn_expiry(svc: Arc<Services>) {
    let every = Duration::from_millis(svc.config.expiry_interval_ms.max(10));
    let weak = Arc::downgrade(&svc);
    drop(svc);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(svc) = weak.upgrade() else { return };
            match svc.mailbox.expire(crate::mailbox::now_ms()).await {
                Ok(n) => svc.metrics.expired.increment(n),
                Err(e) => tracing::warn!(error = %e, "expiry failed"),
            }
        }
    });
}
