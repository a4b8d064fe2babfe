"""What the tier transitions need from a transfer engine (L1 <-> L2 copies)."""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["CopyEngine"]


class CopyEngine(Protocol):
    """Copies whole pages between the device and host pools; returns once the bytes landed.

    A cancelled call still waits for its copy before raising (the destination stays reserved
    until then), so the caller may free the destination in its rollback.
    """

    async def backup(self, device_slots: torch.Tensor, host_slots: torch.Tensor) -> object: ...

    async def backup_pages(
        self, device_pages: torch.Tensor, host_pages: torch.Tensor
    ) -> object: ...

    async def load(self, host_slots: torch.Tensor, device_slots: torch.Tensor) -> object: ...
