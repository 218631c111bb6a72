//! `geomxctl certs`: a small CA and the certificates and tokens of a geomx cluster.
//!
//! ```text
//! geomxctl certs init       --dir D                               # D/ca.pem, D/ca-key.pem
//! geomxctl certs controller --dir D --san 10.1.1.1 --san ctl.example
//!                                                                 # D/controller.pem, D/controller-key.pem
//! geomxctl certs agent      --dir D --name a --ip 10.1.1.34       # D/agent-a.pem, D/agent-a-key.pem
//! geomxctl certs token      --name ci --role submit --tokens-file F
//!                                                                 # prints a fresh secret once, appends its hash
//! geomxctl certs renew      --dir D --cert D/agent-a.pem          # same subject and SANs, new serial
//! geomxctl certs revoke     --revocation-file R --cert D/agent-a.pem | --serial HEX | --token-name NAME
//! geomxctl certs show       FILE                                  # what a certificate says
//! ```
//!
//! Keys and tokens files are written with mode 0600, every file atomically (a temporary
//! file renamed over it); existing certificates are kept unless `--force`. Nothing here
//! talks to the controller: it re-reads the tokens and revocation files by itself within
//! seconds (or on SIGHUP).

use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use geomx_proto::credentials::{
    Role, normalize_serial, parse_revocations, parse_tokens_file, validate_name,
};
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
    /// Make a user token: print a fresh random secret once (stdout) and append its line
    /// `NAME ROLE sha256:HEX` to the controller's tokens file (only the hash is kept).
    Token {
        /// The token's name: it names the caller in events and logs, and in the revocation
        /// list (`token NAME`). [A-Za-z0-9._-], unique in the file.
        #[arg(long)]
        name: String,
        /// What it may do: read (look), submit (also submit, cancel, remove jobs, pull
        /// images) or admin (also cordon, drain, remove hosts).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// The controller's [auth] tokens_file (created with mode 0600; rewritten atomically).
        /// Without it, the line to add is printed on stderr.
        #[arg(long, alias = "append")]
        tokens_file: Option<PathBuf>,
        /// Read an existing secret from standard input instead of making one (to move a
        /// plaintext token line to the hashed form); nothing is printed on stdout then.
        #[arg(long)]
        stdin: bool,
    },
    /// Re-issue a certificate (agent or controller) with the same CN, OU and SANs, a new
    /// serial and a new validity; written atomically over the old one. The agent (or the
    /// controller) reads it when it restarts.
    Renew {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        dir: PathBuf,
        /// The certificate to renew (PEM), e.g. DIR/agent-a.pem; replaced in place.
        #[arg(long)]
        cert: PathBuf,
        /// Its key [default: the certificate's name with -key, e.g. agent-a-key.pem]; kept
        /// unless --new-key.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Make a new key too (written over --key): when the old key may have leaked.
        #[arg(long)]
        new_key: bool,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS)]
        days: u32,
    },
    /// Add certificate serials and token names to the controller's revocation list (or
    /// take them out with --undo); the controller applies it within seconds.
    Revoke {
        /// The controller's [auth] revocation_file (created with mode 0644 if missing).
        #[arg(long)]
        revocation_file: PathBuf,
        /// A certificate serial, as `geomxctl certs show` prints it (repeatable).
        #[arg(long = "serial")]
        serials: Vec<String>,
        /// A certificate file whose serial to revoke (repeatable).
        #[arg(long = "cert")]
        certs: Vec<PathBuf>,
        /// A token name, as in the tokens file (repeatable).
        #[arg(long = "token-name")]
        tokens: Vec<String>,
        /// Why, kept as a comment on the line.
        #[arg(long)]
        reason: Option<String>,
        /// Lift the revocations instead: remove their lines.
        #[arg(long)]
        undo: bool,
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
        CertsCommand::Token {
            name,
            role,
            tokens_file,
            stdin,
        } => {
            validate_name(name).map_err(anyhow::Error::msg)?;
            let secret = if *stdin {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading the secret from standard input")?;
                let s = s.trim().to_owned();
                geomx_proto::tls::validate_token(&s)?;
                s
            } else {
                pki::generate_token()
            };
            let line = pki::token_line(name, *role, &secret);
            if let Some(file) = tokens_file {
                append_token(file, name, &line)?;
            }
            let shown = (!*stdin).then_some(secret.as_str());
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "name": name,
                        "role": role.as_str(),
                        "token": shown,
                        "tokens_file": tokens_file.as_ref().map(|f| f.display().to_string()),
                        "line": line.trim_end(),
                    })
                ),
                Output::Table => {
                    if let Some(s) = shown {
                        println!("{s}");
                    }
                    match tokens_file {
                        Some(f) => eprintln!(
                            "token {name:?} (role {role}) appended to {} as its SHA-256 hash; the secret is not kept anywhere: this is the only time it is shown",
                            f.display()
                        ),
                        None => eprint!(
                            "add this line to the controller's tokens file (the secret is not kept anywhere):\n{line}"
                        ),
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CertsCommand::Renew {
            dir,
            cert,
            key,
            new_key,
            days,
        } => renew(dir, cert, key.as_deref(), *new_key, *days, output),
        CertsCommand::Revoke {
            revocation_file,
            serials,
            certs,
            tokens,
            reason,
            undo,
        } => revoke(
            revocation_file,
            &Revocation {
                serials,
                certs,
                tokens,
                reason: reason.as_deref(),
                undo: *undo,
            },
            output,
        ),
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

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

/// Appends `line` (token `name`) to the tokens file `file`: the file as it is (checked: a
/// bad line or the name already there refuses) plus the line, written atomically, mode 0600.
fn append_token(file: &Path, name: &str, line: &str) -> anyhow::Result<()> {
    let existing = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    let parsed = parse_tokens_file(&existing, &file.display().to_string()).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n{}: fix these lines first; nothing was written",
            file.display()
        )
    })?;
    if let Some(t) = parsed.tokens.iter().find(|t| t.name == name) {
        bail!(
            "{}: token name {name:?} is already used ({}); choose another name, or revoke and remove that one first",
            file.display(),
            t.origin
        );
    }
    let mut text = existing;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(line);
    pki::write_file_atomic(file, text.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", file.display()))
}

/// The default key file of a certificate file: `agent-a.pem` -> `agent-a-key.pem`.
fn key_file_of(cert: &Path) -> PathBuf {
    let stem = cert
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    cert.with_file_name(format!("{stem}-key.pem"))
}

fn renew(
    dir: &Path,
    cert: &Path,
    key: Option<&Path>,
    new_key: bool,
    days: u32,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let ca = load_ca(dir)?;
    let key = key.map_or_else(|| key_file_of(cert), Path::to_path_buf);
    let cert_pem =
        std::fs::read_to_string(cert).with_context(|| format!("cannot read {}", cert.display()))?;
    let key_pem = if new_key {
        None
    } else {
        Some(std::fs::read_to_string(&key).with_context(|| {
            format!(
                "cannot read the key {} (pass --key FILE, or --new-key to make a new one)",
                key.display()
            )
        })?)
    };
    let r = ca
        .renew(&cert_pem, key_pem.as_deref(), days)
        .with_context(|| format!("renewing {}", cert.display()))?;
    let info = pki::describe_certificate(r.issued.cert_pem.as_bytes())?;
    let new_serial = normalize_serial(&info.serial).map_err(anyhow::Error::msg)?;
    let mut written = Vec::new();
    if new_key {
        pki::write_file_atomic(&key, r.issued.key_pem.as_bytes(), 0o600)?;
        written.push(key.clone());
    }
    pki::write_file_atomic(cert, r.issued.cert_pem.as_bytes(), 0o644)?;
    written.push(cert.to_owned());
    let who = if r.role == geomx_proto::tls::ROLE_AGENT {
        format!("the agent of host {}", r.common_name)
    } else {
        "the controller".to_owned()
    };
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "written": written.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
                "common_name": r.common_name,
                "role": r.role,
                "old_serial": r.old_serial,
                "serial": new_serial,
                "not_after": info.not_after,
            })
        ),
        Output::Table => {
            for f in &written {
                println!("wrote {}", f.display());
            }
            println!(
                "{} ({}): serial {} replaces {}, valid until {}",
                r.common_name,
                r.role,
                new_serial,
                r.old_serial,
                unix_time(info.not_after)
            );
            println!(
                "next: copy it to {who} and restart it (systemctl restart geomx-agent: containers keep running); it reads its certificate only at start"
            );
            println!(
                "the old certificate stays valid until it expires: retire it with geomxctl certs revoke --revocation-file FILE --serial {}",
                r.old_serial
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `certs revoke` was asked.
struct Revocation<'a> {
    serials: &'a [String],
    certs: &'a [PathBuf],
    tokens: &'a [String],
    reason: Option<&'a str>,
    undo: bool,
}

fn revoke(file: &Path, what: &Revocation<'_>, output: Output) -> anyhow::Result<ExitCode> {
    // (normalized key, the line to write)
    let mut wanted: Vec<(String, String)> = Vec::new();
    let comment = what
        .reason
        .map(|r| format!("  # {}", r.replace('\n', " ")))
        .unwrap_or_default();
    for s in what.serials {
        let n = normalize_serial(s).map_err(anyhow::Error::msg)?;
        wanted.push((format!("serial {n}"), format!("serial {n}{comment}")));
    }
    for c in what.certs {
        let pem = std::fs::read(c).with_context(|| format!("cannot read {}", c.display()))?;
        let info = pki::describe_certificate(&pem).with_context(|| c.display().to_string())?;
        let n = normalize_serial(&info.serial).map_err(anyhow::Error::msg)?;
        let why = what.reason.unwrap_or(&info.subject).replace('\n', " ");
        wanted.push((format!("serial {n}"), format!("serial {n}  # {why}")));
    }
    for t in what.tokens {
        validate_name(t).map_err(anyhow::Error::msg)?;
        wanted.push((format!("token {t}"), format!("token {t}{comment}")));
    }
    if wanted.is_empty() {
        bail!("nothing to revoke: give --serial, --cert or --token-name");
    }
    let existing = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    let label = file.display().to_string();
    parse_revocations(&existing, &label)
        .map_err(|e| anyhow::anyhow!("{e}\n{label}: fix these lines first; nothing was written"))?;
    // the normalized `kind value` of a line, if it is one
    let key_of = |line: &str| -> Option<String> {
        let body = line.split('#').next().unwrap_or("").trim();
        let mut f = body.split_whitespace();
        match (f.next(), f.next()) {
            (Some("serial"), Some(v)) => normalize_serial(v).ok().map(|n| format!("serial {n}")),
            (Some("token"), Some(v)) => Some(format!("token {v}")),
            _ => None,
        }
    };
    let present: Vec<String> = existing.lines().filter_map(key_of).collect();
    let mut text = String::new();
    let mut changed = Vec::new();
    if what.undo {
        for line in existing.lines() {
            match key_of(line) {
                Some(k) if wanted.iter().any(|(w, _)| *w == k) => changed.push(k),
                _ => {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
    } else {
        text.push_str(&existing);
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        for (k, line) in &wanted {
            if present.contains(k) || changed.contains(k) {
                continue;
            }
            text.push_str(line);
            text.push('\n');
            changed.push(k.clone());
        }
    }
    // check what is written reads back
    parse_revocations(&text, &label).map_err(anyhow::Error::msg)?;
    if !changed.is_empty() || !file.exists() {
        pki::write_file_atomic(file, text.as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", file.display()))?;
    }
    let verb = if what.undo { "lifted" } else { "revoked" };
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ verb: changed, "revocation_file": label })
        ),
        Output::Table => {
            if changed.is_empty() {
                println!(
                    "{label}: nothing to change ({})",
                    if what.undo {
                        "none of them is listed"
                    } else {
                        "all of them are listed already"
                    }
                );
            }
            for k in &changed {
                println!("{verb}: {k}");
            }
            if !changed.is_empty() {
                println!(
                    "{label} written; the controller applies it within a few seconds (or at once on SIGHUP)"
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
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
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        crate::Cli::command().debug_assert();
    }

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
        let token = |name: &str, role: Role| CertsCommand::Token {
            name: name.into(),
            role,
            tokens_file: Some(tokens.clone()),
            stdin: false,
        };
        run_cmd(token("alice", Role::Admin));
        run_cmd(token("ci", Role::Submit));
        assert!(
            run(
                &CertsArgs {
                    command: token("ci", Role::Read)
                },
                Output::Json
            )
            .is_err(),
            "a name twice"
        );
        let text = std::fs::read_to_string(&tokens).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        let parsed = parse_tokens_file(&text, "tokens").unwrap();
        assert_eq!(parsed.tokens[1].name, "ci");
        assert_eq!(parsed.tokens[1].role, Role::Submit);
        assert!(text.lines().all(|l| l.contains(" sha256:")), "{text}");
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&tokens).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // renew: same subject and SANs, new serial, key kept
        let before =
            pki::describe_certificate(&std::fs::read(d.join("agent-a.pem")).unwrap()).unwrap();
        let key_before = std::fs::read(d.join("agent-a-key.pem")).unwrap();
        run_cmd(CertsCommand::Renew {
            dir: d.clone(),
            cert: d.join("agent-a.pem"),
            key: None,
            new_key: false,
            days: 30,
        });
        let after =
            pki::describe_certificate(&std::fs::read(d.join("agent-a.pem")).unwrap()).unwrap();
        assert_eq!(after.subject, before.subject);
        assert_eq!(after.sans, before.sans);
        assert_ne!(after.serial, before.serial);
        assert_eq!(
            std::fs::read(d.join("agent-a-key.pem")).unwrap(),
            key_before
        );

        // revoke and lift
        let revoked = d.join("revoked");
        let revoke = |undo: bool| CertsCommand::Revoke {
            revocation_file: revoked.clone(),
            serials: vec![before.serial.clone()],
            certs: vec![d.join("agent-a.pem")],
            tokens: vec!["ci".into()],
            reason: Some("test".into()),
            undo,
        };
        run_cmd(revoke(false));
        run_cmd(revoke(false));
        let text = std::fs::read_to_string(&revoked).unwrap();
        assert_eq!(text.lines().count(), 3, "once each: {text}");
        let r = parse_revocations(&text, "revoked").unwrap();
        assert!(r.token_revoked("ci"));
        assert!(r.serial_revoked(&normalize_serial(&before.serial).unwrap()));
        assert!(r.serial_revoked(&normalize_serial(&after.serial).unwrap()));
        run_cmd(CertsCommand::Revoke {
            revocation_file: revoked.clone(),
            serials: vec![],
            certs: vec![],
            tokens: vec!["ci".into()],
            reason: None,
            undo: true,
        });
        let r = parse_revocations(&std::fs::read_to_string(&revoked).unwrap(), "r").unwrap();
        assert!(!r.token_revoked("ci"));
        assert!(r.serial_revoked(&normalize_serial(&after.serial).unwrap()));
        run_cmd(CertsCommand::Show {
            file: d.join("agent-a.pem"),
        });
        std::fs::remove_dir_all(&d).unwrap();
    }
}
