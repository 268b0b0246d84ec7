//! Minimal clients of a node's public interfaces, for the tools: a keep-alive HTTP/1.1 client
//! for the server API, and a Socket.IO v4 client over a WebSocket (Engine.IO 4 frames: `0` open,
//! `40` connect, `42[...]` events, `2`/`3` ping/pong) that is light enough to hold thousands of
//! connections in one process.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

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
        tls: Option<&tokio_rustls::TlsConnector>,
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
                let name = rustls_pki_types::ServerName::try_from(
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                )
                .map_err(|e| ClientError::Url(format!("{url}: {e}")))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ClientError::Connect(authority.clone(), e.to_string()))?;
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

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A Socket.IO v4 client connection over WebSocket.
pub struct Socket {
    ws: Ws,
    /// The `session` event's data.
    pub session: Value,
}

/// One event received from the server.
pub enum Event {
    /// `signal`, raw JSON of its data (parse only what you need).
    Signal(String),
    Other(String, Value),
}

impl Socket {
    /// Connects, sends `auth`, and waits for `session`.
    pub async fn connect(url: &str, auth: &Value) -> Result<Self, ClientError> {
        let a = authority(url)?;
        let ws_url = format!("ws://{a}/socket.io/?EIO=4&transport=websocket");
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .map_err(|e| ClientError::Connect(a.clone(), e.to_string()))?;
        // Engine.IO open packet.
        match ws.next().await {
            Some(Ok(WsMessage::Text(t))) if t.starts_with('0') => {}
            other => {
                return Err(ClientError::Socket(format!(
                    "expected the Engine.IO open packet, got {other:?}"
                )));
            }
        }
        ws.send(WsMessage::Text(format!("40{auth}").into()))
            .await
            .map_err(|e| ClientError::Socket(e.to_string()))?;
        let mut s = Self {
            ws,
            session: Value::Null,
        };
        loop {
            let frame = s.frame().await?;
            if let Some(rest) = frame.strip_prefix("44") {
                let v: Value = serde_json::from_str(rest).unwrap_or(Value::Null);
                return Err(ClientError::Refused(
                    v.get("message")
                        .and_then(Value::as_str)
                        .unwrap_or(rest)
                        .to_string(),
                ));
            }
            if let Some(Event::Other(name, data)) = s.parse(&frame)
                && name == "session"
            {
                s.session = data;
                return Ok(s);
            }
        }
    }

    /// The next text frame that is not a ping (pings are answered).
    async fn frame(&mut self) -> Result<String, ClientError> {
        loop {
            match self.ws.next().await {
                Some(Ok(WsMessage::Text(t))) => {
                    if t.as_str() == "2" {
                        self.ws
                            .send(WsMessage::Text("3".into()))
                            .await
                            .map_err(|e| ClientError::Socket(e.to_string()))?;
                        continue;
                    }
                    return Ok(t.to_string());
                }
                Some(Ok(WsMessage::Close(_))) | None => {
                    return Err(ClientError::Socket("closed".into()));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(ClientError::Socket(e.to_string())),
            }
        }
    }

    fn parse(&self, frame: &str) -> Option<Event> {
        let body = frame.strip_prefix("42")?;
        if let Some(rest) = body.strip_prefix("[\"signal\",") {
            return Some(Event::Signal(
                rest.strip_suffix(']').unwrap_or(rest).to_string(),
            ));
        }
        let v: Value = serde_json::from_str(body).ok()?;
        let name = v.get(0)?.as_str()?.to_string();
        Some(Event::Other(name, v.get(1).cloned().unwrap_or(Value::Null)))
    }

    /// The next event.
    pub async fn next(&mut self) -> Result<Event, ClientError> {
        loop {
            let f = self.frame().await?;
            if let Some(e) = self.parse(&f) {
                return Ok(e);
            }
        }
    }

    /// Emits an event.
    pub async fn emit(&mut self, event: &str, data: &Value) -> Result<(), ClientError> {
        let frame = format!("42{}", serde_json::json!([event, data]));
        self.ws
            .send(WsMessage::Text(frame.into()))
            .await
            .map_err(|e| ClientError::Socket(e.to_string()))
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// The integer after `"key":` in a JSON text (fast path for counting signals).
pub fn json_u64(json: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let at = json.find(&pat)? + pat.len();
    let digits: String = json[at..]
        .chars()
        .skip_while(|c| *c == ' ')
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_numbers() {
        assert_eq!(
            authority("http://127.0.0.1:8080/").unwrap(),
            "127.0.0.1:8080"
        );
        assert!(authority("https://x").is_err());
        assert!(authority("http://x/y").is_err());
        assert_eq!(
            json_u64(
                r#"{"address":"a","version":42,"payload":{"t":7}}"#,
                "version"
            ),
            Some(42)
        );
        assert_eq!(json_u64(r#"{"t": 7}"#, "t"), Some(7));
        assert_eq!(json_u64(r#"{"x":1}"#, "t"), None);
    }
}
