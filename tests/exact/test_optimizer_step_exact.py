"""The optimizer step's device traffic and host operators against the real optimizers on CPU: torch's
AdamW / Adam / SGD in their foreach, for-loop and fused forms and transformers' Adafactor, in fp32 and bf16.
Every operator the step dispatches is counted (``validate.cpu_truth.optimizer_step_traffic``): the bytes of
parameter-sized tensors it reads and writes, and how many operators a for-loop optimizer issues per tensor."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hwprofiles import get_device  # noqa: E402
from simulator import estimate, timing  # noqa: E402
from simulator import compute as cp  # noqa: E402
from simulator.config import Optimizer, Scenario  # noqa: E402
from validate.cpu_truth import optimizer_step_traffic  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::FutureWarning")]

SHAPE, COUNT = (64, 48), 3  # 3072 elements: no row (64) or column (48) statistic has that size
NUMEL = COUNT * SHAPE[0] * SHAPE[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

CASES = [Optimizer(name=n, impl=i) for n, i in [
    ("adamw", "foreach"), ("adamw", "for-loop"), ("adamw", "fused"), ("adam", "foreach"), ("adam", "for-loop"),
    ("adam", "fused"), ("sgd", "foreach"), ("sgd", "for-loop"), ("sgd-momentum", "foreach"),
    ("sgd-momentum", "for-loop"), ("sgd-momentum", "fused")]] + [
    Optimizer(name="adafactor", beta1=b1, scale_parameter=sp) for b1 in (True, False) for sp in (True, False)]


def _id(o: Optimizer) -> str:
    return f"{o.name}-{o.impl}" if o.name != "adafactor" else f"adafactor-beta1={o.beta1}-scale={o.scale_parameter}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", CASES, ids=_id)
def test_step_traffic_and_host_operators_match_the_real_optimizer(opt, dtype):
    t = optimizer_step_traffic(opt, SHAPE, COUNT, DTYPES[dtype])
    assert timing.optimizer_step_bytes(NUMEL, opt.name, dtype, False, opt.impl, opt.beta1) == t.bytes
    per_tensor = timing.optimizer_ops_per_tensor(opt, dtype, matrix=True)
    if per_tensor:  # for-loop optimizers: every operator is issued per tensor
        assert COUNT * per_tensor == t.ops
    else:  # multi-tensor and fused steps issue a handful of operators for the whole group
        assert t.ops <= 16


@pytest.mark.parametrize("dtype", DTYPES)
def test_adafactor_vector_operators(dtype):
    """A 1-D parameter (norm, bias) is not factored: a plain second moment, 10 operators fewer."""
    for b1 in (True, False):
        opt = Optimizer(name="adafactor", beta1=b1)
        t = optimizer_step_traffic(opt, (3072,), COUNT, DTYPES[dtype])
        assert COUNT * timing.optimizer_ops_per_tensor(opt, dtype, matrix=False) == t.ops


def test_foreach_adamw_moves_three_times_the_fused_traffic():
    fused, foreach = (timing.optimizer_step_bytes(1.0, "adamw", "fp32", False, impl) for impl in ("fused", "foreach"))
    assert (fused, foreach) == (7 * 4, 21 * 4)


def _adafactor_step_s(scale_parameter: bool) -> tuple[float, float, float]:
    sc = Scenario.model_validate(dict(model="qwen2.5-0.5b", gpu="h100-sxm-80gb", precision="bf16-amp",
                                      optimizer={"name": "adafactor", "scale_parameter": scale_parameter},
                                      workload={"micro_batch": 8, "seq_len": 1024}))
    e = estimate(sc)
    step_bytes = e.n_trainable_params * timing.optimizer_step_bytes(1.0, "adafactor", "fp32", False)
    gpu = float(cp.memory_time_s(step_bytes, get_device("h100-sxm-80gb")))
    # Qwen2.5-0.5B: 169 matrices (7 linears x 24 blocks + tied embedding), 121 vectors (3 biases + 2 norms x 24 + 1)
    ops = 169 * timing.optimizer_ops_per_tensor(sc.optimizer, "fp32", True) + \
        121 * timing.optimizer_ops_per_tensor(sc.optimizer, "fp32", False)
    return e.time.optimizer_s, gpu, ops * timing.OPTIMIZER_OP_HOST_S


def test_adafactor_step_is_host_bound_and_serial_with_scale_parameter():
    serial, gpu, host = _adafactor_step_s(True)
    assert host > gpu and serial == pytest.approx(gpu + host, rel=1e-12)  # waits for the device per parameter
    overlapped, gpu2, host2 = _adafactor_step_s(False)
    assert gpu2 == gpu and overlapped == pytest.approx(max(gpu2, host2), rel=1e-12) and host2 < host


@pytest.mark.parametrize("name", ["adamw-8bit", "paged-adamw-8bit", "paged-adamw-32bit"])
def test_bitsandbytes_step_dispatches_per_tensor_and_waits_for_each(name):
    """bitsandbytes' step loops over the parameters in Python: per tensor the operators counted on the real
    optimizer on CPU (AdamW8bit; the paged ones run the same loop, only on CUDA managed memory), plus the CUDA calls
    only a GPU makes (a synchronize after each update, two prefetches when paged).  The synchronize puts the host
    time and the kernels one after the other."""
    pytest.importorskip("bitsandbytes")
    t = optimizer_step_traffic(Optimizer(name="adamw-8bit"), SHAPE, COUNT, torch.float32)
    assert t.ops == COUNT * timing.BNB_DISPATCHED_OPS_PER_TENSOR
    opt = Optimizer(name=name)
    cuda_only = timing.bnb_cuda_calls_per_tensor(name)
    assert cuda_only == (3 if name.startswith("paged-") else 1)
    assert timing.optimizer_ops_per_tensor(opt, "fp32", matrix=True) == timing.BNB_DISPATCHED_OPS_PER_TENSOR + cuda_only
    assert timing.optimizer_syncs_per_tensor(opt)
    assert not timing.optimizer_syncs_per_tensor(Optimizer(name="adamw", impl="for-loop"))
    # QLoRA r=16 on every projection of Llama-3.1-8B: 7 x 2 adapter tensors x 32 blocks, each paying its host time
    # after its kernel
    sc = Scenario(model="llama-3.1-8b", gpu="h100-sxm-80gb", method={"kind": "qlora", "r": 16, "targets": "all-linear"},
                  optimizer=opt)
    from simulator.estimate import cost_table_for

    rank = timing.rank_state(cost_table_for(sc), sc.parallel, 0, opt)
    host = 448 * (timing.BNB_DISPATCHED_OPS_PER_TENSOR + cuda_only) * timing.OPTIMIZER_OP_HOST_S
    assert rank.opt_host_s == pytest.approx(host) and rank.opt_host_serial == 1.0
    gpu = cp.memory_time_s(rank.trainable_numel * rank.opt_step_bytes_per_param, get_device("h100-sxm-80gb"))
    assert estimate(sc).time.optimizer_s == pytest.approx(gpu + host)


def test_a_calibrated_bitsandbytes_rate_slows_only_its_8bit_kernel():
    """``Efficiency.bnb_optimizer_fraction`` (from the micro suite's bnb-8bit cases) divides the 8-bit kernel's
    streaming time; the torch and the 32-bit paged optimizers keep the streaming rate."""
    dev = get_device("h100-sxm-80gb")
    slow = dev.model_copy(update={"efficiency": dev.efficiency.model_copy(update={"bnb_optimizer_fraction": 0.25})})
    assert timing.bnb_optimizer_fraction(dev) == 1.0 and timing.bnb_optimizer_fraction(slow) == 0.25
    nbytes = 1e10
    assert timing.optimizer_kernel_s(nbytes, 1.0, slow) == pytest.approx(4 * cp.memory_time_s(nbytes, dev))
    assert timing.optimizer_kernel_s(nbytes, 0.0, slow) == cp.memory_time_s(nbytes, dev)
    sc = Scenario(model="llama-3.2-1b", gpu="h100-sxm-80gb", precision="bf16")
    from simulator.estimate import cost_table_for

    ct = cost_table_for(sc)
    for name, scaled in (("adamw-8bit", True), ("paged-adamw-8bit", True), ("paged-adamw-32bit", False),
                         ("adamw", False)):
        rank = timing.rank_state(ct, sc.parallel, 0, Optimizer(name=name))
        assert rank.opt_bnb8 == float(scaled)
        gpu = cp.memory_time_s(rank.trainable_numel * rank.opt_step_bytes_per_param, dev)
        t_fast = timing.optimizer_step_s(rank, rank.trainable_numel, dev)
        t_slow = timing.optimizer_step_s(rank, rank.trainable_numel, slow)
        assert t_slow - t_fast == pytest.approx(3 * gpu if scaled else 0.0, abs=1e-12), name
