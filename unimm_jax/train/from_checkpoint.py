"""`--mode=import`: step 0 of a new workdir from released weights, ready to evaluate,
serve or fine-tune.

The task turns the weights file into params (`task.import_params(path)`: a tokenizer's spec
knows its authors' format); they become the params and the EMA params of an initial train
state, whose optimiser, discriminator and training-only modules start as at initialisation.
No data-iterator state is saved. The workdir then serves `--mode=eval/encode/decode`,
`--config.train.init_from` (fine-tuning as a new run), or training in place from step 0.
"""
import jax
import ml_collections

from unimm_jax.train import trainer


def import_weights(config: ml_collections.ConfigDict, workdir: str, weights_path: str) -> None:
  """Writes step 0 of `workdir` from `weights_path`; refuses a workdir with checkpoints."""
  setup = trainer.Setup(config)
  checkpointer = setup.checkpointer(workdir)
  if checkpointer.latest_step() is not None:
    raise FileExistsError(f"{workdir}/checkpoints already holds step "
                          f"{checkpointer.latest_step()}; import into a new workdir")
  params = jax.device_put(setup.task.import_params(weights_path), setup.state_shardings.params)
  state = setup.init_state()
  state = state.replace(params=params,
                        ema_params=None if state.ema_params is None else params)
  checkpointer.save(0, state, None, config, {"skipped_records": 0}, force=True)
  checkpointer.wait()
  checkpointer.close()
