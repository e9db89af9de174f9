#!/usr/bin/env bash
# Installs what the tests need and runs every test: formatting, lints, unit, property and
# integration tests (real NBD clients against the real binary), and a bounded fuzz smoke run.
# Usage: scripts/test.sh            (as root, or with sudo available, on Debian/Ubuntu)
#        FUZZ_SECONDS=0 scripts/test.sh   to skip the fuzz smoke run locally
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
PKGS=(qemu-utils libnbd-bin fio nbdkit iproute2 curl util-linux etcd-server)

need_install=0
for tool in qemu-io qemu-img nbdinfo nbdcopy fio nbdkit ip curl unshare etcd; do
    command -v "$tool" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "== installing ${PKGS[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${PKGS[@]}" >/dev/null
fi
if ! fio --enghelp 2>/dev/null | grep -qw nbd; then
    echo "this fio has no nbd ioengine (fio --enghelp); install a fio built with libnbd" >&2
    exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace 2>&1 | tee /tmp/tabula-test.log

if [ "$FUZZ_SECONDS" != 0 ]; then
    echo "== fuzz smoke run (${FUZZ_SECONDS}s per target)"
    command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked --quiet cargo-fuzz
    # cargo-fuzz needs unstable compiler flags; RUSTC_BOOTSTRAP lets the stable toolchain
    # accept them, so no nightly toolchain has to be downloaded.
    for target in $(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz list); do
        log="/tmp/tabula-fuzz-$target.log"
        if ! (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- \
            -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048) >"$log" 2>&1; then
            echo "fuzz target $target failed (build or crash); the end of its log:"
            tail -n 60 "$log"
            exit 1
        fi
        echo "$target: $(tail -n 1 "$log")"
    done
fi
passed=$(grep -o '[0-9]* passed' /tmp/tabula-test.log | awk '{s+=$1} END {print s+0}')
failed=$(grep -o '[0-9]* failed' /tmp/tabula-test.log | awk '{s+=$1} END {print s+0}')
echo "== all tests passed"
echo "tests: ${passed} passed, ${failed} failed"
