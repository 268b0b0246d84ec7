//! The in-process queue of the embedded default: a bounded channel in front of the
//! [`Processor`]. Jobs waiting in the channel are taken together, up to the append batch size,
//! and applied as one batch (one storage commit). A full channel makes publishers wait
//! (backpressure), and a job is answered only after its batch is durable.

use super::{Command, IngestError, Outcome, Processor, Queue};
use crate::tasks::Tasks;
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
        tasks.spawn_to_end(async move {
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
                let mut sizes = Vec::with_capacity(jobs.len());
                let mut all = Vec::with_capacity(n);
                let mut replies = Vec::with_capacity(jobs.len());
                for j in jobs {
                    sizes.push(j.commands.len());
                    all.extend(j.commands);
                    replies.push(j.reply);
                }
                let mut results = processor.apply(all).await;
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
