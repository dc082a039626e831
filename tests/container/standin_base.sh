#!/usr/bin/env bash
# Build a local stand-in for the official python:3.11-slim-bookworm image from Debian's packages,
# because no container registry is reachable here. Tags it docker.io/library/python:3.11-slim-bookworm
# (and python:3.11-slim-bookworm) so `podman build --pull=never` resolves the project's FROM lines.
#
#   bash tests/container/standin_base.sh [--force]
#
# Idempotent: does nothing when the tag exists; --force rebuilds from debootstrap on.
# Uses CONTAINERS_CONF/CONTAINERS_STORAGE_CONF from the environment, or asks podman.py for them.
# Needs root and: apt-get update && apt-get install -y podman runc debootstrap
#
# What differs from the official image: Python is Debian's python3.11 (3.11.2 + Debian patches) in
# /usr/bin, with python/python3/python3.11/pip/pip3/pip3.11 symlinked into /usr/local/bin; pip is Debian's
# 23.0.1; /etc/pip.conf exists and is empty (a mount point for build-time pip settings, see podman.py);
# apt sources point at this machine's Debian mirror.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tag=docker.io/library/python:3.11-slim-bookworm
short_tag=python:3.11-slim-bookworm
minbase=localhost/celery-demo/debian-bookworm-minbase:latest
# ca-certificates, netbase and tzdata are what the official slim image installs besides Python.
packages="python3.11 python3-venv python3-pip ca-certificates netbase tzdata"

force=0
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

if [[ -z ${CONTAINERS_CONF:-} || -z ${CONTAINERS_STORAGE_CONF:-} ]]; then
  eval "$(python3 "$here/podman.py" env)"
fi
root=${CELERY_DEMO_PODMAN_ROOT:-/var/tmp/celery-demo-podman}
mkdir -p "$root"

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get update && apt-get install -y podman runc debootstrap" >&2; exit 1; }
done

# One build at a time (parallel test workers share the storage).
exec 9>"$root/standin.lock"
flock 9

if [[ $force == 0 ]] && podman image exists "$tag"; then
  podman image exists "$short_tag" || podman tag "$tag" "$short_tag"
  echo "$tag is cached (--force rebuilds)"
  exit 0
fi

# First URI that apt on this machine uses for SUITE (deb822 *.sources, then one-line *.list).
apt_uri() {
  local suite=$1 f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    uri=$(awk -v suite="$suite" '
      BEGIN { RS = ""; FS = "\n" }
      {
        uris = ""; suites = ""; types = ""; enabled = "yes"
        for (i = 1; i <= NF; i++) {
          line = $i
          if (line ~ /^[ \t]*#/) continue
          key = tolower(line); sub(/:.*/, "", key)
          val = line; sub(/^[^:]*:[ \t]*/, "", val)
          if (key == "uris") uris = val
          else if (key == "suites") suites = " " val " "
          else if (key == "types") types = " " val " "
          else if (key == "enabled") enabled = tolower(val)
        }
        if (enabled != "no" && types ~ / deb / && suites ~ (" " suite " ")) { split(uris, u, /[ \t]+/); print u[1]; exit }
      }' "$f")
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    uri=$(awk -v suite="$suite" '
      $1 == "deb" {
        i = 2
        if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
        if ($(i + 1) == suite) { print $i; exit }
      }' "$f")
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
}

mirror=$(apt_uri bookworm)
if [[ -z $mirror ]]; then
  echo "no apt source for bookworm found in /etc/apt: cannot tell which Debian mirror to use" >&2
  exit 1
fi
security=$(apt_uri bookworm-security)
updates=$(apt_uri bookworm-updates)
echo "Debian mirror: $mirror${security:+ (security: $security)}"

old_id=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
old_minbase_id=$(podman image inspect --format '{{.Id}}' "$minbase" 2>/dev/null || true)
work=$(mktemp -d "$root/standin.XXXXXX")
cleanup() {
  # A failed debootstrap can leave proc/sys mounted in the rootfs: unmount before deleting anything.
  awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r umount -l || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

if [[ $force == 1 ]] || ! podman image exists "$minbase"; then
  rootfs=$work/rootfs
  echo "debootstrap --variant=minbase bookworm (about half a minute)"
  start=$SECONDS
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
  }
  echo "debootstrap took $((SECONDS - start)) s"
  # Slim like Debian's -slim images: keep no docs, man pages or translations, now or from later installs.
  mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d" "$rootfs/etc/apt/apt.conf.d"
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  rm -rf "$rootfs"/usr/share/{man,groff,info,lintian,linda,locale}/* \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/debootstrap
  tar --numeric-owner -C "$rootfs" -c . | podman import --quiet --change 'CMD ["bash"]' - "$minbase" >/dev/null
  rm -rf --one-file-system "$rootfs"
fi

# apt sources for the image: this machine's mirror, in the deb822 form Debian's images use.
{
  printf 'Types: deb\nURIs: %s\nSuites: bookworm%s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" "${updates:+ bookworm-updates}"
  if [[ -n $security ]]; then
    printf '\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$security"
  fi
} >"$work/debian.sources"
# bookworm-updates on a mirror other than bookworm's own is rare; fall back to bookworm + security then.
if [[ -n $updates && $updates != "$mirror" ]]; then
  echo "note: bookworm-updates is served from $updates, not $mirror; the image uses $mirror for it" >&2
fi

cat >"$work/Containerfile" <<EOF
FROM $minbase
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8
COPY debian.sources /etc/apt/sources.list.d/debian.sources
RUN rm -f /etc/apt/sources.list \\
 && apt-get update -o Acquire::Check-Valid-Until=false \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages \\
 && apt-get clean \\
 && rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /var/cache/debconf/*-old \\
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python \\
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python3 \\
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python3.11 \\
 && ln -sf /usr/bin/pip3 /usr/local/bin/pip \\
 && ln -sf /usr/bin/pip3 /usr/local/bin/pip3 \\
 && ln -sf /usr/bin/pip3 /usr/local/bin/pip3.11 \\
 && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \\
 && : >/etc/pip.conf \\
 && python --version && pip --version \\
 && find /usr/lib/python3* -name __pycache__ -type d -prune -exec rm -rf {} +
CMD ["python3"]
EOF

echo "building $tag on $minbase"
start=$SECONDS
podman build --pull=never --network=host --format=docker --layers=false \
  -t "$tag" -t "$short_tag" -f "$work/Containerfile" "$work" >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  exit 1
}
echo "built in $((SECONDS - start)) s: $(grep -E '^Python 3' "$work/build.log" | tail -n 1)"

new_id=$(podman image inspect --format '{{.Id}}' "$tag")
if [[ -n $old_id && $old_id != "$new_id" ]]; then
  podman rmi "$old_id" >/dev/null 2>&1 || true # still used by a built image: leave it
fi
new_minbase_id=$(podman image inspect --format '{{.Id}}' "$minbase")
if [[ -n $old_minbase_id && $old_minbase_id != "$new_minbase_id" ]]; then
  podman rmi "$old_minbase_id" >/dev/null 2>&1 || true
fi
podman images --filter "reference=$tag" --format '{{.Repository}}:{{.Tag}} {{.Size}}'
