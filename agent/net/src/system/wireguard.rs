//! WireGuard through `wg` (wireguard-tools), which speaks to the kernel module over netlink
//! and to `wireguard-go` over its UAPI socket alike; the interface is the kernel's where the
//! module exists and `wireguard-go`'s otherwise.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{NetError, Result};
use crate::kernel::{WgDevice, WgImplementation, WgPeerConfig, Wireguard};
use crate::system::files::write_secret;

/// The host's WireGuard, through the `ip`, `wg` and `wireguard-go` programs.
#[derive(Debug, Default)]
pub struct WgTools;

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let op = format!("{program} {}", args.join(" "));
    let mut c = Command::new(program);
    c.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| NetError::Wireguard {
        op: op.clone(),
        message: format!("cannot run {program}: {e} (install wireguard-tools and wireguard-go)"),
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        pipe.write_all(text.as_bytes())
            .map_err(|e| NetError::Wireguard {
                op: op.clone(),
                message: e.to_string(),
            })?;
    }
    let out = child.wait_with_output().map_err(|e| NetError::Wireguard {
        op: op.clone(),
        message: e.to_string(),
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Wireguard {
            op,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Starts `wireguard-go NAME` (it daemonizes). Under systemd (`INVOCATION_ID` set) it goes
/// into a scope unit of its own, `geomx-wireguard-go-NAME.scope`, so that stopping or
/// restarting geomx-agent.service (which kills the rest of its cgroup) leaves the tunnel up;
/// where that is not possible it runs as the agent's child.
fn start_wireguard_go(name: &str) -> Result<()> {
    if std::env::var_os("INVOCATION_ID").is_some() {
        let unit = format!("geomx-wireguard-go-{name}");
        match run(
            "systemd-run",
            &[
                "--scope",
                "--quiet",
                "--collect",
                "--unit",
                &unit,
                "wireguard-go",
                name,
            ],
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "wireguard-go in a scope of its own failed; starting it as the agent's child (a restart of the agent's unit will stop it)")
            }
        }
    }
    run("wireguard-go", &[name], None).map(drop)
}

fn public_of(private: &str) -> Result<String> {
    Ok(run("wg", &["pubkey"], Some(private))?.trim().to_string())
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Parses `wg show NAME dump`.
pub fn parse_dump(text: &str) -> Option<WgDevice> {
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next()?.split('\t').collect();
    let public_key = head.get(1)?.to_string();
    let listen_port = head.get(2)?.parse().unwrap_or(0);
    let mut peers = Vec::new();
    let mut handshakes = Vec::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for l in lines {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() < 5 {
            continue;
        }
        let endpoint = f[2].parse().ok();
        let allowed_ips = f[3]
            .split(',')
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        let hs = f[4].parse::<u64>().ok().filter(|t| *t > 0);
        handshakes.push((f[0].to_string(), hs.map(|t| now.saturating_sub(t))));
        peers.push(WgPeerConfig {
            public_key: f[0].to_string(),
            endpoint,
            allowed_ips,
        });
    }
    Some(WgDevice {
        public_key,
        listen_port,
        peers,
        handshakes,
    })
}

impl Wireguard for WgTools {
    fn ensure_key(&self, key_file: &Path) -> Result<String> {
        match std::fs::read_to_string(key_file) {
            Ok(k) if !k.trim().is_empty() => {
                use std::os::unix::fs::PermissionsExt;
                if let Ok(m) = std::fs::metadata(key_file)
                    && m.permissions().mode() & 0o077 != 0
                {
                    tracing::warn!(file = %key_file.display(), "the WireGuard private key was readable by others; made it 0600");
                    let _ =
                        std::fs::set_permissions(key_file, std::fs::Permissions::from_mode(0o600));
                }
                public_of(k.trim())
            }
            Ok(_) => self.rotate_key(key_file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.rotate_key(key_file),
            Err(e) => Err(NetError::io(key_file, e)),
        }
    }

    fn rotate_key(&self, key_file: &Path) -> Result<String> {
        let private = run("wg", &["genkey"], None)?;
        write_secret(key_file, private.trim())?;
        public_of(private.trim())
    }

    fn show(&self, name: &str) -> Result<Option<WgDevice>> {
        if !link_exists(name) {
            return Ok(None);
        }
        match run("wg", &["show", name, "dump"], None) {
            Ok(text) => Ok(parse_dump(&text)),
            // the link is there but nothing answers for it (wireguard-go gone): not ours to use
            Err(_) => Ok(None),
        }
    }

    fn create(&self, name: &str, mtu: u32) -> Result<WgImplementation> {
        if link_exists(name) {
            // a link without a working WireGuard behind it (wireguard-go died): start over
            run("ip", &["link", "del", "dev", name], None)?;
        }
        let implementation = match run(
            "ip",
            &["link", "add", "dev", name, "type", "wireguard"],
            None,
        ) {
            Ok(_) => WgImplementation::Kernel,
            Err(kernel) => {
                start_wireguard_go(name).map_err(|e| NetError::Wireguard {
                    op: format!("create {name}"),
                    message: format!(
                        "no kernel WireGuard ({kernel}) and wireguard-go failed too: {e}"
                    ),
                })?;
                WgImplementation::Userspace
            }
        };
        run(
            "ip",
            &["link", "set", "dev", name, "mtu", &mtu.to_string(), "up"],
            None,
        )?;
        tracing::info!(
            interface = name,
            ?implementation,
            "WireGuard interface created"
        );
        Ok(implementation)
    }

    fn configure(&self, name: &str, key_file: &Path, port: u16) -> Result<()> {
        let key = key_file.display().to_string();
        run(
            "wg",
            &[
                "set",
                name,
                "private-key",
                &key,
                "listen-port",
                &port.to_string(),
            ],
            None,
        )
        .map(drop)
    }

    fn set_peer(&self, name: &str, peer: &WgPeerConfig, keepalive: u16) -> Result<()> {
        let allowed: Vec<String> = peer.allowed_ips.iter().map(|n| n.to_string()).collect();
        let allowed = allowed.join(",");
        let ka = keepalive.to_string();
        let mut args = vec!["set", name, "peer", &peer.public_key];
        let ep = peer.endpoint.map(|e| e.to_string());
        if let Some(ep) = &ep {
            args.extend(["endpoint", ep.as_str()]);
        }
        args.extend(["allowed-ips", &allowed, "persistent-keepalive", &ka]);
        run("wg", &args, None).map(drop)
    }

    fn remove_peer(&self, name: &str, public_key: &str) -> Result<()> {
        run("wg", &["set", name, "peer", public_key, "remove"], None).map(drop)
    }

    fn delete(&self, name: &str) -> Result<()> {
        if link_exists(name) {
            run("ip", &["link", "del", "dev", name], None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_yields_keys_peers_and_handshakes() {
        let dump = "cHJpdg==\tcHViQQ==\t7951\toff\n\
                    cHViQg==\t(none)\t10.2.1.29:7951\t172.17.29.0/24\t0\t0\t0\t25\n\
                    cHViQw==\t(none)\t(none)\t172.17.33.0/24,172.17.34.0/24\t1\t10\t20\t25\n";
        let d = parse_dump(dump).unwrap();
        assert_eq!(d.public_key, "cHViQQ==");
        assert_eq!(d.listen_port, 7951);
        assert_eq!(d.peers.len(), 2);
        assert_eq!(d.peers[0].endpoint, Some("10.2.1.29:7951".parse().unwrap()));
        assert_eq!(d.peers[1].endpoint, None);
        assert_eq!(d.peers[1].allowed_ips.len(), 2);
        assert_eq!(d.handshakes[0], ("cHViQg==".to_string(), None));
        assert!(d.handshakes[1].1.is_some());
        assert_eq!(parse_dump(""), None);
    }
}
