//! The embedded backend's data dir has an identity, so that a missing, emptied or foreign file
//! makes the node refuse to start instead of starting on an empty store (which would reuse
//! versions and drop every binding). A store id is written into `store.id` and into each redb
//! file (table `meta`, key `store_id`); at start every file must be there, non-empty, and carry
//! the stamp's id, and `resume.secret` must be there unless the secret is configured.

use super::NodeError;
use redb::{ReadableDatabase, TableDefinition};
use std::path::Path;

const STAMP: &str = "store.id";
/// The redb files of the embedded backend.
pub const FILES: &[&str] = &["mailbox.redb", "state.redb"];
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const KEY: &str = "store_id";

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
    let t = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    Ok(t.get(KEY)
        .map_err(|e| e.to_string())?
        .map(|v| v.value().to_string()))
}

fn write_id(path: &Path, id: &str) -> Result<(), String> {
    let db = redb::Database::create(path).map_err(|e| e.to_string())?;
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut t = txn.open_table(META).map_err(|e| e.to_string())?;
        t.insert(KEY, id).map_err(|e| e.to_string())?;
    }
    txn.commit().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
