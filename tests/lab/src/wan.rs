//! The geo-distributed lab's networks: one bridge namespace per data center, and one router
//! namespace (the WAN) with an interface into each, where the links are emulated.
//!
//! ```text
//!   host a ─┐                                     ┌─ host b
//!   host a2 ┴ br0 [<lab>-dc-dc1] gw ── wan0 [<lab>-ul router] wan1 ── gw [<lab>-dc-dc2] br0 ┘
//! ```
//!
//! A link's direction from data center i to j is shaped in the router, on packets that come in
//! on `wan<i>` and leave on `wan<j>`:
//! - cut: `-j DROP` in the filter table's FORWARD chain;
//! - loss: `-m statistic --mode random --probability P -j DROP` (FORWARD);
//! - delay and jitter: `-j NFQUEUE` to the lab's delay line ([`crate::delayline`]) where the
//!   kernel has no netem (this one has none);
//! - rate: `-j CLASSIFY` (mangle FORWARD) into an HTB class on `wan<j>`'s egress, one class per
//!   source data center, with a byte FIFO of about two bandwidth-delay products.
//!
//! Traffic inside a data center never reaches the router: it is bridged at LAN speed.
//! The rules and classes are rendered here from the topology (pure functions, tested) and
//! applied with one `iptables-restore` (atomic) and `tc ... replace` commands.

use std::time::Duration;

use crate::delayline::{DelayConfig, QueueDelay};
use crate::error::{LabError, Result};
use crate::netns::Netns;
use crate::topology::{Shape, Topology};

/// At most this many data centers (queue numbers and classes are derived from indexes).
pub const MAX_DCS: usize = 16;

/// The router's interface into data center `i`.
pub fn wan_if(i: usize) -> String {
    format!("wan{i}")
}

/// The namespace holding data center `dc`'s bridge (and its service address).
pub fn dc_netns(lab: &str, dc: &str) -> Netns {
    Netns::named(&format!("{lab}-dc-{dc}"))
}

/// The NFQUEUE number of the direction from data center `from` to `to`.
pub fn queue_num(from: usize, to: usize) -> u16 {
    (from * MAX_DCS + to + 1) as u16
}

/// The HTB class minor (hex in tc's notation) on `wan<to>` for traffic from data center
/// `from`.
pub fn class_minor(from: usize) -> u32 {
    0x10 + from as u32
}

/// The shape of the direction `from` → `to` (links are symmetric).
fn shape_of(topo: &Topology, from: usize, to: usize) -> Shape {
    topo.link(&topo.dcs[from].name, &topo.dcs[to].name)
        .map(|l| l.shape)
        .unwrap_or_default()
}

/// Every directed pair of data centers.
fn directions(topo: &Topology) -> Vec<(usize, usize)> {
    let n = topo.dcs.len();
    (0..n)
        .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
        .collect()
}

/// The delay line's configuration: one queue per direction.
pub fn delay_config(topo: &Topology) -> DelayConfig {
    DelayConfig {
        queues: directions(topo)
            .into_iter()
            .map(|(i, j)| {
                let s = shape_of(topo, i, j);
                QueueDelay {
                    queue: queue_num(i, j),
                    delay_us: s.delay.as_micros() as u64,
                    jitter_us: s.jitter.as_micros() as u64,
                }
            })
            .collect(),
    }
}

/// The router's whole ruleset, for `iptables-restore` (which replaces it atomically).
pub fn render_iptables(topo: &Topology) -> String {
    let mut mangle = String::from(
        "*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    let mut filter =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for (i, j) in directions(topo) {
        let s = shape_of(topo, i, j);
        let m = format!(
            "-A FORWARD -i {} -o {} -m comment --comment \"geomx-lab {}->{}",
            wan_if(i),
            wan_if(j),
            topo.dcs[i].name,
            topo.dcs[j].name
        );
        if s.cut {
            filter.push_str(&format!("{m} cut\" -j DROP\n"));
            continue;
        }
        if s.loss > 0.0 {
            filter.push_str(&format!(
                "{m} loss\" -m statistic --mode random --probability {:.6} -j DROP\n",
                s.loss
            ));
        }
        if !s.delay.is_zero() || !s.jitter.is_zero() {
            filter.push_str(&format!(
                "{m} delay\" -j NFQUEUE --queue-num {}\n",
                queue_num(i, j)
            ));
        }
        if s.rate_bps.is_some() {
            mangle.push_str(&format!(
                "{m} rate\" -j CLASSIFY --set-class 1:{:x}\n",
                class_minor(i)
            ));
        }
    }
    mangle.push_str("COMMIT\n");
    filter.push_str("COMMIT\n");
    mangle + &filter
}

/// Bytes a token bucket may send at once at `rate_bps`: 4 ms worth, at least one GSO packet.
fn burst_bytes(rate_bps: u64) -> u64 {
    (rate_bps / 8 / 250).max(64 * 1024 + 1514)
}

/// The FIFO in front of a rate limit: about two bandwidth-delay products of the round trip
/// (at least 10 ms), so that one TCP flow can fill the link.
fn queue_bytes(rate_bps: u64, delay: Duration) -> u64 {
    let rtt = (delay * 2).max(Duration::from_millis(10));
    ((rate_bps as f64 / 8.0 * rtt.as_secs_f64() * 2.0) as u64).max(128 * 1024)
}

/// The tc commands that make direction `from` → `to` carry `shape`'s rate, given what it had
/// before (`was`): a class and its FIFO replaced, or deleted when the rate goes away.
pub fn tc_commands(from: usize, to: usize, was: &Shape, shape: &Shape) -> Vec<Vec<String>> {
    let dev = wan_if(to);
    let minor = class_minor(from);
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    match shape.rate_bps {
        Some(r) => {
            let rate = format!("{r}bit");
            let burst = burst_bytes(r).to_string();
            vec![
                v(&[
                    "tc",
                    "class",
                    "replace",
                    "dev",
                    &dev,
                    "parent",
                    "1:",
                    "classid",
                    &format!("1:{minor:x}"),
                    "htb",
                    "rate",
                    &rate,
                    "ceil",
                    &rate,
                    "burst",
                    &burst,
                    "cburst",
                    &burst,
                    "quantum",
                    "60000",
                ]),
                v(&[
                    "tc",
                    "qdisc",
                    "replace",
                    "dev",
                    &dev,
                    "parent",
                    &format!("1:{minor:x}"),
                    "handle",
                    &format!("{minor:x}:"),
                    "bfifo",
                    "limit",
                    &queue_bytes(r, shape.delay).to_string(),
                ]),
            ]
        }
        None if was.rate_bps.is_some() => vec![v(&[
            "tc",
            "class",
            "del",
            "dev",
            &dev,
            "classid",
            &format!("1:{minor:x}"),
        ])],
        None => Vec::new(),
    }
}

/// Builds the data centers' bridges and the router. `router` exists already (it is the lab's
/// underlay namespace); every namespace made here is named by [`dc_netns`].
pub fn build(lab: &str, router: &Netns, topo: &Topology) -> Result<()> {
    if topo.dcs.len() > MAX_DCS {
        return Err(LabError::Setup(format!(
            "a lab has at most {MAX_DCS} data centers, this topology has {}",
            topo.dcs.len()
        )));
    }
    router.run(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
    for (i, dc) in topo.dcs.iter().enumerate() {
        let ns = Netns::create(&dc_netns(lab, &dc.name).name())?;
        ns.run(&["ip", "link", "add", "br0", "type", "bridge"])?;
        ns.run(&["ip", "link", "set", "br0", "up"])?;
        let prefix = dc.subnet.prefix_len();
        ns.run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/{prefix}", dc.service_ip()),
            "dev",
            "br0",
        ])?;
        let wan = wan_if(i);
        router.run(&[
            "ip",
            "link",
            "add",
            &wan,
            "type",
            "veth",
            "peer",
            "name",
            "gw",
            "netns",
            &ns.name(),
        ])?;
        ns.run(&["ip", "link", "set", "gw", "master", "br0", "up"])?;
        router.run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/{prefix}", dc.gateway()),
            "dev",
            &wan,
        ])?;
        router.run(&["ip", "link", "set", &wan, "up"])?;
        ns.run(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &dc.gateway().to_string(),
        ])?;
        // unclassified traffic takes HTB's direct queue: unshaped
        router.run(&[
            "tc", "qdisc", "replace", "dev", &wan, "root", "handle", "1:", "htb",
        ])?;
    }
    Ok(())
}

/// Applies the links of `topo` in the router (given what they were before): tc classes first
/// for new rates, then the whole ruleset at once. The delay line must already know the new
/// delays (see [`delay_config`]).
pub fn apply_links(router: &Netns, before: Option<&Topology>, topo: &Topology) -> Result<()> {
    for (i, j) in directions(topo) {
        let was = before.map(|b| shape_of(b, i, j)).unwrap_or_default();
        let now = shape_of(topo, i, j);
        for c in tc_commands(i, j, &was, &now) {
            router.run(&c)?;
        }
    }
    let rules = render_iptables(topo);
    let mut c = router.command("iptables-restore");
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().map_err(|e| LabError::Spawn {
        command: "iptables-restore".into(),
        source: e,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(rules.as_bytes())
            .map_err(|e| LabError::io("iptables-restore stdin", e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| LabError::io("iptables-restore", e))?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: "iptables-restore (the router's link rules)".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::parse_topology;

    fn topo() -> Topology {
        parse_topology(
            "t",
            r#"
[[dc]]
name = "dc1"
subnet = "10.1.1.0/24"
hosts = ["a"]
[[dc]]
name = "dc2"
subnet = "10.2.1.0/24"
[[dc]]
name = "dc3"
subnet = "10.3.1.0/24"
[[link]]
dcs = ["dc1", "dc2"]
delay = "40ms"
jitter = "5ms"
rate = "200mbit"
loss = "0.1%"
[[link]]
dcs = ["dc3", "dc2"]
rate = "100mbit"
"#,
        )
        .unwrap()
        .topology
    }

    #[test]
    fn rules_shape_each_direction_and_leave_unshaped_links_alone() {
        let t = topo();
        let r = render_iptables(&t);
        let filter: Vec<&str> = r
            .lines()
            .filter(|l| l.contains("NFQUEUE") || l.contains("DROP"))
            .collect();
        assert_eq!(
            filter,
            vec![
                "-A FORWARD -i wan0 -o wan1 -m comment --comment \"geomx-lab dc1->dc2 loss\" -m statistic --mode random --probability 0.001000 -j DROP",
                "-A FORWARD -i wan0 -o wan1 -m comment --comment \"geomx-lab dc1->dc2 delay\" -j NFQUEUE --queue-num 2",
                "-A FORWARD -i wan1 -o wan0 -m comment --comment \"geomx-lab dc2->dc1 loss\" -m statistic --mode random --probability 0.001000 -j DROP",
                "-A FORWARD -i wan1 -o wan0 -m comment --comment \"geomx-lab dc2->dc1 delay\" -j NFQUEUE --queue-num 17",
            ]
        );
        let classify: Vec<&str> = r.lines().filter(|l| l.contains("CLASSIFY")).collect();
        assert_eq!(classify.len(), 4, "{r}");
        assert!(
            classify[0].contains("-i wan0 -o wan1") && classify[0].ends_with("--set-class 1:10")
        );
        assert!(
            classify
                .iter()
                .any(|l| l.contains("-i wan2 -o wan1") && l.ends_with("1:12"))
        );
        // dc1 - dc3 is unshaped: nothing mentions that pair
        assert!(!r.contains("-i wan0 -o wan2") && !r.contains("-i wan2 -o wan0"));
        assert_eq!(r.matches("COMMIT").count(), 2);
    }

    #[test]
    fn a_cut_drops_everything_and_nothing_else_applies() {
        let mut t = topo();
        t.links[0].shape.cut = true;
        let r = render_iptables(&t);
        let dc1_dc2: Vec<&str> = r
            .lines()
            .filter(|l| l.contains("-i wan0 -o wan1"))
            .collect();
        assert_eq!(dc1_dc2.len(), 1);
        assert!(dc1_dc2[0].ends_with("cut\" -j DROP"));
    }

    #[test]
    fn the_delay_line_gets_every_direction() {
        let c = delay_config(&topo());
        assert_eq!(c.queues.len(), 6);
        let q = c
            .queues
            .iter()
            .find(|q| q.queue == queue_num(1, 0))
            .unwrap();
        assert_eq!((q.delay_us, q.jitter_us), (40_000, 5_000));
        let q = c
            .queues
            .iter()
            .find(|q| q.queue == queue_num(2, 1))
            .unwrap();
        assert_eq!((q.delay_us, q.jitter_us), (0, 0));
    }

    #[test]
    fn rates_become_classes_and_go_away_again() {
        let t = topo();
        let s = t.links[0].shape;
        let cmds = tc_commands(0, 1, &Shape::default(), &s);
        assert_eq!(cmds.len(), 2);
        assert_eq!(
            cmds[0][..12].join(" "),
            "tc class replace dev wan1 parent 1: classid 1:10 htb rate 200000000bit"
        );
        // two round trips of 80 ms at 25 MB/s
        assert_eq!(cmds[1].last().unwrap(), "4000000");
        let none = Shape::default();
        assert_eq!(
            tc_commands(0, 1, &s, &none),
            vec![
                vec!["tc", "class", "del", "dev", "wan1", "classid", "1:10"]
                    .into_iter()
                    .map(String::from)
                    .collect::<Vec<_>>()
            ]
        );
        assert!(tc_commands(0, 1, &none, &none).is_empty());
    }
}
