#!/usr/bin/env bash
# Build the lrnserve image with podman and test it for real: start it, check health, run an
# lrn and an alexnet inference with the SDK, scrape /metrics, remove it.
#
# This machine kind has no Docker engine and cannot pull registry images, so:
#   * podman (+ runc) builds and runs the image as root (installed with apt-get if missing);
#   * the base image is a STAND-IN for python:3.11-slim: Debian bookworm from debootstrap with
#     Debian's python3/venv/pip and this host's CA certificates, imported with `podman import`.
#     It is not the official image; the Dockerfile is built unchanged on top of it.
#
# Usage: deploy/docker/container-test.sh [PYTHON]   (PYTHON: an interpreter with lrnserve's
# client installed, default .venv/bin/python). Takes about 5 minutes the first time.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${1:-.venv/bin/python}
IMAGE=localhost/lrnserve:container-test
BASE=localhost/lrnserve-standin-python:3.11-slim
WORK=${CONTAINER_TEST_WORK:-/var/tmp/lrnserve-container-test}
log() { printf '\n== %s ==\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "container-test needs root (podman as root on this machine kind)" >&2
  exit 1
fi

log "podman"
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null \
  || ! { command -v catatonit || ls /usr/libexec/podman/catatonit; } >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc debootstrap catatonit
fi
mkdir -p /etc/containers
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
pid_max=$(cat /proc/sys/kernel/pid_max)
if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; then nproc=$pid_max; fi
[ "$nofile" = unlimited ] && nofile=1048576
cat > /etc/containers/containers.conf <<CONF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
podman --version

log "stand-in base image (debootstrap bookworm; NOT the official python:3.11-slim)"
if ! podman image exists "$BASE"; then
  rootfs="$WORK/rootfs"
  rm -rf "$rootfs" && mkdir -p "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates > /dev/null
  fi
  # The official image has `python` and `pip` on PATH; Debian's python3 lacks the unversioned names.
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*
  tar -C "$rootfs" -c . | podman import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    --change 'CMD ["python3"]' - "$BASE" > /dev/null
  rm -rf "$rootfs"
fi

log "build"
# This host reaches PyPI but not PyTorch's CPU index: hand the build the local CPU torch wheel.
rm -f deploy/docker/wheels/torch-*.whl
wheel=$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
if [ -n "$wheel" ]; then cp "$wheel" deploy/docker/wheels/; fi
trap 'rm -f deploy/docker/wheels/torch-*.whl' EXIT
start=$(date +%s)
podman build --network host --build-arg BASE_IMAGE="$BASE" -t "$IMAGE" -f Dockerfile . > "$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; exit 1; }
echo "built $IMAGE in $(( $(date +%s) - start )) s ($(podman image inspect "$IMAGE" --format '{{.Size}}') bytes)"
[ "$(podman image inspect "$IMAGE" --format "{{.Config.User}}")" = 10001:10001 ] || { echo "image must run as uid 10001" >&2; exit 1; }

log "run"
grpc_port=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
metrics_port=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
id=$(podman run -d --network host --init --read-only --tmpfs /tmp \
  -e LRNSERVE_GRPC_PORT="$grpc_port" -e LRNSERVE_METRICS_PORT="$metrics_port" -e LRNSERVE_HOST=127.0.0.1 \
  -e LRNSERVE_PLAINTEXT=1 \
  "$IMAGE")
cleanup() {
  podman logs "$id" > "$WORK/container.log" 2>&1 || true
  podman rm -f "$id" > /dev/null 2>&1 || true
  rm -f deploy/docker/wheels/torch-*.whl
}
trap cleanup EXIT
echo "container $id: gRPC 127.0.0.1:$grpc_port, metrics 127.0.0.1:$metrics_port (read-only root, uid 10001)"

log "checks over loopback"
"$PYTHON" - "$grpc_port" "$metrics_port" <<'PY'
import sys, time, urllib.request
import numpy as np
from lrnserve.client import Client, Retry

grpc_port, metrics_port = sys.argv[1], sys.argv[2]
target = f"127.0.0.1:{grpc_port}"
with Client(target, timeout=300, retries=Retry(attempts=400, initial_backoff=0.2, max_backoff=1.0)) as client:
    deadline = time.monotonic() + 300
    while not client.ready():
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(1)
    assert client.health() and client.health("alexnet")
    x = np.random.default_rng(0).standard_normal((2, 16, 9, 9)).astype(np.float32)
    y = client.lrn(x, size=5, alpha=1e-4, beta=0.75, k=1.0)
    square = np.zeros_like(x, dtype=np.float64)
    for c in range(16):
        lo, hi = max(0, c - 2), min(15, c + 2)
        square[:, c] = (x[:, lo:hi + 1].astype(np.float64) ** 2).sum(axis=1)
    expected = x / (1.0 + 1e-4 / 5 * square) ** 0.75
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    probabilities = client.infer("alexnet", np.random.default_rng(1).random((2, 3, 227, 227), np.float32))
    assert probabilities.shape == (2, 1000)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    stats = client.statistics("alexnet")
    assert stats.success_count >= 1 and stats.inference_count >= 2
print("lrn and alexnet inferences correct")
with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
    text = response.read().decode()
for needle in ('lrnserve_requests_total{code="OK",model="lrn"}', 'lrnserve_requests_total{code="OK",model="alexnet"}',
               "lrnserve_build_info", "process_resident_memory_bytes"):
    assert needle in text, needle
print("metrics scraped")
PY
"$PYTHON" -m lrnserve.client.cli health --target "127.0.0.1:$grpc_port"
podman exec "$id" lrnserve health --target "127.0.0.1:$grpc_port"
# Read the logs whole before searching: grep -q stops at the first match, and podman, writing the
# rest into a closed pipe, then fails the pipeline (pipefail) once the log is long enough.
logs=$(podman logs "$id" 2>&1)
grep -q "fused CPU LRN kernel loaded" <<< "$logs" \
  || { echo "the image must load its prebuilt kernel (no compiler at run time)" >&2; podman logs "$id" | tail -20; exit 1; }

log "SIGTERM drains and exits 0"
podman stop --time 60 "$id" > /dev/null
code=$(podman inspect "$id" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || { echo "exit code $code after SIGTERM" >&2; podman logs "$id" | tail -20; exit 1; }
logs=$(podman logs "$id" 2>&1)
grep -q "stopped (drained)" <<< "$logs"
echo "container test passed (base image: debootstrap stand-in for python:3.11-slim)"
