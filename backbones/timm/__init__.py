"""The timm family: any model of timm's registry (``timm/<model>`` backbones) on PyTorch.

One concern per module: ``model`` (registry check, preprocessing, the model with its head,
pretrained weights, BatchNorm layers that train), ``data`` (seeded batches), ``optim`` (phases'
trainable parameters, optimiser, LR curve, loss), ``batchnorm`` (precise BatchNorm), ``train``
(the fold model behind the template's hooks, the LR range test), ``resume`` (a killed fold's
state), ``serving`` (checkpoints, the predictor), ``family`` (the hooks, registered here).
Importing the package imports no torch: the hooks do, when called.
"""

from backbones import register
from backbones.timm.family import TimmFamily

FAMILY = register(TimmFamily())

__all__ = ["FAMILY", "TimmFamily"]
