//! `POST /server/kick`: closes every connection of a client or a user, on every node, with
//! `kicked` `{reason}`; with `revoke`, the client's resume tokens stop working.

use super::Api;
use super::ApiError;
use crate::address::ClientId;
use crate::gateway::registry::Target;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use serde_json::{Value, json};
use std::sync::Arc;

/// Kicks here; with `revoke`, revokes the clients kicked (and a target client even when it is
/// not connected). Returns the connections closed.
pub async fn local(
    svc: &Api,
    target: &Target,
    reason: &str,
    revoke: bool,
) -> Result<usize, ApiError> {
    let unavailable = |e: crate::topology::TopologyError| ApiError::Unavailable(e.to_string());
    if revoke && let Target::Client(c) = target {
        // Before closing: a reconnect racing the kick must already be refused.
        svc.gw.topology.revoke(c).await.map_err(unavailable)?;
    }
    let kicked = svc.gw.gate.registry.kick(target, reason);
    if revoke && !matches!(target, Target::Client(_)) {
        for c in &kicked {
            svc.gw.topology.revoke(c).await.map_err(unavailable)?;
        }
    }
    Ok(kicked.len())
}

/// `POST /server/kick` `{client | user, reason?, revoke?}` → `{kicked}`.
pub async fn kick(State(svc): State<Arc<Api>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    let Some(o) = v.as_object() else {
        return Err(ApiError::BadRequest("the body must be an object".into()));
    };
    if let Some(k) = o
        .keys()
        .find(|k| !["client", "user", "reason", "revoke"].contains(&k.as_str()))
    {
        return Err(ApiError::BadRequest(format!("unknown field {k:?}")));
    }
    let target = match (o.get("client"), o.get("user")) {
        (Some(Value::String(c)), None) => {
            Target::Client(ClientId::parse(c).map_err(|e| ApiError::BadRequest(e.to_string()))?)
        }
        (None, Some(Value::String(u))) if !u.is_empty() => Target::User(u.clone()),
        _ => {
            return Err(ApiError::BadRequest(
                "give either client (a client id) or user (a JWT sub), as a string".into(),
            ));
        }
    };
    let reason = match o.get("reason") {
        None => "kicked by the server".to_string(),
        Some(Value::String(r)) if r.len() <= 200 => r.clone(),
        _ => {
            return Err(ApiError::BadRequest(
                "reason must be a string of at most 200 bytes".into(),
            ));
        }
    };
    let revoke = match o.get("revoke") {
        None => false,
        Some(Value::Bool(b)) => *b,
        _ => return Err(ApiError::BadRequest("revoke must be true or false".into())),
    };
    let mut kicked = local(&svc, &target, &reason, revoke).await?;
    let body = json!({ "target": target, "reason": reason, "revoke": revoke }).to_string();
    let mut failed = Vec::new();
    for (node, answer) in svc.gw.peers.ask_all("/internal/kick", body.into()).await {
        match answer.map(|b| serde_json::from_slice::<Value>(&b)) {
            Ok(Ok(v)) => kicked += v["kicked"].as_u64().unwrap_or(0) as usize,
            Ok(Err(e)) => failed.push(format!("{node}: {e}")),
            Err(e) => failed.push(format!("{node}: {e}")),
        }
    }
    let mut out = json!({ "kicked": kicked });
    if !failed.is_empty() {
        out["failed"] = json!(failed);
    }
    Ok(Json(out))
}
