//! A cluster installed on a booted lab ([`crate::LabSpec::boot`]) the way docs/deploy.md
//! tells people to install real hosts: the Debian packages of `scripts/package.sh` installed
//! with `apt-get install ./*.deb`, the certificates, tokens and configuration files put where
//! the docs say with the docs' `install` commands, and the services started with
//! `systemctl enable --now`. The controller runs in the lab's controller machine (at the
//! controller address, 10.1.1.1 in a flat lab), every agent in its host's machine under the
//! shipped unit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Binaries, CONTROLLER_PORT, Cluster, ClusterSpec, seed_subnet};
use crate::error::{LabError, Result};
use crate::lab::{Lab, LabHost};
use crate::machine::Machine;

/// Where the lab stages files inside a machine before the docs' commands install them.
const STAGE: &str = "/var/tmp/geomx-setup";

/// The three packages of one version (`scripts/package.sh --out DIR`).
#[derive(Clone, Debug)]
pub struct Packages {
    /// `geomx-agent_<v>_<arch>.deb`.
    pub agent: PathBuf,
    /// `geomx-controller_<v>_<arch>.deb`.
    pub controller: PathBuf,
    /// `geomxctl_<v>_<arch>.deb`.
    pub ctl: PathBuf,
}

impl Packages {
    /// The packages of `version` in `dir`; an error naming what is missing.
    pub fn in_dir(dir: &Path, version: &str) -> Result<Packages> {
        let find = |name: &str| -> Result<PathBuf> {
            let prefix = format!("{name}_{version}_");
            let rd = std::fs::read_dir(dir).map_err(|e| LabError::io(dir, e))?;
            rd.flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
                })
                .ok_or_else(|| {
                    LabError::Setup(format!(
                        "no {prefix}*.deb in {} (scripts/package.sh --version {version} --out {})",
                        dir.display(),
                        dir.display()
                    ))
                })
        };
        Ok(Packages {
            agent: find("geomx-agent")?,
            controller: find("geomx-controller")?,
            ctl: find("geomxctl")?,
        })
    }
}

impl Cluster {
    /// Installs geomx on the booted lab `lab` from `packages` as docs/deploy.md says (see the
    /// module documentation), waits until every host is ready with its network converged,
    /// then builds the images jobs need. `bins.ctl` is the geomxctl the harness itself runs
    /// (certificates, `geomxctl hosts`).
    pub fn up_booted(
        lab: Lab,
        spec: ClusterSpec,
        bins: Binaries,
        packages: &Packages,
    ) -> Result<Cluster> {
        if !spec.tls {
            return Err(LabError::Setup(
                "a booted cluster follows docs/deploy.md: TLS and tokens (tls: true)".into(),
            ));
        }
        let mut cluster = Cluster {
            lab,
            spec,
            bins,
            token: String::new(),
        };
        cluster.make_certificates()?;
        let controller = cluster.lab.controller_machine().ok_or_else(|| {
            LabError::Setup("up_booted needs a booted lab (LabSpec::boot)".into())
        })?;
        cluster.install_controller(&controller, packages)?;
        let hosts: Vec<LabHost> = cluster.lab.hosts().to_vec();
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = hosts
                .iter()
                .map(|h| {
                    let c = &cluster;
                    s.spawn(move || c.install_agent(h, packages))
                })
                .collect();
            handles
                .into_iter()
                .map(|j| {
                    j.join()
                        .unwrap_or_else(|_| Err(LabError::Setup("agent install panicked".into())))
                })
                .collect()
        });
        results.into_iter().collect::<Result<()>>()?;
        let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
        cluster.wait_hosts_ready(&names, Duration::from_secs(90))?;
        cluster.build_images(&hosts)?;
        Ok(cluster)
    }

    /// `apt-get install ./<debs>` inside `m` (an upgrade when an older version is
    /// installed: the packages' maintainer scripts restart running services).
    pub fn install_packages(m: &Machine, debs: &[&Path]) -> Result<()> {
        let stage = stage_dir(m)?;
        let mut argv: Vec<String> = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
            .map(String::from)
            .to_vec();
        for deb in debs {
            let name = deb
                .file_name()
                .ok_or_else(|| LabError::Setup(format!("{}: not a file", deb.display())))?;
            let dest = stage.join(name);
            std::fs::copy(deb, &dest).map_err(|e| LabError::io(&dest, e))?;
            argv.push(format!("{STAGE}/{}", name.to_string_lossy()));
        }
        let mut c = m.command(&argv)?;
        c.env("DEBIAN_FRONTEND", "noninteractive");
        crate::cmd::run(&mut c).map(drop)
    }

    fn install_controller(&self, m: &Machine, packages: &Packages) -> Result<()> {
        Cluster::install_packages(m, &[&packages.controller, &packages.ctl])?;
        let stage = stage_dir(m)?;
        let tls = self.tls_dir();
        for f in ["ca.pem", "controller.pem", "controller-key.pem", "tokens"] {
            copy(&tls.join(f), &stage.join(f))?;
        }
        let config = format!(
            "# geomx-controller of booted lab {lab}\n\
             listen = \"{ip}:{CONTROLLER_PORT}\"\n\
             cluster_cidr = \"172.17.0.0/16\"\n\
             host_subnet_prefix = 24\n\
             heartbeat_interval = \"{hb}ms\"\n\
             grace_period = \"{grace}ms\"\n\
             \n[tls]\nca = \"/etc/geomx/tls/ca.pem\"\ncert = \"/etc/geomx/tls/controller.pem\"\n\
             key = \"/etc/geomx/tls/controller-key.pem\"\n\
             \n[auth]\ntokens_file = \"/etc/geomx/tokens\"\n\
             revocation_file = \"/etc/geomx/revoked\"\n",
            lab = self.lab.name(),
            ip = self.lab.controller_ip(),
            hb = self.spec.heartbeat_interval.as_millis(),
            grace = self.spec.grace_period.as_millis(),
        );
        write(&stage.join("controller.toml"), &config)?;
        // docs/deploy.md, "The controller" / "Install" (the package made /etc/geomx/tls)
        run_script(
            m,
            &format!(
                "set -e; cd {STAGE}\n\
                 install -m 0644 ca.pem controller.pem /etc/geomx/tls/\n\
                 install -m 0600 controller-key.pem /etc/geomx/tls/\n\
                 install -m 0600 tokens /etc/geomx/tokens\n\
                 install -m 0644 /dev/null /etc/geomx/revoked\n\
                 install -m 0644 controller.toml /etc/geomx/controller.toml\n\
                 systemctl enable --now geomx-controller\n"
            ),
        )
    }

    fn install_agent(&self, h: &LabHost, packages: &Packages) -> Result<()> {
        let m = h.machine()?;
        Cluster::install_packages(m, &[&packages.agent, &packages.ctl])?;
        let stage = stage_dir(m)?;
        let tls = self.tls_dir();
        let cert = format!("agent-{}.pem", h.name);
        let key = format!("agent-{}-key.pem", h.name);
        for f in ["ca.pem", cert.as_str(), key.as_str()] {
            copy(&tls.join(f), &stage.join(f))?;
        }
        let mut config = format!(
            "# geomx-agent of host {name} in booted lab {lab}\n\
             name = \"{name}\"\n\
             controller = \"{url}\"\n\
             underlay_ip = \"{ip}\"\n\
             network_interval = \"{interval}ms\"\n",
            name = h.name,
            lab = self.lab.name(),
            url = self.controller_url(),
            ip = h.underlay_ip,
            interval = self.spec.network_interval.as_millis(),
        );
        if self.spec.seed_subnets
            && let Some(s) = seed_subnet(&h.name)
        {
            config.push_str(&format!("pinned_subnet = \"{s}\"\n"));
        }
        config.push_str(&format!(
            "\n[tls]\nca = \"/etc/geomx/tls/ca.pem\"\ncert = \"/etc/geomx/tls/{cert}\"\n\
             key = \"/etc/geomx/tls/{key}\"\n"
        ));
        write(&stage.join("agent.toml"), &config)?;
        // docs/deploy.md, "The agents" / "Install"
        run_script(
            m,
            &format!(
                "set -e; cd {STAGE}\n\
                 install -m 0644 ca.pem {cert} /etc/geomx/tls/\n\
                 install -m 0600 {key} /etc/geomx/tls/\n\
                 install -m 0644 agent.toml /etc/geomx/agent.toml\n\
                 systemctl enable --now geomx-agent\n"
            ),
        )
    }
}

/// When `unit` has failed in `m` (systemd gave up on it): the failure with the unit's last
/// journal lines.
pub(super) fn unit_failure(m: &Machine, unit: &str) -> Option<String> {
    let out = m.exec(&["systemctl", "is-failed", unit]).ok()?;
    if String::from_utf8_lossy(&out.stdout).trim() != "failed" {
        return None;
    }
    let journal = m
        .run(&[
            "journalctl",
            "-u",
            unit,
            "-n",
            "30",
            "--no-pager",
            "-o",
            "cat",
        ])
        .unwrap_or_default();
    Some(format!("{unit} failed in machine {}:\n{journal}", m.name()))
}

fn stage_dir(m: &Machine) -> Result<PathBuf> {
    let dir = m.root().join(STAGE.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
    Ok(dir)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|e| LabError::io(from, e))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| LabError::io(path, e))
}

fn run_script(m: &Machine, script: &str) -> Result<()> {
    m.run(&["sh", "-c", script]).map(drop)
}
