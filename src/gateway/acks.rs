//! The cursor writer: `ack` events are coalesced per (client, address) to the highest version and
//! written in batches, every few milliseconds or when many are waiting. Acks are not answered, so
//! batching costs clients nothing; a crash loses at most the last interval's acks, which only
//! means a resuming client may be sent a few messages again that it already had (it can dedupe by
//! version).

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
}

impl AckWriter {
    /// Starts the writer; it writes what is pending one last time when the node stops.
    pub fn start(cursors: Arc<dyn Cursors>, tasks: &crate::tasks::Tasks) -> Arc<Self> {
        let w = Arc::new(Self {
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            cursors,
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
                writer.flush().await;
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

    /// Writes what is pending; on failure the acks are put back for the next try.
    pub async fn flush(&self) {
        let batch: Vec<(ClientId, Address, u64)> = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.drain().map(|((c, a), v)| (c, a, v)).collect()
        };
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.cursors.save(&batch).await {
            tracing::warn!(error = %e, "saving cursors failed; will retry");
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (c, a, v) in batch {
                let cur = p.entry((c, a)).or_insert(0);
                *cur = (*cur).max(v);
            }
        }
    }
}
