"""Tasks the trainer can run, chosen by `config.task`.

A task class declares `modes` (the `--mode`s it supports, see `unimm_jax.main`) and `kind`
(what it trains, for messages); the trainer's interface is in `unimm_jax.train.trainer`,
the modes' in `unimm_jax.main`.
"""
import ml_collections

from unimm_jax.train.tasks.class_to_image import ClassToImageTask
from unimm_jax.train.tasks.lm import LMTask
from unimm_jax.train.tasks.mllm import MLLMTask
from unimm_jax.train.tasks.tokenizer import TokenizerTask

TASKS = {"tokenizer": TokenizerTask, "lm": LMTask, "mllm": MLLMTask,
         "class_to_image": ClassToImageTask}


def task_class(config: ml_collections.ConfigDict) -> type:
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r} is not one of {sorted(TASKS)}")
  return TASKS[config.task]


def build_task(config: ml_collections.ConfigDict):
  return task_class(config)(config)
