//! The ObjectStore suite: one contract, run on every implementation (the directory store,
//! and the S3 store against Garage and s3s-fs), so snapfs is not tuned to one server, and
//! on each of them sealed by the encrypting wrapper, as `store::open` returns them when a
//! key is set.

mod common;

use std::sync::Arc;

use common::pattern;
use common::s3::{S3Env, unique_prefix};
use snapfs::store::{self, KEY_FILE_VAR, KEY_VAR, Key, ObjectStore, StoreUrl};

fn check_contract(name: &str, shared: Arc<dyn ObjectStore>, runtime: &tokio::runtime::Runtime) {
    let store = &*shared;
    runtime.block_on(async {
        assert_eq!(store.get("a/missing").await.expect("get"), None, "{name}");
        store
            .delete("a/missing")
            .await
            .expect("deleting a missing key succeeds");

        let big = pattern(3 << 20, 1);
        store.put("a/big", big.clone().into()).await.expect("put");
        store
            .put("a/empty", Vec::new().into())
            .await
            .expect("put empty");
        store
            .put("b/other", b"x".to_vec().into())
            .await
            .expect("put");
        assert_eq!(store.get("a/big").await.expect("get"), Some(big), "{name}");
        assert_eq!(store.get("a/empty").await.expect("get"), Some(Vec::new()));

        store
            .put("a/big", b"replaced".to_vec().into())
            .await
            .expect("overwrite");
        assert_eq!(
            store.get("a/big").await.expect("get").as_deref(),
            Some(&b"replaced"[..])
        );

        let mut keys = store.list("a/").await.expect("list");
        keys.sort();
        assert_eq!(keys, ["a/big", "a/empty"], "{name}: list by prefix");

        // More keys than one S3 listing page holds.
        let many: Vec<String> = (0..1100).map(|i| format!("many/{i:05}")).collect();
        let mut puts = tokio::task::JoinSet::new();
        for chunk in many.chunks(100) {
            let chunk = chunk.to_vec();
            let store = shared.clone();
            puts.spawn(async move {
                for key in chunk {
                    // As every caller does: eleven writers at once can meet Garage's
                    // "database is locked", a 503 that asks to be retried.
                    store::retry(store::Retries::Attempts(5), || {
                        store.put(&key, vec![1].into())
                    })
                    .await
                    .expect("put many");
                }
            });
        }
        while let Some(done) = puts.join_next().await {
            done.expect("put task");
        }
        let mut listed = store.list("many/").await.expect("list many");
        listed.sort();
        assert_eq!(listed, many, "{name}: listing across pages");

        store.delete("a/big").await.expect("delete");
        assert_eq!(store.get("a/big").await.expect("get"), None);

        // Blocks and trees are named by their content hash. `list` shows each object's
        // `object_name`: the key itself, except in a sealed store, which names blocks and
        // trees by a keyed hash of their key so the bucket does not tell content hashes
        // (the keys above, neither blocks nor trees, list as themselves there too).
        let hash = blake3::hash(b"content").to_hex().to_string();
        for kind in ["blocks", "trees"] {
            let key = format!("{kind}/{hash}");
            let object = store.object_name(&key);
            if store.encryption().is_none() {
                assert_eq!(object, key, "{name}: a plain store lists keys");
            } else {
                assert!(
                    object.starts_with(&format!("{kind}/")) && !object.contains(&hash),
                    "{name}: {object} hides the hash of {key}"
                );
            }
            store
                .put(&key, b"content".to_vec().into())
                .await
                .expect("put");
            assert_eq!(
                store.get(&key).await.expect("get").as_deref(),
                Some(&b"content"[..]),
                "{name}: {key}"
            );
            let listed = store.list(&format!("{kind}/")).await.expect("list");
            assert_eq!(listed, [object], "{name}: {kind} listed by object name");
            store.delete(&key).await.expect("delete");
            assert_eq!(store.get(&key).await.expect("get"), None, "{name}: {key}");
            let listed = store.list(&format!("{kind}/")).await.expect("list");
            assert!(listed.is_empty(), "{name}: {kind} after delete: {listed:?}");
        }

        // A pack: every frame read back alone with one range request, and its listing
        // from the whole object; sealed part by part in a sealed store.
        let blocks: Vec<Vec<u8>> = (0..5u64)
            .map(|i| pattern(1000 + 70_000 * i as usize, i))
            .collect();
        let mut builder = store::PackBuilder::new();
        for block in &blocks {
            let frame = snapfs::manifest::compress(block, 3).expect("zstd");
            let hash = snapfs::blocks::BlockHash::of(block);
            builder
                .add(store, hash, block.len() as u32, frame)
                .expect("add");
        }
        let pack = builder.finish(store, 3).expect("finish");
        store
            .put(&pack.key, pack.body.clone().into())
            .await
            .expect("put pack");
        let whole = store.get(&pack.key).await.expect("get").expect("the pack");
        assert_eq!(whole, pack.body, "{name}: a pack is stored as it is");
        let listing = store::read_listing(store, &pack.key, &whole).expect("listing");
        assert_eq!(listing, pack.listing, "{name}");
        for (block, entry) in blocks.iter().zip(&listing.blocks) {
            let place = store::BlockPlace::Packed {
                pack: pack.id,
                offset: entry.offset,
                length: entry.length,
            };
            let got = store::fetch_block(store, &entry.hash, place, 1 << 20)
                .await
                .expect("fetch");
            assert_eq!(
                got.as_ref(),
                Some(block),
                "{name}: frame at {}",
                entry.offset
            );
        }
        // Ranges at and past the end come back short, not as errors.
        let size = whole.len() as u64;
        let tail = store
            .get_range(&pack.key, size - 8, 100)
            .await
            .expect("range");
        assert_eq!(tail.as_deref(), Some(&whole[whole.len() - 8..]), "{name}");
        let past = store
            .get_range(&pack.key, size + 10, 5)
            .await
            .expect("range");
        assert_eq!(past, Some(Vec::new()), "{name}: a range past the end");
        assert_eq!(
            store
                .get_range("packs/missing", 0, 10)
                .await
                .expect("range"),
            None,
            "{name}"
        );
        store.delete(&pack.key).await.expect("delete pack");

        // The volume header: claimed once, accepted again, refused to another volume.
        store::claim(store, "volume-one", 4096, None)
            .await
            .expect("claim");
        store::claim(store, "volume-one", 4096, None)
            .await
            .expect("claim again");
        let err = store::claim(store, "volume-two", 4096, None)
            .await
            .expect_err("another volume");
        assert!(err.to_string().contains("another snapfs volume"), "{err}");
    });
}

/// The store at `url` as `store::open` gives it: sealed with `key` if one is given (in
/// SNAPFS_KEY, as users set it).
fn open(url: &str, key: Option<&Key>, runtime: &tokio::runtime::Runtime) -> Arc<dyn ObjectStore> {
    let url = StoreUrl::parse(url).expect("store URL");
    // SAFETY: this test binary has no other test and no other thread reading the
    // environment while it is changed.
    unsafe {
        std::env::remove_var(KEY_FILE_VAR);
        match key {
            Some(key) => std::env::set_var(KEY_VAR, key.to_hex()),
            None => std::env::remove_var(KEY_VAR),
        }
    }
    let store = runtime.block_on(store::open(&url)).expect("open store");
    assert_eq!(store.encryption().is_some(), key.is_some(), "{url}: sealed");
    store
}

/// The contract on the store at the URL `place` gives for a name, plain and sealed (each
/// in its own place: a sealed volume's header is not a plain one's). A sealed volume's
/// place then refuses a plain store, which could not read it.
fn check_plain_and_sealed(
    name: &str,
    place: impl Fn(&str) -> String,
    runtime: &tokio::runtime::Runtime,
) {
    check_contract(name, open(&place("plain"), None, runtime), runtime);
    let key = Key::generate();
    let sealed_url = place("sealed");
    let sealed_name = format!("{name} sealed");
    check_contract(
        &sealed_name,
        open(&sealed_url, Some(&key), runtime),
        runtime,
    );
    let plain = open(&sealed_url, None, runtime);
    let err = runtime
        .block_on(store::claim(&*plain, "volume-one", 4096, None))
        .expect_err("a plain store on a sealed volume");
    assert!(err.to_string().contains("is encrypted"), "{name}: {err}");
}

#[test]
fn every_store_keeps_the_same_contract() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().display().to_string();
    check_plain_and_sealed(
        "file://",
        |place| format!("file://{root}/{place}"),
        &runtime,
    );

    for (server, s3) in S3Env::all() {
        // The S3 store reads the standard AWS variables, as users set them. One test
        // function runs the servers in turn, so nothing else reads them meanwhile.
        for (key, value) in [
            ("AWS_ENDPOINT_URL", &s3.endpoint),
            ("AWS_ACCESS_KEY_ID", &s3.access_key),
            ("AWS_SECRET_ACCESS_KEY", &s3.secret_key),
            ("AWS_REGION", &s3.region),
        ] {
            // SAFETY: as in `open`.
            unsafe { std::env::set_var(key, value) };
        }
        check_plain_and_sealed(
            server,
            |place| s3.url(&unique_prefix(&format!("contract-{server}-{place}"))),
            &runtime,
        );
        small_answers_come_at_once(
            server,
            open(&s3.url(&unique_prefix("small-answers")), None, &runtime),
            &runtime,
        );
    }
}

/// Small answers arrive as soon as the server sends them: a server that writes a body
/// after its headers without TCP_NODELAY (Garage) waits for their ACK, and Linux delays
/// ACKs by 40 ms on request/response traffic unless the client asks for quick ones.
fn small_answers_come_at_once(
    name: &str,
    store: Arc<dyn ObjectStore>,
    runtime: &tokio::runtime::Runtime,
) {
    runtime.block_on(async {
        store
            .put("small", pattern(100, 7).into())
            .await
            .expect("put");
        let mut times = Vec::new();
        for at in 0..21 {
            let started = std::time::Instant::now();
            let part = store.get_range("small", at, 10).await.expect("get_range");
            times.push(started.elapsed());
            assert_eq!(part.as_deref(), Some(&pattern(100, 7)[at as usize..][..10]));
        }
        times.sort();
        let median = times[times.len() / 2];
        assert!(
            median < std::time::Duration::from_millis(25),
            "{name}: a 10-byte range read takes {median:?} (median of 21): delayed ACKs?"
        );
    });
}
