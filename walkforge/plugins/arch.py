"""Which AOT kernel image of a bundle runs on a given GPU: a pure function of the records, the
device's compute capability and the driver's CUDA version (tested on CPU with fake devices).

CUDA's compatibility rules, as the selection applies them:

- a cubin built for sm_XY runs on a device X.Z with Z >= Y (same major only); an arch-specific
  cubin (sm_90a, sm_100a, sm_120a: what Triton builds for sm_90 and later) runs on X.Y exactly;
- PTX for sm_XY is JIT-compiled by the driver for any device of compute capability >= X.Y, across
  majors; PTX for an arch-specific target (sm_90a) only for X.Y exactly;
- the driver JITs PTX only up to the PTX ISA of its own CUDA version (`PTX_ISA_CUDA`): minor-version
  compatibility, which lets cubins from a newer 12.x/13.x toolkit run, does not apply to PTX.

Preference: the exact cubin, else the newest PTX the device and driver can JIT (code generated
for the device itself), else a compatible cubin of an older minor (no JIT needed), else one
WalkforgeError line naming the device and the archs the bundle has.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from walkforge.errors import WalkforgeError

FP8_MIN_CC = (8, 9)
"""FP8 (E4M3) tensor cores and Triton's float8e4nv: Ada (sm_89) and later. Ampere (sm_80/86) and
Orin (sm_87) have none."""

PTX_ISA_CUDA: dict[str, tuple[int, int]] = {
    "7.0": (11, 0), "7.1": (11, 1), "7.2": (11, 2), "7.3": (11, 3), "7.4": (11, 4), "7.5": (11, 5),
    "7.6": (11, 6), "7.7": (11, 7), "7.8": (11, 8), "8.0": (12, 0), "8.1": (12, 1), "8.2": (12, 2),
    "8.3": (12, 3), "8.4": (12, 4), "8.5": (12, 5), "8.7": (12, 8), "8.8": (12, 9), "9.0": (13, 0),
    "9.1": (13, 1), "9.2": (13, 2),
}  # fmt: skip
"""PTX ISA version -> the CUDA release that introduced it (PTX ISA documentation, release notes).
CUDA 12.6 kept ISA 8.5. Later 9.N are taken as CUDA 13.N (the rule Triton itself applies)."""

CUDA_MIN_DRIVER: dict[tuple[int, int], str] = {
    (11, 0): "450.36.06", (11, 1): "455.23", (11, 2): "460.27.03", (11, 3): "465.19.01",
    (11, 4): "470.42.01", (11, 5): "495.29.05", (11, 6): "510.39.01", (11, 7): "515.43.04",
    (11, 8): "520.61.05", (12, 0): "525.60.13", (12, 1): "530.30.02", (12, 2): "535.54.03",
    (12, 3): "545.23.06", (12, 4): "550.54.14", (12, 5): "555.42.02", (12, 6): "560.28.03",
    (12, 8): "570.26", (12, 9): "575.51.03", (13, 0): "580.65.06", (13, 1): "590.44.01",
}  # fmt: skip
"""CUDA release -> the minimum Linux driver shipped with it (CUDA toolkit release notes, table 3)."""


@dataclass(frozen=True)
class Target:
    """A CUDA compilation target: sm_<major><minor>[a|f]."""

    major: int
    minor: int
    suffix: str = ""  # "a": arch-specific (exact device only); "f": family-specific (same major)

    @classmethod
    def parse(cls, text: str) -> Target:
        match = re.fullmatch(r"(?:sm_?)?(\d+?)(\d)([af]?)", text.strip())
        if match is None:
            raise ValueError(f"bad CUDA target {text!r}; expected e.g. 'sm_90' or 'sm_90a'")
        return cls(int(match.group(1)), int(match.group(2)), match.group(3))

    @property
    def cc(self) -> tuple[int, int]:
        return self.major, self.minor

    def __str__(self) -> str:
        return f"sm_{self.major}{self.minor}{self.suffix}"


def cubin_runs(target: Target, cc: tuple[int, int]) -> bool:
    """Whether a cubin for `target` runs on a device of compute capability `cc`."""
    if target.suffix == "a":
        return target.cc == cc
    return target.major == cc[0] and target.minor <= cc[1]


def ptx_jits(target: Target, cc: tuple[int, int]) -> bool:
    """Whether PTX for `target` can be JIT-compiled for a device of compute capability `cc`."""
    if target.suffix == "a":
        return target.cc == cc
    if target.suffix == "f":
        return target.major == cc[0] and target.minor <= cc[1]
    return target.cc <= cc


def ptx_cuda(isa: str) -> tuple[int, int]:
    """The CUDA version a driver needs to JIT PTX of ISA `isa` ('8.8' -> (12, 9))."""
    if isa in PTX_ISA_CUDA:
        return PTX_ISA_CUDA[isa]
    major, minor = (int(p) for p in isa.split("."))
    if major >= 9:
        return 13 + (major - 9), minor
    raise ValueError(f"unknown PTX ISA {isa!r}")


def min_driver(isa: str) -> str:
    """'CUDA 12.9 (driver >= 575.51.03)' for PTX ISA 8.8: what a driver must be to JIT it."""
    cuda = ptx_cuda(isa)
    driver = CUDA_MIN_DRIVER.get(cuda)
    return f"CUDA {cuda[0]}.{cuda[1]}" + (f" (driver >= {driver})" if driver else "")


def record_target(record: Mapping[str, Any]) -> Target:
    """The PTX/cubin target of an AOT record: its 'ptx_target' ('sm_90a'), else its 'arch' with
    Triton's rule (sm_90 and later are compiled arch-specific)."""
    if record.get("ptx_target"):
        return Target.parse(record["ptx_target"])
    target = Target.parse(record["arch"])
    return Target(target.major, target.minor, "a") if target.major >= 9 and not target.suffix else target


@dataclass(frozen=True)
class Choice:
    """The selected image of a kernel: `record`, `image` ("cubin" or "ptx") and why."""

    record: dict[str, Any]
    image: str
    reason: str


def select_kernel(
    records: Sequence[Mapping[str, Any]],
    kernel: str,
    cc: tuple[int, int],
    driver_cuda: tuple[int, int] | None,
    device: str = "this GPU",
    images: Sequence[str] = ("cubin", "ptx"),
) -> Choice:
    """The image of `kernel` to load on a device of compute capability `cc` whose driver supports
    CUDA `driver_cuda` (None: unknown, PTX ISA not checked); `images`: what the launcher takes
    (TensorRT's AOT plugins take PTX only). See the module doc for the order."""
    mine = [dict(r) for r in records if r.get("kernel") == kernel]
    arch = f"sm_{cc[0]}{cc[1]}"
    if "cubin" in images:
        for r in mine:
            if record_target(r).cc == cc:
                return Choice(r, "cubin", f"cubin built for {record_target(r)}")
    ptx = sorted((r for r in mine if ptx_jits(record_target(r), cc)), key=lambda r: record_target(r).cc,
                 reverse=True)  # fmt: skip
    refused = []
    for r in ptx:
        if driver_cuda is None or ptx_cuda(r["ptx_isa"]) <= driver_cuda:
            return Choice(r, "ptx", f"PTX {record_target(r)} (ISA {r['ptx_isa']}) JIT-compiled for {arch}")
        refused.append(r)
    if "cubin" in images:
        older = sorted(
            (r for r in mine if cubin_runs(record_target(r), cc)), key=lambda r: record_target(r).cc
        )
        if older:
            return Choice(older[-1], "cubin", f"cubin built for {record_target(older[-1])} runs on {arch}")
    if refused:
        r = refused[0]
        have = f"{driver_cuda[0]}.{driver_cuda[1]}" if driver_cuda else "?"
        raise WalkforgeError(
            f"{device} ({arch}): kernel '{kernel}' exists only as PTX ISA {r['ptx_isa']} "
            f"({record_target(r)}), which needs {min_driver(r['ptx_isa'])}; this driver supports CUDA "
            f"{have}: update the driver, or compile the bundle with a Triton whose ptxas is no newer"
        )
    raise WalkforgeError(
        f"{device} ({arch}): bundle has no AOT kernel '{kernel}' that runs here "
        f"(has: {bundle_archs(mine)}); compile with --gpu-archs {arch}"
    )


def bundle_archs(records: Sequence[Mapping[str, Any]]) -> str:
    """'sm_80, sm_90a' — the targets of `records`, sorted, or 'none'."""
    targets = sorted({record_target(r) for r in records}, key=lambda t: (t.cc, t.suffix))
    return ", ".join(map(str, targets)) or "none"


def check_fp8(cc: tuple[int, int], device: str = "this GPU") -> None:
    """A one-line WalkforgeError where a device has no FP8 (E4M3) support (before sm_89)."""
    if tuple(cc) < FP8_MIN_CC:
        raise WalkforgeError(
            f"{device} (sm_{cc[0]}{cc[1]}) has no FP8 (E4M3) tensor cores or float8 conversions "
            f"(sm_89 and later): this bundle's FP8 KV pool or FP8 GEMMs cannot run here; compile it "
            "with --kv-dtype fp32 and --precision bf16 (or fp32/int8)"
        )


def fp8_archs_without(archs: Sequence[str]) -> list[str]:
    """The archs of `archs` that cannot run FP8 (the compile warns about them)."""
    return [a for a in archs if Target.parse(a).cc < FP8_MIN_CC]


def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the installed driver supports (cuDriverGetVersion: 13000 -> (13, 0)), or
    None where libcuda cannot be loaded (no driver on this machine)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, (version.value % 1000) // 10
