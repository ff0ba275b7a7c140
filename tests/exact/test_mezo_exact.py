"""MeZO (zeroth-order SGD, Malladi et al. 2023) against its reference step run on a real tiny model on CPU
(``validate.cpu_truth.mezo_step``, as princeton-nlp/MeZO's trainer steps): two forwards' FLOPs, no state kept
between steps, and the traffic and operators of the three perturbations and the update."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from simulator import estimate  # noqa: E402
from simulator import memory as mem  # noqa: E402
from simulator.config import ModelArch, Scenario, TrainWorkload  # noqa: E402
from validate.cpu_truth import EXTRA_FLOP_FORMULAS, mezo_step, mezo_update_traffic, train_batch  # noqa: E402
from validate.torch_models import build_model  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

TINY = ModelArch(name="tiny", family="llama", n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, intermediate=128,
                 vocab=128, max_position_embeddings=64)


def _scenario(method: dict) -> Scenario:
    return Scenario.model_validate(dict(model=TINY, method=method, precision="fp32", attention="sdpa-math",
                                        optimizer={"name": "mezo"}, workload=TrainWorkload(micro_batch=2, seq_len=16)))


@pytest.mark.parametrize("method", [{"kind": "full"}, {"kind": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}],
                         ids=["full", "lora"])
def test_mezo_step_flops_and_state_match_the_reference_step(method):
    from torch.utils.flop_counter import FlopCounterMode

    sc = _scenario(method)
    model = build_model(sc)
    batch = train_batch(sc, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as fc:
        mezo_step(model, batch, lr=1e-2)
    e = estimate(sc)
    assert e.flops.per_step == fc.get_total_flops() and e.flops.backward == 0
    # the step keeps nothing between steps: no gradients, no optimizer state; only trainable tensors moved
    assert all(p.grad is None for p in model.parameters())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == {n for n, p in model.named_parameters() if p.requires_grad}
    assert e.memory_bytes.gradients == e.memory_bytes.optimizer_states == e.memory_bytes.activations == 0
    assert e.activations_by_layer == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mezo_perturbation_and_update_traffic(dtype):
    shape, count = (64, 48), 3
    t = mezo_update_traffic(shape, count, dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    assert t.bytes == mem.MEZO_STEP_ACCESSES * count * 64 * 48 * elem
    assert t.ops == mem.MEZO_OPS_PER_TENSOR * count


def test_mezo_memory_is_inference_like():
    """OPT-13B full fine-tuning in fp16 on an 80 GB A100: AdamW does not fit, MeZO does -- the weights, a forward's
    transients and four temporaries of the largest weight (the embedding) during the update."""
    base = dict(model="opt-13b", gpu="a100-sxm-80gb", precision="fp16", method={"kind": "full"},
                workload={"micro_batch": 16, "seq_len": 512})
    adamw = estimate(Scenario.model_validate(base))
    mezo = estimate(Scenario.model_validate({**base, "optimizer": {"name": "mezo"}}))
    assert not adamw.fits and mezo.fits
    weights = mezo.memory_bytes.trainable_weights
    assert weights == adamw.memory_bytes.trainable_weights
    embed = 50272 * 5120 * 2  # the largest weight: OPT-13B's (tied) token embedding in fp16
    base = weights + mezo.memory_bytes.workspaces
    assert mezo.phase_allocated_bytes["optimizer"] == pytest.approx(base + 4 * embed, rel=1e-12)
    # the forward peak: the 16 x 512 tokens' fp16 logits and their fp32 copy for the loss
    assert mezo.peak_phase == "forward"
    assert mezo.phase_allocated_bytes["forward"] == pytest.approx(base + 16 * 512 * 50272 * (2 + 4), rel=1e-12)
    assert mezo.time.backward_s == 0 and mezo.time.forward_s > 0 and mezo.time.optimizer_s > 0


@pytest.mark.parametrize("bad, field", [({"parallel": {"dp": 2}}, "parallel.n_gpus=2"),
                                        ({"workload": {"micro_batch": 1, "seq_len": 64, "grad_accum": 4}},
                                         "workload.grad_accum=4"),
                                        ({"checkpointing": {"mode": "full"}}, "checkpointing.mode='full'")])
def test_mezo_refuses_what_its_trainer_does_not_do(bad, field):
    data = dict(model="llama-3.2-1b", gpu="a100-sxm-80gb", optimizer={"name": "mezo"}, **bad)
    with pytest.raises(ValueError, match="mezo") as err:
        Scenario.model_validate(data)
    assert field in str(err.value)
