//! The HTTP client of stores reached over plain http (a Garage or s3s node on the LAN):
//! hyper's, like the SDK's own, but every connection asks for quick ACKs after each read.
//!
//! A server that writes a response's headers and body separately without `TCP_NODELAY`
//! (Garage does) holds a small body back until the headers are acknowledged (Nagle), and
//! Linux delays that ACK by 40 ms on a connection doing request/response traffic: every
//! small answer (a snapshot object, an index, a tree, a lazy volume's range) came 40 ms
//! late (docs/benchmarks.md, "Small answers from Garage come 40 ms late"). `TCP_QUICKACK`
//! is not sticky, so it is set again after each read, which also sends an ACK that is
//! pending. `https://` endpoints keep the SDK's client (its TLS, roots and ciphers).

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::retry::ErrorKind;
use hyper::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector as TcpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The client for an `http://` endpoint.
pub fn quick_ack_client() -> SharedHttpClient {
    SharedHttpClient::new(QuickAckClient::default())
}

/// One connector (and so one pool of connections) per connect timeout asked for.
#[derive(Debug, Default)]
struct QuickAckClient {
    connectors: Mutex<HashMap<Option<Duration>, SharedHttpConnector>>,
}

impl HttpClient for QuickAckClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        let timeout = settings.connect_timeout();
        crate::sync::lock(&self.connectors)
            .entry(timeout)
            .or_insert_with(|| {
                let mut tcp = TcpConnector::new();
                tcp.set_nodelay(true);
                let mut builder = Client::builder(TokioExecutor::new());
                builder.pool_timer(TokioTimer::new());
                SharedHttpConnector::new(QuickAckConnector {
                    client: builder.build(QuickAckTcp { tcp, timeout }),
                })
            })
            .clone()
    }
}

#[derive(Debug)]
struct QuickAckConnector {
    client: Client<QuickAckTcp, SdkBody>,
}

impl HttpConnector for QuickAckConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let request = match request.try_into_http1x() {
            Ok(request) => request,
            Err(e) => return HttpConnectorFuture::ready(Err(ConnectorError::user(e.into()))),
        };
        let response = self.client.request(request);
        HttpConnectorFuture::new(async move {
            let response = response
                .await
                .map_err(connector_error)?
                .map(SdkBody::from_body_1_x);
            HttpResponse::try_from(response).map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

/// The kind the SDK's own client gives each failure: it decides what is retried.
fn connector_error(err: hyper_util::client::legacy::Error) -> ConnectorError {
    let hyper_error = source::<hyper::Error>(&err);
    let timed_out = source::<ConnectTimedOut>(&err).is_some()
        || hyper_error.is_some_and(hyper::Error::is_timeout);
    let user = hyper_error.is_some_and(hyper::Error::is_user);
    let cut_short = hyper_error.is_some_and(hyper::Error::is_incomplete_message);
    let io = err.is_connect()
        || hyper_error.is_some_and(|e| e.is_closed() || e.is_canceled())
        || source::<io::Error>(&err).is_some();
    let err: BoxError = err.into();
    if timed_out {
        ConnectorError::timeout(err)
    } else if user {
        ConnectorError::user(err)
    } else if cut_short {
        // A body cut short (S3 sends such answers at times) is worth another attempt.
        ConnectorError::other(err, Some(ErrorKind::TransientError))
    } else if io {
        ConnectorError::io(err)
    } else {
        ConnectorError::other(err, None)
    }
}

/// The first error of type `E` in `err`'s chain of sources.
fn source<'a, E: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    super::error_chain(err).find_map(|err| err.downcast_ref())
}

#[derive(Debug, thiserror::Error)]
#[error("no connection within {0:?}")]
struct ConnectTimedOut(Duration);

/// hyper's TCP connector, with the SDK's connect timeout, making [`QuickAck`] streams.
#[derive(Clone, Debug)]
struct QuickAckTcp {
    tcp: TcpConnector,
    timeout: Option<Duration>,
}

impl tower_service::Service<Uri> for QuickAckTcp {
    type Response = QuickAck;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<QuickAck, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.tcp.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            let stream = match timeout {
                Some(limit) => tokio::time::timeout(limit, connecting)
                    .await
                    .map_err(|_| ConnectTimedOut(limit))??,
                None => connecting.await?,
            };
            Ok(QuickAck(stream))
        })
    }
}

/// A connection that asks for quick ACKs after each read.
#[derive(Debug)]
struct QuickAck(TokioIo<TcpStream>);

impl QuickAck {
    fn ask_for_quick_acks(&self) {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads an int of the size given; the descriptor is open. A
        // failure only leaves the kernel's delayed ACKs in place.
        unsafe {
            libc::setsockopt(
                self.0.inner().as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

impl Read for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let read = Pin::new(&mut self.0).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            self.ask_for_quick_acks();
        }
        read
    }
}

impl Write for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

impl Connection for QuickAck {
    fn connected(&self) -> Connected {
        self.0.connected()
    }
}
