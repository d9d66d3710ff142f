//! The control plane: etcd and kube-apiserver on loopback with TLS, RBAC and
//! ServiceAccount tokens, their certificates, and kubeconfigs; for kubelet
//! nodes also kube-controller-manager and kube-scheduler.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use weft_testing::{printed_path, repository};

use crate::exec::tail;
use crate::process::ProcessHandle;
use crate::run::RunGuard;

/// How long the apiserver may take to report ready. Generous: a loaded CI
/// machine with two cores takes far longer than the usual few seconds.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Attempts at starting with fresh ports; another cluster starting at the
/// same moment may take a port between our probe and the server's bind.
const START_ATTEMPTS: usize = 3;

/// The ServiceAccount token issuer (and default audience), as in a cluster.
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The Service address range (`--service-cluster-ip-range`).
pub(crate) const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/12";

/// The IPv6 Service range of a dual-stack cluster, second in the flag, so
/// IPv4 stays the primary family (as in a kubeadm dual-stack cluster whose
/// `serviceSubnet` lists IPv4 first): Services without an `ipFamilyPolicy`,
/// the `kubernetes` and `kube-dns` ones among them, stay IPv4 only. A /112,
/// the size kubeadm's documentation shows.
pub const SERVICE_CLUSTER_IP_RANGE_V6: &str = "fd00:10:96::/112";

/// The `--service-cluster-ip-range` value: the IPv4 range, then with
/// `dual_stack` the IPv6 one.
fn service_cluster_ip_ranges(dual_stack: bool) -> String {
    match dual_stack {
        true => format!("{SERVICE_CLUSTER_IP_RANGE},{SERVICE_CLUSTER_IP_RANGE_V6}"),
        false => SERVICE_CLUSTER_IP_RANGE.to_owned(),
    }
}

/// The `kubernetes` Service's ClusterIP: the first address of the Service
/// range. Pods find the apiserver there (`KUBERNETES_SERVICE_HOST`), so the
/// serving certificate names it and kubelet nodes answer on it.
pub(crate) const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// The `kubernetes` Service's port (`KUBERNETES_SERVICE_PORT`).
pub(crate) const KUBERNETES_SERVICE_PORT: u16 = 443;

/// How long kube-controller-manager may take to create the `default`
/// ServiceAccount, the sign that its controllers run.
const CONTROLLERS_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the Kubernetes binaries are.
pub(crate) struct Binaries {
    kube_apiserver: PathBuf,
    etcd: PathBuf,
    /// kube-controller-manager, kube-scheduler, kubelet, kube-proxy and
    /// CoreDNS, for kubelet nodes.
    pub(crate) node_components: Option<NodeComponents>,
}

/// The binaries a cluster with kubelet nodes needs beyond the apiserver and etcd.
pub(crate) struct NodeComponents {
    kube_controller_manager: PathBuf,
    kube_scheduler: PathBuf,
    pub(crate) kubelet: PathBuf,
    pub(crate) kube_proxy: PathBuf,
    /// The cluster DNS server, packed into an image (see [`crate::dns`]).
    pub(crate) coredns: PathBuf,
}

impl Binaries {
    /// Finds kube-apiserver and etcd with [`k8s_binaries`]; with
    /// `kubelet_nodes`, also kube-controller-manager, kube-scheduler, kubelet,
    /// kube-proxy and coredns.
    pub(crate) async fn locate(kubelet_nodes: bool) -> Result<Self> {
        let mut components = vec!["kube-apiserver", "etcd"];
        if kubelet_nodes {
            components.extend([
                "kube-controller-manager",
                "kube-scheduler",
                "kubelet",
                "kube-proxy",
                "coredns",
            ]);
        }
        let dir = k8s_binaries(&components).await?;
        Ok(Self {
            kube_apiserver: dir.join("kube-apiserver"),
            etcd: dir.join("etcd"),
            node_components: kubelet_nodes.then(|| NodeComponents {
                kube_controller_manager: dir.join("kube-controller-manager"),
                kube_scheduler: dir.join("kube-scheduler"),
                kubelet: dir.join("kubelet"),
                kube_proxy: dir.join("kube-proxy"),
                coredns: dir.join("coredns"),
            }),
        })
    }
}

/// The directory with the Kubernetes binaries `components` (names from
/// `e2e/k8s/build.sh`): `$WEFT_E2E_K8S_BIN` if set, else the versioned cache
/// that the script fills, building the missing ones first (many minutes on a
/// cold cache; the script's progress goes to stderr).
pub(crate) async fn k8s_binaries(components: &[&str]) -> Result<PathBuf> {
    let dir = match std::env::var_os("WEFT_E2E_K8S_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let mut build = Command::new("bash");
            build
                .arg(repository().join("e2e/k8s/build.sh"))
                .args(components);
            // Minutes on a cold cache: off the async workers.
            tokio::task::spawn_blocking(move || printed_path(&mut build))
                .await
                .context("the e2e/k8s/build.sh task")??
        }
    };
    for component in components {
        let binary = dir.join(component);
        if !binary.is_file() {
            bail!(
                "{} is missing; set WEFT_E2E_K8S_BIN to a directory with {}, \
                 or unset it to build them with e2e/k8s/build.sh",
                binary.display(),
                components.join(", ")
            );
        }
    }
    Ok(dir)
}

/// Certificates and keys of one cluster, made with the `openssl` CLI.
pub(crate) struct Pki {
    pub(crate) ca_cert: PathBuf,
    ca_key: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    service_account_key: PathBuf,
    service_account_public_key: PathBuf,
    /// The apiserver's client certificate towards kubelets (exec, logs).
    kubelet_client_cert: PathBuf,
    kubelet_client_key: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    /// The next certificate serial number; unique per CA is all X.509 asks.
    next_serial: AtomicU32,
}

/// A client certificate and its key.
pub(crate) struct ClientCertificate {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

/// Extension sections for the three kinds of certificate. rustls (the kube
/// client's TLS) insists on correct ones: CA:FALSE and a SAN on the server
/// certificate, the right extended key usage on each leaf.
const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = weft-e2e
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, IP:10.96.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
";

impl Pki {
    fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("openssl.cnf");
        std::fs::write(&config, OPENSSL_CONFIG).context("writing openssl.cnf")?;
        let file = |name: &str| dir.join(name);
        let pki = Self {
            ca_cert: file("ca.crt"),
            ca_key: file("ca.key"),
            serving_cert: file("apiserver.crt"),
            serving_key: file("apiserver.key"),
            admin_cert: file("admin.crt"),
            admin_key: file("admin.key"),
            service_account_key: file("service-account.key"),
            service_account_public_key: file("service-account.pub"),
            kubelet_client_cert: file("apiserver-kubelet-client.crt"),
            kubelet_client_key: file("apiserver-kubelet-client.key"),
            dir: dir.to_owned(),
            config: config.clone(),
            next_serial: AtomicU32::new(2),
        };
        generate_key(&pki.ca_key)?;
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            path(&pki.ca_key),
            "-subj",
            "/CN=weft-e2e-ca",
            "-days",
            "3650",
            "-config",
            path(&config),
            "-extensions",
            "ca",
            "-out",
            path(&pki.ca_cert),
        ])?;
        pki.issue(
            &pki.serving_key,
            &pki.serving_cert,
            "/CN=kube-apiserver",
            "server",
        )?;
        // system:masters is bound to cluster-admin and bypasses RBAC, as kubeadm's admin.
        pki.issue(
            &pki.admin_key,
            &pki.admin_cert,
            "/O=system:masters/CN=weft-e2e-admin",
            "client",
        )?;
        // As kubeadm's apiserver-kubelet-client: kubelets ask the apiserver
        // (webhook authorization) whether this user may exec, read logs, ….
        pki.issue(
            &pki.kubelet_client_key,
            &pki.kubelet_client_cert,
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "client",
        )?;
        generate_key(&pki.service_account_key)?;
        openssl(&[
            "pkey",
            "-in",
            path(&pki.service_account_key),
            "-pubout",
            "-out",
            path(&pki.service_account_public_key),
        ])?;
        Ok(pki)
    }

    /// A client certificate for `subject` (e.g. `/O=system:nodes/CN=system:node:node-0`),
    /// written as `<name>.crt` and `<name>.key` beside the CA.
    pub(crate) fn issue_client(&self, name: &str, subject: &str) -> Result<ClientCertificate> {
        let issued = ClientCertificate {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
        };
        self.issue(&issued.key, &issued.cert, subject, "client")?;
        Ok(issued)
    }

    /// A key and a certificate signed by the CA with the extensions of
    /// `section`.
    fn issue(&self, key: &Path, cert: &Path, subject: &str, section: &str) -> Result<()> {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let config = self.config.as_path();
        generate_key(key)?;
        let request = cert.with_extension("csr");
        openssl(&[
            "req",
            "-new",
            "-key",
            path(key),
            "-subj",
            subject,
            "-config",
            path(config),
            "-out",
            path(&request),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            path(&request),
            "-CA",
            path(&self.ca_cert),
            "-CAkey",
            path(&self.ca_key),
            "-set_serial",
            &serial.to_string(),
            "-days",
            "3650",
            "-extfile",
            path(config),
            "-extensions",
            section,
            "-out",
            path(cert),
        ])
    }
}

/// An ECDSA P-256 key: generated in milliseconds, unlike RSA, and accepted by
/// the apiserver (serving, client and ServiceAccount signing) and rustls.
fn generate_key(key: &Path) -> Result<()> {
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        path(key),
    ])
}

fn openssl(args: &[&str]) -> Result<()> {
    weft_testing::run(Command::new("openssl").args(args))
        .context("running openssl (install it with `apt-get install openssl`)")?;
    Ok(())
}

fn path(p: &Path) -> &str {
    p.to_str().expect("run directory paths are UTF-8")
}

/// A free TCP port on loopback, as the kernel hands them out.
fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("probing for a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The user entry of a kubeconfig.
pub(crate) enum Credentials<'a> {
    /// A client certificate and its key.
    Certificate { cert: &'a Path, key: &'a Path },
    /// A bearer token (a ServiceAccount's).
    Token(&'a str),
}

/// Writes a kubeconfig for `server` with `credentials`. JSON is valid YAML,
/// so kubectl and kube-rs read it as they would any kubeconfig.
pub(crate) fn write_kubeconfig(
    file: &Path,
    server: SocketAddr,
    ca_cert: &Path,
    user_name: &str,
    credentials: Credentials<'_>,
) -> Result<()> {
    let user = match credentials {
        Credentials::Certificate { cert, key } => json!({
            "client-certificate": cert,
            "client-key": key,
        }),
        Credentials::Token(token) => json!({ "token": token }),
    };
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "weft-e2e", "cluster": {
            "server": format!("https://{server}"),
            "certificate-authority": ca_cert,
        }}],
        "users": [{ "name": user_name, "user": user }],
        "contexts": [{ "name": "weft-e2e", "context": { "cluster": "weft-e2e", "user": user_name }}],
        "current-context": "weft-e2e",
    });
    let text = serde_json::to_string_pretty(&config).context("encoding kubeconfig")?;
    std::fs::write(file, text).with_context(|| format!("writing {}", file.display()))
}

/// A kube client from a kubeconfig file.
pub(crate) async fn client_from_kubeconfig(file: &Path) -> Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(file)
        .with_context(|| format!("reading kubeconfig {}", file.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", file.display()))?;
    kube::Client::try_from(config).context("building a kube client")
}

/// A running etcd and kube-apiserver.
pub(crate) struct ControlPlane {
    /// The apiserver's loopback address (also its address inside every node).
    pub(crate) apiserver: SocketAddr,
    /// The admin kubeconfig.
    pub(crate) kubeconfig: PathBuf,
    pub(crate) pki: Pki,
    /// The Unix socket where the apiserver expects an HTTP CONNECT proxy for
    /// traffic to nodes (its egress selector's `cluster` connection).
    pub(crate) egress_socket: PathBuf,
    /// Whether Services get IPv6 ClusterIPs too.
    dual_stack: bool,
}

impl ControlPlane {
    /// Starts etcd and the apiserver in `run` and waits until the apiserver
    /// reports ready (RBAC bootstrap policy included).
    ///
    /// With `advertise`, the `kubernetes` Service gets that address (a
    /// node's, where the forwarder passes it on) as its endpoint, for
    /// kube-proxy to send pods to; without, it has no endpoints. With
    /// `dual_stack`, the Service range is dual-stack, IPv4 first.
    pub(crate) async fn start(
        run: &RunGuard,
        binaries: &Binaries,
        advertise: Option<Ipv4Addr>,
        dual_stack: bool,
    ) -> Result<Self> {
        let pki = Pki::create(&run.dir().join("pki"))?;
        let kubeconfig = run.dir().join("admin.kubeconfig");
        let mut last_error = None;
        for attempt in 1..=START_ATTEMPTS {
            let (etcd, kube_apiserver, apiserver) =
                launch(run, binaries, &pki, advertise, dual_stack)?;
            write_kubeconfig(
                &kubeconfig,
                apiserver,
                &pki.ca_cert,
                "admin",
                Credentials::Certificate {
                    cert: &pki.admin_cert,
                    key: &pki.admin_key,
                },
            )?;
            match wait_ready(&kubeconfig, &etcd, &kube_apiserver).await {
                Ok(()) => {
                    return Ok(Self {
                        apiserver,
                        kubeconfig,
                        pki,
                        egress_socket: egress_socket(run.dir()),
                        dual_stack,
                    })
                }
                Err(e) => {
                    for process in [&kube_apiserver, &etcd] {
                        process.kill()?;
                    }
                    let port_taken = [&kube_apiserver, &etcd]
                        .iter()
                        .any(|p| p.log().contains("address already in use"));
                    if !port_taken {
                        return Err(e);
                    }
                    tracing::warn!(
                        attempt,
                        "a control-plane port was taken meanwhile; retrying"
                    );
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// Starts kube-controller-manager and kube-scheduler as in a real control
    /// plane, on loopback beside the apiserver, and waits until the
    /// controllers run. Node CIDR allocation stays off: Weft's controller
    /// hands out the slices.
    pub(crate) async fn start_controllers(
        &self,
        run: &RunGuard,
        components: &NodeComponents,
    ) -> Result<()> {
        let file = |p: &Path| p.display().to_string();
        let kubeconfig_for = |name: &str, subject: &str| -> Result<PathBuf> {
            let certificate = self.pki.issue_client(name, subject)?;
            let kubeconfig = run.dir().join(format!("{name}.kubeconfig"));
            write_kubeconfig(
                &kubeconfig,
                self.apiserver,
                &self.pki.ca_cert,
                name,
                Credentials::Certificate {
                    cert: &certificate.cert,
                    key: &certificate.key,
                },
            )?;
            Ok(kubeconfig)
        };
        // The users the bootstrap RBAC policy binds the two components' roles to.
        let controller_manager = kubeconfig_for(
            "kube-controller-manager",
            "/CN=system:kube-controller-manager",
        )?;
        let scheduler = kubeconfig_for("kube-scheduler", "/CN=system:kube-scheduler")?;

        let mut command = Command::new(&components.kube_controller_manager);
        command
            .arg(format!("--kubeconfig={}", file(&controller_manager)))
            .arg(format!(
                "--authentication-kubeconfig={}",
                file(&controller_manager)
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                file(&controller_manager)
            ))
            // No metrics or health port: several clusters share the loopback.
            .arg("--secure-port=0")
            .arg("--leader-elect=false")
            .arg("--controllers=*,-nodeipam")
            .arg("--allocate-node-cidrs=false")
            .arg("--use-service-account-credentials=true")
            .arg(format!(
                "--service-account-private-key-file={}",
                file(&self.pki.service_account_key)
            ))
            // Published to every namespace as kube-root-ca.crt, which every
            // projected ServiceAccount token volume mounts.
            .arg(format!("--root-ca-file={}", file(&self.pki.ca_cert)))
            .arg(format!(
                "--service-cluster-ip-range={}",
                service_cluster_ip_ranges(self.dual_stack)
            ))
            .arg("--v=1");
        let controller_manager = run.spawn(None, "kube-controller-manager", command)?;

        let mut command = Command::new(&components.kube_scheduler);
        command
            .arg(format!("--kubeconfig={}", file(&scheduler)))
            .arg(format!("--authentication-kubeconfig={}", file(&scheduler)))
            .arg(format!("--authorization-kubeconfig={}", file(&scheduler)))
            .arg("--secure-port=0")
            .arg("--leader-elect=false")
            .arg("--v=1");
        let scheduler = run.spawn(None, "kube-scheduler", command)?;

        // The ServiceAccount controller creates `default` in every namespace;
        // pods cannot be created before it exists.
        let accounts: Api<ServiceAccount> =
            Api::namespaced(client_from_kubeconfig(&self.kubeconfig).await?, "default");
        let deadline = Instant::now() + CONTROLLERS_READY_TIMEOUT;
        loop {
            for process in [&controller_manager, &scheduler] {
                if !process.is_running() {
                    bail!(
                        "{} exited ({:?}); the end of {}:\n{}",
                        process.name(),
                        process.exit_status(),
                        process.log_path().display(),
                        tail(&process.log(), 30)
                    );
                }
            }
            if let Ok(Some(_)) = accounts.get_opt("default").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-controller-manager did not create the default ServiceAccount within {CONTROLLERS_READY_TIMEOUT:?}; see {}",
                    controller_manager.log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Where the apiserver's egress proxy socket is in a run directory.
fn egress_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("egress.sock")
}

/// The apiserver's egress selector configuration: traffic to nodes and pods
/// (`cluster`: kubelets for exec and logs) goes through an HTTP CONNECT proxy
/// on a Unix socket, which the harness serves from inside the underlay. The
/// apiserver's own namespace has no route to any node.
fn write_egress_selector_config(file: &Path, socket: &Path) -> Result<()> {
    let config = json!({
        "apiVersion": "apiserver.k8s.io/v1beta1",
        "kind": "EgressSelectorConfiguration",
        "egressSelections": [{
            "name": "cluster",
            "connection": {
                "proxyProtocol": "HTTPConnect",
                "transport": { "uds": { "udsName": socket } },
            },
        }],
    });
    let text = serde_json::to_string_pretty(&config)
        .context("encoding the egress selector configuration")?;
    std::fs::write(file, text).with_context(|| format!("writing {}", file.display()))
}

/// Starts etcd and the apiserver on fresh ports; returns them and the
/// apiserver's address.
/// A retry appends to the same log files.
fn launch(
    run: &RunGuard,
    binaries: &Binaries,
    pki: &Pki,
    advertise: Option<Ipv4Addr>,
    dual_stack: bool,
) -> Result<(ProcessHandle, ProcessHandle, SocketAddr)> {
    let etcd_client = free_port()?;
    let etcd_peer = free_port()?;
    let apiserver = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let data_dir = run.dir().join("etcd");
    // A failed attempt's data would only confuse the next one.
    let _ = std::fs::remove_dir_all(&data_dir);
    let client_url = format!("http://127.0.0.1:{etcd_client}");
    let peer_url = format!("http://127.0.0.1:{etcd_peer}");
    let mut etcd = Command::new(&binaries.etcd);
    etcd.arg("--name=weft-e2e")
        .arg(format!("--data-dir={}", data_dir.display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=weft-e2e={peer_url}"))
        // Throwaway data: durability only costs time here.
        .arg("--unsafe-no-fsync")
        .arg("--log-level=warn");
    let etcd = run.spawn(None, "etcd", etcd)?;

    let file = |p: &Path| p.display().to_string();
    let egress_config = run.dir().join("egress-selector.json");
    write_egress_selector_config(&egress_config, &egress_socket(run.dir()))?;
    let mut kube_apiserver = Command::new(&binaries.kube_apiserver);
    kube_apiserver
        .arg(format!("--etcd-servers={client_url}"))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={}", apiserver.port()))
        .args(match advertise {
            Some(address) => [
                format!("--advertise-address={address}"),
                "--endpoint-reconciler-type=lease".to_owned(),
            ],
            // The "kubernetes" Service's endpoints may not be loopback.
            None => [
                "--advertise-address=127.0.0.1".to_owned(),
                "--endpoint-reconciler-type=none".to_owned(),
            ],
        })
        .arg(format!("--cert-dir={}", run.dir().join("pki").display()))
        .arg(format!("--tls-cert-file={}", file(&pki.serving_cert)))
        .arg(format!("--tls-private-key-file={}", file(&pki.serving_key)))
        .arg(format!("--client-ca-file={}", file(&pki.ca_cert)))
        .arg("--authorization-mode=Node,RBAC")
        // On top of the default plugins, as in every kubeadm cluster: a
        // kubelet writes only its own Node and gets tokens only for pods
        // bound to it, which Weft's node write policy relies on.
        .arg("--enable-admission-plugins=NodeRestriction")
        .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
        .arg(format!(
            "--service-account-key-file={}",
            file(&pki.service_account_public_key)
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            file(&pki.service_account_key)
        ))
        .arg(format!(
            "--service-cluster-ip-range={}",
            service_cluster_ip_ranges(dual_stack)
        ))
        .arg(format!(
            "--kubelet-client-certificate={}",
            file(&pki.kubelet_client_cert)
        ))
        .arg(format!(
            "--kubelet-client-key={}",
            file(&pki.kubelet_client_key)
        ))
        // Kubelets are reached by their underlay address, through the egress proxy.
        .arg("--kubelet-preferred-address-types=InternalIP")
        .arg(format!(
            "--egress-selector-config-file={}",
            file(&egress_config)
        ))
        .arg("--allow-privileged=true")
        .arg("--profiling=false")
        .arg("--v=1");
    let kube_apiserver = run.spawn(None, "kube-apiserver", kube_apiserver)?;
    Ok((etcd, kube_apiserver, apiserver))
}

/// Polls `/readyz` until it answers `ok`, failing early if a process dies.
async fn wait_ready(
    kubeconfig: &Path,
    etcd: &ProcessHandle,
    kube_apiserver: &ProcessHandle,
) -> Result<()> {
    let client = client_from_kubeconfig(kubeconfig).await?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last;
    loop {
        for process in [etcd, kube_apiserver] {
            if !process.is_running() {
                bail!(
                    "{} exited ({:?}) before the apiserver was ready; the end of {}:\n{}",
                    process.name(),
                    process.exit_status(),
                    process.log_path().display(),
                    tail(&process.log(), 30)
                );
            }
        }
        let request = kube::core::Request::new("")
            .get("readyz", &Default::default())
            .context("building the /readyz request")?;
        match client.request_text(request).await {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            Ok(body) => last = body,
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            bail!(
                "the apiserver was not ready after {READY_TIMEOUT:?} (last answer: {last}); see {}",
                kube_apiserver.log_path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubernetes_service_address_is_the_first_of_the_range_and_certified() {
        let range: ipnet::Ipv4Net = SERVICE_CLUSTER_IP_RANGE.parse().unwrap();
        assert_eq!(range.hosts().next(), Some(KUBERNETES_SERVICE_IP));
        assert!(OPENSSL_CONFIG.contains(&format!("IP:{KUBERNETES_SERVICE_IP},")));
    }

    #[test]
    fn dual_stack_service_ranges_list_ipv4_first() {
        assert_eq!(service_cluster_ip_ranges(false), SERVICE_CLUSTER_IP_RANGE);
        let ranges = service_cluster_ip_ranges(true);
        let [v4, v6] = ranges.split(',').collect::<Vec<_>>()[..] else {
            panic!("two ranges expected: {ranges}");
        };
        assert!(v4.parse::<ipnet::Ipv4Net>().is_ok(), "{ranges}");
        // The apiserver refuses an IPv6 Service range wider than /108.
        assert!(
            v6.parse::<ipnet::Ipv6Net>().unwrap().prefix_len() >= 108,
            "{ranges}"
        );
    }
}
