"""Training: pure jitted steps, the loop, evaluation, optimizer and metric writers."""

from peftjax.train.experiment import Experiment, build
from peftjax.train.loop import evaluate_run, restore_trained, train
from peftjax.train.step import TrainState, make_eval_step, make_train_step

__all__ = ["Experiment", "TrainState", "build", "evaluate_run", "make_eval_step",
           "make_train_step", "restore_trained", "train"]
