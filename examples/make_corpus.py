"""Collect the corpus of the embedded example model: docstrings of CPython's standard library.

Run once; the output is committed (examples/corpus/), so training needs no network and no
particular Python. The text is from CPython, licensed under the PSF License Agreement
(redistribution permitted with the notice kept: see examples/README.md).
"""

import importlib
import inspect
import json
import pkgutil
import random
import sys
from pathlib import Path

SKIP = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "antigravity", "this", "__main__")


def docstrings():
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names and not m.name.startswith(SKIP))
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        mdoc = inspect.getdoc(mod)
        if mdoc:
            yield name, name, mdoc
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                d = inspect.getdoc(obj)
                if d and len(d) > 40:
                    yield name, f"{name}.{attr}", d
            if inspect.isclass(obj):
                for meth, fn in sorted(vars(obj).items()):
                    if not meth.startswith("_") and inspect.isfunction(fn):
                        d = inspect.getdoc(fn)
                        if d and len(d) > 40:
                            yield name, f"{name}.{attr}.{meth}", d


def main(out=Path(__file__).parent / "corpus"):
    out.mkdir(exist_ok=True)
    docs = list(docstrings())
    random.Random(0).shuffle(docs)
    texts = [f"{qual}\n\n{d.strip()}\n" for _, qual, d in docs]
    n_held = max(1, len(texts) // 20)
    (out / "train.txt").write_text("\n".join(texts[n_held:]), encoding="utf-8")
    (out / "heldout.txt").write_text("\n".join(texts[:n_held]), encoding="utf-8")
    # Question/answer pairs for chat: the first paragraph of each docstring answers "What is X?".
    pairs = []
    for _, qual, d in docs[n_held:]:
        first = d.strip().split("\n\n")[0].replace("\n", " ").strip()
        if 20 < len(first) < 400:
            pairs.append({"q": f"What is {qual}?", "a": first})
    (out / "chat.jsonl").write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in pairs) + "\n", encoding="utf-8")
    print(f"{len(texts)} docstrings, {sum(map(len, texts)) / 1e6:.2f} M chars, {len(pairs)} chat pairs")


if __name__ == "__main__":
    main()
