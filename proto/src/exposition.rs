//! The Prometheus text exposition format (version 0.0.4) of a `prometheus-client` registry.
//!
//! `prometheus-client` writes OpenMetrics text: a counter family is declared without its
//! `_total` suffix (`# TYPE geomx_job_submissions counter`, then
//! `geomx_job_submissions_total 3`), with `# UNIT` lines and a closing `# EOF`. Prometheus
//! reads that, but the classic text format is what every other consumer reads (promtool,
//! node_exporter's textfile collector, the `prometheus-parse` crate): there a family is
//! declared under the very name of its samples. [`encode`] writes the classic format, so one
//! text serves every reader; [`CONTENT_TYPE`] is its HTTP content type.

use prometheus_client::registry::Registry;

/// Content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics of `registry` in the Prometheus text format 0.0.4.
pub fn encode(registry: &Registry) -> String {
    let mut openmetrics = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug of the crate.
    if let Err(e) = prometheus_client::encoding::text::encode_registry(&mut openmetrics, registry) {
        tracing::error!(error = %e, "encoding the metrics registry failed");
    }
    from_openmetrics(&openmetrics)
}

/// Rewrites OpenMetrics text into the Prometheus text format 0.0.4: counter families are
/// declared (`# HELP`, `# TYPE`) under their `_total` sample name, `unknown` becomes
/// `untyped`, `# UNIT` and `# EOF` lines are dropped. Samples are kept as they are.
pub fn from_openmetrics(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The HELP line of the family whose TYPE line comes next.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(h) = help.replace(rest) {
                push_line(&mut out, &["# HELP ", h]);
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), kind),
                "unknown" => (name.to_owned(), "untyped"),
                _ => (name.to_owned(), kind),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                push_line(&mut out, &["# HELP ", &name, " ", text]);
            }
            push_line(&mut out, &["# TYPE ", &name, " ", kind]);
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some(h) = help.take() {
            push_line(&mut out, &["# HELP ", h]);
        }
        push_line(&mut out, &[line]);
    }
    out
}

fn push_line(out: &mut String, parts: &[&str]) {
    for p in parts {
        out.push_str(p);
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    use super::*;

    /// A counter at `count`, a gauge at `level` and a histogram with one observation of 0.5 s.
    fn registry(count: u64, level: i64) -> Registry {
        let mut registry = Registry::default();
        let c: Counter = Counter::default();
        c.inc_by(count);
        registry.register("geomx_things", "Things done", c);
        let g: Gauge = Gauge::default();
        g.set(level);
        registry.register("geomx_level", "A level", g);
        let h = Histogram::new([0.1, 1.0]);
        h.observe(0.5);
        registry.register_with_unit(
            "geomx_wait",
            "Waits",
            prometheus_client::registry::Unit::Seconds,
            h,
        );
        registry
    }

    #[test]
    fn counters_are_declared_under_their_sample_name() {
        let text = encode(&registry(3, -2));
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(
            text.contains(
                "# HELP geomx_things_total Things done.\n# TYPE geomx_things_total counter\ngeomx_things_total 3\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE geomx_level gauge\ngeomx_level -2\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE geomx_wait_seconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("geomx_wait_seconds_bucket{le=\"1.0\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn a_prometheus_parser_reads_the_types() {
        use prometheus_parse::Value;
        let text = encode(&registry(1, 4));
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("parsed");
        let value = |name: &str| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name)
                .map(|s| s.value.clone())
        };
        assert_eq!(value("geomx_things_total"), Some(Value::Counter(1.0)));
        assert_eq!(value("geomx_level"), Some(Value::Gauge(4.0)));
        assert!(
            matches!(value("geomx_wait_seconds"), Some(Value::Histogram(b)) if b.len() == 3),
            "{text}"
        );
        assert_eq!(
            scrape.docs.get("geomx_things_total").map(String::as_str),
            Some("Things done.")
        );
    }

    #[test]
    fn unknown_becomes_untyped_and_a_lone_help_is_kept() {
        let text = from_openmetrics("# HELP a x\n# TYPE a unknown\na 1\n# HELP b y\nb 2\n# EOF\n");
        assert_eq!(text, "# HELP a x\n# TYPE a untyped\na 1\n# HELP b y\nb 2\n");
    }
}
