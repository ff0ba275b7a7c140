"""System profiles: every YAML validates, every number is cited, devices resolve, system_for picks or derives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from hwprofiles import (
    ProfileError,
    System,
    UnknownNameError,
    all_systems,
    get_device,
    get_system,
    list_devices,
    list_systems,
    load_system_file,
    system_defaults,
    system_for,
)
from hwprofiles.registry import SYSTEMS_DIR, _system_aliases
from hwprofiles.schema import numeric_field_paths

YAML_FILES = sorted(p for p in SYSTEMS_DIR.glob("*.yaml") if not p.stem.startswith("_"))

REQUESTED = {
    "dgx-a100", "dgx-h100", "hgx-h200", "dgx-b200", "l40s-8x-pcie", "aws-g5-48xlarge", "a100-pcie-4x",
    "rtx-4090-workstation", "rtx-a6000-workstation", "mi300x-8x", "gb200-nvl72",
}


def _dict(name: str = "dgx-h100") -> dict:
    return yaml.safe_load((SYSTEMS_DIR / f"{name}.yaml").read_text())


def _write(tmp_path: Path, data: dict, name: str = "dgx-h100") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---- the catalog ----


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.stem)
def test_every_yaml_loads_and_is_named_after_its_file(path: Path) -> None:
    system = load_system_file(path)
    assert system.name == path.stem
    assert not system.derived


def test_catalog_has_the_requested_systems() -> None:
    names = list_systems()
    assert len(names) >= 10
    assert REQUESTED <= set(names)
    assert names == sorted(names)
    assert not any(n.startswith("_") for n in names)  # _defaults.yaml is not a system


@pytest.mark.parametrize("system", all_systems(), ids=lambda s: s.name)
def test_every_numeric_field_has_a_citation(system: System) -> None:
    paths = numeric_field_paths(system)
    assert {"gpus_per_node", "intra_node.busbw_curve", "host.host_to_gpu_bandwidth_GBps"} <= set(paths)
    for path in paths:
        assert system.citation(path), f"{system.name}: {path} has no source"


@pytest.mark.parametrize("system", all_systems(), ids=lambda s: s.name)
def test_device_names_resolve_to_canonical_profiles(system: System) -> None:
    assert system.device in list_devices()
    assert get_device(system.device).name == system.device


@pytest.mark.parametrize("system", all_systems(), ids=lambda s: s.name)
def test_busbw_curves_never_let_a_bigger_message_finish_sooner(system: System) -> None:
    curve = system.intra_node.busbw_curve
    times = [size / busbw for size, busbw in curve]
    assert times == sorted(times)
    assert system.intra_node.ring_fraction <= 1


def test_aliases_resolve_and_do_not_clash() -> None:
    table = _system_aliases()  # raises ProfileError on a clash
    assert table["8xh100"] == "dgx-h100"
    assert get_system("DGX H100").name == "dgx-h100"
    assert get_system("g5.48xlarge").name == "aws-g5-48xlarge"
    assert get_system("GB200 NVL72").name == "gb200-nvl72"
    assert get_system("rtx_4090_workstation").name == "rtx-4090-workstation"


def test_unknown_system_lists_close_matches() -> None:
    with pytest.raises(UnknownNameError, match="dgx-h100"):
        get_system("dgx-h10")


def test_no_io_at_import_and_no_simulator_import() -> None:
    code = (
        "import sys, hwprofiles.registry as r; "
        "print(r._system_paths.cache_info().currsize, r._load_system.cache_info().currsize, "
        "any(m == 'simulator' or m.startswith('simulator.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["0", "0", "False"]


# ---- system_for: catalog vs derived ----


def test_system_for_prefers_the_catalog_system_of_the_device() -> None:
    assert system_for("H100-SXM-80GB", 8).name == "dgx-h100"
    assert system_for("h100", 4).name == "dgx-h100"  # a partial node of the 8-GPU system
    assert system_for("h100-sxm-80gb", 1024).name == "dgx-h100"  # spans nodes
    assert system_for("gb200-186gb", 144).name == "gb200-nvl72"
    assert system_for("rtx-4090-24gb", 1).name == "rtx-4090-workstation"
    assert not system_for("a10g-24gb", 8).derived


def test_system_for_derives_from_the_device_and_the_defaults() -> None:
    t4 = get_device("t4-16gb")
    defaults = system_defaults()
    system = system_for("t4-16gb", 4)
    assert system.derived and "Derived" in (system.notes or "")
    assert system.name == "t4-16gb-x4-derived" and system.device == "t4-16gb"
    assert system.gpus_per_node == 4
    assert system.intra_node.kind == "pcie"
    assert system.intra_node.bandwidth_GBps == t4.pcie_bandwidth_GBps
    # peak of the synthesised curve = link x busbw_fraction[pcie]; the last point is 8 GiB, within 1% of it
    peak = t4.pcie_bandwidth_GBps * defaults.busbw_fraction["pcie"]
    assert system.intra_node.busbw_curve[-1][1] == pytest.approx(peak, rel=1e-2)
    assert system.inter_node == defaults.inter_node  # the NIC is data, not code
    assert system.price_usd_per_gpu_hour == t4.price_usd_per_hour
    for path in numeric_field_paths(system):
        assert system.citation(path), path


def test_derived_systems_cap_the_node_and_map_the_link() -> None:
    v100 = system_for("v100-sxm-16gb", 64)  # the 32 GB part has a catalog system (dgx-2)
    assert v100.gpus_per_node == system_defaults().max_gpus_per_node == 8
    assert v100.intra_node.kind == "nvlink-p2p"
    assert v100.intra_node.bandwidth_GBps == get_device("v100-sxm-16gb").interconnect_bandwidth_GBps == 150
    assert system_for("v100-sxm-32gb", 64).name == "dgx-2"
    # an NVLink bridge pairs two cards: four A40s fall back to PCIe
    assert system_for("a40-48gb", 2).intra_node.kind == "nvlink-bridge"
    assert system_for("a40-48gb", 4).intra_node.kind == "pcie"


def test_system_for_is_deterministic() -> None:
    assert system_for("t4-16gb", 2) is system_for("t4", 2)
    assert system_for("h100", 16) is get_system("dgx-h100")


def test_system_for_rejects_a_bad_gpu_count() -> None:
    with pytest.raises(ValueError, match="n_gpus"):
        system_for("h100", 0)
    with pytest.raises(UnknownNameError, match="h100-sxm-80gb"):
        system_for("h10-sxm", 8)


# ---- validation ----


def test_schema_error_names_file_and_field(tmp_path: Path) -> None:
    data = _dict()
    data["intra_node"]["bandwidth_GBps"] = "fast"
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as err:
        load_system_file(path)
    assert str(path) in str(err.value) and "intra_node.bandwidth_GBps" in str(err.value)


def test_unknown_field_is_rejected() -> None:
    data = _dict()
    data["host"]["ram_GB"] = 2048
    with pytest.raises(ValidationError, match="ram_GB"):
        System.model_validate(data)


def test_missing_citation_is_rejected(tmp_path: Path) -> None:
    data = _dict()
    del data["sources"]["host.host_ram_GB"]
    with pytest.raises(ValidationError, match="host.host_ram_GB"):
        System.model_validate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as err:
        load_system_file(path)
    assert str(path) in str(err.value) and "host.host_ram_GB" in str(err.value)


def test_source_key_naming_no_field_is_rejected() -> None:
    data = _dict("rtx-4090-workstation")
    data["sources"]["inter_node.nic_bandwidth_Gbps"] = "no network on a workstation"
    with pytest.raises(ValidationError, match="inter_node.nic_bandwidth_Gbps"):
        System.model_validate(data)


def test_unknown_device_is_rejected(tmp_path: Path) -> None:
    data = _dict()
    data["device"] = "h100-sxm-800gb"
    with pytest.raises(ProfileError, match=r"device: .*closest: h100-sxm-80gb"):
        load_system_file(_write(tmp_path, data))


def test_name_must_equal_file_stem(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="file stem"):
        load_system_file(_write(tmp_path, _dict(), name="dgx-h100-copy"))


def test_price_without_source_is_rejected() -> None:
    data = _dict()
    data["price_source"] = None
    with pytest.raises(ValidationError, match="price_source"):
        System.model_validate(data)


def test_curve_where_a_bigger_message_finishes_sooner_is_rejected() -> None:
    data = _dict()
    # 10x the busbw for 2x the size: 2 MiB would take less time than 1 MiB
    data["intra_node"]["busbw_curve"] = [[1048576, 10.0], [2097152, 100.0]]
    with pytest.raises(ValidationError, match="finish sooner"):
        System.model_validate(data)


def test_ring_busbw_above_the_peak_is_rejected() -> None:
    data = _dict()
    data["intra_node"]["ring_busbw_GBps"] = 500
    with pytest.raises(ValidationError, match="ring_busbw_GBps=500"):
        System.model_validate(data)


def test_pcie_gen_must_match_the_host_link() -> None:
    data = _dict()
    data["host"]["link"] = "nvlink-c2c"
    with pytest.raises(ValidationError, match="pcie_gen"):
        System.model_validate(data)


def test_systems_are_frozen() -> None:
    with pytest.raises(ValidationError):
        get_system("dgx-h100").gpus_per_node = 16  # type: ignore[misc]


# ---- real numbers against their citations ----


def test_dgx_h100_figures() -> None:
    dgx = get_system("dgx-h100")
    # 8 ConnectX-7 at 400 Gb/s, 46-48 GB/s each in nccl-tests (#290): 8 x 400e9 / 8 x 0.94 = 376 GB/s per node
    assert dgx.inter_node.node_achieved_Bps == pytest.approx(8 * 400e9 / 8 * 0.94)
    assert dgx.inter_node.nic_achieved_Bps == pytest.approx(47e9)
    # NVLS all-reduce ~480, ring ~370 GB/s (nccl-tests#212)
    assert dgx.intra_node.peak_busbw_GBps == pytest.approx(480, rel=1e-2)
    assert dgx.intra_node.ring_busbw_GBps == 370
    # 10.2 kW for the node: 10200 / 8 = 1275 W per GPU, host included
    assert dgx.node_power_per_gpu_W == 10200 / 8
    assert dgx.price_usd_per_node_hour == pytest.approx(4.76 * 8)


def test_gb200_nvl72_is_one_72_gpu_domain() -> None:
    nvl = get_system("nvl72")
    assert nvl.gpus_per_node == 72 and nvl.intra_node.kind == "nvswitch"
    # 36 Grace CPUs x 480 GB LPDDR5X and x 72 cores
    assert nvl.host.host_ram_GB == 36 * 480 and nvl.host.cpu_cores == 36 * 72
    assert nvl.host.link == "nvlink-c2c" and nvl.host.pcie_gen is None
    assert nvl.price_usd_per_gpu_hour is None


def test_workstations_are_single_node() -> None:
    for name in ("rtx-4090-workstation", "rtx-a6000-workstation"):
        system = get_system(name)
        assert system.inter_node is None and not system.multi_node
        assert system.gpus_per_node == 2


def test_aws_shapes_follow_the_instance() -> None:
    g5 = get_system("g5.48xlarge")
    # 768 GiB in GB, 192 vCPUs = 96 cores, one EFA device
    assert g5.host.host_ram_GB == pytest.approx(768 * 1024**3 / 1e9, abs=0.01)
    assert g5.host.cpu_cores == 192 // 2
    assert g5.inter_node.nics_per_node == 1
