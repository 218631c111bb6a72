//! Output: one grep-able `key=value key=value` line per measurement on standard output,
//! human notes on standard error.

use std::fmt::Display;

/// One output line, built key by key.
#[derive(Debug, Default)]
pub struct Line {
    parts: Vec<String>,
}

impl Line {
    /// A line starting with `key=value`.
    pub fn new(key: &str, value: impl Display) -> Line {
        Line::default().kv(key, value)
    }

    /// Adds `key=value` (spaces in the value become `_`, so a line always splits on spaces).
    pub fn kv(mut self, key: &str, value: impl Display) -> Line {
        let v = value.to_string().replace(char::is_whitespace, "_");
        self.parts.push(format!("{key}={v}"));
        self
    }

    /// Adds `key=value` with a float printed to `decimals` places.
    pub fn f(self, key: &str, value: f64, decimals: usize) -> Line {
        self.kv(key, format!("{value:.decimals$}"))
    }

    /// Prints the line on standard output.
    pub fn print(&self) {
        println!("{}", self.parts.join(" "));
    }
}

/// A human note on standard error.
pub fn note(text: impl Display) {
    eprintln!("geomx-bench: {text}");
}

/// The median of `values` (the mean of the two middle ones for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q` quantile (0..=1) of sorted `values` by the nearest-rank method; NaN when empty.
pub fn quantile_sorted(values: &[u32], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = (q * values.len() as f64).ceil() as usize;
    let i = rank.clamp(1, values.len()) - 1;
    f64::from(values[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile_sorted(&v, 0.5), 50.0);
        assert_eq!(quantile_sorted(&v, 0.99), 99.0);
        assert_eq!(quantile_sorted(&v, 1.0), 100.0);
        assert_eq!(quantile_sorted(&[7], 0.99), 7.0);
    }

    #[test]
    fn values_never_contain_spaces() {
        let l = Line::new("a", "x y").kv("b", 1).f("c", 1.23456, 2);
        assert_eq!(l.parts.join(" "), "a=x_y b=1 c=1.23");
    }
}
