//! Replays, on stable, the inputs kept for the `job_file` and `job_compile` fuzz targets
//! (`tests/fuzz/regressions/<target>/`: seeds, and every input that once crashed, minimized),
//! with the very checks the targets run (`tests/fuzz/src/*.rs`, included below). Also the
//! regressions those runs and the controller's abuse tests found, written out as tests:
//! `compile` of an invalid job with absurd counts, and job files whose problems took
//! quadratic time to report. See `tests/fuzz/README.md`.

use std::time::Duration;

use geomx_job::{
    CentralSpec, CommandSpec, EnvSpec, JobSpec, MAX_REPORTED_PROBLEMS, Mode, Network, PartySpec,
    PolicySpec,
};

#[path = "../../../tests/fuzz/src/job_checks.rs"]
mod job_checks;
#[path = "../../../tests/fuzz/src/job_gen.rs"]
mod job_gen;
#[path = "../../../tests/fuzz/src/regressions.rs"]
mod regressions;

#[test]
fn job_file_regressions_pass_the_fuzz_checks() {
    for path in regressions::inputs("job_file") {
        let data = std::fs::read(&path).expect("read");
        eprintln!("job_file: {}", path.display());
        job_checks::check_job_file(&data);
    }
}

#[test]
fn job_compile_regressions_pass_the_fuzz_checks() {
    for path in regressions::inputs("job_compile") {
        let data = std::fs::read(&path).expect("read");
        eprintln!("job_compile: {}", path.display());
        job_checks::check_job_spec(&job_gen::job_spec(&data));
    }
}

fn absurd(mode: Mode, count: i64) -> JobSpec {
    let party = |name: &str| PartySpec {
        name: name.into(),
        hosts: vec!["a".into()],
        workers: count,
        scheduler_port: None,
        servers: count,
    };
    JobSpec {
        name: "absurd".into(),
        mode,
        image: "img".into(),
        image_pull: geomx_job::ImagePull::IfNotPresent,
        network: Network::Routed,
        interface: None,
        verbose: None,
        command: CommandSpec::default(),
        env: EnvSpec::default(),
        central: (mode == Mode::Hips).then(|| CentralSpec {
            host: "a".into(),
            global_scheduler_port: 9092,
            scheduler_port: 9093,
            global_servers: count,
            workers: count,
        }),
        parties: vec![party("p"), party("q")],
        policy: PolicySpec::default(),
        progress: None,
        mounts: Vec::new(),
        resources: geomx_job::ResourcesSpec::default(),
    }
}

/// Found by `job_compile`: compiling an invalid job with `workers = i64::MAX` ran out of
/// memory (and two such parties overflowed the worker sum). `compile` now caps counts at
/// geomx's limits, as its documentation promises a plan "without panicking".
#[test]
fn compile_of_absurd_counts_is_bounded() {
    for mode in [Mode::Hips, Mode::Ps] {
        for count in [i64::MAX, i64::MIN, -1, 1_000_000] {
            let spec = absurd(mode, count);
            assert!(spec.validate().is_err());
            let plan = geomx_job::compile(&spec);
            assert!(
                plan.nodes.len() <= 2 * 1024 + 2 * 64 + 1024 + 8,
                "{mode:?} {count}: {} nodes",
                plan.nodes.len()
            );
            job_checks::check_job_spec(&spec);
        }
    }
}

/// Found by the controller's abuse tests (a SubmitJob of a 1 MiB job file): reporting a
/// problem scanned the file from its start and searched every field, so a file with
/// thousands of problems took minutes (one with 120,000 `[[party]]` lines: 410 s) and the
/// report ran to megabytes. Problems are now placed through a line index, searched in their
/// own field only, and at most MAX_REPORTED_PROBLEMS are reported, plus a count of the rest.
#[test]
fn many_problems_are_reported_quickly_and_briefly() {
    let head = "name = \"j\"\nmode = \"hips\"\nimage = \"i\"\n[central]\nhost = \"a\"\n";
    let size = 256 << 10;
    let fill = |head: &str, line: &dyn Fn(usize) -> String| {
        let mut s = head.to_string();
        let mut i = 0;
        while s.len() < size {
            s.push_str(&line(i));
            i += 1;
        }
        s
    };
    let cases: Vec<(&str, String)> = vec![
        ("syntax errors", "=\n".repeat(size / 2)),
        ("unknown keys", fill(head, &|i| format!("k{i} = 1\n"))),
        (
            "parties with type errors",
            fill(head, &|i| {
                format!("[[party]]\nname = \"p{i}\"\nhosts = [\"b\"]\nworkers = \"x\"\n")
            }),
        ),
        ("empty parties", "[[party]]\n".repeat(size / 10)),
        (
            "duplicate hosts on one line",
            format!(
                "{head}[[party]]\nname = \"p\"\nhosts = [{}\"b\"]\nworkers = 1\n",
                "\"b\",".repeat(size / 4)
            ),
        ),
        (
            "placeholders in env",
            fill(&format!("{head}[env.all]\n"), &|i| {
                format!("DMLC_ROLE{i} = \"{{{{x\"\n")
            }),
        ),
    ];
    for (what, src) in cases {
        let started = thread_cpu_time();
        let errors = geomx_job::parse("big.toml", &src).expect_err(what);
        let took = thread_cpu_time().saturating_sub(started);
        let text = errors.to_string();
        eprintln!(
            "{what}: {} bytes, {} problems reported, {} bytes of report, {took:?} of CPU",
            src.len(),
            errors.len(),
            text.len()
        );
        // Before the fix each of these took from 5 s to minutes of CPU even in release
        // builds (far more in this debug build); now about a second in debug. The bound is on
        // the thread's CPU time, which the tests running beside it do not inflate (the wall
        // time of the first case reached 32 s in a CI run that trained MXNet meanwhile).
        assert!(took < Duration::from_secs(20), "{what}: {took:?} of CPU");
        assert_eq!(errors.len(), MAX_REPORTED_PROBLEMS + 1, "{what}");
        let last = errors.errors().last().expect("last");
        assert!(last.message.contains("more problems"), "{what}: {last}");
        assert!(text.len() < 64 << 10, "{what}: {} bytes", text.len());
        // The reported ones are the first in the file, in order.
        let lines: Vec<usize> = errors.errors().iter().filter_map(|e| e.line).collect();
        assert!(
            lines.windows(2).all(|w| w[0] <= w[1]),
            "{what}: not in order"
        );
        job_checks::check_job_file(src.as_bytes());
    }
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .expect("the thread's CPU clock")
}
