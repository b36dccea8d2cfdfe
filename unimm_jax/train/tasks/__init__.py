"""Tasks the trainer can run, chosen by `config.task`."""
import ml_collections

from unimm_jax.train.tasks.lm import LMTask
from unimm_jax.train.tasks.tokenizer import TokenizerTask

TASKS = {"tokenizer": TokenizerTask, "lm": LMTask}


def build_task(config: ml_collections.ConfigDict):
  return TASKS[config.task](config)
