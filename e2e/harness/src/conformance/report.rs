//! What a run of the upstream suite gives: the selection files it ran
//! with, the outcome of each test from the suite's JUnit report, and the
//! Markdown page written from both.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// One entry of a selection file (`focus.txt`, `skip.txt`): a Ginkgo
/// regular expression and the reason it is there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    /// Matched against a test's full name.
    pub pattern: String,
    /// Why the entry is there (the comment lines above it).
    pub reason: String,
}

/// Parses a selection file: `#` comment lines give the reason of the
/// patterns that follow them, until a blank line; every pattern needs one.
pub fn parse_selectors(text: &str) -> Result<Vec<Selector>> {
    let mut selectors = Vec::new();
    let mut reason: Vec<&str> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            reason.clear();
        } else if let Some(comment) = line.strip_prefix('#') {
            reason.push(comment.trim());
        } else if reason.is_empty() {
            bail!(
                "line {}: pattern {line:?} has no reason; put a `# why` line above it",
                number + 1
            );
        } else {
            selectors.push(Selector {
                pattern: line.to_owned(),
                reason: reason.join(" "),
            });
        }
    }
    Ok(selectors)
}

/// How a test ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It passed.
    Passed,
    /// It failed, panicked, timed out or was interrupted.
    Failed,
    /// It skipped itself while running (the suite's own check that it does
    /// not apply, e.g. a provider or node count it needs).
    Skipped,
}

/// One test the suite selected.
#[derive(Clone, Debug, PartialEq)]
pub struct TestResult {
    /// The full Ginkgo name, `[sig-network] …`.
    pub name: String,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it ran.
    pub duration: Duration,
    /// For a failure, the failure's text; for a skip, the reason.
    pub detail: String,
}

#[derive(Deserialize)]
struct JUnitSuites {
    #[serde(rename = "testsuite", default)]
    suites: Vec<JUnitSuite>,
}

#[derive(Deserialize)]
struct JUnitSuite {
    #[serde(rename = "testcase", default)]
    cases: Vec<JUnitCase>,
}

#[derive(Deserialize)]
struct JUnitCase {
    #[serde(rename = "@name")]
    name: String,
    #[serde(rename = "@status")]
    status: String,
    #[serde(rename = "@time", default)]
    time: f64,
    failure: Option<JUnitText>,
    error: Option<JUnitText>,
    skipped: Option<JUnitSkipped>,
}

#[derive(Deserialize)]
struct JUnitText {
    #[serde(rename = "@message", default)]
    message: String,
    #[serde(rename = "$text", default)]
    text: String,
}

#[derive(Deserialize)]
struct JUnitSkipped {
    #[serde(rename = "@message", default)]
    message: String,
}

/// The tests of a Ginkgo JUnit report that the focus and skip selected,
/// in report order. Ginkgo lists every spec of the binary; those left out
/// by the selection carry the bare skip message `skipped`, and the suite's
/// own `[ReportBeforeSuite]`-style nodes have no `[It]`.
pub fn parse_junit(xml: &str) -> Result<Vec<TestResult>> {
    let report: JUnitSuites = quick_xml::de::from_str(xml).context("parsing the JUnit report")?;
    let mut tests = Vec::new();
    for case in report.suites.into_iter().flat_map(|suite| suite.cases) {
        let Some(name) = case.name.strip_prefix("[It] ") else {
            continue;
        };
        let (outcome, detail) = match case.status.as_str() {
            "passed" => (Outcome::Passed, String::new()),
            "skipped" | "pending" => {
                let message = case.skipped.map(|s| s.message).unwrap_or_default();
                match message.strip_prefix("skipped - ") {
                    Some(reason) => (Outcome::Skipped, reason.trim().to_owned()),
                    None => continue,
                }
            }
            _ => {
                let text = case.failure.or(case.error).map(|f| {
                    if f.text.trim().is_empty() {
                        f.message
                    } else {
                        f.text
                    }
                });
                (
                    Outcome::Failed,
                    text.unwrap_or(case.status).trim().to_owned(),
                )
            }
        };
        tests.push(TestResult {
            name: name.to_owned(),
            outcome,
            duration: Duration::from_secs_f64(case.time.max(0.0)),
            detail,
        });
    }
    Ok(tests)
}

/// What the Markdown page says about where and how the tests ran.
pub struct RunFacts {
    /// When the run started (UTC, as `date` prints it).
    pub date: String,
    /// The Kubernetes version of the suite and the cluster.
    pub kubernetes: String,
    /// The machine: CPU, cores, memory, kernel.
    pub machine: String,
    /// The cluster the tests ran against.
    pub cluster: String,
    /// What ran the tests: the Ginkgo CLI, how many at once.
    pub runner: String,
    /// The whole run: builds, cluster, install, tests, teardown.
    pub duration: Duration,
    /// The tests alone (the e2e.test process).
    pub suite_duration: Duration,
}

/// The Markdown page of a run: the facts, a pass/fail table, the failures
/// with their text, and the selection with its reasons.
pub fn markdown(
    facts: &RunFacts,
    tests: &[TestResult],
    focus: &[Selector],
    skip: &[Selector],
) -> String {
    let count = |outcome| tests.iter().filter(|t| t.outcome == outcome).count();
    let mut page = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(page, "# Upstream network e2e tests against Weft\n");
    let _ = writeln!(
        page,
        "Written by `make conformance` (`weft-e2e conformance`); do not edit by hand.\n"
    );
    let _ = writeln!(page, "- Date: {}", facts.date);
    let _ = writeln!(
        page,
        "- Kubernetes: {} (suite and cluster)",
        facts.kubernetes
    );
    let _ = writeln!(page, "- Machine: {}", facts.machine);
    let _ = writeln!(page, "- Cluster: {}", facts.cluster);
    let _ = writeln!(page, "- Runner: {}", facts.runner);
    let _ = writeln!(
        page,
        "- Duration: {} in all, {} of it the tests",
        minutes(facts.duration),
        minutes(facts.suite_duration)
    );
    let _ = writeln!(
        page,
        "- Result: **{} passed, {} failed, {} skipped by the suite** of {} selected\n",
        count(Outcome::Passed),
        count(Outcome::Failed),
        count(Outcome::Skipped),
        tests.len()
    );
    let _ = writeln!(page, "| Test | Result | Time (s) |\n| --- | --- | ---: |");
    // By name, so a group's tests sit together and runs compare line by
    // line (parallel processes finish them in no set order).
    let mut by_name: Vec<&TestResult> = tests.iter().collect();
    by_name.sort_by(|a, b| a.name.cmp(&b.name));
    for test in by_name {
        let result = match test.outcome {
            Outcome::Passed => "pass",
            Outcome::Failed => "**FAIL**",
            Outcome::Skipped => "skipped",
        };
        let _ = writeln!(
            page,
            "| {} | {result} | {:.0} |",
            table_cell(&test.name),
            test.duration.as_secs_f64()
        );
    }
    let failures: Vec<&TestResult> = tests
        .iter()
        .filter(|t| t.outcome == Outcome::Failed)
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(page, "\n## Failures");
        for test in failures {
            let _ = writeln!(
                page,
                "\n### {}\n\n```text\n{}\n```",
                test.name,
                excerpt(&test.detail)
            );
        }
    }
    let skipped: Vec<&TestResult> = tests
        .iter()
        .filter(|t| t.outcome == Outcome::Skipped)
        .collect();
    if !skipped.is_empty() {
        let _ = writeln!(
            page,
            "\n## Skipped by the suite itself\n\n| Test | Reason |\n| --- | --- |"
        );
        for test in skipped {
            let _ = writeln!(
                page,
                "| {} | {} |",
                table_cell(&test.name),
                table_cell(&test.detail)
            );
        }
    }
    for (title, selectors) in [
        ("Focus (`e2e/conformance/focus.txt`)", focus),
        ("Excluded (`e2e/conformance/skip.txt`)", skip),
    ] {
        let _ = writeln!(page, "\n## {title}\n\n| Pattern | Reason |\n| --- | --- |");
        for selector in selectors {
            let _ = writeln!(
                page,
                "| `{}` | {} |",
                selector.pattern.replace('|', "\\|"),
                table_cell(&selector.reason)
            );
        }
    }
    page
}

/// `12.3 min`.
fn minutes(duration: Duration) -> String {
    format!("{:.1} min", duration.as_secs_f64() / 60.0)
}

/// Text made safe for one cell of a Markdown table.
fn table_cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// The start of a failure's text: enough to see what failed and where.
fn excerpt(text: &str) -> String {
    const LINES: usize = 12;
    let lines: Vec<&str> = text.lines().collect();
    let mut shown = lines[..lines.len().min(LINES)].join("\n");
    if lines.len() > LINES {
        let _ = write!(
            shown,
            "\n… ({} more lines in the JUnit report)",
            lines.len() - LINES
        );
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    const JUNIT: &str = include_str!("../../tests/fixtures/junit_01.xml");

    #[test]
    fn selection_files_need_a_reason_for_every_pattern() {
        let selectors =
            parse_selectors("# Why one\n# and more.\nfirst\nsecond\n\n# Why two\nthird\n").unwrap();
        assert_eq!(selectors.len(), 3);
        assert_eq!(selectors[1].pattern, "second");
        assert_eq!(selectors[1].reason, "Why one and more.");
        assert_eq!(selectors[2].reason, "Why two");
        let error = parse_selectors("# Why\nfirst\n\nlonely\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("line 4") && error.contains("lonely"),
            "{error}"
        );
    }

    #[test]
    fn junit_gives_the_selected_tests_and_leaves_out_the_others() {
        let tests = parse_junit(JUNIT).unwrap();
        let names: Vec<&str> = tests.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "[sig-network] HostPort validates that there is no conflict between pods with same hostPort but different hostIP and protocol [LinuxOnly] [Conformance]",
                "[sig-network] Networking Granular Checks: Pods should function for intra-pod communication: udp [NodeConformance] [Conformance]",
                "[sig-network] DNS should provide DNS for the cluster [Provider:GCE]",
            ]
        );
        assert_eq!(tests[0].outcome, Outcome::Passed);
        assert_eq!(tests[0].duration, Duration::from_secs_f64(12.5));
        assert_eq!(tests[1].outcome, Outcome::Failed);
        assert!(
            tests[1]
                .detail
                .starts_with("[FAILED] failed to reach 10.244.1.5 & co"),
            "{}",
            tests[1].detail
        );
        assert_eq!(tests[2].outcome, Outcome::Skipped);
        assert_eq!(
            tests[2].detail,
            "Only supported for providers [gce gke] (not local)"
        );
    }

    #[test]
    fn the_page_has_the_table_the_failures_and_the_reasons() {
        let tests = parse_junit(JUNIT).unwrap();
        let facts = RunFacts {
            date: "Wed Dec  2 08:00:00 UTC 2026".into(),
            kubernetes: "v1.33.13".into(),
            machine: "2 cores".into(),
            cluster: "3 kubelet nodes".into(),
            runner: "Ginkgo Version 2.21.0, 3 processes".into(),
            duration: Duration::from_secs(600),
            suite_duration: Duration::from_secs(300),
        };
        let skip = [Selector {
            pattern: r"a|b".into(),
            reason: "no internet".into(),
        }];
        let page = markdown(&facts, &tests, &[], &skip);
        assert!(
            page.contains("**1 passed, 1 failed, 1 skipped by the suite** of 3 selected"),
            "{page}"
        );
        assert!(page.contains("| **FAIL** | 30 |"), "{page}");
        assert!(
            page.contains("- Runner: Ginkgo Version 2.21.0, 3 processes"),
            "{page}"
        );
        // Sorted by name: DNS, then HostPort, then Networking.
        let dns = page.find("| [sig-network] DNS").unwrap();
        let host_port = page.find("| [sig-network] HostPort").unwrap();
        let networking = page.find("| [sig-network] Networking").unwrap();
        assert!(dns < host_port && host_port < networking, "{page}");
        assert!(
            page.contains("### [sig-network] Networking Granular Checks"),
            "{page}"
        );
        assert!(page.contains("| `a\\|b` | no internet |"), "{page}");
        assert!(
            page.contains("- Duration: 10.0 min in all, 5.0 min of it the tests"),
            "{page}"
        );
    }
}
