//! Test support every Weft crate shares, below the e2e harness: the one
//! check whether a root-needing test may run ([`root_available`],
//! [`require_root!`]), network namespaces removed on drop ([`TestNetns`]),
//! running a program to completion ([`run`], [`printed_path`]), waiting on a
//! condition ([`wait_for`], [`eventually`]), and the figures benches report
//! ([`measure`]).
//!
//! It builds no Kubernetes client, so the core crate's and the plugin's tests
//! use it without one; clusters, kubectl and helm live in `weft-e2e`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

pub mod forge;
pub mod measure;

/// Whether a test that needs root (network namespaces, netlink in other
/// namespaces, the e2e harness) can run.
///
/// As root: `true`. Otherwise the test is skipped with a line on stderr
/// naming `what` it needs, unless `CI=true` or `WEFT_REQUIRE_ROOT=1` is
/// set: there a skip would hide that nothing ran, so this panics and the
/// test fails.
pub fn root_available(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let required = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("WEFT_REQUIRE_ROOT").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "this test needs root ({what}) and CI=true or WEFT_REQUIRE_ROOT=1 forbids skipping it: run the tests as root"
    );
    eprintln!("skipped: needs root ({what})");
    false
}

/// Returns `Ok(())` from the enclosing test when it cannot run without
/// root, through [`root_available`]; `what` names what it needs root for.
///
/// A test that returns `()` calls [`root_available`] itself.
#[macro_export]
macro_rules! require_root {
    ($what:expr) => {
        if !$crate::root_available($what) {
            return Ok(());
        }
    };
}

/// Runs `command` to completion and returns its stdout; fails naming the
/// command, its exit status and what it printed (stderr, and stdout too
/// where a tool reports there, as `helm lint` does) when it cannot start or
/// exits non-zero.
pub fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let printed = [stdout.trim(), stderr.trim()]
            .into_iter()
            .filter(|text| !text.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        bail!("{command:?} failed ({}): {printed}", output.status);
    }
    String::from_utf8(output.stdout).with_context(|| format!("{command:?} printed non-UTF-8"))
}

/// Runs a build script that prints the path of what it built (a binary, a
/// cache directory) as its last line of stdout, and returns that path once
/// it exists. Logs on stderr pass through to the test's output.
pub fn printed_path(command: &mut Command) -> Result<PathBuf> {
    let printed = run(command.stderr(std::process::Stdio::inherit()))?;
    let path = PathBuf::from(printed.lines().last().unwrap_or_default().trim());
    ensure!(
        path.exists(),
        "{command:?} printed {}, which does not exist",
        path.display()
    );
    Ok(path)
}

/// A network namespace made with `ip netns add wt-<pid>-<role>`, deleted on
/// drop, panics included.
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    /// Creates `wt-<pid>-<role>`, first removing a leftover of that name
    /// (a crashed earlier process with the same pid).
    ///
    /// # Panics
    /// When `ip netns add` cannot run or fails: the test cannot go on.
    pub fn create(role: &str) -> Self {
        let name = format!("wt-{}-{role}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        if let Err(error) = run(Command::new("ip").args(["netns", "add", &name])) {
            panic!("creating network namespace {name}: {error:#}");
        }
        Self { name }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path under `/var/run/netns`, as a runtime passes it.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// A command that runs `program` inside the namespace with
    /// `ip netns exec`, which also mounts a `/sys` of the namespace's own
    /// (so `/sys/class/net` lists its links).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs `args` inside the namespace to completion, whatever its exit
    /// status.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        let (program, rest) = args.split_first().context("an empty command")?;
        let mut command = self.command(program);
        command
            .args(rest)
            .output()
            .with_context(|| format!("running {args:?} in {}", self.name))
    }

    /// Runs `args` inside the namespace and returns its stdout; fails with
    /// its stderr when it exits non-zero.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let (program, rest) = args.split_first().context("an empty command")?;
        run(self.command(program).args(rest)).with_context(|| format!("in {}", self.name))
    }

    /// Runs `args` inside the namespace and parses its stdout as a JSON
    /// array (`ip -j …`, `bridge -j …`); no output is an empty array.
    pub fn json(&self, args: &[&str]) -> Result<Vec<serde_json::Value>> {
        let text = self.run(args)?;
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_str(&text).with_context(|| format!("parsing {args:?}: {text}"))
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// How long to sleep after the `attempt`th probe: short at first, so a
/// condition that is nearly true is seen at once, then every 250 ms.
fn pause(attempt: u32) -> Duration {
    Duration::from_millis(10u64 << attempt.min(5)).min(Duration::from_millis(250))
}

fn gave_up(what: &str, patience: Duration, last_error: Option<anyhow::Error>) -> anyhow::Error {
    match last_error {
        Some(error) => {
            anyhow::anyhow!("gave up waiting for {what} after {patience:?}; last error: {error:#}")
        }
        None => anyhow::anyhow!("gave up waiting for {what} after {patience:?}"),
    }
}

/// Polls `probe` until it yields a value or `patience` runs out. An error
/// from the probe counts as "not yet" (the thing probed may still be
/// starting) and is reported if time runs out.
pub fn wait_for<T>(
    patience: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + patience;
    let mut last_error = None;
    for attempt in 0.. {
        match probe() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last_error = Some(error),
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(pause(attempt));
    }
    Err(gave_up(what, patience, last_error))
}

/// [`wait_for`] for an async probe, sleeping on the tokio timer.
pub async fn eventually<T, F, Fut>(patience: Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + patience;
    let mut last_error = None;
    for attempt in 0.. {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last_error = Some(error),
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(pause(attempt)).await;
    }
    Err(gave_up(what, patience, last_error))
}

/// The workspace's root directory (where `Cargo.lock` is), for scripts and
/// fixtures.
pub fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("weft-testing sits in the workspace root")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_returns_stdout_and_names_a_failure() {
        assert_eq!(run(Command::new("echo").arg("hi")).unwrap(), "hi\n");
        let error =
            run(Command::new("sh").args(["-c", "echo found; echo oops >&2; exit 3"])).unwrap_err();
        let text = format!("{error:#}");
        assert!(
            text.contains("found") && text.contains("oops") && text.contains('3'),
            "{text}"
        );
    }

    #[test]
    fn wait_for_returns_the_value_and_reports_the_last_error() {
        let mut calls = 0;
        let value = wait_for(Duration::from_secs(5), "three calls", || {
            calls += 1;
            Ok((calls == 3).then_some(calls))
        })
        .unwrap();
        assert_eq!(value, 3);
        let error = wait_for::<()>(Duration::ZERO, "never", || bail!("still starting"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("never") && error.contains("still starting"),
            "{error}"
        );
    }

    #[test]
    fn the_repository_holds_the_workspace() {
        assert!(repository().join("Cargo.lock").is_file());
    }
}
