"""default_batch_rows on a GPU, with the CUDA memory queries answered for an H200 (no GPU needed)."""

from types import SimpleNamespace
from unittest import mock

import torch
import transformers

from benchmarks.gpu.models import LLAMA3_8B  # the shape the GPU benchmark estimates for
from qloc.engine.paths import default_batch_rows, gpu_batch_rows

GIB = 2**30


def gpu_model(**config):
    """What default_batch_rows reads of a model: a bf16 Llama of ``config`` on cuda:0."""
    llama = transformers.LlamaConfig(**{**LLAMA3_8B, **config})
    return SimpleNamespace(
        device=torch.device("cuda", 0),
        config=llama,
        dtype=torch.bfloat16,
        num_layers=llama.num_hidden_layers,
        d_ff=llama.intermediate_size,
    )


def rows_with(lm, free: int, reserved: int = 0, allocated: int = 0) -> int:
    with (
        mock.patch("torch.cuda.mem_get_info", return_value=(free, 141 * GIB)),
        mock.patch("torch.cuda.memory_reserved", return_value=reserved),
        mock.patch("torch.cuda.memory_allocated", return_value=allocated),
    ):
        return default_batch_rows(lm)


def test_llama3_8b_on_an_h200_gets_rows_for_its_key_value_heads():
    """Per row: every layer's saved activations (8 d_model + 4 d_ff bf16 values) and 64 positions of
    keys and values of 8 heads of 128, plus the fp32 output distribution three times over."""
    per_row = 32 * ((8 * 4096 + 4 * 14_336) * 2 + 2 * 64 * 1024 * 2) + 3 * 128_256 * 4
    assert rows_with(gpu_model(), 125 * GIB) == int(0.5 * 125 * GIB / per_row)  # 4,275 rows
    # Full multi-head attention keeps four times the cache, so fewer rows fit.
    assert rows_with(gpu_model(num_key_value_heads=32), 125 * GIB) < 0.5 * rows_with(gpu_model(), 125 * GIB)


def test_memory_torch_caches_but_does_not_use_counts_as_free():
    """After a query, torch's allocator keeps its blocks: the driver reports them taken, but the next
    query can use them, so it gets as many rows as the first."""
    first = rows_with(gpu_model(), 125 * GIB)
    assert rows_with(gpu_model(), 105 * GIB, reserved=36 * GIB, allocated=16 * GIB) == first
    assert rows_with(gpu_model(), 105 * GIB, reserved=16 * GIB, allocated=16 * GIB) < first


def test_cpu_rows_are_fixed():
    lm = gpu_model()
    lm.device = torch.device("cpu")
    assert default_batch_rows(lm) == 1024


def test_free_memory_given_is_used_as_measured():
    """Free memory passed in sizes the batch as the device's own report would, with no model needed
    for the estimate itself (a card not at hand can be sized)."""
    measured = rows_with(gpu_model(), 125 * GIB)
    assert default_batch_rows(gpu_model(), free_bytes=125 * GIB) == measured
    config = transformers.LlamaConfig(**LLAMA3_8B)
    assert gpu_batch_rows(config, torch.bfloat16, 32, 14_336, 125 * GIB) == measured
    assert gpu_batch_rows(config, torch.bfloat16, 16, 14_336, 125 * GIB) > measured
