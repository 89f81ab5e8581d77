"""The probe family, ``probe/<timm model>``: a frozen pretrained timm model as a feature
extractor and a scikit-learn classifier per fold on its features (``--probe-head``).

On a few hundred real photos a linear probe on good features is often the strongest model a CPU
can afford (bench/probe_vs_logreg.py), and a member of the stack unlike the fine-tuned ones.
The model, its weights and its preprocessing are the timm family's (``backbones.timm``); this
package adds the fold on the template (``family.py``), the heads (``heads.py``: arrays, saved
without pickles), the extractor (``features.py``) and the run predictor that feeds all K fold
heads from one feature pass per image (``predictor.py``). Light at import (no torch).
"""

from backbones import register
from backbones.probe.family import ProbeFamily

register(ProbeFamily())
