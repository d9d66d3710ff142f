//! The command line: kubectl's habits (`--kubeconfig`, `--context`, `-n`,
//! `-o json`), one subcommand per question.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use k8s_openapi::jiff::SignedDuration;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::error::{Error, Result};
use crate::observe::{StatusOptions, DEFAULT_NAMESPACE};

/// Exit status when the plugin could not look (usage, kubeconfig, API server).
pub const EXIT_ERROR: u8 = 2;

/// Shows the health of Weft's pod network.
#[derive(Debug, Parser)]
#[command(name = "kubectl-weft", bin_name = "kubectl weft", version)]
pub struct Cli {
    /// The kubeconfig file; default: $KUBECONFIG, then ~/.kube/config, then in-cluster.
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use; default: its current context.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The namespace Weft is installed in.
    #[arg(short = 'n', long, global = true, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Limit on each daemon's /status answer and each API read, e.g. 5s.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// A line per node, the controller leader, and warnings with their fixes;
    /// exits 0 when healthy, 1 with warnings, 2 when it could not look.
    Status(StatusArgs),
    /// A gzipped tarball of what a bug report needs (status, versions, each
    /// node's kernel dump and logs, Weft's objects; never a Secret); exits 0
    /// when written, 2 when not.
    Bundle(BundleArgs),
    /// Whether NetworkPolicy lets a pod reach a pod or address, by which
    /// rules, and whether both nodes hold the path; exits 0 when allowed
    /// and complete, 1 otherwise, 2 when it could not look.
    Trace(crate::trace::TraceArgs),
    /// End-to-end checks with pods of its own on every node (`connectivity
    /// test`); exits 0 when all pass, 1 when one fails, 2 when it could
    /// not run.
    Connectivity(crate::connectivity::ConnectivityArgs),
    /// The probe server and client the connectivity test's pods run.
    #[command(hide = true)]
    Probe(crate::probe::ProbeArgs),
}

/// Flags of `bundle`.
#[derive(Debug, Args)]
pub struct BundleArgs {
    /// Where to write it; default: weft-bundle-TIME.tar.gz (UTC) in the current directory.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Replace FILE when it exists.
    #[arg(long)]
    pub force: bool,
}

/// Flags of `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Look again until healthy or this long has passed (default 5m), e.g. --wait=2m.
    #[arg(long, value_name = "DURATION", num_args = 0..=1, require_equals = true,
          default_missing_value = "5m", value_parser = parse_duration)]
    pub wait: Option<Duration>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Columns for a terminal.
    Table,
    /// The whole report as JSON, for scripts.
    Json,
}

/// Parses a duration as `30s`, `5m`, `1h30m` or ISO 8601 `PT5M`.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let duration: SignedDuration = text
        .parse()
        .map_err(|e| format!("{text:?} is not a duration like 30s, 5m or 1h30m: {e}"))?;
    Duration::try_from(duration).map_err(|_| format!("{text:?}: a duration must not be negative"))
}

/// A client from the kubeconfig kubectl would use, or the one named.
pub async fn client(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<Client> {
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..KubeConfigOptions::default()
    };
    let config = match (kubeconfig, context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| Error::Kubeconfig(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| Error::Kubeconfig(e.to_string()))?
        }
        (None, Some(_)) => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| Error::Kubeconfig(e.to_string()))?,
        (None, None) => Config::infer()
            .await
            .map_err(|e| Error::Kubeconfig(e.to_string()))?,
    };
    Client::try_from(config).map_err(Error::Client)
}

/// Runs the command, writes its output to `out`, and returns the exit status.
pub async fn run(cli: &Cli, out: &mut impl Write) -> Result<u8> {
    // The probe runs in a test pod: no kubeconfig there, and none needed.
    if let Command::Probe(args) = &cli.command {
        return crate::probe::run(args, out)
            .await
            .map_err(|e| Error::Connectivity(format!("probe: {e}")));
    }
    let client = client(cli.kubeconfig.as_deref(), cli.context.as_deref()).await?;
    let options = StatusOptions {
        namespace: cli.namespace.clone(),
        request_timeout: cli.request_timeout,
        ..StatusOptions::default()
    };
    match &cli.command {
        Command::Status(args) => {
            let report = match args.wait {
                Some(limit) => crate::wait_until_healthy(&client, &options, limit).await?,
                None => crate::status(&client, &options).await?,
            };
            let text = match args.output {
                Output::Table => report.table(),
                Output::Json => json_text(&report),
            };
            // A closed pipe (`| head`) is not the cluster's fault: the exit
            // status still says what was found.
            let _ = out.write_all(text.as_bytes());
            Ok(report.exit_code())
        }
        Command::Bundle(args) => {
            let target = crate::bundle::BundleTarget::new(
                args.file.clone(),
                args.force,
                k8s_openapi::jiff::Timestamp::now(),
            );
            let written = crate::bundle::write_bundle(&client, &options, &target).await?;
            // stdout stays empty: the tarball is the output.
            eprintln!("{written}");
            Ok(0)
        }
        Command::Trace(args) => crate::trace::run(&client, &options, args, out).await,
        Command::Connectivity(args) => crate::connectivity::run(&client, &options, args, out).await,
        Command::Probe(_) => unreachable!("the probe ran above, without a client"),
    }
}

/// `value` as `-o json` prints it: indented, with a final newline.
pub(crate) fn json_text(value: &impl serde::Serialize) -> String {
    let mut json = serde_json::to_string_pretty(value).expect("a report always serialises");
    json.push('\n');
    json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("PT5M"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("soon").unwrap_err().contains("like 30s"));
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn wait_takes_an_optional_duration() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            let Command::Status(status) = cli.command else {
                panic!("not status: {:?}", cli.command);
            };
            status.wait
        };
        assert_eq!(parse(&["kubectl-weft", "status"]), None);
        assert_eq!(
            parse(&["kubectl-weft", "status", "--wait"]),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            parse(&["kubectl-weft", "status", "--wait=10s"]),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn usage_errors_are_refused() {
        assert!(Cli::try_parse_from(["kubectl-weft", "status", "-o", "yaml"]).is_err());
        assert!(Cli::try_parse_from(["kubectl-weft"]).is_err());
        assert!(Cli::try_parse_from(["kubectl-weft", "status", "--request-timeout", "x"]).is_err());
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "kubectl-weft",
            "status",
            "-n",
            "weft-system",
            "--context",
            "prod",
        ])
        .unwrap();
        assert_eq!(cli.namespace, "weft-system");
        assert_eq!(cli.context.as_deref(), Some("prod"));
    }
}
