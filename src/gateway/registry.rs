//! The connections open on this node, by client and by user: what a kick or a per-user quota
//! needs to find (the router indexes connections by address, for delivery).

use super::conn::Conn;
use crate::address::ClientId;
use crate::routing::Subscriber;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One connection as a kick or a quota sees it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Held {
    pub connection: String,
    pub client: ClientId,
    /// When it connected (ms since epoch).
    pub since: u64,
}

impl Held {
    fn of(c: &Conn) -> Self {
        Held {
            connection: c.id().to_string(),
            client: c.client().clone(),
            since: c.since(),
        }
    }
}

/// Whom a kick is for.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Client(ClientId),
    User(String),
    Connection(String),
}

/// Connections by client and by user; a short lock per connect, disconnect and kick.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_client: HashMap<ClientId, Vec<Arc<Conn>>>,
    by_user: HashMap<String, Vec<Arc<Conn>>>,
}

fn remove_from<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Vec<Arc<Conn>>>, key: &K, id: &str) {
    if let Some(list) = map.get_mut(key) {
        list.retain(|c| c.id() != id);
        if list.is_empty() {
            map.remove(key);
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add(&self, conn: &Arc<Conn>) {
        let mut i = self.lock();
        i.by_client
            .entry(conn.client().clone())
            .or_default()
            .push(conn.clone());
        if let Some(u) = conn.user() {
            i.by_user
                .entry(u.to_string())
                .or_default()
                .push(conn.clone());
        }
    }

    pub fn remove(&self, conn: &Conn) {
        let mut i = self.lock();
        remove_from(&mut i.by_client, conn.client(), conn.id());
        if let Some(u) = conn.user() {
            remove_from(&mut i.by_user, &u.to_string(), conn.id());
        }
    }

    fn find(&self, target: &Target) -> Vec<Arc<Conn>> {
        let i = self.lock();
        match target {
            Target::Client(c) => i.by_client.get(c).cloned().unwrap_or_default(),
            Target::User(u) => i.by_user.get(u).cloned().unwrap_or_default(),
            Target::Connection(id) => i
                .by_client
                .values()
                .flatten()
                .filter(|c| c.id() == id)
                .cloned()
                .collect(),
        }
    }

    /// Sends `kicked` to every connection of `target` here and closes it; returns the clients
    /// of the connections closed (one entry per connection).
    pub fn kick(&self, target: &Target, reason: &str) -> Vec<ClientId> {
        let conns = self.find(target);
        conns
            .iter()
            .filter(|c| c.kick(reason))
            .map(|c| c.client().clone())
            .collect()
    }

    /// Every connection on this node (a snapshot).
    pub fn all(&self) -> Vec<Arc<Conn>> {
        self.lock().by_client.values().flatten().cloned().collect()
    }

    /// The connections named by client and connection id that are open on this node.
    pub fn held(&self, named: &[(ClientId, String)]) -> Vec<Held> {
        let i = self.lock();
        named
            .iter()
            .filter_map(|(client, id)| {
                let c = i.by_client.get(client)?.iter().find(|c| c.id() == id)?;
                Some(Held::of(c))
            })
            .collect()
    }

    /// A user's connections on this node.
    pub fn of_user(&self, user: &str) -> Vec<Held> {
        self.lock()
            .by_user
            .get(user)
            .map(|l| l.iter().map(|c| Held::of(c)).collect())
            .unwrap_or_default()
    }
}
