//! Lets processes inside a node namespace reach the apiserver, which listens
//! on the root namespace's loopback where no other namespace can see it.
//!
//! For each node a TCP listener is bound *inside* the node namespace, on the
//! same loopback address and port as the apiserver, so one kubeconfig works in
//! the root namespace and on every node. Accepted connections are proxied to
//! the real apiserver by sockets made in the root namespace. TLS passes
//! through untouched; the serving certificate's 127.0.0.1 SAN covers both ends.
//! Kubelet nodes also get a listener on the `kubernetes` Service address, where
//! pods look for the apiserver.
//!
//! The other direction, apiserver to kubelets and pods (exec, logs,
//! port-forward, the API proxy), goes through an HTTP CONNECT proxy on a Unix
//! socket (the apiserver's egress selector) that dials from inside the first
//! node's namespace, as from a control-plane node on the pod network.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use nix::sched::{setns, CloneFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

/// The longest CONNECT request head the egress proxy reads.
const MAX_CONNECT_HEAD: usize = 8 * 1024;

/// How long the egress proxy waits for a node to accept a connection.
const EGRESS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A thread running one small tokio runtime with a listener task per node.
///
/// It has its own runtime, not the caller's, so forwarding keeps working
/// while a test blocks its own runtime, and so teardown from `Drop` needs no
/// runtime at all.
pub(crate) struct ApiserverForwarder {
    apiserver: SocketAddr,
    runtime: tokio::runtime::Handle,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// One node's listener; dropping it does not stop it, [`ApiserverForwarder::stop_node`] does.
pub(crate) struct NodeForward(AbortHandle);

impl ApiserverForwarder {
    pub(crate) fn start(apiserver: SocketAddr) -> Result<Self> {
        let (shutdown, shutdown_requested) = oneshot::channel::<()>();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let thread = thread::Builder::new()
            .name("weft-e2e-forwarder".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                // Dropping the runtime here, on its own thread, aborts every
                // listener and connection task.
                runtime.block_on(async {
                    let _ = shutdown_requested.await;
                });
            })
            .context("starting the apiserver forwarder thread")?;
        let runtime = handle_rx
            .recv()
            .map_err(|_| anyhow!("the apiserver forwarder thread died while starting"))?
            .context("building the apiserver forwarder's runtime")?;
        Ok(Self {
            apiserver,
            runtime,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Starts forwarding from the apiserver's address inside `netns` (a path
    /// like /var/run/netns/NAME) to the apiserver.
    pub(crate) fn forward_node(&self, netns: &str) -> Result<NodeForward> {
        self.forward_node_at(netns, self.apiserver)
    }

    /// Starts forwarding from `listen` inside `netns` to the apiserver; the
    /// address must exist in that namespace.
    pub(crate) fn forward_node_at(&self, netns: &str, listen: SocketAddr) -> Result<NodeForward> {
        let listener = in_netns(netns, move || {
            let listener = std::net::TcpListener::bind(listen)
                .with_context(|| format!("binding {listen} in namespace {netns}"))?;
            listener
                .set_nonblocking(true)
                .context("making the forwarder listener non-blocking")?;
            Ok(listener)
        })?;
        let listener = {
            // from_std needs the runtime's reactor.
            let _guard = self.runtime.enter();
            TcpListener::from_std(listener).context("registering the forwarder listener")?
        };
        let apiserver = self.apiserver;
        let task = self.runtime.spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    // Out of descriptors, most likely: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                tokio::spawn(async move {
                    // This task runs on the forwarder thread, which never
                    // left the root namespace, so the connect reaches loopback.
                    let Ok(mut outbound) = TcpStream::connect(apiserver).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Ok(NodeForward(task.abort_handle()))
    }

    /// Stops accepting on one node (connections already open end with the
    /// node's processes).
    pub(crate) fn stop_node(&self, forward: NodeForward) {
        forward.0.abort();
    }

    /// Serves the apiserver's egress proxy on `socket`: each connection
    /// sends `CONNECT host:port HTTP/1.1`, and the proxy dials that address
    /// from inside `dial_netns` (a path), answers 200 and relays bytes.
    pub(crate) fn serve_egress(&self, socket: &Path, dial_netns: &str) -> Result<()> {
        let listener = {
            let _guard = self.runtime.enter();
            UnixListener::bind(socket)
                .with_context(|| format!("binding the egress proxy socket {}", socket.display()))?
        };
        let dial_netns = dial_netns.to_owned();
        self.runtime.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let dial_netns = dial_netns.clone();
                tokio::spawn(async move {
                    if let Err(e) = relay_connect(client, &dial_netns).await {
                        tracing::debug!("egress proxy: {e:#}");
                    }
                });
            }
        });
        Ok(())
    }
}

/// Handles one CONNECT request of the apiserver's egress proxy.
async fn relay_connect(mut client: UnixStream, dial_netns: &str) -> Result<()> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_CONNECT_HEAD {
            client
                .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")
                .await?;
            return Err(anyhow!(
                "CONNECT request head longer than {MAX_CONNECT_HEAD} bytes"
            ));
        }
        // Byte by byte: nothing after the head may be consumed here.
        let byte = client
            .read_u8()
            .await
            .context("reading the CONNECT request")?;
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head);
    let target = match head.split_whitespace().collect::<Vec<_>>()[..] {
        ["CONNECT", target, ..] => target.parse::<SocketAddr>().ok(),
        _ => None,
    };
    let Some(target) = target else {
        client
            .write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await?;
        return Err(anyhow!("not a CONNECT to an IP address and port: {head:?}"));
    };
    // The socket must be made inside the underlay namespace, by a thread of
    // its own: no runtime thread ever changes namespace.
    let (done, connected) = oneshot::channel();
    let netns = dial_netns.to_owned();
    thread::spawn(move || {
        let _ = done.send(in_netns(&netns, move || {
            std::net::TcpStream::connect_timeout(&target, EGRESS_CONNECT_TIMEOUT)
                .with_context(|| format!("connecting to {target}"))
        }));
    });
    let node = match connected.await.context("the egress dialing thread died")? {
        Ok(node) => node,
        Err(e) => {
            client
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                .await?;
            return Err(e);
        }
    };
    node.set_nonblocking(true)?;
    let mut node = TcpStream::from_std(node)?;
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    tokio::io::copy_bidirectional(&mut client, &mut node).await?;
    Ok(())
}

impl Drop for ApiserverForwarder {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Makes a socket inside another network namespace. A socket stays in the
/// namespace it was created in, so a short-lived thread enters the
/// namespace, runs `make`, and hands the socket back; no long-lived thread
/// (and no tokio worker) ever changes namespace.
fn in_netns<T: Send>(netns: &str, make: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    thread::scope(|scope| {
        scope
            .spawn(|| -> Result<T> {
                let file =
                    File::open(netns).with_context(|| format!("opening namespace {netns}"))?;
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering namespace {netns}"))?;
                make()
            })
            .join()
            .map_err(|_| anyhow!("the thread working in namespace {netns} panicked"))?
    })
}
