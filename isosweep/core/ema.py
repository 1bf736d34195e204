"""An exponential moving average of a network's weights: the one EMA of pretraining and fine-tuning."""

from __future__ import annotations

from typing import Any

import torch


class EMA:
    """Exponential moving average of the weights, diffusers-style warm-up.

    decay_n = min(ema_decay, (1 + n) / (10 + n)) at update n, so a short fine-tune is not frozen at
    the base weights by decay 0.9999 (this is what diffusers' EMAModel does by default).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay, self.num_updates = decay, 0
        self.shadow = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, model.parameters()):
            s.lerp_(p.detach().float(), 1.0 - d)
        self.num_updates += 1

    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            for s, p in zip(self.shadow, model.parameters()):
                p.copy_(s.to(p.dtype))
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = state["num_updates"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
