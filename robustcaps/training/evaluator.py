"""Error rates during and after training (centre crop, multi-crop) and the hardware."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
from torch import nn

from .data import Split


def hardware_description(device: torch.device) -> str:
    """E.g. 'cpu: Intel(R) Xeon(R) ... (2 cores, 2 torch threads)' or 'cuda: NVIDIA H100'."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


class Evaluator:
    """Error rates of a model on uncropped splits (centre crop / multi-crop when larger)."""

    def __init__(self, model: nn.Module, outputs: str, input_hw: tuple[int, int],
                 batch_size: int, device: torch.device, progress: bool) -> None:
        self.model, self.outputs, self.input_hw = model, outputs, input_hw
        self.batch_size, self.device, self.progress = batch_size, device, progress

    def _activation(self, scores: torch.Tensor) -> torch.Tensor:
        # The paper averages class activations: sigmoid of capsule logits, softmax otherwise.
        return torch.sigmoid(scores) if self.outputs == "capsule_logits" else scores.softmax(dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, multi: bool = False) -> torch.Tensor:
        """x: (N, C, H, W) -> (N,) predicted classes (H, W >= the model's input size)."""
        from tqdm.auto import tqdm

        from ..data.transforms import center_crop, multi_crop_scores

        was_training = self.model.training
        self.model.eval()
        size = self.input_hw[0]
        crop = tuple(x.shape[-2:]) != self.input_hw
        preds = []
        bs = max(1, self.batch_size * (2 if not multi else 1))
        try:
            for i in tqdm(range(0, len(x), bs), desc="multi-crop eval" if multi else "eval",
                          leave=False, disable=not self.progress, unit="batch"):
                xb = x[i:i + bs].to(self.device)
                if multi and crop:
                    s = multi_crop_scores(self.model, xb, size=size, activation=self._activation)
                else:
                    s = self.model(center_crop(xb, size) if crop else xb)
                preds.append(s.argmax(dim=1).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(preds)

    def error(self, split: Split, multi: bool = False) -> float:
        """Error rate (wrong / N, exact) on a split."""
        return int((self.predict(split.x, multi) != split.y).sum()) / len(split.y)
