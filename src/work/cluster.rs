//! What the dispatchers of a cluster tell each other. A work address is dealt out by one node at
//! a time, the one whose consumer owns its shard (its Kafka partition), but its takers are
//! connected anywhere:
//! - a taker's node tells every node when a connection starts or stops taking ([`Frame::Taker`]),
//!   so whichever node owns the shard now, or next, knows every taker;
//! - the dealing node hands a message to a connection on another node with [`Frame::Give`], takes
//!   it back on a timeout with [`Frame::Revoke`], and hears of its end with [`Frame::Ack`] (from
//!   the holder's node, which checked that the client holds it) or [`Frame::Gone`] (the
//!   connection was closed before the message reached it);
//! - the truth of what is held is where the connections are: each node keeps what its own
//!   connections hold and from which dealer ([`Holding`]). A node that starts dealing an address
//!   asks every node for it (`POST /internal/work/held`, [`Holder`]) and becomes their dealer
//!   (their acks go to it) before it deals anything, so a message held when the shard moved is
//!   not given to a second client.
//!
//! The frames travel in order over the peers' link ([`crate::peers`]); the dispatcher never calls
//! the peers itself: it writes [`Out`] to a channel that the node forwards.

use crate::address::{Address, ClientId};
use crate::mailbox::Message;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// A frame between dispatchers (carried in the peers' `Deliver::Work`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Frame {
    /// A connection of the sender started (`joined`) or stopped taking work of `address`.
    Taker {
        address: Address,
        client: ClientId,
        conn: String,
        #[serde(default)]
        weight: u32,
        joined: bool,
    },
    /// The sender deals `version` of `address` to the receiver's connection `conn`.
    Give {
        address: Address,
        conn: String,
        version: u64,
        signal: Box<RawValue>,
    },
    /// The sender took `version` back from `conn` (its ack timed out): an ack is refused now.
    Revoke {
        address: Address,
        conn: String,
        version: u64,
    },
    /// `client`, connected to the sender, acked `version` it held.
    Ack {
        address: Address,
        client: ClientId,
        version: u64,
    },
    /// `conn` is not connected to the sender (any more): what it was given goes to another.
    Gone { address: Address, conn: String },
}

/// A version a connection holds, as `POST /internal/work/held` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub version: u64,
    pub client: ClientId,
    pub conn: String,
    /// The node the connection is on (filled in by the asker).
    #[serde(default)]
    pub node: String,
    /// The client acked it; its dealer may not have heard (it went meanwhile): done.
    #[serde(default)]
    pub acked: bool,
}

/// `POST /internal/work/held`: what the receiver's connections hold of `address`; with `adopt`,
/// their acks go to the sender from now on (it deals the address now).
#[derive(Debug, Serialize, Deserialize)]
pub struct HeldRequest {
    pub address: Address,
    #[serde(default)]
    pub adopt: bool,
}

/// What the dispatcher asks of the node's link to the other nodes.
pub enum Out {
    /// A frame to one node.
    To(String, Frame),
    /// A frame to every node linked.
    All(Frame),
    /// Ask every other live node what its connections hold of `address`.
    Held {
        request: HeldRequest,
        answer: oneshot::Sender<Result<Vec<Holder>, String>>,
    },
}

/// The dispatcher's place in a cluster.
#[derive(Clone)]
pub struct Link {
    /// Whether this node deals `address` now (its consumer owns the address's shard).
    pub owned: crate::ingest::Owned,
    pub out: mpsc::UnboundedSender<Out>,
}

/// A version one of this node's connections holds.
pub(super) struct Holding {
    pub conn: String,
    pub client: ClientId,
    /// The node that deals it (where its ack goes).
    pub from: String,
    /// Past this the dealer has taken it back (a revoke may be lost): forgotten.
    pub deadline: Instant,
    /// Acked, and the ack sent to the dealer: kept till the deadline for a dealer that takes
    /// over ([`Holder::acked`]).
    pub acked: bool,
}

/// A connection on another node, as the dealing node sees it.
pub(super) struct RemoteConn {
    pub id: String,
    pub client: ClientId,
    pub node: String,
    pub out: mpsc::UnboundedSender<Out>,
}

impl super::Worker for RemoteConn {
    fn id(&self) -> &str {
        &self.id
    }
    fn client(&self) -> &ClientId {
        &self.client
    }
    /// Sent to its node; if the connection is gone there, [`Frame::Gone`] comes back.
    fn give(&self, address: &Address, message: &Arc<Message>) -> bool {
        self.out
            .send(Out::To(
                self.node.clone(),
                Frame::Give {
                    address: address.clone(),
                    conn: self.id.clone(),
                    version: message.version,
                    signal: message.signal.clone(),
                },
            ))
            .is_ok()
    }
    fn node(&self) -> Option<&str> {
        Some(&self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let a = Address::parse("work:w").unwrap();
        let c = ClientId::parse("c").unwrap();
        let frames = [
            Frame::Taker {
                address: a.clone(),
                client: c.clone(),
                conn: "k".into(),
                weight: 3,
                joined: true,
            },
            Frame::Give {
                address: a.clone(),
                conn: "k".into(),
                version: 7,
                signal: RawValue::from_string(r#"{"version":7}"#.into()).unwrap(),
            },
            Frame::Ack {
                address: a.clone(),
                client: c,
                version: 7,
            },
        ];
        for f in frames {
            let back: Frame = serde_json::from_slice(&serde_json::to_vec(&f).unwrap()).unwrap();
            match (f, back) {
                (Frame::Taker { weight: w1, .. }, Frame::Taker { weight: w2, .. }) => {
                    assert_eq!(w1, w2)
                }
                (Frame::Give { signal: s1, .. }, Frame::Give { signal: s2, .. }) => {
                    assert_eq!(s1.get(), s2.get())
                }
                (Frame::Ack { version: v1, .. }, Frame::Ack { version: v2, .. }) => {
                    assert_eq!(v1, v2)
                }
                (f, b) => panic!("{f:?} came back as {b:?}"),
            }
        }
    }
}
