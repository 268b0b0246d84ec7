//! A keep-alive HTTP/1.1 client (plain or TLS) of a node's HTTP interfaces: nodes reach each
//! other with it (every request signed with the cluster secret), and the tools reach the server
//! API with it (with the API key).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL {0:?}: expected http://host:port")]
    Url(String),
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("the server answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("socket: {0}")]
    Socket(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Input(String),
}

/// `host:port` of an `http://host:port[/]` URL.
pub fn authority(url: &str) -> Result<String, ClientError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::Url(url.into()))?;
    let a = rest.trim_end_matches('/');
    if a.is_empty() || a.contains('/') {
        return Err(ClientError::Url(url.into()));
    }
    Ok(a.to_string())
}

/// One keep-alive HTTP/1.1 connection to a node.
pub struct Http {
    authority: String,
    api_key: Option<String>,
    /// Node-to-node requests are signed with the cluster secret, as this node.
    signer: Option<(std::sync::Arc<crate::security::PeerAuth>, String)>,
    send: SendRequest<Full<Bytes>>,
}

impl Http {
    pub async fn connect(url: &str, api_key: Option<String>) -> Result<Self, ClientError> {
        Self::connect_tls(url, api_key, None).await
    }

    /// Connects to `http://host:port`, or to `https://host:port` with `tls` (the roots to trust).
    pub async fn connect_tls(
        url: &str,
        api_key: Option<String>,
        tls: Option<&crate::tls::Connector>,
    ) -> Result<Self, ClientError> {
        let (authority, https) = match url.strip_prefix("https://") {
            Some(rest) => (authority(&format!("http://{rest}"))?, true),
            None => (authority(url)?, false),
        };
        let tcp = TcpStream::connect(&authority)
            .await
            .map_err(|e| ClientError::Connect(authority.clone(), e.to_string()))?;
        tcp.set_nodelay(true).ok();
        let http = |e: hyper::Error| ClientError::Http(e.to_string());
        let send = match (https, tls) {
            (false, _) => {
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(http)?;
                tokio::spawn(conn);
                send
            }
            (true, None) => {
                return Err(ClientError::Url(format!(
                    "{url}: https needs trusted roots (tls_ca)"
                )));
            }
            (true, Some(tls)) => {
                let host = authority
                    .rsplit_once(':')
                    .map_or(authority.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let stream = tls
                    .connect(host, tcp)
                    .await
                    .map_err(|e| ClientError::Connect(authority.clone(), e))?;
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(http)?;
                tokio::spawn(conn);
                send
            }
        };
        Ok(Self {
            authority,
            api_key,
            signer: None,
            send,
        })
    }

    /// Signs every request as `node` with the cluster secret (node-to-node calls).
    pub fn signed(mut self, auth: std::sync::Arc<crate::security::PeerAuth>, node: &str) -> Self {
        self.signer = Some((auth, node.to_string()));
        self
    }

    /// Sends a request; returns the status and body, or an error carrying the server's reason.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(u16, Bytes), ClientError> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority)
            .header("content-type", "application/json");
        if let Some(k) = &self.api_key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let body = body.unwrap_or_default();
        if let Some((auth, node)) = &self.signer {
            use crate::security::{PEER_NODE, PEER_NONCE, PEER_SIGNATURE, PEER_TIME};
            let sig = auth.sign(method, path, node, &body, crate::clock::now_ms());
            req = req
                .header(PEER_NODE, sig.node)
                .header(PEER_TIME, sig.time)
                .header(PEER_NONCE, sig.nonce)
                .header(PEER_SIGNATURE, sig.signature);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        self.send
            .ready()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let res = self
            .send
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = res.status().as_u16();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    /// Like [`Http::call`], but a non-2xx answer is an error with the server's reason.
    pub async fn json(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let bytes = body.map(|b| Bytes::from(b.to_string()));
        let (status, body) = self.call(method, path, bytes).await?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            let reason = v
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into());
            return Err(ClientError::Status {
                status,
                body: reason,
            });
        }
        Ok(v)
    }
}
