//! construir's tools as a library: packing jobs ([`pack`]), the console sink with its size cap
//! ([`console`]), durations on the command line ([`duration`]) and the QEMU launcher ([`qemu`]).

pub mod console;
pub mod duration;
pub mod pack;
pub mod qemu;
