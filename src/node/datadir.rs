//! The embedded backend's data dir has an identity, so that a missing, emptied or foreign file
//! makes the node refuse to start instead of starting on an empty store (which would reuse
//! versions and drop every binding). A store id is written into `store.id` and into each redb
//! file (table `meta`, key `store_id`); at start every file must be there, non-empty, and carry
//! the stamp's id, and `resume.secret` must be there unless the secret is configured.
//!
//! [`compact`] gives back to the file system the space a stopped node's redb files no longer use
//! (`signalpost compact`): they are copy-on-write and never shrink by themselves.

use super::NodeError;
use redb::ReadableDatabase;
use std::path::Path;

const STAMP: &str = "store.id";
/// The redb files of the embedded backend.
pub const FILES: &[&str] = &["mailbox.redb", "state.redb"];

fn refuse(dir: &Path, what: String) -> NodeError {
    NodeError::DataDir(
        dir.display().to_string(),
        std::io::Error::other(format!(
            "{what}; refusing to start on a store that is not whole (restore the data dir from a backup, or start on an empty dir to begin a new store — see docs/operations.md)"
        )),
    )
}

/// Checks the data dir's identity, or stamps a new (or pre-stamp) one. `secret_file`: whether
/// `resume.secret` is kept in the dir (no `resume_secret` configured).
pub fn check_or_stamp(dir: &Path, secret_file: bool) -> Result<(), NodeError> {
    let io = |e: std::io::Error| NodeError::DataDir(dir.display().to_string(), e);
    let stamp = dir.join(STAMP);
    match std::fs::read_to_string(&stamp) {
        Ok(id) => {
            let id = id.trim();
            for f in FILES {
                let path = dir.join(f);
                match std::fs::metadata(&path) {
                    Err(_) => return Err(refuse(dir, format!("{f} is missing (store {id})"))),
                    Ok(m) if m.len() == 0 => {
                        return Err(refuse(dir, format!("{f} is empty (store {id})")));
                    }
                    Ok(_) => {}
                }
                let found = read_id(&path).map_err(|e| refuse(dir, format!("{f}: {e}")))?;
                match found {
                    Some(x) if x == id => {}
                    Some(x) => {
                        return Err(refuse(
                            dir,
                            format!("{f} belongs to store {x}, not to this data dir's store {id}"),
                        ));
                    }
                    None => {
                        return Err(refuse(dir, format!("{f} carries no store id (store {id})")));
                    }
                }
            }
            if secret_file && !dir.join("resume.secret").exists() {
                return Err(refuse(
                    dir,
                    format!(
                        "resume.secret is missing (store {id}): every client's resume token would die"
                    ),
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A new data dir, or one from before stamps: the files that are there join a new
            // store id (they cannot be checked against anything yet).
            let id = uuid::Uuid::new_v4().simple().to_string();
            for f in FILES {
                write_id(&dir.join(f), &id).map_err(|e| refuse(dir, format!("{f}: {e}")))?;
            }
            // Everything the stamp vouches for exists before the stamp does.
            if secret_file {
                crate::security::load_or_create_secret(dir, "resume.secret").map_err(io)?;
            }
            let tmp = dir.join(format!("{STAMP}.tmp"));
            std::fs::write(&tmp, &id).map_err(io)?;
            std::fs::rename(&tmp, &stamp).map_err(io)?;
            tracing::info!(store = %id, "data dir stamped with a new store id");
            Ok(())
        }
        Err(e) => Err(io(e)),
    }
}

fn read_id(path: &Path) -> Result<Option<String>, String> {
    let db = redb::Database::open(path).map_err(|e| e.to_string())?;
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let t = match txn.open_table(crate::backup::META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    Ok(t.get(crate::backup::STORE_ID)
        .map_err(|e| e.to_string())?
        .map(|v| v.value().to_string()))
}

fn write_id(path: &Path, id: &str) -> Result<(), String> {
    let db = redb::Database::create(path).map_err(|e| e.to_string())?;
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    crate::backup::stamp(&txn, id).map_err(|e| e.to_string())?;
    txn.commit().map_err(|e| e.to_string())
}

/// redb's page cache while compacting (its default is 1 GiB, which a compaction of a large file
/// fills without going faster).
const COMPACT_CACHE_BYTES: usize = 64 << 20;

/// What compacting one file did: its size before and after, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compacted {
    pub file: &'static str,
    pub before: u64,
    pub after: u64,
}

/// Compacts the redb files of a stopped node's data dir in place, file by file: live pages move
/// to the front and the file is cut after them. Each step is a durable redb commit, so a
/// compaction that is stopped leaves a whole store. Refuses a dir that is not a stamped data dir,
/// and a file that a running node holds (redb's file lock).
pub fn compact(dir: &Path) -> Result<Vec<Compacted>, NodeError> {
    let fail =
        |what: String| NodeError::DataDir(dir.display().to_string(), std::io::Error::other(what));
    match std::fs::metadata(dir.join(STAMP)) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(fail(format!(
                "no {STAMP} here: not the data dir of an embedded node (nothing compacted)"
            )));
        }
        Err(e) => return Err(NodeError::DataDir(dir.display().to_string(), e)),
    }
    let size = |f: &str| {
        std::fs::metadata(dir.join(f))
            .map(|m| m.len())
            .map_err(|e| fail(format!("{f}: {e}")))
    };
    let mut out = Vec::new();
    for &file in FILES {
        let before = size(file)?;
        let mut db = match redb::Builder::new()
            .set_cache_size(COMPACT_CACHE_BYTES)
            .open(dir.join(file))
        {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(fail(format!(
                    "{file} is open in a running node: stop the node first"
                )));
            }
            Err(e) => return Err(fail(format!("{file}: {e}"))),
        };
        while db
            .compact()
            .map_err(|e| fail(format!("compacting {file}: {e}")))?
        {}
        drop(db);
        out.push(Compacted {
            file,
            before,
            after: size(file)?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableTableMetadata, TableDefinition};

    fn refused(dir: &Path, secret: bool) -> String {
        check_or_stamp(dir, secret).unwrap_err().to_string()
    }

    #[test]
    fn missing_empty_or_foreign_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        check_or_stamp(d.path(), false).unwrap();
        check_or_stamp(d.path(), false).unwrap();
        let mailbox = d.path().join("mailbox.redb");
        std::fs::write(&mailbox, b"").unwrap();
        assert!(refused(d.path(), false).contains("mailbox.redb is empty"));
        std::fs::remove_file(&mailbox).unwrap();
        assert!(refused(d.path(), false).contains("mailbox.redb is missing"));
        // Another store's file put in its place.
        let other = tempfile::tempdir().unwrap();
        check_or_stamp(other.path(), false).unwrap();
        std::fs::copy(other.path().join("mailbox.redb"), &mailbox).unwrap();
        assert!(refused(d.path(), false).contains("belongs to store"));
        std::fs::copy(other.path().join("state.redb"), d.path().join("state.redb")).unwrap();
        std::fs::copy(other.path().join("store.id"), d.path().join("store.id")).unwrap();
        check_or_stamp(d.path(), false).unwrap();
        assert!(refused(d.path(), true).contains("resume.secret is missing"));
    }

    #[test]
    fn compact_gives_freed_space_back_and_keeps_what_is_stored() {
        let d = tempfile::tempdir().unwrap();
        // Not a data dir yet: refused, nothing created.
        assert!(
            compact(d.path())
                .unwrap_err()
                .to_string()
                .contains("not the data dir")
        );
        assert!(!d.path().join("mailbox.redb").exists());
        check_or_stamp(d.path(), false).unwrap();
        const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
        let path = d.path().join("mailbox.redb");
        {
            let db = redb::Database::open(&path).unwrap();
            let value = vec![7u8; 1000];
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(T).unwrap();
                for k in 0..20_000u64 {
                    t.insert(k, value.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(T).unwrap();
                for k in 100..20_000u64 {
                    t.remove(k).unwrap();
                }
            }
            txn.commit().unwrap();
            // While the file is open (as in a running node), it is refused.
            assert!(
                compact(d.path())
                    .unwrap_err()
                    .to_string()
                    .contains("open in a running node")
            );
        }
        let done = compact(d.path()).unwrap();
        assert_eq!(
            done.iter().map(|c| c.file).collect::<Vec<_>>(),
            FILES.to_vec()
        );
        let m = &done[0];
        assert!(m.before > 15_000_000, "{m:?}");
        assert!(m.after < m.before / 10, "{m:?}");
        assert_eq!(m.after, std::fs::metadata(&path).unwrap().len());
        // What was kept reads the same, and the store is still whole.
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(T).unwrap();
        assert_eq!(t.len().unwrap(), 100);
        assert_eq!(
            t.get(99).unwrap().unwrap().value(),
            vec![7u8; 1000].as_slice()
        );
        drop((t, txn, db));
        check_or_stamp(d.path(), false).unwrap();
    }
}
