"""The frozen-teacher half of a training-only module: what the tokenizer task hands it.

A module that compares the tokenizer's features with a frozen pretrained ViT (UniWeTok's
Pre-Post Distillation, EvoTok's semantic alignment) subclasses `TeacherModule`: the teacher
is built from `config.teacher` (`unimm_jax.convert.teacher`), its weights are loaded once
per run as the frozen network `teacher`, and `self.target(frozen, images)` gives its features.
A loss with two teachers (MingTok: DINOv2 at the latents, CLIP at the semantic features) gives
the second its own config and frozen name.
"""
import jax
import ml_collections

from unimm_jax.convert import teacher as teacher_loader
from unimm_jax.convert.pretrained import load_pretrained
from unimm_jax.models.tokenizer_interface import TrainingModule


class TeacherModule(TrainingModule):
  """A TrainingModule that reads the frozen teacher of `teacher_config` (config.teacher),
  held among the frozen networks as `frozen_name`."""

  def __init__(self, teacher_config: ml_collections.ConfigDict, frozen_name: str = "teacher"):
    self.teacher_config = teacher_config
    self.frozen_name = frozen_name
    self.teacher = teacher_loader.build_teacher(teacher_config)

  def frozen_shapes(self, images):
    dtype = self.teacher.model.config.dtype
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    variables = jax.eval_shape(
        lambda r, x: self.teacher.model.init(r, *self.teacher.model_inputs(x)), rng, images)
    return {self.frozen_name: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype),
                                           variables)}

  def load_frozen(self):
    dtype = self.teacher.model.config.dtype
    _, variables = load_pretrained(self.teacher_config.path, param_dtype=dtype, dtype=dtype)
    return {self.frozen_name: variables}

  def target(self, frozen, images):
    """The teacher's features of `images` (config.teacher.feature), stop-gradiented."""
    return self.teacher(frozen[self.frozen_name], images)
