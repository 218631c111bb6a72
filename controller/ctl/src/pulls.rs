//! Image pulls as people watch them: one progress bar per host on a terminal (indicatif:
//! bytes, rate, ETA), plain lines otherwise. Used by `geomxctl submit` while a job is
//! Pulling and by `geomxctl pull`.

use std::collections::BTreeMap;
use std::time::Duration;

use geomx_proto::v1::ImagePull;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use geomx_proto::pulls::{mib, pull_text};

/// What is shown of each host, to print a line only when it changed.
#[derive(Debug, Default)]
pub struct PullLines {
    shown: BTreeMap<String, (String, u64)>,
}

/// A plain line is printed again for progress at most every this many bytes' change
/// (besides every change of state).
const LINE_EVERY_PERCENT: u64 = 10;

impl PullLines {
    /// The lines to print for these pulls (host, pull): a host's first, each change of its
    /// state, and progress every 10%.
    pub fn lines<'a>(
        &mut self,
        pulls: impl IntoIterator<Item = (&'a str, &'a ImagePull)>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        for (host, p) in pulls {
            let step = p
                .bytes_done
                .saturating_mul(100)
                .checked_div(p.bytes_total)
                .map_or(0, |pct| pct / LINE_EVERY_PERCENT);
            let key = (format!("{}{}", p.state, p.error), step);
            if self.shown.get(host) != Some(&key) {
                out.push(format!("pull on {host}: {} {}", p.image, pull_text(p)));
                self.shown.insert(host.to_owned(), key);
            }
        }
        out
    }
}

/// One indicatif bar per host.
pub struct PullBars {
    multi: MultiProgress,
    bars: BTreeMap<String, ProgressBar>,
}

impl std::fmt::Debug for PullBars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullBars")
            .field("hosts", &self.bars.keys())
            .finish()
    }
}

impl PullBars {
    /// Bars drawn on stdout (a terminal).
    pub fn new() -> PullBars {
        PullBars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
            bars: BTreeMap::new(),
        }
    }

    /// Bars drawn nowhere (tests).
    #[cfg(test)]
    pub fn hidden() -> PullBars {
        PullBars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
            bars: BTreeMap::new(),
        }
    }

    /// Shows these pulls (host, pull): a bar per host, its length the bytes to download,
    /// its position the bytes done; rate and ETA from indicatif.
    pub fn update<'a>(&mut self, pulls: impl IntoIterator<Item = (&'a str, &'a ImagePull)>) {
        let width = 8;
        for (host, p) in pulls {
            let bar = self.bars.entry(host.to_owned()).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template(
                        "  {prefix:<8} [{bar:28}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} eta {eta:<4} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("#>-"),
                );
                bar.set_prefix(format!("{host:<width$}"));
                bar.enable_steady_tick(Duration::from_millis(500));
                bar
            });
            if p.bytes_total > 0 {
                bar.set_length(p.bytes_total);
            }
            bar.set_position(p.bytes_done);
            let msg = match p.state.as_str() {
                "pulling" if p.layers_total > 0 => {
                    format!("{}/{} layers", p.layers_done, p.layers_total)
                }
                "pulling" => String::new(),
                _ => pull_text(p),
            };
            bar.set_message(msg);
            if matches!(p.state.as_str(), "done" | "failed") && !bar.is_finished() {
                if p.state == "done" && p.bytes_total > 0 {
                    bar.set_position(p.bytes_total);
                }
                bar.abandon();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pull(state: &str, done: u64, total: u64) -> ImagePull {
        ImagePull {
            image: "reg:5000/geomx/test@sha256:aa".into(),
            state: state.into(),
            bytes_done: done,
            bytes_total: total,
            layers_done: 1,
            layers_total: 3,
            attempt: 2,
            error: if state == "pulling" {
                String::new()
            } else {
                "registry unreachable".into()
            },
            ..Default::default()
        }
    }

    #[test]
    fn lines_only_on_change() {
        let m = 1 << 20;
        let mut l = PullLines::default();
        let a = pull("pulling", m, 100 * m);
        assert_eq!(l.lines([("b", &a)]).len(), 1);
        let a2 = pull("pulling", 2 * m, 100 * m);
        assert!(l.lines([("b", &a2)]).is_empty(), "under 10% more: no line");
        let a3 = pull("pulling", 30 * m, 100 * m);
        assert_eq!(l.lines([("b", &a3)]).len(), 1);
        let r = pull("retrying", 30 * m, 100 * m);
        assert_eq!(
            l.lines([("b", &r), ("c", &a)]),
            [
                "pull on b: reg:5000/geomx/test@sha256:aa retrying (attempt 2): registry unreachable",
                "pull on c: reg:5000/geomx/test@sha256:aa pulling 1.0 MiB of 100.0 MiB (1%), 1/3 layers"
            ]
        );
    }

    #[test]
    fn bars_follow_pulls() {
        let m = 1 << 20;
        let mut bars = PullBars::hidden();
        bars.update([
            ("b", &pull("pulling", m, 4 * m)),
            ("c", &pull("done", 4 * m, 4 * m)),
        ]);
        assert_eq!(bars.bars.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(bars.bars["b"].position(), m);
        assert_eq!(bars.bars["b"].length(), Some(4 * m));
        assert!(bars.bars["c"].is_finished());
        assert!(!bars.bars["b"].is_finished());
    }
}
