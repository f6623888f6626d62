#!/usr/bin/env bash
# Installs and starts what fastworker's tests and demo need, on Debian 12 as root. Idempotent:
# apt runs only when a package is missing, services start only when their port is silent, and the
# venv is (re)installed only when it is missing, broken, or the build inputs changed.
#
#   bash scripts/setup-deps.sh            # FASTWORKER_FORCE_INSTALL=1 forces the pip install
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
    php8.2-fpm php8.2-cli php-amqplib php-symfony-event-dispatcher
    rabbitmq-server redis-server ruby-sidekiq
    python3 python3-venv python3-dev gcc
    nginx-light wrk
    chromium chromium-driver
)

log() { printf 'setup-deps: %s\n' "$*" >&2; }

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

port_open() {  # host port
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

wait_port() {  # host port seconds what
    local deadline=$((SECONDS + $3))
    until port_open "$1" "$2"; do
        if ((SECONDS >= deadline)); then
            log "$4 did not come up on $1:$2 within $3 s"
            return 1
        fi
        sleep 0.5
    done
}

# --- Debian packages ---------------------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "missing packages (${missing[*]}) and not root: install them or run as root"
        exit 1
    fi
    log "installing: ${missing[*]}"
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
else
    log "Debian packages present"
fi

# --- RabbitMQ (loopback only when we start it) -------------------------------------------------
if port_open 127.0.0.1 5672; then
    log "RabbitMQ answers on 127.0.0.1:5672"
else
    log "starting RabbitMQ on 127.0.0.1:5672"
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        rabbitmq-server -detached </dev/null >>/tmp/fastworker-rabbitmq-start.log 2>&1
    wait_port 127.0.0.1 5672 60 RabbitMQ || {
        tail -n 40 /tmp/fastworker-rabbitmq-start.log /var/log/rabbitmq/*.log >&2 2>/dev/null || true
        exit 1
    }
    # The listener opens late in boot; this makes sure the node finished starting.
    timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true
fi

# --- Redis ------------------------------------------------------------------------------------
if port_open 127.0.0.1 6379; then
    log "Redis answers on 127.0.0.1:6379"
else
    log "starting Redis on 127.0.0.1:6379"
    # Daemons get no stdio of ours: a CI runner reading our output must see it end.
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        </dev/null >/dev/null 2>&1
    wait_port 127.0.0.1 6379 15 Redis
fi

# --- Python venv with fastworker (builds the Cython extension) ---------------------------------
PYTHON=$(command -v python3 || echo /usr/bin/python3)
if [[ -x .venv/bin/python ]] && ! .venv/bin/python -c 'import sys' >/dev/null 2>&1; then
    log "removing a broken .venv"
    rm -rf .venv
fi
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv with $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv .venv
fi

# Reinstall when what the build reads changed (the .pyx must be recompiled), or imports fail.
stamp_file=.venv/.fastworker-install-stamp
stamp=$({ cat pyproject.toml setup.py src/fastworker/*.pyx src/fastworker/*.pxd \
    2>/dev/null || true; } | sha256sum | cut -d' ' -f1)
if [[ ${FASTWORKER_FORCE_INSTALL:-} == 1 || ! -f $stamp_file || $(cat "$stamp_file") != "$stamp" ]] \
    || ! .venv/bin/python -c 'import fastworker._fcgi_codec, fastworker._amqp_codec, pytest, hypothesis, aiohttp, selenium' \
        >/dev/null 2>&1; then
    log "pip install -e '.[test]' into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$stamp" >"$stamp_file"
else
    log ".venv up to date"
fi
log "ready"
