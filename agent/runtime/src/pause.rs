//! The pause image of network sandboxes.
//!
//! A network sandbox (see [`crate::spec::ContainerKind::Sandbox`]) only has to hold a
//! network namespace until it is removed. Like Kubernetes' pause container, geomx runs a
//! tiny static program for that: `agent/runtime/pause/pause.c` sleeps until SIGTERM or
//! SIGINT, exits 0, and reaps re-parented children. `build.rs` compiles it with the system C
//! compiler (`cc -static -Os -s`) and this module embeds the result ([`binary`]).
//!
//! [`ensure_image`] imports it once per host as `geomx/pause:<hash>` ([`image_tag`]; a hash
//! of the program and the image settings, so a new agent version with the same pause image
//! leaves running sandboxes — and the jobs in them — alone): a one-file image (`/pause`,
//! entrypoint `/pause`, label `io.geomx.image=pause`) made with `docker import` (bollard's
//! `create_image` with `fromSrc=-` and an in-memory tar body). The daemon then sets
//! [`SandboxConfig`] to [`sandbox_config`]`(tag)`.
//!
//! The image deliberately does not carry `io.geomx.managed`: containers inherit their
//! image's labels, and the agent removes every managed container that is not one of its
//! jobs'. A container someone else starts from the pause image is not geomx's.
//!
//! A build without a C compiler or a static libc has no binary ([`binary`] is `None`,
//! [`ensure_image`] fails with [`RuntimeError::PauseUnavailable`]): sandboxes then run the
//! job's own image with [`SandboxConfig::default`]'s shell loop.

use bollard::errors::Error as BollardError;
use bollard::query_parameters::CreateImageOptions;
use futures::StreamExt;
use hyper::body::Bytes;
use tracing::info;

use crate::engine::BollardEngine;
use crate::error::{Result, RuntimeError};
use crate::spec::SandboxConfig;

/// Repository of the pause image.
pub const PAUSE_REPO: &str = "geomx/pause";
/// Path of the pause program inside the image (also its entrypoint).
pub const PAUSE_PATH: &str = "/pause";
/// The label of the pause image (informational: it marks the image as geomx's, and is
/// inherited by sandboxes, which carry their own ownership labels besides).
pub const LABEL_IMAGE: &str = "io.geomx.image";

#[cfg(geomx_pause)]
static BINARY: Option<&[u8]> = Some(include_bytes!(concat!(env!("OUT_DIR"), "/pause")));
#[cfg(not(geomx_pause))]
static BINARY: Option<&[u8]> = None;

/// The embedded static pause program, or `None` when this build has none (no C compiler
/// or static libc when it was built).
pub fn binary() -> Option<&'static [u8]> {
    BINARY
}

/// The Dockerfile instructions applied when the image is imported.
fn image_changes() -> Vec<String> {
    vec![
        format!("LABEL {LABEL_IMAGE}=pause"),
        format!("ENTRYPOINT [\"{PAUSE_PATH}\"]"),
    ]
}

/// The tag of the pause image: a hash of the embedded program and of [`image_changes`] (the
/// crate version in a build without a program, which never imports it).
fn tag_of_binary() -> String {
    match binary() {
        Some(b) => {
            let mut content = b.to_vec();
            for change in image_changes() {
                content.push(0);
                content.extend_from_slice(change.as_bytes());
            }
            format!("{:016x}", crate::spec::fnv1a64(&content))
        }
        None => env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// The pause image's reference on every host: `geomx/pause:<hash of program and settings>`.
pub fn image_tag() -> String {
    format!("{PAUSE_REPO}:{}", tag_of_binary())
}

/// The sandbox settings for the imported pause image `tag`: the image, and `/pause` as
/// entrypoint.
pub fn sandbox_config(tag: impl Into<String>) -> SandboxConfig {
    SandboxConfig {
        image: Some(tag.into()),
        command: vec![PAUSE_PATH.to_string()],
    }
}

/// Makes sure the pause image is present on the host behind `engine` and returns its tag:
/// nothing is done when [`image_tag`] exists already, otherwise the embedded binary is
/// imported (`docker import` of a one-file tar, labelled `io.geomx.image=pause`, with
/// entrypoint `/pause`).
pub async fn ensure_image(engine: &BollardEngine) -> Result<String> {
    let tag = image_tag();
    let docker = engine.docker();
    match docker.inspect_image(&tag).await {
        Ok(_) => return Ok(tag),
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(RuntimeError::docker(format!("inspect image {tag}"), e)),
    }
    let binary = binary().ok_or(RuntimeError::PauseUnavailable)?;
    let tar = image_tar(binary);
    let options = CreateImageOptions {
        from_src: Some("-".to_string()),
        repo: Some(PAUSE_REPO.to_string()),
        tag: Some(tag_of_binary()),
        message: Some("geomx network sandbox (pause)".to_string()),
        changes: image_changes(),
        ..Default::default()
    };
    let mut progress = docker.create_image(
        Some(options),
        Some(bollard::body_full(Bytes::from(tar))),
        None,
    );
    while let Some(item) = progress.next().await {
        item.map_err(|e| RuntimeError::docker(format!("import {tag}"), e))?;
    }
    match docker.inspect_image(&tag).await {
        Ok(_) => {
            info!(image = %tag, bytes = binary.len(), "imported the pause image for network sandboxes");
            Ok(tag)
        }
        Err(e) => Err(RuntimeError::docker(
            format!("inspect image {tag} after importing it"),
            e,
        )),
    }
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// A tar archive (POSIX ustar, uncompressed) holding one file: `pause` with `binary` as
/// content, mode 0755, owner 0:0, mtime 0 (the same bytes on every host, so the image id
/// is the same everywhere).
pub fn image_tar(binary: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 512;
    let name = PAUSE_PATH.trim_start_matches('/');
    let mut header = [0u8; BLOCK];
    put(&mut header[0..100], name.as_bytes());
    put(&mut header[100..108], b"0000755\0");
    put(&mut header[108..116], b"0000000\0");
    put(&mut header[116..124], b"0000000\0");
    put(
        &mut header[124..136],
        format!("{:011o}\0", binary.len()).as_bytes(),
    );
    put(&mut header[136..148], b"00000000000\0");
    // the checksum is computed with its own field filled with spaces
    put(&mut header[148..156], b"        ");
    header[156] = b'0';
    put(&mut header[257..263], b"ustar\0");
    put(&mut header[263..265], b"00");
    put(&mut header[265..297], b"root");
    put(&mut header[297..329], b"root");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    put(&mut header[148..156], format!("{sum:06o}\0 ").as_bytes());

    let padded = binary.len().div_ceil(BLOCK) * BLOCK;
    let mut out = Vec::with_capacity(BLOCK + padded + 2 * BLOCK);
    out.extend_from_slice(&header);
    out.extend_from_slice(binary);
    out.resize(BLOCK + padded, 0);
    // end of archive: two zero blocks
    out.resize(BLOCK + padded + 2 * BLOCK, 0);
    out
}

fn put(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn octal(field: &[u8]) -> u64 {
        let s: String = field
            .iter()
            .take_while(|b| **b != 0 && **b != b' ')
            .map(|b| *b as char)
            .collect();
        u64::from_str_radix(s.trim(), 8).unwrap_or(u64::MAX)
    }

    #[test]
    fn the_tar_holds_one_executable_file_with_a_valid_header() {
        let content = b"\x7fELF not really, but bytes".repeat(40);
        let tar = image_tar(&content);
        assert_eq!(tar.len() % 512, 0);
        assert_eq!(tar.len(), 512 + content.len().div_ceil(512) * 512 + 1024);
        let h = &tar[..512];
        assert_eq!(&h[0..6], b"pause\0");
        assert_eq!(octal(&h[100..108]), 0o755);
        assert_eq!(octal(&h[124..136]), content.len() as u64);
        assert_eq!(h[156], b'0');
        assert_eq!(&h[257..263], b"ustar\0");
        // checksum: the sum of the header with the checksum field as spaces
        let mut blank = h.to_vec();
        blank[148..156].copy_from_slice(b"        ");
        let sum: u64 = blank.iter().map(|b| u64::from(*b)).sum();
        assert_eq!(octal(&h[148..156]), sum);
        assert_eq!(&tar[512..512 + content.len()], &content[..]);
        assert!(tar[512 + content.len()..].iter().all(|b| *b == 0));
        // reproducible
        assert_eq!(tar, image_tar(&content));
    }

    #[test]
    fn the_system_tar_reads_it() {
        let content = b"#!/bin/true\n".repeat(100);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pause.tar");
        std::fs::write(&path, image_tar(&content)).expect("write");
        let Ok(out) = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&path)
            .output()
        else {
            eprintln!("no tar program here; skipping");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.starts_with("-rwxr-xr-x"), "{listing}");
        assert!(listing.contains("root/root"), "{listing}");
        assert!(listing.trim_end().ends_with(" pause"), "{listing}");
        let extracted = std::process::Command::new("tar")
            .arg("-xOf")
            .arg(&path)
            .arg("pause")
            .output()
            .expect("tar -xO");
        assert_eq!(extracted.stdout, content);
    }

    #[test]
    fn the_build_embeds_a_static_pause_binary() {
        // build.rs warns and builds without it only when no C compiler/static libc exists
        let Some(bin) = binary() else {
            eprintln!("this build has no pause binary (see the cargo warning); skipping");
            return;
        };
        assert_eq!(&bin[..4], b"\x7fELF");
        assert!(image_tag().starts_with("geomx/pause:"));
        let c = sandbox_config(image_tag());
        assert_eq!(c.command, vec!["/pause".to_string()]);
        assert_eq!(c.image, Some(image_tag()));
    }
}
