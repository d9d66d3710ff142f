//! Test support shared by every Weft crate's tests: the one decision
//! whether a test that needs root may run ([`root_available`]), and a
//! named network namespace that is removed on drop ([`TestNetns`]).
//!
//! Kept apart from the e2e harness so the core crate's unit tests can use
//! it without building a Kubernetes client.

use std::process::Command;

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

/// A network namespace made with `ip netns add wt-<pid>-<role>`, deleted
/// on drop, panics included.
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    /// Creates `wt-<pid>-<role>`.
    ///
    /// # Panics
    /// When `ip netns add` cannot run or fails: the test cannot go on.
    pub fn create(role: &str) -> Self {
        let name = format!("wt-{}-{role}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("running ip netns add");
        assert!(status.success(), "ip netns add {name} failed");
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
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
