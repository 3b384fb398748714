# shellcheck shell=bash
# The servers the tests run the construir server against, each started fresh on its own port on
# 127.0.0.1 and stopped when the calling script exits: PostgreSQL (Debian's postgresql package, a
# throw-away cluster of its own) and an S3 server (s3s-fs, built once and cached by version).
# Sourced after tools/lib.sh. Each step checks itself: these run inside construir_phase, where
# `set -e` does not hold.

# A TCP port nobody listens on (127.0.0.1).
construir_free_port() {
    local port tries=0
    while :; do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            printf '%s\n' "$port"
            return 0
        fi
        tries=$((tries + 1))
        [ $tries -lt 50 ] || construir_die "no free TCP port found on 127.0.0.1"
    done
}

# Waits until something listens on 127.0.0.1:PORT (at most SECONDS), or dies saying WHAT.
construir_wait_port() {
    local what=$1 port=$2 seconds=$3 log=$4 start=$SECONDS
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        if ((SECONDS - start >= seconds)); then
            tail -n 20 "$log" >&2 || true
            construir_die "$what did not listen on 127.0.0.1:$port within $seconds s (log: $log)"
        fi
        sleep 0.2
    done
}

# Runs a shell command as the cluster's owner: the postgres user when we are root (PostgreSQL
# refuses to run as root), else ourselves.
construir__as_pg() {
    if [ "$(id -u)" = 0 ]; then
        su postgres -s /bin/sh -c "$1"
    else
        sh -c "$1"
    fi
}

# construir_start_postgres DIR: a new PostgreSQL cluster in DIR (owned by the postgres user when
# run as root, else by us), on a free port; exports CONSTRUIR_TEST_POSTGRES, the URL of a role
# that may create databases. The cluster is for tests only: fsync is off (a machine crash is not
# what these tests are about).
construir_start_postgres() {
    local dir=$1 bin port password
    bin=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1 || true)
    [ -x "$bin/initdb" ] || construir_die "no PostgreSQL server (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql"
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || construir_die "no postgres user (the postgresql package makes it)"
    fi
    port=$(construir_free_port) || return
    password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    [ ${#password} = 32 ] || construir_die "could not read 16 random bytes"
    { mkdir -p "$dir" && printf '%s\n' "$password" >"$dir/password" && chmod 700 "$dir"; } \
        || construir_die "could not make the PostgreSQL directory $dir"
    if [ "$(id -u)" = 0 ]; then
        chown -R postgres: "$dir" || construir_die "could not give $dir to the postgres user"
    fi
    construir_log "PostgreSQL ($bin): a new cluster in $dir, port $port"
    construir__as_pg "'$bin/initdb' -D '$dir/data' -U construir -A scram-sha-256 --pwfile='$dir/password' -E UTF8 --no-instructions" \
        >"$dir/initdb.log" 2>&1 || { tail -n 20 "$dir/initdb.log" >&2; construir_die "initdb failed (log: $dir/initdb.log)"; }
    construir__as_pg "'$bin/pg_ctl' -D '$dir/data' -l '$dir/server.log' -w -t 60 \
        -o \"-c listen_addresses=127.0.0.1 -p $port -k '$dir' -c fsync=off -c max_connections=400\" start" \
        >"$dir/pg_ctl.log" 2>&1 || { tail -n 20 "$dir/server.log" >&2; construir_die "PostgreSQL did not start (log: $dir/server.log)"; }
    # Stopped at exit by pg_ctl (a test may restart it: its process is then another).
    construir_run_at_exit "construir__as_pg \"'$bin/pg_ctl' -D '$dir/data' -m fast -w stop\" >/dev/null 2>&1"
    CONSTRUIR_TEST_POSTGRES="postgres://construir:$password@127.0.0.1:$port/postgres"
    # What a fault test needs to restart it.
    CONSTRUIR_TEST_PG_BIN=$bin CONSTRUIR_TEST_PG_DATA=$dir/data
    export CONSTRUIR_TEST_POSTGRES CONSTRUIR_TEST_PG_BIN CONSTRUIR_TEST_PG_DATA
}

# construir_start_s3 DIR: s3s-fs serving DIR (a bucket is a directory in it) on a free port;
# exports the AWS_* variables object_store reads, and CONSTRUIR_TEST_S3_ROOT.
construir_start_s3() {
    local dir=$1 s3s port key secret
    s3s=$(construir_need_s3s_fs) || return
    port=$(construir_free_port) || return
    key=construir-test
    secret=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    [ ${#secret} = 32 ] || construir_die "could not read 16 random bytes"
    mkdir -p "$dir/root" || construir_die "could not make the S3 directory $dir/root"
    construir_log "S3 (s3s-fs $CONSTRUIR_S3S_FS_VERSION): serving $dir/root on port $port"
    "$s3s" --host 127.0.0.1 --port "$port" --access-key "$key" --secret-key "$secret" "$dir/root" \
        >"$dir/s3s-fs.log" 2>&1 &
    construir_stop_at_exit $!
    construir_wait_port "s3s-fs" "$port" 30 "$dir/s3s-fs.log"
    # (CONSTRUIR_TEST_S3S_FS: fault tests start an S3 server of their own, to stop it.)
    export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
        AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret CONSTRUIR_TEST_S3_ROOT="$dir/root" \
        CONSTRUIR_TEST_S3S_FS=$s3s
}
