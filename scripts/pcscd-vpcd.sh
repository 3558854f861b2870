#!/usr/bin/env bash
# A private pcscd with vpcd virtual readers, for emulated cards behind a real
# PC/SC stack (`rig vpcd` connects the cards; docs/real-readers.md).
#
#   scripts/pcscd-vpcd.sh start N [PORT_BASE]   N readers (1..16), ports from PORT_BASE (35963)
#   scripts/pcscd-vpcd.sh stop                  stops the pcscd this script started
#   scripts/pcscd-vpcd.sh status                running or not, and its readers
#
# What it does, without touching /etc:
# - installs what is missing: pcscd, vsmartcard-vpcd, pcsc-tools (pcsc_scan,
#   scriptor) and opensc (opensc-tool), for the peer-client tests, and
#   vsmartcard-vpicc (vicc) with python3-pycryptodome, the foreign card of
#   tests/tests/pcsc_faults.rs;
# - writes its own reader configuration folder (pcscd -c DIR) with one vpcd
#   entry per pair of readers: a vpcd entry always gives 2 readers (slots), on
#   TCP ports P and P+1, where entry i has P = PORT_BASE + 2*i. An odd N is
#   rounded up to the next pair. Each entry gets its own copy of
#   libifdvpcd.so (the driver keeps its connections in a global table
#   indexed by slot: two entries sharing one file break), and the copies live
#   outside the configuration folder (pcscd reads every file there as reader
#   configuration);
# - pcsc-lite 1.9.9 caps one pcscd at 16 readers (silently: a 9th entry gives
#   no reader and no log line), so N > 16 is refused;
# - only one pcscd can own the PC/SC socket /run/pcscd/pcscd.comm: a pcscd
#   that already owns it (the system's, started by systemd socket activation
#   or by hand) is STOPPED first (systemctl stop pcscd.socket pcscd.service
#   where systemd runs, then the owning process by its pid). Restart the
#   system's afterwards if you need it (systemctl start pcscd.socket).
#   Exception, the private mode: when PCSCLITE_CSOCK_NAME (pcsc-lite's own
#   client variable for the socket path) names another path ending in
#   /pcscd.comm, pcscd runs in a mount namespace of its own whose
#   /run/pcscd is that path's folder (unshare; needs root): it conflicts with
#   no other pcscd, and every PC/SC client started with the same
#   PCSCLITE_CSOCK_NAME (scriptor, opensc-tool, pcsc_scan, the station, the
#   tests) talks to it. Use it when the machine's pcscd must keep running;
# - starts `pcscd --foreground -c CONFDIR` in the background, its log in
#   $DIR/pcscd.log and its pid in $DIR/pcscd.pid, waits until pcsc_scan -r
#   lists the readers, and prints each reader's name and port.
#
# PC/SC reader names: the entry of port P gives "Tapline vpcd P 00 00"
# (port P) and "Tapline vpcd P 00 01" (port P+1).
#
# vpcd listens on all interfaces (it binds INADDR_ANY); emulated cards
# connect to 127.0.0.1 only.
#
# Environment: TAPLINE_PCSCD_DIR (default ${XDG_RUNTIME_DIR:-/tmp}/tapline-pcscd)
# holds conf/, drivers/, pcscd.log, pcscd.pid and the running setup's state.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

MAX_READERS=16
DEFAULT_PORT_BASE=35963
SYSTEM_SOCKET=/run/pcscd/pcscd.comm
DIR=${TAPLINE_PCSCD_DIR:-${XDG_RUNTIME_DIR:-/tmp}/tapline-pcscd}
CONF=$DIR/conf
DRIVERS=$DIR/drivers
LOG=$DIR/pcscd.log
PIDFILE=$DIR/pcscd.pid
STATE=$DIR/state

usage() {
  sed -n '5,7p' "$0" | sed 's/^# //' >&2
  exit 2
}

die() {
  echo "pcscd-vpcd: $*" >&2
  exit 1
}

# alive PID: the process runs (a zombie waiting for its parent does not).
alive() {
  local state
  state=$(sed -n 's/^[0-9]* (.*) \([A-Z]\) .*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# The pid of the pcscd this script started, if it still runs.
our_pid() {
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid=$(cat "$PIDFILE")
  [ -n "$pid" ] && alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = pcscd ] || return 1
  echo "$pid"
}

# The socket clients use: PCSCLITE_CSOCK_NAME, else the system's.
socket_path() {
  echo "${PCSCLITE_CSOCK_NAME:-$SYSTEM_SOCKET}"
}

private_mode() {
  [ "$(socket_path)" != "$SYSTEM_SOCKET" ]
}

# The readers pcscd lists, one name a line.
list_readers() {
  PCSCLITE_CSOCK_NAME=$(socket_path) pcsc_scan -r 2>/dev/null | sed -n 's/^[0-9]*: //p' || true
}

# Stops every pcscd that would own the same socket as ours: the systemd
# units where systemd runs, then any pcscd in this mount namespace (which
# sees the same /run/pcscd). Private pcscds in other namespaces are left alone.
stop_conflicting() {
  local ours=${1:-}
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    if systemctl is-active --quiet pcscd.socket 2>/dev/null || systemctl is-active --quiet pcscd.service 2>/dev/null; then
      echo "stopping the system's pcscd (systemctl stop pcscd.socket pcscd.service)" >&2
      as_root systemctl stop pcscd.socket pcscd.service || true
    fi
  fi
  local self_ns pid
  self_ns=$(as_root readlink /proc/self/ns/mnt)
  for pid in $(pgrep -x pcscd || true); do
    [ "$pid" = "$ours" ] && continue
    [ "$(as_root readlink "/proc/$pid/ns/mnt" 2>/dev/null || true)" = "$self_ns" ] || continue
    echo "stopping pcscd pid $pid: only one pcscd can own $SYSTEM_SOCKET" >&2
    stop_pid "$pid"
  done
}

# stop_pid PID: SIGTERM, up to 10 s (pcscd takes 1-3 s to close its
# readers), then SIGKILL.
stop_pid() {
  local pid=$1
  as_root kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do
    alive "$pid" || return 0
    sleep 0.1
  done
  echo "pcscd pid $pid ignored SIGTERM for 10 s: killing it" >&2
  as_root kill -9 "$pid" 2>/dev/null || true
}

# Prints each Tapline vpcd reader pcscd lists with the TCP port it serves:
# "Tapline vpcd P 00 0S" is slot S of the entry of port P, on port P + S.
print_readers() {
  local name p s
  while IFS= read -r name; do
    if [[ "$name" =~ ^Tapline\ vpcd\ ([0-9]+)\ [0-9A-F]{2}\ ([0-9A-F]{2})$ ]]; then
      p=${BASH_REMATCH[1]}
      s=$((16#${BASH_REMATCH[2]}))
      printf '%-28s port %d\n' "$name" "$((p + s))"
    fi
  done < <(list_readers)
}

start() {
  local n=${1:-} base=${2:-$DEFAULT_PORT_BASE}
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] || usage
  [[ "$base" =~ ^[0-9]+$ ]] || usage
  if [ "$n" -gt "$MAX_READERS" ]; then
    die "$n readers asked: pcsc-lite 1.9.9 caps one pcscd at $MAX_READERS readers (more are silently dropped); run fewer"
  fi
  local entries=$(((n + 1) / 2))
  local readers=$((2 * entries))
  if [ "$base" -lt 1024 ] || [ $((base + readers - 1)) -gt 65535 ]; then
    die "port base $base: ports $base..$((base + readers - 1)) must lie in 1024..65535"
  fi
  local socket want
  socket=$(socket_path)
  want="readers=$readers port_base=$base socket=$socket"

  local pid
  if pid=$(our_pid); then
    if [ "$(cat "$STATE" 2>/dev/null)" = "$want" ] && [ "$(list_readers | grep -c '^Tapline vpcd ')" -eq "$readers" ]; then
      echo "pcscd already running (pid $pid) with $readers vpcd readers:"
      print_readers
      return 0
    fi
    echo "restarting our pcscd (pid $pid) with a new setup" >&2
    stop_pid "$pid"
  fi

  need_packages pcscd vsmartcard-vpcd pcsc-tools opensc vsmartcard-vpicc python3-pycryptodome
  local driver
  driver=$(readlink -f /usr/lib/pcsc/drivers/serial/libifdvpcd.so 2>/dev/null || true)
  [ -f "$driver" ] || driver=$(dpkg -L vsmartcard-vpcd | grep '/libifdvpcd\.so' | head -n1)
  [ -f "$driver" ] || die "libifdvpcd.so not found (package vsmartcard-vpcd)"

  if private_mode; then
    [ "$(basename "$socket")" = pcscd.comm ] || die "PCSCLITE_CSOCK_NAME=$socket: the private mode needs a path ending in /pcscd.comm"
    command -v unshare >/dev/null || die "the private mode (PCSCLITE_CSOCK_NAME=$socket) needs unshare (util-linux)"
    if [ -S "$socket" ] && PCSCLITE_CSOCK_NAME=$socket pcsc_scan -r >/dev/null 2>&1; then
      die "another pcscd already serves $socket"
    fi
  else
    stop_conflicting ""
  fi

  local p
  for ((p = base; p < base + readers; p++)); do
    if [ -n "$(ss -Hltn "sport = :$p" 2>/dev/null)" ]; then
      die "TCP port $p is already taken (another pcscd with vpcd readers?): choose another PORT_BASE"
    fi
  done

  mkdir -p "$DIR"
  rm -rf "$CONF" "$DRIVERS"
  mkdir -p "$CONF" "$DRIVERS"
  local i
  for ((i = 0; i < entries; i++)); do
    p=$((base + 2 * i))
    mkdir -p "$DRIVERS/$p"
    cp "$driver" "$DRIVERS/$p/libifdvpcd.so"
    cat >>"$CONF/tapline-vpcd" <<EOF
FRIENDLYNAME "Tapline vpcd $p"
DEVICENAME   /dev/null:$p
LIBPATH      $DRIVERS/$p/libifdvpcd.so
CHANNELID    $p

EOF
  done

  : >"$LOG"
  rm -f "$PIDFILE"
  # sudo must not ask for a password from the background job below.
  [ "$(id -u)" -eq 0 ] || sudo -v
  if private_mode; then
    local sockdir
    sockdir=$(dirname "$socket")
    mkdir -p "$sockdir"
    rm -f "$socket"
    # The bind mount is private to pcscd's namespace: it sees $sockdir as
    # /run/pcscd and creates its socket and pid file there.
    as_root unshare --mount --propagation private sh -c \
      'mkdir -p /run/pcscd && mount --bind "$1" /run/pcscd && echo $$ >"$2" && exec pcscd --foreground -c "$3"' \
      sh "$sockdir" "$PIDFILE" "$CONF" >>"$LOG" 2>&1 </dev/null &
  else
    as_root sh -c 'echo $$ >"$1" && exec pcscd --foreground -c "$2"' sh "$PIDFILE" "$CONF" >>"$LOG" 2>&1 </dev/null &
  fi
  disown || true

  local seen=0
  for _ in $(seq 150); do
    sleep 0.1
    if [ -f "$PIDFILE" ] && ! our_pid >/dev/null; then
      tail -n 20 "$LOG" >&2
      die "pcscd exited at start (log above, all of it in $LOG)"
    fi
    seen=$(list_readers | grep -c '^Tapline vpcd ' || true)
    [ "$seen" -ge "$readers" ] && break
  done
  if [ "$seen" -lt "$readers" ]; then
    tail -n 20 "$LOG" >&2
    [ -n "$(our_pid || true)" ] && stop_pid "$(our_pid)"
    die "pcscd lists $seen of $readers Tapline vpcd readers after 15 s (log: $LOG); stopped it"
  fi
  echo "$want" >"$STATE"
  echo "pcscd running (pid $(our_pid)), socket $socket, log $LOG; $readers vpcd readers:"
  print_readers
  if private_mode; then
    echo "PC/SC clients need: export PCSCLITE_CSOCK_NAME=$socket"
  fi
}

stop() {
  local pid
  if pid=$(our_pid); then
    stop_pid "$pid"
    echo "pcscd (pid $pid) stopped"
  else
    echo "no pcscd of ours is running"
  fi
  rm -f "$PIDFILE" "$STATE"
}

status() {
  local pid
  if pid=$(our_pid); then
    echo "pcscd running (pid $pid): $(cat "$STATE" 2>/dev/null || echo 'setup unknown'), log $LOG"
    local socket
    socket=$(sed -n 's/.*socket=//p' "$STATE" 2>/dev/null)
    PCSCLITE_CSOCK_NAME=${socket:-$(socket_path)} print_readers
  else
    echo "no pcscd of ours is running"
    return 3
  fi
}

case "${1:-}" in
  start)
    shift
    start "$@"
    ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
