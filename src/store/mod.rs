//! Object stores: where snapshots go off the machine. One seam, [`ObjectStore`], with a
//! directory implementation (`file:///DIR`, the embedded default) and an S3 one
//! (`s3://BUCKET/PREFIX`). Keys are relative to the volume's place in the store; see
//! docs/format.md for the layout (owned by `key.rs`). The writer's side is the uploader
//! (src/upload/) and [`claim`]; the reader's side (the header check, listing snapshots,
//! trees, a snapshot to restore or import) is `reader.rs`.

mod header;
mod http;
mod key;
mod local;
mod metered;
mod pack;
mod reader;
mod s3;
mod sealed;

use std::borrow::Cow;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use header::VolumeHeader;
pub use key::ObjectKey;
pub use local::LocalStore;
pub use pack::{
    BlockPlace, FinishedPack, IndexedStore, MAX_TREE, PACKS_PER_INDEX, PackBuilder, PackIndex,
    fetch_listing_at, index_object, open_frame, random_id, read_listing,
};
pub use reader::{Listing, ReadError, Source, StoreChain, StoreSource, list_manifests, read_tree};
pub use s3::S3Store;
pub use sealed::{KEY_FILE_VAR, KEY_VAR, Key, Sealed};

/// What a failed store request means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// May succeed if tried again: 5xx, SlowDown, timeouts, reset or refused connections.
    Transient,
    /// Will fail again the same way: bad credentials, no such bucket, access denied.
    Permanent,
    /// The object came back but fails authentication: a mangled copy (fetch it again) or
    /// a damaged object (which stays so).
    Damaged,
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    pub kind: ErrorKind,
    pub message: String,
}

impl StoreError {
    pub fn transient(message: impl Into<String>) -> StoreError {
        StoreError {
            kind: ErrorKind::Transient,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> StoreError {
        StoreError {
            kind: ErrorKind::Permanent,
            message: message.into(),
        }
    }

    pub fn damaged(message: impl Into<String>) -> StoreError {
        StoreError {
            kind: ErrorKind::Damaged,
            message: message.into(),
        }
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

pub type StoreResult<T> = Result<T, StoreError>;
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = StoreResult<T>> + Send + 'a>>;

/// A flat key-value object store. Keys are `/`-separated and relative to the volume's
/// prefix. Every method may be called concurrently.
pub trait ObjectStore: Send + Sync {
    /// Stores `body` under `key`, replacing any object there; durable once it returns.
    /// The body is shared: a retry sends it again without copying it.
    fn put<'a>(&'a self, key: &'a str, body: Bytes) -> StoreFuture<'a, ()>;
    /// The object under `key`, or `None` if there is none.
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>>;
    /// Up to `len` bytes of the object under `key` from `offset` (fewer at its end), as
    /// stored: an encrypting store opens the parts with [`open_part`](Self::open_part).
    /// `None` if there is no such object.
    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        self.get_range_into(key, offset, len, Vec::new())
    }
    /// [`get_range`](Self::get_range) into `buffer`, whose allocation a store that reads
    /// ranges itself reuses when it is large enough: a reader of many large ranges (a
    /// restore's pack spans) otherwise pays a page fault for every 4 KiB of each fresh
    /// buffer. The one range read a store implements; by default, sliced from the whole
    /// object.
    fn get_range_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
        _buffer: Vec<u8>,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            Ok(self.get(key).await?.map(|object| {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(object.len());
                let end = start.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
                object[start..end.min(object.len())].to_vec()
            }))
        })
    }
    /// Deletes `key`; deleting a missing key succeeds.
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()>;
    /// Every key that starts with `prefix`, in no particular order.
    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<String>>;
    /// The store's URL, for messages (never with credentials).
    fn url(&self) -> &str;
    /// The name `list` shows for the object under `key` (an encrypting store hides
    /// content hashes).
    fn object_name(&self, key: &str) -> String {
        key.to_owned()
    }
    /// The volume header's `encryption` value for this store's key, `None` if objects
    /// are stored as they are.
    fn encryption(&self) -> Option<String> {
        None
    }
    /// One part of an object made of separately sealed parts (a pack's frames and
    /// trailer, see `pack.rs`), ready to be stored as part of object `key`: sealed by an
    /// encrypting store, as it is by the others.
    fn seal_part(&self, _key: &str, part: Vec<u8>) -> StoreResult<Vec<u8>> {
        Ok(part)
    }
    /// The inverse of [`seal_part`](Self::seal_part): a part read back from object `key`,
    /// authenticated. Borrowed when the store does not seal: no copy on the read path.
    fn open_part<'p>(&self, _key: &str, part: &'p [u8]) -> StoreResult<Cow<'p, [u8]>> {
        Ok(Cow::Borrowed(part))
    }
    /// Whether writing here uses the machine's own disks (a `file://` store), which the
    /// live volume needs too: the uploader then yields its writes to the foreground.
    fn is_local(&self) -> bool {
        false
    }
}

/// A parsed `--store` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

#[derive(Debug, thiserror::Error)]
#[error("invalid store URL '{url}': {reason} (use s3://BUCKET[/PREFIX] or file:///ABSOLUTE/DIR)")]
pub struct UrlError {
    url: String,
    reason: &'static str,
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl, UrlError> {
        let err = |reason| UrlError {
            url: url.to_owned(),
            reason,
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(err("a file:// URL needs an absolute path"));
            }
            if path.split('/').any(|part| part == "..") {
                return Err(err("'..' is not allowed in the path"));
            }
            return Ok(StoreUrl::Local(PathBuf::from(path)));
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(err("unknown scheme"));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !valid_bucket {
            return Err(err(
                "bucket names are 3-63 lowercase letters, digits, '-' and '.'",
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix
            .split('/')
            .any(|part| part == "." || part == ".." || (part.is_empty() && !prefix.is_empty()))
        {
            return Err(err("the prefix has an empty, '.' or '..' component"));
        }
        if prefix.chars().any(char::is_control) {
            return Err(err("the prefix has control characters"));
        }
        Ok(StoreUrl::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }

    /// The store a volume in `data_dir` uses when none is named: a directory beside it.
    pub fn default_for(data_dir: &Path) -> StoreUrl {
        StoreUrl::Local(data_dir.join("store"))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Local(path) => write!(f, "file://{}", path.display()),
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Opens the store `url` names. S3 stores resolve credentials and region here, so a
/// missing credential is reported now rather than at the first upload.
/// Opens the store at `url`, sealed with the key from `SNAPFS_KEY_FILE` or `SNAPFS_KEY`
/// if one is set (like the AWS credentials, the key comes from the environment).
pub async fn open(url: &StoreUrl) -> StoreResult<Arc<dyn ObjectStore>> {
    let key = Key::from_env()?;
    let store: Arc<dyn ObjectStore> = match url {
        StoreUrl::Local(dir) => Arc::new(LocalStore::open(dir, url.to_string())?),
        StoreUrl::S3 { bucket, prefix } => {
            Arc::new(S3Store::open(bucket, prefix, url.to_string()).await?)
        }
    };
    let store: Arc<dyn ObjectStore> = match key {
        Some(key) => Arc::new(Sealed::new(store, &key)),
        None => store,
    };
    Ok(if crate::metrics::enabled() {
        Arc::new(metered::Metered::new(store))
    } else {
        store
    })
}

/// `err` and the errors under it, outermost first.
fn error_chain<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |&err| err.source())
}

/// How long to wait before attempt `attempt` (0-based) of a failed request: exponential
/// from 100 ms up to `max`, with full jitter so many clients do not retry in step.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let ceiling = Duration::from_millis(100)
        .saturating_mul(1u32 << attempt.min(16))
        .min(max);
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    ceiling.mul_f64((random % 1_000_001) as f64 / 1_000_000.0)
}

/// How long a store request keeps being retried through transient failures (throttling,
/// 5xx answers, timeouts, dropped connections).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retries {
    /// Until it succeeds or fails permanently: an outage of any length only delays the
    /// result. For background work nobody waits on (uploads).
    Unlimited,
    /// At most this many attempts in all: for a store that has not answered yet (opening
    /// a bucket, mounting), where a wrong endpoint should be reported at once, and for
    /// work that is tried again later anyway.
    Attempts(u32),
    /// Attempts until this long after the first: for reads a program waits on from a
    /// store that has answered. They ride out throttling and a restarting server, and
    /// fail (a read gets EIO) rather than hang while the store is down.
    For(Duration),
}

/// What a read from a store that works waits through before it fails: a store that
/// answers `SlowDown` is asking us to come back later, not to give up.
pub const READ_PATIENCE: Retries = Retries::For(Duration::from_secs(15));

/// The longest pause between two attempts of a request that is retried without limit.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs `request` until it succeeds, fails permanently, or `retries` runs out.
pub async fn retry<T, F, Fut>(retries: Retries, request: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = StoreResult<T>>,
{
    static NEVER: AtomicBool = AtomicBool::new(false);
    retry_unless_stopped(retries, &NEVER, request).await
}

/// How often a pause between attempts looks at its stop flag.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// `retry`, except that once `stopping` is set a failed attempt is the last: a request
/// under way may still land, one waiting out an outage gives up at once (an unmount
/// during an outage does not wait for the store to come back).
pub async fn retry_unless_stopped<T, F, Fut>(
    retries: Retries,
    stopping: &AtomicBool,
    mut request: F,
) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = StoreResult<T>>,
{
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        let e = match request().await {
            Err(e) if e.is_transient() => e,
            result => return result,
        };
        let pause = match retries {
            Retries::Unlimited => Some(backoff(attempt, MAX_BACKOFF)),
            Retries::Attempts(limit) => {
                (attempt + 1 < limit).then(|| backoff(attempt, MAX_BACKOFF))
            }
            // Shorter pauses than without a limit, so a store that comes back is noticed
            // soon; the last attempt is made at the deadline.
            Retries::For(limit) => limit
                .checked_sub(started.elapsed())
                .filter(|left| !left.is_zero())
                .map(|left| backoff(attempt, limit / 8).min(left)),
        };
        let Some(pause) = pause else {
            return Err(e);
        };
        tracing::debug!(error = %e, attempt, "store request failed; retrying");
        crate::metrics::store_retry();
        let resume = Instant::now() + pause;
        loop {
            if stopping.load(Ordering::SeqCst) {
                return Err(e);
            }
            let left = resume.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::time::sleep(left.min(STOP_CHECK)).await;
        }
        attempt = attempt.saturating_add(1);
    }
}

/// Bytes `start..start + length` of `key`, read for several frames at once (the caller
/// verifies each). `Ok(None)` if the object is missing or the request failed for good:
/// the caller then reads each frame alone, with its own retries and places. `Err` only
/// for a store that stayed unreachable through [`READ_PATIENCE`]: alone, each frame
/// would wait as long again.
pub async fn get_span(
    store: &dyn ObjectStore,
    key: &str,
    start: u64,
    length: u64,
    buffer: Vec<u8>,
) -> StoreResult<Option<Vec<u8>>> {
    // A failed attempt drops the buffer: the retries read into fresh ones.
    let mut buffer = Some(buffer);
    let read = retry(READ_PATIENCE, || {
        store.get_range_into(key, start, length, buffer.take().unwrap_or_default())
    });
    match read.await {
        Err(e) if !e.is_transient() => Ok(None),
        read => read,
    }
}

/// How many copies of an object are fetched before one that fails verification is
/// reported corrupt: a proxy or the network may have mangled a copy (a body cut short with
/// a matching Content-Length, flipped bits), while an object bad in the store stays bad.
pub const VERIFY_ATTEMPTS: u32 = 3;

/// Fetches `key` and verifies the copy with `check` (decompress, hash, decode): a copy
/// that fails is logged and fetched again, up to [`VERIFY_ATTEMPTS`] copies. `None` if the
/// store does not have the object; `Some(Err(problem))` if every copy failed `check`.
pub async fn fetch_verified<T>(
    store: &dyn ObjectStore,
    key: &str,
    check: impl Fn(Vec<u8>) -> Result<T, String>,
) -> StoreResult<Option<Result<T, String>>> {
    fetch_checked(store, key, || store.get(key), check).await
}

/// [`fetch_verified`] of what `get` fetches from object `key` (all of it, or a range).
async fn fetch_checked<'a, T>(
    store: &dyn ObjectStore,
    key: &str,
    get: impl Fn() -> StoreFuture<'a, Option<Vec<u8>>>,
    check: impl Fn(Vec<u8>) -> Result<T, String>,
) -> StoreResult<Option<Result<T, String>>> {
    let mut attempt = 0u32;
    loop {
        let checked = match retry(READ_PATIENCE, &get).await {
            Ok(Some(object)) => check(object),
            Ok(None) => return Ok(None),
            // An encrypting store authenticates the copy before it is returned.
            Err(e) if e.kind == ErrorKind::Damaged => Err(e.message),
            Err(e) => return Err(e),
        };
        let problem = match checked {
            Ok(value) => return Ok(Some(Ok(value))),
            Err(problem) => problem,
        };
        attempt += 1;
        if attempt >= VERIFY_ATTEMPTS {
            return Ok(Some(Err(problem)));
        }
        tracing::warn!(
            attempt,
            "{key} from {} failed verification ({problem}); fetching it again",
            store.url()
        );
        tokio::time::sleep(backoff(attempt, Duration::from_secs(2))).await;
    }
}

/// Fetches block `hash` from `place` in the store: decompressed (at most `max_len`
/// bytes) and verified against its hash; `None` if the store does not have it there.
/// Nothing from the store is used unverified: after [`VERIFY_ATTEMPTS`] bad copies the
/// block is a permanent error naming it.
pub async fn fetch_block(
    store: &dyn ObjectStore,
    hash: &crate::blocks::BlockHash,
    place: BlockPlace,
    max_len: usize,
) -> StoreResult<Option<Vec<u8>>> {
    let (key, checked) = match place {
        BlockPlace::Object => {
            let key = ObjectKey::block(hash);
            let checked = fetch_hashed(store, &key, hash, max_len).await?;
            (key, checked)
        }
        BlockPlace::Packed {
            pack,
            offset,
            length,
        } => {
            let key = ObjectKey::pack(&pack);
            let get = || store.get_range(&key, offset, u64::from(length));
            let checked = fetch_checked(store, &key, get, |part| {
                if part.len() != length as usize {
                    return Err(format!(
                        "the frame at {offset} is cut short ({} of {length} bytes)",
                        part.len()
                    ));
                }
                pack::open_frame(store, &key, hash, &part, max_len)
            })
            .await?;
            (key, checked)
        }
    };
    match checked {
        None => Ok(None),
        Some(Ok(data)) => Ok(Some(data)),
        Some(Err(problem)) => Err(StoreError::permanent(format!(
            "block {hash} is corrupt in {} ({key}: {problem}; {VERIFY_ATTEMPTS} copies fetched)",
            store.url()
        ))),
    }
}

/// Fetches object `key`, the zstd frame of content `hash`, with `fetch_verified`:
/// decompressed (at most `max` bytes) and checked against the hash.
async fn fetch_hashed(
    store: &dyn ObjectStore,
    key: &str,
    hash: &crate::blocks::BlockHash,
    max: usize,
) -> StoreResult<Option<Result<Vec<u8>, String>>> {
    fetch_verified(store, key, |object| {
        let data = crate::manifest::decompress(&object, max)
            .map_err(|e| format!("not a zstd frame of at most {max} bytes: {e}"))?;
        let actual = crate::blocks::BlockHash::of(&data);
        if actual == *hash {
            Ok(data)
        } else {
            Err(format!(
                "it does not match its hash: its content hashes to {actual}"
            ))
        }
    })
    .await
}

/// Fetches tree object `trees/<hash>` (format 1, or a tree too large for a pack):
/// decompressed (at most `max` bytes) and verified against its hash, like a block.
pub async fn fetch_tree_object(
    store: &dyn ObjectStore,
    hash: &crate::blocks::BlockHash,
    max: usize,
) -> StoreResult<Option<Vec<u8>>> {
    let key = ObjectKey::tree(hash);
    match fetch_hashed(store, &key, hash, max).await? {
        None => Ok(None),
        Some(Ok(data)) => Ok(Some(data)),
        Some(Err(problem)) => Err(StoreError::permanent(format!(
            "{key}: {problem} ({VERIFY_ATTEMPTS} copies fetched from {})",
            store.url()
        ))),
    }
}

/// The error for a block a store should have and does not.
pub fn missing_block(store: &dyn ObjectStore, hash: &crate::blocks::BlockHash) -> StoreError {
    StoreError::permanent(format!(
        "{} is missing from {}",
        ObjectKey::block(hash),
        store.url()
    ))
}

/// Claims the store for volume `volume_id`: writes the volume header if the prefix is
/// empty, accepts it if it is this volume's, refuses another volume's. Bounded retries:
/// this runs before mounting, where a dead endpoint must be reported, not waited out.
/// A volume made from another's snapshot (`--from`) names that volume's store as its
/// `origin`: the blocks it shares with it are read from there.
pub async fn claim(
    store: &dyn ObjectStore,
    volume_id: &str,
    block_size: u32,
    origin: Option<&StoreUrl>,
) -> StoreResult<()> {
    let header = VolumeHeader {
        id: volume_id.to_owned(),
        block_size,
        origin: origin.cloned(),
        encryption: store.encryption(),
    }
    .encode();
    let key = &ObjectKey::HEADER;
    // A listing fails on a missing bucket on every server (some answer a GET of a key in
    // a missing bucket with NoSuchKey).
    retry(Retries::Attempts(3), || store.list(key)).await?;
    let existing = retry(Retries::Attempts(3), || store.get(key)).await?;
    match existing {
        None => {
            retry(Retries::Attempts(3), || {
                store.put(key, header.clone().into())
            })
            .await
        }
        Some(found) if found == header => Ok(()),
        // This volume's header in format 1: it now says format 2, as packs may follow.
        Some(found) if VolumeHeader::parse(&found).is_ok_and(|h| h.encode() == header) => {
            retry(Retries::Attempts(3), || {
                store.put(key, header.clone().into())
            })
            .await
        }
        Some(found) => {
            let other = header::foreign_id(store, &found)?;
            Err(StoreError::permanent(format!(
                "{} already holds another snapfs volume (id {other}; this volume is {volume_id}): \
                 give this volume its own prefix",
                store.url()
            )))
        }
    }
}

/// The tokio runtime store requests run on, for a command or a daemon (which passes its
/// handle down): two worker threads, as requests wait on the network, not the CPU.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("store-io")
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_urls() {
        assert_eq!(
            StoreUrl::parse("s3://my-bucket/a/b/").expect("valid"),
            StoreUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("s3://bucket").expect("valid").to_string(),
            "s3://bucket"
        );
        assert_eq!(
            StoreUrl::parse("file:///var/backups").expect("valid"),
            StoreUrl::Local("/var/backups".into())
        );
        for bad in [
            "http://x",
            "s3://",
            "s3://UPPER",
            "s3://ab",
            "s3://b_ucket/x",
            "s3://bucket/a//b",
            "s3://bucket/../x",
            "file://relative",
            "file:///a/../b",
            "/plain/path",
        ] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    /// One block object whose first `bad` GETs come back mangled, as a proxy or a flaky
    /// network may hand them over.
    struct Mangling {
        object: Vec<u8>,
        bad: std::sync::atomic::AtomicU32,
        gets: std::sync::atomic::AtomicU32,
    }

    impl ObjectStore for Mangling {
        fn put<'a>(&'a self, _: &'a str, _: Bytes) -> StoreFuture<'a, ()> {
            Box::pin(async { Err(StoreError::permanent("read-only")) })
        }

        fn get<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
            use std::sync::atomic::Ordering::SeqCst;
            Box::pin(async {
                self.gets.fetch_add(1, SeqCst);
                let mut object = self.object.clone();
                if self
                    .bad
                    .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    // Alternately a flipped byte and a body cut short.
                    if self.gets.load(SeqCst) % 2 == 1 {
                        let mid = object.len() / 2;
                        object[mid] ^= 0x55;
                    } else {
                        object.truncate(object.len() / 2);
                    }
                }
                Ok(Some(object))
            })
        }

        fn delete<'a>(&'a self, _: &'a str) -> StoreFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }

        fn list<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Vec<String>> {
            Box::pin(async { Ok(Vec::new()) })
        }

        fn url(&self) -> &str {
            "mem://mangling"
        }
    }

    #[test]
    fn a_block_that_fails_verification_is_fetched_again_then_refused() {
        let block: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let hash = crate::blocks::BlockHash::of(&block);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let store = |bad| Mangling {
            object: zstd::bulk::compress(&block, 3).expect("compress"),
            bad: std::sync::atomic::AtomicU32::new(bad),
            gets: std::sync::atomic::AtomicU32::new(0),
        };
        // A mangled copy or two: a later GET brings a good one.
        for bad in [1, 2] {
            let store = store(bad);
            let got = runtime
                .block_on(fetch_block(&store, &hash, BlockPlace::Object, 1 << 20))
                .expect("a good copy after retries");
            assert_eq!(got, Some(block.clone()));
            assert_eq!(store.gets.into_inner(), bad + 1);
        }
        // Bad every time: a permanent error naming the block, after a bounded number of GETs.
        let store = store(u32::MAX);
        let err = runtime
            .block_on(fetch_block(&store, &hash, BlockPlace::Object, 1 << 20))
            .expect_err("never a good copy");
        assert!(!err.is_transient());
        assert!(err.message.contains(&hash.to_string()), "{}", err.message);
        assert_eq!(store.gets.into_inner(), VERIFY_ATTEMPTS);
    }

    #[test]
    fn reads_retry_for_a_time_not_a_number_of_attempts() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        // Fails transiently `failures` times, then answers with the number of calls.
        let flaky = |failures: u32, retries: Retries| {
            let calls = AtomicU32::new(0);
            let result = runtime.block_on(retry(retries, || {
                let call = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if call < failures {
                        Err(StoreError::transient("SlowDown"))
                    } else {
                        Ok(call + 1)
                    }
                }
            }));
            (result, calls.into_inner())
        };
        // Eight throttled answers in a row: a count of five gives up, a time does not.
        let (result, calls) = flaky(8, Retries::Attempts(5));
        assert!(result.is_err());
        assert_eq!(calls, 5);
        // (Pauses of at most an eighth of the time: 3.2 s in all at worst.)
        let (result, _) = flaky(8, Retries::For(Duration::from_secs(4)));
        assert_eq!(result.expect("through the throttling"), 9);
        // A store that stays down fails the read once the time is up, not much later.
        let started = Instant::now();
        let limit = Duration::from_millis(800);
        let (result, calls) = flaky(u32::MAX, Retries::For(limit));
        let took = started.elapsed();
        assert!(result.expect_err("still down").is_transient());
        assert!(calls >= 3, "{calls} attempts");
        assert!(took >= limit && took < limit * 2, "gave up after {took:?}");
        // A permanent error is not retried.
        let calls = AtomicU32::new(0);
        let result: StoreResult<()> = runtime.block_on(retry(READ_PATIENCE, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(StoreError::permanent("AccessDenied")) }
        }));
        assert!(result.is_err());
        assert_eq!(calls.into_inner(), 1);
    }

    #[test]
    fn a_request_retried_without_limit_gives_up_once_stopped() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let stopping = Arc::new(AtomicBool::new(false));
        let stopper = {
            let stopping = stopping.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                stopping.store(true, Ordering::SeqCst);
            })
        };
        let started = Instant::now();
        let retried = retry_unless_stopped(Retries::Unlimited, &stopping, || async {
            Err::<(), _>(StoreError::transient("InternalError"))
        });
        let result = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), retried).await })
            .expect("still retrying 5 s later");
        let took = started.elapsed();
        stopper.join().expect("stopper");
        assert!(result.expect_err("the store is down").is_transient());
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(800),
            "gave up {took:?} after the start, the stop came at 300 ms"
        );
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let max = Duration::from_secs(30);
        for attempt in 0..40 {
            let delay = backoff(attempt, max);
            assert!(delay <= max);
            assert!(delay <= Duration::from_millis(100) * (1 << attempt.min(16)));
        }
    }
}
