//! Reads by append time: messages stamped in `since..=until`, and the last `n` — the history a
//! client asks for with `history` and the server API with `?since=&until=`.
//!
//! No index of its own: every backend stamps a message no earlier than the one before it
//! (`clock::stamp_ms`), so a mailbox's versions are in time order and the first version at or
//! after a time is found by a binary search over versions — about log2(n) one-message reads
//! (20 for a million messages), whatever the mailbox's size. On the cluster backend the order
//! holds per writer; when a shard changes writer, two nodes' clocks may differ by their skew.

use super::{Head, Mailbox, MailboxError, Page};
use crate::address::Address;

/// The head of one address.
async fn head(m: &dyn Mailbox, address: &Address) -> Result<Head, MailboxError> {
    Ok(m.heads(std::slice::from_ref(address)).await?[0])
}

/// The first version of `address` stamped at or after `since` (`head.head + 1` when there is
/// none), searching the versions its `head` (read by the caller) holds.
pub async fn first_since(
    m: &dyn Mailbox,
    address: &Address,
    head: Head,
    since: u64,
) -> Result<u64, MailboxError> {
    // The answer lies in lo..=hi; hi = head + 1 stands for "none".
    let (mut lo, mut hi) = (head.low.max(1), head.head + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let page = m.read(address, mid - 1, 1).await?;
        match page.messages.first() {
            // (A read after `mid - 1` starts at the oldest version kept, later than `mid` when
            // `mid` expired meanwhile; reading after `lo - 1` at the end finds the same one.)
            Some(msg) if msg.ts >= since => hi = mid,
            Some(msg) => lo = msg.version + 1,
            None => hi = mid,
        }
    }
    Ok(lo)
}

/// Up to `limit` messages stamped in `since..=until` (either bound may be open), oldest first.
pub async fn between(
    m: &dyn Mailbox,
    address: &Address,
    since: Option<u64>,
    until: Option<u64>,
    limit: usize,
) -> Result<Page, MailboxError> {
    let after = match since {
        Some(t) => first_since(m, address, head(m, address).await?, t).await? - 1,
        None => 0,
    };
    let mut page = m.read(address, after, limit).await?;
    if let Some(end) = until.and_then(|u| page.messages.iter().position(|msg| msg.ts > u)) {
        page.messages.truncate(end);
    }
    Ok(page)
}

/// The last `n` messages (fewer when fewer are kept), oldest first.
pub async fn last(m: &dyn Mailbox, address: &Address, n: usize) -> Result<Page, MailboxError> {
    let head = head(m, address).await?;
    m.read(address, head.head.saturating_sub(n as u64), n).await
}
