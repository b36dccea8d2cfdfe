r"""Entry point: train a config; encode/decode images with a tokenizer; generate text with an LM;
chat about an image and generate images with a unified MLLM.

  python -m unimm_jax.main --config=configs/uniwetok.py:demo --workdir=/tmp/run
  python -m unimm_jax.main --mode=eval --workdir=/tmp/run
  python -m unimm_jax.main --mode=encode --workdir=/tmp/run --input=photos/ --output=codes.npz
  python -m unimm_jax.main --mode=decode --workdir=/tmp/run --input=codes.npz --output=out/
  python -m unimm_jax.main --mode=generate --workdir=/tmp/lm --prompt="The assert statement"
  python -m unimm_jax.main --mode=chat --workdir=/tmp/mllm --image=scene.png \
      --prompt="What colour is the circle?"
  python -m unimm_jax.main --mode=generate --workdir=/tmp/mllm --prompt="a red circle on the \
      left" --output=/tmp/images --num_images=4 --cfg_scale=3
  python -m unimm_jax.main --mode=generate --workdir=/tmp/bitdance --class_id=3 \
      --output=/tmp/class_3 --num_images=8
  python -m unimm_jax.main --mode=edit --workdir=/tmp/ming --image=scene.png \
      --prompt="Make the circle blue." --prompt="Move the square to the left." --output=/tmp/edits
  python -m unimm_jax.main --mode=import --config=configs/uniwetok.py:paper \
      --input=uniwetok.safetensors --workdir=/tmp/authors
  python -m unimm_jax.main --mode=plan --config=configs/lm.py:qwen2_5_7b \
      --config.mesh.data=16 --config.mesh.fsdp=16

Override any config field with --config.a.b=value; unknown keys and wrongly typed values
stop the run before anything is compiled.
"""
import dataclasses
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from unimm_jax import config_defaults
from unimm_jax.inference import restore
from unimm_jax.parallel import mesh as mesh_lib
from unimm_jax.parallel import multihost
from unimm_jax.parallel.context import MeshContext
from unimm_jax.train import from_checkpoint
from unimm_jax.train import plan
from unimm_jax.train import tasks
from unimm_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/uniwetok.py:demo. eval/encode/decode default to "
    "the config saved with the workdir's checkpoint.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs "
                               "(not needed by --mode=plan).")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "eval", "encode", "decode", "generate", "chat", "edit",
                           "plan", "import"],
                          "What to run; each task supports some (README). plan: compile the "
                          "train step for config.mesh on fake CPU devices and print "
                          "parameters, FLOPs and per-device memory. import: write step 0 of a "
                          "new workdir from the authors' released weights (--input).")
_INPUT = flags.DEFINE_string("input", None, "encode: image folder; decode: .npz of codes; "
                             "import: the authors' weights (a tokenizer: safetensors).")
_OUTPUT = flags.DEFINE_string("output", None, "encode: .npz to write; decode, and generate "
                              "with an MLLM: folder for the PNGs.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "generate: the text to continue (an LM) "
                                    "or the image to draw (an MLLM); chat: the question; "
                                    "edit: one instruction per round (repeat the flag).")
_IMAGE = flags.DEFINE_string("image", None, "chat: the image the question is about; edit: "
                             "the image to edit.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "generate (an MLLM, a class-to-image "
                                   "generator): images to draw.")
_CLASS_ID = flags.DEFINE_integer("class_id", None, "generate (a class-to-image generator): "
                                 "the class to draw.")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None, "generate (an MLLM): classifier-free "
                                "guidance scale; default config.generation.cfg_scale.")
_CHAT = flags.DEFINE_bool("chat", False, "generate: wrap the prompt as a user turn of the "
                          "tokenizer's chat template.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "generate: tokens to add.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "generate: 0 is greedy; default 0 for "
                                  "text, config.generation.temperature for images.")
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


@dataclasses.dataclass(frozen=True)
class Mode:
  """One `--mode`: its runner (config, workdir) -> None, what a task needs to support it (for
  the error when it does not), the flags it requires, and whether it reads an existing run
  (its config then defaults to the one saved with the workdir's checkpoint)."""
  run: Callable
  needs: str
  required_flags: tuple[str, ...] = ()
  reads_run: bool = True


def _context(config) -> MeshContext:
  return MeshContext(mesh_lib.make_mesh(config.mesh), config_defaults.sharding_rules(config))


def _train(config, workdir: str) -> None:
  trainer.train_and_evaluate(config, workdir)


def _eval(config, workdir: str) -> None:
  tasks.build_task(config).evaluate_checkpoint(_context(config), workdir)


def _encode(config, workdir: str) -> None:
  print(tasks.build_task(config).encode_folder(_context(config), workdir, _INPUT.value,
                                               _OUTPUT.value))


def _decode(config, workdir: str) -> None:
  print(tasks.build_task(config).decode_file(_context(config), workdir, _INPUT.value,
                                             _OUTPUT.value))


# The flags each kind of `generate` reads (a task names its kind in `generate_flags` and the
# ones it cannot do without in `generate_required`).
_GENERATE_FLAGS = {"prompt": _PROMPT, "max_new_tokens": _MAX_NEW_TOKENS,
                   "temperature": _TEMPERATURE, "top_k": _TOP_K, "top_p": _TOP_P,
                   "chat": _CHAT, "output": _OUTPUT, "num_images": _NUM_IMAGES,
                   "cfg_scale": _CFG_SCALE, "class_id": _CLASS_ID}


def _generate(config, workdir: str) -> None:
  task = tasks.build_task(config)
  missing = [f"--{name}" for name in task.generate_required
             if _GENERATE_FLAGS[name].value is None]
  if missing:
    raise app.UsageError(f"--mode=generate of {task.kind} needs {' and '.join(missing)}")
  ignored = sorted(name for name in _GENERATE_FLAGS
                   if name not in task.generate_flags and flags.FLAGS[name].present)
  if ignored:
    raise app.UsageError(f"--mode=generate of {task.kind} does not read "
                         f"{', '.join('--' + n for n in ignored)}")
  options = {name: (_single_prompt() if name == "prompt" else _GENERATE_FLAGS[name].value)
             for name in task.generate_flags}
  print(task.generate(_context(config), workdir, **options))


def _single_prompt() -> str:
  if len(_PROMPT.value) > 1:
    raise app.UsageError(f"--mode={_MODE.value} takes one --prompt, got {len(_PROMPT.value)}")
  return _PROMPT.value[0]


def _chat(config, workdir: str) -> None:
  print(tasks.build_task(config).chat(_context(config), workdir, _IMAGE.value,
                                      _single_prompt()))


def _edit(config, workdir: str) -> None:
  options = {"cfg_scale": _CFG_SCALE.value, "temperature": _TEMPERATURE.value}
  print(tasks.build_task(config).edit(_context(config), workdir, _IMAGE.value,
                                      list(_PROMPT.value), output=_OUTPUT.value, **options))


def _import(config, workdir: str) -> None:
  from_checkpoint.import_weights(config, workdir, _INPUT.value)
  print(f"imported {_INPUT.value} as step 0 of {workdir}")


def _plan(config, workdir: str) -> None:
  """Prints the train step's compiled plan for config.mesh (see unimm_jax.train.plan)."""
  del workdir
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  print(plan.format_plan(plan.plan_train_step(config), name), flush=True)


MODES = {
    "train": Mode(_train, "training", reads_run=False),
    "eval": Mode(_eval, "evaluation of a checkpoint"),
    "encode": Mode(_encode, "image codes", ("input", "output")),
    "decode": Mode(_decode, "image codes", ("input", "output")),
    "generate": Mode(_generate, "generation"),  # its flags depend on the task (_generate)
    "chat": Mode(_chat, "chat about images", ("prompt",)),
    "edit": Mode(_edit, "in-context image editing", ("image", "prompt", "output")),
    "import": Mode(_import, "importer of released weights", ("input",), reads_run=False),
    "plan": Mode(_plan, "plan", reads_run=False),
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)  # progress with ETA (CLU ReportProgress) is INFO
  logging.get_absl_handler().addFilter(_quiet_checkpoint_logs)
  name, mode, workdir = _MODE.value, MODES[_MODE.value], _WORKDIR.value
  missing = [f"--{flag}" for flag in mode.required_flags if getattr(flags.FLAGS, flag) is None]
  if missing:
    raise app.UsageError(f"--mode={name} needs {' and '.join(missing)}")
  if name == "plan":
    config = _checked_config(name, _CONFIG.value)
    # Before anything touches the backend: the devices are fake CPU ones.
    plan.use_fake_devices(plan.devices_needed(config.mesh, _PLAN_DEVICES.value))
    mode.run(config, None)
    return
  if not workdir:
    raise app.UsageError(f"--mode={name} needs --workdir")
  if _MULTIHOST.value or multihost.wanted(_COORDINATOR.value, _NUM_PROCESSES.value):
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  config = _CONFIG.value
  if config is None and mode.reads_run:
    config = restore.saved_config(workdir)
  mode.run(_checked_config(name, config), workdir)


def _checked_config(name: str, config):
  """The validated config, after checking that its task supports the mode."""
  if config is None:
    raise app.UsageError(f"--mode={name} needs --config")
  config_defaults.validate(config)
  task = tasks.task_class(config)
  if name not in task.modes:
    raise app.UsageError(
        f"--mode={name}: {task.kind} (config.task={config.task!r}) has no "
        f"{MODES[name].needs}; its modes are {', '.join(task.modes)}")
  return config


if __name__ == "__main__":
  app.run(main)
