# dmuc: Distributed MUC for Prosody (and, later, ejabberd).
#   make demo   two real Prosody servers on loopback, a mirrored room, a conversation, the s2s savings
#   make test   everything: engine tests, the native module, real-server integration tests
#   make dist   dist/prosody/: mod_dmuc.lua + dmuc_prosody.so, the whole Prosody install

PYTHON   ?= /usr/bin/python3
CARGO    ?= cargo
DIST     := dist/prosody
SO       := target/release/libdmuc_prosody.so
APT_PKGS := prosody lua5.4 liblua5.4-dev python3-slixmpp python3-pytest

.PHONY: all deps build dist test test-engine test-integration demo clean

all: dist

# Install the host packages once; never let their service scripts start system daemons.
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

build:
	$(CARGO) build --release -p dmuc-prosody

# Copy, then rename: a host that has the old .so loaded must never see it overwritten in place.
dist: build
	mkdir -p $(DIST)
	cp lua/mod_dmuc.lua $(DIST)/mod_dmuc.lua.tmp && mv $(DIST)/mod_dmuc.lua.tmp $(DIST)/mod_dmuc.lua
	cp $(SO) $(DIST)/dmuc_prosody.so.tmp && mv $(DIST)/dmuc_prosody.so.tmp $(DIST)/dmuc_prosody.so

test-engine:
	$(CARGO) test --workspace

test-integration: deps dist
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/integration

test: deps test-engine test-integration

demo: deps dist
	$(PYTHON) tests/demo.py

clean:
	rm -rf dist
