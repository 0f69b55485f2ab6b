#!/usr/bin/env bash
# image-check.sh: build the carbond container image from a checkout's own Dockerfile with podman, run it, probe
# /healthz, /readyz and /metrics and the image's HEALTHCHECK, then clean up. Written for a machine with no access
# to a container registry (Debian 12, root, podman 4.3, debootstrap). Nothing here edits the Dockerfile.
# A copy of the project's shared podman-image-check.sh, kept in the repository so the suite needs nothing outside
# it (tests/deploy/test_image.py runs it), plus one run on a moved port (3c).
#
#   usage: image-check.sh [CHECKOUT_DIR]        (default: current directory)
#
# What it does:
#   1. Local base image. `FROM python:3.11-slim-bookworm` cannot be pulled, so, if it is not in local storage yet,
#      it is made with debootstrap (minbase bookworm + python3, python3-pip, python3-venv, ca-certificates) from the
#      Debian mirror apt already uses. Then it is imported and tagged both localhost/python:3.11-slim-bookworm and
#      docker.io/library/python:3.11-slim-bookworm, and the build runs with --pull=never. To match the official
#      image: `python` -> python3 in /usr/local/bin, and Debian's PEP 668 marker
#      (/usr/lib/python3.11/EXTERNALLY-MANAGED) is removed, so `pip install` installs into the system Python
#      (/usr/local/lib/python3.11/dist-packages, scripts in /usr/local/bin) as the official image does.
#      It is kept between runs (idempotent). REBUILD_BASE=1 makes it again.
#   2. Image build: podman build --format docker (so HEALTHCHECK is kept; the OCI format drops it) --pull=never
#      --network host. The host's CA bundle is bind-mounted read-only over /etc/ssl/certs/ca-certificates.crt for
#      the RUN steps only (outbound TLS may be re-signed by a local CA; the image itself is not changed).
#      A pip index-url configured on the host (PIP_INDEX_URL or `pip config get global.index-url`, http(s) only)
#      goes in through a build-time /etc/pip.conf mount. HTTP(S)_PROXY variables pass through as podman does by default.
#   3. Run: the image's default CMD, port 9875 published on 127.0.0.1:<free port>; wait for /healthz, check
#      /readyz, /metrics, `podman healthcheck run`, show logs, stop (exit code must be 0), remove.
#      3c. The same with `run --listen 0.0.0.0:9911`: the image's HEALTHCHECK (`carbond healthcheck`) must follow
#      the daemon's own address.
#      With HARDENED=1 (default) a second run mirrors deploy/kubernetes/base/agent/daemonset.yaml: read-only root,
#      all capabilities dropped, no-new-privileges, uid 0, /sys, /proc, /sys/fs/cgroup mounted read-only under
#      /host, a state dir, a 16 MiB tmpfs /tmp, 128 MiB and 0.2 CPU limits, and the ConfigMap's config.yaml
#      (with attribution.kubernetes disabled so that nothing tries to reach an API server).
#   4. Cleanup (trap): the containers this script started (by id), the dangling images its build left, the
#      built image (unless KEEP_IMAGE=1), temp dirs. The base image is kept (REMOVE_BASE=1 removes it).
#
# Settings (environment):
#   IMAGE=localhost/carbond:check   tag of the built image
#   RUNTIME=                        OCI runtime; default: crun, or runc where crun cannot work (see below)
#   MIRROR=                         Debian mirror; default: the one in /etc/apt/sources.list(.d)
#   ULIMITS="--ulimit ..."          default: nofile=<host hard limit>, nproc=4096 (see below)
#   HARDENED=1  KEEP_IMAGE=0  REBUILD_BASE=0  REMOVE_BASE=0  LAYERS=false  READY_TIMEOUT=60
#
# Host-specific findings this script works around (podman 4.3.1, crun 1.8.1):
#   * crun: "cgroups in hybrid mode not supported, drop all controllers from cgroupv2" (cgroup v1 hierarchies
#     plus a cgroup2 mount at /sys/fs/cgroup/unified that still lists the hugetlb controller); --cgroups=disabled
#     does not help. runc (Debian package) works, so it is used (and apt-installed if missing) in that case.
#   * podman's default rlimits (nofile/nproc 1048576/4194304 for root) exceed what the machine lets a process
#     raise: "setrlimit `RLIMIT_NOFILE`: Operation not permitted". Explicit lower --ulimit values fix it.
#   * no systemd: podman logs "unable to get systemd connection to add healthchecks" (no HEALTHCHECK timer), so
#     the periodic check does not run; `podman healthcheck run` works and is what this script uses.
set -Eeuo pipefail

CHECKOUT=${1:-$PWD}
IMAGE=${IMAGE:-localhost/carbond:check}
HARDENED=${HARDENED:-1}
KEEP_IMAGE=${KEEP_IMAGE:-0}
REBUILD_BASE=${REBUILD_BASE:-0}
REMOVE_BASE=${REMOVE_BASE:-0}
LAYERS=${LAYERS:-false}
READY_TIMEOUT=${READY_TIMEOUT:-60}
BASE_REF=python:3.11-slim-bookworm          # what the Dockerfile says; checked below
BASE_LOCAL=localhost/$BASE_REF
BASE_DOCKERIO=docker.io/library/$BASE_REF

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
declare -A TIMES=()
declare -a TIME_ORDER=()
timed_start() { T0=$(now); }
timed_end() { TIMES[$1]=$(awk -v a="$T0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'); TIME_ORDER+=("$1"); log "$1: ${TIMES[$1]}s"; }

# ---------------------------------------------------------------------------------------------------- preflight
[ "$(id -u)" = 0 ] || die "run as root (rootful podman, debootstrap)"
for c in podman debootstrap curl tar awk; do command -v "$c" >/dev/null || die "missing command: $c"; done
[ -f "$CHECKOUT/Dockerfile" ] || die "no Dockerfile in $CHECKOUT"
CHECKOUT=$(cd "$CHECKOUT" && pwd)

# every FROM that is not a stage name must be the base this script knows how to make
mapfile -t FROMS < <(awk 'toupper($1)=="FROM"{for(i=2;i<=NF;i++) if ($i !~ /^--/) {print $i; break}}' "$CHECKOUT/Dockerfile")
STAGES=$(awk 'toupper($1)=="FROM" && toupper($(NF-1))=="AS"{print $NF}' "$CHECKOUT/Dockerfile")
for f in "${FROMS[@]}"; do
  grep -qxF "$f" <<<"$STAGES" && continue
  [ "$f" = "$BASE_REF" ] || [ "$f" = "$BASE_DOCKERIO" ] || die "Dockerfile uses FROM $f; this script only makes $BASE_REF"
done

WORK=$(mktemp -d -t container-check.XXXXXX)
declare -a CONTAINERS=()
RUNTIME=${RUNTIME:-}
T_ALL=$(now)
BUILD_STARTED=0
DANGLING_BEFORE=""

cleanup() {
  local rc=$?
  set +e
  for cid in "${CONTAINERS[@]}"; do     # only the containers started here, by id
    podman ${RUNTIME:+--runtime "$RUNTIME"} rm -f -t 5 "$cid" >/dev/null 2>&1
  done
  if [ "$BUILD_STARTED" = 1 ]; then      # dangling images that appeared during this script's build
    for id in $(podman images -q --no-trunc --filter dangling=true 2>/dev/null); do
      grep -qxF "$id" <<<"$DANGLING_BEFORE" || podman rmi -f "$id" >/dev/null 2>&1
    done
  fi
  if [ "$KEEP_IMAGE" != 1 ] && podman image exists "$IMAGE" 2>/dev/null; then podman rmi -f "$IMAGE" >/dev/null 2>&1; fi
  if [ "$REMOVE_BASE" = 1 ]; then podman rmi -f "$BASE_LOCAL" "$BASE_DOCKERIO" >/dev/null 2>&1; fi
  rm -rf "$WORK"
  if [ "${#TIME_ORDER[@]}" -gt 0 ]; then
    echo "---- timings (s)"
    for k in "${TIME_ORDER[@]}"; do printf '  %-28s %s\n' "$k" "${TIMES[$k]}"; done
  fi
  printf '  %-28s %s\n' total "$(awk -v a="$T_ALL" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')"
  [ "$rc" = 0 ] && echo "RESULT: OK" || echo "RESULT: FAILED (rc=$rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# OCI runtime: crun refuses cgroup v1 "hybrid" hosts whose cgroup2 mount still has controllers
if [ -z "$RUNTIME" ]; then
  RUNTIME=crun
  # (cgroupfs files report size 0, so read the file instead of testing -s)
  if grep -qs '[a-z]' /sys/fs/cgroup/unified/cgroup.controllers; then
    RUNTIME=runc
  fi
fi
if ! command -v "$RUNTIME" >/dev/null; then
  log "installing $RUNTIME with apt-get (crun cannot run containers on this cgroup layout)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$RUNTIME" >"$WORK/apt.log" 2>&1 || { tail "$WORK/apt.log"; die "apt-get install $RUNTIME"; }
fi
P=(podman --runtime "$RUNTIME")

# rlimits this machine allows (podman's defaults are higher than the hard limits here)
ULIMITS=${ULIMITS:-"--ulimit nofile=$(ulimit -Hn):$(ulimit -Hn) --ulimit nproc=4096:4096"}
read -r -a ULIMIT_ARGS <<<"$ULIMITS"

# the Debian mirror apt uses: deb822 .sources first, then one-line sources; the main archive, not security
debian_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN{RS=""; FS="\n"}
         { uri=""; suites=""; types="";
           for(i=1;i<=NF;i++){ if($i ~ /^URIs:/){sub(/^URIs:[ \t]*/,"",$i); split($i,a,/[ \t]+/); uri=a[1]}
                               if($i ~ /^Suites:/) suites=$i; if($i ~ /^Types:/) types=$i }
           if(types ~ /[ \t]deb([ \t]|$)/ && uri !~ /security/ && suites ~ /[ \t](bookworm|stable)([ \t]|$)/){print uri; exit} }' "$f"
  done
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    sed -E 's/\[[^]]*\]//' | awk '$1=="deb" && $2 !~ /security/ && ($3=="bookworm" || $3=="stable"){print $2}' || true
}
MIRROR=${MIRROR:-$(debian_mirror 2>/dev/null | head -n1 || true)}
[ -n "$MIRROR" ] || die "no Debian mirror found in the apt sources; set MIRROR"

# ------------------------------------------------------------------------------------------- 1. local base image
build_base() {
  local rootfs=$WORK/rootfs old
  old=$(podman image inspect --format '{{.Id}}' "$BASE_LOCAL" 2>/dev/null || true)
  log "debootstrap bookworm from $MIRROR"
  timed_start
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
  timed_end debootstrap
  timed_start
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED       # PEP 668 off: pip installs system-wide, as upstream
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"     # upstream has `python`; Debian's pip ships `pip`
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/apt/* \
         "$rootfs"/var/log/*.log "$rootfs"/tmp/* "$rootfs"/root/.cache
  : >"$rootfs/etc/resolv.conf"                               # podman provides it at run time
  chroot "$rootfs" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin sh -c 'python --version && pip --version' >&2
  tar -C "$rootfs" --numeric-owner -cf - . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'LABEL org.opencontainers.image.description=local-debootstrap-stand-in-for-python:3.11-slim-bookworm' \
    --change 'CMD ["python3"]' - "$BASE_LOCAL" >/dev/null
  podman tag "$BASE_LOCAL" "$BASE_DOCKERIO"
  # a remade base leaves the previous one untagged: remove it (refused, harmlessly, if something still uses it)
  if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "$BASE_LOCAL")" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true
  fi
  rm -rf "$rootfs"
  timed_end base_import
}
if [ "$REBUILD_BASE" = 1 ] || ! podman image exists "$BASE_LOCAL"; then
  build_base
else
  log "base image $BASE_LOCAL exists; reusing it (REBUILD_BASE=1 to remake)"
  podman image exists "$BASE_DOCKERIO" || podman tag "$BASE_LOCAL" "$BASE_DOCKERIO"
fi

# ----------------------------------------------------------------------------------------------- 2. image build
BUILD_MOUNTS=()
CA=/etc/ssl/certs/ca-certificates.crt
[ -f "$CA" ] && BUILD_MOUNTS+=(-v "$CA:$CA:ro")
INDEX_URL=${PIP_INDEX_URL:-$(pip config get global.index-url 2>/dev/null || true)}
if [[ "$INDEX_URL" =~ ^https?:// ]]; then
  printf '[global]\nindex-url = %s\n' "$INDEX_URL" >"$WORK/pip.conf"
  BUILD_MOUNTS+=(-v "$WORK/pip.conf:/etc/pip.conf:ro")
  log "pip index for the build: $INDEX_URL"
fi
DANGLING_BEFORE=$(podman images -q --no-trunc --filter dangling=true)
BUILD_STARTED=1
log "building $IMAGE from $CHECKOUT (runtime $RUNTIME)"
timed_start
"${P[@]}" build --format docker --pull=never --network host --layers="$LAYERS" "${ULIMIT_ARGS[@]}" \
  "${BUILD_MOUNTS[@]}" -t "$IMAGE" "$CHECKOUT" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; die "podman build"; }
timed_end image_build
grep -E '^\[[0-9]+/[0-9]+\] STEP|level=(warning|error)' "$WORK/build.log" >&2 || true
SIZE=$(podman image inspect "$IMAGE" --format '{{.Size}}')
HC=$(podman image inspect "$IMAGE" --format '{{json .HealthCheck}}')
log "image $IMAGE: $((SIZE / 1000000)) MB ($SIZE bytes); HEALTHCHECK: $HC"
[ "$HC" != null ] || die "HEALTHCHECK missing from the image"

# -------------------------------------------------------------------------------------------------- 3. run it
free_port() {   # a localhost port nothing listens on
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 40000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
  die "no free port"
}

wait_200() {   # $1 port, $2 path: waits up to READY_TIMEOUT for HTTP 200
  local i code
  for ((i = 0; i < READY_TIMEOUT * 2; i++)); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1$2" || true)
    [ "$code" = 200 ] && return 0
    sleep 0.5
  done
  log "GET $2 last answered ${code:-nothing}"
  return 1
}

probe() {   # $1 label, $2 container id, $3 port
  local label=$1 cid=$2 port=$3 body n
  fail() { podman logs "$cid" 2>&1 | sed 's/^/    /' >&2 || true; die "$label: $*"; }
  wait_200 "$port" /healthz || fail "/healthz not 200 within ${READY_TIMEOUT}s"
  timed_end "${label}_start_to_healthz"
  body=$(curl -sf --max-time 5 "http://127.0.0.1:$port/healthz") || fail "/healthz"
  log "$label: GET /healthz -> 200 '$body'"
  # /readyz (and /metrics) answer 503 until the first measurement is published
  wait_200 "$port" /readyz || fail "/readyz not 200 within ${READY_TIMEOUT}s"
  timed_end "${label}_start_to_readyz"
  log "$label: GET /readyz -> 200"
  curl -sf --max-time 10 "http://127.0.0.1:$port/metrics" >"$WORK/$label.metrics" || fail "/metrics"
  n=$(grep -c '^carbond_' "$WORK/$label.metrics" || true)
  [ "$n" -gt 0 ] || fail "/metrics has no carbond_ samples"
  log "$label: GET /metrics -> 200, $n carbond_ samples, e.g. $(grep -m1 '^carbond_node_power_watts' "$WORK/$label.metrics" || true)"
  "${P[@]}" healthcheck run "$cid" >/dev/null 2>&1 || fail "podman healthcheck run failed (image HEALTHCHECK)"
  log "$label: podman healthcheck run -> healthy"
}

stop_and_remove() {   # $1 label, $2 container id
  local label=$1 cid=$2 code
  timed_start
  "${P[@]}" stop -t 15 "$cid" >/dev/null 2>&1 || die "$label: stop"
  timed_end "${label}_stop"
  code=$(podman inspect "$cid" --format '{{.State.ExitCode}}')
  log "$label: logs:"; podman logs "$cid" 2>&1 | sed 's/^/    /' >&2
  "${P[@]}" rm "$cid" >/dev/null 2>&1 || true
  [ "$code" = 0 ] || die "$label: exit code $code after SIGTERM"
  log "$label: stopped, exit code 0, removed"
}

RUN_COMMON=(--pull=never "${ULIMIT_ARGS[@]}" --health-interval=disable)   # no systemd timer here anyway

# 3a. the image as built: default ENTRYPOINT/CMD, 9875 published on a free localhost port
PORT=$(free_port)
timed_start
CID=$("${P[@]}" run -d "${RUN_COMMON[@]}" --name "carbond-check-$$-default" -p "127.0.0.1:$PORT:9875" "$IMAGE" \
      2>"$WORK/run.err") || { cat "$WORK/run.err" >&2; die "podman run (default)"; }
CONTAINERS+=("$CID")
log "default: container ${CID:0:12} on 127.0.0.1:$PORT"
probe default "$CID" "$PORT"
stop_and_remove default "$CID"

# 3c. a moved listen address: the HEALTHCHECK must follow it (it asks the address of the carbond of PID 1)
PORT=$(free_port)
timed_start
CID=$("${P[@]}" run -d "${RUN_COMMON[@]}" --name "carbond-check-$$-moved" -p "127.0.0.1:$PORT:9911" "$IMAGE" \
      run --config /etc/carbond/config.yaml --listen 0.0.0.0:9911 --log-format json 2>"$WORK/run.err") \
  || { cat "$WORK/run.err" >&2; die "podman run (moved port)"; }
CONTAINERS+=("$CID")
log "moved: container ${CID:0:12} listening on 9911, on 127.0.0.1:$PORT"
probe moved "$CID" "$PORT"
stop_and_remove moved "$CID"

# 3b. like deploy/kubernetes/base/agent/daemonset.yaml
if [ "$HARDENED" = 1 ]; then
  mkdir -p "$WORK/config" "$WORK/state"
  # the DaemonSet's config (generated into its hash-named ConfigMap); no API server here, so no pod names
  sed -E '/^[ ]*kubernetes:/,/^[^ ]/ s/(enabled:[ ]*)true/\1false/' \
    "$CHECKOUT/deploy/kubernetes/base/agent/config.yaml" >"$WORK/config/config.yaml"
  PORT=$(free_port)
  timed_start
  CID=$("${P[@]}" run -d "${RUN_COMMON[@]}" --name "carbond-check-$$-hardened" -p "127.0.0.1:$PORT:9875" \
        --read-only --read-only-tmpfs=false --tmpfs /tmp:rw,size=16m \
        --cap-drop ALL --security-opt no-new-privileges --user 0 --memory 128m --cpus 0.2 \
        -e NODE_NAME="$(hostname)" \
        -v "$WORK/config:/etc/carbond:ro" -v /sys:/host/sys:ro -v /proc:/host/proc:ro \
        -v /sys/fs/cgroup:/host/sys/fs/cgroup:ro -v "$WORK/state:/var/lib/carbond" \
        "$IMAGE" run --config /etc/carbond/config.yaml --log-format json 2>"$WORK/run.err") \
    || { cat "$WORK/run.err" >&2; die "podman run (hardened)"; }
  CONTAINERS+=("$CID")
  log "hardened: container ${CID:0:12} on 127.0.0.1:$PORT"
  probe hardened "$CID" "$PORT"
  podman exec "$CID" sh -c 'grep -E "^(CapEff|NoNewPrivs)" /proc/1/status; touch /probe 2>&1; touch /host/sys/probe 2>&1' \
    2>&1 | sed 's/^/    hardened: /' >&2 || true
  sleep 1
  ls "$WORK/state" | sed 's/^/    hardened: state dir has /' >&2
  stop_and_remove hardened "$CID"
fi
log "all checks passed"
