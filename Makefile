# Dataplane: `make test` and `make demo` are the two commands; `make deps` installs what they need.
.PHONY: test demo bench bench-gate fuzz soak stress vhost-check vhost-bench deps clean

test: deps .venv-qmp/bin/python
	@echo "== every unsafe construct carries its argument"
	python3 scripts/check-unsafe.py
	@echo "== every program in the README and the DocC catalogs builds and runs"
	python3 scripts/check-snippets.py
	swift build --build-tests
	@echo "== tests on the default backend"
	swift test
	@echo "== tests with DATAPLANE_FDMON=epoll"
	DATAPLANE_FDMON=epoll swift test
	@echo "== tests under the thread sanitizer"
	swift test --sanitize=thread --scratch-path .build-tsan
	@echo "== tests under the address sanitizer"
	@# Leak checking is off: LeakSanitizer reports Swift's once-initialised globals, cannot
	@# stop the world in exit-test children under a seccomp filter (it spins for ever), and
	@# needs descriptors the exhaustion tests have used up. Leaks of what matters here
	@# (descriptors, threads, memory growth) are counted by the tests and the soak.
	ASAN_OPTIONS=detect_leaks=0 swift test --sanitize=address --scratch-path .build-asan
	@echo "== the command line as a user meets it: help, version, bad values"
	swift build --product dataplane
	.venv-qmp/bin/python Tests/e2e/cli_check.py .build/debug/dataplane
	@echo "== end to end: dataplane serve driven by the real qemu.qmp client"
	.venv-qmp/bin/python Tests/e2e/qmp_e2e.py .build/debug/dataplane
	@echo "== monitor under abuse: 64 garbage clients while qemu.qmp hot-plugs devices"
	.venv-qmp/bin/python Tests/e2e/qmp_abuse.py .build/debug/dataplane 20
	@echo "== management clients racing: 8 qemu.qmp clients and 2 vanishing ones on shared objects"
	.venv-qmp/bin/python Tests/e2e/qmp_race.py .build/debug/dataplane 20 $(RACE_SEED)
	DATAPLANE_FDMON=epoll .venv-qmp/bin/python Tests/e2e/qmp_race.py .build/debug/dataplane 12 $(RACE_SEED)

# The racing-clients test held for STRESS_SECONDS (a random seed unless RACE_SEED is given;
# the seed is printed, and the same seed replays the same choices).
STRESS_SECONDS ?= 300
RACE_SEED ?=
stress: deps .venv-qmp/bin/python
	swift build --product dataplane
	.venv-qmp/bin/python Tests/e2e/qmp_race.py .build/debug/dataplane $(STRESS_SECONDS) $(RACE_SEED)

demo: deps
	swift run -c release dataplane demo

# W1–W6, allocations, memory and idle CPU on Dataplane beside the C reference (raw liburing)
# and SwiftNIO, as one table of ratios and goals (about 4 minutes once built). fio is the
# W4 column's third figure: installed here when root, else the column is skipped.
# Knobs: DP_BENCH_REPEATS, DP_BENCH_W3_MS, DP_BENCH_W6_MS, DP_BENCH_SOAK_SECONDS (the issue
# asks for 60), DP_BENCH_ONLY (see Benchmarks/Sources/compare/main.swift).
bench: deps
	@command -v fio >/dev/null 2>&1 || { [ "$$(id -u)" -eq 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fio >/dev/null 2>&1; } || echo "fio is missing (apt-get install -y fio): W4 runs without its fio column"
	@mkdir -p Benchmarks/cref/bin
	cc -O2 -Wall -o Benchmarks/cref/bin/cref Benchmarks/cref/cref.c -luring -lpthread
	cd Benchmarks && swift build -c release --product compare
	cd Benchmarks && .build/release/compare cref/bin/cref

# package-benchmark: allocations per operation checked against Benchmarks/Thresholds
# (0 for an existing BH, a ring nop, the W1 round trip, a W3 request and an executor job;
# 1 for a one-shot BH, its node).
bench-gate: deps
	cd Benchmarks && swift package benchmark thresholds check --metric mallocCountTotal

# libFuzzer over the monitor, two targets, FUZZ_SECONDS each:
# - qmp-stream-fuzz: the JSON stream, parser and serializer (two source files, built by swiftc);
# - qmp-dispatch-fuzz: a Monitor session driving real IOThreads and devices. SwiftPM builds
#   the QMP module and what it imports, instrumented, in .build-fuzz (the normal .build is not
#   touched); swiftc links Fuzz/QMPDispatch{Fuzz,Mutator}.swift against their objects (with the
#   toolchain's lld: gold warns about every ASan register-check symbol).
# Leak checking is off for the dispatch target (LeakSanitizer reports Swift's once-initialised
# globals, as in make test); the target counts descriptors and IOThreads itself. Swift's own
# crash backtracer is off: it hangs under ASan, and libFuzzer prints the stack.
# A crash leaves its input in .build-fuzz/artifacts/; rerun it with the binary and that file.
FUZZ_SECONDS ?= 60
FUZZ_FLAGS = -Xswiftc -sanitize=fuzzer,address -Xcc -fsanitize=fuzzer-no-link,address
fuzz: deps
	@mkdir -p .build-fuzz/corpus .build-fuzz/dispatch-corpus .build-fuzz/artifacts
	swiftc -O -sanitize=fuzzer,address -parse-as-library -module-name QMPFuzz \
	  Sources/QMP/JSON.swift Sources/QMP/JSONStream.swift Fuzz/QMPStreamFuzz.swift -o .build-fuzz/qmp-stream-fuzz
	@# One -sanitize=fuzzer,address: given as two flags (swift build --sanitize twice), the
	@# Swift driver keeps only the last and the modules get no coverage counters.
	swift build --scratch-path .build-fuzz -c release --target QMP $(FUZZ_FLAGS)
	bin=$$(swift build --scratch-path .build-fuzz -c release --show-bin-path) && \
	swiftc -O -sanitize=fuzzer,address -use-ld=lld -parse-as-library -swift-version 6 -module-name QMPDispatchFuzz \
	  -I $$bin/Modules -I CLiburing -Xcc -fmodule-map-file=$$bin/CShims.build/module.modulemap \
	  Fuzz/QMPDispatchFuzz.swift Fuzz/QMPDispatchMutator.swift \
	  $$bin/Uring.build/*.o $$bin/Aio.build/*.o $$bin/IOThreads.build/*.o $$bin/Devices.build/*.o \
	  $$bin/VhostUser.build/*.o $$bin/QMP.build/*.o $$bin/CShims.build/*.o $$(pkg-config --libs liburing) \
	  -o .build-fuzz/qmp-dispatch-fuzz
	SWIFT_BACKTRACE=enable=no .build-fuzz/qmp-stream-fuzz -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=10 \
	  -artifact_prefix=.build-fuzz/artifacts/ .build-fuzz/corpus Fuzz/corpus
	ASAN_OPTIONS=detect_leaks=0 SWIFT_BACKTRACE=enable=no .build-fuzz/qmp-dispatch-fuzz -max_total_time=$(FUZZ_SECONDS) \
	  -max_len=32768 -timeout=30 -dict=Fuzz/dispatch.dict -artifact_prefix=.build-fuzz/artifacts/ \
	  .build-fuzz/dispatch-corpus Fuzz/dispatch-corpus

# W6 churn held for SOAK_SECONDS (io_uring, then a third as long on epoll): fails on a lost or
# twice-completed request, inconsistent holders, or growth in threads, descriptors or memory.
SOAK_SECONDS ?= 60
soak: deps
	swift build --product dataplane
	.build/debug/dataplane soak --duration $(SOAK_SECONDS)s
	.build/debug/dataplane soak --duration $$(( $(SOAK_SECONDS) / 3 + 1 ))s --fdmon epoll

# vhost-user-blk against a real QEMU 7.2 guest (TCG) booting Linux: the guest suite of
# Tests/vhost (pattern, cache, discard, verify, write, export deletion under a reading guest;
# 1 and 2 queues; main loop and IOThread) on Dataplane's export, with the IOThread polling
# (QEMU's default poll-max-ns) and not polling. Installs QEMU, busybox and a guest kernel.
DATAPLANE_EXPORT = .build/debug/dataplane serve @IOT_OBJECT@ \
	--blockdev driver=file,node-name=file0,filename=@FILE@ \
	--blockdev driver=raw,node-name=disk0,file=file0 \
	--export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=@SOCK@,writable=on,num-queues=@QUEUES@@IOT_OPT@ \
	--chardev socket,id=qmp0,path=@QMP@,server=on,wait=off --monitor chardev=qmp0
vhost-check: deps
	Tests/vhost/setup.sh
	swift build --product dataplane
	Tests/vhost/guest-check.sh --name dataplane -- $(DATAPLANE_EXPORT)
	DP_VHOST_IOT_PROPS=,poll-max-ns=0 Tests/vhost/guest-check.sh --name dataplane-polling-off -- $(DATAPLANE_EXPORT)
	Tests/vhost/multi-iothread-check.sh .build/debug/dataplane

# The same guest workload on qemu-storage-daemon's export and on Dataplane's, side by side
# (release; VHOST_BENCH_BUILD=debug reuses make test's build, as .ci/run does to save time).
VHOST_BENCH_BUILD ?= release
vhost-bench: deps
	Tests/vhost/setup.sh
	swift build -c $(VHOST_BENCH_BUILD) --product dataplane
	Tests/vhost/bench.sh --name dataplane-$(VHOST_BENCH_BUILD) -- $(subst .build/debug/,.build/$(VHOST_BENCH_BUILD)/,$(DATAPLANE_EXPORT))

# liburing-dev (with pkg-config, through which SwiftPM finds it) and a Swift toolchain.
deps:
	@command -v swift >/dev/null 2>&1 || { echo "swift is not on PATH: install Swift 6.1+ (e.g. export PATH=/opt/swift/usr/bin:\$$PATH)"; exit 1; }
	@if ! pkg-config --exists liburing 2>/dev/null; then \
	  if [ "$$(id -u)" -eq 0 ]; then \
	    echo "== installing liburing-dev and pkg-config"; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y liburing-dev pkg-config; \
	  else \
	    echo "liburing-dev is missing: run sudo apt-get install -y liburing-dev pkg-config"; exit 1; \
	  fi; \
	fi

# The real QMP client, from PyPI, in a virtual environment of the project's own.
.venv-qmp/bin/python:
	python3 -m venv .venv-qmp || { echo "python3 -m venv failed: install python3-venv (apt-get install -y python3-venv)"; exit 1; }
	.venv-qmp/bin/pip install -q qemu.qmp

clean:
	rm -rf .build .build-tsan .build-asan .build-fuzz .venv-qmp Benchmarks/.build Benchmarks/cref/bin
