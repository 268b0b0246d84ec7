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

/// What a receiving route answers: 200, or a status and the reason.
pub type Received = Result<(), (StatusCode, String)>;

/// Takes a want from the member `sender` (the real routes and the tests' in-process transport
/// both go through here).
pub fn receive_want(peers: &Arc<Peers>, sender: &Sender, body: &[u8]) -> Received {
    let want: Want = serde_json::from_slice(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("invalid want: {e}")))?;
    if want.node != sender.node {
        return Err((
            StatusCode::UNAUTHORIZED,
            format!("a want of {} signed by {}", want.node, sender.node),
        ));
    }
    match peers.on_want(want, sender.url.clone()) {
        200 => Ok(()),
        _ => Err((
            StatusCode::CONFLICT,
            "unknown session: send a snapshot first".into(),
        )),
    }
}

/// Takes a delivery from the member `sender` (frames, in order); answers of `?wait=true`
/// operations go to `replies`. A frame this version does not know (a newer node's, during a
/// rolling upgrade) is skipped and the others are taken: refusing the delivery would break
/// the link for every frame in it. A body that is not a list of frames is refused.
pub fn receive_deliver(
    peers: &Peers,
    replies: &dyn Replies,
    sender: &Sender,
    body: &[u8],
) -> Received {
    let frames: Vec<Deliver> = match serde_json::from_slice(body) {
        Ok(frames) => frames,
        Err(e) => {
            let raw: Vec<&serde_json::value::RawValue> = serde_json::from_slice(body)
                .map_err(|_| (StatusCode::BAD_REQUEST, format!("invalid delivery: {e}")))?;
            raw.into_iter()
                .filter_map(|f| {
                    serde_json::from_str(f.get())
                        .inspect_err(|e| {
                            tracing::warn!(error = %e, node = %sender.node, "peers: skipped a frame this node does not know");
                        })
                        .ok()
                })
                .collect()
        }
    };
    for frame in frames {
        peers.on_deliver(&sender.node, frame, replies);
    }
    Ok(())
}

fn answer(received: Received) -> Answer {
    match received {
        Ok(()) => (StatusCode::OK, Json(json!({ "ok": true }))),
        Err((status, reason)) => refuse(status, reason),
    }
}

/// `POST /internal/want`: the sender's interests.
async fn want(
    State(r): State<Receiver>,
    Extension(sender): Extension<Sender>,
    body: Bytes,
) -> Answer {
    answer(receive_want(&r.peers, &sender, &body))
}

/// `POST /internal/deliver`: messages, binding changes or answers from another node.
async fn deliver(
    State(r): State<Receiver>,
    Extension(sender): Extension<Sender>,
    body: Bytes,
) -> Answer {
    answer(receive_deliver(&r.peers, &*r.replies, &sender, &body))
}
