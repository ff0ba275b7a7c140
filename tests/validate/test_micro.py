"""The microbenchmark suite: the CPU grid measured end to end, the FLOP and byte formulas against hand
arithmetic and torch's FlopCounterMode, the GPU grid's size, span and time (not run), and predict_micro
against the engine's own per-op functions."""

from __future__ import annotations

import math
import statistics
import warnings
from collections import Counter

import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")

from hwprofiles.registry import get_device, system_for  # noqa: E402
from simulator import comm, timing  # noqa: E402
from simulator.compute import (GPTQ_TORCH_DEQUANT_BANDWIDTH_FRACTION, attention_time_s, gemm_time_s,  # noqa: E402
                               memory_time_s)
from validate import micro  # noqa: E402
from validate.micro import MicroCase, case_bytes, case_flops, predict_micro  # noqa: E402
from validate.run import run_suite  # noqa: E402
from validate.schema import load_results  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

H100 = "h100-sxm-80gb"


def _has_bnb() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


# ---------------------------------------------------------------------------------------------
# the CPU grid through the runner
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, path = run_suite("micro", device="cpu", scale="cpu", out_dir=out, argv=["run", "--suite", "micro"])
    return res, path


CUDA_ONLY = {"micro/gemm/tf32/m128-n128-k128", "micro/sdpa/efficient/fp32/b1-h2-s128-d32/causal/fwd",
             "micro/h2d/pinned/1MiB", "micro/d2h/pageable/1MiB", "micro/fp8_cast_compiled/bf16/64x256"}


def test_cpu_grid_writes_a_results_file_that_reads_back(cpu_run):
    res, path = cpu_run
    back = load_results(path)
    assert back == res
    assert back.suite == "micro" and back.fingerprint.platform == "cpu"
    assert [c.case_id for c in back.cases] == [c.case_id for c in micro.cpu_cases()]


def test_cpu_grid_statuses(cpu_run):
    res, _ = cpu_run
    by_id = {c.case_id: c for c in res.cases}
    for cid in CUDA_ONLY:
        assert by_id[cid].status == "skipped", cid
        assert by_id[cid].message and by_id[cid].measured is None
    for c in res.cases:
        needs_bnb = c.kind == "dequant" or c.spec.get("impl") == "bnb-8bit"
        if c.case_id in CUDA_ONLY or (needs_bnb and not _has_bnb()):
            continue
        assert c.status == "ok", (c.case_id, c.message)
    ok_kinds = {c.kind for c in res.cases if c.status == "ok"}
    expected = {"gemm", "sdpa", "copy", "rmsnorm", "layernorm", "softmax", "cross_entropy", "fp8_cast", "adamw",
                "all_reduce"}
    assert expected | ({"dequant"} if _has_bnb() else set()) <= ok_kinds


def test_cpu_measurements_carry_the_formulas_and_enough_repeats(cpu_run):
    res, _ = cpu_run
    for c in res.cases:
        if c.status != "ok":
            continue
        case = MicroCase.from_spec(c.kind, c.spec)
        m = c.measured
        assert m.time_s > 0 and len(m.time_samples_s) >= micro.MIN_REPEATS["cpu"]
        assert m.time_s == statistics.median(m.time_samples_s)
        assert m.flops == case_flops(case) and m.bytes_moved == case_bytes(case)
        assert m.extra["repeats"] == len(m.time_samples_s)


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes: hand arithmetic
# ---------------------------------------------------------------------------------------------


def test_gemm_flops_and_bytes_by_hand():
    c = MicroCase.of("gemm", m=64, n=96, k=128, dtype="bf16")
    assert case_flops(c) == 2 * 64 * 96 * 128 == 1_572_864
    # (mk + kn) x 2 B read, mn x 2 B written: (8192 + 12288) x 2 + 6144 x 2
    assert case_bytes(c) == 40_960 + 12_288
    f8 = MicroCase.of("gemm", m=32, n=64, k=32, dtype="fp8")
    # operands 1 B each, bf16 output: (1024 + 2048) x 1 + 2048 x 2
    assert case_bytes(f8) == 3_072 + 4_096


def test_sdpa_flops_and_bytes_by_hand():
    base = dict(batch=1, heads=2, seq=128, head_dim=32, backend="flash", dtype="fp32")
    per = 1 * 2 * 128 * 128 * 32  # b h s^2 d = 1,048,576
    fwd_causal = MicroCase.of("sdpa", **base, causal=True, backward=False)
    assert micro.sdpa_counted_flops(fwd_causal.params) == 4 * per
    assert case_flops(fwd_causal) == 2 * per  # the masked half is skipped
    both_full = MicroCase.of("sdpa", **base, causal=False, backward=True)
    assert case_flops(both_full) == 14 * per  # 4 forward + 10 backward
    # q, k, v read and o written: 4 x b h s d x 4 B = 4 x 8192 x 4; the backward twice that again
    assert case_bytes(fwd_causal) == 131_072
    assert case_bytes(both_full) == 3 * 131_072


def test_memory_bound_bytes_by_hand():
    assert case_bytes(MicroCase.of("copy", rows=256, cols=1024, dtype="fp32")) == 2 * 2**20
    # x read and y written (2 x 64 x 256 x 4) and the weight (256 x 4)
    assert case_bytes(MicroCase.of("rmsnorm", rows=64, cols=256, dtype="fp32")) == 131_072 + 1_024
    assert case_bytes(MicroCase.of("layernorm", rows=64, cols=256, dtype="bf16")) == 65_536 + 1_024
    # log-softmax in and out (2 x 32 x 1000 x 4) + 32 labels x 8 B + 32 picked values x 4 B
    assert case_bytes(MicroCase.of("cross_entropy", rows=32, cols=1000, dtype="fp32")) == 256_000 + 384
    # torchao's float8 cast of 64 x 256 bf16: eager abs (r2 w2), max (r2), to-fp32 (r2 w4), mul and clamp (r4 w4
    # each), to-fp8 (r4 w1) = 33 B per element; compiled, the amax read and one fused read + fp8 write = 5 B
    assert case_bytes(MicroCase.of("fp8_cast", rows=64, cols=256, dtype="bf16")) == 33 * 16_384
    assert case_bytes(MicroCase.of("fp8_cast_compiled", rows=64, cols=256, dtype="bf16")) == 5 * 16_384
    # AdamW fp32: param, grad, exp_avg, exp_avg_sq read (16 B), param and moments written (12 B)
    assert case_bytes(MicroCase.of("adamw", numel=100_000, tensor_numel=30_000, impl="fused")) == 2_800_000
    # foreach: 13 reads + 8 writes of parameter-sized fp32 tensors (tests/exact/test_optimizer_step_exact.py)
    assert case_bytes(MicroCase.of("adamw", numel=100_000, tensor_numel=30_000, impl="foreach")) == 8_400_000
    # bitsandbytes AdamW8bit: param and grad read, param written (12 B), both 8-bit states read and written (4 B)
    assert case_bytes(MicroCase.of("adamw", numel=100_000, tensor_numel=30_000, impl="bnb-8bit")) == 1_600_000


def test_dequant_bytes_by_hand():
    shape = dict(out_features=256, in_features=512)  # 131,072 weights, 2,048 blocks of 64
    nf4 = MicroCase.of("dequant", **shape, quant="nf4", double_quant=False)
    # 4 bits (65,536 B) + fp32 absmax per block (8,192 B) + the 16-entry fp32 code (64 B) read, bf16 written
    assert case_bytes(nf4) == 65_536 + 8_192 + 64 + 262_144
    dq = MicroCase.of("dequant", **shape, quant="nf4", double_quant=True)
    # absmax as uint8 (2,048 B) + one fp32 per 256 blocks (8 x 4 B) + codes (64 B, 1,024 B nested) + offset (4 B)
    assert case_bytes(dq) == 65_536 + 2_048 + 32 + 64 + 1_024 + 4 + 262_144
    i8 = MicroCase.of("dequant", **shape, quant="int8", double_quant=False)
    # 1 B per weight + fp32 scale per row read, fp32 written
    assert case_bytes(i8) == 131_072 + 1_024 + 524_288


def test_gptq_dequant_bytes_and_prediction():
    shape = dict(out_features=256, in_features=512)  # 131,072 weights, 4 groups of 128 input rows
    case = MicroCase.of("dequant", **shape, quant="gptq", double_quant=False)
    # packed 4 bits (65,536 B) + fp16 scales (4 x 256 x 2) + 4-bit zeros (4 x 256 / 2) + int32 g_idx (512 x 4),
    # and the PyTorch path's 16 B per weight
    assert case_bytes(case) == 65_536 + 2_048 + 512 + 2_048 + 16 * 131_072
    dev = get_device(H100)
    assert dev.efficiency.gptq_torch_dequant_fraction is None  # not measured yet: the engine's default
    assert predict_micro(case.spec(), "dequant", H100) == pytest.approx(
        memory_time_s(case_bytes(case), dev) / GPTQ_TORCH_DEQUANT_BANDWIDTH_FRACTION, rel=1e-12)
    with pytest.raises(ValueError, match="multiple of 128"):
        MicroCase.of("dequant", out_features=256, in_features=320, quant="gptq", double_quant=False)


def test_gptq_dequant_replays_the_packing_format():
    """Each int32 of ``qweight`` packs 8 consecutive input rows (4 bits each, lowest first) of one output column;
    each int32 of ``qzeros`` 8 consecutive columns of one group; the weight is ``scale * (q - (zero + 1))``."""
    out_f, in_f, group = 16, 256, 128
    fn = micro.gptq_torch_dequant_fn(out_f, in_f, "cpu")
    qweight, qzeros, scales = fn.inputs
    w = fn()
    assert tuple(w.shape) == (in_f, out_f) and w.dtype == torch.float16
    expect = torch.empty(in_f, out_f, dtype=torch.float16)
    for i in range(in_f):
        for j in range(out_f):
            q = (int(qweight[i // 8, j]) >> (4 * (i % 8))) & 15
            z = ((int(qzeros[i // group, j // 8]) >> (4 * (j % 8))) & 15) + 1
            expect[i, j] = scales[i // group, j] * float(q - z)
    assert torch.equal(w, expect)


def test_nf4_storage_matches_bitsandbytes():
    if not _has_bnb():
        pytest.skip("bitsandbytes not importable")
    import bitsandbytes.functional as bnbf

    w = torch.randn(256, 512, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    stored = sum(t.numel() * t.element_size() for t in (packed, state.absmax, state.code))
    case = MicroCase.of("dequant", out_features=256, in_features=512, quant="nf4", double_quant=False)
    assert stored + w.numel() * 2 == case_bytes(case)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    nested = (packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code)
    case = MicroCase.of("dequant", out_features=256, in_features=512, quant="nf4", double_quant=True)
    assert sum(t.numel() * t.element_size() for t in nested) + w.numel() * 2 == case_bytes(case)


# ---------------------------------------------------------------------------------------------
# FLOPs: torch's FlopCounterMode on CPU
# ---------------------------------------------------------------------------------------------


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def fwd(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def bwd(g, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(g, q, k, v)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: fwd,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        fn()
    return fc.get_total_flops()


def test_gemm_flops_equal_flop_counter():
    p = MicroCase.of("gemm", m=48, n=80, k=112, dtype="fp32")
    a, b = torch.randn(48, 112), torch.randn(112, 80)
    assert _count(lambda: torch.mm(a, b)) == case_flops(p)


@pytest.mark.parametrize("backend", ["flash", "math"])
def test_sdpa_counted_flops_equal_flop_counter(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    case = MicroCase.of("sdpa", batch=2, heads=3, seq=64, head_dim=16, causal=True, backward=True, backend=backend,
                        dtype="fp32")
    q, k, v = (torch.randn(2, 3, 64, 16, requires_grad=True) for _ in range(3))
    be = SDPBackend.FLASH_ATTENTION if backend == "flash" else SDPBackend.MATH

    def fwd():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    fwd_case = MicroCase.of("sdpa", **{**case.spec(), "backward": False})
    assert _count(fwd) == micro.sdpa_counted_flops(fwd_case.params)  # 4 b h s^2 d, no causal discount
    if backend == "flash":  # the fused backward recomputes the scores: 10 b h s^2 d
        assert _count(lambda: fwd().sum().backward()) == micro.sdpa_counted_flops(case.params)


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------


def test_case_spec_round_trips_and_params_must_match_kind():
    for c in micro.gpu_cases() + micro.cpu_cases():
        assert MicroCase.from_spec(c.kind, c.spec()) == c
    with pytest.raises(ValidationError, match="takes GemmParams"):
        MicroCase(kind="gemm", params=micro.RowsParams(rows=1, cols=1, dtype="fp32"))
    with pytest.raises(ValidationError):
        MicroCase.of("gemm", m=0, n=1, k=1, dtype="bf16")
    with pytest.raises(ValueError, match="unknown micro kind"):
        MicroCase.from_spec("conv", {})


def test_timing_plan_sizes_batches_and_repeats():
    inner, warmup, repeats = micro.timing_plan(1e-6, "cuda")  # a 1 us kernel: batches of 200 calls
    assert (inner, repeats) == (200, 250)  # 250 batches x 200 us = 50 ms
    assert micro.timing_plan(0.1, "cuda") == (1, 1, micro.MIN_REPEATS["cuda"])  # 10 x 100 ms >= 50 ms
    inner, _, repeats = micro.timing_plan(2e-3, "cuda")
    assert inner == 1 and repeats == 25  # 25 x 2 ms = 50 ms


def test_collective_fns_on_a_one_rank_gloo_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{micro._free_port()}", rank=0, world_size=1)
    try:
        for kind in micro.COLLECTIVE_KINDS:
            micro.collective_fn(kind, 4096, 1, "fp32", "cpu")()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# the GPU grid (not run)
# ---------------------------------------------------------------------------------------------


def test_gpu_grid_size_span_and_ids():
    cases = micro.gpu_cases()
    ids = [c.case_id for c in cases]
    assert len(ids) == len(set(ids))
    kinds = Counter(c.kind for c in cases)
    assert set(kinds) == set(micro.PARAMS_BY_KIND)
    # flash and efficient: 2 head dims x 6 lengths x causal or not x fwd or fwd+bwd = 48 each;
    # math: d=128 x 4 lengths (<= 4096) x 2 x 2 = 16
    assert kinds["sdpa"] == 48 + 48 + 16
    # 6 sizes per memory-bound dtype; copy in bf16 and fp32; 6 cross-entropy shapes
    assert (kinds["copy"], kinds["rmsnorm"], kinds["cross_entropy"]) == (12, 6, 6)
    assert kinds["adamw"] == 9 and kinds["dequant"] == 12 and kinds["h2d"] == kinds["d2h"] == 8
    assert kinds["all_reduce"] == len(micro.COLLECTIVE_RANKS) * len(micro.COLLECTIVE_SIZES_BYTES)
    assert 150 <= kinds["gemm"] <= 200
    assert 300 <= len(cases) <= 400
    flops = [case_flops(c) for c in cases if c.kind == "gemm"]
    assert min(flops) <= 1e7 and max(flops) >= 1e13  # spans the whole GEMM efficiency curve
    row_bytes = [c.params.rows * c.params.cols * micro._ELEMENT_BYTES[c.params.dtype] for c in cases
                 if c.kind in ("copy", "rmsnorm", "layernorm", "softmax")]
    assert min(row_bytes) == 2**20 and max(row_bytes) == 2**30
    assert {c.params.numel for c in cases if c.kind == "adamw"} == {10**7, 10**8, 10**9}


def test_gpu_grid_fits_six_minutes_on_one_h100():
    total_s = sum(micro.estimated_case_s(c, H100) for c in micro.gpu_cases())
    assert 30 < total_s <= 360
    assert all(micro.estimated_case_s(c, H100) == 0 for c in micro.gpu_cases() if c.kind in micro.COLLECTIVE_KINDS)


def test_llm_shapes_come_from_the_catalog():
    # Llama-3.1-8B: hidden 4096, 32 heads x 128, 8 KV heads, MLP 14336
    shapes = micro.llm_gemm_shapes(("llama-3.1-8b",), (2048,))
    assert (2048, 6144, 4096) in shapes  # fused qkv: (32 + 2 x 8) x 128 outputs
    assert (2048, 14336, 4096) in shapes and (2048, 4096, 14336) in shapes
    assert (4096, 14336, 2048) in shapes  # weight gradient of the up projection
    assert (2048, 128256, 4096) in shapes  # LM head


# ---------------------------------------------------------------------------------------------
# predictions: the engine's functions
# ---------------------------------------------------------------------------------------------


def test_predict_gemm_is_the_engine_roofline():
    dev = get_device(H100)
    for dtype in ("bf16", "fp8", "tf32"):
        c = MicroCase.of("gemm", m=4096, n=4096, k=4096, dtype=dtype)
        assert predict_micro(c.spec(), "gemm", H100) == gemm_time_s(case_flops(c), case_bytes(c), dev, dtype)
    gemv = MicroCase.of("gemm", m=1, n=14336, k=4096, dtype="bf16")  # decode: memory-bound
    assert predict_micro(gemv.spec(), "gemm", H100) == memory_time_s(case_bytes(gemv), dev)


def test_predict_sdpa_is_the_engine_attention_time():
    dev = get_device(H100)
    base = dict(batch=4, heads=32, seq=4096, head_dim=128, dtype="bf16")
    per = 4 * 32 * 4096 * 4096 * 128
    nbytes = 4.0 * 4 * 32 * 4096 * 128 * 2
    fwd = MicroCase.of("sdpa", **base, causal=True, backward=False, backend="flash")
    assert predict_micro(fwd.spec(), "sdpa", H100) == pytest.approx(
        attention_time_s(4 * per, nbytes, dev, "bf16", True, 4096), rel=1e-12)
    # the efficient backend at its speed relative to flash (the profile's attention_kernels.mem_efficient)
    both = MicroCase.of("sdpa", **base, causal=False, backward=True, backend="efficient")
    want = (attention_time_s(4 * per, nbytes, dev, "bf16", False, 4096, "mem_efficient")
            + attention_time_s(10 * per, 2 * nbytes, dev, "bf16", False, 4096, "mem_efficient", backward=True))
    assert predict_micro(both.spec(), "sdpa", H100) == pytest.approx(want, rel=1e-12)
    flash_both = MicroCase.of("sdpa", **base, causal=False, backward=True, backend="flash")
    assert predict_micro(flash_both.spec(), "sdpa", H100) == pytest.approx(
        want * dev.efficiency.attention_kernel_ratio("mem_efficient", 4096), rel=1e-9)
    math_fwd = MicroCase.of("sdpa", **base, causal=True, backward=False, backend="math")
    # unfused: the GEMM path on the full (unmasked) count
    assert predict_micro(math_fwd.spec(), "sdpa", H100) == gemm_time_s(4 * per, nbytes, dev, "bf16")
    # flash at the profile's attention fraction for 4096 tokens: 2 x causal-halved forward = the full forward;
    # the FlashAttention-2 benchmark figure the H100 profile cites runs causal 4k sequences at 294 TFLOPs/s
    assert dev.efficiency.attention_fraction_at(4096) * dev.peak_flops("bf16") == pytest.approx(294e12, rel=0.005)
    assert predict_micro(fwd.spec(), "sdpa", H100) == pytest.approx(
        2 * per / (dev.peak_flops("bf16") * dev.efficiency.attention_fraction_at(4096)))


def test_predict_memory_bound_transfers_and_collectives():
    dev = get_device(H100)
    for c in (MicroCase.of("copy", rows=65536, cols=4096, dtype="bf16"),
              MicroCase.of("adamw", numel=10**9, tensor_numel=2**24, impl="fused"),
              MicroCase.of("dequant", out_features=14336, in_features=4096, quant="nf4", double_quant=True)):
        assert predict_micro(c.spec(), c.kind, H100) == memory_time_s(case_bytes(c), dev)
    # bitsandbytes' step: its kernels at the streaming rate (no calibrated figure yet), then per tensor (4 here: three
    # of 30,000 and the remainder) its two operators and the synchronize after each
    bnb = MicroCase.of("adamw", numel=100_000, tensor_numel=30_000, impl="bnb-8bit")
    assert dev.efficiency.bnb_optimizer_fraction is None
    assert predict_micro(bnb.spec(), "adamw", H100) == pytest.approx(
        memory_time_s(1_600_000, dev) + 4 * 3 * timing.OPTIMIZER_OP_HOST_S)
    h2d = MicroCase.of("h2d", size_bytes=2**30, pinned=True)
    assert predict_micro(h2d.spec(), "h2d", H100) == comm.host_transfer_time_s(system_for(H100, 1), 2**30)
    ar = MicroCase.of("all_reduce", size_bytes=2**29, n_ranks=8, dtype="bf16")
    assert predict_micro(ar.spec(), "all_reduce", H100) == comm.group_collective_time_s(
        system_for(H100, 8), "all_reduce", 2**29, 8, 8)


# ---------------------------------------------------------------------------------------------
# on a GPU (skipped here)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", [
    MicroCase.of("gemm", m=4096, n=4096, k=4096, dtype="bf16"),
    MicroCase.of("gemm", m=4096, n=4096, k=4096, dtype="tf32"),
    MicroCase.of("sdpa", batch=4, heads=16, seq=2048, head_dim=128, causal=True, backward=True, backend="flash",
                 dtype="bf16"),
    MicroCase.of("copy", rows=16384, cols=4096, dtype="bf16"),
    MicroCase.of("adamw", numel=10**7, tensor_numel=2**22, impl="fused"),
    MicroCase.of("h2d", size_bytes=2**26, pinned=True),
    MicroCase.of("d2h", size_bytes=2**26, pinned=True),
], ids=lambda c: c.case_id)
def test_gpu_cases_measure_near_the_roofline(case):
    from validate.harness import match_device_profile

    m = micro.run_micro(case, "cuda")
    assert m.time_s > 0 and len(m.time_samples_s) >= micro.MIN_REPEATS["cuda"]
    assert sum(m.time_samples_s) * m.extra["inner"] >= 0.9 * micro.TARGET_TOTAL_S["cuda"]
    profile = match_device_profile(torch.cuda.get_device_name(0))
    if profile is not None:  # within an order of magnitude of the engine, either way
        predicted = predict_micro(case.spec(), case.kind, profile)
        assert 0.1 < m.time_s / predicted < 10, (m.time_s, predicted)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA device of compute capability >= 8.9")
def test_gpu_fp8_gemm_runs():
    m = micro.run_micro(MicroCase.of("gemm", m=4096, n=4096, k=4096, dtype="fp8"), "cuda")
    assert m.time_s > 0 and m.extra["achieved_tflops"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_all_reduce_two_ranks():
    m = micro.run_micro(MicroCase.of("all_reduce", size_bytes=2**26, n_ranks=2, dtype="bf16"), "cuda")
    assert m.time_s > 0 and m.extra["busbw_GBps"] > 0


def test_estimate_is_zero_only_for_skipped_collectives():
    one = MicroCase.of("all_gather", size_bytes=2**23, n_ranks=2, dtype="bf16")
    assert micro.estimated_case_s(one, H100, gpus=1) == 0
    assert micro.estimated_case_s(one, H100, gpus=2) >= micro.SPAWN_S
    assert math.isfinite(micro.estimated_case_s(MicroCase.of("copy", rows=256, cols=4096, dtype="bf16"), H100))
