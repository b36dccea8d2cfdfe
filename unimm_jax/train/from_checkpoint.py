"""`--mode=import`: step 0 of a new workdir from released weights, ready to evaluate,
serve or fine-tune.

The task turns the weights file into variables (`task.import_variables(path)`: a
tokenizer's spec knows its authors' format); their params become the params and the EMA
params of an initial train state, their other collections (EMA codebooks) its model state,
and the state's optimiser, discriminator and training-only modules start as at initialisation.
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
  variables = dict(setup.task.import_variables(weights_path))
  params = jax.device_put(variables.pop("params"), setup.state_shardings.params)
  state = setup.init_state()
  if sorted(variables) != sorted(state.model_state or {}):
    raise ValueError(f"{weights_path}: the import gives the state collections "
                     f"{sorted(variables)}, the model has {sorted(state.model_state or {})}")
  model_state = (jax.device_put(variables, setup.state_shardings.model_state) if variables
                 else state.model_state)
  state = state.replace(params=params, model_state=model_state,
                        ema_params=None if state.ema_params is None else params)
  checkpointer.save(0, state, None, config, {"skipped_records": 0}, force=True)
  checkpointer.wait()
  checkpointer.close()
