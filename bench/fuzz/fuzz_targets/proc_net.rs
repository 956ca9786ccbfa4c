//! libFuzzer target: [`kiln_fuzz::proc::run`] on [`kiln_fuzz::proc::NET`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::proc::run(kiln_fuzz::proc::NET, data));
