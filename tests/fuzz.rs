//! A short, bounded run of every fuzz target: its seeds, every input kept under
//! `tests/fuzz/regressions/<target>/` (inputs that once crashed it), then a few
//! thousand mutations from a fixed seed. Seconds, not minutes; the long,
//! coverage-guided run is `bash benches/fuzz.sh` (see its `--help`).
//!
//! `SIDECAR_FUZZ_RUNS` changes the number of mutations per target (default 2000).

#[path = "fuzz/mutate.rs"]
mod mutate;
#[path = "fuzz/seeds.rs"]
mod seeds;
#[path = "fuzz/targets.rs"]
mod targets;

use std::path::PathBuf;

fn regressions(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/regressions")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

fn short_run(name: &str) {
    let target = targets::target(name).expect("known target");
    let seeds = seeds::seeds(name);
    assert!(!seeds.is_empty(), "{name} has no seeds");
    for seed in &seeds {
        target(seed);
    }
    for (path, input) in regressions(name) {
        eprintln!("{name}: regression {}", path.display());
        target(&input);
    }
    let runs: usize = std::env::var("SIDECAR_FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut rng = mutate::Rng::new(0x51de_ca75 ^ name.len() as u64);
    for i in 0..runs {
        let base = &seeds[i % seeds.len()];
        let input = mutate::mutate(&mut rng, base, &seeds, 4096);
        let result = std::panic::catch_unwind(|| target(&input));
        if result.is_err() {
            panic!("{name} panicked on mutation {i}: {input:02x?}");
        }
    }
}

#[test]
fn fuzz_wg_datagram() {
    short_run("wg_datagram");
}

#[test]
fn fuzz_neighbor() {
    short_run("neighbor");
}

#[test]
fn fuzz_netstack() {
    short_run("netstack");
}

#[test]
fn fuzz_uapi() {
    short_run("uapi");
}

#[test]
fn fuzz_wgquick() {
    short_run("wgquick");
}

#[test]
fn fuzz_relay_toml() {
    short_run("relay_toml");
}

#[test]
fn fuzz_api_body() {
    short_run("api_body");
}

#[test]
fn every_target_has_a_short_run() {
    let here = include_str!("fuzz.rs");
    for (name, _) in targets::TARGETS {
        assert!(
            here.contains(&format!("short_run(\"{name}\")")),
            "{name} has no #[test]"
        );
    }
}
