"""Refinery: raw documents in, a curated corpus and a trained language model out.

The code lives in four top-level folders, mapped into this package:
`flows/` (orchestration, CLI, config), `tasks/` (stage logic), `model/`
(the transformer) and `storage/` (every byte on disk).
"""

__version__ = "0.1.0"
