//! Versioned mailboxes: every message sent to an address is appended with the next version
//! (1, 2, 3, … with no gaps, never a version twice), kept for the retention period, and read back
//! in pages.
//!
//! [`Mailbox`] is the trait; [`embedded`] is the default backend (redb on local disk).
//! The suite every backend must pass is `tests/it/contract/mailbox.rs` (compiled only for the
//! tests).

#[cfg(feature = "cluster")]
pub mod cassandra;
pub mod embedded;
pub mod history;
mod wal;

use crate::address::{Address, MessageId};
use serde_json::value::RawValue;
use std::sync::Arc;

/// A message to append.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub address: Address,
    pub id: MessageId,
    pub payload: Box<RawValue>,
    /// The id was minted for this message alone (not given by the sender), and the caller
    /// vouches that this is its first delivery to the current writer of its shard, so it cannot
    /// have been appended before: the cluster mailbox then skips the id lookup. False whenever
    /// in doubt; see `docs/architecture.md` ("Idempotency without a read").
    pub new_id: bool,
}

/// An appended message. `signal` is the JSON object clients receive, serialized once at append
/// time so that fan-out never serializes it again.
#[derive(Debug)]
pub struct Message {
    pub address: Address,
    pub version: u64,
    pub id: MessageId,
    pub ts: u64,
    pub signal: Box<RawValue>,
    /// Where the payload lies in `signal` (byte offsets), so a store can keep the payload alone.
    payload_at: (u32, u32),
}

/// A signal as clients see it.
#[derive(serde::Serialize)]
struct Signal<'a> {
    address: &'a Address,
    version: u64,
    id: &'a MessageId,
    ts: u64,
    payload: &'a RawValue,
}

impl Message {
    /// Builds a message and its client-facing JSON (`{address, version, id, ts, payload}`).
    pub fn new(address: Address, version: u64, id: MessageId, ts: u64, payload: &RawValue) -> Self {
        // Serialized, not parsed again: every part is valid JSON already.
        let signal = serde_json::value::to_raw_value(&Signal {
            address: &address,
            version,
            id: &id,
            ts,
            payload,
        })
        .expect("serializing a signal cannot fail");
        // The payload is written as it is, last, before the closing brace.
        let end = signal.get().len() - 1;
        let payload_at = offsets(end - payload.get().len(), end);
        debug_assert_eq!(&signal.get()[payload_at.0 as usize..end], payload.get());
        Self {
            address,
            version,
            id,
            ts,
            signal,
            payload_at,
        }
    }

    /// A message from its client-facing JSON (as forwarded between nodes); `None` if the JSON
    /// is not a signal.
    pub fn from_signal(signal: Box<RawValue>) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Parts<'a> {
            address: Address,
            version: u64,
            id: MessageId,
            ts: u64,
            #[serde(borrow)]
            payload: &'a RawValue,
        }
        let p: Parts<'_> = serde_json::from_str(signal.get()).ok()?;
        // The payload borrows from the signal: its offset is the distance between the two.
        let start = p.payload.get().as_ptr() as usize - signal.get().as_ptr() as usize;
        let payload_at = offsets(start, start + p.payload.get().len());
        Some(Self {
            address: p.address,
            version: p.version,
            id: p.id,
            ts: p.ts,
            payload_at,
            signal,
        })
    }

    /// The payload's JSON text, as it lies in the signal.
    pub fn payload_json(&self) -> &str {
        &self.signal.get()[self.payload_at.0 as usize..self.payload_at.1 as usize]
    }

    /// The payload part of the signal.
    pub fn payload(&self) -> Box<RawValue> {
        RawValue::from_string(self.payload_json().to_owned()).expect("signal is valid JSON")
    }
}

/// Payload offsets as stored in a [`Message`] (a signal is far below 4 GiB: requests are
/// limited to megabytes).
fn offsets(start: usize, end: usize) -> (u32, u32) {
    let n = |x: usize| u32::try_from(x).expect("a signal is under 4 GiB");
    (n(start), n(end))
}

/// The outcome of one append: the message as stored, and whether it was already there
/// (same id to the same address within the retention period).
#[derive(Debug, Clone)]
pub struct Appended {
    pub message: Arc<Message>,
    pub duplicate: bool,
}

/// The state of one address's mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    /// The last version appended (0 for an empty mailbox).
    pub head: u64,
    /// The oldest version still kept; `head + 1` when nothing is kept.
    pub low: u64,
}

/// A page of messages read after a version.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub head: Head,
    /// Messages in increasing version order, starting at `max(after + 1, head.low)`.
    pub messages: Vec<Arc<Message>>,
}

/// A run of appends that keep their order while several are under way (a Kafka consumer's
/// batches): each starts once the one before has begun ([`Mailbox::append_in`]), and once one
/// fails, every later one fails too, so that none is made visible before the failed one is
/// appended again — until the run [`Run::restart`]s (the caller, before it appends the failed
/// one again).
#[derive(Debug, Default)]
pub struct Run {
    failed: std::sync::atomic::AtomicBool,
}

impl Run {
    /// Whether an append of the run failed since it (re)started.
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Marks the run failed.
    pub fn fail(&self) {
        self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets appends go again (after the caller has seen the failure).
    pub fn restart(&self) {
        self.failed
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// The error of an append refused because an earlier one of its run failed.
    pub fn refusal() -> MailboxError {
        MailboxError::Unavailable(
            "an earlier append of this run failed: this one waits until that one is appended \
             again (nothing of it was appended)"
                .into(),
        )
    }
}

/// Maps a backend's own error to [`MailboxError::Storage`] (shared by every backend).
pub(crate) fn storage_err(e: impl std::fmt::Display) -> MailboxError {
    MailboxError::Storage(e.to_string())
}

/// Mailbox failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MailboxError {
    #[error("mailbox storage failed: {0}")]
    Storage(String),
    #[error("mailbox is unavailable: {0}")]
    Unavailable(String),
    /// Another writer claimed a shard this writer was appending to: nothing of the failed
    /// append became visible, and this writer must not append to the shard again until it is
    /// given it anew (`CassandraMailbox::claim`).
    #[error("fenced: {0}")]
    Fenced(String),
}

/// The outcome of an append: one [`Appended`] per message, in the order of the batch.
pub type Appends = Result<Vec<Appended>, MailboxError>;

/// A store of versioned mailboxes.
///
/// Contract (checked by `tests/it/contract/mailbox.rs`):
/// - `append` assigns each new message of an address the next version, in batch order, with no gap
///   and never twice, also across a crash in the middle of a batch (a batch is all or nothing);
/// - a message whose `id` was already appended to the same address within the retention period is
///   not appended again: the result carries the original message with `duplicate = true`;
/// - once `append` returns, the messages are durable; when it fails, the outcome is unknown
///   (the embedded backend appends nothing; a cluster writer may have appended some of the
///   batch) and appending the same ids again is safe;
/// - `read` returns messages after a version in order, at most `limit`, with the head;
/// - messages older than the retention are removed by `expire`, and `read` then starts at `low`;
/// - `append_now` appends as `append` does, or gives the batch back and appends nothing.
#[async_trait::async_trait]
pub trait Mailbox: Send + Sync + 'static {
    /// Appends a batch; results are in the order of the batch.
    async fn append(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>, MailboxError>;
    /// Appends a batch on the calling thread, at once, when this backend can do that without
    /// waiting for anything but a local disk write (the embedded log, a small batch);
    /// `Err(batch)`, untouched, when it would have to wait longer (the network, a full
    /// backlog, a large batch), and by default. The same guarantees as [`Mailbox::append`]
    /// otherwise. It has no await, so a caller cannot be cancelled part-way; callers must not
    /// run it beside another append of theirs (the in-process queue holds its apply lock).
    fn append_now(&self, batch: Vec<NewMessage>) -> Result<Appends, Vec<NewMessage>> {
        Err(batch)
    }
    /// Appends a batch as the next append of `run` (see [`Run`]). `begun` is told (or dropped)
    /// once the next append of the run may start: for a backend that overlaps appends, when
    /// this one's versions are reserved; by default, when it is done.
    async fn append_in(
        &self,
        run: &Run,
        batch: Vec<NewMessage>,
        begun: tokio::sync::oneshot::Sender<()>,
    ) -> Result<Vec<Appended>, MailboxError> {
        if run.failed() {
            return Err(Run::refusal());
        }
        let out = self.append(batch).await;
        if out.is_err() {
            run.fail();
        }
        drop(begun);
        out
    }
    /// Reads up to `limit` messages with version > `after`.
    async fn read(&self, address: &Address, after: u64, limit: usize)
    -> Result<Page, MailboxError>;
    /// The heads of several addresses, in the order asked.
    async fn heads(&self, addresses: &[Address]) -> Result<Vec<Head>, MailboxError>;
    /// Removes messages appended before `now_ms - retention`; returns how many were removed.
    async fn expire(&self, now_ms: u64) -> Result<u64, MailboxError>;
    /// Whether the backing store answers.
    async fn healthy(&self) -> Result<(), MailboxError>;
}

pub use crate::clock::{now_ms, now_us};

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.into()).unwrap()
    }

    /// The payload is found in the signal wherever it lies: as built here (last), and in a
    /// signal from elsewhere with its fields in another order and spaces between them.
    #[test]
    fn the_payload_is_found_in_the_signal() {
        let a = Address::parse("channel:a").unwrap();
        let id = MessageId::parse("i\"d\\").unwrap();
        let payload = r#"{"x":[1,"}"],"payload":2}"#;
        let m = Message::new(a.clone(), 7, id.clone(), 42, &raw(payload));
        assert_eq!(m.payload_json(), payload);
        assert_eq!(m.payload().get(), payload);
        let v: serde_json::Value = serde_json::from_str(m.signal.get()).unwrap();
        assert_eq!(v["address"], "channel:a");
        assert_eq!(v["id"], "i\"d\\");
        assert_eq!(
            (v["version"].as_u64(), v["ts"].as_u64()),
            (Some(7), Some(42))
        );
        assert_eq!(v["payload"]["payload"], 2);

        let again = Message::from_signal(raw(m.signal.get())).unwrap();
        assert_eq!(again.payload_json(), payload);
        let other = format!(
            r#"{{ "payload" : {payload} , "ts":42, "id":"i", "version":7, "address":"channel:a" }}"#
        );
        let m = Message::from_signal(raw(&other)).unwrap();
        assert_eq!((m.payload_json(), m.version, m.ts), (payload, 7, 42));
        assert!(
            Message::from_signal(raw(
                r#"{"address":"channel:a","version":1,"id":"i","ts":1}"#
            ))
            .is_none()
        );
    }
}
