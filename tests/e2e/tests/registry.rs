//! Registry pulls in the geo-distributed lab (issue 11): the registry in dc1, hosts a (dc1),
//! b (dc2) and c (dc3) without any job image, the controller in dc2 (so that cutting the
//! registry's data center off from dc3 leaves host c reporting). Jobs pull their image on
//! every host, all at one digest; wrong credentials, a missing tag, a cut link and a tag moved
//! mid-job each show what a user sees. One cluster for the whole binary (the scenarios run one
//! after another on it).
//!
//! Needs the binaries: `cargo build --workspace --bins` before `cargo test`.

use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use geomx_e2e::{eventually, lab_tests_enabled};
use geomx_lab::topology::parse_topology;
use geomx_lab::{
    Binaries, Cluster, ClusterSpec, Lab, LabSpec, REGISTRY_TEST_IMAGE, RegistrySpec, Rootfs,
};
use serde_json::Value;

/// Links shaped as the geo tests do; dc1 - dc3 (the registry to host c) slow enough that a
/// 48 MiB layer takes about 10 s.
const TOPOLOGY: &str = r#"
[[dc]]
name = "dc1"
subnet = "10.1.1.0/24"
hosts = [{ name = "a", ip = "10.1.1.34" }]
[[dc]]
name = "dc2"
subnet = "10.2.1.0/24"
hosts = [{ name = "b", ip = "10.2.1.29" }]
[[dc]]
name = "dc3"
subnet = "10.3.1.0/24"
hosts = [{ name = "c", ip = "10.3.1.33" }]

[controller]
dc = "dc2"

[registry]
dc = "dc1"

[[link]]
dcs = ["dc1", "dc2"]
delay = "10ms"
rate = "200mbit"
[[link]]
dcs = ["dc1", "dc3"]
delay = "10ms"
rate = "40mbit"
[[link]]
dcs = ["dc2", "dc3"]
delay = "10ms"
"#;

const HOSTS: [&str; 3] = ["a", "b", "c"];
/// Size of the random file of the big image.
const BIG_BYTES: usize = 48 << 20;

fn geo_cluster() -> anyhow::Result<Cluster> {
    let file = parse_topology("registry.toml", TOPOLOGY)?;
    // no MXNet image: the big image of these tests is built here (faster to push)
    let lab = Lab::up(
        LabSpec::for_test()
            .topology(file)
            .registry(RegistrySpec::default()),
    )?;
    // `--images registry-only`: the hosts get no image of their own
    Ok(Cluster::up(
        lab,
        ClusterSpec {
            psnode_image: false,
            mxnet_tar: None,
            network_interval: Duration::from_secs(1),
            ..ClusterSpec::default()
        },
        Binaries::find()?,
    )?)
}

/// A ps job over a, b and c whose workers exit 0 after 4 s (the scheduler and server sleep until
/// geomx stops them), with `top` among the top-level
/// keys and `policy` in `[policy]`.
fn job(name: &str, image: &str, top: &str, policy: &str) -> String {
    format!(
        r#"name = "{name}"
mode = "ps"
image = "{image}"
network = "routed"
verbose = 0
{top}

[command]
scheduler = ["sh", "-c", "exec sleep 600"]
server = ["sh", "-c", "exec sleep 600"]
worker = ["sh", "-c", "sleep 4"]

[[party]]
name = "p"
hosts = ["a", "b", "c"]
workers = 3
servers = 1
scheduler_port = 9100

[policy]
teardown_grace = "1s"
{policy}
"#
    )
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `geomxctl ARGS` (following a job or pulls), killed after `secs` seconds.
fn ctl_within(c: &Cluster, secs: u32, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = c.lab().controller_netns().command("timeout");
    cmd.arg(secs.to_string())
        .arg(&c.binaries().ctl)
        .args(args)
        .envs(c.ctl_env(&c.controller_url()));
    Ok(cmd.output()?)
}

fn docker(c: &Cluster, host: &str, args: &[&str]) -> anyhow::Result<String> {
    Ok(c.lab().host(host)?.dockerd()?.docker(args)?)
}

fn job_file(c: &Cluster, file_name: &str, toml: &str) -> anyhow::Result<String> {
    let dir = c.lab().dir().join("jobs");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(file_name);
    std::fs::write(&file, toml)?;
    Ok(file.display().to_string())
}

/// Deterministic incompressible bytes (xorshift64), so that a layer is as big compressed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Builds a busybox image with `/marker` holding `marker` (and `extra` bytes of noise) on
/// host a, pushes it to the lab registry as `repo_tag`, removes it from a again and returns
/// the reference and the digest the registry gave it (`sha256:...`).
fn push_image(
    c: &Cluster,
    repo_tag: &str,
    marker: &str,
    extra: usize,
) -> anyhow::Result<(String, String)> {
    let lab = c.lab();
    let reg = lab.registry().context("the lab's registry")?;
    let reference = reg.image(repo_tag);
    let dir = lab
        .dir()
        .join("images")
        .join(repo_tag.replace([':', '/'], "-"));
    let rootfs = Rootfs::new(&dir)?.with_busybox()?;
    rootfs.add_file("/marker", marker.as_bytes(), 0o644)?;
    if extra > 0 {
        rootfs.add_file("/noise", &noise(extra, marker.len() as u64 + 7), 0o644)?;
    }
    let d = lab.host("a")?.dockerd()?;
    rootfs.import(d, &reference, &["/bin/sh"])?;
    lab.push_to_registry("a", &reference, repo_tag)?;
    let repo_digest = d.docker(&[
        "image",
        "inspect",
        &reference,
        "--format",
        "{{index .RepoDigests 0}}",
    ])?;
    let digest = repo_digest
        .trim()
        .split_once('@')
        .map(|(_, d)| d.to_owned())
        .with_context(|| format!("a digest in {repo_digest:?}"))?;
    d.docker(&["rmi", &reference])?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok((reference, digest))
}

/// The role containers of `job` on `host`: (name, image id, the image reference asked for).
fn role_containers(
    c: &Cluster,
    job: &str,
    host: &str,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let prefix = format!("geomx.{job}.");
    let mut out = Vec::new();
    for name in c.geomx_containers(host)? {
        if !name.starts_with(&prefix) {
            continue;
        }
        let line = match docker(
            c,
            host,
            &["inspect", &name, "--format", "{{.Image}} {{.Config.Image}}"],
        ) {
            Ok(line) => line,
            // listed, then removed with its ended job before the inspect
            Err(e) if format!("{e:#}").contains("No such object") => continue,
            Err(e) => return Err(e),
        };
        let (id, asked) = line
            .trim()
            .split_once(' ')
            .with_context(|| format!("docker inspect {name}: {line:?}"))?;
        out.push((name.clone(), id.to_owned(), asked.to_owned()));
    }
    Ok(out)
}

/// Every role container of `job` on every host runs the image `digest` of `repo` (by its
/// id and RepoDigests on each host); returns the image ids seen.
fn all_run_digest(c: &Cluster, job: &str, repo: &str, digest: &str) -> anyhow::Result<()> {
    let want = format!("{repo}@{digest}");
    for host in HOSTS {
        let roles = role_containers(c, job, host)?;
        ensure!(!roles.is_empty(), "no role container of {job} on {host}");
        for (name, id, asked) in roles {
            let digests = docker(
                c,
                host,
                &["image", "inspect", &id, "--format", "{{json .RepoDigests}}"],
            )?;
            ensure!(
                digests.contains(&want),
                "{name} on {host} runs image {id} (asked for {asked}) with RepoDigests {digests}, not {want}"
            );
        }
    }
    Ok(())
}

/// Waits until `job` runs, checks that every role container runs `repo@digest` (geomx
/// removes them once the job ended), then waits until it Succeeded.
fn runs_digest_then_succeeds(
    c: &Cluster,
    job: &str,
    repo: &str,
    digest: &str,
) -> anyhow::Result<Value> {
    c.wait_phase(job, "Running", Duration::from_secs(60))?;
    all_run_digest(c, job, repo, digest)?;
    let j = wait_end(c, job, Duration::from_secs(60))?;
    ensure!(j["phase"] == "Succeeded", "{j}");
    Ok(j)
}

/// Waits until `job` ended (Failed, Succeeded or Cancelled).
fn wait_end(c: &Cluster, job: &str, timeout: Duration) -> anyhow::Result<Value> {
    Ok(c.wait_job(job, timeout, "an end", |j| {
        matches!(
            j["phase"].as_str(),
            Some("Failed" | "Succeeded" | "Cancelled")
        )
    })?)
}

fn pull_of<'j>(job: &'j Value, host: &str) -> Option<&'j Value> {
    job["pulls"].as_array()?.iter().find(|p| p["host"] == host)
}

fn rm(c: &Cluster, job: &str) -> anyhow::Result<()> {
    let out = c.ctl(&["rm", job])?;
    ensure!(out.status.success(), "geomxctl rm {job}: {}", text(&out));
    Ok(())
}

fn wait_hosts(c: &Cluster) -> anyhow::Result<()> {
    let names: Vec<String> = HOSTS.iter().map(|h| h.to_string()).collect();
    Ok(c.wait_hosts_ready(&names, Duration::from_secs(60))?)
}

/// (a) The image is only in the registry: every host pulls it, the job succeeds, every role
/// container runs the one digest, and `geomxctl submit` (its stdout a pipe) printed a pull
/// line per host. Returns the pinned digest.
fn pulled_on_every_host_at_one_digest(c: &Cluster) -> anyhow::Result<String> {
    let reg = c.lab().registry().context("registry")?;
    let image = reg.image(REGISTRY_TEST_IMAGE);
    for h in HOSTS {
        let has = docker(c, h, &["images", "-q", &image])?;
        ensure!(has.trim().is_empty(), "host {h} has {image} before the job");
    }
    let file = job_file(c, "pulled.toml", &job("pulled", &image, "", ""))?;
    let repo = image.rsplit_once(':').map_or(image.as_str(), |(r, _)| r);
    // geomxctl follows the job (its stdout a pipe) while the role containers are checked
    let (out, checked) = std::thread::scope(|s| {
        let follow = s.spawn(|| ctl_within(c, 120, &["submit", &file]));
        let checked = (|| -> anyhow::Result<(Value, String)> {
            let j = c.wait_job("pulled", Duration::from_secs(60), "a digest", |j| {
                j["image_digest"]
                    .as_str()
                    .is_some_and(|d| d.contains("@sha256:"))
            })?;
            let pinned = j["image_digest"].as_str().unwrap_or_default().to_owned();
            let digest = pinned
                .rsplit_once('@')
                .map(|(_, d)| d.to_owned())
                .unwrap_or_default();
            let j = runs_digest_then_succeeds(c, "pulled", repo, &digest)?;
            Ok((j, digest))
        })();
        let out = follow
            .join()
            .map_err(|_| anyhow::anyhow!("geomxctl submit panicked"));
        (out, checked)
    });
    let (j, digest) = checked?;
    let out = out??;
    let shown = text(&out);
    ensure!(out.status.success(), "geomxctl submit: {shown}");
    for h in HOSTS {
        ensure!(
            shown.contains(&format!("pull on {h}: ")),
            "no pull line for host {h} in:\n{shown}"
        );
    }
    ensure!(j["image_pull"] == "if-not-present", "image_pull: {j}");
    ensure!(
        j["image_digest"] == format!("{repo}@{digest}"),
        "image_digest: {j}"
    );
    for h in HOSTS {
        let p = pull_of(&j, h).with_context(|| format!("a pull of host {h} in {j}"))?;
        ensure!(p["state"] == "done", "host {h}'s pull: {p}");
    }
    Ok(digest)
}

/// (f) `geomxctl images -o json` lists the digest on every host; `geomxctl pull --hosts a,b`
/// pre-pulls a new image with per-host lines, exits 0, and leaves c without it.
fn images_and_pre_pull(c: &Cluster, digest: &str) -> anyhow::Result<()> {
    let images = eventually(
        "every host's images to list the job's digest",
        Duration::from_secs(15),
        || {
            let v = c.ctl_json(&["images"]).ok()?;
            let rows = v["images"].as_array()?.clone();
            HOSTS
                .iter()
                .all(|h| {
                    rows.iter().any(|r| {
                        r["host"] == *h
                            && r["digests"].as_array().is_some_and(|d| {
                                d.iter()
                                    .any(|x| x.as_str().is_some_and(|x| x.ends_with(digest)))
                            })
                    })
                })
                .then_some(rows)
        },
    )?;
    ensure!(
        images.iter().all(|r| r["size_bytes"].as_u64() > Some(0)),
        "{images:?}"
    );

    let (image, digest) = push_image(c, "geomx/prepull:v1", "prepull", 0)?;
    let out = ctl_within(c, 60, &["pull", &image, "--hosts", "a,b"])?;
    let shown = text(&out);
    ensure!(out.status.success(), "geomxctl pull: {shown}");
    ensure!(
        shown.contains("pull on a: ")
            && shown.contains("pull on b: ")
            && !shown.contains("pull on c"),
        "geomxctl pull printed:\n{shown}"
    );
    // pulled by digest (what `geomxctl pull` pinned the tag to): no tag on the hosts
    let pinned = format!(
        "{}@{digest}",
        image.rsplit_once(':').map_or(image.as_str(), |(r, _)| r)
    );
    ensure!(
        shown.contains(&format!("{image} is {pinned}")),
        "geomxctl pull printed:\n{shown}"
    );
    for h in ["a", "b"] {
        let d = docker(
            c,
            h,
            &[
                "image",
                "inspect",
                &pinned,
                "--format",
                "{{json .RepoDigests}}",
            ],
        )?;
        ensure!(d.contains(&digest), "{pinned} on {h}: {d}");
    }
    ensure!(
        docker(c, "c", &["image", "inspect", &pinned]).is_err(),
        "host c pulled {pinned} though --hosts a,b"
    );
    let on_b = c.ctl_json(&["images", "--host", "b"])?;
    let rows = on_b["images"].as_array().cloned().unwrap_or_default();
    ensure!(
        rows.iter().all(|r| r["host"] == "b")
            && rows
                .iter()
                .any(|r| r["digests"].to_string().contains(&digest)),
        "geomxctl images --host b: {on_b}"
    );
    Ok(())
}

/// (b) Wrong credentials on host c: the job fails (or is refused) naming host c, the image and
/// "unauthorized"; the agent read the file again (no restart). A missing tag is refused at
/// submit with exit 2 naming a host, the image and "not found".
fn wrong_credentials_and_a_missing_tag(c: &Cluster) -> anyhow::Result<()> {
    let (image, _) = push_image(c, "geomx/creds:v1", "creds", 0)?;
    let agent_pid = c.agent("c").pid();
    c.set_registry_auth("c", "geomx", "not-the-password")?;
    let file = job_file(c, "creds.toml", &job("creds", &image, "", ""))?;
    let out = c.ctl(&["submit", "--detach", &file])?;
    let repo = image.rsplit_once(':').map_or(image.as_str(), |(r, _)| r);
    let said = if out.status.success() {
        let j = wait_end(c, "creds", Duration::from_secs(60))?;
        ensure!(j["phase"] == "Failed", "{j}");
        j["reason"].as_str().unwrap_or_default().to_owned()
    } else {
        ensure!(
            out.status.code() == Some(2),
            "exit {:?}: {}",
            out.status,
            text(&out)
        );
        text(&out)
    };
    ensure!(
        said.contains("on host c") && said.contains(repo) && said.contains("unauthorized"),
        "wrong credentials on c: {said}"
    );
    eprintln!("wrong credentials on c: {said}");
    ensure!(c.agent("c").pid() == agent_pid, "the agent of c restarted");
    c.reset_registry_auth("c")?;
    if out.status.success() {
        rm(c, "creds")?;
    }

    let missing = c
        .lab()
        .registry()
        .context("registry")?
        .image("geomx/test:no-such-tag");
    let file = job_file(c, "missing.toml", &job("missing", &missing, "", ""))?;
    let out = c.ctl(&["submit", "--detach", &file])?;
    let said = text(&out);
    ensure!(
        out.status.code() == Some(2),
        "missing tag: exit {:?}: {said}",
        out.status
    );
    ensure!(
        said.contains(&format!("image {missing} cannot be resolved"))
            && said.contains("on host ")
            && said.contains("not found"),
        "missing tag: {said}"
    );
    eprintln!("a missing tag: {said}");
    Ok(())
}

/// (e) `image_pull = "never"` with the image on no host is refused at submit (exit 2) naming
/// a host and the image.
fn never_pull_is_refused(c: &Cluster) -> anyhow::Result<()> {
    let image = c
        .lab()
        .registry()
        .context("registry")?
        .image("geomx/creds:v1");
    let file = job_file(
        c,
        "never.toml",
        &job("never", &image, r#"image_pull = "never""#, ""),
    )?;
    let out = c.ctl(&["submit", "--detach", &file])?;
    let said = text(&out);
    ensure!(
        out.status.code() == Some(2),
        "never: exit {:?}: {said}",
        out.status
    );
    ensure!(
        said.contains(&image)
            && HOSTS
                .iter()
                .any(|h| said.contains(&format!("host {h}")) || said.contains(&format!("on {h}"))),
        "never: {said}"
    );
    ensure!(
        c.job("never").is_err(),
        "a refused job is listed: {:?}",
        c.job("never")
    );
    Ok(())
}

/// (c) The registry's data center cut off from dc3 while host c pulls a big image: the job
/// fails after its `pull_timeout` naming host c, the image and the cause; after the heal the
/// same job file succeeds.
fn a_cut_mid_pull_fails_and_the_same_job_succeeds_after_heal(
    c: &mut Cluster,
) -> anyhow::Result<()> {
    let (image, digest) = push_image(c, "geomx/big:v1", "big", BIG_BYTES)?;
    let toml = job("big", &image, "", r#"pull_timeout = "20s""#);
    let file = job_file(c, "big.toml", &toml)?;
    let out = c.ctl(&["submit", "--detach", &file])?;
    ensure!(out.status.success(), "submit big: {}", text(&out));
    let j = c.wait_job(
        "big",
        Duration::from_secs(30),
        "host c's pull under way",
        |j| pull_of(j, "c").is_some_and(|p| p["bytes_done"].as_u64() > Some(0)),
    )?;
    ensure!(j["phase"] == "Pulling", "{j}");
    c.lab_mut().set_link("dc1", "dc3", |s| s.cut = true)?;
    let cut = (|| -> anyhow::Result<()> {
        let j = wait_end(c, "big", Duration::from_secs(60))?;
        ensure!(j["phase"] == "Failed", "{j}");
        let reason = j["reason"].as_str().unwrap_or_default();
        ensure!(
            reason.contains("on host c")
                && reason.contains("geomx/big")
                && reason.contains("timed out"),
            "reason of the cut pull: {reason}"
        );
        Ok(())
    })();
    c.lab_mut().set_link("dc1", "dc3", |s| s.cut = false)?;
    cut?;
    wait_hosts(c)?;
    rm(c, "big")?;
    let out = c.ctl(&["submit", "--detach", &file])?;
    ensure!(out.status.success(), "big after the heal: {}", text(&out));
    let repo = image.rsplit_once(':').map_or(image.as_str(), |(r, _)| r);
    runs_digest_then_succeeds(c, "big", repo, &digest).map(drop)
}

/// (d) The tag moves in the registry after a and b pulled it and before c can: c pulls the
/// job's digest, not the tag's new one.
fn a_moved_tag_does_not_split_a_job(c: &mut Cluster) -> anyhow::Result<()> {
    let (image, first) = push_image(c, "geomx/moving:latest", "first", 0)?;
    c.lab_mut().set_link("dc1", "dc3", |s| s.cut = true)?;
    let moved = (|| -> anyhow::Result<String> {
        let file = job_file(
            c,
            "moving.toml",
            &job("moving", &image, "", r#"pull_timeout = "3m""#),
        )?;
        let out = c.ctl(&["submit", "--detach", &file])?;
        ensure!(out.status.success(), "submit moving: {}", text(&out));
        let j = c.wait_job("moving", Duration::from_secs(60), "a and b pulled", |j| {
            ["a", "b"]
                .iter()
                .all(|h| pull_of(j, h).is_some_and(|p| p["state"] == "done"))
        })?;
        ensure!(j["phase"] == "Pulling", "c cannot have pulled: {j}");
        ensure!(
            j["image_digest"]
                .as_str()
                .is_some_and(|d| d.ends_with(&first)),
            "pinned {} though the registry had {first}",
            j["image_digest"]
        );
        let (_, second) = push_image(c, "geomx/moving:latest", "second", 0)?;
        ensure!(second != first, "the tag did not move");
        Ok(second)
    })();
    c.lab_mut().set_link("dc1", "dc3", |s| s.cut = false)?;
    let second = moved?;
    let repo = image.rsplit_once(':').map_or(image.as_str(), |(r, _)| r);
    c.wait_phase("moving", "Running", Duration::from_secs(120))?;
    all_run_digest(c, "moving", repo, &first)?;
    let ids: BTreeSet<String> = HOSTS
        .iter()
        .map(|h| role_containers(c, "moving", h))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .map(|(_, id, _)| id)
        .collect();
    ensure!(ids.len() == 1, "role containers run images {ids:?}");
    // the marker inside the image they all ran (c included, as all_run_digest saw) is the
    // first image's; read from the image on c, which stays when the job's containers go
    // (its workers run 4 s: they may have ended and been removed by now)
    let id = ids.first().context("the role containers' image")?;
    let marker = docker(
        c,
        "c",
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "sh",
            id,
            "-c",
            "cat /marker",
        ],
    )?;
    if !marker.contains("first") {
        bail!("the image c ran has marker {marker:?}, not the first image's ({second} moved in)");
    }
    let j = wait_end(c, "moving", Duration::from_secs(60))?;
    ensure!(j["phase"] == "Succeeded", "{j}");
    Ok(())
}

#[test]
fn registry_pulls_across_data_centers() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let start = std::time::Instant::now();
    let mut c = geo_cluster()?;
    let step = |what: &str| eprintln!("[{:6.1}s] {what}", start.elapsed().as_secs_f64());
    let result = (|| -> anyhow::Result<()> {
        step("(a) a job of an image only in the registry");
        let digest = pulled_on_every_host_at_one_digest(&c).context("(a) pulled everywhere")?;
        step("(f) geomxctl images and pull");
        images_and_pre_pull(&c, &digest).context("(f) images and pull")?;
        step("(b) wrong credentials, a missing tag");
        wrong_credentials_and_a_missing_tag(&c).context("(b) credentials, missing tag")?;
        step("(e) image_pull never");
        never_pull_is_refused(&c).context("(e) image_pull never")?;
        step("(c) the registry cut off mid-pull");
        a_cut_mid_pull_fails_and_the_same_job_succeeds_after_heal(&mut c)
            .context("(c) cut mid-pull")?;
        step("(d) a tag moved mid-job");
        a_moved_tag_does_not_split_a_job(&mut c).context("(d) moved tag")?;
        step("done");
        Ok(())
    })();
    if result.is_err() {
        c.lab().dump_logs(40);
    }
    result
}
