#!/usr/bin/env bash
# Build a virtual environment that runs LeRobot VERSION's pi0 / pi05 (policy, processors,
# save/load) on this machine's Python 3.11 and CPU torch, for scripts/lerobot_fixtures.py.
#
#   scripts/lerobot_venv.sh VERSION [VENV_DIR]      # default VENV_DIR: /work/venvs/lerobot-VERSION
#   OPENPI_DIR=/path/to/openpi scripts/lerobot_venv.sh 0.4.4
#
# The venv reuses the system's torch (--system-site-packages; torch is never installed here, so
# pip cannot pull a CUDA build). LeRobot itself goes in with --no-deps; only what its pi0/pi05 +
# processor code imports is added. Workarounds, each the smallest that makes LeRobot's own code run:
#   * torchvision: PyPI's wheel is CUDA-linked and fails to import beside torch 2.13.0+cpu; pi0/pi05
#     never call it, so an import-only stub package is written (transformers needs
#     torchvision.transforms.InterpolationMode to be a real Enum once it sees torchvision).
#   * LeRobot >= 0.5 declares Python >= 3.12: installed with --ignore-requires-python, then its eight
#     PEP 695 statements (class X[T], def f[T: B], type X = ...) are respelled with TypeVar/Generic in
#     the INSTALLED copy (nothing that computes changes).
#   * LeRobot 0.4.x's pi0/pi05 need the transformers fork `fix/lerobot_openpi` (a git branch, not on
#     PyPI and unreachable here). That fork is transformers 4.53 with openpi's
#     `src/openpi/models_pytorch/transformers_replace/` files copied over it (adaRMS Gemma norms,
#     no embedding normaliser, PaliGemma without the image-feature scaling, siglip/check.py).
#     We rebuild it the way openpi documents: transformers==4.53.2 from PyPI + those files from an
#     openpi checkout given as OPENPI_DIR (a git work tree or bare repo; commit 15a9616 used).
set -euo pipefail

ver=${1:?usage: $0 VERSION [VENV_DIR]}
venv=${2:-/work/venvs/lerobot-$ver}
py=${PYTHON:-python3}

"$py" -m venv --system-site-packages "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --no-deps --ignore-requires-python --force-reinstall "lerobot==$ver"  # a fresh, unpatched copy

# What pi0/pi05, the processors and the policy factory import (0.4/0.5: also lerobot.datasets,
# pulled in by lerobot.optim) beyond the system site-packages (numpy, scipy, safetensors,
# sentencepiece, torch come from there). Never torch: the system's torch 2.13.0+cpu is used.
case "$ver" in
  0.4.*)
    "${pip[@]}" "transformers==4.53.2" "tokenizers>=0.21,<0.22" "huggingface-hub>=0.34.2,<0.36" \
      "draccus==0.10.0" jsonlines "einops>=0.8,<0.9" termcolor "gymnasium>=1.1.1,<2" "deepdiff>=7,<9" \
      "opencv-python-headless>=4.9,<4.13" "datasets>=4,<5" pandas pyarrow "av>=15,<16" \
      "imageio[ffmpeg]>=2.34,<3" "pyserial>=3.5,<4" "accelerate>=1.10,<2" "diffusers>=0.27.2,<0.36"
    : "${OPENPI_DIR:?LeRobot 0.4.x needs OPENPI_DIR (an openpi checkout) for transformers_replace}"
    site=$("$venv/bin/python" -c 'import transformers, os; print(os.path.dirname(transformers.__file__))')
    src=src/openpi/models_pytorch/transformers_replace
    if [ -d "$OPENPI_DIR/$src" ]; then
      cp -r "$OPENPI_DIR/$src/." "$site/"
    else  # a bare repository (e.g. a mirror): export the folder from HEAD
      git --git-dir="$OPENPI_DIR" archive HEAD "$src" | tar -x -C "$site" --strip-components=4
    fi
    ;;
  0.5.*)  # 0.5.1 pins transformers==5.3.0; 0.5.0 allows >=5.3,<6 (0.5.0 not built here)
    "${pip[@]}" "transformers==5.3.0" "huggingface-hub>=1.3,<2" "tokenizers>=0.22,<=0.23.0" \
      "draccus==0.10.0" jsonlines "einops>=0.8,<0.9" termcolor "gymnasium>=1.1.1,<2" "deepdiff>=7,<9" \
      "opencv-python-headless>=4.9,<4.13" "datasets>=4,<5" pandas pyarrow "av>=15,<16" \
      "imageio[ffmpeg]>=2.34,<3" "pyserial>=3.5,<4"
    ;;
  0.6.*)  # 0.6.0 pins draccus==0.10.0, 0.6.1 draccus>=0.11.6,<0.12 (0.6.0 not built here)
    draccus="draccus>=0.11.6,<0.12"; [ "$ver" = 0.6.0 ] && draccus="draccus==0.10.0"
    "${pip[@]}" "transformers>=5.4,<5.6" "huggingface-hub>=1.6,<2" "tokenizers>=0.22,<=0.23.0" \
      "$draccus" "einops>=0.8,<0.9" termcolor "gymnasium>=1.1.1,<2" "deepdiff>=7,<9" \
      "opencv-python-headless>=4.9,<4.13" \
      "num2words>=0.5.14,<0.6"  # lerobot[smolvla]'s extra: transformers' SmolVLMProcessor needs it
    ;;
  *) echo "unknown LeRobot version $ver" >&2; exit 2 ;;
esac

# torchvision: an import-only stub (see above); shadows any system torchvision. Every
# torchvision.* submodule imports; every name in it is a class that refuses to be instantiated
# (so `class X(v2.Transform)` still defines), except transforms.InterpolationMode, a real Enum.
"$venv/bin/python" - "$venv" <<'PY'
import sys, sysconfig, pathlib
venv = pathlib.Path(sys.argv[1])
site = pathlib.Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
tv = site / "torchvision"
tv.mkdir(parents=True, exist_ok=True)
(tv / "__init__.py").write_text('''"""Import-only torchvision stub: PyPI's torchvision does not load beside torch 2.13.0+cpu here
and LeRobot's pi0/pi05 never call it. Written by walkforge's scripts/lerobot_venv.sh."""
import enum
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+stub"


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _Missing:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"torchvision stub: {type(self).__qualname__} is not available")


def _module_getattr(module_name):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "InterpolationMode":
            return InterpolationMode
        stub = type(name, (_Missing,), {"__module__": module_name})
        setattr(sys.modules[module_name], name, stub)
        return stub
    return __getattr__


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name)
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
__getattr__ = _module_getattr(__name__)
from . import transforms  # noqa: E402,F401
transforms.InterpolationMode = InterpolationMode
''')
PY

# The system's `kernels` (0.19, for walkforge's transformers) breaks older transformers at import
# (5.x: hub_kernels.py builds LayerRepository without a version; 4.53: kernels needs
# huggingface-hub 1.x); a stub shadows it so transformers takes its no-kernels path (the hub
# kernels are CUDA-only anyway).
if "$venv/bin/python" -c 'import importlib.util, sys; sys.exit(not importlib.util.find_spec("kernels"))'; then
  "$venv/bin/python" - "$venv" <<'PY'
import sys, sysconfig, pathlib
venv = pathlib.Path(sys.argv[1])
site = pathlib.Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
(site / "kernels").mkdir(exist_ok=True)
(site / "kernels" / "__init__.py").write_text(
    '"""kernels is hidden in this LeRobot venv (scripts/lerobot_venv.sh): `from kernels import X`\n'
    'fails for every X but get_kernel, which transformers 4.53 imports unguarded."""\n\n\n'
    'def get_kernel(*args, **kwargs):\n    raise ImportError("kernels is hidden in this LeRobot venv")\n')
PY
fi

# PEP 695 → TypeVar/Generic in the installed copy (LeRobot >= 0.5 only; a no-op for 0.4.x).
"$venv/bin/python" - <<'PY'
import importlib.util, pathlib, re
root = pathlib.Path(importlib.util.find_spec("lerobot").origin).parent
n = 0
for path in root.rglob("*.py"):
    text = path.read_text(encoding="utf-8")
    new = text
    # type X = expr  →  X = expr (module-level aliases; values only used in annotations)
    new, k1 = re.subn(r"^type (\w+) = ", r"\1 = ", new, flags=re.M)
    # class C[A, B](Base):  →  class C(Base, Generic[A, B]):  (TypeVars declared before it)
    # (the TypeVars go before the statement's decorators)
    def typevars(params):
        out = "import typing as _t695\n"
        for p in params.split(","):
            name, _, bound = p.partition(":")
            out += f'{name.strip()} = _t695.TypeVar("{name.strip()}"' + (
                f", bound={bound.strip()}" if bound else "") + ")\n"
        return out

    def cls(m):
        deco, name, params, bases = m.group(1), m.group(2), m.group(3), m.group(4)
        gen = "_t695.Generic[" + ", ".join(p.strip() for p in params.split(",")) + "]"
        return f"{typevars(params)}{deco}class {name}({bases + ', ' if bases else ''}{gen}):"
    new, k2 = re.subn(r"^((?:@.*\n)*)class (\w+)\[([^\]]+)\](?:\(([^)]*)\))?:", cls, new, flags=re.M)
    # def f[T: Bound](...)  →  T = TypeVar("T", bound=Bound); def f(...)
    def fn(m):
        return f"{typevars(m.group(3))}{m.group(1)}def {m.group(2)}("
    new, k3 = re.subn(r"^((?:@.*\n)*)def (\w+)\[([^\]]+)\]\(", fn, new, flags=re.M)
    if new != text:
        path.write_text(new, encoding="utf-8")
        n += k1 + k2 + k3
        print(f"PEP 695 respelled: {path.relative_to(root.parent)} ({k1 + k2 + k3})")
print(f"{n} PEP 695 statements respelled")
PY

"$venv/bin/python" - <<'PY'
import lerobot, torch, transformers
from lerobot.policies.pi0 import PI0Config, PI0Policy  # noqa: F401
from lerobot.policies.pi05 import PI05Config, PI05Policy  # noqa: F401
print("lerobot", lerobot.__version__, "torch", torch.__version__, "transformers", transformers.__version__)
PY
