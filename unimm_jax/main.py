r"""Entry point: train a config, or encode/decode images with a trained tokenizer.

  python -m unimm_jax.main --config=configs/uniwetok.py:demo --workdir=/tmp/run
  python -m unimm_jax.main --mode=eval --workdir=/tmp/run
  python -m unimm_jax.main --mode=encode --workdir=/tmp/run --input=photos/ --output=codes.npz
  python -m unimm_jax.main --mode=decode --workdir=/tmp/run --input=codes.npz --output=out/

Override any config field with --config.a.b=value; unknown keys and wrongly typed values
stop the run before anything is compiled.
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from unimm_jax import config_defaults
from unimm_jax.inference import image_codec
from unimm_jax.models import registry
from unimm_jax.train import from_checkpoint
from unimm_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/uniwetok.py:demo. eval/encode/decode default to "
    "the config saved with the workdir's checkpoint.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.",
                               required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "encode", "decode"],
                          "What to run.")
_INPUT = flags.DEFINE_string("input", None, "encode: image folder; decode: .npz of codes.")
_OUTPUT = flags.DEFINE_string("output", None, "encode: .npz to write; decode: folder.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (one process per host, "
    "e.g. every worker of a TPU pod; see launch/tpu_pod.sh).")


def _quiet_checkpoint_logs(record) -> bool:
  """Keeps Orbax's warnings but not its dozens of INFO lines per checkpoint."""
  return record.levelno >= logging.converter.STANDARD_WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)  # progress with ETA (CLU ReportProgress) is INFO
  logging.get_absl_handler().addFilter(_quiet_checkpoint_logs)
  if _MULTIHOST.value:
    jax.distributed.initialize()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  config = _CONFIG.value
  if _MODE.value == "train":
    if config is None:
      raise app.UsageError("--config is required for --mode=train")
    config_defaults.validate(config)
    trainer.train_and_evaluate(config, _WORKDIR.value)
    return
  if _MODE.value == "eval":
    config = config if config is not None else from_checkpoint.saved_config(_WORKDIR.value)
    from_checkpoint.evaluate_checkpoint(config, _WORKDIR.value)
    return
  if not (_INPUT.value and _OUTPUT.value):
    raise app.UsageError(f"--mode={_MODE.value} needs --input and --output")
  config = config if config is not None else from_checkpoint.saved_config(_WORKDIR.value)
  task, params = from_checkpoint.restore_ema_params(config, _WORKDIR.value)
  if _MODE.value == "encode":
    encode = jax.jit(lambda images: task.encode(params, images))
    n = image_codec.encode_folder(encode, _INPUT.value, _OUTPUT.value,
                                  registry.downsample_factor(config.model),
                                  config.model.group_bits)
    print(f"encoded {n} images from {_INPUT.value} into {_OUTPUT.value}")
  else:
    decode = jax.jit(lambda codes: task.decode(params, codes))
    n = image_codec.decode_file(decode, _INPUT.value, _OUTPUT.value)
    print(f"decoded {n} images from {_INPUT.value} into {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
