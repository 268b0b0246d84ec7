//! Wall-clock time as the whole crate uses it: milliseconds (message `ts`, expiry, tokens) and
//! microseconds (hand-off timing across nodes) since the Unix epoch.

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch (timing across nodes: the hand-off histograms).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The append time of a message: milliseconds since the Unix epoch, never earlier than the one
/// this process gave before (a wall clock stepped back does not reorder `ts`), so a mailbox's
/// versions are in time order and history by time can search them (`mailbox::history`).
pub fn stamp_ms() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_ms();
    now.max(LAST.fetch_max(now, Ordering::Relaxed))
}
