//! `geomxctl certs`: a small CA and the certificates and tokens of a geomx cluster.
//!
//! ```text
//! geomxctl certs init       --dir D                               # D/ca.pem, D/ca-key.pem
//! geomxctl certs controller --dir D --san 10.1.1.1 --san ctl.example
//!                                                                 # D/controller.pem, D/controller-key.pem
//! geomxctl certs agent      --dir D --name a --ip 10.1.1.34       # D/agent-a.pem, D/agent-a-key.pem
//! geomxctl certs token      [--append FILE]                       # a fresh bearer token
//! geomxctl certs show       FILE                                  # what a certificate says
//! ```
//!
//! Keys are written with mode 0600; existing files are kept unless `--force`.
//! Nothing here talks to the controller.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use geomx_proto::pki::{
    self, CA_CERT_FILE, CA_KEY_FILE, CONTROLLER_CERT_FILE, CONTROLLER_KEY_FILE,
    CertificateAuthority, DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS,
};

use crate::Output;

/// Arguments of `geomxctl certs`.
#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

/// The `certs` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Make a new CA: DIR/ca.pem (copy it to every host) and DIR/ca-key.pem (keep it safe).
    Init {
        /// Directory for the CA files (created with mode 0700).
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "geomx CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue the controller's certificate (serverAuth + clientAuth, CN=geomx-controller).
    Controller {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        dir: PathBuf,
        /// An IP address or DNS name agents and users use to reach the controller
        /// (repeat for several). localhost and 127.0.0.1 are added unless --no-loopback.
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Do not add localhost and 127.0.0.1.
        #[arg(long)]
        no_loopback: bool,
        /// Where to write controller.pem and controller-key.pem [default: --dir].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue an agent's certificate (CN = host name, OU=agent, IP SAN = its underlay IP).
    Agent {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        dir: PathBuf,
        /// The host name, exactly as the agent registers ([a-z0-9-], 1..63).
        #[arg(long)]
        name: String,
        /// The host's underlay IP (the controller calls the agent there).
        #[arg(long)]
        ip: IpAddr,
        /// More IP addresses or DNS names for the agent's API.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Where to write agent-NAME.pem and agent-NAME-key.pem [default: --dir].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Print a fresh random bearer token for the user API.
    Token {
        /// Also append it to this tokens file (created with mode 0600), the controller's
        /// [auth] tokens_file.
        #[arg(long)]
        append: Option<PathBuf>,
    },
    /// Show what a certificate file says: subject, issuer, SANs, key usages, validity.
    Show {
        /// A PEM certificate.
        file: PathBuf,
    },
}

/// Runs `geomxctl certs`.
pub fn run(args: &CertsArgs, output: Output) -> anyhow::Result<ExitCode> {
    match &args.command {
        CertsCommand::Init {
            dir,
            name,
            days,
            force,
        } => {
            let ca = CertificateAuthority::generate(name, *days)?;
            ca.write(dir, *force)?;
            report_written(
                output,
                &[dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE)],
                &format!(
                    "next: geomxctl certs controller --dir {d} --san <controller IP or name>; geomxctl certs agent --dir {d} --name <host> --ip <underlay IP>",
                    d = dir.display()
                ),
            )
        }
        CertsCommand::Controller {
            dir,
            sans,
            no_loopback,
            out,
            days,
            force,
        } => {
            let ca = load_ca(dir)?;
            let mut all = sans.clone();
            if !no_loopback {
                for l in ["localhost", "127.0.0.1"] {
                    if !all.iter().any(|s| s == l) {
                        all.push(l.to_owned());
                    }
                }
            }
            let issued = ca.issue_controller(&all, *days)?;
            let out = out.as_deref().unwrap_or(dir);
            let cert = out.join(CONTROLLER_CERT_FILE);
            let key = out.join(CONTROLLER_KEY_FILE);
            issued.write(&cert, &key, *force)?;
            report_written(
                output,
                &[cert, key],
                "controller.toml: [tls] ca, cert, key = these files and ca.pem",
            )
        }
        CertsCommand::Agent {
            dir,
            name,
            ip,
            sans,
            out,
            days,
            force,
        } => {
            let ca = load_ca(dir)?;
            let issued = ca.issue_agent(name, *ip, sans, *days)?;
            let out = out.as_deref().unwrap_or(dir);
            let cert = out.join(pki::agent_cert_file(name));
            let key = out.join(pki::agent_key_file(name));
            issued.write(&cert, &key, *force)?;
            report_written(
                output,
                &[cert, key],
                &format!("copy them and ca.pem to host {name}; its agent registers as {name:?}"),
            )
        }
        CertsCommand::Token { append } => {
            let token = pki::generate_token();
            if let Some(file) = append {
                append_token(file, &token)?;
            }
            match output {
                Output::Json => println!("{}", serde_json::json!({ "token": token })),
                Output::Table => println!("{token}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        CertsCommand::Show { file } => {
            let pem =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let info =
                pki::describe_certificate(&pem).with_context(|| format!("{}", file.display()))?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "subject": info.subject,
                        "issuer": info.issuer,
                        "serial": info.serial,
                        "sans": info.sans,
                        "extended_key_usages": info.extended_key_usages,
                        "is_ca": info.is_ca,
                        "not_before": info.not_before,
                        "not_after": info.not_after,
                    }))?
                ),
                Output::Table => {
                    println!("subject:     {}", info.subject);
                    println!("issuer:      {}", info.issuer);
                    println!("serial:      {}", info.serial);
                    println!("CA:          {}", if info.is_ca { "yes" } else { "no" });
                    println!("SANs:        {}", list(&info.sans));
                    println!("key usages:  {}", list(&info.extended_key_usages));
                    println!("not before:  {}", unix_time(info.not_before));
                    println!("not after:   {}", unix_time(info.not_after));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(", ")
    }
}

fn unix_time(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(s) => humantime_like(s),
        Err(_) => secs.to_string(),
    }
}

/// `YYYY-MM-DD hh:mm:ss UTC` from Unix seconds (civil-from-days, no time crate needed).
fn humantime_like(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02} UTC")
}

fn load_ca(dir: &Path) -> anyhow::Result<CertificateAuthority> {
    CertificateAuthority::load(dir).with_context(|| {
        format!(
            "cannot load the CA from {} (make one with `geomxctl certs init --dir {}`)",
            dir.display(),
            dir.display()
        )
    })
}

fn append_token(file: &Path, token: &str) -> anyhow::Result<()> {
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(file)
        .with_context(|| format!("cannot open tokens file {}", file.display()))?;
    writeln!(f, "{token}").with_context(|| format!("cannot write {}", file.display()))?;
    Ok(())
}

fn report_written(output: Output, files: &[PathBuf], next: &str) -> anyhow::Result<ExitCode> {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "written": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>() })
        ),
        Output::Table => {
            for f in files {
                println!("wrote {}", f.display());
            }
            println!("{next}");
        }
    }
    if files.is_empty() {
        bail!("nothing written");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(humantime_like(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(humantime_like(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(humantime_like(1_767_225_599), "2025-12-31 23:59:59 UTC");
    }

    #[test]
    fn init_controller_agent_token() {
        let d = std::env::temp_dir().join(format!(
            "geomxctl-certs-test-{}-{}",
            std::process::id(),
            pki::generate_token()
        ));
        let run_cmd = |c: CertsCommand| run(&CertsArgs { command: c }, Output::Json).unwrap();
        run_cmd(CertsCommand::Init {
            dir: d.clone(),
            name: "t".into(),
            days: 10,
            force: false,
        });
        assert!(
            run(
                &CertsArgs {
                    command: CertsCommand::Init {
                        dir: d.clone(),
                        name: "t".into(),
                        days: 10,
                        force: false,
                    }
                },
                Output::Json
            )
            .is_err(),
            "an existing CA is kept"
        );
        run_cmd(CertsCommand::Controller {
            dir: d.clone(),
            sans: vec!["10.1.1.1".into()],
            no_loopback: false,
            out: None,
            days: 10,
            force: false,
        });
        run_cmd(CertsCommand::Agent {
            dir: d.clone(),
            name: "a".into(),
            ip: "10.1.1.2".parse().unwrap(),
            sans: vec![],
            out: None,
            days: 10,
            force: false,
        });
        let info =
            pki::describe_certificate(&std::fs::read(d.join("controller.pem")).unwrap()).unwrap();
        assert_eq!(info.sans, ["IP:10.1.1.1", "DNS:localhost", "IP:127.0.0.1"]);
        assert!(d.join("agent-a.pem").exists() && d.join("agent-a-key.pem").exists());
        let tokens = d.join("tokens");
        run_cmd(CertsCommand::Token {
            append: Some(tokens.clone()),
        });
        run_cmd(CertsCommand::Token {
            append: Some(tokens.clone()),
        });
        let text = std::fs::read_to_string(&tokens).unwrap();
        assert_eq!(text.lines().count(), 2);
        run_cmd(CertsCommand::Show {
            file: d.join("agent-a.pem"),
        });
        std::fs::remove_dir_all(&d).unwrap();
    }
}
