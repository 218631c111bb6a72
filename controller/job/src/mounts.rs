//! Rules for `[[mount]]` paths and `[resources]` sizes, shared by validation, the compiler
//! and the checks of compiled plans (tests and fuzz targets).
//!
//! A bind mount hands a host path to a container that runs as root: the paths that would
//! give it the host (its root, `/etc`, `/proc`, `/sys`, `/dev`, `/boot`, Docker's and geomx's
//! own state, the Docker socket) are refused, and so is a placeholder that could expand
//! into one of them (`/{party}` with a party named `etc`).

use std::collections::BTreeMap;

use crate::spec::MOUNT_PLACEHOLDERS;

/// Host directories a bind source may not be or lie in (`*` ends a name prefix).
pub const REFUSED_BIND_SOURCES: [&str; 7] = [
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/var/lib/docker",
    "/var/lib/geomx*",
];

/// Container directories a mount target may not be or lie in.
pub const REFUSED_TARGETS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// What no mount path may name: the Docker socket gives whoever holds it the host.
const DOCKER_SOCKET: &str = "docker.sock";

/// The components of an absolute, normalized path (`/a/b` → `["a", "b"]`), or why it is not
/// one.
fn components(path: &str) -> Result<Vec<&str>, String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err("is not an absolute path".to_string());
    };
    if path.contains('\0') {
        return Err("contains a NUL character".to_string());
    }
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if parts
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == "..")
    {
        return Err(
            "is not a normalized path (no empty, \".\" or \"..\" components, no trailing \"/\")"
                .to_string(),
        );
    }
    Ok(parts)
}

/// Whether path component `comp` (which may hold placeholders) can be `pattern` (a name,
/// or a name prefix ending in `*`). A component with a placeholder can be anything that
/// starts with its literal text before the first placeholder.
fn may_match(comp: &str, pattern: &str) -> bool {
    let (pattern, glob) = match pattern.strip_suffix('*') {
        Some(prefix) => (prefix, true),
        None => (pattern, false),
    };
    match comp.find('{') {
        None if glob => comp.starts_with(pattern),
        None => comp == pattern,
        Some(at) => {
            let fixed = &comp[..at];
            pattern.starts_with(fixed) || (glob && fixed.starts_with(pattern))
        }
    }
}

/// The refused directory (one of `refused`) that `parts` is or lies in, or could be after
/// expanding its placeholders.
fn refused_prefix(parts: &[&str], refused: &[&'static str]) -> Option<&'static str> {
    refused.iter().copied().find(|dir| {
        let dir_parts: Vec<&str> = dir.trim_start_matches('/').split('/').collect();
        dir_parts.len() <= parts.len()
            && dir_parts
                .iter()
                .zip(parts)
                .all(|(pattern, comp)| may_match(comp, pattern))
    })
}

/// Every `{...}` in `text` that is not one of [`MOUNT_PLACEHOLDERS`], and whether a brace
/// is left unclosed.
fn unknown_placeholders(text: &str) -> Result<(), String> {
    let mut rest = text;
    while let Some(open) = rest.find(['{', '}']) {
        let after = &rest[open..];
        if after.starts_with('}') {
            return Err("has a \"}\" without \"{\"".to_string());
        }
        let Some(close) = after.find('}') else {
            return Err("has a \"{\" without \"}\"".to_string());
        };
        let name = &after[..=close];
        if !MOUNT_PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "uses the unknown placeholder {name} (known: {})",
                MOUNT_PLACEHOLDERS.join(", ")
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Why `source` (a bind mount's host path, placeholders allowed) is refused, if it is.
pub fn bind_source_problem(source: &str) -> Option<String> {
    if let Err(why) = unknown_placeholders(source) {
        return Some(why);
    }
    let parts = match components(source) {
        Ok(parts) => parts,
        Err(why) => return Some(why),
    };
    if parts.is_empty() {
        return Some("is the host's root directory".to_string());
    }
    if source.contains(DOCKER_SOCKET) {
        return Some("names the Docker socket (it gives a container the host)".to_string());
    }
    refused_prefix(&parts, &REFUSED_BIND_SOURCES).map(|dir| {
        let could = if source.contains('{') {
            "could lie"
        } else {
            "lies"
        };
        format!(
            "{could} in {dir}, which is refused for bind mounts ({})",
            REFUSED_BIND_SOURCES.join(", ")
        )
    })
}

/// Filesystem types Docker's `local` volume driver may mount (its `type` option): network
/// filesystems, tmpfs, and `none` (with `o = "bind"`: a host path, under the rules of a bind
/// source). Any other type mounts a host device or a kernel filesystem: `ext4` of
/// `/dev/sda1`, `proc` or `sysfs` of the host (writable `/proc/sys`), `devtmpfs`, an
/// `overlay` whose `lowerdir` is `/etc`.
pub const LOCAL_VOLUME_TYPES: [&str; 6] = ["nfs", "nfs4", "cifs", "smb3", "tmpfs", "none"];

/// Whether `driver` is Docker's built-in `local` volume driver (also when none is named).
pub fn is_local_driver(driver: Option<&str>) -> bool {
    driver.is_none_or(|d| d == "local")
}

/// Whether a `local` volume's options bind-mount their `device`: `o` holds `bind` or
/// `rbind` (any case), or `type` is `none` or `bind`.
fn local_options_bind(options: &BTreeMap<String, String>) -> bool {
    let binds = options.get("o").is_some_and(|o| {
        o.split(',')
            .map(|opt| opt.trim().to_ascii_lowercase())
            .any(|opt| opt == "bind" || opt == "rbind")
    });
    let none = options
        .get("type")
        .is_some_and(|t| matches!(t.trim().to_ascii_lowercase().as_str(), "none" | "bind"));
    binds || none
}

/// The host path a volume bind-mounts through its driver options: the `device` of a
/// `local` volume whose options bind (see [`volume_options_problem`]); `None` for any other
/// volume. The agent checks it like a bind source (it exists, it does not lead through a
/// symlink where a bind source may not go).
pub fn local_volume_bind_device<'a>(
    driver: Option<&str>,
    options: &'a BTreeMap<String, String>,
) -> Option<&'a str> {
    (is_local_driver(driver) && local_options_bind(options))
        .then(|| options.get("device").map(String::as_str))
        .flatten()
}

/// Why a volume's driver options are refused, if they are: the option to point at and the
/// reason. With the `local` driver, options that bind (`o` with `bind`/`rbind`, `type`
/// `none`) mount their `device`, a host path: it must pass [`bind_source_problem`]; and
/// `type` must be one of [`LOCAL_VOLUME_TYPES`]. Other drivers' options are the driver's.
pub fn volume_options_problem(
    driver: Option<&str>,
    options: &BTreeMap<String, String>,
) -> Option<(&'static str, String)> {
    if !is_local_driver(driver) {
        return None;
    }
    if local_options_bind(options) {
        let key = if options.contains_key("o") {
            "o"
        } else {
            "type"
        };
        return match options.get("device") {
            None => Some((
                key,
                "binds a host path (o \"bind\" or type \"none\") but names no device".to_string(),
            )),
            Some(device) => bind_source_problem(device).map(|why| {
                (
                    "device",
                    format!(
                        "device {device:?} {why}: the local driver bind-mounts it (o \"bind\" or type \"none\"), so the rules of a bind source apply"
                    ),
                )
            }),
        };
    }
    let ty = options.get("type")?;
    (!LOCAL_VOLUME_TYPES.contains(&ty.as_str())).then(|| {
        (
            "type",
            format!(
                "type {ty:?}: the local driver may mount only {} (\"none\" with o \"bind\" binds a host path under the rules of a bind source); another type mounts a host device or kernel filesystem",
                LOCAL_VOLUME_TYPES.join(", ")
            ),
        )
    })
}

/// Why `target` (a path in the container; no placeholders) is refused, if it is.
pub fn target_problem(target: &str) -> Option<String> {
    if target.contains(['{', '}']) {
        return Some(format!(
            "holds a placeholder: only source expands {}",
            MOUNT_PLACEHOLDERS.join(", ")
        ));
    }
    let parts = match components(target) {
        Ok(parts) => parts,
        Err(why) => return Some(why),
    };
    if parts.is_empty() {
        return Some("is the container's root directory".to_string());
    }
    if target.contains(DOCKER_SOCKET) {
        return Some("names the Docker socket".to_string());
    }
    refused_prefix(&parts, &REFUSED_TARGETS).map(|dir| {
        format!(
            "lies in {dir}, which the container runtime owns ({} are refused)",
            REFUSED_TARGETS.join(", ")
        )
    })
}

/// Why `name` (a volume name, placeholders allowed) is refused, if it is: Docker's rule
/// `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, checked with each placeholder standing for a name.
pub fn volume_name_problem(name: &str) -> Option<String> {
    if let Err(why) = unknown_placeholders(name) {
        return Some(why);
    }
    let plain = expand(name, "x", "x", "x", "x");
    let ok = plain
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && plain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        return Some(
            "is not a volume name ([a-zA-Z0-9][a-zA-Z0-9_.-]*, placeholders allowed)".to_string(),
        );
    }
    if name.contains(DOCKER_SOCKET) {
        return Some("names the Docker socket".to_string());
    }
    None
}

/// `template` with `{job}`, `{party}`, `{node}` and `{host}` replaced.
pub fn expand(template: &str, job: &str, party: &str, node: &str, host: &str) -> String {
    template
        .replace("{job}", job)
        .replace("{party}", party)
        .replace("{node}", node)
        .replace("{host}", host)
}

/// A size as Docker writes it: `"512m"`, `"8g"`, `"1.5g"`, `"100"` (bytes); units `b`, `k`,
/// `m`, `g`, `t` (powers of 1024, an optional `b` or `ib` after them), any case. `None` when
/// it is not a size or does not fit in a `u64`.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let digits_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    let unit = unit.trim();
    let shift = match unit {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    if number.is_empty()
        || number.starts_with('.')
        || number.ends_with('.')
        || number.matches('.').count() > 1
    {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let bytes = value * f64::from(1u32 << (shift / 2)) * f64::from(1u32 << (shift - shift / 2));
    // u64::MAX as f64 rounds up to 2^64; anything at or above it does not fit
    (bytes.is_finite() && bytes < 18_446_744_073_709_551_616.0).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("8g"), Some(8 << 30));
        assert_eq!(parse_size("8G"), Some(8 << 30));
        assert_eq!(parse_size("1.5g"), Some(3 << 29));
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("2kb"), Some(2048));
        assert_eq!(parse_size("1t"), Some(1 << 40));
        for bad in ["", "g", "8x", "-1g", "1..5g", ".5g", "5.g", "8 gigs", "1e3"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        assert_eq!(parse_size(&format!("{}t", u64::MAX)), None);
    }

    #[test]
    fn bind_sources() {
        for ok in [
            "/srv/geomx/{party}",
            "/data",
            "/var/lib/mnist",
            "/var/{party}/data",
            "/etcetera",
            "/home/u/{job}-{node}",
        ] {
            assert_eq!(bind_source_problem(ok), None, "{ok}");
        }
        for bad in [
            "/",
            "relative/path",
            "/etc",
            "/etc/ssl",
            "/proc/1",
            "/sys",
            "/dev/sda",
            "/boot",
            "/var/lib/docker",
            "/var/lib/docker/volumes",
            "/var/lib/geomx-agent",
            "/var/lib/geomx",
            "/run/docker.sock",
            "/srv/../etc",
            "/srv//x",
            "/srv/x/",
            "/{party}",
            "/e{host}/x",
            "/var/lib/{job}",
            "/srv/{slice}",
            "/srv/{party",
        ] {
            assert!(bind_source_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn targets_and_volumes() {
        assert_eq!(target_problem("/root/data"), None);
        assert_eq!(target_problem("/devices"), None);
        for bad in [
            "/",
            "root/data",
            "/proc",
            "/dev/shm",
            "/sys/fs",
            "/x/{node}",
            "/var/run/docker.sock",
        ] {
            assert!(target_problem(bad).is_some(), "{bad}");
        }
        assert_eq!(volume_name_problem("geomx-{job}-output"), None);
        assert_eq!(volume_name_problem("{party}"), None);
        for bad in ["", "-x", "a/b", "a b", "{foo}", "x{"] {
            assert!(volume_name_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn local_volume_options() {
        let opts = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let nfs = opts(&[
            ("type", "nfs"),
            ("o", "addr=10.1.1.2,rw"),
            ("device", ":/exports/geomx"),
        ]);
        assert_eq!(volume_options_problem(None, &nfs), None);
        assert_eq!(volume_options_problem(Some("local"), &nfs), None);
        assert_eq!(local_volume_bind_device(None, &nfs), None);
        let tmpfs = opts(&[("type", "tmpfs"), ("device", "tmpfs"), ("o", "size=64m")]);
        assert_eq!(volume_options_problem(None, &tmpfs), None);
        assert_eq!(volume_options_problem(None, &BTreeMap::new()), None);
        let ok_bind = opts(&[
            ("type", "none"),
            ("o", "bind"),
            ("device", "/srv/geomx/{party}"),
        ]);
        assert_eq!(volume_options_problem(None, &ok_bind), None);
        assert_eq!(
            local_volume_bind_device(Some("local"), &ok_bind),
            Some("/srv/geomx/{party}")
        );
        for device in [
            "/",
            "/etc",
            "/boot",
            "/proc",
            "/sys/kernel",
            "/var/lib/docker",
            "/var/lib/docker/volumes",
            "/var/lib/geomx-agent",
            "/run/docker.sock",
            "/{party}",
            "relative",
        ] {
            for (ty, o) in [
                ("none", "bind"),
                ("none", "rbind,ro"),
                ("tmpfs", "ro, BIND"),
                ("none", ""),
            ] {
                let bad = opts(&[("type", ty), ("o", o), ("device", device)]);
                let (key, why) = volume_options_problem(None, &bad).expect(device);
                assert_eq!(key, "device", "{device} {ty} {o}: {why}");
                assert!(why.contains(&format!("{device:?}")), "{why}");
            }
        }
        let no_device = opts(&[("type", "none"), ("o", "bind")]);
        assert_eq!(
            volume_options_problem(None, &no_device).map(|p| p.0),
            Some("o")
        );
        for ty in ["ext4", "proc", "sysfs", "devtmpfs", "overlay", "cgroup2"] {
            let bad = opts(&[("type", ty), ("device", "/dev/sda1")]);
            assert_eq!(
                volume_options_problem(None, &bad).map(|p| p.0),
                Some("type"),
                "{ty}"
            );
        }
        // another driver's options are the driver's
        let other = opts(&[("type", "none"), ("o", "bind"), ("device", "/etc")]);
        assert_eq!(volume_options_problem(Some("rexray/ebs"), &other), None);
        assert_eq!(local_volume_bind_device(Some("rexray/ebs"), &other), None);
        // a host name that merely contains "bind" does not bind
        let named = opts(&[("type", "nfs"), ("o", "addr=bindhost"), ("device", ":/x")]);
        assert_eq!(volume_options_problem(None, &named), None);
    }

    #[test]
    fn expansion() {
        assert_eq!(
            expand(
                "/srv/{party}/{node}@{host}.{job}",
                "j",
                "a",
                "a-worker-0",
                "b"
            ),
            "/srv/a/a-worker-0@b.j"
        );
    }
}
