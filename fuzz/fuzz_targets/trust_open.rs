#![no_main]
//! See construir_tests::fuzz::trust_open.
libfuzzer_sys::fuzz_target!(|data: &[u8]| construir_tests::fuzz::trust_open(data));
