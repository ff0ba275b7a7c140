"""torch.compile: the pointwise ops between two matmul / attention kernels fuse, so only what those kernels read
or return, what backward keeps and each part's output go through memory, and a part issues one fused kernel
after each of them (plus one before the first) instead of one kernel per op.  Memory is the eager model's."""

from __future__ import annotations

import pytest

from simulator import Scenario, compute, estimate
from simulator.estimate import cost_table_for

BASE = {"model": "llama-3.1-8b", "gpu": "rtx-4090-24gb", "precision": "bf16", "checkpointing": {"mode": "full"},
        "loss": "chunked", "workload": {"micro_batch": 2, "seq_len": 2048}}
METHODS = {"full": {"kind": "full"}, "lora": {"kind": "lora", "r": 16, "targets": "all-linear"},
           "qlora": {"kind": "qlora", "r": 16, "targets": "all-linear"}}


def _block(sc: dict):
    ct = cost_table_for(Scenario.model_validate(sc))
    return ct, next(p for p in compute.op_arrays(ct) if p.where == "block")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_compiled_block_moves_only_what_its_kernels_read_return_or_keep(method):
    d = {**BASE, "method": METHODS[method]}
    ct, eager = _block(d)
    cct, fused = _block({**d, "compile": True})
    tr = next(v.trace for v in cct.trace.variants if tuple(v.layers) == fused.layers)
    externs = sum(1 for op in tr.ops if op.aten)
    assert fused.n_kernels - fused.n_dequant_kernels == min(2 * externs + 1, eager.n_kernels - eager.n_dequant_kernels)
    assert fused.n_kernels < eager.n_kernels
    # per token: the bytes of the tensors a kernel reads or returns or backward keeps -- the pointwise
    # intermediates (rotary products, the activation's and the adapters' temporaries) are gone
    keep, _ = compute.compiled_kernels(tr, compute.made_tensors(tr))
    kept_tok = sum(t.nbytes.c[0] for t in tr.tensors if t.id in keep and not t.is_param and not t.weight_copy)
    assert fused.elementwise_bytes[0] == pytest.approx(kept_tok, rel=1e-12)
    assert fused.elementwise_bytes[0] < 0.8 * eager.elementwise_bytes[0]
    # the saved set -- and with it every memory figure -- is the eager model's
    assert cct.at(cct.saved, (4096, 4096, 0, 2, 2048, 0, 1)) == ct.at(ct.saved, (4096, 4096, 0, 2, 2048, 0, 1))


def test_compiling_speeds_adapters_up_more_than_full_fine_tuning():
    """LoRA adds a cast, a dropout, a scaling and an add per adapted module: pointwise work that fusion removes,
    where full fine-tuning is mostly matmuls."""
    gain = {}
    for name, m in METHODS.items():
        eager = estimate({**BASE, "method": m}, what_fits=False)
        fused = estimate({**BASE, "method": m, "compile": True}, what_fits=False)
        assert fused.peak_memory_bytes == eager.peak_memory_bytes
        assert fused.flops_per_step == eager.flops_per_step
        gain[name] = eager.time.step_s / fused.time.step_s
    assert 1.0 < gain["full"] < gain["lora"]
    assert gain["qlora"] > gain["full"]


def test_the_cli_flag_and_the_report_line():
    from simulator.cli import main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["estimate", "--model", "llama-3.2-1b", "--gpu", "l4-24gb", "--compile"]) == 0
    assert "torch.compile" in out.getvalue().splitlines()[5]
