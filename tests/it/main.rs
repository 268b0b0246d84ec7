//! Integration tests: every trait's contract suite against every backend available here.
//! (The cluster backends join this list with the real-stack issue.)

use signalpost::mailbox::Mailbox;
use signalpost::mailbox::embedded::EmbeddedMailbox;
use signalpost::presence::{MemoryPresence, Presence};
use signalpost::topology::embedded::EmbeddedTopology;
use signalpost::topology::{Cursors, Topology};
use signalpost::{mailbox, presence, topology};
use std::sync::Arc;

mod kafka;

fn embedded_mailbox(retention_ms: u64) -> (tempfile::TempDir, Arc<dyn Mailbox>) {
    let dir = tempfile::tempdir().unwrap();
    let m = EmbeddedMailbox::open(&dir.path().join("m.redb"), retention_ms).unwrap();
    (dir, Arc::new(m))
}

fn embedded_topology() -> (tempfile::TempDir, EmbeddedTopology) {
    let dir = tempfile::tempdir().unwrap();
    let t = EmbeddedTopology::open(&dir.path().join("t.redb")).unwrap();
    (dir, t)
}

mod embedded_mailbox {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gap_free() {
        let (_d, m) = embedded_mailbox(60_000);
        mailbox::contract::gap_free(m).await;
    }

    #[tokio::test]
    async fn idempotent() {
        let (_d, m) = embedded_mailbox(60_000);
        mailbox::contract::idempotent(m).await;
    }

    #[tokio::test]
    async fn paging() {
        let (_d, m) = embedded_mailbox(60_000);
        mailbox::contract::paging(m).await;
    }

    #[tokio::test]
    async fn payload_roundtrip() {
        let (_d, m) = embedded_mailbox(60_000);
        mailbox::contract::payload_roundtrip(m).await;
    }

    #[tokio::test]
    async fn retention() {
        let (_d, m) = embedded_mailbox(1_000);
        mailbox::contract::retention(m, 1_000).await;
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let a = mailbox::contract::fresh_address("channel", "reopen");
        {
            let m = EmbeddedMailbox::open(&path, 60_000).unwrap();
            m.append(
                (0..5)
                    .map(|i| mailbox::contract::msg(&a, &format!("r{i}")))
                    .collect(),
            )
            .await
            .unwrap();
        }
        let m = EmbeddedMailbox::open(&path, 60_000).unwrap();
        let again = m
            .append(vec![
                mailbox::contract::msg(&a, "r4"),
                mailbox::contract::msg(&a, "r5"),
            ])
            .await
            .unwrap();
        assert_eq!(
            (again[0].message.version, again[0].duplicate),
            (5, true),
            "ids survive a restart"
        );
        assert_eq!(
            (again[1].message.version, again[1].duplicate),
            (6, false),
            "versions go on after a restart"
        );
    }
}

mod embedded_topology {
    use super::*;

    #[tokio::test]
    async fn bindings() {
        let (_d, t) = embedded_topology();
        topology::contract::bindings(Arc::new(t) as Arc<dyn Topology>).await;
    }

    #[tokio::test]
    async fn members_paging() {
        let (_d, t) = embedded_topology();
        topology::contract::members_paging(Arc::new(t) as Arc<dyn Topology>).await;
    }

    #[tokio::test]
    async fn cursors() {
        let (_d, t) = embedded_topology();
        topology::contract::cursors(Arc::new(t) as Arc<dyn Cursors>).await;
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let c = signalpost::address::ClientId::parse("persist").unwrap();
        let a = mailbox::contract::fresh_address("channel", "persist");
        {
            let t = EmbeddedTopology::open(&path).unwrap();
            Topology::add(
                &t,
                &c,
                &[topology::Binding {
                    address: a.clone(),
                    since: 3,
                }],
            )
            .await
            .unwrap();
            Cursors::save(&t, &[(c.clone(), a.clone(), 9)])
                .await
                .unwrap();
        }
        let t = EmbeddedTopology::open(&path).unwrap();
        assert_eq!(
            Topology::get(&t, &c).await.unwrap(),
            vec![topology::Binding {
                address: a.clone(),
                since: 3
            }]
        );
        assert_eq!(Cursors::get(&t, &c).await.unwrap().get(&a), Some(&9));
    }
}

mod memory_presence {
    use super::*;

    #[tokio::test]
    async fn connect_disconnect_clear() {
        presence::contract::connect_disconnect_clear(
            Arc::new(MemoryPresence::default()) as Arc<dyn Presence>
        )
        .await;
    }
}
