"""Pretrained SAEs from the Hugging Face hub: ``hf://`` paths and the table of well-known releases.

``load_sae("hf://<repo>[@<revision>]/<path>")`` downloads (or finds in the hub cache) the files under
``<path>`` with ``huggingface_hub.snapshot_download``, so the hub cache, ``HF_HUB_OFFLINE=1`` and
revision pins behave as they do for models; the folder is then read in whichever format it holds
(:mod:`.formats`). ``load_sae(release=..., sae_id=...)`` looks the release up in
``data/sae_releases.json`` (GPT-2 small residual SAEs, Gemma Scope 2B residual canonical,
Llama Scope, EleutherAI's sparsify Llama 3 8B, dictionary_learning Llama 3.1 8B Instruct), which
gives the repository, path, format and hook point of each SAE, with its source.
"""

from __future__ import annotations

import functools
import json
import re
from importlib.resources import files
from pathlib import Path

from ..core.errors import InputError, NotFoundError
from ..core.hookpoints import block_name

_SPEC = re.compile(r"^hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?(?:/(?P<path>.*))?$")
# the hook a repo-level Gemma Scope folder reads, from the repository's name
_GEMMA_SCOPE_SITE = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}


@functools.cache
def releases() -> dict[str, dict]:
    """The release table: ``{release: {repo_id, format, model, source, saes: {sae_id: {path, hook}}}}``."""
    return json.loads(files("mechscope").joinpath("data/sae_releases.json").read_text())["releases"]


def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """``"hf://org/name@rev/some/path"`` -> ``("org/name", "rev", "some/path")``."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise InputError(f"cannot read hub path {spec!r}; write hf://<org>/<repo>[@<revision>]/<folder>")
    return m.group("repo"), m.group("rev"), (m.group("path") or "").strip("/")


def download(repo: str, path: str, revision: str | None = None) -> Path:
    """The local folder of ``repo``'s ``path`` at ``revision`` (from the hub cache when it is there)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = [f"{path}/*", f"{path}/**/*"] if path else None
    try:
        root = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, OSError) as e:
        raise NotFoundError(f"{repo}{'@' + revision if revision else ''}/{path} is not in the Hugging Face cache and "
                            f"the hub cannot be reached (HF_HUB_OFFLINE or no network): {e}") from e
    except (RepositoryNotFoundError, HfHubHTTPError) as e:
        raise NotFoundError(f"the hub has no repository {repo!r} (or it needs a token): {e}") from e
    folder = root / path
    if not folder.is_dir() or not any(folder.iterdir()):
        raise NotFoundError(f"{repo}{'@' + revision if revision else ''} has no folder {path!r}")
    return folder


def gemma_scope_hook(repo: str, path: str) -> str | None:
    """The hook point of a Gemma Scope folder (``layer_L`` in a ``*-res``/``*-mlp``/``*-att`` repository)."""
    m, site = re.search(r"layer_(\d+)", path), re.search(r"-(res|mlp|att)(?:-|$)", repo)
    return block_name(int(m.group(1)), _GEMMA_SCOPE_SITE[site.group(1)]) if m and site else None


def resolve_release(release: str, sae_id: str) -> dict:
    """``{repo_id, path, format, hook, model}`` of one SAE of a known release; a clear error listing the options."""
    table = releases()
    if release not in table:
        raise InputError(f"unknown SAE release {release!r}; known releases: {', '.join(sorted(table))} "
                         f"(or load any hub folder with hf://<org>/<repo>/<folder>)")
    rel = table[release]
    if sae_id not in rel["saes"]:
        ids = list(rel["saes"])
        raise InputError(f"release {release!r} has no SAE {sae_id!r}; it has {len(ids)}: {', '.join(ids[:6])}"
                         + (" ..." if len(ids) > 6 else ""))
    entry = rel["saes"][sae_id]
    return {"repo_id": rel["repo_id"], "path": entry["path"], "format": rel["format"], "hook": entry["hook"],
            "model": rel["model"]}
