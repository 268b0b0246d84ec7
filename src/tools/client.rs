//! A Socket.IO v4 client over a WebSocket for the tools (Engine.IO 4 frames: `0` open, `40`
//! connect, `42[...]` events, `2`/`3` ping/pong), light enough to hold thousands of connections
//! in one process; the HTTP client is the crate's own ([`signalpost::peers::client`]).

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
pub use signalpost::peers::client::{ClientError, Http, authority};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

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

    /// Sends an event: `42["name",data]`, `data` being JSON text.
    pub async fn emit(&mut self, name: &str, data: &str) -> Result<(), ClientError> {
        self.ws
            .send(WsMessage::Text(format!("42[\"{name}\",{data}]").into()))
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
