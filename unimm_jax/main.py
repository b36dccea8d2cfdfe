r"""Entry point: train a config, encode/decode images with a tokenizer, generate text with an LM.

  python -m unimm_jax.main --config=configs/uniwetok.py:demo --workdir=/tmp/run
  python -m unimm_jax.main --mode=eval --workdir=/tmp/run
  python -m unimm_jax.main --mode=encode --workdir=/tmp/run --input=photos/ --output=codes.npz
  python -m unimm_jax.main --mode=decode --workdir=/tmp/run --input=codes.npz --output=out/
  python -m unimm_jax.main --mode=generate --workdir=/tmp/lm --prompt="The assert statement"
  python -m unimm_jax.main --mode=import --config=configs/uniwetok.py:paper \
      --input=uniwetok.safetensors --workdir=/tmp/authors
  python -m unimm_jax.main --mode=plan --config=configs/lm.py:qwen2_5_7b \
      --config.mesh.data=16 --config.mesh.fsdp=16

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
from unimm_jax.inference import text_generation
from unimm_jax.models import registry
from unimm_jax.parallel import multihost
from unimm_jax.train import from_checkpoint
from unimm_jax.train import plan
from unimm_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/uniwetok.py:demo. eval/encode/decode default to "
    "the config saved with the workdir's checkpoint.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs "
                               "(not needed by --mode=plan).")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "eval", "encode", "decode", "generate", "plan", "import"],
                          "What to run. plan: compile the train step for config.mesh on fake "
                          "CPU devices and print parameters, FLOPs and per-device memory. "
                          "import: write step 0 of a new workdir from the authors' UniWeTok "
                          "weights (--input, safetensors).")
_INPUT = flags.DEFINE_string("input", None, "encode: image folder; decode: .npz of codes; "
                             "import: the authors' weights as safetensors.")
_OUTPUT = flags.DEFINE_string("output", None, "encode: .npz to write; decode: folder.")
_PROMPT = flags.DEFINE_string("prompt", None, "generate: the text to continue.")
_CHAT = flags.DEFINE_bool("chat", False, "generate: wrap the prompt as a user turn of the "
                          "tokenizer's chat template.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "generate: tokens to add.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "generate: 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "generate: sample among the k most likely.")
_TOP_P = flags.DEFINE_float("top_p", None, "generate: nucleus sampling mass.")
_PLAN_DEVICES = flags.DEFINE_integer(
    "plan_devices", None, "plan: how many devices to plan for; defaults to the product of "
    "config.mesh's sizes (required when one of them is -1).")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join a multi-process job first (jax.distributed.initialize): one "
    "process per TPU host or per GPU. The coordinator, process count and id come from the "
    "three flags below, else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
    "JAX_PROCESS_ID, else from the TPU, SLURM, Open MPI or Kubernetes environment. Implied "
    "when any of those flags or variables is set. See launch/tpu_pod.sh, launch/slurm.sh.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordination service.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, in [0, num_processes).")


def _quiet_checkpoint_logs(record) -> bool:
  """Keeps Orbax's warnings but not its dozens of INFO lines per checkpoint."""
  return record.levelno >= logging.converter.STANDARD_WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)  # progress with ETA (CLU ReportProgress) is INFO
  logging.get_absl_handler().addFilter(_quiet_checkpoint_logs)
  config = _CONFIG.value
  if _MODE.value == "plan":
    _plan(config)
    return
  if not _WORKDIR.value:
    raise app.UsageError(f"--mode={_MODE.value} needs --workdir")
  if _MULTIHOST.value or multihost.wanted(_COORDINATOR.value, _NUM_PROCESSES.value):
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  if _MODE.value == "train":
    if config is None:
      raise app.UsageError("--config is required for --mode=train")
    config_defaults.validate(config)
    trainer.train_and_evaluate(config, _WORKDIR.value)
    return
  if _MODE.value == "import":
    if config is None or not _INPUT.value:
      raise app.UsageError("--mode=import needs --config and --input")
    config_defaults.validate(config)
    from_checkpoint.import_uniwetok_weights(config, _WORKDIR.value, _INPUT.value)
    print(f"imported {_INPUT.value} as step 0 of {_WORKDIR.value}")
    return
  if _MODE.value == "eval":
    config = config if config is not None else from_checkpoint.saved_config(_WORKDIR.value)
    from_checkpoint.evaluate_checkpoint(config, _WORKDIR.value)
    return
  if _MODE.value == "generate":
    if _PROMPT.value is None:
      raise app.UsageError("--mode=generate needs --prompt")
    config = config if config is not None else from_checkpoint.saved_config(_WORKDIR.value)
    if config.task != "lm":
      raise app.UsageError(f"--mode=generate needs a language model run, not task "
                           f"{config.task!r}")
    task, params = from_checkpoint.restore_ema_params(config, _WORKDIR.value)
    print(text_generation.generate_text(
        task.model, params, task.tokenizer, _PROMPT.value, max_new_tokens=_MAX_NEW_TOKENS.value,
        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
        chat=_CHAT.value, seed=config.seed))
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


def _plan(config):
  """Prints the train step's compiled plan for config.mesh (see unimm_jax.train.plan)."""
  if config is None:
    raise app.UsageError("--mode=plan needs --config")
  config_defaults.validate(config)
  # Before anything touches the backend: the devices are fake CPU ones.
  plan.use_fake_devices(plan.devices_needed(config.mesh, _PLAN_DEVICES.value))
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  print(plan.format_plan(plan.plan_train_step(config), name), flush=True)


if __name__ == "__main__":
  app.run(main)
