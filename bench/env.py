"""What the numbers were measured on: device name, library versions, date, commit.

``python -m bench.env OUT.json [--command TEXT]`` writes the same record for ``gpu_check.sh``.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch


def resolve_device(name=None):
    """``None``/``"auto"`` -> cuda when present, else cpu; ``"cuda"`` without a GPU is an error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"unsupported device {name!r}: use cpu or cuda")
    return device


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cache_bytes(device):
    """GPU L2 size, or the CPU's largest cache (sysfs); None where unknown."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None) or None
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size"), encoding="utf-8") as f:
                    text = f.read().strip()
            except OSError:
                continue
            unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
    except (OSError, ValueError):
        return None
    return max(sizes) if sizes else None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def load_average():
    """1-minute system load and CPU count: CPU timings mean little on a busy machine."""
    try:
        return {"load_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    except (OSError, AttributeError):
        return None


def _version(module_name):
    try:
        module = __import__(module_name)
    except Exception as exc:  # a broken install is worth recording, not fatal
        return f"unavailable ({type(exc).__name__})"
    return getattr(module, "__version__", "unknown")


def _git(*args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def describe(device):
    """A JSON-ready record of the machine, the libraries and the code being measured."""
    now = datetime.datetime.now(datetime.timezone.utc)
    info = {
        "device": device.type,
        "device_name": device_name(device),
        "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fusedopt": _version("fusedopt"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cache_bytes": cache_bytes(device),
        "load_average": load_average(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            cuda=torch.version.cuda,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_sm_count=props.multi_processor_count,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            if smi.returncode == 0:
                info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.env", description=__doc__)
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--command", default=None, help="the command whose results this describes")
    args = parser.parse_args(argv)
    info = describe(resolve_device(args.device))
    info["command"] = args.command or " ".join(sys.argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
