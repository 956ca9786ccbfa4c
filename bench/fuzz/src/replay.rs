//! Replays the committed inputs of one fuzz target: every file of
//! `bench/fuzz/corpus/<target>/` and `bench/fuzz/crashes/<target>/`, each
//! through the target's entry point, each within a time bound. Shared as
//! source by the replay tests of `pxe` and `agent`.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long one input may take in a debug build before the replay fails.
pub const BOUND: Duration = Duration::from_secs(2);

/// Runs `entry` on every committed input of `target` below `fuzz_dir`
/// (`bench/fuzz`); returns how many there were. Panics (failing the test)
/// when an input panics or takes longer than [`BOUND`].
pub fn replay(fuzz_dir: &Path, target: &str, entry: impl Fn(&[u8])) -> usize {
    let mut count = 0;
    for kind in ["corpus", "crashes"] {
        let Ok(files) = std::fs::read_dir(fuzz_dir.join(kind).join(target)) else { continue };
        for file in files {
            let path = file.expect("a directory entry").path();
            let data = std::fs::read(&path).expect("a committed input reads");
            let start = Instant::now();
            entry(&data);
            let took = start.elapsed();
            assert!(took < BOUND, "{target}: {} took {took:?}", path.display());
            count += 1;
        }
    }
    count
}
