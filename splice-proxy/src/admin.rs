//! The admin HTTP endpoint (`--admin-listen`): `/metrics` (Prometheus text
//! format), `/healthz` (the process answers), `/readyz` (200 ready, 503 not,
//! with the reasons), `/debug/connections` (the open connections as JSON).
//!
//! It runs on a thread of its own with a single-threaded runtime, so a
//! scrape or a long connection listing never takes a worker of the data
//! path; at most [`MAX_ADMIN_CONNECTIONS`] are served at once, each must send
//! its request headers within [`HEADER_TIMEOUT`].

use std::{
    convert::Infallible,
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    sync::Arc,
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{connections::ConnectionTable, health::Health, metrics};

/// Admin connections served at once; more wait in the listen backlog.
pub const MAX_ADMIN_CONNECTIONS: usize = 16;
/// Time for a request's headers to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {addr} (admin_listen, --admin-listen): {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the admin endpoint's thread: {0}")]
    Thread(std::io::Error),
}

/// What the endpoint answers from.
#[derive(Debug)]
pub struct AdminState {
    pub registry: Registry,
    pub health: Arc<Health>,
    pub connections: Arc<ConnectionTable>,
}

/// The bound admin listener, not yet serving.
#[derive(Debug)]
pub struct AdminEndpoint {
    pub addr: SocketAddr,
    listener: std::net::TcpListener,
}

impl AdminEndpoint {
    /// Binds `addr` (port 0: any free port).
    pub fn bind(addr: SocketAddr) -> Result<Self, AdminError> {
        let err = |source| AdminError::Bind { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        Ok(Self { addr, listener })
    }

    /// The socket another process handed over (a graceful upgrade).
    pub fn from_fd(fd: OwnedFd) -> Result<Self, AdminError> {
        let listener = std::net::TcpListener::from(fd);
        let err = |source| AdminError::Bind { addr: SocketAddr::from(([0, 0, 0, 0], 0)), source };
        listener.set_nonblocking(true).map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        Ok(Self { addr, listener })
    }

    /// A second descriptor of the socket, to hand over on a graceful upgrade.
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.listener.as_fd().try_clone_to_owned()
    }

    /// Serves on a thread of its own until the process exits or `stop` is
    /// cancelled (a new process took the socket over); then stops accepting.
    pub fn spawn(self, state: AdminState, stop: CancellationToken) -> Result<(), AdminError> {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AdminError::Thread)?;
        std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || {
                runtime.block_on(async {
                    tokio::select! {
                        () = serve(self.listener, Arc::new(state)) => {}
                        () = stop.cancelled() => tracing::info!("admin endpoint: handed over; no longer accepting"),
                    }
                });
            })
            .map_err(AdminError::Thread)?;
        Ok(())
    }
}

async fn serve(listener: std::net::TcpListener, state: Arc<AdminState>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "admin endpoint: cannot register its socket; not serving");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(respond(&state, &request)) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "admin connection");
            }
            drop(permit);
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

/// The answer to one request (GET or HEAD; hyper leaves HEAD's body out).
fn respond(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET or HEAD only\n");
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => match metrics::encode(&state.registry) {
            Ok(body) => text(StatusCode::OK, metrics::CONTENT_TYPE, body),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, "encoding the metrics failed\n"),
        },
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n"),
        "/readyz" => {
            let readiness = state.health.readiness();
            let status = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            text(status, PLAIN, readiness.body())
        }
        "/debug/connections" => match serde_json::to_string_pretty(&state.connections.list()) {
            Ok(body) => text(StatusCode::OK, "application/json", body + "\n"),
            Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{error}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /metrics, /healthz, /readyz or /debug/connections\n",
        ),
    }
}
