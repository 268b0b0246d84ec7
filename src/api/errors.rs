//! The one place where failures become HTTP statuses with `{ "error": "<reason>" }`.

use crate::ingest::IngestError;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("missing or wrong API key: send Authorization: Bearer <key>")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    UriTooLong(String),
    #[error("{0}")]
    HeadersTooLarge(String),
    #[error("{0}")]
    Conflict(String),
    /// A node-to-node request that does not prove the cluster secret or comes from a non-member.
    #[error("{0}")]
    PeerRefused(String),
    /// Waited for an operation to become durable longer than allowed (504).
    #[error("{0}")]
    Timeout(String),
}

impl From<crate::ingest::parse::Invalid> for ApiError {
    fn from(e: crate::ingest::parse::Invalid) -> Self {
        match e {
            crate::ingest::parse::Invalid::Bad(m) => ApiError::BadRequest(m),
            crate::ingest::parse::Invalid::TooLarge(m) => ApiError::TooLarge(m),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Timeout(_) => ApiError::Timeout(e.to_string()),
            e => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PeerRefused(_) => StatusCode::UNAUTHORIZED,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        };
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}
