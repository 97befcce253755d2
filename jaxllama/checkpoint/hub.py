"""Hugging Face Hub model ids as checkpoints: `org/name` or `org/name@revision` -> a local snapshot.

`resolve_checkpoint(spec)` is the one place where a checkpoint argument becomes a local path; every
loader goes through it (`load_checkpoint`, hence `from_pretrained`, the CLIs, training's
`init.checkpoint` and the scripts). A path that exists always wins over a Hub id. Anything else
shaped like a model id is fetched by `huggingface_hub.snapshot_download` into the standard HF cache
(`HF_HOME` / `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and `HF_TOKEN` are read by huggingface_hub itself, so
a model transformers already downloaded is reused, and offline runs use the cache).

Only the files jaxllama reads are fetched: the config, generation config and tokenizer files, then
`model.safetensors` or `model.safetensors.index.json` plus exactly the shards that index lists (a
repo that also ships `consolidated.safetensors` or an `original/` folder does not cost a second
copy). Pickle weights (`.bin`, `.pt`, `.pth`) are never fetched: a repo holding only those is a
one-line error.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from jaxllama.checkpoint.base import CheckpointError
from jaxllama.checkpoint.hf import INDEX, SINGLE, read_json

log = logging.getLogger(__name__)

# `org/name`, optionally `@revision` (a branch, tag or commit sha; `refs/pr/1` included). One slash
# only, so `runs/x/final` and other deeper relative paths are never sent to the Hub.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(?P<rev>[\w./-]+))?")

# What `load_hf` (config, weights) and transformers' AutoTokenizer (tokenizer files) read.
META_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    "chat_template.jinja",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` is shaped like a Hub model id, else None."""
    m = _HUB_ID.fullmatch(spec)
    if m is None or "--" in m["repo"] or ".." in m["repo"]:
        return None
    return m["repo"], m["rev"]


def resolve_checkpoint(spec: str | os.PathLike) -> str:
    """The local path of checkpoint argument `spec`: `spec` itself when it exists, else the snapshot
    of Hub model id `spec` in the HF cache (downloaded when missing and the Hub is reachable).

    Raises `CheckpointError` (one line naming `spec`, the cache searched and the fix) when neither.
    """
    path = os.fspath(spec)
    if os.path.exists(path):
        return path
    hub = parse_hub_id(path)
    if hub is None:
        raise CheckpointError(f"{path}: no such file or directory")
    return download(*hub)


def cache_folder(repo_id: str) -> str:
    """Where huggingface_hub keeps `repo_id`: `<HF_HUB_CACHE>/models--org--name`."""
    from huggingface_hub import constants

    return os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)())


def download(repo_id: str, revision: str | None = None) -> str:
    """Snapshot folder of `repo_id` at `revision` holding what jaxllama reads (see module doc)."""
    name = repo_id + (f"@{revision}" if revision else "")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{name}: no such local path; Hub model ids need huggingface_hub "
                              "(pip install huggingface_hub)") from None
    try:
        log.info("resolving %s in the Hugging Face cache %s", name, cache_folder(repo_id))
        folder = Path(snapshot_download(repo_id, revision=revision,
                                        allow_patterns=[*META_FILES, INDEX, SINGLE]))
        if (folder / INDEX).is_file():
            index = read_json(folder / INDEX)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
            if shards:  # pinned to the commit just resolved, so config and shards always match
                folder = Path(snapshot_download(repo_id, revision=folder.name,
                                                allow_patterns=shards))
                missing = [s for s in shards if not (folder / s).is_file()]
                if missing:
                    raise CheckpointError(
                        f"{name}: {len(missing)} of {len(shards)} shards listed in {INDEX} are "
                        f"missing from the cached snapshot {folder} ({_how_to_fetch()})")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - every huggingface_hub failure becomes one line
        raise CheckpointError(_failure(name, repo_id, revision, e)) from None
    _check_snapshot(name, repo_id, folder)
    return str(folder)


def _how_to_fetch() -> str:
    if _offline():
        return "HF_HUB_OFFLINE is set: unset it to download, or pass a local directory"
    return "check the network and retry, or pass a local directory"


def _failure(name: str, repo_id: str, revision: str | None, e: Exception) -> str:
    """The one-line message for a `snapshot_download` failure."""
    from huggingface_hub import errors

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = cache_folder(repo_id)
    if isinstance(e, errors.GatedRepoError):
        return (f"{name}: gated model: accept its terms on https://huggingface.co/{repo_id} and set "
                "HF_TOKEN (or run `hf auth login`)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return (f"{name}: no such local path, and no Hugging Face Hub model repo {repo_id} (a private "
                "or gated repo needs HF_TOKEN)")
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{name}: revision {revision!r} not found in Hub repo {repo_id}"
    if isinstance(e, errors.LocalEntryNotFoundError):  # offline or unreachable, and not cached
        if _offline():
            return (f"{name}: no such local path, and not in the Hugging Face cache {where} "
                    "(HF_HUB_OFFLINE is set: unset it to download, point HF_HUB_CACHE at a cache "
                    "that holds it, or pass a local directory)")
        return (f"{name}: no such local path, not in the Hugging Face cache {where}, and the Hub "
                "cannot be reached (check the network, set HF_HUB_CACHE to a cache that holds it, "
                "or pass a local directory)")
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = " (set HF_TOKEN for private or gated models)" if status in (401, 403) else ""
        return f"{name}: Hugging Face Hub error: {first}{hint}"
    if isinstance(e, ValueError):  # huggingface_hub's HFValidationError: not a valid repo id
        return f"{name}: no such local path, and not a valid Hub model id ({first})"
    return f"{name}: download into {where} failed ({type(e).__name__}: {first})"


def _check_snapshot(name: str, repo_id: str, folder: Path) -> None:
    """A one-line error unless `folder` holds config.json and safetensors weights."""
    if (folder / SINGLE).is_file() or (folder / INDEX).is_file():
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{name}: no config.json in the snapshot {folder} (not a "
                                  "transformers model repo)")
        return
    files = _repo_files(repo_id, folder)
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(
            f"{name}: only PyTorch pickle weights ({', '.join(pickles[:3])}); jaxllama reads "
            f"safetensors only ({SINGLE} or {INDEX}): pick a repo or revision that has them, or "
            "re-save it with transformers' save_pretrained and pass that directory")
    ggufs = [f for f in files if f.endswith(".gguf")]
    if ggufs:
        raise CheckpointError(
            f"{name}: a GGUF repo ({', '.join(ggufs[:3])}): download one file (hf download "
            f"{repo_id} FILE.gguf) and pass its path")
    raise CheckpointError(f"{name}: no {SINGLE} or {INDEX} in the snapshot {folder} "
                          f"({_how_to_fetch() if _offline() else 'safetensors weights required'})")


def _repo_files(repo_id: str, folder: Path) -> list[str]:
    """The repo's file names at the snapshot's commit: from the Hub when it answers, else what the
    cached snapshot holds (enough to tell a pickle-only repo from a missing download)."""
    if not _offline():
        try:
            from huggingface_hub import HfApi

            return list(HfApi().list_repo_files(repo_id, revision=folder.name))
        except Exception as e:  # noqa: BLE001 - fall back to the cache listing
            log.debug("listing %s on the Hub failed (%s); using the cached snapshot", repo_id, e)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
