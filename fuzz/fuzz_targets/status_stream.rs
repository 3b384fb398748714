#![no_main]
//! See construir_tests::fuzz::status_stream.
libfuzzer_sys::fuzz_target!(|data: &[u8]| construir_tests::fuzz::status_stream(data));
