"""Where a checkpoint comes from: a local directory, or a Hugging Face Hub id `org/name[@revision]`.

`resolve_checkpoint` is the one place a `--checkpoint` value (or MOE_SERVE_CHECKPOINT) becomes a
local directory; every settings class runs it when it is built (see moe_serve.config), so every
command and every service process sees a directory. A Hub id is fetched with `huggingface_hub`
(config.json, the safetensors files and their index only), honouring HF_HOME, HF_HUB_OFFLINE and
the local cache; an existing path always wins over an id of the same spelling.

A directory in the Hub cache (`.../models--org--name/snapshots/<commit>`) maps back to the id
pinned to its commit (`portable_reference`): that is what the worker actors of a Ray cluster are
given, since a local path is valid on one host only while `org/name@<commit>` names the same bytes
on every host, each resolving it from its own cache (or the Hub).
"""

from __future__ import annotations

import re
from pathlib import Path

from moe_serve.runtime.errors import ConfigurationError

# what the weight reader needs (moe_serve.checkpoint), nothing else: no tokenizer, no PyTorch .bin
HUB_FILE_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json"]
# Hub repository ids: one namespace and one name of letters, digits, '-', '_' and '.', then an optional revision
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_CACHE_FOLDER_PREFIX = "models--"


class CheckpointNotFound(ConfigurationError):
    """A Hub id that names no repository or revision, or no network and nothing cached."""


def parse_hub_id(reference: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `reference` is spelled as a Hub id, else None."""
    match = _HUB_ID.match(reference)
    if match is None or ".." in reference or "--" in match.group("repo"):
        return None
    return match.group("repo"), match.group("revision")


def resolve_checkpoint(reference: str | Path) -> Path:
    """The local directory of a checkpoint given as a path or as `org/name[@revision]`.

    An existing path is returned as it is; a value that is not spelled as a Hub id too (it is then
    reported missing where it is read, as before). Raises CheckpointNotFound with a one-line message.
    """
    text = str(reference)
    if Path(text).expanduser().exists():
        return Path(text).expanduser()
    parsed = parse_hub_id(text)
    if parsed is None:
        return Path(text)
    repo_id, revision = parsed
    return Path(_snapshot(repo_id, revision))


def _snapshot(repo_id: str, revision: str | None) -> str:
    # imported here: most commands never need it, and it reads HF_HOME / HF_HUB_OFFLINE at import
    import huggingface_hub
    from huggingface_hub import errors

    named = f"{repo_id}@{revision}" if revision else repo_id
    if revision is not None and _COMMIT.match(revision):
        # a commit is immutable: a cached snapshot of it is exactly it, no need to ask the Hub
        try:
            return huggingface_hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=HUB_FILE_PATTERNS, local_files_only=True
            )
        except (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError):
            pass
    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILE_PATTERNS)
    except errors.RevisionNotFoundError:
        message = f"{named}: the Hub has no revision {revision!r} of {repo_id}; give a branch, tag or commit"
    except errors.GatedRepoError:
        message = f"{named}: the repository is gated; accept its terms on the Hub and set HF_TOKEN"
    except errors.RepositoryNotFoundError:
        message = (
            f"{named}: no local directory of that name and no such repository on the Hub (a private one needs HF_TOKEN)"
        )
    except (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError, errors.OfflineModeIsEnabled):
        message = (
            f"{named}: not in the Hugging Face cache ({_cache_dir()}) and the Hub cannot be reached "
            "(HF_HUB_OFFLINE set, or no network); download it where there is network (`hf download "
            f"{repo_id}`), point HF_HOME at a cache that holds it, or give a local directory"
        )
    except errors.HfHubHTTPError as error:
        message = f"{named}: the Hub answered {_first_line(error)}"
    except (OSError, ValueError) as error:
        message = f"{named}: {_first_line(error)}"
    raise CheckpointNotFound(message)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _cache_repo(directory: Path) -> tuple[str, str] | None:
    """(repo id, commit) when `directory` is a snapshot in the Hub cache, else None."""
    snapshots, folder = directory.parent, directory.parent.parent
    if snapshots.name != "snapshots" or not folder.name.startswith(_CACHE_FOLDER_PREFIX):
        return None
    namespace, _, name = folder.name.removeprefix(_CACHE_FOLDER_PREFIX).partition("--")
    if not name or not _COMMIT.match(directory.name):
        return None
    return f"{namespace}/{name}", directory.name


def checkpoint_name(directory: Path) -> str:
    """The default public model name: the repository's name for a Hub snapshot (as `name_or_path` of
    a model loaded from `org/name` ends), else the directory's name."""
    found = _cache_repo(Path(directory).absolute())
    return found[0].split("/")[1] if found else Path(directory).absolute().name


def portable_reference(directory: Path) -> str:
    """What another host resolves to the same checkpoint: `org/name@<commit>` for a Hub snapshot,
    else the directory's absolute path (which must then be readable on every host)."""
    found = _cache_repo(Path(directory).absolute())
    return f"{found[0]}@{found[1]}" if found else str(Path(directory).absolute())
