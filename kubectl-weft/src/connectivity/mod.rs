//! `kubectl weft connectivity test`: makes a namespace of its own with a
//! client, a server and a hostNetwork pod on every node ([`objects`]),
//! runs every check the placement calls for ([`plan`]), then the
//! NetworkPolicy checks, each with its policy change, and prints a row per
//! check ([`report`]). Each failure names the pair and what `trace` says
//! about it. The namespace goes when the run ends, also on Ctrl-C or
//! SIGTERM; a killed run's namespace (found by [`objects::TEST_LABEL`]) goes
//! at the start of the next.
//!
//! Clients connect on the test's request: each pod's probe (`kubectl-weft
//! probe serve --control`) is asked through the API server's pod proxy, as
//! `status` asks the agents. That needs no exec stream per check (a
//! request costs milliseconds, an exec a container process), no crate
//! beyond what the plugin has, and only `pods/proxy`, which the operator's
//! role already grants.

pub mod objects;
pub mod plan;
pub mod report;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use futures::{stream, StreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use tokio::signal::unix::{signal, Signal, SignalKind};
use weft_core::protocol::Protocol;

use self::objects::{Role, NODE_LABEL, ROLE_LABEL, TEST_LABEL};
use self::plan::{Check, Expect, Kind, Member, Placement, Seen, ServiceSite, Site};
use self::report::{Outcome, Report, Row};
use crate::cli::{json_text, parse_duration, Output};
use crate::error::{Error, Result};
use crate::observe::{within, StatusOptions, AGENT_DAEMON_SET};
use crate::probe::{ProbeRequest, ProbeResult, Transport};
use crate::trace::{PodRef, PortSpec, Target, Trace, TraceRequest};

/// Limit on one attempt inside a check: a dropped SYN shows as a timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// The shortest attempt: time for a SYN and its answer on a busy node.
const SHORTEST_ATTEMPT: Duration = Duration::from_millis(500);
/// Pause between a check's attempts, so a refusal does not spin.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// What the pod proxy may add to an attempt's own limit.
const PROXY_SLACK: Duration = Duration::from_secs(3);
/// Checks in flight at once: each is one proxied request.
const AT_ONCE: usize = 8;
/// How often the pods' and the ServiceAccount's state is read again.
const POLL: Duration = Duration::from_millis(500);
/// Where the cluster DNS Service lives, as CoreDNS and kube-dns install it.
const DNS_SERVICE: (&str, &str) = ("kube-system", "kube-dns");

/// Flags of `connectivity`.
#[derive(Debug, Args)]
pub struct ConnectivityArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ConnectivityCommand,
}

/// The subcommands of `connectivity`.
#[derive(Debug, Subcommand)]
pub enum ConnectivityCommand {
    /// Runs pods on every node and checks pod to pod (same node and every
    /// node pair, IPv6 too when dual-stack), pod to node and back, Service
    /// ClusterIP, NodePort, hostPort and DNS name, outside addresses, and
    /// NetworkPolicy; removes everything after. Exits 0 when every check
    /// passes, 1 when one fails, 2 when it could not run.
    Test(TestArgs),
}

/// Flags of `connectivity test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// An address outside the cluster every node's client connects to;
    /// when it answers with the address it saw (`kubectl-weft probe serve
    /// --port PORT` does), that must be the client's node (masquerade).
    /// Repeat for more; without it the check is skipped.
    #[arg(long, value_name = "IP:PORT")]
    pub external: Vec<SocketAddr>,
    /// The test pods' image; default: the image of Weft's agent DaemonSet,
    /// which every node has already.
    #[arg(long)]
    pub image: Option<String>,
    /// Limit on each check, which tries again within it (e.g. while
    /// kube-proxy programs the new Service).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub check_timeout: Duration,
    /// Limit on the test pods becoming ready.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub start_timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Runs `connectivity` as the command line asks and returns the exit status.
pub async fn run(
    client: &Client,
    options: &StatusOptions,
    args: &ConnectivityArgs,
    out: &mut impl Write,
) -> Result<u8> {
    let ConnectivityCommand::Test(args) = &args.command;
    let started = Instant::now();
    // Listening before the first change: from here on a signal ends the
    // run through the cleanup, not by default.
    let mut signals = Signals::listen()?;
    let removed = remove_leftovers(client, options.request_timeout).await?;
    for name in &removed {
        eprintln!("removed namespace {name}, left by an earlier run");
    }
    let namespace = create_namespace(client, options.request_timeout).await?;
    let run = TestRun {
        client,
        options,
        namespace: namespace.clone(),
        check_timeout: args.check_timeout,
    };
    let outcome = tokio::select! {
        report = run.test(args, started) => report,
        signal = signals.next() => Err(Error::Connectivity(format!(
            "interrupted by {signal}; namespace {namespace} and everything in it removed"
        ))),
    };
    let cleanup = delete_namespace(client, &namespace, options.request_timeout).await;
    let mut report = outcome?;
    cleanup?;
    report.removed_leftovers = removed;
    report.seconds = started.elapsed().as_secs_f64();
    let text = match args.output {
        Output::Table => report.table(),
        Output::Json => json_text(&report),
    };
    // As for `status`: a closed pipe does not change what was found.
    let _ = out.write_all(text.as_bytes());
    Ok(report.exit_code())
}

/// SIGINT and SIGTERM, both of which end a run through its cleanup.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn listen() -> Result<Self> {
        let listen = |kind| {
            signal(kind)
                .map_err(|e| Error::Connectivity(format!("listening for SIGINT and SIGTERM: {e}")))
        };
        Ok(Signals {
            interrupt: listen(SignalKind::interrupt())?,
            terminate: listen(SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// Deletes the namespaces earlier runs left (found by [`TEST_LABEL`]) and
/// returns their names. Two runs at once on one cluster are not
/// supported: the second removes the first's namespace.
pub async fn remove_leftovers(client: &Client, limit: Duration) -> Result<Vec<String>> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let labelled = ListParams::default().labels(&format!("{TEST_LABEL}=true"));
    let found = within(
        limit,
        "list namespaces",
        namespaces.list_metadata(&labelled),
    )
    .await?;
    let mut removed = Vec::new();
    for namespace in found.items {
        let Some(name) = namespace.metadata.name else {
            continue;
        };
        if namespace.metadata.deletion_timestamp.is_none() {
            delete_namespace(client, &name, limit).await?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Makes the test's namespace and returns the name the API server gave it.
pub async fn create_namespace(client: &Client, limit: Duration) -> Result<String> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let created = change(
        limit,
        "create namespaces",
        namespaces.create(&PostParams::default(), &objects::namespace()),
    )
    .await?;
    created
        .metadata
        .name
        .ok_or_else(|| Error::Connectivity("the API server named no namespace".into()))
}

/// Deletes `name` (its pods, Service and policies with it); one already
/// gone is fine.
pub async fn delete_namespace(client: &Client, name: &str, limit: Duration) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match within(
        limit,
        "delete namespaces",
        namespaces.delete(name, &DeleteParams::background()),
    )
    .await
    {
        Err(Error::Read {
            source: kube::Error::Api(status),
            ..
        }) if status.code == 404 => Ok(()),
        Err(Error::Read { what, source }) => Err(Error::Change { what, source }),
        other => other.map(|_| ()),
    }
}

/// A change to the cluster within `limit`, naming it in the error.
async fn change<T>(
    limit: Duration,
    what: &str,
    request: impl Future<Output = kube::Result<T>>,
) -> Result<T> {
    within(limit, what, request)
        .await
        .map_err(|error| match error {
            Error::Read { what, source } => Error::Change { what, source },
            other => other,
        })
}

/// Looks again every [`POLL`] until `look` finds something or `limit`
/// passes (then `None`).
async fn poll<T, F, Fut>(limit: Duration, mut look: F) -> Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(found) = look().await? {
            return Ok(Some(found));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One run in its namespace.
struct TestRun<'a> {
    client: &'a Client,
    options: &'a StatusOptions,
    namespace: String,
    check_timeout: Duration,
}

impl TestRun<'_> {
    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Places the pods and the Service, waits for them, runs every check.
    async fn test(&self, args: &TestArgs, started: Instant) -> Result<Report> {
        let limit = self.options.request_timeout;
        let image = match &args.image {
            Some(image) => image.clone(),
            None => weft_image(self.client, self.options).await?,
        };
        let nodes = within(
            limit,
            "list nodes",
            Api::<Node>::all(self.client.clone()).list(&ListParams::default()),
        )
        .await?
        .items;
        let (ready, not_ready): (Vec<&Node>, Vec<&Node>) =
            nodes.iter().partition(|n| node_ready(n));
        if ready.is_empty() {
            return Err(Error::Connectivity(
                "no node is Ready: nothing to test (kubectl weft status says why)".into(),
            ));
        }
        let dns_services: Api<Service> = Api::namespaced(self.client.clone(), DNS_SERVICE.0);
        let dns = within(
            limit,
            "get the kube-dns Service",
            dns_services.get_opt(DNS_SERVICE.1),
        )
        .await?
        .is_some();

        // Pods need their namespace's default ServiceAccount, which the
        // controller-manager adds moments after the namespace.
        let accounts: Api<ServiceAccount> = self.api();
        poll(args.start_timeout, || async {
            within(limit, "get serviceaccounts", accounts.get_opt("default")).await
        })
        .await?
        .ok_or_else(|| {
            Error::Connectivity(format!(
                "namespace {} got no default ServiceAccount within {} s: is kube-controller-manager running?",
                self.namespace,
                args.start_timeout.as_secs()
            ))
        })?;
        let service = change(
            limit,
            "create services",
            self.api::<Service>()
                .create(&PostParams::default(), &objects::service()),
        )
        .await?;
        let pods: Vec<Pod> = ready
            .iter()
            .enumerate()
            .flat_map(|(index, node)| {
                let name = node.metadata.name.clone().unwrap_or_default();
                let image = image.clone();
                Role::ALL
                    .into_iter()
                    .map(move |role| objects::pod(role, index, &name, &image))
            })
            .collect();
        eprintln!(
            "namespace {}: {} test pods on {} nodes, waiting for them to be ready",
            self.namespace,
            pods.len(),
            ready.len()
        );
        let api: Api<Pod> = self.api();
        let post = PostParams::default();
        let created = stream::iter(&pods)
            .map(|pod| change(limit, "create pods", api.create(&post, pod)))
            .buffer_unordered(AT_ONCE)
            .collect::<Vec<_>>()
            .await;
        created.into_iter().collect::<Result<Vec<_>>>()?;
        let running = self.wait_for_pods(pods.len(), args.start_timeout).await?;
        let setup_seconds = started.elapsed().as_secs_f64();

        let placement = Placement {
            namespace: self.namespace.clone(),
            sites: sites(&ready, &running)?,
            service: service_site(&service)?,
            dns,
            external: args.external.clone(),
        };
        let checks = placement.checks();
        eprintln!(
            "pods ready after {setup_seconds:.1} s; running {} checks and the policy checks",
            checks.len()
        );
        let mut rows: Vec<Row> = not_ready.iter().map(|node| not_ready_row(node)).collect();
        rows.extend(self.run_checks(&checks).await);
        if !dns {
            rows.push(skipped(
                Kind::PodToServiceDns,
                "no kube-dns Service in kube-system: the cluster runs no DNS",
            ));
        }
        if args.external.is_empty() {
            rows.push(skipped(Kind::PodToExternal, "no --external IP:PORT given"));
        }
        rows.extend(self.policy_checks(&placement).await?);
        let mut report = Report {
            namespace: self.namespace.clone(),
            image,
            nodes: placement.sites.iter().map(|s| s.node.clone()).collect(),
            removed_leftovers: Vec::new(),
            setup_seconds,
            seconds: 0.0,
            passed: 0,
            failed: 0,
            skipped: 0,
            rows,
        };
        report.count();
        Ok(report)
    }

    /// Waits until all `expected` test pods are ready with their addresses.
    async fn wait_for_pods(&self, expected: usize, limit: Duration) -> Result<Vec<Pod>> {
        let api: Api<Pod> = self.api();
        let all = ListParams::default().labels(&format!("{TEST_LABEL}=true"));
        let last = std::cell::RefCell::new(Vec::new());
        let ready = poll(limit, || async {
            let listed = within(self.options.request_timeout, "list pods", api.list(&all))
                .await?
                .items;
            if listed.iter().filter(|pod| pod_ready(pod)).count() == expected {
                return Ok(Some(listed));
            }
            // Kept to say which pods are not ready if this was the last look.
            *last.borrow_mut() = listed;
            Ok(None)
        })
        .await?;
        let last = last.into_inner();
        ready.ok_or_else(|| {
            let waiting: Vec<String> = last
                .iter()
                .filter(|pod| !pod_ready(pod))
                .map(|pod| {
                    format!(
                        "{} on {}: {}",
                        pod.metadata.name.as_deref().unwrap_or("?"),
                        pod.spec
                            .as_ref()
                            .and_then(|s| s.node_name.as_deref())
                            .unwrap_or("?"),
                        pod_state(pod)
                    )
                })
                .collect();
            Error::Connectivity(format!(
                "test pods not ready within {} s ({}); pass --image if the nodes lack Weft's image, or --start-timeout to wait longer",
                limit.as_secs(),
                waiting.join("; ")
            ))
        })
    }

    /// Every check, [`AT_ONCE`] at a time, rows in the checks' order; a
    /// failure carries what `trace` says about its pair.
    async fn run_checks(&self, checks: &[Check]) -> Vec<Row> {
        stream::iter(checks)
            .map(|check| self.run_check(check))
            .buffered(AT_ONCE)
            .collect()
            .await
    }

    /// Attempts `check` until it settles or its limit passes.
    async fn run_check(&self, check: &Check) -> Row {
        let started = Instant::now();
        let deadline = started + self.check_timeout;
        let mut attempts = 0;
        let (result, detail) = loop {
            attempts += 1;
            let request = ProbeRequest {
                host: check.host.clone(),
                port: check.port,
                transport: check.transport,
                // The last attempt ends with the check, give or take the
                // shortest attempt worth making.
                timeout: ATTEMPT_TIMEOUT
                    .min(deadline.saturating_duration_since(Instant::now()))
                    .max(SHORTEST_ATTEMPT),
            };
            let answer = self.ask(check, &request).await;
            match judge(&check.expect, &answer) {
                Verdict::Settled(outcome, detail) => break (outcome, detail),
                Verdict::Again(detail) if Instant::now() + RETRY_PAUSE >= deadline => {
                    let detail = format!(
                        "{detail} (after {attempts} attempts in {:.1} s)",
                        started.elapsed().as_secs_f64()
                    );
                    break (Outcome::Fail, detail);
                }
                Verdict::Again(_) => tokio::time::sleep(RETRY_PAUSE).await,
            }
        };
        let mut row = Row {
            check: check.kind.name().to_string(),
            protocol: check.transport.kubernetes_name().to_string(),
            family: check.family().to_string(),
            from: format!("{} ({})", check.from.pod, check.from.node),
            to: check.to.clone(),
            address: host_port(&check.host, check.port),
            result,
            millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            attempts,
            detail,
            trace_summary: None,
            trace: None,
        };
        if result == Outcome::Fail {
            self.explain(check, &mut row).await;
        }
        row
    }

    /// Asks the probe of the check's client, through the pod proxy, for
    /// one attempt.
    async fn ask(&self, check: &Check, request: &ProbeRequest) -> Result<ProbeResult, String> {
        let pod = &check.from.pod;
        let uri = format!(
            "/api/v1/namespaces/{}/pods/{pod}:{}/proxy/{}",
            self.namespace,
            check.from.role.control_port(),
            request.path()
        );
        let request_limit = request.timeout + PROXY_SLACK;
        let http = http::Request::get(&uri)
            .body(Vec::new())
            .map_err(|e| format!("building GET {uri}: {e}"))?;
        match tokio::time::timeout(request_limit, self.client.request::<ProbeResult>(http)).await {
            Err(_) => Err(format!(
                "the probe in {pod} did not answer through the pod proxy within {} s",
                request_limit.as_secs()
            )),
            Ok(Err(error)) => Err(format!(
                "asking the probe in {pod} through the pod proxy: {error}"
            )),
            Ok(Ok(result)) => Ok(result),
        }
    }

    /// Adds what `kubectl weft trace` says about a failed check's pair.
    async fn explain(&self, check: &Check, row: &mut Row) {
        let Some(ip) = check.trace_to else {
            return;
        };
        let protocol = match check.transport {
            Transport::Tcp => Protocol::Tcp,
            Transport::Udp => Protocol::Udp,
        };
        let request = TraceRequest {
            source: PodRef {
                namespace: self.namespace.clone(),
                name: check.from.pod.clone(),
            },
            destination: Target::Ip(ip),
            port: Some(PortSpec {
                port: check.port,
                protocol,
            }),
        };
        match crate::trace::trace(self.client, self.options, &request).await {
            Ok(trace) => {
                row.trace_summary = Some(summarize(&trace));
                row.trace = Some(trace);
            }
            Err(error) => row.trace_summary = Some(format!("could not trace: {error}")),
        }
    }

    /// Default-deny keeps a client out, an allow rule lets exactly the
    /// named client in, and with both gone the server is open again.
    async fn policy_checks(&self, placement: &Placement) -> Result<Vec<Row>> {
        let limit = self.options.request_timeout;
        let (server, admitted, other) = placement.policy_ends();
        let policies: Api<NetworkPolicy> = self.api();
        let post = PostParams::default();
        let mut rows = Vec::new();
        let check = |kind, client, expect| placement.policy_check(kind, server, client, expect);

        change(
            limit,
            "create networkpolicies",
            policies.create(&post, &objects::deny_policy(server)),
        )
        .await?;
        rows.push(
            self.run_check(&check(Kind::PolicyDeny, admitted, Expect::Blocked))
                .await,
        );
        change(
            limit,
            "create networkpolicies",
            policies.create(&post, &objects::allow_policy(server, admitted)),
        )
        .await?;
        rows.push(
            self.run_check(&check(
                Kind::PolicyAllow,
                admitted,
                Expect::Reach(Seen::Any),
            ))
            .await,
        );
        match other {
            Some(other) => rows.push(
                self.run_check(&check(
                    Kind::PolicyAllowOthersDenied,
                    other,
                    Expect::Blocked,
                ))
                .await,
            ),
            None => rows.push(skipped(
                Kind::PolicyAllowOthersDenied,
                "one node: no second client to keep out",
            )),
        }
        for name in [objects::DENY_POLICY, objects::ALLOW_POLICY] {
            change(
                limit,
                "delete networkpolicies",
                policies.delete(name, &DeleteParams::default()),
            )
            .await?;
        }
        let reopened = other.unwrap_or(admitted);
        rows.push(
            self.run_check(&check(
                Kind::PolicyRemoved,
                reopened,
                Expect::Reach(Seen::Any),
            ))
            .await,
        );
        Ok(rows)
    }
}

/// What one attempt means for its check.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Done: passed or failed for good.
    Settled(Outcome, String),
    /// Not yet; try again while the check's limit lasts.
    Again(String),
}

/// Judges one attempt's answer against what the check expects. A proxy
/// error is never the answer: the client was not asked.
fn judge(expect: &Expect, answer: &Result<ProbeResult, String>) -> Verdict {
    let result = match answer {
        Err(error) => return Verdict::Again(error.clone()),
        Ok(result) => result,
    };
    let failure = || {
        result
            .error
            .clone()
            .unwrap_or_else(|| "not connected".into())
    };
    let seen = result.seen.as_deref();
    let seen_ip: Option<IpAddr> = seen.and_then(|s| s.parse().ok());
    let listed = |ips: &[IpAddr]| {
        ips.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" or ")
    };
    let time = format!("{} ms", result.millis);
    match (expect, result.connected) {
        (Expect::Blocked, false) => {
            Verdict::Settled(Outcome::Pass, format!("blocked: {}", failure()))
        }
        (Expect::Blocked, true) => Verdict::Again(format!(
            "connected ({}) though the policy should block it",
            seen.unwrap_or("the far end said nothing")
        )),
        (Expect::Reach(_), false) => Verdict::Again(failure()),
        (Expect::Reach(Seen::Any), true) => Verdict::Settled(
            Outcome::Pass,
            match seen {
                Some(seen) => format!("seen as {seen}, {time}"),
                None => format!("connected, {time}"),
            },
        ),
        (Expect::Reach(Seen::OneOf(ips) | Seen::OneOfIfSaid(ips)), true)
            if seen_ip.is_some_and(|ip| ips.contains(&ip)) =>
        {
            Verdict::Settled(
                Outcome::Pass,
                format!("seen as {}, {time}", seen.unwrap_or("")),
            )
        }
        (Expect::Reach(Seen::OneOfIfSaid(_)), true) if seen_ip.is_none() => Verdict::Settled(
            Outcome::Pass,
            format!("connected (the far end did not say what it saw), {time}"),
        ),
        (Expect::Reach(Seen::OneOf(ips) | Seen::OneOfIfSaid(ips)), true) => Verdict::Settled(
            Outcome::Fail,
            format!(
                "connected, but seen as {}, not as {}",
                seen.unwrap_or("nothing (the server did not say)"),
                listed(ips)
            ),
        ),
    }
}

/// `kubectl weft trace` of a pair in one line: the verdict, the path and
/// the warnings.
fn summarize(trace: &Trace) -> String {
    let policy = if trace.allowed {
        "policy allows it".to_string()
    } else {
        let isolating: Vec<&str> = [&trace.policy.egress, &trace.policy.ingress]
            .into_iter()
            .flatten()
            .filter(|side| !side.allows)
            .flat_map(|side| side.isolating.iter().map(String::as_str))
            .collect();
        format!("policy denies it ({})", isolating.join(", "))
    };
    let path = if trace.path.leaves_cluster {
        "the address is outside every pod slice"
    } else if trace.path.same_node {
        "both ends on one node"
    } else if trace.path.complete {
        "path complete"
    } else {
        "path INCOMPLETE"
    };
    let mut summary = format!("{policy}; {path}");
    if !trace.warnings.is_empty() {
        summary.push_str("; ");
        summary.push_str(&trace.warnings.join("; "));
    }
    summary
}

fn host_port(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    }
}

/// A row for a check not run.
fn skipped(kind: Kind, why: &str) -> Row {
    Row {
        check: kind.name().to_string(),
        protocol: "TCP".into(),
        family: "-".into(),
        from: "-".into(),
        to: "-".into(),
        address: String::new(),
        result: Outcome::Skip,
        millis: 0,
        attempts: 0,
        detail: why.to_string(),
        trace_summary: None,
        trace: None,
    }
}

/// A failed row for a node the test could not place pods on.
fn not_ready_row(node: &Node) -> Row {
    let name = node.metadata.name.clone().unwrap_or_default();
    Row {
        check: "node-ready".into(),
        from: "-".into(),
        to: format!("node {name}"),
        result: Outcome::Fail,
        detail: format!("not Ready: no test pods placed on it (kubectl describe node {name})"),
        ..skipped(Kind::PodToNode, "")
    }
}

/// The image of the agent container of Weft's DaemonSet.
async fn weft_image(client: &Client, options: &StatusOptions) -> Result<String> {
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), &options.namespace);
    let daemon_set = within(
        options.request_timeout,
        "get the agent DaemonSet",
        daemon_sets.get_opt(AGENT_DAEMON_SET),
    )
    .await?;
    let containers = daemon_set
        .and_then(|d| d.spec)
        .and_then(|s| s.template.spec)
        .map(|s| s.containers)
        .unwrap_or_default();
    containers
        .iter()
        .find(|c| c.name == "agent")
        .or_else(|| containers.first())
        .and_then(|c| c.image.clone())
        .ok_or_else(|| {
            Error::Connectivity(format!(
                "no DaemonSet {}/{AGENT_DAEMON_SET} to take Weft's image from: pass -n with Weft's namespace, or --image",
                options.namespace
            ))
        })
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn pod_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    ready && !pod_ips(pod).is_empty()
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect()
}

/// Why a pod is not ready, in the kubelet's words where it gave some.
fn pod_state(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let waiting = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.waiting.as_ref());
    match waiting {
        Some(waiting) => format!(
            "{} {}",
            waiting.reason.as_deref().unwrap_or("waiting"),
            waiting.message.as_deref().unwrap_or("")
        )
        .trim()
        .to_string(),
        None => status
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "not started".into()),
    }
}

/// The nodes with their running test pods, in the order of their index.
fn sites(nodes: &[&Node], pods: &[Pod]) -> Result<Vec<Site>> {
    let mut members: BTreeMap<(usize, Role), Member> = BTreeMap::new();
    for pod in pods {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let role = labels.get(ROLE_LABEL).and_then(|r| Role::from_word(r));
        let index = labels.get(NODE_LABEL).and_then(|i| i.parse().ok());
        if let (Some(role), Some(index)) = (role, index) {
            let member = Member {
                pod: pod.metadata.name.clone().unwrap_or_default(),
                ips: pod_ips(pod),
            };
            members.insert((index, role), member);
        }
    }
    nodes
        .iter()
        .enumerate()
        .map(|(index, node)| {
            let name = node.metadata.name.clone().unwrap_or_default();
            let mut take = |role| {
                members.remove(&(index, role)).ok_or_else(|| {
                    Error::Connectivity(format!("the {} pod of node {name} is gone", role.word()))
                })
            };
            Ok(Site {
                client: take(Role::Client)?,
                server: take(Role::Server)?,
                host: take(Role::Host)?,
                addresses: node_addresses(node),
                node: name,
            })
        })
        .collect()
}

/// InternalIPs, then ExternalIPs, each once.
fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let listed = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default();
    let mut addresses: Vec<IpAddr> = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        for address in listed.iter().filter(|a| a.type_ == kind) {
            if let Ok(ip) = address.address.parse() {
                if !addresses.contains(&ip) {
                    addresses.push(ip);
                }
            }
        }
    }
    addresses
}

/// The Service's ClusterIPs and node port as the API server set them.
fn service_site(service: &Service) -> Result<ServiceSite> {
    let spec = service.spec.as_ref();
    let cluster_ips = spec
        .and_then(|s| s.cluster_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let node_port = spec
        .and_then(|s| s.ports.as_ref()?.first()?.node_port)
        .and_then(|port| u16::try_from(port).ok())
        .ok_or_else(|| {
            Error::Connectivity(format!(
                "Service {} got no node port: is the NodePort range exhausted?",
                objects::SERVICE
            ))
        })?;
    Ok(ServiceSite {
        cluster_ips,
        node_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(connected: bool, seen: Option<&str>) -> Result<ProbeResult, String> {
        Ok(ProbeResult {
            connected,
            address: Some("10.244.1.3:4241".into()),
            seen: seen.map(str::to_string),
            error: (!connected).then(|| "connect: timed out".to_string()),
            millis: 3,
        })
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn reach_passes_only_when_seen_as_expected() {
        let own = Expect::Reach(Seen::OneOf(ips(&["10.244.0.2"])));
        assert_eq!(
            judge(&own, &answer(true, Some("10.244.0.2"))),
            Verdict::Settled(Outcome::Pass, "seen as 10.244.0.2, 3 ms".into())
        );
        let Verdict::Settled(Outcome::Fail, why) = judge(&own, &answer(true, Some("192.168.0.1")))
        else {
            panic!("a rewritten source must fail at once");
        };
        assert!(
            why.contains("seen as 192.168.0.1, not as 10.244.0.2"),
            "{why}"
        );
        assert!(matches!(
            judge(&own, &answer(false, None)),
            Verdict::Again(_)
        ));
        assert!(matches!(
            judge(&own, &Err("proxy: 503".into())),
            Verdict::Again(e) if e == "proxy: 503"
        ));
    }

    #[test]
    fn an_outside_server_that_says_nothing_still_passes() {
        let node = Expect::Reach(Seen::OneOfIfSaid(ips(&["192.168.0.1"])));
        assert!(matches!(
            judge(&node, &answer(true, None)),
            Verdict::Settled(Outcome::Pass, why) if why.contains("did not say")
        ));
        assert!(matches!(
            judge(&node, &answer(true, Some("10.244.0.2"))),
            Verdict::Settled(Outcome::Fail, _)
        ));
    }

    #[test]
    fn blocked_passes_on_a_failed_attempt_and_waits_while_connected() {
        assert_eq!(
            judge(&Expect::Blocked, &answer(false, None)),
            Verdict::Settled(Outcome::Pass, "blocked: connect: timed out".into())
        );
        assert!(matches!(
            judge(&Expect::Blocked, &answer(true, Some("10.244.0.2"))),
            Verdict::Again(_)
        ));
        // The client not answering is no proof of a block.
        assert!(matches!(
            judge(&Expect::Blocked, &Err("no answer".into())),
            Verdict::Again(_)
        ));
    }

    #[test]
    fn the_command_line_takes_external_addresses_and_limits() {
        use clap::Parser;

        use crate::cli::{Cli, Command};
        let cli = Cli::try_parse_from([
            "kubectl-weft",
            "connectivity",
            "test",
            "--external",
            "192.0.2.1:9000",
            "--external",
            "[2001:db8::1]:9000",
            "--check-timeout",
            "5s",
            "-o",
            "json",
        ])
        .unwrap();
        let Command::Connectivity(args) = cli.command else {
            panic!("not connectivity: {:?}", cli.command);
        };
        let ConnectivityCommand::Test(test) = args.command;
        assert_eq!(test.external.len(), 2);
        assert_eq!(test.check_timeout, Duration::from_secs(5));
        assert_eq!(test.output, Output::Json);
        assert!(
            Cli::try_parse_from(["kubectl-weft", "connectivity", "test", "--external", "x"])
                .is_err()
        );
    }

    #[test]
    fn addresses_print_with_brackets_for_ipv6_and_names_stay_names() {
        assert_eq!(host_port("fd00::1", 80), "[fd00::1]:80");
        assert_eq!(host_port("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(host_port("echo.ns.svc", 80), "echo.ns.svc:80");
    }
}
