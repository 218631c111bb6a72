//! Where the central party sits, judged by the links the agents measured (`geomxctl plan`
//! when connected, issue 16 item 6).
//!
//! HiPS sends every party's aggregated gradients to the global servers and back: the central
//! party's host should be near the parties' hosts. From the round-trip times the agents report
//! (`geomxctl hosts --links`), [`central_warning`] compares the central host with every other
//! ready host by the maximum and the sum of its round trips to the parties' hosts, and warns
//! when another host would be much nearer ([`FACTOR`] times and at least [`MIN_GAIN_MS`]):
//!
//! - by the maximum: a global step waits for the farthest party;
//! - by the sum, among hosts that run no party node (a host between the parties, not one of
//!   them: moving the central party onto a party's host always zeroes that party's term, and
//!   the reference layout, central party in a data center of its own, is then not flagged).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// How much nearer another host must be (the central host's figure ÷ the other's).
pub const FACTOR: f64 = 1.5;
/// And by how many milliseconds at least (no warning over LAN-sized differences).
pub const MIN_GAIN_MS: f64 = 10.0;

/// Round trips between hosts, in ms, as measured from each host to its peers.
#[derive(Clone, Debug, Default)]
pub struct Rtts(BTreeMap<(String, String), f64>);

impl Rtts {
    /// Records `from`'s measurement of `to` (ignored unless positive and finite: not
    /// measured yet, or the peer did not answer).
    pub fn insert(&mut self, from: &str, to: &str, rtt_ms: f64) {
        if rtt_ms.is_finite() && rtt_ms > 0.0 {
            self.0.insert((from.to_owned(), to.to_owned()), rtt_ms);
        }
    }

    /// The round trip between `a` and `b`: zero for the same host, else the mean of both
    /// directions' measurements (either one when only one side measured).
    pub fn get(&self, a: &str, b: &str) -> Option<f64> {
        if a == b {
            return Some(0.0);
        }
        let ab = self.0.get(&(a.to_owned(), b.to_owned()));
        let ba = self.0.get(&(b.to_owned(), a.to_owned()));
        match (ab, ba) {
            (Some(x), Some(y)) => Some((x + y) / 2.0),
            (Some(x), None) | (None, Some(x)) => Some(*x),
            (None, None) => None,
        }
    }
}

/// A host's distance to the parties' hosts.
#[derive(Clone, Debug, PartialEq)]
pub struct Distance {
    /// The host.
    pub host: String,
    /// Sum of its round trips to the parties' hosts, ms.
    pub sum_ms: f64,
    /// The longest of them, ms.
    pub max_ms: f64,
}

/// The distance of `host` to every host of `parties`; `None` when one is not measured.
fn distance(rtts: &Rtts, host: &str, parties: &BTreeSet<String>) -> Option<Distance> {
    let mut sum_ms = 0.0;
    let mut max_ms: f64 = 0.0;
    for p in parties {
        let r = rtts.get(host, p)?;
        sum_ms += r;
        max_ms = max_ms.max(r);
    }
    Some(Distance {
        host: host.to_owned(),
        sum_ms,
        max_ms,
    })
}

/// The central party's host is much farther from the parties than another host would be.
#[derive(Clone, Debug, PartialEq)]
pub struct CentralWarning {
    /// The central host's distance.
    pub central: Distance,
    /// The nearer host's.
    pub better: Distance,
    /// The parties' hosts.
    pub parties: Vec<String>,
}

impl fmt::Display for CentralWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (c, b) = (&self.central, &self.better);
        write!(
            f,
            "the central party's host {} is much farther from the parties' hosts ({}) than host {} would be: round trips sum {:.1} ms, max {:.1} ms from {}, against sum {:.1} ms, max {:.1} ms from {} (measured by the agents, geomxctl hosts --links); consider [central] host = \"{}\"",
            c.host,
            self.parties.join(", "),
            b.host,
            c.sum_ms,
            c.max_ms,
            c.host,
            b.sum_ms,
            b.max_ms,
            b.host,
            b.host
        )
    }
}

/// Whether `central`'s figure is much worse than `other`'s.
fn much_farther(central: f64, other: f64) -> bool {
    central - other >= MIN_GAIN_MS && central >= FACTOR * other
}

/// Compares the central host with every host of `candidates` (the central host and party
/// hosts may be among them) by the maximum, then (hosts without a party node only) the sum of
/// their round trips to `parties`' hosts; `None` when the central host is not much farther
/// than the best of them, or when its own round trips are not all measured. Candidates with
/// a missing measurement are skipped.
pub fn central_warning<'a>(
    rtts: &Rtts,
    central: &str,
    parties: impl IntoIterator<Item = &'a str>,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<CentralWarning> {
    let parties: BTreeSet<String> = parties.into_iter().map(str::to_owned).collect();
    if parties.is_empty() {
        return None;
    }
    let here = distance(rtts, central, &parties)?;
    let others: Vec<Distance> = candidates
        .into_iter()
        .filter(|h| *h != central)
        .filter_map(|h| distance(rtts, h, &parties))
        .collect();
    let by = |key: fn(&Distance) -> f64, then: fn(&Distance) -> f64, outside: bool| {
        others
            .iter()
            .filter(|d| !outside || !parties.contains(&d.host))
            .min_by(|a, b| {
                key(a)
                    .total_cmp(&key(b))
                    .then_with(|| then(a).total_cmp(&then(b)))
                    .then_with(|| a.host.cmp(&b.host))
            })
            .filter(|best| much_farther(key(&here), key(best)))
            .cloned()
    };
    let max = |d: &Distance| d.max_ms;
    let sum = |d: &Distance| d.sum_ms;
    let better = by(max, sum, false).or_else(|| by(sum, max, true))?;
    Some(CentralWarning {
        central: here,
        better,
        parties: parties.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round trips given once per pair (both directions measured alike).
    fn rtts(pairs: &[(&str, &str, f64)]) -> Rtts {
        let mut r = Rtts::default();
        for (a, b, ms) in pairs {
            r.insert(a, b, *ms);
            r.insert(b, a, *ms);
        }
        r
    }

    #[test]
    fn the_central_host_is_judged_against_every_other() {
        // three data centers: a (dc1), b (dc2), c (dc3), d in dc2 beside b
        let geo = rtts(&[
            ("a", "b", 80.0),
            ("a", "c", 80.0),
            ("a", "d", 80.0),
            ("b", "c", 40.0),
            ("b", "d", 0.4),
            ("c", "d", 40.0),
        ]);
        // parties on b and c
        struct Row {
            what: &'static str,
            rtts: Rtts,
            central: &'static str,
            parties: Vec<&'static str>,
            candidates: Vec<&'static str>,
            want: Option<(&'static str, f64, f64)>,
        }
        let mut rows = vec![
            Row {
                what: "a central host far from both parties: b is much nearer",
                rtts: geo.clone(),
                central: "a",
                parties: vec!["b", "c"],
                candidates: vec!["a", "b", "c", "d"],
                // max 40 from b, c and d; b's sum (0 + 40) is the least
                want: Some(("b", 40.0, 40.0)),
            },
            Row {
                what: "the reference layout: every data center 40 ms from the others",
                rtts: rtts(&[("a", "b", 40.0), ("a", "c", 40.0), ("b", "c", 40.0)]),
                central: "a",
                parties: vec!["b", "c"],
                candidates: vec!["a", "b", "c"],
                want: None,
            },
            Row {
                what: "the central host is already the best",
                rtts: geo.clone(),
                central: "d",
                parties: vec!["b", "c"],
                candidates: vec!["a", "b", "c", "d"],
                want: None,
            },
            Row {
                what: "only LAN-sized differences: no warning",
                rtts: rtts(&[("a", "b", 0.9), ("a", "c", 0.9), ("b", "c", 0.1)]),
                central: "a",
                parties: vec!["b", "c"],
                candidates: vec!["a", "b", "c"],
                want: None,
            },
            Row {
                what: "the central host's own links are not measured yet: no judgement",
                rtts: rtts(&[("b", "c", 40.0)]),
                central: "a",
                parties: vec!["b", "c"],
                candidates: vec!["a", "b", "c"],
                want: None,
            },
            Row {
                what: "a candidate with a missing measurement is skipped",
                rtts: rtts(&[("a", "b", 80.0), ("a", "c", 80.0), ("d", "b", 1.0)]),
                central: "a",
                parties: vec!["b", "c"],
                candidates: vec!["a", "d"],
                want: None,
            },
            Row {
                what: "no party host: nothing to compare",
                rtts: geo.clone(),
                central: "a",
                parties: vec![],
                candidates: vec!["a", "b"],
                want: None,
            },
            Row {
                what: "a host nearer by max and sum",
                // a: 55 + 55 = 110; f: 30 + 30 = 60 (110 ≥ 1.5 × 60, 50 ms nearer)
                rtts: rtts(&[
                    ("a", "b", 55.0),
                    ("a", "c", 55.0),
                    ("f", "b", 30.0),
                    ("f", "c", 30.0),
                ]),
                central: "a",
                parties: vec!["b", "c"],
                candidates: vec!["a", "f"],
                want: Some(("f", 60.0, 30.0)),
            },
            Row {
                what: "far by max only: one party across an ocean",
                // a: 1 + 90 = 91, max 90; g: 45 + 45 = 90, max 45 (sums equal, max 2×)
                rtts: rtts(&[
                    ("a", "b", 1.0),
                    ("a", "c", 90.0),
                    ("g", "b", 45.0),
                    ("g", "c", 45.0),
                ]),
                central: "a",
                parties: vec!["b", "c"],
                candidates: vec!["a", "g"],
                want: Some(("g", 90.0, 45.0)),
            },
        ];
        // a host between three parties, the central host far from two of them: nearer by
        // sum only (the farthest party is 80 ms from both)
        let between = rtts(&[
            ("a", "b", 80.0),
            ("a", "c", 80.0),
            ("a", "e", 80.0),
            ("x", "b", 10.0),
            ("x", "c", 10.0),
            ("x", "e", 80.0),
            ("b", "c", 15.0),
            ("b", "e", 85.0),
            ("c", "e", 85.0),
        ]);
        rows.push(Row {
            what: "nearer by sum only, from a host that runs no party node",
            rtts: between.clone(),
            central: "a",
            parties: vec!["b", "c", "e"],
            candidates: vec!["a", "b", "c", "e", "x"],
            want: Some(("x", 100.0, 80.0)),
        });
        rows.push(Row {
            what: "party hosts do not count for the sum",
            rtts: between,
            central: "a",
            parties: vec!["b", "c", "e"],
            candidates: vec!["a", "b", "c", "e"],
            want: None,
        });
        for r in rows {
            let got = central_warning(
                &r.rtts,
                r.central,
                r.parties.iter().copied(),
                r.candidates.iter().copied(),
            );
            match (got, r.want) {
                (None, None) => {}
                (Some(w), Some((host, sum, max))) => {
                    assert_eq!(w.better.host, host, "{}: {w}", r.what);
                    assert!((w.better.sum_ms - sum).abs() < 1e-9, "{}: {w}", r.what);
                    assert!((w.better.max_ms - max).abs() < 1e-9, "{}: {w}", r.what);
                    assert_eq!(w.central.host, r.central, "{}", r.what);
                }
                (got, want) => panic!("{}: got {got:?}, want {want:?}", r.what),
            }
        }
    }

    #[test]
    fn the_warning_names_both_hosts_and_the_figures() {
        let r = rtts(&[("a", "b", 80.0), ("a", "c", 81.0), ("b", "c", 40.0)]);
        let w = central_warning(&r, "a", ["b", "c"], ["a", "b", "c"]).expect("warns");
        let text = w.to_string();
        assert!(
            text.starts_with("the central party's host a is much farther from the parties' hosts (b, c) than host b would be"),
            "{text}"
        );
        assert!(text.contains("sum 161.0 ms, max 81.0 ms from a"), "{text}");
        assert!(text.contains("sum 40.0 ms, max 40.0 ms from b"), "{text}");
        assert!(text.ends_with("consider [central] host = \"b\""), "{text}");
    }

    #[test]
    fn one_sided_and_unanswered_measurements() {
        let mut r = Rtts::default();
        r.insert("a", "b", 10.0);
        r.insert("b", "a", 20.0);
        r.insert("a", "c", 5.0);
        r.insert("a", "d", 0.0);
        r.insert("a", "e", f64::NAN);
        assert_eq!(r.get("a", "b"), Some(15.0));
        assert_eq!(r.get("c", "a"), Some(5.0));
        assert_eq!(r.get("a", "d"), None);
        assert_eq!(r.get("a", "e"), None);
        assert_eq!(r.get("x", "x"), Some(0.0));
    }
}
