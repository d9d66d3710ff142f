//! The `CNI_*` environment a runtime sets for each plugin invocation.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{CniError, ErrorCode};

/// The verb in `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `ADD`: attach a container to the network.
    Add,
    /// `DEL`: detach it; must succeed when there is nothing left to remove.
    Del,
    /// `CHECK`: verify the attachment still matches `prevResult`.
    Check,
    /// `GC`: release everything not in `cni.dev/valid-attachments`.
    Gc,
    /// `STATUS`: report whether the plugin is ready for ADD.
    Status,
    /// `VERSION`: report the supported spec versions.
    Version,
}

impl Command {
    /// The verb as the runtime spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }

    /// Whether the verb concerns one container attachment, and so needs
    /// `CNI_CONTAINERID`, `CNI_IFNAME` and `CNI_PATH`.
    fn targets_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }

    /// Whether the verb needs `CNI_NETNS` (DEL must work after the netns is gone).
    fn needs_netns(self) -> bool {
        matches!(self, Command::Add | Command::Check)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Command {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, CniError> {
        [
            Command::Add,
            Command::Del,
            Command::Check,
            Command::Gc,
            Command::Status,
            Command::Version,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
        .ok_or_else(|| {
            env_error(format!(
                "CNI_COMMAND {s:?} is not a CNI verb: set CNI_COMMAND to one of ADD, DEL, CHECK, GC, STATUS, VERSION"
            ))
        })
    }
}

/// One container attachment: the key under which the plugin records what it
/// set up (IPAM owner, GC's valid set).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    /// The runtime's container ID (`CNI_CONTAINERID`).
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface name inside the container (`CNI_IFNAME`).
    pub ifname: String,
}

impl Attachment {
    /// Builds an attachment after checking both parts against the spec's rules;
    /// errors are code 4 naming `CNI_CONTAINERID` or `CNI_IFNAME`.
    pub fn new(container_id: &str, ifname: &str) -> Result<Self, CniError> {
        check_identifier(container_id).map_err(|problem| {
            env_error(format!(
                "CNI_CONTAINERID {container_id:?} {problem}: the runtime must pass its container ID unchanged"
            ))
        })?;
        check_ifname(ifname)
            .map_err(|problem| env_error(format!("CNI_IFNAME {ifname:?} {problem}")))?;
        Ok(Attachment {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
        })
    }
}

/// The spec's rule for container IDs and network names: at least one
/// character, alphanumeric first, then alphanumerics, `_`, `.` or `-`.
/// Returns which part of the rule is broken; callers add the fix.
pub(crate) fn check_identifier(id: &str) -> Result<(), &'static str> {
    let mut chars = id.chars();
    match chars.next() {
        None => Err("is empty"),
        Some(first) if !first.is_ascii_alphanumeric() => Err("must start with a letter or digit"),
        Some(_) if !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) => {
            Err("may contain only letters, digits, '_', '.' and '-'")
        }
        Some(_) => Ok(()),
    }
}

/// The kernel's interface name rule as the spec states it: 1 to 15 bytes, no
/// `/`, `:` or whitespace, and not `.` or `..`. Returns the problem and the fix.
pub(crate) fn check_ifname(name: &str) -> Result<(), String> {
    // IFNAMSIZ is 16 including the terminating NUL.
    const MAX_LEN: usize = 15;
    if name.is_empty() {
        Err("is empty: set an interface name such as eth0".to_owned())
    } else if name.len() > MAX_LEN {
        Err(format!(
            "is {} bytes long: use an interface name of at most {MAX_LEN} bytes",
            name.len()
        ))
    } else if name == "." || name == ".." {
        Err("is not a valid interface name: use a name such as eth0".to_owned())
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Err("contains '/', ':' or whitespace: use a name such as eth0".to_owned())
    } else {
        Ok(())
    }
}

/// The Kubernetes keys of `CNI_ARGS` (`K=V;K=V`) that Weft understands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `IgnoreUnknown=1|true`: other keys are tolerated instead of rejected.
    pub ignore_unknown: bool,
    /// `K8S_POD_NAME`
    pub pod_name: Option<String>,
    /// `K8S_POD_NAMESPACE`
    pub pod_namespace: Option<String>,
    /// `K8S_POD_INFRA_CONTAINER_ID`
    pub pod_infra_container_id: Option<String>,
    /// `K8S_POD_UID`
    pub pod_uid: Option<String>,
}

impl FromStr for CniArgs {
    type Err = CniError;

    /// Parses `CNI_ARGS`. A key Weft does not know is an error (code 4, since
    /// `CNI_ARGS` is part of the environment, not of the network config) unless
    /// `IgnoreUnknown` is set, as the reference plugins behave.
    fn from_str(raw: &str) -> Result<Self, CniError> {
        let mut args = CniArgs::default();
        let mut unknown = Vec::new();
        for pair in raw.split(';').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                env_error(format!(
                    "CNI_ARGS entry {pair:?} has no '=': write CNI_ARGS as KEY=VALUE pairs separated by ';'"
                ))
            })?;
            let slot = match key {
                "IgnoreUnknown" => {
                    args.ignore_unknown = parse_bool(value).ok_or_else(|| {
                        env_error(format!(
                            "CNI_ARGS IgnoreUnknown={value:?} is not a boolean: use IgnoreUnknown=1 or IgnoreUnknown=true"
                        ))
                    })?;
                    continue;
                }
                "K8S_POD_NAME" => &mut args.pod_name,
                "K8S_POD_NAMESPACE" => &mut args.pod_namespace,
                "K8S_POD_INFRA_CONTAINER_ID" => &mut args.pod_infra_container_id,
                "K8S_POD_UID" => &mut args.pod_uid,
                _ => {
                    unknown.push(key);
                    continue;
                }
            };
            *slot = Some(value.to_owned());
        }
        if !unknown.is_empty() && !args.ignore_unknown {
            return Err(env_error(format!(
                "CNI_ARGS has keys weft does not know ({}): remove them or add IgnoreUnknown=1 to CNI_ARGS",
                unknown.join(", ")
            )));
        }
        Ok(args)
    }
}

/// Booleans as Go's `strconv.ParseBool` reads them, since runtimes written in
/// Go produce `CNI_ARGS`.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// A parsed, validated plugin invocation environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The verb.
    pub command: Command,
    /// Container ID and interface name: `Some` for ADD, DEL and CHECK, `None`
    /// for GC, STATUS and VERSION.
    pub attachment: Option<Attachment>,
    /// `CNI_NETNS`: `Some` for ADD and CHECK; for DEL only when the runtime
    /// still had a namespace to pass.
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS`, parsed.
    pub args: CniArgs,
    /// `CNI_PATH`, split on `:`; required for ADD, DEL and CHECK.
    pub cni_path: Vec<PathBuf>,
}

impl Invocation {
    /// Reads the invocation from environment pairs (e.g. `std::env::vars()`);
    /// unrelated variables are ignored and an empty value counts as unset.
    /// Errors are code 4 naming the variable and the fix.
    pub fn from_env<I>(vars: I) -> Result<Invocation, CniError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut env: HashMap<String, String> = vars
            .into_iter()
            .filter(|(k, v)| k.starts_with("CNI_") && !v.is_empty())
            .collect();
        let command: Command = env
            .remove("CNI_COMMAND")
            .ok_or_else(|| {
                env_error(
                    "CNI_COMMAND is not set: set it to one of ADD, DEL, CHECK, GC, STATUS, VERSION",
                )
            })?
            .parse()?;
        let required = |env: &mut HashMap<String, String>, name: &str| {
            env.remove(name).ok_or_else(|| {
                env_error(format!(
                    "{name} is required for {command}: the container runtime must set it"
                ))
            })
        };
        let (attachment, cni_path) = if command.targets_attachment() {
            let container_id = required(&mut env, "CNI_CONTAINERID")?;
            let ifname = required(&mut env, "CNI_IFNAME")?;
            let cni_path = required(&mut env, "CNI_PATH")?;
            (
                Some(Attachment::new(&container_id, &ifname)?),
                Some(cni_path),
            )
        } else {
            (None, env.remove("CNI_PATH"))
        };
        let netns = if command.needs_netns() {
            Some(required(&mut env, "CNI_NETNS")?)
        } else if command == Command::Del {
            env.remove("CNI_NETNS")
        } else {
            None
        };
        let args = match env.remove("CNI_ARGS") {
            Some(raw) if command != Command::Version => raw.parse()?,
            _ => CniArgs::default(),
        };
        Ok(Invocation {
            command,
            attachment,
            netns: netns.map(PathBuf::from),
            args,
            cni_path: cni_path
                .iter()
                .flat_map(|p| p.split(':'))
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
        })
    }
}

fn env_error(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidEnvironment, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn add_env() -> Vec<(String, String)> {
        env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/pod1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"),
            ("PATH", "/usr/bin"),
        ])
    }

    fn without(vars: Vec<(String, String)>, name: &str) -> Vec<(String, String)> {
        vars.into_iter().filter(|(k, _)| k != name).collect()
    }

    fn err(vars: Vec<(String, String)>) -> CniError {
        Invocation::from_env(vars).expect_err("invocation should be rejected")
    }

    #[test]
    fn add_with_every_variable_parses() {
        let inv = Invocation::from_env(add_env()).unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(
            inv.attachment,
            Some(Attachment {
                container_id: "abc123".into(),
                ifname: "eth0".into()
            })
        );
        assert_eq!(inv.netns, Some(PathBuf::from("/var/run/netns/pod1")));
        assert_eq!(
            inv.cni_path,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
        assert_eq!(inv.args.pod_name.as_deref(), Some("web-0"));
        assert_eq!(inv.args.pod_namespace.as_deref(), Some("default"));
        assert!(!inv.args.ignore_unknown);
    }

    #[test]
    fn add_names_each_missing_variable() {
        for name in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"] {
            let e = err(without(add_env(), name));
            assert_eq!(e.code, 4, "{name}");
            assert!(e.msg.contains(name), "{name}: {}", e.msg);
        }
    }

    #[test]
    fn empty_value_counts_as_unset() {
        let mut vars = without(add_env(), "CNI_IFNAME");
        vars.push(("CNI_IFNAME".into(), String::new()));
        assert!(err(vars).msg.contains("CNI_IFNAME"));
    }

    #[test]
    fn del_and_check_netns_rules() {
        let del = without(add_env(), "CNI_NETNS").into_iter().map(|(k, v)| {
            if k == "CNI_COMMAND" {
                (k, "DEL".into())
            } else {
                (k, v)
            }
        });
        let inv = Invocation::from_env(del).unwrap();
        assert_eq!(inv.command, Command::Del);
        assert_eq!(inv.netns, None);
        assert!(inv.attachment.is_some());

        let check = without(add_env(), "CNI_NETNS")
            .into_iter()
            .map(|(k, v)| {
                if k == "CNI_COMMAND" {
                    (k, "CHECK".into())
                } else {
                    (k, v)
                }
            })
            .collect();
        assert!(err(check).msg.contains("CNI_NETNS"));
    }

    #[test]
    fn gc_status_version_need_only_the_command() {
        for (verb, command) in [
            ("GC", Command::Gc),
            ("STATUS", Command::Status),
            ("VERSION", Command::Version),
        ] {
            let inv = Invocation::from_env(env(&[("CNI_COMMAND", verb)])).unwrap();
            assert_eq!(inv.command, command);
            assert_eq!(inv.attachment, None);
            assert_eq!(inv.netns, None);
        }
    }

    #[test]
    fn command_missing_or_unknown_is_code_4() {
        let e = err(env(&[]));
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_COMMAND"));
        let e = err(env(&[("CNI_COMMAND", "add")]));
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("ADD, DEL"), "{}", e.msg);
    }

    #[test]
    fn container_id_rules() {
        for ok in ["a", "0abc", "a_b.c-d", "ABCdef0123456789"] {
            assert!(check_identifier(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-abc", ".abc", "_abc", "a/b", "a b", "a\nb", "ä"] {
            assert!(check_identifier(bad).is_err(), "{bad:?}");
        }
        let mut vars = without(add_env(), "CNI_CONTAINERID");
        vars.push(("CNI_CONTAINERID".into(), "-bad".into()));
        let e = err(vars);
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_CONTAINERID"), "{}", e.msg);
    }

    #[test]
    fn ifname_rules() {
        for ok in ["eth0", "a", "net1.100", "fifteen-chars15"] {
            assert!(check_ifname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "sixteen-chars-16",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
        ] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
        let mut vars = without(add_env(), "CNI_IFNAME");
        vars.push(("CNI_IFNAME".into(), "eth:0".into()));
        let e = err(vars);
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_IFNAME"), "{}", e.msg);
    }

    #[test]
    fn cni_args_unknown_keys_need_ignore_unknown() {
        let e = "FOO=bar;K8S_POD_NAME=x".parse::<CniArgs>().unwrap_err();
        assert_eq!(e.code, 4);
        assert!(
            e.msg.contains("FOO") && e.msg.contains("IgnoreUnknown=1"),
            "{}",
            e.msg
        );

        for ignore in [
            "IgnoreUnknown=1",
            "IgnoreUnknown=true",
            "IgnoreUnknown=True",
        ] {
            let args: CniArgs = format!("FOO=bar;{ignore};K8S_POD_UID=u-1;")
                .parse()
                .unwrap();
            assert!(args.ignore_unknown);
            assert_eq!(args.pod_uid.as_deref(), Some("u-1"));
        }
        // The flag applies wherever it appears in the list.
        let args: CniArgs = "K8S_POD_INFRA_CONTAINER_ID=c1;X=1;IgnoreUnknown=1"
            .parse()
            .unwrap();
        assert_eq!(args.pod_infra_container_id.as_deref(), Some("c1"));
    }

    #[test]
    fn cni_args_malformed_entries() {
        let e = "K8S_POD_NAME".parse::<CniArgs>().unwrap_err();
        assert!(e.msg.contains("KEY=VALUE"), "{}", e.msg);
        let e = "IgnoreUnknown=maybe".parse::<CniArgs>().unwrap_err();
        assert!(e.msg.contains("IgnoreUnknown"), "{}", e.msg);
        assert_eq!("".parse::<CniArgs>().unwrap(), CniArgs::default());
        // Values may themselves contain '='.
        let args: CniArgs = "K8S_POD_NAME=a=b".parse().unwrap();
        assert_eq!(args.pod_name.as_deref(), Some("a=b"));
    }

    #[test]
    fn version_ignores_cni_args() {
        let inv = Invocation::from_env(env(&[("CNI_COMMAND", "VERSION"), ("CNI_ARGS", "garbage")]))
            .unwrap();
        assert_eq!(inv.args, CniArgs::default());
    }
}
