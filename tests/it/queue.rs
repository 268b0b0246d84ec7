//! The queue backends the `Queue` suite runs on: the in-process queue here, Kafka in
//! `kafka.rs`. Each on a fresh embedded store (the queue is what is under test).

use crate::contract::queue::Backend;
use signalpost::ingest::local::LocalQueue;
use signalpost::ingest::{Processor, Queue};
use signalpost::mailbox::Mailbox;
use signalpost::mailbox::embedded::EmbeddedMailbox;
use signalpost::metrics::Metrics;
use signalpost::routing::Router;
use signalpost::tasks::Tasks;
use signalpost::topology::embedded::EmbeddedTopology;
use std::sync::Arc;

/// A store and the processor in front of it, as a node has them.
pub struct Store {
    pub _dir: tempfile::TempDir,
    pub mailbox: Arc<dyn Mailbox>,
    pub processor: Arc<Processor>,
    pub tasks: Tasks,
}

pub fn store(max_bindings: usize) -> Store {
    let dir = tempfile::tempdir().unwrap();
    let mailbox: Arc<dyn Mailbox> =
        Arc::new(EmbeddedMailbox::open(&dir.path().join("m.redb"), 3_600_000).unwrap());
    store_on(dir, mailbox, max_bindings)
}

/// A processor on `mailbox` and an embedded topology in `dir`.
pub fn store_on(dir: tempfile::TempDir, mailbox: Arc<dyn Mailbox>, max_bindings: usize) -> Store {
    let topology = Arc::new(EmbeddedTopology::open(&dir.path().join("t.redb")).unwrap());
    let processor = Arc::new(Processor {
        mailbox: mailbox.clone(),
        topology,
        fanout: vec![Arc::new(Router::default())],
        metrics: Metrics::install(),
        max_bindings,
    });
    Store {
        _dir: dir,
        mailbox,
        processor,
        tasks: Tasks::default(),
    }
}

struct Local(Store);

#[async_trait::async_trait]
impl Backend for Local {
    async fn start(&self) -> Arc<dyn Queue> {
        Arc::new(LocalQueue::start(
            self.0.processor.clone(),
            500,
            &self.0.tasks,
        ))
    }
    fn mailbox(&self) -> Arc<dyn Mailbox> {
        self.0.mailbox.clone()
    }
}

pub async fn local() -> Box<dyn Backend> {
    Box::new(Local(store(1000)))
}
