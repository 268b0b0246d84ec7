//! The node's listener: accepts TCP connections under a cap, speaks TLS when configured, serves
//! HTTP/1.1 (with upgrades, for WebSocket) with header and body read timeouts, tells handlers
//! the peer address, and shuts down gracefully.
//!
//! Why not `axum::serve`: it has no TLS, no cap on open connections and no read timeouts — a
//! client that opens many half-sent requests would hold memory and file descriptors forever.

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

/// Largest request head (request line + headers) hyper buffers; larger heads are refused.
const MAX_HEAD: usize = 64 * 1024;
/// How long a shutdown waits for open HTTP connections before it goes on.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Most bytes a connection's kernel send buffer holds that are not yet sent (`TCP_NOTSENT_LOWAT`).
///
/// Linux grows a socket's send buffer up to `net.ipv4.tcp_wmem`'s maximum (4 MiB here) while
/// the peer's window is closed, and anything queued behind it waits for all of it: a client
/// that reads slowly during a long replay took > 1.5 s to reach an Engine.IO ping queued behind
/// 3–4 MiB of messages, and the node closed it as a heartbeat timeout. With the unsent part
/// capped, a full socket is seen at once by socketioxide's channel, the connection's repair
/// loop pages the rest out of the mailbox as the client reads, and a ping waits behind at most
/// this much plus what the client's own receive buffer holds. Bytes in flight (the congestion
/// window) are not limited by it, so a fast reader's throughput is not either.
const MAX_UNSENT: u32 = 64 * 1024;

/// How the listener treats connections.
pub struct Limits {
    /// Most connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// For request heads, each chunk of a body, and a TLS handshake.
    pub read_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open requests finish (up to
/// a grace period).
pub async fn serve<S>(
    listener: TcpListener,
    tls: Option<crate::tls::Acceptor>,
    limits: Limits,
    app: S,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let cap = Arc::new(Semaphore::new(limits.max_connections));
    // Shutdown: `stop` tells every connection to finish its request and close; each connection
    // task holds a clone of `alive`, so `done` ends when the last one is gone.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let (alive, mut done) = tokio::sync::mpsc::channel::<()>(1);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = cap.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        tcp.set_nodelay(true).ok();
        cap_unsent(&tcp);
        let app = app.clone();
        let read_timeout = limits.read_timeout;
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            // Each chunk of a body must arrive within the read timeout.
            let mut req = req.map(|b| Body::new(TimeoutBody::new(read_timeout, b)));
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        let http = http.clone();
        let tls = tls.clone();
        let timeout = limits.read_timeout;
        let (stopping, alive) = (stopping.clone(), alive.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _alive = alive;
            match tls {
                None => {
                    let conn = http
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades();
                    until_stopped(conn, stopping).await;
                }
                Some(acceptor) => {
                    let Ok(Ok(stream)) = tokio::time::timeout(timeout, acceptor.accept(tcp)).await
                    else {
                        return; // a failed or slow handshake: nothing to answer
                    };
                    let conn = http
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    until_stopped(conn, stopping).await;
                }
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drop(alive);
    if tokio::time::timeout(SHUTDOWN_GRACE, done.recv())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP connections were still open after the grace period");
    }
    Ok(())
}

/// Caps the bytes `tcp`'s kernel send buffer holds unsent ([`MAX_UNSENT`]); Linux only (elsewhere
/// the kernel's own sizing applies).
fn cap_unsent(tcp: &tokio::net::TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(MAX_UNSENT) {
        tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT could not be set");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = tcp;
}

/// Serves one connection; when the node stops, lets its request in flight finish and closes it.
async fn until_stopped<I, S, B>(
    conn: hyper::server::conn::http1::UpgradeableConnection<I, S>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = std::pin::pin!(conn);
    let stopped = tokio::select! {
        _ = conn.as_mut() => false,
        r = stopping.wait_for(|s| *s) => r.is_ok(),
    };
    if stopped {
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }
}
