# The Docker engine and the image for the container tests (tests/compose/run, tests/swarm/run),
# sourced with TAG set: install the engine and compose if missing, start dockerd if it is not
# running (stopped again, and what it left in iptables and docker0 removed, at exit), and build
# vphone:test without a registry. A script that sources this may add its own clean-up to
# EXTRA_CLEANUP (a function name), run first.
#
# Environment: VPHONE_BASE (base image; default: python:3.11-slim-bookworm if it can be pulled,
# else a Debian base made with debootstrap), KEEP_DOCKER=1 (leave a dockerd this started
# running, with its images, for a faster next run).
log() { echo "${TAG:-engine}: $*" >&2; }
started=$(date +%s)
work=$(mktemp -d /tmp/vphone-engine.XXXXXX)

# ---------------------------------------------------------------- the engine
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v iptables >/dev/null || need+=(iptables)
command -v nsenter >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { log "need root to install ${need[*]}"; exit 1; }
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's CLI (the preinstalled /usr/local/bin/docker has no buildx: see ENVIRONMENT.md).
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=$(command -v docker)
export DOCKER

dockerd_pid=""
iptables_before="$work/iptables.before"
cleanup() {
    status=$?
    if [ -n "${EXTRA_CLEANUP:-}" ]; then "$EXTRA_CLEANUP" || true; fi
    if [ -n "$dockerd_pid" ] && [ "${KEEP_DOCKER:-}" != 1 ]; then
        log "stopping the dockerd this script started (pid $dockerd_pid)"
        kill "$dockerd_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$dockerd_pid" 2>/dev/null || true
        pkill -f "containerd --config /var/run/docker/containerd" 2>/dev/null || true
        # What dockerd leaves behind: its iptables chains and FORWARD policy, and docker0.
        if [ -s "$iptables_before" ]; then
            iptables-restore < "$iptables_before" 2>/dev/null || log "could not restore iptables"
        fi
        ip link delete docker0 2>/dev/null || true
        ip link delete docker_gwbridge 2>/dev/null || true  # a swarm's (tests/swarm)
    fi
    rm -rf "$work"
    log "done in $(( $(date +%s) - started )) s"
    exit $status
}
trap cleanup EXIT INT TERM

if ! "$DOCKER" info >/dev/null 2>&1; then
    iptables-save > "$iptables_before" 2>/dev/null || true
    log "starting dockerd"
    dockerd --storage-driver=overlay2 >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 100); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.2; done
    "$DOCKER" info >/dev/null 2>&1 || { log "dockerd did not start:"; tail -20 "$work/dockerd.log" >&2; exit 1; }
fi

# ---------------------------------------------------------------- the images
base=${VPHONE_BASE:-}
if [ -z "$base" ]; then
    if "$DOCKER" image inspect python:3.11-slim-bookworm >/dev/null 2>&1 \
        || timeout 30 "$DOCKER" pull -q python:3.11-slim-bookworm >/dev/null 2>&1; then
        base=python:3.11-slim-bookworm
    else
        log "no registry: building a Debian base with debootstrap"
        DOCKER="$DOCKER" docker/base-image vphone-base:bookworm
        base=vphone-base:bookworm
    fi
fi
log "wheels for an offline build"
.venv/bin/python -m pip wheel -q -w docker/wheels . 2>&1 | grep -v '^WARNING: Location' >&2 || true
log "building vphone:test on $base"
DOCKER_BUILDKIT=0 "$DOCKER" build -q --build-arg BASE="$base" -t vphone:test . >/dev/null
log "images ready after $(( $(date +%s) - started )) s"

