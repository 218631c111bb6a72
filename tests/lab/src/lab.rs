//! A lab: hosts as network namespaces on one underlay bridge (itself in a namespace of its
//! own, which also plays "the outside world" at 10.1.1.1), one dockerd per host.
//!
//! Nothing is created in the machine's own namespace: interfaces are made inside the lab's
//! namespaces, every dockerd has its own data, sockets and cgroup parent under the lab
//! directory. A lab made by a test is torn down when it is dropped, also when the test
//! panics; a lab whose owning process died without tearing down (SIGKILL) is swept by the
//! next [`Lab::up`].

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cmd;
use crate::delayline;
use crate::dockerd::Dockerd;
use crate::error::{LabError, Result};
use crate::machine::Machine;
use crate::mountns;
use crate::netns::Netns;
use crate::process::{LabProcess, alive};
use crate::registry::{self, REGISTRY_MXNET_IMAGE, REGISTRY_TEST_IMAGE, Registry, RegistrySpec};
use crate::topology::{Link, Shape, Topology, TopologyFile};
use crate::wan;

/// The underlay's own address in its namespace: a stand-in for anything outside the cluster.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);
/// Prefix length of the underlay network.
pub const UNDERLAY_PREFIX: u8 = 24;
/// The seed documents' hosts: a, b, c with their underlay addresses.
pub const SEED_HOSTS: [(&str, Ipv4Addr); 3] = [
    ("a", Ipv4Addr::new(10, 1, 1, 34)),
    ("b", Ipv4Addr::new(10, 1, 1, 29)),
    ("c", Ipv4Addr::new(10, 1, 1, 33)),
];
/// Name of the controller's machine in a booted lab (not a valid host name: hosts are
/// `[a-z0-9]`).
const CONTROLLER_MACHINE: &str = "controller-machine";
/// How long a booted host may take to boot (systemd up, docker.service started).
const MACHINE_BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Where labs keep their files unless told otherwise.
pub const DEFAULT_ROOT: &str = "/var/tmp/geomx-lab";

/// One host of a lab.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSpec {
    /// Host name, `[a-z0-9]`, at most 12 characters.
    pub name: String,
    /// Its address on the underlay (10.1.1.0/24, or its data center's network).
    pub underlay_ip: Ipv4Addr,
    /// Its data center, in a geo-distributed lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dc: Option<String>,
}

/// What to build.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabSpec {
    /// Lab name: prefix of every namespace (`<name>-<host>`, `<name>-ul`).
    pub name: String,
    /// Parent directory of the lab directory.
    pub root: PathBuf,
    /// The hosts.
    pub hosts: Vec<HostSpec>,
    /// Start one dockerd per host.
    pub docker: bool,
    /// Survives the process that made it (for `geomx-lab up`); otherwise torn down on drop.
    pub persistent: bool,
    /// The process that owns a non-persistent lab.
    #[serde(default)]
    pub owner_pid: u32,
    /// Data centers and WAN links; `None` is the flat lab (every host on one bridge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
    /// A container registry in the lab ([`crate::registry`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistrySpec>,
    /// Hosts are booted systemd machines ([`crate::machine`]) with their own docker.service,
    /// instead of namespaces with a dockerd the lab runs.
    #[serde(default)]
    pub boot: bool,
}

static TEST_LABS: AtomicU32 = AtomicU32::new(0);

impl LabSpec {
    /// A lab named `name` with no hosts yet, under [`DEFAULT_ROOT`] (or `$GEOMX_LAB_ROOT`).
    pub fn new(name: &str) -> LabSpec {
        LabSpec {
            name: name.to_string(),
            root: std::env::var_os("GEOMX_LAB_ROOT")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT)),
            hosts: Vec::new(),
            docker: true,
            persistent: false,
            owner_pid: std::process::id(),
            topology: None,
            registry: None,
            boot: false,
        }
    }

    /// Makes the lab geo-distributed: the topology's data centers and links, and its hosts.
    pub fn topology(mut self, file: TopologyFile) -> LabSpec {
        self.topology = Some(file.topology);
        self.hosts = file.hosts;
        self
    }

    /// Runs a registry in the lab (it needs the lab's dockerds): its own namespace on the
    /// underlay of a flat lab, in a data center of a geo-distributed one; the test image (and
    /// the MXNet image, if `spec` has it) pushed to it. See [`Lab::registry`].
    pub fn registry(mut self, spec: RegistrySpec) -> LabSpec {
        self.registry = Some(spec);
        self
    }

    /// A lab with a name unique to this process and call, for tests run in parallel.
    pub fn for_test() -> LabSpec {
        let n = TEST_LABS.fetch_add(1, Ordering::Relaxed);
        LabSpec::new(&format!("gx{}x{n}", std::process::id()))
    }

    /// Adds the seed documents' hosts a, b and c.
    pub fn seed_hosts(mut self) -> LabSpec {
        for (name, ip) in SEED_HOSTS {
            self = self.host(name, ip);
        }
        self
    }

    /// Adds a host.
    pub fn host(mut self, name: &str, underlay_ip: Ipv4Addr) -> LabSpec {
        self.hosts.push(HostSpec {
            name: name.to_string(),
            underlay_ip,
            dc: None,
        });
        self
    }

    /// Whether to run a dockerd on every host (default yes).
    pub fn docker(mut self, on: bool) -> LabSpec {
        self.docker = on;
        self
    }

    /// Makes every host a booted systemd machine ([`crate::machine`]): its own PID 1,
    /// journald and docker.service (the root file system of
    /// `scripts/build-host-rootfs.sh`).
    pub fn boot(mut self, on: bool) -> LabSpec {
        self.boot = on;
        self
    }

    /// Keeps the lab after this process ends (torn down only by [`Lab::down`]).
    pub fn persistent(mut self) -> LabSpec {
        self.persistent = true;
        self.owner_pid = 0;
        self
    }

    /// Its directory.
    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.name)
    }

    fn validate(&self) -> Result<()> {
        let ok_name = !self.name.is_empty()
            && self.name.len() <= 24
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !ok_name {
            return Err(LabError::Setup(format!(
                "lab name {:?}: use 1..24 characters [a-z0-9]",
                self.name
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for h in &self.hosts {
            if !valid_host_name(&h.name) {
                return Err(LabError::Setup(format!(
                    "host name {:?}: use 1..12 characters [a-z0-9], not \"ul\"",
                    h.name
                )));
            }
            match (&self.topology, &h.dc) {
                (None, None) => {
                    let o = h.underlay_ip.octets();
                    if o[..3] != [10, 1, 1] || o[3] < 2 || o[3] == 255 {
                        return Err(LabError::Setup(format!(
                            "host {}: underlay address {} is not in 10.1.1.2..254",
                            h.name, h.underlay_ip
                        )));
                    }
                }
                (Some(t), Some(dc)) => {
                    let dc = t.dc(dc)?;
                    if !dc.host_address_ok(h.underlay_ip) {
                        return Err(LabError::Setup(format!(
                            "host {}: {} is not a host address of data center {} ({})",
                            h.name, h.underlay_ip, dc.name, dc.subnet
                        )));
                    }
                }
                (Some(_), None) => {
                    return Err(LabError::Setup(format!(
                        "host {}: a geo-distributed lab's hosts each belong to a data center",
                        h.name
                    )));
                }
                (None, Some(dc)) => {
                    return Err(LabError::Setup(format!(
                        "host {}: data center {dc} given, but the lab has no topology",
                        h.name
                    )));
                }
            }
            if let Some(ip) = self.registry_ip()?
                && ip == h.underlay_ip
            {
                return Err(LabError::Setup(format!(
                    "host {}: {ip} is the registry's address",
                    h.name
                )));
            }
            if !seen.insert(h.name.clone()) || !seen.insert(h.underlay_ip.to_string()) {
                return Err(LabError::Setup(format!(
                    "host {} ({}): name or address used twice",
                    h.name, h.underlay_ip
                )));
            }
        }
        if self.registry.is_some() && !self.docker {
            return Err(LabError::Setup(
                "a lab registry needs the lab's dockerds (docker(true))".into(),
            ));
        }
        if self.boot && self.registry.is_some() {
            return Err(LabError::Setup(
                "a lab registry is not available in a booted lab yet (--boot with --registry)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The registry's data center (geo-distributed labs with a registry).
    fn registry_dc(&self) -> Result<Option<&crate::topology::DataCenter>> {
        let (Some(r), Some(t)) = (&self.registry, &self.topology) else {
            return Ok(None);
        };
        let name =
            r.dc.as_deref()
                .or(t.registry_dc.as_deref())
                .unwrap_or(t.dcs[0].name.as_str());
        t.dc(name).map(Some)
    }

    /// The registry's address, when the lab has one.
    fn registry_ip(&self) -> Result<Option<Ipv4Addr>> {
        if self.registry.is_none() {
            return Ok(None);
        }
        Ok(Some(match self.registry_dc()? {
            Some(dc) => registry::registry_ip(dc.service_ip()),
            None => registry::registry_ip(Ipv4Addr::new(10, 1, 1, 254)),
        }))
    }
}

/// Whether `name` may name a lab host: `[a-z0-9]`, at most 12 characters, not "ul".
pub(crate) fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 12
        && name != "ul"
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// A host of a running lab.
#[derive(Clone, Debug)]
pub struct LabHost {
    /// Host name.
    pub name: String,
    /// Underlay address.
    pub underlay_ip: Ipv4Addr,
    /// Its data center, in a geo-distributed lab.
    pub dc: Option<String>,
    netns: Netns,
    dir: PathBuf,
    dockerd: Option<Dockerd>,
    machine: Option<Machine>,
}

impl LabHost {
    /// Runs `docker --config <dir> <args>` against the host's dockerd (a client
    /// configuration of its own: credentials stay out of the machine's `~/.docker`).
    pub fn docker_with_config<S: AsRef<std::ffi::OsStr>>(
        &self,
        config_dir: &Path,
        args: &[S],
    ) -> Result<std::process::Output> {
        let mut c = self.dockerd()?.cli();
        c.arg("--config").arg(config_dir).args(args);
        cmd::output(&mut c)
    }

    /// The host's network namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The host's directory (configs, state, dockerd).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its machine, when the lab is booted ([`LabSpec::boot`]).
    pub fn machine(&self) -> Result<&Machine> {
        self.machine
            .as_ref()
            .ok_or_else(|| LabError::Setup(format!("host {} is not a booted machine", self.name)))
    }

    /// Its dockerd (in a booted lab: the machine's docker.service, for the CLI only).
    pub fn dockerd(&self) -> Result<&Dockerd> {
        self.dockerd
            .as_ref()
            .ok_or_else(|| LabError::Setup(format!("host {} runs no dockerd", self.name)))
    }

    /// Runs a command inside the host's namespace and returns its standard output.
    pub fn run<S: AsRef<str>>(&self, argv: &[S]) -> Result<String> {
        self.netns.run(argv)
    }

    /// The name of the host's underlay interface as seen from the bridge namespace.
    pub fn bridge_port(&self) -> String {
        format!("v-{}", self.name)
    }
}

/// A running lab.
#[derive(Debug)]
pub struct Lab {
    spec: LabSpec,
    underlay: Netns,
    hosts: Vec<LabHost>,
    registry: Option<Registry>,
    down: bool,
}

impl Lab {
    /// Builds the lab: the underlay namespace with bridge `br0` at 10.1.1.1/24, a namespace
    /// per host with `eth0` on the bridge and a default route via 10.1.1.1, and (if asked) a
    /// dockerd per host. Sweeps labs left behind by dead processes first. On any failure
    /// everything built so far is removed again.
    pub fn up(spec: LabSpec) -> Result<Lab> {
        preflight(spec.docker && !spec.boot, spec.boot)?;
        spec.validate()?;
        sweep_stale(&spec.root);
        let dir = spec.dir();
        if dir.join("lab.json").exists() || Netns::named(&format!("{}-ul", spec.name)).exists() {
            return Err(LabError::Setup(format!(
                "a lab named {} exists already ({}); `geomx-lab down --name {}` first",
                spec.name,
                dir.display(),
                spec.name
            )));
        }
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
        let mut lab = Lab {
            underlay: Netns::named(&format!("{}-ul", spec.name)),
            spec: LabSpec {
                hosts: Vec::new(),
                ..spec.clone()
            },
            hosts: Vec::new(),
            registry: None,
            down: false,
        };
        lab.save()?;
        Netns::create(&lab.underlay.name())?;
        let ul = &lab.underlay;
        match &spec.topology {
            None => {
                ul.run(&["ip", "link", "add", "br0", "type", "bridge"])?;
                ul.run(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("{OUTSIDE_IP}/{UNDERLAY_PREFIX}"),
                    "dev",
                    "br0",
                ])?;
                ul.run(&["ip", "link", "set", "br0", "up"])?;
            }
            Some(topo) => {
                wan::build(&spec.name, ul, topo)?;
                lab.start_delay_line()?;
                wan::apply_links(ul, None, topo)?;
            }
        }
        for h in &spec.hosts {
            lab.add_host_without_docker(h.clone())?;
        }
        if spec.registry.is_some() {
            lab.start_registry()?;
        }
        if spec.boot {
            lab.prepare_controller_machine()?;
            lab.boot_machines()?;
        } else if spec.docker {
            lab.start_dockerds()?;
        }
        if lab.registry.is_some() {
            lab.push_lab_images()?;
        }
        Ok(lab)
    }

    /// Re-opens a lab made earlier (by `geomx-lab up`, say) from its directory.
    pub fn attach(root: &Path, name: &str) -> Result<Lab> {
        let file = root.join(name).join("lab.json");
        let text = std::fs::read_to_string(&file).map_err(|e| LabError::io(&file, e))?;
        let spec: LabSpec = serde_json::from_str(&text)
            .map_err(|e| LabError::Setup(format!("{}: {e}", file.display())))?;
        Ok(Lab::from_spec(spec))
    }

    fn from_spec(spec: LabSpec) -> Lab {
        let dir = spec.dir();
        let hosts = spec
            .hosts
            .iter()
            .map(|h| LabHost {
                name: h.name.clone(),
                underlay_ip: h.underlay_ip,
                dc: h.dc.clone(),
                netns: Netns::named(&format!("{}-{}", spec.name, h.name))
                    .with_mount(Some(mountns::file(&spec.name, &h.name)).filter(|f| f.exists())),
                dir: dir.join(&h.name),
                dockerd: match spec.boot {
                    true => Some(Dockerd::at(&dir.join(&h.name).join("machine").join("run"))),
                    false => spec
                        .docker
                        .then(|| Dockerd::at(&dir.join(&h.name).join("docker"))),
                },
                machine: spec.boot.then(|| {
                    Machine::at(
                        &format!("{}-{}", spec.name, h.name),
                        &dir.join(&h.name).join("machine"),
                    )
                }),
            })
            .collect();
        Lab {
            underlay: Netns::named(&format!("{}-ul", spec.name)),
            registry: spec.registry.as_ref().and_then(|_| Registry::load(&dir)),
            spec,
            hosts,
            down: false,
        }
    }

    fn save(&self) -> Result<()> {
        let file = self.dir().join("lab.json");
        let text = serde_json::to_string_pretty(&self.spec)
            .map_err(|e| LabError::Setup(format!("lab.json: {e}")))?;
        std::fs::write(&file, text).map_err(|e| LabError::io(&file, e))
    }

    /// The lab's registry, when it runs one ([`LabSpec::registry`]).
    pub fn registry(&self) -> Option<&Registry> {
        self.registry.as_ref()
    }

    fn registry_netns_name(&self) -> String {
        format!("{}-svc-registry", self.spec.name)
    }

    fn start_registry(&mut self) -> Result<()> {
        let ip = self
            .spec
            .registry_ip()?
            .ok_or_else(|| LabError::Setup("the lab has no registry".into()))?;
        let place = match self.spec.registry_dc()? {
            Some(dc) => registry::Placement {
                bridge: wan::dc_netns(&self.spec.name, &dc.name),
                ip,
                prefix: dc.subnet.prefix_len(),
                gateway: dc.gateway(),
                dc: Some(dc.name.clone()),
            },
            None => registry::Placement {
                bridge: self.underlay.clone(),
                ip,
                prefix: UNDERLAY_PREFIX,
                gateway: OUTSIDE_IP,
                dc: None,
            },
        };
        let geomxctl = crate::cluster::Binaries::find()?.ctl;
        let dir = self.dir();
        let reg = registry::start(
            &dir,
            &dir.join("tls"),
            &self.registry_netns_name(),
            place,
            &geomxctl,
        )?;
        for d in self.hosts.iter().filter_map(|h| h.dockerd.as_ref()) {
            registry::trust(&d.etc_dir(), &reg)?;
        }
        self.registry = Some(reg);
        Ok(())
    }

    /// The host the lab pushes its images from: the first of the registry's data center, or
    /// the first.
    fn registry_pusher(&self) -> Result<&LabHost> {
        let dc = self.registry.as_ref().and_then(|r| r.dc.clone());
        self.hosts
            .iter()
            .find(|h| dc.is_none() || h.dc == dc)
            .or(self.hosts.first())
            .ok_or_else(|| LabError::Setup("a lab registry needs at least one host".into()))
    }

    /// Tags the image `local` on `host` as `repo_tag` of the lab's registry, pushes it with
    /// the registry's credentials and returns the full reference.
    pub fn push_to_registry(&self, host: &str, local: &str, repo_tag: &str) -> Result<String> {
        let reg = self
            .registry()
            .ok_or_else(|| LabError::Setup(format!("lab {} runs no registry", self.name())))?;
        let h = self.host(host)?;
        let reference = reg.image(repo_tag);
        if local != reference {
            h.dockerd()?.docker(&["tag", local, &reference])?;
        }
        push(h, reg, &reference)?;
        Ok(reference)
    }

    /// Pushes the lab's test image (busybox) and, if asked, the MXNet image from one host,
    /// then removes them from that host again (hosts get images from the registry or the
    /// cluster's own builds).
    fn push_lab_images(&self) -> Result<()> {
        let (Some(reg), Some(rspec)) = (self.registry(), self.spec.registry.as_ref()) else {
            return Ok(());
        };
        let h = self.registry_pusher()?;
        let d = h.dockerd()?;
        let test = reg.image(REGISTRY_TEST_IMAGE);
        let rootfs = crate::rootfs::Rootfs::new(&reg.dir.join("rootfs"))?.with_busybox()?;
        rootfs.import(d, &test, &["/bin/sh"])?;
        push(h, reg, &test)?;
        d.docker(&["rmi", &test])?;
        let _ = std::fs::remove_dir_all(rootfs.dir());
        if let Some(tar) = &rspec.mxnet_tar {
            let mxnet = reg.image(REGISTRY_MXNET_IMAGE);
            crate::cluster::import_rootfs_tar(h, tar, &mxnet)?;
            push(h, reg, &mxnet)?;
            d.docker(&["rmi", &mxnet])?;
        }
        Ok(())
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// What the lab was built from.
    pub fn spec(&self) -> &LabSpec {
        &self.spec
    }

    /// The lab directory.
    pub fn dir(&self) -> PathBuf {
        self.spec.dir()
    }

    /// The underlay namespace: in a flat lab the bridge, and 10.1.1.1 "outside"; in a
    /// geo-distributed lab the WAN router between the data centers.
    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// The data centers and links of a geo-distributed lab (`None` for a flat one).
    pub fn topology(&self) -> Option<&Topology> {
        self.spec.topology.as_ref()
    }

    fn topology_or_err(&self) -> Result<&Topology> {
        self.topology().ok_or_else(|| {
            LabError::Setup(format!(
                "lab {} is flat (one bridge, no data centers): build it with --topology FILE",
                self.spec.name
            ))
        })
    }

    /// The links of a geo-distributed lab, one per pair of data centers.
    pub fn links(&self) -> Result<&[Link]> {
        self.topology_or_err().map(|t| t.links.as_slice())
    }

    /// The WAN router's namespace of a geo-distributed lab.
    pub fn router(&self) -> Result<&Netns> {
        self.topology_or_err().map(|_| &self.underlay)
    }

    /// The namespace of data center `dc`'s bridge (it carries the data center's service
    /// address, where lab services such as the controller listen).
    pub fn dc_netns(&self, dc: &str) -> Result<Netns> {
        let t = self.topology_or_err()?;
        Ok(wan::dc_netns(&self.spec.name, &t.dc(dc)?.name))
    }

    /// The namespace holding the bridge `host`'s `eth0` is plugged into.
    pub fn bridge_netns_of(&self, host: &LabHost) -> Result<Netns> {
        match &host.dc {
            Some(dc) => self.dc_netns(dc),
            None => Ok(self.underlay.clone()),
        }
    }

    /// Where the controller of a cluster on this lab runs: the underlay namespace of a flat
    /// lab, the controller data center's bridge namespace of a geo-distributed one.
    pub fn controller_netns(&self) -> Netns {
        match self.topology() {
            Some(t) => wan::dc_netns(&self.spec.name, &t.controller_dc),
            None => self.underlay.clone(),
        }
    }

    /// The controller's address: 10.1.1.1, or the service address of its data center.
    pub fn controller_ip(&self) -> Ipv4Addr {
        self.topology()
            .and_then(|t| t.dc(&t.controller_dc).ok())
            .map_or(OUTSIDE_IP, |dc| dc.service_ip())
    }

    /// Changes the link between data centers `a` and `b` while the lab runs: delays first
    /// (the delay line confirms), then rates and rules at once. On failure the link is put
    /// back as it was.
    pub fn set_link(&mut self, a: &str, b: &str, change: impl FnOnce(&mut Shape)) -> Result<Link> {
        let before = self.topology_or_err()?.clone();
        let k = before.link_index(a, b)?;
        let mut after = before.clone();
        change(&mut after.links[k].shape);
        after.links[k]
            .shape
            .check()
            .map_err(|e| LabError::Setup(format!("link {a} - {b}: {e}")))?;
        let dir = self.dir();
        let applied = (|| {
            delayline::write_config(&dir, &wan::delay_config(&after))?;
            delayline::control(&dir, "reload", Duration::from_secs(5))?;
            wan::apply_links(&self.underlay, Some(&before), &after)
        })();
        if let Err(e) = applied {
            let _ = delayline::write_config(&dir, &wan::delay_config(&before));
            let _ = delayline::control(&dir, "reload", Duration::from_secs(5));
            let _ = wan::apply_links(&self.underlay, Some(&after), &before);
            return Err(e);
        }
        let link = after.links[k].clone();
        self.spec.topology = Some(after);
        self.save()?;
        Ok(link)
    }

    fn start_delay_line(&self) -> Result<()> {
        let topo = self.topology_or_err()?;
        let dir = self.dir();
        delayline::write_config(&dir, &wan::delay_config(topo))?;
        let exe = lab_binary()?;
        let p = self.spawn(
            &self.underlay,
            "delayline",
            &[
                exe.display().to_string(),
                "--name".into(),
                self.spec.name.clone(),
                "--root".into(),
                self.spec.root.display().to_string(),
                "delay-line".into(),
                "--dir".into(),
                dir.display().to_string(),
            ],
            &[],
        )?;
        let start = std::time::Instant::now();
        loop {
            match delayline::control(&dir, "ping", Duration::from_millis(500)) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if p.pid().is_none() || start.elapsed() > Duration::from_secs(10) {
                        return Err(LabError::Setup(format!(
                            "the delay line did not start ({e}):\n{}",
                            p.log_tail(10)
                        )));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every host.
    pub fn hosts(&self) -> &[LabHost] {
        &self.hosts
    }

    /// One host by name.
    pub fn host(&self, name: &str) -> Result<&LabHost> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| LabError::Setup(format!("the lab has no host {name}")))
    }

    /// Adds a host to the running lab (with its dockerd if the lab has them).
    pub fn add_host(&mut self, host: HostSpec) -> Result<&LabHost> {
        let mut spec = self.spec.clone();
        spec.hosts.push(host.clone());
        spec.validate()?;
        self.add_host_without_docker(host.clone())?;
        let h = self.host(&host.name)?.clone();
        if let Some(m) = &h.machine {
            m.boot(MACHINE_BOOT_TIMEOUT)?;
        } else if let Some(d) = &h.dockerd {
            d.start()?;
        }
        self.host(&host.name)
    }

    fn add_host_without_docker(&mut self, spec: HostSpec) -> Result<()> {
        let ns_name = format!("{}-{}", self.spec.name, spec.name);
        let dir = self.dir().join(&spec.name);
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
        let netns = Netns::create(&ns_name)?;
        // record the host before anything can fail, so that teardown finds it
        self.spec.hosts.push(spec.clone());
        self.save()?;
        // a booted host's machine has a mount namespace of its own
        let netns = match self.spec.boot {
            true => netns,
            false => netns.with_mount(Some(mountns::create(&self.spec.name, &spec.name)?)),
        };
        let port = format!("v-{}", spec.name);
        let (bridge_ns, prefix, gateway) = match (&self.spec.topology, &spec.dc) {
            (Some(t), Some(dc)) => {
                let dc = t.dc(dc)?;
                (
                    wan::dc_netns(&self.spec.name, &dc.name),
                    dc.subnet.prefix_len(),
                    dc.gateway(),
                )
            }
            _ => (self.underlay.clone(), UNDERLAY_PREFIX, OUTSIDE_IP),
        };
        plug(&netns, &bridge_ns, &port, spec.underlay_ip, prefix, gateway)?;
        let machine = if self.spec.boot {
            Some(Machine::prepare(
                &format!("{}-{}", self.spec.name, spec.name),
                &spec.name,
                &dir.join("machine"),
                &netns,
                &self.cgroup_parent(&spec.name),
                &crate::machine::host_rootfs()?,
            )?)
        } else {
            None
        };
        let dockerd = if let Some(m) = &machine {
            Some(Dockerd::at(&m.docker_dir()))
        } else if self.spec.docker {
            let d = Dockerd::prepare(
                &dir.join("docker"),
                &netns,
                &self.cgroup_parent(&spec.name),
                self.spec.registry.is_some(),
            )?;
            if let Some(reg) = &self.registry {
                registry::trust(&d.etc_dir(), reg)?;
            }
            Some(d)
        } else {
            None
        };
        self.hosts.push(LabHost {
            name: spec.name,
            underlay_ip: spec.underlay_ip,
            dc: spec.dc,
            netns,
            dir,
            dockerd,
            machine,
        });
        Ok(())
    }

    /// The machine the controller of a booted lab runs in: in the controller's namespace
    /// (10.1.1.1 of a flat lab, the controller data center's service address of a
    /// geo-distributed one), without Docker.
    pub fn controller_machine(&self) -> Option<Machine> {
        self.spec.boot.then(|| {
            Machine::at(
                &format!("{}-{CONTROLLER_MACHINE}", self.spec.name),
                &self.dir().join(CONTROLLER_MACHINE).join("machine"),
            )
        })
    }

    fn prepare_controller_machine(&self) -> Result<()> {
        let dir = self.dir().join(CONTROLLER_MACHINE).join("machine");
        let m = Machine::prepare(
            &format!("{}-{CONTROLLER_MACHINE}", self.spec.name),
            CONTROLLER_MACHINE,
            &dir,
            &self.controller_netns(),
            &self.cgroup_parent(CONTROLLER_MACHINE),
            &crate::machine::host_rootfs()?,
        )?;
        m.mask_units(&["docker.service", "docker.socket", "containerd.service"])
    }

    /// Every machine of a booted lab: the hosts' and the controller's.
    fn machines(&self) -> Vec<Machine> {
        self.hosts
            .iter()
            .filter_map(|h| h.machine.clone())
            .chain(self.controller_machine())
            .collect()
    }

    /// Boots every host's machine, in parallel, and waits until each is up (docker.service
    /// started) or fails.
    fn boot_machines(&self) -> Result<()> {
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let machines = self.machines();
            let handles: Vec<_> = machines
                .into_iter()
                .map(|m| s.spawn(move || m.boot(MACHINE_BOOT_TIMEOUT)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(LabError::Setup("machine boot panicked".into())))
                })
                .collect()
        });
        results.into_iter().collect()
    }

    fn cgroup_parent(&self, host: &str) -> String {
        format!("gxlab-{}-{host}", self.spec.name)
    }

    fn start_dockerds(&self) -> Result<()> {
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .hosts
                .iter()
                .filter_map(|h| h.dockerd.as_ref())
                .map(|d| s.spawn(move || d.start()))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(LabError::Setup("dockerd start panicked".into())))
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// Takes a host's underlay link down (the host is cut off from every other host and
    /// from the outside).
    pub fn cut_link(&self, host: &str) -> Result<()> {
        let h = self.host(host)?;
        self.bridge_netns_of(h)?
            .run(&["ip", "link", "set", &h.bridge_port(), "down"])
            .map(drop)
    }

    /// Brings a cut link back.
    pub fn restore_link(&self, host: &str) -> Result<()> {
        let h = self.host(host)?;
        self.bridge_netns_of(h)?
            .run(&["ip", "link", "set", &h.bridge_port(), "up"])
            .map(drop)
    }

    /// Starts a long-running process inside `netns`, logged to `<lab>/procs/<name>.log`.
    pub fn spawn(
        &self,
        netns: &Netns,
        name: &str,
        argv: &[String],
        env: &[(String, String)],
    ) -> Result<LabProcess> {
        let dir = self.dir().join("procs");
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
        LabProcess::spawn(&dir, name, netns, argv, env)
    }

    /// A process started by [`Lab::spawn`].
    pub fn process(&self, name: &str) -> LabProcess {
        LabProcess::at(&self.dir().join("procs"), name)
    }

    /// Tears the lab down: containers, dockerds, processes, mounts, namespaces, cgroups,
    /// files. Goes on past failures and reports the first.
    pub fn down(mut self) -> Result<()> {
        self.down = true;
        self.teardown()
    }

    fn teardown(&self) -> Result<()> {
        let mut first: Option<LabError> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                tracing::warn!(lab = %self.spec.name, error = %e, "teardown");
                first.get_or_insert(e);
            }
        };
        // graceful first: machines power off (their units stop as on a real host), then
        // containers and daemons of namespace hosts
        std::thread::scope(|s| {
            for m in self.machines() {
                s.spawn(move || {
                    let _ = m.poweroff(Duration::from_secs(20));
                });
            }
        });
        std::thread::scope(|s| {
            for d in self.hosts.iter().filter_map(|h| h.dockerd.as_ref()) {
                s.spawn(move || {
                    if d.pid().is_some() {
                        let _ = d.remove_all_containers();
                        let _ = d.stop();
                    }
                });
            }
        });
        let dir = self.dir();
        self.keep_logs();
        // then whatever is left: processes started for the lab or living in its namespaces
        kill_lab_processes(&dir, &self.namespaces(), &self.cgroup_dirs());
        note(unmount_under(&dir));
        for h in &self.spec.hosts {
            mountns::delete(&self.spec.name, &h.name);
        }
        for ns in self.namespaces() {
            note(ns.delete());
        }
        for cg in self.cgroup_dirs() {
            remove_cgroup(&cg);
        }
        if dir.exists() {
            note(std::fs::remove_dir_all(&dir).map_err(|e| LabError::io(&dir, e)));
        }
        first.map_or(Ok(()), Err)
    }

    fn namespaces(&self) -> Vec<Netns> {
        let mut v: Vec<Netns> = self
            .spec
            .hosts
            .iter()
            .map(|h| Netns::named(&format!("{}-{}", self.spec.name, h.name)))
            .collect();
        if let Some(t) = &self.spec.topology {
            v.extend(
                t.dcs
                    .iter()
                    .map(|d| wan::dc_netns(&self.spec.name, &d.name)),
            );
        }
        // the registry's before the bridges it hangs off
        v.push(Netns::named(&self.registry_netns_name()));
        v.push(self.underlay.clone());
        v
    }

    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        if let Ok(ctrls) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in ctrls.flatten() {
                let names = self
                    .spec
                    .hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .chain([CONTROLLER_MACHINE]);
                for name in names {
                    let p = c.path().join(self.cgroup_parent(name));
                    if p.exists() {
                        v.push(p);
                    }
                }
            }
        }
        v
    }

    /// Every log file of the lab: each dockerd's and each process's.
    pub fn log_files(&self) -> Vec<PathBuf> {
        let mut logs: Vec<PathBuf> = self
            .hosts
            .iter()
            .filter_map(|h| h.dockerd.as_ref().map(|d| d.log()))
            .collect();
        logs.extend(self.machines().iter().map(|m| m.console_log()));
        logs.push(self.dir().join("registry").join("registry.log"));
        if let Ok(rd) = std::fs::read_dir(self.dir().join("procs")) {
            logs.extend(
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "log")),
            );
        }
        logs.retain(|p| p.exists());
        logs
    }

    /// With `GEOMX_LAB_LOGS=<dir>` set, copies every log to `<dir>/<lab name>/` before the
    /// lab's files go (for looking into a failed test afterwards).
    fn keep_logs(&self) {
        let Some(root) = std::env::var_os("GEOMX_LAB_LOGS") else {
            return;
        };
        let dest = PathBuf::from(root).join(&self.spec.name);
        if std::fs::create_dir_all(&dest).is_err() {
            return;
        }
        for log in self.log_files() {
            let name = match log.parent().and_then(|p| p.file_name()) {
                // <host>/docker/dockerd.log -> <host>-dockerd.log
                Some(p) if p == "docker" => format!(
                    "{}-dockerd.log",
                    log.parent()
                        .and_then(|p| p.parent())
                        .and_then(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ),
                _ => log
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            let _ = std::fs::copy(&log, dest.join(name));
        }
    }

    /// Prints the last lines of every log of the lab to standard error (for failing tests).
    pub fn dump_logs(&self, lines: usize) {
        for log in self.log_files() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            eprintln!("----- {} (last {lines} lines)", log.display());
            for l in &all[all.len().saturating_sub(lines)..] {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // only the process that made a test lab tears it down when it lets go of it; another
        // process that attached to it (`geomx-lab link set` run by the test) leaves it alone
        if self.down || self.spec.persistent || self.spec.owner_pid != std::process::id() {
            return;
        }
        // dropped without `down()`: a test failed (returned early or panicked); its harness
        // shows this output only for failing tests
        self.dump_logs(40);
        if let Err(e) = self.teardown() {
            eprintln!("geomx-lab: tearing down lab {}: {e}", self.spec.name);
        }
    }
}

/// Puts `netns` on the bridge `br0` of `bridge_ns`: `eth0` inside (at `ip/prefix`, default
/// route via `gateway`), its peer `port` on the bridge.
pub(crate) fn plug(
    netns: &Netns,
    bridge_ns: &Netns,
    port: &str,
    ip: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
) -> Result<()> {
    netns.run(&[
        "ip",
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        &bridge_ns.name(),
    ])?;
    bridge_ns.run(&["ip", "link", "set", port, "master", "br0", "up"])?;
    netns.run(&[
        "ip",
        "addr",
        "add",
        &format!("{ip}/{prefix}"),
        "dev",
        "eth0",
    ])?;
    netns.run(&["ip", "link", "set", "eth0", "up"])?;
    netns.run(&["ip", "route", "add", "default", "via", &gateway.to_string()])?;
    Ok(())
}

/// `docker push` of `reference` from `h` with the registry's credentials.
fn push(h: &LabHost, reg: &Registry, reference: &str) -> Result<()> {
    let config = reg.dir.join("client");
    let out = h.docker_with_config(&config, &["push", "--quiet", reference])?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            command: format!("docker push {reference} (from {})", h.name),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn preflight(docker: bool, boot: bool) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(LabError::Setup(
            "the lab needs root (network namespaces, dockerd)".into(),
        ));
    }
    let mut tools = vec!["ip", "nsenter", "iptables", "iptables-save"];
    if docker {
        tools.extend(["dockerd", "docker", "busybox", "tar"]);
    }
    if boot {
        tools.extend(["systemd-nspawn", "docker"]);
    }
    let missing: Vec<&str> = tools
        .into_iter()
        .filter(|t| {
            cmd::output(std::process::Command::new("sh").args(["-c", &format!("command -v {t}")]))
                .map(|o| !o.status.success())
                .unwrap_or(true)
        })
        .collect();
    if !missing.is_empty() {
        return Err(LabError::Setup(format!(
            "missing tools: {} (apt-get install iproute2 util-linux iptables docker.io busybox tar systemd-container)",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// The `geomx-lab` program (for the lab's own helper processes, such as the delay line):
/// this program when it is geomx-lab, else `$GEOMX_BIN_DIR/geomx-lab` or the one beside this
/// program (for a test, in the parent of its `deps/` directory: cargo's target/debug).
pub fn lab_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|e| LabError::Setup(format!("locating this program: {e}")))?;
    if exe.file_name().is_some_and(|n| n == "geomx-lab") {
        return Ok(exe);
    }
    let dir = match std::env::var_os("GEOMX_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let p = dir.join("geomx-lab");
    if p.exists() {
        Ok(p)
    } else {
        Err(LabError::Setup(format!(
            "{} is missing (run `cargo build --workspace --bins`, or set GEOMX_BIN_DIR)",
            p.display()
        )))
    }
}

/// Tears down every non-persistent lab under `root` whose owning process is gone.
pub fn sweep_stale(root: &Path) {
    mountns::sweep_orphans();
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for entry in rd.flatten() {
        let file = entry.path().join("lab.json");
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let Ok(spec) = serde_json::from_str::<LabSpec>(&text) else {
            continue;
        };
        if spec.persistent || spec.owner_pid == 0 || alive(spec.owner_pid) {
            continue;
        }
        tracing::info!(lab = %spec.name, owner = spec.owner_pid, "sweeping a lab left behind by a dead process");
        let lab = Lab::from_spec(spec);
        let _ = lab.teardown();
        let mut lab = lab;
        lab.down = true;
    }
}

/// Kills every process whose command line mentions the lab directory, that lives in one of
/// the lab's namespaces, or that sits in one of its cgroups.
fn kill_lab_processes(dir: &Path, namespaces: &[Netns], cgroups: &[PathBuf]) {
    use std::os::unix::fs::MetadataExt;
    let dir_s = dir.display().to_string();
    let ns_inodes: Vec<u64> = namespaces
        .iter()
        .filter_map(|n| std::fs::metadata(n.path()).ok().map(|m| m.ino()))
        .collect();
    let me = std::process::id();
    for _round in 0..3 {
        let mut victims = Vec::new();
        for cg in cgroups {
            collect_cgroup_pids(cg, &mut victims);
        }
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if pid == me {
                    continue;
                }
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                    .unwrap_or_default();
                let in_ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                    .map(|m| ns_inodes.contains(&m.ino()))
                    .unwrap_or(false);
                if cmdline.contains(&dir_s) || in_ns {
                    victims.push(pid);
                }
            }
        }
        victims.retain(|p| *p != me);
        if victims.is_empty() {
            return;
        }
        for pid in &victims {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(200));
        for pid in &victims {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(*pid as i32),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}

fn collect_cgroup_pids(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_cgroup_pids(&e.path(), out);
            }
        }
    }
}

fn remove_cgroup(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Lazily unmounts every mount point at or below `dir`, deepest first.
fn unmount_under(dir: &Path) -> Result<()> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| LabError::io("/proc/self/mountinfo", e))?;
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        let _ = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    Ok(())
}
