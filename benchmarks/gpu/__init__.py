"""The attribution engine at the paper's scale: Llama-3-8B's shape with random weights, on a GPU.

    python -m benchmarks.gpu [--device cuda] [--layers 32] [--dtype bfloat16] [--queries 3] [--steps 20]
                             [--reference-layers 4] [--in-flight 2 4] [--profile amig] [--json OUT]
    python -m benchmarks.gpu --dry-run                   # rows default_batch_rows picks on a 141 GB H200
    python -m benchmarks.gpu --make-smollm2-reference    # CPU only: writes SMOLLM2_REFERENCE

Run from the repository's root, with qloc importable (installed, or PYTHONPATH=src).

Builds a model of Llama-3-8B's configuration (32 layers, d_model 4096, d_ff 14336, 32 heads / 8 KV
heads, vocabulary 128,256) straight on the device in bf16 with random weights: the same compute as the
real model, no download. Prompts are 8-word ParaRel queries under a word-level tokenizer, so each is
exactly 8 tokens. Measures, side by side in one run:

- IG, AMIG and SIG seconds per query, the batch rows the engine chose, peak memory, and the sustained
  rate from the cost model in benchmarks/throughput.py against a bf16 matrix product measured here;
- the per-layer reference loop (qloc.testing) on the first --reference-layers
  layers, extrapolated linearly to all of them, for the speed-up ratio;
- queries per second back to back and with several model replicas in flight, one thread and one CUDA
  stream each;
- the memory one row costs per layer it runs and in the output head, solved from three pass sizes,
  against default_batch_rows' estimate;
- a model of smollm2-135m's exact configuration with seeded weights (smollm2's own weights are too
  large to travel to the GPU machine): its fp32 scores against the CPU's stored in SMOLLM2_REFERENCE,
  and the KN sets of its bf16 run against fp32's.

On the CPU, --layers 2 proves the script end to end. Figures and how to run it on the GPU machine:
benchmarks/NOTES.md.

Modules: models (configurations, tokenizer, timers), measure (one measurement each), smollm2 (the
seeded smollm2-shape check), report (runs and prints the measurements), cli (arguments, the run).
"""
