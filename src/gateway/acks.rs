//! The cursor writer: `ack` events are coalesced per (client, address) to the highest version and
//! written in batches, every few milliseconds or when many are waiting. Acks are not answered, so
//! batching costs clients nothing; a crash loses at most the acks of the last interval (and, on
//! the embedded store, whose cursor saves are durable once a second, of the last second), which
//! only means a resuming client may be sent a few messages again that it already had (it can
//! dedupe by version). A node that stops writes what is pending and makes it durable
//! ([`AckWriter::finish`]).

use crate::address::{Address, ClientId};
use crate::topology::Cursors;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

const FLUSH_EVERY: Duration = Duration::from_millis(20);
const FLUSH_AT: usize = 4096;

/// Coalescing writer of acks into [`Cursors`].
pub struct AckWriter {
    pending: Mutex<HashMap<(ClientId, Address), u64>>,
    wake: Notify,
    cursors: Arc<dyn Cursors>,
    /// How long a cursor is kept after its last ack ([`crate::topology::cursor_ttl_secs`]).
    ttl_secs: u32,
}

impl AckWriter {
    /// Starts the writer; it writes what is pending one last time when the node stops.
    pub fn start(
        cursors: Arc<dyn Cursors>,
        ttl_secs: u32,
        tasks: &crate::tasks::Tasks,
    ) -> Arc<Self> {
        let w = Arc::new(Self {
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            cursors,
            ttl_secs,
        });
        let writer = w.clone();
        let stop = tasks.clone();
        // Not cut short by a stop: a write in progress finishes, then the last one is made.
        tasks.spawn_to_end(async move {
            loop {
                let stopping = tokio::select! {
                    _ = writer.wake.notified() => false,
                    _ = tokio::time::sleep(FLUSH_EVERY) => false,
                    _ = stop.stopping() => true,
                };
                let _ = writer.flush().await;
                if stopping {
                    return;
                }
            }
        });
        w
    }

    pub fn ack(&self, client: ClientId, address: Address, version: u64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let v = p.entry((client, address)).or_insert(0);
        *v = (*v).max(version);
        if p.len() >= FLUSH_AT {
            self.wake.notify_one();
        }
    }

    /// Writes what is pending; on failure the acks are put back for the next try. False when
    /// the write failed (the node's last flush tries again).
    pub async fn flush(&self) -> bool {
        let batch: Vec<(ClientId, Address, u64)> = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.drain().map(|((c, a), v)| (c, a, v)).collect()
        };
        if batch.is_empty() {
            return true;
        }
        if let Err(e) = self.cursors.save(&batch, self.ttl_secs).await {
            tracing::warn!(error = %e, "saving cursors failed; will retry");
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (c, a, v) in batch {
                let cur = p.entry((c, a)).or_insert(0);
                *cur = (*cur).max(v);
            }
            return false;
        }
        true
    }

    /// The node's last write: what is pending, then [`Cursors::sync`], so that every ack
    /// received is durable once the node has stopped. False when either failed.
    pub async fn finish(&self) -> bool {
        if !self.flush().await {
            return false;
        }
        if let Err(e) = self.cursors.sync().await {
            tracing::warn!(error = %e, "making the saved cursors durable failed; will retry");
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::TopologyError;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Cursors whose first `fail` saves fail.
    #[derive(Default)]
    struct Flaky {
        fail: AtomicU32,
        saved: Mutex<Vec<(ClientId, Address, u64)>>,
    }

    #[async_trait::async_trait]
    impl Cursors for Flaky {
        async fn save(
            &self,
            acks: &[(ClientId, Address, u64)],
            _ttl: u32,
        ) -> Result<(), TopologyError> {
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err(TopologyError::Unavailable("down".into()));
            }
            self.saved.lock().unwrap().extend_from_slice(acks);
            Ok(())
        }
        async fn get(&self, _: &ClientId) -> Result<HashMap<Address, u64>, TopologyError> {
            Ok(HashMap::new())
        }
        async fn expire(&self, _: u64) -> Result<u64, TopologyError> {
            Ok(0)
        }
    }

    #[tokio::test]
    async fn a_failed_write_says_so_and_keeps_the_acks_for_the_next() {
        let cursors = Arc::new(Flaky::default());
        cursors.fail.store(1, Ordering::SeqCst);
        let tasks = crate::tasks::Tasks::default();
        let w = AckWriter::start(cursors.clone(), 60, &tasks);
        assert!(tasks.stop(Duration::from_secs(1)).await, "the writer stops");
        let (c, a) = (
            ClientId::parse("c1").unwrap(),
            Address::parse("client:c1").unwrap(),
        );
        w.ack(c.clone(), a.clone(), 3);
        w.ack(c.clone(), a.clone(), 5);
        assert!(!w.flush().await, "the store refused it");
        assert!(cursors.saved.lock().unwrap().is_empty());
        w.ack(c.clone(), a.clone(), 4);
        assert!(w.flush().await);
        assert_eq!(
            *cursors.saved.lock().unwrap(),
            vec![(c, a, 5)],
            "the highest, once"
        );
        assert!(w.flush().await, "nothing left");
    }
}
