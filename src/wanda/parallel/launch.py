"""Whether this process is one rank of a launched job, and the settings of such a run.

``torchrun`` and ``accelerate launch`` set the same variables for every process; ``WORLD_SIZE`` above 1 is what
turns the distributed run on (``wanda.parallel.ranks.init_ranks``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from ..errors import WandaError
from ..utils.declare import SettingsMixin, require, setting

__all__ = ["LAUNCH_VARIABLES", "DistributedSettings", "launched"]

#: What the launchers set for every process; ``WORLD_SIZE`` > 1 is what turns the distributed run on.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedSettings(SettingsMixin):
    """Settings of a run under ``torchrun`` / ``accelerate launch``; ignored without a launcher."""

    _argument_group_name: ClassVar[str] = "several processes (torchrun, accelerate launch)"

    #: Longer than the longest stretch between two collectives (a block's forwards plus its largest solve).
    dist_timeout: float = setting(
        1800.0,
        "seconds a rank waits for the others at a collective before the job "
        "ends with an error (under torchrun or accelerate launch)",
    )

    def __post_init__(self) -> None:
        require(self.dist_timeout > 0, f"--dist_timeout must be positive, got {self.dist_timeout}")


def launched() -> bool:
    """True when a launcher started this process as one of several ranks."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise WandaError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; start the job with torchrun "
            "or accelerate launch, which set it"
        ) from None
