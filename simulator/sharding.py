"""Where each byte of model state lives once the job is spread over devices.

One small pure function per quantity.  The order of placement is the order the frameworks apply it
(torchtitan's ``parallelize_llama``: TP, then pipeline stages, then data-parallel sharding):

1. tensor parallel splits the column/row-parallel weights and the vocab-parallel embedding/head
   (``ParamRow.tp_split``), expert parallel splits the MoE experts (``ParamRow.expert``);
2. pipeline parallel gives each stage a contiguous run of blocks (the first stage also the
   embeddings, the last the final norm and head; a tied embedding has a copy on the last stage,
   as Megatron-LM keeps it);
3. ZeRO / FSDP partition what is left over the data-parallel ranks.

Model-state bytes follow the ZeRO paper (arXiv 1910.02054, section 3): with mixed-precision Adam a
DeepSpeed rank holds 2Psi of 16-bit weights, 2Psi of 16-bit gradients and K=12 Psi of fp32 master
copy + moments, stage s dividing the last 1, 2 or 3 terms by N_d.  FSDP keeps the sharded
parameters in their own dtype (fp32 under a mixed-precision policy) and gathers 16-bit copies per
unit (docs.pytorch.org FSDP notes; reference section 6.3).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np

from . import memory as mem
from .config.parallel import Parallel
from .galore import galore_state_bytes
from .graph.compile import CostTable, ParamRow
from .units import dtype_bytes


def stage_layer_ranges(n_blocks: int, pp: int) -> list[range]:
    """Contiguous blocks per pipeline stage; the first ``n_blocks % pp`` stages take one more
    (numpy.array_split's convention; Megatron-LM requires an even split, torchtitan does not)."""
    base, extra = divmod(n_blocks, pp)
    out, start = [], 0
    for i in range(pp):
        n = base + (1 if i < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def stages_to_check(pp: int) -> list[int]:
    """Pipeline stages whose peak memory or compute can be the largest: all of them for short pipelines; else
    the first two (most micro-batches in flight, one extra block under an uneven split) and the last (head
    and logits)."""
    return list(range(pp)) if pp <= 8 else [0, 1, pp - 1]


def row_count_on_stage(row: ParamRow, stage: int, layers: range, pp: int, tied_head: bool) -> int:
    """How many copies of ``row`` stage ``stage`` holds (blocks of the row's variant in the stage's range)."""
    if row.where == "pre":
        return int(stage == 0) + int(tied_head and pp > 1 and stage == pp - 1 and row.tp_split)
    if row.where == "post":
        return int(stage == pp - 1)
    return bisect_left(row.layers, layers.stop) - bisect_left(row.layers, layers.start)  # layers are sorted


def row_split_factor(row: ParamRow, par: Parallel) -> float:
    """Share of the tensor one rank holds after tensor and expert parallelism."""
    f = 1.0 / par.tp if row.tp_split else 1.0
    return f / par.ep if row.expert else f


@dataclass(frozen=True)
class RankParams:
    """The parameters placed on one rank of one pipeline stage, before data-parallel sharding."""

    frozen_bytes: float = 0.0  # dense frozen weights
    quant_bytes: float = 0.0  # packed quantized weights
    scale_bytes: float = 0.0  # their scales
    trainable_numel: float = 0.0
    trainable_bytes: float = 0.0
    groups: tuple[tuple[float, str, tuple[int, ...], int], ...] = ()  # (numel, dtype, shape, count) for the optimizer
    n_trainable_tensors: int = 0
    largest_trainable_bytes: float = 0.0
    small_bytes: float = 0.0  # bytes in tensors under the ZeRO-3 persistence threshold (never partitioned)
    largest_block_numel: float = 0.0  # one block's parameters (an FSDP unit / ZeRO-3 fetch)
    root_numel: float = 0.0  # embeddings + final norm + head on this stage (FSDP's root unit)
    blocks_numel: float = 0.0  # all block parameters on this stage
    # the same split into dense elements (gathered in the compute dtype) and packed quantized bytes with their
    # scales (gathered as stored: bitsandbytes' quant_storage, torchao's NF4Tensor all-gather), per block
    # variant as (dense numel, quantized bytes, trainable numel)
    block_units: tuple[tuple[float, float, float], ...] = ()
    root_dense_numel: float = 0.0
    root_quant_bytes: float = 0.0
    embedding_unit_numels: tuple[float, ...] = ()  # the input embedding and output projection matrices (dense)
    blocks_dense_numel: float = 0.0
    blocks_quant_bytes: float = 0.0
    n_blocks: int = 0
    mixed_unit_frozen_bytes: float = 0.0  # frozen dense weights in units (blocks, root) that also hold trainable ones


def rank_params(ct: CostTable, par: Parallel, stage: int = 0) -> RankParams:
    """Parameters one rank of ``stage`` holds after TP / EP / PP placement (cached on the cost table)."""
    key = (par.tp, par.ep, par.pp, par.stage3_param_persistence_threshold, stage)
    cache = ct.__dict__.setdefault("_rank_params", {})
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = _rank_params(ct, par, stage)
    return hit


def _rank_params(ct: CostTable, par: Parallel, stage: int) -> RankParams:
    layers = stage_layer_ranges(ct.n_blocks, par.pp)[stage]
    tied = ct.arch.tied_embeddings
    frozen = quant = scales = tn = tb = small_b = root = blocks = 0.0
    groups: dict[tuple[float, str, tuple[int, ...]], int] = {}
    largest = 0.0
    per_variant: dict[tuple[int, ...], float] = {}  # one block's parameters, per block variant on the stage
    unit_split: dict[tuple[int, ...], list[float]] = {}  # per block variant: dense numel, quantized bytes, trainable
    root_dense = root_quant = blocks_dense = blocks_quant = 0.0
    embed_units: list[float] = []
    unit_frozen: dict[object, float] = {}  # frozen dense bytes per FSDP unit kind (a block variant, or the root)
    unit_trains: set[object] = set()  # unit kinds holding a trainable parameter
    thr = par.stage3_param_persistence_threshold
    for row in ct.param_rows:
        count = row_count_on_stage(row, stage, layers, par.pp, tied)
        if not count:
            continue
        f = row_split_factor(row, par)
        numel, nbytes = row.numel * f, row.storage_bytes * f
        if row.quantized:
            quant += (row.storage_bytes - row.scale_bytes) * f * count
            scales += row.scale_bytes * f * count
        elif row.trainable:
            tn += numel * count
            tb += nbytes * count
            groups[(numel, row.dtype, row.shape)] = groups.get((numel, row.dtype, row.shape), 0) + count
            largest = max(largest, nbytes)
        else:
            frozen += nbytes * count
        unit = row.layers if row.where == "block" else "root"
        if row.trainable:
            unit_trains.add(unit)
        elif not row.quantized:
            unit_frozen[unit] = unit_frozen.get(unit, 0.0) + nbytes * count
        if numel < thr:
            small_b += nbytes * count
        dense_n, quant_b = (0.0, nbytes) if row.quantized else (numel, 0.0)
        if row.where == "block":
            per_variant[row.layers] = per_variant.get(row.layers, 0.0) + numel
            blocks += numel * count
            u = unit_split.setdefault(row.layers, [0.0, 0.0, 0.0])
            u[0] += dense_n
            u[1] += quant_b
            u[2] += numel if row.trainable else 0.0
            blocks_dense += dense_n * count
            blocks_quant += quant_b * count
        else:
            root += numel * count
            root_dense += dense_n * count
            root_quant += quant_b * count
            if len(row.shape) == 2 and ct.arch.vocab in row.shape and not row.quantized:
                embed_units.append(numel)  # the embedding matrix or the output projection (vocab x hidden)
    return RankParams(
        frozen_bytes=frozen, quant_bytes=quant, scale_bytes=scales, trainable_numel=tn, trainable_bytes=tb,
        groups=tuple((n, d, s, c) for (n, d, s), c in groups.items()), n_trainable_tensors=sum(groups.values()),
        largest_trainable_bytes=largest, small_bytes=small_b,
        largest_block_numel=max(per_variant.values(), default=0.0), root_numel=root, blocks_numel=blocks,
        n_blocks=len(layers), block_units=tuple(tuple(u) for u in unit_split.values()),
        root_dense_numel=root_dense, root_quant_bytes=root_quant, embedding_unit_numels=tuple(embed_units),
        blocks_dense_numel=blocks_dense,
        blocks_quant_bytes=blocks_quant,
        mixed_unit_frozen_bytes=sum(b for u, b in unit_frozen.items() if u in unit_trains),
    )


# ---------------------------------------------------------------------------------------------
# Data-parallel sharding of the model states
# ---------------------------------------------------------------------------------------------


def fsdp_policy_set(par: Parallel) -> bool:
    """The layout shards with FSDP under a mixed-precision policy (``Parallel.fsdp_mixed_precision``)."""
    return par.fsdp not in ("none", "no_shard") and par.fsdp_mixed_precision


def fsdp_fp32_states(par: Parallel, compute_dtype: str) -> bool:
    """FSDP's mixed precision applies: 16-bit compute over fp32 sharded parameters, gradients reduced and
    optimizer states kept in fp32."""
    return fsdp_policy_set(par) and compute_dtype in ("bf16", "fp16")


def shard_group_size(par: Parallel, gpus_per_node: int) -> int:
    """Ranks that split the model states: the data- and context-parallel ranks together (context-parallel
    ranks hold the same weights: torchtitan shards FSDP over its ``dp_shard_cp`` mesh, Megatron's
    distributed optimizer over the data-parallel-with-context group), or for hybrid sharding those of one node."""
    group = par.dp * par.cp
    if par.fsdp == "hybrid_shard":
        return max(1, min(group, gpus_per_node // max(1, par.tp)))
    return group


@dataclass(frozen=True)
class ModelStates:
    """Bytes of model state on one rank, by category, plus what sits on the host / NVMe."""

    weights: float  # frozen (dense) weights resident on the device
    quant_scales: float
    quant_data: float
    trainable_weights: float
    gradients: float  # held from backward to the optimizer step
    optimizer_states: float  # moments (+ fp32 master copy under DeepSpeed)
    gathered_bytes: float  # ZeRO-3 / FSDP: unsharded parameters of the units being computed (fwd/bwd)
    gathered_grad_bytes: float  # unsharded gradients of one unit before its reduce-scatter (bwd)
    bucket_bytes: float  # DDP / ZeRO communication buckets
    step_temp_bytes: float  # extra at the optimizer step (fp32 gradient partition, foreach temporaries)
    host_bytes: float  # host RAM for offloaded states / parameters
    nvme_bytes: float
    paged_bytes: float  # bitsandbytes paged states (CUDA managed memory)
    paged_working_bytes: float = 0.0  # of them, the largest tensor's (its update needs them on the device; <= paged)


def weights_only_states(rp: RankParams, trainable_weights: float) -> ModelStates:
    """The model states of a rank that holds its weights and nothing else (inference, MeZO): the dense weights
    (``trainable_weights`` of them counted apart), quantized data and scales; no gradients, optimizer states,
    buckets or offload."""
    dense = rp.frozen_bytes + rp.trainable_bytes - trainable_weights
    return ModelStates(weights=dense, quant_scales=rp.scale_bytes, quant_data=rp.quant_bytes,
                       trainable_weights=trainable_weights, gradients=0.0, optimizer_states=0.0, gathered_bytes=0.0,
                       gathered_grad_bytes=0.0, bucket_bytes=0.0, step_temp_bytes=0.0, host_bytes=0.0, nvme_bytes=0.0,
                       paged_bytes=0.0)


def deepspeed_weight_dtype(compute_dtype: str, param_dtype: str) -> str:
    """DeepSpeed runs the module in 16-bit when fp16/bf16 is enabled; the fp32 master copy moves to the optimizer."""
    return compute_dtype if compute_dtype in ("bf16", "fp16") else param_dtype


def deepspeed_master_bytes(par: Parallel, weight_dtype: str) -> float:
    """Bytes per parameter of DeepSpeed's master copy and of the gradient partition the optimizer reads: fp32, or
    bf16 with ``bf16_master_weights_and_grads`` (DeepSpeed PR #7700; DeepSpeedExamples
    training/bf16_master_weight README, "Memory Breakdown": master weights and master gradients 4N -> 2N bytes)."""
    if weight_dtype == "fp32":
        return 4.0
    return 2.0 if par.bf16_master_weights_and_grads else 4.0


def zero3_step_temp_bytes(partition_numel: float, sub_group_size: int, grad_elem: float, master_grad_elem: float) -> float:
    """ZeRO-3's optimizer step walks the rank's partition one sub-group (at most ``sub_group_size`` elements) at a
    time: ``_prepare_fp32_grad_for_sub_group`` flattens the sub-group's 16-bit gradient partitions (a new tensor)
    and converts it to the master dtype (another, unless the dtypes match), and the step releases it before the
    next sub-group (deepspeed/runtime/zero/stage3.py)."""
    sub = min(float(sub_group_size), partition_numel)
    return sub * (grad_elem + (master_grad_elem if master_grad_elem != grad_elem else 0.0))


def mixed_unit_grad_bytes(rp: RankParams, par: Parallel) -> float:
    """Unsharded gradient bytes of frozen weights that share an FSDP1 unit with trainable ones
    (``Parallel.fsdp1_mixed_units``: the FlatParameter's gradient covers every element); 0 otherwise."""
    return rp.mixed_unit_frozen_bytes if par.fsdp1_mixed_units else 0.0


# DeepSpeed's NVMe offload defaults (docs/_pages/config-json.md): offload_optimizer.buffer_count 4;
# offload_param.buffer_count 5, buffer_size 1e8 elements, max_in_cpu 1e9 elements.
NVME_OPTIMIZER_BUFFERS = 4
NVME_PARAM_BUFFERS = 5
NVME_PARAM_BUFFER_ELEMS = 1e8
NVME_PARAMS_IN_CPU = 1e9


def model_state_bytes(rp: RankParams, par: Parallel, optimizer_name: str, optimizer_impl: str, beta1: bool,
                      param_dtype: str, compute_dtype: str, n_shard: int, galore=None) -> ModelStates:
    """Model states on one rank (see the module docstring for the rules and citations).  ``galore``: the
    (settings, projected tensor groups) of a GaLore optimizer, which runs unsharded (the validator's rule)."""
    N = max(1, n_shard)
    paged = mem.optimizer_is_paged(optimizer_name)
    master_grad_elem = 4.0
    if par.deepspeed:
        wdt = deepspeed_weight_dtype(compute_dtype, param_dtype)
        trainable = rp.trainable_numel * dtype_bytes(wdt)
        grads = trainable
        master_grad_elem = deepspeed_master_bytes(par, wdt)
        master = rp.trainable_numel * master_grad_elem if wdt != "fp32" else 0.0
        state_dt = "bf16" if par.bf16_optimizer_states else "fp32"
        state_groups = [(n, state_dt, s, c) for n, _, s, c in rp.groups]
        states = mem.optimizer_state_bytes(state_groups, optimizer_name, beta1) + master
        grad_elem = dtype_bytes(wdt)
    elif fsdp_fp32_states(par, compute_dtype):
        # FSDP's MixedPrecisionPolicy(param_dtype=16-bit, reduce_dtype=fp32): the sharded parameters, their
        # gradients and the optimizer states stay fp32; only the gathered copies are 16-bit
        trainable = rp.trainable_numel * 4.0
        grads = trainable
        states = mem.optimizer_state_bytes([(n, "fp32", s, c) for n, _, s, c in rp.groups], optimizer_name, beta1)
        grad_elem = 4.0
    else:
        trainable = rp.trainable_bytes
        grads = trainable
        if galore is not None:
            states = galore_state_bytes(list(rp.groups), galore[1], optimizer_name, galore[0], beta1)
        else:
            states = mem.optimizer_state_bytes(list(rp.groups), optimizer_name, beta1)
        grad_elem = trainable / rp.trainable_numel if rp.trainable_numel else dtype_bytes(param_dtype)
    states += mem.step_counter_bytes(rp.n_trainable_tensors, optimizer_name, optimizer_impl)
    grads += mixed_unit_grad_bytes(rp, par)
    weights, quant, scales = rp.frozen_bytes, rp.quant_bytes, rp.scale_bytes
    gathered = gathered_grads = bucket = step_temp = host = nvme = 0.0
    cdt = dtype_bytes(compute_dtype)
    if par.shards_optimizer and N > 1:
        states /= N
    if par.shards_grads and N > 1:
        grads /= N
    # the unsharded copies: dense elements in the compute dtype, quantized weights as stored; gradients only
    # for what trains
    block_gather = max((d * cdt + q for d, q, _ in rp.block_units), default=0.0)
    block_elem = block_gather / rp.largest_block_numel if rp.largest_block_numel else cdt
    root_gather = rp.root_dense_numel * cdt + rp.root_quant_bytes
    all_blocks_gather = rp.blocks_dense_numel * cdt + rp.blocks_quant_bytes
    block_grad_numel = max((t for _, _, t in rp.block_units), default=0.0)
    # parameters offloaded to the host are copied in per module even on one rank (DeepSpeed's NoGatherHandle:
    # ``ds_tensor.to(device)``, a no-op only while the partition is already on the GPU; FSDP's CPUOffload)
    if par.shards_params and (N > 1 or par.offload_params != "none"):
        if par.deepspeed:
            # parameters under stage3_param_persistence_threshold stay whole on every rank
            small_frac = rp.small_bytes / max(1.0, rp.frozen_bytes + rp.quant_bytes + rp.scale_bytes + rp.trainable_bytes)
            keep = lambda x: x * small_frac + x * (1.0 - small_frac) / N  # noqa: E731
            # ZeRO-3 fetches a module's parameters before use and prefetches up to the bucket size;
            # DeepSpeed's own estimator charges 4 x the largest layer (16-bit params + grads)
            live = min(par.stage3_max_live_parameters, rp.largest_block_numel + par.stage3_prefetch_bucket_elems)
            gathered = max(live * block_elem, root_gather)
            gathered_grads = block_grad_numel * cdt
        else:
            keep = lambda x: x / N  # noqa: E731
            if par.reshard_after_forward and par.fsdp_embedding_units and rp.embedding_unit_numels:
                # the embedding and the output projection are units of their own: gathered while they run (the
                # output's beside the last block, prefetched) and the root keeps only what is left (final norm)
                emb = max(rp.embedding_unit_numels) * cdt
                rest = root_gather - sum(rp.embedding_unit_numels) * cdt
                gathered = rest + max(2.0 * block_gather, emb + block_gather)
            elif par.reshard_after_forward:
                # FSDP: the root unit (embeddings, norm, head) stays gathered through the step; one block
                # unit computing and the next one prefetched
                gathered = root_gather + 2.0 * block_gather
            else:
                # reshard_after_forward=False (torchtitan's choice under pipeline parallelism): every unit
                # stays gathered from its forward to its backward, as with SHARD_GRAD_OP
                gathered = root_gather + all_blocks_gather
            gathered_grads = block_grad_numel * grad_elem
        weights, quant, scales, trainable = keep(weights), keep(quant), keep(scales), keep(trainable)
    elif par.fsdp == "shard_grad_op" and N > 1:
        gathered = root_gather + all_blocks_gather  # every unit stays gathered from its forward to its backward
        gathered_grads = block_grad_numel * grad_elem
    if par.deepspeed:
        # the IPG / reduce buckets in the weight dtype, allocated at reduce_bucket_size whatever trains
        # (deepspeed/runtime/zero/stage_1_and_2.py setup_buckets, stage3.py __init__); without
        # contiguous_gradients the gradients are reduced from where they lie
        bucket = par.ipg_buffers * float(par.reduce_bucket_elems) * grad_elem
        if par.zero < 3 and N > 1:
            step_temp = rp.trainable_numel * master_grad_elem / N  # the master-dtype gradient partition at the step
        elif par.zero >= 3:
            step_temp = zero3_step_temp_bytes(rp.trainable_numel / N, par.sub_group_size, grad_elem, master_grad_elem)
    elif par.dp > 1 and par.fsdp in ("none", "no_shard") and not par.ddp_bucket_view:
        bucket = grads  # DDP's flat buckets hold a second copy of every gradient
    if par.offload_optimizer != "none":
        off = states + rp.trainable_numel * 4.0 / N  # states (+ master) and the fp32 gradient partition
        if par.offload_optimizer == "cpu":
            host, nvme = off, 0.0
        else:
            # ZeRO-Infinity swaps the states and the fp32 gradient partition in and out of NVMe one sub-group at a
            # time through a pinned pool of offload_optimizer.buffer_count (4: parameter, gradient and Adam's two
            # moments) sub-group-sized fp32 buffers (deepspeed docs/_pages/config-json.md)
            host = NVME_OPTIMIZER_BUFFERS * min(float(par.sub_group_size), rp.trainable_numel / N) * 4.0
            nvme = off
        states = 0.0
        grads = min(grads, bucket) if par.deepspeed else 0.0
        step_temp = 0.0
    if par.offload_params != "none":
        resident = weights + quant + scales + trainable
        if par.offload_params == "cpu":
            host += resident
        else:
            nvme += resident
            # the pinned pool the fetches stage through and the parameters kept in CPU memory
            # (offload_param.buffer_count x buffer_size, max_in_cpu elements; deepspeed docs/_pages/config-json.md)
            numel = resident / max(cdt, 1.0)
            host += (NVME_PARAM_BUFFERS * NVME_PARAM_BUFFER_ELEMS + min(NVME_PARAMS_IN_CPU, numel)) * cdt
        weights = quant = scales = trainable = 0.0
        if par.fsdp != "none":  # FSDP CPUOffload keeps gradients and the step on the host too
            host += grads + states
            grads = states = 0.0
    return ModelStates(
        weights=weights, quant_scales=scales, quant_data=quant, trainable_weights=trainable, gradients=grads,
        optimizer_states=0.0 if paged else states, gathered_bytes=gathered, gathered_grad_bytes=gathered_grads,
        bucket_bytes=bucket, step_temp_bytes=step_temp, host_bytes=host, nvme_bytes=nvme,
        paged_bytes=states if paged else 0.0,
        paged_working_bytes=mem.paged_working_bytes(list(rp.groups), optimizer_name, beta1)
        / (N if par.shards_optimizer and N > 1 else 1) if paged and states else 0.0,
    )


# ---------------------------------------------------------------------------------------------
# Activations on one rank
# ---------------------------------------------------------------------------------------------


def in_flight_microbatches(par: Parallel, stage: int, n_micro):
    """Micro-batches whose activations a stage holds at once.

    1F1B: stage i keeps min(p - i, m) (Narayanan et al. 2021); interleaved with v chunks multiplies
    the first stage's by (1 + (p - 1)/(p v)) (Korthikanti et al. 2022, section 4.2.3); GPipe keeps all m."""
    p = par.pp
    if p == 1:
        return 1.0
    if par.pp_schedule == "gpipe":
        return n_micro.astype(float) if isinstance(n_micro, np.ndarray) else float(n_micro)
    if isinstance(n_micro, np.ndarray):
        base = np.minimum(p - stage, n_micro).astype(float)
    else:
        base = float(min(p - stage, n_micro))
    if par.pp_schedule == "interleaved":
        return base * (1.0 + (p - 1) / (p * par.pp_virtual))
    return base


def activation_split(par: Parallel) -> tuple[float, float]:
    """(divisor of the TP-replicated part, divisor of the TP-split part) of a block's saved bytes;
    context parallelism divides both by cp (each rank holds s/cp tokens)."""
    rep = (par.tp if par.sp else 1) * par.cp
    return float(rep), float(par.tp * par.cp)


def node_host_bytes(host_bytes_per_rank, n_gpus, gpus_per_node):
    """Host RAM one node needs for its ranks' offloaded states and parameters (each rank offloads its own
    shard; a node holds min(n_gpus, gpus_per_node) ranks); numbers or arrays of setups."""
    return host_bytes_per_rank * np.minimum(n_gpus, gpus_per_node)


def host_ram_bytes(system) -> float | None:
    """The node's host RAM in bytes (profiles state decimal GB); None where the profile does not say."""
    gb = system.host.host_ram_GB
    return gb * 1e9 if gb else None

