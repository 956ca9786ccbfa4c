//! Golden files: rendered output compared byte for byte with a file under
//! the testing crate's `tests/golden/`, or written there when
//! `KILN_REGENERATE_GOLDEN` is set.
//!
//! Not part of the `kiln-tests` crate: each crate's golden test includes
//! this one file as a module, so the compare-or-regenerate logic lives in
//! one place:
//!
//! ```ignore
//! #[path = "../../tests/golden_file.rs"]
//! mod golden_file;
//! ```
//!
//! Every golden test has `golden_file` in its name, so one command
//! regenerates them all after an intended change:
//!
//! ```sh
//! KILN_REGENERATE_GOLDEN=1 cargo test --workspace golden_file
//! ```
//!
//! What a golden test renders must be deterministic: fixed names, paths,
//! tokens and digests, never a temporary path or the time.

use std::path::PathBuf;

/// Compares `got` with `tests/golden/<name>` of the crate whose test
/// includes this module (`name` may have directories); with
/// `KILN_REGENERATE_GOLDEN` set, writes `got` there first.
pub fn check(name: &str, got: &str) {
    // `env!` expands in the including crate, so this is its directory.
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var_os("KILN_REGENERATE_GOLDEN").is_some() {
        std::fs::create_dir_all(golden.parent().expect("a golden file has a directory")).unwrap();
        std::fs::write(&golden, got).unwrap();
    }
    let want =
        std::fs::read_to_string(&golden).unwrap_or_else(|e| panic!("{}: {e}; create it with KILN_REGENERATE_GOLDEN=1", golden.display()));
    if got != want {
        let first = got.lines().zip(want.lines()).position(|(a, b)| a != b).unwrap_or(got.lines().count().min(want.lines().count()));
        panic!(
            "output differs from {} at line {}:\n  got:  {:?}\n  want: {:?}\n(regenerate with KILN_REGENERATE_GOLDEN=1 if intended)",
            golden.display(),
            first + 1,
            got.lines().nth(first),
            want.lines().nth(first)
        );
    }
}
