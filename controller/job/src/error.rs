//! Errors of the job model: what is wrong with a job file and where.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What kind of problem a [`JobError`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The text is not valid TOML.
    Syntax,
    /// Valid TOML, but not the job file format: an unknown key, a wrong type, a missing key.
    Schema,
    /// Well formed, but a topology or value geomx refuses (it would hang, fail or is absurd).
    Invalid,
}

/// One problem in a job file: what is wrong and where.
///
/// Displayed as `FILE:LINE:COL: MESSAGE` when the place is known (it is for everything found
/// in a parsed file, except keys that are missing), else as `FILE: FIELD: MESSAGE`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct JobError {
    /// The job file's name as the caller gave it (a path, or e.g. `<job>`).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column in characters, when known.
    pub col: Option<usize>,
    /// The field the problem is about, as a path: `party[1].servers`, `env.all.DMLC_ROLE`.
    pub field: Option<String>,
    /// The kind of problem.
    pub kind: ErrorKind,
    /// What is wrong, and why geomx refuses it.
    pub message: String,
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.col, &self.field) {
            (Some(line), Some(col), _) => {
                write!(f, "{}:{}:{}: {}", self.file, line, col, self.message)
            }
            (_, _, Some(field)) => write!(f, "{}: {}: {}", self.file, field, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Every problem found in one job file (never empty).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct JobErrors(pub Vec<JobError>);

impl JobErrors {
    /// The problems, in file order where the place is known.
    pub fn errors(&self) -> &[JobError] {
        &self.0
    }

    /// How many problems there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there is no problem (never for an error that was returned).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for JobErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl IntoIterator for JobErrors {
    type Item = JobError;
    type IntoIter = std::vec::IntoIter<JobError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// A node's environment names an address that the caller could not provide.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("node {node}: {variable} needs the IP address of node {needs}, which is not known yet")]
pub struct UnresolvedAddress {
    /// The node whose environment was being resolved.
    pub node: String,
    /// The variable holding the placeholder.
    pub variable: String,
    /// The node whose address is missing.
    pub needs: String,
}

/// Most problems one parse reports; past it, one last entry says how many more there were.
/// Keeps the report (and the time spent placing each problem) bounded whatever the file.
pub const MAX_REPORTED_PROBLEMS: usize = 100;

/// Where the lines of a text start, to place many byte offsets in `O(log lines)` each
/// rather than by scanning the text from its start every time.
#[derive(Debug)]
pub(crate) struct LineIndex {
    /// Byte offset of the start of every line (the first is 0).
    starts: Vec<usize>,
}

impl LineIndex {
    pub(crate) fn new(src: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// 1-based line and column (in characters) of a byte offset in `src`, the text this
    /// index was made from.
    pub(crate) fn line_col(&self, src: &str, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(src.len());
        while !src.is_char_boundary(offset) {
            offset -= 1;
        }
        // The last line start at or before offset (starts[0] = 0 <= offset).
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self.starts.get(line.wrapping_sub(1)).copied().unwrap_or(0);
        let col = src.get(start..offset).map_or(0, |t| t.chars().count()) + 1;
        (line.max(1), col)
    }
}

/// 1-based line and column (in characters) of a byte offset in `src`.
#[cfg(test)]
pub(crate) fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_lines_and_characters() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 4), (1, 5));
        assert_eq!(line_col(src, 6), (2, 1));
        // "bé = " is 5 characters but 6 bytes
        assert_eq!(line_col(src, 6 + 6), (2, 6));
        assert_eq!(line_col(src, 1000), (3, 1));
    }

    #[test]
    fn line_index_agrees_with_line_col() {
        for src in [
            "",
            "a",
            "\n",
            "a = 1\nbé = 2\n",
            "\n\nx\r\né\u{1F600}z\n",
            "no newline é",
        ] {
            let index = LineIndex::new(src);
            for offset in 0..=src.len() + 2 {
                assert_eq!(
                    index.line_col(src, offset),
                    line_col(src, offset),
                    "{src:?} at {offset}"
                );
            }
        }
    }

    #[test]
    fn display_prefers_line_and_column() {
        let mut e = JobError {
            file: "hips.toml".into(),
            line: Some(23),
            col: Some(11),
            field: Some("party[0].servers".into()),
            kind: ErrorKind::Invalid,
            message: "party \"a\": servers = 2".into(),
        };
        assert_eq!(e.to_string(), "hips.toml:23:11: party \"a\": servers = 2");
        e.line = None;
        e.col = None;
        assert_eq!(
            e.to_string(),
            "hips.toml: party[0].servers: party \"a\": servers = 2"
        );
        e.field = None;
        assert_eq!(e.to_string(), "hips.toml: party \"a\": servers = 2");
    }
}
