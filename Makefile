# dmuc: Distributed MUC for Prosody and ejabberd.
#   make demo   two real Prosody servers on loopback, a mirrored room, a conversation, the s2s savings
#   make test   everything: engine tests, the native modules, real-server integration tests
#   make bench  dmuc against plain MUC on real Prosody servers over an emulated slow link (< 15 min)
#   make dist   dist/prosody/ (mod_dmuc.lua + dmuc_prosody.so) and dist/ejabberd/mod_dmuc/ (an
#               ext_mod folder: mod_dmuc.spec, ebin/, priv/)

PYTHON   ?= /usr/bin/python3
CARGO    ?= cargo
DIST     := dist/prosody
SO       := target/release/libdmuc_prosody.so
EJD      := dist/ejabberd/mod_dmuc
NIF      := target/release/libdmuc_nif.so
EJD_LIB  := /usr/lib/x86_64-linux-gnu/ejabberd-23.01
ERLC     := erlc -I $(EJD_LIB)/include -I /usr/lib/erlang/lib/p1_xmpp-1.6.1/include -pa $(EJD_LIB)/ebin
APT_PKGS := prosody lua5.4 liblua5.4-dev python3-slixmpp python3-pytest python3-matplotlib ejabberd erlang-dev

.PHONY: all deps build dist test test-engine test-integration demo bench clean

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
	$(CARGO) build --release -p dmuc-prosody -p dmuc-ejabberd

# Copy, then rename: a host that has the old .so loaded must never see it overwritten in place.
dist: build
	mkdir -p $(DIST)
	cp lua/mod_dmuc.lua $(DIST)/mod_dmuc.lua.tmp && mv $(DIST)/mod_dmuc.lua.tmp $(DIST)/mod_dmuc.lua
	cp $(SO) $(DIST)/dmuc_prosody.so.tmp && mv $(DIST)/dmuc_prosody.so.tmp $(DIST)/dmuc_prosody.so
	mkdir -p $(EJD)/ebin $(EJD)/priv
	$(ERLC) -o $(EJD)/ebin ejabberd/src/dmuc_nif.erl ejabberd/src/mod_dmuc.erl
	cp ejabberd/mod_dmuc.spec $(EJD)/mod_dmuc.spec
	cp $(NIF) $(EJD)/priv/dmuc_nif.so.tmp && mv $(EJD)/priv/dmuc_nif.so.tmp $(EJD)/priv/dmuc_nif.so

test-engine:
	$(CARGO) test --workspace

test-integration: deps dist
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/integration

test: deps test-engine test-integration

demo: deps dist
	$(PYTHON) tests/demo.py

# The engine's own figures first (alone on the CPU), then the servers: s2s stanzas and bytes,
# latency over 600 ms RTT, the rate a 9.6 kbit/s link sustains, Prosody CPU. Writes
# target/bench/{results.json,results.md,bench.png,bench.svg}; fails if a message was lost.
bench: deps dist
	mkdir -p target/bench
	@rm -f target/bench/fanout.txt
	@if [ -f benches/fanout.rs ]; then \
	  echo "$(CARGO) bench --bench fanout"; \
	  $(CARGO) bench --bench fanout > target/bench/fanout.log 2>&1 || { cat target/bench/fanout.log; exit 1; }; \
	  grep -v '^ *\(Compiling\|Finished\|Running\|Blocking\)' target/bench/fanout.log | tee target/bench/fanout.txt; \
	fi
	$(PYTHON) benches/prosody/bench.py --engine target/bench/fanout.txt

clean:
	rm -rf dist
