//! How a node reaches another: [`Transport`] POSTs a body to a path of the node at a URL and
//! returns the status and body. [`HttpTransport`] is the real one (HTTP/1.1, optionally TLS,
//! every request signed with the cluster secret as this node, keep-alive connections kept per
//! peer); the tests link nodes in-process through a transport that calls the receiving
//! [`super::Peers`] directly.

use super::client::Http;
use crate::security::PeerAuth;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why a request to a peer got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("no answer from {url} within {ms} ms")]
    Timeout { url: String, ms: u64 },
}

/// A way to send a request to another node.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// POSTs `body` to `path` at the node `url`; the answer's status and body.
    async fn post(
        &self,
        url: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), TransportError>;
}

/// Keep-alive connections kept per peer URL (beyond those in use).
const IDLE_PER_PEER: usize = 4;

/// Signed HTTP/1.1 between nodes, on their public listener.
pub struct HttpTransport {
    node: String,
    auth: Arc<PeerAuth>,
    /// The roots peers' HTTPS certificates are checked against (when nodes speak TLS).
    tls: Option<crate::tls::Connector>,
    idle: Mutex<HashMap<String, Vec<Http>>>,
}

impl HttpTransport {
    pub fn new(node: &str, auth: Arc<PeerAuth>, tls: Option<crate::tls::Connector>) -> Self {
        Self {
            node: node.to_string(),
            auth,
            tls,
            idle: Default::default(),
        }
    }

    async fn connect(&self, url: &str) -> Result<Http, TransportError> {
        Http::connect_tls(url, None, self.tls.as_ref())
            .await
            .map(|h| h.signed(self.auth.clone(), &self.node))
            .map_err(|e| unreachable(url, e))
    }

    /// Forgets the kept connections of peers not in `live` (their URLs).
    pub fn retain(&self, live: &dyn Fn(&str) -> bool) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|url, _| live(url));
    }
}

fn unreachable(url: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Unreachable {
        url: url.into(),
        reason: e.to_string(),
    }
}

#[async_trait::async_trait]
impl Transport for HttpTransport {
    async fn post(
        &self,
        url: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), TransportError> {
        let kept = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(url)
            .and_then(Vec::pop);
        // A kept connection first; the peer may have closed it meanwhile, so a failure there is
        // tried once more on a new connection (receivers take a frame twice without harm:
        // wants are idempotent, deliveries are versioned).
        let mut done = None;
        if let Some(mut h) = kept
            && let Ok(answer) = h.call("POST", path, Some(body.clone())).await
        {
            done = Some((h, answer));
        }
        let (http, answer) = match done {
            Some(d) => d,
            None => {
                let mut h = self.connect(url).await?;
                let answer = h
                    .call("POST", path, Some(body))
                    .await
                    .map_err(|e| unreachable(url, e))?;
                (h, answer)
            }
        };
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let kept = idle.entry(url.to_string()).or_default();
        if kept.len() < IDLE_PER_PEER {
            kept.push(http);
        }
        Ok(answer)
    }
}
