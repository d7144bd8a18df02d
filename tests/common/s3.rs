//! Real S3 servers for the tests: where they are (`S3Env`, read from the env files that
//! `scripts/s3-server start` writes and `scripts/test` names), a blocking client over
//! aws-sdk-s3 for assertions (`S3Client`), and a fault-injecting HTTP proxy to put between
//! snapfs and a server (`FaultProxy`), with the HTTP/1.1 framing it needs.
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

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;

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
    pub fn mount(&self, args: &[impl AsRef<std::ffi::OsStr>]) -> super::Mount {
        let mut mount = super::Mount::unmounted();
        mount.set_env(self.vars());
        mount.set_os_args(args);
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

/// A request that did not succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum S3Error {
    /// An error answer (from the server or the proxy): its HTTP status and S3 error code.
    Status { status: u16, code: Option<String> },
    /// No whole answer: the connection failed or closed, or the body was cut off.
    Transport(String),
}

impl S3Error {
    fn from_sdk<E>(err: SdkError<E, HttpResponse>) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        match (&err, err.raw_response()) {
            (SdkError::ServiceError(_), Some(raw)) => S3Error::Status {
                status: raw.status().as_u16(),
                code: err.code().map(str::to_owned),
            },
            _ => S3Error::Transport(DisplayErrorContext(&err).to_string()),
        }
    }

    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            S3Error::Status { status, .. } => Some(*status),
            S3Error::Transport(_) => None,
        }
    }

    /// The S3 error code of an error answer, if it had one.
    pub fn code(&self) -> Option<&str> {
        match self {
            S3Error::Status { code, .. } => code.as_deref(),
            S3Error::Transport(_) => None,
        }
    }
}

impl std::fmt::Display for S3Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            S3Error::Status { status, code } => {
                write!(
                    f,
                    "HTTP {status} {}",
                    code.as_deref().unwrap_or("(no code)")
                )
            }
            S3Error::Transport(detail) => write!(f, "no answer: {detail}"),
        }
    }
}

/// An object as a GET brought it.
#[derive(Clone, Debug)]
pub struct Object {
    pub body: Vec<u8>,
    /// The answer's Content-Length.
    pub content_length: Option<i64>,
}

/// A blocking S3 client (aws-sdk-s3 on a small runtime of its own, path-style, no retries
/// and no checksums, so every request is one exchange a proxy can fault) for assertions
/// about what reached a bucket. `list`, `get`, `put` and `delete` panic on anything
/// unexpected; the `try_` methods return the outcome, for fault tests.
#[derive(Clone)]
pub struct S3Client {
    env: S3Env,
    page_size: usize,
    sdk: aws_sdk_s3::Client,
    /// Shared by clones; a current-thread runtime runs only inside `block_on`, which is
    /// all a blocking client needs.
    runtime: Arc<tokio::runtime::Runtime>,
}

impl S3Client {
    pub fn new(env: &S3Env) -> S3Client {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the S3 client's runtime");
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&env.endpoint)
            .region(Region::new(env.region.clone()))
            .credentials_provider(Credentials::new(
                &env.access_key,
                &env.secret_key,
                None,
                None,
                "snapfs tests",
            ))
            .force_path_style(true)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(IO_TIMEOUT)
                    .build(),
            )
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        S3Client {
            env: env.clone(),
            page_size: 1000,
            sdk: aws_sdk_s3::Client::from_conf(config),
            runtime: Arc::new(runtime),
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
        let page_size = i32::try_from(self.page_size).expect("page size");
        self.runtime.block_on(async {
            let mut out = Vec::new();
            let mut token = None;
            loop {
                // s3s-fs answers 500 when an object goes while it lists the directory
                // (tests list while a daemon deletes): a listing is asked again then.
                let mut attempts = 0;
                let page = loop {
                    let page = self
                        .sdk
                        .list_objects_v2()
                        .bucket(&self.env.bucket)
                        .prefix(prefix)
                        .max_keys(page_size)
                        .set_continuation_token(token.clone())
                        .send()
                        .await
                        .map_err(S3Error::from_sdk);
                    match page {
                        Err(e) if e.status() == Some(500) && attempts < 3 => attempts += 1,
                        page => {
                            break page
                                .unwrap_or_else(|e| self.fail(&format!("list {prefix:?}"), e));
                        }
                    }
                };
                for object in page.contents() {
                    let (Some(key), Some(size)) = (object.key(), object.size()) else {
                        panic!("list {prefix:?}: an object without key or size: {object:?}");
                    };
                    let size = u64::try_from(size)
                        .unwrap_or_else(|_| panic!("list {prefix:?}: {key} has size {size}"));
                    out.push((key.to_owned(), size));
                }
                if page.is_truncated() != Some(true) {
                    return out;
                }
                token = page.next_continuation_token().map(str::to_owned);
                assert!(
                    token.is_some(),
                    "list {prefix:?}: truncated page without a continuation token"
                );
            }
        })
    }

    /// The object's bytes, or None if there is no such key.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.try_get(key) {
            Ok(object) => Some(object.body),
            Err(S3Error::Status { status: 404, .. }) => None,
            Err(e) => self.fail(&format!("GET {key:?}"), e),
        }
    }

    pub fn put(&self, key: &str, bytes: &[u8]) {
        self.try_put(key, bytes)
            .unwrap_or_else(|e| self.fail(&format!("PUT {key:?}"), e));
    }

    /// Deletes the object (no error if it does not exist).
    pub fn delete(&self, key: &str) {
        let request = self.sdk.delete_object().bucket(&self.env.bucket).key(key);
        self.run(request.send())
            .unwrap_or_else(|e| self.fail(&format!("DELETE {key:?}"), e));
    }

    /// Deletes every object under `prefix`; returns how many.
    pub fn delete_prefix(&self, prefix: &str) -> usize {
        let keys = self.list(prefix);
        for (key, _) in &keys {
            self.delete(key);
        }
        keys.len()
    }

    /// One GetObject, body and all.
    pub fn try_get(&self, key: &str) -> Result<Object, S3Error> {
        self.runtime.block_on(async {
            let answer = self
                .sdk
                .get_object()
                .bucket(&self.env.bucket)
                .key(key)
                .send()
                .await
                .map_err(S3Error::from_sdk)?;
            let content_length = answer.content_length();
            let body = answer
                .body
                .collect()
                .await
                .map_err(|e| S3Error::Transport(DisplayErrorContext(&e).to_string()))?;
            Ok(Object {
                body: body.into_bytes().to_vec(),
                content_length,
            })
        })
    }

    /// One PutObject.
    pub fn try_put(&self, key: &str, bytes: &[u8]) -> Result<(), S3Error> {
        let request = self.sdk.put_object().bucket(&self.env.bucket).key(key);
        self.run(request.body(ByteStream::from(bytes.to_vec())).send())
            .map(drop)
    }

    /// One HeadObject.
    pub fn try_head(&self, key: &str) -> Result<(), S3Error> {
        let request = self.sdk.head_object().bucket(&self.env.bucket).key(key);
        self.run(request.send()).map(drop)
    }

    /// Runs one SDK request to its end.
    fn run<T, E>(
        &self,
        request: impl Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    ) -> Result<T, S3Error>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        self.runtime.block_on(request).map_err(S3Error::from_sdk)
    }

    /// A new connection to the endpoint, with the harness's timeouts, for tests that
    /// drive one by hand (keep-alive, `Expect`) with `presigned_head`.
    pub fn connect(&self) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(host_port(&self.env.endpoint).expect("S3Env endpoint"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(stream)
    }

    /// The head (request line, headers, blank line) of a GET, or of a PUT of a body of
    /// `body_len` bytes, signed by the SDK in its query string (a presigned URL). `extra`
    /// headers are sent unsigned.
    pub fn presigned_head(
        &self,
        method: &str,
        key: &str,
        body_len: usize,
        extra: &[(&str, &str)],
    ) -> Vec<u8> {
        let config = PresigningConfig::expires_in(Duration::from_secs(600)).expect("expiry");
        let bucket = &self.env.bucket;
        let presigned = self
            .runtime
            .block_on(async {
                match method {
                    "GET" => {
                        let request = self.sdk.get_object().bucket(bucket).key(key);
                        request.presigned(config).await.map_err(S3Error::from_sdk)
                    }
                    "PUT" => {
                        let request = self.sdk.put_object().bucket(bucket).key(key);
                        request.presigned(config).await.map_err(S3Error::from_sdk)
                    }
                    _ => panic!("presigned_head: {method} is not GET or PUT"),
                }
            })
            .unwrap_or_else(|e| self.fail(&format!("presign {method} {key:?}"), e));
        let target = presigned
            .uri()
            .strip_prefix(&self.env.endpoint)
            .unwrap_or_else(|| panic!("presigned URL {} off the endpoint", presigned.uri()));
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nContent-Length: {body_len}\r\n",
            host_port(&self.env.endpoint).expect("S3Env endpoint")
        );
        let signed = presigned
            .headers()
            .filter(|(name, _)| !name.eq_ignore_ascii_case("host"));
        for (name, value) in signed.chain(extra.iter().copied()) {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        head.into_bytes()
    }

    fn fail(&self, what: &str, err: S3Error) -> ! {
        panic!("{what} at {}: {err}", self.env.endpoint)
    }
}

/// One HTTP response read off a connection driven by hand, body decoded.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Reads one response to a GET or PUT (skipping interim 1xx ones) from a connection.
pub fn read_response(reader: &mut impl BufRead) -> io::Result<Response> {
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
        let framing = head.response_framing(status, false);
        copy_body(reader, &mut body, framing, true)?;
        return Ok(Response { status, body });
    }
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 message framing, for the proxy and connections driven by hand
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
#[derive(Clone, Debug)]
enum Plan {
    Always(Fault),
    Every {
        n: u64,
        fault: Fault,
        seen: u64,
    },
    /// Requests with this method whose target contains this text.
    Matching {
        method: String,
        part: String,
        fault: Fault,
    },
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
    /// The fault for request `head`; body faults apply only to GETs of an object (not of
    /// a listing).
    fn next_fault(&self, head: &Head) -> Fault {
        let object_get = head.is_object_get();
        let mut plan = self.plan.lock().expect("fault plan lock");
        match &mut *plan {
            Plan::Matching {
                method,
                part,
                fault,
            } => {
                let target = head.start.split(' ').nth(1).unwrap_or_default();
                if head.method() == method && target.contains(part.as_str()) {
                    *fault
                } else {
                    Fault::None
                }
            }
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

    /// From now on `fault` applies to the requests with `method` whose target (path and
    /// query) contains `part`; the others are forwarded.
    pub fn fault_matching(&self, method: &str, part: &str, fault: Fault) {
        self.shared.set_plan(Plan::Matching {
            method: method.into(),
            part: part.into(),
            fault,
        });
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
        let fault = shared.next_fault(&head);
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
