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


def read_text(path: str | os.PathLike, errors: str = "strict") -> str:
    """A text file a user brings, as text: UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8" and Windows
    editors write one), line ends ``\r\n`` and ``\r`` read as ``\n``. Every reader of task files, corpora, JSON and
    YAML goes through it."""
    text = Path(path).read_text(encoding="utf-8-sig", errors=errors)
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


# Safe readers: weights only from safetensors, .npz without pickle, or torch.load(weights_only=True).
# A missing, damaged or refused file gets a mechscope error that names it and says what to do.

def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """The JSON object in ``path`` (``what`` names it in errors: "the SAE's config", "run record")."""
    import json

    from .errors import InputError, NotFoundError

    path = Path(path)
    try:
        data = json.loads(read_text(path))
    except FileNotFoundError as e:
        raise NotFoundError(f"{path} is missing ({what})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); {what} is damaged") from e
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a JSON {type(data).__name__}, not an object: it is not {what}")
    return data


def is_pickle(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a pickle (``torch.save``'s zip archive, or a raw pickle stream): a file that would
    run code when loaded, whatever its name says."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def refuse_pickle(path: str | os.PathLike, what: str = "weights") -> None:
    """An error when ``path`` holds a pickle where safetensors are expected."""
    from .errors import InputError

    if is_pickle(path):
        raise InputError(f"{path} is a pickle (a torch.save file), not safetensors ({what}): loading it would run "
                         "code, so mechscope refuses it; convert it to safetensors (safetensors.torch.save_file) and "
                         "load that")


def read_safetensors(path: str | os.PathLike, what: str = "weights", with_metadata: bool = False) -> dict | tuple:
    """A safetensors file's tensors ``{name: tensor}`` (with its string metadata too, as a pair, when asked);
    a damaged or missing file gets an error naming it, a pickle one saying that it is refused."""
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
        refuse_pickle(path, what)
        raise NotFoundError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); write or download it "
                            f"again") from e


def safetensors_header(path: str | os.PathLike, what: str = "weights") -> tuple[dict, int]:
    """A safetensors file's header (``{name: {dtype, shape, data_offsets}}``, without ``__metadata__``) and where its
    data starts, read from the file's first bytes only: nothing is mapped or loaded. A damaged file, or a pickle, is
    named."""
    import json
    import struct

    from .errors import NotFoundError

    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} is missing ({what})")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 2 <= n <= min(size - 8, 100_000_000):
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"the tensors end at byte {8 + n + end} of a file of {size}")
        for v in header.values():
            v["shape"] = [int(x) for x in v["shape"]]
        return header, 8 + n
    except (ValueError, KeyError, TypeError, struct.error) as e:
        refuse_pickle(path, what)
        raise NotFoundError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); write or download it "
                            f"again") from e


def safetensors_shapes(path: str | os.PathLike, what: str = "weights") -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of a safetensors file, read from its header only (no tensor is loaded)."""
    header, _ = safetensors_header(path, what)
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()}


_ST_DTYPES = {"F32": ("float32", 4), "F64": ("float64", 8), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}


def read_rows(path: str | os.PathLike, key: str, rows: "list[int]", what: str = "weights") -> "torch.Tensor":  # noqa: F821
    """Rows ``rows`` (of the first dimension) of tensor ``key`` in a safetensors file, read with one seek and read per
    run of consecutive rows: nothing else of the file is mapped or loaded (a lazily read decoder's active features).
    Float32, float64, float16 and bfloat16 tensors."""
    import torch

    from .errors import InputError

    header, start = safetensors_header(path, what)
    if key not in header:
        raise InputError(f"{path} has no tensor {key!r} (it has {sorted(header)})")
    info = header[key]
    if info["dtype"] not in _ST_DTYPES:
        raise InputError(f"{path}: {key} is {info['dtype']}; rows are read from float tensors only")
    name, elt = _ST_DTYPES[info["dtype"]]
    shape = info["shape"]
    row = elt
    for x in shape[1:]:
        row *= x
    base = start + int(info["data_offsets"][0])
    out = bytearray(len(rows) * row)
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    with open(path, "rb") as f:
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and rows[order[j + 1]] == rows[order[j]] + 1:
                j += 1
            first = rows[order[i]]
            if first < 0 or rows[order[j]] >= shape[0]:
                raise InputError(f"{path}: row {rows[order[j]]} of {key} is outside its {shape[0]} rows")
            f.seek(base + first * row)
            chunk = f.read((j - i + 1) * row)
            p0 = order[i]
            if order[i:j + 1] == list(range(p0, p0 + j - i + 1)):  # the usual case: sorted rows, one copy
                out[p0 * row:(p0 + j - i + 1) * row] = chunk
            else:
                for k in range(i, j + 1):
                    out[order[k] * row:(order[k] + 1) * row] = chunk[(k - i) * row:(k - i + 1) * row]
            i = j + 1
    raw = torch.frombuffer(out, dtype=torch.uint8) if out else torch.zeros(0, dtype=torch.uint8)
    return raw.view(getattr(torch, name)).reshape(len(rows), *shape[1:])


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

    from .errors import NotFoundError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise NotFoundError(f"{path} is missing ({what})") from e
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError ... for what it refuses
        refused = pickle_refusal(e, path, what)
        if refused is not None:
            raise refused from e
        raise NotFoundError(f"{path} is damaged or not a torch checkpoint ({type(e).__name__}: {e})") from e


# the pickle opcodes that build objects by calling code: GLOBAL, STACK_GLOBAL, REDUCE, INST, OBJ, NEWOBJ, NEWOBJ_EX
_CODE_OPCODES = {ord(c) for c in "c\x93Rio\x81\x92"}


def pickle_refusal(error: BaseException, path: object, what: str = "weights") -> "Exception | None":
    """mechscope's error for ``torch.load(weights_only=True)`` refusing a pickle payload (torch words it "Unsupported
    global", "unsupported GLOBAL ... is blocked", "Unsupported operand", all under "Weights only load failed"): the file
    would run code, so it is refused, and nothing ran. None for any other error."""
    import re

    from .errors import InputError

    text = str(error)
    if "Weights only load failed" not in text and "nsupported global" not in text.lower():
        return None
    operand = re.search(r"Unsupported operand (\d+)", text)
    if "nsupported global" not in text.lower() and (operand is None or int(operand.group(1)) not in _CODE_OPCODES):
        return None  # bytes that are no pickle at all: a damaged file, said by the caller
    detail = next((ln.strip() for ln in text.splitlines() if "nsupported" in ln), "")
    return InputError(f"{path} ({what}) holds pickled objects that would run code when loaded{': ' + detail if detail else ''}"
                      "; mechscope refuses it (nothing was run). Convert it to safetensors (safetensors.torch.save_file "
                      "of its tensors) and load that")


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
