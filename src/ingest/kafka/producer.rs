//! The node's Kafka producer: a request's records are handed to librdkafka together and the
//! request is woken once, when the last of them is reported, with each record's outcome.
//!
//! Why not rdkafka's `FutureProducer`: it gives every record its own oneshot channel, a boxed
//! sender as the delivery opaque and a future to poll — two allocations and a wake-up per
//! record on the enqueue path, where the allocator was ~30 % of the node's time (see
//! docs/benchmarks.md). Here a record's opaque is a plain number (its request and its index),
//! and its report is one map lookup on librdkafka's polling thread.

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bits of a record's opaque that hold its index in its request (the rest hold the request).
const INDEX_BITS: u32 = 20;
/// The most records one request may hold.
pub(super) const MAX_RECORDS: usize = 1 << INDEX_BITS;
/// How long a record waits between tries while librdkafka's queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// One record to produce.
pub(super) struct Record<'a> {
    pub topic: &'a str,
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub headers: Option<OwnedHeaders>,
}

/// The producer: cheap to share (`Arc` inside).
#[derive(Clone)]
pub(super) struct Producer {
    inner: Arc<ThreadedProducer<Reports>>,
    reports: Arc<Pending>,
}

/// The requests under way, by number.
#[derive(Default)]
struct Pending {
    next: AtomicU64,
    requests: Mutex<HashMap<u64, Arc<Request>>>,
}

struct Request {
    /// Records not yet reported.
    left: AtomicUsize,
    /// The records that failed, with why.
    failed: Mutex<Vec<(usize, KafkaError)>>,
    /// Woken when `left` reaches 0 (a permit is kept if nobody waits yet).
    done: tokio::sync::Notify,
}

impl Request {
    fn report(&self, index: usize, outcome: Result<(), KafkaError>) {
        if let Err(e) = outcome {
            self.failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((index, e));
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }
}

/// librdkafka's callbacks: delivery reports go to their request.
struct Reports(Arc<Pending>);

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let (id, index) = split(opaque);
        let request = self
            .0
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        // None: the request was given up (its publisher went away).
        if let Some(r) = request {
            r.report(
                index,
                result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone()),
            );
        }
    }
}

/// Removes a request from the map when its publisher is done with it or went away.
struct Registered<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.pending
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Producer {
    pub(super) fn new(config: &ClientConfig) -> Result<Self, KafkaError> {
        let reports = Arc::new(Pending::default());
        let inner = config.create_with_context(Reports(reports.clone()))?;
        Ok(Self {
            inner: Arc::new(inner),
            reports,
        })
    }

    /// Whether the brokers answer a metadata request within `timeout` (blocks the thread).
    pub(super) fn reachable(&self, timeout: Duration) -> Result<(), KafkaError> {
        use rdkafka::producer::Producer as _;
        self.inner
            .client()
            .fetch_metadata(None, timeout)
            .map(|_| ())
    }

    /// Produces `records` and, once all are reported, answers the ones that failed: their
    /// indexes in `records`, in order, with why (nothing, and no allocation, when all were
    /// delivered). A full librdkafka queue makes a record wait for room, up to `queue_timeout`.
    pub(super) async fn send_all(
        &self,
        records: impl ExactSizeIterator<Item = Record<'_>>,
        queue_timeout: Duration,
    ) -> Vec<(usize, KafkaError)> {
        let n = records.len();
        assert!(
            n <= MAX_RECORDS,
            "a produce request holds at most {MAX_RECORDS} records"
        );
        let id = self.reports.next.fetch_add(1, Ordering::Relaxed) & MAX_REQUEST;
        let request = Arc::new(Request {
            left: AtomicUsize::new(n),
            failed: Mutex::new(Vec::new()),
            done: tokio::sync::Notify::new(),
        });
        self.reports
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, request.clone());
        let _registered = Registered {
            pending: &self.reports,
            id,
        };
        let start = Instant::now();
        for (index, r) in records.enumerate() {
            let mut record = BaseRecord::with_opaque_to(r.topic, opaque(id, index))
                .key(r.key)
                .payload(r.value);
            if let Some(h) = r.headers {
                record = record.headers(h);
            }
            loop {
                match self.inner.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if start.elapsed() < queue_timeout =>
                    {
                        record = back;
                        tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                    }
                    Err((e, _)) => {
                        request.report(index, Err(e));
                        break;
                    }
                }
            }
        }
        if n > 0 {
            request.done.notified().await;
        }
        let mut failed =
            std::mem::take(&mut *request.failed.lock().unwrap_or_else(|p| p.into_inner()));
        failed.sort_unstable_by_key(|(index, _)| *index);
        failed
    }
}

/// The request numbers an opaque can hold (they wrap; far fewer are ever under way at once).
const MAX_REQUEST: u64 = (usize::MAX >> INDEX_BITS) as u64;

/// A record's delivery opaque: its request and its index in it.
fn opaque(request: u64, index: usize) -> usize {
    ((request & MAX_REQUEST) as usize) << INDEX_BITS | index
}

/// [`opaque`]'s inverse.
fn split(opaque: usize) -> (u64, usize) {
    ((opaque >> INDEX_BITS) as u64, opaque & (MAX_RECORDS - 1))
}

/// Each of `n` records' outcome, in order, from the failures [`Producer::send_all`] answered.
pub(super) fn outcomes<E>(
    n: usize,
    failed: Vec<(usize, E)>,
) -> impl Iterator<Item = Result<(), E>> {
    let mut failed = failed.into_iter().peekable();
    (0..n).map(move |i| match failed.next_if(|(f, _)| *f == i) {
        Some((_, e)) => Err(e),
        None => Ok(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_answered_to_its_own_record_only() {
        let out: Vec<Result<(), &str>> = outcomes(5, vec![(0, "a"), (3, "b")]).collect();
        assert_eq!(out, [Err("a"), Ok(()), Ok(()), Err("b"), Ok(())]);
        assert_eq!(outcomes::<()>(2, vec![]).filter(Result::is_err).count(), 0);
    }

    #[test]
    fn an_opaque_names_its_request_and_record() {
        for (request, index) in [(0, 0), (1, 0), (7, MAX_RECORDS - 1), (MAX_REQUEST, 5)] {
            assert_eq!(split(opaque(request, index)), (request, index));
        }
        // A request number past the range wraps instead of spilling into the index.
        assert_eq!(split(opaque(MAX_REQUEST + 1, 3)), (0, 3));
    }

    #[tokio::test]
    async fn a_request_wakes_once_its_last_record_is_reported_even_before_it_waits() {
        let r = Request {
            left: AtomicUsize::new(2),
            failed: Mutex::new(Vec::new()),
            done: tokio::sync::Notify::new(),
        };
        r.report(1, Ok(()));
        r.report(0, Err(KafkaError::Canceled));
        // Both reported before anyone waited: the wake-up is kept.
        tokio::time::timeout(Duration::from_secs(5), r.done.notified())
            .await
            .expect("woken");
        assert_eq!(r.failed.lock().unwrap().len(), 1);
    }
}
