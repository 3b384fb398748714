#![no_main]
//! See construir_tests::fuzz::virtio_blk.
libfuzzer_sys::fuzz_target!(|data: &[u8]| construir_tests::fuzz::virtio_blk(data));
