//! The node's long-lived tasks under one owner: every background task (the queue's consumer, the
//! ack writer, the peers' links and send loops, expiry, the leader's cleanup, the sweeps) is
//! spawned through [`Tasks`], which holds one cancellation token and one tracker. Stopping is
//! one call: cancel, then wait (bounded) until every task has returned, so a node dropped
//! in-process leaves nothing running.

use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A boxed future. Tasks, and what the binary and the tests hand to a node, cross into the
/// node's code as one, so that the code around them is compiled once, in this crate, rather
/// than once per future type.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

/// The owner of a node's background tasks (cheap to clone: clones share the token and tracker).
#[derive(Clone, Default)]
pub struct Tasks {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Tasks {
    /// Runs `task` until it returns or the node stops, whichever comes first.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.spawn_boxed(Box::pin(task));
    }

    // Tasks are boxed before they are spawned: one spawned future type, so tokio's task code is
    // compiled once for all of them rather than once per task (this crate's copies of it went
    // from 75 to 59; the rest are spawned elsewhere).
    fn spawn_boxed(&self, task: BoxFuture<()>) {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// Runs `task` to its end even when the node stops: for tasks that finish their work when
    /// their input closes (the queue's consumer, the ack writer), which [`Tasks::stop`] waits for.
    pub fn spawn_to_end(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn::<BoxFuture<()>>(Box::pin(task));
    }

    /// Calls `tick` every `every` (first after one period) until the node stops, cutting off a
    /// tick under way then (a sweep or a probe that is simply not finished).
    pub fn every<F, Fut>(&self, every: Duration, tick: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.spawn(Self::ticking(every, tick, self.cancel.clone()));
    }

    /// Like [`Tasks::every`], but a tick under way when the node stops runs to its end, and
    /// [`Tasks::stop`] waits for it: for a flush, which must write the batch it took.
    pub fn every_to_end<F, Fut>(&self, every: Duration, tick: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tracker
            .spawn(Self::ticking(every, tick, self.cancel.clone()));
    }

    /// Ticks until `cancel` fires between two ticks.
    async fn ticking<F, Fut>(every: Duration, mut tick: F, cancel: CancellationToken)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut clock = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = clock.tick() => {}
            }
            tick().await;
        }
    }

    /// Whether the node is stopping.
    pub fn is_stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the node starts stopping.
    pub async fn stopping(&self) {
        self.cancel.cancelled().await
    }

    /// Cancels every task and waits at most `grace` for all of them to return; false when some
    /// were still running then.
    pub async fn stop(&self, grace: Duration) -> bool {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }

    /// Cancels every task when dropped (for an owner dropped without stopping).
    pub fn drop_guard(&self) -> tokio_util::sync::DropGuard {
        self.cancel.clone().drop_guard()
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn stop_ends_every_task_and_waits_for_those_that_finish_their_work() {
        let tasks = Tasks::default();
        let ticks = Arc::new(AtomicU32::new(0));
        let t = ticks.clone();
        tasks.every(Duration::from_millis(5), move || {
            let t = t.clone();
            async move {
                t.fetch_add(1, Ordering::SeqCst);
            }
        });
        tasks.spawn(std::future::pending());
        let finished = Arc::new(AtomicU32::new(0));
        let f = finished.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(4);
        tasks.spawn_to_end(async move {
            while let Some(n) = rx.recv().await {
                f.fetch_add(n, Ordering::SeqCst);
            }
        });
        tx.send(2).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(ticks.load(Ordering::SeqCst) >= 2);
        assert_eq!(tasks.running(), 3);
        // The drain-to-end task is still waiting for input: stop cannot finish until it closes.
        assert!(!tasks.stop(Duration::from_millis(50)).await);
        assert_eq!(tasks.running(), 1);
        drop(tx);
        assert!(tasks.stop(Duration::from_secs(1)).await);
        assert_eq!(tasks.running(), 0);
        assert_eq!(finished.load(Ordering::SeqCst), 2);
        let after = ticks.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), after, "no tick after stop");
    }

    /// A flush taken in one tick and cut off half-way would lose what it took (a work address's
    /// done versions were lost that way when a node stopped mid-write).
    #[tokio::test]
    async fn a_flush_under_way_when_the_node_stops_runs_to_its_end() {
        let tasks = Tasks::default();
        let (started, mut began) = tokio::sync::mpsc::channel::<()>(1);
        let ended = Arc::new(AtomicU32::new(0));
        let e = ended.clone();
        tasks.every_to_end(Duration::from_millis(1), move || {
            let (started, e) = (started.clone(), e.clone());
            async move {
                let _ = started.try_send(());
                tokio::time::sleep(Duration::from_millis(100)).await;
                e.fetch_add(1, Ordering::SeqCst);
            }
        });
        began.recv().await.unwrap();
        assert!(tasks.stop(Duration::from_secs(5)).await);
        assert_eq!(
            ended.load(Ordering::SeqCst),
            1,
            "the tick finished, and no other began"
        );
    }
}
