//! The contract suites, one per port, compiled only for the tests. Each suite is a set of
//! functions taking a backend; one macro per port turns them into the tests of one backend, so
//! every backend runs the same suite:
//! - `mailbox_suite!` — `Mailbox`; `topology_suite!` — `Topology` and `Cursors`;
//! - `presence_suite!` — `Presence`; `membership_suite!` — `Membership`;
//! - `queue_suite!` — `Queue`.

pub mod mailbox;
pub mod membership;
pub mod presence;
pub mod queue;
pub mod topology;

/// The mailbox suite for one backend: `$make(retention_ms).await` gives `(keep, Arc<dyn
/// Mailbox>)` (`keep` lives as long as the test: a temp dir); `$retention` is the short
/// retention the expiry test uses (Cassandra's TTL has a granularity of seconds).
macro_rules! mailbox_suite {
    ($(#[$attr:meta])* make = $make:path, retention_ms = $retention:expr) => {
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn gap_free() {
            let (_keep, m) = $make(60_000).await;
            crate::contract::mailbox::gap_free(m, false).await;
        }
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn gap_free_minted() {
            let (_keep, m) = $make(60_000).await;
            crate::contract::mailbox::gap_free(m, true).await;
        }
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn large_append() {
            let (_keep, m) = $make(60_000).await;
            crate::contract::mailbox::large_append(m).await;
        }
        $(#[$attr])*
        #[tokio::test]
        async fn append_now() {
            let (_keep, m) = $make(60_000).await;
            crate::contract::mailbox::append_now(m).await;
        }
        $(#[$attr])*
        #[tokio::test]
        async fn idempotent() {
            let (_keep, m) = $make(60_000).await;
            crate::contract::mailbox::idempotent(m).await;
        }
        $(#[$attr])*
        #[tokio::test]
        async fn paging() {
            let (_keep, m) = $make(60_000).await;
            crate::contract::mailbox::paging(m).await;
        }
        $(#[$attr])*
        #[tokio::test]
        async fn history() {
            let (_keep, m) = $make(60_000).await;
            crate::contract::mailbox::history(m).await;
        }
        $(#[$attr])*
        #[tokio::test]
        async fn payload_roundtrip() {
            let (_keep, m) = $make(60_000).await;
            crate::contract::mailbox::payload_roundtrip(m).await;
        }
        $(#[$attr])*
        #[tokio::test]
        async fn retention() {
            let (_keep, m) = $make($retention).await;
            crate::contract::mailbox::retention(m, $retention).await;
        }
    };
}

/// The topology and cursors suite: `$make().await` gives `(keep, T)`, `T: Topology + Cursors`.
macro_rules! topology_suite {
    ($(#[$attr:meta])* make = $make:path) => {
        $(#[$attr])*
        #[tokio::test]
        async fn bindings() {
            let (_keep, t) = $make().await;
            crate::contract::topology::bindings(std::sync::Arc::new(t)).await;
        }
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_binds() {
            let (_keep, t) = $make().await;
            crate::contract::topology::concurrent_binds(std::sync::Arc::new(t)).await;
        }
        $(#[$attr])*
        #[tokio::test]
        async fn bind_limit() {
            let (_keep, t) = $make().await;
            crate::contract::topology::bind_limit(std::sync::Arc::new(t)).await;
        }
        $(#[$attr])*
        #[tokio::test]
        async fn revocation() {
            let (_keep, t) = $make().await;
            crate::contract::topology::revocation(std::sync::Arc::new(t)).await;
        }
        $(#[$attr])*
        #[tokio::test]
        async fn cursors() {
            let (_keep, t) = $make().await;
            crate::contract::topology::cursors(std::sync::Arc::new(t)).await;
        }
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn read_marks() {
            let (_keep, t) = $make().await;
            crate::contract::topology::read_marks(std::sync::Arc::new(t)).await;
        }
        $(#[$attr])*
        #[tokio::test]
        async fn expiry() {
            let (_keep, t) = $make().await;
            crate::contract::topology::expiry(std::sync::Arc::new(t)).await;
        }
    };
}

/// The presence suite: `$make().await` gives an `Arc<dyn Presence>`.
macro_rules! presence_suite {
    ($(#[$attr:meta])* make = $make:path) => {
        $(#[$attr])*
        #[tokio::test]
        async fn connect_disconnect_clear() {
            crate::contract::presence::connect_disconnect_clear($make().await).await;
        }
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn members_join_and_leave_once() {
            crate::contract::presence::members_join_and_leave_once($make().await).await;
        }
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn racing_connections_announce_once() {
            crate::contract::presence::racing_connections_announce_once($make().await).await;
        }
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_dead_nodes_members_leave() {
            crate::contract::presence::a_dead_nodes_members_leave($make().await).await;
        }
    };
}

/// The membership suite: `$cluster().await` gives a fresh cluster to make members in.
macro_rules! membership_suite {
    ($(#[$attr:meta])* cluster = $cluster:path) => {
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn lists_itself_leads_alone_and_is_a_member() {
            crate::contract::membership::lists_itself_leads_alone(&*$cluster().await).await;
        }
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn one_leader_and_a_hand_over_when_it_leaves() {
            crate::contract::membership::hand_over(&*$cluster().await).await;
        }
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn locks_exclude_time_out_and_pass_on() {
            crate::contract::membership::locks_between_members(&*$cluster().await).await;
        }
    };
}

/// The queue suite: `$backend().await` gives a `Box<dyn queue::Backend>` on a fresh store.
macro_rules! queue_suite {
    ($(#[$attr:meta])* backend = $backend:path) => {
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn wait_answers_the_applied_outcome() {
            crate::contract::queue::wait_answers_the_applied_outcome(&*$backend().await).await;
        }
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn queued_operations_apply_in_order_per_address() {
            crate::contract::queue::queued_operations_apply_in_order_per_address(&*$backend().await)
                .await;
        }
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_duplicate_id_is_applied_once() {
            crate::contract::queue::a_duplicate_id_is_applied_once(&*$backend().await).await;
        }
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn drain_finishes_and_then_refuses() {
            crate::contract::queue::drain_finishes_and_then_refuses(&*$backend().await).await;
        }
    };
}
