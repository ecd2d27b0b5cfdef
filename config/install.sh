#!/bin/sh
# Sidecar agent installer, served by a Sidecar relay at /install with the relay's URL, its
# certificate pin and the SHA-256 of the agent binary it serves filled in:
#
#   curl -fsSL --pinnedpubkey 'PIN' -k https://RELAY:8443/install | SIDECAR_TOKEN=sct_live_... sh
#
# or, without SIDECAR_TOKEN, the installer runs the agent's device login against this
# relay: it prints a code and a URL for an admin of the relay to approve, and installs
# with the token the approval issues.
#
# Options (after `sh -s --` when piped):
#   --print-only  print every file it would write and every unit it would enable, then
#                 exit; needs neither root nor a token and changes nothing
#   --root DIR    install into DIR instead of / (a scratch root); starts nothing
#
# It refuses a token without the sct_live_ prefix before changing anything, checks the
# host (root, Docker 24 or newer, /dev/net/tun), downloads the agent from the same relay
# with the same pin, checks its SHA-256, gets a token by device login when none was
# given, writes the token 0600 under /etc/sidecar and the
# systemd unit, then enables and starts sidecar-agent.service.
set -eu

RELAY_URL='@RELAY_URL@'
RELAY_PIN='@RELAY_PIN@'
AGENT_SHA256='@AGENT_SHA256@'
UNIT=sidecar-agent.service

say() { printf 'sidecar-install: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

print_only=0
root=
while [ $# -gt 0 ]; do
    case $1 in
        --print-only) print_only=1 ;;
        --root)
            [ $# -ge 2 ] || die "--root needs a directory"
            root=$2
            shift
            ;;
        --root=*) root=${1#--root=} ;;
        -h | --help)
            cat <<'HELP'
Installs the Sidecar agent from this relay as a systemd service.
  SIDECAR_TOKEN=sct_live_... sh install.sh [--root DIR]
  sh install.sh [--root DIR]    (no token: device login, an admin of the relay approves)
  sh install.sh --print-only [--root DIR]
--print-only  print every file it would write and every unit it would enable; changes nothing
--root DIR    install into DIR instead of / (a scratch root); starts nothing
HELP
            exit 0
            ;;
        *) die "unknown option $1 (try --help)" ;;
    esac
    shift
done
if [ -n "$root" ]; then
    case $root in
        /*) ;;
        *) root=$(pwd)/$root ;;
    esac
    root=${root%/}
fi

# What gets written: mode and path (relative to the root).
DIRS="0700 /etc/sidecar
0755 /usr/local/bin
0755 /etc/systemd/system"
FILES="0600 /etc/sidecar/agent.token
0600 /etc/sidecar/agent.env
0755 /usr/local/bin/sidecar-agent
0644 /etc/systemd/system/$UNIT"

plan() {
    printf '%s\n' "$DIRS" | while read -r mode path; do
        printf 'dir %s %s%s\n' "$mode" "$root" "$path"
    done
    printf '%s\n' "$FILES" | while read -r mode path; do
        printf 'file %s %s%s\n' "$mode" "$root" "$path"
    done
    if [ -z "$root" ]; then
        printf 'enable %s\n' "$UNIT"
        printf 'start %s\n' "$UNIT"
    fi
}

if [ "$print_only" = 1 ]; then
    plan
    exit 0
fi

# The token first: a wrong one must be refused before anything changes. Without one,
# the device login runs once the agent is downloaded and checked.
token=${SIDECAR_TOKEN:-}
if [ -n "$token" ]; then
    case $token in
        sct_live_*) ;;
        *) die "SIDECAR_TOKEN does not start with sct_live_: not an agent token from a Sidecar relay" ;;
    esac
    case $token in
        *[!A-Za-z0-9_-]*) die "SIDECAR_TOKEN holds characters no Sidecar token has" ;;
    esac
fi

# Preflight: only what the host that will run the agent needs; a scratch root is
# written for another machine (or an image) and starts nothing here.
if [ -z "$root" ]; then
    [ "$(id -u)" = 0 ] || die "run as root (the agent manages TUN devices and container namespaces)"
    command -v docker >/dev/null 2>&1 || die "docker is not installed (Docker 24 or newer is needed)"
    docker_version=$(docker version --format '{{.Server.Version}}' 2>/dev/null) ||
        die "cannot reach the Docker daemon (is it running?)"
    docker_major=${docker_version%%.*}
    case $docker_major in
        '' | *[!0-9]*) die "cannot read the Docker version from '$docker_version'" ;;
    esac
    [ "$docker_major" -ge 24 ] || die "Docker $docker_version is too old: 24 or newer is needed"
    [ -c /dev/net/tun ] || die "/dev/net/tun is missing (modprobe tun)"
    command -v systemctl >/dev/null 2>&1 || die "systemctl is missing: this installer sets up a systemd unit"
fi
command -v curl >/dev/null 2>&1 || die "curl is missing"
if command -v sha256sum >/dev/null 2>&1; then
    sha256() { sha256sum "$1" | cut -d' ' -f1; }
elif command -v openssl >/dev/null 2>&1; then
    sha256() { openssl dgst -sha256 -r "$1" | cut -d' ' -f1; }
else
    die "neither sha256sum nor openssl is available to check the agent binary"
fi

# Parents made on the way (in a scratch root) are the usual 0755; every file is
# created private and given its mode only once written.
umask 022
printf '%s\n' "$DIRS" | while read -r mode path; do
    mkdir -p "$root$path"
    chmod "$mode" "$root$path"
done
umask 077

# The binary goes to a temporary name beside its target and is renamed only once its
# checksum matches, so a failed download never leaves a half-written agent.
bin=$root/usr/local/bin/sidecar-agent
token_file=$root/etc/sidecar/agent.token
tmp=$(mktemp "$bin.XXXXXX")
trap 'rm -f "$tmp" "$token_file.login"' EXIT
say "downloading the agent from $RELAY_URL"
curl -fsS -k --pinnedpubkey "$RELAY_PIN" -o "$tmp" "$RELAY_URL/install/sidecar-agent" ||
    die "cannot download the agent from $RELAY_URL"
got=$(sha256 "$tmp")
[ "$got" = "$AGENT_SHA256" ] || die "the downloaded agent has SHA-256 $got, expected $AGENT_SHA256"
chmod 0755 "$tmp"

# No token given: the checked agent (not yet installed, so a denied or expired login
# leaves no agent behind) runs its device login against this relay. It prints the code
# and URL to approve, and writes the token 0600 beside its final name. Its stdin is
# closed: under `curl | sh` it is the rest of this script.
if [ -z "$token" ]; then
    say "no SIDECAR_TOKEN: starting a device login with $RELAY_URL"
    "$tmp" login --relay "$RELAY_URL" --pin "$RELAY_PIN" --token-file "$token_file.login" </dev/null ||
        die "the device login did not issue a token (denied, expired or unreachable): nothing was installed; run the installer again, or set SIDECAR_TOKEN"
    token=$(cat "$token_file.login")
    case $token in
        sct_live_*) ;;
        *) die "the device login wrote no agent token" ;;
    esac
fi

mv -f "$tmp" "$bin"

write() { # MODE PATH: stdin to PATH, replacing it whole
    cat >"$2.new"
    chmod "$1" "$2.new"
    mv -f "$2.new" "$2"
}
printf '%s\n' "$token" | write 0600 "$token_file"
rm -f "$token_file.login"
trap - EXIT
printf 'SIDECAR_RELAY=%s\nSIDECAR_PIN=%s\n' "$RELAY_URL" "$RELAY_PIN" |
    write 0600 "$root/etc/sidecar/agent.env"
write 0644 "$root/etc/systemd/system/$UNIT" <<'SIDECAR_UNIT'
@AGENT_UNIT@
SIDECAR_UNIT

if [ -n "$root" ]; then
    say "installed into $root; nothing started"
    exit 0
fi
systemctl daemon-reload
systemctl enable --now "$UNIT"
say "$UNIT is running; \`sidecar-agent status\` lists the containers it serves"
