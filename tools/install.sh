#!/usr/bin/env bash
# Installs musu and everything it needs into the current Python, idempotently.
#   torch + torchvision (a matching pair; any already-installed working pair is kept). From the
#               package index pip uses, or from $TORCH_INDEX_URL when set, e.g. PyTorch's CPU-only
#               builds on a machine without a GPU:
#                 TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash tools/install.sh
#               (or install that pair first: pip install torch torchvision --index-url <url>).
#   Detectron2: kept if importable; else built from $DETECTRON2_SRC (a local clone) if set;
#               else from Detectron2's public git repository, as its INSTALL.md recommends.
#   musu itself (editable, with the test extras).
# When everything is present it only checks, in a few seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
PIP=("$PYTHON" -m pip install --disable-pip-version-check --no-input)
D2_GIT_URL="git+https://github.com/facebookresearch/detectron2.git"

say() { printf '[install] %s\n' "$*"; }
die() { printf '\n[install] ERROR: %s\n\n' "$*" >&2; exit 1; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "Python >= 3.10 is required (found $("$PYTHON" --version 2>&1)). Set PYTHON=/path/to/python3.10+."

# 1. torch + torchvision that work together (torchvision's compiled ops load against this torch).
torch_ok() {
  "$PYTHON" - <<'PY' >/dev/null 2>&1
import torch, torchvision
boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
assert torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5).tolist() == [0]
PY
}
if torch_ok; then
  say "torch + torchvision: present and working"
else
  TORCH_FROM=()
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    TORCH_FROM=(--index-url "$TORCH_INDEX_URL")
    say "torch + torchvision: installing a matching pair from TORCH_INDEX_URL=$TORCH_INDEX_URL"
  else
    say "torch + torchvision: installing a matching pair from the package index"
    if ! command -v nvidia-smi >/dev/null 2>&1; then
      say "no NVIDIA driver found (nvidia-smi); the default build brings the CUDA libraries"
      say "(about 5 GB installed). PyTorch's CPU-only build instead: interrupt and run"
      say "  TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash tools/install.sh"
    fi
  fi
  "${PIP[@]}" ${TORCH_FROM[@]+"${TORCH_FROM[@]}"} torch torchvision || die "pip could not install torch and torchvision.
  Install a matching pair by hand (see https://pytorch.org; CPU-only:
  pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu), then run this script again."
  torch_ok || die "torch and torchvision are installed but do not work together
  (e.g. 'operator torchvision::nms does not exist': a CPU-only torch with a CUDA torchvision).
  Fix: python3 -m pip install --force-reinstall torch torchvision   (a pair built together),
  then rebuild Detectron2 and run this script again."
fi

# 2. Detectron2 (not on PyPI). Its compiled ops must match the installed torch.
d2_ok() { "$PYTHON" -c 'import detectron2, detectron2._C' >/dev/null 2>&1; }
if d2_ok; then
  say "detectron2: present ($("$PYTHON" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))'))"
else
  # Build with the installed torch (no build isolation) through PEP 517: Detectron2 has no
  # pyproject.toml, and pip's legacy `setup.py develop` path would build in an isolated env.
  "${PIP[@]}" "setuptools>=64" ninja >/dev/null || true
  if [ -n "${DETECTRON2_SRC:-}" ]; then
    [ -f "$DETECTRON2_SRC/setup.py" ] || die "DETECTRON2_SRC=$DETECTRON2_SRC is not a Detectron2 clone (no setup.py)."
    say "detectron2: building from DETECTRON2_SRC=$DETECTRON2_SRC"
    (cd "$DETECTRON2_SRC" && rm -rf build && find detectron2 -name '_C*.so' -delete) || true
    "${PIP[@]}" --no-build-isolation --use-pep517 -e "$DETECTRON2_SRC" \
      || die "building Detectron2 from $DETECTRON2_SRC failed (see the output above)."
  else
    say "detectron2: building from $D2_GIT_URL"
    "${PIP[@]}" --no-build-isolation --use-pep517 "$D2_GIT_URL" || die "Detectron2 is not installed and could not be installed.
  Detectron2 is not on PyPI. Either give this machine access to GitHub, or clone it elsewhere
  and point this script at the clone:
      git clone https://github.com/facebookresearch/detectron2.git /path/to/detectron2
      DETECTRON2_SRC=/path/to/detectron2 bash tools/install.sh"
  fi
  d2_ok || die "Detectron2 installed but 'import detectron2._C' fails: it was built against another torch.
  Rebuild it: rm -rf <clone>/build; find <clone>/detectron2 -name '_C*.so' -delete;
  then run this script again with DETECTRON2_SRC=<clone>."
fi

# 3. musu itself, editable from this checkout, with its test tools.
musu_ok() {  # run from / so that the checkout's own folder does not shadow the installed package
  (cd / && "$PYTHON" - "$ROOT" <<'PY' >/dev/null 2>&1
import os, sys
import musu, pytest, hypothesis, pycocotools, cv2, fvcore, iopath, matplotlib, onnx, onnxruntime, timm  # noqa: F401
assert os.path.samefile(os.path.dirname(musu.__file__), os.path.join(sys.argv[1], "musu"))
PY
  )
}
if musu_ok; then
  say "musu: installed from $ROOT"
else
  say "musu: installing (editable) from $ROOT"
  (cd "$ROOT" && "${PIP[@]}" --no-build-isolation -e ".[test]") || die "pip install -e .[test] failed."
  musu_ok || die "musu was installed but does not import from $ROOT (see: $PYTHON -c 'import musu')."
fi
# 4. The sibling projects under projects/ (each an installable package with its own tests).
for project in "$ROOT"/projects/*/; do
  [ -f "$project/setup.cfg" ] || [ -f "$project/pyproject.toml" ] || continue
  name="$(basename "$project")"
  module="$(sed -n 's/^name *= *//p' "$project/setup.cfg" 2>/dev/null | head -n 1)"
  module="${module:-$name}"
  if (cd / && "$PYTHON" - "$project" "$module" <<'PY' >/dev/null 2>&1
import importlib.util, os, sys
from importlib.metadata import entry_points
module = sys.argv[2].replace("-", "_")
spec = importlib.util.find_spec(module)
assert spec and spec.origin and os.path.realpath(spec.origin).startswith(os.path.realpath(sys.argv[1]))
setup_cfg = os.path.join(sys.argv[1], "setup.cfg")
if os.path.exists(setup_cfg) and "musu.projects" in open(setup_cfg).read():  # entry point current
    assert any(e.value == module for e in entry_points(group="musu.projects"))
PY
  ); then
    say "project $name: installed"
  else
    say "project $name: installing (editable)"
    (cd "$project" && "${PIP[@]}" --no-build-isolation -e .) || die "pip install -e projects/$name failed."
  fi
done
say "ready"
