"""``hf://ORG/NAME[@REVISION]``: a model folder on the Hugging Face Hub, resolved to a local folder.

:func:`download_hub_folder` calls ``huggingface_hub.snapshot_download`` (its cache, ``HF_HOME`` /
``HF_HUB_CACHE``, and its offline switch ``HF_HUB_OFFLINE``): a repository already in the cache is
used without the network when offline; a revision (branch, tag or commit) pins what is downloaded.
Every failure is one line naming the repository: :class:`HubUnreachable` (a ``ConnectionError``,
exit code 4) when the Hub could not be reached and the cache does not hold the revision,
``FileNotFoundError`` (exit code 2) when the Hub answers that the repository or revision does not
exist or is gated, ``ValueError`` for a malformed reference.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

HUB_PREFIX = "hf://"
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubUnreachable(ConnectionError):
    """The Hub could not be reached (offline, no network, a timeout) and the cache lacks the files."""


def is_hub_reference(ref: object) -> bool:
    """Whether ``ref`` is a string of the form ``hf://...`` (a ``Path`` never is: it folds ``//``)."""
    return isinstance(ref, str) and ref.startswith(HUB_PREFIX)


def parse_hub_reference(ref: str) -> tuple[str, str | None]:
    """``"hf://ORG/NAME@REV"`` -> ``("ORG/NAME", "REV")`` (revision None when absent).

    ValueError naming ``ref`` for anything but exactly two non-empty name parts (letters, digits,
    ``.``, ``_``, ``-``) and an optional non-empty revision.
    """
    if not is_hub_reference(ref):
        raise ValueError(f"{ref!r} is not a Hub reference (expected {HUB_PREFIX}ORG/NAME[@REVISION])")
    body = ref[len(HUB_PREFIX):]
    repo, sep, revision = body.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(_REPO_PART.match(p) for p in parts) or (sep and not revision.strip()):
        raise ValueError(f"{ref}: not a valid Hub reference; expected {HUB_PREFIX}ORG/NAME or "
                         f"{HUB_PREFIX}ORG/NAME@REVISION (e.g. hf://my-lab/s3d-resenc-l@v1)")
    return repo, (revision.strip() or None)


def download_hub_folder(ref: str) -> Path:
    """The local folder of the Hub repository ``ref`` (``hf://ORG/NAME[@REVISION]``), downloaded
    into (or found in) huggingface_hub's cache by ``snapshot_download``.

    Raises :class:`HubUnreachable` / ``FileNotFoundError`` / ``ValueError``, each with one line that
    names the repository (module docstring).
    """
    repo, revision = parse_hub_reference(ref)
    at = f" (revision {revision})" if revision else ""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hub_errors
    except ImportError as e:  # pinned in pyproject.toml; a broken install only
        raise HubUnreachable(f"{ref}: huggingface_hub is not importable ({e}); reinstall volssl") from None
    try:
        folder = snapshot_download(repo, revision=revision)
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError) as e:
        raise FileNotFoundError(f"{ref}: the Hub has no repository {repo} you can read "
                                f"(missing, private or gated: {_first_line(e)})") from None
    except hub_errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{ref}: repository {repo} has no revision {revision!r}") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, ConnectionError, TimeoutError,
            OSError) as e:
        offline = " (HF_HUB_OFFLINE is set)" if _offline() else ""
        raise HubUnreachable(f"{ref}: could not reach the Hugging Face Hub to download {repo}{at}{offline}, and "
                             f"the local cache does not hold it ({type(e).__name__}: {_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - httpx and other transport errors: still one line naming the repo
        raise HubUnreachable(f"{ref}: could not download {repo}{at} from the Hugging Face Hub "
                             f"({type(e).__name__}: {_first_line(e)})") from None
    return Path(folder)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")
