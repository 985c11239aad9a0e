# Sourced by the other scripts: make sure the system packages floodwall needs
# are present. As root with apt-get, missing ones are installed (after one
# `apt-get update`); otherwise the script stops with one line saying what to
# install.
#   cmake        - Pingora's zlib-ng build
#   make         - the jemalloc allocator's build (tikv-jemalloc-sys)
#   redis-server - the tests start private Redis servers
floodwall_need() {
  local missing=() cmd pkg
  for pair in "$@"; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} ..." >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || {
      echo "error: could not install ${missing[*]}; install them with: apt-get install -y ${missing[*]}" >&2; exit 1; }
  else
    echo "error: floodwall needs ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
}
