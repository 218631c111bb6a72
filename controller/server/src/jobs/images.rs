//! A job's image: which reference its hosts run, resolving a tag to one digest at submit,
//! and the Pulling phase that waits until every host of the job has it.
//!
//! At submit ([`decide`]): with `image_pull = "never"` the image must be on every host
//! (placement checks it); a reference by digest is run as it is; with `if-not-present` a
//! tag that every host of the job has, at the same registry digest (or at none: built or
//! loaded there), is run as it is;
//! otherwise — `always`, or a host lacks the tag or has it as another image — the
//! controller asks one host's agent to resolve the tag in its registry
//! ([`AgentConnector::resolve_image`]) and pins the job to that digest: every host runs
//! `repo@sha256:...`, so a tag moved in the registry while the hosts pull cannot give two
//! hosts different bits. Hosts that lack the pinned image pull it; [`Pulls`] follows their
//! reports until each has it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use geomx_job::{ImagePull, Plan};
use geomx_proto::v1::agent_node_service_client::AgentNodeServiceClient;
use geomx_proto::v1::{
    AgentPullRequest, HostPull, ImageInfo, ImagePull as PullProgress, ResolveImageRequest,
    ResolveImageResponse,
};
use tonic::Status;

use super::logs::{AgentConnector, agent_status};
use super::placement::image_matches;

/// How long resolving a reference through an agent may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(25);

/// What a host reported of its images (from its last report).
#[derive(Clone, Copy, Debug)]
pub struct HostImages<'a> {
    /// Every `repo:tag` and `repo@sha256:...` on the host.
    pub refs: &'a [String],
    /// The images with their ids.
    pub details: &'a [ImageInfo],
}

/// What to do with a job's image at submit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run the image as the job names it (`never`, a digest reference, or a tag every
    /// host has as the same image).
    AsNamed,
    /// Resolve it in its registry through one of these hosts (in this order) and pin the
    /// job to the digest.
    Resolve {
        /// Hosts to ask, those that lack the image first (they must reach the registry).
        through: Vec<String>,
        /// Why it is resolved, for the event ("always", "missing on b, c", ...).
        why: String,
    },
}

/// Decides how a job's image is run (see the module docs). `images` gives a host's last
/// reported images (`None`: not known).
pub fn decide<'a>(plan: &Plan, images: impl Fn(&str) -> Option<HostImages<'a>>) -> Decision {
    let image = plan.image.as_str();
    if plan.image_pull == ImagePull::Never || image.contains('@') || image.is_empty() {
        return Decision::AsNamed;
    }
    let hosts: Vec<&str> = plan.hosts().into_iter().collect();
    let mut missing = Vec::new();
    let mut digests = BTreeSet::new();
    for &h in &hosts {
        match images(h).and_then(|i| registry_digests(i, image)) {
            Some(d) if !d.is_empty() => {
                digests.insert(d);
            }
            Some(_) => {}
            None => missing.push(h.to_owned()),
        }
    }
    let why = if plan.image_pull == ImagePull::Always {
        "image_pull \"always\"".to_owned()
    } else if !missing.is_empty() {
        format!(
            "not on host{} {}",
            plural(missing.len()),
            missing.join(", ")
        )
    } else if digests.len() > 1 {
        format!(
            "the hosts have {image} as {} different registry digests",
            digests.len()
        )
    } else {
        return Decision::AsNamed;
    };
    let mut through = missing.clone();
    through.extend(
        hosts
            .iter()
            .filter(|h| !missing.iter().any(|m| m == *h))
            .map(|h| (*h).to_owned()),
    );
    Decision::Resolve { through, why }
}

/// The registry digests (`sha256:...`) of the image a host has as tag `image`, `None` when
/// it does not have the tag. Empty for an image that never came from a registry (built,
/// imported or loaded on the host): nothing says it differs from the other hosts'.
fn registry_digests(images: HostImages<'_>, image: &str) -> Option<BTreeSet<String>> {
    if !images.refs.iter().any(|have| image_matches(image, have)) {
        return None;
    }
    let repo = normalize_repo(strip_tag(image));
    Some(
        images
            .details
            .iter()
            .filter(|d| d.repo_tags.iter().any(|t| image_matches(image, t)))
            .flat_map(|d| &d.repo_digests)
            .filter_map(|r| r.split_once('@'))
            .filter(|(r, _)| normalize_repo(r) == repo)
            .map(|(_, d)| d.to_owned())
            .collect(),
    )
}

/// Whether `refs` (a host's images) hold `wanted`: a `repo@sha256:...` exactly (Docker Hub's
/// `docker.io/` and `library/` prefixes optional), a tag as [`image_matches`] says.
pub fn has_image(refs: &[String], wanted: &str) -> bool {
    refs.iter().any(|have| matches_ref(have, wanted))
}

/// Whether the image reference `have` (one of a host's) is `wanted`, as [`has_image`] says.
fn matches_ref(have: &str, wanted: &str) -> bool {
    match wanted.split_once('@') {
        Some((repo, digest)) => have.split_once('@').is_some_and(|(r, d)| {
            d == digest && normalize_repo(r) == normalize_repo(strip_tag(repo))
        }),
        None => !have.contains('@') && image_matches(wanted, have),
    }
}

fn strip_tag(repo: &str) -> &str {
    match repo.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => name,
        _ => repo,
    }
}

fn normalize_repo(repo: &str) -> &str {
    let repo = repo.strip_prefix("docker.io/").unwrap_or(repo);
    repo.strip_prefix("library/").unwrap_or(repo)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The hosts of a job that still have to get its image, and how their pulls go.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pulls {
    /// The reference the job runs (pinned digest, or the image as named).
    pub image: String,
    /// Per host of the job.
    pub hosts: BTreeMap<String, HostPullState>,
}

/// One host's side of a job's Pulling phase.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostPullState {
    /// The host has the image.
    pub present: bool,
    /// Its last reported pull of the image.
    pub last: Option<PullProgress>,
}

impl Pulls {
    /// For a job running `image` on `hosts`, from what each host last reported.
    pub fn new<'a>(
        image: &str,
        hosts: impl IntoIterator<Item = &'a str>,
        refs: impl Fn(&str) -> Option<Vec<String>>,
    ) -> Pulls {
        Pulls {
            image: image.to_owned(),
            hosts: hosts
                .into_iter()
                .map(|h| {
                    let present = refs(h).is_some_and(|r| has_image(&r, image));
                    (
                        h.to_owned(),
                        HostPullState {
                            present,
                            last: None,
                        },
                    )
                })
                .collect(),
        }
    }

    /// True once every host has the image.
    pub fn done(&self) -> bool {
        self.hosts.values().all(|h| h.present)
    }

    /// The hosts that do not have it yet.
    pub fn pending(&self) -> impl Iterator<Item = &str> {
        self.hosts
            .iter()
            .filter(|(_, h)| !h.present)
            .map(|(n, _)| n.as_str())
    }

    /// A report of `host`: its images (`None`: not known yet) and pulls. Returns true when
    /// it changed what people see (progress, or the host now has the image).
    pub fn reported(
        &mut self,
        host: &str,
        refs: Option<&[String]>,
        pulls: &[PullProgress],
    ) -> bool {
        let image = self.image.clone();
        let Some(state) = self.hosts.get_mut(host) else {
            return false;
        };
        let mut changed = false;
        if let Some(p) = pulls.iter().find(|p| same_ref(&p.image, &image))
            && state.last.as_ref() != Some(p)
        {
            state.last = Some(p.clone());
            changed = true;
        }
        if !state.present && refs.is_some_and(|r| has_image(r, &image)) {
            state.present = true;
            changed = true;
        }
        changed
    }

    /// The API view, one entry per host that pulled (or is pulling) the image.
    pub fn messages(&self) -> Vec<HostPull> {
        self.hosts
            .iter()
            .filter_map(|(host, s)| {
                let mut pull = s.last.clone()?;
                if s.present && pull.state != "failed" {
                    "done".clone_into(&mut pull.state);
                }
                Some(HostPull {
                    host: host.clone(),
                    pull: Some(pull),
                })
            })
            .collect()
    }

    /// The hosts still pulling, for a reason or an event: `b (pulling 120.0 MiB of
    /// 450.0 MiB (26%), 3/7 layers), c (retrying (attempt 2): registry unreachable)`.
    pub fn pending_summary(&self) -> String {
        self.hosts
            .iter()
            .filter(|(_, h)| !h.present)
            .map(|(host, h)| match &h.last {
                None => format!("{host} (not started)"),
                Some(p) => format!("{host} ({})", geomx_proto::pulls::pull_text(p)),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether two references name the same pull (a digest reference with or without a tag).
fn same_ref(a: &str, b: &str) -> bool {
    a == b || matches_ref(a, b)
}

/// What resolving a reference through an agent gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// `repo@sha256:...`.
    pub pinned: String,
    /// The registry asked.
    pub registry: String,
    /// The host whose agent asked it.
    pub through: String,
}

impl AgentConnector {
    /// Resolves `image` to the digest its registry serves, through the agent of `host`.
    pub async fn resolve_image(
        &self,
        host: &str,
        url: &str,
        image: &str,
    ) -> Result<ResolveImageResponse, Status> {
        let channel = self.channel(host, url).await?;
        let mut request = tonic::Request::new(ResolveImageRequest {
            image: image.to_owned(),
        });
        request.set_timeout(RESOLVE_TIMEOUT);
        let mut client = AgentNodeServiceClient::new(channel);
        let call = client.resolve_image(request);
        match tokio::time::timeout(RESOLVE_TIMEOUT + Duration::from_secs(2), call).await {
            Ok(Ok(answer)) => Ok(answer.into_inner()),
            Ok(Err(s)) => Err(agent_status(host, &s)),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "agent of host {host}: resolving {image} took longer than {}s",
                RESOLVE_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Has the agent of `host` start pulling `image`; false when it has it already.
    pub async fn pull_image(
        &self,
        host: &str,
        url: &str,
        image: &str,
        timeout: Duration,
    ) -> Result<bool, Status> {
        let channel = self.channel(host, url).await?;
        let mut request = tonic::Request::new(AgentPullRequest {
            image: image.to_owned(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        });
        request.set_timeout(RESOLVE_TIMEOUT);
        let answer = AgentNodeServiceClient::new(channel)
            .pull_image(request)
            .await
            .map_err(|s| agent_status(host, &s))?;
        Ok(answer.into_inner().started)
    }
}

/// Resolves `image` through the first host of `through` that answers (`agent_url` gives a
/// host's agent URL). A definitive answer of the registry (not found, unauthorized) ends
/// the search; an unreachable agent or registry tries the next host. The error lists every
/// host's answer.
pub async fn resolve(
    agents: &AgentConnector,
    image: &str,
    through: &[String],
    agent_url: impl Fn(&str) -> Option<String>,
) -> Result<Resolved, Status> {
    let mut errors = Vec::new();
    let mut code = tonic::Code::Unavailable;
    for host in through {
        let Some(url) = agent_url(host) else {
            continue;
        };
        match agents.resolve_image(host, &url, image).await {
            Ok(r) if r.pinned.contains("@sha256:") => {
                return Ok(Resolved {
                    pinned: r.pinned,
                    registry: r.registry,
                    through: host.clone(),
                });
            }
            Ok(r) => {
                errors.push(format!(
                    "on host {host}: the agent answered {:?}, not a repo@sha256:... reference",
                    r.pinned
                ));
            }
            Err(s) => {
                let definitive = matches!(
                    s.code(),
                    tonic::Code::NotFound
                        | tonic::Code::PermissionDenied
                        | tonic::Code::Unauthenticated
                        | tonic::Code::InvalidArgument
                );
                errors.push(format!("on host {host}: {}", s.message()));
                if definitive {
                    code = s.code();
                    break;
                }
            }
        }
    }
    if errors.is_empty() {
        errors.push("no host of the job has a reachable agent".to_owned());
    }
    Err(Status::new(
        code,
        format!(
            "image {image} cannot be resolved to a digest:\n{}",
            errors.join("\n")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hips job: central party on `a`, one party on `b`.
    fn plan(pull: ImagePull, image: &str) -> Plan {
        let toml = format!(
            "name = \"j\"\nmode = \"hips\"\nimage = \"{image}\"\nimage_pull = \"{}\"\n\
             [central]\nhost = \"a\"\n[[party]]\nname = \"p\"\nhosts = [\"b\"]\nworkers = 1\n",
            pull.as_str()
        );
        geomx_job::plan("j.toml", &toml).expect("valid job")
    }

    fn info(id: &str, tags: &[&str], digest: Option<&str>) -> ImageInfo {
        ImageInfo {
            id: id.into(),
            repo_tags: tags.iter().map(|t| t.to_string()).collect(),
            repo_digests: digest
                .map(|d| vec![format!("reg:5000/geomx/test@{d}")])
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let tag = "reg:5000/geomx/test:latest";
        let has = vec![tag.to_owned()];
        let none: Vec<String> = Vec::new();
        let same = [info("sha256:1", &[tag], Some("sha256:d1"))];
        let other = [info("sha256:2", &[tag], Some("sha256:d2"))];
        // built or imported on each host: other ids, no registry digest
        let local_1 = [info("sha256:1", &[tag], None)];
        let local_2 = [info("sha256:2", &[tag], None)];
        let resolve = |through: &[&str], why: &str| Decision::Resolve {
            through: through.iter().map(|s| s.to_string()).collect(),
            why: why.to_owned(),
        };
        // (policy, image, what a and b have, expected)
        type Has<'a> = (&'a [String], &'a [ImageInfo]);
        let cases: Vec<(ImagePull, &str, [Has<'_>; 2], Decision)> = vec![
            (
                ImagePull::Never,
                tag,
                [(&none, &[]), (&none, &[])],
                Decision::AsNamed,
            ),
            (
                ImagePull::IfNotPresent,
                "reg:5000/geomx/test@sha256:ab",
                [(&none, &[]), (&none, &[])],
                Decision::AsNamed,
            ),
            (
                ImagePull::IfNotPresent,
                tag,
                [(&has, &same), (&has, &same)],
                Decision::AsNamed,
            ),
            (
                ImagePull::IfNotPresent,
                tag,
                [(&has, &same), (&none, &[])],
                resolve(&["b", "a"], "not on host b"),
            ),
            (
                ImagePull::IfNotPresent,
                tag,
                [(&none, &[]), (&none, &[])],
                resolve(&["a", "b"], "not on hosts a, b"),
            ),
            (
                ImagePull::IfNotPresent,
                tag,
                [(&has, &same), (&has, &other)],
                resolve(
                    &["a", "b"],
                    "the hosts have reg:5000/geomx/test:latest as 2 different registry digests",
                ),
            ),
            (
                ImagePull::IfNotPresent,
                tag,
                [(&has, &local_1), (&has, &local_2)],
                Decision::AsNamed,
            ),
            (
                ImagePull::IfNotPresent,
                tag,
                [(&has, &same), (&has, &local_2)],
                Decision::AsNamed,
            ),
            (
                ImagePull::Always,
                tag,
                [(&has, &same), (&has, &same)],
                resolve(&["a", "b"], "image_pull \"always\""),
            ),
        ];
        for (pull, image, [a, b], want) in cases {
            let p = plan(pull, image);
            let got = decide(&p, |h| {
                let (refs, details) = if h == "a" { a } else { b };
                Some(HostImages { refs, details })
            });
            assert_eq!(got, want, "{pull:?} {image}");
        }
    }

    #[test]
    fn digests_match_exactly() {
        let refs = vec![
            "reg:5000/geomx/test:latest".to_owned(),
            "reg:5000/geomx/test@sha256:aa".to_owned(),
            "lizonghango00o1/geomx@sha256:cc".to_owned(),
        ];
        assert!(has_image(&refs, "reg:5000/geomx/test@sha256:aa"));
        assert!(has_image(&refs, "reg:5000/geomx/test:latest@sha256:aa"));
        assert!(!has_image(&refs, "reg:5000/geomx/test@sha256:bb"));
        assert!(!has_image(&refs, "reg:5000/other@sha256:aa"));
        assert!(has_image(
            &refs,
            "docker.io/lizonghango00o1/geomx@sha256:cc"
        ));
        assert!(has_image(&refs, "reg:5000/geomx/test"));
        assert!(!has_image(&refs, "reg:5000/geomx/test:v2"));
    }

    #[test]
    fn pulls_follow_reports() {
        let image = "reg:5000/geomx/test@sha256:aa";
        let mut p = Pulls::new(image, ["a", "b"], |h| {
            (h == "a").then(|| vec![image.to_owned()])
        });
        assert!(!p.done());
        assert_eq!(p.pending().collect::<Vec<_>>(), ["b"]);
        assert_eq!(p.pending_summary(), "b (not started)");
        let progress = PullProgress {
            image: image.into(),
            state: "pulling".into(),
            bytes_done: 1 << 20,
            bytes_total: 4 << 20,
            ..Default::default()
        };
        assert!(p.reported("b", Some(&[]), std::slice::from_ref(&progress)));
        assert!(!p.reported("b", Some(&[]), std::slice::from_ref(&progress)));
        assert_eq!(p.pending_summary(), "b (pulling 1.0 MiB of 4.0 MiB (25%))");
        // images not known yet: nothing concluded
        assert!(!p.reported("b", None, &[]));
        assert!(p.reported("b", Some(&[image.to_owned()]), &[]));
        assert!(p.done());
        let shown = p.messages();
        assert_eq!(shown.len(), 1);
        assert_eq!(shown[0].host, "b");
        assert_eq!(
            shown[0].pull.as_ref().map(|p| p.state.as_str()),
            Some("done")
        );
        // a host outside the job changes nothing
        assert!(!p.reported("z", Some(&[image.to_owned()]), &[]));
    }
}
