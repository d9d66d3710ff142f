//! The chart, its renders and what the components make of them. Needs the
//! helm binary, built from its Go module by `packaging/build-helm.sh` on the
//! first run (a few minutes), cached after.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use weft_agent::config::{AgentConfig, AgentSettings};
use weft_agent::install::render_conflist;
use weft_controller::{ControllerConfig, ControllerSettings};
use weft_daemon::config::Layer;
use weft_e2e::{build_helm, helm_command};
use weft_packaging::{chart_dir, plain_manifests, render_into, rendered_files, Rendered};

/// Where the image puts weft-agent; the plugin's default source is beside it.
const AGENT_BINARY: &str = "/usr/local/bin/weft-agent";

#[test]
fn plain_manifests_and_golden_files_are_the_charts_render() -> Result<()> {
    let helm = build_helm()?;
    let out = tempfile::tempdir()?;
    render_into(&helm, out.path())?;
    for file in rendered_files()? {
        let fresh = std::fs::read_to_string(out.path().join(&file))?;
        let committed = std::fs::read_to_string(weft_testing::repository().join(&file))
            .with_context(|| format!("reading {}", file.display()))?;
        if let Some((line, (want, have))) = fresh
            .lines()
            .zip(committed.lines())
            .enumerate()
            .find(|(_, (want, have))| want != have)
        {
            anyhow::bail!(
                "{} drifted from the chart at line {}:\n  chart renders: {want}\n  file has:      {have}\nrun packaging/render-manifests.sh and review the diff",
                file.display(),
                line + 1
            );
        }
        ensure!(
            fresh.lines().count() == committed.lines().count(),
            "{} drifted from the chart ({} lines rendered, {} in the file): run packaging/render-manifests.sh",
            file.display(),
            fresh.lines().count(),
            committed.lines().count()
        );
    }
    Ok(())
}

#[test]
fn chart_lints_clean_with_every_values_file() -> Result<()> {
    let helm = build_helm()?;
    let home = tempfile::tempdir()?;
    let values_files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("tests"))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|path| path.to_string_lossy().ends_with(".values.yaml"))
        .collect();
    ensure!(
        !values_files.is_empty(),
        "no charts/weft/tests/*.values.yaml"
    );
    lint(&helm, home.path(), None)?;
    for values in values_files {
        lint(&helm, home.path(), Some(&values))
            .with_context(|| format!("linting with {}", values.display()))?;
    }
    Ok(())
}

/// `helm lint --strict` on the chart, with `values` if given. helm prints
/// its findings on stdout and only a count on stderr, so a failure shows
/// both.
fn lint(helm: &Path, home: &Path, values: Option<&Path>) -> Result<()> {
    let mut lint = helm_command(helm, home);
    lint.args(["lint", "--strict"]).arg(chart_dir());
    if let Some(values) = values {
        lint.arg("--values").arg(values);
    }
    weft_testing::run(&mut lint)?;
    Ok(())
}

#[test]
fn bad_values_are_refused_naming_the_value() -> Result<()> {
    let helm = build_helm()?;
    let home = tempfile::tempdir()?;
    let cases = [
        ("agent.backend=udp", "/agent/backend"),
        ("agent.vni=16777216", "/agent/vni"),
        ("agent.mtu=576", "/agent/mtu"),
        ("agent.checksumOffload=maybe", "/agent/checksumOffload"),
        ("clusterCidr=fd00:10::/48", "/clusterCidr"),
        ("controller.sliceSizeV4=31", "/controller/sliceSizeV4"),
        ("agent.metricsAddress=9465", "/agent/metricsAddress"),
        // A misspelt switch would otherwise leave the feature at its default.
        ("networkPolicy.enabeld=false", "/networkPolicy"),
        ("nodeWritePolicy.enabled=no", "/nodeWritePolicy/enabled"),
        ("operatorRole.create=yes", "/operatorRole/create"),
    ];
    for (setting, field) in cases {
        let output = helm_command(&helm, home.path())
            .args(["template", "weft"])
            .arg(chart_dir())
            .args(["--set", setting])
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success() && stderr.contains(field),
            "--set {setting} should be refused naming {field}; helm said: {stderr}"
        );
    }
    Ok(())
}

/// The label (and taint key) of control-plane nodes.
const CONTROL_PLANE: &str = "node-role.kubernetes.io/control-plane";

/// The controller's pod spec in `rendered`.
fn controller_pod(rendered: &Rendered) -> Result<PodSpec> {
    let deployment: Deployment = rendered.object("weft-controller")?;
    pod_spec(deployment.spec.map(|s| s.template))
}

#[test]
fn the_controller_runs_on_control_plane_nodes_unless_told_otherwise() -> Result<()> {
    let spec = controller_pod(&Rendered::load(&plain_manifests())?)?;
    let selector = spec.node_selector.clone().unwrap_or_default();
    ensure!(
        selector.get(CONTROL_PLANE).map(String::as_str) == Some(""),
        "the controller does not select {CONTROL_PLANE}: {selector:?}"
    );
    ensure!(
        spec.tolerations.iter().flatten().any(|t| {
            t.key.as_deref() == Some(CONTROL_PLANE)
                && t.effect.as_deref() == Some("NoSchedule")
                && t.operator.as_deref() == Some("Exists")
        }),
        "the controller does not tolerate the {CONTROL_PLANE} NoSchedule taint: {:?}",
        spec.tolerations
    );

    // controlPlaneOnly=false leaves the rest of the selector as it is.
    let helm = build_helm()?;
    let home = tempfile::tempdir()?;
    let output = weft_testing::run(
        helm_command(&helm, home.path())
            .args(["template", "weft"])
            .arg(chart_dir())
            .args(["--set", "controller.controlPlaneOnly=false"]),
    )?;
    let file = home.path().join("anywhere.yaml");
    std::fs::write(&file, output)?;
    let spec = controller_pod(&Rendered::load(&file)?)?;
    let anywhere = spec.node_selector.unwrap_or_default();
    let mut expected = selector;
    expected.remove(CONTROL_PLANE);
    ensure!(
        anywhere == expected,
        "with controller.controlPlaneOnly=false the controller selects {anywhere:?}, not {expected:?}"
    );
    Ok(())
}

/// The config files each render hands the components, as the components
/// themselves read them.
struct Configs {
    rendered: Rendered,
    controller: ControllerConfig,
    agent: AgentConfig,
    conflist: String,
}

fn configs_of(file: &Path) -> Result<Configs> {
    let rendered = Rendered::load(file)?;
    let config_map: ConfigMap = rendered.object("weft-config")?;
    let data = config_map.data.context("weft-config has no data")?;
    let key = |name: &str| {
        data.get(name)
            .cloned()
            .with_context(|| format!("weft-config in {} has no {name}", file.display()))
    };
    let controller =
        ControllerSettings::from_yaml(Path::new("controller.yaml"), &key("controller.yaml")?)
            .context("controller.yaml as weft-controller parses it")?
            .resolve()
            .context("controller.yaml as weft-controller resolves it")?;
    let agent = AgentSettings::from_yaml(Path::new("agent.yaml"), &key("agent.yaml")?)
        .context("agent.yaml as weft-agent parses it")?
        .resolve(Path::new(AGENT_BINARY))
        .context("agent.yaml as weft-agent resolves it")?;
    Ok(Configs {
        rendered,
        controller,
        agent,
        conflist: key("10-weft.conflist")?,
    })
}

fn pod_spec(template: Option<k8s_openapi::api::core::v1::PodTemplateSpec>) -> Result<PodSpec> {
    template.and_then(|t| t.spec).context("no pod spec")
}

fn container<'a>(containers: &'a [Container], name: &str) -> Result<&'a Container> {
    containers
        .iter()
        .find(|c| c.name == name)
        .with_context(|| format!("no container {name}"))
}

/// The literal value of environment variable `name`, or the field path it
/// is taken from (downward API).
fn env_source(container: &Container, name: &str) -> Option<String> {
    let variable = container.env.iter().flatten().find(|e| e.name == name)?;
    variable.value.clone().or_else(|| {
        variable
            .value_from
            .as_ref()?
            .field_ref
            .as_ref()
            .map(|f| format!("fieldRef:{}", f.field_path))
    })
}

fn metrics_port(container: &Container) -> Option<i32> {
    container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .map(|p| p.container_port)
}

/// Host path of each volume mounted at `mount_path`, if it is a hostPath.
fn host_path_at(spec: &PodSpec, container: &Container, mount_path: &Path) -> Option<String> {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(&m.mount_path) == mount_path)?;
    spec.volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)?
        .host_path
        .as_ref()
        .map(|h| h.path.clone())
}

#[test]
fn every_render_configures_components_that_agree() -> Result<()> {
    for file in rendered_files()? {
        let Configs {
            rendered,
            controller,
            agent,
            conflist,
        } = configs_of(&weft_testing::repository().join(&file))
            .with_context(|| format!("in {}", file.display()))?;
        let check = |agrees: bool, what: &str| -> Result<()> {
            ensure!(agrees, "{}: {what}", file.display());
            Ok(())
        };

        // Both components slice and route the same cluster network.
        let mut controller_cidrs = vec![controller.v4.cluster()];
        controller_cidrs.extend(controller.v6.as_ref().map(|plan| plan.cluster()));
        check(
            controller_cidrs == agent.cluster_cidrs,
            "controller.yaml and agent.yaml name different cluster CIDRs",
        )?;
        check(
            controller.v4.slice_prefix() == agent.slice_size_v4
                && controller
                    .v6
                    .as_ref()
                    .is_none_or(|plan| plan.slice_prefix() == agent.slice_size_v6),
            "controller.yaml and agent.yaml name different slice sizes",
        )?;

        // The init container installs what the agent would write itself,
        // where the agent would write it.
        check(
            conflist == render_conflist(&agent.node_file),
            "10-weft.conflist differs from what weft-agent writes (weft_agent::install::render_conflist)",
        )?;
        let daemon_set: DaemonSet = rendered.object("weft-agent")?;
        let spec = pod_spec(daemon_set.spec.map(|s| s.template))?;
        check(
            spec.host_network == Some(true),
            "the agent is not on the host network",
        )?;
        let init = container(
            spec.init_containers.as_deref().unwrap_or_default(),
            "install-cni",
        )?;
        check(
            env_source(init, "PLUGIN_SOURCE").map(PathBuf::from)
                == Some(agent.cni_plugin_source.clone()),
            "install-cni copies another plugin binary than weft-agent installs",
        )?;
        for (variable, dir) in [
            ("CNI_BIN_DIR", &agent.cni_bin_dir),
            ("CNI_CONF_DIR", &agent.cni_conf_dir),
        ] {
            check(
                env_source(init, variable).map(PathBuf::from).as_ref() == Some(dir),
                &format!("install-cni's {variable} is not the agent's"),
            )?;
            check(
                host_path_at(&spec, init, dir).map(PathBuf::from).as_ref() == Some(dir),
                &format!(
                    "install-cni does not mount host {} at the same path",
                    dir.display()
                ),
            )?;
        }

        // The agent sees every host directory it writes at the host's path:
        // the conflist names the node file as the plugin on the host sees it.
        let agent_container = container(&spec.containers, "agent")?;
        let node_file_dir = agent
            .node_file
            .parent()
            .context("node file has no directory")?;
        for dir in [
            agent.cni_bin_dir.as_path(),
            agent.cni_conf_dir.as_path(),
            node_file_dir,
        ] {
            check(
                host_path_at(&spec, agent_container, dir)
                    .map(PathBuf::from)
                    .as_deref()
                    == Some(dir),
                &format!(
                    "the agent does not mount host {} at the same path",
                    dir.display()
                ),
            )?;
        }
        check(
            metrics_port(agent_container) == Some(i32::from(agent.metrics_address.port())),
            "the agent's probe port is not its metricsAddress port",
        )?;
        check(
            env_source(agent_container, "NODE_NAME").as_deref() == Some("fieldRef:spec.nodeName"),
            "NODE_NAME does not come from spec.nodeName",
        )?;

        // The controller's probes and Lease permissions follow its settings.
        let deployment: Deployment = rendered.object("weft-controller")?;
        let spec = pod_spec(deployment.spec.map(|s| s.template))?;
        let controller_container = container(&spec.containers, "controller")?;
        check(
            metrics_port(controller_container)
                == Some(i32::from(controller.metrics_address.port())),
            "the controller's probe port is not its metricsAddress port",
        )?;
        let lease_role: Role = rendered.object("weft-controller-leader-election")?;
        check(
            lease_role.metadata.namespace.as_deref() == Some(controller.lease_namespace.as_str()),
            "the leader-election Role is not in the Lease's namespace",
        )?;
        check(
            lease_role
                .rules
                .iter()
                .flatten()
                .filter_map(|rule| rule.resource_names.as_ref())
                .all(|names| names == std::slice::from_ref(&controller.lease_name)),
            "the leader-election Role names another Lease",
        )?;
    }
    Ok(())
}

/// The RBAC objects of a component's own `rbac.yaml` reduced to what grants
/// access: kind, namespace, name, rules, role reference and subjects.
fn grants(
    rendered: &Rendered,
    identities: &[(String, Option<String>, String)],
) -> Result<Vec<String>> {
    let mut grants = Vec::new();
    for (kind, namespace, name) in identities {
        let grant = match kind.as_str() {
            "ClusterRole" => {
                let role: ClusterRole = rendered.object(name)?;
                format!("{:?}", role.rules)
            }
            "Role" => {
                let role: Role = rendered.object(name)?;
                format!("{:?}", role.rules)
            }
            "ClusterRoleBinding" => {
                let binding: ClusterRoleBinding = rendered.object(name)?;
                format!("{:?} {:?}", binding.role_ref, binding.subjects)
            }
            "RoleBinding" => {
                let binding: RoleBinding = rendered.object(name)?;
                format!("{:?} {:?}", binding.role_ref, binding.subjects)
            }
            "ServiceAccount" => String::new(),
            other => anyhow::bail!("unexpected {other} {name} in an rbac.yaml"),
        };
        grants.push(format!("{kind} {namespace:?}/{name}: {grant}"));
    }
    Ok(grants)
}

#[test]
fn plain_manifests_grant_exactly_what_the_components_rbac_files_do() -> Result<()> {
    let manifests = Rendered::load(&plain_manifests())?;
    for component in ["controller", "agent"] {
        let file = weft_testing::repository().join(component).join("rbac.yaml");
        let own = Rendered::load(&file)?;
        let identities = own.identities();
        let prefix = format!("weft-{component}");
        let chart_identities: Vec<_> = manifests
            .identities()
            .into_iter()
            .filter(|(kind, _, name)| {
                name.starts_with(&prefix)
                    && matches!(
                        kind.as_str(),
                        "ServiceAccount"
                            | "ClusterRole"
                            | "ClusterRoleBinding"
                            | "Role"
                            | "RoleBinding"
                    )
            })
            .collect();
        let mut sorted_own = identities.clone();
        sorted_own.sort();
        let mut sorted_chart = chart_identities.clone();
        sorted_chart.sort();
        ensure!(
            sorted_own == sorted_chart,
            "{}: RBAC objects differ from the chart's:\n  {}: {sorted_own:?}\n  chart: {sorted_chart:?}",
            component,
            file.display()
        );
        let want = grants(&own, &identities)?;
        let have = grants(&manifests, &identities)?;
        for (want, have) in want.iter().zip(&have) {
            ensure!(
                want == have,
                "charts/weft grants differently from {}:\n  file:  {want}\n  chart: {have}",
                file.display()
            );
        }
    }
    Ok(())
}
