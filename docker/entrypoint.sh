#!/bin/sh
# The harness image's entry point: the first argument picks what the container is.
#
#   controller [ARGS]  the panel and the agents' hub: harness serve --host $HARNESS_HOST --port $HARNESS_PORT
#                      (needs HARNESS_TOKEN: it listens beyond loopback, and agents authenticate with it)
#   agent [ARGS]       a remote load generator: harness agent --controller $HARNESS_CONTROLLER
#                      (HARNESS_TOKEN, HARNESS_AGENT_NAME, HARNESS_AGENT_LABELS, HARNESS_AGENT_PROCESSES)
#   start ARGS         one run: harness start ARGS (e.g. --profile P --headless --host 0.0.0.0)
#   help               this text and harness --help
#   anything else      a program on PATH (sh, python, aca-py, ...) runs as given; otherwise it is a
#                      harness command: `runs`, `show RUN`, `report RUN`, `--version`, ...
#
# Tokens come from the environment only, never from this command line (`ps` and `docker inspect`
# would show them). Explicit ARGS come after the ones made from the environment, so they win.
# Each role records itself (role, pid, port, host) in $HARNESS_STATE_DIR/role for harness-healthcheck.
set -eu

PLACEHOLDER_TOKEN="REPLACE_WITH_A_RANDOM_TOKEN"

die() {
    echo "harness-entrypoint: $*" >&2
    exit 2
}

usage() {
    cat <<'EOF'
usage: docker run IMAGE controller | agent | start ARGS | help | COMMAND [ARGS]
  controller  the panel + agent hub on $HARNESS_HOST:$HARNESS_PORT (default 0.0.0.0:8089); needs HARNESS_TOKEN
  agent       join $HARNESS_CONTROLLER (e.g. http://controller:8089) with HARNESS_TOKEN;
              optional HARNESS_AGENT_NAME, HARNESS_AGENT_LABELS (a,b), HARNESS_AGENT_PROCESSES
  start ARGS  harness start ARGS, e.g. start --profile demo --headless
  COMMAND     a program on PATH, else a harness command (runs, show RUN, report RUN, --version)
database: $HARNESS_DB (default /data/harness.db on the /data volume)
EOF
}

wants_help() {
    for arg in "$@"; do
        case "$arg" in
            -h | --help) return 0 ;;
        esac
    done
    return 1
}

has_option() {
    option="$1"
    shift
    for arg in "$@"; do
        case "$arg" in
            "$option" | "$option"=*) return 0 ;;
        esac
    done
    return 1
}

check_token() {
    if [ -z "${HARNESS_TOKEN:-}" ]; then
        die "$1: HARNESS_TOKEN is not set: $2"
    fi
    if [ "$HARNESS_TOKEN" = "$PLACEHOLDER_TOKEN" ]; then
        die "$1: HARNESS_TOKEN is still the placeholder $PLACEHOLDER_TOKEN: set a random one (openssl rand -hex 32)"
    fi
}

record() {
    # role, pid (exec keeps it: the pid of harness itself), port, host; best effort
    state_dir="${HARNESS_STATE_DIR:-/tmp/harness-container}"
    if mkdir -p "$state_dir" 2>/dev/null; then
        printf '%s\n%s\n%s\n%s\n' "$1" "$$" "${2:-}" "${3:-}" >"$state_dir/role" 2>/dev/null || true
    fi
}

# an image built with ACAPY=1 has its ACA-Py (Python 3.13 venv) here; the simulators find it by this
if [ -z "${HARNESS_ACAPY_BIN:-}" ] && [ -x /opt/acapy/bin/aca-py ]; then
    HARNESS_ACAPY_BIN=/opt/acapy/bin/aca-py
    export HARNESS_ACAPY_BIN
fi

role="${1:-help}"
if [ $# -gt 0 ]; then
    shift
fi
host="${HARNESS_HOST:-0.0.0.0}"
port="${HARNESS_PORT:-8089}"

case "$role" in
    controller)
        if wants_help "$@"; then
            exec python -m harness serve "$@"
        fi
        if ! has_option --token "$@"; then
            check_token controller "the panel listens on $host and agents authenticate with it (openssl rand -hex 32)"
        fi
        record controller "$port" "$host"
        exec python -m harness serve --host "$host" --port "$port" "$@"
        ;;
    agent)
        if wants_help "$@"; then
            exec python -m harness agent "$@"
        fi
        if [ -n "${HARNESS_AGENT_PROCESSES:-}" ]; then
            set -- --processes "$HARNESS_AGENT_PROCESSES" "$@"
        fi
        if [ -n "${HARNESS_AGENT_LABELS:-}" ]; then
            set -- --labels "$HARNESS_AGENT_LABELS" "$@"
        fi
        if [ -n "${HARNESS_AGENT_NAME:-}" ]; then
            set -- --name "$HARNESS_AGENT_NAME" "$@"
        fi
        if [ -n "${HARNESS_CONTROLLER:-}" ]; then
            set -- --controller "$HARNESS_CONTROLLER" "$@"
        elif ! has_option --controller "$@"; then
            die "agent: HARNESS_CONTROLLER is not set (e.g. http://controller:8089) and no --controller URL given"
        fi
        if ! has_option --token "$@"; then
            check_token agent "the controller refuses agents without its token"
        fi
        record agent "" ""
        exec python -m harness agent "$@"
        ;;
    start)
        if ! wants_help "$@"; then
            record start "" ""
        fi
        exec python -m harness start "$@"
        ;;
    help)
        usage
        echo
        exec python -m harness --help
        ;;
    -*)
        exec python -m harness "$role" "$@"
        ;;
    *)
        if command -v "$role" >/dev/null 2>&1; then
            exec "$role" "$@"
        fi
        exec python -m harness "$role" "$@"
        ;;
esac
