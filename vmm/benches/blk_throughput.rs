//! The virtio-blk device model's throughput in-process: requests laid out in guest memory as a
//! driver would, served by `Block::process_queue` against a raw file, no guest and no KVM. The
//! baseline, in the same run, is reading/writing the same file with plain pread/pwrite of the same
//! sizes. `cargo bench -p construir-vmm --bench blk_throughput` (prints a table and one JSON line).

use construir_vmm::disk::raw::RawDisk;
use construir_vmm::virtio::block::Block;
use construir_vmm::virtio::{Interrupt, Queue, VirtioDevice};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DISK_BYTES: u64 = 256 << 20;
const QUEUE: u16 = 256;
const CHAINS: u16 = 80; // 3 descriptors each: 240 of 256

fn disk_file() -> std::fs::File {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let f = tempfile::tempfile_in(dir).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..DISK_BYTES).step_by(1 << 20) {
        f.write_all_at(&chunk, off).unwrap();
    }
    f
}

/// Serves `total` bytes in requests of `size`; returns the time spent in process_queue.
fn device_model(file: &std::fs::File, size: u32, write: bool, total: u64) -> Duration {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let data_base = 0x10_0000u64;
    let hdr_base = 0x1000u64;
    let status_base = 0x8000u64;
    let mut block = Block::new(
        Box::new(RawDisk::new(file.try_clone().unwrap(), "bench").unwrap()),
        false,
    );
    let mut elapsed = Duration::ZERO;
    let mut done = 0u64;
    let mut sector = 0u64;
    while done < total {
        let vq = MockSplitQueue::new(&mem, QUEUE);
        let mut descs = Vec::new();
        for i in 0..CHAINS {
            let hdr = hdr_base + u64::from(i) * 16;
            mem.write_obj(
                if write {
                    VIRTIO_BLK_T_OUT
                } else {
                    VIRTIO_BLK_T_IN
                },
                GuestAddress(hdr),
            )
            .unwrap();
            mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
            sector = (sector + u64::from(size) / 512) % (DISK_BYTES / 512 - u64::from(size) / 512);
            let idx = i * 3;
            let data_flags = if write { 0 } else { VRING_DESC_F_WRITE };
            descs.push(RawDescriptor::from(Descriptor::new(
                hdr,
                16,
                VRING_DESC_F_NEXT as u16,
                idx + 1,
            )));
            descs.push(RawDescriptor::from(Descriptor::new(
                data_base + u64::from(i) * u64::from(size),
                size,
                (VRING_DESC_F_NEXT | data_flags) as u16,
                idx + 2,
            )));
            descs.push(RawDescriptor::from(Descriptor::new(
                status_base + u64::from(i),
                1,
                VRING_DESC_F_WRITE as u16,
                0,
            )));
        }
        vq.add_desc_chains(&descs, 0).unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        block.reset();
        block
            .activate(mem.clone(), vec![queue], Interrupt::new().unwrap())
            .unwrap();
        let start = Instant::now();
        // Each call serves a bounded batch (the guest cannot hold the event loop); serve them all.
        while block.process_queue().more {}
        elapsed += start.elapsed();
        assert_eq!(vq.used().idx().load(), CHAINS);
        done += u64::from(CHAINS) * u64::from(size);
    }
    elapsed
}

/// The same bytes with plain pread/pwrite into one buffer.
fn host_baseline(file: &std::fs::File, size: u32, write: bool, total: u64) -> Duration {
    let mut buf = vec![0x33u8; size as usize];
    let start = Instant::now();
    let mut off = 0u64;
    let mut done = 0u64;
    while done < total {
        if write {
            file.write_all_at(&buf, off).unwrap();
        } else {
            file.read_exact_at(&mut buf, off).unwrap();
        }
        off = (off + u64::from(size)) % (DISK_BYTES - u64::from(size));
        done += u64::from(size);
    }
    start.elapsed()
}

fn main() {
    let file = disk_file();
    let total = 1u64 << 30;
    let mut results = Vec::new();
    println!(
        "{:>6} {:>5} {:>14} {:>14} {:>7}",
        "size", "op", "device MB/s", "host MB/s", "ratio"
    );
    for size in [64 * 1024u32, 4096] {
        for write in [false, true] {
            let amount = if size == 4096 { total / 4 } else { total };
            let dev = device_model(&file, size, write, amount);
            let host = host_baseline(&file, size, write, amount);
            let mbs = |d: Duration| amount as f64 / d.as_secs_f64() / 1e6;
            let op = if write { "write" } else { "read" };
            println!(
                "{:>6} {:>5} {:>14.0} {:>14.0} {:>7.2}",
                size,
                op,
                mbs(dev),
                mbs(host),
                mbs(dev) / mbs(host)
            );
            results.push(serde_json::json!({"request_bytes": size, "op": op, "device_mb_s": mbs(dev).round(), "host_mb_s": mbs(host).round(), "ratio": (mbs(dev) / mbs(host) * 100.0).round() / 100.0}));
        }
    }
    println!(
        "{}",
        serde_json::json!({"bench": "virtio-blk device model, in-process (no guest)", "disk": "raw file on tmpfs", "results": results})
    );
}
