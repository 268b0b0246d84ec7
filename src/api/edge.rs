//! The node's edge: what every HTTP request meets before its route, in one pass.
//!
//! - A request target or header block past the limits is refused (414/431, JSON reason).
//! - The Socket.IO endpoint (`/socket.io/…`) goes to the gateway: a WebSocket upgrade from an
//!   origin neither the node's own nor listed is refused (403), the request is detached from
//!   hyper's read buffer, and CORS applies there only.
//! - `/server/…` needs the API key when one is configured (401 before anything is parsed).
//! - Every other request goes to its route ([`super::routes`]) under the body limit, and an error
//!   answer without a JSON body gets one: `{ "error": "<reason>" }`.
//!
//! One middleware around the whole router instead of a layer per concern on every route: each
//! `Router::layer` boxes a route again, and each `from_fn` clones the boxed route and boxes a
//! future per request. Measured with `scripts/bench-peers --scenarios publish1` on an enqueue
//! that answered right after parsing: 59 k requests/s through the five layers, 79 k without.

use super::{Api, ApiError};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

/// Longest request target (path and query) the node takes.
const MAX_URI: usize = 8 * 1024;
/// Most bytes of request headers the node takes.
const MAX_HEADERS: usize = 16 * 1024;
/// Where socketioxide serves (its default path).
const SOCKET_PATH: &str = "/socket.io";

struct Edge {
    /// The Socket.IO layer (with CORS) in front of a 404.
    sockets: BoxCloneSyncService<Request, Response, Infallible>,
    api_key: Option<String>,
    cors_origins: Arc<[String]>,
}

/// The node's whole HTTP service: the edge around `routes`, with the Socket.IO layer beside it.
pub fn service(
    api: &Api,
    routes: Router,
    sockets: socketioxide::layer::SocketIoLayer,
) -> impl Service<
    Request,
    Response = Response,
    Error = Infallible,
    Future = impl Future<Output = Result<Response, Infallible>> + Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    let config = &api.gw.config;
    let edge = Edge {
        // One `layer` call: each makes an engine of its own, with its own sessions (a layer
        // on a router would make one per route and method, and a polling client's GET and
        // POST would meet different engines).
        sockets: BoxCloneSyncService::new(
            tower::ServiceBuilder::new()
                .map_response(IntoResponse::into_response)
                .layer(crate::gateway::cors(&config.cors_origins))
                .map_request(crate::gateway::detach_request)
                .layer(sockets)
                .service(tower::service_fn(|_: Request| async {
                    Ok::<_, Infallible>(
                        ApiError::NotFound("no such endpoint".into()).into_response(),
                    )
                })),
        ),
        api_key: config.api_key.clone(),
        cors_origins: config.cors_origins.clone().into(),
    };
    let routes = DefaultBodyLimit::max(config.limits.max_body_bytes).layer(routes);
    middleware::from_fn_with_state(Arc::new(edge), edge_fn).layer(routes)
}

fn is_socket_path(path: &str) -> bool {
    path.strip_prefix(SOCKET_PATH)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn is_server_path(path: &str) -> bool {
    path.strip_prefix("/server")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

async fn edge_fn(State(edge): State<Arc<Edge>>, req: Request, next: Next) -> Response {
    if let Err(e) = head_limits(&req) {
        return e.into_response();
    }
    let path = req.uri().path();
    if is_socket_path(path) {
        if let Some(refused) = crate::gateway::ws_origin_refusal(&edge.cors_origins, &req) {
            return refused;
        }
        let Ok(res) = edge.sockets.clone().oneshot(req).await;
        return res;
    }
    if is_server_path(path)
        && let Some(key) = &edge.api_key
    {
        // From the request itself: a `HeaderMap` extractor would copy every header.
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !crate::security::api_key_matches(given, key) {
            return ApiError::Unauthorized.into_response();
        }
    }
    json_errors(next.run(req).await).await
}

/// Refuses request targets and header blocks past the limits, with a JSON reason.
fn head_limits(req: &Request) -> Result<(), ApiError> {
    let uri = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri > MAX_URI {
        return Err(ApiError::UriTooLong(format!(
            "the request target is {uri} bytes, over the limit of {MAX_URI}"
        )));
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if headers > MAX_HEADERS {
        return Err(ApiError::HeadersTooLarge(format!(
            "the request headers are {headers} bytes, over the limit of {MAX_HEADERS}"
        )));
    }
    Ok(())
}

/// Gives every error answer a JSON body `{ "error": "<reason>" }`: the API's own errors have
/// one already; those of the framework (a rejected extractor, a body over the limit, a body read
/// that timed out) get their text as the reason.
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let reason = if text.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("error")
            .to_string()
    } else {
        text
    };
    let mut res = (status, axum::Json(json!({ "error": reason }))).into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            res.headers_mut().insert(k.clone(), v.clone());
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_told_apart_by_whole_segments() {
        assert!(is_socket_path("/socket.io"));
        assert!(is_socket_path("/socket.io/"));
        assert!(!is_socket_path("/socket.io.min.js"));
        assert!(is_server_path("/server/enqueue"));
        assert!(is_server_path("/server"));
        assert!(!is_server_path("/serverless"));
        assert!(!is_server_path("/internal/deliver"));
    }
}
