//! Validation of request fields: everything that comes over the wire is checked here
//! before it reaches the membership, and refused with `INVALID_ARGUMENT` naming the field.
//! Values are echoed back shortened, so a huge string does not come back in the error.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tonic::Status;

use crate::store::WireguardRecord;

/// Longest host name.
pub const MAX_HOST_LEN: usize = 63;
/// Longest agent version string.
pub const MAX_VERSION_LEN: usize = 128;
/// Longest agent URL.
pub const MAX_URL_LEN: usize = 256;
/// Longest network error kept from a report.
pub const MAX_NETWORK_ERROR_LEN: usize = 2048;
/// Most images kept from a report.
pub const MAX_IMAGES: usize = 4096;
/// Longest image reference.
pub const MAX_IMAGE_LEN: usize = 512;

/// `s` shortened to at most 64 characters for error messages.
pub fn shorten(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}... ({} bytes)", s.len())
    }
}

fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// A host name: 1..63 characters of `[a-z0-9-]`, not starting or ending with `-`.
pub fn host_name(field: &str, s: &str) -> Result<String, Status> {
    if s.is_empty() {
        return Err(invalid(field, "host name is empty"));
    }
    let ok = s.len() <= MAX_HOST_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if !ok {
        return Err(invalid(
            field,
            format!(
                "host name {} must be 1..{MAX_HOST_LEN} characters of [a-z0-9-], not starting or ending with '-'",
                shorten(s)
            ),
        ));
    }
    Ok(s.to_owned())
}

/// An underlay IPv4 address: a unicast address outside the cluster CIDR.
pub fn underlay_ip(field: &str, s: &str, cluster: Ipv4Net) -> Result<Ipv4Addr, Status> {
    let ip: Ipv4Addr = s
        .trim()
        .parse()
        .map_err(|_| invalid(field, format!("{} is not an IPv4 address", shorten(s))))?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
        return Err(invalid(
            field,
            format!("{ip} cannot be a host's address (unspecified, multicast or broadcast)"),
        ));
    }
    if cluster.contains(&ip) {
        return Err(invalid(
            field,
            format!(
                "{ip} is inside the cluster CIDR {cluster}: the underlay must be a different network"
            ),
        ));
    }
    Ok(ip)
}

/// An optional CIDR: empty means none.
pub fn optional_subnet(field: &str, s: &str) -> Result<Option<Ipv4Net>, Status> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<Ipv4Net>().map(Some).map_err(|_| {
        invalid(
            field,
            format!("{} is not an IPv4 CIDR like 172.17.5.0/24", shorten(s)),
        )
    })
}

/// A short printable string (versions): at most `max` bytes, no control characters.
pub fn printable(field: &str, s: &str, max: usize) -> Result<String, Status> {
    if s.len() > max {
        return Err(invalid(
            field,
            format!("{} is longer than {max} bytes", shorten(s)),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(s.to_owned())
}

/// At most this many peer links are kept from a report (more than any cluster has hosts).
pub const MAX_LINKS: usize = 4096;

/// A WireGuard identity: a base64 public key of 32 bytes and a UDP port, or neither.
pub fn wireguard(key: &str, port: u32) -> Result<Option<WireguardRecord>, Status> {
    if key.is_empty() && port == 0 {
        return Ok(None);
    }
    let ok_key = key.len() == 44
        && key.ends_with('=')
        && key[..43]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/');
    if !ok_key {
        return Err(Status::invalid_argument(
            "wireguard_public_key: not a WireGuard public key (44 characters of base64)",
        ));
    }
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            Status::invalid_argument(format!("wireguard_port: {port} is not a UDP port"))
        })?;
    Ok(Some(WireguardRecord {
        public_key: key.to_owned(),
        port,
    }))
}

/// An agent URL: empty, or `http(s)://host:port` of at most [`MAX_URL_LEN`] bytes.
pub fn agent_url(field: &str, s: &str) -> Result<String, Status> {
    let s = printable(field, s, MAX_URL_LEN)?;
    if s.is_empty() {
        return Ok(s);
    }
    let uri: tonic::codegen::http::Uri = s
        .parse()
        .map_err(|_| invalid(field, format!("{} is not a URL", shorten(&s))))?;
    match uri.scheme_str() {
        Some("https" | "http") if uri.host().is_some() => Ok(s),
        _ => Err(invalid(
            field,
            format!(
                "{} must be an https:// (or http://) URL with a host, e.g. https://10.1.1.34:7947",
                shorten(&s)
            ),
        )),
    }
}

/// Truncates `s` to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Most image details kept from a report.
pub const MAX_IMAGE_DETAILS: usize = 1024;
/// Most tags or digests kept per image.
pub const MAX_IMAGE_NAMES: usize = 32;
/// Most pulls kept from a report.
pub const MAX_PULLS: usize = 64;
/// Longest pull error kept.
pub const MAX_PULL_ERROR_LEN: usize = 512;

/// A report's image details, bounded: at most [`MAX_IMAGE_DETAILS`] images of at most
/// [`MAX_IMAGE_NAMES`] tags and digests, every string cut to [`MAX_IMAGE_LEN`].
pub fn image_details(details: &[geomx_proto::v1::ImageInfo]) -> Vec<geomx_proto::v1::ImageInfo> {
    let names = |v: &[String]| -> Vec<String> {
        v.iter()
            .take(MAX_IMAGE_NAMES)
            .map(|s| truncate(s, MAX_IMAGE_LEN))
            .collect()
    };
    details
        .iter()
        .take(MAX_IMAGE_DETAILS)
        .map(|d| geomx_proto::v1::ImageInfo {
            id: truncate(&d.id, 80),
            repo_tags: names(&d.repo_tags),
            repo_digests: names(&d.repo_digests),
            size_bytes: d.size_bytes,
        })
        .collect()
}

/// A report's pulls, bounded: at most [`MAX_PULLS`], strings cut, counts made consistent
/// (done at most total when a total is known), states other than geomx's named "unknown".
pub fn image_pulls(pulls: &[geomx_proto::v1::ImagePull]) -> Vec<geomx_proto::v1::ImagePull> {
    pulls
        .iter()
        .take(MAX_PULLS)
        .map(|p| geomx_proto::v1::ImagePull {
            image: truncate(&p.image, MAX_IMAGE_LEN),
            state: if ["pulling", "retrying", "done", "failed"].contains(&p.state.as_str()) {
                p.state.clone()
            } else {
                "unknown".to_owned()
            },
            bytes_done: if p.bytes_total > 0 {
                p.bytes_done.min(p.bytes_total)
            } else {
                p.bytes_done
            },
            bytes_total: p.bytes_total,
            layers_done: if p.layers_total > 0 {
                p.layers_done.min(p.layers_total)
            } else {
                p.layers_done
            },
            layers_total: p.layers_total,
            attempt: p.attempt,
            error: truncate(&p.error, MAX_PULL_ERROR_LEN),
            started_at_ms: p.started_at_ms,
            updated_at_ms: p.updated_at_ms,
            registry: truncate(&p.registry, 255),
        })
        .collect()
}

/// Most hosts one `PullImage` names.
pub const MAX_PULL_HOSTS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert!(host_name("host", "a").is_ok());
        assert!(host_name("host", "dc1-host-07").is_ok());
        for bad in ["", "A", "a_b", "-a", "a-", "a.b", &"x".repeat(64), "é"] {
            let err = host_name("host", bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        }
        let huge = "x".repeat(1 << 20);
        let err = host_name("host", &huge).unwrap_err();
        assert!(err.message().len() < 300);
    }

    #[test]
    fn underlay() {
        let cluster: Ipv4Net = "172.17.0.0/16".parse().unwrap();
        assert!(underlay_ip("ip", "10.1.1.1", cluster).is_ok());
        for bad in [
            "",
            "10.1.1",
            "::1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "172.17.3.4",
        ] {
            assert!(underlay_ip("ip", bad, cluster).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_and_strings() {
        assert!(agent_url("u", "").is_ok());
        assert!(agent_url("u", "https://10.1.1.1:7947").is_ok());
        assert!(agent_url("u", "ftp://x").is_err());
        assert!(agent_url("u", "not a url").is_err());
        assert!(printable("v", "1.0\n", 10).is_err());
        assert!(printable("v", &"v".repeat(11), 10).is_err());
        assert_eq!(truncate("héllo", 2), "h");
        assert!(optional_subnet("s", "").unwrap().is_none());
        assert!(optional_subnet("s", "172.17.1.0/24").unwrap().is_some());
        assert!(optional_subnet("s", "172.17.1.0").is_err());
    }
}
