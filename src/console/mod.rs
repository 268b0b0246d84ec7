//! The page every node serves at `/`: a small console to see the node and try the product.

use axum::http::header;
use axum::response::IntoResponse;

pub async fn page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("index.html"),
    )
}

pub async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("console.js"),
    )
}

/// The official Socket.IO browser client (see `vendor/README.md`), so the page needs no internet.
pub async fn socketio_client() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        include_str!("vendor/socket.io.min.js"),
    )
}

/// The project's client library (`clients/js/src/client.js`, self-contained ESM), which the page
/// imports; pages of your own can import it from here too.
pub async fn client_library() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../clients/js/src/client.js"),
    )
}
