//! The peers' own HTTP routes: `POST /internal/want` and `POST /internal/deliver`. They are
//! mounted by the server API behind its node-to-node guard, which checks the signature and the
//! membership and tells these handlers who the sender is ([`Sender`]); failures answer
//! `{ "error": "<reason>" }` like every other route.

use super::{Deliver, Peers, Want};
use crate::routing::Replies;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Value, json};
use std::sync::Arc;

/// The member that signed a request, and where the membership says it is.
#[derive(Clone, Debug)]
pub struct Sender {
    pub node: String,
    pub url: String,
}

#[derive(Clone)]
struct Receiver {
    peers: Arc<Peers>,
    /// Where answers of `?wait=true` operations applied elsewhere go (this node's queue).
    replies: Arc<dyn Replies>,
}

type Answer = (StatusCode, Json<Value>);

fn refuse(status: StatusCode, reason: String) -> Answer {
    (status, Json(json!({ "error": reason })))
}

/// The routes, with what they serve from.
pub fn routes<S>(peers: Arc<Peers>, replies: Arc<dyn Replies>) -> Router<S> {
    Router::new()
        .route("/internal/want", post(want))
        .route("/internal/deliver", post(deliver))
        .with_state(Receiver { peers, replies })
}

/// `POST /internal/want`: the sender's interests.
async fn want(
    State(r): State<Receiver>,
    Extension(sender): Extension<Sender>,
    body: Bytes,
) -> Answer {
    let want: Want = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("invalid want: {e}")),
    };
    if want.node != sender.node {
        return refuse(
            StatusCode::UNAUTHORIZED,
            format!("a want of {} signed by {}", want.node, sender.node),
        );
    }
    match r.peers.on_want(want, sender.url) {
        200 => (StatusCode::OK, Json(json!({ "ok": true }))),
        _ => refuse(
            StatusCode::CONFLICT,
            "unknown session: send a snapshot first".into(),
        ),
    }
}

/// `POST /internal/deliver`: messages, binding changes or answers from another node.
async fn deliver(
    State(r): State<Receiver>,
    Extension(_sender): Extension<Sender>,
    body: Bytes,
) -> Answer {
    let frames: Vec<Deliver> = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("invalid delivery: {e}")),
    };
    for frame in frames {
        r.peers.on_deliver(frame, &*r.replies);
    }
    (StatusCode::OK, Json(json!({ "ok": true })))
}
