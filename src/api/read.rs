//! The read side: mailbox, client, presence, nodes, health.

use super::Api;
use super::ApiError;
use crate::address::{Address, ClientId, Kind};
use crate::gateway::registry::Held;
use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Most messages one mailbox read returns.
const MAX_READ: usize = 1000;
/// Most clients one presence answer lists.
const MAX_PRESENCE: usize = 10_000;

fn path(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(s)| s)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

fn address(s: &str) -> Result<Address, ApiError> {
    Address::parse(s).map_err(|e| ApiError::BadRequest(e.to_string()))
}

#[derive(Deserialize)]
pub struct ReadQuery {
    after: Option<u64>,
    limit: Option<usize>,
    /// By append time (ms since the epoch): messages stamped at or after `since`, and at or
    /// before `until`.
    since: Option<u64>,
    until: Option<u64>,
}

/// `GET /server/mailbox/<address>?after=&limit=`, or `?since=&until=&limit=` by append time
pub async fn mailbox(
    State(svc): State<Arc<Api>>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let a = address(&path(p)?)?;
    let q = query(q)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_READ {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_READ}"
        )));
    }
    let by_time = q.since.is_some() || q.until.is_some();
    if by_time && q.after.is_some() {
        return Err(ApiError::BadRequest(
            "give after (a version) or since/until (append times), not both".into(),
        ));
    }
    let mailbox = &*svc.gw.mailbox;
    let page = if by_time {
        crate::mailbox::history::between(mailbox, &a, q.since, q.until, limit).await
    } else {
        mailbox.read(&a, q.after.unwrap_or(0), limit).await
    }
    .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    if a.kind() == Kind::Work {
        // Each message with its state: waiting, assigned (to a client) or done.
        let versions: Vec<u64> = page.messages.iter().map(|m| m.version).collect();
        let states = svc
            .gw
            .work
            .states(&a, &versions)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let mut messages = Vec::with_capacity(versions.len());
        for (m, st) in page.messages.iter().zip(states) {
            let mut v: Value = serde_json::from_str(m.signal.get())
                .map_err(|e| ApiError::Unavailable(format!("a stored message: {e}")))?;
            if let (Some(o), Value::Object(f)) = (v.as_object_mut(), st.fields()) {
                o.extend(f);
            }
            messages.push(v);
        }
        return Ok(Json(json!({
            "address": a,
            "head": page.head.head,
            "low": page.head.low,
            "messages": messages,
        }))
        .into_response());
    }
    // Serialized straight from the stored text (never parsed into a value again), so a read
    // cannot fail on what was stored.
    #[derive(serde::Serialize)]
    struct Out<'a> {
        address: &'a Address,
        head: u64,
        low: u64,
        messages: Vec<&'a RawValue>,
    }
    Ok(Json(Out {
        address: &a,
        head: page.head.head,
        low: page.head.low,
        messages: page.messages.iter().map(|m| &*m.signal).collect(),
    })
    .into_response())
}

/// `GET /server/clients/<id>/read/<address>` → `{address, head, unread, read: [[from, to], ..],
/// bytes}`: what the client marked read (`read`) among the versions kept, as ranges; `unread`
/// counts the kept versions not marked; `bytes` (an extra) is what the marks take stored.
pub async fn read_state(
    State(svc): State<Arc<Api>>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (client, a) = p
        .map(|Path(x)| x)
        .map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let client = ClientId::parse(&client).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let a = address(&a)?;
    let unavailable = |e: &dyn std::fmt::Display| ApiError::Unavailable(e.to_string());
    let head = svc
        .gw
        .mailbox
        .heads(std::slice::from_ref(&a))
        .await
        .map_err(|e| unavailable(&e))?[0];
    let (marks, bytes) = svc
        .gw
        .reads
        .marks(&client, &a)
        .await
        .map_err(|e| unavailable(&e))?;
    let mut ranges: Vec<[u64; 2]> = Vec::new();
    let mut read = 0u64;
    for v in marks.iter().filter(|v| *v >= head.low && *v <= head.head) {
        read += 1;
        match ranges.last_mut() {
            Some(r) if r[1] + 1 == v => r[1] = v,
            _ => ranges.push([v, v]),
        }
    }
    let kept = (head.head + 1).saturating_sub(head.low);
    Ok(Json(json!({
        "address": a,
        "head": head.head,
        "unread": kept - read,
        "read": ranges,
        "bytes": bytes,
    })))
}

/// `GET /server/clients/<id>`
pub async fn client(
    State(svc): State<Arc<Api>>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = path(p)?;
    let client = ClientId::parse(&id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let unavailable = |e: &dyn std::fmt::Display| ApiError::Unavailable(e.to_string());
    let bindings = svc
        .gw
        .topology
        .get(&client)
        .await
        .map_err(|e| unavailable(&e))?;
    let cursors: BTreeMap<String, u64> = svc
        .gw
        .cursors
        .get(&client)
        .await
        .map_err(|e| unavailable(&e))?
        .into_iter()
        .map(|(a, v)| (a.to_string(), v))
        .collect();
    let seen = svc
        .gw
        .presence
        .lookup(std::slice::from_ref(&client))
        .await
        .map_err(|e| unavailable(&e))?
        .remove(0);
    let mut out = json!({
        "clientId": client,
        "addresses": bindings.iter().map(|b| &b.address).collect::<Vec<_>>(),
        "cursors": cursors,
        "connected": !seen.is_empty(),
        "connections": seen,
    });
    if let Some(s) = seen.first() {
        out["node"] = json!(s.node);
    }
    Ok(Json(out))
}

/// `GET /server/presence/<address>`: the clients bound to it (for a `client:` address, the
/// client itself) that are connected now, and where. For a `presence:` address: its members
/// (`?after=<client>` for the next page).
pub async fn presence(
    State(svc): State<Arc<Api>>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let a = address(&path(p)?)?;
    let q = query(q)?;
    let unavailable = |e: &dyn std::fmt::Display| ApiError::Unavailable(e.to_string());
    if a.kind() == Kind::Presence {
        let after = q
            .get("after")
            .map(|c| ClientId::parse(c))
            .transpose()
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let (members, truncated) =
            crate::presence::members_page(&*svc.gw.presence, &a, after.as_ref())
                .await
                .map_err(|e| unavailable(&e))?;
        return Ok(Json(
            json!({ "address": a, "members": members, "truncated": truncated }),
        ));
    }
    // Each node lists its own connections bound to the address (the ones its router delivers
    // the address to): nothing is stored per address, so nothing grows with clients that came
    // and went.
    let mut by_client: BTreeMap<ClientId, Vec<Value>> = BTreeMap::new();
    let mut add = |node: &str, held: Vec<Held>| {
        for h in held {
            by_client
                .entry(h.client)
                .or_default()
                .push(json!({ "node": node, "connection": h.connection, "since": h.since }));
        }
    };
    add(&svc.gw.node_id, bound_here(&svc, &a));
    let ask = json!({ "address": a }).to_string();
    let mut failed = Vec::new();
    for (node, answer) in svc.gw.peers.ask_all("/internal/bound", ask.into()).await {
        match answer
            .and_then(|b| serde_json::from_slice::<Vec<Held>>(&b).map_err(|e| e.to_string()))
        {
            Ok(held) => add(&node, held),
            Err(e) => failed.push(format!("{node}: {e}")),
        }
    }
    let truncated = by_client.len() > MAX_PRESENCE;
    let clients: Vec<Value> = by_client
        .into_iter()
        .take(MAX_PRESENCE)
        .map(|(c, connections)| {
            json!({ "clientId": c, "node": connections[0]["node"], "connections": connections })
        })
        .collect();
    let mut out = json!({ "address": a, "clients": clients, "truncated": truncated });
    if !failed.is_empty() {
        out["failed"] = json!(failed);
    }
    Ok(Json(out))
}

/// This node's connections that receive `address` (their client is bound to it, or is it), of
/// the first [`MAX_PRESENCE`] + 1 clients in client order (one more tells the asker to truncate).
pub fn bound_here(svc: &Api, address: &Address) -> Vec<Held> {
    let mut held = svc
        .gw
        .gate
        .registry
        .held(&svc.gw.router.subscribers(address));
    held.sort_by(|x, y| {
        (&x.client, x.since, &x.connection).cmp(&(&y.client, y.since, &y.connection))
    });
    let mut clients = 0;
    let mut last: Option<ClientId> = None;
    held.retain(|h| {
        if last.as_ref() != Some(&h.client) {
            clients += 1;
            last = Some(h.client.clone());
        }
        clients <= MAX_PRESENCE + 1
    });
    held
}

/// `GET /server/nodes`
pub async fn nodes(State(svc): State<Arc<Api>>) -> Result<Json<Value>, ApiError> {
    let nodes = svc
        .membership
        .nodes()
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let leader = nodes.iter().find(|n| n.leader).map(|n| n.id.clone());
    Ok(Json(
        json!({ "nodes": nodes, "leader": leader, "self": svc.gw.node_id }),
    ))
}

/// `GET /healthz`: 200 when every backend answers, else 503 naming what is down.
pub async fn healthz(State(svc): State<Arc<Api>>) -> impl IntoResponse {
    let mut backends = serde_json::Map::new();
    let mut ok = true;
    let mut put = |name: &str, r: Result<(), String>| {
        ok &= r.is_ok();
        backends.insert(
            name.into(),
            match r {
                Ok(()) => json!({ "status": "up", "kind": svc.backend_kind(name) }),
                Err(e) => json!({ "status": "down", "kind": svc.backend_kind(name), "error": e }),
            },
        );
    };
    put(
        "mailbox",
        svc.gw.mailbox.healthy().await.map_err(|e| e.to_string()),
    );
    put(
        "queue",
        match svc.queue.healthy().await {
            Ok(()) => svc.queue.ready(),
            Err(e) => Err(e),
        }
        .map_err(|e| e.to_string()),
    );
    put(
        "topology",
        svc.gw
            .topology
            .get(&ClientId::parse("healthz").expect("valid"))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    );
    put(
        "membership",
        svc.membership
            .nodes()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    );
    let draining = svc.gw.draining.load(std::sync::atomic::Ordering::SeqCst);
    let status = if draining {
        "draining"
    } else if ok {
        "ok"
    } else {
        "degraded"
    };
    let code = if ok && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": status,
        "node": svc.gw.node_id,
        "backend": svc.gw.config.backend,
        "connections": svc.gw.connections.open(),
        "backends": backends,
    });
    if let Some(p) = svc.queue.partitions() {
        body["partitions"] = json!(p);
    }
    // Readable from any origin: the page of one node shows every node's health.
    (
        code,
        [(axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")],
        Json(body),
    )
}
