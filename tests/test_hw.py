"""Hardware detection: parsers on captured outputs, the real runner on real programs, this machine."""

from __future__ import annotations

import json
import platform
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest

from stigmer.hw import amd, cpu, gpu, memory, nvidia
from stigmer.hw.report import GpuInfo, detect, disk_free, normalize_arch
from stigmer.hw.run import run_probe

FIXTURES = Path(__file__).parent / "fixtures" / "hw"
H100 = FIXTURES / "gpu-h100"
MIB = 1 << 20
LINUX_ONLY = pytest.mark.skipif(sys.platform != "linux", reason="Linux: /proc, sysfs, shell scripts")


class Replay:
    """A `Run` that answers from captured outputs, keyed by program name, and records what was asked."""

    def __init__(self, answers: dict[str, tuple[int, str, str] | BaseException]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
        self.calls.append(list(argv))
        answer = self.answers[Path(argv[0]).name]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def failure(name: str) -> tuple[int, str, str]:
    """A captured nvidia-smi failure: message on stdout, exit code in the file name (x.exitN.txt)."""
    path = next((FIXTURES / "nvidia-smi-failures").glob(f"{name}.exit*.txt"))
    return int(path.suffixes[0].removeprefix(".exit")), path.read_text(), ""


def script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# -- CPU ---------------------------------------------------------------------------------------------
def test_cpuinfo_of_this_machine_gives_the_x86_flags_llama_cpp_uses() -> None:
    flags, model = cpu.parse_cpuinfo((FIXTURES / "cpuinfo-x86_64-xeon.txt").read_text())
    assert model == "Intel(R) Xeon(R) Processor"
    assert {"sse3", "ssse3", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_int8"} <= flags
    assert not flags & {"neon", "sve", "dotprod"}
    assert flags <= cpu.LLAMA_FLAGS  # only the vocabulary, not every kernel flag (no "sse4_1", "aes")


def test_cpuinfo_of_an_arm_server_means_neon_from_asimd() -> None:
    flags, model = cpu.parse_cpuinfo((FIXTURES / "cpuinfo-aarch64-graviton3.txt").read_text())
    assert {"neon", "fp16_va", "dotprod", "matmul_int8", "sve"} <= flags
    assert not flags & {"avx", "sve2"}
    assert model == "ARM CPU (part 0xd40)"  # no model name on ARM: the implementer code says who


def test_sysctl_of_apple_silicon() -> None:
    flags, model = cpu.parse_sysctl((FIXTURES / "sysctl-apple-m2-pro.txt").read_text())
    assert model == "Apple M2 Pro"
    assert flags == {"neon", "fp16_va", "dotprod", "matmul_int8"}  # FEAT_SME: 0 is not a flag


def test_sysctl_of_an_intel_mac() -> None:
    flags, model = cpu.parse_sysctl((FIXTURES / "sysctl-intel-mac-i7-8850h.txt").read_text())
    assert model.startswith("Intel(R) Core(TM) i7-8850H")
    assert flags == {"sse3", "ssse3", "avx", "avx2", "fma", "f16c", "bmi2"}  # avx512f: 0


@pytest.mark.parametrize(
    "present,arch,expected",
    [
        ({13, 36, 39, 40}, "x86_64", {"sse3", "ssse3", "avx", "avx2", "fma", "f16c"}),
        ({13, 36, 39, 40, 41}, "x86_64", {"sse3", "ssse3", "avx", "avx2", "avx512f", "fma", "f16c"}),
        ({13, 39}, "x86_64", {"sse3", "avx"}),  # no AVX2: FMA/F16C are not assumed
        ({43}, "aarch64", {"neon", "dotprod"}),  # Windows on ARM always has NEON
    ],
)
def test_windows_processor_features_map_to_our_flags(
    present: set[int], arch: str, expected: set[str]
) -> None:
    assert cpu.windows_flags(lambda pf: pf in present, arch=arch) == expected


def test_darwin_cpu_detection_runs_sysctl_and_keeps_neon_when_it_fails() -> None:
    m2 = Replay({"sysctl": (1, (FIXTURES / "sysctl-apple-m2-pro.txt").read_text(), "unknown oid")})
    info, problems = cpu.detect_cpu(system="Darwin", machine="arm64", run=m2, timeout=1)
    assert m2.calls == [cpu.SYSCTL_ARGV]
    assert (info.arch, info.model, problems) == ("aarch64", "Apple M2 Pro", [])
    assert "matmul_int8" in info.flags

    broken = Replay({"sysctl": TimeoutError("sysctl did not answer")})
    info, problems = cpu.detect_cpu(system="Darwin", machine="arm64", run=broken, timeout=1)
    assert info.flags == {"neon"} and problems == ["sysctl failed: sysctl did not answer"]


@pytest.mark.parametrize("machine,arch", [("AMD64", "x86_64"), ("x86_64", "x86_64"), ("arm64", "aarch64")])
def test_architecture_names_are_normalised(machine: str, arch: str) -> None:
    assert normalize_arch(machine) == arch


# -- NVIDIA --------------------------------------------------------------------------------------------
def test_nvidia_smi_candidates_on_linux() -> None:
    env = {"PATH": "/home/u/bin::relative/bin:/usr/bin"}
    assert nvidia.candidates("Linux", env) == [
        "/home/u/bin/nvidia-smi",  # PATH first, in order; "" and relative entries skipped
        "/usr/bin/nvidia-smi",
        "/usr/local/nvidia/bin/nvidia-smi",  # containers (NVIDIA's runtime mounts it here)
        "/usr/lib/wsl/lib/nvidia-smi",  # WSL2
        "/usr/local/bin/nvidia-smi",
        "/opt/nvidia/bin/nvidia-smi",
    ]


def test_nvidia_smi_candidates_on_windows() -> None:
    env = {
        "Path": r"C:\Tools;C:\WINDOWS\system32",  # Windows spells it Path; case does not matter
        "SystemRoot": r"C:\WINDOWS",
        "ProgramW6432": r"C:\Program Files",
        "ProgramFiles": r"C:\Program Files (x86)",
    }
    assert nvidia.candidates("Windows", env) == [
        r"C:\Tools\nvidia-smi.exe",
        r"C:\WINDOWS\system32\nvidia-smi.exe",  # also SystemRoot\System32: the same folder, once
        r"C:\Program Files\NVIDIA Corporation\NVSMI\nvidia-smi.exe",
        r"C:\Program Files (x86)\NVIDIA Corporation\NVSMI\nvidia-smi.exe",
    ]
    defaults = nvidia.candidates("Windows", {})
    assert defaults == [
        r"C:\Windows\System32\nvidia-smi.exe",
        r"C:\Program Files\NVIDIA Corporation\NVSMI\nvidia-smi.exe",
    ]


def test_find_takes_the_first_candidate_that_exists() -> None:
    there = {"/usr/local/nvidia/bin/nvidia-smi", "/usr/bin/nvidia-smi"}
    assert (
        nvidia.find("Linux", {"PATH": "/opt/x"}, is_file=there.__contains__)
        == "/usr/local/nvidia/bin/nvidia-smi"
    )
    assert nvidia.find("Linux", {"PATH": ""}, is_file=lambda p: False) is None


def test_the_real_h100_query_without_header() -> None:
    # The capture answers a longer query than ours: name the columns it holds.
    fields = (
        "index",
        "name",
        "uuid",
        "memory.total",
        "memory.used",
        "memory.free",
        "driver_version",
        "compute_cap",
    )
    [h100] = nvidia.parse_query((H100 / "nvidia-smi-query.csv").read_text(), fields)
    assert h100 == GpuInfo("nvidia", "NVIDIA H100 80GB HBM3", 81559 * MIB, 81079 * MIB, "580.159.04", 0)


def test_the_real_h100_query_with_header_and_units() -> None:
    [h100] = nvidia.parse_query((H100 / "nvidia-smi-query-header.csv").read_text())
    assert (h100.name, h100.memory_total, h100.driver) == ("NVIDIA H100 80GB HBM3", 81559 * MIB, "580.159.04")
    assert h100.memory_free is None  # that query did not ask for it


def test_our_query_with_two_gpus_and_unknown_values() -> None:
    text = "0, NVIDIA GeForce RTX 4090, 24564, 23010, 560.35.03\n1, NVIDIA T400, [N/A], [N/A], 560.35.03\n"
    first, second = nvidia.parse_query(text)
    assert (first.index, first.memory_total, first.memory_free) == (0, 24564 * MIB, 23010 * MIB)
    assert (second.index, second.name, second.memory_total, second.memory_free) == (
        1,
        "NVIDIA T400",
        None,
        None,
    )


@pytest.mark.parametrize("capture", ["nvidia-smi.txt", "nvidia-smi-L.txt", "host.txt"])
def test_other_outputs_are_not_mistaken_for_gpu_rows(capture: str) -> None:
    assert nvidia.parse_query((H100 / capture).read_text()) == []


def test_detect_nvidia_asks_our_query() -> None:
    replay = Replay({"nvidia-smi": (0, "0, NVIDIA H100 80GB HBM3, 81559, 81079, 580.159.04\n", "")})
    gpus, problems = nvidia.detect_nvidia("/usr/bin/nvidia-smi", run=replay, timeout=5)
    assert replay.calls == [
        [
            "/usr/bin/nvidia-smi",
            "--query-gpu=index,name,memory.total,memory.free,driver_version",
            "--format=csv,noheader,nounits",
        ]
    ]
    assert [(g.name, g.memory_free) for g in gpus] == [
        ("NVIDIA H100 80GB HBM3", 81079 * MIB)
    ] and problems == []


@pytest.mark.parametrize(
    "case,expected",
    [
        (
            "driver-mismatch",
            "nvidia-smi failed: Failed to initialize NVML: Driver/library version mismatch (exit 18); "
            "the NVIDIA driver was updated but the old one is still loaded: reboot",
        ),
        (
            "no-driver",
            "nvidia-smi failed: NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
            "driver. Make sure that the latest NVIDIA driver is installed and running. (exit 9); "
            "the NVIDIA driver is not loaded: install or reload it",
        ),
        (
            "no-devices",
            "nvidia-smi failed: No devices were found (exit 6); "
            "no NVIDIA GPU is visible (in a container, pass it in: docker run --gpus all)",
        ),
    ],
)
def test_nvidia_smi_failures_become_problems_that_name_the_fix(case: str, expected: str) -> None:
    gpus, problems = nvidia.detect_nvidia("nvidia-smi", run=Replay({"nvidia-smi": failure(case)}), timeout=5)
    assert gpus == [] and problems == [expected]


def test_unexpected_nvidia_output_is_a_problem_not_a_gpu() -> None:
    replay = Replay({"nvidia-smi": (0, "Unknown option: --query-gpu\n", "")})
    gpus, problems = nvidia.detect_nvidia("nvidia-smi", run=replay, timeout=5)
    assert gpus == [] and problems == [
        "nvidia-smi answered, but not with GPU rows we understand: 'Unknown option: --query-gpu'"
    ]


# -- the real runner ---------------------------------------------------------------------------------
@LINUX_ONLY
def test_the_runner_returns_exit_code_and_both_streams() -> None:
    code, out, err = run_probe(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], 10
    )
    assert (code, out, err) == (3, "out\n", "err\n")
    with pytest.raises(FileNotFoundError):
        run_probe(["/nonexistent/nvidia-smi"], 1)


@LINUX_ONLY
def test_a_failing_nvidia_smi_script_through_the_real_runner(tmp_path: Path) -> None:
    code, out, _err = failure("driver-mismatch")
    (tmp_path / "message.txt").write_text(out)
    script(tmp_path / "bin", "nvidia-smi", f'cat "$(dirname "$0")/../message.txt"\nexit {code}\n')
    gpus, problems = gpu.detect_gpus(
        system="Linux", arch="x86_64", environ={"PATH": str(tmp_path / "bin")}, run=run_probe, timeout=10,
        ram_total=16 << 30, sysfs=tmp_path / "no-sysfs",
    )  # fmt: skip
    assert gpus == []
    assert problems == [nvidia.explain(18, out, "")] and "exit 18" in problems[0]


@LINUX_ONLY
def test_a_hanging_nvidia_smi_is_killed_at_the_deadline_with_its_children(tmp_path: Path) -> None:
    # The sleep runs as a child of the script and holds the output pipe: killing only the script would
    # leave the read waiting for the sleep. The script records the sleep's pid for the check below.
    pid_file = tmp_path / "sleep.pid"
    script(tmp_path / "bin", "nvidia-smi", f"sleep 30 &\necho $! > {pid_file}\nwait\n")
    started = time.monotonic()
    gpus, problems = gpu.detect_gpus(
        system="Linux", arch="x86_64", environ={"PATH": str(tmp_path / "bin")}, run=run_probe, timeout=0.5,
        ram_total=16 << 30, sysfs=tmp_path / "no-sysfs",
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert gpus == []
    assert problems == ["nvidia-smi did not answer within 0.5 s (a hung GPU driver?); GPU not used"]
    assert elapsed < 0.5 + 2.0  # the deadline, plus at most the reaping grace
    sleep_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(sleep_pid) and time.monotonic() < deadline:
        try:
            if psutil.Process(sleep_pid).status() == psutil.STATUS_ZOMBIE:
                break  # killed, waiting for init to reap it
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        assert not psutil.pid_exists(sleep_pid), "the probe's child outlived the deadline"


# -- AMD, other PCI GPUs -------------------------------------------------------------------------------
def test_rocm_smi_json_of_one_card() -> None:
    [card] = amd.parse_rocm_smi((FIXTURES / "rocm-smi" / "rx7900xt.json").read_text())
    assert card == GpuInfo("amd", "Radeon RX 7900 XT", 21458059264, 21458059264 - 27856896, "", 0)


def test_rocm_smi_json_after_a_warning_with_old_key_case() -> None:
    cards = amd.parse_rocm_smi((FIXTURES / "rocm-smi" / "rx6800-and-raphael-igpu.txt").read_text())
    assert [(c.index, c.name, c.memory_total, c.memory_free) for c in cards] == [
        (0, "Navi 21 [Radeon RX 6800/6800 XT / 6900 XT]", 17163091968, 17163091968 - 692142080),
        (1, "Raphael", 67108864, 67108864 - 26079232),
    ]  # "system" is not a card


def test_rocm_smi_garbage_is_a_problem() -> None:
    gpus, problems = amd.detect_rocm(
        "rocm-smi", run=Replay({"rocm-smi": (0, "ERROR: no GPUs\n", "")}), timeout=5
    )
    assert gpus == [] and problems == [
        "rocm-smi output not understood (no JSON object in the output): 'ERROR: no GPUs'"
    ]


def pci_device(root: Path, address: str, *, cls: str, vendor: str, device: str, **files: str) -> Path:
    dev = root / "bus" / "pci" / "devices" / address
    dev.mkdir(parents=True)
    for name, text in {"class": cls, "vendor": vendor, "device": device, **files}.items():
        (dev / name).write_text(text + "\n")
    return dev


def sysfs_with_gpus(root: Path) -> Path:
    pci_device(root, "0000:00:02.0", cls="0x030000", vendor="0x8086", device="0x9a49")  # Intel iGPU
    amd_dev = pci_device(
        root, "0000:03:00.0", cls="0x030000", vendor="0x1002", device="0x744c",
        mem_info_vram_total="21458059264", mem_info_vram_used="27856896",
    )  # fmt: skip
    (amd_dev / "driver").symlink_to(root / "bus" / "pci" / "drivers" / "amdgpu")
    pci_device(root, "0000:04:00.0", cls="0x030200", vendor="0x10de", device="0x2330")  # NVIDIA, 3D class
    pci_device(root, "0000:05:00.0", cls="0x030000", vendor="0x1a03", device="0x2000")  # ASPEED BMC VGA
    pci_device(root, "0000:06:00.0", cls="0x020000", vendor="0x8086", device="0x1533")  # a network card
    return root


def test_pci_scan_reads_amd_vram_and_lists_known_vendors_only(tmp_path: Path) -> None:
    found = amd.pci_gpus(sysfs_with_gpus(tmp_path))
    assert [(g.vendor, g.name, g.memory_total, g.memory_free, g.driver) for g in found] == [
        ("other", "Intel GPU (device 0x9a49)", None, None, ""),
        ("amd", "AMD GPU (device 0x744c)", 21458059264, 21458059264 - 27856896, "amdgpu"),
        ("nvidia", "NVIDIA GPU (device 0x2330)", None, None, ""),
    ]


def test_no_gpu_and_no_tools_is_no_gpu_and_no_problem(tmp_path: Path) -> None:
    replay = Replay({})
    gpus, problems = gpu.detect_gpus(
        system="Linux", arch="x86_64", environ={"PATH": "/usr/bin"}, run=replay, timeout=5, ram_total=8 << 30,
        sysfs=tmp_path, is_file=lambda p: False,
    )  # fmt: skip
    assert (gpus, problems, replay.calls) == ([], [], [])  # nothing to run, nothing to report


def test_an_nvidia_gpu_without_nvidia_smi_is_listed_and_explained(tmp_path: Path) -> None:
    gpus, problems = gpu.detect_gpus(
        system="Linux", arch="x86_64", environ={"PATH": ""}, run=Replay({}), timeout=5, ram_total=16 << 30,
        sysfs=sysfs_with_gpus(tmp_path), is_file=lambda p: False,
    )  # fmt: skip
    assert [g.vendor for g in gpus] == ["nvidia", "amd", "other"]
    assert problems == [
        "an NVIDIA GPU is installed but nvidia-smi was not found: install the NVIDIA driver to use it"
    ]


def test_nvidia_smi_figures_replace_the_pci_entry_and_rocm_smi_fills_missing_amd_memory(
    tmp_path: Path,
) -> None:
    root = tmp_path / "sys"
    pci_device(root, "0000:03:00.0", cls="0x030000", vendor="0x1002", device="0x73bf")  # no mem_info files
    pci_device(root, "0000:04:00.0", cls="0x030200", vendor="0x10de", device="0x2330")
    replay = Replay(
        {
            # the H100 capture, in our query's columns
            "nvidia-smi": (0, "0, NVIDIA H100 80GB HBM3, 81559, 81079, 580.159.04\n", ""),
            "rocm-smi": (0, (FIXTURES / "rocm-smi" / "rx6800-and-raphael-igpu.txt").read_text(), ""),
        }
    )  # fmt: skip
    tools = {"/usr/bin/nvidia-smi", "/opt/rocm/bin/rocm-smi"}
    gpus, problems = gpu.detect_gpus(
        system="Linux", arch="x86_64", environ={"PATH": "/usr/bin"}, run=replay, timeout=5,
        ram_total=64 << 30, sysfs=root, is_file=tools.__contains__,
    )  # fmt: skip
    assert problems == []
    assert [(g.vendor, g.name, g.memory_free) for g in gpus] == [
        ("nvidia", "NVIDIA H100 80GB HBM3", 81079 * MIB),
        ("amd", "Navi 21 [Radeon RX 6800/6800 XT / 6900 XT]", 17163091968 - 692142080),
        ("amd", "Raphael", 67108864 - 26079232),
    ]


def test_apple_silicon_has_one_gpu_sharing_the_ram() -> None:
    ram = 32 << 30
    gpus, problems = gpu.detect_gpus(
        system="Darwin",
        arch="aarch64",
        environ={},
        run=Replay({}),
        timeout=5,
        ram_total=ram,
        chip="Apple M2 Pro",
    )
    assert problems == []
    assert gpus == [GpuInfo("apple", "Apple M2 Pro", ram, None, "Metal", 0, unified_memory=True)]
    assert gpu.apple_gpu(system="Darwin", arch="x86_64", ram_total=ram, chip="Intel") is None  # Intel Mac
    assert gpu.apple_gpu(system="Linux", arch="aarch64", ram_total=ram, chip="") is None  # Asahi, Graviton


# -- memory ------------------------------------------------------------------------------------------
def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_is_the_tightest_along_the_path(tmp_path: Path) -> None:
    write(tmp_path / "memory.max", "max\n")  # the root: no limit
    write(tmp_path / "docker" / "memory.max", "8589934592\n")
    write(tmp_path / "docker" / "memory.current", "1000\n")
    write(tmp_path / "docker" / "app" / "memory.max", "max\n")
    write(tmp_path / "docker" / "app" / "memory.current", "500\n")
    assert memory.cgroup_limit("0::/docker/app\n", tmp_path) == (8589934592, 1000)
    write(tmp_path / "docker" / "app" / "memory.max", "17179869184\n")  # looser than its parent's
    assert memory.cgroup_limit("0::/docker/app\n", tmp_path) == (8589934592, 1000)


def test_cgroup_v1_limit_and_unlimited_values(tmp_path: Path) -> None:
    text = "9:pids:/\n4:memory:/process_api/abc\n0::/\n"
    write(tmp_path / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    write(tmp_path / "memory" / "process_api" / "abc" / "memory.limit_in_bytes", "4294967296\n")
    write(tmp_path / "memory" / "process_api" / "abc" / "memory.usage_in_bytes", "1073741824\n")
    assert memory.cgroup_limit(text, tmp_path) == (4294967296, 1073741824)
    assert memory.cgroup_limit("4:memory:/other\n", tmp_path) is None  # only the unlimited root applies


@LINUX_ONLY
def test_a_container_limit_lowers_the_reported_memory(tmp_path: Path) -> None:
    limit = 2 << 30
    write(tmp_path / "cg" / "box" / "memory.max", f"{limit}\n")
    write(tmp_path / "cg" / "box" / "memory.current", f"{limit // 4}\n")
    write(tmp_path / "self-cgroup", "0::/box\n")
    total, available, notes = memory.detect_memory(
        system="Linux", cgroup_root=tmp_path / "cg", proc_self_cgroup=tmp_path / "self-cgroup"
    )
    assert total == limit and available <= limit - limit // 4
    assert notes == [f"memory is limited to {limit} bytes by the container (cgroup), below the host's"]


# -- this machine --------------------------------------------------------------------------------------
def test_detect_on_this_machine(tmp_path: Path) -> None:
    report = detect(tmp_path / "not-yet" / "models")  # the models folder does not exist yet
    assert report.ram_total > 1 << 30 and 0 < report.ram_available <= report.ram_total
    assert report.cpu.logical_cores >= report.cpu.physical_cores >= 1
    assert report.cpu.arch == normalize_arch(platform.machine()) and report.cpu.arch in ("x86_64", "aarch64")
    assert report.cpu.flags & ({"avx", "sse3"} if report.cpu.arch == "x86_64" else {"neon"})
    assert report.gpus == [] and report.vram_total == 0  # this machine has no GPU
    assert report.disk_free == disk_free(tmp_path) > 0
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["cpu"]["arch"] == report.cpu.arch and as_json["ram_total"] == report.ram_total


def test_importing_the_pure_modules_stays_light() -> None:
    import subprocess

    code = (
        "import sys; import stigmer.hw.fit, stigmer.llm.gguf, stigmer.hw.report; "
        "print(sorted(m for m in ('psutil', 'subprocess', 'json', 'csv') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
