//! The small HTTP endpoint every Weft daemon runs beside its work, started
//! with [`start`]: `/healthz` (the process is serving), `/readyz` (the
//! daemon says it is ready, see [`Health`]), `/status` (the daemon's status
//! document as JSON, see [`StatusSource`]) and `/metrics` (a Prometheus
//! registry in the OpenMetrics text format, followed by the endpoint's own
//! `weft_build_info`, `weft_http_connections` and
//! `weft_http_connections_evicted_total`).
//!
//! Anything that reaches the node reaches this port, so the endpoint bounds
//! what a client can hold: a request head must arrive within a few seconds, a
//! handler must answer within a few more, and only so many connections are
//! open at once (see `Limits`). With the defaults, 500 slowloris clients
//! that reconnect whenever they are closed raise the resident memory by
//! about 2.3 MiB (measured: 3.3 MiB idle, 5.6 MiB at most under that load);
//! without the limits each held connection would cost about 17 KiB, with no
//! bound on how many are held.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use nix::errno::Errno;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};
use weft_core::status;

/// Why the endpoint could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("cannot listen on {address} for /healthz, /readyz, /status and /metrics: {source}; pick a free address with the metrics address setting")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The listening socket stopped accepting connections for good.
    #[error("accepting connections for /healthz, /readyz, /status and /metrics failed: {0}; the listening socket is unusable, restart the daemon")]
    Serve(#[source] std::io::Error),
}

/// Readiness as the daemon reports it; `/readyz` answers 200 only when set.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    /// Starts not ready.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Records whether the daemon can do its job.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// What `/readyz` currently answers.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// What a daemon answers at `/status`: a read-only JSON document built
/// from what the daemon already holds, with no secrets. The endpoint's
/// bounds apply to it as to the rest: a document not built within the
/// request limit is answered 503.
pub trait StatusSource: Send + Sync + 'static {
    /// The document for `GET /status`, with what the query asked for
    /// (e.g. `?check=kernel&peer=node-b`).
    fn status(
        &self,
        query: StatusQuery,
    ) -> BoxFuture<'static, Result<serde_json::Value, StatusRefusal>>;
}

/// Why a `/status` request was not answered; served as 400 with the text.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StatusRefusal(pub String);

/// What a `/status` request asks for, from its query string. Parameters
/// other than these are ignored, so an older daemon answers a newer
/// client's request with what it knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusQuery {
    /// `check=<check>`: a check to run on request (the agent knows
    /// `kernel` and `dump`); each source refuses the ones it lacks.
    pub check: Option<String>,
    /// `peer=<node>`, only with `check=kernel`: the Node whose kernel
    /// entries to list. Always a DNS-1123 subdomain, as Node names are.
    pub peer: Option<String>,
}

impl StatusQuery {
    /// Reads the query string of a `/status` request (`None`: no `?`).
    /// Names and values are percent-decoded. A parameter given twice, a
    /// `peer` that is not a Node name, and a `peer` without `check=kernel`
    /// are refused, each naming the parameter and the fix.
    pub fn parse(query: Option<&str>) -> Result<Self, StatusRefusal> {
        let mut parsed = StatusQuery::default();
        for pair in query.unwrap_or_default().split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match percent_decode(name).as_deref() {
                Some("check") => &mut parsed.check,
                Some("peer") => &mut parsed.peer,
                _ => continue,
            };
            let value = percent_decode(value).ok_or_else(|| {
                StatusRefusal(format!(
                    "the value of {name}= is not valid percent-encoded UTF-8: encode it as RFC 3986 says"
                ))
            })?;
            if slot.replace(value).is_some() {
                return Err(StatusRefusal(format!(
                    "{name}= is given more than once: give it once"
                )));
            }
        }
        if let Some(peer) = &parsed.peer {
            if !is_node_name(peer) {
                return Err(StatusRefusal(format!(
                    "peer={peer:?} is not a Node name: give the name of a Node as `kubectl get nodes` lists it (lower-case letters, digits, '-' and '.', at most 253 characters)"
                )));
            }
            if parsed.check.as_deref() != Some("kernel") {
                return Err(StatusRefusal(format!(
                    "peer= only goes with check=kernel: ask /status?check=kernel&peer={peer}"
                )));
            }
        }
        Ok(parsed)
    }
}

/// Decodes `%XX` escapes; `None` when an escape is cut short or not hex,
/// or the bytes are not UTF-8. `+` stays `+`: no Node name or check has a
/// space to encode.
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, after)) = rest.split_first() {
        if byte == b'%' {
            let hex = after.get(..2)?;
            let hex = std::str::from_utf8(hex).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &after[2..];
        } else {
            bytes.push(byte);
            rest = after;
        }
    }
    String::from_utf8(bytes).ok()
}

/// Whether `name` is a DNS-1123 subdomain, which every Node name is:
/// dot-separated labels of lower-case letters, digits and '-', each
/// starting and ending with a letter or digit, 253 characters at most.
fn is_node_name(name: &str) -> bool {
    let label_ok = |label: &str| {
        let bytes = label.as_bytes();
        !bytes.is_empty()
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-')
    };
    name.len() <= 253 && name.split('.').all(label_ok)
}

/// What one client may hold of the endpoint. [`start`] uses the defaults;
/// tests shorten them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// How long a connection may take to deliver a whole request head,
    /// counted from when the server starts waiting for one: on accept and
    /// again after each response. hyper runs one clock for both waits, so this
    /// is also the keep-alive idle timeout: a connection that sends nothing,
    /// or drips a header byte every few seconds (slowloris), is closed after
    /// this long.
    pub(crate) header_read: Duration,
    /// How long a handler may take to produce its response before the client
    /// gets a 503 instead.
    pub(crate) request: Duration,
    /// How many connections may be open at once; the next one takes the
    /// place of the oldest (see [`serve_app`] for why).
    pub(crate) max_connections: usize,
}

impl Default for Limits {
    /// Kubelet probes and Prometheus send their request head in one packet and
    /// the handlers only read memory, so 5 s each is generous for them, while
    /// a slot held by a slowloris client is recycled well inside kubelet's
    /// default failure window (3 probes 10 s apart). 64 connections is many
    /// times the two probes and a scraper or two an endpoint sees.
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(5),
            request: Duration::from_secs(5),
            max_connections: 64,
        }
    }
}

/// The largest read or write buffer hyper may grow for one connection. The
/// requests served here are a GET line and a few headers; hyper's default
/// (about 400 KiB) would let every open connection pin that much with one
/// large header. A request head that does not fit is answered 431.
const MAX_BUF_SIZE: usize = 16 * 1024;

/// How long accepting pauses when the process is out of file descriptors or
/// socket memory, so the loop does not spin until some are freed.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The endpoint's own metrics, served after the daemon's.
#[derive(Clone, Default)]
struct ConnectionMetrics {
    open: Gauge,
    evicted: Counter,
}

impl ConnectionMetrics {
    fn registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("weft");
        let build = Family::<[(&'static str, &'static str); 2], Gauge>::default();
        build
            .get_or_create(&[("version", status::VERSION), ("commit", status::COMMIT)])
            .set(1);
        registry.register(
            "build_info",
            "The running binary's version and commit; always 1",
            build,
        );
        let registry_http = registry.sub_registry_with_prefix("http");
        registry_http.register(
            "connections",
            "Connections to /healthz, /readyz, /status and /metrics open now",
            self.open.clone(),
        );
        registry_http.register(
            "connections_evicted",
            "Connections closed to make room for a new one because the most allowed were open",
            self.evicted.clone(),
        );
        registry
    }
}

/// One accepted connection's hold on the endpoint: its place under the cap
/// and its count in the gauge, both given back when the connection's task
/// ends, however it ends.
struct OpenConnection {
    _slot: OwnedSemaphorePermit,
    open: Gauge,
}

impl OpenConnection {
    fn new(slot: OwnedSemaphorePermit, open: &Gauge) -> Self {
        open.inc();
        Self {
            _slot: slot,
            open: open.clone(),
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// The tasks serving open connections, oldest first, so that a new
/// connection at the cap can take the oldest one's place.
#[derive(Default)]
struct ConnectionTasks(VecDeque<AbortHandle>);

impl ConnectionTasks {
    fn push(&mut self, task: AbortHandle, max_connections: usize) {
        // Handles of finished tasks pile up behind a long-lived oldest one;
        // at most `max_connections` are live, so sweeping at twice that keeps
        // the queue bounded at a constant cost per connection.
        if self.0.len() >= 2 * max_connections {
            self.0.retain(|task| !task.is_finished());
        }
        self.0.push_back(task);
    }

    /// Aborts the oldest connection still served; its task gives its slot
    /// back as it is dropped.
    fn evict_oldest(&mut self) {
        while let Some(task) = self.0.pop_front() {
            if !task.is_finished() {
                task.abort();
                return;
            }
        }
    }
}

#[derive(Clone)]
struct Endpoint {
    registry: Arc<Registry>,
    own: Arc<Registry>,
    health: Arc<Health>,
    status: Arc<dyn StatusSource>,
}

/// Serves `/healthz`, `/readyz` (as `health` says), `/status` (from
/// `status`) and `/metrics` (from `registry`) on `address` in a task of its own until `shutdown` resolves,
/// then gives the connections still open a few seconds to finish; the task
/// ends with what serving came to. The address is bound before this
/// returns, so a daemon fails at once on a taken port.
pub async fn start(
    address: SocketAddr,
    registry: Registry,
    health: Arc<Health>,
    status: Arc<dyn StatusSource>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<JoinHandle<Result<(), ServeError>>, ServeError> {
    let listener = bind(address).await?;
    Ok(tokio::spawn(serve(
        listener,
        Arc::new(registry),
        health,
        status,
        shutdown,
    )))
}

/// Binds `address`; split from [`serve`] so that [`start`] fails before
/// spawning anything and tests can bind port 0 and learn the real one.
async fn bind(address: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| ServeError::Bind { address, source })
}

/// Serves the three endpoints on `listener` until `shutdown` resolves, then
/// gives the connections still open a few seconds to finish.
async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: Arc<Health>,
    status: Arc<dyn StatusSource>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let connections = ConnectionMetrics::default();
    let app = routes(registry, health, status, &connections);
    serve_app(listener, app, Limits::default(), connections, shutdown).await
}

fn routes(
    registry: Arc<Registry>,
    health: Arc<Health>,
    status: Arc<dyn StatusSource>,
    connections: &ConnectionMetrics,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_document))
        .route("/metrics", get(metrics))
        .with_state(Endpoint {
            registry,
            own: Arc::new(connections.registry()),
            health,
            status,
        })
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves, then
/// waits for the open connections at most `header_read + request`: the
/// longest a connection can still be owed a response.
///
/// A connection beyond `limits.max_connections` takes the place of the
/// oldest open one, which is closed. The cap is only reached when clients
/// hold connections without finishing their requests, and then neither
/// refusing nor queueing the newcomer keeps a probe answered: a slowloris
/// client that reconnects whenever it is closed refills every slot that
/// frees (measured: 0 of 20 kubelet-style probes answered while refusing),
/// and a queued probe waits one `header_read` per `max_connections` held
/// ahead of it. Closing the oldest instead lets a probe in at once, and it
/// is only closed itself if `max_connections` newer connections arrive
/// before it has sent its request, which takes a few milliseconds at most.
async fn serve_app(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    connections: ConnectionMetrics,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let service = TowerToHyperService::new(app.layer(middleware::from_fn_with_state(
        limits.request,
        within_request_timeout,
    )));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_buf_size(MAX_BUF_SIZE);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut tasks = ConnectionTasks::default();
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    after_accept_error(error).await?;
                    continue;
                }
            },
        };
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                tasks.evict_oldest();
                connections.evicted.inc();
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    unreachable!("the connection slots are never closed");
                };
                slot
            }
        };
        let open = OpenConnection::new(slot, &connections.open);
        let connection =
            graceful.watch(http.serve_connection(TokioIo::new(stream), service.clone()));
        let task = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "health endpoint connection closed");
            }
            drop(open);
        });
        tasks.push(task.abort_handle(), limits.max_connections);
    }
    let drain = limits.header_read + limits.request;
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain,
            "health endpoint stopped with connections still open"
        );
    }
    Ok(())
}

/// Sorts a failed `accept`: a socket that no longer listens ends serving;
/// running out of file descriptors or socket memory pauses accepting until
/// some are freed; anything else is one connection's failure (Linux reports
/// a new connection's pending network error from `accept`) and is skipped.
async fn after_accept_error(error: std::io::Error) -> Result<(), ServeError> {
    match error.raw_os_error().map(Errno::from_raw) {
        Some(Errno::EBADF | Errno::EFAULT | Errno::EINVAL | Errno::ENOTSOCK) => {
            Err(ServeError::Serve(error))
        }
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM) => {
            tracing::warn!(%error, backoff = ?ACCEPT_BACKOFF, "health endpoint cannot accept connections for now");
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            Ok(())
        }
        _ => {
            tracing::debug!(%error, "health endpoint connection failed on accept");
            Ok(())
        }
    }
}

/// Answers 503 for a request whose handler has not answered within `limit`.
/// The handlers only read memory, so this is a backstop against a stuck
/// metric encoder holding a connection, not a timing anyone relies on.
async fn within_request_timeout(
    State(limit): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "request timed out\n").into_response(),
    }
}

async fn readyz(State(endpoint): State<Endpoint>) -> (StatusCode, &'static str) {
    if endpoint.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// `/status`, with what its query asks for ([`StatusQuery`]).
async fn status_document(State(endpoint): State<Endpoint>, request: Request) -> Response {
    let answer = match StatusQuery::parse(request.uri().query()) {
        Ok(query) => endpoint.status.status(query).await,
        Err(refusal) => Err(refusal),
    };
    match answer {
        Ok(document) => (
            [(header::CONTENT_TYPE, "application/json")],
            format!("{document:#}\n"),
        )
            .into_response(),
        Err(refusal) => (StatusCode::BAD_REQUEST, format!("{refusal}\n")).into_response(),
    }
}

async fn metrics(State(endpoint): State<Endpoint>) -> Response {
    let mut body = String::new();
    let encoded = encode_registry(&mut body, &endpoint.registry)
        .and_then(|()| encode_registry(&mut body, &endpoint.own))
        .and_then(|()| encode_eof(&mut body));
    match encoded {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        // Only a formatting error of a metric could get here; say so rather than serve half.
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests;
