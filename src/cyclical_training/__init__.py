"""General Cyclical Training for PyTorch: one clock of training progress drives every setting.

Training starts and ends easy and is hardest in the middle (L. N. Smith, "General Cyclical
Training of Neural Networks", 2022). ``Clock`` turns the position in a run into a difficulty
d in [0, 1]; each ``Knob`` turns d into the value of one setting; ``KnobSet`` writes the
optimizer's settings into its parameter groups.
"""

__version__ = "0.1.0"

from .clock import Clock, difficulty  # noqa: E402
from .knobs import EpochKnob, Knob, KnobSet, WarmupCosine  # noqa: E402
from .optim import split_decay_groups  # noqa: E402

__all__ = ["Clock", "EpochKnob", "Knob", "KnobSet", "WarmupCosine", "difficulty", "split_decay_groups", "__version__"]
