"""The installer's warm-up (`compile_loops`) compiles every loop a filter run needs.

`scripts/install.sh` and the Dockerfile call it so that a user's first run loads the filter's loops from
numba's cache instead of compiling them. If a run needed a loop, or a signature of one, that the warm-up did
not compile, that first run would still pay the compilation: this test runs the filter on a mixed corpus in a
fresh interpreter, after the warm-up, and checks that no dispatcher gained a signature.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from numba.core.dispatcher import Dispatcher
from refinery.tasks.filter import FilterConfig, compile_loops, run_filter
from test_filter_judged import MIXED
from test_filter import write_docs

def signatures():
    out = {{}}
    for name, module in list(sys.modules.items()):
        if name.startswith("refinery."):
            for attr, value in list(vars(module).items()):
                if isinstance(value, Dispatcher):
                    out[name + "." + attr] = sorted(str(s) for s in value.signatures)
    return out

compile_loops()
before = signatures()
docs = MIXED + [
    ("chinese", "河流穿过古老的城镇，住在那里的人们一直依赖它。春天，河水随着融雪上涨。" * 8, "text"),
    ("greek_page", "Το ποτάμι διασχίζει την παλιά πόλη. Οι άνθρωποι ζουν εκεί από πάντα. " * 10, "html"),
    ("empty_lines", "\n\n\n", "text"),
]
files = write_docs(Path({work!r}) / "in", docs)
result = run_filter(files, Path({work!r}) / "out", FilterConfig(), progress=False)
after = signatures()
print(json.dumps({{"before": before, "after": after, "in": result.counts.in_}}))
"""


def test_a_filter_run_compiles_nothing_after_compile_loops(tmp_path: Path) -> None:
    script = SCRIPT.format(tests=str(Path(__file__).parent), work=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    before, after = out["before"], out["after"]
    assert out["in"] > 10
    compiled = [name for name, sigs in before.items() if sigs]
    assert len(compiled) >= 10, compiled  # the warm-up did compile the families' loops
    added = {name: sorted(set(sigs) - set(before.get(name, []))) for name, sigs in after.items()}
    assert not {name: sigs for name, sigs in added.items() if sigs}, "compiled during the run, not by compile_loops"
