//! `kubectl-weft probe`: the small server and client that `kubectl weft
//! connectivity test` runs in its pods (Weft's image ships this binary, so
//! the test needs no other image).
//!
//! `probe serve --port P` answers every TCP connection and every UDP
//! datagram on P with the address it came from (`<ip>\n`), so a client
//! learns whether it was masqueraded; run it outside the cluster as the far
//! end of `connectivity test --external`. With `--control C` it also serves
//! `GET /connect?host=H&port=N&protocol=tcp|udp&timeoutMs=T` on TCP port
//! C: it tries the connection itself and answers with a [`ProbeResult`] as
//! JSON. The test asks its client pods that way, through the API server's
//! pod proxy, as `status` reads the agents. `probe connect HOST:PORT`
//! is the same client from a shell.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::cli::parse_duration;

/// The longest control request read: a request line and a few headers.
const MAX_REQUEST: usize = 8192;
/// The longest answer a client reads from the far end.
const MAX_ANSWER: usize = 256;
/// What a UDP client sends; the server answers any datagram alike.
const UDP_HELLO: &[u8] = b"weft-probe\n";
/// How often a UDP client sends again within its timeout: a lost datagram
/// is no failed check.
const UDP_RESEND: Duration = Duration::from_millis(500);

/// `probe`'s modes.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ProbeCommand,
}

/// The server and the client.
#[derive(Debug, Subcommand)]
pub enum ProbeCommand {
    /// Answers each TCP connection and UDP datagram on --port with the
    /// client's address; with --control, also runs connections on request.
    Serve {
        /// The TCP and UDP port that answers with the client's address.
        #[arg(long)]
        port: u16,
        /// The TCP port of `GET /connect?...` (HTTP), if any.
        #[arg(long)]
        control: Option<u16>,
    },
    /// Connects once to HOST:PORT and prints what happened as JSON; exits 0
    /// when connected (for UDP: answered), 1 otherwise.
    Connect {
        /// `ip:port`, `[ipv6]:port` or `name:port`.
        #[arg(value_name = "HOST:PORT")]
        target: String,
        /// UDP instead of TCP.
        #[arg(long)]
        udp: bool,
        /// Limit on the whole attempt, e.g. 2s.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

/// The protocol of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// A TCP connection.
    Tcp,
    /// A UDP datagram and its answer.
    Udp,
}

impl Transport {
    /// As Kubernetes spells it, `TCP` or `UDP`.
    pub fn kubernetes_name(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
        }
    }

    fn query_word(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// What one attempt did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    /// TCP: the connection was made; UDP: an answer came back.
    pub connected: bool,
    /// The address tried (after name resolution), when there was one.
    pub address: Option<String>,
    /// What the far end said it saw as the client's address, when it said.
    pub seen: Option<String>,
    /// Why not connected.
    pub error: Option<String>,
    /// How long the attempt took, in milliseconds.
    pub millis: u64,
}

/// One attempt the control endpoint is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRequest {
    /// An address or a DNS name.
    pub host: String,
    /// The port.
    pub port: u16,
    /// TCP or UDP.
    pub transport: Transport,
    /// Limit on the attempt.
    pub timeout: Duration,
}

impl ProbeRequest {
    /// The path and query of `GET /connect` for this attempt.
    pub fn path(&self) -> String {
        format!(
            "connect?host={}&port={}&protocol={}&timeoutMs={}",
            self.host,
            self.port,
            self.transport.query_word(),
            self.timeout.as_millis()
        )
    }

    /// Reads the query of `GET /connect?…`; the host may hold only the
    /// characters of an address or a DNS name, so nothing needs decoding.
    pub fn from_query(query: &str) -> Result<Self, String> {
        let (mut host, mut port, mut transport, mut timeout) = (None, None, Transport::Tcp, None);
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "host" => host = Some(value.to_string()),
                "port" => port = value.parse::<u16>().ok().filter(|port| *port > 0),
                "protocol" => {
                    transport = match value {
                        "tcp" => Transport::Tcp,
                        "udp" => Transport::Udp,
                        _ => return Err(format!("protocol={value}: use tcp or udp")),
                    }
                }
                "timeoutMs" => timeout = value.parse().ok().map(Duration::from_millis),
                _ => return Err(format!("unknown parameter {key:?}")),
            }
        }
        let host = host
            .filter(|host| {
                !host.is_empty()
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c))
            })
            .ok_or("host=: give an address or a DNS name")?;
        Ok(ProbeRequest {
            host,
            port: port.ok_or("port=: give 1 to 65535")?,
            transport,
            timeout: timeout.ok_or("timeoutMs=: give the limit in milliseconds")?,
        })
    }
}

/// Runs `probe` and returns the exit status.
pub async fn run(args: &ProbeArgs, out: &mut impl std::io::Write) -> std::io::Result<u8> {
    match &args.command {
        ProbeCommand::Serve { port, control } => {
            serve(*port, *control).await?;
            Ok(0)
        }
        ProbeCommand::Connect {
            target,
            udp,
            timeout,
        } => {
            let result = match split_host_port(target) {
                Some((host, port)) => {
                    let transport = if *udp { Transport::Udp } else { Transport::Tcp };
                    attempt(&ProbeRequest {
                        host: host.to_string(),
                        port,
                        transport,
                        timeout: *timeout,
                    })
                    .await
                }
                None => failed(
                    None,
                    format!("{target:?} is not HOST:PORT, e.g. 10.0.0.1:80 or [fd00::1]:80"),
                    Instant::now(),
                ),
            };
            writeln!(out, "{}", serde_json::to_string(&result)?)?;
            Ok(u8::from(!result.connected))
        }
    }
}

/// `host:port` or `[v6]:port`, split.
fn split_host_port(target: &str) -> Option<(&str, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host, port.parse().ok().filter(|port| *port > 0)?))
}

/// Serves the echo port (TCP and UDP) and, when given, the control port,
/// until the process ends.
pub async fn serve(port: u16, control: Option<u16>) -> std::io::Result<()> {
    let tcp = TcpListener::bind(any_address(port)?).await?;
    let udp = UdpSocket::bind(tcp.local_addr()?).await?;
    let control = match control {
        Some(control) => Some(TcpListener::bind(any_address(control)?).await?),
        None => None,
    };
    tokio::try_join!(echo_tcp(tcp), echo_udp(udp), async {
        match control {
            Some(listener) => serve_control(listener).await,
            None => std::future::pending().await,
        }
    })?;
    Ok(())
}

/// `[::]:port` where the kernel has IPv6 (one socket takes both families),
/// else `0.0.0.0:port`.
fn any_address(port: u16) -> std::io::Result<SocketAddr> {
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    match std::net::TcpListener::bind(v6) {
        Ok(_) => Ok(v6),
        // The port may be taken: the real bind says so.
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(v6),
        Err(_) => Ok(SocketAddr::from(([0, 0, 0, 0], port))),
    }
}

/// An address as the far end should report it: IPv4 clients of a
/// dual-stack socket arrive as `::ffff:a.b.c.d`.
fn plain(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

async fn echo_tcp(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (mut stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            // A client gone before the answer is no concern of the server's.
            let _ = stream
                .write_all(format!("{}\n", plain(peer.ip())).as_bytes())
                .await;
            let _ = stream.shutdown().await;
        });
    }
}

async fn echo_udp(socket: UdpSocket) -> std::io::Result<()> {
    let mut buffer = [0u8; 512];
    loop {
        let (_, peer) = socket.recv_from(&mut buffer).await?;
        let answer = format!("{}\n", plain(peer.ip()));
        // A refused answer (the client left) must not stop the server.
        let _ = socket.send_to(answer.as_bytes(), peer).await;
    }
}

async fn serve_control(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = answer_control(stream).await;
        });
    }
}

/// Reads one HTTP request and answers it, closing the connection after.
async fn answer_control(mut stream: TcpStream) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        request.extend_from_slice(&buffer[..read]);
    }
    let text = String::from_utf8_lossy(&request);
    let target = text.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match target.split_once('?') {
        Some(("/connect", query)) => match ProbeRequest::from_query(query) {
            Ok(request) => (
                "200 OK",
                serde_json::to_string(&attempt(&request).await)
                    .expect("a probe result always serialises"),
            ),
            Err(error) => ("400 Bad Request", error),
        },
        _ => (
            "404 Not Found",
            "GET /connect?host=H&port=N&protocol=tcp|udp&timeoutMs=T".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn failed(address: Option<SocketAddr>, error: String, started: Instant) -> ProbeResult {
    ProbeResult {
        connected: false,
        address: address.map(|a| a.to_string()),
        seen: None,
        error: Some(error),
        millis: elapsed_millis(started),
    }
}

fn elapsed_millis(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One attempt: resolves the host (in this pod, with its resolver), then
/// connects over TCP and reads what the far end says, or sends a UDP
/// datagram until an answer comes; all within `request.timeout`.
pub async fn attempt(request: &ProbeRequest) -> ProbeResult {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + request.timeout;
    let resolved = tokio::time::timeout_at(
        deadline,
        tokio::net::lookup_host((request.host.as_str(), request.port)),
    )
    .await;
    let address = match resolved {
        Err(_) => {
            return failed(
                None,
                format!("resolving {}: timed out", request.host),
                started,
            )
        }
        Ok(Err(e)) => return failed(None, format!("resolving {}: {e}", request.host), started),
        Ok(Ok(mut addresses)) => match addresses.next() {
            Some(address) => address,
            None => return failed(None, format!("{} has no address", request.host), started),
        },
    };
    let outcome = match request.transport {
        Transport::Tcp => tcp_attempt(address, deadline).await,
        Transport::Udp => udp_attempt(address, deadline).await,
    };
    match outcome {
        Ok(seen) => ProbeResult {
            connected: true,
            address: Some(address.to_string()),
            seen,
            error: None,
            millis: elapsed_millis(started),
        },
        Err(error) => failed(Some(address), error, started),
    }
}

/// Connects; then whatever the far end says before it closes or the
/// deadline passes is what it saw (a server that says nothing still
/// counts as reached).
async fn tcp_attempt(
    address: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<Option<String>, String> {
    let mut stream = match tokio::time::timeout_at(deadline, TcpStream::connect(address)).await {
        Err(_) => return Err("connect: timed out".into()),
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Ok(Ok(stream)) => stream,
    };
    let mut answer = Vec::new();
    let mut buffer = [0u8; MAX_ANSWER];
    while answer.len() < MAX_ANSWER {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(read)) if read > 0 => answer.extend_from_slice(&buffer[..read]),
            _ => break,
        }
    }
    Ok(seen_in(&answer))
}

/// Sends the datagram (again every [`UDP_RESEND`]) until one answer comes.
async fn udp_attempt(
    address: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<Option<String>, String> {
    let local = match address {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("binding a UDP socket: {e}"))?;
    socket
        .connect(address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut buffer = [0u8; MAX_ANSWER];
    loop {
        if tokio::time::Instant::now() >= deadline {
            return Err("no answer: timed out".into());
        }
        // A refusal (ICMP port unreachable) shows on the next send or receive.
        socket
            .send(UDP_HELLO)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let wait = (tokio::time::Instant::now() + UDP_RESEND).min(deadline);
        match tokio::time::timeout_at(wait, socket.recv(&mut buffer)).await {
            Ok(Ok(read)) => return Ok(seen_in(&buffer[..read])),
            Ok(Err(e)) => return Err(format!("receive: {e}")),
            Err(_) => continue,
        }
    }
}

/// The address a far end said it saw, if its answer is one.
fn seen_in(answer: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(answer);
    let ip: IpAddr = text.trim().parse().ok()?;
    Some(plain(ip).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_the_query() {
        let request = ProbeRequest {
            host: "fd00::5".into(),
            port: 4241,
            transport: Transport::Udp,
            timeout: Duration::from_millis(1500),
        };
        let path = request.path();
        let (_, query) = path.split_once('?').unwrap();
        assert_eq!(ProbeRequest::from_query(query), Ok(request));
        assert!(ProbeRequest::from_query("host=a;b&port=1&timeoutMs=1")
            .unwrap_err()
            .contains("host="));
        assert!(ProbeRequest::from_query("host=a&port=0&timeoutMs=1")
            .unwrap_err()
            .contains("port="));
        assert!(ProbeRequest::from_query("host=a&port=1&protocol=sctp&timeoutMs=1").is_err());
    }

    #[test]
    fn targets_split_with_or_without_brackets() {
        assert_eq!(split_host_port("10.0.0.1:80"), Some(("10.0.0.1", 80)));
        assert_eq!(split_host_port("[fd00::1]:53"), Some(("fd00::1", 53)));
        assert_eq!(
            split_host_port("web.shop.svc:80"),
            Some(("web.shop.svc", 80))
        );
        assert_eq!(split_host_port("10.0.0.1"), None);
    }

    #[test]
    fn only_an_address_counts_as_what_the_far_end_saw() {
        assert_eq!(seen_in(b"10.0.0.7\n"), Some("10.0.0.7".into()));
        assert_eq!(seen_in(b"::ffff:10.0.0.7"), Some("10.0.0.7".into()));
        assert_eq!(seen_in(b"HTTP/1.1 400 Bad Request\r\n"), None);
    }

    /// A free port on loopback for both TCP and UDP.
    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn the_server_answers_tcp_udp_and_control_requests_with_the_client_address() {
        let (port, control) = (free_port(), free_port());
        tokio::spawn(serve(port, Some(control)));
        let request = |transport| ProbeRequest {
            host: "127.0.0.1".into(),
            port,
            transport,
            timeout: Duration::from_secs(5),
        };
        // The server binds in the background: the first attempts may be refused.
        let answered =
            weft_testing::eventually(Duration::from_secs(10), "the probe server", || async {
                let result = attempt(&request(Transport::Tcp)).await;
                Ok(result.connected.then_some(result))
            })
            .await
            .unwrap();
        assert_eq!(answered.seen.as_deref(), Some("127.0.0.1"));
        let udp = attempt(&request(Transport::Udp)).await;
        assert_eq!(
            (udp.connected, udp.seen.as_deref()),
            (true, Some("127.0.0.1"))
        );

        // The control endpoint runs the attempt itself and answers JSON.
        let mut stream = TcpStream::connect(("127.0.0.1", control)).await.unwrap();
        let get = format!(
            "GET /{} HTTP/1.1\r\nHost: x\r\n\r\n",
            request(Transport::Udp).path()
        );
        stream.write_all(get.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{response}");
        let result: ProbeResult = serde_json::from_str(body).unwrap();
        assert_eq!(result.seen.as_deref(), Some("127.0.0.1"));

        // A port nothing listens on: refused at once.
        let refused = attempt(&ProbeRequest {
            port: free_port(),
            ..request(Transport::Tcp)
        })
        .await;
        assert!(!refused.connected);
        assert!(refused.error.unwrap().contains("connect"));
    }
}
