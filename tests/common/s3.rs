//! Real S3 servers for the tests: where they are (`S3Env`, read from the env files that
//! `scripts/s3-server start` writes and `scripts/test` names), a small signed client for
//! assertions (`S3Client`), and a fault-injecting HTTP proxy to put between snapfs and a
//! server (`FaultProxy`). Std only: SHA-256, HMAC and SigV4 are written out below.
//!
//! Like the rest of `common`, every test crate compiles this and uses a subset of it; the
//! `#![allow(dead_code)]` of `common/mod.rs` covers this module too.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long the client and the proxy wait for a peer that stopped talking.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest a `Fault::Stall` holds a request.
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// The largest message head (request line or status line plus headers) accepted.
const MAX_HEAD: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------
// Where the servers are
// ---------------------------------------------------------------------------------------

/// One S3 server started by `scripts/s3-server`: its endpoint, an access key that may read
/// and write `bucket`, and the region to sign for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Env {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    pub bucket: String,
}

impl S3Env {
    /// The Garage server of this test run (`$SNAPFS_TEST_GARAGE_ENV`).
    pub fn garage() -> S3Env {
        S3Env::from_var("SNAPFS_TEST_GARAGE_ENV")
    }

    /// The s3s-fs server of this test run (`$SNAPFS_TEST_S3S_ENV`).
    pub fn s3s() -> S3Env {
        S3Env::from_var("SNAPFS_TEST_S3S_ENV")
    }

    /// Both servers, named, for tests that run against each.
    pub fn all() -> Vec<(&'static str, S3Env)> {
        vec![("garage", S3Env::garage()), ("s3s", S3Env::s3s())]
    }

    fn from_var(var: &str) -> S3Env {
        let path = std::env::var_os(var).unwrap_or_else(|| {
            panic!(
                "{var} is not set: run the tests through scripts/test, which starts the S3 \
                 servers (or start one with scripts/s3-server start and set {var}=DIR/env)"
            )
        });
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{var}: cannot read {}: {e}", path.to_string_lossy()));
        S3Env::parse(&text).unwrap_or_else(|e| panic!("{var}={}: {e}", path.to_string_lossy()))
    }

    /// Parses the `export NAME=VALUE` lines of an env file.
    pub fn parse(text: &str) -> Result<S3Env, String> {
        let mut vars = HashMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (name, value) = line
                .split_once('=')
                .ok_or_else(|| format!("not NAME=VALUE: {line:?}"))?;
            let value = value.trim_matches(|c| c == '"' || c == '\'');
            vars.insert(name.trim().to_string(), value.to_string());
        }
        let mut take = |name: &str| {
            vars.remove(name)
                .ok_or_else(|| format!("{name} missing from the env file"))
        };
        let env = S3Env {
            endpoint: take("AWS_ENDPOINT_URL")?.trim_end_matches('/').to_string(),
            access_key: take("AWS_ACCESS_KEY_ID")?,
            secret_key: take("AWS_SECRET_ACCESS_KEY")?,
            region: take("AWS_REGION")?,
            bucket: take("SNAPFS_TEST_BUCKET")?,
        };
        host_port(&env.endpoint)?;
        Ok(env)
    }

    /// The standard AWS variables that point an AWS SDK at this server.
    pub fn vars(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", self.access_key.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.as_str()),
            ("AWS_REGION", self.region.as_str()),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Sets the standard AWS variables on `cmd` (and clears those that would override
    /// them), so an AWS SDK in the child talks to this server.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.envs(self.vars())
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_DEFAULT_REGION");
    }

    /// A snapfs mount (in the foreground, its own temp dir) whose daemon talks to this
    /// server, with `snapfs mount` arguments `args`.
    pub fn mount(&self, args: &[&str]) -> super::Mount {
        let mut mount = super::Mount::unmounted();
        mount.set_env(self.vars());
        mount.set_args(args);
        mount.remount();
        mount
    }

    /// A mount uploading to `prefix` of this server's bucket, with `extra` arguments.
    pub fn mount_store(&self, prefix: &str, extra: &[&str]) -> super::Mount {
        let url = self.url(prefix);
        let mut args = vec!["--store", url.as_str()];
        args.extend_from_slice(extra);
        self.mount(&args)
    }

    /// The same server reached through another endpoint (a `FaultProxy::url()`).
    pub fn with_endpoint(&self, endpoint: &str) -> S3Env {
        S3Env {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            ..self.clone()
        }
    }

    /// `s3://BUCKET/PREFIX`
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// `snapfs restore --store URL WHAT DEST [extra]` with this server's variables.
    pub fn restore(&self, url: &str, what: &str, dest: &Path, extra: &[&str]) -> Output {
        let mut cmd = super::snapfs();
        self.apply(&mut cmd);
        cmd.args(["restore", "--store", url, what])
            .arg(dest)
            .args(extra);
        super::run(&mut cmd)
    }

    pub fn client(&self) -> S3Client {
        S3Client::new(self)
    }
}

/// A key prefix no other test (or earlier run) uses: `NAME-PID-NANOS/`. Tests share one
/// bucket per server and run in parallel.
pub fn unique_prefix(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("{name}-{}-{nanos}/", std::process::id())
}

/// `host:port` of an `http://host:port` endpoint.
fn host_port(endpoint: &str) -> Result<String, String> {
    let rest = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| format!("endpoint {endpoint:?}: only http:// is supported"))?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(format!("endpoint {endpoint:?}: expected http://HOST:PORT"));
    }
    Ok(rest.to_string())
}

// ---------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------

/// One HTTP response, body decoded (no chunk framing).
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// Names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `<Code>` of an S3 error body, if any.
    pub fn error_code(&self) -> Option<String> {
        xml_values(&self.text(), "Code").into_iter().next()
    }
}

/// A minimal S3 client (path-style, SigV4, one HTTP/1.1 connection per request) for
/// assertions about what reached a bucket. `list`, `get`, `put` and `delete` panic on
/// anything unexpected; `request` returns the raw outcome, for fault tests.
#[derive(Clone, Debug)]
pub struct S3Client {
    env: S3Env,
    host: String,
    page_size: usize,
}

impl S3Client {
    pub fn new(env: &S3Env) -> S3Client {
        S3Client {
            host: host_port(&env.endpoint).expect("S3Env endpoint"),
            env: env.clone(),
            page_size: 1000,
        }
    }

    /// Keys per ListObjectsV2 page (default 1000), to exercise continuation.
    pub fn with_page_size(mut self, keys: usize) -> S3Client {
        self.page_size = keys;
        self
    }

    pub fn env(&self) -> &S3Env {
        &self.env
    }

    /// Every object under `prefix`, with its size, in key order.
    pub fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let page_size = self.page_size.to_string();
        loop {
            let mut query = vec![
                ("list-type", "2"),
                ("prefix", prefix),
                ("max-keys", page_size.as_str()),
            ];
            if let Some(token) = &token {
                query.push(("continuation-token", token));
            }
            let resp = self.expect_ok("GET", "", &query, b"");
            let text = resp.text();
            for contents in xml_elements(&text, "Contents") {
                let key = xml_values(contents, "Key").into_iter().next();
                let size = xml_values(contents, "Size").into_iter().next();
                let (Some(key), Some(size)) = (key, size) else {
                    panic!("list {prefix:?}: <Contents> without <Key> or <Size>: {contents}");
                };
                let size = size
                    .parse()
                    .unwrap_or_else(|_| panic!("list {prefix:?}: bad <Size> {size:?}"));
                out.push((key, size));
            }
            let truncated =
                xml_values(&text, "IsTruncated").first().map(String::as_str) == Some("true");
            if !truncated {
                break;
            }
            token = xml_values(&text, "NextContinuationToken")
                .into_iter()
                .next();
            assert!(
                token.is_some(),
                "list {prefix:?}: truncated page without NextContinuationToken: {text}"
            );
        }
        out
    }

    /// The object's bytes, or None if there is no such key.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let resp = self.send("GET", key, &[], b"");
        match resp.status {
            200 => Some(resp.body),
            404 => None,
            status => panic!("GET {key:?}: HTTP {status}: {}", resp.text()),
        }
    }

    pub fn put(&self, key: &str, bytes: &[u8]) {
        self.expect_ok("PUT", key, &[], bytes);
    }

    /// Deletes the object (no error if it does not exist).
    pub fn delete(&self, key: &str) {
        self.expect_ok("DELETE", key, &[], b"");
    }

    /// Deletes every object under `prefix`; returns how many.
    pub fn delete_prefix(&self, prefix: &str) -> usize {
        let keys = self.list(prefix);
        for (key, _) in &keys {
            self.delete(key);
        }
        keys.len()
    }

    fn send(&self, method: &str, key: &str, query: &[(&str, &str)], body: &[u8]) -> Response {
        self.request(method, key, query, body)
            .unwrap_or_else(|e| panic!("{method} {key:?} at {}: {e}", self.env.endpoint))
    }

    fn expect_ok(&self, method: &str, key: &str, query: &[(&str, &str)], body: &[u8]) -> Response {
        let resp = self.send(method, key, query, body);
        assert!(
            (200..300).contains(&resp.status),
            "{method} {key:?} {query:?} at {}: HTTP {}: {}",
            self.env.endpoint,
            resp.status,
            resp.text()
        );
        resp
    }

    /// One signed request on a new connection (`Connection: close`). `key` "" addresses
    /// the bucket itself. Err for connection failures (refused, reset, closed early).
    pub fn request(
        &self,
        method: &str,
        key: &str,
        query: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let head = self.signed_head(method, key, query, body, &[("Connection", "close")]);
        let mut stream = self.connect()?;
        stream.write_all(&head)?;
        stream.write_all(body)?;
        stream.flush()?;
        read_response(&mut BufReader::new(stream), method == "HEAD")
    }

    /// A new connection to the endpoint, with the harness's timeouts.
    pub fn connect(&self) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(&self.host)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(stream)
    }

    /// The signed head (request line, headers, blank line) of a request whose body is
    /// `body`, for tests that drive a connection by hand (keep-alive, `Expect`). `extra`
    /// headers are sent unsigned.
    pub fn signed_head(
        &self,
        method: &str,
        key: &str,
        query: &[(&str, &str)],
        body: &[u8],
        extra: &[(&str, &str)],
    ) -> Vec<u8> {
        let path = if key.is_empty() {
            format!("/{}", self.env.bucket)
        } else {
            format!("/{}/{}", self.env.bucket, uri_encode(key, true))
        };
        let mut pairs: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
            .collect();
        pairs.sort();
        let query = pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let (amz_date, day) = amz_date(SystemTime::now());
        let payload = hex(&sha256(body));
        let signed_headers = "host;x-amz-content-sha256;x-amz-date";
        let canonical = format!(
            "{method}\n{path}\n{query}\nhost:{}\nx-amz-content-sha256:{payload}\n\
             x-amz-date:{amz_date}\n\n{signed_headers}\n{payload}",
            self.host
        );
        let scope = format!("{day}/{}/s3/aws4_request", self.env.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex(&sha256(canonical.as_bytes()))
        );
        let mut signing_key = format!("AWS4{}", self.env.secret_key).into_bytes();
        for part in [day.as_str(), &self.env.region, "s3", "aws4_request"] {
            signing_key = hmac_sha256(&signing_key, part.as_bytes()).to_vec();
        }
        let signature = hex(&hmac_sha256(&signing_key, to_sign.as_bytes()));
        let target = if query.is_empty() {
            path
        } else {
            format!("{path}?{query}")
        };
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nx-amz-date: {amz_date}\r\n\
             x-amz-content-sha256: {payload}\r\nAuthorization: AWS4-HMAC-SHA256 \
             Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}\r\n\
             Content-Length: {}\r\n",
            self.host,
            self.env.access_key,
            body.len()
        );
        for (name, value) in extra {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        head.into_bytes()
    }
}

/// Reads one response (skipping interim 1xx ones) from a connection. `head_only`: the
/// request was a HEAD, so there is no body whatever the headers say.
pub fn read_response(reader: &mut impl BufRead, head_only: bool) -> io::Result<Response> {
    loop {
        let raw = read_head(reader)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            )
        })?;
        let head = Head::parse(&raw)?;
        let status = head.status()?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let mut body = Vec::new();
        let framing = head.response_framing(status, head_only);
        copy_body(reader, &mut body, framing, true)?;
        return Ok(Response {
            status,
            headers: head.headers,
            body,
        });
    }
}

/// Percent-encodes all but the unreserved characters (and `/` if `keep_slash`), as SigV4
/// canonical URIs and query strings want.
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `(YYYYMMDDTHHMMSSZ, YYYYMMDD)` in UTC.
fn amz_date(time: SystemTime) -> (String, String) {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let date = format!("{year:04}{month:02}{day:02}");
    let full = format!(
        "{date}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    (full, date)
}

/// The text of every `<tag>...</tag>` (not nested in itself), raw.
fn xml_elements<'a>(text: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        out.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    out
}

/// The unescaped text of every `<tag>...</tag>`.
fn xml_values(text: &str, tag: &str) -> Vec<String> {
    xml_elements(text, tag)
        .into_iter()
        .map(xml_unescape)
        .collect()
}

fn xml_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest.find(';') else { break };
        let entity = &rest[1..semi];
        let ch = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .map(|h| u32::from_str_radix(h, 16).ok())
                .unwrap_or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match ch {
            Some(ch) => {
                out.push(ch);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------
// SHA-256 and HMAC-SHA256 (FIPS 180-4, RFC 2104)
// ---------------------------------------------------------------------------------------

const SHA256_K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut state: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    // The final blocks: the tail of the data, 0x80, zeros, the length in bits.
    let full = data.len() / 64 * 64;
    let mut tail = data[full..].to_vec();
    tail.push(0x80);
    while tail.len() % 64 != 56 {
        tail.push(0);
    }
    tail.extend_from_slice(&(data.len() as u64).wrapping_mul(8).to_be_bytes());
    for block in data[..full].chunks_exact(64).chain(tail.chunks_exact(64)) {
        let mut w = [0u32; 64];
        for (word, bytes) in w.iter_mut().zip(block.chunks_exact(4)) {
            *word = u32::from_be_bytes(bytes.try_into().expect("4 bytes"));
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = state;
        for (k, wi) in SHA256_K.iter().zip(w) {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = h
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(*k)
                .wrapping_add(wi);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            h = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (s, v) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *s = s.wrapping_add(v);
        }
    }
    let mut out = [0u8; 32];
    for (bytes, word) in out.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    out
}

pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&sha256(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    inner.extend_from_slice(message);
    let mut outer: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    outer.extend_from_slice(&sha256(&inner));
    sha256(&outer)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 message framing, shared by the client and the proxy
// ---------------------------------------------------------------------------------------

/// A parsed message head: the request or status line and the headers.
struct Head {
    start: String,
    headers: Vec<(String, String)>,
}

/// How the body after a head is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes (a response without length or chunking).
    UntilEof,
}

fn bad_data(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads a head up to and including its blank line; Ok(None) if the connection closes
/// before its first byte.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let n = reader.read_until(b'\n', &mut head)?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a message head",
                ))
            };
        }
        if head == b"\r\n" || head == b"\n" {
            // Blank lines before a request line are allowed (RFC 9112 section 2.2).
            head.clear();
            continue;
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Err(bad_data("message head over 64 KiB"));
        }
    }
}

impl Head {
    fn parse(raw: &[u8]) -> io::Result<Head> {
        let text = std::str::from_utf8(raw).map_err(|_| bad_data("non-UTF-8 message head"))?;
        let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
        let start = lines.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        for line in lines.take_while(|l| !l.is_empty()) {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| bad_data(format!("bad header line {line:?}")))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        Ok(Head { start, headers })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn method(&self) -> &str {
        self.start.split(' ').next().unwrap_or_default()
    }

    /// A GET of one object (path-style `/BUCKET/KEY`), not of a bucket or its listing.
    fn is_object_get(&self) -> bool {
        let target = self.start.split(' ').nth(1).unwrap_or_default();
        let path = target.split('?').next().unwrap_or_default();
        self.method() == "GET"
            && path
                .trim_start_matches('/')
                .split_once('/')
                .is_some_and(|(_, key)| !key.is_empty())
    }

    /// This (response) head re-serialized with `Content-Length: len` and no other framing
    /// header, for a body the proxy rewrote.
    fn with_length(&self, len: usize) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.start);
        for (name, value) in &self.headers {
            if name != "content-length" && name != "transfer-encoding" {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        out.push_str(&format!("content-length: {len}\r\n\r\n"));
        out.into_bytes()
    }

    fn status(&self) -> io::Result<u16> {
        self.start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_data(format!("bad status line {:?}", self.start)))
    }

    fn wants_close(&self) -> bool {
        self.has_token("connection", "close") || self.start.ends_with("HTTP/1.0")
    }

    fn expects_continue(&self) -> bool {
        self.has_token("expect", "100-continue")
    }

    fn content_length(&self) -> io::Result<Option<u64>> {
        self.header("content-length")
            .map(|v| {
                v.parse()
                    .map_err(|_| bad_data(format!("bad Content-Length {v:?}")))
            })
            .transpose()
    }

    fn request_framing(&self) -> io::Result<Framing> {
        if self.has_token("transfer-encoding", "chunked") {
            return Ok(Framing::Chunked);
        }
        Ok(self
            .content_length()?
            .map_or(Framing::Empty, Framing::Length))
    }

    fn response_framing(&self, status: u16, head_request: bool) -> Framing {
        if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
            Framing::Empty
        } else if self.has_token("transfer-encoding", "chunked") {
            Framing::Chunked
        } else {
            match self.content_length() {
                Ok(Some(len)) => Framing::Length(len),
                _ => Framing::UntilEof,
            }
        }
    }
}

/// Copies one body from `reader` to `writer`: decoded (`decode`, chunk framing removed)
/// or exactly as framed on the wire (for relaying).
fn copy_body(
    reader: &mut impl BufRead,
    writer: &mut impl Write,
    framing: Framing,
    decode: bool,
) -> io::Result<()> {
    match framing {
        Framing::Empty => Ok(()),
        Framing::Length(len) => copy_exact(reader, writer, len),
        Framing::UntilEof => io::copy(reader, writer).map(drop),
        Framing::Chunked => loop {
            let mut line = Vec::new();
            reader.read_until(b'\n', &mut line)?;
            if !line.ends_with(b"\n") {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a chunked body",
                ));
            }
            if !decode {
                writer.write_all(&line)?;
            }
            let size_text = String::from_utf8_lossy(&line);
            let size_text = size_text.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(size_text, 16)
                .map_err(|_| bad_data(format!("bad chunk size {size_text:?}")))?;
            if size == 0 {
                // Trailer fields, then the blank line that ends the body.
                loop {
                    let mut trailer = Vec::new();
                    reader.read_until(b'\n', &mut trailer)?;
                    if !trailer.ends_with(b"\n") {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed inside chunk trailers",
                        ));
                    }
                    if !decode {
                        writer.write_all(&trailer)?;
                    }
                    if trailer == b"\r\n" || trailer == b"\n" {
                        return Ok(());
                    }
                }
            }
            copy_exact(reader, writer, size)?;
            let mut crlf = Vec::new();
            reader.read_until(b'\n', &mut crlf)?;
            if crlf != b"\r\n" && crlf != b"\n" {
                return Err(bad_data("chunk not followed by CRLF"));
            }
            if !decode {
                writer.write_all(&crlf)?;
            }
        },
    }
}

fn copy_exact(reader: &mut impl BufRead, writer: &mut impl Write, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut reader.take(len), writer)?;
    if copied < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed after {copied} of {len} body bytes"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The fault-injecting proxy
// ---------------------------------------------------------------------------------------

/// What the proxy does to a request instead of forwarding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward it.
    None,
    /// Answer 503 with the S3 error `SlowDown` (throttling).
    SlowDown,
    /// Answer 500 with the S3 error `InternalError`.
    InternalError,
    /// Close the client connection abruptly (TCP RST: SO_LINGER 0) on reading the head.
    Reset,
    /// Never answer: hold the connection until the proxy's faults are changed (any
    /// `set_fault` or `fail_every`), the proxy is dropped, or 60 s pass; then close it.
    Stall,
    /// Forward it, then flip bytes in the body of a successful answer, keeping its length.
    /// Only object GETs get it (and only they count for `fail_every`).
    Corrupt,
    /// Forward it, then cut the body of a successful answer in half. `consistent_length`:
    /// the Content-Length says the shorter length, so the answer looks whole (the nasty
    /// case); otherwise the full length is announced and the connection closes early.
    /// Only object GETs get it (and only they count for `fail_every`).
    Truncate { consistent_length: bool },
}

impl Fault {
    /// Faults that mangle the body of an answer instead of replacing it.
    fn on_body(self) -> bool {
        matches!(self, Fault::Corrupt | Fault::Truncate { .. })
    }
}

/// Which requests get a fault.
#[derive(Clone, Copy, Debug)]
enum Plan {
    Always(Fault),
    Every { n: u64, fault: Fault, seen: u64 },
}

struct Shared {
    upstream: String,
    plan: Mutex<Plan>,
    /// Bumped by every change of the plan; ends stalls.
    generation: AtomicU64,
    forwarded: AtomicU64,
    faulted: AtomicU64,
    stopping: AtomicBool,
    /// Every open socket (client and upstream side) by connection id, so Drop can shut
    /// them down and no thread outlives the proxy for long.
    sockets: Mutex<HashMap<u64, Vec<TcpStream>>>,
}

impl Shared {
    /// The fault for the next request; `object_get`: it is a GET of an object (not of a
    /// listing), the only request body faults apply to.
    fn next_fault(&self, object_get: bool) -> Fault {
        let mut plan = self.plan.lock().expect("fault plan lock");
        match &mut *plan {
            Plan::Always(fault) | Plan::Every { fault, .. } if fault.on_body() && !object_get => {
                Fault::None
            }
            Plan::Always(fault) => *fault,
            Plan::Every { n, fault, seen } => {
                *seen += 1;
                if *seen % *n == 0 { *fault } else { Fault::None }
            }
        }
    }

    fn set_plan(&self, plan: Plan) {
        *self.plan.lock().expect("fault plan lock") = plan;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn register(&self, id: u64, stream: &TcpStream) {
        if let Ok(clone) = stream.try_clone() {
            let mut sockets = self.sockets.lock().expect("socket registry lock");
            sockets.entry(id).or_default().push(clone);
        }
    }
}

/// An HTTP/1.1 proxy in front of an S3 endpoint, in threads of the test process, that
/// injects faults per request (also on keep-alive connections). Point the code under
/// test at `url()` (`S3Env::with_endpoint`). Dropping it stops accepting and shuts down
/// its open connections.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy on 127.0.0.1 (free port) to `upstream` (`http://HOST:PORT`), forwarding
    /// everything until told otherwise.
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream = host_port(upstream).expect("FaultProxy upstream");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let addr = listener.local_addr().expect("fault proxy address");
        let shared = Arc::new(Shared {
            upstream,
            plan: Mutex::new(Plan::Always(Fault::None)),
            generation: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            sockets: Mutex::new(HashMap::new()),
        });
        let accept = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("fault-proxy".into())
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn the fault proxy")
        };
        FaultProxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// A proxy to `env`'s server, and the env to reach the server through it.
    pub fn for_env(env: &S3Env) -> (FaultProxy, S3Env) {
        let proxy = FaultProxy::start(&env.endpoint);
        let through = env.with_endpoint(&proxy.url());
        (proxy, through)
    }

    /// `http://127.0.0.1:PORT`, for AWS_ENDPOINT_URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies `fault` to every request from now on (`Fault::None`: forward everything).
    pub fn set_fault(&self, fault: Fault) {
        self.shared.set_plan(Plan::Always(fault));
    }

    /// From now on every `n`-th request (the n-th, 2n-th... counted from this call) gets
    /// `fault`; the others are forwarded.
    pub fn fail_every(&self, n: u64, fault: Fault) {
        assert!(n > 0, "fail_every(0)");
        self.shared.set_plan(Plan::Every { n, fault, seen: 0 });
    }

    /// (requests forwarded to the upstream, requests that got a fault) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.forwarded.load(Ordering::SeqCst),
            self.shared.faulted.load(Ordering::SeqCst),
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        // Wake the accept loop so it sees `stopping`.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let sockets = std::mem::take(&mut *self.shared.sockets.lock().expect("registry lock"));
        for stream in sockets.values().flatten() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(client) = conn else { continue };
        next_id += 1;
        let id = next_id;
        shared.register(id, &client);
        let shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("fault-proxy-{id}"))
            .spawn(move || {
                let _ = serve(&shared, id, client);
                // Dropping the registered clones closes the sockets (with RST after a
                // Reset, which set SO_LINGER 0).
                shared
                    .sockets
                    .lock()
                    .expect("socket registry lock")
                    .remove(&id);
            });
        if spawned.is_err() {
            // Out of threads: the connection is dropped (the registry entry stays until
            // the proxy is dropped).
            continue;
        }
    }
}

/// Serves one client connection: request by request, a fault or a round trip to the
/// connection's own upstream connection.
fn serve(shared: &Shared, id: u64, client: TcpStream) -> io::Result<()> {
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    client.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut client_in = BufReader::new(client.try_clone()?);
    let mut client_out = client;
    let mut upstream: Option<(BufReader<TcpStream>, TcpStream)> = None;
    loop {
        let Some(raw) = read_head(&mut client_in)? else {
            return Ok(());
        };
        let head = Head::parse(&raw)?;
        let request_framing = head.request_framing()?;
        let head_request = head.method() == "HEAD";
        let fault = shared.next_fault(head.is_object_get());
        // Body faults count once applied (to a successful answer with a body).
        if fault != Fault::None && !fault.on_body() {
            shared.faulted.fetch_add(1, Ordering::SeqCst);
        }
        match fault {
            Fault::None | Fault::Corrupt | Fault::Truncate { .. } => {}
            Fault::SlowDown | Fault::InternalError => {
                // Read the body, to keep the connection in step, unless the client waits
                // for a 100 Continue: then the answer is final and the connection closes.
                let close = head.expects_continue() || head.wants_close();
                if !head.expects_continue() {
                    copy_body(&mut client_in, &mut io::sink(), request_framing, true)?;
                }
                write_error(&mut client_out, fault, head_request, close)?;
                if close {
                    return Ok(());
                }
                continue;
            }
            Fault::Reset => {
                set_linger_zero(&client_out);
                return Ok(());
            }
            Fault::Stall => {
                let generation = shared.generation.load(Ordering::SeqCst);
                let deadline = Instant::now() + STALL_LIMIT;
                while Instant::now() < deadline
                    && !shared.stopping.load(Ordering::SeqCst)
                    && shared.generation.load(Ordering::SeqCst) == generation
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return Ok(());
            }
        }

        if upstream.is_none() {
            let stream = TcpStream::connect(&shared.upstream)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            shared.register(id, &stream);
            upstream = Some((BufReader::new(stream.try_clone()?), stream));
        }
        let (up_in, up_out) = upstream.as_mut().expect("upstream connected");
        up_out.write_all(&raw)?;
        shared.forwarded.fetch_add(1, Ordering::SeqCst);
        if head.expects_continue() {
            let interim = read_head(up_in)?.ok_or_else(upstream_closed)?;
            client_out.write_all(&interim)?;
            let interim_head = Head::parse(&interim)?;
            let status = interim_head.status()?;
            if status != 100 {
                // A final answer instead of 100 Continue: relay it and close, since the
                // client may or may not send the body now.
                let framing = interim_head.response_framing(status, head_request);
                copy_body(up_in, &mut client_out, framing, false)?;
                return Ok(());
            }
        }
        copy_body(&mut client_in, up_out, request_framing, false)?;
        up_out.flush()?;

        // Interim responses are relayed as they come; then the final one.
        let (raw, response, status) = loop {
            let raw = read_head(up_in)?.ok_or_else(upstream_closed)?;
            let response = Head::parse(&raw)?;
            let status = response.status()?;
            if !(100..200).contains(&status) || status == 101 {
                break (raw, response, status);
            }
            client_out.write_all(&raw)?;
        };
        let framing = response.response_framing(status, head_request);
        if fault.on_body() && status == 200 {
            let mut body = Vec::new();
            copy_body(up_in, &mut body, framing, true)?;
            if !body.is_empty() {
                shared.faulted.fetch_add(1, Ordering::SeqCst);
            }
            let whole = body.len();
            let announced = match fault {
                Fault::Corrupt => {
                    // A few bytes spread over the body, each flipped.
                    for at in [whole / 3, whole / 2, whole * 3 / 4] {
                        if let Some(byte) = body.get_mut(at) {
                            *byte ^= 0xA5;
                        }
                    }
                    whole
                }
                Fault::Truncate { consistent_length } => {
                    body.truncate(whole / 2);
                    if consistent_length { whole / 2 } else { whole }
                }
                _ => unreachable!("only body faults mangle bodies"),
            };
            client_out.write_all(&response.with_length(announced))?;
            client_out.write_all(&body)?;
            client_out.flush()?;
            // A body shorter than announced leaves the connection out of step: close it.
            if announced != body.len() || framing == Framing::UntilEof || response.wants_close() {
                return Ok(());
            }
            continue;
        }
        client_out.write_all(&raw)?;
        copy_body(up_in, &mut client_out, framing, false)?;
        client_out.flush()?;
        if framing == Framing::UntilEof || response.wants_close() || head.wants_close() {
            return Ok(());
        }
    }
}

fn upstream_closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the upstream closed the connection before answering",
    )
}

fn write_error(
    out: &mut TcpStream,
    fault: Fault,
    head_request: bool,
    close: bool,
) -> io::Result<()> {
    let (status, reason, code, message) = match fault {
        Fault::SlowDown => (
            503,
            "Service Unavailable",
            "SlowDown",
            "Please reduce your request rate.",
        ),
        _ => (
            500,
            "Internal Server Error",
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
    );
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n\
         Content-Length: {}\r\nx-amz-request-id: fault-proxy\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
    if !head_request {
        response.push_str(&body);
    }
    out.write_all(response.as_bytes())?;
    out.flush()
}

/// SO_LINGER 0: closing the socket sends RST instead of FIN.
fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a linger struct of the size passed.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
