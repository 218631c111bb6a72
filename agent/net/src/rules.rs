//! The iptables rules geomx owns, rendered in the canonical form `iptables -S` prints.

use serde::Serialize;

use crate::desired::DesiredNetwork;
use crate::kernel::RuleSpec;

/// geomx's nat chain, jumped to from `POSTROUTING`.
pub const NAT_CHAIN: &str = "GEOMX-POSTROUTING";
/// geomx's filter chain, jumped to from `FORWARD`.
pub const FILTER_CHAIN: &str = "GEOMX-FORWARD";

/// One chain geomx owns: where it hangs and what it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainPlan {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// geomx's chain.
    pub chain: &'static str,
    /// The built-in chain that jumps to it (at position 1).
    pub hook: &'static str,
    /// The jump rule in `hook`.
    pub jump: RuleSpec,
    /// The chain's rules, in order.
    pub rules: Vec<RuleSpec>,
}

fn comment(text: &str) -> [String; 4] {
    [
        "-m".into(),
        "comment".into(),
        "--comment".into(),
        format!("geomx: {text}"),
    ]
}

fn rule(matches: &[&str], note: &str, target: &[&str]) -> RuleSpec {
    let mut w: Vec<String> = matches.iter().map(|s| s.to_string()).collect();
    w.extend(comment(note));
    w.push("-j".into());
    w.extend(target.iter().map(|s| s.to_string()));
    RuleSpec(w)
}

/// The jump rule from `hook` to `chain` (also used by cleanup to recognise it).
pub fn jump_rule(table: &str, chain: &str) -> RuleSpec {
    let note = if table == "nat" {
        "masquerade container traffic that leaves the cluster"
    } else {
        "forward cluster traffic"
    };
    rule(&[], note, &[chain])
}

/// The nat chain: cluster-internal traffic keeps its source address, container traffic
/// leaving the cluster is masqueraded to the host's address.
pub fn nat_plan(desired: &DesiredNetwork, random_fully: bool) -> ChainPlan {
    let cluster = desired.cluster.to_string();
    let subnet = desired.subnet.to_string();
    let mut masq = vec!["MASQUERADE"];
    if random_fully {
        masq.push("--random-fully");
    }
    ChainPlan {
        table: "nat",
        chain: NAT_CHAIN,
        hook: "POSTROUTING",
        jump: jump_rule("nat", NAT_CHAIN),
        rules: vec![
            rule(
                &["-s", &cluster, "-d", &cluster],
                "traffic inside the cluster keeps its source address",
                &["RETURN"],
            ),
            rule(
                &["-s", &subnet, "!", "-d", "224.0.0.0/4"],
                "masquerade container traffic that leaves the cluster",
                &masq,
            ),
        ],
    }
}

/// The filter chain: forwarded traffic from and to the cluster is accepted (Docker sets
/// the FORWARD policy to DROP).
pub fn filter_plan(desired: &DesiredNetwork) -> ChainPlan {
    let cluster = desired.cluster.to_string();
    ChainPlan {
        table: "filter",
        chain: FILTER_CHAIN,
        hook: "FORWARD",
        jump: jump_rule("filter", FILTER_CHAIN),
        rules: vec![
            // the tunnel's MTU is below the containers' 1500: TCP must not send segments
            // that WireGuard would have to drop (ps-lite sends large messages)
            rule(
                &[
                    "-o",
                    crate::backend::WG_INTERFACE,
                    "-p",
                    "tcp",
                    "-m",
                    "tcp",
                    "--tcp-flags",
                    "SYN,RST",
                    "SYN",
                ],
                "clamp MSS to the tunnel MTU",
                &["TCPMSS", "--clamp-mss-to-pmtu"],
            ),
            rule(
                &["-s", &cluster],
                "forward traffic from the cluster",
                &["ACCEPT"],
            ),
            rule(
                &["-d", &cluster],
                "forward traffic to the cluster",
                &["ACCEPT"],
            ),
        ],
    }
}

/// Whether `rule` is geomx's MASQUERADE rule with `--random-fully`.
pub(crate) fn is_random_fully(rule: &RuleSpec) -> bool {
    rule.words().iter().any(|w| w == "--random-fully")
}

/// The same rule without `--random-fully`.
pub(crate) fn without_random_fully(rule: &RuleSpec) -> RuleSpec {
    RuleSpec(
        rule.words()
            .iter()
            .filter(|w| *w != "--random-fully")
            .cloned()
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_render_like_iptables_save() {
        let d = DesiredNetwork {
            subnet: "172.17.34.0/24".parse().expect("net"),
            cluster: "172.17.0.0/16".parse().expect("net"),
            peers: vec![],
            backend: Default::default(),
        };
        let nat = nat_plan(&d, true);
        let lines: Vec<String> = nat.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            lines,
            [
                r#"-s 172.17.0.0/16 -d 172.17.0.0/16 -m comment --comment "geomx: traffic inside the cluster keeps its source address" -j RETURN"#,
                r#"-s 172.17.34.0/24 ! -d 224.0.0.0/4 -m comment --comment "geomx: masquerade container traffic that leaves the cluster" -j MASQUERADE --random-fully"#,
            ]
        );
        assert_eq!(
            nat.jump.to_string(),
            r#"-m comment --comment "geomx: masquerade container traffic that leaves the cluster" -j GEOMX-POSTROUTING"#
        );
        assert!(!is_random_fully(&nat_plan(&d, false).rules[1]));
        assert_eq!(
            without_random_fully(&nat.rules[1]),
            nat_plan(&d, false).rules[1]
        );
        let filter = filter_plan(&d);
        assert_eq!(filter.jump.target(), Some(FILTER_CHAIN));
        // as `iptables -S` prints them (checked against iptables 1.8.9, nft)
        assert_eq!(
            filter.rules[0].to_string(),
            r#"-o geomx-wg -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment "geomx: clamp MSS to the tunnel MTU" -j TCPMSS --clamp-mss-to-pmtu"#
        );
        assert_eq!(
            filter.rules[2].to_string(),
            r#"-d 172.17.0.0/16 -m comment --comment "geomx: forward traffic to the cluster" -j ACCEPT"#
        );
    }
}
