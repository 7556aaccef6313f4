#!/usr/bin/env bash
# Make a Debian bookworm base image without a registry: debootstrap a minimal root file system from the
# Debian mirror this host's apt uses, add this host's local CA certificates (so pip inside a build trusts
# the same TLS as the host), and `docker import` it.
#
#   docker/make-base-image.sh [NAME]        (default modelworks-base:bookworm; needs root and debootstrap)
set -euo pipefail
name="${1:-modelworks-base:bookworm}"

if docker image inspect "$name" >/dev/null 2>&1; then
  echo "base image $name exists"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v debootstrap >/dev/null; then
  echo "cannot make $name: debootstrap needs root and the debootstrap package" >&2
  exit 1
fi

# the first Debian mirror the host's apt sources name (deb822 or one-line format), security excluded
mirror=$( (cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true) \
  | awk '/^URIs:/ {print $2} /^deb / {print $2}' | grep -v security | head -n 1 || true)
mirror="${mirror:-http://deb.debian.org/debian}"
root=$(mktemp -d /tmp/modelworks-base.XXXXXX)
trap 'rm -rf "$root"' EXIT

echo "debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$mirror" >/dev/null
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' - "$name" >/dev/null
echo "made base image $name"
