# Shared helpers for the scripts in this folder. Source it; don't run it.

# The Debian packages a build of this workspace needs: a C compiler for the
# bundled SQLite, pkg-config for -sys crates, the PC/SC client library, and
# libudev and libusb for the fixtures (serialport, rusb: without
# libusb-1.0-0-dev rusb quietly builds its own copy of libusb).
BUILD_PACKAGES=(build-essential pkg-config libpcsclite-dev libudev-dev libusb-1.0-0-dev)

# What the tests need on top: a headless browser that renders the batch
# report's HTML (station/tests/report.rs), promtool (Debian's prometheus
# package) that checks the metrics exposition, the Grafana dashboard's
# queries and the scrape config (station/tests/metrics.rs), and tmux, in
# which the real dashboard runs and is read back (station/tests/dash_tmux.rs),
# systemd-analyze that verifies the shipped unit (station/tests/daemon.rs),
# gdb, whose gcore dumps a running station for the secrets canary search
# (station/tests/secrets.rs), and socat, which makes the pty pairs the serial
# fixture tests talk over (tests/tests/fixture_serial.rs), and GNU time,
# which measures the peak memory of the station on hostile configuration
# files (station/tests/hostile_config.rs; prlimit is util-linux, always there).
TEST_PACKAGES=(chromium prometheus tmux systemd gdb socat time)

# as_root CMD...: runs CMD as root (sudo when not root).
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# need_packages PKG...: installs the Debian packages that are missing.
need_packages() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

# need_postgres: a PostgreSQL server for the fleet tests
# (station/tests/fleet.rs) at 127.0.0.1:5432 that user postgres reaches
# without a password, unless TAPLINE_TEST_PG names another. When nothing
# answers there, installs Debian's postgresql, lets loopback TCP in with
# trust (a test machine only) and starts the cluster.
need_postgres() {
  [ -n "${TAPLINE_TEST_PG:-}" ] && return 0
  need_packages postgresql-client
  pg_isready -q -h 127.0.0.1 -p 5432 && return 0
  need_packages postgresql
  local v hba
  v=$(ls /etc/postgresql | sort -n | tail -n 1)
  hba=/etc/postgresql/$v/main/pg_hba.conf
  as_root grep -q '^host all all 127.0.0.1/32 trust' "$hba" || as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
  as_root pg_ctlcluster "$v" main start 2>/dev/null || as_root pg_ctlcluster "$v" main reload
  for _ in $(seq 30); do
    pg_isready -q -h 127.0.0.1 -p 5432 && return 0
    sleep 1
  done
  echo "PostgreSQL does not answer on 127.0.0.1:5432 (cluster $v)" >&2
  exit 1
}

# need_rust: the workspace needs Rust 1.89 or newer (edition 2024).
need_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "Rust is not installed: install a toolchain of 1.89 or newer (https://rustup.rs), then run this again." >&2
    exit 1
  fi
}
