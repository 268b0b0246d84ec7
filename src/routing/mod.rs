//! Routing: from appended messages to the connections that want them, and from binding changes
//! to the connections of the client concerned. [`Fanout`] is where the processor hands what it
//! applied; this node's [`Router`] is one, the other nodes ([`crate::peers`]) are another. Delivery
//! flows one way: the processor → each fan-out → subscribers; nothing here calls back.
//!
//! The router only knows [`Subscriber`]s; what a connection does with a message (deliver it now,
//! or note that it must catch up from the mailbox) is the gateway's business. Delivery is called
//! once per appended batch, in version order per address, so subscribers see versions in order
//! unless they fall behind (which they detect and repair from the mailbox).

use crate::address::{Address, ClientId};
use crate::mailbox::Message;
use crate::presence::Change;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Where applied operations go: appended messages and binding changes, and the answers of
/// `?wait=true` operations published on another node.
pub trait Fanout: Send + Sync + 'static {
    /// Messages appended at `appended_us` (wall clock, µs), in append order (version order per
    /// address).
    fn deliver(&self, messages: &[Arc<Message>], appended_us: u64) -> Offered;
    /// New bindings of `client`: `(address, since)`.
    fn bound(&self, client: &ClientId, bindings: &[(Address, u64)]);
    /// Removed bindings of `client`: `(address, head)`.
    fn unbound(&self, client: &ClientId, removed: &[(Address, u64)]);
    /// A client became or stopped being a member of a presence address: to its members.
    fn presence(&self, change: &Change);
    /// Takes the answer of a `?wait=true` operation when its publisher waits on the node `node`
    /// and this fan-out reaches that node (`outcome` serializes the answer); false otherwise.
    fn reply(
        &self,
        _node: &str,
        _ticket: &str,
        _outcome: &dyn Fn() -> Option<Box<serde_json::value::RawValue>>,
    ) -> bool {
        false
    }
}

/// Where answers of `?wait=true` operations that another node applied are handed (the queue
/// whose publishers wait): the answer as the ingest side serialized it.
pub trait Replies: Send + Sync + 'static {
    fn resolve_wire(&self, ticket: &str, outcome: &serde_json::value::RawValue);
}

/// Something that receives messages of the addresses it subscribed to.
pub trait Subscriber: Send + Sync + 'static {
    /// A unique id of this subscriber (a connection id).
    fn id(&self) -> &str;
    fn client(&self) -> &ClientId;
    /// Messages of one address, in increasing version order.
    fn offer(&self, address: &Address, messages: &[Arc<Message>]);
    /// The client was bound to `address` at head `since`.
    fn bound(&self, address: &Address, since: u64);
    /// The client was unbound from `address`, whose head is `head`.
    fn unbound(&self, address: &Address, head: u64);
    /// `address` has at least `head` (read from the mailbox): catch up to it if behind.
    fn known(&self, _address: &Address, _head: u64) {}
    /// Membership of a presence address this subscriber receives changed.
    fn presence(&self, _change: &Change) {}
}

type Subs = Vec<Arc<dyn Subscriber>>;

/// What a delivery handed to local connections.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Offered {
    /// Message × connection offers.
    pub deliveries: u64,
    /// Messages that had at least one local connection.
    pub messages: usize,
}

/// The local routing table. Readers (delivery) take a shared lock; connects, disconnects and
/// binding changes take it exclusively, briefly.
#[derive(Default)]
pub struct Router {
    by_address: RwLock<HashMap<Address, Subs>>,
    by_client: RwLock<HashMap<ClientId, Subs>>,
}

impl Router {
    /// Registers a connection of its client (so binding changes reach it).
    pub fn register(&self, sub: Arc<dyn Subscriber>) {
        let mut m = self.by_client.write().unwrap_or_else(|p| p.into_inner());
        m.entry(sub.client().clone()).or_default().push(sub);
    }

    /// Removes a connection from everything.
    pub fn unregister(&self, sub: &dyn Subscriber, addresses: &[Address]) {
        self.unsubscribe(sub.id(), addresses);
        let mut m = self.by_client.write().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = m.get_mut(sub.client()) {
            list.retain(|s| s.id() != sub.id());
            if list.is_empty() {
                m.remove(sub.client());
            }
        }
    }

    pub fn subscribe(&self, sub: &Arc<dyn Subscriber>, addresses: &[Address]) {
        let mut m = self.by_address.write().unwrap_or_else(|p| p.into_inner());
        for a in addresses {
            let list = m.entry(a.clone()).or_default();
            if !list.iter().any(|s| s.id() == sub.id()) {
                list.push(sub.clone());
            }
        }
    }

    pub fn unsubscribe(&self, id: &str, addresses: &[Address]) {
        let mut m = self.by_address.write().unwrap_or_else(|p| p.into_inner());
        for a in addresses {
            if let Some(list) = m.get_mut(a) {
                list.retain(|s| s.id() != id);
                if list.is_empty() {
                    m.remove(a);
                }
            }
        }
    }

    /// The local subscribers of an address: their clients and ids.
    pub fn subscribers(&self, address: &Address) -> Vec<(ClientId, String)> {
        self.by_address
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(address)
            .map(|l| {
                l.iter()
                    .map(|s| (s.client().clone(), s.id().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The addresses with at least one local subscriber.
    pub fn wanted(&self) -> Vec<Address> {
        self.by_address
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Tells the local subscribers of each address what its head is (they repair if behind).
    pub fn catch_up(&self, heads: &[(Address, u64)]) {
        let m = self.by_address.read().unwrap_or_else(|p| p.into_inner());
        for (a, h) in heads {
            for s in m.get(a).into_iter().flatten() {
                s.known(a, *h);
            }
        }
    }

    /// Hands messages (in append order) to the local subscribers of each address.
    pub fn deliver(&self, messages: &[Arc<Message>], _appended_us: u64) -> Offered {
        let m = self.by_address.read().unwrap_or_else(|p| p.into_inner());
        if m.is_empty() {
            return Offered::default();
        }
        // Group by address, keeping version order within each address.
        let mut groups: HashMap<&Address, Vec<Arc<Message>>> = HashMap::new();
        for msg in messages {
            if m.contains_key(&msg.address) {
                groups.entry(&msg.address).or_default().push(msg.clone());
            }
        }
        let mut offered = Offered::default();
        for (address, msgs) in groups {
            if let Some(subs) = m.get(address) {
                for s in subs {
                    s.offer(address, &msgs);
                }
                offered.deliveries += (subs.len() * msgs.len()) as u64;
                offered.messages += msgs.len();
            }
        }
        offered
    }

    /// Tells the client's local connections about new bindings.
    pub fn bound(&self, client: &ClientId, bindings: &[(Address, u64)]) {
        for s in self.connections_of(client) {
            for (a, since) in bindings {
                s.bound(a, *since);
            }
        }
    }

    /// Tells the client's local connections about removed bindings.
    pub fn unbound(&self, client: &ClientId, removed: &[(Address, u64)]) {
        for s in self.connections_of(client) {
            for (a, head) in removed {
                s.unbound(a, *head);
            }
        }
    }

    /// Tells the local subscribers of a presence address who joined or left.
    pub fn presence(&self, change: &Change) {
        let m = self.by_address.read().unwrap_or_else(|p| p.into_inner());
        for s in m.get(&change.address).into_iter().flatten() {
            s.presence(change);
        }
    }

    pub fn connections_of(&self, client: &ClientId) -> Subs {
        let m = self.by_client.read().unwrap_or_else(|p| p.into_inner());
        m.get(client).cloned().unwrap_or_default()
    }

    /// Number of addresses with at least one local subscriber.
    pub fn addresses(&self) -> usize {
        self.by_address
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Fanout for Router {
    fn deliver(&self, messages: &[Arc<Message>], appended_us: u64) -> Offered {
        Router::deliver(self, messages, appended_us)
    }
    fn bound(&self, client: &ClientId, bindings: &[(Address, u64)]) {
        Router::bound(self, client, bindings)
    }
    fn unbound(&self, client: &ClientId, removed: &[(Address, u64)]) {
        Router::unbound(self, client, removed)
    }
    fn presence(&self, change: &Change) {
        Router::presence(self, change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::MessageId;
    use serde_json::value::RawValue;
    use std::sync::Mutex;

    struct Probe {
        id: String,
        client: ClientId,
        got: Mutex<Vec<(String, u64)>>,
    }

    impl Subscriber for Probe {
        fn id(&self) -> &str {
            &self.id
        }
        fn client(&self) -> &ClientId {
            &self.client
        }
        fn offer(&self, address: &Address, messages: &[Arc<Message>]) {
            let mut g = self.got.lock().unwrap();
            g.extend(messages.iter().map(|m| (address.to_string(), m.version)));
        }
        fn bound(&self, address: &Address, since: u64) {
            self.got
                .lock()
                .unwrap()
                .push((format!("bound {address}"), since));
        }
        fn unbound(&self, address: &Address, head: u64) {
            self.got
                .lock()
                .unwrap()
                .push((format!("unbound {address}"), head));
        }
    }

    fn m(a: &Address, v: u64) -> Arc<Message> {
        let p = RawValue::from_string("1".into()).unwrap();
        Arc::new(Message::new(a.clone(), v, MessageId::generate(), 0, &p))
    }

    #[test]
    fn delivers_only_to_subscribers_in_order() {
        let r = Router::default();
        let (x, y) = (
            Address::parse("channel:x").unwrap(),
            Address::parse("channel:y").unwrap(),
        );
        let p1 = Arc::new(Probe {
            id: "1".into(),
            client: ClientId::parse("c1").unwrap(),
            got: Default::default(),
        });
        let p2 = Arc::new(Probe {
            id: "2".into(),
            client: ClientId::parse("c2").unwrap(),
            got: Default::default(),
        });
        let s1: Arc<dyn Subscriber> = p1.clone();
        let s2: Arc<dyn Subscriber> = p2.clone();
        r.register(s1.clone());
        r.register(s2.clone());
        r.subscribe(&s1, &[x.clone(), y.clone()]);
        r.subscribe(&s2, std::slice::from_ref(&y));
        let mut of_y = r.subscribers(&y);
        of_y.sort();
        assert_eq!(
            of_y,
            vec![
                (ClientId::parse("c1").unwrap(), "1".to_string()),
                (ClientId::parse("c2").unwrap(), "2".to_string())
            ]
        );
        let offered = r.deliver(&[m(&x, 1), m(&y, 1), m(&x, 2), m(&y, 2)], 0);
        assert_eq!(
            offered,
            Offered {
                deliveries: 6,
                messages: 4
            }
        );
        let g1 = p1.got.lock().unwrap().clone();
        let xs: Vec<u64> = g1
            .iter()
            .filter(|(a, _)| a == "channel:x")
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(xs, vec![1, 2]);
        assert_eq!(p2.got.lock().unwrap().len(), 2);
        r.bound(&ClientId::parse("c2").unwrap(), &[(x.clone(), 2)]);
        assert_eq!(
            p2.got.lock().unwrap().last().unwrap(),
            &("bound channel:x".to_string(), 2)
        );
        r.unregister(&*s1, &[x.clone(), y.clone()]);
        assert!(r.subscribers(&x).is_empty());
        assert_eq!(r.deliver(&[m(&x, 3)], 0), Offered::default());
        assert_eq!(r.addresses(), 1);
    }
}
