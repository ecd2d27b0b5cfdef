#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with a Rust toolchain: installs the
# tools the end-to-end tests drive (wireguard-go, wg, iperf3, nftables, iproute2, ping,
# curl, Docker, gVisor's runsc, setpriv, sysctl, openssl, jq, systemd-analyze,
# shellcheck, promtool, and schemathesis from PyPI), checks formatting and lints, then
# runs every test in the workspace. A test whose tool is missing fails; none skips.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in wireguard-go:wireguard-go wg:wireguard-tools wg-quick:wireguard-tools iperf3:iperf3 nft:nftables \
            ip:iproute2 ping:iputils-ping curl:curl dockerd:docker.io nsenter:util-linux \
            chromium:chromium chromedriver:chromium-driver \
            setpriv:util-linux sysctl:procps ss:iproute2 timeout:coreutils \
            systemd-analyze:systemd shellcheck:shellcheck sha256sum:coreutils \
            unshare:util-linux runsc:runsc openssl:openssl jq:jq base64:coreutils \
            promtool:prometheus; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
# The OpenAPI conformance test runs schemathesis from a virtualenv.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3 python3-venv)
if [ "${#need[@]}" -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
schemathesis_version=4.32.5
tools_dir="${SIDECAR_TEST_TOOLS:-/opt/sidecar-test-tools}"
if [ "$("$tools_dir/schemathesis/bin/schemathesis" --version 2>/dev/null)" != "schemathesis, version $schemathesis_version" ]; then
    echo "installing: schemathesis $schemathesis_version into $tools_dir/schemathesis"
    rm -rf "$tools_dir/schemathesis"
    python3 -m venv "$tools_dir/schemathesis"
    "$tools_dir/schemathesis/bin/pip" install -q "schemathesis==$schemathesis_version"
fi
export SIDECAR_TEST_TOOLS="$tools_dir"
if [ "$(id -u)" -ne 0 ]; then
    echo "the end-to-end tests create network namespaces and TUN devices: run as root" >&2
    exit 1
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests run the agent binary; build it once up front.
cargo build --workspace --locked --bins
cargo test --workspace --locked --no-fail-fast -- --test-threads "${SIDECAR_TEST_THREADS:-4}"
