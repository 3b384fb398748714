#![no_main]
//! See construir_tests::fuzz::qcow2.
libfuzzer_sys::fuzz_target!(|data: &[u8]| construir_tests::fuzz::qcow2(data));
