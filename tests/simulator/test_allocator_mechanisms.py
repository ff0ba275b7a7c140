"""The caching allocator's reserved-but-free bytes at the training peak, derived from its rules.

``CachingAllocator`` below follows the large pool of c10/cuda/CUDACachingAllocator.cpp for one stream: requests
rounded to 512 B; a request is served from the smallest free cached block at least its size (``get_free_block``),
split when more than ``kSmallSize`` (1 MiB) would remain (``should_split``); else a new segment of
``get_allocation_size`` bytes is created; a freed block merges with free neighbours of its segment
(``try_merge_blocks``); segments are never returned (no ``empty_cache``, no OOM retry).  Running the requests
transformers' upcast loss makes, step after step, shows which block stays cached at the loss backward's peak.
"""

from __future__ import annotations

import numpy as np
import pytest

from hwprofiles import get_device
from simulator import Scenario, estimate
from simulator import memory as mem
from simulator.estimate import MicroBytes, cost_table_for, micro_bytes, peak_of_phases, rank_bytes, train_phase_bytes
from simulator.graph.ir import basis

MiB = 2**20


class CachingAllocator:
    """Large pool of PyTorch's CUDA caching allocator, one stream, no limits (see the module docstring)."""

    def __init__(self) -> None:
        self.segments: list[list[list]] = []  # segment -> ordered blocks [size, owner or None]
        self.allocated = 0
        self.peak_allocated = 0
        self.free_at_peak = 0

    @property
    def reserved(self) -> int:
        return sum(size for seg in self.segments for size, _ in seg)

    def malloc(self, owner: str, request: int) -> None:
        size = int(mem.block_bytes(request))
        best = None
        for s, seg in enumerate(self.segments):
            for i, (bsize, who) in enumerate(seg):
                if who is None and bsize >= size and (best is None or bsize < best[0]):
                    best = (bsize, s, i)
        if best is None:
            self.segments.append([[mem.segment_bytes(size), None]])
            best = (self.segments[-1][0][0], len(self.segments) - 1, 0)
        bsize, s, i = best
        seg = self.segments[s]
        if bsize - size > mem.K_SMALL_SIZE:
            seg[i:i + 1] = [[size, owner], [bsize - size, None]]
        else:
            seg[i][1] = owner
            size = bsize
        self.allocated += size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
            self.free_at_peak = self.reserved - self.allocated

    def free(self, owner: str) -> None:
        for seg in self.segments:
            for i, block in enumerate(seg):
                if block[1] == owner:
                    self.allocated -= block[0]
                    block[1] = None
                    merged = []
                    for b in seg:  # coalesce free neighbours
                        if merged and merged[-1][1] is None and b[1] is None:
                            merged[-1][0] += b[0]
                        else:
                            merged.append(b)
                    seg[:] = merged
                    return
        raise KeyError(owner)


def upcast_loss_step(a: CachingAllocator, logits_numel: int, logits_bytes: int) -> None:
    """The logit-sized requests of one HF training step (transformers ``ForCausalLMLoss``, autograd's order)."""
    n = logits_numel
    a.malloc("logits", n * logits_bytes)  # lm_head output
    a.malloc("upcast", n * 4)  # logits.float()
    a.malloc("log_softmax", n * 4)  # cross_entropy's log_softmax output, saved for backward
    a.free("upcast")  # ForCausalLMLoss returns
    a.free("logits")  # the model output is dropped after .loss
    a.malloc("nll_grad", n * 4)  # NllLossBackward: zeros_like(log_softmax)
    a.malloc("lsm_grad", n * 4)  # LogSoftmaxBackward's grad_input: the peak
    a.free("nll_grad")
    a.free("log_softmax")  # saved variable released after its node
    a.malloc("logits_grad", n * logits_bytes)  # ToCopyBackward: back to the 16-bit dtype
    a.free("lsm_grad")
    a.free("logits_grad")  # after lm_head's backward


@pytest.mark.parametrize("tokens, vocab", [(4096, 128256), (2048, 151936), (8192, 32000)])
def test_upcast_loss_leaves_the_16_bit_logits_block_cached_at_its_backward_peak(tokens, vocab):
    """Every step, at the log-softmax backward (three fp32 logit-sized blocks live), the 16-bit logits' block
    is cached and free: too small for the fp32 requests after it.  That block is loss_stranded_bytes."""
    n = tokens * vocab
    a = CachingAllocator()
    a.malloc("weights", 3 * 2**30)  # something resident before the step
    for _ in range(3):
        a.peak_allocated = 0
        upcast_loss_step(a, n, 2)
        stranded = mem.loss_stranded_bytes("upcast", n, "bf16", True)
        assert a.free_at_peak == mem.segment_bytes(stranded)
    # the steps after the first create no segments: the reserved bytes are stable
    before = a.reserved
    upcast_loss_step(a, n, 2)
    assert a.reserved == before == 3 * 2**30 + mem.segment_bytes(n * 2) + 3 * mem.segment_bytes(n * 4)


def shift_loss_step(a: CachingAllocator, logits_numel: int, logits_bytes: int, shift_16_bit: bool) -> None:
    """The logit-sized requests of a training step with the older model code's shifted loss, under autocast:
    ``logits = logits.float()`` then ``logits[..., :-1, :].contiguous()`` (transformers < 4.46 Llama), or the
    16-bit logits shifted and ``cross_entropy`` upcasting them (Qwen v1 ``modeling_qwen.py``).  The shift drops
    one position, which no block size here resolves, so it is taken as the full count."""
    n = logits_numel
    a.malloc("logits", n * logits_bytes)  # lm_head output
    if shift_16_bit:
        a.malloc("shift", n * logits_bytes)  # lm_logits[..., :-1, :].contiguous()
        a.malloc("upcast", n * 4)  # autocast's fp32 cast inside cross_entropy
        a.malloc("log_softmax", n * 4)  # saved for backward
        a.free("upcast")  # cross_entropy returns
        a.free("shift")  # the forward returns
    else:
        a.malloc("upcast", n * 4)  # logits = logits.float()
        a.free("logits")  # ... drops the 16-bit logits
        a.malloc("shift", n * 4)  # shift_logits = logits[..., :-1, :].contiguous()
        a.malloc("log_softmax", n * 4)  # cross_entropy on fp32: no cast
        a.free("shift")  # the forward returns
    a.free("upcast" if not shift_16_bit else "logits")  # the output (its logits) is dropped after .loss
    a.malloc("nll_grad", n * 4)
    a.malloc("lsm_grad", n * 4)  # the loss backward's peak
    a.free("nll_grad")
    a.free("log_softmax")
    a.malloc("logits_grad", n * logits_bytes)  # ToCopyBackward
    a.malloc("shift_grad", n * logits_bytes if shift_16_bit else n * 4)  # SliceBackward's zeros
    a.free("lsm_grad")
    a.free("logits_grad")
    a.free("shift_grad")


@pytest.mark.parametrize("shift_16_bit", [False, True])
@pytest.mark.parametrize("tokens, vocab", [(4096, 151936), (2048, 32000)])
def test_shifted_loss_strands_its_16_bit_blocks(tokens, vocab, shift_16_bit):
    """Steady state of the shifted loss: reserved - allocated at the forward's and the backward's loss peaks are
    loss_forward_stranded_bytes and loss_stranded_bytes (one 16-bit block: the dropped logits; two where the 16-bit
    logits are shifted), and the forward's allocated peak is the saved log-softmax plus the forward transient of
    loss_transient_bytes."""
    n = tokens * vocab
    shift = "bf16" if shift_16_bit else "fp32"
    fwd, bwd = mem.loss_transient_bytes("upcast-shift", n, "bf16", "fp32", True, shift)
    a = CachingAllocator()
    a.malloc("weights", 3 * 2**30)
    start = a.allocated
    # the first step, recording reserved - allocated where each phase reaches its allocated peak
    peaks: dict[str, tuple[int, int]] = {}
    plain = a.malloc

    def malloc(owner: str, request: int) -> None:
        plain(owner, request)
        phase = "backward" if owner.endswith("grad") else "forward"
        if a.allocated >= peaks.get(phase, (0, 0))[0]:
            peaks[phase] = (a.allocated, a.reserved - a.allocated)

    a.malloc = malloc  # type: ignore[method-assign]
    shift_loss_step(a, n, 2, shift_16_bit)
    # blocks taken whole from rounded segments count their rounding (under 2 MiB each) as allocated
    saved = mem.block_bytes(n * 4)  # the log-softmax output
    assert 0 <= peaks["forward"][0] - start - (saved + fwd) < 4 * MiB
    assert 0 <= peaks["backward"][0] - start - (saved + bwd) < 4 * MiB
    stranded = {"forward": mem.loss_forward_stranded_bytes("upcast-shift", n, "bf16", True, shift),
                "backward": mem.loss_stranded_bytes("upcast-shift", n, "bf16", True, shift)}
    for phase, nbytes in stranded.items():
        blocks = round(nbytes / (n * 2))  # each stranded block a segment of its own, rounded up to 2 MiB
        assert peaks[phase][1] == blocks * mem.segment_bytes(n * 2)
    # later steps create no segments: reserved stays at the most any phase reserved
    most = max(peaks[p][0] + peaks[p][1] for p in peaks)
    assert a.reserved == most
    for _ in range(3):
        shift_loss_step(a, n, 2, shift_16_bit)
        assert a.reserved == most
    assert mem.loss_stranded_bytes("upcast-shift", n, "bf16", True, shift) == n * 2 * (2 if shift_16_bit else 1)
    # without autocast (DeepSpeed's 16-bit engine) the 16-bit shift has no copy and strands nothing
    assert mem.loss_stranded_bytes("upcast-shift", n, "bf16", False, "bf16") == 0.0


def test_no_block_is_stranded_without_a_16_bit_copy():
    """fp32 logits: ``.float()`` returns the same tensor, so the forward frees one fp32 block, which the first
    backward request reuses; a chunked or fused loss makes no logit-sized blocks."""
    assert mem.loss_stranded_bytes("upcast", 1e9, "fp32", False) == 0.0
    assert mem.loss_stranded_bytes("upcast", 1e9, "bf16", False) == 0.0
    assert mem.loss_stranded_bytes("chunked", 1e9, "bf16", True) == 0.0
    assert mem.loss_stranded_bytes("fused", 1e9, "bf16", True) == 0.0
    assert mem.loss_stranded_bytes("upcast", 1e9, "fp16", True) == 2e9


def _lora(**kw) -> Scenario:
    base = {"model": "llama-3.2-1b", "gpu": "h100-sxm-80gb", "precision": "bf16", "attention": "sdpa-flash",
            "method": {"kind": "lora", "r": 16}, "workload": {"task": "train", "micro_batch": 4, "seq_len": 2048}}
    return Scenario.model_validate({**base, **kw})


def test_estimate_adds_the_stranded_block_when_the_loss_backward_is_the_peak():
    """Llama-3.2-1B LoRA, 4 x 2048 tokens: the loss backward (2 x 4 B x 8192 x 128256) is the backward's largest
    transient and the backward the peak phase; reserved - allocated = the peak transient's segment rounding +
    the 16-bit logits (8192 x 128256 x 2 B) + the fragmentation share of the allocated peak."""
    sc = _lora()
    e = estimate(sc)
    n = 4 * 2048 * 128256
    ct = cost_table_for(sc)
    mb = micro_bytes(ct, sc.parallel, basis(4, 2048), 0, sc.loss)
    assert mb.loss_stranded == n * 2
    assert e.peak_phase == "backward"
    rb = rank_bytes(ct, sc.parallel, sc.optimizer, 0, 1)[0]
    phases, transients, held = train_phase_bytes(rb, mb, 1, 1, 0.0)
    rounding = mem.segment_bytes(transients["backward"]) - transients["backward"]
    want = rounding + n * 2 + mem.FRAGMENTATION_FRACTION * e.peak_allocated_bytes
    assert e.peak_reserved_bytes - e.peak_allocated_bytes == pytest.approx(want, rel=1e-12)
    # the same setup with torchtune's chunked loss strands nothing
    chunked = estimate(_lora(loss="chunked"))
    trans = chunked.peak_reserved_bytes - chunked.peak_allocated_bytes
    assert trans < mem.FRAGMENTATION_FRACTION * chunked.peak_allocated_bytes + 2 * MiB


def test_no_stranded_block_when_a_block_backward_is_the_larger_transient():
    """QLoRA on Llama-2-7B with 128 tokens: the backward's largest transient is a block's (the dequantized 16-bit
    copy of an 11008 x 4096 weight beside the block's grads), not the loss backward's two fp32 logit-sized grads
    (2 x 4 B x 128 x 32000 = 33 MB); nothing logit-sized is live around that peak, so nothing is stranded."""
    sc = _lora(model="llama-2-7b", method={"kind": "qlora", "r": 8},
               workload={"task": "train", "micro_batch": 1, "seq_len": 128})
    ct = cost_table_for(sc)
    mb = micro_bytes(ct, sc.parallel, basis(1, 128), 0, sc.loss)
    rb = rank_bytes(ct, sc.parallel, sc.optimizer, 0, 1)[0]
    assert mb.loss_backward == 2 * 4 * 128 * 32000
    assert mb.loss_stranded == 128 * 32000 * 2
    assert rb.dequant >= 11008 * 4096 * 2 > mb.loss_backward
    _, transients, held = train_phase_bytes(rb, mb, 1, 1, 0.0)
    assert held["stranded"]["backward"] == 0.0
    e = estimate(sc)
    # with the loss's saved tensors freed before the blocks' backward, the two phases are within a block's
    # transient of each other: whichever peaks, no logit-sized block is added
    assert e.peak_phase in ("forward", "backward")
    tr = transients[e.peak_phase]
    want = mem.segment_bytes(tr) - tr + mem.FRAGMENTATION_FRACTION * e.peak_allocated_bytes
    assert e.peak_reserved_bytes - e.peak_allocated_bytes == pytest.approx(want, rel=1e-12)


def test_reserved_is_the_most_any_phase_reserves():
    """Stranded bytes belong to their phase, and the allocator keeps its segments: the reserved peak is the largest
    phase's allocated plus stranded bytes, whichever phase allocates the most."""
    none = {"forward": 0.0, "backward": 0.0}
    assert peak_of_phases({"forward": 10.0, "backward": 5.0}, none, True, {"backward": 4.0})[1:] == (10.0, 0.0)
    assert peak_of_phases({"forward": 10.0, "backward": 5.0}, none, True, {"backward": 7.0})[1:] == (10.0, 2.0)
    assert peak_of_phases({"forward": 5.0, "backward": 10.0}, none, True, {"backward": 7.0})[1:] == (10.0, 7.0)
    arrays = peak_of_phases({"forward": np.array([10.0, 5.0]), "backward": np.array([5.0, 10.0])}, none, True,
                            {"backward": 7.0})
    assert arrays[0].tolist() == [0, 1] and arrays[1].tolist() == [10.0, 10.0] and arrays[2].tolist() == [2.0, 7.0]


def test_the_blocks_backward_runs_after_the_loss_has_freed_its_saved_tensors():
    """Autograd frees a node's saved tensors once its backward has run, and the loss and head run first: the
    blocks' backward (recompute included) sees the activations less the head's and loss's share, the loss
    backward sees them all."""
    G = float(2**30)
    sc = _lora()
    rb = rank_bytes(cost_table_for(sc), sc.parallel, sc.optimizer, 0, 1)[0]
    base_mb = dict(saved=10 * G, loss_forward=0.0, recompute=0.0, other=0.0)
    # a loss backward of 1 GiB against a block backward of 3 GiB: with 4 GiB of head tensors freed first the
    # loss side (10 + 1) wins; with 1 GiB freed the blocks' side (10 - 1 + 3) does
    for post, want_extra in ((4 * G, 11 * G), (1 * G, 12 * G)):
        mb = MicroBytes(loss_backward=1 * G, block_backward=3 * G, post_saved=post, **base_mb)
        phases, transients, held = train_phase_bytes(rb, mb, 1, 1, 0.0)
        fixed = phases["optimizer"] - transients["optimizer"] - rb.step_gradients  # the model states
        grads = held["gradients"]["backward"]
        assert phases["backward"] - fixed - grads == pytest.approx(want_extra, rel=1e-12)
        assert held["activations"]["backward"] == (10 * G if post == 4 * G else 9 * G)


def test_qwen_v1_shifted_16_bit_logits_strand_two_blocks_at_the_loss_backward():
    """Qwen (v1) remote code shifts the bf16 logits and lets autocast's cross_entropy upcast them: at the loss
    backward both bf16 blocks (logits and shifted copy, 2 x 2 B x b*s*V) sit cached and free beside it, and the
    reserved peak carries them.  Without autocast (DeepSpeed's fp16 engine) nothing is upcast or stranded."""
    sc = _lora(model="qwen-1.8b", precision="bf16-amp", loss="upcast-shift", attention="flash2",
               method={"kind": "lora", "r": 64}, workload={"task": "train", "micro_batch": 1, "seq_len": 4096},
               checkpointing={"mode": "full"})
    n = 4096 * 151936
    ct = cost_table_for(sc)
    mb = micro_bytes(ct, sc.parallel, basis(1, 4096), 0, sc.loss)
    assert ct.loss_shift_dtype == "bf16"
    assert (mb.loss_stranded, mb.loss_stranded_forward) == (2 * n * 2, 0.0)
    e = estimate(sc, what_fits=False, timing=False)
    rb = rank_bytes(ct, sc.parallel, sc.optimizer, 0, 1)[0]
    dev = get_device(sc.gpu)
    ws = dev.cublas_workspace_bytes * 2.0 + dev.cublaslt_workspace_bytes
    phases, transients, held = train_phase_bytes(rb, mb, 1, 1, ws)
    bwd = phases["backward"]
    want = bwd + mem.segment_bytes(transients["backward"]) - transients["backward"] + 2 * n * 2 \
        + mem.FRAGMENTATION_FRACTION * bwd
    assert e.peak_reserved_bytes == pytest.approx(max(want, e.peak_allocated_bytes), rel=1e-12)
    assert e.peak_reserved_bytes - e.peak_allocated_bytes > 2 * n * 2


def test_stranded_blocks_are_released_when_the_device_is_full():
    """Stranded blocks are whole free segments, which the allocator releases and retries with when cudaMalloc
    fails: a setup whose allocated bytes fit but whose stranded logits would not still fits, its reserved
    bytes at most the device's, while one whose allocated bytes do not fit still does not."""
    G = float(2**30)
    phases = {"forward": 70 * G, "backward": 72 * G}
    zero = {"forward": 0.0, "backward": 0.0}
    limit = 75 * G
    _, allocated, over = peak_of_phases(phases, zero, True, {"backward": 6 * G}, limit)
    assert allocated + over == limit  # the 6 GiB are released down to what the device has
    _, allocated, over = peak_of_phases(phases, zero, True, {"backward": 6 * G}, 100 * G)
    assert allocated + over == 78 * G  # room enough: they stay cached
    _, allocated, over = peak_of_phases({"forward": 70 * G, "backward": 80 * G}, zero, True, {"backward": 6 * G},
                                        limit)
    assert allocated + over == 80 * G > limit  # the allocated bytes alone overflow: no release helps


@pytest.mark.parametrize("model, shift", [("gpt2-large", "bf16"), ("bloom-7b1", "bf16"), ("opt-6.7b", "bf16"),
                                          ("llama-2-7b", "fp32")])
def test_older_transformers_shift_what_each_family_head_returned(model, shift):
    """Before transformers 4.46 GPT-2, OPT, BLOOM, GPT-NeoX and Falcon shifted the 16-bit logits (autocast's
    cross_entropy upcasting the shifted copy), the Llama-like models their ``logits.float()`` copy: the first
    strand two 16-bit blocks at the loss backward, the second one (the dropped 16-bit logits) at both peaks.
    From 4.46 every family's ``ForCausalLMLoss`` upcasts the unshifted logits."""
    kw = dict(model=model, precision="bf16-amp", workload={"task": "train", "micro_batch": 2, "seq_len": 512})
    sc = _lora(loss="upcast-shift", **kw)
    ct = cost_table_for(sc)
    n = ct.at(ct.logits_numel, basis(2, 512))
    mb = micro_bytes(ct, sc.parallel, basis(2, 512), 0, sc.loss)
    assert ct.loss_shift_dtype == shift
    blocks = (2, 0) if shift == "bf16" else (1, 1)
    assert (mb.loss_stranded, mb.loss_stranded_forward) == (blocks[0] * n * 2, blocks[1] * n * 2)
    new = cost_table_for(_lora(loss="upcast", **kw))
    assert new.loss_upcast_copy and new.loss_dtype == "fp32"
