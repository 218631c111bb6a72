//! The iptables rules geomx owns, rendered in the canonical form `iptables -S` prints, and
//! the `iptables-restore --noflush` payloads that put them in place atomically (one
//! transaction per table, as flannel's ApplyWithoutFlush: never a moment without the
//! MASQUERADE rule or the ACCEPT rules).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::backend::{PeerBackend, VXLAN_INTERFACE, WG_INTERFACE};
use crate::change::Change;
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
    /// The built-in chain that jumps to it.
    pub hook: &'static str,
    /// The jump goes right after the hook's jump to this chain (`DOCKER-USER`: operators'
    /// rules there stay in force), or at position 1 when there is none.
    pub after: Option<&'static str>,
    /// The jump rule in `hook`.
    pub jump: RuleSpec,
    /// The chain's rules, in order.
    pub rules: Vec<RuleSpec>,
}

/// A peer as the filter chain needs it: its subnet, how it is reached, and for host-gw
/// peers its underlay address and the device it is on-link through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterPeer {
    /// Its container subnet.
    pub subnet: Ipv4Net,
    /// Its backend.
    pub backend: PeerBackend,
    /// Its underlay address.
    pub underlay_ip: Ipv4Addr,
    /// The device its underlay address is on-link through (host-gw), when known.
    pub device: Option<String>,
}

/// What a chain and its hook hold now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainObserved {
    /// The hook's rules, in order.
    pub hook: Vec<RuleSpec>,
    /// The chain's rules (`None`: no such chain).
    pub chain: Option<Vec<RuleSpec>>,
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
        after: None,
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

/// The filter chain (Docker sets the FORWARD policy to DROP): this host's containers may
/// send anywhere; traffic to them is accepted only from the cluster — each peer's subnet
/// on the device it comes through (the overlay, or the LAN device of an on-link host-gw
/// peer) and on-link peers' underlay addresses. Everything else falls through to Docker's
/// rules. The jump sits below `DOCKER-USER`, so operators' rules there still apply.
pub fn filter_plan(desired: &DesiredNetwork, peers: &[FilterPeer]) -> ChainPlan {
    let own = desired.subnet.to_string();
    let mut rules = vec![
        // the overlays' MTU is below the containers' 1500: TCP must not send segments the
        // tunnel would have to drop (ps-lite sends large messages)
        rule(
            &[
                "-o",
                "geomx-+",
                "-p",
                "tcp",
                "-m",
                "tcp",
                "--tcp-flags",
                "SYN,RST",
                "SYN",
            ],
            "clamp MSS to the overlay MTU",
            &["TCPMSS", "--clamp-mss-to-pmtu"],
        ),
        rule(&["-s", &own], "from this host's containers", &["ACCEPT"]),
    ];
    let mut sorted: Vec<&FilterPeer> = peers.iter().collect();
    sorted.sort_by_key(|p| p.subnet);
    for p in sorted {
        let subnet = p.subnet.to_string();
        match (p.backend, &p.device) {
            (PeerBackend::HostGw, device) => {
                let mut m = vec!["-s", &subnet, "-d", &own];
                if let Some(dev) = device {
                    m.extend(["-i", dev.as_str()]);
                }
                rules.push(rule(&m, "from a peer's containers (host-gw)", &["ACCEPT"]));
                let host = format!("{}/32", p.underlay_ip);
                rules.push(rule(
                    &["-s", &host, "-d", &own],
                    "from an on-link peer",
                    &["ACCEPT"],
                ));
            }
            (PeerBackend::Wireguard, _) => rules.push(rule(
                &["-s", &subnet, "-d", &own, "-i", WG_INTERFACE],
                "from a peer's containers (wireguard)",
                &["ACCEPT"],
            )),
            (PeerBackend::Vxlan, _) => rules.push(rule(
                &["-s", &subnet, "-d", &own, "-i", VXLAN_INTERFACE],
                "from a peer's containers (vxlan)",
                &["ACCEPT"],
            )),
        }
    }
    ChainPlan {
        table: "filter",
        chain: FILTER_CHAIN,
        hook: "FORWARD",
        after: Some("DOCKER-USER"),
        jump: jump_rule("filter", FILTER_CHAIN),
        rules,
    }
}

/// Where geomx's chains hang: table, hook, and the chain whose jump geomx's must follow.
pub fn hook_of(chain: &str) -> Option<(&'static str, &'static str, Option<&'static str>)> {
    match chain {
        NAT_CHAIN => Some(("nat", "POSTROUTING", None)),
        FILTER_CHAIN => Some(("filter", "FORWARD", Some("DOCKER-USER"))),
        _ => None,
    }
}

/// The 1-based position the jump to `chain` belongs at in `hook` (as it is now, without
/// geomx's own jumps): right after the jump to `after`, or 1 when there is none.
pub fn wanted_position(hook: &[RuleSpec], chain: &str, after: Option<&str>) -> usize {
    let others: Vec<&RuleSpec> = hook.iter().filter(|r| r.target() != Some(chain)).collect();
    after
        .and_then(|a| others.iter().position(|r| r.target() == Some(a)))
        .map_or(1, |i| i + 2)
}

/// What one table needs: the iptables-restore payload that makes it so (applied with
/// `--noflush`, atomically) and the changes it makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableFix {
    /// The table.
    pub table: &'static str,
    /// The payload (`*table` ... `COMMIT`).
    pub payload: String,
    /// What it changes.
    pub changes: Vec<Change>,
}

/// The lines that bring `plan`'s chain and jump from `seen` to the plan, and the changes
/// they make; nothing when they match.
fn chain_lines(plan: &ChainPlan, seen: &ChainObserved) -> (Vec<String>, Vec<Change>) {
    let (table, chain, hook) = (plan.table, plan.chain, plan.hook);
    let mut lines = Vec::new();
    let mut changes = Vec::new();
    match &seen.chain {
        Some(actual) if *actual == plan.rules => {}
        actual => {
            // a chain line with --noflush creates the chain or empties it
            lines.push(format!(":{chain} - [0:0]"));
            for r in &plan.rules {
                lines.push(format!("-A {chain} {r}"));
            }
            changes.push(match actual {
                None => Change::ChainCreated {
                    table: table.into(),
                    chain: chain.into(),
                    rules: plan.rules.iter().map(|r| r.to_string()).collect(),
                },
                Some(actual) => Change::ChainRebuilt {
                    table: table.into(),
                    chain: chain.into(),
                    missing: plan
                        .rules
                        .iter()
                        .filter(|r| !actual.contains(r))
                        .map(|r| r.to_string())
                        .collect(),
                    unexpected: actual
                        .iter()
                        .filter(|r| !plan.rules.contains(r))
                        .map(|r| r.to_string())
                        .collect(),
                },
            });
        }
    }
    let jumps: Vec<(usize, &RuleSpec)> = seen
        .hook
        .iter()
        .enumerate()
        .filter(|(_, r)| r.target() == Some(chain))
        .collect();
    let want = wanted_position(&seen.hook, chain, plan.after) - 1;
    let in_place = matches!(jumps.as_slice(), [(i, r)] if *i == want && **r == plan.jump);
    if !in_place {
        for (_, r) in &jumps {
            lines.push(format!("-D {hook} {r}"));
        }
        lines.push(format!("-I {hook} {} {}", want + 1, plan.jump));
        changes.push(Change::JumpRestored {
            table: table.into(),
            hook: hook.into(),
            chain: chain.into(),
            position: want + 1,
            found_at: jumps.iter().map(|(i, _)| i + 1).collect(),
        });
    }
    (lines, changes)
}

fn payload(table: &str, lines: &[String]) -> String {
    let mut out = format!("*{table}\n");
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

/// The fix for one table's chain, `None` when it is as planned.
pub fn table_fix(plan: &ChainPlan, seen: &ChainObserved) -> Option<TableFix> {
    let (lines, changes) = chain_lines(plan, seen);
    (!lines.is_empty()).then(|| TableFix {
        table: plan.table,
        payload: payload(plan.table, &lines),
        changes,
    })
}

/// The fix that removes geomx's `chain` and every jump to it, `None` when there is none.
pub fn removal(chain: &'static str, seen: &ChainObserved) -> Option<TableFix> {
    let (table, hook, _) = hook_of(chain)?;
    let mut lines = Vec::new();
    let mut changes = Vec::new();
    for r in seen.hook.iter().filter(|r| r.target() == Some(chain)) {
        lines.push(format!("-D {hook} {r}"));
        changes.push(Change::JumpDeleted {
            table: table.into(),
            hook: hook.into(),
            chain: chain.into(),
        });
    }
    if seen.chain.is_some() {
        lines.push(format!("-F {chain}"));
        lines.push(format!("-X {chain}"));
        changes.push(Change::ChainDeleted {
            table: table.into(),
            chain: chain.into(),
        });
    }
    (!lines.is_empty()).then(|| TableFix {
        table,
        payload: payload(table, &lines),
        changes,
    })
}

/// A payload or rule line without `--random-fully`.
pub(crate) fn without_random_fully_text(text: &str) -> String {
    text.replace(" --random-fully", "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> DesiredNetwork {
        DesiredNetwork {
            subnet: "172.17.34.0/24".parse().expect("net"),
            cluster: "172.17.0.0/16".parse().expect("net"),
            peers: vec![],
            backend: Default::default(),
        }
    }

    fn peers() -> Vec<FilterPeer> {
        vec![
            FilterPeer {
                subnet: "172.17.40.0/24".parse().expect("net"),
                backend: PeerBackend::Wireguard,
                underlay_ip: "10.2.0.5".parse().expect("ip"),
                device: Some("eth0".into()),
            },
            FilterPeer {
                subnet: "172.17.29.0/24".parse().expect("net"),
                backend: PeerBackend::HostGw,
                underlay_ip: "10.1.1.29".parse().expect("ip"),
                device: Some("eth0".into()),
            },
            FilterPeer {
                subnet: "172.17.50.0/24".parse().expect("net"),
                backend: PeerBackend::Vxlan,
                underlay_ip: "10.3.0.5".parse().expect("ip"),
                device: None,
            },
        ]
    }

    #[test]
    fn rules_render_like_iptables_save() {
        let d = desired();
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
        assert_eq!(
            without_random_fully_text(&nat.rules[1].to_string()),
            nat_plan(&d, false).rules[1].to_string()
        );
        // as `iptables -S` prints them (checked against iptables 1.8.9, nft): addresses
        // with their prefix, peers in subnet order
        let filter = filter_plan(&d, &peers());
        let lines: Vec<String> = filter.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            lines,
            [
                r#"-o geomx-+ -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment "geomx: clamp MSS to the overlay MTU" -j TCPMSS --clamp-mss-to-pmtu"#,
                r#"-s 172.17.34.0/24 -m comment --comment "geomx: from this host's containers" -j ACCEPT"#,
                r#"-s 172.17.29.0/24 -d 172.17.34.0/24 -i eth0 -m comment --comment "geomx: from a peer's containers (host-gw)" -j ACCEPT"#,
                r#"-s 10.1.1.29/32 -d 172.17.34.0/24 -m comment --comment "geomx: from an on-link peer" -j ACCEPT"#,
                r#"-s 172.17.40.0/24 -d 172.17.34.0/24 -i geomx-wg -m comment --comment "geomx: from a peer's containers (wireguard)" -j ACCEPT"#,
                r#"-s 172.17.50.0/24 -d 172.17.34.0/24 -i geomx-vxlan -m comment --comment "geomx: from a peer's containers (vxlan)" -j ACCEPT"#,
            ]
        );
        // nothing accepts "to the cluster" from anywhere any more
        assert!(!lines.iter().any(|l| l.starts_with("-d 172.17.0.0/16")));
    }

    type Row = (&'static str, ChainObserved, Option<Vec<&'static str>>);

    #[test]
    fn table_fixes_are_minimal_and_keep_docker_user_first() {
        let d = desired();
        let plan = filter_plan(&d, &[]);
        let jump = plan.jump.clone();
        let user = RuleSpec::parse("-j DOCKER-USER");
        let docker = RuleSpec::parse("-o docker0 -j DOCKER");
        let chain = || Some(plan.rules.clone());
        let rows: Vec<Row> = vec![
            (
                "in place: nothing",
                ChainObserved {
                    hook: vec![user.clone(), jump.clone(), docker.clone()],
                    chain: chain(),
                },
                None,
            ),
            (
                "fresh host: chain and jump below DOCKER-USER",
                ChainObserved {
                    hook: vec![user.clone(), docker.clone()],
                    chain: None,
                },
                Some(vec![
                    ":GEOMX-FORWARD - [0:0]",
                    "-A GEOMX-FORWARD",
                    "-A GEOMX-FORWARD",
                    "-I FORWARD 2",
                ]),
            ),
            (
                "an older agent's jump above DOCKER-USER moves below it",
                ChainObserved {
                    hook: vec![jump.clone(), user.clone(), docker.clone()],
                    chain: chain(),
                },
                Some(vec!["-D FORWARD", "-I FORWARD 2"]),
            ),
            (
                "a duplicate jump is removed",
                ChainObserved {
                    hook: vec![user.clone(), jump.clone(), docker.clone(), jump.clone()],
                    chain: chain(),
                },
                Some(vec!["-D FORWARD", "-D FORWARD", "-I FORWARD 2"]),
            ),
            (
                "no DOCKER-USER (Docker not started yet): position 1",
                ChainObserved {
                    hook: vec![],
                    chain: chain(),
                },
                Some(vec!["-I FORWARD 1"]),
            ),
            (
                "a rule added by hand in geomx's chain: rebuilt",
                ChainObserved {
                    hook: vec![user.clone(), jump.clone()],
                    chain: Some({
                        let mut r = plan.rules.clone();
                        r.push(RuleSpec::parse("-j DROP"));
                        r
                    }),
                },
                Some(vec![
                    ":GEOMX-FORWARD - [0:0]",
                    "-A GEOMX-FORWARD",
                    "-A GEOMX-FORWARD",
                ]),
            ),
        ];
        for (what, seen, want) in rows {
            let fix = table_fix(&plan, &seen);
            match (fix, want) {
                (None, None) => {}
                (Some(fix), Some(want)) => {
                    let lines: Vec<&str> = fix.payload.lines().collect();
                    assert_eq!(lines.first(), Some(&"*filter"), "{what}");
                    assert_eq!(lines.last(), Some(&"COMMIT"), "{what}");
                    let body = &lines[1..lines.len() - 1];
                    assert_eq!(body.len(), want.len(), "{what}: {body:#?}");
                    for (l, w) in body.iter().zip(&want) {
                        assert!(l.starts_with(w), "{what}: {l:?} is not {w:?}");
                    }
                    assert!(!fix.changes.is_empty(), "{what}");
                }
                (fix, want) => panic!("{what}: got {fix:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn removal_deletes_jumps_then_the_chain() {
        let plan = nat_plan(&desired(), true);
        let seen = ChainObserved {
            hook: vec![plan.jump.clone(), RuleSpec::parse("-j MASQUERADE")],
            chain: Some(plan.rules.clone()),
        };
        let fix = removal(NAT_CHAIN, &seen).expect("something to remove");
        let lines: Vec<&str> = fix.payload.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert!(lines[1].starts_with("-D POSTROUTING "));
        assert_eq!(
            &lines[2..],
            ["-F GEOMX-POSTROUTING", "-X GEOMX-POSTROUTING", "COMMIT"]
        );
        assert_eq!(removal(NAT_CHAIN, &ChainObserved::default()), None);
    }
}
