"""Refinery: raw documents in, a curated corpus and a trained language model out.

The code lives in five top-level folders, mapped into this package:
`flows/` (orchestration, CLI, config), `tasks/` (stage logic), `model/`
(the transformer), `storage/` (every byte on disk) and `serving/` (loading a
trained model, the HTTP completions server, the MLflow pyfunc). The package
root itself holds what every folder shares: `overrides` (the `--set` parser)
and `sample_corpus` (the bundled corpus that `refinery run` uses by default).
"""

__version__ = "0.1.0"
