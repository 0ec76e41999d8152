# Sourced by scripts/run and scripts/test: where the installed servers are.
CACHE="${TASKPODS_CACHE:-$HOME/.cache/taskpods}"
NATS_CURRENT_VERSION="${NATS_CURRENT_VERSION:-v2.12.15}"
NATS_OLDEST_BIN="$(command -v nats-server || echo /usr/sbin/nats-server)"
NATS_CURRENT_BIN="$CACHE/bin/nats-$NATS_CURRENT_VERSION/nats-server"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
