//! The HTTP server API (`/server/*`), health, metrics and the page.
//!
//! Thin handlers: parse and validate the body into [`Command`]s, publish them to the queue, and
//! map every failure to a status with `{ "error": "<reason>" }` ([`ApiError`]).

mod errors;
mod read;

pub use errors::ApiError;

use crate::address::{Address, MessageId};
use crate::ingest::{Command, IngestError, Outcome, parse};
use crate::node::Services;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
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

/// The node's HTTP routes (the Socket.IO layer is added by the node).
pub fn routes(svc: Arc<Services>) -> Router {
    let limit = svc
        .config
        .max_payload_bytes
        .saturating_mul(svc.config.max_batch)
        .clamp(1 << 20, 256 << 20);
    let server = Router::new()
        .route("/server/enqueue", post(enqueue))
        .route("/server/connect", post(connect))
        .route("/server/disconnect", post(disconnect))
        .route("/server/mailbox/{address}", get(read::mailbox))
        .route("/server/clients/{client}", get(read::client))
        .route("/server/presence/{address}", get(read::presence))
        .route("/server/nodes", get(read::nodes))
        .route("/internal/want", post(internal_want))
        .route("/internal/deliver", post(internal_deliver))
        .fallback(|| async { ApiError::NotFound("no such /server endpoint".into()) })
        .layer(middleware::from_fn_with_state(svc.clone(), require_api_key));
    Router::new()
        .merge(server)
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
        .layer(DefaultBodyLimit::max(limit))
        .with_state(svc)
}

async fn require_api_key(
    State(svc): State<Arc<Services>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = &svc.config.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !crate::security::api_key_matches(given, key) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
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

fn limits(svc: &Services) -> parse::Limits {
    parse::Limits {
        max_payload: svc.config.max_payload_bytes,
        max_batch: svc.config.max_batch,
    }
}

fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(format!("request body too large: {e}")),
        _ => ApiError::BadRequest(e.body_text()),
    })
}

/// `POST /server/enqueue[?wait=true]`: one message `{address, payload, id?}`, or an array of them.
async fn enqueue(
    State(svc): State<Arc<Services>>,
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
            (Ok(Outcome::Appended(a)), true) => out.push(
                json!({ "id": id, "address": a.message.address, "version": a.message.version }),
            ),
            (Ok(_), _) => out.push(json!({ "id": id })),
        }
    }
    let status = if wait {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let body = if many {
        json!({ "results": out })
    } else {
        out.pop().unwrap_or(Value::Null)
    };
    Ok((status, Json(body)).into_response())
}

/// `POST /server/connect`: binds a client to addresses.
async fn connect(
    State(svc): State<Arc<Services>>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    change_bindings(&svc, b, true).await
}

/// `POST /server/disconnect`: unbinds a client from addresses.
async fn disconnect(
    State(svc): State<Arc<Services>>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    change_bindings(&svc, b, false).await
}

/// Binds or unbinds, answering once durable: `{client, bound: [{address, version}]}` or
/// `{client, unbound: [addresses that were bound]}`.
async fn change_bindings(
    svc: &Services,
    b: Result<Bytes, BytesRejection>,
    bind: bool,
) -> Result<Json<Value>, ApiError> {
    let (client, addresses) = parse::binding(&body(b)?, limits(svc))?;
    let command = if bind {
        Command::Bind {
            client: client.clone(),
            addresses,
        }
    } else {
        Command::Unbind {
            client: client.clone(),
            addresses,
        }
    };
    let r = publish(svc, vec![command], true, Some(BIND_TIMEOUT)).await?;
    match r.into_iter().next() {
        Some(Ok(Outcome::Bound { bindings, .. })) => {
            let b: Vec<Value> = bindings
                .iter()
                .map(|(a, v)| json!({ "address": a, "version": v }))
                .collect();
            Ok(Json(json!({ "client": client, "bound": b })))
        }
        Some(Ok(Outcome::Unbound { removed })) => {
            let u: Vec<&Address> = removed.iter().map(|(a, _)| a).collect();
            Ok(Json(json!({ "client": client, "unbound": u })))
        }
        Some(Err(e)) => Err(e.into()),
        _ => Ok(Json(json!({ "client": client }))),
    }
}

async fn publish(
    svc: &Services,
    commands: Vec<Command>,
    wait: bool,
    timeout: Option<Duration>,
) -> Result<Vec<Result<Outcome, IngestError>>, ApiError> {
    if svc.draining.load(Ordering::SeqCst) {
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

/// `POST /internal/want`: another node's interests ([`crate::routing::peers`]).
async fn internal_want(
    State(svc): State<Arc<Services>>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let want: crate::routing::peers::Want = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid want: {e}")))?;
    Ok(StatusCode::from_u16(svc.peers.on_want(want)).unwrap_or(StatusCode::CONFLICT))
}

/// `POST /internal/deliver`: messages, binding changes or an answer from another node.
async fn internal_deliver(
    State(svc): State<Arc<Services>>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let frames: Vec<crate::routing::peers::Deliver> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid delivery: {e}")))?;
    for frame in frames {
        svc.peers.on_deliver(frame);
    }
    Ok(StatusCode::OK)
}
