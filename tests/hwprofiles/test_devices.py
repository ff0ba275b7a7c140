"""Device profiles: every YAML validates, every number is cited, names resolve, real figures match their citations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from hwprofiles import Device, ProfileError, UnknownNameError, all_devices, get_device, list_devices, load_device_file
from hwprofiles.registry import DEVICES_DIR, _aliases
from hwprofiles.schema import numeric_field_paths

YAML_FILES = sorted(DEVICES_DIR.glob("*.yaml"))

REQUESTED = {
    "h100-sxm-80gb", "h100-pcie-80gb", "h100-nvl-94gb", "h200-sxm-141gb", "b200-sxm-180gb", "gb200-186gb",
    "a100-sxm-80gb", "a100-sxm-40gb", "a100-pcie-80gb", "a100-pcie-40gb", "a10g-24gb", "a10-24gb", "a40-48gb",
    "rtx-a6000-48gb", "l40s-48gb", "l4-24gb", "t4-16gb", "v100-sxm-16gb", "v100-sxm-32gb", "rtx-3090-24gb",
    "rtx-4090-24gb", "rtx-5090-32gb", "mi250x-gcd-64gb", "mi300x-192gb",
}


def _h100_dict() -> dict:
    return yaml.safe_load((DEVICES_DIR / "h100-sxm-80gb.yaml").read_text())


# ---- the catalog ----


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.stem)
def test_every_yaml_loads_and_is_named_after_its_file(path: Path) -> None:
    device = load_device_file(path)
    assert device.name == path.stem


def test_catalog_has_the_requested_devices() -> None:
    names = list_devices()
    assert len(names) >= 20
    assert REQUESTED <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("device", all_devices(), ids=lambda d: d.name)
def test_every_numeric_field_has_a_citation(device: Device) -> None:
    paths = numeric_field_paths(device)
    assert "peak_tflops.fp32" in paths and "efficiency.matmul_curve" in paths
    for path in paths:
        assert device.citation(path), f"{device.name}: {path} has no source"


@pytest.mark.parametrize("device", all_devices(), ids=lambda d: d.name)
def test_matmul_curve_is_monotone_and_small_gemms_are_slower(device: Device) -> None:
    flops = np.logspace(6, 14, 50)
    fractions = device.efficiency.matmul_fraction(flops)
    assert np.all(np.diff(fractions) >= 0)
    assert fractions[0] < fractions[-1] <= device.efficiency.matmul_max_fraction


def test_aliases_do_not_clash_between_devices() -> None:
    table = _aliases()  # raises ProfileError on a clash
    assert table["h100"] == "h100-sxm-80gb"


def test_no_io_at_import() -> None:
    code = "import hwprofiles.registry as r; print(r._device_paths.cache_info().currsize, r._load.cache_info().currsize)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["0", "0"]


# ---- names ----


@pytest.mark.parametrize(
    ("published", "canonical"),
    [
        ("H100-SXM-80GB", "h100-sxm-80gb"),
        ("A100-SXM-40GB", "a100-sxm-40gb"),
        ("A100-SXM-80GB", "a100-sxm-80gb"),
        ("L40S-48GB", "l40s-48gb"),
        ("A10G-24GB", "a10g-24gb"),
        ("RTX4090-24GB", "rtx-4090-24gb"),
        ("V100-SXM-32GB", "v100-sxm-32gb"),
        ("A6000-48GB", "rtx-a6000-48gb"),
        ("T4-16GB", "t4-16gb"),
        ("H100 SXM", "h100-sxm-80gb"),
        ("h100", "h100-sxm-80gb"),
        ("rtx_4090_24gb", "rtx-4090-24gb"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm-80gb"),
        ("mi250x-128gb", "mi250x-gcd-64gb"),
    ],
)
def test_published_names_resolve(published: str, canonical: str) -> None:
    assert get_device(published).name == canonical


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(UnknownNameError, match="h100-sxm-80gb"):
        get_device("h10-sxm")


# ---- validation ----


def test_missing_source_is_rejected_from_a_dict() -> None:
    data = _h100_dict()
    del data["sources"]["hbm_bandwidth_GBps"]
    with pytest.raises(ValidationError, match="hbm_bandwidth_GBps"):
        Device.model_validate(data)


def test_missing_nested_source_is_rejected_from_a_file(tmp_path: Path) -> None:
    data = _h100_dict()
    del data["sources"]["peak_tflops.bf16"]
    path = tmp_path / "h100-sxm-80gb.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError) as err:
        load_device_file(path)
    assert str(path) in str(err.value) and "peak_tflops.bf16" in str(err.value)


def test_invalid_field_in_a_file_names_file_and_field(tmp_path: Path) -> None:
    data = _h100_dict()
    data["hbm_bandwidth_GBps"] = "fast"
    path = tmp_path / "h100-sxm-80gb.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError) as err:
        load_device_file(path)
    assert str(path) in str(err.value) and "hbm_bandwidth_GBps" in str(err.value)


def test_name_must_equal_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "h100-copy.yaml"
    path.write_text((DEVICES_DIR / "h100-sxm-80gb.yaml").read_text())
    with pytest.raises(ProfileError, match="file stem"):
        load_device_file(path)


def test_source_key_naming_no_field_is_rejected() -> None:
    data = _h100_dict()
    data["sources"]["hbm_bandwith_GBps"] = "typo"
    with pytest.raises(ValidationError, match="hbm_bandwith_GBps"):
        Device.model_validate(data)


def test_unknown_field_is_rejected() -> None:
    data = _h100_dict()
    data["hbm_bandwidth_TBps"] = 3.35
    with pytest.raises(ValidationError, match="hbm_bandwidth_TBps"):
        Device.model_validate(data)


def test_price_without_source_is_rejected() -> None:
    data = _h100_dict()
    data["price_source"] = None
    with pytest.raises(ValidationError, match="price_source"):
        Device.model_validate(data)


def test_decreasing_matmul_curve_is_rejected() -> None:
    data = _h100_dict()
    data["efficiency"]["matmul_curve"] = [[1.0e9, 0.9], [1.0e10, 0.5]]
    with pytest.raises(ValidationError, match="non-decreasing"):
        Device.model_validate(data)


def test_profiles_are_frozen() -> None:
    with pytest.raises(ValidationError):
        get_device("h100-sxm-80gb").hbm_bandwidth_GBps = 1.0  # type: ignore[misc]


# ---- real numbers against their citations ----


def test_h100_sxm_figures() -> None:
    h100 = get_device("H100-SXM-80GB")
    # reference hardware.csv row 'H100 SXM': 989 dense bf16 TFLOPS (1979 is the 2:4 sparse figure), 3350 GB/s.
    assert h100.peak_tflops.bf16 == 989
    assert h100.peak_flops("bf16") == 989e12
    assert h100.hbm_bandwidth_GBps == 3350
    assert h100.memory_bandwidth_Bps == 3350e9
    # NVLink4 "900 GB/s" is bidirectional; 450 per direction (reference §6.4).
    assert h100.interconnect_bandwidth_GBps == 450
    # CUDA's total as torch reads it on our own H100 run (nvidia-smi's memory.total says 81,559 MiB).
    assert h100.memory_total_bytes == 85_017_493_504
    # ml-engineering best bf16 matmul 794.5 TFLOPS of 989 (reference §7.2).
    assert h100.efficiency.matmul_max_fraction == pytest.approx(794.5 / 989, abs=1e-4)
    assert h100.supports_fp8 and h100.supports_bf16


def test_rtx4090_bf16_is_the_fp32_accumulate_rate() -> None:
    rtx = get_device("RTX4090-24GB")
    # GeForce bf16 with fp32 accumulate runs at half the fp16-accumulate 330.3 TFLOPS (reference §8): 330.3 / 2 = 165.15.
    assert rtx.peak_tflops.bf16 == 165.2
    assert rtx.peak_tflops.bf16 == pytest.approx(330.3 / 2, abs=0.06)



@pytest.mark.parametrize(("name", "tflops", "dtype"), [
    # zzc0721/torch-performance-test-data database.md, torch.mm best of 1024-10240 square: the median of each
    # card's entries over its datasheet dense peak.
    ("RTX4090-24GB", 166.575, "bf16"),   # 170.06, 173.31, 162.39, 163.09 of 165.2
    ("RTX3090-24GB", 76.58, "bf16"),     # 76.34, 76.58, 76.68 of 71.2
    ("RTX5090-32GB", 239.105, "bf16"),   # 236.03, 242.18 of 209.5
    ("RTX-A6000-48GB", 123.34, "bf16"),  # of 154.8
    ("L40S-48GB", 269.15, "bf16"),       # of 362
    ("T4-16GB", 42.31, "fp16"),          # mean of 41.91 and 42.71, of 65
])
def test_measured_matmul_rates(name: str, tflops: float, dtype: str) -> None:
    device = get_device(name)
    best = device.peak_flops(dtype) * device.efficiency.matmul_max_fraction
    assert best == pytest.approx(tflops * 1e12, rel=1e-3)
    assert "torch-performance-test-data" in device.sources["efficiency.matmul_max_fraction"]



@pytest.mark.parametrize(("name", "copy_GBps"), [
    # chsasank/device-benchmarks README summary: torch copy_ bandwidth (2 x bytes / time).
    ("RTX4090-24GB", 912), ("RTX3090-24GB", 831), ("A10-24GB", 469), ("T4-16GB", 240),
])
def test_measured_copy_bandwidth(name: str, copy_GBps: float) -> None:
    device = get_device(name)
    achieved = device.memory_bandwidth_Bps * device.efficiency.memory_bandwidth_fraction
    assert achieved == pytest.approx(copy_GBps * 1e9, rel=2e-3)
    assert "device-benchmarks" in device.sources["efficiency.memory_bandwidth_fraction"]


@pytest.mark.parametrize(("name", "total_MiB"), [
    # torch.cuda.get_device_properties().total_memory printed on the card (see each profile's source)
    ("T4-16GB", 15102), ("A10G-24GB", 22587), ("A40-48GB", 45416), ("L40S-48GB", 45589),
    ("RTX-A6000-48GB", 48676), ("RTX3090-24GB", 24268), ("RTX4090-24GB", 24563), ("A100-SXM-40GB", 40536),
    ("V100-SXM-16GB", 16160), ("H100-PCIe-80GB", 81008), ("H200-SXM-141GB", 143156), ("MI300X-192GB", 196592),
])
def test_memory_is_what_cuda_reports_to_torch(name: str, total_MiB: int) -> None:
    assert get_device(name).memory_total_bytes == total_MiB * 2**20


def test_h100_memory_is_our_own_runs_reading() -> None:
    import json

    results = sorted((Path(__file__).resolve().parents[2] / "validate" / "results").glob("*h100-sxm-80gb*.json"))
    assert results
    for path in results:
        fp = json.loads(path.read_text())["fingerprint"]
        assert fp["device_profile"] == "h100-sxm-80gb"
        assert get_device("h100-sxm-80gb").memory_total_bytes == fp["memory_total_bytes"]


def test_export_variants_are_their_base_part_with_the_cut_they_carry() -> None:
    # A800 / H800: the A100 / H100 SXM with NVLink cut to 400 GB/s bidirectional; H20: Hopper capped at 148 TFLOPS
    for variant, base in (("a800-sxm-80gb", "a100-sxm-80gb"), ("h800-sxm-80gb", "h100-sxm-80gb")):
        v, b = get_device(variant), get_device(base)
        assert v.peak_tflops == b.peak_tflops and v.hbm_bandwidth_GBps == b.hbm_bandwidth_GBps
        assert v.interconnect_bandwidth_GBps == 200 < b.interconnect_bandwidth_GBps
    h20 = get_device("H20")
    assert (h20.peak_tflops.bf16, h20.hbm_bandwidth_GBps, h20.memory_capacity_GB) == (148, 4000, 96)
    assert h20.efficiency.attention_fraction is None  # no FlashAttention figure for it: the GEMM curve


@pytest.mark.parametrize(("name", "sms", "boost_ghz", "flops_per_sm_clock"), [
    # dense 16-bit tensor FLOPs per SM per clock with FP32 accumulate: GeForce Ampere / Ada run half the
    # FP16-accumulate 1024 (the 3090's 71.2 = 82 x 1.695 x 512, the 4090's 165.2 = 128 x 2.52 x 512),
    # professional boards the full rate
    ("RTX3090-24GB", 82, 1.695, 512), ("RTX4090-24GB", 128, 2.52, 512),
    ("RTX3060-12GB", 28, 1.777, 512), ("RTX4060Ti-16GB", 34, 2.535, 512), ("RTX4080-16GB", 76, 2.505, 512),
    ("RTX6000Ada-48GB", 142, 2.505, 1024), ("RTXPRO6000-96GB", 188, 2.6, 1024),
])
def test_tensor_rates_follow_sms_and_clock(name: str, sms: int, boost_ghz: float, flops_per_sm_clock: int) -> None:
    assert get_device(name).peak_tflops.bf16 == pytest.approx(sms * boost_ghz * flops_per_sm_clock / 1000, rel=3e-3)


def test_datasheet_variants_of_measured_boards() -> None:
    l40, l40s = get_device("L40"), get_device("L40S")
    assert l40.peak_tflops.bf16 == pytest.approx(l40s.peak_tflops.bf16 / 2, rel=1e-3)  # 181.05 of 362.05
    assert l40.memory_total_bytes == l40s.memory_total_bytes and l40.tdp_W == 300
    for size in (16, 32):
        pcie, sxm = get_device(f"V100-PCIE-{size}GB"), get_device(f"V100-SXM-{size}GB")
        assert (pcie.peak_tflops.fp16, pcie.peak_tflops.fp32, pcie.tdp_W) == (112, 14, 250)
        assert pcie.memory_total_bytes == sxm.memory_total_bytes and pcie.form_factor == "pcie"
    # the RTX PRO 6000's measured 417.98 TFLOPS is above the GeForce half rate (188 x 2.6 x 512 = 250)
    pro = get_device("RTXPRO6000-96GB")
    achieved = pro.peak_tflops.bf16 * pro.efficiency.matmul_max_fraction
    assert achieved == pytest.approx(417.98, rel=1e-3) and achieved > 188 * 2.6 * 512 / 1000

def test_geforce_boost_clocks_may_exceed_the_datasheet_peak_but_not_without_bound() -> None:
    data = _h100_dict()
    data["efficiency"]["matmul_max_fraction"] = 1.14
    assert Device.model_validate(data).efficiency.matmul_max_fraction == 1.14
    data["efficiency"]["matmul_max_fraction"] = 1.3
    with pytest.raises(ValidationError, match="matmul_max_fraction"):
        Device.model_validate(data)

def test_cublas_workspace_sizes() -> None:
    # CUBLAS_WORKSPACE_CONFIG default ":4096:2:16:8" = 4096 KiB x 2 + 16 KiB x 8 (reference §1.5).
    assert get_device("A100-SXM-80GB").cublas_workspace_bytes == 4096 * 1024 * 2 + 16 * 1024 * 8 == 8_519_680
    # Hopper (sm90): 4096 * 8 * 1024 = 32 MiB.
    assert get_device("H100-SXM-80GB").cublas_workspace_bytes == 4096 * 8 * 1024 == 33_554_432
    # ROCm gfx94x (MI300X): 128 MiB.
    assert get_device("mi300x-192gb").cublas_workspace_bytes == 128 * 1024 * 1024


def test_mi250x_is_modelled_per_gcd() -> None:
    gcd = get_device("MI250X")
    # hardware.csv: a 128 GB, 3200 GB/s, 383 TFLOPS bf16 module = 2 GCDs seen as 2 GPUs.
    assert gcd.devices_per_package == 2
    assert gcd.memory_capacity_GB * gcd.devices_per_package == 128
    assert gcd.hbm_bandwidth_GBps * gcd.devices_per_package == 3200
    assert gcd.peak_tflops.bf16 * gcd.devices_per_package == 383


def test_volta_and_turing_have_no_bf16() -> None:
    for name in ("v100-sxm-32gb", "t4-16gb"):
        device = get_device(name)
        assert not device.supports_bf16
        assert device.peak_flops("fp16") > 0
    assert get_device("a100-sxm-80gb").supports_bf16


def test_unsupported_dtype_raises_with_the_supported_list() -> None:
    with pytest.raises(ValueError, match=r"a100-sxm-80gb has no fp8 .*supported: fp32, tf32, bf16, fp16, int8"):
        get_device("A100-SXM-80GB").peak_flops("fp8")


def test_unknown_dtype_raises_with_the_allowed_list() -> None:
    with pytest.raises(ValueError, match=r"unknown dtype 'fp64'.*allowed: fp32, tf32, bf16, fp16, fp8, int8"):
        get_device("h100").peak_flops("fp64")


def test_dense_not_sparse() -> None:
    # Dense fp8 is twice dense bf16 on Hopper/Blackwell; a sparse figure would make bf16 equal fp8.
    for name in ("h100-sxm-80gb", "h200-sxm-141gb", "b200-sxm-180gb", "gb200-186gb", "mi300x-192gb"):
        peak = get_device(name).peak_tflops
        assert peak.fp8 == pytest.approx(2 * peak.bf16, rel=1e-3)
