//! A job's bind sources, checked at submit: every host of the job that would bind-mount a
//! host path is asked, through its agent ([`AgentConnector::check_bind_sources`]), whether
//! the path exists there and where it leads. A path missing (or leading where no bind mount
//! may go) on any host, or a host whose agent cannot be asked, refuses the job before
//! anything is recorded, naming host and path. The agents' own check before they create a
//! container stays the second line: a path removed between submit and start fails the job
//! before it starts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use geomx_job::{MountType, Plan};
use geomx_proto::v1::agent_node_service_client::AgentNodeServiceClient;
use geomx_proto::v1::{BindSourceCheck, CheckBindSourcesRequest};
use tonic::Status;

use super::logs::{AgentConnector, agent_status};

/// How long one host's agent may take to check a job's bind sources.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The host paths each host of `plan` would bind-mount: bind sources and the devices of
/// `local` volumes whose options bind ([`geomx_job::local_volume_bind_device`]),
/// placeholders expanded. Hosts without any are left out.
pub fn sources_by_host(plan: &Plan) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for node in &plan.nodes {
        for m in &node.mounts {
            let path = match m.kind {
                MountType::Bind => Some(m.source.as_str()),
                MountType::Volume => {
                    geomx_job::local_volume_bind_device(m.driver.as_deref(), &m.options)
                }
            };
            if let Some(path) = path {
                out.entry(node.host.clone())
                    .or_default()
                    .insert(path.to_owned());
            }
        }
    }
    out
}

impl AgentConnector {
    /// Asks the agent of `host` what it has of `paths` (one answer per path).
    pub async fn check_bind_sources(
        &self,
        host: &str,
        url: &str,
        paths: Vec<String>,
    ) -> Result<Vec<BindSourceCheck>, Status> {
        let call = async {
            let channel = self.channel(host, url).await?;
            let mut request = tonic::Request::new(CheckBindSourcesRequest { paths });
            request.set_timeout(CHECK_TIMEOUT);
            AgentNodeServiceClient::new(channel)
                .check_bind_sources(request)
                .await
                .map(|r| r.into_inner().sources)
                .map_err(|s| agent_status(host, &s))
        };
        match tokio::time::timeout(CHECK_TIMEOUT, call).await {
            Ok(answer) => answer,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "agent of host {host}: no answer within {}s",
                CHECK_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// Checks `sources` (per host, see [`sources_by_host`]) on every host at once, each within
/// [`CHECK_TIMEOUT`]; `agent_url` gives a ready host's agent URL (`None`: the host is not
/// ready or not known, placement refuses the job naming it, nothing is asked). Returns one
/// line per problem, empty when every path exists everywhere: `on host b: bind source
/// /srv/x does not exist`, the agent's reason for a refused path, or why the agent of a host
/// could not be asked. An agent too old to check (`UNIMPLEMENTED`) is skipped: its own
/// check before it creates a container still fails the job before it starts.
pub async fn check(
    agents: &AgentConnector,
    sources: BTreeMap<String, BTreeSet<String>>,
    agent_url: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    let asks = sources.into_iter().filter_map(|(host, paths)| {
        let url = agent_url(&host)?;
        Some(async move {
            let paths: Vec<String> = paths.into_iter().collect();
            let answer = agents.check_bind_sources(&host, &url, paths.clone()).await;
            problems_of(&host, &paths, answer)
        })
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The problems of one host's answer to the check of `paths`.
fn problems_of(
    host: &str,
    paths: &[String],
    answer: Result<Vec<BindSourceCheck>, Status>,
) -> Vec<String> {
    let checks = match answer {
        Ok(checks) => checks,
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            tracing::warn!(
                host,
                "the agent cannot check bind sources (older than the controller); its check before it creates a container is the only one"
            );
            return Vec::new();
        }
        Err(s) => {
            return vec![format!(
                "on host {host}: cannot check the bind sources {}: {}",
                paths.join(", "),
                s.message()
            )];
        }
    };
    let mut problems = Vec::new();
    for path in paths {
        match checks.iter().find(|c| &c.path == path) {
            Some(c) if c.state == "exists" => {}
            Some(c) if c.state == "missing" => {
                problems.push(format!("on host {host}: bind source {path} does not exist"));
            }
            Some(c) if c.state == "refused" => {
                problems.push(format!("on host {host}: {}", c.reason));
            }
            Some(c) => problems.push(format!(
                "on host {host}: the agent answered {:?} for bind source {path}",
                c.state
            )),
            None => problems.push(format!(
                "on host {host}: the agent did not answer for bind source {path}"
            )),
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(path: &str, state: &str, reason: &str) -> BindSourceCheck {
        BindSourceCheck {
            path: path.into(),
            state: state.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn sources_per_host_include_bound_volume_devices() {
        let toml = r#"
name = "j"
mode = "hips"
image = "x:1"
[central]
host = "a"
[[party]]
name = "p"
hosts = ["b"]
workers = 2
[[mount]]
type = "bind"
source = "/srv/geomx/{party}"
target = "/root/data"
roles = ["workers"]
[[mount]]
type = "volume"
source = "v-{job}"
target = "/root/v"
roles = ["master"]
options = { type = "none", o = "bind", device = "/srv/out" }
[[mount]]
type = "volume"
source = "nfs-{job}"
target = "/root/nfs"
options = { type = "nfs", o = "addr=10.1.1.2", device = ":/exports" }
"#;
        let plan = geomx_job::plan("j.toml", toml).expect("valid");
        let got = sources_by_host(&plan);
        let want: BTreeMap<String, BTreeSet<String>> =
            [("a", vec!["/srv/out"]), ("b", vec!["/srv/geomx/p"])]
                .into_iter()
                .map(|(h, p)| (h.to_owned(), p.into_iter().map(str::to_owned).collect()))
                .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn problems_name_host_and_path() {
        let paths = vec![
            "/srv/a".to_owned(),
            "/srv/b".to_owned(),
            "/srv/c".to_owned(),
        ];
        let answer = Ok(vec![
            check("/srv/a", "exists", ""),
            check("/srv/b", "missing", ""),
            check(
                "/srv/c",
                "refused",
                "bind mount source /srv/c resolves to /etc, which lies in /etc: refused",
            ),
        ]);
        assert_eq!(
            problems_of("b", &paths, answer),
            [
                "on host b: bind source /srv/b does not exist",
                "on host b: bind mount source /srv/c resolves to /etc, which lies in /etc: refused"
            ]
        );
        let unreachable = Err(Status::unavailable(
            "cannot reach the agent of host c at https://10.0.0.3:7947: connection refused",
        ));
        let got = problems_of("c", &paths[..1], unreachable);
        assert_eq!(got.len(), 1);
        assert!(
            got[0].starts_with("on host c: cannot check the bind sources /srv/a: cannot reach"),
            "{got:?}"
        );
        assert!(problems_of("c", &paths, Err(Status::unimplemented("old"))).is_empty());
        assert_eq!(
            problems_of("d", &paths[..1], Ok(Vec::new())),
            ["on host d: the agent did not answer for bind source /srv/a"]
        );
    }
}
