//! Online backups of the embedded backend (`POST /server/backup`): a running node writes a
//! consistent copy of its store into `<data_dir>/backups/backup-<ms>/`, a data dir that a node
//! starts on as it is.
//!
//! Consistent: the bindings, cursors and read marks are copied first, as they are at one moment
//! (a redb read transaction); then the mailbox, as it is at one later moment, once every message
//! appended before that moment is stored. Every version a cursor or a read mark names was
//! appended before the first copy began, so the mailbox copy holds it, and each address's
//! versions run 1..head in it. Appends, deliveries and acks go on meanwhile. The copy is written
//! under a hidden name and renamed once whole and synced, so a backup that is there is complete.

use crate::mailbox::embedded::EmbeddedMailbox;
use crate::topology::embedded::EmbeddedTopology;
use redb::TableDefinition;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// The store id each redb file of a data dir carries (`meta`, key `store_id`): written here into
/// a backup's files and by `node::datadir` into a node's, and checked there at start.
pub(crate) const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
pub(crate) const STORE_ID: &str = "store_id";

/// Writes the store id into a redb file's `meta` table, in `txn`.
pub(crate) fn stamp(txn: &redb::WriteTransaction, store_id: &str) -> Result<(), redb::Error> {
    txn.open_table(META)?.insert(STORE_ID, store_id)?;
    Ok(())
}
/// redb's page cache for each file being written (its default is 1 GiB).
const CACHE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("a backup is being written already; try again when it is done")]
    Busy,
    #[error("writing the backup: {0}")]
    Io(#[from] std::io::Error),
    #[error("writing the backup: {0}")]
    Store(String),
}

fn store_err(e: impl std::fmt::Display) -> BackupError {
    BackupError::Store(e.to_string())
}

/// What a backup wrote.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// The backup's folder.
    pub dir: String,
    /// Messages in its mailbox.
    pub messages: u64,
    /// Bytes of its files.
    pub bytes: u64,
    pub seconds: f64,
}

/// The embedded stores of a node and its data dir, for backups (one at a time).
pub struct Backup {
    dir: PathBuf,
    mailbox: EmbeddedMailbox,
    topology: EmbeddedTopology,
    /// Whether `resume.secret` is kept in the data dir (no `resume_secret` configured).
    secret_file: bool,
    running: Mutex<()>,
}

impl Backup {
    pub fn new(
        dir: PathBuf,
        mailbox: EmbeddedMailbox,
        topology: EmbeddedTopology,
        secret_file: bool,
    ) -> Self {
        Self {
            dir,
            mailbox,
            topology,
            secret_file,
            running: Mutex::new(()),
        }
    }

    /// Writes a backup and says where. Blocking (seconds for a large store).
    pub fn run(&self) -> Result<Report, BackupError> {
        let _one = self.running.try_lock().map_err(|_| BackupError::Busy)?;
        let started = Instant::now();
        let root = self.dir.join("backups");
        std::fs::create_dir_all(&root)?;
        // What a backup cut short by the process's end left (one runs at a time, and no other
        // process can hold this data dir's store).
        for e in std::fs::read_dir(&root)? {
            let e = e?;
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with(".backup-") && n.ends_with(".partial") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let name = free_name(&root, crate::clock::now_ms());
        let partial = root.join(format!(".{name}.partial"));
        std::fs::create_dir(&partial)?;
        let messages = match self.write(&partial) {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(e);
            }
        };
        let dest = root.join(&name);
        std::fs::rename(&partial, &dest)?;
        sync_dir(&root)?;
        let mut bytes = 0;
        for f in std::fs::read_dir(&dest)? {
            bytes += f?.metadata()?.len();
        }
        Ok(Report {
            dir: dest.display().to_string(),
            messages,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The files of a data dir, in `to`; returns the messages copied.
    fn write(&self, to: &Path) -> Result<u64, BackupError> {
        let id = std::fs::read_to_string(self.dir.join("store.id"))?;
        let id = id.trim();
        // Bindings, cursors and read marks first: the mailbox copied after them holds every
        // version they name.
        copy_into(&to.join("state.redb"), id, |txn| {
            self.topology.backup_into(txn).map_err(store_err)?;
            Ok(0)
        })?;
        let messages = copy_into(&to.join("mailbox.redb"), id, |txn| {
            self.mailbox.backup_into(txn).map_err(store_err)
        })?;
        if self.secret_file {
            copy_synced(&self.dir.join("resume.secret"), &to.join("resume.secret"))?;
        }
        // Last, as in a data dir: the stamp vouches for the files before it.
        copy_synced(&self.dir.join("store.id"), &to.join("store.id"))?;
        sync_dir(to)?;
        Ok(messages)
    }
}

/// The backup's name: `backup-<ms>`, or `backup-<ms>-2`, … when two come within one millisecond.
fn free_name(root: &Path, ms: u64) -> String {
    (1..)
        .map(|i| match i {
            1 => format!("backup-{ms}"),
            i => format!("backup-{ms}-{i}"),
        })
        .find(|n| !root.join(n).exists())
        .expect("a free name")
}

/// A new redb file at `path` holding what `fill` copies into it, stamped with the store id, in
/// one transaction committed durably. (Its pages spill to the file as it grows: a copy of
/// 2.6 M messages, 540 MiB, added no more to the node's memory than the source's cache.)
fn copy_into(
    path: &Path,
    store_id: &str,
    fill: impl FnOnce(&redb::WriteTransaction) -> Result<u64, BackupError>,
) -> Result<u64, BackupError> {
    let db = redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(store_err)?;
    let txn = db.begin_write().map_err(store_err)?;
    let n = fill(&txn)?;
    stamp(&txn, store_id).map_err(store_err)?;
    txn.commit().map_err(store_err)?;
    Ok(n)
}

fn copy_synced(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::copy(from, to)?;
    std::fs::File::open(to)?.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::{Address, ClientId, MessageId};
    use crate::mailbox::{Mailbox, NewMessage};
    use crate::topology::{Binding, Cursors, Topology};
    use serde_json::value::RawValue;

    fn message(address: &Address, n: usize) -> NewMessage {
        NewMessage {
            address: address.clone(),
            id: MessageId::parse(&format!("m{n}")).unwrap(),
            payload: RawValue::from_string(n.to_string()).unwrap(),
            new_id: false,
        }
    }

    /// A backup taken while messages are still pending (in the log, not yet in redb) holds
    /// them, with the bindings and cursors, and a mailbox and topology opened on it read them.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_backup_holds_what_was_appended_and_bound_before_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("store.id"), "abc\n").unwrap();
        std::fs::write(dir.path().join("resume.secret"), "s").unwrap();
        let mailbox = EmbeddedMailbox::open(&dir.path().join("mailbox.redb"), 3_600_000).unwrap();
        let topology = EmbeddedTopology::open(&dir.path().join("state.redb")).unwrap();
        let a = Address::parse("channel:a").unwrap();
        let client = ClientId::parse("c1").unwrap();
        // Many at once: the applier lets them gather for its long window, so they are pending
        // when the backup begins.
        for round in 0..3 {
            let batch = (0..500).map(|i| message(&a, round * 500 + i)).collect();
            mailbox.append(batch).await.unwrap();
        }
        let binding = Binding {
            address: a.clone(),
            since: 0,
        };
        topology.add(&client, &[binding], 10).await.unwrap();
        topology
            .save(&[(client.clone(), a.clone(), 1500)], 3600)
            .await
            .unwrap();
        let backup = Backup::new(
            dir.path().to_path_buf(),
            mailbox.clone(),
            topology.clone(),
            true,
        );
        // What a backup cut short left is removed by the next.
        std::fs::create_dir_all(dir.path().join("backups/.backup-1.partial")).unwrap();
        {
            // One at a time.
            let _running = backup.running.lock().unwrap();
            assert!(matches!(backup.run(), Err(BackupError::Busy)));
        }
        let report = tokio::task::spawn_blocking(move || backup.run())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(report.messages, 1500);
        let copy = PathBuf::from(&report.dir);
        assert!(copy.starts_with(dir.path().join("backups")));
        assert_eq!(
            std::fs::read_to_string(copy.join("store.id")).unwrap(),
            "abc\n"
        );
        assert_eq!(std::fs::read(copy.join("resume.secret")).unwrap(), b"s");
        // Nothing partial is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("backups"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // Two within one millisecond get names of their own.
        let root = dir.path().join("backups");
        std::fs::create_dir(root.join("backup-7")).unwrap();
        assert_eq!(free_name(&root, 7), "backup-7-2");
        std::fs::create_dir(root.join("backup-7-2")).unwrap();
        assert_eq!(free_name(&root, 7), "backup-7-3");
        assert_eq!(free_name(&root, 8), "backup-8");
        // With `resume_secret` configured, the data dir keeps no secret, and neither does a backup.
        let without = Backup::new(
            dir.path().to_path_buf(),
            mailbox.clone(),
            topology.clone(),
            false,
        );
        let other = tokio::task::block_in_place(|| without.run()).unwrap();
        assert_ne!(other.dir, report.dir);
        assert!(!PathBuf::from(&other.dir).join("resume.secret").exists());
        assert!(PathBuf::from(&other.dir).join("store.id").exists());
        drop(without);
        // Appends after the backup are not in it.
        mailbox.append(vec![message(&a, 9999)]).await.unwrap();
        drop((mailbox, topology));
        let restored = EmbeddedMailbox::open(&copy.join("mailbox.redb"), 3_600_000).unwrap();
        let page = restored.read(&a, 0, 2000).await.unwrap();
        assert_eq!(page.head.head, 1500);
        let versions: Vec<u64> = page.messages.iter().map(|m| m.version).collect();
        assert_eq!(versions, (1..=1500).collect::<Vec<u64>>());
        assert_eq!(page.messages[1499].payload_json(), "1499");
        // An id appended before is still known: sending it again is a duplicate.
        let again = restored.append(vec![message(&a, 7)]).await.unwrap();
        assert!(again[0].duplicate);
        assert_eq!(again[0].message.version, 8);
        let topology = EmbeddedTopology::open(&copy.join("state.redb")).unwrap();
        assert_eq!(
            Topology::get(&topology, &client).await.unwrap()[0].address,
            a
        );
        assert_eq!(Cursors::get(&topology, &client).await.unwrap()[&a], 1500);
    }
}
