"""ATA over Ethernet (AoE r11) target for torus block volumes.

``wire`` encodes and decodes frames, ``ata`` emulates the ATA device over a volume, ``target``
runs the raw-socket loop, ``serve`` ties a target to a :class:`~torus_core.daemon.server.Server`.
See docs/aoe.md.
"""

from torus_core.aoe.ata import AtaDevice, AtaResult
from torus_core.aoe.target import AoETarget
from torus_core.aoe.wire import ETHERTYPE, FrameError

__all__ = ["ETHERTYPE", "AoETarget", "AtaDevice", "AtaResult", "FrameError"]
