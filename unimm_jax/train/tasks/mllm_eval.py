"""Evaluation and inference modes of the MLLM task (`unimm_jax.train.tasks.mllm`).

Held-out loss and perplexity over packed eval batches; when the eval data carries answers
and generation checks (the built-in scenes, `unimm_jax.data.scenes`), also
  answer accuracy  greedy answers to held-out questions, per question type and for
                   questions about seen and held-out colour-shape pairs, with chance and
                   majority-answer baselines;
  generation check the rate of generated images that satisfy their prompt
                   (`unimm_jax.evals.scene_checks.check_generated_image`);
  edit check       (a system that edits in context, config.eval.num_edits > 0) the rate of
                   edit rounds whose image shows what the instruction asked
                   (`scene_checks.check_edited_image`), over all rounds and per round, each
                   chain edited in context from its start scene;
and grids of generated and edited images (TensorBoard and WORKDIR/generations/,
WORKDIR/edits/step_*.png).
`--mode=chat`, `--mode=generate` and `--mode=edit` restore only the eval params.
"""
import os

import jax
import numpy as np

from unimm_jax.data import mllm_data
from unimm_jax.data import mllm_sequence
from unimm_jax.data import transforms
from unimm_jax.evals import scene_checks
from unimm_jax.inference import image_io
from unimm_jax.inference import mllm_inference
from unimm_jax.train import evaluators
from unimm_jax.train import metric_logging

GENERATION_PREFIX = "generation/"  # statistics that are a generation head's terms


class MLLMEvaluator(evaluators.CachedEvaluator):
  """The MLLM's periodic evaluation (see the module docstring); trainer interface as
  `unimm_jax.train.evaluators`."""
  metric_name = "answer accuracy / generation check"

  def __init__(self, task, context, writer, workdir: str):
    super().__init__(writer)
    self.task, self.context, self.workdir = task, context, workdir
    config, system = task.config, task.system
    shards = context.batch_shards
    self.frozen = evaluators.frozen_on_mesh(task, context)
    host_batches = list(mllm_data.build_mllm_eval_batches(
        config.data, task.tokenizer, system.ids, system.image_slots,
        batch_size=evaluators.rounded_up(config.eval.batch_size, shards),
        max_batches=config.eval.num_batches))
    self.batches = [context.place_batch(b, host_local=False) for b in host_batches]
    self.num_tokens = int(sum(b["loss_mask"].sum() for b in host_batches))
    self.statistics = jax.jit(task.statistics, out_shardings=context.replicated)
    rounded = lambda n: evaluators.rounded_up(n, shards)
    self.questions = mllm_data.eval_records(config.data, "understanding",
                                            rounded(config.eval.num_answers))
    self.prompts = mllm_data.eval_records(config.data, "generation",
                                          rounded(config.eval.num_generations))
    num_edits = config.eval.get("num_edits", 0)  # configs saved before the field have none
    if num_edits and not system.edits_in_context:
      raise ValueError(f"config.eval.num_edits={num_edits}: {type(system).__name__} does not "
                       "edit in context; set it to 0")
    self.edits = mllm_data.eval_records(config.data, "editing", num_edits)
    self.runner = mllm_inference.MLLMRunner.on_mesh(
        system, task.tokenizer, context, max_answer_tokens=config.eval.max_answer_tokens,
        chat_template=config.data.chat_template)
    self.answers, self.images = [], None
    self.edit_rows = None

  def _loss(self, params) -> dict[str, float]:
    totals = {}
    for batch in self.batches:
      for name, value in jax.device_get(self.statistics(params, self.frozen, batch)).items():
        totals[name] = totals.get(name, 0.0) + float(value)
    loss = totals["ce_sum"] / max(totals["tokens"], 1.0)
    scalars = {"eval/loss": loss, "eval/perplexity": float(np.exp(loss)),
               "eval/image_ce": totals["image_ce_sum"] / max(totals["image_tokens"], 1.0)}
    # A generation head's terms (EvoTok's depth head): the mean of the batches' values.
    scalars.update({f"eval/{name[len(GENERATION_PREFIX):]}": value / len(self.batches)
                    for name, value in totals.items() if name.startswith(GENERATION_PREFIX)})
    return scalars

  def _compute(self, variables) -> dict[str, float]:
    with self.context.activate():
      return self._scores(variables["params"])

  def _scores(self, params) -> dict[str, float]:
    gen = self.task.config.generation
    scalars = self._loss(params) if self.batches else {}
    if self.questions:
      self.answers = self.runner.answer(params, self.frozen, self.questions)
      metas = [r["meta"] for r in self.questions]
      held_out = [m.get("held_out") for m in metas]  # seen vs held-out colour-shape pairs
      scalars.update({f"eval/{k}": v for k, v in scene_checks.answer_accuracy(
          self.answers, [m["answer"] for m in metas], [m["question_type"] for m in metas],
          None if None in held_out else held_out).items()})
    if self.prompts:
      self.images = self.runner.generate(
          params, self.frozen, [mllm_data.prompt_text(r) for r in self.prompts],
          cfg_scale=gen.cfg_scale, temperature=gen.temperature, top_k=gen.top_k or None,
          top_p=gen.top_p, seed=self.task.config.seed)
      checks = [scene_checks.check_generated_image(image, r["meta"]["check"])
                for image, r in zip(self.images, self.prompts)]
      scalars["eval/generation_check"] = float(np.mean(checks))
    if self.edits:
      scalars.update(self._edit_checks(params))
    return scalars

  def _edit_checks(self, params) -> dict[str, float]:
    """Edits every eval chain in context (chains of one length together) and checks each
    round; keeps rows [start, round 1, ...] (in [-1, 1]) for the grid."""
    gen = self.task.config.generation
    passes, self.edit_rows = {}, []
    for length in sorted({r["meta"]["num_edits"] for r in self.edits}):
      records = [r for r in self.edits if r["meta"]["num_edits"] == length]
      starts = np.stack([transforms.normalize(r["messages"][0]["content"][0]["image"])
                         for r in records])
      rounds, _ = self.runner.edit(params, self.frozen, starts,
                                   [r["meta"]["instructions"] for r in records],
                                   cfg_scale=gen.cfg_scale, temperature=gen.temperature,
                                   seed=self.task.config.seed)
      for record, start, edited in zip(records, starts, rounds):
        for k, (image, check) in enumerate(zip(edited, record["meta"]["checks"]), start=1):
          passes.setdefault(k, []).append(scene_checks.check_edited_image(image, check))
        self.edit_rows.append([start, *edited])
    scalars = {"eval/edit_check": float(np.mean(sum(passes.values(), [])))}
    scalars.update({f"eval/edit_check/round_{k}": float(np.mean(v)) for k, v in passes.items()})
    return scalars

  def write_samples(self, variables, step: int) -> None:
    self.evaluate(variables, step)
    if self.images is not None:
      grid = metric_logging.image_grid(self.images[:self.task.config.train.grid_images],
                                       columns=4)
      self.writer.write_images(step, {"generations": grid[None]})
    if self.edit_rows:
      edits = self._edit_grid()
      self.writer.write_images(step, {"edits": edits[None]})
    text = "\n".join(f"Q: {mllm_data.prompt_text(r)}  A: {a}  (want {r['meta']['answer']})"
                     for r, a in zip(self.questions[:8], self.answers[:8]))
    if text:
      self.writer.write_texts(step, {"answers": text})
    if jax.process_index() == 0:
      if self.images is not None:
        image_io.save_png(os.path.join(self.workdir, "generations", f"step_{step:07d}.png"),
                          grid)
      if self.edit_rows:
        image_io.save_png(os.path.join(self.workdir, "edits", f"step_{step:07d}.png"), edits)
      os.makedirs(os.path.join(self.workdir, "answers"), exist_ok=True)
      with open(os.path.join(self.workdir, "answers", f"step_{step:07d}.txt"), "w") as f:
        f.write(text + "\n")

  def _edit_grid(self) -> np.ndarray:
    """One row per chain (at most grid_images rows): the start scene, then each round; a
    shorter chain's row ends in black."""
    rows = self.edit_rows[:self.task.config.train.grid_images]
    width = max(len(row) for row in rows)
    blank = np.full_like(rows[0][0], -1.0)
    cells = [image for row in rows for image in row + [blank] * (width - len(row))]
    return metric_logging.image_grid(np.stack(cells), columns=width)

  def headline(self, scalars: dict[str, float]) -> str:
    parts = []
    if "eval/accuracy/all" in scalars:
      parts.append(f"answers {scalars['eval/accuracy/all']:.3f} "
                   f"(chance {scalars['eval/chance/all']:.3f}, majority answer "
                   f"{scalars['eval/majority/all']:.3f})")
      for group in ("seen", "held_out"):
        if f"eval/accuracy/{group}" in scalars:
          parts.append(f"{group.replace('_', '-')} pairs {scalars[f'eval/accuracy/{group}']:.3f}"
                       f" (majority {scalars[f'eval/majority/{group}']:.3f})")
    if "eval/generation_check" in scalars:
      parts.append(f"generation check {scalars['eval/generation_check']:.3f}")
    if "eval/edit_check" in scalars:
      parts.append(f"edit check {scalars['eval/edit_check']:.3f}")
    if "eval/loss" in scalars:
      parts.append(f"loss {scalars['eval/loss']:.4f}")
    return ", ".join(parts)

  @property
  def description(self) -> str:
    edits = f", {len(self.edits)} edit chains" if self.edits else ""
    return (f"{len(self.questions)} held-out questions, {len(self.prompts)} generation "
            f"prompts{edits}, {self.num_tokens} target tokens")


def evaluate_checkpoint(task, context, workdir: str) -> dict:
  """`--mode=eval`: the evaluator's scalars for the latest checkpoint, written to
  WORKDIR/eval_STEP.json and TensorBoard."""
  return evaluators.evaluate_latest_checkpoint(
      task, context, workdir, lambda writer: MLLMEvaluator(task, context, writer, workdir))


def chat(task, context, workdir: str, image_path: str | None, prompt: str) -> str:
  """`--mode=chat`: the greedy answer to `prompt` about the image at `image_path`."""
  _, params = evaluators.restore_task_params(task, context, workdir)
  content = [{"type": "text", "text": prompt}]
  if image_path:
    content.insert(0, {"type": "image", "path": os.path.abspath(image_path)})
  record = {"kind": "understanding", "meta": {},
            "messages": [{"role": "user", "content": content}]}
  runner = mllm_inference.MLLMRunner.on_mesh(
      task.system, task.tokenizer, context, max_answer_tokens=task.config.eval.max_answer_tokens,
      chat_template=task.config.data.chat_template)
  with context.activate():
    return runner.answer(params, evaluators.frozen_on_mesh(task, context), [record])[0]


def generate_to_folder(task, context, workdir: str, prompt: str, *, output: str,
                       num_images: int = 4, cfg_scale: float | None = None,
                       temperature: float | None = None, top_k: int | None = None,
                       top_p: float | None = None, seed: int = 0) -> str:
  """`--mode=generate`: `num_images` images for `prompt` as PNGs in `output`."""
  gen = task.config.generation
  _, params = evaluators.restore_task_params(task, context, workdir)
  runner = mllm_inference.MLLMRunner.on_mesh(task.system, task.tokenizer, context,
                                             chat_template=task.config.data.chat_template)
  frozen = evaluators.frozen_on_mesh(task, context)
  with context.activate():
    images = runner.generate(params, frozen, [prompt] * num_images,
                             cfg_scale=gen.cfg_scale if cfg_scale is None else cfg_scale,
                             temperature=gen.temperature if temperature is None else temperature,
                             top_k=(gen.top_k or None) if top_k is None else top_k,
                             top_p=gen.top_p if top_p is None else top_p, seed=seed)
  os.makedirs(output, exist_ok=True)
  for i, image in enumerate(images):
    image_io.save_png(os.path.join(output, f"image_{i:03d}.png"), image_io.to_uint8(image))
  return f"wrote {len(images)} images for {prompt!r} to {output}"


def edit_to_folder(task, context, workdir: str, image_path: str, instructions: list[str], *,
                   output: str, cfg_scale: float | None = None,
                   temperature: float | None = None, seed: int = 0) -> str:
  """`--mode=edit`: the image at `image_path` edited by each instruction in turn, every
  round's image kept in context as latents; writes round_1.png, ... (and the input as the
  model sees it, round_0.png) in `output`."""
  gen = task.config.generation
  _, params = evaluators.restore_task_params(task, context, workdir)
  size = task.system.image_slots.image_size
  image = mllm_sequence.load_image({"path": os.path.abspath(image_path)})
  if isinstance(image, transforms.Unreadable):
    raise ValueError(f"--image={image_path} cannot be read: {image.reason}")
  pixels = transforms.normalize(transforms.crop_or_resize(image, size, "center_crop", None))
  runner = mllm_inference.MLLMRunner.on_mesh(task.system, task.tokenizer, context,
                                             chat_template=task.config.data.chat_template)
  frozen = evaluators.frozen_on_mesh(task, context)
  with context.activate():
    images, _ = runner.edit(params, frozen, pixels[None], [instructions],
                            cfg_scale=gen.cfg_scale if cfg_scale is None else cfg_scale,
                            temperature=gen.temperature if temperature is None else temperature,
                            seed=seed)
    images = images[0]
  os.makedirs(output, exist_ok=True)
  image_io.save_png(os.path.join(output, "round_0.png"), image_io.to_uint8(pixels))
  for i, image in enumerate(images, start=1):
    image_io.save_png(os.path.join(output, f"round_{i}.png"), image_io.to_uint8(image))
  return f"wrote {len(images)} edited rounds of {image_path} to {output}"
