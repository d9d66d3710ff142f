//! The cluster: a control plane, an underlay, nodes, and everything started on
//! them. Its [`RunGuard`] tears it all down on `stop`, on drop and on panic.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::ResourceExt;

use crate::control_plane::{
    client_from_kubeconfig, write_kubeconfig, Binaries, ControlPlane, Credentials,
    KUBERNETES_SERVICE_IP, KUBERNETES_SERVICE_PORT,
};
use crate::exec::netns_path;
use crate::forwarder::NodeForward;
use crate::images::{self, NodeImages};
use crate::kube_proxy::ProxyMode;
use crate::node::{self, ClusterNode, Outside, Segment};
use crate::process::ProcessHandle;
use crate::run::{cleanup, Run, RunGuard};
use crate::{cgroup, containerd, dns, kube_proxy, kubelet, machine, underlay};

/// First host number of node addresses on a segment (.1 is the router).
const FIRST_NODE_HOST: u32 = 10;
/// The outside namespace's host number on the main segment.
const OUTSIDE_HOST: u32 = 254;
/// ServiceAccount tokens outlive any test.
const TOKEN_LIFETIME_SECONDS: i64 = 24 * 3600;
/// Set to keep the run directory (logs, certificates, kubeconfigs) after
/// [`Cluster::stop`] too; a cluster dropped without `stop` always keeps it.
const KEEP_RUN_ENV: &str = "WEFT_E2E_KEEP_RUN";

/// What to bring up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Number of nodes.
    pub nodes: usize,
    /// How many of those (the last ones) sit on the routed segment, behind
    /// the router, instead of the main one.
    pub routed_nodes: usize,
    /// MTU of every underlay link.
    pub underlay_mtu: u32,
    /// Create Node objects (Ready, InternalIP = underlay address) as a
    /// kubelet would on registration. Must be false for
    /// [`NodeKind::Kubelet`], whose kubelets register themselves.
    pub register_nodes: bool,
    /// What a node is.
    pub node_kind: NodeKind,
    /// Image archives (OCI or docker, e.g. from `packaging/build-image.sh`)
    /// imported into every kubelet node's containerd, beside the harness's
    /// own [`crate::PAUSE_IMAGE`] and [`crate::BUSYBOX_IMAGE`].
    pub images: Vec<PathBuf>,
    /// The mode of kube-proxy on kubelet nodes.
    pub proxy_mode: ProxyMode,
    /// Spread kubelet nodes over this many zones, round robin: node `i`
    /// carries `topology.kubernetes.io/zone=zone-<i mod zones>`, as a cloud
    /// provider's nodes do (for topology-aware routing). 0: no zone labels.
    pub zones: usize,
    /// Dual-stack, IPv4 first, as a kubeadm dual-stack cluster: IPv6 on the
    /// underlay segments, the router, the outside namespace and every node
    /// (a second InternalIP; kubelets get `--node-ip=v4,v6`), an IPv6 Service
    /// range beside the IPv4 one (`--service-cluster-ip-range=v4,v6`),
    /// kube-proxy's `--cluster-cidr` with [`crate::CLUSTER_CIDR_V6`], and
    /// Weft installed with that as `clusterCidrV6` by
    /// [`crate::install_from_manifests`].
    pub dual_stack: bool,
    /// Taint the first kubelet node, the control-plane one,
    /// `node-role.kubernetes.io/control-plane:NoSchedule` as kubeadm does:
    /// only pods that tolerate it (Weft's, CoreDNS) run there, and
    /// kube-controller-manager's topology cache, which leaves control-plane
    /// nodes out, then agrees with where endpoints are. Off by default, so
    /// tests may place pods on every node.
    pub control_plane_taint: bool,
}

/// What a node of the cluster is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NodeKind {
    /// A network namespace; the harness writes its Node object (see
    /// [`ClusterSpec::register_nodes`]) and tests run processes on it.
    #[default]
    Namespace,
    /// A network namespace with its own mount, PID and UTS namespaces that
    /// runs containerd and a kubelet, which registers the Node and runs the
    /// pods scheduled to it. The control plane gains kube-controller-manager
    /// and kube-scheduler. The first node is labelled
    /// `node-role.kubernetes.io/control-plane`, where Weft's controller
    /// runs (tainted only with [`ClusterSpec::control_plane_taint`]). See
    /// [`crate::NodeMachine`].
    Kubelet,
}

impl Default for ClusterSpec {
    /// Three namespace nodes on one segment, MTU 1500, registered.
    fn default() -> Self {
        Self {
            nodes: 3,
            routed_nodes: 0,
            underlay_mtu: 1500,
            register_nodes: true,
            node_kind: NodeKind::Namespace,
            images: Vec::new(),
            proxy_mode: ProxyMode::default(),
            zones: 0,
            dual_stack: false,
            control_plane_taint: false,
        }
    }
}

impl ClusterSpec {
    /// `nodes` kubelet nodes on one segment with `images` imported into each,
    /// the rest as in [`ClusterSpec::default`].
    pub fn kubelet_nodes(nodes: usize, images: Vec<PathBuf>) -> Self {
        Self {
            nodes,
            register_nodes: false,
            node_kind: NodeKind::Kubelet,
            images,
            ..Self::default()
        }
    }

    /// The zone of the node with index `index` (`node-<index>`), if the
    /// spec has zones; see [`ClusterSpec::zones`].
    pub fn zone_of(&self, index: usize) -> Option<String> {
        (self.zones > 0).then(|| format!("zone-{}", index % self.zones))
    }

    fn validate(&self) -> Result<()> {
        if self.node_kind == NodeKind::Kubelet && self.register_nodes {
            bail!("ClusterSpec.register_nodes must be false with NodeKind::Kubelet: kubelets register their own Nodes");
        }
        if self.node_kind == NodeKind::Namespace && !self.images.is_empty() {
            bail!("ClusterSpec.images needs NodeKind::Kubelet: namespace nodes have no container runtime to import them into");
        }
        if let Some(missing) = self.images.iter().find(|archive| !archive.is_file()) {
            bail!(
                "ClusterSpec.images: {} is not a file; build it first (e.g. packaging/build-image.sh)",
                missing.display()
            );
        }
        if self.control_plane_taint && self.node_kind != NodeKind::Kubelet {
            bail!("ClusterSpec.control_plane_taint needs NodeKind::Kubelet: only kubelet nodes have a control-plane node to taint; set it to false");
        }
        if self.zones > 0 && self.node_kind != NodeKind::Kubelet {
            bail!("ClusterSpec.zones needs NodeKind::Kubelet: the kubelets label their Nodes with the zone; set zones to 0");
        }
        if self.routed_nodes > self.nodes {
            bail!(
                "ClusterSpec.routed_nodes ({}) exceeds ClusterSpec.nodes ({}); lower routed_nodes or raise nodes",
                self.routed_nodes,
                self.nodes
            );
        }
        // 1280 leaves room for a vxlan overlay; the kernel accepts up to 65535 on veth.
        if !(1280..=65535).contains(&self.underlay_mtu) {
            bail!(
                "ClusterSpec.underlay_mtu ({}) is out of range; use a value from 1280 to 65535",
                self.underlay_mtu
            );
        }
        let limit = (OUTSIDE_HOST - FIRST_NODE_HOST) as usize;
        if self.nodes - self.routed_nodes > limit || self.routed_nodes > limit {
            bail!("ClusterSpec.nodes: at most {limit} nodes fit on one underlay segment; use fewer nodes");
        }
        Ok(())
    }
}

/// A running cluster. Owns every process, namespace and file of its run.
///
/// Teardown (processes killed with their process groups, namespaces deleted)
/// happens on [`Cluster::stop`], or synchronously on drop, including while a
/// failing test unwinds or returns its error. `stop` also removes the run
/// directory; a drop without `stop` means something went wrong, so it keeps
/// the logs (etcd data removed) and prints where they are. `weft-e2e
/// cleanup` removes kept directories.
pub struct Cluster {
    run: RunGuard,
    control_plane: ControlPlane,
    spec: ClusterSpec,
    fabric: String,
    outside: Outside,
    nodes: Vec<ClusterNode>,
    node_forwards: HashMap<String, Vec<NodeForward>>,
    next_node: usize,
    next_host: HashMap<Segment, u32>,
    /// What kubelet nodes need: the kubelet binary and the images.
    kubelet_support: Option<KubeletSupport>,
}

/// What every kubelet node is started with.
struct KubeletSupport {
    kubelet: PathBuf,
    kube_proxy: PathBuf,
    images: NodeImages,
}

impl Cluster {
    /// Brings up a control plane and `spec.nodes` nodes. Builds the
    /// control-plane binaries first if the cache is cold (many minutes).
    /// Leftovers of crashed runs are cleaned up first.
    pub async fn start(spec: ClusterSpec) -> Result<Cluster> {
        spec.validate()?;
        if let Err(e) = cleanup(false) {
            tracing::warn!("cleaning up leftovers of earlier runs: {e:#}");
        }
        let binaries = Binaries::locate(spec.node_kind == NodeKind::Kubelet).await?;
        let mut run = RunGuard::new(Run::create()?)?;
        // With kubelet nodes, the `kubernetes` Service's endpoint is the
        // first node's address, whose forwarder passes it on (see `plumb_node`).
        let first_node_on_main = spec.nodes > spec.routed_nodes;
        let advertise = (spec.node_kind == NodeKind::Kubelet && first_node_on_main)
            .then(|| Segment::Main.addressing().host(FIRST_NODE_HOST));
        let control_plane =
            ControlPlane::start(&run, &binaries, advertise, spec.dual_stack).await?;
        run.start_forwarder(control_plane.apiserver)?;

        let (fabric, router, outside_netns) = {
            let state = run.run();
            (
                state.netns_name("fabric"),
                state.netns_name("router"),
                state.netns_name("outside"),
            )
        };
        let segments = Segment::ALL.map(Segment::addressing);
        underlay::create_fabric(&fabric, &segments, spec.underlay_mtu)?;
        underlay::create_router(
            &router,
            &fabric,
            &segments,
            spec.underlay_mtu,
            spec.dual_stack,
        )?;
        let main = Segment::Main.addressing();
        let outside = Outside {
            netns: outside_netns,
            address: main.with_prefix(main.host(OUTSIDE_HOST)),
            address_v6: spec
                .dual_stack
                .then(|| main.with_prefix_v6(main.host_v6(OUTSIDE_HOST))),
        };
        underlay::add_netns(&outside.netns)?;
        underlay::attach(
            &fabric,
            &main,
            "outside",
            &outside.netns,
            "eth0",
            &main.host_addresses(OUTSIDE_HOST, spec.dual_stack),
            spec.underlay_mtu,
        )?;
        underlay::default_route(&outside.netns, &main, spec.dual_stack)?;
        let kubelet_support = match &binaries.node_components {
            Some(components) => {
                control_plane.start_controllers(&run, components).await?;
                // Cluster DNS is an addon of the control plane, as with
                // `kubeadm init`; its pods wait for a network plugin.
                dns::install(&client_from_kubeconfig(&control_plane.kubeconfig).await?).await?;
                let images = images::build(&run.dir().join("images"), &components.coredns)?;
                Some(KubeletSupport {
                    kubelet: components.kubelet.clone(),
                    kube_proxy: components.kube_proxy.clone(),
                    images,
                })
            }
            None => None,
        };

        let mut cluster = Cluster {
            run,
            control_plane,
            spec: spec.clone(),
            fabric,
            outside,
            nodes: Vec::new(),
            node_forwards: HashMap::new(),
            next_node: 0,
            next_host: HashMap::new(),
            kubelet_support,
        };
        for index in 0..spec.nodes {
            let segment = if index < spec.nodes - spec.routed_nodes {
                Segment::Main
            } else {
                Segment::Routed
            };
            cluster.add_node(segment).await?;
        }
        if cluster.kubelet_support.is_some() {
            if let Some(first) = cluster.nodes.first() {
                mark_control_plane(&cluster.client().await?, &first.name).await?;
            }
        }
        // The apiserver's connections to kubelets and pods (exec, logs,
        // port-forward, the API proxy) leave from the first node, as from a
        // control-plane node of the pod network: it reaches every node, and
        // every pod once a pod network runs. Without nodes, from the router.
        let dial_from = match cluster.nodes.first() {
            Some(node) => node.netns.clone(),
            None => router,
        };
        cluster.run.forwarder()?.serve_egress(
            &cluster.control_plane.egress_socket,
            &netns_path(&dial_from).display().to_string(),
        )?;
        tracing::info!(run = %cluster.run_dir().display(), nodes = spec.nodes, "cluster up");
        Ok(cluster)
    }

    /// Brings up the control plane and an empty underlay, no nodes (for tests
    /// that create Node objects themselves).
    pub async fn start_control_plane_only() -> Result<Cluster> {
        Self::start(ClusterSpec {
            nodes: 0,
            ..ClusterSpec::default()
        })
        .await
    }

    /// The admin kubeconfig (client certificate in `system:masters`). It
    /// works in the root namespace and inside every node namespace.
    pub fn kubeconfig(&self) -> &Path {
        &self.control_plane.kubeconfig
    }

    /// The apiserver's address (loopback; the same inside node namespaces).
    pub fn apiserver_address(&self) -> SocketAddr {
        self.control_plane.apiserver
    }

    /// The cluster CA certificate (signs the serving and client certificates).
    pub fn ca_cert(&self) -> &Path {
        &self.control_plane.pki.ca_cert
    }

    /// An admin client.
    pub async fn client(&self) -> Result<kube::Client> {
        client_from_kubeconfig(self.kubeconfig()).await
    }

    /// A kubeconfig authenticating as ServiceAccount `namespace/name`, with a
    /// token from the TokenRequest API that is bound to no object. The
    /// account is created if missing; it has no permissions until you bind a
    /// role, as in a cluster. Works in the root namespace and inside every node.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        self.token_kubeconfig(namespace, name, None, name).await
    }

    /// A client authenticating as ServiceAccount `namespace/name`; see
    /// [`Cluster::service_account_kubeconfig`].
    pub async fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<kube::Client> {
        client_from_kubeconfig(&self.service_account_kubeconfig(namespace, name).await?).await
    }

    /// A client with the token the kubelet would mount into `pod`: its
    /// ServiceAccount's, bound to the pod, so the API server adds the pod's
    /// node (`authentication.kubernetes.io/node-name`) to the identity.
    pub async fn pod_token_client(&self, pod: &Pod) -> Result<kube::Client> {
        let namespace = pod.namespace().context("the pod has no namespace")?;
        let account = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned());
        let bound = BoundObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            name: Some(pod.name_any()),
            uid: pod.uid(),
        };
        let file = self
            .token_kubeconfig(&namespace, &account, Some(bound), &pod.name_any())
            .await?;
        client_from_kubeconfig(&file).await
    }

    /// Creates the account if missing, requests a token (bound to `bound`)
    /// and writes a kubeconfig with it, named after `label`.
    async fn token_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        bound: Option<BoundObjectReference>,
        label: &str,
    ) -> Result<PathBuf> {
        let client = self.client().await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, namespace);
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        match accounts.create(&PostParams::default(), &account).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("creating ServiceAccount {namespace}/{name}"))
            }
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(TOKEN_LIFETIME_SECONDS),
                bound_object_ref: bound,
            },
            ..Default::default()
        };
        let token = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{name}"))?
            .status
            .context("the TokenRequest came back without a status")?
            .token;
        let file = self
            .run_dir()
            .join(format!("serviceaccount-{namespace}-{label}.kubeconfig"));
        write_kubeconfig(
            &file,
            self.control_plane.apiserver,
            &self.control_plane.pki.ca_cert,
            &format!("system:serviceaccount:{namespace}:{name}"),
            Credentials::Token(&token),
        )?;
        Ok(file)
    }

    /// The nodes, in creation order.
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&ClusterNode> {
        self.nodes.iter().find(|node| node.name == name)
    }

    /// The namespace standing for "outside the cluster".
    pub fn outside(&self) -> &Outside {
        &self.outside
    }

    /// The run directory: logs (`<name>.log`), certificates, kubeconfigs.
    pub fn run_dir(&self) -> &Path {
        self.run.dir()
    }

    /// The run's id (part of every namespace name: `we2e-<id>-…`).
    pub fn run_id(&self) -> String {
        self.run.run().id().to_owned()
    }

    /// What the cluster was started with.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// Starts `command` inside `node`'s namespace (with `ip netns exec`; wrap
    /// it in `nsenter --net=<netns_path>` yourself if it needs cgroups).
    /// Output goes to `<run_dir>/<name>.log`. It is killed when the node is
    /// removed or the cluster torn down.
    pub fn spawn_on_node(
        &self,
        node: &ClusterNode,
        name: &str,
        command: Command,
    ) -> Result<ProcessHandle> {
        let mut wrapped = node.command(command.get_program());
        wrapped.args(command.get_args());
        copy_environment(&command, &mut wrapped);
        self.run.spawn(Some(&node.name), name, wrapped)
    }

    /// Starts `command` in the root namespace (e.g. the controller, talking
    /// to the loopback apiserver). Output goes to `<run_dir>/<name>.log`; it
    /// is killed at teardown.
    pub fn spawn_host(&self, name: &str, command: Command) -> Result<ProcessHandle> {
        self.run.spawn(None, name, command)
    }

    /// Starts `command` inside the outside namespace; see [`Cluster::spawn_host`].
    pub fn spawn_outside(&self, name: &str, command: Command) -> Result<ProcessHandle> {
        let mut wrapped = self.outside.command(command.get_program());
        wrapped.args(command.get_args());
        copy_environment(&command, &mut wrapped);
        self.run.spawn(None, name, wrapped)
    }

    /// Adds a node on `segment`: namespace, underlay link, apiserver
    /// forwarder and (if the spec says so) a Ready Node object; for
    /// [`NodeKind::Kubelet`], its containerd with the images imported and its
    /// kubelet, returning once the kubelet has registered the Node (not Ready
    /// until a network plugin is installed).
    pub async fn add_node(&mut self, segment: Segment) -> Result<&ClusterNode> {
        let addressing = segment.addressing();
        let host = *self.next_host.get(&segment).unwrap_or(&FIRST_NODE_HOST);
        if host >= OUTSIDE_HOST {
            bail!("segment {segment:?} is full; add the node on the other segment");
        }
        let index = self.next_node;
        let name = format!("node-{index}");
        let netns = self.run.run().netns_name(&name);
        let state_dir = self.run_dir().join("nodes").join(&name);
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let mut node = ClusterNode {
            name: name.clone(),
            netns: netns.clone(),
            underlay_address: addressing.with_prefix(addressing.host(host)),
            underlay_address_v6: self
                .spec
                .dual_stack
                .then(|| addressing.with_prefix_v6(addressing.host_v6(host))),
            segment,
            underlay_link: "eth0".into(),
            kubeconfig: self.control_plane.kubeconfig.clone(),
            state_dir,
            machine: None,
        };
        self.next_node += 1;
        self.next_host.insert(segment, host + 1);
        // The node's bridge port in the fabric namespace (15 characters at most).
        let port = format!("n{index}");
        let zone = self.spec.zone_of(index);
        // The first node is the control-plane one (see `mark_control_plane`).
        let tainted = self.spec.control_plane_taint && index == 0;
        let plumbed = self
            .plumb_node(&mut node, &port, zone.as_deref(), tainted)
            .await;
        if let Err(e) = plumbed {
            if let Err(undo) = self.dismantle_node(&node) {
                tracing::warn!("undoing the half-added node {name}: {undo:#}");
            }
            return Err(e).with_context(|| format!("adding node {name}"));
        }
        self.nodes.push(node);
        Ok(self.nodes.last().expect("just pushed"))
    }

    async fn plumb_node(
        &mut self,
        node: &mut ClusterNode,
        port: &str,
        zone: Option<&str>,
        control_plane_taint: bool,
    ) -> Result<()> {
        let addressing = node.segment.addressing();
        let node_addresses: Vec<ipnet::IpNet> = std::iter::once(node.underlay_address.into())
            .chain(node.underlay_address_v6.map(Into::into))
            .collect();
        underlay::add_netns(&node.netns)?;
        underlay::attach(
            &self.fabric,
            &addressing,
            port,
            &node.netns,
            &node.underlay_link,
            &node_addresses,
            self.spec.underlay_mtu,
        )?;
        underlay::default_route(&node.netns, &addressing, self.spec.dual_stack)?;
        // Nodes route pod traffic; a prepared Kubernetes node has this on.
        underlay::set_sysctl(&node.netns, "net.ipv4.ip_forward", "1")?;
        if self.spec.dual_stack {
            underlay::set_sysctl(&node.netns, "net.ipv6.conf.all.forwarding", "1")?;
        }
        let netns_path = node.netns_path().display().to_string();
        let forward = self.run.forwarder()?.forward_node(&netns_path)?;
        self.node_forwards
            .entry(node.name.clone())
            .or_default()
            .push(forward);
        if self.spec.register_nodes {
            node::register(&self.client().await?, node).await?;
        }
        if let Some(support) = &self.kubelet_support {
            // The apiserver on the node's own address, at its port: the first
            // node's is the `kubernetes` Service's endpoint, which kube-proxy
            // sends pods and hostNetwork clients to.
            let own = SocketAddr::new(
                node.underlay_ip().into(),
                self.control_plane.apiserver.port(),
            );
            // And on the Service address itself, until kube-proxy has its
            // rules in place (the node answers on it, as kube-proxy's IPVS
            // mode has Service addresses on a local device).
            let service = SocketAddrV4::new(KUBERNETES_SERVICE_IP, KUBERNETES_SERVICE_PORT);
            underlay::ip(&[
                "-n",
                &node.netns,
                "addr",
                "add",
                &format!("{KUBERNETES_SERVICE_IP}/32"),
                "dev",
                "lo",
            ])?;
            for address in [own, service.into()] {
                let forward = self
                    .run
                    .forwarder()?
                    .forward_node_at(&netns_path, address)?;
                self.node_forwards
                    .entry(node.name.clone())
                    .or_default()
                    .push(forward);
            }
            let machine = machine::start(
                &self.run,
                &node.name,
                &node.netns,
                &node.state_dir,
                &support.images.pause_binary,
            )
            .await?;
            node.machine = Some(machine.clone());
            containerd::start(&self.run, node, &machine).await?;
            for archive in support.images.archives.iter().chain(&self.spec.images) {
                containerd::import(&machine, archive)
                    .with_context(|| format!("on node {}", node.name))?;
            }
            kubelet::start(
                &self.run,
                &self.client().await?,
                node,
                &machine,
                &self.control_plane.pki,
                self.control_plane.apiserver,
                kubelet::KubeletSetup {
                    binary: &support.kubelet,
                    zone,
                    control_plane_taint,
                },
            )
            .await?;
            kube_proxy::start(
                &self.run,
                node,
                &machine,
                &self.control_plane.pki,
                self.control_plane.apiserver,
                &support.kube_proxy,
                self.spec.proxy_mode,
            )?;
        }
        Ok(())
    }

    /// Stops a node's processes and forwarders, deletes its pods' and its own
    /// namespaces, and removes its cgroups.
    fn dismantle_node(&mut self, node: &ClusterNode) -> Result<()> {
        self.run.kill_node_processes(&node.name)?;
        for forward in self.node_forwards.remove(&node.name).unwrap_or_default() {
            self.run.forwarder()?.stop_node(forward);
        }
        let pod_prefix = node.pod_netns_prefix();
        for netns in underlay::list_netns()? {
            if netns.starts_with(&pod_prefix) {
                underlay::delete_netns_with_processes(&netns)?;
            }
        }
        if underlay::list_netns()?.contains(&node.netns) {
            underlay::delete_netns_with_processes(&node.netns)?;
        }
        // A kubelet node's cgroup root is named after its network namespace;
        // it may exist even if the node failed before its machine was up.
        cgroup::remove_cgroup_roots(|name| name == node.netns)?;
        Ok(())
    }

    /// Removes a node: kills its processes, deletes its pods' and its own
    /// namespaces (for a kubelet node, every container goes with them) and
    /// its cgroups, and deletes its Node object (if there is one).
    pub async fn remove_node(&mut self, name: &str) -> Result<()> {
        let Some(position) = self.nodes.iter().position(|node| node.name == name) else {
            bail!("there is no node named {name}; see Cluster::nodes() for the names");
        };
        let node = self.nodes.remove(position);
        self.dismantle_node(&node)?;
        let nodes: Api<Node> = Api::all(self.client().await?);
        match nodes.delete(&node.name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting Node {}", node.name)),
        }
    }

    /// Tears everything down and reports what could not be undone.
    pub async fn stop(mut self) -> Result<()> {
        // Teardown blocks (it waits for processes to exit); keep it off the
        // caller's runtime, which may be single-threaded.
        tokio::task::spawn_blocking(move || {
            let keep_logs = std::env::var_os(KEEP_RUN_ENV).is_some();
            self.run.teardown(keep_logs)
        })
        .await
        .context("the teardown thread panicked")?
    }

    /// Marks the run as held by `weft-e2e up`, so `weft-e2e down` (see
    /// [`crate::stop_held_clusters`]) finds it.
    pub fn mark_held_by_cli(&self) -> Result<()> {
        self.run.run().mark_held_by_cli()
    }
}

/// The label of a control-plane node, where Weft's controller runs, and
/// the key of its taint.
pub(crate) const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";

/// Labels `node` a control-plane node, with the admin's credentials as
/// kubeadm does (NodeRestriction keeps a kubelet from setting a
/// `node-role.kubernetes.io` label on itself). Its kubelet registered it
/// with the control-plane taint if [`ClusterSpec::control_plane_taint`]
/// asks for it; without, it is like a kubeadm cluster whose taint was
/// removed: test pods run on every node.
async fn mark_control_plane(client: &kube::Client, node: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = serde_json::json!({ "metadata": { "labels": { CONTROL_PLANE_LABEL: "" } } });
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("labelling Node {node} {CONTROL_PLANE_LABEL}"))?;
    Ok(())
}

/// Carries the environment changes of `from` over to the wrapper command.
fn copy_environment(from: &Command, to: &mut Command) {
    for (key, value) in from.get_envs() {
        match value {
            Some(value) => to.env(key, value),
            None => to.env_remove(key),
        };
    }
    if let Some(dir) = from.get_current_dir() {
        to.current_dir(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_can_move_between_tasks() {
        fn assert_send<T: Send>(_: &T) {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Cluster>();
        // Only built, never polled: nothing starts.
        assert_send(&Cluster::start(ClusterSpec::default()));
    }

    #[test]
    fn bad_specs_name_the_field_to_fix() {
        let too_many_routed = ClusterSpec {
            nodes: 1,
            routed_nodes: 2,
            ..ClusterSpec::default()
        };
        let message = too_many_routed.validate().unwrap_err().to_string();
        assert!(message.contains("routed_nodes"), "{message}");
        let tiny_mtu = ClusterSpec {
            underlay_mtu: 500,
            ..ClusterSpec::default()
        };
        let message = tiny_mtu.validate().unwrap_err().to_string();
        assert!(message.contains("underlay_mtu"), "{message}");
        let registered_kubelets = ClusterSpec {
            node_kind: NodeKind::Kubelet,
            ..ClusterSpec::default()
        };
        let message = registered_kubelets.validate().unwrap_err().to_string();
        assert!(message.contains("register_nodes"), "{message}");
        let images_without_runtime = ClusterSpec {
            images: vec![PathBuf::from("/nonexistent.tar")],
            ..ClusterSpec::default()
        };
        let message = images_without_runtime.validate().unwrap_err().to_string();
        assert!(message.contains("ClusterSpec.images"), "{message}");
        assert!(ClusterSpec::default().validate().is_ok());
        assert!(ClusterSpec::kubelet_nodes(3, Vec::new()).validate().is_ok());
        let zoned_namespaces = ClusterSpec {
            zones: 2,
            ..ClusterSpec::default()
        };
        let message = zoned_namespaces.validate().unwrap_err().to_string();
        assert!(message.contains("ClusterSpec.zones"), "{message}");
        let tainted_namespaces = ClusterSpec {
            control_plane_taint: true,
            ..ClusterSpec::default()
        };
        let message = tainted_namespaces.validate().unwrap_err().to_string();
        assert!(message.contains("control_plane_taint"), "{message}");
    }

    #[test]
    fn zones_go_round_robin_over_the_nodes() {
        let spec = ClusterSpec {
            zones: 2,
            ..ClusterSpec::kubelet_nodes(3, Vec::new())
        };
        assert!(spec.validate().is_ok());
        let zones: Vec<_> = (0..3).map(|index| spec.zone_of(index)).collect();
        assert_eq!(
            zones,
            [
                Some("zone-0".into()),
                Some("zone-1".into()),
                Some("zone-0".into())
            ]
        );
        assert_eq!(ClusterSpec::default().zone_of(0), None);
    }
}
