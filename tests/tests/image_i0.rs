//! Image i0 (Debian bookworm with the build tools) builds a small C program with make under QEMU
//! (TCG: faster than this host's emulated KVM), and the binary comes back through the job disk
//! and runs on the host. The same job checks which sockets a job has: Unix-domain ones (what
//! Node, npm scripts and Python's asyncio need) and no family that could reach a network.

use construir_tests::*;
use construir_tools::pack::JobFile;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const HELLO_C: &str = r#"#include <stdio.h>
#include "greeting.h"
int main(void) { printf("%s, %d\n", GREETING, 6 * 7); return 0; }
"#;
const GREETING_H: &str = "#define GREETING \"hello from construir i0\"\n";
const MAKEFILE: &str =
    "CFLAGS = -O2 -Wall -Werror\nhello: hello.c greeting.h\n\t$(CC) $(CFLAGS) -o $@ hello.c\n";

/// Opens a socket of each family and reports what happened; then a socketpair, a Unix-domain
/// server and client, and asyncio's event loop (which makes a socketpair of its own).
const SOCKETS_PY: &str = r#"import asyncio, errno, os, socket
def probe(name, kind):
    try:
        socket.socket(getattr(socket, name), kind).close()
        print(name, "open")
    except OSError as e:
        print(name, "refused", errno.errorcode.get(e.errno, e.errno))
probe("AF_UNIX", socket.SOCK_STREAM)
probe("AF_INET", socket.SOCK_STREAM)
probe("AF_INET", socket.SOCK_DGRAM)
probe("AF_INET6", socket.SOCK_STREAM)
probe("AF_PACKET", socket.SOCK_RAW)
probe("AF_NETLINK", socket.SOCK_RAW)
a, b = socket.socketpair()
a.sendall(b"ping")
print("socketpair", b.recv(4).decode())
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind("/tmp/probe.sock")
server.listen(1)
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.connect("/tmp/probe.sock")
peer, _ = server.accept()
client.sendall(b"pong")
print("unix stream", peer.recv(4).decode())
async def main():
    proc = await asyncio.create_subprocess_exec("echo", "child", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode().strip()
print("asyncio", asyncio.run(main()))
"#;

#[test]
fn i0_compiles_a_c_program_with_make_and_has_local_sockets_only() {
    let script = "#!/bin/sh\nset -e\ncd /opt/job/src\nmake > /tmp/build.log 2>&1 || { cat /tmp/build.log; exit 1; }\n\
                  cat /tmp/build.log\ncp hello /tmp/hello\ngcc --version | head -n 1 > /tmp/gcc.txt\n\
                  python3 /opt/job/sockets.py > /tmp/sockets.txt 2>&1 || true\n\
                  cd /tmp && tar -cJf /dev/sdb hello build.log gcc.txt sockets.txt\n";
    let job = TestJob::new(
        "hello",
        "i0",
        &[
            JobFile::script(script),
            JobFile::new("src/hello.c", HELLO_C.as_bytes(), 0o644),
            JobFile::new("src/greeting.h", GREETING_H.as_bytes(), 0o644),
            JobFile::new("src/Makefile", MAKEFILE.as_bytes(), 0o644),
            JobFile::new("sockets.py", SOCKETS_PY.as_bytes(), 0o644),
        ],
        8 << 20,
    );
    let run = qemu_tcg_on(
        "i0",
        &job,
        &["--timeout", "20m"],
        Duration::from_secs(30 * 60),
    );
    run.expect_code(0);
    eprintln!(
        "i0 build job took {:.1} s under TCG",
        run.elapsed.as_secs_f64()
    );
    let sockets = String::from_utf8(job.output("sockets.txt")).unwrap();
    for line in [
        "AF_UNIX open",
        "AF_INET refused EAFNOSUPPORT",
        "AF_INET6 refused EAFNOSUPPORT",
        "AF_PACKET refused EAFNOSUPPORT",
        "AF_NETLINK refused EAFNOSUPPORT",
        "socketpair ping",
        "unix stream pong",
        "asyncio child",
    ] {
        assert!(
            sockets.lines().any(|l| l == line),
            "{line:?} in:\n{sockets}"
        );
    }
    assert_eq!(
        sockets.matches("AF_INET refused EAFNOSUPPORT").count(),
        2,
        "{sockets}"
    );
    let binary = job.output("hello");
    assert_eq!(&binary[..4], b"\x7fELF");
    let log = String::from_utf8(job.output("build.log")).unwrap();
    assert!(log.contains("-O2 -Wall -Werror -o hello hello.c"), "{log}");
    assert!(
        String::from_utf8(job.output("gcc.txt"))
            .unwrap()
            .contains("Debian")
    );
    // Same Debian release as this host: the binary runs here.
    let exe = job.dir.path().join("hello");
    std::fs::write(&exe, &binary).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(&exe).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from construir i0, 42\n"
    );
}
