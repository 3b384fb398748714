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

# Install the Debian packages that are missing (the project's own machines start without them).
# QEMU comes from bookworm-backports when the installed qemu-utils is the backported one (the
# machine image ships it), since bookworm's qemu-system-x86 7.2 conflicts with qemu-utils 10.
construir_need_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || construir_die "missing Debian packages: ${missing[*]} (run as root, or install them)"
    construir_log "installing Debian packages: ${missing[*]}"
    local want_backports=0
    if printf '%s\n' "${missing[@]}" | grep -q '^qemu-system' \
        && dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q 'bpo'; then
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
