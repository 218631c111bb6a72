//! A geo-distributed lab's shape: data centers, each its own routed IPv4 network, and the WAN
//! links between them with their delay, jitter, rate and loss.
//!
//! Read from a TOML topology file (`geomx-lab up --topology FILE`); every problem is reported
//! as `FILE:LINE:COL: what is wrong`. The checks and the address assignment here are pure;
//! building the networks is [`crate::wan`]'s.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use geomx_proto::config_file::{TomlError, line_col, parse_toml};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::{LabError, Result};
use crate::lab::{HostSpec, valid_host_name};

/// Longest data center name: it becomes part of namespace and interface names.
pub const MAX_DC_NAME: usize = 12;
/// The highest rate a link can be given (the emulation is measured up to a few hundred Mbit).
pub const MAX_RATE_BPS: u64 = 10_000_000_000;
/// The lowest rate a link can be given.
pub const MIN_RATE_BPS: u64 = 8_000;
/// The longest one-way delay or jitter a link can be given.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// One data center: its own bridge and IPv4 network behind the WAN router.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCenter {
    /// Name, `[a-z0-9-]`, at most [`MAX_DC_NAME`] characters.
    pub name: String,
    /// The data center's underlay network.
    pub subnet: Ipv4Net,
}

impl DataCenter {
    /// The data center's gateway: the WAN router's address in it (the subnet's first address).
    pub fn gateway(&self) -> Ipv4Addr {
        nth_host(self.subnet, 1)
    }

    /// The data center's service address (its last usable address), carried by the namespace
    /// of its bridge: where the controller (and other lab services) listen in that data center.
    pub fn service_ip(&self) -> Ipv4Addr {
        let last = u32::from(self.subnet.broadcast()) - 1;
        Ipv4Addr::from(last)
    }

    /// Whether `ip` is an address a host may take in this data center.
    pub fn host_address_ok(&self, ip: Ipv4Addr) -> bool {
        self.subnet.contains(&ip)
            && ip != self.subnet.network()
            && ip != self.subnet.broadcast()
            && ip != self.gateway()
            && ip != self.service_ip()
    }
}

fn nth_host(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// What a WAN link does to packets, in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    /// One-way delay.
    #[serde(with = "micros")]
    pub delay: Duration,
    /// Jitter: each packet's delay varies uniformly within `delay ± jitter` (packets keep their
    /// order).
    #[serde(with = "micros")]
    pub jitter: Duration,
    /// Rate limit in bits per second; `None` is unshaped.
    pub rate_bps: Option<u64>,
    /// Random loss, a fraction in `[0, 1)`.
    pub loss: f64,
    /// Cut: nothing passes either way.
    #[serde(default)]
    pub cut: bool,
}

impl Shape {
    /// Whether packets pass untouched (no delay, jitter, rate limit, loss or cut).
    pub fn is_unshaped(&self) -> bool {
        self.delay.is_zero()
            && self.jitter.is_zero()
            && self.rate_bps.is_none()
            && self.loss == 0.0
            && !self.cut
    }

    /// Checks the values' ranges (`what` names the link in messages).
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.delay > MAX_DELAY || self.jitter > MAX_DELAY {
            return Err(format!(
                "delay and jitter are at most {}s",
                MAX_DELAY.as_secs()
            ));
        }
        if self.jitter > self.delay {
            return Err(format!(
                "jitter {} is larger than the delay {}: a packet's delay would be negative",
                fmt_duration(self.jitter),
                fmt_duration(self.delay)
            ));
        }
        if let Some(r) = self.rate_bps
            && !(MIN_RATE_BPS..=MAX_RATE_BPS).contains(&r)
        {
            return Err(format!(
                "rate {} is outside 8kbit..10gbit",
                fmt_rate(Some(r))
            ));
        }
        if !(0.0..1.0).contains(&self.loss) {
            return Err(format!("loss {}% is outside 0%..100%", self.loss * 100.0));
        }
        Ok(())
    }
}

mod micros {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_micros() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}

/// A WAN link between two data centers (every pair has one; an unlisted pair is unshaped).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// The two data centers, in topology order.
    pub dcs: [String; 2],
    /// What it does to packets (the same both ways).
    pub shape: Shape,
}

/// A geo-distributed lab's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    /// The data centers, in file order.
    pub dcs: Vec<DataCenter>,
    /// One link for every pair of data centers, in pair order (dc 0-1, 0-2, ..., 1-2, ...).
    pub links: Vec<Link>,
    /// Where the controller lives.
    pub controller_dc: String,
    /// Where the registry lives when the lab runs one (`[registry] dc`; default the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_dc: Option<String>,
}

impl Topology {
    /// A data center by name.
    pub fn dc(&self, name: &str) -> Result<&DataCenter> {
        self.dcs.iter().find(|d| d.name == name).ok_or_else(|| {
            LabError::Setup(format!(
                "the lab has no data center {name:?} (it has {})",
                self.dcs
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// The index of a data center.
    pub fn dc_index(&self, name: &str) -> Result<usize> {
        let dc = self.dc(name)?;
        Ok(self.dcs.iter().position(|d| d == dc).unwrap_or_default())
    }

    /// The link between two data centers (either order).
    pub fn link(&self, a: &str, b: &str) -> Result<&Link> {
        let i = self.link_index(a, b)?;
        Ok(&self.links[i])
    }

    /// Where the link between `a` and `b` is in [`Topology::links`].
    pub fn link_index(&self, a: &str, b: &str) -> Result<usize> {
        let (ia, ib) = (self.dc_index(a)?, self.dc_index(b)?);
        if ia == ib {
            return Err(LabError::Setup(format!(
                "a link joins two different data centers, not {a} with itself"
            )));
        }
        let (lo, hi) = (ia.min(ib), ia.max(ib));
        self.links
            .iter()
            .position(|l| l.dcs[0] == self.dcs[lo].name && l.dcs[1] == self.dcs[hi].name)
            .ok_or_else(|| LabError::Setup(format!("no link between {a} and {b}")))
    }

    /// The data center an address belongs to.
    pub fn dc_of(&self, ip: Ipv4Addr) -> Option<&DataCenter> {
        self.dcs.iter().find(|d| d.subnet.contains(&ip))
    }
}

/// A topology file read: the topology and its hosts (each with its data center).
#[derive(Clone, Debug, PartialEq)]
pub struct TopologyFile {
    /// The networks and links.
    pub topology: Topology,
    /// Every host, addresses assigned.
    pub hosts: Vec<HostSpec>,
}

// ----- the file format -----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    dc: Vec<Spanned<DcDoc>>,
    #[serde(default)]
    link: Vec<Spanned<LinkDoc>>,
    controller: Option<ControllerDoc>,
    registry: Option<RegistryDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DcDoc {
    name: Spanned<String>,
    subnet: Spanned<String>,
    #[serde(default)]
    hosts: Vec<Spanned<toml::Value>>,
}

/// A host entry: a plain name, or `{ name = "a", ip = "10.1.1.34" }`.
fn host_entry(v: &toml::Value) -> std::result::Result<(String, Option<String>), String> {
    match v {
        toml::Value::String(n) => Ok((n.clone(), None)),
        toml::Value::Table(t) => {
            if let Some(k) = t.keys().find(|k| *k != "name" && *k != "ip") {
                return Err(format!(
                    "unknown key `{k}` in a host: give {{ name = \"a\", ip = \"10.1.1.34\" }} or a plain name"
                ));
            }
            let name = match t.get("name") {
                Some(toml::Value::String(n)) => n.clone(),
                Some(_) => return Err("a host's name is a string".into()),
                None => {
                    return Err("a host needs a name: { name = \"a\", ip = \"10.1.1.34\" }".into());
                }
            };
            let ip = match t.get("ip") {
                Some(toml::Value::String(ip)) => Some(ip.clone()),
                Some(_) => {
                    return Err(format!("host {name}: ip is a string such as \"10.1.1.34\""));
                }
                None => None,
            };
            Ok((name, ip))
        }
        _ => {
            Err("a host is a name (\"a\") or a table ({ name = \"a\", ip = \"10.1.1.34\" })".into())
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkDoc {
    dcs: Spanned<Vec<String>>,
    delay: Option<Spanned<String>>,
    jitter: Option<Spanned<String>>,
    rate: Option<Spanned<String>>,
    loss: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControllerDoc {
    dc: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryDoc {
    dc: Spanned<String>,
}

/// A problem in a topology file, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyError {
    /// The file as given.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

impl std::error::Error for TopologyError {}

/// Reads a topology file.
pub fn read_topology(path: &Path) -> Result<TopologyFile> {
    let text = std::fs::read_to_string(path).map_err(|e| LabError::io(path, e))?;
    parse_topology(&path.display().to_string(), &text).map_err(|e| LabError::Setup(e.to_string()))
}

/// Parses topology text; `file` names it in errors.
pub fn parse_topology(file: &str, text: &str) -> std::result::Result<TopologyFile, TopologyError> {
    let doc: FileDoc = parse_toml(text).map_err(|e: TomlError| TopologyError {
        file: file.into(),
        line: e.line,
        col: e.col,
        message: e.message,
    })?;
    let at = |span: std::ops::Range<usize>, message: String| {
        let (line, col) = line_col(text, span.start);
        TopologyError {
            file: file.into(),
            line,
            col,
            message,
        }
    };
    if doc.dc.is_empty() {
        return Err(at(
            0..0,
            "no [[dc]]: a topology has at least one data center".into(),
        ));
    }

    let mut dcs: Vec<DataCenter> = Vec::new();
    for d in &doc.dc {
        let dd = d.get_ref();
        let name = dd.name.get_ref();
        if !valid_dc_name(name) {
            return Err(at(
                dd.name.span(),
                format!(
                    "data center name {name:?}: use 1..{MAX_DC_NAME} characters [a-z0-9-], starting with a letter or digit"
                ),
            ));
        }
        if dcs.iter().any(|o| &o.name == name) {
            return Err(at(
                dd.name.span(),
                format!("data center {name} is listed twice"),
            ));
        }
        let subnet: Ipv4Net = dd.subnet.get_ref().parse().map_err(|_| {
            at(
                dd.subnet.span(),
                format!(
                    "subnet {:?} of data center {name} is not an IPv4 network like \"10.1.1.0/24\"",
                    dd.subnet.get_ref()
                ),
            )
        })?;
        if subnet.trunc() != subnet {
            return Err(at(
                dd.subnet.span(),
                format!(
                    "subnet {subnet} of data center {name} has host bits set (did you mean {}?)",
                    subnet.trunc()
                ),
            ));
        }
        if subnet.prefix_len() > 28 || subnet.prefix_len() < 16 {
            return Err(at(
                dd.subnet.span(),
                format!("subnet {subnet} of data center {name}: use a prefix from /16 to /28"),
            ));
        }
        let reserved: Ipv4Net = "172.16.0.0/12".parse().unwrap_or(subnet);
        if subnet.contains(&reserved.network())
            || reserved.contains(&subnet.network())
            || subnet.contains(&Ipv4Addr::LOCALHOST)
        {
            return Err(at(
                dd.subnet.span(),
                format!(
                    "subnet {subnet} of data center {name} overlaps 172.16.0.0/12 (container subnets) or loopback"
                ),
            ));
        }
        if let Some(o) = dcs
            .iter()
            .find(|o| o.subnet.contains(&subnet.network()) || subnet.contains(&o.subnet.network()))
        {
            return Err(at(
                dd.subnet.span(),
                format!(
                    "subnet {subnet} of data center {name} overlaps {} of data center {}: data centers share no network",
                    o.subnet, o.name
                ),
            ));
        }
        dcs.push(DataCenter {
            name: name.clone(),
            subnet,
        });
    }

    // hosts: fixed addresses first, then the plain names get the lowest free ones
    let mut names = BTreeSet::new();
    let mut taken = BTreeSet::new();
    let mut pending: Vec<(usize, usize, String, std::ops::Range<usize>)> = Vec::new();
    let mut hosts: Vec<Option<HostSpec>> = Vec::new();
    for (di, d) in doc.dc.iter().enumerate() {
        let dc = &dcs[di];
        for h in &d.get_ref().hosts {
            let (name, ip) = host_entry(h.get_ref()).map_err(|e| at(h.span(), e))?;
            if !valid_host_name(&name) {
                return Err(at(
                    h.span(),
                    format!("host name {name:?}: use 1..12 characters [a-z0-9], not \"ul\""),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(at(h.span(), format!("host {name} is listed twice")));
            }
            match ip {
                Some(ip) => {
                    let ip: Ipv4Addr = ip.parse().map_err(|_| {
                        at(
                            h.span(),
                            format!("host {name}: {ip:?} is not an IPv4 address"),
                        )
                    })?;
                    if !dc.host_address_ok(ip) {
                        return Err(at(
                            h.span(),
                            format!(
                                "host {name}: {ip} is not a host address of data center {} ({}; {} is its gateway, {} its service address)",
                                dc.name,
                                dc.subnet,
                                dc.gateway(),
                                dc.service_ip()
                            ),
                        ));
                    }
                    if !taken.insert(ip) {
                        return Err(at(
                            h.span(),
                            format!("host {name}: address {ip} is used twice"),
                        ));
                    }
                    hosts.push(Some(HostSpec {
                        name,
                        underlay_ip: ip,
                        dc: Some(dc.name.clone()),
                    }));
                }
                None => {
                    pending.push((hosts.len(), di, name, h.span()));
                    hosts.push(None);
                }
            }
        }
    }
    for (slot, di, name, span) in pending {
        let dc = &dcs[di];
        let ip = dc
            .subnet
            .hosts()
            .find(|ip| dc.host_address_ok(*ip) && !taken.contains(ip))
            .ok_or_else(|| {
                at(
                    span,
                    format!(
                        "host {name}: data center {} has no free address left",
                        dc.name
                    ),
                )
            })?;
        taken.insert(ip);
        hosts[slot] = Some(HostSpec {
            name,
            underlay_ip: ip,
            dc: Some(dc.name.clone()),
        });
    }
    let hosts: Vec<HostSpec> = hosts.into_iter().flatten().collect();

    // links: every pair, shaped as listed
    let mut links: Vec<Link> = Vec::new();
    for i in 0..dcs.len() {
        for j in i + 1..dcs.len() {
            links.push(Link {
                dcs: [dcs[i].name.clone(), dcs[j].name.clone()],
                shape: Shape::default(),
            });
        }
    }
    let mut listed = BTreeSet::new();
    for l in &doc.link {
        let ld = l.get_ref();
        let pair = ld.dcs.get_ref();
        if pair.len() != 2 || pair[0] == pair[1] {
            return Err(at(
                ld.dcs.span(),
                "a [[link]] joins exactly two different data centers: dcs = [\"dc1\", \"dc2\"]"
                    .into(),
            ));
        }
        let mut idx = [0usize; 2];
        for (k, n) in pair.iter().enumerate() {
            idx[k] = dcs.iter().position(|d| &d.name == n).ok_or_else(|| {
                at(
                    ld.dcs.span(),
                    format!(
                        "unknown data center {n:?} (the file has {})",
                        dcs.iter()
                            .map(|d| d.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
        }
        let (lo, hi) = (idx[0].min(idx[1]), idx[0].max(idx[1]));
        if !listed.insert((lo, hi)) {
            return Err(at(
                ld.dcs.span(),
                format!(
                    "the link {} - {} is listed twice",
                    dcs[lo].name, dcs[hi].name
                ),
            ));
        }
        let mut shape = Shape::default();
        if let Some(v) = &ld.delay {
            shape.delay =
                parse_duration(v.get_ref()).map_err(|e| at(v.span(), format!("delay: {e}")))?;
        }
        if let Some(v) = &ld.jitter {
            shape.jitter =
                parse_duration(v.get_ref()).map_err(|e| at(v.span(), format!("jitter: {e}")))?;
        }
        if let Some(v) = &ld.rate {
            shape.rate_bps =
                parse_rate(v.get_ref()).map_err(|e| at(v.span(), format!("rate: {e}")))?;
        }
        if let Some(v) = &ld.loss {
            shape.loss = parse_loss(v.get_ref()).map_err(|e| at(v.span(), format!("loss: {e}")))?;
        }
        shape.check().map_err(|e| {
            at(
                l.span(),
                format!("link {} - {}: {e}", dcs[lo].name, dcs[hi].name),
            )
        })?;
        let k = links
            .iter()
            .position(|x| x.dcs[0] == dcs[lo].name && x.dcs[1] == dcs[hi].name)
            .unwrap_or_default();
        links[k].shape = shape;
    }

    let controller_dc = match &doc.controller {
        None => dcs[0].name.clone(),
        Some(c) => {
            let n = c.dc.get_ref();
            if !dcs.iter().any(|d| &d.name == n) {
                return Err(at(
                    c.dc.span(),
                    format!("controller: unknown data center {n:?}"),
                ));
            }
            n.clone()
        }
    };
    let registry_dc = match &doc.registry {
        None => None,
        Some(r) => {
            let n = r.dc.get_ref();
            if !dcs.iter().any(|d| &d.name == n) {
                return Err(at(
                    r.dc.span(),
                    format!("registry: unknown data center {n:?}"),
                ));
            }
            Some(n.clone())
        }
    };
    if hosts.is_empty() {
        return Err(at(
            0..0,
            "no hosts: give at least one data center hosts = [...]".into(),
        ));
    }
    Ok(TopologyFile {
        topology: Topology {
            dcs,
            links,
            controller_dc,
            registry_dc,
        },
        hosts,
    })
}

/// Whether `name` is a valid data center name.
pub fn valid_dc_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DC_NAME
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Parses a duration such as `40ms`, `1.5ms`, `250us`, `2s` or `0`.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let (num, mult_us) = if let Some(n) = t.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 1_000.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return Err(format!(
            "{s:?}: give a unit, e.g. \"40ms\", \"250us\" or \"1s\""
        ));
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number with a unit like \"40ms\""))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is negative"));
    }
    let us = v * mult_us;
    if us > MAX_DELAY.as_micros() as f64 {
        return Err(format!("{s:?} is longer than {}s", MAX_DELAY.as_secs()));
    }
    Ok(Duration::from_micros(us.round() as u64))
}

/// Parses a rate in bits per second such as `200mbit`, `1gbit`, `512kbit`; `0` or `none` is
/// unshaped.
pub fn parse_rate(s: &str) -> std::result::Result<Option<u64>, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "0" || t == "none" || t == "unlimited" {
        return Ok(None);
    }
    let (num, mult) = if let Some(n) = t.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = t.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = t.strip_suffix("kbit") {
        (n, 1e3)
    } else if let Some(n) = t.strip_suffix("bit") {
        (n, 1.0)
    } else {
        return Err(format!(
            "{s:?}: give bits per second with a unit: \"200mbit\", \"1gbit\", \"512kbit\" (as tc does; \"bps\" would be bytes)"
        ));
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number with a unit like \"200mbit\""))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("{s:?} is not a positive rate"));
    }
    let bps = (v * mult).round();
    if bps < MIN_RATE_BPS as f64 || bps > MAX_RATE_BPS as f64 {
        return Err(format!("{s:?} is outside 8kbit..10gbit"));
    }
    Ok(Some(bps as u64))
}

/// Parses a loss percentage such as `0.1%` or `0`.
pub fn parse_loss(s: &str) -> std::result::Result<f64, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(0.0);
    }
    let num = t
        .strip_suffix('%')
        .ok_or_else(|| format!("{s:?}: give a percentage, e.g. \"0.1%\""))?;
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage like \"0.1%\""))?;
    if !v.is_finite() || !(0.0..100.0).contains(&v) {
        return Err(format!("{s:?} is outside 0%..100%"));
    }
    Ok(v / 100.0)
}

/// A duration as the topology file writes it (`40ms`, `250us`, `0`).
pub fn fmt_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us == 0 {
        "0".into()
    } else if us.is_multiple_of(1000) {
        format!("{}ms", us / 1000)
    } else {
        format!("{}us", us)
    }
}

/// A rate as the topology file writes it (`200mbit`, `-` when unshaped).
pub fn fmt_rate(r: Option<u64>) -> String {
    match r {
        None => "-".into(),
        Some(b) if b.is_multiple_of(1_000_000_000) => format!("{}gbit", b / 1_000_000_000),
        Some(b) if b.is_multiple_of(1_000_000) => format!("{}mbit", b / 1_000_000),
        Some(b) if b.is_multiple_of(1_000) => format!("{}kbit", b / 1_000),
        Some(b) => format!("{b}bit"),
    }
}

/// A loss fraction as a percentage (`0.1%`).
pub fn fmt_loss(l: f64) -> String {
    if l == 0.0 {
        "0".into()
    } else {
        let s = format!("{:.4}", l * 100.0);
        format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[[dc]]
name = "dc1"
subnet = "10.1.1.0/24"
hosts = [{ name = "a", ip = "10.1.1.34" }]
[[dc]]
name = "dc2"
subnet = "10.2.1.0/24"
hosts = [{ name = "b", ip = "10.2.1.29" }, "b2"]

[[link]]
dcs = ["dc1", "dc2"]
delay = "40ms"
jitter = "5ms"
rate = "200mbit"
loss = "0.1%"

[controller]
dc = "dc1"
"#;

    #[test]
    fn the_issue_example_reads_with_addresses_assigned() {
        let t = parse_topology("t.toml", EXAMPLE).unwrap();
        assert_eq!(t.topology.dcs.len(), 2);
        assert_eq!(t.hosts[0].underlay_ip, Ipv4Addr::new(10, 1, 1, 34));
        assert_eq!(t.hosts[1].underlay_ip, Ipv4Addr::new(10, 2, 1, 29));
        // the first free host address after the gateway .1
        assert_eq!(t.hosts[2].underlay_ip, Ipv4Addr::new(10, 2, 1, 2));
        assert_eq!(t.hosts[2].dc.as_deref(), Some("dc2"));
        let l = t.topology.link("dc2", "dc1").unwrap();
        assert_eq!(l.shape.delay, Duration::from_millis(40));
        assert_eq!(l.shape.jitter, Duration::from_millis(5));
        assert_eq!(l.shape.rate_bps, Some(200_000_000));
        assert!((l.shape.loss - 0.001).abs() < 1e-12);
        assert_eq!(t.topology.controller_dc, "dc1");
        assert_eq!(t.topology.registry_dc, None);
        let dc1 = t.topology.dc("dc1").unwrap();
        assert_eq!(dc1.gateway(), Ipv4Addr::new(10, 1, 1, 1));
        assert_eq!(dc1.service_ip(), Ipv4Addr::new(10, 1, 1, 254));
    }

    #[test]
    fn unlisted_pairs_get_unshaped_links() {
        let text = "[[dc]]\nname=\"x\"\nsubnet=\"10.1.0.0/24\"\nhosts=[\"a\"]\n\
                    [[dc]]\nname=\"y\"\nsubnet=\"10.2.0.0/24\"\n\
                    [[dc]]\nname=\"z\"\nsubnet=\"10.3.0.0/24\"\n";
        let t = parse_topology("t", text).unwrap();
        assert_eq!(t.topology.links.len(), 3);
        assert!(t.topology.links.iter().all(|l| l.shape.is_unshaped()));
        assert_eq!(
            t.topology.link("z", "x").unwrap().dcs,
            ["x".to_string(), "z".to_string()]
        );
    }

    fn err(text: &str) -> String {
        parse_topology("t.toml", text).unwrap_err().to_string()
    }

    const DC1: &str = "[[dc]]\nname = \"dc1\"\nsubnet = \"10.1.1.0/24\"\nhosts = [\"a\"]\n";
    const DC2: &str = "[[dc]]\nname = \"dc2\"\nsubnet = \"10.2.1.0/24\"\nhosts = [\"b\"]\n";

    #[test]
    fn bad_files_are_refused_at_their_line_and_column() {
        let cases: Vec<(String, &str)> = vec![
            (format!("{DC1}colour = \"red\"\n"), "t.toml:5:1: unknown field `colour`"),
            ("".into(), "t.toml:1:1: missing field `dc`"),
            ("dc = []\n".into(), "no [[dc]]"),
            (
                "[[dc]]\nname = \"DC 1\"\nsubnet = \"10.1.1.0/24\"\n".into(),
                "t.toml:2:8: data center name \"DC 1\"",
            ),
            (
                "[[dc]]\nname = \"dc1\"\nsubnet = \"10.1.1.0\"\n".into(),
                "t.toml:3:10: subnet \"10.1.1.0\" of data center dc1 is not an IPv4 network",
            ),
            (
                "[[dc]]\nname = \"dc1\"\nsubnet = \"10.1.1.5/24\"\n".into(),
                "has host bits set (did you mean 10.1.1.0/24?)",
            ),
            (
                "[[dc]]\nname = \"dc1\"\nsubnet = \"172.17.0.0/24\"\n".into(),
                "overlaps 172.16.0.0/12",
            ),
            (
                format!("{DC1}[[dc]]\nname = \"dc2\"\nsubnet = \"10.1.0.0/16\"\n"),
                "t.toml:7:10: subnet 10.1.0.0/16 of data center dc2 overlaps 10.1.1.0/24 of data center dc1",
            ),
            (
                format!("{DC1}[[dc]]\nname = \"dc1\"\nsubnet = \"10.2.0.0/24\"\n"),
                "t.toml:6:8: data center dc1 is listed twice",
            ),
            (
                "[[dc]]\nname = \"dc1\"\nsubnet = \"10.1.1.0/24\"\nhosts = [{ name = \"a\", ip = \"10.1.1.1\" }]\n".into(),
                "t.toml:4:10: host a: 10.1.1.1 is not a host address of data center dc1 (10.1.1.0/24; 10.1.1.1 is its gateway, 10.1.1.254 its service address)",
            ),
            (
                "[[dc]]\nname = \"dc1\"\nsubnet = \"10.1.1.0/24\"\nhosts = [{ name = \"a\", ip = \"10.2.1.5\" }]\n".into(),
                "host a: 10.2.1.5 is not a host address of data center dc1",
            ),
            (
                format!("{DC1}[[dc]]\nname = \"dc2\"\nsubnet = \"10.2.1.0/24\"\nhosts = [\"a\"]\n"),
                "t.toml:8:10: host a is listed twice",
            ),
            (
                "[[dc]]\nname = \"dc1\"\nsubnet = \"10.1.1.0/24\"\nhosts = [\"A-1\"]\n".into(),
                "host name \"A-1\"",
            ),
            (
                "[[dc]]\nname = \"dc1\"\nsubnet = \"10.1.1.0/24\"\nhosts = [{ name = \"a\", addr = \"10.1.1.5\" }]\n".into(),
                "t.toml:4:10: unknown key `addr` in a host",
            ),
            (
                format!("{DC1}{DC2}[[link]]\ndcs = [\"dc1\", \"dc3\"]\n"),
                "t.toml:10:7: unknown data center \"dc3\" (the file has dc1, dc2)",
            ),
            (
                format!("{DC1}{DC2}[[link]]\ndcs = [\"dc1\"]\n"),
                "a [[link]] joins exactly two different data centers",
            ),
            (
                format!("{DC1}{DC2}[[link]]\ndcs = [\"dc1\", \"dc2\"]\n[[link]]\ndcs = [\"dc2\", \"dc1\"]\n"),
                "t.toml:12:7: the link dc1 - dc2 is listed twice",
            ),
            (
                format!("{DC1}{DC2}[[link]]\ndcs = [\"dc1\", \"dc2\"]\ndelay = \"40\"\n"),
                "t.toml:11:9: delay: \"40\": give a unit",
            ),
            (
                format!("{DC1}{DC2}[[link]]\ndcs = [\"dc1\", \"dc2\"]\nrate = \"200mbps\"\n"),
                "rate: \"200mbps\": give bits per second with a unit",
            ),
            (
                format!("{DC1}{DC2}[[link]]\ndcs = [\"dc1\", \"dc2\"]\nloss = \"0.1\"\n"),
                "loss: \"0.1\": give a percentage",
            ),
            (
                format!("{DC1}{DC2}[[link]]\ndcs = [\"dc1\", \"dc2\"]\nloss = \"100%\"\n"),
                "outside 0%..100%",
            ),
            (
                format!("{DC1}{DC2}[[link]]\ndcs = [\"dc1\", \"dc2\"]\ndelay = \"5ms\"\njitter = \"6ms\"\n"),
                "link dc1 - dc2: jitter 6ms is larger than the delay 5ms",
            ),
            (
                format!("{DC1}[controller]\ndc = \"dc9\"\n"),
                "t.toml:6:6: controller: unknown data center \"dc9\"",
            ),
            (
                format!("{DC1}[registry]\ndc = \"dc7\"\n"),
                "t.toml:6:6: registry: unknown data center \"dc7\"",
            ),
            (
                format!("{DC1}[registry]\ndc = \"dc1\"\nport = 5000\n"),
                "t.toml:7:1: unknown field `port`",
            ),
            (
                "[[dc]]\nname = \"dc1\"\nsubnet = \"10.1.1.0/24\"\n".into(),
                "no hosts",
            ),
        ];
        for (text, want) in cases {
            let got = err(&text);
            assert!(
                got.contains(want),
                "for\n{text}\nwant {want:?}\ngot  {got:?}"
            );
        }
    }

    #[test]
    fn the_registry_goes_where_the_file_says() {
        let t = parse_topology("t.toml", &format!("{DC1}{DC2}[registry]\ndc = \"dc2\"\n")).unwrap();
        assert_eq!(t.topology.registry_dc.as_deref(), Some("dc2"));
    }

    #[test]
    fn a_full_data_center_says_so() {
        let text = "[[dc]]\nname = \"dc1\"\nsubnet = \"10.1.1.0/28\"\nhosts = [\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\",\"j\",\"k\",\"l\",\"m\"]\n";
        let e = err(text);
        assert!(
            e.contains("host m: data center dc1 has no free address left"),
            "{e}"
        );
    }

    #[test]
    fn values_parse_and_print_back() {
        assert_eq!(parse_duration("1.5ms"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("-1ms").is_err());
        assert!(parse_duration("11s").is_err());
        assert_eq!(parse_rate("200mbit"), Ok(Some(200_000_000)));
        assert_eq!(parse_rate("1.5Gbit"), Ok(Some(1_500_000_000)));
        assert_eq!(parse_rate("none"), Ok(None));
        assert!(parse_rate("1bit").is_err());
        assert_eq!(parse_loss("0.1%"), Ok(0.001));
        assert_eq!(fmt_duration(Duration::from_millis(40)), "40ms");
        assert_eq!(fmt_duration(Duration::from_micros(1500)), "1500us");
        assert_eq!(fmt_rate(Some(200_000_000)), "200mbit");
        assert_eq!(fmt_rate(None), "-");
        assert_eq!(fmt_loss(0.001), "0.1%");
        assert_eq!(fmt_loss(0.0), "0");
    }
}
