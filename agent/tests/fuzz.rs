//! Bounded fuzzing of every parser: real fixture files mutated at random
//! (bit flips, random bytes, truncation, duplicated or dropped lines,
//! numbers replaced by huge or negative ones), then every collector run on
//! them; plus random bytes straight into the text-format, mount-table,
//! os-release and TZif parsers. Nothing may panic; a collector may only
//! succeed or return an error.
//!
//! Runs for `KILN_FUZZ_SECS` seconds (default 2; `bench/metrics` runs it longer).
//!
//! Then the committed inputs of `bench/fuzz`'s `/proc` targets (libFuzzer's
//! minimised corpus and any crash input, see `bench/fuzz/run`), each through
//! the same entry point the fuzzer drives (`bench/fuzz/src/proc.rs`,
//! included here as source). No cargo-fuzz needed.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_agent::metrics::{self, MetricSet, filesystem, system, textfile};
use rand::prelude::*;

#[path = "../../bench/fuzz/src/proc.rs"]
mod proc_entry;
#[path = "../../bench/fuzz/src/replay.rs"]
mod replay;

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { files(&p, out) } else { out.push(p) }
    }
}

fn mutate(rng: &mut impl Rng, orig: &[u8]) -> Vec<u8> {
    let mut b = orig.to_vec();
    match rng.random_range(0..7) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                if !b.is_empty() {
                    let i = rng.random_range(0..b.len());
                    b[i] ^= 1 << rng.random_range(0..8);
                }
            }
        }
        1 => {
            let n = rng.random_range(0..b.len().max(1));
            b.truncate(n);
        }
        2 => b = (0..rng.random_range(0..512)).map(|_| rng.random()).collect(),
        3 => {
            let text = String::from_utf8_lossy(&b).into_owned();
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let i = rng.random_range(0..lines.len());
                if rng.random() {
                    lines.remove(i);
                } else {
                    lines.insert(i, lines[i]);
                }
            }
            b = lines.join("\n").into_bytes();
        }
        4 => {
            let text = String::from_utf8_lossy(&b).into_owned();
            let repl = ["18446744073709551616", "-1", "1e309", "NaN", "0x", "", "9999999999999999999999"][rng.random_range(0..7)];
            let words: Vec<&str> = text.split(' ').collect();
            let i = rng.random_range(0..words.len());
            b = words.iter().enumerate().map(|(j, w)| if j == i { repl } else { w }).collect::<Vec<_>>().join(" ").into_bytes();
        }
        5 => {
            if !b.is_empty() {
                let i = rng.random_range(0..b.len());
                b.insert(i, [b'\0', b'\n', b' ', b':', b'=', b'"', b'{', b'}', 0xff][rng.random_range(0..9)]);
            }
        }
        _ => b.clear(),
    }
    b
}

#[test]
fn parsers_survive_random_input() {
    let secs: f64 = std::env::var("KILN_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let dir = tempfile::tempdir().unwrap();
    common::copy_tree(&common::fixtures(), dir.path());
    let roots = common::roots(dir.path());
    let collectors = metrics::all();
    let mut paths = Vec::new();
    files(dir.path(), &mut paths);
    let originals: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut rng = rand::rng();
    let (mut rounds, mut failures) = (0u64, 0u64);
    while Instant::now() < deadline {
        let i = rng.random_range(0..paths.len());
        let input = mutate(&mut rng, &originals[i]);
        std::fs::write(&paths[i], &input).unwrap();
        for c in &collectors {
            let mut out = MetricSet::default();
            // A panic here fails the test with the input that caused it.
            if c.collect(&roots, &mut out).is_err() {
                failures += 1;
            }
        }
        let text = String::from_utf8_lossy(&input);
        let _ = textfile::parse(&text);
        let _ = filesystem::parse_mounts(&paths[i], &text);
        let _ = system::parse_os_release(&text);
        let _ = system::zone_at(&input, rng.random());
        std::fs::write(&paths[i], &originals[i]).unwrap();
        rounds += 1;
    }
    eprintln!("fuzz: {rounds} mutated inputs in {secs} s; {failures} collector runs rejected their input");
    assert!(rounds > 0, "fuzzed at least one input");
}

#[test]
fn committed_fuzz_inputs_replay() {
    let fuzz_dir = proc_entry::fixtures().join("../../../bench/fuzz");
    for (target, table) in proc_entry::TARGETS {
        let n = replay::replay(&fuzz_dir, target, |data| proc_entry::run(table, data));
        eprintln!("{target}: {n} committed inputs replayed");
        assert!(n > 0, "{target}: bench/fuzz/corpus/{target} holds the seed corpus");
    }
}
