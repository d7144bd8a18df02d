//! A wrapper that times every request of the store it wraps for the metrics
//! (`--metrics`): chosen by `store::open` when metrics are on, so no backend knows of it.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use super::{ObjectStore, StoreFuture, StoreResult};
use crate::metrics;

pub struct Metered {
    inner: Arc<dyn ObjectStore>,
}

impl Metered {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Metered {
        Metered { inner }
    }
}

async fn timed<T>(op: &'static str, request: StoreFuture<'_, T>) -> StoreResult<T> {
    let started = Instant::now();
    let result = request.await;
    metrics::store_request(op, result.is_ok(), started.elapsed());
    result
}

impl ObjectStore for Metered {
    fn put<'a>(&'a self, key: &'a str, body: bytes::Bytes) -> StoreFuture<'a, ()> {
        Box::pin(timed("put", self.inner.put(key, body)))
    }

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(timed("get", self.inner.get(key)))
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(timed("delete", self.inner.delete(key)))
    }

    fn get_range_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
        buffer: Vec<u8>,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(timed(
            "get",
            self.inner.get_range_into(key, offset, len, buffer),
        ))
    }

    fn seal_part(&self, key: &str, part: Vec<u8>) -> StoreResult<Vec<u8>> {
        self.inner.seal_part(key, part)
    }

    fn open_part<'p>(&self, key: &str, part: &'p [u8]) -> StoreResult<Cow<'p, [u8]>> {
        self.inner.open_part(key, part)
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(timed("list", self.inner.list(prefix)))
    }

    fn url(&self) -> &str {
        self.inner.url()
    }

    fn object_name(&self, key: &str) -> String {
        self.inner.object_name(key)
    }

    fn encryption(&self) -> Option<String> {
        self.inner.encryption()
    }

    fn is_local(&self) -> bool {
        self.inner.is_local()
    }
}
