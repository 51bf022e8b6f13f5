"""Turn a model name into a local folder: a folder as is, "demo" the model shipped in the package,
a hub repo id through huggingface_hub."""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
DEMO_MODEL = "demo"  # a tiny Qwen2-VL trained on the package's synthetic tasks (qwen2vl/demo/), always offline
DEMO_PATH = Path(__file__).resolve().parent / "demo" / "checkpoint"
# what a Qwen2-VL folder needs; skips other formats a repo may carry (gguf, onnx, ...)
FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_repo_id(name: str) -> bool:
    """`owner/name` as the hub spells repo ids; the one test of it (download, info, chat, serve)."""
    return bool(_REPO_ID.match(name))


def no_such_model(name: str) -> FileNotFoundError:
    return FileNotFoundError(f"{name}: no such folder (and not a hub repo id like {DEFAULT_MODEL!r})")


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint folder for `name_or_path`, downloading a hub repo id if needed.

    A local folder never touches the network, nor does "demo" (the model shipped in the package,
    docs in qwen2vl/demo/). A repo id is looked up in the local hub cache first, then downloaded
    (progress bar, resumable); offline, this fails fast with a message that says how to pass a
    local folder.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name == DEMO_MODEL:  # the name, always: a folder called demo is ./demo
        if not (DEMO_PATH / "model.safetensors").is_file():
            raise FileNotFoundError(f"the demo model is missing from this install ({DEMO_PATH}); reinstall the package")
        return DEMO_PATH
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; is this a Qwen2-VL or Qwen2.5-VL checkpoint folder?")
        return path
    if not is_repo_id(name):
        raise no_such_model(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=FILE_PATTERNS, local_files_only=True))
    except Exception:
        pass  # not cached yet
    try:
        return Path(snapshot_download(name, allow_patterns=FILE_PATTERNS, etag_timeout=10))
    except Exception as e:  # network, auth, unknown repo: all end the same way for a user
        raise ConnectionError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). "
            f"If this machine is offline, download the model elsewhere and pass its local folder, "
            f"e.g. --model /path/to/{name.split('/')[-1]}"
        ) from None
