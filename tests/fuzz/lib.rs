//! The fuzz targets and their seeds, shared with the in-suite short run
//! (`tests/fuzz.rs` includes the same files).

pub mod seeds;
pub mod targets;

/// With `SIDECAR_FUZZ_WRITE_SEEDS=DIR` set, writes `target`'s seeds into DIR and
/// exits; `benches/fuzz.sh` makes each fuzzer's seed folder this way (a separate
/// program would have to link libFuzzer too, since all code here is instrumented).
pub fn write_seeds_if_asked(target: &str) {
    let Some(dir) = std::env::var_os("SIDECAR_FUZZ_WRITE_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("create seed directory");
    for (i, seed) in seeds::seeds(target).iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), seed).expect("write seed");
    }
    std::process::exit(0);
}
