//! construir's tools as a library: packing jobs ([`pack`]), the QEMU launcher ([`qemu`]).

pub mod pack;
pub mod qemu;
