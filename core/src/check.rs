//! The connectivity check (`kiln check`), Cilium's connectivity test for
//! flannel's network model: every node's agent makes a test pod with its
//! own CNI conflist, each test pod sends to the test pod on every other
//! node and to every other node's address, and each receiver reports the
//! source address it saw. A path is ok when the datagram arrived from the
//! sender pod's own address, NAT when it arrived from another, failed when
//! it did not arrive.
//!
//! The server announces a round to the nodes in the peers watch
//! ([`crate::Peers::check`]): first [`CheckPhase::Prepare`] (make the pod,
//! then `POST /api/v1/checks/ID/ready`), then [`CheckPhase::Probe`] with
//! every pod's address (send, listen, then `POST /api/v1/checks/ID/report`).
//! A round that leaves the peers answer is over: its pods are removed.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

/// The UDP port the check's receivers listen on, in each test pod and on
/// each node.
pub const CHECK_PORT: u16 = 47_474;

/// What a probe datagram says: `kiln-check ID FROM-NODE`.
pub const PROBE_PREFIX: &str = "kiln-check";

/// Which phase a round is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckPhase {
    /// Make the test pod and say its address.
    Prepare,
    /// Send to every other pod and node, listen, report.
    Probe,
}

/// One node of a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckTarget {
    /// The node.
    pub node: String,
    /// Its address (its lease's public IP).
    pub node_ip: IpAddr,
    /// Its test pod's address, once it made one (in the probe phase).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<Ipv4Addr>,
}

/// A round as the nodes see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRound {
    /// The check's id.
    pub id: String,
    /// What to do now.
    pub phase: CheckPhase,
    /// The nodes taking part.
    pub nodes: Vec<CheckTarget>,
}

/// `POST /api/v1/checks/ID/ready`: the node's test pod, or why it has none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodReady {
    /// The test pod's address.
    #[serde(default)]
    pub pod_ip: Option<Ipv4Addr>,
    /// Why the pod could not be made.
    #[serde(default)]
    pub error: Option<String>,
}

/// What a path goes to: the other node's test pod, or the node itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// Test pod → the other node's test pod.
    Pod,
    /// Test pod → the other node's address.
    Node,
}

/// One datagram a receiver got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Received {
    /// The node that sent it (from its payload).
    pub from: String,
    /// Where it arrived: the receiving node's pod or the node.
    pub to: PathKind,
    /// The source address it arrived from.
    pub source: IpAddr,
}

/// `POST /api/v1/checks/ID/report`: what this node's receivers got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckReport {
    /// Each datagram received, once per sender and kind.
    pub received: Vec<Received>,
}

/// A path's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Arrived from the sender pod's own address.
    Ok,
    /// Arrived from another address: something translated it.
    Nat,
    /// Did not arrive.
    Failed,
}

/// One path of the matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckPath {
    /// The sending node (its test pod sent).
    pub from: String,
    /// The receiving node.
    pub to: String,
    /// To its pod or to the node.
    pub kind: PathKind,
    /// What happened.
    pub verdict: Verdict,
    /// The source address the receiver saw, if it got it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<IpAddr>,
}

/// `GET /api/v1/checks/ID`: a check, running or done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Its id.
    pub id: String,
    /// Whether it is over.
    pub done: bool,
    /// Over, with every path ok and every node's pod made.
    pub ok: bool,
    /// The nodes taking part, with their test pods' addresses.
    pub nodes: Vec<CheckTarget>,
    /// Every path (from, to, kind), once it is over.
    pub paths: Vec<CheckPath>,
    /// Nodes that made no pod or sent no report, and why.
    pub errors: Vec<NodeError>,
}

/// A node that failed its part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeError {
    /// The node.
    pub node: String,
    /// What went wrong.
    pub error: String,
}

/// The verdicts of a round: for each ordered pair of nodes and each kind,
/// whether the receiver got a datagram from the sender and from which
/// address. `reports` are the receivers' (node, what it received); a node
/// with no pod sends nothing, so every path from it fails.
pub fn verdicts(nodes: &[CheckTarget], reports: &[(String, CheckReport)]) -> Vec<CheckPath> {
    let mut paths = Vec::new();
    for from in nodes {
        for to in nodes.iter().filter(|t| t.node != from.node) {
            for kind in [PathKind::Pod, PathKind::Node] {
                let seen = reports
                    .iter()
                    .filter(|(node, _)| *node == to.node)
                    .flat_map(|(_, r)| &r.received)
                    .find(|r| r.from == from.node && r.to == kind)
                    .map(|r| r.source);
                let verdict = match (seen, from.pod_ip) {
                    (None, _) | (_, None) => Verdict::Failed,
                    (Some(s), Some(pod)) if s == IpAddr::V4(pod) => Verdict::Ok,
                    (Some(_), Some(_)) => Verdict::Nat,
                };
                paths.push(CheckPath { from: from.node.clone(), to: to.node.clone(), kind, verdict, seen });
            }
        }
    }
    paths
}

/// A probe datagram's payload.
pub fn probe_payload(id: &str, from: &str) -> String {
    format!("{PROBE_PREFIX} {id} {from}")
}

/// The sender a probe datagram names, if it is one of round `id`'s.
pub fn probe_sender<'a>(payload: &'a [u8], id: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(payload).ok()?;
    let rest = text.strip_prefix(PROBE_PREFIX)?.strip_prefix(' ')?.strip_prefix(id)?.strip_prefix(' ')?;
    (!rest.is_empty() && !rest.contains(char::is_whitespace)).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(node: &str, ip: u8) -> CheckTarget {
        CheckTarget { node: node.into(), node_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, ip)), pod_ip: Some(Ipv4Addr::new(10, 244, ip, 2)) }
    }

    #[test]
    fn verdicts_are_ok_nat_or_failed() {
        let nodes = [target("a", 1), target("b", 2)];
        let got = |from: &str, to: PathKind, source: [u8; 4]| Received { from: from.into(), to, source: IpAddr::from(source) };
        let reports = vec![
            // b got a's pod datagram from a's pod, and a's node datagram from a's node address (masqueraded).
            (
                "b".to_string(),
                CheckReport { received: vec![got("a", PathKind::Pod, [10, 244, 1, 2]), got("a", PathKind::Node, [192, 0, 2, 1])] },
            ),
            // a got nothing from b's pod, but b's datagram to a's node.
            ("a".to_string(), CheckReport { received: vec![got("b", PathKind::Node, [10, 244, 2, 2])] }),
            // A report from a node that is not the receiver counts for nothing.
            ("c".to_string(), CheckReport { received: vec![got("b", PathKind::Pod, [10, 244, 2, 2])] }),
        ];
        let v: Vec<(String, String, PathKind, Verdict)> =
            verdicts(&nodes, &reports).into_iter().map(|p| (p.from, p.to, p.kind, p.verdict)).collect();
        let want = |f: &str, t: &str, k, v| (f.to_string(), t.to_string(), k, v);
        assert_eq!(
            v,
            vec![
                want("a", "b", PathKind::Pod, Verdict::Ok),
                want("a", "b", PathKind::Node, Verdict::Nat),
                want("b", "a", PathKind::Pod, Verdict::Failed),
                want("b", "a", PathKind::Node, Verdict::Ok),
            ]
        );
        let no_pod = [CheckTarget { pod_ip: None, ..target("a", 1) }, target("b", 2)];
        assert!(verdicts(&no_pod, &reports).iter().filter(|p| p.from == "a").all(|p| p.verdict == Verdict::Failed));
    }

    #[test]
    fn probe_payloads_name_their_sender() {
        let p = probe_payload("c1", "kiln-tiny-0");
        assert_eq!(probe_sender(p.as_bytes(), "c1"), Some("kiln-tiny-0"));
        for bad in ["kiln-check c2 kiln-tiny-0", "kiln-check c1 ", "kiln-check c1 a b", "x kiln-check c1 a", "kiln-checkc1 a"] {
            assert_eq!(probe_sender(bad.as_bytes(), "c1"), None, "{bad}");
        }
        assert_eq!(probe_sender(&[0xff, 0xfe], "c1"), None);
    }
}
