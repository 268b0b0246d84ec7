//! Two nodes linked in-process: a transport that hands each request to the receiving
//! [`Peers`] directly, a membership that lists both, real embedded mailboxes.

use super::*;
use crate::address::MessageId;
use crate::cluster::{ClusterError, ClusterLock, NodeInfo};
use crate::mailbox::NewMessage;
use crate::mailbox::embedded::EmbeddedMailbox;
use crate::routing::Subscriber;
use std::sync::Mutex as StdMutex;

/// A node as its peers reach it: its peers side and its queue's answers.
type Reached = (Arc<Peers>, Arc<dyn Replies>);

/// The nodes of one test, by URL; a URL in `down` does not answer.
#[derive(Default)]
struct Net {
    nodes: StdMutex<HashMap<String, Reached>>,
    down: StdMutex<HashSet<String>>,
}

/// One node's way out: every request arrives as coming from `from` (the sender as the real
/// guard establishes it) and goes through the same receiving code as the HTTP routes.
struct Loopback {
    net: Arc<Net>,
    from: routes::Sender,
}

#[async_trait::async_trait]
impl Transport for Loopback {
    async fn post(
        &self,
        url: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), TransportError> {
        if self.net.down.lock().unwrap().contains(url) {
            return Err(TransportError::Unreachable {
                url: url.into(),
                reason: "down in this test".into(),
            });
        }
        let (peers, replies) = self
            .net
            .nodes
            .lock()
            .unwrap()
            .get(url)
            .cloned()
            .expect("a node");
        let received = match path {
            "/internal/want" => routes::receive_want(&peers, &self.from, &body),
            "/internal/deliver" => routes::receive_deliver(&peers, &*replies, &self.from, &body),
            _ => return Ok((404, Bytes::new())),
        };
        let status = received.map_or_else(|(status, _)| status.as_u16(), |()| 200);
        Ok((status, Bytes::from_static(b"{}")))
    }
}

/// The members, as the test lists them; None: the membership cannot be read (ZooKeeper
/// unreachable).
struct Listed(StdMutex<Option<Vec<NodeInfo>>>);

impl Listed {
    fn of(nodes: Vec<NodeInfo>) -> Self {
        Self(StdMutex::new(Some(nodes)))
    }
}

#[async_trait::async_trait]
impl Membership for Listed {
    async fn nodes(&self) -> Result<Vec<NodeInfo>, ClusterError> {
        self.0
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| ClusterError::Unavailable("unreachable in this test".into()))
    }
    fn is_leader(&self) -> bool {
        false
    }
    fn membership(&self) -> tokio::sync::watch::Receiver<bool> {
        tokio::sync::watch::Sender::new(true).subscribe()
    }
    fn joins(&self) -> tokio::sync::watch::Receiver<u64> {
        tokio::sync::watch::Sender::new(1).subscribe()
    }
    fn lease(&self) -> crate::cluster::Lease {
        crate::cluster::Lease::forever()
    }
    async fn lock(&self, _: &str, _: Duration) -> Result<ClusterLock, ClusterError> {
        Err(ClusterError::Unavailable("no locks in this test".into()))
    }
}

/// What a connection saw.
#[derive(Default)]
struct Probe {
    got: StdMutex<Vec<String>>,
}

struct Sub {
    id: String,
    client: ClientId,
    probe: Arc<Probe>,
}

impl Subscriber for Sub {
    fn id(&self) -> &str {
        &self.id
    }
    fn client(&self) -> &ClientId {
        &self.client
    }
    fn offer(&self, address: &Address, messages: &[Arc<Message>]) {
        let mut g = self.probe.got.lock().unwrap();
        g.extend(messages.iter().map(|m| format!("{address}@{}", m.version)));
    }
    fn bound(&self, address: &Address, since: u64) {
        self.probe
            .got
            .lock()
            .unwrap()
            .push(format!("bound {address}@{since}"));
    }
    fn unbound(&self, _: &Address, _: u64) {}
    fn known(&self, address: &Address, head: u64) {
        self.probe
            .got
            .lock()
            .unwrap()
            .push(format!("known {address}@{head}"));
    }
}

#[derive(Default)]
struct Answers(StdMutex<Vec<(String, String)>>);

impl Replies for Answers {
    fn resolve_wire(&self, ticket: &str, outcome: &RawValue) {
        self.0
            .lock()
            .unwrap()
            .push((ticket.into(), outcome.get().into()));
    }
}

struct Node {
    peers: Arc<Peers>,
    router: Arc<Router>,
    mailbox: Arc<dyn Mailbox>,
    answers: Arc<Answers>,
    _dir: tempfile::TempDir,
}

fn info(id: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        url: format!("loop://{id}"),
        leader: false,
    }
}

/// Node `id`'s peers side, reaching the others through `net` (its links not started).
fn peers_of(
    id: &str,
    net: &Arc<Net>,
    tasks: &Tasks,
    membership: Arc<dyn Membership>,
    router: Arc<Router>,
    mailbox: Arc<dyn Mailbox>,
) -> Arc<Peers> {
    let me = info(id);
    Peers::new(
        Me {
            node: me.id.clone(),
            url: me.url.clone(),
        },
        Links {
            transport: Arc::new(Loopback {
                net: net.clone(),
                from: routes::Sender {
                    node: me.id,
                    url: me.url,
                },
            }),
            router,
            mailbox,
            membership,
            work: None,
            metrics: Metrics::install(),
            tasks: tasks.clone(),
        },
    )
}

/// Nodes `a` and `b`, linked through `net`, their links started.
fn two(net: &Arc<Net>, tasks: &Tasks) -> (Node, Node) {
    let members = Arc::new(Listed::of(vec![info("a"), info("b")]));
    let make = |id: &str| {
        let dir = tempfile::tempdir().unwrap();
        let mailbox: Arc<dyn Mailbox> =
            Arc::new(EmbeddedMailbox::open(&dir.path().join("m.redb"), 3_600_000).unwrap());
        let router = Arc::new(Router::default());
        let peers = peers_of(
            id,
            net,
            tasks,
            members.clone(),
            router.clone(),
            mailbox.clone(),
        );
        peers.started.store(true, Ordering::SeqCst);
        let answers = Arc::new(Answers::default());
        net.nodes
            .lock()
            .unwrap()
            .insert(info(id).url, (peers.clone(), answers.clone()));
        Node {
            peers,
            router,
            mailbox,
            answers,
            _dir: dir,
        }
    };
    (make("a"), make("b"))
}

fn addr(s: &str) -> Address {
    Address::parse(s).unwrap()
}

/// A connection on `node` to `address`, announced to the peers.
async fn connect(node: &Node, address: &Address) -> Arc<Probe> {
    let probe = Arc::new(Probe::default());
    let sub: Arc<dyn Subscriber> = Arc::new(Sub {
        id: format!("conn-{address}"),
        client: ClientId::parse("c1").unwrap(),
        probe: probe.clone(),
    });
    node.router.register(sub.clone());
    node.router.subscribe(&sub, std::slice::from_ref(address));
    node.peers.want(std::slice::from_ref(address)).await;
    probe
}

async fn append(node: &Node, address: &Address, n: usize) -> Vec<Arc<Message>> {
    let msgs = (0..n)
        .map(|_| NewMessage {
            address: address.clone(),
            id: MessageId::generate(),
            payload: RawValue::from_string("1".into()).unwrap(),
            new_id: true,
        })
        .collect();
    let out = node.mailbox.append(msgs).await.unwrap();
    out.into_iter().map(|a| a.message).collect()
}

/// Waits (bounded) until `probe` saw `what`.
async fn saw(probe: &Probe, what: &str) -> bool {
    for _ in 0..200 {
        if probe.got.lock().unwrap().iter().any(|g| g == what) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[tokio::test]
async fn a_snapshot_links_and_only_wanted_addresses_are_forwarded() {
    let (net, tasks) = (Arc::new(Net::default()), Tasks::default());
    let (a, b) = two(&net, &tasks);
    let (x, y) = (addr("channel:x"), addr("channel:y"));
    // b wants x before it is linked: the want is only announced, the link's snapshot carries it.
    let on_b = connect(&b, &x).await;
    b.peers.tick().await;
    assert!(a.peers.wanted_by.read().unwrap().contains_key(&x));
    let msgs = [append(&a, &x, 2).await, append(&a, &y, 1).await].concat();
    a.peers.forward(&msgs, 0);
    assert!(
        saw(&on_b, "channel:x@2").await,
        "{:?}",
        on_b.got.lock().unwrap()
    );
    let got = on_b.got.lock().unwrap().clone();
    assert!(got.contains(&"channel:x@1".to_string()));
    assert!(!got.iter().any(|g| g.starts_with("channel:y")), "{got:?}");
    // An address added on a live link is sent as a change and confirmed.
    let on_b_y = connect(&b, &y).await;
    assert!(b.peers.interests.lock().unwrap().confirmed.contains(&y));
    a.peers.forward(&append(&a, &y, 1).await, 0);
    assert!(saw(&on_b_y, "channel:y@2").await);
    tasks.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_unknown_session_gets_409_and_the_sender_relinks_then_repairs_from_its_mailbox() {
    let (net, tasks) = (Arc::new(Net::default()), Tasks::default());
    let (a, b) = two(&net, &tasks);
    let x = addr("channel:x");
    let on_b = connect(&b, &x).await;
    b.peers.tick().await;
    // A want under a session a never saw: 409.
    let stranger = Want {
        node: "b".into(),
        url: "loop://b".into(),
        session: "not-a-session".into(),
        snapshot: false,
        add: vec![x.clone()],
        remove: vec![],
    };
    assert_eq!(a.peers.on_want(stranger, "loop://b".into()), 409);
    // a forgets b (as after a restart, or a failed delivery): what a appends meanwhile is not
    // forwarded...
    let session = b.peers.interests.lock().unwrap().linked["a"]
        .session
        .clone();
    a.peers.drop_peer("b", &session);
    assert!(a.peers.wanted_by.read().unwrap().is_empty());
    append(&a, &x, 3).await;
    // ...but is in b's mailbox (shared store in a cluster; here b's own, appended the same).
    append(&b, &x, 3).await;
    // b's next heartbeat gets 409: b links again with a snapshot and repairs from the mailbox.
    b.peers.tick().await;
    let relinked = b.peers.interests.lock().unwrap().linked["a"]
        .session
        .clone();
    assert_ne!(relinked, session);
    assert!(a.peers.wanted_by.read().unwrap().contains_key(&x));
    assert!(
        saw(&on_b, "known channel:x@3").await,
        "{:?}",
        on_b.got.lock().unwrap()
    );
    tasks.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_peer_that_does_not_answer_is_unlinked_and_bindings_and_answers_reach_the_other_node() {
    let (net, tasks) = (Arc::new(Net::default()), Tasks::default());
    let (a, b) = two(&net, &tasks);
    let x = addr("channel:x");
    b.peers.tick().await;
    a.peers.tick().await;
    // A binding applied on a reaches b's connections of the client; an answer for a publisher
    // waiting on b goes to b's queue; one for a's own publisher stays on a.
    let on_b = connect(&b, &addr("client:c1")).await;
    let client = ClientId::parse("c1").unwrap();
    Fanout::bound(&*a.peers, &client, &[(x.clone(), 4)]);
    assert!(saw(&on_b, "bound channel:x@4").await);
    let answer = || Some(RawValue::from_string(r#"{"queued":true}"#.into()).unwrap());
    assert!(Fanout::reply(&*a.peers, "b", "t1", &answer));
    assert!(!Fanout::reply(&*a.peers, "a", "t2", &answer));
    for _ in 0..200 {
        if !b.answers.0.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        b.answers.0.lock().unwrap().clone(),
        vec![("t1".to_string(), r#"{"queued":true}"#.to_string())]
    );
    assert!(a.answers.0.lock().unwrap().is_empty());
    // b goes quiet: a's want to it fails, a unlinks it and does not wait for it again.
    net.down.lock().unwrap().insert("loop://b".into());
    connect(&a, &x).await;
    assert!(!a.peers.interests.lock().unwrap().linked.contains_key("b"));
    assert!(!a.peers.interests.lock().unwrap().confirmed.contains(&x));
    tasks.stop(Duration::from_secs(1)).await;
}

/// A node that just joined waits until every other member linked to it (before it announces
/// anything): not while b has not, at once after b's link.
#[tokio::test]
async fn wait_linked_is_true_once_every_other_member_linked() {
    let (net, tasks) = (Arc::new(Net::default()), Tasks::default());
    let (a, b) = two(&net, &tasks);
    assert!(
        !a.peers.wait_linked(Duration::from_millis(300)).await,
        "b has not linked to a"
    );
    b.peers.tick().await;
    assert!(a.peers.wait_linked(Duration::from_millis(300)).await);
    tasks.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn stopping_the_tasks_ends_the_links_and_send_loops() {
    let (net, tasks) = (Arc::new(Net::default()), Tasks::default());
    let (a, b) = two(&net, &tasks);
    a.peers.start();
    b.peers.start();
    b.peers.tick().await;
    assert!(tasks.running() >= 3, "two tickers and a's send loop to b");
    assert!(tasks.stop(Duration::from_secs(2)).await);
    assert_eq!(tasks.running(), 0);
}

/// Node `a` alone, with this membership (its links not started).
fn one(
    net: &Arc<Net>,
    tasks: &Tasks,
    membership: Arc<dyn Membership>,
) -> (Arc<Peers>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mailbox = Arc::new(EmbeddedMailbox::open(&dir.path().join("m.redb"), 3_600_000).unwrap());
    let peers = peers_of(
        "a",
        net,
        tasks,
        membership,
        Arc::new(Router::default()),
        mailbox,
    );
    (peers, dir)
}

/// Asking every node is an error while who they are is unknown (links not started, members
/// not listed), where asking all answers as if there were none; with the members listed it
/// asks each.
#[tokio::test]
async fn asking_every_node_fails_while_the_members_are_unknown() {
    let (net, tasks) = (Arc::new(Net::default()), Tasks::default());
    let (peers, _dir) = one(&net, &tasks, Arc::new(Listed(StdMutex::new(None))));
    let ask = || peers.ask_every("/internal/x", Bytes::new());
    assert!(ask().await.unwrap_err().contains("not joined"));
    assert!(peers.ask_all("/internal/x", Bytes::new()).await.is_empty());
    peers.started.store(true, Ordering::SeqCst);
    assert!(ask().await.unwrap_err().contains("members are unknown"));
    assert!(peers.ask_all("/internal/x", Bytes::new()).await.is_empty());
    // Listed: b is asked (the loopback answers 404 for a path it does not route).
    let (a, _b) = two(&net, &tasks);
    let got = a
        .peers
        .ask_every("/internal/x", Bytes::new())
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "b");
    tasks.stop(Duration::from_secs(1)).await;
}

/// A node that leaves the membership is seen gone by the next tick (and its work goes to
/// others) even when a question to all nodes read the membership in between.
#[tokio::test]
async fn a_departure_is_seen_by_the_next_tick_whoever_read_the_members_first() {
    let (net, tasks) = (Arc::new(Net::default()), Tasks::default());
    let members = Arc::new(Listed::of(vec![info("a"), info("b"), info("c")]));
    let (peers, _dir) = one(&net, &tasks, members.clone());
    peers.started.store(true, Ordering::SeqCst);
    net.down.lock().unwrap().insert(info("c").url); // listed, does not answer
    let live = peers.refresh_members().await.unwrap();
    assert!(
        peers.departed(&live).is_empty(),
        "the first tick: nobody left"
    );
    if let Some(nodes) = members.0.lock().unwrap().as_mut() {
        nodes.retain(|n| n.id != "b");
    }
    // A question to all nodes reads the membership first (b is no longer listed).
    assert_eq!(peers.ask_all("/internal/x", Bytes::new()).await.len(), 1);
    let live = peers.refresh_members().await.unwrap();
    assert_eq!(peers.departed(&live), vec!["b".to_string()]);
    assert!(peers.departed(&live).is_empty(), "told once");
    tasks.stop(Duration::from_secs(1)).await;
}

/// A delivery holding frames this node does not know (a newer node's, in a rolling upgrade):
/// the others are taken, in order; a body that is not a list of frames is refused.
#[tokio::test]
async fn frames_this_node_does_not_know_are_skipped_and_the_rest_taken() {
    let (net, tasks) = (Arc::new(Net::default()), Tasks::default());
    let (a, b) = two(&net, &tasks);
    let x = addr("channel:x");
    let on_b = connect(&b, &x).await;
    let msgs = append(&a, &x, 2).await;
    let signals = |m: &Arc<Message>| {
        serde_json::to_string(&wire::Deliver::Signals {
            signals: vec![m.signal.clone()],
            appended_us: 0,
        })
        .unwrap()
    };
    let body = format!(
        r#"[{},{{"work":{{"someday":{{"address":"work:w"}}}}}},{{"hologram":1}},{}]"#,
        signals(&msgs[0]),
        signals(&msgs[1])
    );
    let from_a = routes::Sender {
        node: "a".into(),
        url: info("a").url,
    };
    let taken = routes::receive_deliver(&b.peers, &*b.answers, &from_a, body.as_bytes());
    assert!(taken.is_ok(), "{taken:?}");
    assert!(saw(&on_b, "channel:x@1").await && saw(&on_b, "channel:x@2").await);
    let refused = routes::receive_deliver(&b.peers, &*b.answers, &from_a, b"{\"signals\":1}");
    assert_eq!(refused.unwrap_err().0, axum::http::StatusCode::BAD_REQUEST);
    tasks.stop(Duration::from_secs(1)).await;
}
