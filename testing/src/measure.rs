//! Figures the benches report: latency percentiles and a process's memory.

use std::time::Duration;

use anyhow::{Context, Result};

/// The `p`th percentile (0–100) of `samples` by nearest rank; the samples
/// need not be sorted.
///
/// # Panics
/// When `samples` is empty.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A figure of `/proc/<pid>/status` in KiB, e.g. `field` = `VmRSS:`.
pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    line.split_whitespace()
        .nth(1)
        .context("malformed status line")?
        .parse()
        .with_context(|| format!("reading {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_the_nearest_rank_of_unsorted_samples() {
        let samples: Vec<Duration> = [5, 1, 4, 2, 3].map(Duration::from_millis).to_vec();
        assert_eq!(percentile(&samples, 50.0), Duration::from_millis(3));
        assert_eq!(percentile(&samples, 100.0), Duration::from_millis(5));
        assert_eq!(percentile(&samples, 0.0), Duration::from_millis(1));
    }

    #[test]
    fn own_memory_is_read() {
        assert!(status_kib(std::process::id(), "VmRSS:").unwrap() > 0);
    }
}
