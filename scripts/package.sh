#!/usr/bin/env bash
# The Debian package: builds the release binary, generates its man pages and shell
# completions from the command line's definition (`mupdate-worker man`, `completions`),
# then `cargo deb --no-build` (cargo-deb installed when missing) packs them with the
# files Cargo.toml's [package.metadata.deb] lists. Prints the package's path last.
#
#   scripts/package.sh            build target/debian/mupdate-worker_<version>-1_<arch>.deb
#
# scripts/package-test.sh installs it here, runs it and removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/versions.env
export PATH="$HOME/.cargo/bin:$PATH"

if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  echo "[package] installing cargo-deb $CARGO_DEB_VERSION" >&2
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" >&2
fi

cargo build --release --locked >&2
bin=target/release/mupdate-worker
out=target/package
rm -rf "$out" && mkdir -p "$out/man" "$out/completions"
"$bin" man --out "$out/man"
gzip -9n "$out"/man/*.1
"$bin" completions bash > "$out/completions/mupdate-worker.bash"
"$bin" completions zsh > "$out/completions/_mupdate-worker"
"$bin" completions fish > "$out/completions/mupdate-worker.fish"
gzip -9nc CHANGELOG.md > "$out/changelog.gz"

cargo deb --no-build --locked >&2
deb=$(ls -t target/debian/mupdate-worker_*.deb | head -1)
echo "$deb"
