//! kube-router's network policy controller, the policy benchmarks' peer:
//! one process per node inside the node's namespace, with only its
//! firewall, built from its Go module by `e2e/kube-router/build.sh`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use weft_e2e::{ClusterNode, ProcessHandle};
use weft_testing::{printed_path, run};

use crate::testbed::Overlay;

/// kube-router on some nodes of the bench's cluster.
pub struct KubeRouter {
    running: Vec<(ClusterNode, ProcessHandle)>,
}

/// Builds (or finds in the cache) the kube-router binary.
fn binary() -> Result<PathBuf> {
    let script = weft_testing::repository().join("e2e/kube-router/build.sh");
    printed_path(&mut Command::new(script)).context("building kube-router")
}

impl KubeRouter {
    /// kube-router on every node.
    pub async fn start(overlay: &Overlay) -> Result<Self> {
        Self::start_on(overlay, overlay.cluster.nodes()).await
    }

    /// kube-router on `nodes`, with the cluster's admin credentials.
    pub async fn start_on(overlay: &Overlay, nodes: &[ClusterNode]) -> Result<Self> {
        let binary = binary()?;
        let mut running = Vec::new();
        for node in nodes {
            let mut command = Command::new(&binary);
            command
                .args([
                    "--run-firewall=true",
                    "--run-router=false",
                    "--run-service-proxy=false",
                    "--service-cluster-ip-range=10.96.0.0/12",
                    "--iptables-sync-period=5m",
                    "--metrics-port=0",
                    "--health-port=0",
                    "--v=1",
                ])
                // It takes NODE_NAME before --hostname-override.
                .env("NODE_NAME", &node.name)
                .arg(format!(
                    "--kubeconfig={}",
                    overlay.cluster.kubeconfig().display()
                ))
                .arg(format!("--hostname-override={}", node.name));
            let process = overlay.cluster.spawn_on_node(
                node,
                &format!("kube-router-{}", node.name),
                command,
            )?;
            running.push((node.clone(), process));
        }
        Ok(KubeRouter { running })
    }

    /// The process id of the `index`th kube-router.
    pub fn pid(&self, index: usize) -> u32 {
        self.running[index].1.pid()
    }

    /// Every kube-router's log.
    pub fn logs(&self) -> String {
        self.running
            .iter()
            .map(|(_, process)| format!("--- {}\n{}", process.name(), process.log()))
            .collect()
    }

    /// Waits until the first kube-router runs `pods` of its node's pods
    /// through a policy: every local pod has a `KUBE-POD-FW-` chain, and
    /// those a policy selects jump from it to the policy's chain.
    pub async fn wait_isolated(&self, pods: usize, deadline: Instant) -> Result<()> {
        let (node, _) = &self.running[0];
        loop {
            let rules = run(node.command("iptables-save").args(["-t", "filter"]))?;
            let chains = rules
                .lines()
                .filter(|line| line.contains("run through nw policy"))
                .filter_map(|line| line.split_whitespace().nth(1))
                .filter(|chain| chain.starts_with("KUBE-POD-FW-"))
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            if chains >= pods {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "kube-router made {chains} of {pods} pod chains"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every kube-router and removes its rules and sets, which it
    /// leaves behind when it exits. (v2.1.0's `--cleanup-config` removes
    /// none of them and goes on to load ip_vs, a module for the whole
    /// machine.)
    pub fn stop(self) -> Result<()> {
        for (node, process) in self.running {
            process.kill()?;
            let rules = run(node.command("iptables-save").args(["-t", "filter"]))?;
            let kept: String = rules
                .lines()
                .filter(|line| !KUBE_ROUTER_CHAINS.iter().any(|chain| line.contains(chain)))
                .map(|line| format!("{line}\n"))
                .collect();
            let mut restore = node.command("iptables-restore");
            restore.args(["-T", "filter"]);
            feed(restore, &kept)
                .with_context(|| format!("removing kube-router's rules on {}", node.name))?;
            // Sets go once no rule refers to them, in one batch.
            let destroy: String = run(node.command("ipset").args(["list", "-n"]))?
                .lines()
                .filter(|set| {
                    KUBE_ROUTER_SETS
                        .iter()
                        .any(|prefix| set.starts_with(prefix))
                })
                .map(|set| format!("destroy {set}\n"))
                .collect();
            let mut restore = node.command("ipset");
            restore.arg("restore");
            feed(restore, &destroy)
                .with_context(|| format!("removing kube-router's sets on {}", node.name))?;
        }
        Ok(())
    }
}

/// Parts of the names of kube-router's filter chains.
const KUBE_ROUTER_CHAINS: [&str; 3] = ["KUBE-ROUTER-", "KUBE-NWPLCY-", "KUBE-POD-FW-"];

/// Prefixes of its ipsets' names.
const KUBE_ROUTER_SETS: [&str; 3] = ["KUBE-SRC-", "KUBE-DST-", "TMP-"];

/// Runs `command` with `input` on its stdin and checks its exit.
fn feed(mut command: Command, input: &str) -> Result<()> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let done = child.wait_with_output()?;
    ensure!(
        done.status.success(),
        "{:?}: {}",
        command.get_program(),
        String::from_utf8_lossy(&done.stderr)
    );
    Ok(())
}
