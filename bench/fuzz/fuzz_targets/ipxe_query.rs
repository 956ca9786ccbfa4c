//! libFuzzer target: [`kiln_fuzz::pxe::ipxe_query`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::pxe::ipxe_query(data));
