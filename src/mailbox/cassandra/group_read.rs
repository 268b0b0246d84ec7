//! A read shared by everyone who asked for it while the read before was under way: the group
//! commit of a read. Whoever asks gets the result of a read that *started after it asked* —
//! what the fence check needs (a read begun before a batch's rows were written could miss the
//! claim that fences them) — and at most one read is under way at a time, so appends that end
//! their writes together share one SERIAL read of the fences instead of one each.
//!
//! No task of its own: the first to ask reads; when its read ends, it answers the group it read
//! for and hands the next read to one of those who asked meanwhile, with the others as that
//! one's group. A reader or a waiter that is dropped (its append cancelled) hands its turn on,
//! so no one waits for a read that nobody does.

use std::sync::Mutex;
use tokio::sync::oneshot;

pub(super) struct GroupRead<T> {
    state: Mutex<State<T>>,
}

struct State<T> {
    /// A read is under way, or handed to a waiter that will start it.
    busy: bool,
    /// Asked while busy: the next read is for them.
    waiting: Vec<oneshot::Sender<Turn<T>>>,
}

enum Turn<T> {
    /// The result of a read that started after this waiter asked.
    Done(T),
    /// Read, for yourself and for these, who asked before this turn was handed on.
    Lead(Vec<oneshot::Sender<Turn<T>>>),
}

impl<T: Clone> GroupRead<T> {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                busy: false,
                waiting: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // Nothing panics while holding it; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The result of `read`, done by this caller or by another one, but started after this call.
    pub(super) async fn get<F, Fut>(&self, read: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let waiter = {
            let mut st = self.lock();
            if st.busy {
                let (tx, rx) = oneshot::channel();
                st.waiting.push(tx);
                Some(Waiter { reads: self, rx })
            } else {
                st.busy = true;
                None
            }
        };
        let mut reader = match waiter {
            None => Reader {
                reads: self,
                group: Vec::new(),
            },
            Some(mut w) => match (&mut w.rx).await {
                Ok(Turn::Done(v)) => return v,
                Ok(Turn::Lead(group)) => Reader { reads: self, group },
                // Only when the sender was dropped unsent, which this type never does while
                // borrowed: read alone, outside the turns (still a read begun after the ask).
                Err(_) => return read().await,
            },
        };
        let v = read().await;
        for tx in reader.group.drain(..) {
            let _ = tx.send(Turn::Done(v.clone()));
        }
        v
        // `reader` hands the next read on as it is dropped.
    }

    /// Gives the next read to the first of `first` and then of those waiting who is still there,
    /// the others as its group; with nobody left, the next to ask reads.
    fn hand_on(&self, first: Vec<oneshot::Sender<Turn<T>>>) {
        let mut st = self.lock();
        let mut next = first;
        next.append(&mut st.waiting);
        while !next.is_empty() {
            let leader = next.remove(0);
            match leader.send(Turn::Lead(std::mem::take(&mut next))) {
                Ok(()) => return,
                Err(Turn::Lead(rest)) => next = rest, // that one is gone
                Err(Turn::Done(_)) => unreachable!("a Lead was sent"),
            }
        }
        st.busy = false;
    }
}

/// The one reading now, and those it reads for (still unanswered if its read is dropped).
struct Reader<'a, T: Clone> {
    reads: &'a GroupRead<T>,
    group: Vec<oneshot::Sender<Turn<T>>>,
}

impl<T: Clone> Drop for Reader<'_, T> {
    fn drop(&mut self) {
        // An abandoned read's group asked first: the next read is theirs before the others'.
        self.reads.hand_on(std::mem::take(&mut self.group));
    }
}

/// One who asked while a read was under way.
struct Waiter<'a, T: Clone> {
    reads: &'a GroupRead<T>,
    rx: oneshot::Receiver<Turn<T>>,
}

impl<T: Clone> Drop for Waiter<'_, T> {
    fn drop(&mut self) {
        // Closed first, so no turn can arrive after the look below and be lost with it.
        self.rx.close();
        if let Ok(Turn::Lead(group)) = self.rx.try_recv() {
            // Handed the next read, and gone before doing it.
            self.reads.hand_on(group);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tokio::sync::Semaphore;

    /// Reads numbered 1, 2, … as they start; each ends when the gate gives it a permit.
    struct Fixture {
        reads: GroupRead<usize>,
        started: AtomicUsize,
        gate: Semaphore,
    }

    impl Fixture {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                reads: GroupRead::new(),
                started: AtomicUsize::new(0),
                gate: Semaphore::new(0),
            })
        }

        /// Asks; returns (reads started before asking, the number of the read that answered).
        fn ask(self: &Arc<Self>) -> tokio::task::JoinHandle<(usize, usize)> {
            let f = self.clone();
            tokio::spawn(async move {
                let before = f.started.load(SeqCst);
                let got = f
                    .reads
                    .get(|| async {
                        let n = f.started.fetch_add(1, SeqCst) + 1;
                        f.gate.acquire().await.expect("open").forget();
                        n
                    })
                    .await;
                (before, got)
            })
        }

        /// The first asks and reads; then two more ask and wait.
        async fn one_reading_two_waiting(
            self: &Arc<Self>,
        ) -> [tokio::task::JoinHandle<(usize, usize)>; 3] {
            let first = self.ask();
            settle().await;
            let (b, c) = (self.ask(), self.ask());
            settle().await;
            [first, b, c]
        }
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn those_who_ask_during_a_read_share_the_next_one() {
        let f = Fixture::new();
        let tasks: Vec<_> = (0..5).map(|_| f.ask()).collect();
        settle().await;
        assert_eq!(f.started.load(SeqCst), 1, "one read at a time");
        f.gate.add_permits(1);
        settle().await;
        assert_eq!(
            f.started.load(SeqCst),
            2,
            "the four who waited share one read"
        );
        f.gate.add_permits(1);
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        assert_eq!(got.iter().map(|g| g.1).collect::<Vec<_>>(), [1, 2, 2, 2, 2]);
        for (before, read) in got {
            assert!(
                read > before,
                "answered by a read that started after the ask"
            );
        }
        // Nobody waiting: the next to ask reads at once.
        let t = f.ask();
        settle().await;
        assert_eq!(f.started.load(SeqCst), 3);
        f.gate.add_permits(1);
        assert_eq!(t.await.unwrap().1, 3);
    }

    #[tokio::test]
    async fn a_reader_that_is_dropped_hands_its_turn_on() {
        let f = Fixture::new();
        let [first, b, c] = f.one_reading_two_waiting().await;
        first.abort();
        settle().await;
        assert_eq!(f.started.load(SeqCst), 2, "a waiter took over the read");
        f.gate.add_permits(1);
        assert_eq!(b.await.unwrap().1, 2);
        assert_eq!(c.await.unwrap().1, 2);
    }

    #[tokio::test]
    async fn a_waiter_that_is_dropped_is_skipped() {
        let f = Fixture::new();
        let [first, b, c] = f.one_reading_two_waiting().await;
        b.abort();
        settle().await;
        f.gate.add_permits(1);
        assert_eq!(first.await.unwrap().1, 1);
        settle().await;
        assert_eq!(f.started.load(SeqCst), 2, "the one still waiting reads");
        f.gate.add_permits(1);
        assert_eq!(c.await.unwrap().1, 2);
    }

    #[test]
    fn a_waiter_handed_the_turn_and_dropped_before_it_ran_hands_it_on() {
        use futures_util::FutureExt;
        let reads = GroupRead::<usize>::new();
        let (end_first, first_ends) = oneshot::channel::<usize>();
        let mut a = Box::pin(reads.get(move || async move { first_ends.await.unwrap() }));
        assert_eq!((&mut a).now_or_never(), None, "a reads");
        let mut b = Box::pin(reads.get(|| async { 2 }));
        assert_eq!((&mut b).now_or_never(), None, "b waits");
        let mut c = Box::pin(reads.get(|| async { 3 }));
        assert_eq!((&mut c).now_or_never(), None, "c waits");
        end_first.send(1).unwrap();
        // a's read ends: it hands the next read to b, with c in b's group...
        assert_eq!((&mut a).now_or_never(), Some(1));
        // ...and b is dropped before it runs again.
        drop(b);
        assert_eq!((&mut c).now_or_never(), Some(3), "c was handed the read");
        // And the turns are free again.
        assert_eq!(reads.get(|| async { 4 }).now_or_never(), Some(4));
    }
}
