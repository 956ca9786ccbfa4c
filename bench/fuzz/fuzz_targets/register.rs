//! libFuzzer target: [`kiln_fuzz::pxe::register`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::pxe::register(data));
