# dtopp.c: `make train` trains a small DTop-p MoE model; `make test` runs every test.
# Run `make help` for the other targets.

CC ?= gcc
CFLAGS ?= -O3 -march=native
# -fno-math-errno: sqrtf never sets errno, so loops that take square roots (AdamW) vectorize; the
# results are the same bits (a vector square root rounds as the scalar one does)
CFLAGS += -std=c11 -Wall -Wextra -fno-math-errno
LDLIBS = -lm
PYTHON ?= /usr/bin/python3

# OpenMP threads sleep while they wait (passive) unless you choose otherwise: their default, spinning,
# takes the cores from the threads that work whenever anything else runs (make train fell from 27k
# to 1.9k tokens/s under load). On an idle machine spinning is about 16% faster: OMP_WAIT_POLICY=active.
# The programs do the same when started by hand (passive_wait_by_default, dtopp/utils.h).
export OMP_WAIT_POLICY ?= passive

# OpenMP: used when the compiler has it; without it everything still builds and runs on one core
# (and -fopenmp-simd still vectorizes the dot products).
OPENMP_OK := $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo yes)
ifeq ($(OPENMP_OK),yes)
  CFLAGS += -fopenmp
  $(info OpenMP: found, building with -fopenmp)
else
  CFLAGS += -fopenmp-simd
  $(info OpenMP: not found, building single-threaded)
endif

# Sanitizers: `make test SANITIZE=1` builds the programs with AddressSanitizer and
# UndefinedBehaviorSanitizer into build/sanitize/ (the normal build stays as it is) and runs every
# test with them; any report stops the program with a non-zero exit, which fails the test.
SANITIZE_DIR = build/sanitize
SANITIZE_FLAGS = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
SANITIZE_OK := $(shell echo 'int main(void){return 0;}' | $(CC) $(SANITIZE_FLAGS) -x c - -o /dev/null 2>/dev/null && echo yes)
ifeq ($(SANITIZE),1)
  BIN = $(SANITIZE_DIR)/
  export ASAN_OPTIONS = halt_on_error=1:detect_leaks=1
  export UBSAN_OPTIONS = halt_on_error=1:print_stacktrace=1
endif

# CUDA: built when nvcc is present, for the architecture of the GPU found here, or CUDA_ARCH
# (e.g. make cuda CUDA_ARCH=90) when building on a machine without a GPU.
NVCC ?= $(or $(shell command -v nvcc 2>/dev/null),$(wildcard /usr/local/cuda/bin/nvcc))
NVCC_OK := $(NVCC)
DETECTED_ARCH := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.')
CUDA_ARCH ?= $(if $(DETECTED_ARCH),$(DETECTED_ARCH),90)
NVCCFLAGS = -O3 -std=c++17 -arch=sm_$(CUDA_ARCH) -Xcompiler -fopenmp -Xcompiler -march=native

# MPI (data-parallel training on several processes): built when mpicc is present (Debian:
# libopenmpi-dev openmpi-bin); `make` alone builds the single-process program without it.
MPICC ?= mpicc
MPI_OK := $(shell command -v $(MPICC) 2>/dev/null)
# for nvcc, which does not wrap MPI: mpicc's include and library folders
MPI_NVCC_FLAGS = $(addprefix -I,$(shell $(MPICC) --showme:incdirs 2>/dev/null)) \
                 $(addprefix -L,$(shell $(MPICC) --showme:libdirs 2>/dev/null)) -lmpi

# data for `make train`: TEXT=file to use your own text, VOCAB=gpt2 for GPT-2 tokens, VOCAB=bpe for a
# 4,096-token vocabulary trained on the text; OUT: its output
VOCAB ?= bytes
DATA = data
OUT = out
TRAIN_FLAGS ?=
ifeq ($(VOCAB),gpt2)
  SHARDS = $(DATA)/train_gpt2
  TRAIN_DEFAULTS = --batch 8 --seq-len 64 --steps 300 --eval-every 50 --sample-every 100 --sample-tokens 64
else ifeq ($(VOCAB),bpe)
  SHARDS = $(DATA)/train_bpe
  TRAIN_DEFAULTS = --batch 16 --seq-len 64 --steps 1500 --lr 3e-3 --warmup 50 --eval-every 250 --sample-every 500 \
                   --sample-tokens 128 --tokenizer $(SHARDS)_tokenizer.bin
else
  SHARDS = $(DATA)/train_bytes
  TRAIN_DEFAULTS = --batch 16 --seq-len 128 --steps 1500 --lr 3e-3 --warmup 50 --eval-every 250 --sample-every 500 --sample-tokens 256
endif

BINARIES = train_dtopp prepro test_gpt test/test_matmul test/test_tokenizer test/test_dataloader test/tiktoken_compare \
           tools/make_offline_text dit/train_dit dit/eval_dit test/test_dit test/make_test_images

.PHONY: repro plots tune compare-cuda all train test test-model test-matmul test-tokenizer test-data test-train \
        test-mpi reference check-fixtures selfcheck cuda cuda-mpi test-cuda bench tokenizer unicode_tables clean help \
        fuzz dit dit-compare test-dit test-resume plot

all: $(BINARIES)

# a target whose recipe fails is deleted (a half-written shard or program never looks up to date)
.DELETE_ON_ERROR:

help:
	@echo "make               build the programs"
	@echo "make train         prepare TinyShakespeare (or TEXT=file, or the built-in text offline) and train"
	@echo "                   (VOCAB=gpt2 for GPT-2 tokens; TRAIN_FLAGS='--steps 100 ...' to change options)"
	@echo "make train RESUME=1  continue the run in OUT (out) from its last checkpoint, with its own settings"
	@echo "make plot          a picture of a run's log.csv: OUT=dir (default out), into OUT/log.png"
	@echo "make test          every test (DATA_DIR=folder with tinyshakespeare.txt and kjv.txt adds golden counts)"
	@echo "make dit           Fashion-MNIST: train a DTop-p diffusion transformer (about 21 minutes on 2 cores;"
	@echo "                   DIT_FLAGS='--steps 1500' for a 4-minute version)"
	@echo "                   (DIT_FLAGS='--routing topk ...' to change options, DIT_OUT=dir for another output)"
	@echo "make dit-compare   DTop-p against Top-k, three seeds each, with the paired rules of doc/dit.md (out/dit_compare)"
	@echo "make reference     regenerate test/fixtures with the PyTorch reference (python3-torch)"
	@echo "make check-fixtures  regenerate the fixtures and compare with the committed ones"
	@echo "make cuda          build the CUDA twin (train_dtopp_cuda, test_gpt_cuda) if nvcc is present"
	@echo "make train_dtopp_mpi  the data-parallel CPU build (MPI; run with mpirun, see doc/parallel.md)"
	@echo "make cuda-mpi      the data-parallel CUDA build (NCCL between GPUs, MPI to start them)"
	@echo "make test-cuda     run test_gpt against the CUDA build (needs a GPU)"
	@echo "make compare-cuda  50 training steps on CPU and GPU from the same checkpoint must agree (needs a GPU)"
	@echo "make repro         the experiment of doc/results.md (about 90 minutes on 2 cores); REPRO_TEXTS=files"
	@echo "make plots         the decisions, tables and plots of doc/results.md from the logs of make repro"
	@echo "make tune          the controller tuning of doc/results.md, section 1 (about 35 minutes on 2 cores)"
	@echo "make test SANITIZE=1  every test with AddressSanitizer and UndefinedBehaviorSanitizer builds"
	@echo "make fuzz          every fuzz target for FUZZ_SECONDS (default 60) each (clang, libFuzzer)"
	@echo "make bench         benchmarks (tokenizer vs js-tiktoken; C vs PyTorch on the CPU; CUDA vs PyTorch with a GPU)"

# ----------------------------------------------------------------------------
# programs

# the headers of dtopp/ (one concern each, doc/tour.md) and the data loader: a change to any rebuilds
HEADERS = $(wildcard dtopp/*.h) dataloader.h

train_dtopp: train_dtopp.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ train_dtopp.c $(LDLIBS)

# the same program with MPI: several processes train one model (doc/parallel.md)
train_dtopp_mpi: train_dtopp.c $(HEADERS)
	$(MPICC) $(CFLAGS) -DUSE_MPI -o $@ train_dtopp.c $(LDLIBS)

test_gpt: test_gpt.c test/check.h train_dtopp.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ test_gpt.c $(LDLIBS)

# the diffusion transformer (doc/dit.md): train_dtopp.c's core with patches for tokens, in dit/
DIT_SOURCES = dit/train_dit.c dit/idx.h dit/png.h train_dtopp.c $(HEADERS)
dit/train_dit: $(DIT_SOURCES)
	$(CC) $(CFLAGS) -o $@ dit/train_dit.c $(LDLIBS)

# its measures: the classifier, the Fréchet distance and class accuracy of samples, the routing table
dit/eval_dit: dit/eval_dit.c dit/explain_dit.h $(DIT_SOURCES)
	$(CC) $(CFLAGS) -o $@ dit/eval_dit.c $(LDLIBS)

test/test_dit: test/test_dit.c test/check.h dit/eval_dit.c $(DIT_SOURCES)
	$(CC) $(CFLAGS) -o $@ test/test_dit.c $(LDLIBS)

# a small data set in Fashion-MNIST's layout for the DiT's tests, so that they need no download
test/make_test_images: test/make_test_images.c
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

prepro: prepro.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ prepro.c $(LDLIBS)

tools/make_tokenizer: tools/make_tokenizer.c
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

tools/make_offline_text: tools/make_offline_text.c
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

tools/make_unicode_tables: tools/make_unicode_tables.c
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

test/test_tokenizer: test/test_tokenizer.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ test/test_tokenizer.c $(LDLIBS)

test/test_dataloader: test/test_dataloader.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ test/test_dataloader.c $(LDLIBS)

test/tiktoken_compare: test/tiktoken_compare.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ test/tiktoken_compare.c $(LDLIBS)

# tokenizer.bin and dtopp/unicode_tables.h are committed; these regenerate them from their sources
tokenizer: tools/make_tokenizer
	@test -n "$(GPT2_DIR)" || { echo "usage: make tokenizer GPT2_DIR=<folder with vocab.bpe and encoder.json>"; exit 1; }
	tools/make_tokenizer $(GPT2_DIR)/vocab.bpe $(GPT2_DIR)/encoder.json tokenizer.bin

UNICODE_DATA ?= /usr/share/unicode/UnicodeData.txt
unicode_tables: tools/make_unicode_tables
	tools/make_unicode_tables $(UNICODE_DATA) > dtopp/unicode_tables.h.tmp && mv dtopp/unicode_tables.h.tmp dtopp/unicode_tables.h

# ----------------------------------------------------------------------------
# make train

$(DATA)/input.txt:
	scripts/get_data.sh $(DATA) $(TEXT)

$(SHARDS)_train.bin: $(DATA)/input.txt prepro
	./prepro --vocab $(VOCAB) -o $(SHARDS) $(DATA)/input.txt

# Without TEXT, a text that an earlier `make train TEXT=file` copied is replaced by TinyShakespeare.
# RESUME=1: continue the run in $(OUT) from its last checkpoint, with the settings it saved.
ifeq ($(RESUME),1)
train: train_dtopp
	./train_dtopp --resume $(OUT) $(TRAIN_FLAGS)
else
train: train_dtopp tools/make_offline_text
	@if [ -n "$(TEXT)" ]; then rm -f $(DATA)/input.txt $(SHARDS)_train.bin; \
	 elif grep -qs '^a copy of' $(DATA)/input.source; then \
	     echo "make train: $(DATA)/input.txt is $$(cat $(DATA)/input.source), and TEXT is not set: preparing TinyShakespeare"; \
	     rm -f $(DATA)/input.txt $(SHARDS)_train.bin; fi
	$(MAKE) --no-print-directory $(SHARDS)_train.bin TEXT=$(TEXT)
	@echo "make train: $(DATA)/input.txt is $$(cat $(DATA)/input.source 2>/dev/null || echo 'a text of unknown origin')"
	./train_dtopp --train $(SHARDS)_train.bin --val $(SHARDS)_val.bin --out $(OUT) $(TRAIN_DEFAULTS) $(TRAIN_FLAGS)
endif

# a picture of a run: losses, the threshold p, activated experts per layer against the budget (a
# DiT's log.csv gets its own); needs matplotlib (Debian: python3-matplotlib) and says so without it
plot:
	$(PYTHON) scripts/plot_run.py $(OUT)

# The experiment of doc/results.md: word-piece tokens of a BPE vocabulary that prepro trains on the
# corpus, logs in out/repro. REPRO_TEXTS: local texts for the corpus (concatenated; the validation
# split is the end of the last); empty: TinyShakespeare, downloaded, or the offline text.
REPRO_TEXTS ?=
repro: train_dtopp prepro tools/make_offline_text
	scripts/get_corpus.sh $(DATA)/words $(REPRO_TEXTS)
	$(MAKE) --no-print-directory $(DATA)/words_train.bin
	scripts/repro.sh out/repro

$(DATA)/words_train.bin: $(DATA)/words/input.txt prepro
	./prepro --vocab bpe --bpe-tokens 4096 -o $(DATA)/words $(DATA)/words/input.txt

plots:
	$(PYTHON) scripts/decide.py out/repro $(DATA)/words_train.bin

# the controller's tuning, section 1 of doc/results.md: byte-level TinyShakespeare, logs in out/tune*
tune: train_dtopp tools/make_offline_text
	$(MAKE) --no-print-directory $(DATA)/train_bytes_train.bin VOCAB=bytes
	scripts/tune_controller.sh out/tune
	STEPS=1000 GAINS_ONLY="0.1 0.3 0.8" scripts/tune_controller.sh out/tune_long
	$(PYTHON) scripts/analyze_tuning.py out/tune out/tune_long


# ----------------------------------------------------------------------------
# make dit: a DTop-p diffusion transformer on Fashion-MNIST (doc/dit.md), into $(DIT_OUT); the
# defaults of train_dit are this run's (about 21 minutes on 2 cores)

DIT_DATA = $(DATA)/fashion-mnist
DIT_OUT = out_dit
DIT_FLAGS ?=

$(DIT_DATA)/train-images-idx3-ubyte:
	scripts/get_fashion_mnist.sh $(DIT_DATA)

dit: dit/train_dit $(DIT_DATA)/train-images-idx3-ubyte
	dit/train_dit --data $(DIT_DATA) --out $(DIT_OUT) $(DIT_FLAGS)

# DTop-p against Top-k, three seeds, the paired rules and the routing verdicts of doc/dit.md ("Second
# round"), into out/dit_compare; finished runs and measures are kept (JOBS=2 DIT_FLAGS='--threads 1'
# trains two at once, about 2 hours in all)
dit-compare: dit/train_dit dit/eval_dit $(DIT_DATA)/train-images-idx3-ubyte
	FASHION_MNIST=$(DIT_DATA) scripts/dit_compare.sh out/dit_compare
	$(PYTHON) scripts/dit_plots.py out/dit_compare

# ----------------------------------------------------------------------------
# tests

# every suite runs, even after one that failed; the last line sums them all: "N passed, M failed",
# naming what this machine could not test (test/run_tests.sh)
TEST_SUITES = test-model test-matmul test-tokenizer test-data test-train test-resume test-dit test-explain test-mpi
test:
	@MAKE="$(MAKE)" test/run_tests.sh $(TEST_SUITES)

test-model: $(BIN)test_gpt
	./$(BIN)test_gpt

test/test_matmul: test/test_matmul.c test/check.h test/attention_reference.h train_dtopp.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ test/test_matmul.c $(LDLIBS)

test-matmul: $(BIN)test/test_matmul
	./$(BIN)test/test_matmul

# The tokenizer's test also runs under the sanitizers in every `make test`: its integer
# arithmetic (hashes, packed merge keys) is where undefined behaviour would hide.
test-tokenizer: $(BIN)test/test_tokenizer $(BIN)test/tiktoken_compare $(BIN)prepro tools/make_offline_text \
                $(if $(SANITIZE_OK),$(SANITIZE_DIR)/test/test_tokenizer)
	$(if $(DATA_DIR),DATA_DIR=$(DATA_DIR),SKIP_DATA_TESTS=1) $(BIN)test/test_tokenizer
	$(if $(DATA_DIR),DATA_DIR=$(DATA_DIR)) ENCODER=$(BIN)test/tiktoken_compare test/tiktoken_compare.sh
	$(if $(SANITIZE_OK),UBSAN_OPTIONS=halt_on_error=1 SKIP_DATA_TESTS=1 $(SANITIZE_DIR)/test/test_tokenizer > /dev/null \
	  && echo "test_tokenizer under ASan and UBSan: no report",@echo "skipped: test_tokenizer under the sanitizers: $(CC) has none")

test-data: $(BIN)test/test_dataloader $(BIN)prepro tools/make_offline_text
	$(BIN)test/test_dataloader
	PREPRO=./$(BIN)prepro ENCODER=$(BIN)test/tiktoken_compare test/test_prepro.sh

test-train: $(BIN)train_dtopp $(BIN)prepro tools/make_offline_text
	TRAIN=./$(BIN)train_dtopp PREPRO=./$(BIN)prepro test/test_train.sh

# --resume with the run's settings, --extend, Ctrl-C and SIGTERM, the tokenizer a model records
test-resume: $(BIN)train_dtopp $(BIN)prepro tools/make_offline_text
	TRAIN=./$(BIN)train_dtopp PREPRO=./$(BIN)prepro test/test_resume.sh

# The routing pages (train_dtopp --explain, eval_dit explain) end to end, and in headless Chromium
# when it is installed (else those checks say in one line that they are skipped).
.PHONY: test-explain
test-explain: $(BIN)train_dtopp $(BIN)prepro $(BIN)dit/train_dit $(BIN)dit/eval_dit tools/make_offline_text
	TRAIN=./$(BIN)train_dtopp PREPRO=./$(BIN)prepro TRAIN_DIT=./$(BIN)dit/train_dit EVAL_DIT=./$(BIN)dit/eval_dit \
	  FASHION_MNIST=$(DIT_DATA) test/test_explain.sh

# The diffusion transformer against its fixtures, its readers, then its program end to end, on a
# data set that test/make_test_images generates; the real Fashion-MNIST is checked too when it is
# in $(DIT_DATA) (else a line says it is skipped).
test-dit: $(BIN)test/test_dit $(BIN)dit/train_dit $(BIN)dit/eval_dit test/make_test_images
	@rm -rf build/test_images && mkdir -p build && test/make_test_images build/test_images
	TEST_IMAGES=build/test_images FASHION_MNIST=$(DIT_DATA) ./$(BIN)test/test_dit
	TRAIN_DIT=./$(BIN)dit/train_dit EVAL_DIT=./$(BIN)dit/eval_dit FASHION_MNIST=$(DIT_DATA) test/test_dit.sh

# every program of the project, built with the sanitizers (SANITIZE=1 above)
$(SANITIZE_DIR)/%: %.c train_dtopp.c $(HEADERS) dit/train_dit.c dit/eval_dit.c dit/idx.h dit/png.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(SANITIZE_FLAGS) -o $@ $< $(LDLIBS)

ifneq ($(MPI_OK),)
test-mpi: train_dtopp train_dtopp_mpi prepro tools/make_offline_text
	test/test_mpi.sh
else
test-mpi:
	@echo "skipped: the MPI test (doc/parallel.md): mpicc not found (Debian: apt-get install libopenmpi-dev openmpi-bin)"
endif

reference:
	$(PYTHON) reference/make_fixtures.py --out test/fixtures
	$(PYTHON) reference/make_dit_fixtures.py --out test/fixtures/dit

check-fixtures:
	$(PYTHON) reference/make_fixtures.py --check test/fixtures
	$(PYTHON) reference/make_dit_fixtures.py --check test/fixtures/dit

selfcheck:
	$(PYTHON) reference/selfcheck.py

# ----------------------------------------------------------------------------
# CUDA

ifneq ($(NVCC_OK),)
cuda: train_dtopp_cuda test_gpt_cuda
	@echo "CUDA: built for sm_$(CUDA_ARCH)$(if $(DETECTED_ARCH), (detected),; no GPU detected, set CUDA_ARCH to change)"
train_dtopp_cuda: train_dtopp.cu train_dtopp.c $(HEADERS)
	$(NVCC) $(NVCCFLAGS) -o $@ train_dtopp.cu -lcublas
test_gpt_cuda: test_gpt.c test/check.h train_dtopp.cu train_dtopp.c $(HEADERS)
	$(NVCC) $(NVCCFLAGS) -DTEST_CUDA -x cu -o $@ test_gpt.c -lcublas
# data parallel on several GPUs: NCCL between them, MPI to start the ranks (doc/parallel.md)
cuda-mpi: train_dtopp_cuda_mpi
train_dtopp_cuda_mpi: train_dtopp.cu train_dtopp.c $(HEADERS)
	$(NVCC) $(NVCCFLAGS) -DUSE_MPI -o $@ train_dtopp.cu -lcublas -lnccl $(MPI_NVCC_FLAGS)
test-cuda: test_gpt_cuda
	./test_gpt_cuda
compare-cuda: train_dtopp train_dtopp_cuda prepro tools/make_offline_text
	test/compare_cpu_gpu.sh
else
cuda cuda-mpi test-cuda compare-cuda:
	@echo "CUDA: nvcc not found, skipping the CUDA targets"
endif

# ----------------------------------------------------------------------------
# fuzzing: a libFuzzer target for every reader of outside data (fuzz/README.md), built with clang
# and ASan + UBSan into build/fuzz/; `make fuzz` runs each for FUZZ_SECONDS from the seeds in
# fuzz/corpus/ and fails on any crash, sanitizer report or broken round trip.

FUZZ_CC ?= clang
FUZZ_FLAGS = -g -O1 -std=c11 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
             -Wall -Wextra -Wno-unused-function -Wno-unknown-pragmas
FUZZ_TARGETS = shard model state tokenizer encoder prepro options idx dit dit_state
FUZZ_SECONDS ?= 60

build/fuzz/fuzz_%: fuzz/fuzz_%.c fuzz/fuzz.h train_dtopp.c $(HEADERS) dit/train_dit.c dit/idx.h dit/png.h
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $< -lm

fuzz: $(addprefix build/fuzz/fuzz_,$(FUZZ_TARGETS))
	fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# ----------------------------------------------------------------------------
# benchmarks: speed is reported as a ratio against a peer measured in the same run

bench: test/tiktoken_compare prepro train_dtopp tools/make_offline_text bench/bench_matmul bench/fma_peak
	bench/bench_prepro.sh
	bench/bench_cpu.sh
	@if [ -n "$(DETECTED_ARCH)" ] && [ -x bench/bench_cuda.sh ]; then bench/bench_cuda.sh; \
	 else echo "bench: no GPU here, skipping the CUDA benchmark"; fi

bench/bench_matmul: bench/bench_matmul.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ bench/bench_matmul.c $(LDLIBS)

bench/fma_peak: bench/fma_peak.c dtopp/utils.h
	$(CC) $(CFLAGS) -o $@ bench/fma_peak.c $(LDLIBS)

clean:
	rm -f $(BINARIES) bench/bench_matmul bench/fma_peak tools/make_tokenizer tools/make_unicode_tables train_dtopp_cuda test_gpt_cuda train_dtopp_mpi \
	      train_dtopp_cuda_mpi
	rm -rf build
