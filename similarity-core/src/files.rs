//! The filesystem: every file the library reads or writes goes through this module.
//!
//! Models, checkpoints, caches, logs and exports are all written and read here, with
//! these guarantees:
//!
//! * **Atomic files.** [`write_file_with`] (and [`write_json`], [`write_tensors`]) write
//!   a hidden temporary sibling `.<name>.tmp-<pid>-<ns>`, sync it, rename it over the
//!   target and sync the parent directory: a reader or a crash sees the old file or the
//!   complete new one. A target that exists but is not a regular file (a directory, a
//!   FIFO, a device, a symbolic link) is refused and left as it is.
//! * **Atomic directories.** [`write_dir`] fills a hidden sibling `.<name>.tmp-…`, syncs
//!   every file and directory in it, then swaps it with the target in one
//!   `renameat2(RENAME_EXCHANGE)` (Linux), so the target path never stops naming a
//!   complete directory; the previous content, now under the temporary name, is removed.
//!   Where the kernel or the filesystem cannot exchange, two renames are used, and a crash
//!   between them leaves no directory at the target (the previous one is swept by the next
//!   write; it is never read back, so a model the user deleted never comes back).
//! * **Ownership.** Every directory this library writes holds a marker file
//!   [`MARKER`] that names its [`DirKind`] (model, checkpoint, cache, logs). A target
//!   directory is replaced only when it is empty or holds the marker of the same kind
//!   (a model is never saved over a logs directory); anything else is an error that names
//!   it, and nothing in it is touched.
//! * **One writer.** A writer holds an advisory lock (`flock`, through
//!   [`std::fs::File::try_lock`]) on the sibling `.<name>.lock` while it writes; a second
//!   writer gets [`Error::InUse`] naming the process that holds it, instead of damaging
//!   the first one's work. Lock files are kept; they hold the holder's process id while
//!   the lock is held and are empty otherwise.
//! * **Consistent reads.** A directory's marker carries a fresh id at every write;
//!   [`read_dir_consistently`] holds a shared lock on the marker while it reads and a
//!   writer holds it exclusively to swap, so a swap waits for the readers of the version
//!   it replaces and a reader never mixes two versions (a reader that loses the race to a
//!   swap sees the id change and reads again).
//! * **Sweeps.** Under the writer's lock, the hidden `.<name>.tmp-*` and `.<name>.old-*`
//!   siblings that killed writers left are removed, but only when they are empty or hold
//!   the marker. Temporary files of killed file writes are removed when the process that
//!   wrote them is gone.
//! * **Bounded reads of regular files.** [`read_bytes`] opens without blocking (a FIFO
//!   cannot hang it), refuses anything that is not a regular file (a FIFO, a device such
//!   as `/dev/zero`, a directory), and refuses a file larger than the limit its caller
//!   decided before reading; it then reads exactly the size it saw.
//!
//! Power loss is covered as far as `fsync` of files and parent directories goes; a
//! filesystem that does not honour it can still lose the last write.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use candle_core::{Device, Tensor};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::limits;

/// Name of the marker file in every directory this library writes as a whole (models,
/// checkpoints, caches).
pub const MARKER: &str = ".similarity";

/// What a directory written by [`write_dir`] holds; its [`MARKER`] names it, and a
/// directory is only ever replaced by one of the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    /// A servable model.
    Model,
    /// A training checkpoint.
    Checkpoint,
    /// A persisted embedding cache.
    Cache,
    /// Training logs (`metrics.csv`, `metrics.jsonl`, `curves.svg`).
    Logs,
    /// Anything else written through [`write_dir`].
    Other,
}

impl DirKind {
    fn name(self) -> &'static str {
        match self {
            DirKind::Model => "model",
            DirKind::Checkpoint => "checkpoint",
            DirKind::Cache => "cache",
            DirKind::Logs => "logs",
            DirKind::Other => "directory",
        }
    }
}

/// A fresh id for a marker: process, time and a counter, distinct across writes.
fn fresh_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        now_nanos(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            Error::invalid(
                format!("path `{}`", path.display()),
                "has no final component (a file or directory name)",
            )
        })
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.<name>.<tag>-<pid>-<ns>` beside `path`.
fn hidden_sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    let name = file_name(path)?;
    Ok(path.with_file_name(format!(".{name}.{tag}-{}", fresh_id())))
}

fn create_parent(path: &Path) -> Result<()> {
    let parent = parent_of(path);
    fs::create_dir_all(parent).map_err(|e| Error::io("cannot create", parent, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directories are opened read-only to sync them; some filesystems refuse, which
    // costs durability, not correctness.
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
    Ok(())
}

// ---- reads ---------------------------------------------------------------------------

/// Opens `path` for reading if it is a regular file of at most `limit` bytes; returns the
/// file and its size. The open does not block (a FIFO cannot hang it); symbolic links are
/// followed, and what they point to must be a regular file too.
pub fn open_regular(path: &Path, limit: u64) -> Result<(File, u64)> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options
        .open(path)
        .map_err(|e| Error::io("cannot open", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io("cannot stat", path, e))?;
    if !meta.is_file() {
        return Err(Error::format(
            path,
            format!(
                "is not a regular file (it is {}); only regular files are read",
                kind_of(&meta)
            ),
        ));
    }
    if meta.len() > limit {
        return Err(Error::format(
            path,
            format!(
                "is {} bytes, more than the {limit} this file may have",
                meta.len()
            ),
        ));
    }
    Ok((file, meta.len()))
}

fn kind_of(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// The bytes of the regular file `path`, which may hold at most `limit` bytes.
pub fn read_bytes(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path, limit)?;
    let expected = usize::try_from(len).map_err(|_| Error::format(path, "is too large to read"))?;
    // Bounded by the file's size, itself bounded by `limit`.
    let mut bytes = Vec::with_capacity(expected);
    file.take(len + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("cannot read", path, e))?;
    if bytes.len() != expected {
        return Err(Error::format(
            path,
            format!(
                "changed size while being read ({expected} bytes, then {})",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// The UTF-8 text of the regular file `path`, of at most `limit` bytes.
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    String::from_utf8(read_bytes(path, limit)?)
        .map_err(|e| Error::format(path, format!("is not UTF-8 text: {e}")))
}

/// Reads JSON from `path` (at most [`limits::MAX_JSON_BYTES`] bytes); an error names the file and
/// the position of the fault.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = read_bytes(path, limits::MAX_JSON_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::format(path, e.to_string()))
}

/// The tensors of a safetensors file (at most [`limits::MAX_TENSOR_FILE_BYTES`] bytes), on the CPU.
/// Lengths inside the file are checked against its size before anything is allocated.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = read_bytes(path, limits::MAX_TENSOR_FILE_BYTES)?;
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::format(path, format!("not a readable safetensors file: {e}")))
}

/// The id in `dir`'s marker, `None` when it has none (not written by this library, or
/// gone).
fn marker_id(dir: &Path) -> Option<String> {
    let bytes = read_bytes(&dir.join(MARKER), limits::MAX_MARKER_BYTES).ok()?;
    String::from_utf8(bytes).ok()
}

/// `dir`'s marker, opened, with the id it holds (`None` without a marker).
fn open_marker(dir: &Path) -> Option<(File, String)> {
    let (mut file, _) = open_regular(&dir.join(MARKER), limits::MAX_MARKER_BYTES).ok()?;
    let mut id = String::new();
    (&mut file)
        .take(limits::MAX_MARKER_BYTES)
        .read_to_string(&mut id)
        .ok()?;
    Some((file, id))
}

/// Runs `read` on `dir` as one version of the directory. The reader holds a shared lock
/// on the directory's marker while it reads, and a writer takes that lock exclusively to
/// swap the directory, so the swap waits for the readers of the version it replaces; a
/// reader that opened the marker just before a swap sees the marker change and reads
/// again (at most a few times). A directory without a marker is read once.
pub fn read_dir_consistently<T>(dir: &Path, mut read: impl FnMut(&Path) -> Result<T>) -> Result<T> {
    const ATTEMPTS: u32 = 8;
    for attempt in 0..ATTEMPTS {
        let marker = open_marker(dir);
        if let Some((file, _)) = &marker {
            // Held only for a swap's instant by a writer: a short wait at most.
            let _ = file.lock_shared();
        }
        let before = marker.as_ref().map(|(_, id)| id.clone());
        let result = read(dir);
        if marker_id(dir) == before {
            return result;
        }
        drop(marker);
        std::thread::sleep(Duration::from_millis(1 << attempt.min(6)));
    }
    Err(Error::format(
        dir,
        format!("was replaced by another writer {ATTEMPTS} times while being read; try again"),
    ))
}

/// Waits up to a minute for the readers of the version at `target` to finish, then holds
/// its marker exclusively (until the returned file is dropped), so that no reader is in
/// the middle of it when it is swapped out. `None` when `target` has no marker.
fn exclude_readers(target: &Path) -> Result<Option<File>> {
    let Some((file, _)) = open_marker(target) else {
        return Ok(None);
    };
    let start = std::time::Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Some(file)),
            Err(fs::TryLockError::WouldBlock) if start.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::InUse {
                    path: target.to_path_buf(),
                    pid: None,
                });
            }
            // No locks on this filesystem: readers fall back on comparing markers.
            Err(fs::TryLockError::Error(_)) => return Ok(None),
        }
    }
}

// ---- writes --------------------------------------------------------------------------

/// Refuses a write target that exists and is not a regular file.
fn check_file_target(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_file() => Err(Error::invalid(
            format!("`{}`", path.display()),
            format!(
                "is {}, not a regular file; it was left as it is",
                kind_of(&meta)
            ),
        )),
        _ => Ok(()),
    }
}

/// Writes a file atomically: `write` fills a temporary sibling of `path` (given its path),
/// which is then synced and renamed over `path`, and the parent directory synced. On
/// error the temporary file is removed and `path` is untouched. `path` must not exist or
/// be a regular file.
pub fn write_file_via(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    file_name(path)?;
    check_file_target(path)?;
    create_parent(path)?;
    sweep_file_temporaries(path);
    let tmp = hidden_sibling(path, "tmp")?;
    let result = write(&tmp).and_then(|()| {
        let f = File::open(&tmp).map_err(|e| Error::io("cannot open", &tmp, e))?;
        f.sync_all()
            .map_err(|e| Error::io("cannot sync", &tmp, e))?;
        check_file_target(path)?;
        fs::rename(&tmp, path).map_err(|e| Error::io("cannot move into place", path, e))?;
        sync_dir(parent_of(path))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// [`write_file_via`] through a buffered writer.
pub fn write_file_with(
    path: &Path,
    body: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    write_file_via(path, |tmp| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|e| Error::io("cannot create", tmp, e))?;
        let mut w = BufWriter::new(file);
        body(&mut w).map_err(|e| Error::io("cannot write", path, e))?;
        w.flush().map_err(|e| Error::io("cannot write", path, e))
    })
}

/// Writes `bytes` to `path` atomically (see [`write_file_via`]).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_with(path, |w| w.write_all(bytes))
}

/// Writes `value` as pretty JSON to `path`, atomically and synced.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::format(path, format!("cannot serialise: {e}")))?;
    write_bytes(path, &text)
}

/// Writes `tensors` as a safetensors file, atomically and synced.
pub fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    write_file_via(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp)
            .map_err(|e| Error::format(path, format!("cannot write safetensors: {e}")))
    })
}

/// Removes `.<name>.tmp-<pid>-…` files beside `path` whose process is gone.
fn sweep_file_temporaries(path: &Path) {
    let Ok(name) = file_name(path) else { return };
    let prefix = format!(".{name}.tmp-");
    for (entry, rest) in siblings_with_prefix(path, &prefix) {
        let Ok(meta) = fs::symlink_metadata(&entry) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if meta.file_type().is_file() && pid.is_some_and(|p| !process_alive(p)) {
            let _ = fs::remove_file(&entry);
        }
    }
}

/// Whether process `pid` may still run (true when it cannot be told).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Entries beside `path` whose names start with `prefix`, with the rest of the name.
fn siblings_with_prefix(path: &Path, prefix: &str) -> Vec<(PathBuf, String)> {
    let Ok(entries) = fs::read_dir(parent_of(path)) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(prefix)?.to_string();
            Some((e.path(), rest))
        })
        .collect()
}

/// An exclusive advisory lock on a path, held by one writer at a time: the file
/// `.<name>.lock` beside it, which holds the holder's process id while it is held.
/// Released on drop (and by the kernel when the process dies).
#[derive(Debug)]
pub struct PathLock {
    _file: Option<File>,
}

impl Drop for PathLock {
    fn drop(&mut self) {
        if let Some(file) = &self._file {
            let _ = file.set_len(0);
        }
    }
}

impl PathLock {
    /// Takes the lock of `path` without waiting; [`Error::InUse`] when another writer
    /// (in this process or another) holds it. On a filesystem without locks the write
    /// goes on unlocked.
    pub fn acquire(path: &Path) -> Result<Self> {
        let name = file_name(path)?;
        create_parent(path)?;
        let lock_path = path.with_file_name(format!(".{name}.lock"));
        if let Ok(meta) = fs::symlink_metadata(&lock_path)
            && !meta.file_type().is_file()
        {
            return Err(Error::invalid(
                format!("lock file `{}`", lock_path.display()),
                format!("is {}, not a regular file", kind_of(&meta)),
            ));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| Error::io("cannot open lock", &lock_path, e))?;
        match file.try_lock() {
            Ok(()) => {
                let _ = file.set_len(0);
                let _ = file.write_all(std::process::id().to_string().as_bytes());
                Ok(PathLock { _file: Some(file) })
            }
            Err(fs::TryLockError::WouldBlock) => {
                // The holder writes its id right after it locks (and empties the file
                // before it unlocks): an empty file is a holder about to write it.
                let mut pid = None;
                for _ in 0..50 {
                    let mut text = String::new();
                    let _ = (&file).seek(std::io::SeekFrom::Start(0));
                    let _ = (&file).take(64).read_to_string(&mut text);
                    pid = text.trim().parse().ok();
                    if pid.is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(Error::InUse {
                    path: path.to_path_buf(),
                    pid,
                })
            }
            Err(fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
                tracing::warn!(path = %path.display(), "no file locks here: writing unlocked");
                Ok(PathLock { _file: None })
            }
            Err(fs::TryLockError::Error(e)) => Err(Error::io("cannot lock", &lock_path, e)),
        }
    }
}

/// The kind named by `dir`'s marker (`None` without one; `Some(None)` for a marker of a
/// kind this version does not know).
fn marked_kind(dir: &Path) -> Option<Option<DirKind>> {
    let id = marker_id(dir)?;
    let word = id.split_whitespace().next().unwrap_or("");
    Some(
        [
            DirKind::Model,
            DirKind::Checkpoint,
            DirKind::Cache,
            DirKind::Logs,
            DirKind::Other,
        ]
        .into_iter()
        .find(|k| k.name() == word),
    )
}

fn is_empty_dir(dir: &Path) -> Result<bool> {
    let mut entries = fs::read_dir(dir).map_err(|e| Error::io("cannot list", dir, e))?;
    Ok(entries.next().is_none())
}

/// Refuses a directory target that this library may not replace with a `kind` (see
/// [`write_dir`]), so that a long job can fail before it starts rather than at its first
/// write.
pub fn check_dir_target(target: &Path, kind: DirKind) -> Result<()> {
    let meta = match fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("cannot stat", target, e)),
        Ok(meta) => meta,
    };
    let location = format!("`{}`", target.display());
    if !meta.file_type().is_dir() {
        return Err(Error::invalid(
            location,
            format!(
                "is {}, not a directory; it was left as it is",
                kind_of(&meta)
            ),
        ));
    }
    match marked_kind(target) {
        Some(Some(k)) if k == kind => Ok(()),
        Some(found) => Err(Error::invalid(
            location,
            format!(
                "holds {} written by this library, not a {}; it was left as it is: choose \
                 another path",
                found.map_or("a directory of a newer version".to_string(), |k| format!(
                    "a {}",
                    k.name()
                )),
                kind.name()
            ),
        )),
        None if is_empty_dir(target)? => Ok(()),
        None => Err(Error::invalid(
            location,
            format!(
                "is a directory this library did not write (no `{MARKER}` marker) and is not \
                 empty; nothing in it was touched: remove it or choose another path"
            ),
        )),
    }
}

/// Removes the hidden siblings of `target` that killed writers left. Called under
/// `target`'s lock, so no live writer owns them.
fn sweep_dir_leftovers(target: &Path) {
    let Ok(name) = file_name(target) else { return };
    for tag in ["tmp", "old"] {
        for (path, _) in siblings_with_prefix(target, &format!(".{name}.{tag}-")) {
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let ours = marked_kind(&path).is_some() || is_empty_dir(&path).unwrap_or(false);
            if meta.file_type().is_dir() && ours {
                remove_owned_dir(&path);
            }
        }
    }
}

/// Removes a directory this library wrote, its [`MARKER`] last, so that a process killed
/// half-way leaves a directory the next sweep still recognises as its own.
fn remove_owned_dir(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_name() == MARKER {
                continue;
            }
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => {
                    let _ = fs::remove_dir_all(&path);
                }
                _ => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
    }
    let _ = fs::remove_file(dir.join(MARKER));
    let _ = fs::remove_dir(dir);
}

/// Fsyncs every file and directory under `dir` (safetensors and user encoders' files are
/// not synced by their writers).
fn sync_tree(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io("cannot list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list", dir, e))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| Error::io("cannot stat", &path, e))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            let f = File::open(&path).map_err(|e| Error::io("cannot open", &path, e))?;
            f.sync_all()
                .map_err(|e| Error::io("cannot sync", &path, e))?;
        }
    }
    sync_dir(dir)
}

/// Writes a directory atomically: `write` fills a hidden sibling of `target` (marked as
/// this library's), which then replaces `target` (see the module docs). `target` must
/// not exist, or be empty, or hold the [`MARKER`] of the same `kind`; a second writer of
/// the same target gets [`Error::InUse`]. On error the sibling is removed and `target` is
/// untouched.
pub fn write_dir(
    target: &Path,
    kind: DirKind,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let writer = DirWriter::begin(target, kind)?;
    write(writer.path())?;
    writer.commit().map(drop)
}

/// [`write_dir`] in two steps, for writers that fill the directory over several calls:
/// [`begin`](Self::begin) takes the lock and makes the hidden sibling,
/// [`commit`](Self::commit) swaps it into place; dropping it uncommitted removes the
/// sibling and leaves the target as it was.
#[derive(Debug)]
pub struct DirWriter {
    target: PathBuf,
    tmp: PathBuf,
    lock: Option<PathLock>,
}

impl DirWriter {
    /// Locks `target`, checks that it may be replaced by a `kind`, sweeps what killed
    /// writers left beside it, and makes the marked hidden sibling to fill.
    pub fn begin(target: &Path, kind: DirKind) -> Result<Self> {
        file_name(target)?;
        check_dir_target(target, kind)?;
        let lock = PathLock::acquire(target)?;
        Self::begin_locked(target, kind, lock)
    }

    /// [`begin`](Self::begin) for a writer that already holds `target`'s lock (taken
    /// with [`PathLock::acquire`] for a longer span, such as a whole training run).
    pub fn begin_locked(target: &Path, kind: DirKind, lock: PathLock) -> Result<Self> {
        // Checked (again) under the lock: another writer may have been first.
        check_dir_target(target, kind)?;
        sweep_dir_leftovers(target);
        let tmp = hidden_sibling(target, "tmp")?;
        fs::create_dir(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
        let writer = DirWriter {
            target: target.to_path_buf(),
            tmp,
            lock: Some(lock),
        };
        fs::write(
            writer.tmp.join(MARKER),
            format!("{} {}", kind.name(), fresh_id()),
        )
        .map_err(|e| Error::io("cannot write", writer.tmp.join(MARKER), e))?;
        Ok(writer)
    }

    /// The directory to fill.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Syncs everything written and swaps the directory into place. Returns the lock,
    /// for a writer that goes on holding it.
    pub fn commit(mut self) -> Result<PathLock> {
        sync_tree(&self.tmp)?;
        let readers = exclude_readers(&self.target)?;
        swap_into_place(&self.tmp, &self.target)?;
        drop(readers);
        sync_dir(parent_of(&self.target))?;
        // What is now at the temporary name is the previous directory.
        self.remove_tmp();
        Ok(self.lock.take().unwrap_or(PathLock { _file: None }))
    }

    fn remove_tmp(&self) {
        if fs::symlink_metadata(&self.tmp).is_ok() {
            remove_owned_dir(&self.tmp);
        }
    }
}

impl Drop for DirWriter {
    fn drop(&mut self) {
        // Before the lock is released (fields drop after this).
        self.remove_tmp();
    }
}

/// Puts the finished directory `tmp` at `target`; what was at `target` ends up at `tmp`
/// (exchanged) or is removed.
fn swap_into_place(tmp: &Path, target: &Path) -> Result<()> {
    if !target.exists() {
        return fs::rename(tmp, target).map_err(|e| Error::io("cannot move into place", target, e));
    }
    match exchange(tmp, target) {
        Ok(()) => Ok(()),
        Err(_) => {
            // No atomic exchange here: two renames, the previous directory aside first.
            let old = hidden_sibling(target, "old")?;
            fs::rename(target, &old).map_err(|e| Error::io("cannot move aside", target, e))?;
            fs::rename(tmp, target).map_err(|e| Error::io("cannot move into place", target, e))?;
            remove_owned_dir(&old);
            Ok(())
        }
    }
}

/// Swaps two paths in one step (Linux `renameat2` with `RENAME_EXCHANGE`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths; the call reads them only.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// A fresh empty directory under the system's temporary directory, created (never
/// reused) for this process, removed on drop.
#[derive(Debug)]
pub(crate) struct ScratchDir(PathBuf);

impl ScratchDir {
    pub(crate) fn new(tag: &str) -> Result<Self> {
        let base = std::env::temp_dir();
        for _ in 0..16 {
            let path = base.join(format!(".similarity-{tag}-{}", fresh_id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(ScratchDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("cannot create", &path, e)),
            }
        }
        Err(Error::invalid(
            "temporary directory",
            format!("cannot create a fresh directory in `{}`", base.display()),
        ))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_write_replaces_only_what_this_library_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("model");
        write_dir(&target, DirKind::Other, |d| write_bytes(&d.join("a"), b"1")).unwrap();
        write_dir(&target, DirKind::Other, |d| write_bytes(&d.join("a"), b"2")).unwrap();
        assert_eq!(fs::read(target.join("a")).unwrap(), b"2");
        // A user's directory is refused and left as it is.
        let user = tmp.path().join("mine");
        fs::create_dir(&user).unwrap();
        fs::write(user.join("notes.txt"), b"keep").unwrap();
        let e = write_dir(&user, DirKind::Other, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not write") && e.contains("mine"), "{e}");
        assert_eq!(fs::read(user.join("notes.txt")).unwrap(), b"keep");
        // A regular file and a symbolic link are refused too.
        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(write_dir(&file, DirKind::Other, |_| Ok(())).is_err());
        assert_eq!(fs::read(&file).unwrap(), b"x");
        #[cfg(unix)]
        {
            let link = tmp.path().join("link");
            std::os::unix::fs::symlink(&target, &link).unwrap();
            let e = write_dir(&link, DirKind::Other, |_| Ok(()))
                .unwrap_err()
                .to_string();
            assert!(e.contains("symbolic link"), "{e}");
            assert!(
                fs::symlink_metadata(&link)
                    .unwrap()
                    .file_type()
                    .is_symlink()
            );
        }
        // Nothing but the model, its lock and the user's files remain.
        let mut names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".model.lock", "file", "link", "mine", "model"]);
    }

    #[test]
    fn a_second_writer_is_told_who_holds_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("model");
        let _held = PathLock::acquire(&target).unwrap();
        let e = write_dir(&target, DirKind::Other, |_| Ok(())).unwrap_err();
        assert!(
            matches!(e, Error::InUse { pid: Some(p), .. } if p == std::process::id()),
            "{e}"
        );
        assert!(!target.exists());
    }

    #[test]
    fn leftovers_of_killed_writers_are_swept_and_never_read() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("model");
        write_dir(&target, DirKind::Other, |d| write_bytes(&d.join("a"), b"1")).unwrap();
        // What a writer killed after moving the previous directory aside leaves, and one
        // killed while filling its temporary directory.
        let old = tmp.path().join(".model.old-1-2-3");
        fs::rename(&target, &old).unwrap();
        let stale = tmp.path().join(".model.tmp-4-5-6");
        fs::create_dir(&stale).unwrap();
        // The user deletes nothing, but the target is gone: it does not come back.
        assert!(!target.exists());
        assert!(read_bytes(&target.join("a"), 10).is_err());
        write_dir(&target, DirKind::Other, |d| write_bytes(&d.join("a"), b"2")).unwrap();
        assert!(!old.exists() && !stale.exists());
        // A hidden sibling that this library did not write is left alone.
        let foreign = tmp.path().join(".model.tmp-7-8-9");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("x"), b"x").unwrap();
        write_dir(&target, DirKind::Other, |_| Ok(())).unwrap();
        assert!(foreign.join("x").exists());
    }

    #[test]
    fn reads_refuse_special_and_oversized_files() {
        let tmp = tempfile::tempdir().unwrap();
        let e = read_bytes(Path::new("/dev/zero"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("character device"), "{e}");
        let path = tmp.path().join("big");
        fs::write(&path, vec![0u8; 100]).unwrap();
        let e = read_bytes(&path, 99).unwrap_err().to_string();
        assert!(e.contains("100 bytes") && e.contains("big"), "{e}");
        assert_eq!(read_bytes(&path, 100).unwrap().len(), 100);
        #[cfg(unix)]
        {
            let fifo = tmp.path().join("fifo");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: a valid path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let e = read_bytes(&fifo, 100).unwrap_err().to_string();
            assert!(e.contains("FIFO"), "{e}");
            let e = write_bytes(&fifo, b"x").unwrap_err().to_string();
            assert!(e.contains("FIFO"), "{e}");
        }
    }

    #[test]
    fn a_swap_waits_for_the_readers_of_the_version_it_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("d");
        write_dir(&target, DirKind::Other, |d| write_bytes(&d.join("a"), b"1")).unwrap();
        let mut writer = None;
        let (first, second) = read_dir_consistently(&target, |d| {
            let first = fs::read(d.join("a")).unwrap();
            let t = target.clone();
            writer = Some(std::thread::spawn(move || {
                write_dir(&t, DirKind::Other, |d| write_bytes(&d.join("a"), b"2")).unwrap()
            }));
            std::thread::sleep(Duration::from_millis(100));
            Ok((first, fs::read(d.join("a")).unwrap()))
        })
        .unwrap();
        assert_eq!(
            (first.as_slice(), second.as_slice()),
            (&b"1"[..], &b"1"[..])
        );
        writer.unwrap().join().unwrap();
        assert_eq!(fs::read(target.join("a")).unwrap(), b"2");
    }
}
