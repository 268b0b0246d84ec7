//! `max_connections_per_user`: when a user holds more connections than the quota anywhere in
//! the cluster, the oldest are kicked (`kicked` `{reason: "quota"}`), as MiniPush did.

use super::Gateway;
use super::conn::Conn;
use super::registry::{Held, Target};
use crate::routing::Subscriber;
use std::sync::Arc;

/// Kicks the user's oldest connections past the quota, counting every node's (asked over the
/// node-to-node link). Run after a connection of the user is set up.
pub async fn enforce(svc: Arc<Gateway>, conn: Arc<Conn>) {
    let Some(user) = conn.user() else { return };
    let quota = svc.config.limits.max_connections_per_user;
    let mut all: Vec<(Option<String>, Held)> = svc
        .gate
        .registry
        .of_user(user)
        .into_iter()
        .map(|h| (None, h))
        .collect();
    let body = serde_json::json!({ "user": user }).to_string();
    for (node, answer) in svc
        .peers
        .ask_all("/internal/connections", body.into())
        .await
    {
        match answer
            .and_then(|b| serde_json::from_slice::<Vec<Held>>(&b).map_err(|e| e.to_string()))
        {
            Ok(held) => all.extend(held.into_iter().map(|h| (Some(node.clone()), h))),
            Err(e) => {
                tracing::warn!(peer = %node, error = %e, "quota: could not count a user's connections")
            }
        }
    }
    if all.len() <= quota {
        return;
    }
    all.sort_by(|a, b| (a.1.since, &a.1.connection).cmp(&(b.1.since, &b.1.connection)));
    let excess = all.len() - quota;
    for (node, held) in all
        .into_iter()
        .filter(|(_, h)| h.connection != conn.id())
        .take(excess)
    {
        let target = Target::Connection(held.connection);
        match node {
            None => {
                svc.gate.registry.kick(&target, "quota");
            }
            Some(node) => {
                let body = serde_json::json!({ "target": target, "reason": "quota" }).to_string();
                if let Err(e) = svc.peers.ask(&node, "/internal/kick", body.into()).await {
                    tracing::warn!(peer = %node, error = %e, "quota: could not kick on a peer");
                }
            }
        }
    }
}
