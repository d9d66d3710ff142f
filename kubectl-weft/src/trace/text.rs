//! A [`Trace`] for a terminal: the two ends, each end's verdict with the
//! policies and rules behind it, the path entries, then the warnings.

use std::fmt::Write as _;

use super::{End, Path, PolicySide, Trace};

/// The whole trace as text.
pub fn render(trace: &Trace) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} -> {}, {} port {}",
        end(&trace.source),
        end(&trace.destination),
        trace.protocol,
        trace.port
    );

    out.push('\n');
    let verdict = if trace.allowed { "allowed" } else { "denied" };
    let _ = writeln!(out, "Policy: {verdict}");
    let source = trace.source.pod.as_deref().unwrap_or("the source");
    match &trace.policy.egress {
        Some(side) => policy_side(&mut out, "egress", source, side),
        None => {
            let _ = writeln!(
                out,
                "  egress: {source} is no pod policy sees (hostNetwork, or its address is set aside): nothing isolates it"
            );
        }
    }
    match (&trace.policy.ingress, &trace.destination.pod) {
        (Some(side), Some(pod)) => policy_side(&mut out, "ingress", pod, side),
        (_, Some(pod)) => {
            let _ = writeln!(
                out,
                "  ingress: {pod} is no pod policy sees (hostNetwork, or its address is set aside): nothing isolates it"
            );
        }
        (_, None) => {
            let _ = writeln!(
                out,
                "  ingress: {} is no pod's address: no ingress policy applies",
                trace.destination.ip
            );
        }
    }

    out.push('\n');
    path(&mut out, trace);

    out.push('\n');
    if trace.warnings.is_empty() {
        out.push_str("No warnings.\n");
    } else {
        let _ = writeln!(out, "Warnings ({}):", trace.warnings.len());
        for warning in &trace.warnings {
            let _ = writeln!(out, "- {warning}");
        }
    }
    out
}

/// `shop/web (10.244.1.5 on node-a)`, or the address alone.
fn end(end: &End) -> String {
    let place = match &end.node {
        Some(node) => format!("{} on {node}", end.ip),
        None => format!("{}, outside the pod network", end.ip),
    };
    match &end.pod {
        Some(pod) => format!("{pod} ({place})"),
        None => place,
    }
}

fn policy_side(out: &mut String, direction: &str, pod: &str, side: &PolicySide) {
    let verdict = if side.allows { "allowed" } else { "denied" };
    let _ = writeln!(out, "  {direction} of {pod} on {}: {verdict}", side.node);
    if side.isolating.is_empty() {
        let _ = writeln!(out, "    no policy isolates it for {direction}");
    } else {
        let _ = writeln!(out, "    isolated by {}", side.isolating.join(", "));
        if side.withheld {
            let _ = writeln!(
                out,
                "    its address is claimed by another pod too: nothing is allowed until one lets it go"
            );
        }
        if side.admitted_by.is_empty() {
            let _ = writeln!(out, "    no rule admits it");
        }
        for admission in &side.admitted_by {
            let _ = writeln!(
                out,
                "    admitted by {} {}",
                admission.policy, admission.text
            );
        }
    }
    let enforced = side.enforced_fingerprint.as_deref().unwrap_or("unknown");
    let matches = if side.fingerprint_matches {
        "the node enforces this plan"
    } else {
        "the node enforces another plan"
    };
    let _ = writeln!(
        out,
        "    plan fingerprint: expected {}, enforced {enforced}: {matches}",
        side.expected_fingerprint
    );
}

fn path(out: &mut String, trace: &Trace) {
    let Path {
        same_node,
        backend,
        complete,
        leaves_cluster,
        hops,
    } = &trace.path;
    let source_node = trace.source.node.as_deref().unwrap_or("the source node");
    if *leaves_cluster {
        let _ = writeln!(
            out,
            "Path: {} lies outside every pod slice: the traffic leaves {source_node} through its underlay, masqueraded to the node's address (unless the agent's no-masquerade list holds it)",
            trace.destination.ip
        );
        return;
    }
    if *same_node {
        let _ = writeln!(
            out,
            "Path: both ends on {source_node}: the traffic stays on the node's bridge"
        );
        return;
    }
    let destination_node = trace.destination.node.as_deref().unwrap_or("?");
    let backend = backend.as_deref().unwrap_or("an unknown backend");
    let state = if *complete { "complete" } else { "incomplete" };
    let _ = writeln!(
        out,
        "Path: {source_node} -> {destination_node} over {backend}: {state}"
    );
    for hop in hops {
        let reason = hop
            .reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {} toward {}: {}{reason}",
            hop.node, hop.toward, hop.state
        );
        for entry in &hop.entries {
            let held = if entry.held { "held   " } else { "MISSING" };
            let _ = writeln!(out, "    {held} {}", entry.entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use weft_core::status::EntryCheck;

    use super::super::{Admission, Hop, PolicyVerdict};
    use super::*;

    fn side(node: &str, isolating: &[&str], admitted: Option<Admission>) -> PolicySide {
        let allows = isolating.is_empty() || admitted.is_some();
        PolicySide {
            node: node.into(),
            allows,
            isolating: isolating.iter().map(|p| p.to_string()).collect(),
            admitted_by: admitted.into_iter().collect(),
            withheld: false,
            enforced_fingerprint: Some("00000000000000aa".into()),
            expected_fingerprint: "00000000000000aa".into(),
            fingerprint_matches: true,
        }
    }

    fn hop(node: &str, toward: &str, held: bool) -> Hop {
        Hop {
            node: node.into(),
            toward: toward.into(),
            state: "accepted".into(),
            reason: None,
            entries: vec![
                EntryCheck {
                    entry: format!(
                        "route 10.244.{toward}.0/24 via 10.244.{toward}.0 dev weft.1 onlink"
                    ),
                    held: true,
                },
                EntryCheck {
                    entry: format!(
                        "fdb 0a:58:0a:f4:0{toward}:00 dst 192.168.0.{toward} dev weft.1"
                    ),
                    held,
                },
            ],
        }
    }

    fn trace() -> Trace {
        let admitted = Admission {
            policy: "shop/allow-web".into(),
            rule: 0,
            peer: Some(0),
            port: Some(0),
            text: "ingress rule 0: from pods with app=client in namespace shop, on TCP port 80"
                .into(),
        };
        Trace {
            source: End {
                pod: Some("shop/client".into()),
                ip: "10.244.1.5".parse().unwrap(),
                node: Some("1".into()),
            },
            destination: End {
                pod: Some("shop/web".into()),
                ip: "10.244.2.7".parse().unwrap(),
                node: Some("2".into()),
            },
            protocol: "TCP".into(),
            port: 80,
            allowed: true,
            policy: PolicyVerdict {
                egress: Some(side("1", &[], None)),
                ingress: Some(side(
                    "2",
                    &["shop/allow-web", "shop/deny-all"],
                    Some(admitted),
                )),
            },
            path: Path {
                same_node: false,
                backend: Some("vxlan".into()),
                complete: true,
                leaves_cluster: false,
                hops: vec![hop("1", "2", true), hop("2", "1", true)],
            },
            warnings: Vec::new(),
        }
    }

    #[test]
    fn an_allowed_trace_names_the_rule_and_every_entry() {
        let text = render(&trace());
        assert_eq!(
            text,
            "\
shop/client (10.244.1.5 on 1) -> shop/web (10.244.2.7 on 2), TCP port 80

Policy: allowed
  egress of shop/client on 1: allowed
    no policy isolates it for egress
    plan fingerprint: expected 00000000000000aa, enforced 00000000000000aa: the node enforces this plan
  ingress of shop/web on 2: allowed
    isolated by shop/allow-web, shop/deny-all
    admitted by shop/allow-web ingress rule 0: from pods with app=client in namespace shop, on TCP port 80
    plan fingerprint: expected 00000000000000aa, enforced 00000000000000aa: the node enforces this plan

Path: 1 -> 2 over vxlan: complete
  1 toward 2: accepted
    held    route 10.244.2.0/24 via 10.244.2.0 dev weft.1 onlink
    held    fdb 0a:58:0a:f4:02:00 dst 192.168.0.2 dev weft.1
  2 toward 1: accepted
    held    route 10.244.1.0/24 via 10.244.1.0 dev weft.1 onlink
    held    fdb 0a:58:0a:f4:01:00 dst 192.168.0.1 dev weft.1

No warnings.
"
        );
    }

    #[test]
    fn a_denial_says_no_rule_admits_and_gaps_are_marked() {
        let mut trace = trace();
        trace.allowed = false;
        trace.policy.ingress = Some(side("2", &["shop/deny-all"], None));
        trace.path.complete = false;
        trace.path.hops[1] = hop("2", "1", false);
        trace.warnings = vec!["fdb missing on 2: ...".into()];
        let text = render(&trace);
        assert!(text.contains("Policy: denied\n"), "{text}");
        assert!(
            text.contains("  ingress of shop/web on 2: denied\n    isolated by shop/deny-all\n    no rule admits it\n"),
            "{text}"
        );
        assert!(
            text.contains("Path: 1 -> 2 over vxlan: incomplete\n"),
            "{text}"
        );
        assert!(
            text.contains("    MISSING fdb 0a:58:0a:f4:01:00 dst 192.168.0.1 dev weft.1\n"),
            "{text}"
        );
        assert!(
            text.ends_with("Warnings (1):\n- fdb missing on 2: ...\n"),
            "{text}"
        );
    }

    #[test]
    fn an_address_outside_the_pod_network_leaves_through_the_underlay() {
        let mut trace = trace();
        trace.destination = End {
            pod: None,
            ip: "192.0.2.10".parse().unwrap(),
            node: None,
        };
        trace.policy.ingress = None;
        trace.path = Path {
            same_node: false,
            backend: Some("vxlan".into()),
            complete: true,
            leaves_cluster: true,
            hops: Vec::new(),
        };
        let text = render(&trace);
        assert!(
            text.starts_with("shop/client (10.244.1.5 on 1) -> 192.0.2.10, outside the pod network, TCP port 80\n"),
            "{text}"
        );
        assert!(
            text.contains("  ingress: 192.0.2.10 is no pod's address: no ingress policy applies\n"),
            "{text}"
        );
        assert!(
            text.contains("Path: 192.0.2.10 lies outside every pod slice: the traffic leaves 1 through its underlay, masqueraded"),
            "{text}"
        );
    }

    #[test]
    fn one_node_needs_no_entries() {
        let mut trace = trace();
        trace.destination.node = Some("1".into());
        trace.path.same_node = true;
        trace.path.hops.clear();
        let text = render(&trace);
        assert!(
            text.contains("Path: both ends on 1: the traffic stays on the node's bridge\n"),
            "{text}"
        );
    }
}
