#!/bin/bash
# Install the Debian packages named as arguments that are missing. A fresh cloud machine
# runs apt itself for minutes after boot (cloud-init, unattended-upgrades): wait for its
# locks instead of failing. `install` waits through DPkg::Lock::Timeout; `update` takes the
# lists lock, which that option does not cover, so it is retried while the lock is held.
set -euo pipefail
WAIT=${APT_LOCK_WAIT:-600}  # seconds
missing=()
for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing apt packages: ${missing[*]}"
deadline=$((SECONDS + WAIT))
until out=$(apt-get -o DPkg::Lock::Timeout="$WAIT" update -qq 2>&1); do
  if ! grep -qiE "could not get lock|unable to lock" <<<"$out" || [ $SECONDS -ge $deadline ]; then
    echo "$out" >&2
    exit 1
  fi
  echo "waiting for another apt to finish (it holds the package lists lock)"
  sleep 5
done
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$WAIT" install -y -qq "${missing[@]}"
