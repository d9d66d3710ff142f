//! What `connectivity test` prints: a row per check with its result and
//! time, then each failure with what `kubectl weft trace` says about the
//! pair; `-o json` prints [`Report`] as it is.

use std::fmt::Write;

use serde::Serialize;

use crate::trace::Trace;

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// As expected.
    Pass,
    /// Not as expected.
    Fail,
    /// Not run, with the reason in the detail.
    Skip,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        }
    }
}

/// One check's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    /// The check, e.g. `pod-to-pod`.
    pub check: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// `IPv4`, `IPv6`, or `DNS` for a name.
    pub family: String,
    /// The client: `pod (node)`.
    pub from: String,
    /// The destination in words, e.g. `server-1 (node-b)`.
    pub to: String,
    /// What was connected to, `host:port`.
    pub address: String,
    /// How it ended.
    pub result: Outcome,
    /// From the first attempt until it settled, in milliseconds.
    pub millis: u64,
    /// Attempts made (a check retries until it settles or its limit passes).
    pub attempts: u32,
    /// What the last attempt found, e.g. what the far end saw.
    pub detail: String,
    /// For a failure: `kubectl weft trace` of the pair in one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_summary: Option<String>,
    /// For a failure: the whole trace, when it could look.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<Trace>,
}

impl Row {
    fn title(&self) -> String {
        format!("{} {}/{}", self.check, self.protocol, self.family)
    }
}

/// Everything one run found.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The namespace the run made (and removed).
    pub namespace: String,
    /// The image the pods ran.
    pub image: String,
    /// The nodes, in the order of their pods' index.
    pub nodes: Vec<String>,
    /// Namespaces of earlier runs removed first.
    pub removed_leftovers: Vec<String>,
    /// Until every test pod was ready, in seconds.
    pub setup_seconds: f64,
    /// The whole run, cleanup included, in seconds.
    pub seconds: f64,
    /// Checks that passed.
    pub passed: usize,
    /// Checks that failed.
    pub failed: usize,
    /// Checks skipped.
    pub skipped: usize,
    /// Every check, in the order run.
    pub rows: Vec<Row>,
}

impl Report {
    /// Counts the rows' outcomes into the totals.
    pub fn count(&mut self) {
        let count = |outcome| self.rows.iter().filter(|r| r.result == outcome).count();
        (self.passed, self.failed, self.skipped) = (
            count(Outcome::Pass),
            count(Outcome::Fail),
            count(Outcome::Skip),
        );
    }

    /// 0 when no check failed, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.failed > 0)
    }

    /// The report for a terminal.
    pub fn table(&self) -> String {
        let header = ["CHECK", "FROM", "TO", "RESULT", "TIME", "DETAIL"].map(String::from);
        let cells: Vec<[String; 6]> = std::iter::once(header)
            .chain(self.rows.iter().map(|row| {
                [
                    row.title(),
                    row.from.clone(),
                    format!("{} {}", row.to, row.address),
                    row.result.word().to_string(),
                    format!("{:.2}s", row.millis as f64 / 1000.0),
                    row.detail.clone(),
                ]
            }))
            .collect();
        let mut widths = [0usize; 6];
        for line in &cells {
            for (width, cell) in widths.iter_mut().zip(line) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in &cells {
            let padded: Vec<String> = line
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            let _ = writeln!(out, "{}", padded.join("  ").trim_end());
        }
        let _ = writeln!(
            out,
            "\n{} passed, {} failed, {} skipped on {} node{} in {:.1}s (pods ready after {:.1}s); namespace {} removed",
            self.passed,
            self.failed,
            self.skipped,
            self.nodes.len(),
            if self.nodes.len() == 1 { "" } else { "s" },
            self.seconds,
            self.setup_seconds,
            self.namespace
        );
        let failures: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.result == Outcome::Fail)
            .collect();
        if !failures.is_empty() {
            let _ = writeln!(out, "\nFailures ({}):", failures.len());
        }
        for row in failures {
            let _ = writeln!(
                out,
                "- {}: {} -> {} {}: {}",
                row.title(),
                row.from,
                row.to,
                row.address,
                row.detail
            );
            if let Some(summary) = &row.trace_summary {
                let _ = writeln!(out, "  trace: {summary}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(check: &str, result: Outcome) -> Row {
        Row {
            check: check.into(),
            protocol: "TCP".into(),
            family: "IPv4".into(),
            from: "client-0 (node-0)".into(),
            to: "server-1 (node-1)".into(),
            address: "10.244.1.3:4241".into(),
            result,
            millis: 12,
            attempts: 1,
            detail: "seen as 10.244.0.2".into(),
            trace_summary: (result == Outcome::Fail).then(|| "policy denied".to_string()),
            trace: None,
        }
    }

    #[test]
    fn failures_are_counted_listed_and_exit_one() {
        let mut report = Report {
            namespace: "weft-connectivity-x".into(),
            image: "weft".into(),
            nodes: vec!["node-0".into(), "node-1".into()],
            removed_leftovers: vec![],
            setup_seconds: 4.0,
            seconds: 9.5,
            passed: 0,
            failed: 0,
            skipped: 0,
            rows: vec![
                row("pod-to-pod", Outcome::Pass),
                row("pod-to-node", Outcome::Fail),
            ],
        };
        report.count();
        assert_eq!(
            (report.passed, report.failed, report.exit_code()),
            (1, 1, 1)
        );
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("CHECK"), "{table}");
        // Columns line up: RESULT starts at one offset in every row.
        let at = lines[0].find("RESULT").unwrap();
        assert_eq!(&lines[1][at..at + 4], "pass");
        assert_eq!(&lines[2][at..at + 4], "FAIL");
        assert!(table.contains(
            "- pod-to-node TCP/IPv4: client-0 (node-0) -> server-1 (node-1) 10.244.1.3:4241: seen as 10.244.0.2\n  trace: policy denied"
        ));
        report.rows.remove(1);
        report.count();
        assert_eq!(report.exit_code(), 0);
        assert!(!report.table().contains("Failures"));
    }
}
