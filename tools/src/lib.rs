//! construir's tools as a library: packing jobs ([`pack`]), durations on the command line ([`duration`]) and the QEMU launcher ([`qemu`]).

pub mod duration;
pub mod pack;
pub mod qemu;
