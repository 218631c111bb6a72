//! Image pulls in words, the same for the controller (a job's reason and events) and
//! geomxctl (plain lines, status).

use crate::v1::ImagePull;

/// `120.0 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// One host's pull in words: `pulling 120.0 MiB of 450.0 MiB (26%), 3/7 layers`,
/// `retrying (attempt 2): registry unreachable`, `failed: not found`, `done (450.0 MiB,
/// 7/7 layers)`; `pulling starting` before the first layer is known.
pub fn pull_text(p: &ImagePull) -> String {
    let bytes = if p.bytes_total > 0 {
        format!(
            "{} of {} ({}%)",
            mib(p.bytes_done),
            mib(p.bytes_total),
            p.bytes_done.saturating_mul(100) / p.bytes_total
        )
    } else {
        "starting".to_owned()
    };
    let layers = if p.layers_total > 0 {
        format!(", {}/{} layers", p.layers_done, p.layers_total)
    } else {
        String::new()
    };
    match p.state.as_str() {
        "done" => format!("done ({}{layers})", mib(p.bytes_total.max(p.bytes_done))),
        "failed" => format!("failed: {}", p.error),
        "retrying" => format!("retrying (attempt {}): {}", p.attempt, p.error),
        _ => format!("pulling {bytes}{layers}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pull(state: &str, done: u64, total: u64) -> ImagePull {
        ImagePull {
            image: "reg:5000/geomx/test@sha256:ab".into(),
            state: state.into(),
            bytes_done: done,
            bytes_total: total,
            layers_done: 1,
            layers_total: 3,
            attempt: 2,
            error: if state == "pulling" || state == "done" {
                String::new()
            } else {
                "registry unreachable".into()
            },
            ..Default::default()
        }
    }

    #[test]
    fn texts() {
        let m = 1 << 20;
        let table = [
            (
                pull("pulling", 12 * m, 48 * m),
                "pulling 12.0 MiB of 48.0 MiB (25%), 1/3 layers",
            ),
            (pull("pulling", 0, 0), "pulling starting, 1/3 layers"),
            (
                pull("retrying", 0, 0),
                "retrying (attempt 2): registry unreachable",
            ),
            (pull("failed", 0, 0), "failed: registry unreachable"),
            (pull("done", 48 * m, 48 * m), "done (48.0 MiB, 1/3 layers)"),
        ];
        for (p, want) in table {
            assert_eq!(pull_text(&p), want);
        }
    }
}
