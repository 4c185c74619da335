# Shell helpers shared by bench/run.sh and bench/s3.sh (sourced, not run).

# bench_apt_install LOG PKG...: installs the packages with apt-get, waiting
# for a running apt/dpkg to release its lock; updates the lists once if the
# first try fails.
bench_apt_install() {
    local log=$1; shift
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get -o DPkg::Lock::Timeout=1200 install -y "$@" >> "$log" 2>&1; then
        apt-get -o DPkg::Lock::Timeout=1200 update >> "$log" 2>&1 || true
        apt-get -o DPkg::Lock::Timeout=1200 install -y "$@" >> "$log" 2>&1 || return 1
    fi
}

# bench_end_started WORK: unmounts what a driver recorded in WORK/run/mounts
# (and anything still mounted under WORK/mnt), and ends the processes it
# recorded in WORK/run/pids, by id, only when their command line names WORK.
# The drivers clean up themselves; this covers a crash.
bench_end_started() {
    local work=$1 m pid
    if [[ -f "$work/run/mounts" ]]; then
        while read -r m; do
            [[ -z "$m" ]] && continue
            if mountpoint -q "$m" 2>/dev/null; then
                fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
            fi
        done < "$work/run/mounts"
    fi
    for m in "$work"/mnt/*; do
        [[ -d "$m" ]] || continue
        if mountpoint -q "$m" 2>/dev/null; then
            fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        fi
    done
    if [[ -f "$work/run/pids" ]]; then
        while read -r pid; do
            [[ "$pid" =~ ^[0-9]+$ ]] || continue
            if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF "$work"; then
                kill "$pid" 2>/dev/null || true
                sleep 1
                kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
            fi
        done < "$work/run/pids"
        : > "$work/run/pids"
    fi
}

# bench_flr_rev ROOT: the source revision of the checkout, marked when it has
# uncommitted changes.
bench_flr_rev() {
    local rev
    rev=$(git -C "$1" rev-parse --short HEAD 2>/dev/null || echo "no commit")
    if [[ -n "$(git -C "$1" status --porcelain --untracked-files=no 2>/dev/null | head -1)" ]]; then
        rev="$rev, uncommitted changes"
    fi
    echo "$rev"
}
