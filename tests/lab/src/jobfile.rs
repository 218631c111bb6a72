//! Job files of the test image for the lab's tests and benchmarks.

/// A single-party job (mode `ps`, network `routed`) of the test image on `hosts`: the
/// scheduler and the server on the first host, `workers` workers round-robin over all.
/// `worker_env` goes into the workers' inline `[env]` table (e.g.
/// `PSNODE_ITERATIONS = "300"`), `policy` into `[policy]`.
pub fn ps_job(
    name: &str,
    hosts: &[&str],
    workers: usize,
    worker_env: &str,
    policy: &str,
) -> String {
    let hosts = hosts
        .iter()
        .map(|h| format!("\"{h}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"name = "{name}"
mode = "ps"
image = "lizonghango00o1/geomx:cpu-only"
network = "routed"

[env]
workers = {{ {worker_env} }}

[[party]]
name = "p"
hosts = [{hosts}]
workers = {workers}
servers = 1
scheduler_port = 9100

[policy]
{policy}
"#
    )
}
