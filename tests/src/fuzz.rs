//! The bodies of construir's fuzz targets: what a guest or a job controls, fed arbitrary bytes.
//! `fuzz/` (cargo fuzz) calls these; `tests/tests/fuzz_corpus.rs` replays the committed corpus
//! and every input that once crashed (fuzz/regressions/) through them in `cargo test`.
//!
//! Each function must never panic, hang or touch anything outside its own temporary files,
//! whatever the input.

use construir_api::trust::{
    KeyPair, RECEIPT_CONTEXT, STATEMENT_CONTEXT, SignedReceipt, SignedStatement,
};
use construir_vmm::devices::bus::BusDevice;
use construir_vmm::disk::DiskBackend;
use construir_vmm::virtio::block::Block;
use construir_vmm::virtio::mmio::{MmioTransport, reg};
use construir_vmm::virtio::{Interrupt, Queue, QueueT, VirtioDevice};
use std::sync::{Arc, Mutex, OnceLock};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A target's body: arbitrary bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The targets, by name (the fuzz/fuzz_targets/ file names and the corpus directories).
pub const TARGETS: &[(&str, Target)] = &[
    ("virtio_blk", virtio_blk),
    ("virtio_mmio", virtio_mmio),
    ("qcow2", qcow2),
    ("job_name", job_name),
    ("job_archive", job_archive),
    ("status_stream", status_stream),
    ("runner_files", runner_files),
    ("trust_open", trust_open),
];

/// Guest RAM of the device targets: small, so the input covers much of it.
const GUEST_MEM: usize = 64 * 1024;

/// A disk in memory, whose size never changes.
struct MemDisk(Vec<u8>);

impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = offset as usize;
        buf.copy_from_slice(&self.0[start..start + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let start = offset as usize;
        self.0[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn id(&self) -> &str {
        "fuzz"
    }
}

fn guest_memory(image: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_MEM)]).expect("guest memory");
    let n = image.len().min(GUEST_MEM);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("fill guest memory");
    mem
}

fn word(data: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([
        data.get(at).copied().unwrap_or(0),
        data.get(at + 1).copied().unwrap_or(0),
    ])
}

/// virtio-blk over arbitrary queue state and guest memory: 12 bytes of configuration (queue
/// size, ring addresses, event index, read-only, disk size), then the guest's RAM, which holds
/// the descriptor table, the rings, headers and buffers the driver would have written.
pub fn virtio_blk(data: &[u8]) {
    if data.len() < 12 {
        return;
    }
    let (cfg, image) = data.split_at(12);
    let mem = guest_memory(image);
    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(1u16 << (cfg[0] % 9));
    let addr = |at: usize, align: u16| u32::from(word(cfg, at) & !(align - 1));
    queue.set_desc_table_address(Some(addr(1, 16)), Some(0));
    queue.set_avail_ring_address(Some(addr(3, 2)), Some(0));
    queue.set_used_ring_address(Some(addr(5, 4)), Some(0));
    queue.set_event_idx(cfg[7] & 1 == 1);
    queue.set_ready(true);
    let sectors = u64::from(word(cfg, 8) % 64);
    let disk = MemDisk(vec![0x5a; (sectors * 512) as usize]);
    let mut block = Block::new(Box::new(disk), cfg[10] & 1 == 1);
    if block
        .activate(mem.clone(), vec![queue], Interrupt::new().expect("eventfd"))
        .is_ok()
    {
        // Twice: the second pass sees the used ring and indexes the first one left.
        block.process_queue();
        block.process_queue();
    }
}

/// The virtio-mmio register interface: the guest's RAM (first 4 KiB of the input after a
/// length byte pair), then a sequence of register accesses: each is an op byte (read, write,
/// notify), a 16-bit offset, a length and, for writes, the value.
pub fn virtio_mmio(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let mem_len = (word(data, 0) as usize % 4096).min(data.len().saturating_sub(2));
    let (image, mut ops) = data[2..].split_at(mem_len);
    let mem = guest_memory(image);
    let block = Arc::new(Mutex::new(Block::new(
        Box::new(MemDisk(vec![0; 8 * 512])),
        false,
    )));
    let mut transport = MmioTransport::new(
        block.clone() as Arc<Mutex<dyn VirtioDevice>>,
        mem,
        Interrupt::new().expect("eventfd"),
    );
    let mut steps = 0;
    while ops.len() >= 4 && steps < 512 {
        steps += 1;
        let (op, offset, len) = (ops[0] % 3, u64::from(word(ops, 1)) % 0x200, ops[3] % 9);
        ops = &ops[4..];
        match op {
            0 => {
                let mut buf = vec![0u8; len as usize];
                transport.read(offset, &mut buf);
            }
            1 => {
                let n = (len as usize).min(ops.len());
                transport.write(offset, &ops[..n]);
                ops = &ops[n..];
            }
            _ => {
                // What the ioeventfd on QUEUE_NOTIFY makes the event loop do.
                transport.write(reg::QUEUE_NOTIFY, &0u32.to_le_bytes());
                block.lock().expect("block").process_queue();
            }
        }
    }
}

/// The qcow2 → raw conversion of an untrusted image (virtual size capped at 64 MiB here).
pub fn qcow2(data: &[u8]) {
    let dir = std::path::Path::new("/dev/shm");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let input = tempfile::NamedTempFile::new_in(&dir).expect("temp file");
    std::fs::write(input.path(), data).expect("write input");
    let out = tempfile::NamedTempFile::new_in(&dir).expect("temp file");
    if let Ok(size) =
        construir_vmm::disk::qcow2::convert_limited(input.path(), out.path(), 64 << 20)
    {
        assert_eq!(std::fs::metadata(out.path()).expect("output").len(), size);
    }
}

/// The job-name parser (the runner's queue accepts any file name).
pub fn job_name(data: &[u8]) {
    if let Ok(name) = std::str::from_utf8(data)
        && let Ok(job) = construir_contract::jobname::parse_job_name(name)
    {
        // An index that parsed is a plain name: it becomes a file name in the images directory.
        assert!(!job.image.contains('/') && !job.image.is_empty() && job.image != "..");
    }
}

/// A job archive: the init unpacks it as root in the guest, and construir-result reads the
/// output a job wrote back. Nothing may land outside the destination.
pub fn job_archive(data: &[u8]) {
    use construir_contract::archive;
    let _ = archive::list(data);
    let _ = archive::read_file(data, "out.txt", 1 << 20);
    let root = tempfile::tempdir().expect("temp dir");
    let dest = root.path().join("dest");
    std::fs::create_dir(&dest).expect("dest");
    let _ = archive::unpack(data, &dest);
    let outside: Vec<_> = std::fs::read_dir(root.path())
        .expect("read root")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        outside,
        ["dest"],
        "the archive wrote outside its destination"
    );
}

/// The status port's byte stream (the guest writes any bytes it likes there).
pub fn status_stream(data: &[u8]) {
    let decoder = construir_contract::status::decode(data);
    assert_eq!(decoder.bytes_seen(), data.len() as u64);
    let _ = decoder.outcome();
}

/// What the runner reads back from disk or from a backend: a backend's output with its summary
/// line, a record file (construir-result reads them), an attempts count.
pub fn runner_files(data: &[u8]) {
    use construir_runner::record::Record;
    use construir_runner::runner::{apply_summary, backend_summary};
    if let Some(summary) = backend_summary(data) {
        let mut rec = Record::default();
        apply_summary(&mut rec, &summary);
        assert!(rec.reason.len() <= 1000);
    }
    let _ = serde_json::from_slice::<Record>(data);
    let _ = std::str::from_utf8(data).map(|s| s.trim().parse::<u32>());
}

/// A fixed key, so that what the fuzzer finds replays.
const SERVER_SEED: &str = "0101010101010101010101010101010101010101010101010101010101010101";

fn key() -> &'static KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    KEY.get_or_init(|| KeyPair::from_seed_hex(SERVER_SEED).expect("a fixed seed"))
}

fn open_statement(signed: &SignedStatement) {
    if let Ok(statement) = signed.open() {
        assert!(statement.validate().is_ok(), "an opened statement is valid");
    }
}

fn open_receipt(signed: &SignedReceipt) {
    let public = key().public_hex();
    if let Ok(receipt) = signed.open(&public) {
        assert_eq!(receipt.server_key, public);
        assert!(receipt.quorum >= 1 && receipt.votes.len() >= receipt.quorum as usize);
        for vote in &receipt.votes {
            assert!(
                vote.statement.open().is_ok(),
                "every vote of an opened receipt opens"
            );
        }
    }
}

/// Hostile statements and receipts through `SignedStatement::open` and `SignedReceipt::open`:
/// they must refuse, never panic, and what they accept must hold. The first byte picks how the
/// rest is read: 0 a signed statement's JSON, 1 a signed receipt's JSON (opened with the fixed
/// key), 2 a statement's text signed here with the fixed key (past the signature, into every
/// field's check), 3 a receipt's text signed so (into the quorum, vote and attestation checks).
pub fn trust_open(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            if let Ok(signed) = serde_json::from_slice::<SignedStatement>(rest) {
                open_statement(&signed);
            }
        }
        1 => {
            if let Ok(signed) = serde_json::from_slice::<SignedReceipt>(rest) {
                open_receipt(&signed);
            }
        }
        2 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                open_statement(&SignedStatement {
                    signature: key().sign(STATEMENT_CONTEXT, text.as_bytes()),
                    statement: text.to_string(),
                });
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                open_receipt(&SignedReceipt {
                    signature: key().sign(RECEIPT_CONTEXT, text.as_bytes()),
                    receipt: text.to_string(),
                });
            }
        }
    }
}
