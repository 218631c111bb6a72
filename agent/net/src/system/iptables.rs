//! [`Firewall`] through the iptables crate (which runs the `iptables` binary of the
//! calling thread's network namespace) for reading, and `iptables-restore --noflush` for
//! every change (one atomic transaction per table).

use std::error::Error;
use std::process::Command;

use crate::error::{NetError, Result};
use crate::kernel::{Firewall, RuleSpec};

/// iptables (IPv4) of the namespace the process runs in.
pub struct IptablesFirewall {
    ipt: iptables::IPTables,
    random_fully: bool,
}

impl std::fmt::Debug for IptablesFirewall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IptablesFirewall")
            .field("cmd", &self.ipt.cmd)
            .field("random_fully", &self.random_fully)
            .finish()
    }
}

// the crate's errors are `Box<dyn Error>` without Send + Sync: turn them into text here
fn text(e: Box<dyn Error>) -> String {
    e.to_string().trim().to_string()
}

impl IptablesFirewall {
    /// Finds the `iptables` binary and its version.
    pub fn new() -> Result<IptablesFirewall> {
        let mut ipt = iptables::new(false).map_err(|e| {
            NetError::iptables(
                "find the iptables binary",
                format!("{} (install the iptables package)", text(e)),
            )
        })?;
        // -L without -n resolves addresses to names
        ipt.set_numeric(true);
        Ok(IptablesFirewall {
            ipt,
            random_fully: version_supports_random_fully(),
        })
    }
}

/// `--random-fully` arrived in iptables 1.6.2.
fn version_supports_random_fully() -> bool {
    let Ok(out) = Command::new("iptables").arg("--version").output() else {
        return false;
    };
    let s = String::from_utf8_lossy(&out.stdout);
    let Some(v) = s.split_whitespace().find_map(|w| w.strip_prefix('v')) else {
        return false;
    };
    let nums: Vec<u32> = v.split('.').filter_map(|p| p.parse().ok()).collect();
    nums >= vec![1, 6, 2]
}

impl Firewall for IptablesFirewall {
    fn chain_exists(&self, table: &str, chain: &str) -> Result<bool> {
        self.ipt
            .chain_exists(table, chain)
            .map_err(|e| NetError::iptables(format!("look for chain {table} {chain}"), text(e)))
    }

    fn list_rules(&self, table: &str, chain: &str) -> Result<Vec<RuleSpec>> {
        // `list` does not check the exit status: run it through `execute`, which does not
        // either, and check it here
        let out = self
            .ipt
            .execute(table, &format!("-S {chain}"))
            .map_err(|e| NetError::iptables(format!("list {table} {chain}"), text(e)))?;
        if !out.status.success() {
            return Err(NetError::iptables(
                format!("list {table} {chain}"),
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        let prefix = format!("-A {chain} ");
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(RuleSpec::parse)
            .collect())
    }

    fn restore(&self, payload: &str) -> Result<()> {
        use std::io::Write;
        use std::process::Stdio;
        let op = || {
            let first = payload.lines().next().unwrap_or("");
            format!("iptables-restore --noflush ({first})")
        };
        let mut child = Command::new("iptables-restore")
            .args(["--noflush", "--wait", "5"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| NetError::iptables(op(), format!("{e} (install the iptables package)")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(payload.as_bytes())
                .map_err(|e| NetError::iptables(op(), e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| NetError::iptables(op(), e.to_string()))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // "line N failed": name the line, so the error says which rule was refused
        let line = stderr
            .split("line ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| payload.lines().nth(n.saturating_sub(1)));
        Err(NetError::iptables(
            op(),
            match line {
                Some(l) => format!("{stderr} (the line: {l})"),
                None => stderr,
            },
        ))
    }

    fn supports_random_fully(&self) -> bool {
        self.random_fully
    }
}
