//! `geomx-bench`: geomx's benchmarks (see docs/performance.md).

fn main() {}
