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
    """``"hf://org/name@rev/some/path"`` -> ``("org/name", "rev", "some/path")``; circuit-tracer's
    ``hf://org/name/some/path?revision=rev`` is read too."""
    text, _, query = spec.strip().partition("?")
    m = _SPEC.match(text)
    if not m:
        raise InputError(f"cannot read hub path {spec!r}; write hf://<org>/<repo>[@<revision>]/<folder>")
    rev = m.group("rev") or next((v for k, _, v in (q.partition("=") for q in query.split("&")) if k == "revision"),
                                 None) or None
    return m.group("repo"), rev, (m.group("path") or "").strip("/")


def download_file(repo: str, filename: str, revision: str | None = None) -> Path:
    """The local path of one file of ``repo`` at ``revision`` (from the hub cache when it is there)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"{repo}{'@' + revision if revision else ''}/{filename}"
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except (LocalEntryNotFoundError, OSError) as e:
        raise NotFoundError(f"{where} is not in the Hugging Face cache and the hub cannot be reached (HF_HUB_OFFLINE "
                            f"or no network): {e}") from e
    except (RepositoryNotFoundError, HfHubHTTPError) as e:
        raise NotFoundError(f"the hub has no file {where} (or it needs a token): {e}") from e


def download(repo: str, path: str, revision: str | None = None, only: str | None = None) -> Path:
    """The local folder of ``repo``'s ``path`` at ``revision`` (from the hub cache when it is there); ``only``: a
    glob below ``path`` that limits what is fetched (``"*_width_16k_l0_small_affine/*"``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = [f"{path}/*", f"{path}/**/*"] if path else None
    if only:
        patterns = [f"{path}/{only}" if path else only]
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


_GEMMA_SCOPE_RELEASE = re.compile(r"gemma-scope-[^/]*?-(res|mlp|att|transcoders)(?=$|[-/@])")


def gemma_scope_site(where: str) -> tuple[str | None, int | None]:
    """``(site, layer)`` of a Gemma Scope folder, from its release's name and its ``layer_L`` folder anywhere in
    ``where`` (a repository and path, or a local path such as the hub cache's ``models--google--gemma-scope-2b-pt-res
    /snapshots/<sha>/layer_3/...``): site ``res``, ``mlp``, ``att`` or ``transcoders``; None for what is not there."""
    sites = _GEMMA_SCOPE_RELEASE.findall(where)
    layers = re.findall(r"layer_(\d+)", where)
    return (sites[-1] if sites else None), (int(layers[-1]) if layers else None)


def gemma_scope_hook(site: str, layer: int) -> str:
    """The hook point a Gemma Scope SAE of ``site`` (``res``, ``mlp``, ``att``) at ``layer`` reads."""
    return block_name(layer, _GEMMA_SCOPE_SITE[site])


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
