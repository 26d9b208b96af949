//! Replays every fuzz target's committed corpus and every past finding (`fuzz/corpus/NAME/`,
//! `fuzz/regressions/NAME/`) through the same bodies the fuzzer runs (`coda::fuzzing`), on
//! stable Rust: none may panic. The fuzzing itself (cargo-fuzz, nightly) is in fuzz/README.md.

use std::path::Path;

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[test]
fn corpus_and_past_findings_replay_without_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut total = 0;
    for (name, body) in coda::fuzzing::TARGETS {
        let corpus = files(&root.join("corpus").join(name));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{name} is empty: the replay proves nothing"
        );
        let found = files(&root.join("regressions").join(name));
        for f in corpus.iter().chain(&found) {
            let data = std::fs::read(f).unwrap();
            let r = std::panic::catch_unwind(|| body(&data));
            assert!(r.is_ok(), "{name}: {} panics", f.display());
            total += 1;
        }
        println!(
            "{name}: {} corpus files, {} past findings",
            corpus.len(),
            found.len()
        );
    }
    println!("{total} inputs replayed");
}
