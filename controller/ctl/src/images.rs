//! `geomxctl images [--host H]`: every host's images (tags, digest, size) as its agent last
//! listed them; `geomxctl pull IMAGE [--hosts a,b]`: resolve IMAGE to one digest and have
//! the hosts (default: every ready host) pull it, following their progress (bars on a
//! terminal, plain lines otherwise, JSON lines with `--output json`) until each has it.
//! Exit codes: 0 every host has the image, 1 a pull failed, 2 refused (unknown host,
//! image not found, credentials refused).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use geomx_proto::v1::{Host, ImagePull, ListHostsRequest, PullImageRequest};
use serde_json::{Value, json};

use crate::client::{ConnectOptions, connect, runtime};
use crate::jobs::{FAILED, pull_json, refused};
use crate::pulls::{PullBars, PullLines, mib};
use crate::table::Table;
use crate::{Cli, Output};

/// Arguments of `geomxctl images`.
#[derive(Debug, clap::Args)]
pub struct ImagesArgs {
    /// Only this host.
    #[arg(long)]
    pub host: Option<String>,
}

/// Arguments of `geomxctl pull`.
#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// The image: repo[:tag] or repo@sha256:...
    pub image: String,
    /// The hosts to pull on, comma-separated; default every ready host.
    #[arg(long, value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Give up following after this long (the pulls go on).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// One row of `geomxctl images`.
fn rows(host: &Host) -> Vec<Value> {
    host.image_details
        .iter()
        .map(|d| {
            json!({
                "host": host.name,
                "id": d.id,
                "tags": d.repo_tags,
                "digests": d.repo_digests,
                "size_bytes": d.size_bytes,
            })
        })
        .collect()
}

/// Runs `geomxctl images`.
pub fn run_images(args: &ImagesArgs, cli: &Cli) -> anyhow::Result<ExitCode> {
    let opts = ConnectOptions::from_cli(cli);
    runtime()?.block_on(async {
        let remote = connect(&opts).await?;
        let hosts = match remote.hosts().list_hosts(ListHostsRequest {}).await {
            Ok(r) => r.into_inner().hosts,
            Err(s) => return refused(&remote, "listing the hosts", s, cli.output),
        };
        let hosts: Vec<&Host> = hosts
            .iter()
            .filter(|h| args.host.as_ref().is_none_or(|want| &h.name == want))
            .collect();
        if let Some(want) = &args.host
            && hosts.is_empty()
        {
            eprintln!("error: host {want} is not registered with the controller");
            return Ok(ExitCode::from(crate::jobs::REFUSED));
        }
        match cli.output {
            Output::Json => {
                let images: Vec<Value> = hosts.iter().flat_map(|h| rows(h)).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "images": images }))?
                );
            }
            Output::Table => print!("{}", images_table(&hosts)),
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn images_table(hosts: &[&Host]) -> String {
    let mut t = Table::new(["HOST", "IMAGE", "DIGEST", "ID", "SIZE"]);
    for h in hosts {
        for d in &h.image_details {
            let names: Vec<&str> = if d.repo_tags.is_empty() {
                vec!["<none>"]
            } else {
                d.repo_tags.iter().map(String::as_str).collect()
            };
            let digest = d
                .repo_digests
                .first()
                .and_then(|r| r.split_once('@'))
                .map_or("-", |(_, d)| d);
            for name in names {
                t.row([
                    h.name.as_str(),
                    name,
                    short_digest(digest),
                    short_digest(&d.id),
                    &mib(d.size_bytes),
                ]);
            }
        }
    }
    t.render()
}

/// `sha256:0123456789ab` (12 hex digits) of a digest or id.
fn short_digest(d: &str) -> &str {
    match d.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 => &d[..7 + 12],
        _ => d,
    }
}

/// Runs `geomxctl pull`.
pub fn run_pull(args: &PullArgs, cli: &Cli) -> anyhow::Result<ExitCode> {
    let opts = ConnectOptions::from_cli(cli);
    runtime()?.block_on(async {
        let remote = connect(&opts).await?;
        let started = match remote
            .hosts()
            .pull_image(PullImageRequest {
                image: args.image.clone(),
                hosts: args.hosts.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return refused(&remote, "starting the pull", s, cli.output),
        };
        let pinned = started.pinned.clone();
        match cli.output {
            Output::Json => println!(
                "{}",
                json!({ "image": args.image, "pinned": pinned, "pulling": started.pulling, "present": started.present })
            ),
            Output::Table => {
                println!("{} is {pinned}", args.image);
                if !started.present.is_empty() {
                    println!("already on {}", started.present.join(", "));
                }
            }
        }
        let mut bars = (cli.output == Output::Table && std::io::stdout().is_terminal())
            .then(PullBars::new);
        let mut lines = PullLines::default();
        let deadline = Instant::now() + args.timeout;
        let mut waiting = started.pulling.clone();
        let mut failed = Vec::new();
        while !waiting.is_empty() {
            let hosts = match remote.hosts().list_hosts(ListHostsRequest {}).await {
                Ok(r) => r.into_inner().hosts,
                Err(s) => return Err(remote.explain("following the pulls", s)),
            };
            let mut shown: Vec<(String, ImagePull)> = Vec::new();
            for h in hosts.iter().filter(|h| waiting.contains(&h.name)) {
                let pull = h.pulls.iter().find(|p| p.image == pinned).cloned();
                let has = h.images.iter().any(|i| i == &pinned);
                let pull = match (pull, has) {
                    (Some(mut p), true) => {
                        "done".clone_into(&mut p.state);
                        Some(p)
                    }
                    (None, true) => Some(ImagePull {
                        image: pinned.clone(),
                        state: "done".into(),
                        ..Default::default()
                    }),
                    (p, false) => p,
                };
                if let Some(p) = pull {
                    shown.push((h.name.clone(), p));
                }
            }
            let view = shown.iter().map(|(h, p)| (h.as_str(), p));
            match (&mut bars, cli.output) {
                (_, Output::Json) => {
                    for (h, p) in &shown {
                        println!("{}", pull_json(h, p));
                    }
                }
                (Some(b), _) => b.update(view),
                (None, _) => {
                    for l in lines.lines(view) {
                        println!("{l}");
                    }
                }
            }
            for (h, p) in &shown {
                match p.state.as_str() {
                    "done" => waiting.retain(|w| w != h),
                    "failed" => {
                        waiting.retain(|w| w != h);
                        failed.push(format!("{h}: {}", p.error));
                    }
                    _ => {}
                }
            }
            if waiting.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "error: still pulling on {} after {}; the pulls go on (geomxctl images)",
                    waiting.join(", "),
                    humantime::format_duration(args.timeout)
                );
                return Ok(ExitCode::from(FAILED));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        drop(bars);
        if failed.is_empty() {
            if cli.output == Output::Table {
                println!("every host has {pinned}");
            }
            Ok(ExitCode::SUCCESS)
        } else {
            for f in &failed {
                eprintln!("error: pull on {f}");
            }
            Ok(ExitCode::from(FAILED))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use geomx_proto::v1::ImageInfo;

    #[test]
    fn table_has_a_row_per_tag() {
        let h = Host {
            name: "b".into(),
            image_details: vec![ImageInfo {
                id: "sha256:0123456789abcdef0123".into(),
                repo_tags: vec!["reg:5000/geomx/test:latest".into(), "x:1".into()],
                repo_digests: vec!["reg:5000/geomx/test@sha256:fedcba9876543210ff".into()],
                size_bytes: 3 << 20,
            }],
            ..Default::default()
        };
        assert_eq!(
            images_table(&[&h]),
            "HOST  IMAGE                       DIGEST               ID                   SIZE\n\
             b     reg:5000/geomx/test:latest  sha256:fedcba987654  sha256:0123456789ab  3.0 MiB\n\
             b     x:1                         sha256:fedcba987654  sha256:0123456789ab  3.0 MiB\n"
        );
    }
}
