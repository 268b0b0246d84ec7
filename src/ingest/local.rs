//! The in-process queue of the embedded default: a bounded channel in front of the
//! [`Processor`]. Jobs waiting in the channel are taken together, up to the append batch size,
//! and applied as one batch (one storage commit). A full channel makes publishers wait
//! (backpressure), and a job is answered only after its batch is durable.
//!
//! **Applied where it arrives.** When nothing is queued and no batch is being applied, a
//! publish of enqueues that the mailbox can append at once ([`Processor::apply_now`]) is applied
//! by the publishing task itself, under the same apply lock the consumer takes for each batch.
//! That saves the two hand-offs between tasks of a queued job (to the consumer and back with
//! the answer), each of which can wake an idle runtime thread: at low rates, where there is no
//! batch to share, most of the node's work per message. Under load publishes find the channel
//! busy, and once the consumer takes more than one job at a time ("crowded") none is applied in
//! place until it takes one alone again: publishes that arrive together share one log write,
//! where one applied in place would take a write of its own. The lock keeps one apply at a time,
//! so messages are still handed out in the order their versions were given.

use super::{Command, IngestError, Outcome, Processor, Queue};
use crate::tasks::Tasks;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

type Reply = Vec<Result<Outcome, IngestError>>;

struct Job {
    commands: Vec<Command>,
    reply: oneshot::Sender<Reply>,
}

/// The in-process queue.
pub struct LocalQueue {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    processor: Arc<Processor>,
    /// Held by whoever applies: the consumer for a batch, or a publisher applying its own.
    applying: Arc<tokio::sync::Mutex<()>>,
    /// The consumer's last batch held more than one job, or left some waiting (a full batch):
    /// publishes are arriving together, and share a commit better in the channel than one by
    /// one in place.
    crowded: Arc<AtomicBool>,
    /// Resolves when the consumer has applied its last job.
    done: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
}

/// Jobs that may wait in the channel.
const CAPACITY: usize = 8192;

impl LocalQueue {
    /// Starts the consumer task (it ends once [`Queue::drain`] closed the channel and every
    /// job taken was applied).
    pub fn start(processor: Arc<Processor>, max_batch: usize, tasks: &Tasks) -> Self {
        let (tx, mut rx) = mpsc::channel::<Job>(CAPACITY);
        let (done_tx, done) = oneshot::channel::<()>();
        let applying = Arc::new(tokio::sync::Mutex::new(()));
        let crowded = Arc::new(AtomicBool::new(false));
        let (lock, seen) = (applying.clone(), crowded.clone());
        let consumer = processor.clone();
        tasks.spawn_to_end(async move {
            let processor = consumer;
            while let Some(first) = rx.recv().await {
                let mut n = first.commands.len();
                let mut jobs = vec![first];
                while n < max_batch {
                    match rx.try_recv() {
                        Ok(j) => {
                            n += j.commands.len();
                            jobs.push(j);
                        }
                        Err(_) => break,
                    }
                }
                seen.store(jobs.len() > 1 || !rx.is_empty(), Ordering::Relaxed);
                let mut sizes = Vec::with_capacity(jobs.len());
                let mut all = Vec::with_capacity(n);
                let mut replies = Vec::with_capacity(jobs.len());
                for j in jobs {
                    sizes.push(j.commands.len());
                    all.extend(j.commands);
                    replies.push(j.reply);
                }
                let mut results = {
                    let _applying = lock.lock().await;
                    processor.apply(all).await
                };
                for (size, reply) in sizes.into_iter().zip(replies) {
                    let rest = results.split_off(size);
                    let _ = reply.send(std::mem::replace(&mut results, rest));
                }
                // The batch's deliveries and answers were handed to tasks of this thread; let
                // them run before the next batch's append, which may write on this thread.
                tokio::task::yield_now().await;
            }
            let _ = done_tx.send(());
        });
        Self {
            tx: Mutex::new(Some(tx)),
            processor,
            applying,
            crowded,
            done: tokio::sync::Mutex::new(Some(done)),
        }
    }
}

/// Every operation is applied where it was published: no answer ever comes from elsewhere.
impl crate::routing::Replies for LocalQueue {
    fn resolve_wire(&self, _ticket: &str, _outcome: &serde_json::value::RawValue) {}
}

#[async_trait::async_trait]
impl Queue for LocalQueue {
    async fn publish(&self, commands: Vec<Command>, _wait: bool) -> Result<Reply, IngestError> {
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(IngestError::Closed)?;
        // Nothing queued (every permit free), nothing being applied, and publishes not arriving
        // together: apply it here. (`tx` is held until this returns, so the consumer, and
        // `drain` with it, ends after this apply.)
        let alone = !self.crowded.load(Ordering::Relaxed) && tx.capacity() == tx.max_capacity();
        let commands = match alone.then(|| self.applying.try_lock().ok()).flatten() {
            Some(_applying) => match self.processor.apply_now(commands) {
                Ok(results) => return Ok(results),
                Err(commands) => commands,
            },
            None => commands,
        };
        let (reply, rx) = oneshot::channel();
        tx.send(Job { commands, reply })
            .await
            .map_err(|_| IngestError::Closed)?;
        rx.await.map_err(|_| IngestError::Closed)
    }

    async fn drain(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(done) = self.done.lock().await.take() {
            let _ = done.await;
        }
    }

    async fn healthy(&self) -> Result<(), IngestError> {
        if self.tx.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            Ok(())
        } else {
            Err(IngestError::Closed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::{Address, ClientId, MessageId};
    use crate::mailbox::embedded::EmbeddedMailbox;
    use crate::mailbox::{Mailbox, Message, NewMessage};
    use crate::routing::{Fanout, Offered};
    use crate::topology::embedded::EmbeddedTopology;
    use futures_util::FutureExt;
    use serde_json::value::RawValue;

    /// Records the versions handed out, in the order they were handed out.
    #[derive(Default)]
    struct Handed(Mutex<Vec<u64>>);

    impl Fanout for Handed {
        fn deliver(&self, messages: &[Arc<Message>], _appended_us: u64) -> Offered {
            let mut v = self.0.lock().unwrap();
            v.extend(messages.iter().map(|m| m.version));
            Offered::default()
        }
        fn bound(&self, _client: &ClientId, _bindings: &[(Address, u64)]) {}
        fn unbound(&self, _client: &ClientId, _removed: &[(Address, u64)]) {}
        fn presence(&self, _change: &crate::presence::Change) {}
    }

    struct Setup {
        _dir: tempfile::TempDir,
        mailbox: Arc<EmbeddedMailbox>,
        handed: Arc<Handed>,
        queue: LocalQueue,
        _tasks: Tasks,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mailbox =
            Arc::new(EmbeddedMailbox::open(&dir.path().join("m.redb"), 3_600_000).unwrap());
        let handed = Arc::new(Handed::default());
        let processor = Arc::new(Processor {
            mailbox: mailbox.clone(),
            topology: Arc::new(EmbeddedTopology::open(&dir.path().join("t.redb")).unwrap()),
            fanout: vec![handed.clone()],
            metrics: crate::metrics::Metrics::install(),
            max_bindings: 100,
        });
        let tasks = Tasks::default();
        let queue = LocalQueue::start(processor, 500, &tasks);
        Setup {
            _dir: dir,
            mailbox,
            handed,
            queue,
            _tasks: tasks,
        }
    }

    fn enqueue(address: &Address, id: &str) -> Command {
        Command::Enqueue(NewMessage {
            address: address.clone(),
            id: MessageId::parse(id).unwrap(),
            payload: RawValue::from_string("{}".into()).unwrap(),
            new_id: false,
        })
    }

    fn version(r: &Result<Outcome, IngestError>) -> u64 {
        match r {
            Ok(Outcome::Appended(a)) => a.message.version,
            other => panic!("not appended: {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_idle_queue_applies_a_publish_where_it_arrives() {
        let s = setup();
        let a = Address::parse("channel:here").unwrap();
        // One poll, the consumer never scheduled: only an apply in place can answer.
        let out = s
            .queue
            .publish(vec![enqueue(&a, "m1"), enqueue(&a, "m2")], false)
            .now_or_never()
            .expect("answered in the publishing task")
            .unwrap();
        assert_eq!(out.iter().map(version).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(*s.handed.0.lock().unwrap(), vec![1, 2]);
        let page = s.mailbox.read(&a, 0, 10).await.unwrap();
        assert_eq!(page.messages.len(), 2);
    }

    #[tokio::test]
    async fn a_publish_queues_while_a_batch_is_applied_and_binds_always_queue() {
        let s = setup();
        let a = Address::parse("channel:queued").unwrap();
        let held = s.queue.applying.clone().lock_owned().await;
        let q = Arc::new(s.queue);
        let publish = {
            let q = q.clone();
            let a = a.clone();
            tokio::spawn(async move { q.publish(vec![enqueue(&a, "m1")], false).await })
        };
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(
            !publish.is_finished(),
            "applied while another apply held the lock"
        );
        assert!(s.handed.0.lock().unwrap().is_empty());
        drop(held);
        let out = publish.await.unwrap().unwrap();
        assert_eq!(version(&out[0]), 1);

        // A bind is never applied in place (it awaits the topology): one poll cannot answer it.
        let bind = Command::Bind {
            client: ClientId::parse("c1").unwrap(),
            addresses: vec![a.clone()],
            rewind: None,
            weight: None,
        };
        let mut f = q.publish(vec![enqueue(&a, "m2"), bind], false);
        assert!((&mut f).now_or_never().is_none());
        let out = f.await.unwrap();
        assert_eq!(version(&out[0]), 2);
        assert!(matches!(out[1], Ok(Outcome::Bound { .. })));
    }

    #[tokio::test]
    async fn a_crowded_queue_queues_until_a_job_comes_alone() {
        let s = setup();
        let a = Address::parse("channel:crowd").unwrap();
        s.queue.crowded.store(true, Ordering::Relaxed);
        let mut f = s.queue.publish(vec![enqueue(&a, "m1")], false);
        assert!(
            (&mut f).now_or_never().is_none(),
            "applied in place while crowded"
        );
        assert_eq!(version(&f.await.unwrap()[0]), 1);
        // The consumer took that job alone: the next publish is applied in place again.
        assert!(!s.queue.crowded.load(Ordering::Relaxed));
        let out = s
            .queue
            .publish(vec![enqueue(&a, "m2")], false)
            .now_or_never();
        assert_eq!(version(&out.expect("applied in place").unwrap()[0]), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_publishers_are_handed_out_in_version_order() {
        let s = setup();
        let a = Address::parse("channel:race").unwrap();
        let q = Arc::new(s.queue);
        let mut all = Vec::new();
        for t in 0..8 {
            let (q, a) = (q.clone(), a.clone());
            all.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..50 {
                    let out = q
                        .publish(vec![enqueue(&a, &format!("t{t}-{i}"))], false)
                        .await;
                    got.push(version(&out.unwrap()[0]));
                }
                got
            }));
        }
        let mut answered = Vec::new();
        for h in all {
            answered.extend(h.await.unwrap());
        }
        answered.sort_unstable();
        assert_eq!(
            answered,
            (1..=400).collect::<Vec<_>>(),
            "each version answered once"
        );
        assert_eq!(
            *s.handed.0.lock().unwrap(),
            (1..=400).collect::<Vec<_>>(),
            "handed out in order"
        );
    }
}
