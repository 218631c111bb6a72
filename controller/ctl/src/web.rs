//! `geomxctl web`: the dashboard's URL (the controller's `web_listen`) and a login link.
//!
//! The URL is `--url`, else `GEOMX_WEB_URL` (`geomx-lab env` exports it), else the
//! controller's address with the web port 7949. The login link carries the token in the
//! URL's fragment (`/login#token=...`): browsers never send a fragment to the server, so
//! the token reaches neither its logs nor a proxy; the login page posts it and drops it
//! from the address bar. With `--open` the link is opened with `xdg-open`.

use std::process::{Command, ExitCode};

use serde_json::json;

use crate::{Cli, Output};

/// The web listener's default port (`web_listen = "0.0.0.0:7949"`).
pub const WEB_PORT: u16 = 7949;

/// Arguments of `geomxctl web`.
#[derive(Debug, clap::Args)]
pub struct WebArgs {
    /// The dashboard's URL, e.g. https://controller.example:7949.
    #[arg(long, env = "GEOMX_WEB_URL")]
    pub url: Option<String>,
    /// Open the login link in a browser (xdg-open).
    #[arg(long)]
    pub open: bool,
    /// Print the URL only, without the token (to share the address, not the access).
    #[arg(long)]
    pub no_token: bool,
    /// A job whose page to show after login.
    pub job: Option<String>,
}

/// Runs `geomxctl web`.
pub fn run(args: &WebArgs, cli: &Cli) -> anyhow::Result<ExitCode> {
    let base = match &args.url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => from_controller(&cli.controller)?,
    };
    if !(base.starts_with("https://") || base.starts_with("http://")) {
        anyhow::bail!(
            "the dashboard URL {base:?} is not an http(s):// URL (--url or GEOMX_WEB_URL)"
        );
    }
    let page = match &args.job {
        Some(job) => format!("{base}/#/jobs/{job}"),
        None => format!("{base}/"),
    };
    let login = match (&cli.token, args.no_token) {
        (Some(token), false) => Some(format!("{base}/login#token={}", fragment_escape(token))),
        _ => None,
    };
    match cli.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "url": page, "login": login }))?
        ),
        Output::Table => {
            println!("dashboard: {page}");
            match &login {
                Some(l) => println!("login:     {l}"),
                None => println!("login:     with a token at {base}/login"),
            }
        }
    }
    if args.open {
        let target = login.as_deref().unwrap_or(&page);
        let status = Command::new("xdg-open")
            .arg(target)
            .status()
            .map_err(|e| anyhow::anyhow!("running xdg-open: {e} (open the link above by hand)"))?;
        if !status.success() {
            anyhow::bail!("xdg-open failed ({status}); open the link above by hand");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The dashboard URL of the controller at `controller` (its host, port 7949).
fn from_controller(controller: &str) -> anyhow::Result<String> {
    let (scheme, rest) = controller
        .split_once("://")
        .ok_or_else(|| anyhow::anyhow!("the controller URL {controller:?} has no scheme"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.rfind(':') {
        // an IPv6 literal's colons are inside brackets
        Some(i) if !authority[i..].contains(']') => &authority[..i],
        _ => authority,
    };
    if host.is_empty() {
        anyhow::bail!("the controller URL {controller:?} names no host");
    }
    Ok(format!("{scheme}://{host}:{WEB_PORT}"))
}

/// Escapes what may not stand in a URL fragment as-is.
fn fragment_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_web_url_follows_the_controller_url() {
        for (controller, want) in [
            ("https://10.1.1.34:7946", "https://10.1.1.34:7949"),
            ("https://ctl.example", "https://ctl.example:7949"),
            ("http://127.0.0.1:7946/", "http://127.0.0.1:7949"),
            ("https://[fd00::1]:7946", "https://[fd00::1]:7949"),
        ] {
            assert_eq!(from_controller(controller).unwrap(), want, "{controller}");
        }
        assert!(from_controller("10.1.1.34:7946").is_err());
        assert!(from_controller("https://:7946").is_err());
    }

    #[test]
    fn a_token_is_escaped_for_the_fragment() {
        assert_eq!(fragment_escape("lab-0123"), "lab-0123");
        assert_eq!(fragment_escape("a b#c"), "a%20b%23c");
    }
}
