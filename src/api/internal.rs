//! Node-to-node routes (`/internal/*`), served on the cluster backend only. Every request must
//! carry a valid signature under the shared `cluster_secret` ([`crate::security::PeerAuth`]) from
//! a node the membership lists; anything else is refused with 401 before it is parsed, and nothing
//! it says reaches a client, a mailbox or a binding.

use super::Api;
use super::ApiError;
use crate::gateway::registry::Target;
use crate::peers::routes::Sender as Peer;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

pub fn routes(svc: Arc<Api>) -> Router<Arc<Api>> {
    Router::new()
        .merge(crate::peers::routes::routes(
            svc.gw.peers.clone(),
            svc.queue.clone(),
        ))
        .route("/internal/kick", post(kick))
        .route("/internal/connections", post(connections))
        .route("/internal/bound", post(bound))
        .route("/internal/work/held", post(work_held))
        .layer(middleware::from_fn_with_state(svc, verify))
}

/// Checks the signature and the membership of the sender.
async fn verify(State(svc): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, svc.gw.config.limits.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => return ApiError::TooLarge("request body too large".into()).into_response(),
    };
    let header = |n: &'static str| parts.headers.get(n).and_then(|v| v.to_str().ok());
    let now = crate::clock::now_ms();
    let refused = |m: String| {
        svc.gw.metrics.peer_refused.increment(1);
        ApiError::PeerRefused(m).into_response()
    };
    let node =
        match svc
            .peer_auth
            .verify(parts.method.as_str(), parts.uri.path(), header, &bytes, now)
        {
            Ok(n) => n,
            Err(e) => return refused(e.to_string()),
        };
    let Some(url) = svc.gw.peers.member_url(&node).await else {
        return refused(format!("{node} is not a live member of this cluster"));
    };
    let mut req = Request::from_parts(parts, Body::from(bytes));
    req.extensions_mut().insert(Peer { node, url });
    next.run(req).await
}

fn parse<T: for<'a> Deserialize<'a>>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid {what}: {e}")))
}

#[derive(Deserialize)]
pub struct KickIn {
    pub target: Target,
    pub reason: String,
    #[serde(default)]
    pub revoke: bool,
}

/// `POST /internal/kick`: closes this node's connections of a client, user or connection.
async fn kick(
    State(svc): State<Arc<Api>>,
    Extension(_peer): Extension<Peer>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let k: KickIn = parse(&body, "kick")?;
    let kicked = super::kick::local(&svc, &k.target, &k.reason, k.revoke).await?;
    Ok(Json(json!({ "kicked": kicked })))
}

#[derive(Deserialize)]
struct UserIn {
    user: String,
}

/// `POST /internal/connections`: this node's connections of a user (for the per-user quota).
async fn connections(
    State(svc): State<Arc<Api>>,
    Extension(_peer): Extension<Peer>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let u: UserIn = parse(&body, "user")?;
    Ok(Json(json!(svc.gw.gate.registry.of_user(&u.user))))
}

#[derive(Deserialize)]
struct AddressIn {
    address: crate::address::Address,
}

/// `POST /internal/bound` `{address}`: this node's connections that receive the address (for
/// `GET /server/presence/<address>`).
async fn bound(
    State(svc): State<Arc<Api>>,
    Extension(_peer): Extension<Peer>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let a: AddressIn = parse(&body, "address")?;
    Ok(Json(json!(super::read::bound_here(&svc, &a.address))))
}

/// `POST /internal/work/held` `{address, adopt, term}`: what this node's connections hold of a work
/// address; with `adopt`, the sender deals it now and their acks go to it.
async fn work_held(
    State(svc): State<Arc<Api>>,
    Extension(sender): Extension<Peer>,
    body: Bytes,
) -> Result<Json<Vec<crate::work::Holder>>, ApiError> {
    let req: crate::work::HeldRequest = parse(&body, "work question")?;
    let dealer = req.adopt.then_some((sender.node.as_str(), req.term));
    Ok(Json(svc.gw.work.held_here(&req.address, dealer)))
}
