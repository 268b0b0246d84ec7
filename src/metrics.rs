//! Metrics: counters, gauges and histograms in the Prometheus text format at `/metrics`.
//!
//! Handles are looked up once and kept in [`Metrics`], so hot paths only do atomic adds.
//! One recorder per process (the `metrics` crate's global); nodes started in one test process
//! share it.

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets in seconds: 100 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The hand-off histogram's name: a hop between nodes is measured in fractions of a millisecond.
pub const HANDOFF: &str = "signalpost_append_to_handoff_seconds";
/// The embedded mailbox's log write per batch: one synchronous write of a few KiB takes a
/// fraction of a millisecond.
pub const LOG_WRITE: &str = "signalpost_log_write_seconds";
/// The `reason` label of `signalpost_disconnects_total`: Engine.IO's and Socket.IO's reasons
/// for a connection's end (`gateway` maps each to its place here).
pub const DISCONNECT_REASONS: [&str; 8] = [
    "client_closed",
    "client_left",
    "transport_error",
    "heartbeat_timeout",
    "bad_packet",
    "polling_misuse",
    "server_closed",
    "node_stopping",
];

/// The finer buckets (50 µs to 1 s) of [`HANDOFF`] and [`LOG_WRITE`].
const FINE_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// The process's metric handles.
#[derive(Clone)]
pub struct Metrics {
    pub appends: Counter,
    pub duplicates: Counter,
    pub deliveries: Counter,
    pub replayed: Counter,
    pub gaps: Counter,
    pub connections: Gauge,
    pub connects: Counter,
    pub refused: Counter,
    pub bindings: Counter,
    pub unbindings: Counter,
    pub acks: Counter,
    /// `read` events stored.
    pub reads: Counter,
    /// Clients that became or stopped being members of presence addresses (announced).
    pub presence_changes: Counter,
    pub lagged: Counter,
    pub append_seconds: Histogram,
    pub append_batch: Histogram,
    pub delivery_seconds: Histogram,
    pub expired: Counter,
    /// Cursors and read marks removed past their TTL (the embedded store's).
    pub expired_state: Counter,
    pub cleaned: Counter,
    /// Messages sent to other nodes (per receiving node: one count per node that wanted it).
    pub forwarded: Counter,
    /// Messages received from other nodes.
    pub from_peers: Counter,
    /// From an append being durable to its messages handed to this node's connections, on the
    /// appending node (`route="local"`) and on a node it forwarded them to (`route="peer"`):
    /// what a hop between nodes costs. One observation per message with local connections.
    pub handoff_local: Histogram,
    pub handoff_peer: Histogram,
    /// Client events refused for their connection's rate.
    pub events_refused: Counter,
    /// Connections closed with `kicked` (kick, quota, token expiry, flood).
    pub kicked: Counter,
    /// `signalpost_disconnects_total{reason}`: connections closed, by why (in the order of
    /// [`DISCONNECT_REASONS`]).
    pub disconnects: [Counter; DISCONNECT_REASONS.len()],
    /// Node-to-node requests refused (bad signature, replay, not a member).
    pub peer_refused: Counter,
}

impl Metrics {
    /// Installs the recorder (once per process) and registers every metric.
    pub fn install() -> Self {
        HANDLE.get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("signalpost_append_batch_size".into()),
                        &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0],
                    )
                })
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(HANDOFF.into()), FINE_BUCKETS))
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(LOG_WRITE.into()), FINE_BUCKETS)
                })
                .expect("static buckets are valid")
                .install_recorder()
                .expect("one recorder per process");
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep");
            handle
        });
        Self {
            appends: metrics::counter!("signalpost_appends_total"),
            duplicates: metrics::counter!("signalpost_duplicates_total"),
            deliveries: metrics::counter!("signalpost_deliveries_total"),
            replayed: metrics::counter!("signalpost_replayed_total"),
            gaps: metrics::counter!("signalpost_gaps_total"),
            connections: metrics::gauge!("signalpost_connections"),
            connects: metrics::counter!("signalpost_connects_total"),
            refused: metrics::counter!("signalpost_connects_refused_total"),
            bindings: metrics::counter!("signalpost_bindings_total"),
            unbindings: metrics::counter!("signalpost_unbindings_total"),
            acks: metrics::counter!("signalpost_acks_total"),
            reads: metrics::counter!("signalpost_reads_total"),
            presence_changes: metrics::counter!("signalpost_presence_changes_total"),
            lagged: metrics::counter!("signalpost_lagged_total"),
            append_seconds: metrics::histogram!("signalpost_append_seconds"),
            append_batch: metrics::histogram!("signalpost_append_batch_size"),
            delivery_seconds: metrics::histogram!("signalpost_enqueue_to_delivery_seconds"),
            expired: metrics::counter!("signalpost_expired_total"),
            expired_state: metrics::counter!("signalpost_expired_state_total"),
            cleaned: metrics::counter!("signalpost_presence_cleaned_total"),
            forwarded: metrics::counter!("signalpost_forwarded_total"),
            from_peers: metrics::counter!("signalpost_from_peers_total"),
            handoff_local: metrics::histogram!(HANDOFF, "route" => "local"),
            handoff_peer: metrics::histogram!(HANDOFF, "route" => "peer"),
            events_refused: metrics::counter!("signalpost_events_refused_total"),
            kicked: metrics::counter!("signalpost_kicked_total"),
            disconnects: DISCONNECT_REASONS
                .map(|r| metrics::counter!("signalpost_disconnects_total", "reason" => r)),
            peer_refused: metrics::counter!("signalpost_peer_requests_refused_total"),
        }
    }

    /// The Prometheus text, with the process's resident memory and the runtime's worker
    /// threads appended.
    pub fn render() -> String {
        let mut out = HANDLE.get().map(|h| h.render()).unwrap_or_default();
        if let Some(rss) = resident_bytes() {
            out.push_str("# TYPE process_resident_memory_bytes gauge\n");
            out.push_str(&format!("process_resident_memory_bytes {rss}\n"));
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            out.push_str("# TYPE signalpost_runtime_workers gauge\n");
            out.push_str(&format!(
                "signalpost_runtime_workers {}\n",
                rt.metrics().num_workers()
            ));
        }
        out
    }
}

/// Resident memory of this process, from /proc (Linux).
pub fn resident_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
