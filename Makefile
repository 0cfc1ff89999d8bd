# KVSplice: `make defconfig && make train` trains; `make test` tests.
# Everything runs from a virtual environment that the first target creates.

PYTHON    ?= python3
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
STAMP_ONLINE := $(VENV)/.installed-online
# datasets streamed from the hub need the `datasets` package
ONLINE_DATA = $(shell grep -sqE '^CONFIG_DATASET="(finewebedu|openwebtext)"' .config && echo $(STAMP_ONLINE))
DEFCONFIG ?= cpu-quickstart
ARGS      ?=
CKPT      ?= runs/cpu-quickstart/V0/best.pt

.DEFAULT_GOAL := help
.PHONY: help venv defconfig menuconfig savedefconfig kconfig list-steps data train test bench bench-train bench-kvsplice bench-memory bench-decode profile-decode frontier generate clean

help:
	@echo "Set-up and configuration:"
	@echo "  make defconfig          load defconfigs/$(DEFCONFIG) (the CPU quick start) into .config"
	@echo "  make defconfig-NAME     load defconfigs/NAME; available: $(notdir $(wildcard defconfigs/*))"
	@echo "  make menuconfig         edit .config in a terminal menu"
	@echo "  make savedefconfig      write the minimal form of .config to ./defconfig"
	@echo "  make kconfig            regenerate Kconfig from the trainer's flags (gpt2/cli.py)"
	@echo "  make list-steps         print the ablation steps (gpt2/ablations.py)"
	@echo "Running:"
	@echo "  make data               prepare the dataset that .config names"
	@echo "  make train [ARGS=...] [FORCE=1]"
	@echo "                          run the ablation steps of .config (completed steps are skipped"
	@echo "                          unless FORCE=1; ARGS are extra train_ra_mla.py flags)"
	@echo "  make test               run the test suite (CPU, offline)"
	@echo "  make bench [CKPT=...]   post-hoc V-cache benchmark of trained checkpoint(s) -> docs/benchmarks.md"
	@echo "                          (default CKPT: the quick start's V0, so run 'make train' first;"
	@echo "                          CKPT=\"a.pt b.pt\" gives one section per checkpoint; CKPT=smollm2 the"
	@echo "                          pretrained SmolLM2-135M on held-out plays (target 900 s on 2 cores);"
	@echo "                          sections of checkpoints not named are kept)"
	@echo "  make bench-train        training throughput of the CPU quick-start model"
	@echo "  make bench-kvsplice     KVSplice fit time and compress/decompress throughput"
	@echo "  make bench-memory       SmolLM2's KV cache per method at 2k/8k/32k tokens -> docs/benchmarks.md"
	@echo "  make bench-decode       eager and compiled decode speed at the quick-start shape -> docs/benchmarks.md"
	@echo "  make profile-decode     where an eager decode step's time goes (V0, V20, V22)"
	@echo "  make frontier           the V-cache frontier on SmolLM2 at 2-4 bits per dimension (15 min)"
	@echo "  make generate ARGS=...  text through a V-cache method (python -m gpt2.generate --help)"
	@echo "  make clean              remove .venv, data/ and runs/"

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $@

$(STAMP_ONLINE): requirements-online.txt $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-online.txt
	touch $@

venv: $(STAMP)

defconfig: defconfig-$(DEFCONFIG)

defconfig-%: $(STAMP)
	@test -f defconfigs/$* || { echo "no defconfigs/$*; available: $(notdir $(wildcard defconfigs/*))"; exit 1; }
	$(VENV)/bin/defconfig --kconfig Kconfig defconfigs/$*

menuconfig: $(STAMP)
	$(VENV)/bin/menuconfig Kconfig

savedefconfig: $(STAMP) .config
	$(VENV)/bin/savedefconfig --kconfig Kconfig --out defconfig

kconfig: $(STAMP)
	$(PY) scripts/gen_kconfig.py

list-steps: $(STAMP)
	$(PY) train_ra_mla.py --list-steps

.config:
	@echo "no .config: run 'make defconfig' (or 'make defconfig-NAME') first"; exit 1

data: $(STAMP) .config $(ONLINE_DATA)
	$(PY) scripts/run_ablation.py --config .config --prepare-only $(ARGS)

train: $(STAMP) .config $(ONLINE_DATA)
	$(PY) scripts/run_ablation.py --config .config $(if $(FORCE),--force) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	@for c in $(CKPT); do test "$$c" = smollm2 || test -f $$c || { echo "no checkpoint $$c: run 'make defconfig && make train' or pass CKPT=... (or CKPT=smollm2)"; exit 1; }; done
	$(PY) scripts/bench_kv.py --ckpt $(CKPT)

bench-train: $(STAMP)
	$(PY) scripts/bench_train.py

bench-kvsplice: $(STAMP)
	$(PY) scripts/bench_kvsplice.py

bench-memory: $(STAMP)
	$(PY) scripts/bench_kv.py --memory

bench-decode: $(STAMP)
	$(PY) scripts/bench_kv.py --decode-only --config defconfigs/cpu-quickstart --vocab 19083

profile-decode: $(STAMP)
	$(PY) scripts/profile_decode.py

frontier: $(STAMP)
	$(PY) scripts/frontier.py $(ARGS)

generate: $(STAMP)
	$(PY) -m gpt2.generate $(or $(ARGS),--model smollm2 --prompt "To be, or not to be")

clean:
	rm -rf $(VENV) data runs
