# datadream_hf developer commands. `make install test` and `make install demo` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test quality style demo demo-k4 benchmark benchmark-gpu real-size-cpu

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# torch first and pinned: the CPU wheel is local here, an unpinned torch pulls a multi-GB CUDA build.
install: $(PY)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"

test:
	$(PY) -m pytest tests -q

quality:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

style:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

demo:
	$(PY) training_scripts/run_demo.py --output_dir demo_output

# The scarcer setting: 4 real images per class (the README's K=4 column).
demo-k4:
	$(PY) training_scripts/run_demo.py --output_dir demo_output_k4 --k 4

benchmark:
	$(PY) benchmarks/bench_stage1_cls.py
	$(PY) benchmarks/bench_stage1_loft.py
	$(PY) benchmarks/bench_generation.py

# On one GPU (>= 80 GB): both benchmarks at SD 2.1-base, SDXL-base and SD3-medium size with random weights, nothing
# downloaded (SDXL and SD3 at 1024 px, their native size).
benchmark-gpu:
	$(PY) benchmarks/bench_stage1_cls.py --pretrained_model_name_or_path random-sd21-base --max_train_steps 8 \
		--mixed_precision bf16 --classes_per_group 5
	$(PY) benchmarks/bench_generation.py --pretrained_model_name_or_path random-sd21-base --num_inference_steps 20
	for model in random-sdxl-base random-sd3-medium; do \
		$(PY) benchmarks/bench_stage1_cls.py --pretrained_model_name_or_path $$model --resolution 1024 \
			--max_train_steps 4 --mixed_precision bf16 --skip_ablations || exit 1; \
		$(PY) benchmarks/bench_generation.py --pretrained_model_name_or_path $$model --num_inference_steps 20 \
			--variants ours write unfused fusion || exit 1; \
	done

# Real-size shapes on this CPU, random weights: stage 1 for one step and stage 2 for one image per class, each
# stage's wall time and peak memory (minutes and most of 24 GiB of RAM per model; not part of `make test`).
real-size-cpu:
	$(PY) benchmarks/bench_real_size_cpu.py --model random-sd21-base --resolution 512
	$(PY) benchmarks/bench_real_size_cpu.py --model random-sdxl-base --resolution 512
	$(PY) benchmarks/bench_real_size_cpu.py --model random-sd3-medium --resolution 512
