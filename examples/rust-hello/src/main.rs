//! A Rust program with a dependency from crates.io, built offline in the VM from the crates
//! `construir-pack --vendor` fetched on the host.
fn main() {
    let mut buffer = itoa::Buffer::new();
    println!("itoa says {}", buffer.format(6u64 * 7 * 1_000_001));
}
