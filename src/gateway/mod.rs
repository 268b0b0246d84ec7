//! The Socket.IO gateway: handshake, session, resume and replay, live delivery, acks.
//!
//! Thin: the connect middleware decides the identity ([`handshake`]); the connect handler sets up
//! a [`conn::Conn`] (register with the router first, then read bindings, cursors and heads, so
//! nothing appended meanwhile slips through), sends `session` and starts the replay.

pub mod acks;
pub mod conn;
pub mod handshake;

use crate::address::Address;
use crate::node::Services;
use crate::presence::Seen;
use crate::routing::Subscriber;
use conn::Conn;
use handshake::Identity;
use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{Extension, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Builds the Socket.IO layer for the node.
pub fn build(svc: Arc<Services>) -> (socketioxide::layer::SocketIoLayer, SocketIo) {
    let (layer, io) = SocketIo::builder()
        .max_buffer_size(256)
        // Clients send little (acks); a small read buffer keeps idle connections cheap.
        .ws_read_buffer_size(1024)
        .with_state(svc)
        .build_layer();
    io.ns("/", on_connect.with(authenticate));
    (layer, io)
}

/// Copies a Socket.IO request's URI and header values out of hyper's read buffer.
///
/// hyper parses headers as slices of its connection read buffer (16 KiB after the first read),
/// and socketioxide keeps every socket's request parts for the socket's lifetime, so without
/// this each idle connection pinned that whole buffer. Copying the few header bytes lets the
/// buffer go once the connection is upgraded (measured: see docs/benchmarks.md, `idle`).
pub async fn detach_request(req: axum::extract::Request) -> axum::extract::Request {
    if !req.uri().path().starts_with("/socket.io") {
        return req;
    }
    let (mut parts, body) = req.into_parts();
    let mut headers = axum::http::HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        if let Ok(v) = axum::http::HeaderValue::from_bytes(value.as_bytes()) {
            headers.append(name.clone(), v);
        }
    }
    parts.headers = headers;
    if let Ok(uri) = parts.uri.to_string().parse() {
        parts.uri = uri;
    }
    axum::extract::Request::from_parts(parts, body)
}

#[derive(Debug)]
struct Refused(String);
impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

async fn authenticate(
    s: SocketRef,
    TryData(auth): TryData<Value>,
    State(svc): State<Arc<Services>>,
) -> Result<(), Refused> {
    let refuse = |m: String| {
        svc.metrics.refused.increment(1);
        Err(Refused(m))
    };
    if svc.draining.load(Ordering::SeqCst) {
        return refuse("the node is shutting down; connect to another node".into());
    }
    if svc.connections.load(Ordering::SeqCst) >= svc.config.max_connections {
        return refuse(format!(
            "too many connections on this node (limit {})",
            svc.config.max_connections
        ));
    }
    let auth = match auth {
        Ok(v) => v,
        Err(e) => return refuse(format!("auth must be a JSON object: {e}")),
    };
    match handshake::identify(Some(&auth), &svc.credentials) {
        Ok(id) => {
            s.extensions.insert(id);
            Ok(())
        }
        Err(e) => refuse(e.to_string()),
    }
}

async fn on_connect(
    s: SocketRef,
    Extension(id): Extension<Identity>,
    State(svc): State<Arc<Services>>,
) {
    svc.connections.fetch_add(1, Ordering::SeqCst);
    svc.metrics.connections.increment(1.0);
    svc.metrics.connects.increment(1);
    if let Err(e) = setup(&s, &id, &svc).await {
        tracing::warn!(error = %e, client = %id.client, "connection setup failed");
        let _ = s.emit("error", &json!({ "message": format!("setup failed: {e}") }));
        s.clone().disconnect().ok();
    }
}

async fn setup(s: &SocketRef, id: &Identity, svc: &Arc<Services>) -> Result<(), String> {
    let own = Address::of_client(&id.client);
    let stored = if id.resumed {
        svc.cursors
            .get(&id.client)
            .await
            .map_err(|e| e.to_string())?
    } else {
        Default::default()
    };
    let start = |a: &Address, default: u64| {
        id.cursors
            .get(a)
            .or_else(|| stored.get(a))
            .copied()
            .unwrap_or(default)
    };
    let conn = Conn::new(svc.clone(), s.clone(), id.client.clone(), start(&own, 0));
    let sub: Arc<dyn Subscriber> = conn.clone();
    // Register before reading bindings and heads: whatever changes meanwhile reaches the conn.
    svc.router.register(sub.clone());
    svc.router.subscribe(&sub, std::slice::from_ref(&own));
    {
        let (c1, svc2) = (conn.clone(), svc.clone());
        s.on_disconnect(async move || cleanup(&c1, &svc2).await);
    }
    if !s.connected() {
        // Gone while we read its cursors: the disconnect handler came too late to run.
        cleanup(&conn, svc).await;
        return Ok(());
    }
    {
        let (c, svc2) = (conn.clone(), svc.clone());
        s.on("ack", async move |s: SocketRef, TryData(data): TryData<Value>| {
            match parse_ack(data.ok()) {
                Ok((address, version)) if c.receives(&address) => {
                    svc2.metrics.acks.increment(1);
                    svc2.acks.ack(c.client().clone(), address, version);
                }
                Ok((address, _)) => {
                    let _ = s.emit("error", &json!({ "message": format!("ack for {address}, which this client does not receive") }));
                }
                Err(m) => {
                    let _ = s.emit("error", &json!({ "message": m }));
                }
            }
        });
    }
    let bindings = svc
        .topology
        .get(&id.client)
        .await
        .map_err(|e| e.to_string())?;
    let added = conn.add_initial(
        bindings
            .iter()
            .map(|b| (b.address.clone(), start(&b.address, b.since)))
            .collect(),
    );
    svc.router.subscribe(&sub, &added);
    let addrs: Vec<Address> = conn.cursors().into_iter().map(|(a, _)| a).collect();
    // The other nodes forward these addresses here from now on; what they appended before is
    // below the heads read next, so the replay has it.
    svc.peers.want(&addrs).await;
    let heads = svc.mailbox.heads(&addrs).await.map_err(|e| e.to_string())?;
    conn.raise_known(
        &addrs
            .iter()
            .cloned()
            .zip(heads.iter().map(|h| h.head))
            .collect::<Vec<_>>(),
    );
    let seen = Seen {
        node: svc.node_id.clone(),
        connection: conn.id().to_string(),
        since: crate::mailbox::now_ms(),
    };
    svc.presence
        .connected(&id.client, seen)
        .await
        .map_err(|e| e.to_string())?;
    let bound: Vec<&Address> = addrs.iter().filter(|a| **a != own).collect();
    let mut session = json!({
        "clientId": id.client,
        "resumeToken": svc.credentials.resume_token(&id.client),
        "node": svc.node_id,
        "addresses": bound,
        "resumed": id.resumed,
    });
    if let Some(user) = &id.user {
        session["user"] = json!(user);
    }
    conn.start(&session);
    Ok(())
}

async fn cleanup(conn: &Arc<Conn>, svc: &Arc<Services>) {
    let Some(addrs) = conn.close() else { return };
    svc.router.unregister(&**conn, &addrs);
    svc.connections.fetch_sub(1, Ordering::SeqCst);
    svc.metrics.connections.decrement(1.0);
    if let Err(e) = svc
        .presence
        .disconnected(conn.client(), &svc.node_id, conn.id())
        .await
    {
        tracing::warn!(error = %e, "presence update failed");
    }
}

fn parse_ack(data: Option<Value>) -> Result<(Address, u64), String> {
    let bad = || "ack needs { address: string, version: non-negative integer }".to_string();
    let v = data.ok_or_else(bad)?;
    let address = v.get("address").and_then(Value::as_str).ok_or_else(bad)?;
    let version = v.get("version").and_then(Value::as_u64).ok_or_else(bad)?;
    let address = Address::parse(address).map_err(|e| e.to_string())?;
    Ok((address, version))
}
