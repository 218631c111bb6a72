//! Replays, on stable, the inputs kept for the `report_convert` fuzz target
//! (`tests/fuzz/regressions/report_convert/`: seeds, and every input that once failed,
//! minimized) with the very checks the target runs (`tests/fuzz/src/report_checks.rs` and
//! its generator `report_gen.rs`, included below). See `tests/fuzz/README.md`.

#[path = "../../../tests/fuzz/src/regressions.rs"]
mod regressions;
#[path = "../../../tests/fuzz/src/report_checks.rs"]
mod report_checks;
#[path = "../../../tests/fuzz/src/report_gen.rs"]
mod report_gen;

#[test]
fn report_convert_regressions_pass_the_fuzz_checks() {
    for path in regressions::inputs("report_convert") {
        let data = std::fs::read(&path).expect("read");
        eprintln!("report_convert: {}", path.display());
        report_checks::check_report(&data);
    }
}

/// Every budget, with inputs of every length up to 512 bytes of a fixed pseudo-random
/// stream: the fuzz checks hold for what the target would try first.
#[test]
fn short_inputs_pass_the_fuzz_checks_under_every_budget() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let stream: Vec<u8> = (0..512)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    for budget in 0..report_gen::BUDGETS.len() {
        for len in [0, 1, 7, 40, 128, 511] {
            let mut data = stream[..len].to_vec();
            if let Some(b) = data.first_mut() {
                *b = budget as u8;
            }
            report_checks::check_report(&data);
        }
    }
}
