"""codepmp SDK: `from sdk import RewardModel` (DESIGN.md §5).

`RewardModel` is imported lazily so `import sdk` (e.g. for `sdk.config` during spec validation) stays free
of torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdk.model import RewardModel

__all__ = ["RewardModel"]


def __getattr__(name: str) -> Any:
    if name == "RewardModel":
        from sdk.model import RewardModel

        return RewardModel
    raise AttributeError(f"module 'sdk' has no attribute {name!r}")
