//! The HTTP server API (`/server/*`), health, metrics and the page.
//!
//! Thin handlers: parse and validate the body into [`Command`]s, publish them to the queue, and
//! map every failure to a status with `{ "error": "<reason>" }` ([`ApiError`]).

pub mod edge;
mod errors;
mod internal;
pub mod kick;
mod read;

pub use errors::ApiError;

use crate::address::{Address, MessageId};
use crate::gateway::Gateway;
use crate::ingest::{Command, IngestError, Outcome, parse};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long `connect`/`disconnect` wait for the bindings to be durable before answering 503.
const BIND_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server API uses: the gateway's stores and connections, the queue operations go
/// through, the membership, and the node-to-node signatures.
pub struct Api {
    pub gw: Arc<Gateway>,
    pub queue: Arc<dyn crate::ingest::Queue>,
    pub membership: Arc<dyn crate::cluster::Membership>,
    /// Signs and checks node-to-node requests (the cluster secret).
    pub peer_auth: Arc<crate::security::PeerAuth>,
    /// Online backups (the embedded backend; none on the cluster backend).
    pub backup: Option<Arc<crate::backup::Backup>>,
}

impl Api {
    /// Which implementation backs a part, for `/healthz` and the page.
    pub fn backend_kind(&self, part: &str) -> &'static str {
        use crate::config::Backend;
        match (self.gw.config.backend, part) {
            (Backend::Embedded, "queue") => "in-process",
            (Backend::Embedded, "membership") => "standalone",
            (Backend::Embedded, _) => "redb",
            (Backend::Cluster, "mailbox" | "topology") => "cassandra",
            (Backend::Cluster, "queue") => "kafka",
            (Backend::Cluster, "membership") => "zookeeper",
            (Backend::Cluster, _) => "cassandra",
        }
    }
}

/// The node's HTTP routes: the server API, health, metrics and the page. The guards every
/// request meets first (head limits, the API key, JSON error bodies, body limits) are the
/// [`edge`]'s, once per request rather than once per route.
pub fn routes(svc: Arc<Api>) -> Router {
    let mut router = Router::new()
        .route("/server/enqueue", post(enqueue))
        .route("/server/connect", post(connect))
        .route("/server/disconnect", post(disconnect))
        .route("/server/kick", post(kick::kick))
        .route("/server/mailbox/{address}", get(read::mailbox))
        .route("/server/clients/{client}", get(read::client))
        .route(
            "/server/clients/{client}/read/{address}",
            get(read::read_state),
        )
        .route("/server/presence/{address}", get(read::presence))
        .route("/server/nodes", get(read::nodes))
        .route("/server/backup", post(backup));
    // Node-to-node routes exist only where there are other nodes.
    if svc.gw.config.backend == crate::config::Backend::Cluster {
        router = router.merge(internal::routes(svc.clone()));
    }
    router
        .route("/healthz", get(read::healthz))
        .route(
            "/metrics",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    crate::metrics::Metrics::render(),
                )
            }),
        )
        .route("/", get(crate::console::page))
        .route("/console.js", get(crate::console::script))
        .route("/socket.io.min.js", get(crate::console::socketio_client))
        .route("/signalpost-client.js", get(crate::console::client_library))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("method not allowed on this endpoint".into())
        })
        .with_state(svc)
}

#[derive(Deserialize)]
struct WaitQuery {
    #[serde(default)]
    wait: Option<String>,
}

impl WaitQuery {
    fn wait(&self) -> Result<bool, ApiError> {
        match self.wait.as_deref() {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") | Some("") => Ok(true),
            Some(o) => Err(ApiError::BadRequest(format!(
                "wait must be true or false, not {o:?}"
            ))),
        }
    }
}

fn limits(svc: &Api) -> parse::Limits {
    parse::Limits {
        max_payload: svc.gw.config.limits.max_payload_bytes,
        max_batch: svc.gw.config.limits.max_batch,
    }
}

fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(format!("request body too large: {e}")),
        _ => ApiError::BadRequest(e.body_text()),
    })
}

/// `POST /server/backup` (no body): the embedded node writes a consistent copy of its store
/// into `<data_dir>/backups/` and answers where, once it is whole (`crate::backup`).
async fn backup(State(svc): State<Arc<Api>>, b: Bytes) -> Result<Json<Value>, ApiError> {
    let Some(backup) = svc.backup.clone() else {
        return Err(ApiError::NotFound(
            "backups are made by the embedded backend; a cluster's store is Cassandra's \
             (nodetool snapshot, docs/operations.md)"
                .into(),
        ));
    };
    if !b.is_empty() {
        return Err(ApiError::BadRequest("a backup takes no body".into()));
    }
    let report = tokio::task::spawn_blocking(move || backup.run())
        .await
        .map_err(|e| ApiError::Unavailable(format!("the backup stopped: {e}")))?;
    match report {
        Ok(r) => {
            tracing::info!(dir = %r.dir, messages = r.messages, seconds = r.seconds, "backup written");
            metrics::counter!("signalpost_backups_total", "outcome" => "written").increment(1);
            metrics::gauge!("signalpost_last_backup_timestamp_seconds")
                .set(crate::clock::now_ms() as f64 / 1000.0);
            Ok(Json(serde_json::to_value(r).unwrap_or_default()))
        }
        Err(e @ crate::backup::BackupError::Busy) => Err(ApiError::Conflict(e.to_string())),
        Err(e) => {
            tracing::error!(error = %e, "backup failed");
            metrics::counter!("signalpost_backups_total", "outcome" => "failed").increment(1);
            Err(ApiError::Unavailable(e.to_string()))
        }
    }
}

/// `POST /server/enqueue[?wait=true]`: one message `{address, payload, id?}`, or an array of them.
async fn enqueue(
    State(svc): State<Arc<Api>>,
    q: Query<WaitQuery>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let wait = q.wait()?;
    let bytes = body(b)?;
    let (batch, many) = parse::enqueue_body(&bytes, limits(&svc))?;
    let ids: Vec<MessageId> = batch.iter().map(|m| m.id.clone()).collect();
    let results = publish(
        &svc,
        batch.into_iter().map(Command::Enqueue).collect(),
        wait,
        None,
    )
    .await?;
    let mut out = Vec::with_capacity(results.len());
    for (id, r) in ids.iter().zip(results) {
        match (r, wait) {
            (Err(e), _) => return Err(e.into()),
            (Ok(Outcome::Refused(reason)), _) => return Err(ApiError::BadRequest(reason)),
            (Ok(Outcome::Appended(a)), true) => out.push(Enqueued {
                id,
                appended: Some(a.message),
            }),
            (Ok(_), _) => out.push(Enqueued { id, appended: None }),
        }
    }
    let status = if wait {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    // Serialized straight from these structs (no `serde_json::Value` built per message).
    if many {
        Ok((status, Json(EnqueuedMany { results: out })).into_response())
    } else {
        Ok((status, Json(out.pop())).into_response())
    }
}

/// One message's answer: `{id}`, or with `wait=true` `{id, address, version}`.
struct Enqueued<'a> {
    id: &'a MessageId,
    appended: Option<Arc<crate::mailbox::Message>>,
}

impl serde::Serialize for Enqueued<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", self.id)?;
        if let Some(a) = &self.appended {
            m.serialize_entry("address", &a.address)?;
            m.serialize_entry("version", &a.version)?;
        }
        m.end()
    }
}

#[derive(serde::Serialize)]
struct EnqueuedMany<'a> {
    results: Vec<Enqueued<'a>>,
}

/// `POST /server/connect`: binds a client to addresses.
async fn connect(
    State(svc): State<Arc<Api>>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    change_bindings(&svc, b, true).await
}

/// `POST /server/disconnect`: unbinds a client from addresses.
async fn disconnect(
    State(svc): State<Arc<Api>>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    change_bindings(&svc, b, false).await
}

/// Binds or unbinds, answering once durable: `{client, bound: [{address, version}]}` or
/// `{client, unbound: [addresses that were bound]}`.
async fn change_bindings(
    svc: &Api,
    b: Result<Bytes, BytesRejection>,
    bind: bool,
) -> Result<Json<Value>, ApiError> {
    let request = parse::binding(&body(b)?, limits(svc))?;
    let client = request.client.clone();
    let command = request.into_command(bind)?;
    // The contract: a binding not durable within 5 s answers 503 (not the 504 of other waits).
    let unavailable = |e: ApiError| match e {
        ApiError::Timeout(m) => ApiError::Unavailable(m),
        e => e,
    };
    let r = publish(svc, vec![command], true, Some(BIND_TIMEOUT))
        .await
        .map_err(unavailable)?;
    match r.into_iter().next() {
        Some(Ok(Outcome::Bound { bindings, .. })) => {
            let b: Vec<Value> = bindings
                .iter()
                .map(|(a, v)| json!({ "address": a, "version": v }))
                .collect();
            Ok(Json(json!({ "client": client, "bound": b })))
        }
        Some(Ok(Outcome::Refused(reason))) => Err(ApiError::BadRequest(reason)),
        Some(Ok(Outcome::Unbound { removed })) => {
            let u: Vec<&Address> = removed.iter().map(|(a, _)| a).collect();
            Ok(Json(json!({ "client": client, "unbound": u })))
        }
        Some(Err(e)) => Err(unavailable(e.into())),
        _ => Ok(Json(json!({ "client": client }))),
    }
}

async fn publish(
    svc: &Api,
    commands: Vec<Command>,
    wait: bool,
    timeout: Option<Duration>,
) -> Result<Vec<Result<Outcome, IngestError>>, ApiError> {
    if svc.gw.draining.load(Ordering::SeqCst) {
        return Err(ApiError::Unavailable("the node is shutting down".into()));
    }
    let fut = svc.queue.publish(commands, wait);
    match timeout {
        None => Ok(fut.await?),
        Some(t) => tokio::time::timeout(t, fut)
            .await
            .map_err(|_| IngestError::Timeout(t.as_secs()))?
            .map_err(Into::into),
    }
}
