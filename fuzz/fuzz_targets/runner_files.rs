#![no_main]
//! See construir_tests::fuzz::runner_files.
libfuzzer_sys::fuzz_target!(|data: &[u8]| construir_tests::fuzz::runner_files(data));
