"""Atomic writes (nothing on disk is ever half-written) and safe readers (no pickled code, damaged files named).

A file is written to a temporary name beside its target and renamed into place; a folder is
built under a temporary name and renamed (replacing an older one only once the new one is
complete). Every writer in mechscope goes through these two helpers.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def clear_leftovers(path: str | os.PathLike) -> int:
    """Remove the temporary files a killed writer of ``path`` left beside it; return how many.

    Only the process that owns ``path`` should call this, before it writes ``path`` again.
    """
    path = Path(path)
    n = 0
    for tmp in path.parent.glob(glob.escape(path.name) + ".*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``path``, on any error it is removed.

    With ``replace=False`` an existing complete ``path`` (written meanwhile by another process)
    is kept and the new folder discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists() and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
        elif path.exists():
            old = path.with_name(path.name + f".old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Safe readers: weights only from safetensors, .npz without pickle, or torch.load(weights_only=True).
# A missing, damaged or refused file gets a mechscope error that names it and says what to do.

def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """The JSON object in ``path`` (``what`` names it in errors: "the SAE's config", "run record")."""
    import json

    from .errors import InputError, NotFoundError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise NotFoundError(f"{path} is missing ({what})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); {what} is damaged") from e
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a JSON {type(data).__name__}, not an object: it is not {what}")
    return data


def read_safetensors(path: str | os.PathLike, what: str = "weights", with_metadata: bool = False) -> dict | tuple:
    """A safetensors file's tensors ``{name: tensor}`` (with its string metadata too, as a pair, when asked);
    a damaged or missing file gets an error naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .errors import NotFoundError

    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} is missing ({what})")
    try:
        if with_metadata:
            with safe_open(str(path), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise NotFoundError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); write or download it "
                            f"again") from e


def read_npz(path: str | os.PathLike) -> dict:
    """An ``.npz`` file's arrays as tensors, read with ``allow_pickle=False``."""
    import numpy as np
    import torch

    from .errors import InputError, NotFoundError

    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: torch.from_numpy(np.asarray(f[k])) for k in f.files}
    except FileNotFoundError as e:
        raise NotFoundError(f"{path} is missing") from e
    except ValueError as e:
        raise InputError(f"{path} holds pickled objects; mechscope reads .npz files with allow_pickle=False only") from e
    except (OSError, EOFError) as e:
        raise NotFoundError(f"{path} is damaged or truncated ({e}); download it again") from e


def read_torch(path: str | os.PathLike, what: str = "weights") -> dict:
    """``torch.load(path, weights_only=True)`` on CPU; pickled code is refused with an error saying so."""
    import torch

    from .errors import InputError, NotFoundError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise NotFoundError(f"{path} is missing ({what})") from e
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError ... for what it refuses
        if "Unsupported global" in str(e) or "Unsupported class" in str(e):
            raise InputError(f"{path} needs arbitrary pickled code to load, which mechscope refuses "
                             f"(torch.load(weights_only=True) only); re-save its tensors with safetensors") from e
        raise NotFoundError(f"{path} is damaged or not a torch checkpoint ({type(e).__name__}: {e})") from e


def _is_model(x) -> bool:
    return hasattr(x, "run_with_cache") and hasattr(x, "cfg")


def path_then_model(path: object, model: object, loader: str) -> tuple:
    """``(path, model)`` for a loader called ``loader(path, model)``: every mechscope loader takes the path first.

    The old order (model first) is swapped with a ``DeprecationWarning`` (accepted until mechscope 1.0);
    anything else that is not a path is a clear error instead of a ``TypeError`` from pathlib."""
    import warnings

    from .errors import InputTypeError

    if _is_model(path) and (model is None or isinstance(model, (str, os.PathLike))):
        warnings.warn(f"{loader}(model, path) is deprecated: mechscope loaders take the path first, "
                      f"{loader}(path, model); the old order stops working in mechscope 1.0", DeprecationWarning,
                      stacklevel=3)
        path, model = model, path
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"{loader}(path, model): the path must be a str or pathlib.Path, got "
                             f"{type(path).__name__}")
    if model is not None and not _is_model(model):
        raise InputTypeError(f"{loader}(path, model): the model must be a mechscope HookedModel (from "
                             f"mechscope.load), got {type(model).__name__}")
    return path, model
