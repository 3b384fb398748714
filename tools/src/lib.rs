//! construir's tools as a library: packing jobs ([`pack`]), what an image offers
//! ([`image_info`]), fetching a build's dependencies on the host ([`vendor`]), the QEMU
//! launcher ([`qemu`]).

pub mod image_info;
pub mod pack;
pub mod qemu;
pub mod vendor;
