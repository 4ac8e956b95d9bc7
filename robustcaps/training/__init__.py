"""The training engine behind ``robustcaps train`` (and the zoo's checkpoints).

``train(model_name, dataset=..., epochs=..., out=...)`` trains a registered architecture the
way Section 5 of Hinton et al. (2018) describes and writes a zoo entry into ``out``:

- Adam; the learning rate decays exponentially, ``lr_t = lr * lr_decay ** (t / steps_per_epoch)``
  (``lr_decay`` is the factor per epoch, default 0.9, a choice of ours: the paper gives none).
- Capsule networks: spread loss on the class activations ``sigmoid(logits)`` with the margin
  growing linearly from 0.2 to 0.9 over all optimisation steps of the run
  (:func:`robustcaps.models.losses.spread_margin`). Other models: cross-entropy (the CNN has
  dropout). ``loss=`` overrides the choice.
- The paper's augmentation (:func:`robustcaps.data.transforms.train_augment`: random 32x32
  crop of the 48x48 image, random brightness and contrast) when the training images are larger
  than the model's input; test-time centre crop, and multi-crop (average of class activations
  over the five crops) for the final test error.
- Evaluation on the test split after each epoch (and every ``eval_every_steps`` steps), on a
  validation split held out from the *training* data (``val_instances`` for NORB-format data,
  ``val_fraction`` otherwise) when asked; ``stop_at_error``/``stop_on`` stop the run once the
  error on that split is at most the target (the matched-accuracy protocol of Table 2; stop on
  ``val`` to keep the test split out of every decision).

Exact resumption. Everything random is a function of ``(seed, epoch, step)`` or lives in the
checkpoint: the data order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)``; the augmentation of step ``t`` uses a generator seeded with ``(seed, t)``;
dropout uses the global torch RNG, saved (with the NumPy and Python RNGs) in each checkpoint
together with the model, the optimizer, the position in the epoch and the running metrics.
So a run stopped after any checkpoint and resumed gives, on the same device and thread count,
bit-identical weights to an uninterrupted run.

Files written into ``out``::

    weights.pt            final state dict (torch.load(weights_only=True))
    card.json, card.md    the model card (see robustcaps.models.zoo)
    metrics.csv           one row per evaluation (epoch/step, train loss/acc, lr, margin, errors)
    checkpoints/last.pt   full training state, replaced atomically; never written with a
                          non-finite model, so a diverging run keeps its last good state
"""

from __future__ import annotations

from .config import TrainConfig, TrainingDiverged, parse_arch_kwargs
from .data import TrainData, load_train_data
from .trainer import Trainer, train

__all__ = ["TrainConfig", "TrainData", "Trainer", "TrainingDiverged", "load_train_data",
           "parse_arch_kwargs", "train"]
