//! When the connections' client tokens run out: one timer for the whole node, not one task per
//! connection.
//!
//! A connection with a token is entered under its expiry; [`Deadlines::run`] sleeps until the
//! earliest one (or until an earlier one is entered) and ends the connections whose time has
//! come. A `refresh` moves a connection's entry ([`Deadlines::moved`]); a connection that closes
//! leaves ([`Deadlines::forget`]). A task per connection cost about 300 bytes of every idle
//! connection's memory (its future, its timer entry); an entry here is a map node of a few words.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// What has a deadline: a connection, or a stand-in in tests.
pub trait Due: Send + Sync + 'static {
    /// The deadline, ms since the epoch (`u64::MAX`: none).
    fn due_ms(&self) -> u64;
    /// Moves the deadline (only [`Deadlines::moved`] calls it, under the map's lock).
    fn set_due_ms(&self, ms: u64);
    /// The deadline has passed.
    fn expire(&self);
}

/// The longest single sleep: a wall clock that jumps is looked at again after this.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// The deadlines of the node's connections, earliest first.
pub struct Deadlines<T: Due> {
    /// (deadline, the entry's address as its identity) → the entry. The address is stable while
    /// the entry is alive, and an entry is forgotten before it is dropped.
    due: Mutex<BTreeMap<(u64, usize), Weak<T>>>,
    /// An entry earlier than the one [`Deadlines::run`] sleeps for was added.
    earlier: Notify,
}

impl<T: Due> Default for Deadlines<T> {
    fn default() -> Self {
        Self {
            due: Mutex::new(BTreeMap::new()),
            earlier: Notify::new(),
        }
    }
}

fn key<T>(entry: &T, due: u64) -> (u64, usize) {
    (due, entry as *const T as usize)
}

impl<T: Due> Deadlines<T> {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<(u64, usize), Weak<T>>> {
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters `entry` under its deadline (nothing when it has none).
    pub fn watch(&self, entry: &std::sync::Arc<T>) {
        let due = entry.due_ms();
        if due == u64::MAX {
            return;
        }
        self.enter(
            &mut self.lock(),
            key(&**entry, due),
            std::sync::Arc::downgrade(entry),
        );
    }

    /// Puts an entry in the map, waking [`Deadlines::run`] when it is now the earliest.
    fn enter(&self, map: &mut BTreeMap<(u64, usize), Weak<T>>, at: (u64, usize), entry: Weak<T>) {
        map.insert(at, entry);
        if map.first_key_value().is_some_and(|(k, _)| *k == at) {
            self.earlier.notify_one();
        }
    }

    /// Moves `entry`'s deadline to `ms` (a refresh). An entry not watched only gets the value.
    pub fn moved(&self, entry: &T, ms: u64) {
        let mut map = self.lock();
        let weak = map.remove(&key(entry, entry.due_ms()));
        entry.set_due_ms(ms);
        if let Some(w) = weak
            && ms != u64::MAX
        {
            self.enter(&mut map, key(entry, ms), w);
        }
    }

    /// Removes `entry` (it closed).
    pub fn forget(&self, entry: &T) {
        self.lock().remove(&key(entry, entry.due_ms()));
    }

    /// How many entries wait.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the entries due at `now_ms` out and expires them; returns the next deadline.
    pub fn fire(&self, now_ms: u64) -> Option<u64> {
        let (due, next) = {
            let mut map = self.lock();
            let later = map.split_off(&(now_ms.saturating_add(1), 0));
            let due = std::mem::replace(&mut *map, later);
            (due, map.first_key_value().map(|(k, _)| k.0))
        };
        // Outside the lock: expiring closes a connection, which forgets it.
        let mut next = next;
        for entry in due.into_values().filter_map(|w| w.upgrade()) {
            let at = entry.due_ms();
            if at <= now_ms {
                entry.expire();
            } else {
                // Moved while it was being taken out: entered again.
                self.watch(&entry);
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        next
    }

    /// Expires entries as their deadlines pass, until the task is cancelled (the node's
    /// [`crate::tasks::Tasks`] runs it).
    pub async fn run(&self) {
        loop {
            let next = self.fire(crate::clock::now_ms());
            let wait = next.map_or(MAX_SLEEP, |t| {
                Duration::from_millis(t.saturating_sub(crate::clock::now_ms())).min(MAX_SLEEP)
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.earlier.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    struct Fake {
        due: AtomicU64,
        expired: AtomicBool,
    }

    impl Fake {
        fn new(due: u64) -> Arc<Self> {
            Arc::new(Self {
                due: AtomicU64::new(due),
                expired: AtomicBool::new(false),
            })
        }
        fn expired(&self) -> bool {
            self.expired.load(Ordering::SeqCst)
        }
    }

    impl Due for Fake {
        fn due_ms(&self) -> u64 {
            self.due.load(Ordering::SeqCst)
        }
        fn set_due_ms(&self, ms: u64) {
            self.due.store(ms, Ordering::SeqCst)
        }
        fn expire(&self) {
            self.expired.store(true, Ordering::SeqCst)
        }
    }

    #[test]
    fn entries_expire_when_their_deadline_passes_and_not_before() {
        let d = Deadlines::default();
        let (a, b, none) = (Fake::new(100), Fake::new(200), Fake::new(u64::MAX));
        d.watch(&a);
        d.watch(&b);
        d.watch(&none);
        assert_eq!(d.len(), 2, "no deadline, no entry");
        assert_eq!(d.fire(99), Some(100));
        assert!(!a.expired());
        assert_eq!(d.fire(100), Some(200));
        assert!(a.expired() && !b.expired());
        assert_eq!(d.fire(1_000), None);
        assert!(b.expired() && !none.expired());
        assert!(d.is_empty());
    }

    #[test]
    fn a_refresh_moves_the_deadline_and_a_closed_entry_leaves() {
        let d = Deadlines::default();
        let (a, b, c) = (Fake::new(100), Fake::new(100), Fake::new(150));
        d.watch(&a);
        d.watch(&b);
        d.watch(&c);
        d.moved(&a, 500);
        assert_eq!(a.due_ms(), 500);
        d.forget(&c);
        assert_eq!(d.len(), 2);
        assert_eq!(d.fire(300), Some(500));
        assert!(b.expired() && !a.expired() && !c.expired());
        assert_eq!(d.fire(500), None);
        assert!(a.expired());
        // Moving an entry that is not watched only sets its value.
        let e = Fake::new(10);
        d.moved(&e, 20);
        assert_eq!((e.due_ms(), d.len()), (20, 0));
    }

    #[test]
    fn an_entry_dropped_without_forget_expires_nothing() {
        let d = Deadlines::default();
        d.watch(&Fake::new(100));
        assert_eq!(d.fire(200), None);
        assert!(d.is_empty());
    }

    #[tokio::test]
    async fn run_wakes_for_an_earlier_deadline_added_while_it_sleeps() {
        let d = Arc::new(Deadlines::default());
        let now = crate::clock::now_ms();
        let late = Fake::new(now + 3_600_000);
        d.watch(&late);
        let runner = tokio::spawn({
            let d = d.clone();
            async move { d.run().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let soon = Fake::new(crate::clock::now_ms() + 30);
        d.watch(&soon);
        for _ in 0..200 {
            if soon.expired() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        runner.abort();
        assert!(soon.expired(), "woken for the earlier deadline");
        assert!(!late.expired());
    }
}
