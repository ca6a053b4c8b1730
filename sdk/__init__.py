"""codepmp SDK: `from sdk import RewardModel, best_of_n` (DESIGN.md §5).

`RewardModel` and `best_of_n` are imported lazily so `import sdk` (e.g. for `sdk.config` during spec
validation) stays free of torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdk.bon import best_of_n
    from sdk.model import RewardModel

__all__ = ["RewardModel", "best_of_n"]


def __getattr__(name: str) -> Any:
    if name == "RewardModel":
        from sdk.model import RewardModel

        return RewardModel
    if name == "best_of_n":
        from sdk.bon import best_of_n

        return best_of_n
    raise AttributeError(f"module 'sdk' has no attribute {name!r}")
