//! Client-side encryption and secrets: with SNAPFS_KEY_FILE set, the bucket (Garage here)
//! holds nothing readable but the volume header: no plaintext, no zstd frames, no content
//! hashes as names. Restores need the key, and say so; a tampered object is refused. The
//! key and the S3 secret never show in logs, JSON output, the catalog or the bucket.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::s3::{Fault, FaultProxy, S3Env, unique_prefix};
use common::*;
use snapfs::blocks::BlockHash;

/// A marker that appears many times in the volume's files.
const MARKER: &[u8] = b"PLAINTEXT-MARKER";

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let output = run(snapfs().arg("keygen").arg(&path));
    assert!(output.status.success(), "{output:?}");
    path
}

/// `snapfs ARGS` with the S3 variables and (if given) the key file.
fn with_key(env: &S3Env, key: Option<&Path>, args: &[&str]) -> Command {
    let mut cmd = snapfs();
    cmd.args(args);
    env.apply(&mut cmd);
    match key {
        Some(key) => cmd.env("SNAPFS_KEY_FILE", key),
        None => cmd.env_remove("SNAPFS_KEY_FILE"),
    };
    cmd.env_remove("SNAPFS_KEY");
    cmd
}

fn stderr_of(cmd: &mut Command) -> (bool, String) {
    let output = run(cmd);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A file with the marker spread through several blocks, so that both plaintext and
/// known block hashes would show in an unencrypted bucket.
fn marked(len: usize) -> Vec<u8> {
    MARKER.iter().copied().cycle().take(len).collect()
}

#[test]
fn the_bucket_learns_nothing_and_restores_need_the_key() {
    let env = S3Env::garage();
    let prefix = unique_prefix("sealed");
    let url = env.url(&prefix);
    let keys = tempfile::tempdir().expect("temp dir");
    let key = keygen(keys.path(), "key");
    assert_eq!(
        fs::metadata(&key).expect("key").permissions().mode() & 0o777,
        0o600
    );
    let again = run(snapfs().arg("keygen").arg(&key));
    assert!(!again.status.success(), "keygen never overwrites a key");

    let mut mount = Mount::unmounted();
    let mut vars = env.vars();
    vars.push(("SNAPFS_KEY_FILE".into(), key.display().to_string()));
    vars.push(("SNAPFS_LOG".into(), "trace".into()));
    mount.set_env(vars);
    mount.set_args(&["--store", &url]);
    mount.remount();
    let root = mount.path().to_owned();
    let big = marked(3 * BLOCK + 11);
    fs::write(root.join("big"), &big).expect("write big");
    fs::create_dir(root.join("dir")).expect("mkdir");
    fs::write(root.join("dir/small"), marked(100)).expect("write small");
    take_snapshot(&mount, "s");
    wait_completed(&mount, "s");
    mount.unmount();

    // The bucket: a readable header naming the cipher; every other object sealed.
    let client = env.client();
    let header = client.get(&format!("{prefix}volume")).expect("header");
    assert!(
        String::from_utf8_lossy(&header).contains("\nencryption xchacha20poly1305 "),
        "{}",
        String::from_utf8_lossy(&header)
    );
    let plain_hashes: BTreeSet<String> = big
        .chunks(BLOCK)
        .chain([&marked(100)[..]])
        .map(|block| BlockHash::of(block).to_hex())
        .collect();
    let objects = client.list(&prefix);
    let count = |kind: &str| {
        objects
            .iter()
            .filter(|(key, _)| key.starts_with(&format!("{prefix}{kind}")))
            .count()
    };
    assert!(
        count("packs/") >= 2 && count("index/") == 1 && count("snapshots/") == 1,
        "packs of blocks and of trees, an index, a snapshot, the header: {objects:?}"
    );
    for (key, _) in &objects {
        if key.ends_with("/volume") {
            continue;
        }
        let name = key.rsplit('/').next().expect("name");
        assert!(
            !plain_hashes.contains(name),
            "{key} is named by its content"
        );
        let object = client.get(key).expect("object");
        assert!(object.starts_with(b"snapfsE1"), "{key} is sealed");
        assert!(
            !object.windows(MARKER.len()).any(|w| w == MARKER),
            "{key} holds plaintext"
        );
        assert!(
            !object.windows(5).any(|w| w == b"small"),
            "{key} holds a file name"
        );
    }

    // With the key: a byte-for-byte restore from the bucket alone.
    let dest = mount.scratch("restored");
    let dest_arg = dest.to_str().expect("utf-8");
    let (ok, err) = stderr_of(&mut with_key(
        &env,
        Some(&key),
        &["restore", "--store", &url, "s", dest_arg],
    ));
    assert!(ok, "{err}");
    assert_bytes_eq(&fs::read(dest.join("big")).expect("big"), &big, "big");
    assert_eq!(
        fs::read(dest.join("dir/small")).expect("small"),
        marked(100)
    );

    // Without it, or with another: a clear refusal, for every reader.
    let other = keygen(keys.path(), "other");
    for args in [
        vec![
            "restore",
            "--store",
            &url,
            "s",
            "/nonexistent/never-created",
        ],
        vec!["snapshot", "list", "--store", &url],
        vec!["verify", "--store", &url],
    ] {
        let (ok, err) = stderr_of(&mut with_key(&env, None, &args));
        assert!(!ok);
        assert!(
            err.contains("is encrypted: set SNAPFS_KEY_FILE"),
            "{args:?}: {err}"
        );
        let (ok, err) = stderr_of(&mut with_key(&env, Some(&other), &args));
        assert!(!ok);
        assert!(err.contains("is not s3://"), "{args:?}: {err}");
    }
    let before = client.list(&prefix);
    let no_key = Mount::unmounted();
    let (ok, err) = stderr_of(
        with_key(&env, None, &["mount", "--store", &url, "--data"])
            .arg(no_key.data_dir())
            .arg(no_key.path()),
    );
    assert!(!ok);
    assert!(err.contains("is encrypted"), "{err}");
    assert_eq!(
        client.list(&prefix),
        before,
        "a refused mount writes nothing"
    );

    // Nothing secret anywhere: the daemon's trace log, JSON, the catalog, the bucket.
    let secret_key = fs::read_to_string(&key).expect("key");
    let secrets = [secret_key.trim(), env.secret_key.as_str()];
    let list_json = run(&mut with_key(
        &env,
        Some(&key),
        &["snapshot", "list", "--store", &url, "--json"],
    ));
    let mut places = vec![
        ("daemon log".to_owned(), mount.daemon_log().into_bytes()),
        ("snapshot list --json".to_owned(), list_json.stdout),
    ];
    for file in walk(mount.data_dir()) {
        places.push((file.display().to_string(), fs::read(&file).expect("read")));
    }
    for (key, _) in &objects {
        places.push((key.clone(), client.get(key).unwrap_or_default()));
    }
    assert!(
        mount.daemon_log().contains("TRACE"),
        "the log is at trace level"
    );
    for (place, bytes) in places {
        for secret in secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a secret appears in {place}"
            );
        }
    }
}

#[test]
fn a_tampered_object_is_refused_and_named() {
    let env = S3Env::garage();
    let prefix = unique_prefix("tamper");
    let url = env.url(&prefix);
    let keys = tempfile::tempdir().expect("temp dir");
    let key = keygen(keys.path(), "key");
    let mut mount = Mount::unmounted();
    let mut vars = env.vars();
    vars.push(("SNAPFS_KEY_FILE".into(), key.display().to_string()));
    mount.set_env(vars);
    mount.set_args(&["--store", &url]);
    mount.remount();
    fs::write(mount.path().join("victim"), pattern(BLOCK, 5)).expect("write victim");
    fs::write(mount.path().join("bystander"), pattern(BLOCK, 6)).expect("write");
    take_snapshot(&mount, "s");
    wait_completed(&mount, "s");
    mount.unmount();

    // A copy mangled on the way fails authentication like a damaged object, and is
    // fetched again: every other GET corrupted, the sequential listing still reads whole.
    let (proxy, through) = FaultProxy::for_env(&env);
    proxy.fail_every(2, Fault::Corrupt);
    let output = run(&mut with_key(
        &through,
        Some(&key),
        &["snapshot", "list", "--store", &url, "--json"],
    ));
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("\"name\":\"s\""),
        "{output:?}"
    );
    assert!(proxy.counts().1 > 0, "the proxy mangled copies");
    drop(proxy);

    // Flip one bit of every block in every pack (the last byte of each sealed part: its
    // tag; a part starts with the seal's magic): each must be refused, none served.
    let client = env.client();
    let packs = client.list(&format!("{prefix}packs/"));
    assert!(!packs.is_empty());
    for (pack, _) in packs {
        let mut object = client.get(&pack).expect("pack");
        let starts: Vec<usize> = object
            .windows(8)
            .enumerate()
            .filter(|(_, w)| *w == b"snapfsE1")
            .map(|(at, _)| at)
            .collect();
        assert!(
            starts.len() >= 2,
            "{pack}: frames and a listing, each sealed"
        );
        for next in &starts[1..] {
            object[next - 1] ^= 1;
        }
        client.put(&pack, &object);
    }
    let dest = mount.scratch("restored");
    let output = run(&mut with_key(
        &env,
        Some(&key),
        &[
            "restore",
            "--store",
            &url,
            "s",
            dest.to_str().expect("utf-8"),
        ],
    ));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{err}");
    assert!(err.contains("fails authentication"), "{err}");
    assert!(!dest.join("victim").exists(), "no unverified file is left");
    let verify = run(&mut with_key(
        &env,
        Some(&key),
        &["verify", "--store", &url, "--deep"],
    ));
    assert_eq!(verify.status.code(), Some(1), "{verify:?}");
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("fails authentication"),
        "{verify:?}"
    );
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
