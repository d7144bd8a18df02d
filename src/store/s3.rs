//! `s3://BUCKET/PREFIX` on aws-sdk-s3. Configuration comes from the standard AWS places
//! (environment, profiles, credential chain, `AWS_ENDPOINT_URL`); an endpoint override
//! implies path-style addressing, which S3-compatible servers expect.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    ProvideCredentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;

use super::{ObjectStore, StoreError, StoreFuture, StoreResult};

/// Most bytes a response's announced length reserves ahead (a whole pack of the largest
/// size, and then some).
const MAX_PREALLOCATED_BODY: usize = 256 << 20;

pub struct S3Store {
    client: Client,
    bucket: String,
    /// Prepended to every key: empty, or ending in '/'.
    prefix: String,
    url: String,
}

/// Classifies an SDK error: throttling, 5xx, timeouts and connection failures are worth
/// retrying; everything else (403, 404 bucket, bad request) is not.
fn classify<E, R>(url: &str, what: &str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + HttpStatus + Send + Sync + 'static,
{
    let status = err.raw_response().map(HttpStatus::status);
    let code = err.code().map(str::to_owned);
    let detail = match (&code, err.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.clone(),
        _ => match &err {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                format!("cannot reach the endpoint: {}", root_cause(&err))
            }
            _ => match status {
                Some(status) => format!("HTTP {status}: {}", root_cause(&err)),
                None => root_cause(&err),
            },
        },
    };
    let message = format!("{what} on {url} failed: {detail}");
    let transient = match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        _ => {
            matches!(status, Some(500..=599) | Some(429) | Some(408))
                || matches!(
                    code.as_deref(),
                    Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable")
                )
        }
    };
    let hint = match (status, code.as_deref()) {
        (_, Some("NoSuchBucket")) => " (the bucket does not exist)",
        (_, Some("InvalidAccessKeyId" | "SignatureDoesNotMatch")) | (Some(403), None) => {
            " (check the credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile)"
        }
        (_, Some("AccessDenied")) => " (the credentials may not use this bucket)",
        _ => "",
    };
    if transient {
        StoreError::transient(message)
    } else {
        StoreError::permanent(format!("{message}{hint}"))
    }
}

/// The innermost error of a chain: "Connection refused (os error 111)" rather than the
/// SDK's layers of context.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    super::error_chain(err).last().unwrap_or(err).to_string()
}

/// The HTTP status of a raw response, whatever type the SDK uses for it.
trait HttpStatus {
    fn status(&self) -> u16;
}

impl HttpStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}

impl S3Store {
    /// A response's body, read into one buffer of the length the response announced:
    /// collecting its chunks and joining them after would copy every byte twice more.
    /// `out` is cleared first; its allocation is kept if large enough.
    async fn read_body(
        &self,
        key: &str,
        mut body: ByteStream,
        length: Option<i64>,
        mut out: Vec<u8>,
    ) -> StoreResult<Vec<u8>> {
        // The announced length only sizes the buffer (bounded, as a hostile server may
        // announce anything); what arrives is what counts.
        let capacity = length.and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
        out.clear();
        out.reserve(capacity.min(MAX_PREALLOCATED_BODY));
        while let Some(chunk) = body.try_next().await.map_err(|e| {
            StoreError::transient(format!("GET {key} on {}: body cut off: {e}", self.url))
        })? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    pub async fn open(bucket: &str, prefix: &str, url: String) -> StoreResult<S3Store> {
        let shared = aws_config::defaults(BehaviorVersion::latest()).load().await;
        let Some(credentials) = shared.credentials_provider() else {
            return Err(StoreError::permanent(format!(
                "no AWS credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                 or AWS_PROFILE"
            )));
        };
        credentials.provide_credentials().await.map_err(|e| {
            StoreError::permanent(format!(
                "no usable AWS credentials for {url}: {e} (set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            ))
        })?;
        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            // snapfs retries itself, with backoff for outages of any length.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(60))
                    .build(),
            )
            // Blocks carry their own hash; header checksums keep every server compatible.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if shared.region().is_none() {
            config = config.region(Region::new("us-east-1"));
        }
        if let Some(endpoint) = shared.endpoint_url() {
            config = config.force_path_style(true);
            if endpoint.starts_with("http://") {
                config = config.http_client(super::http::quick_ack_client());
            }
        }
        Ok(S3Store {
            client: Client::from_conf(config.build()),
            bucket: bucket.to_owned(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            url,
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

impl ObjectStore for S3Store {
    fn put<'a>(&'a self, key: &'a str, body: bytes::Bytes) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(self.key(key))
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| classify(&self.url, &format!("PUT {key}"), e))?;
            Ok(())
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            let response = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.key(key))
                .send()
                .await
            {
                Ok(response) => response,
                Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => {
                    return Ok(None);
                }
                Err(e) => return Err(classify(&self.url, &format!("GET {key}"), e)),
            };
            let length = response.content_length();
            Ok(Some(
                self.read_body(key, response.body, length, Vec::new())
                    .await?,
            ))
        })
    }

    fn get_range_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
        buffer: Vec<u8>,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            if len == 0 {
                return Ok(Some(Vec::new()));
            }
            let range = format!("bytes={offset}-{}", offset.saturating_add(len - 1));
            let response = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.key(key))
                .range(range)
                .send()
                .await
            {
                Ok(response) => response,
                Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => {
                    return Ok(None);
                }
                // A range past the end: the object is shorter than its listing says.
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                    return Ok(Some(Vec::new()));
                }
                Err(e) => return Err(classify(&self.url, &format!("GET {key} (range)"), e)),
            };
            // A server that ignores the range sends the whole object, without a range.
            let whole = response.content_range().is_none();
            let length = response.content_length();
            let body = self.read_body(key, response.body, length, buffer).await?;
            if !whole {
                return Ok(Some(body));
            }
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(body.len());
            let end = start.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
            Ok(Some(body[start..end.min(body.len())].to_vec()))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(self.key(key))
                .send()
                .await
                .map_err(|e| classify(&self.url, &format!("DELETE {key}"), e))?;
            Ok(())
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut keys = Vec::new();
            let mut token = None;
            loop {
                let page = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(self.key(prefix))
                    .set_continuation_token(token)
                    .send()
                    .await
                    .map_err(|e| classify(&self.url, "LIST", e))?;
                for object in page.contents() {
                    if let Some(key) = object.key().and_then(|k| k.strip_prefix(&self.prefix)) {
                        keys.push(key.to_owned());
                    }
                }
                token = page.next_continuation_token().map(str::to_owned);
                if token.is_none() {
                    return Ok(keys);
                }
            }
        })
    }

    fn url(&self) -> &str {
        &self.url
    }
}
