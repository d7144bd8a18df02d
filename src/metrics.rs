//! Prometheus metrics (`snapfs mount --metrics ADDR`): what the mount does, counted where it
//! happens, and served in Prometheus's text format (0.0.4) over plain HTTP.
//!
//! The registry is process-wide and off until `enable`: every recording function is a
//! no-op before, so the core and its tests pay nothing without `--metrics`. The encoding is
//! prometheus-client's (the Prometheus project's own crate); the HTTP side is a few lines
//! over std, enough for `GET /metrics`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Default port of `--metrics PORT` (on 127.0.0.1 unless an address is given).
pub const DEFAULT_PORT: u16 = 9477;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrnoLabel {
    errno: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabel {
    op: &'static str,
    outcome: &'static str,
}

type Latencies<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 10 µs to about 40 s: a cached getattr and a GET over a slow link.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 4.0, 12))
}

struct Metrics {
    registry: Registry,
    operations: Latencies<OpLabel>,
    operation_errors: Family<ErrnoLabel, Counter>,
    read_bytes: Counter,
    written_bytes: Counter,
    flushes: Counter,
    snapshots: Family<StateLabel, Gauge>,
    pending_bytes: Gauge,
    upload_bytes: Counter,
    upload_objects: Counter,
    store_retries: Counter,
    upload_errors: Counter,
    store_requests: Latencies<RequestLabel>,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_evictions: Counter,
    damaged_blocks: Counter,
    healed_blocks: Counter,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("snapfs");
        let operations: Latencies<OpLabel> = Family::new_with_constructor(latency_histogram);
        let store_requests: Latencies<RequestLabel> =
            Family::new_with_constructor(latency_histogram);
        let metrics = Metrics {
            operations,
            operation_errors: Family::default(),
            read_bytes: Counter::default(),
            written_bytes: Counter::default(),
            flushes: Counter::default(),
            snapshots: Family::default(),
            pending_bytes: Gauge::default(),
            upload_bytes: Counter::default(),
            upload_objects: Counter::default(),
            store_retries: Counter::default(),
            upload_errors: Counter::default(),
            store_requests,
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_evictions: Counter::default(),
            damaged_blocks: Counter::default(),
            healed_blocks: Counter::default(),
            registry: Registry::default(),
        };
        let m = &metrics;
        let r = &mut registry;
        r.register(
            "operation_duration_seconds",
            "Filesystem requests served, by operation, and how long they took",
            m.operations.clone(),
        );
        r.register(
            "operation_errors",
            "Filesystem requests answered with an error, by errno",
            m.operation_errors.clone(),
        );
        r.register(
            "read_bytes",
            "Bytes read through the mount",
            m.read_bytes.clone(),
        );
        r.register(
            "written_bytes",
            "Bytes written through the mount",
            m.written_bytes.clone(),
        );
        r.register(
            "flushes",
            "Write buffers flushed to the block store and the catalog",
            m.flushes.clone(),
        );
        r.register("snapshots", "Snapshots, by state", m.snapshots.clone());
        r.register(
            "pending_upload_bytes",
            "Bytes pending snapshots still have to send (of the sizes known so far)",
            m.pending_bytes.clone(),
        );
        r.register(
            "upload_bytes",
            "Bytes of objects sent to the store, as sent (compressed, sealed if encrypted)",
            m.upload_bytes.clone(),
        );
        r.register(
            "upload_objects",
            "Objects (blocks, trees, snapshot objects) sent to the store",
            m.upload_objects.clone(),
        );
        r.register(
            "store_retries",
            "Store requests retried after a transient failure",
            m.store_retries.clone(),
        );
        r.register(
            "upload_errors",
            "Snapshot uploads failed, and uploader rounds that ended in an error",
            m.upload_errors.clone(),
        );
        r.register(
            "store_request_duration_seconds",
            "Requests to the object store, by operation and outcome, and how long they took",
            m.store_requests.clone(),
        );
        r.register(
            "cache_hits",
            "Block reads served from memory or the local disk",
            m.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Block reads that had to fetch from a store",
            m.cache_misses.clone(),
        );
        r.register(
            "cache_evictions",
            "Stored blocks evicted from the local disk under --cache-size",
            m.cache_evictions.clone(),
        );
        r.register(
            "damaged_blocks",
            "Reads that found a local block's bytes damaged (bit rot, a crash of the machine)",
            m.damaged_blocks.clone(),
        );
        r.register(
            "healed_blocks",
            "Damaged local blocks replaced by a good copy (from the store, or written again)",
            m.healed_blocks.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Whether metrics are being served (`--metrics`).
pub fn enabled() -> bool {
    METRICS.get().is_some()
}

fn with(record: impl FnOnce(&Metrics)) {
    if let Some(metrics) = METRICS.get() {
        record(metrics);
    }
}

/// A filesystem request being served: its latency is recorded when this is dropped.
pub struct Operation {
    op: &'static str,
    started: Option<Instant>,
}

impl Drop for Operation {
    fn drop(&mut self) {
        if let Some(started) = self.started {
            with(|m| {
                m.operations
                    .get_or_create(&OpLabel { op: self.op })
                    .observe(started.elapsed().as_secs_f64());
            });
        }
    }
}

/// Starts timing filesystem request `op` (a FUSE operation name).
pub fn operation(op: &'static str) -> Operation {
    Operation {
        op,
        started: METRICS.get().map(|_| Instant::now()),
    }
}

/// A filesystem request was answered with error `errno`.
pub fn operation_error(errno: i32) {
    with(|m| {
        m.operation_errors
            .get_or_create(&ErrnoLabel { errno })
            .inc();
    });
}

pub fn read_bytes(bytes: usize) {
    with(|m| {
        m.read_bytes.inc_by(bytes as u64);
    });
}

pub fn written_bytes(bytes: usize) {
    with(|m| {
        m.written_bytes.inc_by(bytes as u64);
    });
}

pub fn flushed() {
    with(|m| {
        m.flushes.inc();
    });
}

/// An object of `bytes` (as sent) reached the store.
pub fn uploaded(bytes: u64) {
    with(|m| {
        m.upload_objects.inc();
        m.upload_bytes.inc_by(bytes);
    });
}

pub fn store_retry() {
    with(|m| {
        m.store_retries.inc();
    });
}

pub fn upload_error() {
    with(|m| {
        m.upload_errors.inc();
    });
}

/// One request to the object store: `op` (get, put, delete, list), whether it succeeded.
pub fn store_request(op: &'static str, ok: bool, took: Duration) {
    with(|m| {
        let outcome = if ok { "ok" } else { "error" };
        m.store_requests
            .get_or_create(&RequestLabel { op, outcome })
            .observe(took.as_secs_f64());
    });
}

pub fn cache_hit() {
    with(|m| {
        m.cache_hits.inc();
    });
}

pub fn cache_miss() {
    with(|m| {
        m.cache_misses.inc();
    });
}

pub fn cache_eviction() {
    with(|m| {
        m.cache_evictions.inc();
    });
}

pub fn block_damaged() {
    with(|m| {
        m.damaged_blocks.inc();
    });
}

pub fn block_healed() {
    with(|m| {
        m.healed_blocks.inc();
    });
}

/// What a scrape reads from the volume at that moment.
#[derive(Debug, Default)]
pub struct VolumeGauges {
    /// Snapshots by state name.
    pub snapshots: Vec<(&'static str, u64)>,
    pub pending_bytes: u64,
}

/// Parses `--metrics`: `PORT` (on 127.0.0.1), `HOST:PORT`, or `[V6]:PORT`.
pub fn parse_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| {
        format!("'{text}' is not a metrics address: write PORT (on 127.0.0.1) or HOST:PORT")
    })
}

/// The longest request head read from a scraper.
const MAX_REQUEST_HEAD: u64 = 8 << 10;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Turns metrics on and serves them at `addr` from a thread of their own (for the life of
/// the process); `gauges` is read at every scrape. Fails if the address cannot be bound.
pub fn serve(
    addr: SocketAddr,
    gauges: impl Fn() -> VolumeGauges + Send + 'static,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    METRICS.get_or_init(Metrics::new);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let answered = stream.and_then(|stream| answer(stream, &gauges));
                if let Err(e) = answered {
                    tracing::debug!(error = %e, "metrics request failed");
                }
            }
        })?;
    tracing::info!(address = %bound, "serving metrics");
    Ok(bound)
}

/// Answers one HTTP request: `GET /metrics` (or `/`) gets the text format.
fn answer(mut stream: TcpStream, gauges: &impl Fn() -> VolumeGauges) -> io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut reader = BufReader::new((&stream).take(MAX_REQUEST_HEAD));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The rest of the head: read and ignored (no body is expected).
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut words = request_line.split_whitespace();
    let (status, content_type, body) = match (words.next(), words.next()) {
        (Some("GET"), Some("/metrics" | "/")) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(gauges()),
        ),
        (Some("GET"), Some(_)) => ("404 Not Found", "text/plain", "try /metrics\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn render(gauges: VolumeGauges) -> String {
    let Some(metrics) = METRICS.get() else {
        return String::new();
    };
    for (state, count) in gauges.snapshots {
        metrics
            .snapshots
            .get_or_create(&StateLabel { state })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    metrics
        .pending_bytes
        .set(i64::try_from(gauges.pending_bytes).unwrap_or(i64::MAX));
    let mut text = String::new();
    if let Err(e) = prometheus_text::encode(&mut text, &metrics.registry) {
        tracing::error!(error = %e, "cannot encode the metrics");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::parse_address;

    #[test]
    fn metrics_addresses_parse_with_loopback_by_default() {
        assert_eq!(
            parse_address("9477").map(|a| a.to_string()),
            Ok("127.0.0.1:9477".into())
        );
        assert_eq!(
            parse_address("0.0.0.0:9100").map(|a| a.to_string()),
            Ok("0.0.0.0:9100".into())
        );
        assert_eq!(
            parse_address("[::1]:80").map(|a| a.to_string()),
            Ok("[::1]:80".into())
        );
        assert!(parse_address("localhost").is_err());
        assert!(parse_address("99999").is_err());
    }
}
