//! The S3 part of the test harness works: its client against both real servers (Garage
//! and s3s-fs, started by scripts/test), and the fault proxy.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use common::pattern;
use common::s3::{Fault, FaultProxy, S3Env, S3Error, read_response, unique_prefix};

/// The HTTP status a request came to (a success is 200 here: GETs and PUTs); panics if it
/// came to no answer.
fn status<T>(outcome: Result<T, S3Error>) -> u16 {
    match outcome {
        Ok(_) => 200,
        Err(S3Error::Status { status, .. }) => status,
        Err(e) => panic!("expected an answer: {e}"),
    }
}

#[test]
fn env_files_parse() {
    let env = S3Env::parse(
        "export AWS_ENDPOINT_URL=http://127.0.0.1:4242/\nexport AWS_ACCESS_KEY_ID=GK1\n\
         export AWS_SECRET_ACCESS_KEY='s3cr3t'\nexport AWS_REGION=us-east-1\n\
         export SNAPFS_TEST_BUCKET=b\n",
    )
    .expect("parse");
    assert_eq!(env.endpoint, "http://127.0.0.1:4242");
    assert_eq!(env.secret_key, "s3cr3t");
    assert_eq!(env.url("p/"), "s3://b/p/");
    assert!(S3Env::parse("export AWS_REGION=x\n").is_err());
}

#[test]
fn put_get_list_delete_round_trip() {
    for (name, env) in S3Env::all() {
        let client = env.client();
        let prefix = unique_prefix("harness-roundtrip");
        let objects = [
            (format!("{prefix}empty"), Vec::new()),
            (format!("{prefix}one"), vec![7u8]),
            (format!("{prefix}dir/a b+c=d&e.bin"), pattern(1 << 20, 1)),
            (format!("{prefix}dir/z"), pattern(300_001, 2)),
        ];
        for (key, bytes) in &objects {
            client.put(key, bytes);
        }
        for (key, bytes) in &objects {
            let got = client
                .get(key)
                .unwrap_or_else(|| panic!("{name}: {key} missing"));
            common::assert_bytes_eq(&got, bytes, &format!("{name}: {key}"));
        }
        let mut expected: Vec<(String, u64)> = objects
            .iter()
            .map(|(k, b)| (k.clone(), b.len() as u64))
            .collect();
        expected.sort();
        assert_eq!(client.list(&prefix), expected, "{name}: list");
        // Continuation: pages of 1 key.
        assert_eq!(
            client.clone().with_page_size(1).list(&prefix),
            expected,
            "{name}: list by pages of one"
        );
        assert_eq!(
            client.list(&format!("{prefix}dir/")),
            expected[..2].to_vec(),
            "{name}: list of a sub-prefix"
        );
        assert_eq!(client.get(&format!("{prefix}never-written")), None);

        client.delete(&objects[0].0);
        assert_eq!(client.get(&objects[0].0), None, "{name}: get after delete");
        assert_eq!(client.list(&prefix).len(), 3, "{name}: list after delete");
        assert_eq!(client.delete_prefix(&prefix), 3);
        assert_eq!(
            client.list(&prefix),
            vec![],
            "{name}: list after delete_prefix"
        );
    }
}

#[test]
fn fault_proxy_injects_per_request() {
    for (name, env) in S3Env::all() {
        let (proxy, through) = FaultProxy::for_env(&env);
        let client = through.client();
        let key = format!("{}obj", unique_prefix("harness-faults"));
        let bytes = pattern(100_000, 3);

        client.put(&key, &bytes);
        assert_eq!(client.get(&key).as_deref(), Some(&bytes[..]), "{name}");
        assert_eq!(proxy.counts(), (2, 0), "{name}: counts after two requests");

        proxy.set_fault(Fault::SlowDown);
        let err = client.try_get(&key).expect_err("a 503 answer");
        assert_eq!(err.status(), Some(503), "{name}: SlowDown status");
        assert_eq!(err.code(), Some("SlowDown"), "{name}");
        let err = client.try_put(&key, &bytes).expect_err("a 503 answer");
        assert_eq!(
            err.status(),
            Some(503),
            "{name}: SlowDown on a PUT with a body"
        );
        assert_eq!(proxy.counts(), (2, 2), "{name}: faults are not forwarded");

        proxy.set_fault(Fault::InternalError);
        let err = client.try_head(&key).expect_err("a 500 answer");
        assert_eq!(err.status(), Some(500), "{name}: InternalError on HEAD");

        proxy.fail_every(2, Fault::InternalError);
        let statuses: Vec<u16> = (0..6).map(|_| status(client.try_get(&key))).collect();
        assert_eq!(
            statuses,
            [200, 500, 200, 500, 200, 500],
            "{name}: every 2nd"
        );
        assert_eq!(proxy.counts(), (5, 6), "{name}");

        proxy.set_fault(Fault::None);
        for _ in 0..3 {
            assert_eq!(client.get(&key).as_deref(), Some(&bytes[..]), "{name}");
        }
        assert_eq!(client.list(&key), vec![(key.clone(), bytes.len() as u64)]);
        assert_eq!(proxy.counts(), (9, 6), "{name}");

        proxy.set_fault(Fault::Reset);
        let err = client.try_get(&key).expect_err("a reset connection");
        assert!(
            matches!(err, S3Error::Transport(_)),
            "{name}: Reset gives {err}"
        );
        proxy.set_fault(Fault::None);
        client.delete(&key);
        assert_eq!(
            env.client().get(&key),
            None,
            "{name}: deleted through the proxy"
        );
        assert_eq!(proxy.counts(), (10, 7), "{name}");
    }
}

#[test]
fn fault_proxy_faults_each_request_of_a_keep_alive_connection() {
    for (name, env) in S3Env::all() {
        let (proxy, through) = FaultProxy::for_env(&env);
        let client = through.client();
        let key = format!("{}obj", unique_prefix("harness-keepalive"));
        let bytes = pattern(70_000, 4);
        client.put(&key, &bytes);

        proxy.fail_every(2, Fault::SlowDown);
        let stream = client.connect().expect("connect to the proxy");
        let mut out = stream.try_clone().expect("clone");
        let mut input = BufReader::new(stream);
        let mut statuses = Vec::new();
        for i in 0..5 {
            // GETs, and a PUT with `Expect: 100-continue` in the middle (a pass: the 5th
            // request since fail_every).
            if i == 4 {
                let head =
                    client.presigned_head("PUT", &key, bytes.len(), &[("Expect", "100-continue")]);
                out.write_all(&head).expect("send head");
                let mut interim = Vec::new();
                let mut line = String::new();
                while line != "\r\n" {
                    line.clear();
                    input.read_line(&mut line).expect("read the 100 Continue");
                    interim.extend_from_slice(line.as_bytes());
                }
                let interim = String::from_utf8_lossy(&interim).into_owned();
                assert!(interim.starts_with("HTTP/1.1 100"), "{name}: {interim}");
                out.write_all(&bytes).expect("send body");
                let resp = read_response(&mut input).expect("PUT answer");
                statuses.push(resp.status);
                continue;
            }
            let head = client.presigned_head("GET", &key, 0, &[]);
            out.write_all(&head).expect("send");
            let resp = read_response(&mut input).expect("keep-alive answer");
            if resp.status == 200 {
                assert_eq!(resp.body, bytes, "{name}");
            }
            statuses.push(resp.status);
        }
        assert_eq!(statuses, [200, 503, 200, 503, 200], "{name}");
        assert_eq!(proxy.counts(), (4, 2), "{name}: the PUT before, 3 passes");
        proxy.set_fault(Fault::None);
        client.delete(&key);
    }
}

#[test]
fn fault_proxy_stall_holds_until_cleared() {
    let env = S3Env::s3s();
    let (proxy, through) = FaultProxy::for_env(&env);
    let client = through.client();
    proxy.set_fault(Fault::Stall);
    let started = Instant::now();
    let request = std::thread::spawn(move || client.try_get("stalled"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!request.is_finished(), "the stalled request was answered");
    proxy.set_fault(Fault::None);
    let result = request.join().expect("request thread");
    assert!(
        matches!(result, Err(S3Error::Transport(_))),
        "a stall ends with a closed connection: {result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(proxy.counts(), (0, 1));
}

#[test]
fn fault_proxy_mangles_bodies_of_object_gets_only() {
    for (name, env) in S3Env::all() {
        let (proxy, through) = FaultProxy::for_env(&env);
        let client = through.client();
        let prefix = unique_prefix("harness-body");
        let key = format!("{prefix}obj");
        let bytes = pattern(90_000, 5);
        client.put(&key, &bytes);

        // Every 2nd object GET; the PUT and the listing neither count nor change.
        proxy.fail_every(2, Fault::Corrupt);
        assert_eq!(
            client.list(&prefix),
            vec![(key.clone(), bytes.len() as u64)]
        );
        let bodies: Vec<Vec<u8>> = (0..4)
            .map(|_| client.get(&key).expect("the object"))
            .collect();
        assert_eq!(bodies[0], bytes, "{name}: 1st GET forwarded");
        assert_eq!(bodies[1].len(), bytes.len(), "{name}: same length");
        let flipped = bodies[1].iter().zip(&bytes).filter(|(a, b)| a != b).count();
        assert_eq!(flipped, 3, "{name}: three bytes flipped");
        assert_eq!(bodies[2], bytes, "{name}");
        assert_ne!(bodies[3], bytes, "{name}");
        assert_eq!(proxy.counts().1, 2, "{name}: two bodies corrupted");

        // A shorter body with a Content-Length to match: looks like a whole answer.
        proxy.set_fault(Fault::Truncate {
            consistent_length: true,
        });
        let got = client.try_get(&key).expect("an answer");
        assert_eq!(got.body, bytes[..bytes.len() / 2], "{name}: half the body");
        assert_eq!(got.content_length, Some(bytes.len() as i64 / 2), "{name}");
        // The full length announced, the connection closed early: a cut-off body.
        proxy.set_fault(Fault::Truncate {
            consistent_length: false,
        });
        let err = client.try_get(&key).expect_err("a body cut off");
        assert!(matches!(err, S3Error::Transport(_)), "{name}: {err}");
        // A missing object's 404 is left alone.
        let err = client
            .try_get(&format!("{prefix}none"))
            .expect_err("no such key");
        assert_eq!(err.status(), Some(404), "{name}");
        assert_eq!(proxy.counts().1, 4, "{name}: faults applied");

        proxy.set_fault(Fault::None);
        assert_eq!(client.get(&key).as_deref(), Some(&bytes[..]), "{name}");
        client.delete(&key);
    }
}
