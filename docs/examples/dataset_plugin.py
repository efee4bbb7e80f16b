"""A dataset plugin: a small in-memory corpus, usable for calibration and evaluation.

``documents(split)`` is all a dataset implements; stadebench cuts calibration windows
and evaluation streams from it with the same protocol as for C4 or WikiText-2. Here
every fifth document is held out as ``test``, so calibration and evaluation text never
overlap. Run it: ``python docs/examples/dataset_plugin.py``.
"""

from __future__ import annotations

import stadebench

PROVERBS = [
    "A stitch in time saves nine.", "Many hands make light work.", "Still waters run deep.",
    "The early bird catches the worm.", "Actions speak louder than words.", "Look before you leap.",
    "Fortune favours the bold.", "Better late than never.", "Practice makes perfect.",
    "Rome was not built in a day.",
]


class ProverbsOptions(stadebench.Options):
    repeat: int = 20
    """Sentences per document (each document is one proverb repeated)."""


class Proverbs(stadebench.Dataset):
    """Ten English proverbs, one per document; every fifth one is the test split."""

    name = "proverbs"
    version = "1"
    Options = ProverbsOptions
    join = "\n\n"  # how the test split is joined into one evaluation stream

    def documents(self, split: str) -> list[str]:
        if split not in ("train", "test"):
            raise stadebench.ConfigError(f"dataset 'proverbs' has splits 'train' and 'test', not {split!r}")
        docs = [" ".join([p] * self.options.repeat) for p in PROVERBS]
        return [d for i, d in enumerate(docs) if (i % 5 == 4) == (split == "test")]


@stadebench.hookimpl
def register_datasets(register):
    register(Proverbs)


if __name__ == "__main__":
    import sys

    from stadebench.suite import parse_suite

    stadebench.get_plugins().register(sys.modules[__name__], name="proverbs_example")

    dataset = stadebench.get_plugins().datasets.get("proverbs").cls({"repeat": 3})
    train, test = dataset.documents("train"), dataset.documents("test")
    print(f"{dataset.name}: {len(train)} train and {len(test)} test documents")
    # A suite can now calibrate and evaluate on it (validated here, not run).
    suite = parse_suite("""
models: [HuggingFaceTB/SmolLM2-135M]
metrics: [wanda]
patterns: [unstructured]
calibration: {dataset: {name: proverbs, options: {repeat: 50}}, n: 8, seqlen: 128}
evaluations: [{name: perplexity, options: {dataset: proverbs, seqlen: 128}}]
""")
    print("calibration:", suite.calibration.dataset[0].name, suite.calibration.dataset[0].options)
    assert suite.calibration.dataset[0].options == {"repeat": 50}
