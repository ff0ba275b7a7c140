"""Distributed memory, time and cost: paper figures, placement rules, validation errors."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from simulator import Scenario, estimate
from simulator import sharding as sh
from simulator.config.parallel import Parallel
from simulator import compute, timing
from simulator.estimate import _system, cost_table_for
from simulator.graph.build import quant_storage_bytes

GB = 1e9


def _states(numel: float, par: Parallel) -> float:
    rp = sh.RankParams(trainable_numel=numel, trainable_bytes=4 * numel, groups=((numel, "fp32", (), 1),),
                       n_trainable_tensors=1, largest_trainable_bytes=4 * numel)
    ms = sh.model_state_bytes(rp, par, "adamw", "foreach", True, "fp32", "bf16", par.dp)  # step counters on the host
    return ms.trainable_weights + ms.gradients + ms.optimizer_states


@pytest.mark.parametrize("stage,expected_GB", [
    # ZeRO paper (arXiv 1910.02054) Figure 1: Psi = 7.5B, N_d = 64, K = 12 (mixed-precision Adam)
    (1, 2 * 7.5 + 2 * 7.5 + 12 * 7.5 / 64),  # P_os: 31.4 GB
    (2, 2 * 7.5 + (2 + 12) * 7.5 / 64),  # P_os+g: 16.6 GB
    (3, (2 + 2 + 12) * 7.5 / 64),  # P_os+g+p: 1.9 GB
])
def test_zero_paper_model_states_per_device(stage, expected_GB):
    got = _states(7.5e9, Parallel(dp=64, zero=stage, stage3_param_persistence_threshold=0))
    assert got / GB == pytest.approx(expected_GB, rel=1e-12)


def test_zero_paper_baseline_is_16_bytes_per_parameter_under_deepspeed_amp():
    # (2 + 2 + K) Psi with K = 12: one rank, stage 1 (nothing to shard over)
    assert _states(7.5e9, Parallel(dp=1, zero=1)) / GB == pytest.approx(16 * 7.5)


def _sc(par: dict, **kw) -> Scenario:
    base = dict(model="llama-3.2-1b", gpu="h100-sxm-80gb", precision="bf16-amp",
                workload={"micro_batch": 2, "seq_len": 1024}, checkpointing={"mode": "full"}, parallel=par)
    base.update(kw)
    return Scenario.model_validate(base)


def test_tensor_parallel_splits_matrices_and_keeps_norms_whole():
    sc1, sc2 = _sc({}), _sc({"tp": 2})
    ct = cost_table_for(sc1)
    split = sum(r.storage_bytes * len(r.layers) for r in ct.param_rows if r.tp_split and r.trainable)
    whole = sum(r.storage_bytes * len(r.layers) for r in ct.param_rows if not r.tp_split and r.trainable)
    assert whole > 0  # the RMSNorm weights
    rp = sh.rank_params(cost_table_for(sc2), sc2.parallel)
    assert rp.trainable_bytes == pytest.approx(split / 2 + whole)
    assert sh.rank_params(ct, sc1.parallel).trainable_bytes == pytest.approx(split + whole)


def test_ddp_buckets_hold_a_second_copy_of_the_gradients():
    one = estimate(_sc({}), what_fits=False, timing=False)
    two = estimate(_sc({"dp": 2}), what_fits=False, timing=False)
    view = estimate(_sc({"dp": 2, "ddp_bucket_view": True}), what_fits=False, timing=False)
    grads = cost_table_for(_sc({})).trainable_bytes  # fp32 gradients of every trainable parameter
    assert two.memory_bytes.workspaces - one.memory_bytes.workspaces == pytest.approx(grads)
    assert view.memory_bytes.workspaces == pytest.approx(one.memory_bytes.workspaces)


def test_sharding_more_ranks_never_needs_more_memory_per_rank():
    peaks = [estimate(_sc({"dp": n, "zero": 3}), what_fits=False, timing=False).peak_allocated_bytes for n in (2, 4, 8, 16)]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[-1]
    fsdp = [estimate(_sc({"dp": n, "fsdp": "full_shard"}), what_fits=False, timing=False).model_state_bytes for n in (2, 8)]
    assert fsdp[0] > fsdp[1]


def test_fsdp_without_resharding_keeps_every_unit_gathered():
    """reshard_after_forward=False: the stage's 16-bit parameters stay gathered from forward to backward
    (root + every block) instead of the root and two blocks (the one computing, the one prefetched)."""
    sc = _sc({"dp": 8, "fsdp": "full_shard"})
    keep = _sc({"dp": 8, "fsdp": "full_shard", "reshard_after_forward": False})
    rp = sh.rank_params(cost_table_for(sc), sc.parallel)
    args = ("adamw", "foreach", True, "fp32", "bf16", 8)
    ms, ms_keep = sh.model_state_bytes(rp, sc.parallel, *args), sh.model_state_bytes(rp, keep.parallel, *args)
    assert ms.gathered_bytes == (rp.root_numel + 2 * rp.largest_block_numel) * 2
    assert ms_keep.gathered_bytes == (rp.root_numel + rp.blocks_numel) * 2
    assert ms_keep.weights == ms.weights and ms_keep.gradients == ms.gradients


def test_fsdp_under_pipelining_accumulates_unsharded_fp32_gradients():
    """torch.distributed.pipelining skips FSDP's gradient sync for all but the last micro-batch: between
    micro-batches a stage holds its gradients unsharded in the reduce dtype (fp32), not the 1/dp shard."""
    from simulator.estimate import rank_bytes

    par = {"dp": 4, "pp": 2, "fsdp": "full_shard"}
    sc = _sc(par, workload={"micro_batch": 1, "seq_len": 1024, "grad_accum": 8})
    ct = cost_table_for(sc)
    rp = sh.rank_params(ct, sc.parallel, 0)
    rb, ms = rank_bytes(ct, sc.parallel, sc.optimizer, 0, 4)
    assert rb.accumulated_gradients == rp.trainable_numel * 4.0
    assert rb.gradients == ms.gradients == rp.trainable_numel * 4.0 / 4  # the sharded fp32 gradients at the step
    e = estimate(sc, what_fits=False, timing=False)
    assert e.phase_allocated_bytes["forward"] > rp.trainable_numel * 4.0
    one = _sc({"dp": 8, "fsdp": "full_shard"}, workload={"micro_batch": 1, "seq_len": 1024, "grad_accum": 8})
    no_pp = rank_bytes(cost_table_for(one), one.parallel, one.optimizer, 0, 8)[0]
    assert no_pp.accumulated_gradients == no_pp.gradients  # without pipelining FSDP reduce-scatters each backward


def test_pipeline_stage_peaks_bubble_and_in_flight_micro_batches():
    sc = _sc({"pp": 4}, workload={"micro_batch": 1, "seq_len": 1024, "grad_accum": 8})
    e = estimate(sc, what_fits=False)
    assert set(e.stage_peak_bytes) == {0, 1, 2, 3} and len(set(e.stage_peak_bytes.values())) > 1
    # 1F1B: stage i holds min(p - i, m) micro-batches
    assert [sh.in_flight_microbatches(sc.parallel, i, 8) for i in range(4)] == [4, 3, 2, 1]
    # bubble = (p - 1) micro-batch slots of the slowest stage
    t = e.time
    micro = (t.forward_s + t.backward_s + t.recompute_s + t.pp_p2p_s) / 8
    assert t.pp_bubble_s == pytest.approx(3 * micro)
    inter = sc.model_copy(update={"parallel": Parallel(pp=4, pp_schedule="interleaved", pp_virtual=2)})
    assert estimate(inter, what_fits=False).time.pp_bubble_s == pytest.approx(1.5 * micro, rel=1e-9)


def test_offload_moves_the_optimizer_states_to_the_host():
    on = estimate(_sc({"dp": 4, "zero": 2}), what_fits=False)
    off = estimate(_sc({"dp": 4, "zero": 2, "offload_optimizer": "cpu"}), what_fits=False)
    assert off.memory_bytes.optimizer_states == 0 and on.memory_bytes.optimizer_states > 0
    assert off.host_memory_bytes >= on.memory_bytes.optimizer_states
    assert off.time.offload_s > 0 and off.time.optimizer_s == 0


def test_time_cost_and_energy_are_consistent():
    e = estimate(_sc({"dp": 8}, workload={"micro_batch": 2, "seq_len": 1024, "total_tokens": 1e9}), what_fits=False)
    t, c = e.time, e.cost
    assert t.tokens_per_s == pytest.approx(e.tokens_per_step / t.step_s)
    assert t.tokens_per_s_per_gpu == pytest.approx(t.tokens_per_s / 8)
    assert c.usd_per_step == pytest.approx(t.step_s / 3600 * 8 * c.usd_per_gpu_hour)
    assert c.run_time_s == pytest.approx(1e9 / t.tokens_per_s)
    assert c.run_kwh == pytest.approx(c.run_time_s * 8 * c.watts_per_gpu / 3.6e6)
    assert 0 < t.mfu < t.hfu < 1  # checkpointing: recompute counts toward HFU only



def test_a_device_without_a_power_figure_has_no_energy_rather_than_zero():
    # a10g-24gb has no tdp_W and its node (aws-g5-48xlarge) no node_power_W: the step still has a price
    sc = {"model": "qwen2.5-0.5b", "gpu": "a10g-24gb", "method": {"kind": "lora"},
          "workload": {"task": "train", "micro_batch": 1, "seq_len": 512, "total_tokens": 1e8}}
    c = estimate(sc, what_fits=False).cost
    assert c.watts_per_gpu is None and c.kwh_per_million_tokens is None and c.run_kwh is None
    assert "a10g-24gb no tdp_W" in c.power_source
    assert c.usd_per_million_tokens > 0 and c.run_usd > 0
    from simulator.report import render
    report = render(estimate(sc, what_fits=False), Scenario.model_validate(sc))
    assert re.search(r"kWh per million tokens +unknown", report) and "energy unknown" in report

@pytest.mark.parametrize("par,field", [
    ({"tp": 3}, "tp=3 does not divide"),
    ({"pp": 64}, "exceeds the model's 16 layers"),
    ({"ep": 2, "dp": 2}, "needs an MoE model"),
    ({"zero": 3, "fsdp": "full_shard"}, "choose DeepSpeed ZeRO or FSDP"),
    ({"offload_params": "cpu"}, "needs sharded parameters"),
    ({"sp": True}, "needs parallel.tp > 1"),
    ({"dp": 2, "zero": 3, "fsdp_no_sync": True}, "fsdp_no_sync=True needs parallel.fsdp"),
    ({"dp": 2, "fsdp": "full_shard", "fsdp1_mixed_units": True}, "needs parallel.fsdp_version=1"),
])
def test_bad_parallel_input_names_the_fields(par, field):
    with pytest.raises(ValidationError, match=field):
        _sc(par)


def test_context_parallel_needs_a_fused_attention_kernel():
    with pytest.raises(ValidationError, match="ring attention"):
        _sc({"cp": 2}, attention="eager")


def test_inference_rejects_training_only_sharding():
    with pytest.raises(ValidationError, match="apply to training"):
        Scenario.model_validate(dict(model="llama-3.2-1b", workload={"task": "infer"}, parallel={"zero": 3}))


def test_nvme_offload_on_a_system_without_nvme_is_a_clear_error():
    sc = _sc({"dp": 8, "zero": 3, "offload_optimizer": "nvme"}, gpu="a10g-24gb", system="aws-g5-48xlarge")
    with pytest.raises(ValueError, match="aws-g5-48xlarge"):
        estimate(sc, what_fits=False)


def test_tensor_parallel_inference_splits_the_kv_cache():
    base = dict(model="llama-3.1-8b", workload={"task": "infer", "batch": 64, "prompt_len": 4096, "gen_len": 512})
    one = estimate(base, what_fits=False)
    two = estimate({**base, "parallel": {"tp": 2}}, what_fits=False)
    assert two.memory_bytes.kv_cache == pytest.approx(one.memory_bytes.kv_cache / 2)
    # prefill of 64 x 4K tokens is compute-bound: half the GEMM work per rank, plus the all-reduces
    assert two.time.prefill_s < 0.75 * one.time.prefill_s


def test_small_decode_steps_are_bound_by_issuing_kernels():
    from simulator.compute import EAGER_OP_OVERHEAD_S, op_arrays

    sc = Scenario.model_validate(dict(model="llama-3.1-8b", workload={"task": "infer", "batch": 1, "prompt_len": 16,
                                                                       "gen_len": 64}))
    e = estimate(sc, what_fits=False)
    kernels = sum(p.n_kernels * (len(p.layers) if p.where == "block" else 1) for p in op_arrays(cost_table_for(sc)))
    assert e.time.decode_per_token_s == pytest.approx(kernels * EAGER_OP_OVERHEAD_S)


def test_offloaded_states_beyond_the_nodes_host_ram_are_a_warning():
    """70B full fine-tuning with ZeRO-3 states and parameters in host RAM: about 1.2 TB for one rank, more than
    a 256 GB workstation holds (and less than a DGX's 2 TB)."""
    from hwprofiles import get_system

    base = dict(model="llama-3.1-70b", method={"kind": "full"}, precision="bf16-amp", checkpointing={"mode": "full"},
                workload={"micro_batch": 1, "seq_len": 2048},
                parallel={"zero": 3, "offload_optimizer": "cpu", "offload_params": "cpu"})
    ws = estimate({**base, "gpu": "rtx4090-24gb", "system": "rtx-4090-workstation"}, what_fits=False, timing=False)
    assert ws.host_memory_bytes > sh.host_ram_bytes(get_system("rtx-4090-workstation"))
    assert any(w.startswith("host RAM:") and "rtx-4090-workstation" in w for w in ws.warnings)
    dgx = estimate({**base, "gpu": "a100-sxm-80gb"}, what_fits=False, timing=False)
    assert dgx.host_memory_bytes == ws.host_memory_bytes and not any("host RAM" in w for w in dgx.warnings)


def test_fsdp_no_sync_accumulation_holds_unsharded_gradients_and_reduce_scatters_once():
    base = {"dp": 8, "fsdp": "full_shard", "fsdp_version": 1}
    w = {"micro_batch": 1, "seq_len": 2048, "grad_accum": 8}
    sync = estimate(_sc(base, workload=w), what_fits=False)
    nosync = estimate(_sc({**base, "fsdp_no_sync": True}, workload=w), what_fits=False)
    # full fine-tuning of a 1B model under AMP: 8 GPUs hold 1/8 of the fp32 gradients when every micro-batch
    # syncs, all of them (unsharded, fp32) between micro-batches under no_sync
    n = sync.n_params
    assert sync.memory_bytes.gradients == pytest.approx(4 * n / 8, rel=1e-3)
    assert nosync.memory_bytes.gradients == pytest.approx(4 * n, rel=1e-3)
    assert nosync.peak_allocated_bytes - sync.peak_allocated_bytes == pytest.approx(4 * n * 7 / 8, rel=0.02)
    # the gradients cross the network once per step instead of once per micro-batch
    assert nosync.time.dp_comm_s < sync.time.dp_comm_s


def test_fsdp1_mixed_lora_units_cost_the_frozen_weights_gradients():
    base = {"dp": 4, "fsdp": "full_shard", "fsdp_version": 1}
    lora = {"kind": "lora", "r": 8}
    w = {"micro_batch": 2, "seq_len": 1024, "grad_accum": 4}  # gradients held from one micro-batch to the next
    apart = estimate(_sc(base, method=lora, workload=w), what_fits=False)
    mixed = estimate(_sc({**base, "fsdp1_mixed_units": True}, method=lora, workload=w), what_fits=False)
    # every block's frozen bf16 weights get a (sharded) gradient: nearly the sharded weights again (the
    # embeddings and head are a unit of their own with nothing trainable)
    assert mixed.memory_bytes.weights == apart.memory_bytes.weights
    extra = mixed.memory_bytes.gradients - apart.memory_bytes.gradients
    assert 0.6 * apart.memory_bytes.weights < extra < apart.memory_bytes.weights
    # each micro-batch's reduce-scatter carries the blocks' whole flat gradients (bf16) instead of the adapters'
    sc = _sc({**base, "fsdp1_mixed_units": True}, method=lora, workload=w)
    rank = timing.rank_state(cost_table_for(sc), sc.parallel, 0, sc.optimizer)
    system = _system(sc)
    rs = [timing._coll(system, "reduce_scatter", b, 4, 4)
          for b in (rank.trainable_numel * rank.grad_elem_bytes + rank.frozen_grad_bytes,
                    rank.trainable_numel * rank.grad_elem_bytes)]
    assert mixed.time.dp_comm_s - apart.time.dp_comm_s == pytest.approx(4 * (rs[0] - rs[1]), rel=1e-9)


def test_zero3_fetch_hooks_cost_host_time_per_module_and_pass():
    w = {"micro_batch": 1, "seq_len": 256, "grad_accum": 4}
    e2 = estimate(_sc({"dp": 8, "zero": 2}, workload=w), what_fits=False)
    e3 = estimate(_sc({"dp": 8, "zero": 3}, workload=w), what_fits=False)
    # llama-3.2-1b: 16 blocks of 7 linears each fetched (the norms are under stage3_param_persistence_threshold
    # and stay whole) and the embedding (tied to the head: one module each) -> 16 x 7 + 2 modules per pass
    n_fetch = 16 * 7 + 2
    assert sum(compute.zero3_fetch_host_s(p, 100_000) * (16 if p.where == "block" else 1)
               for p in compute.op_arrays(cost_table_for(_sc({"dp": 8, "zero": 3})))) == pytest.approx(
        n_fetch * compute.ZERO3_FETCH_HOST_S)
    per_pass = 4 * n_fetch * compute.ZERO3_FETCH_HOST_S  # 4 micro-batches
    assert e3.time.forward_s - e2.time.forward_s == pytest.approx(per_pass, rel=1e-9)
    # the checkpointed recompute reruns the blocks only
    assert e3.time.recompute_s - e2.time.recompute_s == pytest.approx(4 * 16 * 7 * compute.ZERO3_FETCH_HOST_S, rel=1e-9)
    assert e3.time.backward_s - e2.time.backward_s == pytest.approx(per_pass, rel=1e-9)
    # FSDP gathers a whole block at once: no per-module cost
    ef = estimate(_sc({"dp": 8, "fsdp": "full_shard"}, workload=w), what_fits=False)
    assert ef.time.forward_s == pytest.approx(e2.time.forward_s)


def test_zero3_fetch_hooks_on_one_rank_run_ahead_of_the_gpu():
    """With one rank nothing is gathered: the hooks are host time that hides behind the GPU's work like the
    kernels' launches, and shows only where the host is the slower.  Across ranks they add to the pass."""
    for mb, seq, host_bound in ((1, 128, True), (4, 8192, False)):
        w = {"micro_batch": mb, "seq_len": seq, "grad_accum": 2}
        plain = estimate(_sc({}, workload=w), what_fits=False)
        one = estimate(_sc({"zero": 3}, workload=w), what_fits=False)
        ct = cost_table_for(_sc({"zero": 3}, workload=w))
        fetch = 2 * sum(compute.zero3_fetch_host_s(p, 100_000) * (16 if p.where == "block" else 1)
                        for p in compute.op_arrays(ct))  # one forward pass of 2 micro-batches
        if host_bound:  # the host issues the kernels and walks the hooks while the GPU idles
            assert one.time.forward_s > plain.time.forward_s + 0.5 * fetch
        else:  # the GPU's work hides the hooks
            assert one.time.forward_s == pytest.approx(plain.time.forward_s, rel=1e-9)
            assert one.time.backward_s == pytest.approx(plain.time.backward_s, rel=1e-9)
        two = estimate(_sc({"dp": 2, "zero": 3}, workload=w), what_fits=False)
        two_plain = estimate(_sc({"dp": 2, "zero": 2}, workload=w), what_fits=False)
        assert two.time.forward_s - two_plain.time.forward_s == pytest.approx(fetch, rel=1e-9)


def _lora_ds(r: int, par: dict, **kw) -> Scenario:
    return _sc({"dp": 2, **par}, method={"kind": "lora", "r": r, "targets": "all-linear"}, precision="bf16", **kw)


def test_deepspeed_reduce_buckets_are_allocated_whole_whatever_trains():
    """ZeRO-1/2 with contiguous_gradients allocate reduce_bucket_size elements per backward, a second buffer
    with overlap_comm (stage_1_and_2.py setup_buckets); stage 3 one buffer for the run (stage3.py).  A LoRA
    run with 11M trainable parameters still holds the whole 2e8-element buckets in bf16."""
    bucket = 200_000_000
    for r in (8, 64):
        ct = cost_table_for(_lora_ds(r, {}))
        assert ct.n_trainable < bucket
        for par, n_buf in (({"zero": 2, "overlap_comm": True}, 2), ({"zero": 2}, 1), ({"zero": 1, "overlap_comm": True}, 2),
                           ({"zero": 3}, 1), ({"zero": 3, "overlap_comm": False}, 1),
                           ({"zero": 2, "overlap_comm": True, "contiguous_gradients": False}, 0)):
            sc = _lora_ds(r, {**par, "reduce_bucket_elems": bucket})
            assert sc.parallel.ipg_buffers == n_buf
            ms = sh.model_state_bytes(sh.rank_params(ct, sc.parallel), sc.parallel, "adamw", "foreach", True,
                                      "bf16", "bf16", 2)
            assert ms.bucket_bytes == n_buf * bucket * 2
    assert Parallel(dp=2).ipg_buffers == 0  # DDP has buckets of its own, sized by the gradients



def test_zero3_on_one_rank_copies_in_offloaded_parameters_only():
    """One rank, ZeRO-3: DeepSpeed's all_gather_coalesced takes ``_no_gather_coalesced`` (NoGatherHandle:
    ``param.data = ds_tensor.to(device)``), a view of the partition while it is on the GPU -- nothing gathered --
    but a per-module copy in when ZeRO-Infinity keeps the partitions on the host: the live parameters (the
    prefetch bucket beside the largest block, or the root module) in the compute dtype, as on many ranks."""
    args = ("adamw", "foreach", True, "fp32", "bf16", 1)
    on_gpu = _sc({"zero": 3})
    offloaded = _sc({"zero": 3, "offload_params": "cpu", "offload_optimizer": "cpu"})
    rp = sh.rank_params(cost_table_for(on_gpu), on_gpu.parallel)
    assert sh.model_state_bytes(rp, on_gpu.parallel, *args).gathered_bytes == 0.0
    ms = sh.model_state_bytes(rp, offloaded.parallel, *args)
    par = offloaded.parallel
    live = min(par.stage3_max_live_parameters, rp.largest_block_numel + par.stage3_prefetch_bucket_elems)
    assert ms.gathered_bytes == max(live, rp.root_numel) * 2 > 0
    assert ms.weights == ms.trainable_weights == 0.0  # every partition is on the host


def test_sharded_qlora_gathers_the_packed_weights_and_reduces_only_adapter_gradients():
    """FSDP over a QLoRA model gathers each unit's weights as they are stored -- 4-bit data and scales
    (bitsandbytes' quant_storage, torchao's NF4Tensor all-gather), not a 16-bit copy -- and a unit's
    unsharded gradients before its reduce-scatter are the adapters' only: the frozen base makes none."""
    sc = _sc({"dp": 8, "fsdp": "full_shard"}, precision="bf16",
             method={"kind": "qlora", "r": 16, "targets": "all-linear"})
    arch = sc.model
    rp = sh.rank_params(cost_table_for(sc), sc.parallel)
    H, I, r = arch.hidden, arch.intermediate, 16
    kv = arch.n_kv_heads * arch.head_dim
    shapes = [(H, H), (kv, H), (kv, H), (H, H), (I, H), (I, H), (H, I)]  # q k v o gate up down (out, in)
    packed = sum(quant_storage_bytes("nf4", o * i, o, i, 64, sc.method.double_quant)[0] for o, i in shapes)
    lora = sum(r * (o + i) for o, i in shapes)
    block = packed + (2 * H + lora) * 2  # two RMSNorm weights and the adapters in bf16
    root = (arch.vocab * H + H) * 2  # tied embeddings / head and the final norm
    ms = sh.model_state_bytes(rp, sc.parallel, "adamw", "foreach", True, "bf16", "bf16", 8)
    assert ms.gathered_bytes == pytest.approx(root + 2 * block, rel=1e-12)
    assert ms.gathered_grad_bytes == lora * 4  # FSDP keeps the trainable parameters' gradients fp32
    # a dense full fine-tune gathers every element in the compute dtype, as before
    full = _sc({"dp": 8, "fsdp": "full_shard"})
    rpf = sh.rank_params(cost_table_for(full), full.parallel)
    msf = sh.model_state_bytes(rpf, full.parallel, "adamw", "foreach", True, "fp32", "bf16", 8)
    assert msf.gathered_grad_bytes == rpf.largest_block_numel * 4


def test_fsdp_embedding_units_are_gathered_only_while_they_run():
    """torchtune's custom_sharded_layers: the embedding and the output projection are FSDP units of their own, so
    the root keeps only the final norm gathered, and the peak holds two blocks or the output beside a block --
    Llama-3.1-8B: 128256 x 4096 per matrix, 218M parameters per block, in bf16."""
    base = {"dp": 8, "fsdp": "full_shard"}
    sc = _sc(base, model="llama-3.1-8b")
    own = _sc({**base, "fsdp_embedding_units": True}, model="llama-3.1-8b")
    rp = sh.rank_params(cost_table_for(sc), sc.parallel)
    args = ("adamw", "foreach", True, "fp32", "bf16", 8)
    block = rp.largest_block_numel * 2
    emb = 128256 * 4096 * 2
    assert sorted(rp.embedding_unit_numels) == [128256 * 4096] * 2
    assert sh.model_state_bytes(rp, sc.parallel, *args).gathered_bytes == (2 * 128256 * 4096 + 4096) * 2 + 2 * block
    assert sh.model_state_bytes(rp, own.parallel, *args).gathered_bytes == 4096 * 2 + max(2 * block, emb + block)


def test_a_named_system_must_hold_the_gpu_and_the_job():
    """A system is a node of one GPU kind: naming one of another kind, or a single node too small for the
    layout, is an error that names the field and what would do; without a name, a job larger than the
    GPU's only catalog node (a two-card workstation) runs on a derived multi-node system."""
    base = {"model": "llama-3.2-1b", "gpu": "rtx-4090-24gb", "method": {"kind": "lora"},
            "workload": {"task": "train", "micro_batch": 1, "seq_len": 512}}
    with pytest.raises(ValueError, match=r"system: 'dgx-h100' holds h100-sxm-80gb GPUs, not gpu 'rtx-4090-24gb'; "
                                         r"systems with rtx-4090-24gb: rtx-4090-workstation"):
        estimate({**base, "system": "dgx-h100", "parallel": {"dp": 8}}, what_fits=False)
    with pytest.raises(ValueError, match=r"system: 'rtx-4090-workstation' is one node of 2 GPUs with no network "
                                         r"between nodes; the parallel layout needs 8 GPUs"):
        estimate({**base, "system": "rtx-4090-workstation", "parallel": {"dp": 8}}, what_fits=False)
    two = estimate({**base, "parallel": {"dp": 2}}, what_fits=False)
    eight = estimate({**base, "parallel": {"dp": 8}}, what_fits=False)
    assert two.system == "rtx-4090-workstation"
    assert eight.system.endswith("-derived") and eight.time.dp_comm_s > two.time.dp_comm_s > 0
    # a system named without a GPU runs its own GPUs
    a100 = estimate({"model": "llama-3.2-1b", "system": "dgx-a100", "parallel": {"dp": 8},
                     "workload": {"task": "train", "micro_batch": 1, "seq_len": 512}}, what_fits=False)
    assert (a100.gpu, a100.system) == ("a100-sxm-80gb", "dgx-a100")


def test_fsdp_mixed_precision_or_the_models_own_16_bit_shards():
    """FSDP over a 16-bit model: under a MixedPrecisionPolicy (the default; torchtitan, Accelerate) each of 8 ranks
    keeps fp32 shards of the N parameters and fp32 Adam moments (4 N / 8 and 8 N / 8 bytes) and reduce-scatters
    fp32 gradients; without one (torchtune's fully_shard calls) the bf16 model is sharded as it is (2 N / 8 and
    4 N / 8) and the gradients go out in bf16.  Per step: two bf16 all-gathers and one reduce-scatter, so the
    data-parallel traffic is (2 + 2 + 4) / (2 + 2 + 2) = 4/3 times larger under the policy."""
    base = {"model": "llama-3.1-8b", "gpu": "h100-sxm-80gb", "method": {"kind": "full"},
            "checkpointing": {"mode": "full"}, "workload": {"task": "train", "micro_batch": 1, "seq_len": 2048}}
    mixed, own = (estimate({**base, "parallel": {"dp": 8, "fsdp": "full_shard", "fsdp_mixed_precision": mp}},
                           what_fits=False) for mp in (True, False))
    n = mixed.n_params
    assert (mixed.memory_bytes.trainable_weights, mixed.memory_bytes.optimizer_states) == (4 * n / 8, 8 * n / 8)
    assert (own.memory_bytes.trainable_weights, own.memory_bytes.optimizer_states) == (2 * n / 8, 4 * n / 8)
    assert mixed.time.dp_comm_s / own.time.dp_comm_s == pytest.approx(4 / 3, rel=0.02)


@pytest.mark.parametrize("par", [
    {"tp": 2, "sp": True, "cp": 2, "pp": 2, "dp": 2},  # 16 GPUs: every split at once
    {"tp": 4, "dp": 2},
])
def test_activations_by_layer_are_one_rank_of_the_peak_stage(par):
    """The per-layer activations the report lists are what one GPU of the peak stage holds for one micro-batch:
    its stage's blocks only, each split over TP / SP / CP, and they add up to that rank's saved bytes."""
    from simulator.estimate import stage_saved_bytes
    from simulator.graph.ir import basis

    d = {"model": "llama-3.1-8b", "gpu": "h100-sxm-80gb", "method": {"kind": "full"}, "precision": "bf16-amp",
         "workload": {"micro_batch": 2, "seq_len": 4096, "grad_accum": 8}, "parallel": par}
    sc = Scenario.model_validate(d)
    e = estimate(sc)
    ct = cost_table_for(sc)
    B = basis(2, 4096)
    stage = e.peak_stage
    assert sum(e.activations_by_layer.values()) == pytest.approx(stage_saved_bytes(ct, sc.parallel, B, stage), rel=1e-12)
    blocks = [k for k in e.activations_by_layer if k.startswith("model.layers.")]
    assert len(blocks) == 32 // par.get("pp", 1)
    one = estimate({**d, "parallel": {}, "gpu": "b200-sxm-180gb"})
    # a block's share on one GPU: the whole block's bytes over the token and head splits (the TP-replicated
    # norm inputs stay whole without SP)
    # (block 5: the whole-model listing charges the tensors every block shares to the first blocks)
    whole = one.activations_by_layer[blocks[5]]
    assert e.activations_by_layer[blocks[5]] < whole
    if par.get("sp"):
        assert e.activations_by_layer[blocks[5]] == pytest.approx(whole / (par["tp"] * par["cp"]), rel=1e-12)
