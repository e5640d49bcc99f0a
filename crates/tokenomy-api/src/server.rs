//! The accept loop: axum's router on hyper, with the limits a public node needs and
//! `axum::serve` does not set.
//!
//! * **Header read timeout** ([`ServeLimits::header_read_timeout`]): a connection that does
//!   not finish sending a request's headers in time (a slow or silent client, one that sends
//!   nothing at all, an idle keep-alive connection) is closed, so idle sockets cannot pile up until the process runs
//!   out of file descriptors and refuses everyone.
//! * **Body read timeout**: a body that stalls is refused (`408`).
//! * **A connection cap** ([`ServeLimits::connections_max`]): past it the loop stops
//!   accepting (new clients wait in the kernel's backlog) instead of failing on `EMFILE`.
//! * **Graceful shutdown**: on the signal the listener closes and open connections finish
//!   their answers (streams included) before `serve` returns.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower::ServiceExt;

use crate::{app, AppState};

/// What one listener allows.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    pub connections_max: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            connections_max: 4096,
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
        }
    }
}

/// Serves `app(state)` on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish (streams included).
pub async fn serve_with_limits(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ServeLimits,
) -> std::io::Result<()> {
    let router = app(state).layer(tower_http::timeout::RequestBodyTimeoutLayer::new(limits.body_read_timeout));
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.connections_max.max(1)));
    let graceful = GracefulShutdown::new();
    let closing = tokio_util::sync::CancellationToken::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_accept_error: Option<Instant> = None;
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors (EMFILE) and the like: say so now and then, and wait a
                    // little for connections to close rather than spin.
                    if last_accept_error.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        tracing::error!(error = %e, "accepting a connection");
                        last_accept_error = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Streams are many small writes (an SSE event a token): without TCP_NODELAY, Nagle's
        // algorithm would hold each one back until the client acknowledges the previous one,
        // which a delayed ACK can stretch to tens of milliseconds on a real network.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone().map_request(|req: axum::http::Request<hyper::body::Incoming>| req.map(axum::body::Body::new)));
        let mut builder = Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
        builder.http2().timer(TokioTimer::new()).keep_alive_interval(None);
        let first_byte_max = limits.header_read_timeout;
        let watcher = graceful.watcher();
        let closing = closing.clone();
        tokio::spawn(async move {
            // hyper's header timeout starts with the first byte (its HTTP/1-or-2 sniffing waits
            // for it unbounded): a client that connects and sends nothing is closed here, and at
            // once when the node shuts down (the watcher would hold the shutdown up meanwhile).
            // (`peek`, not `readable`, which may report a fresh socket ready with nothing in it.)
            let mut first_byte = [0u8; 1];
            let first = tokio::select! {
                r = tokio::time::timeout(first_byte_max, tcp.peek(&mut first_byte)) => matches!(r, Ok(Ok(n)) if n > 0),
                () = closing.cancelled() => false,
            };
            if !first {
                drop(permit);
                return;
            }
            let conn = watcher.watch(builder.serve_connection(TokioIo::new(tcp), service).into_owned());
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    closing.cancel();
    graceful.shutdown().await;
    Ok(())
}
