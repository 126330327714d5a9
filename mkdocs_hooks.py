"""MkDocs hook: the committed benchmark results (``benchmarks/results/``) become pages of the
site under ``results/``, so that the docs link them without copying them into ``docs/``."""

import pathlib

from mkdocs.structure.files import File

RESULTS = pathlib.Path(__file__).resolve().parent / "benchmarks" / "results"


def on_files(files, config):
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file():
            uri = "results/" + path.relative_to(RESULTS).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
