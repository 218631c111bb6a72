//! `geomx-agent rotate-key`: asks the running agent, over its control socket, to replace the
//! host's WireGuard key pair (see [`super::control`]), and says what it did.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::config::{AgentArgs, AgentConfig};
use super::control::{self, Reply, Request, Rotated};
use crate::{Common, Output};

/// Arguments of `geomx-agent rotate-key`.
#[derive(Clone, Debug, Args)]
pub struct RotateArgs {
    /// agent.toml (for its `state_dir`; `--state-dir` wins).
    #[command(flatten)]
    agent: AgentArgs,
    /// How long to wait for the agent's answer.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// Runs `geomx-agent rotate-key`: 0 rotated, 1 failed or no agent, 2 refused (this host
/// uses no WireGuard) or a configuration error.
pub async fn rotate_key(common: &Common, args: &RotateArgs) -> anyhow::Result<ExitCode> {
    let state_dir = match &common.state_dir {
        Some(d) => d.clone(),
        None => match AgentConfig::load(common, &args.agent) {
            Ok((c, _)) => c.state_dir,
            Err(e) => {
                eprintln!("geomx-agent: configuration error: {e}");
                return Ok(ExitCode::from(2));
            }
        },
    };
    let socket = control::socket_path(&state_dir);
    let reply = control::call(&socket, &Request::RotateKey, args.timeout).await?;
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    }
    match reply {
        Reply::Rotated(r) => {
            if args.output == Output::Table {
                print!("{}", render(&r));
            }
            Ok(if r.registered {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Reply::Refused { reason } => {
            eprintln!("geomx-agent: rotate-key refused: {reason}");
            Ok(ExitCode::from(2))
        }
        Reply::Failed { error } => {
            eprintln!("geomx-agent: rotate-key failed: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// What a rotation did, for people.
fn render(r: &Rotated) -> String {
    let interface = if r.interface_reconfigured {
        "reconfigured with the new key".to_owned()
    } else {
        "not in use (no peer needs a tunnel now); it gets the new key when made".to_owned()
    };
    let controller = if r.registered {
        format!(
            "took the new public key; it goes to {} peer{} with their next desired state",
            r.peers,
            if r.peers == 1 { "" } else { "s" }
        )
    } else {
        "did not confirm the new public key in time: the agent keeps registering; tunnels to this host stay down until it does".to_owned()
    };
    format!(
        "rotated the WireGuard key pair of host {}\n  \
         old public key  {}\n  \
         new public key  {}\n  \
         private key     {} (new, mode 0600, replaced atomically; never sent anywhere)\n  \
         geomx-wg        {interface}\n  \
         controller      {controller}\n",
        r.host, r.old_public_key, r.new_public_key, r.key_file
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_both_keys_and_what_happened() {
        let mut r = Rotated {
            host: "a".into(),
            old_public_key: "OLD=".into(),
            new_public_key: "NEW=".into(),
            key_file: "/var/lib/geomx-agent/wireguard.key".into(),
            interface_reconfigured: true,
            registered: true,
            peers: 3,
        };
        let t = render(&r);
        assert!(
            t.starts_with("rotated the WireGuard key pair of host a\n"),
            "{t}"
        );
        assert!(t.contains("old public key  OLD=\n"), "{t}");
        assert!(t.contains("new public key  NEW=\n"), "{t}");
        assert!(t.contains("geomx-wg        reconfigured"), "{t}");
        assert!(t.contains("goes to 3 peers"), "{t}");
        r.registered = false;
        r.interface_reconfigured = false;
        let t = render(&r);
        assert!(t.contains("did not confirm"), "{t}");
        assert!(t.contains("not in use"), "{t}");
    }
}
