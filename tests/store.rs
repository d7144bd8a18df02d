//! The ObjectStore suite: one contract, run on every implementation (the directory store,
//! and the S3 store against Garage and s3s-fs), so snapfs is not tuned to one server.

mod common;

use std::sync::Arc;

use common::pattern;
use common::s3::{S3Env, unique_prefix};
use snapfs::store::{self, ObjectStore, StoreUrl};

fn check_contract(name: &str, shared: Arc<dyn ObjectStore>, runtime: &tokio::runtime::Runtime) {
    let store = &*shared;
    runtime.block_on(async {
        assert_eq!(store.get("a/missing").await.expect("get"), None, "{name}");
        store
            .delete("a/missing")
            .await
            .expect("deleting a missing key succeeds");

        let big = pattern(3 << 20, 1);
        store.put("a/big", big.clone()).await.expect("put");
        store.put("a/empty", Vec::new()).await.expect("put empty");
        store.put("b/other", b"x".to_vec()).await.expect("put");
        assert_eq!(store.get("a/big").await.expect("get"), Some(big), "{name}");
        assert_eq!(store.get("a/empty").await.expect("get"), Some(Vec::new()));

        store
            .put("a/big", b"replaced".to_vec())
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
                    store.put(&key, vec![1]).await.expect("put many");
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

fn open(url: &str, runtime: &tokio::runtime::Runtime) -> Arc<dyn ObjectStore> {
    let url = StoreUrl::parse(url).expect("store URL");
    runtime.block_on(store::open(&url)).expect("open store")
}

#[test]
fn every_store_keeps_the_same_contract() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let local = open(&format!("file://{}", dir.path().display()), &runtime);
    check_contract("file://", local, &runtime);

    for (server, s3) in S3Env::all() {
        // The S3 store reads the standard AWS variables, as users set them. One test
        // function runs the servers in turn, so nothing else reads them meanwhile.
        for (key, value) in [
            ("AWS_ENDPOINT_URL", &s3.endpoint),
            ("AWS_ACCESS_KEY_ID", &s3.access_key),
            ("AWS_SECRET_ACCESS_KEY", &s3.secret_key),
            ("AWS_REGION", &s3.region),
        ] {
            // SAFETY: this test binary has no other test and no other thread reading
            // the environment while it is changed.
            unsafe { std::env::set_var(key, value) };
        }
        let store = open(
            &s3.url(&unique_prefix(&format!("contract-{server}"))),
            &runtime,
        );
        check_contract(server, store, &runtime);
    }
}
