"""Rule families of the filter stage, and the one list that registers them.

Each family is one module with one class (`base.RuleFamily`): its settings (`enabled` and thresholds, the
`filter.<name>` config section), its signal columns, its rules (reason code, signal column, comparison,
setting) and which documents it judges (`applies_to`: prose, code or all). Everything else derives from
`FAMILIES`: the sections of `FilterConfig`, which signals are computed, the signal cache key, the order
rules are checked in, and the drop reasons. Adding a family is one new module and one line below.
"""

from __future__ import annotations

from refinery.tasks.quality import (
    c4,
    code,
    decontamination,
    fineweb,
    gopher_quality,
    gopher_repetition,
    language,
    safety,
    secrets,
)
from refinery.tasks.quality.base import AppliesTo, Batch, Rule, RuleFamily, compute_signals

# Checked in this order; a dropped document is counted under the first rule it fails. The trust families
# (secrets, decontamination, safety) come first, so a contaminated or blocked document is always counted as
# such; secrets lead, because a leaked credential must be found and rotated whatever else is wrong.
FAMILIES: list[type[RuleFamily]] = [
    secrets.SecretRules,
    decontamination.DecontaminationRules,
    safety.SafetyRules,
    language.LanguageRules,
    gopher_quality.GopherQualityRules,
    gopher_repetition.GopherRepetitionRules,
    c4.C4Rules,
    fineweb.FineWebRules,
    code.CodeRules,
]

__all__ = ["FAMILIES", "AppliesTo", "Batch", "Rule", "RuleFamily", "compute_signals"]
