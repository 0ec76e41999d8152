# Sourced by scripts/run and scripts/test: where the installed servers are.
CACHE="${TASKPODS_CACHE:-$HOME/.cache/taskpods}"
NATS_CURRENT_VERSION="${NATS_CURRENT_VERSION:-v2.12.15}"
NATS_OLDEST_BIN="$(command -v nats-server || echo /usr/sbin/nats-server)"
NATS_CURRENT_BIN="$CACHE/bin/nats-$NATS_CURRENT_VERSION/nats-server"
# Clusters need nats-server 2.9.21 or newer (older ones let two writes expecting the same last subject
# sequence both succeed on a replicated stream, nats-server #4320). The test harness's NatsCluster runs this
# one (the last 2.9 release, built by scripts/install-test-deps) whenever NATS_SERVER_BIN is older.
NATS_CLUSTER_OLDEST_VERSION="${NATS_CLUSTER_OLDEST_VERSION:-v2.9.25}"
export NATS_CLUSTER_SERVER_BIN="${NATS_CLUSTER_SERVER_BIN:-$CACHE/bin/nats-$NATS_CLUSTER_OLDEST_VERSION/nats-server}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
