#![no_main]
//! See construir_tests::fuzz::job_name.
libfuzzer_sys::fuzz_target!(|data: &[u8]| construir_tests::fuzz::job_name(data));
