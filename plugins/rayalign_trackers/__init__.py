"""Built-in experiment trackers: ``wandb``, ``tensorboard`` and ``mlflow``.

Each imports its package only when a run names it; ``pip install 'rayalign[wandb]'`` (or
``[tensorboard]``, ``[mlflow]``) installs one. ``rayalign.tracking`` says what they receive.
"""

from rayalign.hookspecs import hookimpl

from rayalign_trackers.mlflow_tracker import MlflowTracker
from rayalign_trackers.tensorboard_tracker import TensorBoardTracker
from rayalign_trackers.wandb_tracker import WandbTracker


@hookimpl
def register_trackers(register):
    register(WandbTracker)
    register(TensorBoardTracker)
    register(MlflowTracker)
