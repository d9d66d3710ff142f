//! The endpoint's answers, and the limits that keep clients from holding it.
//!
//! Nothing here asserts how fast something happens: a test waits for the
//! condition it expects, up to [`PATIENCE`], so a loaded machine makes it
//! slow, never red.

use super::*;
use prometheus_client::metrics::counter::Counter;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::AtomicI64;
use tokio::task::JoinHandle;
use weft_testing::eventually;

/// Far beyond any timeout these tests set.
const PATIENCE: Duration = Duration::from_secs(60);

/// An endpoint serving on a loopback port.
struct Running {
    address: SocketAddr,
    connections: ConnectionMetrics,
    stop: tokio::sync::oneshot::Sender<()>,
    server: JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// The daemons' endpoint, with an empty registry, within `limits`.
    async fn endpoint(limits: Limits) -> Self {
        let connections = ConnectionMetrics::default();
        let app = routes(
            Arc::new(Registry::default()),
            Health::new(),
            Arc::new(Echo),
            &connections,
        );
        Self::app(app, limits, connections).await
    }

    async fn app(app: Router, limits: Limits, connections: ConnectionMetrics) -> Self {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_app(
            listener,
            app,
            limits,
            connections.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            address,
            connections,
            stop,
            server,
        }
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(PATIENCE, self.server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }

    fn open(&self) -> i64 {
        self.connections.open.get()
    }
}

/// The most connections the server reported open at once while watched.
struct Peak {
    highest: Arc<AtomicI64>,
    sampler: JoinHandle<()>,
}

impl Peak {
    fn watch(server: &Running) -> Self {
        let highest = Arc::new(AtomicI64::new(0));
        let open = server.connections.open.clone();
        let sampler = tokio::spawn({
            let highest = Arc::clone(&highest);
            async move {
                loop {
                    highest.fetch_max(open.get(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        Self { highest, sampler }
    }

    fn highest(self) -> i64 {
        self.sampler.abort();
        self.highest.load(Ordering::Relaxed)
    }
}

/// Clients that start a request on each of their connections and then drip
/// a header byte into each every 250 ms, never finishing it, and open a new
/// one in place of any the server closes; they stop, and close their
/// connections, once dropped.
struct Slowloris {
    stop: Arc<AtomicBool>,
}

impl Slowloris {
    /// Returns once all `count` connections are established.
    async fn start(address: SocketAddr, count: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (connected, all_connected) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking({
            let stop = Arc::clone(&stop);
            move || {
                let start_request = || {
                    let mut stream = TcpStream::connect(address)?;
                    // Fails if the server has already closed the connection;
                    // the next drip notices.
                    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: ");
                    std::io::Result::Ok(stream)
                };
                let mut held: Vec<_> = (0..count).map(|_| start_request().unwrap()).collect();
                let _ = connected.send(());
                while !stop.load(Ordering::Relaxed) {
                    for stream in &mut held {
                        if stream.write_all(b"x").is_err() {
                            // A server that stopped refuses: keep the old one.
                            if let Ok(reopened) = start_request() {
                                *stream = reopened;
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        });
        all_connected.await.unwrap();
        Self { stop }
    }
}

impl Drop for Slowloris {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs blocking client work off the runtime, so the server keeps running.
async fn off_runtime<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.unwrap()
}

/// Reads until the server closes `stream`; what it sent before.
fn read_until_closed(mut stream: TcpStream) -> String {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut received = Vec::new();
    match stream.read_to_end(&mut received) {
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("the server never closed the connection")
        }
        // A reset (the server closed with our bytes unread) is a close too.
        _ => String::from_utf8_lossy(&received).into_owned(),
    }
}

/// A status source that echoes the check and peer asked for, and refuses
/// `nope`.
struct Echo;

impl StatusSource for Echo {
    fn status(
        &self,
        query: StatusQuery,
    ) -> BoxFuture<'static, Result<serde_json::Value, StatusRefusal>> {
        Box::pin(async move {
            match query.check.as_deref() {
                Some("nope") => Err(StatusRefusal("no such check: nope".into())),
                _ => Ok(serde_json::json!({ "check": query.check, "peer": query.peer })),
            }
        })
    }
}

/// GETs `path` on a connection of its own; `None` when the server closed it
/// without an answer, as it does beyond the connection cap.
async fn fetch(address: SocketAddr, path: &str) -> Option<String> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    off_runtime(move || {
        let mut stream = TcpStream::connect(address).ok()?;
        stream.write_all(request.as_bytes()).ok()?;
        Some(read_until_closed(stream)).filter(|response| !response.is_empty())
    })
    .await
}

async fn answers_ok(address: SocketAddr, path: &str) -> bool {
    fetch(address, path)
        .await
        .is_some_and(|response| response.starts_with("HTTP/1.1 200"))
}

#[tokio::test]
async fn answers_health_readiness_status_and_metrics() {
    let mut registry = Registry::default();
    let counter = Counter::<u64>::default();
    registry.register("test_events", "Events seen", counter.clone());
    counter.inc_by(3);
    let health = Health::new();
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        Arc::new(registry),
        health.clone(),
        Arc::new(Echo),
        async move {
            let _ = stopped.await;
        },
    ));

    assert!(answers_ok(address, "/healthz").await);
    let not_ready = fetch(address, "/readyz").await.unwrap();
    assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
    health.set_ready(true);
    assert!(answers_ok(address, "/readyz").await);
    let metrics = fetch(address, "/metrics").await.unwrap();
    assert!(metrics.contains("test_events_total 3"), "{metrics}");
    assert!(metrics.contains("weft_http_connections "), "{metrics}");
    let build = format!(
        "weft_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        status::VERSION,
        status::COMMIT
    );
    assert!(metrics.contains(&build), "{metrics}");
    let plain = fetch(address, "/status").await.unwrap();
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
    assert!(plain.contains("application/json"), "{plain}");
    assert!(plain.contains(r#""check": null"#), "{plain}");
    let checked = fetch(address, "/status?check=kernel").await.unwrap();
    assert!(checked.contains(r#""check": "kernel""#), "{checked}");
    let refused = fetch(address, "/status?check=nope").await.unwrap();
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    assert!(refused.contains("no such check: nope"), "{refused}");
    let peer = fetch(address, "/status?verbose=1&check=kernel&peer=node%2Db")
        .await
        .unwrap();
    assert!(peer.contains(r#""peer": "node-b""#), "{peer}");
    let refused = fetch(address, "/status?check=kernel&peer=Node_B")
        .await
        .unwrap();
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    assert!(
        refused.contains("peer=\"Node_B\" is not a Node name"),
        "{refused}"
    );
    assert!(
        metrics.contains("weft_http_connections_evicted_total 0"),
        "{metrics}"
    );
    assert_eq!(metrics.matches("# EOF").count(), 1, "{metrics}");
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    let missing = fetch(address, "/nope").await.unwrap();
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn bind_error_names_the_address() {
    let taken = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let address = taken.local_addr().unwrap();
    let message = bind(address).await.unwrap_err().to_string();
    assert!(message.contains(&address.to_string()), "{message}");
}

/// Slowloris clients drip a header byte now and then to hold their
/// connections, and so the endpoint's memory, indefinitely. Here they are
/// never timed out and reconnect when evicted, so /healthz is answered only
/// because a newcomer takes the oldest's place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_500_slowloris_connections_are_held() {
    let limits = Limits {
        header_read: 10 * PATIENCE,
        ..Limits::default()
    };
    let server = Running::endpoint(limits).await;
    let peak = Peak::watch(&server);
    let slowloris = Slowloris::start(server.address, 500).await;

    eventually(
        PATIENCE,
        "/healthz answers beside the slowloris connections",
        || async { Ok(answers_ok(server.address, "/healthz").await.then_some(())) },
    )
    .await
    .unwrap();
    drop(slowloris);
    // Accepted in order, all 500 came before the answered GET.
    let evicted = server.connections.evicted.get();
    assert!(
        evicted > 500 - 64,
        "only {evicted} connections were evicted"
    );
    let highest = peak.highest();
    assert!(highest <= 64, "{highest} connections were open at once");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dripped_request_head_is_cut_off_after_the_header_read_timeout() {
    let limits = Limits {
        header_read: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = Running::endpoint(limits).await;
    let address = server.address;
    let dripped = off_runtime(move || {
        let mut stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: ");
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::time::Instant::now() < deadline {
            let _ = stream.write_all(b"x");
            match stream.read(&mut [0; 512]) {
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                // End of stream or a reset: the server closed it.
                _ => return true,
            }
        }
        false
    })
    .await;
    assert!(dripped, "the server kept a dripping connection open");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_header_read_timeout() {
    let limits = Limits {
        header_read: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = Running::endpoint(limits).await;
    let silent = TcpStream::connect(server.address).unwrap();
    let mut kept_alive = TcpStream::connect(server.address).unwrap();
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
        .unwrap();

    // Reading to the end returns only because the server closes the
    // connection it kept alive once it has sat idle.
    let answered = off_runtime(|| read_until_closed(kept_alive)).await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    assert!(answered.contains("\r\n\r\nok\n"), "{answered}");
    assert_eq!(off_runtime(|| read_until_closed(silent)).await, "");
    eventually(PATIENCE, "the server counts no open connection", || async {
        Ok((server.open() == 0).then_some(()))
    })
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_beyond_the_cap_takes_the_oldest_ones_place() {
    let limits = Limits {
        // Long enough that only eviction ever frees a slot.
        header_read: 10 * PATIENCE,
        max_connections: 4,
        ..Limits::default()
    };
    let server = Running::endpoint(limits).await;
    let peak = Peak::watch(&server);
    let connect = || TcpStream::connect(server.address).unwrap();
    let oldest = connect();
    eventually(PATIENCE, "the oldest connection is open", || async {
        Ok((server.open() == 1).then_some(()))
    })
    .await
    .unwrap();
    let mut held: Vec<_> = (0..3).map(|_| connect()).collect();
    eventually(PATIENCE, "the cap is reached", || async {
        Ok((server.open() == 4).then_some(()))
    })
    .await
    .unwrap();

    held.push(connect());
    assert_eq!(off_runtime(|| read_until_closed(oldest)).await, "");
    held.extend((0..50).map(|_| connect()));
    eventually(PATIENCE, "every newcomer has evicted one", || async {
        Ok((server.connections.evicted.get() == 51).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(server.open(), 4);
    assert!(answers_ok(server.address, "/healthz").await);

    drop(held);
    eventually(
        PATIENCE,
        "closed connections give their slots back",
        || async { Ok((server.open() == 0).then_some(())) },
    )
    .await
    .unwrap();
    let highest = peak.highest();
    assert!(highest <= 4, "{highest} connections were open at once");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_handler_is_answered_503_after_the_request_timeout() {
    let limits = Limits {
        request: Duration::from_millis(200),
        ..Limits::default()
    };
    let app = Router::new().route("/stuck", get(std::future::pending::<&'static str>));
    let server = Running::app(app, limits, ConnectionMetrics::default()).await;

    let response = fetch(server.address, "/stuck").await.unwrap();
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.ends_with("request timed out\n"), "{response}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_serving_while_a_connection_is_held() {
    let limits = Limits {
        header_read: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = Running::endpoint(limits).await;
    let _held = TcpStream::connect(server.address).unwrap();
    eventually(PATIENCE, "the held connection is open", || async {
        Ok((server.open() == 1).then_some(()))
    })
    .await
    .unwrap();
    server.stop().await;
}

#[test]
fn a_status_query_takes_check_and_peer_and_ignores_the_rest() {
    assert_eq!(StatusQuery::parse(None).unwrap(), StatusQuery::default());
    assert_eq!(
        StatusQuery::parse(Some("")).unwrap(),
        StatusQuery::default()
    );
    let query =
        StatusQuery::parse(Some("x=1&check=kernel&peer=ip-10-0-0-5.ec2.internal&flag")).unwrap();
    assert_eq!(query.check.as_deref(), Some("kernel"));
    assert_eq!(query.peer.as_deref(), Some("ip-10-0-0-5.ec2.internal"));
    let decoded = StatusQuery::parse(Some("ch%65ck=dump")).unwrap();
    assert_eq!(decoded.check.as_deref(), Some("dump"));
}

#[test]
fn a_status_query_refuses_what_no_node_is_called_and_names_the_parameter() {
    let refusal = |query: &str| StatusQuery::parse(Some(query)).unwrap_err().0;
    for name in [
        "", "Node-B", "-b", "b-", "a..b", "b%20c", "b/c", "b%2Fc", "%2e%2e", "b+c",
    ] {
        let text = refusal(&format!("check=kernel&peer={name}"));
        assert!(text.starts_with("peer="), "{name}: {text}");
        assert!(text.contains("not a Node name"), "{name}: {text}");
    }
    assert!(refusal(&format!("check=kernel&peer={}", "a".repeat(254))).contains("not a Node name"));
    assert!(refusal("check=kernel&peer=%zz").contains("peer="));
    assert!(refusal("check=kernel&peer=%c3").contains("percent-encoded UTF-8"));
    let alone = refusal("peer=node-b");
    assert!(alone.contains("only goes with check=kernel"), "{alone}");
    let twice = refusal("check=kernel&check=dump");
    assert!(twice.contains("check= is given more than once"), "{twice}");
}
