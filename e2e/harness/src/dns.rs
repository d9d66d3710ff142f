//! Cluster DNS for clusters with kubelet nodes: CoreDNS in kube-system,
//! deployed the way `kubeadm init` deploys it (ServiceAccount, ClusterRole
//! and binding `system:coredns`, ConfigMap `coredns`, Deployment `coredns`,
//! Service `kube-dns` at [`CLUSTER_DNS_IP`]), from the image the harness
//! builds offline ([`crate::images::COREDNS_IMAGE`]).
//!
//! Two differences from kubeadm, both because the test machine has no
//! internet: the Corefile has no `forward` (and no `loop`, which only guards
//! forwarding), so CoreDNS answers the cluster's zones and nothing else; and
//! the image is never pulled. Like every pod on the pod network, CoreDNS
//! stays Pending until a network plugin makes the nodes Ready.

use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::images::COREDNS_IMAGE;
use crate::install::pod_is_ready;

/// The `kube-dns` Service's ClusterIP, which the kubelets hand to pods as
/// their nameserver (`clusterDNS`): the tenth address of the Service range,
/// as kubeadm picks it.
pub(crate) const CLUSTER_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// The cluster's DNS domain: the kubelets' `clusterDomain` and the zone
/// CoreDNS serves Services and pods under.
pub(crate) const CLUSTER_DOMAIN: &str = "cluster.local";

/// Where CoreDNS runs.
const NAMESPACE: &str = "kube-system";

/// The label of the CoreDNS pods and the `kube-dns` Service's selector; the
/// name is kube-dns's, which tools and network policies still look for.
const APP_LABEL: &str = "kube-dns";

/// CoreDNS pods, as kubeadm runs them: two, preferably on different nodes.
const REPLICAS: i32 = 2;

/// The server-side apply field manager of the objects made here.
const FIELD_MANAGER: &str = "weft-e2e";

/// kubeadm's Corefile without `forward`, `loop` and the kubernetes plugin's
/// `fallthrough` (there is nothing after it to fall through to), so a name
/// outside the cluster's zones gets SERVFAIL at once; and with `log`: every
/// query in `kubectl logs`, for a test that fails on a name.
fn corefile() -> String {
    format!(
        "\
.:53 {{
    errors
    log
    health {{
        lameduck 5s
    }}
    ready
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        ttl 30
    }}
    prometheus :9153
    cache 30
    reload
    loadbalance
}}
"
    )
}

/// Creates CoreDNS's objects (server-side apply, so a second call changes
/// nothing). Returns without waiting for the pods: they cannot start before
/// a network plugin is installed.
pub(crate) async fn install(client: &kube::Client) -> Result<()> {
    apply(
        &Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE),
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": { "name": "coredns", "namespace": NAMESPACE },
        }),
    )
    .await?;
    // What the kubernetes plugin watches to answer for Services and pods.
    apply(
        &Api::<ClusterRole>::all(client.clone()),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {
                "name": "system:coredns",
                "labels": { "kubernetes.io/bootstrapping": "rbac-defaults" },
            },
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        }),
    )
    .await?;
    apply(
        &Api::<ClusterRoleBinding>::all(client.clone()),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {
                "name": "system:coredns",
                "labels": { "kubernetes.io/bootstrapping": "rbac-defaults" },
            },
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:coredns",
            },
            "subjects": [{ "kind": "ServiceAccount", "name": "coredns", "namespace": NAMESPACE }],
        }),
    )
    .await?;
    apply(
        &Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE),
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": "coredns", "namespace": NAMESPACE },
            "data": { "Corefile": corefile() },
        }),
    )
    .await?;
    apply(
        &Api::<Deployment>::namespaced(client.clone(), NAMESPACE),
        deployment(),
    )
    .await?;
    apply(
        &Api::<Service>::namespaced(client.clone(), NAMESPACE),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "kube-dns",
                "namespace": NAMESPACE,
                "labels": {
                    "k8s-app": APP_LABEL,
                    "kubernetes.io/cluster-service": "true",
                    "kubernetes.io/name": "CoreDNS",
                },
                "annotations": {
                    "prometheus.io/port": "9153",
                    "prometheus.io/scrape": "true",
                },
            },
            "spec": {
                "clusterIP": CLUSTER_DNS_IP.to_string(),
                "selector": { "k8s-app": APP_LABEL },
                "ports": [
                    { "name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP" },
                    { "name": "dns-tcp", "port": 53, "targetPort": 53, "protocol": "TCP" },
                    { "name": "metrics", "port": 9153, "targetPort": 9153, "protocol": "TCP" },
                ],
            },
        }),
    )
    .await
}

/// The `coredns` Deployment, as kubeadm's: critical priority, tolerating
/// control-plane nodes and `CriticalAddonsOnly`, spread over nodes if it
/// can be, probed on `ready` (:8181) and `health` (:8080), all capabilities
/// dropped but the one that binds port 53, and the node's resolver rather
/// than itself (`dnsPolicy: Default`).
fn deployment() -> serde_json::Value {
    let labels = json!({ "k8s-app": APP_LABEL });
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "coredns", "namespace": NAMESPACE, "labels": labels },
        "spec": {
            "replicas": REPLICAS,
            "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 1 } },
            "selector": { "matchLabels": labels },
            "template": {
                "metadata": { "labels": labels },
                "spec": {
                    "priorityClassName": "system-cluster-critical",
                    "serviceAccountName": "coredns",
                    "affinity": { "podAntiAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [{
                            "weight": 100,
                            "podAffinityTerm": {
                                "labelSelector": { "matchLabels": labels },
                                "topologyKey": "kubernetes.io/hostname",
                            },
                        }],
                    }},
                    "tolerations": [
                        { "key": "CriticalAddonsOnly", "operator": "Exists" },
                        { "key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule" },
                    ],
                    "nodeSelector": { "kubernetes.io/os": "linux" },
                    "dnsPolicy": "Default",
                    "containers": [{
                        "name": "coredns",
                        "image": COREDNS_IMAGE,
                        // Imported on every node; there is no registry to pull from.
                        "imagePullPolicy": "Never",
                        "args": ["-conf", "/etc/coredns/Corefile"],
                        "resources": {
                            "limits": { "memory": "170Mi" },
                            "requests": { "cpu": "100m", "memory": "70Mi" },
                        },
                        "volumeMounts": [{
                            "name": "config-volume",
                            "mountPath": "/etc/coredns",
                            "readOnly": true,
                        }],
                        "ports": [
                            { "name": "dns", "containerPort": 53, "protocol": "UDP" },
                            { "name": "dns-tcp", "containerPort": 53, "protocol": "TCP" },
                            { "name": "metrics", "containerPort": 9153, "protocol": "TCP" },
                        ],
                        "livenessProbe": {
                            "httpGet": { "path": "/health", "port": 8080, "scheme": "HTTP" },
                            "initialDelaySeconds": 60,
                            "timeoutSeconds": 5,
                            "successThreshold": 1,
                            "failureThreshold": 5,
                        },
                        "readinessProbe": {
                            "httpGet": { "path": "/ready", "port": 8181, "scheme": "HTTP" },
                        },
                        // As root (see COREDNS_IMAGE), with only the capability to bind port 53.
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "capabilities": { "add": ["NET_BIND_SERVICE"], "drop": ["ALL"] },
                            "readOnlyRootFilesystem": true,
                        },
                    }],
                    "volumes": [{
                        "name": "config-volume",
                        "configMap": {
                            "name": "coredns",
                            "items": [{ "key": "Corefile", "path": "Corefile" }],
                        },
                    }],
                },
            },
        },
    })
}

/// Server-side applies `object` through `api`.
async fn apply<K>(api: &Api<K>, object: serde_json::Value) -> Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let metadata = &object["metadata"];
    let name = metadata["name"]
        .as_str()
        .context("a CoreDNS object without a name")?;
    let shown = match metadata["namespace"].as_str() {
        Some(namespace) => format!("{} {namespace}/{name}", K::kind(&())),
        None => format!("{} {name}", K::kind(&())),
    };
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&object),
    )
    .await
    .with_context(|| format!("applying CoreDNS's {shown}"))?;
    Ok(())
}

/// Waits until every replica of the cluster's CoreDNS is Ready: it starts
/// only once the pod network is up, so tests that resolve names wait here.
pub async fn wait_until_dns_ready(client: &kube::Client, patience: Duration) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let selector = ListParams::default().labels("k8s-app=kube-dns");
    let replicas = Api::<Deployment>::namespaced(client.clone(), "kube-system")
        .get("coredns")
        .await
        .context("the harness's CoreDNS Deployment")?
        .spec
        .and_then(|spec| spec.replicas)
        .context("the CoreDNS Deployment has no replica count")?;
    let replicas = usize::try_from(replicas).context("the CoreDNS replica count")?;
    weft_testing::eventually(patience, "every CoreDNS pod Ready", || async {
        let list = pods.list(&selector).await?;
        let ready = list.items.iter().filter(|pod| pod_is_ready(pod)).count();
        Ok((ready == replicas).then_some(()))
    })
    .await
}

/// The addresses busybox `nslookup` found for the name asked: those after
/// the first `Name:` line (the server's own address comes before it).
pub fn nslookup_addresses(output: &str) -> Vec<IpAddr> {
    output
        .lines()
        .skip_while(|line| !line.starts_with("Name:"))
        .filter_map(|line| line.strip_prefix("Address:"))
        .filter_map(|address| address.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dns_address_is_in_the_service_range_and_not_the_apiservers() {
        let range: ipnet::Ipv4Net = crate::control_plane::SERVICE_CLUSTER_IP_RANGE
            .parse()
            .unwrap();
        assert!(range.contains(&CLUSTER_DNS_IP));
        assert_ne!(CLUSTER_DNS_IP, crate::control_plane::KUBERNETES_SERVICE_IP);
    }

    #[test]
    fn the_corefile_serves_the_cluster_zones_and_forwards_nowhere() {
        let corefile = corefile();
        assert!(corefile.contains("kubernetes cluster.local in-addr.arpa ip6.arpa {"));
        assert!(!corefile.contains("forward"));
        // Every directive must be compiled into e2e/k8s/coredns/main.go.
        let compiled = include_str!("../../k8s/coredns/main.go");
        for line in corefile.lines().skip(1) {
            let Some(directive) = line.split_whitespace().next() else {
                continue;
            };
            if directive == "}" || line.starts_with("        ") {
                continue;
            }
            assert!(
                compiled.contains(&format!("\"{directive}\",")),
                "{directive} is not among the directives of e2e/k8s/coredns/main.go"
            );
        }
    }

    #[test]
    fn the_image_is_tagged_with_the_coredns_version_built() {
        let go_mod = include_str!("../../k8s/coredns/go.mod");
        let version = go_mod
            .lines()
            .find_map(|line| line.strip_prefix("require github.com/coredns/coredns "))
            .expect("e2e/k8s/coredns/go.mod requires github.com/coredns/coredns");
        assert!(
            COREDNS_IMAGE.ends_with(&format!(":{}", version.trim())),
            "{COREDNS_IMAGE} is not tagged {version}"
        );
    }

    #[test]
    fn the_deployment_reads_as_one() {
        let deployment: Deployment = serde_json::from_value(deployment()).unwrap();
        let spec = deployment.spec.unwrap();
        assert_eq!(spec.replicas, Some(REPLICAS));
        let containers = spec.template.spec.unwrap().containers;
        assert_eq!(containers[0].image.as_deref(), Some(COREDNS_IMAGE));
    }
}
