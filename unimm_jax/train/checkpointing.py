"""Orbax checkpoints of the train state, the Grain iterator, the config and progress.

Items: `state` (TrainState arrays, sharded as in training), `data_iter` (Grain iterator
state, one file per process), `config` (JSON, for `--mode=encode/decode` and notebooks) and
`progress` (JSON host counters such as skipped records). Saves are asynchronous; Orbax
writes to a temporary directory and renames it when complete, so a checkpoint interrupted
mid-write is never listed and never restored. Inference reads them without a trainer
(`unimm_jax.inference.restore`, which also owns the layout's names).
"""
import json
import logging
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from unimm_jax.inference import restore as layout


class Checkpointer:
  """Wraps an Orbax CheckpointManager rooted at WORKDIR/checkpoints."""

  def __init__(self, workdir: str, keep: int, save_every: int):
    self.save_every = save_every
    self.manager = ocp.CheckpointManager(
        layout.checkpoints_dir(workdir),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, config: ml_collections.ConfigDict,
           progress: dict[str, Any], force: bool = False) -> bool:
    """Starts an async save if `step` is a multiple of save_every (or `force`).

    The schedule is decided here rather than by Orbax, which would also save the first step
    it sees. `data_iter` None saves no iterator state (imported weights, `--mode=import`).
    """
    if not (force or step % self.save_every == 0):
      return False
    items = {layout.STATE: ocp.args.StandardSave(state),
             layout.CONFIG: ocp.args.JsonSave(json.loads(config.to_json())),
             "progress": ocp.args.JsonSave(progress)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores (state, progress) at `step`, and the iterator in place when given.

    `abstract_state` holds jax.ShapeDtypeStruct leaves with shardings, so each process
    reads only its shards, straight into the training layout.
    """
    items = {layout.STATE: ocp.args.StandardRestore(abstract_state),
             "progress": ocp.args.JsonRestore()}
    if data_iter is not None:
      if (self.manager.directory / str(step) / "data_iter").exists():
        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
      else:  # written by --mode=import
        logging.warning("checkpoint %d has no data-iterator state: the data starts from "
                        "the beginning", step)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored checkpoint at step %d", step)
    return restored[layout.STATE], restored["progress"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
