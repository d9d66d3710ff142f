//! `kubectl weft trace`: why one pod can or cannot reach another pod or an
//! address, and whether the nodes hold the path, read through the API
//! server alone.
//!
//! [`read`] fetches the Pods, Namespaces, NetworkPolicies and Nodes, and
//! the `/status?check=kernel&peer=<other node>` of the two nodes' agents.
//! [`judge`] answers without I/O: the policy verdict of both ends with the
//! policies and rules behind it (the same screening and compiler the
//! agents run, so the expected plan fingerprint can be set against the one
//! each agent enforces), and the kernel entries of the path in both
//! directions. [`Trace::text`] renders the answer for a terminal; `-o
//! json` prints [`Trace`] as it is.

mod judge;
mod read;
mod text;
mod words;

use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::str::FromStr;

use clap::Args;
use kube::Client;
use serde::Serialize;
use weft_core::protocol::Protocol;
use weft_core::status::EntryCheck;

use crate::cli::{json_text, Output};
use crate::error::Result;
use crate::observe::StatusOptions;

pub use judge::judge;
pub use read::{read, Readings};

/// Flags and arguments of `trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The pod the traffic comes from: `[namespace/]name` (default
    /// namespace: the kubeconfig context's, else `default`).
    #[arg(value_name = "[NS/]POD")]
    pub source: String,
    /// Where it goes: `[namespace/]name` of a pod, or an IP address.
    #[arg(value_name = "[NS/]POD|IP")]
    pub destination: String,
    /// The destination port, e.g. 80 or 53/udp; default: the destination
    /// pod's only declared container port.
    #[arg(long, value_name = "N[/tcp|udp|sctp]")]
    pub port: Option<PortSpec>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// A pod by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl PodRef {
    /// Reads `ns/name`, or `name` in `default_namespace`.
    pub fn parse(text: &str, default_namespace: &str) -> Self {
        match text.split_once('/') {
            Some((namespace, name)) => PodRef {
                namespace: namespace.to_string(),
                name: name.to_string(),
            },
            None => PodRef {
                namespace: default_namespace.to_string(),
                name: text.to_string(),
            },
        }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where the traffic goes, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A pod.
    Pod(PodRef),
    /// An address (which may turn out to be a pod's).
    Ip(IpAddr),
}

impl Target {
    /// An IP address if `text` is one, else a pod.
    pub fn parse(text: &str, default_namespace: &str) -> Self {
        match text.parse() {
            Ok(ip) => Target::Ip(ip),
            Err(_) => Target::Pod(PodRef::parse(text, default_namespace)),
        }
    }
}

/// `--port`: a port number and its protocol (TCP unless named).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// The port.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

impl FromStr for PortSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (number, protocol) = match text.split_once('/') {
            Some((number, protocol)) => (
                number,
                Protocol::parse(protocol).ok_or_else(|| {
                    format!("{protocol:?} is not a protocol; use tcp, udp or sctp, e.g. 53/udp")
                })?,
            ),
            None => (text, Protocol::Tcp),
        };
        match number.parse::<u16>() {
            Ok(port) if port > 0 => Ok(PortSpec { port, protocol }),
            _ => Err(format!(
                "{number:?} is not a port; give 1 to 65535, e.g. 80 or 53/udp"
            )),
        }
    }
}

/// What `trace` asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRequest {
    /// The pod the traffic comes from.
    pub source: PodRef,
    /// Where it goes.
    pub destination: Target,
    /// The port, when given.
    pub port: Option<PortSpec>,
}

/// What `kubectl weft trace` found (`-o json` prints it as it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    /// The pod the traffic comes from.
    pub source: End,
    /// Where it goes.
    pub destination: End,
    /// `TCP`, `UDP` or `SCTP`, as Kubernetes spells it.
    pub protocol: String,
    /// The destination port.
    pub port: u16,
    /// Whether NetworkPolicy lets it through at both ends.
    pub allowed: bool,
    /// The verdict of each end, with the policies and rules behind it.
    pub policy: PolicyVerdict,
    /// The kernel entries on the way, in both directions.
    pub path: Path,
    /// What needs an operator, each with its fix.
    pub warnings: Vec<String>,
}

/// One end of the traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct End {
    /// `namespace/name`; none for an address that is no pod's.
    pub pod: Option<String>,
    /// The address traced.
    pub ip: IpAddr,
    /// The node it is on; none for an address outside every pod slice.
    pub node: Option<String>,
}

/// The policy verdict of both ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyVerdict {
    /// The source's egress; none when the source is no pod policy sees
    /// (a hostNetwork pod).
    pub egress: Option<PolicySide>,
    /// The destination's ingress; none when the destination is no pod.
    pub ingress: Option<PolicySide>,
}

/// The verdict of one end, on that end's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySide {
    /// The node that enforces it.
    pub node: String,
    /// Whether this end lets the traffic through.
    pub allows: bool,
    /// The policies that isolate this end for the direction, `ns/name`;
    /// empty when it is not isolated (everything passes).
    pub isolating: Vec<String>,
    /// Every rule that admits the traffic.
    pub admitted_by: Vec<Admission>,
    /// The pod's address is claimed by another pod too: isolated with
    /// nothing allowed until one lets it go.
    pub withheld: bool,
    /// The plan fingerprint the node's agent reports enforcing; none when
    /// it could not be read or the agent enforces no policy.
    pub enforced_fingerprint: Option<String>,
    /// The fingerprint of the plan compiled here for that node.
    pub expected_fingerprint: String,
    /// Whether the two are equal: the node enforces what this verdict says.
    pub fingerprint_matches: bool,
}

/// One rule that admits the traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Admission {
    /// The policy, `ns/name`.
    pub policy: String,
    /// The index of the rule in `spec.ingress` or `spec.egress`.
    pub rule: usize,
    /// The index in the rule's `from`/`to` that matched; none when the
    /// rule names no peers (every peer).
    pub peer: Option<usize>,
    /// The index in the rule's `ports` that matched; none when the rule
    /// names no ports (every port).
    pub port: Option<usize>,
    /// The rule, peer and port in words.
    pub text: String,
}

/// The data path between the two ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Path {
    /// Both ends on one node: the traffic stays on its bridge.
    pub same_node: bool,
    /// The source node's backend, as its agent reports it.
    pub backend: Option<String>,
    /// Every entry is held and both nodes accept each other as peers.
    pub complete: bool,
    /// The destination lies outside every pod slice: the traffic leaves
    /// through the source node's underlay, masqueraded.
    pub leaves_cluster: bool,
    /// For two nodes: the source node toward the destination node, then
    /// the way back.
    pub hops: Vec<Hop>,
}

/// What one node holds toward another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Hop {
    /// The node.
    pub node: String,
    /// The peer it sends toward.
    pub toward: String,
    /// What the node's agent made of the peer: `accepted`, `rejected`,
    /// `held`, or `unknown` (also when the agent could not be asked).
    pub state: String,
    /// Why not accepted, when not.
    pub reason: Option<String>,
    /// The kernel entries the node must hold for the peer.
    pub entries: Vec<EntryCheck>,
}

impl Trace {
    /// 0 when the policy allows it, the path is complete and every
    /// enforcing node runs the plan expected; 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        let fingerprints = [&self.policy.egress, &self.policy.ingress]
            .into_iter()
            .flatten()
            .all(|side| side.fingerprint_matches);
        u8::from(!(self.allowed && self.path.complete && fingerprints))
    }

    /// The trace for a terminal.
    pub fn text(&self) -> String {
        text::render(self)
    }
}

/// Reads the cluster and answers `request`: what `kubectl weft trace` prints.
pub async fn trace(
    client: &Client,
    options: &StatusOptions,
    request: &TraceRequest,
) -> Result<Trace> {
    let readings = read(client, options, request).await?;
    judge(&readings, request)
}

/// Runs `trace` as the command line asks and returns the exit status.
pub async fn run(
    client: &Client,
    options: &StatusOptions,
    args: &TraceArgs,
    out: &mut impl Write,
) -> Result<u8> {
    let namespace = client.default_namespace();
    let request = TraceRequest {
        source: PodRef::parse(&args.source, namespace),
        destination: Target::parse(&args.destination, namespace),
        port: args.port,
    };
    let trace = trace(client, options, &request).await?;
    let text = match args.output {
        Output::Table => trace.text(),
        Output::Json => json_text(&trace),
    };
    // As for `status`: a closed pipe does not change what was found.
    let _ = out.write_all(text.as_bytes());
    Ok(trace.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_read_with_or_without_a_protocol() {
        let tcp = |port| PortSpec {
            port,
            protocol: Protocol::Tcp,
        };
        assert_eq!("80".parse(), Ok(tcp(80)));
        assert_eq!("80/TCP".parse(), Ok(tcp(80)));
        assert_eq!(
            "53/udp".parse(),
            Ok(PortSpec {
                port: 53,
                protocol: Protocol::Udp
            })
        );
        assert!("0".parse::<PortSpec>().unwrap_err().contains("1 to 65535"));
        assert!("80/icmp"
            .parse::<PortSpec>()
            .unwrap_err()
            .contains("tcp, udp or sctp"));
        assert!("http".parse::<PortSpec>().is_err());
    }

    #[test]
    fn the_command_line_takes_two_ends_a_port_and_an_output() {
        use clap::Parser;

        use crate::cli::{Cli, Command};
        let parse = |args: &[&str]| Cli::try_parse_from(args);
        let cli = parse(&[
            "kubectl-weft",
            "trace",
            "web",
            "10.0.0.1",
            "--port",
            "53/udp",
            "-o",
            "json",
        ])
        .unwrap();
        let Command::Trace(args) = cli.command else {
            panic!("not trace: {:?}", cli.command);
        };
        assert_eq!(
            (args.source.as_str(), args.destination.as_str()),
            ("web", "10.0.0.1")
        );
        assert_eq!(
            args.port.map(|p| (p.port, p.protocol)),
            Some((53, Protocol::Udp))
        );
        assert_eq!(args.output, Output::Json);
        assert!(parse(&["kubectl-weft", "trace", "web"]).is_err());
        assert!(parse(&["kubectl-weft", "trace", "a", "b", "--port", "http"]).is_err());
    }

    #[test]
    fn ends_take_the_default_namespace_and_addresses_stay_addresses() {
        assert_eq!(
            PodRef::parse("web", "team").to_string(),
            "team/web".to_string()
        );
        assert_eq!(
            Target::parse("prod/db", "team"),
            Target::Pod(PodRef {
                namespace: "prod".into(),
                name: "db".into()
            })
        );
        assert_eq!(
            Target::parse("fd00::5", "team"),
            Target::Ip("fd00::5".parse().unwrap())
        );
    }
}
