//! Validation: every topology that would hang or fail, and every absurd value, is refused.
//!
//! [`problems`] checks a [`JobSpec`] and returns every problem with the field it is about;
//! the parser turns fields into file positions.

use std::collections::{BTreeMap, BTreeSet};

use crate::mounts::{
    bind_source_problem, parse_size, target_problem, volume_name_problem, volume_options_problem,
};
use crate::spec::{
    CommandSpec, JobSpec, Mode, MountType, Network, PROGRESS_GROUPS, ROLE_CLASSES, RestartPolicy,
    SLICE_PLACEHOLDER, limits,
};

/// Environment variables geomx computes for every node; `[env]` may not set them.
pub const COMPUTED_VARIABLES: [&str; 15] = [
    "DMLC_ROLE",
    "DMLC_ROLE_GLOBAL",
    "DMLC_ROLE_MASTER_WORKER",
    "DMLC_PS_ROOT_URI",
    "DMLC_PS_ROOT_PORT",
    "DMLC_PS_GLOBAL_ROOT_URI",
    "DMLC_PS_GLOBAL_ROOT_PORT",
    "DMLC_NUM_SERVER",
    "DMLC_NUM_WORKER",
    "DMLC_NUM_GLOBAL_SERVER",
    "DMLC_NUM_GLOBAL_WORKER",
    "DMLC_ENABLE_CENTRAL_WORKER",
    "DMLC_NUM_ALL_WORKER",
    "DMLC_INTERFACE",
    "PS_VERBOSE",
];

/// Variables `[env]` may not set although geomx does not compute them, and why.
const REFUSED_VARIABLES: [(&str, &str); 1] = [(
    "DMLC_NODE_HOST",
    "it changes the address a node advertises; geomx gives every node an address its peers reach",
)];

/// One problem: the field it is about and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Problem {
    /// Field path, e.g. `party[1].servers`.
    pub field: String,
    /// Point at the key rather than the value (e.g. a refused variable name).
    pub at_key: bool,
    /// What is wrong.
    pub message: String,
}

struct Problems(Vec<Problem>);

impl Problems {
    fn value(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            at_key: false,
            message: message.into(),
        });
    }
    fn key(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            at_key: true,
            message: message.into(),
        });
    }
}

/// True when `s` is 1..=`max` characters of `[a-z0-9-]`, starting and ending with a letter or
/// digit.
pub fn is_valid_name(s: &str, max: usize) -> bool {
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ok_chars && !s.is_empty() && s.len() <= max && !s.starts_with('-') && !s.ends_with('-')
}

/// True when `s` is a valid environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_valid_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphabetic() || b == b'_' => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn name_rule(max: usize) -> String {
    format!(
        "must be 1..={max} characters of a-z, 0-9 and \"-\", starting and ending with a letter or digit"
    )
}

/// Checks a whole job; returns every problem found (empty when the job is valid).
pub(crate) fn problems(spec: &JobSpec) -> Vec<Problem> {
    let mut p = Problems(Vec::new());
    check_top(spec, &mut p);
    check_mode(spec, &mut p);
    check_central(spec, &mut p);
    check_parties(spec, &mut p);
    check_network(spec, &mut p);
    if p.0.is_empty() {
        // Only meaningful when every count is within its own limit.
        check_size(spec, &mut p);
    }
    if p.0.is_empty() {
        check_plan_bytes(spec, &mut p);
    }
    check_commands(spec, &mut p);
    check_env(spec, &mut p);
    check_policy(spec, &mut p);
    check_progress(spec, &mut p);
    check_mounts(spec, &mut p);
    check_resources(spec, &mut p);
    p.0
}

/// The role classes a mount's `roles` stands for (`all` is every other class).
pub(crate) fn mount_classes(roles: Option<&[String]>) -> BTreeSet<&str> {
    let all = ["all".to_string()];
    let roles = roles.unwrap_or(&all);
    let mut out = BTreeSet::new();
    for r in roles {
        if r == "all" {
            out.extend(ROLE_CLASSES.iter().copied().filter(|c| *c != "all"));
        } else if let Some(c) = ROLE_CLASSES.iter().find(|c| **c == r.as_str()) {
            out.insert(*c);
        }
    }
    out
}

fn check_mounts(spec: &JobSpec, p: &mut Problems) {
    if spec.mounts.len() > limits::MOUNTS_MAX {
        p.value(
            "mount",
            format!(
                "{} [[mount]] tables: at most {} are allowed",
                spec.mounts.len(),
                limits::MOUNTS_MAX
            ),
        );
        return;
    }
    // (target, class) → index of the first mount there
    let mut targets: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (i, m) in spec.mounts.iter().enumerate() {
        let ctx = format!("[[mount]] #{}: ", i + 1);
        let f = |key: &str| format!("mount[{i}].{key}");
        let kind = m.kind.as_str();
        for (key, value) in [("source", &m.source), ("target", &m.target)] {
            if value.len() > limits::MOUNT_PATH_MAX {
                p.value(
                    f(key),
                    format!(
                        "{ctx}{key} is {} bytes long: at most {}",
                        value.len(),
                        limits::MOUNT_PATH_MAX
                    ),
                );
            }
        }
        let source_problem = match m.kind {
            MountType::Bind => bind_source_problem(&m.source),
            MountType::Volume => volume_name_problem(&m.source),
        };
        if let Some(why) = source_problem {
            p.value(
                f("source"),
                format!("{ctx}{kind} source {:?} {why}", m.source),
            );
        }
        let target_ok = match target_problem(&m.target) {
            Some(why) => {
                p.value(f("target"), format!("{ctx}target {:?} {why}", m.target));
                false
            }
            None => true,
        };
        match &m.roles {
            Some(roles) if roles.is_empty() => p.value(
                f("roles"),
                format!(
                    "{ctx}roles is empty: the mount would reach no node (omit it for [\"all\"])"
                ),
            ),
            Some(roles) => {
                for (j, r) in roles.iter().enumerate() {
                    if !ROLE_CLASSES.contains(&r.as_str()) {
                        p.value(
                            format!("mount[{i}].roles[{j}]"),
                            format!(
                                "{ctx}unknown role class {r:?} (one of {})",
                                ROLE_CLASSES.join(", ")
                            ),
                        );
                    } else if r == "master" && spec.mode == Mode::Ps {
                        p.value(
                            format!("mount[{i}].roles[{j}]"),
                            format!("{ctx}role class \"master\" is for mode \"hips\" only: mode \"ps\" has no master worker"),
                        );
                    }
                }
            }
            None => {}
        }
        if target_ok {
            for class in mount_classes(m.roles.as_deref()) {
                if let Some(first) = targets.get(&(m.target.as_str(), class)) {
                    p.value(
                        f("target"),
                        format!(
                            "{ctx}target {:?} is also the target of [[mount]] #{} for the {class}",
                            m.target,
                            first + 1
                        ),
                    );
                    break;
                }
                targets.insert((m.target.as_str(), class), i);
            }
        }
        if m.kind == MountType::Bind {
            if m.driver.is_some() {
                p.value(
                    f("driver"),
                    format!("{ctx}driver is for volumes only: a bind mount mounts a host path"),
                );
            }
            if !m.options.is_empty() {
                p.value(
                    f("options"),
                    format!("{ctx}options are for volumes only: a bind mount mounts a host path"),
                );
            }
        }
        if m.kind == MountType::Volume
            && let Some((key, why)) = volume_options_problem(m.driver.as_deref(), &m.options)
        {
            p.value(
                format!("mount[{i}].options.{key}"),
                format!("{ctx}volume option {why}"),
            );
        }
        if let Some(driver) = &m.driver
            && (driver.is_empty()
                || driver.len() > limits::IMAGE_MAX
                || driver.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            p.value(
                f("driver"),
                format!(
                    "{ctx}driver {driver:?} is not a volume driver name (no spaces or control characters, 1..={} characters)",
                    limits::IMAGE_MAX
                ),
            );
        }
        if m.options.len() > limits::MOUNT_OPTIONS_MAX {
            p.value(
                f("options"),
                format!(
                    "{ctx}{} options: at most {} are allowed",
                    m.options.len(),
                    limits::MOUNT_OPTIONS_MAX
                ),
            );
        }
        for (k, v) in &m.options {
            let bad_key = k.is_empty() || k.contains(['\0', '=']);
            if bad_key || v.contains('\0') || k.len().max(v.len()) > limits::MOUNT_OPTION_MAX {
                p.value(
                    format!("mount[{i}].options.{k}"),
                    format!(
                        "{ctx}option {k:?}: keys are 1..={max} bytes without \"=\" or NUL, values at most {max} bytes without NUL",
                        max = limits::MOUNT_OPTION_MAX
                    ),
                );
            }
        }
    }
}

fn check_resources(spec: &JobSpec, p: &mut Problems) {
    for (class, limits_of) in spec.resources.classes() {
        let ctx = format!("[resources.{class}]: ");
        let f = |key: &str| format!("resources.{class}.{key}");
        if limits_of.is_empty() {
            continue;
        }
        if class == "master" && spec.mode == Mode::Ps {
            p.value(
                format!("resources.{class}"),
                format!("{ctx}master is for mode \"hips\" only: mode \"ps\" has no master worker"),
            );
        }
        let sizes = [
            ("memory", &limits_of.memory, limits::MEMORY_MIN),
            ("shm_size", &limits_of.shm_size, limits::SHM_SIZE_MIN),
        ];
        for (key, value, min) in sizes {
            let Some(text) = value else { continue };
            match parse_size(text) {
                None => p.value(
                    f(key),
                    format!(
                        "{ctx}{key} = {text:?} is not a size: write e.g. \"512m\", \"8g\" (units b, k, m, g, t)"
                    ),
                ),
                Some(bytes) if !(min..=limits::MEMORY_MAX).contains(&bytes) => p.value(
                    f(key),
                    format!(
                        "{ctx}{key} = {text:?} is {bytes} bytes: must be between {} and {}",
                        human_bytes(min),
                        human_bytes(limits::MEMORY_MAX)
                    ),
                ),
                Some(_) => {}
            }
        }
        if let Some(cpus) = limits_of.cpus
            && !(cpus.0.is_finite() && (limits::CPUS_MIN..=limits::CPUS_MAX).contains(&cpus.0))
        {
            p.value(
                f("cpus"),
                format!(
                    "{ctx}cpus = {}: must be between {} and {}",
                    cpus.0,
                    limits::CPUS_MIN,
                    limits::CPUS_MAX
                ),
            );
        }
        if let Some(pids) = limits_of.pids {
            check_count(
                p,
                &f("pids"),
                &ctx,
                "pids",
                pids,
                limits::PIDS_MIN,
                limits::PIDS_MAX,
            );
        }
    }
}

/// A byte count as people write it: `6m`, `1t`, or bytes.
pub(crate) fn human_bytes(bytes: u64) -> String {
    for (shift, unit) in [(40, "t"), (30, "g"), (20, "m"), (10, "k")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

fn check_top(spec: &JobSpec, p: &mut Problems) {
    if !is_valid_name(&spec.name, limits::JOB_NAME_MAX) {
        p.value(
            "name",
            format!(
                "job name {:?} {}",
                spec.name,
                name_rule(limits::JOB_NAME_MAX)
            ),
        );
    }
    let image = &spec.image;
    if image.is_empty() {
        p.value(
            "image",
            "image is empty: name the container image every node runs, e.g. \"lizonghango00o1/geomx:cpu-only\"",
        );
    } else if image.len() > limits::IMAGE_MAX
        || image.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        p.value(
            "image",
            format!(
                "image {image:?} is not an image reference (no spaces or control characters, at most {} characters)",
                limits::IMAGE_MAX
            ),
        );
    }
    if let Some(iface) = &spec.interface {
        let ok = !iface.is_empty()
            && iface.len() <= limits::INTERFACE_MAX
            && iface
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !ok {
            p.value(
                "interface",
                format!(
                    "interface {iface:?} is not a network interface name (1..={} characters of A-Z, a-z, 0-9, \"_\", \"-\", \".\")",
                    limits::INTERFACE_MAX
                ),
            );
        }
    }
    if let Some(v) = spec.verbose
        && !(0..=limits::VERBOSE_MAX).contains(&v)
    {
        p.value(
            "verbose",
            format!("verbose = {v}: PS_VERBOSE is 0, 1 or 2 (omit the key to leave it unset)"),
        );
    }
}

fn check_mode(spec: &JobSpec, p: &mut Problems) {
    match spec.mode {
        Mode::Hips => {
            if spec.central.is_none() {
                p.value(
                    "central",
                    "mode \"hips\" needs a [central] table (host of the global scheduler, global servers and master worker)",
                );
            }
            if spec.parties.is_empty() {
                p.value(
                    "party",
                    "mode \"hips\" needs at least one [[party]] (a training party with its scheduler, server and workers)",
                );
            } else if spec.parties.len() as i64 > limits::PARTIES_MAX {
                p.value(
                    "party",
                    format!(
                        "{} parties: at most {} are allowed",
                        spec.parties.len(),
                        limits::PARTIES_MAX
                    ),
                );
            }
        }
        Mode::Ps => {
            if spec.central.is_some() {
                p.value(
                    "central",
                    "[central] is for mode \"hips\" only: mode \"ps\" has no central party (remove [central] or set mode = \"hips\")",
                );
            }
            if spec.parties.len() != 1 {
                p.value(
                    "party",
                    format!(
                        "mode \"ps\" takes exactly one [[party]], found {}",
                        spec.parties.len()
                    ),
                );
            }
            if spec.command.master.is_some() {
                p.value(
                    "command.master",
                    "[command]: master is for mode \"hips\" only: mode \"ps\" has no master worker",
                );
            }
            if !spec.env.master.is_empty() {
                p.value(
                    "env.master",
                    "[env]: master is for mode \"hips\" only: mode \"ps\" has no master worker",
                );
            }
        }
    }
}

fn check_port(p: &mut Problems, field: &str, ctx: &str, key: &str, port: i64) {
    if !(limits::PORT_MIN..=limits::PORT_MAX).contains(&port) {
        let why = if (1..limits::PORT_MIN).contains(&port) {
            "privileged ports are refused"
        } else {
            "not a TCP port"
        };
        p.value(
            field,
            format!(
                "{ctx}{key} = {port}: out of range {}..={} ({why})",
                limits::PORT_MIN,
                limits::PORT_MAX
            ),
        );
    } else if limits::RESERVED_PORTS.contains(&port) {
        p.value(
            field,
            format!(
                "{ctx}{key} = {port}: ports 7946-7948 are reserved for the geomx controller and agent"
            ),
        );
    }
}

fn check_count(
    p: &mut Problems,
    field: &str,
    ctx: &str,
    key: &str,
    value: i64,
    min: i64,
    max: i64,
) {
    if !(min..=max).contains(&value) {
        p.value(
            field,
            format!("{ctx}{key} = {value}: must be between {min} and {max}"),
        );
    }
}

fn check_host(p: &mut Problems, field: &str, ctx: &str, host: &str) {
    if !is_valid_name(host, limits::NAME_MAX) {
        p.value(
            field,
            format!("{ctx}host {host:?} {}", name_rule(limits::NAME_MAX)),
        );
    }
}

fn check_central(spec: &JobSpec, p: &mut Problems) {
    let Some(c) = &spec.central else { return };
    if spec.mode != Mode::Hips {
        return; // refused as a whole in check_mode
    }
    let ctx = "[central]: ";
    check_host(p, "central.host", ctx, &c.host);
    check_port(
        p,
        "central.global_scheduler_port",
        ctx,
        "global_scheduler_port",
        c.global_scheduler_port,
    );
    check_port(
        p,
        "central.scheduler_port",
        ctx,
        "scheduler_port",
        c.scheduler_port,
    );
    check_count(
        p,
        "central.global_servers",
        ctx,
        "global_servers",
        c.global_servers,
        1,
        limits::SERVERS_MAX,
    );
    check_count(
        p,
        "central.workers",
        ctx,
        "workers",
        c.workers,
        0,
        limits::WORKERS_PER_PARTY_MAX,
    );
}

/// How a party is named in messages.
fn party_ctx(spec: &JobSpec, i: usize) -> String {
    match spec.parties.get(i) {
        Some(party) if is_valid_name(&party.name, limits::NAME_MAX) => {
            format!("party {:?}: ", party.name)
        }
        _ => format!("[[party]] #{}: ", i + 1),
    }
}

fn check_parties(spec: &JobSpec, p: &mut Problems) {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, party) in spec.parties.iter().enumerate() {
        let ctx = party_ctx(spec, i);
        let f = |key: &str| format!("party[{i}].{key}");
        if !is_valid_name(&party.name, limits::NAME_MAX) {
            p.value(
                f("name"),
                format!(
                    "{ctx}party name {:?} {}",
                    party.name,
                    name_rule(limits::NAME_MAX)
                ),
            );
        } else if party.name == "central" || party.name == "global" {
            p.value(
                f("name"),
                format!(
                    "{ctx}the party name {:?} is reserved (the central party's nodes are named global-* and central-*)",
                    party.name
                ),
            );
        } else if let Some(first) = seen.get(party.name.as_str()) {
            p.value(
                f("name"),
                format!(
                    "{ctx}duplicate party name: [[party]] #{} is also named {:?}",
                    first + 1,
                    party.name
                ),
            );
        } else {
            seen.insert(&party.name, i);
        }

        if party.hosts.is_empty() {
            p.value(
                f("hosts"),
                format!("{ctx}hosts is empty: name at least one host"),
            );
        } else if party.hosts.len() > limits::HOSTS_PER_PARTY_MAX {
            p.value(
                f("hosts"),
                format!(
                    "{ctx}{} hosts: at most {} are allowed",
                    party.hosts.len(),
                    limits::HOSTS_PER_PARTY_MAX
                ),
            );
        }
        let mut hosts = BTreeSet::new();
        for (j, host) in party.hosts.iter().enumerate() {
            let field = format!("party[{i}].hosts[{j}]");
            check_host(p, &field, &ctx, host);
            if !hosts.insert(host.as_str()) {
                p.value(field, format!("{ctx}host {host:?} is listed twice"));
            }
        }

        if party.workers == 0 {
            p.value(
                f("workers"),
                format!(
                    "{ctx}workers = 0: a party needs at least 1 worker (at most {})",
                    limits::WORKERS_PER_PARTY_MAX
                ),
            );
        } else {
            check_count(
                p,
                &f("workers"),
                &ctx,
                "workers",
                party.workers,
                1,
                limits::WORKERS_PER_PARTY_MAX,
            );
        }

        match spec.mode {
            Mode::Hips if party.servers != 1 => p.value(
                f("servers"),
                format!(
                    "{ctx}servers = {}, but mode \"hips\" requires exactly 1 server per party (ps-lite aborts: \"load balance at the first layer is not supported\")",
                    party.servers
                ),
            ),
            Mode::Hips => {}
            Mode::Ps => check_count(
                p,
                &f("servers"),
                &ctx,
                "servers",
                party.servers,
                1,
                limits::SERVERS_MAX,
            ),
        }
        if let Some(port) = party.scheduler_port {
            check_port(p, &f("scheduler_port"), &ctx, "scheduler_port", port);
        }
    }
}

fn check_network(spec: &JobSpec, p: &mut Problems) {
    if spec.network != Network::Pseudo {
        return;
    }
    // One host for every node.
    let mut first: Option<(&str, String)> = None;
    let central = spec.central.as_ref().filter(|_| spec.mode == Mode::Hips);
    if let Some(c) = central {
        first = Some((c.host.as_str(), "the central host".to_string()));
    }
    for (i, party) in spec.parties.iter().enumerate() {
        for (j, host) in party.hosts.iter().enumerate() {
            match &first {
                None => first = Some((host.as_str(), format!("{}first host", party_ctx(spec, i)))),
                Some((h, what)) if *h != host.as_str() => p.value(
                    format!("party[{i}].hosts[{j}]"),
                    format!(
                        "{}host {host:?} differs from {what} {h:?}: network \"pseudo\" runs every node on one host",
                        party_ctx(spec, i)
                    ),
                ),
                Some(_) => {}
            }
        }
    }
    // Every scheduler binds 127.0.0.1 on the same host: ports must differ.
    let mut ports: BTreeMap<i64, String> = BTreeMap::new();
    if let Some(c) = central {
        ports.insert(c.global_scheduler_port, "the global scheduler".into());
        if let Some(other) = ports.get(&c.scheduler_port) {
            p.value(
                "central.scheduler_port",
                format!(
                    "[central]: scheduler_port = {} is also the port of {other}: network \"pseudo\" needs a distinct port per scheduler",
                    c.scheduler_port
                ),
            );
        } else {
            ports.insert(c.scheduler_port, "the central scheduler".into());
        }
    }
    for i in 0..spec.parties.len() {
        let port = spec.party_scheduler_port(i);
        let ctx = party_ctx(spec, i);
        if let Some(other) = ports.get(&port) {
            p.value(
                format!("party[{i}].scheduler_port"),
                format!(
                    "{ctx}scheduler_port = {port} is also the port of {other}: network \"pseudo\" needs a distinct port per scheduler"
                ),
            );
        } else {
            ports.insert(
                port,
                format!("the scheduler of {}", ctx.trim_end_matches(": ")),
            );
        }
    }
}

fn check_size(spec: &JobSpec, p: &mut Problems) {
    let party_nodes: i64 = spec
        .parties
        .iter()
        .map(|party| 1 + party.servers.max(0) + party.workers.max(0))
        .fold(0i64, i64::saturating_add);
    let central_nodes = match (&spec.central, spec.mode) {
        (Some(c), Mode::Hips) => 3 + c.global_servers.max(0) + c.workers.max(0),
        _ => 0,
    };
    let total = party_nodes.saturating_add(central_nodes);
    if total > limits::NODES_MAX {
        p.value(
            "party",
            format!(
                "the job compiles to {total} nodes: at most {} are allowed",
                limits::NODES_MAX
            ),
        );
    }
}

/// Nodes per role class: (schedulers, servers, master, workers), counts as written (the
/// caller made sure they are within their limits).
fn class_counts(spec: &JobSpec) -> [(u64, &'static str); 4] {
    let n = |v: i64| v.max(0).unsigned_abs();
    let parties = spec.parties.iter();
    let (mut sched, mut srv, mut master, mut wrk) = (0u64, 0u64, 0u64, 0u64);
    for party in parties {
        sched += 1;
        srv += n(party.servers);
        wrk += n(party.workers);
    }
    if let (Some(c), Mode::Hips) = (&spec.central, spec.mode) {
        sched += 2;
        srv += n(c.global_servers);
        master += 1;
        wrk += n(c.workers);
    }
    [
        (sched, "schedulers"),
        (srv, "servers"),
        (master, "master"),
        (wrk, "workers"),
    ]
}

/// About how many bytes the compiled plan takes (and each node's record and container spec
/// with it): every node carries its own command, env and mounts. An estimate from the job
/// alone, without compiling it (a 1 MiB `[env.all]` times 4096 nodes would be 4 GiB).
pub fn plan_bytes_estimate(spec: &JobSpec) -> u64 {
    // name, role, party, host, ports, slice, reaches, framing
    const NODE_OVERHEAD: u64 = 120;
    // the computed DMLC_* variables of the widest role
    const COMPUTED_ENV: u64 = 300;
    let len = |s: &str| s.len() as u64;
    let argv = |cmd: &[String]| cmd.iter().map(|a| len(a) + 4).sum::<u64>();
    let vars =
        |v: &BTreeMap<String, String>| v.iter().map(|(k, v)| len(k) + len(v) + 8).sum::<u64>();
    let all_env = vars(&spec.env.all);
    let mut total = 0u64;
    for (count, class) in class_counts(spec) {
        let (env, command) = match class {
            "schedulers" => (&spec.env.schedulers, spec.scheduler_command()),
            "servers" => (&spec.env.servers, spec.server_command()),
            "master" => (&spec.env.master, spec.master_command()),
            _ => (&spec.env.workers, spec.worker_command()),
        };
        let mounts: u64 = spec
            .mounts
            .iter()
            .filter(|m| mount_classes(m.roles.as_deref()).contains(class))
            .map(|m| {
                // placeholders expand to names of at most 63 characters (node names a bit more)
                let source = len(&m.source) + 80 * m.source.matches('{').count() as u64;
                let options: u64 = m.options.iter().map(|(k, v)| len(k) + len(v) + 8).sum();
                source + len(&m.target) + len(m.driver.as_deref().unwrap_or("")) + options + 24
            })
            .sum();
        let per_node = NODE_OVERHEAD
            + len(&spec.image)
            + argv(&command)
            + COMPUTED_ENV
            + all_env
            + vars(env)
            + mounts;
        total = total.saturating_add(count.saturating_mul(per_node));
    }
    total
}

fn check_plan_bytes(spec: &JobSpec, p: &mut Problems) {
    let bytes = plan_bytes_estimate(spec);
    if bytes > limits::PLAN_BYTES_MAX {
        let nodes: u64 = class_counts(spec).iter().map(|(n, _)| n).sum();
        let field = if spec.env.all.is_empty() {
            "party"
        } else {
            "env.all"
        };
        p.value(
            field,
            format!(
                "the job compiles to about {} of node specs ({nodes} nodes, each with its own command, env and mounts): at most {} (the limit on a plan and on what one job may add to a host's desired state); make [env] smaller or the job smaller",
                human_bytes_approx(bytes),
                human_bytes_approx(limits::PLAN_BYTES_MAX)
            ),
        );
    }
}

/// `bytes` in MiB with one decimal (or KiB below 1 MiB).
pub(crate) fn human_bytes_approx(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

fn check_command(p: &mut Problems, spec_cmd: &Option<Vec<String>>, key: &str, slice_allowed: bool) {
    let Some(cmd) = spec_cmd else { return };
    let field = format!("command.{key}");
    if cmd.first().is_none_or(|program| program.is_empty()) {
        p.value(
            &field,
            format!(
                "[command]: {key} must name a program: an argv list like [\"python\", \"train.py\"]"
            ),
        );
    }
    for (i, arg) in cmd.iter().enumerate() {
        if arg.contains('\0') {
            p.value(
                format!("{field}[{i}]"),
                format!("[command]: {key} argument {i} contains a NUL character"),
            );
        }
        if !slice_allowed && arg.contains(SLICE_PLACEHOLDER) {
            let why = if key == "master" {
                "the master worker has no data slice of its own (it gets --data-slice-idx appended when central training is on)"
            } else {
                "only worker commands have a data slice"
            };
            let inside = if arg == SLICE_PLACEHOLDER {
                String::new()
            } else {
                format!(" (in {arg:?})")
            };
            p.value(
                format!("{field}[{i}]"),
                format!("[command]: {key} contains \"{{slice}}\"{inside}: {why}"),
            );
        }
    }
}

fn check_commands(spec: &JobSpec, p: &mut Problems) {
    let CommandSpec {
        scheduler,
        server,
        worker,
        master,
    } = &spec.command;
    check_command(p, scheduler, "scheduler", false);
    check_command(p, server, "server", false);
    check_command(p, worker, "worker", true);
    check_command(p, master, "master", false);
}

fn check_env(spec: &JobSpec, p: &mut Problems) {
    let classes = [
        ("all", &spec.env.all),
        ("schedulers", &spec.env.schedulers),
        ("servers", &spec.env.servers),
        ("master", &spec.env.master),
        ("workers", &spec.env.workers),
    ];
    for (class, vars) in classes {
        for (name, value) in vars {
            let field = format!("env.{class}.{name}");
            let ctx = format!("[env.{class}]: ");
            if !is_valid_env_name(name) {
                p.key(
                    &field,
                    format!("{ctx}{name:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"),
                );
            } else if COMPUTED_VARIABLES.contains(&name.as_str()) {
                let how = match name.as_str() {
                    "DMLC_INTERFACE" => " (set `interface` instead)",
                    "PS_VERBOSE" => " (set `verbose` instead)",
                    _ => "",
                };
                p.key(
                    &field,
                    format!(
                        "{ctx}{name} is computed by geomx from the topology and may not be overridden{how}"
                    ),
                );
            } else if let Some((_, why)) = REFUSED_VARIABLES.iter().find(|(n, _)| n == name) {
                p.key(&field, format!("{ctx}{name} may not be set: {why}"));
            } else if name.starts_with("GEOMX_") {
                p.key(
                    &field,
                    format!("{ctx}{name}: GEOMX_* variables are set by the geomx agent"),
                );
            }
            if value.contains('\0') {
                p.value(
                    &field,
                    format!("{ctx}{name}: the value contains a NUL character"),
                );
            } else if value.contains("{{") {
                p.value(
                    &field,
                    format!("{ctx}{name}: \"{{{{\" is reserved for addresses geomx fills in at deploy time"),
                );
            } else if name == "DMLC_UDP_CHANNEL_NUM"
                && !value
                    .trim()
                    .parse::<u32>()
                    .is_ok_and(|n| (1..=UDP_CHANNELS_MAX).contains(&n))
            {
                // ps-lite (van.h) keeps a fixed array of 8 channel threads: 9 or more abort
                // with "free(): invalid pointer", 0 opens no channel for DGT's traffic
                p.value(
                    &field,
                    format!(
                        "{ctx}DMLC_UDP_CHANNEL_NUM = {value:?}: DGT's UDP channels must be 1..={UDP_CHANNELS_MAX} (GeoMX's ps-lite keeps a fixed array of {UDP_CHANNELS_MAX} channel threads and aborts with more)"
                    ),
                );
            }
        }
    }
}

/// Most UDP channels DGT (`DMLC_UDP_CHANNEL_NUM`) can open in GeoMX's ps-lite.
const UDP_CHANNELS_MAX: u32 = 8;

fn check_policy(spec: &JobSpec, p: &mut Problems) {
    let policy = &spec.policy;
    let ctx = "[policy]: ";
    if let Some(max) = policy.max_restarts {
        match policy.restart {
            RestartPolicy::Never if max != 0 => p.value(
                "policy.max_restarts",
                format!(
                    "{ctx}max_restarts = {max} has no effect with restart = \"never\" (set restart = \"on-failure\")"
                ),
            ),
            RestartPolicy::OnFailure if max == 0 => p.value(
                "policy.max_restarts",
                format!(
                    "{ctx}max_restarts = 0 with restart = \"on-failure\" never restarts (use restart = \"never\", or max_restarts >= 1)"
                ),
            ),
            _ => check_count(
                p,
                "policy.max_restarts",
                ctx,
                "max_restarts",
                max,
                0,
                limits::MAX_RESTARTS_MAX,
            ),
        }
    }
    for (key, text, parsed, example) in [
        (
            "stall_timeout",
            policy.stall_timeout_text(),
            policy.stall_timeout(),
            "\"90s\", \"10m\", \"1h 30m\"",
        ),
        (
            "rendezvous_timeout",
            policy.rendezvous_timeout_text(),
            policy.rendezvous_timeout(),
            "\"5m\", \"30s\"",
        ),
        (
            "pull_timeout",
            policy.pull_timeout_text(),
            policy.pull_timeout(),
            "\"30m\", \"2h\"",
        ),
    ] {
        match parsed {
            Err(e) => p.value(
                format!("policy.{key}"),
                format!("{ctx}{key} = {text:?} is not a duration ({e}); write e.g. {example}"),
            ),
            Ok(d)
                if d.as_secs() < limits::STALL_TIMEOUT_MIN_SECS
                    || d > std::time::Duration::from_secs(limits::STALL_TIMEOUT_MAX_SECS) =>
            {
                p.value(
                    format!("policy.{key}"),
                    format!("{ctx}{key} = {text:?}: must be between 10s and 7days"),
                )
            }
            Ok(_) => {}
        }
    }
    check_count(
        p,
        "policy.gpus_per_worker",
        ctx,
        "gpus_per_worker",
        policy.gpus_per_worker,
        0,
        limits::GPUS_PER_WORKER_MAX,
    );
    for (key, text) in [
        ("restart_delay", &policy.restart_delay),
        ("active_deadline", &policy.active_deadline),
    ] {
        let Some(text) = text else { continue };
        match humantime::parse_duration(text) {
            Err(e) => p.value(
                format!("policy.{key}"),
                format!(
                    "{ctx}{key} = {text:?} is not a duration ({e}); write e.g. \"30s\", \"2h\""
                ),
            ),
            Ok(d) if key == "active_deadline" && d.as_secs() < limits::STALL_TIMEOUT_MIN_SECS => p
                .value(
                    format!("policy.{key}"),
                    format!("{ctx}{key} = {text:?}: at least 10s"),
                ),
            Ok(_) => {}
        }
        if key == "restart_delay" && policy.restart == RestartPolicy::Never {
            p.value(
                "policy.restart_delay",
                format!(
                    "{ctx}restart_delay has no effect with restart = \"never\" (set restart = \"on-failure\")"
                ),
            );
        }
    }
    if let Some(codes) = &policy.retry_exit_codes {
        if policy.restart == RestartPolicy::Never {
            p.value(
                "policy.retry_exit_codes",
                format!(
                    "{ctx}retry_exit_codes has no effect with restart = \"never\" (set restart = \"on-failure\")"
                ),
            );
        }
        if codes.is_empty() {
            p.value(
                "policy.retry_exit_codes",
                format!("{ctx}retry_exit_codes is empty: no failure would restart (remove it to restart on any exit code)"),
            );
        }
        for &c in codes {
            if !(1..=255).contains(&c) {
                p.value(
                    "policy.retry_exit_codes",
                    format!(
                        "{ctx}retry_exit_codes: {c} is not an exit code of a failure (1..=255)"
                    ),
                );
            }
        }
    }
    match policy.teardown_grace() {
        Err(e) => p.value(
            "policy.teardown_grace",
            format!(
                "{ctx}teardown_grace = {:?} is not a duration ({e}); write e.g. \"10s\", \"1m\"",
                policy.teardown_grace_text()
            ),
        ),
        Ok(d) if d > std::time::Duration::from_secs(crate::spec::TEARDOWN_GRACE_MAX_SECS) => p
            .value(
                "policy.teardown_grace",
                format!(
                    "{ctx}teardown_grace = {:?}: at most 1h",
                    policy.teardown_grace_text()
                ),
            ),
        Ok(_) => {}
    }
}

/// Why a regex does not compile, on one line (the regex crate's own text after `error: `).
fn regex_why(e: &regex::Error) -> String {
    let text = e.to_string();
    text.rsplit_once("error: ")
        .map_or(text.as_str(), |(_, why)| why)
        .trim()
        .replace('\n', " ")
}

fn check_progress(spec: &JobSpec, p: &mut Problems) {
    let Some(progress) = &spec.progress else {
        return;
    };
    let ctx = "[progress]: ";
    if let Some(finished) = &progress.finished {
        if finished.len() > limits::PROGRESS_REGEX_MAX_LEN {
            p.value(
                "progress.finished",
                format!(
                    "{ctx}finished is {} bytes long: at most {}",
                    finished.len(),
                    limits::PROGRESS_REGEX_MAX_LEN
                ),
            );
        } else if finished.trim().is_empty() {
            p.value(
                "progress.finished",
                format!("{ctx}finished is empty: it would match every line"),
            );
        } else if let Err(e) = crate::compile_progress_regex(finished) {
            p.value(
                "progress.finished",
                format!("{ctx}finished does not compile: {}", regex_why(&e)),
            );
        }
    }
    if let Some(n) = progress.iterations
        && n < 1
    {
        p.value(
            "progress.iterations",
            format!("{ctx}iterations = {n}: must be at least 1 (iterations count from 1)"),
        );
    }
    if progress.regex.len() > limits::PROGRESS_REGEX_MAX_LEN {
        p.value(
            "progress.regex",
            format!(
                "{ctx}regex is {} bytes long: at most {}",
                progress.regex.len(),
                limits::PROGRESS_REGEX_MAX_LEN
            ),
        );
        return;
    }
    match crate::compile_progress_regex(&progress.regex) {
        Err(e) => {
            p.value(
                "progress.regex",
                format!("{ctx}regex does not compile: {}", regex_why(&e)),
            );
        }
        Ok(re) => {
            let names: Vec<&str> = re.capture_names().flatten().collect();
            let unknown: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| !PROGRESS_GROUPS.contains(n))
                .collect();
            if !unknown.is_empty() {
                p.value(
                    "progress.regex",
                    format!(
                        "{ctx}regex has unknown named groups {unknown:?}; allowed: {}",
                        PROGRESS_GROUPS.join(", ")
                    ),
                );
            }
            if !names.contains(&"iteration") && !names.contains(&"step") {
                p.value(
                    "progress.regex",
                    format!(
                        "{ctx}regex needs a named group \"iteration\" or \"step\", e.g. (?P<iteration>\\d+)"
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "hips-mnist", "0", "a1-b2"] {
            assert!(is_valid_name(ok, 40), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "é", &"a".repeat(41)] {
            assert!(!is_valid_name(bad, 40), "{bad}");
        }
        assert!(is_valid_name(&"a".repeat(40), 40));
    }

    #[test]
    fn env_names() {
        for ok in ["A", "_", "MXNET_KVSTORE_USE_HFA", "a1"] {
            assert!(is_valid_env_name(ok), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A=B", "A B", "É"] {
            assert!(!is_valid_env_name(bad), "{bad}");
        }
    }
}
