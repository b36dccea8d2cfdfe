"""Tasks the trainer can run, chosen by `config.task`."""
import ml_collections

from unimm_jax.train.tasks.tokenizer import TokenizerTask

TASKS = {"tokenizer": TokenizerTask}


def build_task(config: ml_collections.ConfigDict):
  return TASKS[config.task](config)
