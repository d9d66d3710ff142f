//! Which checks a cluster gets, worked out without I/O from where the test
//! pods landed: every client to every server (same node and across every
//! pair, TCP and UDP, each address family the pods have), to every node
//! and from every node, to the Service's ClusterIPs, to its NodePort and
//! to the hostPort on every node, to the Service's DNS name, and to each
//! outside address the operator named.

use std::net::{IpAddr, SocketAddr};

use super::objects::{Role, HOST_PORT, SERVICE, SERVICE_PORT};
use crate::probe::Transport;

/// One test pod as it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name.
    pub pod: String,
    /// Its addresses (`status.podIPs`), IPv4 first as the API lists them.
    pub ips: Vec<IpAddr>,
}

/// One node with its three test pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// The node's name.
    pub node: String,
    /// Its addresses (InternalIP, then ExternalIP), what a masqueraded pod
    /// is seen as and where its NodePort and hostPort listen.
    pub addresses: Vec<IpAddr>,
    /// The client pod.
    pub client: Member,
    /// The server pod.
    pub server: Member,
    /// The hostNetwork pod.
    pub host: Member,
}

impl Site {
    /// The pod of `role`.
    pub fn member(&self, role: Role) -> &Member {
        match role {
            Role::Client => &self.client,
            Role::Server => &self.server,
            Role::Host => &self.host,
        }
    }
}

/// The Service as the API server set it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSite {
    /// Its ClusterIPs, one per family.
    pub cluster_ips: Vec<IpAddr>,
    /// The node port allocated to it.
    pub node_port: u16,
}

/// Everything the plan is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The test's namespace.
    pub namespace: String,
    /// The nodes in the order of their index.
    pub sites: Vec<Site>,
    /// The Service.
    pub service: ServiceSite,
    /// Whether the cluster runs a DNS (a `kube-dns` Service in
    /// kube-system, as CoreDNS and kube-dns install it).
    pub dns: bool,
    /// The outside addresses given with `--external`.
    pub external: Vec<SocketAddr>,
}

/// What a check is, as its row names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A client pod to a server pod.
    PodToPod,
    /// A client pod to a node (its hostNetwork pod).
    PodToNode,
    /// A node (its hostNetwork pod) to a server pod.
    NodeToPod,
    /// A client pod to the Service's ClusterIP.
    PodToService,
    /// A client pod to the Service's NodePort on a node.
    PodToNodePort,
    /// A client pod to a server's hostPort on a node.
    PodToHostPort,
    /// A client pod to the Service by its DNS name.
    PodToServiceDns,
    /// A client pod to an address outside the cluster.
    PodToExternal,
    /// The default-deny policy keeps a client out.
    PolicyDeny,
    /// The allow policy lets the named client in.
    PolicyAllow,
    /// The allow policy keeps every other client out.
    PolicyAllowOthersDenied,
    /// With both policies gone the server is open again.
    PolicyRemoved,
}

impl Kind {
    /// The check's name in a row and in `-o json`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::PodToPod => "pod-to-pod",
            Kind::PodToNode => "pod-to-node",
            Kind::NodeToPod => "node-to-pod",
            Kind::PodToService => "pod-to-service",
            Kind::PodToNodePort => "pod-to-nodeport",
            Kind::PodToHostPort => "pod-to-hostport",
            Kind::PodToServiceDns => "pod-to-service-dns",
            Kind::PodToExternal => "pod-to-external",
            Kind::PolicyDeny => "policy-deny",
            Kind::PolicyAllow => "policy-allow",
            Kind::PolicyAllowOthersDenied => "policy-allow-others-denied",
            Kind::PolicyRemoved => "policy-removed",
        }
    }
}

/// What the far end must have seen as the client's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Whatever it saw (Services may rewrite it).
    Any,
    /// One of these, and it must say: pod to pod goes unrewritten.
    OneOf(Vec<IpAddr>),
    /// One of these when it says (an outside server may not): the
    /// client's node, as masquerade makes it.
    OneOfIfSaid(Vec<IpAddr>),
}

/// What a check expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// A connection (for UDP: an answer), seen as said.
    Reach(Seen),
    /// No connection.
    Blocked,
}

/// Who connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The pod that connects.
    pub pod: String,
    /// Its role (for its control port).
    pub role: Role,
    /// Its node.
    pub node: String,
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What it is.
    pub kind: Kind,
    /// TCP or UDP.
    pub transport: Transport,
    /// The client.
    pub from: Source,
    /// The destination in words, e.g. `server-1 (node-b)`.
    pub to: String,
    /// The address or DNS name connected to.
    pub host: String,
    /// The port.
    pub port: u16,
    /// The address `trace` follows when the check fails (a DNS check
    /// follows the ClusterIP).
    pub trace_to: Option<IpAddr>,
    /// What must happen.
    pub expect: Expect,
}

impl Check {
    /// `IPv4` or `IPv6` for an address, `DNS` for a name.
    pub fn family(&self) -> &'static str {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => "IPv4",
            Ok(IpAddr::V6(_)) => "IPv6",
            Err(_) => "DNS",
        }
    }
}

impl Placement {
    fn source(&self, site: &Site, role: Role) -> Source {
        Source {
            pod: site.member(role).pod.clone(),
            role,
            node: site.node.clone(),
        }
    }

    /// `server-1 (node-b)`.
    fn pod_words(site: &Site, role: Role) -> String {
        format!("{} ({})", site.member(role).pod, site.node)
    }

    /// The connectivity checks (the policy checks follow them separately,
    /// each with its policy change).
    pub fn checks(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        let pairs = || {
            self.sites
                .iter()
                .flat_map(|from| self.sites.iter().map(move |to| (from, to)))
        };
        for transport in [Transport::Tcp, Transport::Udp] {
            for (from, to) in pairs() {
                for ip in &to.server.ips {
                    checks.push(Check {
                        kind: Kind::PodToPod,
                        transport,
                        from: self.source(from, Role::Client),
                        to: Self::pod_words(to, Role::Server),
                        host: ip.to_string(),
                        port: Role::Server.echo_port(),
                        trace_to: Some(*ip),
                        expect: Expect::Reach(Seen::OneOf(same_family(&from.client.ips, ip))),
                    });
                }
            }
        }
        for (from, to) in pairs() {
            for ip in &to.addresses {
                checks.push(self.tcp(
                    Kind::PodToNode,
                    self.source(from, Role::Client),
                    format!("node {}", to.node),
                    *ip,
                    Role::Host.echo_port(),
                ));
            }
        }
        for (from, to) in pairs() {
            for ip in &to.server.ips {
                checks.push(self.tcp(
                    Kind::NodeToPod,
                    self.source(from, Role::Host),
                    Self::pod_words(to, Role::Server),
                    *ip,
                    Role::Server.echo_port(),
                ));
            }
        }
        for from in &self.sites {
            for ip in &self.service.cluster_ips {
                checks.push(self.tcp(
                    Kind::PodToService,
                    self.source(from, Role::Client),
                    format!("Service {SERVICE}"),
                    *ip,
                    SERVICE_PORT,
                ));
            }
        }
        for (kind, port) in [
            (Kind::PodToNodePort, self.service.node_port),
            (Kind::PodToHostPort, HOST_PORT),
        ] {
            for (from, to) in pairs() {
                for ip in &to.addresses {
                    checks.push(self.tcp(
                        kind,
                        self.source(from, Role::Client),
                        format!("node {}", to.node),
                        *ip,
                        port,
                    ));
                }
            }
        }
        if self.dns {
            for from in &self.sites {
                checks.push(Check {
                    host: self.dns_name(),
                    trace_to: self.service.cluster_ips.first().copied(),
                    ..self.tcp(
                        Kind::PodToServiceDns,
                        self.source(from, Role::Client),
                        format!("Service {SERVICE}"),
                        IpAddr::from([0, 0, 0, 0]),
                        SERVICE_PORT,
                    )
                });
            }
        }
        for external in &self.external {
            for from in &self.sites {
                let node = same_family(&from.addresses, &external.ip());
                checks.push(Check {
                    expect: Expect::Reach(Seen::OneOfIfSaid(node)),
                    ..self.tcp(
                        Kind::PodToExternal,
                        self.source(from, Role::Client),
                        "outside".to_string(),
                        external.ip(),
                        external.port(),
                    )
                });
            }
        }
        checks
    }

    /// The Service's name as a pod resolves it through its search path
    /// (`<service>.<namespace>.svc`), whatever the cluster's domain.
    pub fn dns_name(&self) -> String {
        format!("{SERVICE}.{}.svc", self.namespace)
    }

    fn tcp(&self, kind: Kind, from: Source, to: String, ip: IpAddr, port: u16) -> Check {
        Check {
            kind,
            transport: Transport::Tcp,
            from,
            to,
            host: ip.to_string(),
            port,
            trace_to: Some(ip),
            expect: Expect::Reach(Seen::Any),
        }
    }

    /// The policy checks' client and server nodes: the server on the last
    /// node, the client on the first admitted, the client on the second
    /// (when there is one) kept out.
    pub fn policy_ends(&self) -> (usize, usize, Option<usize>) {
        let last = self.sites.len().saturating_sub(1);
        (last, 0, (self.sites.len() > 1).then_some(1))
    }

    /// A policy check: the client on node `client` to the server on node
    /// `server` over TCP, IPv4 first.
    pub fn policy_check(&self, kind: Kind, server: usize, client: usize, expect: Expect) -> Check {
        let (to, from) = (&self.sites[server], &self.sites[client]);
        let ip = to.server.ips[0];
        Check {
            expect,
            ..self.tcp(
                kind,
                self.source(from, Role::Client),
                Self::pod_words(to, Role::Server),
                ip,
                Role::Server.echo_port(),
            )
        }
    }
}

/// The addresses of `ips` in the family of `like`.
fn same_family(ips: &[IpAddr], like: &IpAddr) -> Vec<IpAddr> {
    ips.iter()
        .filter(|ip| ip.is_ipv4() == like.is_ipv4())
        .copied()
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `nodes` sites; dual-stack ones have an IPv6 address of every kind.
    pub(crate) fn placement(nodes: usize, dual_stack: bool) -> Placement {
        let ips = |v4: String, v6: String| -> Vec<IpAddr> {
            let mut ips = vec![v4.parse().unwrap()];
            if dual_stack {
                ips.push(v6.parse().unwrap());
            }
            ips
        };
        let sites = (0..nodes)
            .map(|i| {
                let member = |role: Role, host: u8| Member {
                    pod: super::super::objects::pod_name(role, i),
                    ips: ips(format!("10.244.{i}.{host}"), format!("fd00:{i}::{host}")),
                };
                Site {
                    node: format!("node-{i}"),
                    addresses: ips(format!("192.168.0.{i}"), format!("fc00::{i}")),
                    client: member(Role::Client, 2),
                    server: member(Role::Server, 3),
                    host: Member {
                        pod: format!("host-{i}"),
                        ips: ips(format!("192.168.0.{i}"), format!("fc00::{i}")),
                    },
                }
            })
            .collect();
        Placement {
            namespace: "weft-connectivity-x1".into(),
            sites,
            service: ServiceSite {
                cluster_ips: ips("10.96.0.9".into(), "fd01::9".into()),
                node_port: 31000,
            },
            dns: true,
            external: vec!["192.0.2.1:9000".parse().unwrap()],
        }
    }

    fn count(checks: &[Check], kind: Kind) -> usize {
        checks.iter().filter(|c| c.kind == kind).count()
    }

    #[test]
    fn three_nodes_get_every_pair_and_every_node() {
        let checks = placement(3, false).checks();
        // 9 ordered pairs (3 on one node), TCP and UDP.
        assert_eq!(count(&checks, Kind::PodToPod), 18);
        for kind in [
            Kind::PodToNode,
            Kind::NodeToPod,
            Kind::PodToNodePort,
            Kind::PodToHostPort,
        ] {
            assert_eq!(count(&checks, kind), 9, "{kind:?}");
        }
        for kind in [
            Kind::PodToService,
            Kind::PodToServiceDns,
            Kind::PodToExternal,
        ] {
            assert_eq!(count(&checks, kind), 3, "{kind:?}");
        }
        assert!(checks.iter().all(|c| c.family() != "IPv6"));
        let pod_to_pod = &checks[1];
        assert_eq!(
            (pod_to_pod.from.pod.as_str(), pod_to_pod.to.as_str()),
            ("client-0", "server-1 (node-1)")
        );
        assert_eq!(
            pod_to_pod.expect,
            Expect::Reach(Seen::OneOf(vec!["10.244.0.2".parse().unwrap()]))
        );
        let dns = checks
            .iter()
            .find(|c| c.kind == Kind::PodToServiceDns)
            .unwrap();
        assert_eq!(dns.host, "echo.weft-connectivity-x1.svc");
        assert_eq!(dns.family(), "DNS");
        assert_eq!(dns.trace_to, Some("10.96.0.9".parse().unwrap()));
        let external = checks.last().unwrap();
        assert_eq!(
            external.expect,
            Expect::Reach(Seen::OneOfIfSaid(vec!["192.168.0.2".parse().unwrap()]))
        );
    }

    #[test]
    fn dual_stack_doubles_every_address_check_and_sees_each_family_alike() {
        // The outside address given is IPv4 only.
        let without_external = |dual_stack| Placement {
            external: vec![],
            ..placement(2, dual_stack)
        };
        let single = without_external(false).checks();
        let dual = without_external(true).checks();
        let by = |checks: &[Check], family| checks.iter().filter(|c| c.family() == family).count();
        assert_eq!(by(&dual, "IPv6"), by(&single, "IPv4"));
        let v6 = dual
            .iter()
            .find(|c| c.kind == Kind::PodToPod && c.family() == "IPv6")
            .unwrap();
        assert_eq!(
            v6.expect,
            Expect::Reach(Seen::OneOf(vec!["fd00:0::2".parse().unwrap()]))
        );
    }

    #[test]
    fn without_dns_or_external_those_checks_are_left_out() {
        let mut placement = placement(1, false);
        placement.dns = false;
        placement.external.clear();
        let checks = placement.checks();
        assert_eq!(count(&checks, Kind::PodToServiceDns), 0);
        assert_eq!(count(&checks, Kind::PodToExternal), 0);
        assert_eq!(placement.policy_ends(), (0, 0, None));
    }
}
