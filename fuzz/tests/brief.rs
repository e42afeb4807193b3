//! A brief run of every fuzz target in `make test`: its seeds, then mutations of them, bounded
//! in count and time. `SLUICE_FUZZ_SEED` replays a run; `SLUICE_FUZZ_RUNS` sets the count.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_fuzz::TARGETS;
use sluice_fuzz::mutate::{Rng, mutate};

const MAX_LEN: usize = 4096;
const TIME_PER_TARGET: Duration = Duration::from_secs(10);

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn every_target_has_seeds() {
    for (name, _) in TARGETS {
        assert!(!seeds(name).is_empty(), "no seeds for {name}");
    }
}

#[test]
fn seeds_and_mutations_never_break_a_target() {
    let seed = env_u64("SLUICE_FUZZ_SEED", 0x5175_1ce0);
    let runs = env_u64("SLUICE_FUZZ_RUNS", 20_000);
    for (name, target) in TARGETS {
        let corpus = seeds(name);
        for (path, bytes) in &corpus {
            if std::panic::catch_unwind(|| target(bytes)).is_err() {
                panic!("target {name} fails on seed {}", path.display());
            }
        }
        let mut rng = Rng::new(seed ^ name.len() as u64);
        let started = Instant::now();
        let mut done = 0;
        while done < runs && started.elapsed() < TIME_PER_TARGET {
            let base = &corpus[rng.below(corpus.len())].1;
            let input = mutate(&mut rng, base, MAX_LEN);
            if std::panic::catch_unwind(|| target(&input)).is_err() {
                panic!(
                    "target {name} fails on input {:?} (SLUICE_FUZZ_SEED={seed}, run {done})",
                    String::from_utf8_lossy(&input)
                );
            }
            done += 1;
        }
        eprintln!("{name}: {} seeds, {done} mutations", corpus.len());
    }
}

#[test]
fn structured_seeds_reach_past_the_parsers() {
    for (path, bytes) in seeds("gang_request") {
        serde_json::from_slice::<sluice_placement::GangRequest>(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    for (path, bytes) in seeds("gpu_topology") {
        sluice_placement::GpuTopology::parse(std::str::from_utf8(&bytes).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    for (path, bytes) in seeds("operator_duration") {
        sluice_contract::parse_duration(std::str::from_utf8(&bytes).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
