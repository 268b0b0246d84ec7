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
//!   connections hold and from which dealer (`Holding`). A node that starts dealing an address
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
        /// When the sender's lease as a member ends (wall clock, ms since the Unix epoch; 0:
        /// unknown, from a version before leases): a `Give` that arrives later is answered
        /// [`Frame::Refused`], since the sender may have been paused past its session since,
        /// and the version dealt by another node meanwhile.
        #[serde(default)]
        lease_ms: u64,
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
    /// The sender refused a `Give` of `version` to its connection `conn`, which is still
    /// connected: the `Give` came after its sender's lease had ended. That version alone
    /// goes to another (or to `conn` again); the connection still takes work.
    Refused {
        address: Address,
        conn: String,
        version: u64,
    },
    /// The sender no longer deals `address` (its shard moved away, perhaps while the sender's
    /// question of `term` was on its way): that question names it the dealer no more, and a
    /// question of that term or before that arrives later names nobody.
    Released { address: Address, term: u64 },
}

/// A version a connection holds, as `POST /internal/work/held` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub version: u64,
    pub client: ClientId,
    pub conn: String,
    /// The node the connection is on (filled in by the asker when empty).
    #[serde(default)]
    pub node: String,
    /// The client acked it; its dealer may not have heard (it went meanwhile): done.
    #[serde(default)]
    pub acked: bool,
    /// Told by the node that dealt it (dealing now, or until the shard moved), not by the
    /// connection's node: its `Give` may not have arrived there yet. What the connection's
    /// node says of the same version wins.
    #[serde(default)]
    pub dealt: bool,
}

/// `POST /internal/work/held`: what the receiver's connections hold of `address`; with `adopt`,
/// their acks go to the sender from now on (it deals the address now).
#[derive(Debug, Serialize, Deserialize)]
pub struct HeldRequest {
    pub address: Address,
    #[serde(default)]
    pub adopt: bool,
    /// The sender's count of its questions with `adopt` (rising with each): its
    /// [`Frame::Released`] of this term undoes this question's adoption, also when that frame
    /// comes first.
    #[serde(default)]
    pub term: u64,
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
        answer: oneshot::Sender<Result<Vec<Holder>, super::WorkError>>,
    },
}

/// The dispatcher's place in a cluster.
#[derive(Clone)]
pub struct Link {
    /// Whether this node deals `address` now (its consumer owns the address's shard).
    pub owned: crate::ingest::Owned,
    /// This node's lease as a cluster member: a node whose lease does not hold (its ZooKeeper
    /// session lost, expiring, or unheard of since before a pause) deals nothing, and gives
    /// nothing it had dealt before, until it holds the lease again; then its queues are loaded
    /// again before it deals (others may have dealt them meanwhile).
    pub lease: crate::cluster::Lease,
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

/// When `lease` ends, on the wall clock (ms since the Unix epoch), for a frame: the other node
/// compares it with its own clock. Never 0 (which would mean "unknown"): a lease that does not
/// hold has ended already.
pub(super) fn lease_end_ms(lease: &crate::cluster::Lease) -> u64 {
    let left = lease.remaining();
    // A lease that never runs out (one node alone) ends "never".
    if left.as_millis() > u128::from(u32::MAX) {
        return u64::MAX;
    }
    (crate::clock::now_ms() + left.as_millis() as u64).max(1)
}

/// Whether a frame's lease end (see [`lease_end_ms`]) has passed here: 0 is from a version that
/// sends none.
pub(super) fn lease_ended(lease_ms: u64) -> bool {
    lease_ms != 0 && crate::clock::now_ms() > lease_ms
}

/// A connection on another node, as the dealing node sees it.
pub(super) struct RemoteConn {
    pub id: String,
    pub client: ClientId,
    pub node: String,
    pub out: mpsc::UnboundedSender<Out>,
    /// The dealing node's lease: its end goes with each `Give`.
    pub lease: crate::cluster::Lease,
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
                    lease_ms: lease_end_ms(&self.lease),
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
                lease_ms: 12,
            },
            Frame::Ack {
                address: a.clone(),
                client: c,
                version: 7,
            },
            Frame::Released {
                address: a.clone(),
                term: 9,
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
                (Frame::Released { term: t1, .. }, Frame::Released { term: t2, .. }) => {
                    assert_eq!(t1, t2)
                }
                (f, b) => panic!("{f:?} came back as {b:?}"),
            }
        }
    }

    mod handover {
        use super::super::super::tests::{FlakyReads, Recorder};
        use super::super::super::{Dispatcher, Settings, State, Stores};
        use super::super::*;
        use crate::address::MessageId;
        use crate::cluster::Lease;
        use crate::ingest::Owned;
        use crate::mailbox::{Mailbox, NewMessage};
        use crate::routing::Fanout;
        use crate::topology::embedded::EmbeddedTopology;
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        use std::time::Duration;
        use tokio::sync::RwLock;

        const HOUR: Duration = Duration::from_secs(3600);

        /// Carries one node's [`Out`] to the other node, as the peers would: frames in order,
        /// and only while `gate` is open; questions as they come (they go by HTTP), while
        /// `asks` is open.
        fn wire(
            from: &'static str,
            mut rx: mpsc::UnboundedReceiver<Out>,
            to: Arc<Dispatcher>,
            gate: Arc<RwLock<()>>,
            asks: Arc<RwLock<()>>,
            skip: Arc<AtomicBool>,
        ) -> tokio::task::JoinHandle<()> {
            tokio::spawn(async move {
                while let Some(out) = rx.recv().await {
                    match out {
                        Out::To(_, f) | Out::All(f) => {
                            let _open = gate.read().await;
                            to.receive(from, f)
                        }
                        Out::Held { answer, .. } if skip.load(SeqCst) => {
                            // `to` is not a member: asking every member does not ask it.
                            let _ = answer.send(Ok(Vec::new()));
                        }
                        Out::Held { request, answer } => {
                            let (to, asks) = (to.clone(), asks.clone());
                            tokio::spawn(async move {
                                let _open = asks.read().await;
                                let dealer = request.adopt.then_some((from, request.term));
                                let _ = answer.send(Ok(to.held_here(&request.address, dealer)));
                            });
                        }
                    }
                }
            })
        }

        async fn settle() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        /// Two nodes over one store: `a` deals `work:w` (its shard), where six messages wait,
        /// appended while nobody took work (so dealing them reads the store).
        struct Pair {
            _dir: tempfile::TempDir,
            mailbox: Arc<FlakyReads>,
            a: Arc<Dispatcher>,
            b: Arc<Dispatcher>,
            owned_a: Owned,
            owned_b: Owned,
            /// `a`'s lease as a cluster member (held for an hour to begin with).
            lease_a: Lease,
            /// While set, b takes a for gone (not a member): b's questions do not reach a.
            b_skips_a: Arc<AtomicBool>,
            /// `a`'s frames to `b` pass while this is not locked for writing.
            a_to_b: Arc<RwLock<()>>,
            /// `a`'s questions to `b` are answered while this is not locked for writing.
            a_asks_b: Arc<RwLock<()>>,
            tasks: crate::tasks::Tasks,
            w: Address,
        }

        impl Pair {
            async fn new() -> Self {
                let dir = tempfile::tempdir().unwrap();
                let mailbox = FlakyReads::open(&dir.path().join("m.redb"));
                let topo = Arc::new(EmbeddedTopology::open(&dir.path().join("t.redb")).unwrap());
                let stores = || Stores {
                    mailbox: mailbox.clone(),
                    topology: topo.clone(),
                    done: topo.clone(),
                };
                let settings = Settings {
                    ack_timeout: Duration::from_secs(60),
                    in_flight: 4,
                    retention_secs: 3600,
                    at_hand_bytes: crate::work::tests::AT_HAND_BYTES,
                };
                let (owned_a, owned_b) = (Owned::default(), Owned::default());
                owned_a.set(1, &[0]);
                owned_b.set(1, &[]);
                let (tx_a, rx_a) = mpsc::unbounded_channel();
                let (tx_b, rx_b) = mpsc::unbounded_channel();
                let lease_a = Lease::new();
                lease_a.renew(std::time::Instant::now(), HOUR);
                let link = |owned, lease: &Lease, out| {
                    Some(Link {
                        owned,
                        lease: lease.clone(),
                        out,
                    })
                };
                let a = Dispatcher::new(
                    "a",
                    stores(),
                    settings,
                    link(owned_a.clone(), &lease_a, tx_a),
                );
                let b = Dispatcher::new(
                    "b",
                    stores(),
                    settings,
                    link(owned_b.clone(), &Lease::forever(), tx_b),
                );
                let tasks = crate::tasks::Tasks::default();
                a.start(&tasks);
                b.start(&tasks);
                let (a_to_b, a_asks_b) = Default::default();
                let b_skips_a: Arc<AtomicBool> = Default::default();
                wire(
                    "a",
                    rx_a,
                    b.clone(),
                    Arc::clone(&a_to_b),
                    Arc::clone(&a_asks_b),
                    Default::default(),
                );
                wire(
                    "b",
                    rx_b,
                    a.clone(),
                    Default::default(),
                    Default::default(),
                    Arc::clone(&b_skips_a),
                );
                let w = Address::parse("work:w").unwrap();
                let appended = mailbox
                    .append(
                        (1..=6)
                            .map(|i| NewMessage {
                                address: w.clone(),
                                id: MessageId::parse(&format!("m{i}")).unwrap(),
                                payload: RawValue::from_string("1".into()).unwrap(),
                                new_id: false,
                            })
                            .collect(),
                    )
                    .await
                    .unwrap();
                let msgs: Vec<_> = appended.into_iter().map(|x| x.message).collect();
                a.deliver(&msgs, 0);
                Pair {
                    _dir: dir,
                    mailbox,
                    a,
                    b,
                    owned_a,
                    owned_b,
                    lease_a,
                    b_skips_a,
                    a_to_b,
                    a_asks_b,
                    tasks,
                    w,
                }
            }

            /// The shard moves from `a` to `b` (a's consumer is revoked before b's is assigned,
            /// and a's next sweep drops its queue's state).
            async fn shard_moves(&self) {
                self.owned_a.set(1, &[]);
                self.owned_b.set(1, &[0]);
                self.a.expire(std::time::Instant::now()).await;
            }

            /// a loads the queue (a status read); then b's consumer gets the shard and b loads
            /// it too, while a's consumer has not let the shard go: b's question is the last
            /// one answered on both nodes.
            async fn b_deals_too(&self) {
                let one = vec![State::Waiting];
                assert_eq!(self.a.states(&self.w, &[1]).await.unwrap(), one);
                self.owned_b.set(1, &[0]);
                assert_eq!(self.b.states(&self.w, &[1]).await.unwrap(), one);
            }

            /// A client of weight 1 connects to a and takes work (what it got, once settled).
            async fn client_on_a(&self) -> Arc<Recorder> {
                let m = Recorder::conn("m", "c1");
                self.a.join(&self.w, m.clone(), Some(1)).await;
                settle().await;
                m
            }

            /// A client of weight 1 connects to b and takes work: a deals it 1–4 (its in-flight
            /// cap) through b.
            async fn taker_on_b(&self) -> Arc<Recorder> {
                let k = Recorder::conn("k", "c2");
                self.b.join(&self.w, k.clone(), Some(1)).await;
                settle().await;
                assert_eq!(k.got(), [1, 2, 3, 4], "a deals to k on b");
                k
            }

            /// Every version of the six was given once, to one of `sinks`.
            fn each_given_once(&self, sinks: &[&Recorder]) {
                let mut all: Vec<u64> = sinks.iter().flat_map(|s| s.got()).collect();
                all.sort_unstable();
                assert_eq!(all, (1..=6).collect::<Vec<_>>(), "each once, to one client");
            }
        }

        /// Node a deals `work:w` to a connection on node b; the shard moves to b: b keeps
        /// what that connection holds (it goes to nobody else), learns what it acked, and deals
        /// the rest.
        #[tokio::test]
        async fn a_new_dealer_keeps_what_is_held_and_learns_what_was_acked() {
            let p = Pair::new().await;
            let (a, b, w) = (&p.a, &p.b, &p.w);
            // A connection on b takes work: a deals it 4 (its in-flight cap), b notes them.
            let k = Recorder::conn("k", "c1");
            b.join(w, k.clone(), Some(1)).await;
            settle().await;
            assert_eq!(k.got(), vec![1, 2, 3, 4]);
            assert_eq!(b.held_here(w, None).len(), 4);
            // It acks 1 (a hears it) and 2; the ack of 2 is lost on the way (a never hears it).
            b.ack(w, &k.client, 1).await.unwrap();
            settle().await;
            a.flush().await;
            assert_eq!(a.states(w, &[1]).await.unwrap(), vec![State::Done]);
            let k2 = ClientId::parse("c2").unwrap();
            assert!(b.ack(w, &k2, 2).await.is_err(), "only its holder acks it");
            // The shard moves to b before a hears of the ack of 2.
            b.holdings().get_mut(&(w.clone(), 2)).unwrap().acked = true;
            p.shard_moves().await;
            // A second connection on b, then b deals: 3 and 4 stay k's, 2 is done, 5 and 6 go.
            let j = Recorder::conn("j", "c2");
            b.join(w, j.clone(), Some(1)).await;
            settle().await;
            p.each_given_once(&[&k, &j]);
            assert!(
                j.got().iter().all(|v| *v >= 5),
                "held ones go to nobody else"
            );
            let st = b.states(w, &[1, 2, 3, 4]).await.unwrap();
            let held = State::Assigned(k.client.clone());
            assert_eq!(st, vec![State::Done, State::Done, held.clone(), held]);
            // k acks 3 and 4 to its new dealer, b; a (no longer dealing) reads the states by
            // asking b.
            b.ack(w, &k.client, 3).await.unwrap();
            b.ack(w, &k.client, 4).await.unwrap();
            assert!(b.ack(w, &k.client, 4).await.is_err(), "acked twice");
            b.flush().await;
            let st = a.states(w, &[1, 2, 3, 4]).await.unwrap();
            assert!(st.iter().all(|s| *s == State::Done), "{st:?}");
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// a's question, made while it still dealt `work:w` (a status read loading the queue),
        /// reaches b only after the shard moved and b asked its own: b would take a for the
        /// dealer again, and its connection's acks would go to a. a sees that the shard moved
        /// while it asked and releases its question: b deals again, and the acks reach it.
        #[tokio::test]
        async fn a_former_dealers_late_question_does_not_take_the_address_back() {
            let p = Pair::new().await;
            let (a, b, w) = (p.a.clone(), p.b.clone(), p.w.clone());
            let asks_wait = p.a_asks_b.clone().write_owned().await;
            let reading = tokio::spawn({
                let (a, w) = (a.clone(), w.clone());
                async move { a.states(&w, &[1]).await }
            });
            settle().await;
            p.shard_moves().await;
            let k = Recorder::conn("k", "c1");
            b.join(&w, k.clone(), Some(1)).await;
            settle().await;
            assert_eq!(k.got(), [1, 2, 3, 4], "b deals");
            // a's question arrives now; a's read is answered as on a node that does not deal.
            drop(asks_wait);
            assert_eq!(
                reading.await.unwrap().unwrap(),
                vec![State::Assigned(k.client.clone())]
            );
            settle().await;
            for v in 1..=4 {
                b.ack(&w, &k.client, v).await.unwrap();
            }
            settle().await;
            let st = b.states(&w, &[1, 2, 3, 4, 5, 6]).await.unwrap();
            let held = State::Assigned(k.client.clone());
            assert_eq!(&st[..4], vec![State::Done; 4], "the acks reached b");
            assert_eq!(&st[4..], [held.clone(), held], "and b dealt the rest");
            assert_eq!(k.got(), [1, 2, 3, 4, 5, 6]);
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// a's consumer has not heard that the shard moved (a *zombie*, paused past its
        /// session) when b, given the shard, asks its question: from then on a deals nothing,
        /// though it still takes the address for its own, so no version goes out twice.
        #[tokio::test]
        async fn a_dealer_named_no_more_deals_nothing_though_it_thinks_it_owns() {
            let p = Pair::new().await;
            let (a, b, w) = (&p.a, &p.b, &p.w);
            p.b_deals_too().await;
            // A client connects to a: both would deal it the six (a from its own copy).
            let m = Recorder::conn("m", "c1");
            a.join(w, m.clone(), Some(2)).await;
            settle().await;
            assert_eq!(m.got(), [1, 2, 3, 4, 5, 6], "each once, from b");
            // Its acks go to b.
            for v in 1..=6 {
                a.ack(w, &m.client, v).await.unwrap();
            }
            settle().await;
            let st = b.states(w, &[1, 2, 3, 4, 5, 6]).await.unwrap();
            assert!(st.iter().all(|s| *s == State::Done), "{st:?}");
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// The shard comes back to a after b dealt from it: b's release names a the dealer
        /// again, and a loads the queue again before it deals (its copy still had every version
        /// waiting), so what b gave goes to nobody else and its acks reach a.
        #[tokio::test]
        async fn a_dealer_given_the_address_back_loads_it_again_first() {
            let p = Pair::new().await;
            let (a, b, w) = (&p.a, &p.b, &p.w);
            p.b_deals_too().await;
            let m = p.client_on_a().await;
            assert_eq!(m.got(), [1, 2, 3, 4], "b deals");
            // b's consumer loses the shard; b's sweep releases its question.
            p.owned_b.set(1, &[]);
            b.expire(std::time::Instant::now()).await;
            settle().await;
            assert_eq!(m.got(), [1, 2, 3, 4], "a deals nothing m holds");
            for v in 1..=4 {
                a.ack(w, &m.client, v).await.unwrap();
            }
            settle().await;
            assert_eq!(m.got(), [1, 2, 3, 4, 5, 6], "a deals the rest once");
            let st = a.states(w, &[1, 2, 3, 4]).await.unwrap();
            assert!(
                st.iter().all(|s| *s == State::Done),
                "the acks reached a: {st:?}"
            );
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// b, named the dealer after a, dies before it releases anything: once it has left the
        /// membership a deals again (it waited for b's release, which will never come).
        #[tokio::test]
        async fn a_dealer_named_after_this_one_that_dies_holds_nothing_up() {
            let p = Pair::new().await;
            p.b_deals_too().await;
            p.owned_b.set(1, &[]);
            p.a.peer_lost("b", true);
            assert_eq!(p.client_on_a().await.got(), [1, 2, 3, 4], "a deals again");
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// b's queue of the address, idle, is dropped by its sweep before b loses the shard:
        /// its question is released all the same, and a, named before it, deals again.
        #[tokio::test]
        async fn a_question_is_released_though_its_queue_was_dropped() {
            let p = Pair::new().await;
            let (b, w) = (&p.b, &p.w);
            p.b_deals_too().await;
            b.expire(std::time::Instant::now()).await;
            assert!(b.lock().get(w).is_none(), "b's idle queue is dropped");
            p.owned_b.set(1, &[]);
            b.expire(std::time::Instant::now()).await;
            settle().await;
            assert_eq!(p.client_on_a().await.got(), [1, 2, 3, 4], "a deals again");
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// A node whose lease as a member does not hold (its ZooKeeper session lost, expiring,
        /// or unheard of since before a pause) deals nothing, though its consumer still has the
        /// shard; its lease held again, it deals.
        #[tokio::test]
        async fn a_node_whose_lease_does_not_hold_deals_nothing() {
            let p = Pair::new().await;
            p.lease_a.end();
            let m = p.client_on_a().await;
            assert!(m.got().is_empty(), "a dealt {:?} while fenced", m.got());
            p.lease_a.renew(std::time::Instant::now(), HOUR);
            p.a.expire(std::time::Instant::now()).await;
            settle().await;
            assert_eq!(m.got(), [1, 2, 3, 4], "its lease held again: a deals");
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// a assigns versions to its client and reads them from the store; meanwhile it is
        /// paused past its session (its lease runs out). Awake, it gives nothing: the cluster
        /// may have dealt those versions elsewhere while it slept.
        #[tokio::test]
        async fn a_node_paused_between_assigning_and_giving_gives_nothing() {
            use std::sync::atomic::Ordering::SeqCst;
            let p = Pair::new().await;
            let reads = p.mailbox.gate.write().await;
            let m = Recorder::conn("m", "c1");
            let joining = {
                let (a, w, m) = (p.a.clone(), p.w.clone(), m.clone());
                tokio::spawn(async move { a.join(&w, m, Some(1)).await })
            };
            for _ in 0..200 {
                if p.mailbox.begun.load(SeqCst) > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(p.mailbox.begun.load(SeqCst) > 0, "a reads what it assigned");
            p.lease_a.end();
            drop(reads);
            joining.await.unwrap();
            settle().await;
            assert!(
                m.got().is_empty(),
                "a gave {:?} after its lease ran out",
                m.got()
            );
            assert!(
                p.a.held_here(&p.w, None).is_empty(),
                "nothing noted as held"
            );
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// A `Give` that arrives after its sender's lease ended (the sender may have been paused
        /// past its session since it dealt, and the version dealt elsewhere meanwhile) is
        /// refused; one within its sender's lease is given.
        #[tokio::test]
        async fn a_give_past_its_senders_lease_is_refused() {
            let p = Pair::new().await;
            let (b, w) = (&p.b, &p.w);
            let k = p.taker_on_b().await;
            let six = p.mailbox.read(w, 5, 1).await.unwrap().messages[0].clone();
            let give = |lease_ms| Frame::Give {
                address: w.clone(),
                conn: "k".into(),
                version: 6,
                signal: six.signal.clone(),
                lease_ms,
            };
            b.receive("a", give(crate::clock::now_ms() - 1));
            settle().await;
            assert_eq!(k.got(), [1, 2, 3, 4], "refused past the sender's lease");
            b.receive("a", give(lease_end_ms(&p.lease_a)));
            settle().await;
            assert_eq!(k.got(), [1, 2, 3, 4, 6], "given within it");
            // The refusal did not tell a that k is gone (it was a `Gone` at first, and a
            // dropped k while later `Give`s to it were still on their way there): k acks 1
            // and a deals it the next.
            b.ack(w, &k.client, 1).await.unwrap();
            settle().await;
            assert_eq!(k.got(), [1, 2, 3, 4, 6, 5], "k still takes work from a");
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// A `Give` refused where the connection is: its dealer deals that version again (here
        /// to the same connection, the only one), and keeps the connection.
        #[tokio::test]
        async fn a_refused_give_goes_out_again() {
            let p = Pair::new().await;
            let (a, w) = (&p.a, &p.w);
            let k = p.taker_on_b().await;
            a.receive(
                "b",
                Frame::Refused {
                    address: w.clone(),
                    conn: "k".into(),
                    version: 2,
                },
            );
            settle().await;
            assert_eq!(k.got(), [1, 2, 3, 4, 2], "2 dealt again, to k");
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// The chaos run's finding: a loaded the queue, then was paused past its ZooKeeper
        /// session (its lease ran out) while its consumer still had the shard. b took the shard
        /// and, a being no member, dealt without asking a: 1–4 to a client on b. a woke, joined
        /// again (its lease began again) before its consumer heard of the move, and a client
        /// connected to it: a loads the queue again first (it asks b, which says who holds
        /// 1–4), and deals only 5 and 6. Before, it dealt 1–4 again from what it knew.
        #[tokio::test]
        async fn a_node_back_from_a_pause_past_its_session_loads_again_before_it_deals() {
            let p = Pair::new().await;
            let (a, b, w) = (&p.a, &p.b, &p.w);
            assert_eq!(a.states(w, &[1]).await.unwrap(), vec![State::Waiting]);
            p.lease_a.end();
            p.b_skips_a.store(true, SeqCst);
            p.owned_b.set(1, &[0]);
            let k = Recorder::conn("k", "c2");
            b.join(w, k.clone(), Some(1)).await;
            settle().await;
            assert_eq!(k.got(), [1, 2, 3, 4], "b deals");
            for v in 1..=4 {
                b.ack(w, &k.client, v).await.unwrap();
            }
            b.flush().await; // stored done (the node does it every 20 ms)
            p.b_skips_a.store(false, SeqCst);
            p.lease_a.renew(std::time::Instant::now(), HOUR);
            let m = p.client_on_a().await;
            settle().await;
            assert!(
                m.got().iter().all(|v| *v > 4),
                "a dealt again what k had: {:?}",
                m.got()
            );
            p.each_given_once(&[&k, &m]);
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// A node's terms start past those it used before a restart: the other nodes keep the
        /// highest term it released, and would adopt nothing at or before it.
        #[tokio::test]
        async fn a_restarted_nodes_questions_come_after_its_earlier_ones() {
            use std::sync::atomic::Ordering::SeqCst;
            let p = Pair::new().await;
            assert_eq!(p.a.states(&p.w, &[1]).await.unwrap(), vec![State::Waiting]);
            let before = p.a.terms.load(SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
            let stores = Stores {
                mailbox: p.mailbox.clone(),
                topology: Arc::new(EmbeddedTopology::open(&p._dir.path().join("t2.redb")).unwrap()),
                done: Arc::new(EmbeddedTopology::open(&p._dir.path().join("t3.redb")).unwrap()),
            };
            let again = Dispatcher::new("a", stores, p.a.settings, None);
            assert!(again.terms.load(SeqCst) > before);
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// A former dealer's release can arrive before its late question (the one goes on the
        /// link, the other by HTTP): a question of a released term adopts nothing.
        #[tokio::test]
        async fn a_question_released_before_it_arrived_adopts_nothing() {
            let p = Pair::new().await;
            let (b, w) = (&p.b, &p.w);
            p.shard_moves().await;
            let k = Recorder::conn("k", "c1");
            b.join(w, k.clone(), Some(1)).await;
            assert_eq!(k.got(), [1, 2, 3, 4], "b deals");
            b.receive(
                "a",
                Frame::Released {
                    address: w.clone(),
                    term: 7,
                },
            );
            settle().await;
            // a's questions of terms 7 and 6 arrive now.
            b.held_here(w, Some(("a", 7)));
            b.held_here(w, Some(("a", 6)));
            for v in 1..=4 {
                b.ack(w, &k.client, v).await.unwrap();
            }
            settle().await;
            let st = b.states(w, &[1, 2, 3, 4]).await.unwrap();
            assert_eq!(st, vec![State::Done; 4], "the acks reached b");
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// The shard moves while a's `Give`s to a connection on b are still on their way: b
        /// asks before they arrive, a's answer names them, so b gives them to nobody else; when
        /// they arrive, their acks go to b, which deals now.
        #[tokio::test]
        async fn gives_on_their_way_when_the_shard_moves_go_to_nobody_else() {
            let p = Pair::new().await;
            let (a, b, w) = (&p.a, &p.b, &p.w);
            // a loads the queue before its frames to b are held up (its question would wait).
            assert_eq!(a.states(w, &[1]).await.unwrap(), vec![State::Waiting]);
            let held_up = p.a_to_b.clone().write_owned().await;
            let k = Recorder::conn("k", "c1");
            b.join(w, k.clone(), Some(1)).await;
            settle().await;
            assert!(k.got().is_empty(), "a's gives are on their way");
            p.shard_moves().await;
            let j = Recorder::conn("j", "c2");
            b.join(w, j.clone(), Some(1)).await;
            settle().await;
            drop(held_up);
            settle().await;
            assert_eq!(k.got(), [1, 2, 3, 4], "a's four came to k");
            assert!(j.got().iter().all(|v| *v >= 5), "{:?}", j.got());
            // k's acks go to b, and b deals the rest.
            for v in 1..=4 {
                b.ack(w, &k.client, v).await.unwrap();
            }
            settle().await;
            let st = b.states(w, &[1, 2, 3, 4]).await.unwrap();
            assert!(st.iter().all(|s| *s == State::Done), "{st:?}");
            p.each_given_once(&[&k, &j]);
            p.tasks.stop(Duration::from_secs(1)).await;
        }

        /// The shard moves while a, having assigned versions to its own connection, still
        /// reads them from the store: b's question is answered with them, so b gives them to
        /// nobody else, and the connection's acks go to b.
        #[tokio::test]
        async fn versions_assigned_before_the_shard_moved_go_to_nobody_else() {
            let p = Pair::new().await;
            let (a, b, w) = (p.a.clone(), p.b.clone(), p.w.clone());
            assert_eq!(a.states(&w, &[1]).await.unwrap(), vec![State::Waiting]);
            let reads_wait = p.mailbox.gate.clone().write_owned().await;
            let l = Recorder::conn("l", "c1");
            let dealing_a = tokio::spawn({
                let (a, w, l) = (a.clone(), w.clone(), l.clone());
                async move { a.join(&w, l, Some(1)).await }
            });
            settle().await;
            p.shard_moves().await;
            let j = Recorder::conn("j", "c2");
            let dealing_b = tokio::spawn({
                let (b, w, j) = (b.clone(), w.clone(), j.clone());
                async move { b.join(&w, j, Some(1)).await }
            });
            settle().await;
            assert!(l.got().is_empty() && j.got().is_empty(), "the reads wait");
            drop(reads_wait);
            dealing_a.await.unwrap();
            dealing_b.await.unwrap();
            settle().await;
            assert_eq!(l.got(), [1, 2, 3, 4], "a's four came to l");
            assert!(j.got().iter().all(|v| *v >= 5), "{:?}", j.got());
            // l's acks go to b, and b deals the rest.
            for v in 1..=4 {
                a.ack(&w, &l.client, v).await.unwrap();
            }
            settle().await;
            let st = b.states(&w, &[1, 2, 3, 4]).await.unwrap();
            assert!(st.iter().all(|s| *s == State::Done), "{st:?}");
            p.each_given_once(&[&l, &j]);
            p.tasks.stop(Duration::from_secs(1)).await;
        }
    }
}
