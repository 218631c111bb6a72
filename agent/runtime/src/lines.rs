//! Turning Docker's output frames into whole lines.

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::engine::LogFrame;
use crate::error::Result;
use crate::status::{LogChunk, parse_rfc3339_ms, parse_rfc3339_ns};

/// Reassembles whole lines from frames, per stream (stdout, stderr).
#[derive(Debug, Default)]
pub(crate) struct LineSplitter {
    out: Vec<u8>,
    err: Vec<u8>,
}

impl LineSplitter {
    /// The lines `frame` completes (without line breaks).
    pub(crate) fn push(&mut self, frame: &LogFrame) -> Vec<String> {
        let buf = if frame.stderr {
            &mut self.err
        } else {
            &mut self.out
        };
        buf.extend_from_slice(&frame.data);
        let mut lines = Vec::new();
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let rest = buf.split_off(pos + 1);
            let mut line = std::mem::replace(buf, rest);
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        lines
    }

    /// The unterminated last lines, if any: (stderr, line).
    pub(crate) fn finish(&mut self) -> Vec<(bool, String)> {
        let mut v = Vec::new();
        for (stderr, buf) in [(false, &mut self.out), (true, &mut self.err)] {
            if !buf.is_empty() {
                v.push((stderr, String::from_utf8_lossy(buf).into_owned()));
                buf.clear();
            }
        }
        v
    }
}

/// Splits Docker's `timestamps` prefix (`2024-05-01T12:00:00.123456789Z `) off a line.
pub(crate) fn split_timestamp(line: &str) -> (Option<i64>, &str) {
    if let Some((ts, rest)) = line.split_once(' ')
        && let Some(ms) = parse_rfc3339_ms(ts)
    {
        return (Some(ms), rest);
    }
    (None, line)
}

/// [`split_timestamp`] to the nanosecond.
pub(crate) fn split_timestamp_ns(line: &str) -> (Option<i64>, &str) {
    if let Some((ts, rest)) = line.split_once(' ')
        && let Some(ns) = parse_rfc3339_ns(ts)
    {
        return (Some(ns), rest);
    }
    (None, line)
}

/// Whole-line chunks from frames: one chunk per frame that completes at least one line,
/// then the unterminated rest when the frames end.
pub(crate) fn chunks(
    frames: BoxStream<'static, Result<LogFrame>>,
) -> BoxStream<'static, Result<LogChunk>> {
    futures::stream::unfold(
        (frames, LineSplitter::default(), false),
        |(mut frames, mut splitter, done)| async move {
            if done {
                return None;
            }
            loop {
                match frames.next().await {
                    Some(Ok(frame)) => {
                        let lines = splitter.push(&frame);
                        if !lines.is_empty() {
                            let chunk = LogChunk {
                                lines,
                                stderr: frame.stderr,
                            };
                            return Some((Ok(chunk), (frames, splitter, false)));
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), (frames, splitter, true))),
                    None => {
                        let rest = splitter.finish();
                        if rest.is_empty() {
                            return None;
                        }
                        let stderr = rest.iter().any(|(e, _)| *e);
                        let lines = rest.into_iter().map(|(_, l)| l).collect();
                        return Some((Ok(LogChunk { lines, stderr }), (frames, splitter, true)));
                    }
                }
            }
        },
    )
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(stderr: bool, s: &str) -> LogFrame {
        LogFrame {
            stderr,
            data: s.as_bytes().to_vec(),
        }
    }

    #[test]
    fn splits_lines_per_stream() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(&f(false, "a\nb")), vec!["a"]);
        assert_eq!(s.push(&f(true, "err1\r\n")), vec!["err1"]);
        assert_eq!(s.push(&f(false, "c\nd\n")), vec!["bc", "d"]);
        assert!(s.push(&f(false, "tail")).is_empty());
        assert_eq!(s.finish(), vec![(false, "tail".to_string())]);
        assert!(s.finish().is_empty());
    }

    #[test]
    fn timestamps_are_split_off() {
        assert_eq!(
            split_timestamp("2024-05-01T12:00:00.123456789Z [Time 1][Epoch 0]"),
            (Some(1_714_564_800_123), "[Time 1][Epoch 0]")
        );
        assert_eq!(
            split_timestamp("no timestamp here"),
            (None, "no timestamp here")
        );
        assert_eq!(split_timestamp(""), (None, ""));
    }

    #[tokio::test]
    async fn chunks_of_whole_lines() {
        let frames = futures::stream::iter(vec![
            Ok(f(false, "one\ntw")),
            Ok(f(false, "o\n")),
            Ok(f(true, "oops\n")),
            Ok(f(false, "last")),
        ])
        .boxed();
        let got: Vec<LogChunk> = chunks(frames)
            .map(|r| r.unwrap_or_default())
            .collect()
            .await;
        assert_eq!(
            got,
            vec![
                LogChunk {
                    lines: vec!["one".into()],
                    stderr: false
                },
                LogChunk {
                    lines: vec!["two".into()],
                    stderr: false
                },
                LogChunk {
                    lines: vec!["oops".into()],
                    stderr: true
                },
                LogChunk {
                    lines: vec!["last".into()],
                    stderr: false
                },
            ]
        );
    }
}
