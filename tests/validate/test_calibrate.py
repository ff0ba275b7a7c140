"""Calibration: a synthetic micro results file made from a known efficiency curve is fitted back to that
curve; the YAML rewrite touches only the efficiency block and its citations; e2e files, CPU files and
unknown GPUs are refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml

from hwprofiles.registry import DEVICES_DIR, get_device, load_device_file, system_for
from hwprofiles.schema import Efficiency
from simulator import comm
from simulator.compute import peak_flops
from validate import calibrate as cal
from validate.__main__ import main
from validate.micro import COLLECTIVE_KINDS, bnb_step_host_s, case_bytes, case_flops, gpu_cases
from validate.schema import CaseResult, Fingerprint, Measurement, ResultsFile, write_results

H100 = "h100-sxm-80gb"
HOST_GBPS = 50.0


def known_efficiency() -> Efficiency:
    """The H100 profile's curve with measured-looking fractions that differ from the profile's own."""
    base = get_device(H100).efficiency
    return base.model_copy(update={"matmul_max_fraction": 0.74, "matmul_max_fraction_fp8": 0.62,
                                   "memory_bandwidth_fraction": 0.9, "attention_fraction": 0.41,
                                   "gptq_torch_dequant_fraction": 0.37, "bnb_optimizer_fraction": 0.23,
                                   "attention_curve": ((512, 0.45), (2048, 0.8), (8192, 0.97), (16384, 1.0)),
                                   "attention_kernels": {**base.attention_kernels,
                                                         "mem_efficient": ((512, 0.7), (16384, 0.45))},
                                   "matmul_curve": ((1e7, 0.004), (1e8, 0.04), (1e9, 0.3), (1e10, 0.8),
                                                    (1e11, 0.95), (1e12, 0.99), (1e13, 1.0))})


def synthetic_time_s(case, dev, eff: Efficiency) -> float:
    """What a device with efficiencies ``eff`` would measure: GEMMs flops / (peak x fraction), flash-style
    attention at the attention fraction, memory-bound kernels at the bandwidth fraction, copies at HOST_GBPS."""
    f, b = case_flops(case), case_bytes(case)
    if case.kind == "gemm":
        dtype = case.params.dtype
        return f / (peak_flops(dev, dtype) * eff.matmul_fraction(f, dtype))
    if case.kind == "sdpa":
        kernel = eff.attention_kernel_ratio("mem_efficient", case.params.seq) if case.params.backend == "efficient" else 1
        return f / (peak_flops(dev, case.params.dtype) * eff.attention_fraction_at(case.params.seq) * kernel)
    if case.kind in ("h2d", "d2h"):
        return b / (HOST_GBPS * 1e9)
    if case.kind == "dequant" and case.params.quant == "gptq":  # AutoGPTQ's PyTorch path, slower than streaming
        return b / (dev.memory_bandwidth_Bps * eff.memory_bandwidth_fraction * eff.gptq_torch_dequant_fraction)
    if case.kind == "adamw" and case.params.impl == "bnb-8bit":  # its kernels, then its host time per tensor
        return (b / (dev.memory_bandwidth_Bps * eff.memory_bandwidth_fraction * eff.bnb_optimizer_fraction)
                + bnb_step_host_s(case.params))
    return b / (dev.memory_bandwidth_Bps * eff.memory_bandwidth_fraction)


def fingerprint(name: str = "NVIDIA H100 80GB HBM3", profile: str | None = H100, platform: str = "cuda",
                memory_total_bytes: int | None = None):
    return Fingerprint(platform=platform, device_name=name, device_count=1, device_profile=profile, driver="560.35.03",
                       cuda="12.6", python="3.11.7", packages={"torch": "2.13.0"},
                       memory_total_bytes=memory_total_bytes)


def synthetic_results(eff: Efficiency, kinds: set[str] | None = None, suite: str = "micro",
                      fp: Fingerprint | None = None) -> ResultsFile:
    dev = get_device(H100)
    cases = []
    for c in gpu_cases():
        if kinds is not None and c.kind not in kinds:
            continue
        base = dict(case_id=c.case_id, suite="micro", kind=c.kind, spec=c.spec())
        if c.kind in COLLECTIVE_KINDS:
            cases.append(CaseResult(**base, status="skipped", message="needs 2 GPUs on this node, 1 visible"))
            continue
        t = synthetic_time_s(c, dev, eff)
        cases.append(CaseResult(**base, status="ok", measured=Measurement(
            time_s=t, time_samples_s=(t, t, t), flops=case_flops(c), bytes_moved=case_bytes(c))))
    return ResultsFile(schema_version=1, suite=suite, created_utc="2026-11-23T10:00:00.000000+00:00",
                       command="python -m validate run --suite micro", fingerprint=fp or fingerprint(),
                       cases=tuple(cases), duration_s=120.0)


# ---------------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------------


def test_fit_recovers_the_known_curve_within_one_percent():
    truth = known_efficiency()
    eff, sources = cal.fit_efficiency(synthetic_results(truth), get_device(H100), "synthetic.json")
    for x in np.logspace(6.5, 13.5, 141):
        for dtype in ("bf16", "fp8"):
            assert eff.matmul_fraction(float(x), dtype) == pytest.approx(truth.matmul_fraction(float(x), dtype),
                                                                         rel=0.01), (x, dtype)
    assert eff.matmul_max_fraction == pytest.approx(0.74, rel=0.01)
    assert eff.matmul_max_fraction_fp8 == pytest.approx(0.62, rel=0.01)
    assert eff.memory_bandwidth_fraction == pytest.approx(0.9, rel=0.01)
    assert eff.attention_fraction == pytest.approx(0.41, rel=0.01)
    for tokens in (512, 1024, 2048, 4096, 8192, 16384):  # the micro suite's lengths: recovered point by point
        assert eff.attention_fraction_at(tokens) == pytest.approx(truth.attention_fraction_at(tokens), rel=0.01)
    link = system_for(H100, 1).host.host_to_gpu_bandwidth_GBps
    assert eff.host_transfer_fraction == pytest.approx(HOST_GBPS / link, rel=0.01)
    assert eff.gptq_torch_dequant_fraction == pytest.approx(0.37, rel=0.01)
    assert eff.bnb_optimizer_fraction == pytest.approx(0.23, rel=0.01)
    assert 5 <= len(eff.matmul_curve) <= 9 and eff.matmul_curve[-1][1] == 1.0
    # the efficient kernel's speed against flash, point by point; FlashAttention 1 / 3 (not measured) kept
    for tokens in (512, 1024, 2048, 4096, 8192, 16384):
        assert eff.attention_kernel_ratio("mem_efficient", tokens) == pytest.approx(
            truth.attention_kernel_ratio("mem_efficient", tokens), rel=0.01)
    assert eff.attention_kernels["flash3"] == get_device(H100).efficiency.attention_kernels["flash3"]
    assert set(sources) == ({f"efficiency.{f}" for f in Efficiency.model_fields} - {"efficiency.attention_kernels"}
                            | {"efficiency.attention_kernels.mem_efficient"})
    assert all("synthetic.json" in s and "2026-11-23" in s and "driver 560.35.03" in s and "torch 2.13.0" in s
               for s in sources.values())


def test_fields_without_measurements_keep_their_values():
    dev = get_device(H100)
    eff, sources = cal.fit_efficiency(synthetic_results(known_efficiency(), kinds={"copy"}), dev)
    assert set(sources) == {"efficiency.memory_bandwidth_fraction"}
    assert eff.memory_bandwidth_fraction == pytest.approx(0.9, rel=1e-3)
    assert eff.model_copy(update={"memory_bandwidth_fraction": dev.efficiency.memory_bandwidth_fraction}) == \
        dev.efficiency


def _retimed(res: ResultsFile, which, time_s) -> ResultsFile:
    cases = [c.model_copy(update={"measured": c.measured.model_copy(update={"time_s": time_s(c)})})
             if c.status == "ok" and which(c) else c for c in res.cases]
    return res.model_copy(update={"cases": tuple(cases)})


def test_fit_leaves_out_memory_bound_gemms():
    # decode GEMVs (m = 1) streaming their weights at 60% of peak bandwidth, far below the compute curve
    truth = known_efficiency()
    dev = get_device(H100)
    res = _retimed(synthetic_results(truth, kinds={"gemm", "copy"}), lambda c: c.kind == "gemm" and c.spec["m"] == 1,
                   lambda c: c.measured.bytes_moved / (0.6 * dev.memory_bandwidth_Bps))
    eff, _ = cal.fit_efficiency(res, dev)
    for x in (1e7, 1e8, 1e9, 1e10):
        assert eff.matmul_fraction(x) == pytest.approx(truth.matmul_fraction(x), rel=0.01)


def test_a_few_slow_gemms_barely_move_the_curve():
    # every 10th compute-bound GEMM 3x slower than the curve: the fit is relative to the curve, not to them
    truth = known_efficiency()
    res = synthetic_results(truth, kinds={"gemm", "copy"})
    slow = {c.case_id for c in res.cases if c.kind == "gemm" and c.spec["m"] > 1}
    slow = set(sorted(slow)[::10])
    eff, _ = cal.fit_efficiency(_retimed(res, lambda c: c.case_id in slow, lambda c: 3 * c.measured.time_s),
                                get_device(H100))
    for x in (1e8, 1e9, 1e10, 1e11, 1e12):
        assert eff.matmul_fraction(x) == pytest.approx(truth.matmul_fraction(x), rel=0.2)


def test_isotonic_pools_adjacent_violators():
    assert cal.isotonic([1.0, 3.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0]) == [1.0, 2.5, 2.5, 4.0]
    assert cal.isotonic([3.0, 1.0], [3.0, 1.0]) == [2.5, 2.5]  # weighted mean (9 + 1) / 4
    assert cal.isotonic([0.1, 0.2], [1.0, 1.0]) == [0.1, 0.2]


def test_host_transfer_fraction_scales_the_host_link():
    system = system_for(H100, 1)
    full = comm.host_transfer_time_s(system, 2**30)
    assert comm.host_transfer_time_s(system, 2**30, None) == full
    assert comm.host_transfer_time_s(system, 2**30, 0.5) == pytest.approx(2 * full)


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------


def test_refuses_end_to_end_results():
    res = synthetic_results(known_efficiency(), kinds={"copy"}, suite="e2e")
    with pytest.raises(cal.CalibrationError, match="end-to-end.*never fitted"):
        cal.fit_efficiency(res, get_device(H100))


def test_refuses_cpu_results():
    res = synthetic_results(known_efficiency(), kinds={"copy"}, fp=fingerprint("AMD EPYC", None, "cpu"))
    with pytest.raises(cal.CalibrationError, match="CPU"):
        cal.check_fittable(res)


def test_refuses_an_unknown_gpu_unless_device_is_given(tmp_path):
    res = synthetic_results(known_efficiency(), kinds={"copy"}, fp=fingerprint("Mystery GPU 9000", None))
    with pytest.raises(cal.CalibrationError, match="matches no hwprofiles device.*--device"):
        cal.resolve_device_name(res, None)
    assert cal.resolve_device_name(res, "H100 SXM") == (H100, None)
    name, warning = cal.resolve_device_name(synthetic_results(known_efficiency(), kinds={"copy"}), "a100-sxm-80gb")
    assert name == "a100-sxm-80gb" and "h100-sxm-80gb" in warning
    path = write_results(res, tmp_path)
    assert main(["calibrate", "--results", str(path)]) == 2
    assert main(["calibrate", "--results", str(path), "--device", "nonexistent-gpu"]) == 2


# ---------------------------------------------------------------------------------------------
# the YAML
# ---------------------------------------------------------------------------------------------


def _outside(text: str) -> list[str]:
    """The lines the rewrite must keep: all but the efficiency block and the efficiency citations."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("efficiency:"):
            inside = True
            continue
        if inside and line[:1] not in (" ", "\t", ""):
            inside = False
        if not inside and not line.startswith("  efficiency."):
            out.append(line)
    return out


@pytest.mark.parametrize("name", [H100, "mi300x-192gb", "t4-16gb"])
def test_rewrite_keeps_every_other_line(name, tmp_path):
    target = tmp_path / f"{name}.yaml"
    shutil.copy(DEVICES_DIR / f"{name}.yaml", target)
    before = target.read_text()
    eff, sources = cal.fit_efficiency(synthetic_results(known_efficiency()), get_device(name), "synthetic.json")
    after = cal.rewrite_efficiency_yaml(before, eff, sources)
    assert _outside(after) == _outside(before)
    assert after.endswith("\n") and "# [flops_per_gemm, fraction of matmul_max_fraction]" in after
    target.write_text(after)
    dev = load_device_file(target)
    assert dev.efficiency == eff
    assert all(dev.sources[k] == v for k, v in sources.items())
    original = get_device(name)
    assert dev.model_copy(update={"efficiency": original.efficiency, "sources": original.sources}) == original
    assert cal.rewrite_efficiency_yaml(after, eff, sources) == after  # a second rewrite changes nothing


def test_rewrite_refuses_a_profile_that_would_not_validate():
    text = (DEVICES_DIR / f"{H100}.yaml").read_text().replace("sources:\n", "sources:\n  efficiency.nothing: \"x\"\n")
    with pytest.raises(cal.CalibrationError, match="does not validate"):
        cal.rewrite_efficiency_yaml(text, get_device(H100).efficiency, {})


def test_yaml_floats_read_back_as_floats():
    for x, s in ((1e7, "1.0e+7"), (0.8, "0.8"), (1.0, "1.0"), (1e-5, "1.0e-5"), (0.7162, "0.7162"),
                 (3.2e12, "3.2e+12")):
        assert cal.yaml_float(x) == s
        assert yaml.safe_load(s) == pytest.approx(x)


def test_cli_dry_run_then_write_on_a_copy(tmp_path, capsys):
    results = write_results(synthetic_results(known_efficiency()), tmp_path / "results")
    target = tmp_path / f"{H100}.yaml"
    shutil.copy(DEVICES_DIR / f"{H100}.yaml", target)
    before = target.read_text()
    assert main(["calibrate", "--results", str(results), "--yaml", str(target)]) == 0
    out = capsys.readouterr().out
    assert "matmul_max_fraction" in out and "0.8033" in out and "0.739" in out and "dry run" in out
    assert target.read_text() == before
    assert main(["calibrate", "--results", str(results), "--yaml", str(target), "--write"]) == 0
    dev = load_device_file(target)
    assert dev.efficiency.attention_fraction == pytest.approx(0.41, rel=0.01)
    assert results.name in dev.sources["efficiency.matmul_curve"]
    other = tmp_path / "a100-sxm-80gb.yaml"
    shutil.copy(DEVICES_DIR / "a100-sxm-80gb.yaml", other)
    assert main(["calibrate", "--results", str(results), "--yaml", str(other)]) == 2  # not the measured GPU


def test_the_measured_cards_memory_replaces_the_profiles(tmp_path):
    measured = 85_000_000_000 // 2**20 * 2**20
    res = synthetic_results(known_efficiency(), kinds={"copy", "gemm"}, fp=fingerprint(memory_total_bytes=measured))
    results = write_results(res, tmp_path / "results")
    target = tmp_path / f"{H100}.yaml"
    shutil.copy(DEVICES_DIR / f"{H100}.yaml", target)
    before = target.read_text()
    report, written = cal.calibrate(results, yaml_path=target, write=True)
    assert written == target and f"{get_device(H100).memory_total_bytes}" in report and f"{measured}" in report
    dev = load_device_file(target)
    assert dev.memory_total_bytes == measured
    assert results.name in dev.sources["memory_total_bytes"] and "NVIDIA H100 80GB HBM3" in dev.sources["memory_total_bytes"]
    changed = {a for a, b in zip(before.splitlines(), target.read_text().splitlines()) if a != b}
    assert not any(line.startswith(("peak_tflops", "hbm_bandwidth", "name:")) for line in changed)
    # calibrating another profile from this GPU's file (--device) leaves that profile's memory alone
    other = tmp_path / "h100-sxm-96gb.yaml"
    shutil.copy(DEVICES_DIR / "h100-sxm-96gb.yaml", other)
    cal.calibrate(results, device="h100-sxm-96gb", yaml_path=other, write=True)
    assert load_device_file(other).memory_total_bytes == get_device("h100-sxm-96gb").memory_total_bytes
