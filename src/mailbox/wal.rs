//! The embedded mailbox's write-ahead log: the durable record of appends that redb has committed
//! without an fsync of its own.
//!
//! A redb commit that is durable writes every B-tree page the batch touched and fsyncs them: with
//! one message per request that was about half of a publish's cost. With the log, a batch is
//! written here as **one sequential record in one synchronous write** (`O_DSYNC`, into blocks the
//! file already has, so the file system has no metadata to commit), and its redb commit is non-durable. Every
//! so often (a *checkpoint*) one redb commit is durable, which makes every earlier one durable
//! too; the log then starts again from its beginning under the next *generation*.
//!
//! Where the file system takes it (ext4, xfs…; not every one does), the log is written with
//! `O_DIRECT` too: the record goes from the node's buffer to the disk, without a copy into the
//! page cache and the file system's write-back of it, which took a sixth off each write's time
//! (docs/benchmarks.md, "The mailbox log written direct"). Direct writes are whole aligned
//! blocks, so each append writes again the block the last record ended in — its earlier bytes as
//! they were, then the new record, then zeros to the block's end — and the records stay packed
//! one after another: the file is the same either way, and a log written one way is read and
//! continued the other.
//!
//! Record: `magic u32 | generation u64 | length u32 | crc32 u32 | payload`, little-endian; the
//! CRC covers the generation, the length and the payload. Reading stops at the first record
//! that is not of the expected generation or does not check out: a torn last write, an older
//! generation's leftovers, or the zeros the file is extended with.
//!
//! The generation a reader expects is kept in redb and moves forward only in a durable commit
//! (the checkpoint), so after a crash the log holds exactly the batches since redb's last
//! durable state — some of which may be in redb already (a later durable commit of another
//! kind), which is why the mailbox replays by version, idempotently.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const MAGIC: u32 = 0x5350_574c; // "SPWL"
const HEADER: usize = 4 + 8 + 4 + 4;
/// The file grows by this much (zero-filled and synced once), so that appends overwrite blocks
/// the file already has. (The embedded mailbox reserves a checkpoint's worth at open,
/// [`Wal::reserve`], so a log rarely grows while the node runs.)
const GROW: u64 = 1 << 20;
/// What a direct write's offset, length and buffer address are multiples of: the page size,
/// which is also a multiple of any disk's logical block size.
const ALIGN: usize = 4096;

/// An open log, positioned after its last valid record.
pub struct Wal {
    path: PathBuf,
    /// Appends: `O_DSYNC`, and `O_DIRECT` where the file system takes it.
    file: File,
    /// Through the page cache: the records read at open, and the zeros the file grows by.
    plain: File,
    /// Appends bypass the page cache: each one writes whole blocks from `buf`, starting with
    /// the block the last record ended in.
    direct: bool,
    generation: u64,
    /// Where the next record goes.
    pos: u64,
    /// The file's length (all of it zero-filled or written, and synced).
    len: u64,
    /// Direct appends: starts with the bytes of the last partly written block before `pos`
    /// ([`Wal::tail`] of them), so the block can be written again whole, with the next record.
    buf: Aligned,
    /// Tests: the next direct write is refused as a file system may refuse it.
    #[cfg(test)]
    refuse_direct: bool,
}

impl Wal {
    /// Opens (or creates) the log and reads the payloads of its records of `generation`, in
    /// order. Appends go after them until [`Wal::restart`].
    pub fn open(path: &Path, generation: u64) -> io::Result<(Self, Vec<Vec<u8>>)> {
        Self::open_with(path, generation, true)
    }

    /// [`Wal::open`], writing through the page cache unless `direct` (and the file system
    /// takes `O_DIRECT`).
    fn open_with(path: &Path, generation: u64, direct: bool) -> io::Result<(Self, Vec<Vec<u8>>)> {
        let plain = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = plain.metadata()?.len();
        let mut records = Vec::new();
        let mut pos = 0u64;
        let mut head = [0u8; HEADER];
        while pos + HEADER as u64 <= len {
            plain.read_exact_at(&mut head, pos)?;
            let magic = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
            let g = u64::from_le_bytes(head[4..12].try_into().expect("8 bytes"));
            let n = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as u64;
            let crc = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes"));
            if magic != MAGIC || g != generation || pos + HEADER as u64 + n > len {
                break;
            }
            let mut payload = vec![0u8; n as usize];
            plain.read_exact_at(&mut payload, pos + HEADER as u64)?;
            if checksum(g, n as u32, &payload) != crc {
                break;
            }
            records.push(payload);
            pos += HEADER as u64 + n;
        }
        let (file, direct) = open_writer(path, direct)?;
        let mut w = Self {
            path: path.to_owned(),
            file,
            plain,
            direct,
            generation,
            pos,
            len,
            buf: Aligned::new(4 * ALIGN),
            #[cfg(test)]
            refuse_direct: false,
        };
        let tail = w.tail();
        w.plain
            .read_exact_at(&mut w.buf.bytes()[..tail], pos - tail as u64)?;
        Ok((w, records))
    }

    /// Direct appends: how far into its block the next record starts (the bytes before it in
    /// that block are written again with it). Zero through the page cache.
    fn tail(&self) -> usize {
        if self.direct {
            (self.pos % ALIGN as u64) as usize
        } else {
            0
        }
    }

    /// Bytes written since the last restart.
    pub fn written(&self) -> u64 {
        self.pos
    }

    /// Writes one record and waits until it is on disk.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        let n = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "log record over 4 GiB"))?;
        let size = HEADER + payload.len();
        let end = self.pos + size as u64;
        if end > self.len {
            self.grow(end)?;
        }
        let tail = self.tail();
        let whole = (tail + size).next_multiple_of(ALIGN);
        let buf = self.buf.reserve(whole, tail);
        buf[tail..tail + 4].copy_from_slice(&MAGIC.to_le_bytes());
        buf[tail + 4..tail + 12].copy_from_slice(&self.generation.to_le_bytes());
        buf[tail + 12..tail + 16].copy_from_slice(&n.to_le_bytes());
        buf[tail + 16..tail + 20]
            .copy_from_slice(&checksum(self.generation, n, payload).to_le_bytes());
        buf[tail + HEADER..tail + size].copy_from_slice(payload);
        if self.direct {
            // Whole blocks, from the start of the one the last record ended in: its first
            // `tail` bytes are written again as they are, and the rest of the last block is
            // zeros, as the file is there. (A write torn at a sector leaves each sector old or
            // new; old and new agree on every byte written before.)
            buf[tail + size..whole].fill(0);
            let at = self.pos - tail as u64;
            #[cfg(not(test))]
            let written = self.file.write_all_at(&buf[..whole], at);
            #[cfg(test)]
            let written = if std::mem::take(&mut self.refuse_direct) {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                self.file.write_all_at(&buf[..whole], at)
            };
            match written {
                Ok(()) => {
                    self.pos = end;
                    // The block `pos` is in, up to `pos`, goes to the buffer's start for the
                    // next append.
                    let next = (end % ALIGN as u64) as usize;
                    buf.copy_within(whole - ALIGN..whole - ALIGN + next, 0);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // The file system opened the file for direct I/O but refuses these writes:
                    // go on through the page cache.
                    tracing::warn!(error = %e, "direct writes to the mailbox log refused; writing through the page cache");
                    self.file = open_writer(&self.path, false)?.0;
                    self.direct = false;
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(&buf[tail..tail + size], self.pos)?;
        self.pos = end;
        Ok(())
    }

    /// Starts again from the beginning under `generation`: the caller has made everything logged
    /// so far durable elsewhere and recorded `generation` as the one to read.
    pub fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.pos = 0;
    }

    /// Extends the file with zeros to at least `len` bytes and syncs it once, if it is shorter:
    /// appends below that length then never extend the file in the middle of a publish (a
    /// mebibyte of zeros and an fsync, ~2.5 ms here, that the appends behind it waited for).
    pub fn reserve(&mut self, len: u64) -> io::Result<()> {
        if len > self.len {
            self.grow(len)?;
        }
        Ok(())
    }

    /// Extends the file with zeros past `end` and syncs it (data and length) once, so that later
    /// appends below the new length need only flush their own blocks.
    fn grow(&mut self, end: u64) -> io::Result<()> {
        let new_len = end.div_ceil(GROW) * GROW;
        let zeros = vec![0u8; GROW as usize];
        let mut at = self.len;
        while at < new_len {
            let n = (new_len - at).min(GROW);
            self.plain.write_all_at(&zeros[..n as usize], at)?;
            at += n;
        }
        self.plain.sync_all()?;
        self.len = new_len;
        Ok(())
    }
}

/// Opens the log for appends: `O_DSYNC` (each write returns once its data is on disk, one system
/// call where `pwrite` and `fdatasync` were two: measured on this machine's disk, p50 0.115 ms
/// against 0.133, p99 0.184 against 0.224), and with `direct`, `O_DIRECT` as well where the file
/// system takes it: the record goes from the buffer to the disk without a copy into the page
/// cache and the file system's write-back of it (see docs/benchmarks.md, "The mailbox log
/// written direct"). Returns whether the writes are direct.
fn open_writer(path: &Path, direct: bool) -> io::Result<(File, bool)> {
    let open = |flags| {
        OpenOptions::new()
            .write(true)
            .custom_flags(flags)
            .open(path)
    };
    #[cfg(target_os = "linux")]
    if direct {
        match open(libc::O_DSYNC | libc::O_DIRECT) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(
                    "the file system has no direct I/O; the mailbox log writes through the page cache"
                );
            }
            Err(e) => return Err(e),
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = direct;
    Ok((open(libc::O_DSYNC)?, false))
}

/// A byte buffer whose start is [`ALIGN`]ed, as direct writes need: a plain vector one
/// alignment longer, used from its first aligned byte on (the heap block never moves while
/// the vector is not resized, and it never is).
struct Aligned {
    raw: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new(capacity: usize) -> Self {
        let raw = vec![0u8; capacity + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        Self { raw, start }
    }

    fn bytes(&mut self) -> &mut [u8] {
        let end = self.raw.len() - ALIGN + self.start;
        &mut self.raw[self.start..end]
    }

    /// The buffer, at least `len` bytes long, keeping its first `keep` bytes.
    fn reserve(&mut self, len: usize, keep: usize) -> &mut [u8] {
        if self.raw.len() - ALIGN < len {
            let mut bigger = Self::new(len.next_power_of_two());
            bigger.bytes()[..keep].copy_from_slice(&self.bytes()[..keep]);
            *self = bigger;
        }
        self.bytes()
    }
}

fn checksum(generation: u64, n: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(&n.to_le_bytes());
    h.update(payload);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each test runs with appends through the page cache and direct (where the temp dir's file
    /// system takes it), which must give the same file.
    const MODES: [bool; 2] = [false, true];

    /// A new, empty log in a temp dir (deleted when the first element is dropped).
    fn new_log(generation: u64, direct: bool) -> (tempfile::TempDir, PathBuf, Wal) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w");
        let (w, old) = Wal::open_with(&p, generation, direct).unwrap();
        assert!(old.is_empty());
        (dir, p, w)
    }

    #[test]
    fn records_come_back_in_order_until_the_generation_changes() {
        for direct in MODES {
            let (_dir, p, mut w) = new_log(7, direct);
            w.append(b"one").unwrap();
            w.append(b"two").unwrap();
            drop(w);
            let (mut w, got) = Wal::open_with(&p, 7, direct).unwrap();
            assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);
            // Appends go on after what was read.
            w.append(b"three").unwrap();
            drop(w);
            assert_eq!(Wal::open_with(&p, 7, direct).unwrap().1.len(), 3);
            // Another generation reads nothing of these.
            assert!(Wal::open_with(&p, 8, direct).unwrap().1.is_empty());
        }
    }

    #[test]
    fn a_restart_hides_the_older_generation_behind_it() {
        for direct in MODES {
            let (_dir, p, mut w) = new_log(1, direct);
            for i in 0..100u8 {
                w.append(&[i; 100]).unwrap();
            }
            w.restart(2);
            w.append(b"new").unwrap();
            drop(w);
            // The generation-1 records after the new one are not read as generation 2.
            assert_eq!(
                Wal::open_with(&p, 2, direct).unwrap().1,
                vec![b"new".to_vec()]
            );
        }
    }

    #[test]
    fn a_torn_or_corrupt_record_ends_the_log() {
        for direct in MODES {
            let (_dir, p, mut w) = new_log(1, direct);
            w.append(b"kept").unwrap();
            w.append(b"torn").unwrap();
            w.append(b"after").unwrap();
            drop(w);
            // Flip one byte of the second payload.
            let f = OpenOptions::new().write(true).open(&p).unwrap();
            f.write_all_at(b"X", (HEADER + 4 + HEADER) as u64).unwrap();
            drop(f);
            assert_eq!(
                Wal::open_with(&p, 1, direct).unwrap().1,
                vec![b"kept".to_vec()]
            );
        }
    }

    /// A reserved file is zero-filled to that length once; appends below it leave the length
    /// as it is (no growth while the node runs), and the records before and after read back.
    #[test]
    fn a_reserved_log_keeps_its_length_and_its_records() {
        for direct in MODES {
            let (_dir, p, mut w) = new_log(5, direct);
            w.append(b"before").unwrap();
            w.reserve(3 * GROW + 1).unwrap();
            assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 * GROW);
            for i in 0..600u32 {
                w.append(&i.to_le_bytes().repeat(1000)).unwrap();
            }
            assert!(w.written() > GROW && w.written() < 4 * GROW);
            assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 * GROW);
            // Reserving less than the file has changes nothing.
            w.reserve(GROW).unwrap();
            assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 * GROW);
            drop(w);
            let got = Wal::open_with(&p, 5, direct).unwrap().1;
            assert_eq!(got.len(), 601);
            assert_eq!(got[0], b"before");
            assert_eq!(got[600], 599u32.to_le_bytes().repeat(1000));
        }
    }

    /// A file system that opens the file for direct I/O and then refuses a direct write: that
    /// record and the ones after it go through the page cache, right after the records before.
    #[test]
    fn a_refused_direct_write_goes_on_through_the_page_cache() {
        let (_dir, p, mut w) = new_log(4, true);
        if !w.direct {
            return; // the temp dir's file system has no direct I/O: nothing to refuse
        }
        w.append(b"direct").unwrap();
        w.refuse_direct = true;
        w.append(b"refused, then buffered").unwrap();
        assert!(!w.direct);
        w.append(b"buffered").unwrap();
        drop(w);
        let want = [&b"direct"[..], b"refused, then buffered", b"buffered"].map(|r| r.to_vec());
        assert_eq!(Wal::open_with(&p, 4, true).unwrap().1, want);
    }

    /// Records of every size across block boundaries, a record larger than the buffer and one
    /// larger than a step of growth; the file written one way is read and continued the other
    /// way (an upgrade or a file system without direct I/O), and read back whole.
    #[test]
    fn records_across_blocks_read_back_whichever_way_they_were_written() {
        for first in MODES {
            let (_dir, p, mut w) = new_log(3, first);
            let mut want: Vec<Vec<u8>> = Vec::new();
            let mut k = 0u32;
            let mut next = |len: usize| {
                k += 1;
                (0..len)
                    .map(|i| (i as u32 ^ k.wrapping_mul(2_654_435_761)) as u8)
                    .collect::<Vec<u8>>()
            };
            for len in (0..9000)
                .step_by(97)
                .chain([20_000, 3 * GROW as usize, 1, 4075, 4076])
            {
                let r = next(len);
                w.append(&r).unwrap();
                want.push(r);
            }
            drop(w);
            let (mut w, got) = Wal::open_with(&p, 3, !first).unwrap();
            assert_eq!(got.len(), want.len());
            assert!(got == want, "the records come back as written");
            for len in [5, 4096, 10_000, 0, 333] {
                let r = next(len);
                w.append(&r).unwrap();
                want.push(r);
            }
            drop(w);
            for direct in MODES {
                let got = Wal::open_with(&p, 3, direct).unwrap().1;
                assert!(
                    got == want,
                    "written {first}, continued {}, read {direct}",
                    !first
                );
            }
        }
    }
}
