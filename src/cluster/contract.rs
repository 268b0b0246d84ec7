//! The contract suite every [`Membership`] backend must pass: cluster-wide mutexes exclude,
//! time out with a clear error, and pass on when released.

use super::{ClusterError, Membership};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// `a` and `b` are two members of one cluster (for [`super::Standalone`], the same node twice is
/// not one cluster: pass the same instance twice there).
pub async fn locks(a: Arc<dyn Membership>, b: Arc<dyn Membership>) {
    let name = format!(
        "contract-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let short = Duration::from_millis(300);
    let held = a.lock(&name, Duration::from_secs(10)).await.unwrap();
    // While `a` holds it, `b` waits and gives up with LockTimeout, naming the lock.
    match b.lock(&name, short).await {
        Err(ClusterError::LockTimeout { name: n, waited_ms }) => {
            assert_eq!(n, name);
            assert_eq!(waited_ms, 300);
        }
        Err(e) => panic!("expected LockTimeout, got {e}"),
        Ok(_) => panic!("two holders of one lock"),
    }
    // Another name is independent.
    drop(b.lock(&format!("{name}-other"), short).await.unwrap());
    // A waiter that is still waiting gets it once released.
    let waiter = {
        let b = b.clone();
        let name = name.clone();
        tokio::spawn(async move { b.lock(&name, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter got the lock while it was held"
    );
    drop(held);
    let second = waiter.await.unwrap().unwrap();
    drop(second);
    // Under contention from both sides, never two holders at once.
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let m = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (name, inside, most) = (name.clone(), inside.clone(), most.clone());
        tasks.push(tokio::spawn(async move {
            let _g = m.lock(&name, Duration::from_secs(20)).await.unwrap();
            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            inside.fetch_sub(1, Ordering::SeqCst);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(most.load(Ordering::SeqCst), 1, "two holders at once");
    // Bad names are refused with a reason.
    assert!(matches!(
        a.lock("../x", short).await,
        Err(ClusterError::LockName(_))
    ));
}
