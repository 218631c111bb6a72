//! Image pulls over shaped WAN links (issue 11): the MXNet image (~450 MB) from the lab
//! registry in dc0 to hosts a, b and c, one per data center, each 20 ms one way and
//! 200 Mbit/s from dc0. In the same run, alternating which goes first: `geomxctl pull
//! IMAGE --hosts a,b,c` (until it exits, every host done) against `docker pull` started on
//! the three hosts at once (until the last one ends), the image removed from every host
//! between runs. The figure is geomx ÷ docker of the median wall times.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use geomx_lab::topology::parse_topology;
use geomx_lab::{
    Binaries, Cluster, ClusterSpec, Lab, LabSpec, MXNET_CACHE, REGISTRY_MXNET_IMAGE, RegistrySpec,
};

use crate::report::{Line, median, note};

const TOPOLOGY: &str = r#"
[[dc]]
name = "dc0"
subnet = "10.1.1.0/24"
hosts = [{ name = "r", ip = "10.1.1.10" }]
[[dc]]
name = "dc1"
subnet = "10.2.1.0/24"
hosts = [{ name = "a", ip = "10.2.1.34" }]
[[dc]]
name = "dc2"
subnet = "10.3.1.0/24"
hosts = [{ name = "b", ip = "10.3.1.29" }]
[[dc]]
name = "dc3"
subnet = "10.4.1.0/24"
hosts = [{ name = "c", ip = "10.4.1.33" }]

[registry]
dc = "dc0"

[[link]]
dcs = ["dc0", "dc1"]
delay = "20ms"
rate = "200mbit"
[[link]]
dcs = ["dc0", "dc2"]
delay = "20ms"
rate = "200mbit"
[[link]]
dcs = ["dc0", "dc3"]
delay = "20ms"
rate = "200mbit"
"#;

const HOSTS: [&str; 3] = ["a", "b", "c"];

/// Knobs of the pull benchmark.
#[derive(Clone, Debug)]
pub struct Options {
    /// Runs of each (geomx and docker).
    pub runs: usize,
    /// The geomx binaries.
    pub bins: Binaries,
}

/// Wall times in seconds.
#[derive(Clone, Debug, Default)]
pub struct PullResult {
    /// `geomxctl pull` to every host.
    pub geomx: Vec<f64>,
    /// Parallel `docker pull` on every host.
    pub docker: Vec<f64>,
}

/// Runs the benchmark; `Ok(None)` (with a note) when the MXNet image is not cached.
pub fn run(o: &Options) -> anyhow::Result<Option<PullResult>> {
    if !Path::new(MXNET_CACHE).is_file() {
        note(format!(
            "pull: skipped: {MXNET_CACHE} is absent (build it with scripts/build-mxnet-image.sh)"
        ));
        return Ok(None);
    }
    let started = Instant::now();
    let lab = Lab::up(
        LabSpec::for_test()
            .topology(parse_topology("pull.toml", TOPOLOGY)?)
            .registry(RegistrySpec::default().with_cached_mxnet()),
    )
    .context("starting the lab with its registry")?;
    let c = Cluster::up(
        lab,
        ClusterSpec {
            psnode_image: false,
            mxnet_tar: None,
            ..ClusterSpec::default()
        },
        o.bins.clone(),
    )
    .context("starting the cluster")?;
    note(format!(
        "pull: lab {} with its registry and the MXNet image up in {:.1}s",
        c.lab().name(),
        started.elapsed().as_secs_f64()
    ));
    let r = measure(&c, o);
    if r.is_err() {
        c.lab().dump_logs(30);
    }
    let down = c.down().context("tearing the lab down");
    let r = r?;
    down?;
    Ok(Some(r))
}

fn measure(c: &Cluster, o: &Options) -> anyhow::Result<PullResult> {
    let reg = c.lab().registry().context("the lab's registry")?;
    let image = reg.image(REGISTRY_MXNET_IMAGE);
    let mut r = PullResult::default();
    for run in 0..o.runs.max(1) {
        // alternate which goes first
        for geomx in [run % 2 == 1, run % 2 == 0] {
            clear(c)?;
            let t = if geomx {
                geomx_pull(c, &image)?
            } else {
                docker_pull(c, &image)?
            };
            note(format!(
                "pull run {}: {} {:.1}s",
                run + 1,
                if geomx { "geomx" } else { "docker" },
                t
            ));
            if geomx {
                r.geomx.push(t);
            } else {
                r.docker.push(t);
            }
        }
    }
    let size = c.lab().host("a")?.dockerd()?.docker(&[
        "image",
        "ls",
        "--format",
        "{{.Size}}",
        "--no-trunc",
    ])?;
    note(format!("pull: image size on a: {}", size.trim()));
    clear(c)?;
    Ok(r)
}

/// Removes every image from the three hosts.
fn clear(c: &Cluster) -> anyhow::Result<()> {
    for h in HOSTS {
        let d = c.lab().host(h)?.dockerd()?;
        let ids = d.docker(&["image", "ls", "-aq"])?;
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rmi", "-f"];
            args.extend(ids);
            d.docker(&args)?;
        }
    }
    // the controller admits on what agents report: wait until none reports an image
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hosts = c.hosts()?;
        if hosts.iter().all(|h| {
            h["images"].as_array().is_none_or(|i| {
                !i.iter()
                    .any(|x| x.as_str().is_some_and(|x| x.contains("mxnet")))
            })
        }) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "hosts still report the image");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn geomx_pull(c: &Cluster, image: &str) -> anyhow::Result<f64> {
    let start = Instant::now();
    let out = c.ctl(&["pull", image, "--hosts", &HOSTS.join(",")])?;
    let t = start.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "geomxctl pull: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(t)
}

fn docker_pull(c: &Cluster, image: &str) -> anyhow::Result<f64> {
    let reg = c.lab().registry().context("the lab's registry")?;
    let config = reg.auth_file();
    let config = config.parent().context("the auth file's directory")?;
    let start = Instant::now();
    let outs: Vec<anyhow::Result<std::process::Output>> = std::thread::scope(|s| {
        let handles: Vec<_> = HOSTS
            .iter()
            .map(|h| {
                s.spawn(move || -> anyhow::Result<std::process::Output> {
                    Ok(c.lab()
                        .host(h)?
                        .docker_with_config(config, &["pull", "--quiet", image])?)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
            })
            .collect()
    });
    let t = start.elapsed().as_secs_f64();
    for (h, o) in HOSTS.iter().zip(outs) {
        let o = o?;
        ensure!(
            o.status.success(),
            "docker pull on {h}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(t)
}

/// Prints the figures.
pub fn report(r: &PullResult) {
    let g = median(&r.geomx);
    let d = median(&r.docker);
    let ratio = g / d;
    Line::new("bench", "pull")
        .kv("hosts", HOSTS.len())
        .kv("runs", r.geomx.len())
        .f("geomx_p50_s", g, 2)
        .f("docker_p50_s", d, 2)
        .f("ratio", ratio, 3)
        .kv("target", "<=1.1")
        .kv("met", ratio <= 1.1)
        .print();
    note(format!(
        "pull: the MXNet image to {} hosts over 200 Mbit/s, 20 ms WAN links: geomx {g:.2}s, parallel docker pull {d:.2}s: {ratio:.3}x (target <= 1.1x)",
        HOSTS.len()
    ));
}
