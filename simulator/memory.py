"""Per-device memory, one small pure function per quantity.

Every constant here is a fact of a software stack (PyTorch, bitsandbytes, HF), cited beside
it; hardware numbers come from the device profile.
"""

from __future__ import annotations

import math

import numpy as np

from .config.training import BNB_8BIT_OPTIMIZERS, BNB_OPTIMIZERS
from .units import MiB, dtype_bytes

# ---------------------------------------------------------------------------------------------
# Optimizer states
# ---------------------------------------------------------------------------------------------

BNB_BLOCKSIZE = 256  # bitsandbytes optimizer.py: blockwise 8-bit states, one fp32 absmax per 256 values
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes Optimizer8bit: tensors smaller than this keep fp32 states
BNB_QMAP_BYTES = 2 * 256 * 4
"""bitsandbytes 8-bit Adam's two quantization maps (``qmap1`` dynamic, ``qmap2`` unsigned dynamic): 256 fp32
values each, one copy per device shared by every 8-bit state (``Optimizer8bit.fill_qmap`` / ``name2qmap``)."""


def adam_state_bytes(numel: int, dtype: str) -> float:
    """torch.optim.Adam/AdamW: exp_avg and exp_avg_sq in the parameter's dtype (8 B/param fp32, 4 B/param bf16)."""
    return 2.0 * numel * dtype_bytes(dtype)


def bnb_8bit_state_bytes(numel: int, n_states: int) -> float:
    """bitsandbytes 8-bit blockwise states: uint8 + fp32 absmax per 256 values; small tensors stay fp32."""
    if numel < BNB_MIN_8BIT_SIZE:
        return n_states * numel * 4.0
    return n_states * (numel * 1.0 + math.ceil(numel / BNB_BLOCKSIZE) * 4.0)


def adafactor_state_bytes(numel: int, shape: tuple[int, ...], beta1: bool) -> float:
    """HF Adafactor: factored second moment for >= 2-D params (row: shape[:-1], col: shape[:-2]+shape[-1:]),
    full second moment otherwise; fp32 (grads are upcast before the state is created); exp_avg if beta1."""
    if len(shape) >= 2:
        rows = numel // shape[-1]
        cols = numel // shape[-2]
        v = (rows + cols) * 4.0
    else:
        v = numel * 4.0
    return v + (numel * 4.0 if beta1 else 0.0)


TensorGroup = tuple[int, str, tuple[int, ...], int]
"""(numel, dtype, shape, count): identical trainable tensors, counted once."""


def _state_bytes_one(numel: int, dtype: str, shape: tuple[int, ...], name: str, beta1: bool) -> float:
    if name in ("adamw", "adam"):
        return adam_state_bytes(numel, dtype)
    if name == "paged-adamw-32bit":
        return 2.0 * numel * 4.0
    if name in BNB_8BIT_OPTIMIZERS:
        return bnb_8bit_state_bytes(numel, 2)
    if name in ("sgd-momentum", "lion"):
        return numel * dtype_bytes(dtype)
    if name == "sgd":
        return 0.0
    if name == "adafactor":
        return adafactor_state_bytes(numel, shape, beta1)
    raise ValueError(f"optimizer {name!r} unknown; allowed: adamw, adam, sgd, sgd-momentum, adafactor, lion, "
                     "adamw-8bit, paged-adamw-8bit, paged-adamw-32bit")


def optimizer_state_bytes(groups: list[TensorGroup], name: str, beta1: bool = True) -> float:
    """Optimizer state bytes on the device for the trainable tensors.

    ``step`` counters are excluded: torch keeps them on the CPU unless ``fused``/``capturable``
    (a 0-dim fp32 tensor per parameter: see :func:`step_counter_bytes`).
    """
    states = sum(_state_bytes_one(n, d, s, name, beta1) * c for n, d, s, c in groups)
    if name in BNB_8BIT_OPTIMIZERS and any(n >= BNB_MIN_8BIT_SIZE for n, _, _, _ in groups):
        states += BNB_QMAP_BYTES
    return states


def step_counter_bytes(n_tensors: int, name: str, impl: str = "foreach", *, on_device_only: bool = True) -> float:
    """0-dim fp32 tensors per parameter: torch Adam/AdamW ``state['step']`` (host memory unless
    ``fused``/``capturable``), HF Adafactor ``state['RMS']`` (on the parameter's device)."""
    if name in ("adamw", "adam"):
        return 4.0 * n_tensors if (impl == "fused" or not on_device_only) else 0.0
    if name in ("adafactor", "galore-adafactor"):
        return 4.0 * n_tensors
    return 0.0  # galore-torch's AdamW and bitsandbytes keep ``step`` as a Python int


# torch <= 2.0 ``_multi_tensor_adam(w)``: ``exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs)`` then
# ``denom = _foreach_add(exp_avg_sq_sqrt, eps)`` (out of place) -- both param-sized lists are alive at
# ``_foreach_addcdiv_(params, exp_avgs, denom, step_size)`` (torch/optim/adamw.py of the 2.0 release);
# torch 2.1 adds eps in place (``_foreach_add_(exp_avg_sq_sqrt, eps)``), leaving one.
FOREACH_ADAM_TORCH20_COPIES = 2.0


def optimizer_temp_bytes(groups: list[TensorGroup], name: str, impl: str) -> float:
    """Transient memory of ``optimizer.step()``.

    torch docs (Adam): "the foreach implementation uses ~ sizeof(params) more peak memory than the
    for-loop version due to the intermediates being a tensorlist"; fused needs none; the for-loop
    one parameter's worth.  bitsandbytes 8-bit/paged kernels update in place; HF Adafactor upcasts
    one parameter and its gradient to fp32 at a time.
    """
    if not groups or name == "sgd" or name in BNB_OPTIMIZERS:
        return 0.0
    if name == "adafactor":
        return max(2.0 * n * 4.0 for n, _, _, _ in groups)
    if impl == "fused":
        return 0.0
    if impl == "for-loop":
        return max(n * dtype_bytes(d) for n, d, _, _ in groups)
    one_copy = sum(n * dtype_bytes(d) * c for n, d, _, c in groups)
    if impl == "foreach-torch2.0" and name in ("adamw", "adam"):
        return FOREACH_ADAM_TORCH20_COPIES * one_copy
    return one_copy


# ---------------------------------------------------------------------------------------------
# GaLore (Zhao et al. 2024, arXiv 2403.03507): galore-torch 1.0 galore_projector.py, adamw.py, adamw8bit.py,
# adafactor.py -- each projected weight keeps its optimizer states on the low-rank gradient and a projector
# ---------------------------------------------------------------------------------------------


def galore_side(shape: tuple[int, ...], proj_type: str) -> str:
    """Which factor ``GaLoreProjector.project`` keeps for an (m, n) weight: "right" (Vh rows, r x n; gradient
    G Pᵀ is m x r), "left" (U columns, m x r; Pᵀ G is r x n) or "full" (both; r x r)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"optimizer.galore_proj_type={proj_type!r} unknown; allowed: std, reverse_std, left, right, full")


def galore_low_rank_shape(shape: tuple[int, ...], rank: int, proj_type: str) -> tuple[int, int]:
    """Shape of the projected gradient (and of the optimizer states): the SVD keeps at most min(m, n) directions."""
    m, n = shape
    r = min(rank, m, n)
    return {"right": (m, r), "left": (r, n), "full": (r, r)}[galore_side(shape, proj_type)]


def galore_projector_bytes(shape: tuple[int, ...], rank: int, proj_type: str, svd_dtype: str, param_dtype: str) -> float:
    """The projector ``GaLoreProjector.ortho_matrix``.  ``get_orthogonal_matrix`` runs ``torch.linalg.svd`` in fp32;
    for an fp32 input the kept factor is a slice of U (``U[:, :rank]``) or Vh (``Vh[:rank, :]``) -- a view that keeps
    the whole (m x k) or (k x n) factor alive -- otherwise a contiguous r-wide copy in the parameter's dtype."""
    m, n = shape
    k = min(m, n)
    r = min(rank, k)
    side = galore_side(shape, proj_type)
    if svd_dtype == "fp32":
        return 4.0 * {"right": k * n, "left": m * k, "full": m * k + k * n}[side]
    return dtype_bytes(param_dtype) * {"right": r * n, "left": m * r, "full": (m + n) * r}[side]


def galore_svd_transient_bytes(shape: tuple[int, ...], rank: int, proj_type: str, svd_dtype: str) -> float:
    """Bytes of a projector refresh (the first step and every ``update_proj_gap`` steps) beyond what stays:
    the fp32 copy of a 16-bit gradient, U (m x k), S (k) and Vh (k x n) of the reduced SVD, less the factor an
    fp32 projector keeps (see :func:`galore_projector_bytes`).  cuSOLVER's own workspace is not counted."""
    m, n = shape
    k = min(m, n)
    svd = 4.0 * (m * k + k + k * n) + (0.0 if svd_dtype == "fp32" else 4.0 * m * n)
    kept = galore_projector_bytes(shape, rank, proj_type, svd_dtype, svd_dtype) if svd_dtype == "fp32" else 0.0
    return svd - kept


def galore_svd_dtype(base: str, dtype: str) -> str:
    """Dtype of the gradient GaLore decomposes: galore-torch's Adafactor upcasts 16-bit gradients to fp32 before
    projecting (as HF Adafactor does), its AdamW variants project the gradient as it is."""
    return "fp32" if base == "adafactor" else dtype


def galore_matrix_state_bytes(shape: tuple[int, ...], dtype: str, base: str, rank: int, proj_type: str,
                              beta1: bool = True) -> float:
    """Optimizer states plus projector of one projected (m, n) weight under ``base`` (adamw: both moments in the
    gradient's dtype; adamw-8bit: bitsandbytes blockwise states of the low-rank shape; adafactor: HF Adafactor's
    fp32 factored states of the upcast, projected gradient)."""
    low = galore_low_rank_shape(shape, rank, proj_type)
    states = _state_bytes_one(low[0] * low[1], dtype, low, base, beta1)
    return states + galore_projector_bytes(shape, rank, proj_type, galore_svd_dtype(base, dtype), dtype)


def galore_matrix_step_bytes(shape: tuple[int, ...], dtype: str, base: str, rank: int, proj_type: str) -> float:
    """Peak transient of one projected weight's step (the optimizers walk parameters one at a time):
    the larger of a projector refresh and the update --
    adamw: the projected gradient, ``denom`` and ``exp_avg / denom`` (low-rank), then ``project_back``'s full-size
    matmul and its ``* scale`` copy; adamw-8bit: the projected gradient, its clone as ``p.data`` and the two full-size
    project-back tensors (the parameter's own ``saved_data`` clone replaces it); adafactor: fp32 copies of a 16-bit
    gradient and parameter, three low-rank fp32 tensors and the two fp32 project-back tensors."""
    m, n = shape
    lo = galore_low_rank_shape(shape, rank, proj_type)
    low = lo[0] * lo[1]
    b = dtype_bytes(dtype)
    refresh = galore_svd_transient_bytes(shape, rank, proj_type, galore_svd_dtype(base, dtype))
    if base == "adamw":
        update = b * (3.0 * low + 2.0 * m * n)
    elif base == "adamw-8bit":
        update = b * (2.0 * low + 2.0 * m * n)
    else:
        upcast = 0.0 if dtype == "fp32" else 2.0 * 4.0 * m * n
        update = upcast + 4.0 * (3.0 * low + 2.0 * m * n)
    return max(refresh, update)


def galore_other_step_bytes(numel: int, dtype: str, base: str) -> float:
    """Transient of an unprojected parameter's step in a GaLore optimizer: galore-torch's AdamW builds ``denom`` and
    ``exp_avg / denom`` (two copies); bitsandbytes updates in place; Adafactor as :func:`optimizer_temp_bytes`."""
    if base == "adamw":
        return 2.0 * numel * dtype_bytes(dtype)
    if base == "adafactor":
        return 2.0 * numel * 4.0
    return 0.0


def optimizer_is_paged(name: str) -> bool:
    """bitsandbytes paged optimizers allocate states in CUDA managed memory, outside PyTorch's allocator."""
    return name.startswith("paged-")


def paged_resident_bytes(paged_bytes, free_bytes, working_bytes):
    """Paged (CUDA managed) optimizer states resident on the device (numbers or arrays).

    Managed pages migrate on demand and the driver evicts them to host memory when the device is full:
    bitsandbytes' paged optimizers "automatically evict optimizer state to CPU RAM when GPU memory runs out"
    (bitsandbytes docs, Paged optimizers).  They hold what PyTorch's allocator and the CUDA context leave
    free (``free_bytes``), and at least ``working_bytes``: the states of the tensor being updated, which
    ``Optimizer8bit.prefetch_state`` brings in before its update (bitsandbytes/optim/optimizer.py)."""
    return np.minimum(paged_bytes, np.maximum(free_bytes, working_bytes)) if isinstance(
        free_bytes, np.ndarray) else min(paged_bytes, max(free_bytes, working_bytes))


def paged_working_bytes(groups: list[TensorGroup], name: str, beta1: bool = True) -> float:
    """The paged states of the largest trainable tensor (the least a paged optimizer needs on the device)."""
    if not optimizer_is_paged(name) or not groups:
        return 0.0
    return max(_state_bytes_one(n, d, s, name, beta1) for n, d, s, _ in groups)


# ---------------------------------------------------------------------------------------------
# Loss / logits transients
# ---------------------------------------------------------------------------------------------


def loss_forward_transient_bytes(logits_numel: float, logits_dtype: str, upcast_copy: bool) -> float:
    """Live at the cross-entropy in forward besides the saved log-softmax output: the logits
    (HF returns them) and their fp32 copy (``logits.float()`` in ``ForCausalLMLoss``)."""
    return logits_numel * dtype_bytes(logits_dtype) + (logits_numel * 4.0 if upcast_copy else 0.0)


def generation_logits_bytes(batch: int, vocab: int, compute_bytes: float, tp: int = 1) -> float:
    """Logits of one generation step: the last position's ``batch x vocab`` in the compute dtype and the
    fp32 copy ``generate`` samples from (``outputs.logits[:, -1, :].to(copy=True, dtype=torch.float32)``),
    vocab-parallel over ``tp`` ranks."""
    return batch * vocab * (compute_bytes + 4.0) / tp


def prefill_head_bytes(tokens: int, hidden: int, vocab: int, compute_bytes: float, tp: int = 1) -> float:
    """Live at the LM head of a forward that keeps every position's logits: the final norm's output
    (``tokens x hidden``, replicated) and the logits (``tokens x vocab``, vocab-parallel), both in the compute
    dtype (transformers >= 4.45 no longer upcasts the logits of a forward without labels)."""
    return tokens * (hidden + vocab / tp) * compute_bytes


# MeZO (Malladi et al. 2023, arXiv 2305.17333; princeton-nlp/MeZO large_models/trainer.py): per step the trainable
# parameters are perturbed three times (+eps z, -2 eps z, +eps z) and updated once, z regenerated from the step's seed
# for each tensor.  A perturbation ``param.data = param.data + scaling_factor * z * eps`` writes z and two products and
# builds the new parameter beside the old one: 8 parameter-sized accesses and 3 parameter-sized temporaries live; the
# update ``param.data - lr * (projected_grad * z + weight_decay * param.data)``: 13 accesses, 4 temporaries at most.
MEZO_STEP_ACCESSES = 3 * 8 + 13
MEZO_STEP_TEMPORARIES = 4
# operators dispatched per tensor: each ``param.data`` read is a detach -- 4 of them + normal, mul, mul, add per
# perturbation; 5 + normal, mul, mul, add, mul, sub for the update
MEZO_OPS_PER_TENSOR = 3 * (4 + 4) + (5 + 6)


def mezo_step_transient_bytes(largest_trainable_bytes: float) -> float:
    """MeZO's parameter update, one tensor at a time: its temporaries (z and the products) beside the parameter."""
    return MEZO_STEP_TEMPORARIES * largest_trainable_bytes


def loss_stranded_bytes(mode: str, logits_numel: float, logits_dtype: str, upcast_copy: bool,
                        shift_dtype: str = "fp32") -> float:
    """Reserved but free at the loss backward: the forward's 16-bit logit-sized blocks.

    The loss forward makes its fp32 copy (``logits.float()``, or autocast's cast inside ``cross_entropy``) and the
    fp32 log-softmax; the forward frees the copy and, once the output is dropped, the 16-bit logits.  The backward
    then asks for two fp32 logit-sized blocks (nll_loss's ``zeros_like`` grad and log_softmax's grad): the first
    takes a freed fp32 block, the second a new segment, because the caching allocator serves a request only from a
    free block at least its size (c10/cuda/CUDACachingAllocator.cpp ``get_free_block``), and a 16-bit block is half
    that.  The 16-bit blocks stay cached through the peak, every step: the logits' (``ForCausalLMLoss``; and the
    older model code that upcasts before shifting, ``logits = logits.float()``), and with model code that shifts the
    16-bit logits (``shift_logits = lm_logits[..., :-1, :].contiguous()``, Qwen v1) the shifted copy's as well.
    A chunked or fused loss has no logit-sized blocks, fp32 logits no copy."""
    if mode not in ("upcast", "upcast-shift") or not upcast_copy or dtype_bytes(logits_dtype) >= 4.0:
        return 0.0
    blocks = 2.0 if mode == "upcast-shift" and dtype_bytes(shift_dtype) < 4.0 else 1.0
    return blocks * logits_numel * dtype_bytes(logits_dtype)


def loss_forward_stranded_bytes(mode: str, logits_numel: float, logits_dtype: str, upcast_copy: bool,
                                shift_dtype: str = "fp32") -> float:
    """Reserved but free at the loss forward: the 16-bit logits that ``logits = logits.float()`` frees before the
    fp32 shifted copy asks for a block twice their size (older model code, loss 'upcast-shift').  Where the
    logits stay referenced (``ForCausalLMLoss``) or the 16-bit logits are shifted, nothing is free yet."""
    if mode != "upcast-shift" or not upcast_copy or dtype_bytes(logits_dtype) >= 4.0 or dtype_bytes(shift_dtype) < 4.0:
        return 0.0
    return logits_numel * dtype_bytes(logits_dtype)


def loss_backward_transient_bytes(logits_numel: float, loss_dtype: str = "fp32") -> float:
    """At ``log_softmax`` backward: the grad from nll_loss and the grad it produces, both in the loss
    dtype (2 x 4 B x b*s*V after HF's fp32 upcast); the saved log-softmax output is counted with
    the activations."""
    return 2.0 * dtype_bytes(loss_dtype) * logits_numel


# torchtune CEWithChunkedOutputLoss default (num_output_chunks=8); litgpt's 128-token chunks are smaller
LOSS_CHUNKS = 8


def loss_transient_bytes(mode: str, logits_numel: float, logits_dtype: str, loss_dtype: str,
                         upcast_copy: bool, shift_dtype: str = "fp32") -> tuple[float, float]:
    """(forward, backward) transient bytes of the loss for the four loss implementations.

    - upcast (HF): logits + their fp32 copy in forward; two logit-sized grads in the loss dtype in backward.
    - upcast-shift (transformers < 4.46, remote code): ``logits.float()`` then
      ``shift_logits = logits[..., :-1, :].contiguous()``: one more logit-sized copy in forward, fp32 after the
      upcast (``logits = logits.float()`` has dropped the 16-bit logits by then), in the logits' dtype where the
      model code shifts the 16-bit logits (Qwen v1; autocast's fp32 cast inside ``cross_entropy`` comes after).
    - chunked (torchtune/litgpt): 16-bit logits kept; the fp32 copy and grads exist one chunk at a time.
    - chunked-compiled (torchtune with torch.compile): the 16-bit logits are saved for backward (counted with
      the activations); the compiled forward is one fused reduction (nothing logit-sized), the compiled backward
      writes one chunk's 16-bit logit grad at a time.
    - fused (Liger linear+CE): per chunk logits and their grad; nothing b*s*V-sized survives.
    """
    if mode in ("upcast", "upcast-shift"):
        forward = loss_forward_transient_bytes(logits_numel, logits_dtype, upcast_copy)
        if mode == "upcast-shift":
            # the shifted copy; ``logits = logits.float()`` has dropped the 16-bit logits (a block half its size)
            forward += logits_numel * dtype_bytes(shift_dtype) - loss_forward_stranded_bytes(
                mode, logits_numel, logits_dtype, upcast_copy, shift_dtype)
        return forward, loss_backward_transient_bytes(logits_numel, loss_dtype)
    chunk = logits_numel / LOSS_CHUNKS
    if mode == "chunked":
        return (logits_numel * dtype_bytes(logits_dtype) + chunk * 4.0, 2.0 * 4.0 * chunk)
    if mode == "chunked-compiled":
        return (0.0, chunk * dtype_bytes(logits_dtype))
    return (2.0 * 4.0 * chunk, 2.0 * 4.0 * chunk)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


# vLLM profiles one forward over its token budget before sizing the KV pool: max_num_batched_tokens, at least
# 2048 (vllm/config.py SchedulerConfig: max(max_model_len, 2048) without chunked prefill, 2048 or more with it).
VLLM_PROFILE_TOKENS = 2048


def paged_context_tokens(tokens: int, block_tokens: int) -> int:
    """Tokens of KV cache a sequence of ``tokens`` holds in a paged pool: whole blocks of ``block_tokens``."""
    return -(-tokens // block_tokens) * block_tokens


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, batch: int, dtype: str,
                   *, sliding_window: int | None = None, full_layers: int | None = None) -> float:
    """2 (K and V) x layers x kv heads x head_dim x context x batch x bytes/element.

    With a sliding window, ``n_layers - full_layers`` layers keep at most ``sliding_window`` tokens
    (transformers' sliding-window cache layers, vLLM's sliding-window blocks)."""
    per_token_layer = 2.0 * n_kv_heads * head_dim * batch * dtype_bytes(dtype)
    if sliding_window is None:
        return per_token_layer * n_layers * tokens
    full = n_layers if full_layers is None else full_layers
    return per_token_layer * (full * tokens + (n_layers - full) * min(tokens, sliding_window))


# ---------------------------------------------------------------------------------------------
# Caching allocator
# ---------------------------------------------------------------------------------------------

K_SMALL_SIZE = 1 * MiB  # c10/cuda/CUDACachingAllocator.cpp kSmallSize
K_SMALL_BUFFER = 2 * MiB  # kSmallBuffer: small requests packed in 2 MiB segments
K_LARGE_BUFFER = 20 * MiB  # kLargeBuffer: 1-10 MiB requests get a 20 MiB segment
K_MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc
K_ROUND_LARGE = 2 * MiB  # kRoundLarge: larger requests rounded up to 2 MiB


def block_bytes(request: float) -> float:
    """Bytes a single request occupies in ``memory_allocated``: rounded up to 512 B."""
    return math.ceil(request / 512) * 512


def segment_bytes(request):
    """Bytes of the cudaMalloc segment a fresh request creates (what ``memory_reserved`` grows by);
    element-wise for an array of requests."""
    if isinstance(request, np.ndarray):
        return np.where(request <= K_SMALL_SIZE, float(K_SMALL_BUFFER),
                        np.where(request < K_MIN_LARGE_ALLOC, float(K_LARGE_BUFFER),
                                 np.ceil(request / K_ROUND_LARGE) * K_ROUND_LARGE))
    if request <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if request < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return math.ceil(request / K_ROUND_LARGE) * K_ROUND_LARGE


# Share of the allocated peak that the caching allocator holds as cached-but-free blocks at the
# peak (blocks freed by the forward that the backward's differently sized requests cannot reuse).
# A default, to be replaced by the value fitted by ``python -m validate`` from measured
# max_memory_reserved / max_memory_allocated pairs.
FRAGMENTATION_FRACTION = 0.03


def reserved_overhead_bytes(peak_transient, allocated_peak, expandable_segments: bool):
    """Reserved minus allocated at the peak, besides the blocks stranded there (those
    :func:`simulator.estimate.peak_of_phases` adds, e.g. :func:`loss_stranded_bytes`, and releases when the device
    is full).

    The transient that creates the peak gets a fresh segment (rounded per :func:`segment_bytes`), and other
    cached-but-free blocks add a fragmentation share of the allocated peak.  With ``expandable_segments``
    segments grow in place and only the rounding remains.
    """
    if isinstance(peak_transient, np.ndarray):
        rounding = np.where(peak_transient > 0, segment_bytes(peak_transient) - peak_transient, 0.0)
    else:
        rounding = segment_bytes(peak_transient) - peak_transient if peak_transient > 0 else 0.0
    if expandable_segments:
        return rounding
    return rounding + FRAGMENTATION_FRACTION * allocated_peak
