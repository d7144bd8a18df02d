//! `snapfs mount --metrics`: a real mount serving Prometheus's text format, scraped over a
//! real HTTP request; the counters must move with the work done through the mount.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{Mount, pattern, run, take_snapshot, wait_completed};

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// The count of requests `op` in `samples`.
fn count(samples: &BTreeMap<String, f64>, op: &str) -> f64 {
    let name = format!(r#"snapfs_operation_duration_seconds_count{{op="{op}"}}"#);
    samples.get(&name).copied().unwrap_or(0.0)
}

/// Scrapes until requests `op` number at least `at_least`: a request is counted as its
/// reply goes out, so the syscall it served may return before the count moves.
fn scrape_until(port: u16, op: &str, at_least: f64) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = scrape(port);
        if count(&samples, op) >= at_least || Instant::now() > deadline {
            return samples;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One HTTP/1.1 request: (status line, body).
fn http(port: u16, request_line: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(stream, "{request_line}\r\nHost: localhost\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a response head and body");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// Every sample of a scrape: `name{labels}` to value.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (status, body) = http(port, "GET /metrics HTTP/1.1");
    assert_eq!(status, "HTTP/1.1 200 OK", "scrape: {body}");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').expect("a sample is NAME VALUE");
            let value = value.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
            (name.to_owned(), value)
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples
        .get(name)
        .unwrap_or_else(|| panic!("no sample {name} in {samples:#?}"))
}

#[test]
fn counters_move_with_real_work() {
    let port = free_port();
    let mount = Mount::with_args(&["--metrics", &port.to_string()]);
    let before = scrape(port);
    assert_eq!(sample(&before, "snapfs_written_bytes_total"), 0.0);

    let data = pattern(3 << 20, 7);
    fs::write(mount.path().join("big"), &data).expect("write");
    assert_eq!(fs::read(mount.path().join("big")).expect("read"), data);
    take_snapshot(&mount, "one");
    wait_completed(&mount, "one");

    let after = scrape(port);
    assert!(sample(&after, "snapfs_written_bytes_total") >= data.len() as f64);
    assert!(sample(&after, "snapfs_flushes_total") >= 1.0);
    assert!(
        sample(
            &after,
            r#"snapfs_operation_duration_seconds_count{op="write"}"#
        ) >= 1.0
    );
    assert!(
        sample(
            &after,
            r#"snapfs_operation_duration_seconds_count{op="mkdir"}"#
        ) >= 1.0
    );
    assert_eq!(
        sample(&after, r#"snapfs_snapshots{state="completed"}"#),
        1.0
    );
    assert_eq!(sample(&after, r#"snapfs_snapshots{state="pending"}"#), 0.0);
    assert_eq!(sample(&after, "snapfs_pending_upload_bytes"), 0.0);
    // 12 blocks of 256 KiB in one pack, its index, a tree and the snapshot object.
    assert_eq!(sample(&after, "snapfs_upload_objects_total"), 4.0);
    assert!(sample(&after, "snapfs_upload_bytes_total") > 0.0);
    assert!(
        sample(
            &after,
            r#"snapfs_store_request_duration_seconds_count{op="put",outcome="ok"}"#
        ) >= 4.0
    );
    // A lookup of a missing name is an error answer, counted by errno.
    assert!(fs::metadata(mount.path().join("missing")).is_err());
    let errors = scrape(port);
    assert!(sample(&errors, r#"snapfs_operation_errors_total{errno="2"}"#) >= 1.0);
}

/// A block file damaged on the disk is counted when a read finds it, and its heal from the
/// store when the good copy replaces it.
#[test]
fn damaged_and_healed_blocks_are_counted() {
    let port = free_port();
    let mut mount = Mount::with_args(&["--metrics", &port.to_string()]);
    let data = pattern(256 << 10, 8);
    fs::write(mount.path().join("f"), &data).expect("write");
    take_snapshot(&mount, "sent");
    wait_completed(&mount, "sent");
    let before = scrape(port);
    assert_eq!(sample(&before, "snapfs_damaged_blocks_total"), 0.0);
    assert_eq!(sample(&before, "snapfs_healed_blocks_total"), 0.0);
    mount.unmount();
    let hex = blake3::hash(&data).to_hex().to_string();
    let block = mount.data_dir().join("blocks").join(&hex[..2]).join(&hex);
    let mut bytes = fs::read(&block).expect("read the block file");
    bytes[1000] ^= 0x01;
    fs::write(&block, &bytes).expect("damage the block file");
    mount.remount();

    assert!(fs::read(mount.path().join("f")).expect("read") == data);
    let after = scrape(port);
    assert!(sample(&after, "snapfs_damaged_blocks_total") >= 1.0);
    assert_eq!(sample(&after, "snapfs_healed_blocks_total"), 1.0);
}

/// A descriptor opened only to read is closed without a FLUSH request (FOPEN_NOFLUSH),
/// and one opened to write still gets it: its close stores what it wrote.
#[test]
fn a_read_only_close_costs_no_flush_request() {
    let port = free_port();
    let mount = Mount::with_args(&["--metrics", &port.to_string()]);
    let path = mount.path().join("f");
    let data = pattern(100 << 10, 3);
    fs::write(&path, &data).expect("write");
    let before = scrape_until(port, "flush", 1.0);
    for _ in 0..10 {
        assert_eq!(fs::read(&path).expect("read"), data);
    }
    let after = scrape_until(port, "release", count(&before, "release") + 10.0);
    assert_eq!(count(&after, "open") - count(&before, "open"), 10.0);
    assert_eq!(count(&after, "flush"), count(&before, "flush"));

    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open to write");
    file.write_all(b"tail").expect("append");
    drop(file);
    let written = scrape_until(port, "flush", count(&after, "flush") + 1.0);
    assert_eq!(count(&written, "flush") - count(&after, "flush"), 1.0);
    let mut expected = data;
    expected.extend_from_slice(b"tail");
    assert_eq!(fs::read(&path).expect("read back"), expected);
}

/// The kernel asks for a file's `security.capability` before its first write only, not
/// before every write: snapfs drops set-id bits itself (FUSE_HANDLE_KILLPRIV_V2), so the
/// kernel marks a file found without privileges and skips the question until it next
/// refreshes the file's attributes.
#[test]
fn writes_after_the_first_ask_for_no_capability() {
    let port = free_port();
    let mount = Mount::with_args(&["--metrics", &port.to_string()]);
    let path = mount.path().join("f");
    let chunk = pattern(4 << 10, 5);
    let before = scrape(port);
    let mut file = fs::File::create(&path).expect("create");
    for _ in 0..20 {
        file.write_all(&chunk).expect("write");
    }
    drop(file);
    let after = scrape_until(port, "flush", count(&before, "flush") + 1.0);
    assert_eq!(count(&after, "write") - count(&before, "write"), 20.0);
    assert_eq!(count(&after, "getxattr") - count(&before, "getxattr"), 1.0);
    assert_eq!(fs::read(&path).expect("read back"), chunk.repeat(20));
}

#[test]
fn other_paths_and_methods_are_refused() {
    let port = free_port();
    let _mount = Mount::with_args(&["--metrics", &format!("127.0.0.1:{port}")]);
    assert_eq!(
        http(port, "GET /nothing HTTP/1.1").0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        http(port, "POST /metrics HTTP/1.1").0,
        "HTTP/1.1 405 Method Not Allowed"
    );
}

#[test]
fn a_taken_port_or_a_bad_address_fails_the_mount_clearly() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mount = Mount::unmounted();
    let output =
        run(common::mount_cmd(mount.path(), mount.data_dir())
            .args(["--metrics", &port.to_string()]));
    assert!(!output.status.success(), "mounted on a taken metrics port");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("--metrics 127.0.0.1:{port}")) && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(!mount.is_mounted());

    let output =
        run(common::mount_cmd(mount.path(), mount.data_dir()).args(["--metrics", "localhost"]));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a metrics address"), "{stderr}");
}
