"""Reading a run's checkpoints without a trainer: its config, and only the parameters a mode
uses, placed on the mesh.

Layout (written by `unimm_jax.train.checkpointing`): WORKDIR/checkpoints/<step>/ holds the
items `state` (the TrainState as a tree: step, params, ema_params, opt_state, ...), `config`
(JSON), `progress` and `data_iter`. Restoring reads a subset of the state's fields (Orbax's
partial restore), each process only its own shards, straight into the layout of the given
shardings: `--mode=encode` on a run of a 600M-parameter tokenizer with a discriminator reads
the EMA params and nothing of the optimiser or the discriminator.
"""
import logging
import os
from typing import Any

from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from unimm_jax.parallel import sharding
from unimm_jax.parallel.context import MeshContext

CHECKPOINTS = "checkpoints"
STATE = "state"
CONFIG = "config"


def checkpoints_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; Orbax needs absolute paths (URLs such as gs:// stay as they are)."""
  root = workdir if "://" in str(workdir) else os.path.abspath(workdir)
  return f"{root}/{CHECKPOINTS}"


def _manager(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(checkpoints_dir(workdir),
                               options=ocp.CheckpointManagerOptions(create=False))


def latest_step(workdir: str) -> int | None:
  if not os.path.isdir(checkpoints_dir(workdir)) and "://" not in str(workdir):
    return None
  with _manager(workdir) as manager:
    return manager.latest_step()


def _step_or_latest(workdir: str, step: int | None) -> int:
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoints_dir(workdir)}")
  return step


def saved_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config stored with the (latest) checkpoint of `workdir`."""
  step = _step_or_latest(workdir, step)
  with _manager(workdir) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
  return ml_collections.ConfigDict(restored[CONFIG])


def saved_fields(workdir: str, step: int) -> dict[str, Any]:
  """The state's saved tree structure (metadata, no arrays) by field name."""
  path = epath.Path(f"{checkpoints_dir(workdir)}/{step}/{STATE}")
  return dict(ocp.PyTreeCheckpointHandler().metadata(path).tree)


def restore_fields(workdir: str, fields: dict[str, Any], context: MeshContext,
                   step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, {field: tree}) for the given TrainState fields of the (latest) checkpoint.

  fields: field name -> its boxed abstract tree (e.g. `jax.eval_shape` of the task's init),
  whose logical names place the restored arrays on `context`'s mesh.
  """
  step = _step_or_latest(workdir, step)
  item = {name: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             sharding.unbox(tree), context.shardings(tree))
          for name, tree in fields.items()}
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  with _manager(workdir) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True)}))
  logging.info("restored %s of step %d from %s", sorted(fields), step, workdir)
  return step, dict(restored[STATE])


def restore_eval_params(workdir: str, boxed_params: Any, context: MeshContext,
                        step: int | None = None) -> tuple[int, Any]:
  """(step, params) that eval and inference use: the EMA params when the run kept them
  (`TrainState.eval_params`), else the params; nothing else is read."""
  step = _step_or_latest(workdir, step)
  field = "params" if saved_fields(workdir, step).get("ema_params") is None else "ema_params"
  step, restored = restore_fields(workdir, {field: boxed_params}, context, step)
  return step, restored[field]


def restore_eval_variables(workdir: str, boxed_variables: dict, context: MeshContext,
                           step: int | None = None) -> tuple[int, dict]:
  """(step, variables) that eval and inference apply a model with: {'params': the eval
  params (see `restore_eval_params`), plus the collections of `TrainState.model_state`
  (EMA codebooks) that `boxed_variables` names besides 'params'}."""
  others = {k: v for k, v in boxed_variables.items() if k != "params"}
  step, params = restore_eval_params(workdir, boxed_variables["params"], context, step)
  if others:
    others = restore_fields(workdir, {"model_state": others}, context, step)[1]["model_state"]
  return step, {"params": params, **others}
