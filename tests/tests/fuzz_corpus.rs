//! Every committed fuzz input — the seed corpus (fuzz/corpus/TARGET/) and each input that once
//! crashed a target (fuzz/regressions/TARGET/) — through the same target bodies cargo fuzz runs
//! (`construir_tests::fuzz`). Fast: no VM, no KVM.

use construir_tests::fuzz::TARGETS;
use std::path::Path;

fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_seed_and_every_past_crash_runs_clean() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (target, body) in TARGETS {
        let seeds = inputs(&fuzz.join("corpus").join(target));
        assert!(!seeds.is_empty(), "no seed corpus for fuzz target {target}");
        let regressions = inputs(&fuzz.join("regressions").join(target));
        for (name, data) in seeds.iter().chain(&regressions) {
            eprintln!("{target}: {name} ({} bytes)", data.len());
            body(data);
        }
    }
}
