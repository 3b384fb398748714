# Shared shell helpers for construir's build scripts. Source it; do not run it.
# shellcheck shell=bash

# Where expensive artifacts (kernel, images, converted disks) are cached, keyed by the hash
# of their inputs. Override with CONSTRUIR_CACHE.
construir_cache() {
    printf '%s\n' "${CONSTRUIR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/construir}"
}

construir_log() {
    printf '[construir %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

construir_die() {
    construir_log "error: $*"
    exit 1
}

# No script dies without saying why: under `set -e`, the command that failed, where, and its exit
# status. Reported by the script's own shell only (errtrace carries the trap into functions; a
# command substitution or subshell that fails is reported once, as the line that ran it), so a
# `$(cmd) || true` stays quiet.
set -o errtrace
construir__on_err() {
    [ "$BASH_SUBSHELL" = 0 ] || return 0
    construir_log "error: '$2' failed with exit status $1 at $3:$4"
}
trap 'construir__on_err $? "$BASH_COMMAND" "${BASH_SOURCE[0]:-$0}" "$LINENO"' ERR

# Cleanup and a final verdict, from one EXIT trap (a script that sets its own EXIT trap would
# replace this one: add paths with construir_cleanup instead).
construir__cleanup_paths=()
construir__cleanup_pids=()
construir__cleanup_cmds=()
construir__verdict_name=
construir__verdict_start=$SECONDS
construir__on_exit() {
    local status=$?
    trap - ERR
    local pid cmd
    for cmd in "${construir__cleanup_cmds[@]}"; do
        eval "$cmd" || true
    done
    for pid in "${construir__cleanup_pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${construir__cleanup_pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ ${#construir__cleanup_paths[@]} -gt 0 ]; then rm -rf -- "${construir__cleanup_paths[@]}" || true; fi
    if [ -n "$construir__verdict_name" ]; then
        if [ ${#construir__phases[@]} -gt 0 ]; then
            construir_log "phase times:"
            printf '    %s\n' "${construir__phases[@]}" >&2
        fi
        if [ "$status" = 0 ]; then
            printf '[construir %s] %s: PASSED in %d s\n' "$(date +%H:%M:%S)" "$construir__verdict_name" "$((SECONDS - construir__verdict_start))" >&2
        else
            printf '[construir %s] %s: FAILED (exit status %d) after %d s; the reason is above\n' "$(date +%H:%M:%S)" "$construir__verdict_name" "$status" "$((SECONDS - construir__verdict_start))" >&2
        fi
    fi
    exit "$status"
}
trap construir__on_exit EXIT

# construir_phase NAME COMMAND...: runs COMMAND as one timed phase of the script; the verdict
# line is preceded by every phase's time. (COMMAND runs in a `||` list, where bash ignores `set -e`:
# a shell function given as COMMAND must check its own steps, as construir_need_packages does.)
construir__phases=()
construir_phase() {
    local name=$1 start=$SECONDS
    shift
    construir_log "phase: $name"
    local status=0
    "$@" || status=$?
    if [ "$status" != 0 ]; then
        construir__phases+=("$(printf '%5d s  %s  (FAILED, exit status %d)' "$((SECONDS - start))" "$name" "$status")")
        construir_log "error: phase '$name' failed: '$*' exited with status $status"
        exit "$status"
    fi
    construir__phases+=("$(printf '%5d s  %s' "$((SECONDS - start))" "$name")")
}

# construir_corpus_field NAME KEY: the value of KEY= in corpus/NAME/source (empty if absent).
construir_corpus_field() {
    sed -n "s/^$2=//p" "$(dirname "${BASH_SOURCE[0]}")/../corpus/$1/source" | head -n 1
}

# construir_cleanup PATH...: removed when the script exits, however it exits.
construir_cleanup() {
    construir__cleanup_paths+=("$@")
}

# construir_stop_at_exit PID...: background processes (a server, a runner) stopped with SIGTERM
# when the script exits, however it exits.
construir_stop_at_exit() {
    construir__cleanup_pids+=("$@")
}

# construir_run_at_exit COMMAND: a shell command run when the script exits, however it exits
# (before the processes are stopped and the paths removed).
construir_run_at_exit() {
    construir__cleanup_cmds+=("$1")
}

# construir_verdict NAME: the script ends with one line, "NAME: PASSED in N s" or "NAME: FAILED …".
construir_verdict() {
    construir__verdict_name=$1
    construir__verdict_start=$SECONDS
}

# The Rust toolchain this workspace needs (Cargo.toml's rust-version); Debian's own rustc is far
# older, so say where to get one instead of failing in the compiler.
construir_need_rust() {
    local want=1.94 have
    command -v cargo >/dev/null || construir_die "no cargo on PATH: install Rust $want or newer with rustup (https://rustup.rs)"
    have=$(rustc --version 2>/dev/null | awk '{ v = $2 } END { print v }')
    if [ "$(printf '%s\n%s\n' "$want" "${have:-0}" | sort -V | sed -n 1p)" != "$want" ]; then
        construir_die "rustc ${have:-?} is older than $want: rustup update (or install with https://rustup.rs)"
    fi
}

# Whether a Debian package is installed. (No `| grep -q` behind a writer: under pipefail, grep's
# early exit can kill the writer with SIGPIPE and turn a match into a failure.)
construir_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

# Install the Debian packages that are missing (the project's own machines start without them).
# QEMU comes from bookworm-backports when the installed qemu-utils is the backported one (the
# machine image ships it), since bookworm's qemu-system-x86 7.2 conflicts with qemu-utils 10.
construir_need_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        construir_installed "$pkg" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || construir_die "missing Debian packages: ${missing[*]} (run as root, or install them)"
    construir_log "installing Debian packages: ${missing[*]}"
    local want_backports=0
    local qemu_utils_version
    qemu_utils_version=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [[ " ${missing[*]}" == *" qemu-system"* ]] && [[ "$qemu_utils_version" == *bpo* ]]; then
        want_backports=1
        if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            echo 'deb http://deb.debian.org/debian bookworm-backports main' \
                >/etc/apt/sources.list.d/construir-backports.list
        fi
    fi
    apt-get update -qq >/dev/null 2>&1 || apt-get update -qq || true
    local regular=() qemu=()
    for pkg in "${missing[@]}"; do
        case "$pkg" in qemu-*) qemu+=("$pkg") ;; *) regular+=("$pkg") ;; esac
    done
    if [ ${#regular[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${regular[@]}" >/dev/null \
            || construir_die "apt-get install ${regular[*]} failed"
    fi
    if [ ${#qemu[@]} -gt 0 ]; then
        local target=()
        [ $want_backports = 1 ] && target=(-t bookworm-backports)
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${target[@]}" "${qemu[@]}" >/dev/null \
            || construir_die "apt-get install ${qemu[*]} failed"
    fi
}

# Run a long command with its output in LOG, printing a progress line every 20 s with the last
# line of output, so a person sees what is being waited on.
construir_run_logged() {
    local what=$1 log=$2
    shift 2
    local start=$SECONDS
    "$@" >"$log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 2
        if (((SECONDS - start) % 20 < 2)) && ((SECONDS - start >= 20)); then
            construir_log "$what: $((SECONDS - start)) s, at: $(tail -n 1 "$log" | cut -c1-100)"
            sleep 2
        fi
    done
    if ! wait "$pid"; then
        tail -n 30 "$log" >&2
        construir_die "$what failed after $((SECONDS - start)) s (full log: $log)"
    fi
    construir_log "$what: done in $((SECONDS - start)) s"
}

# The S3 server the tests run against: s3s-fs from the Rust registry, pinned (0.14.1: later
# versions need a newer rustc), built once with cargo install and cached by version. Prints the
# binary's path.
CONSTRUIR_S3S_FS_VERSION=0.14.1
construir_need_s3s_fs() {
    local root
    root="$(construir_cache)/tools/s3s-fs-$CONSTRUIR_S3S_FS_VERSION"
    if [ ! -x "$root/bin/s3s-fs" ]; then
        construir_log "building s3s-fs $CONSTRUIR_S3S_FS_VERSION with cargo install (once; about 9 minutes on 2 cores)"
        rm -rf "$root.tmp"
        mkdir -p "$(dirname "$root")"
        construir_run_logged "cargo install s3s-fs@$CONSTRUIR_S3S_FS_VERSION" "$(dirname "$root")/s3s-fs-build.log" \
            cargo install "s3s-fs@$CONSTRUIR_S3S_FS_VERSION" --features binary --locked --root "$root.tmp"
        rm -rf "$root"
        mv "$root.tmp" "$root"
    fi
    printf '%s\n' "$root/bin/s3s-fs"
}
