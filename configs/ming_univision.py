r"""Ming-UniVision (unimm_jax/systems/ming_univision.py): an LLM that reads MingTok's semantic
features (through a Linear-GELU-Linear projector) and writes images one continuous latent at
a time with a per-token rectified-flow head, feeding each latent back through MingTok's
causal semantic decoder; multi-round editing keeps every image in context as latents.

Variants, chosen by the text after the colon (comma-separated, applied in order):
  tiny          tests: the tiny MingTok (32 px, 4 x 4 latents of 8), an LLM 32 wide, a 2-block
                flow head 64 wide.
  demo          the built-in scenes: a 32 px MingTok trained on them (configs/mingtok.py:scenes,
                --config.system.tokenizer_path its workdir), an LLM 128 wide; answers,
                draws and edits (understanding : generation : editing 2 : 2 : 1).
  paper         Ling-lite shape (a 2048-wide mixture-of-experts LLM; --config.model.init_path
                its transformers directory), the paper's MingTok (512 px, 256 latents of 32;
                --config.system.tokenizer_path the authors' state dict), the flow head 3072
                wide, 12 blocks.
  The paper's stages (each a separate run; --config.train.init_from the previous stage):
  pretrain_stage1  the projector and the flow head only (the LLM frozen), 30 % understanding,
                   70 % generation;
  pretrain_stage2  the LLM unlocked, the same mixture;
  sft_stage1    everything but MingTok, 30 % understanding, 60 % generation (the paper's
                10 % text-only data has no built-in source here);
  sft_stage2    15 % understanding, 35 % generation, 55 % single and multi-round editing
                (the paper's 5 % text-only likewise).
  MingTok stays frozen in every stage (the paper also unlocks its semantic decoder in
  pre-training stage 2 with 1024 px understanding images; not built here).

  python -m unimm_jax.main --config=configs/ming_univision.py:demo --workdir=/tmp/ming \
      --config.system.tokenizer_path=/tmp/mingtok_scenes
"""
import ml_collections

from unimm_jax import config_defaults
from unimm_jax.data import mllm_data


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  """Returns the Ming-UniVision config for a comma-separated list of variants."""
  config = config_defaults.base_config()
  config.task = "mllm"
  config.data = mllm_data.default_mllm_data_config()
  config.data.tokenizer = "scene_edit_words"
  # The two-scale CFG needs the unconditional and text-unconditional streams trained: a
  # tenth of the prompts dropped (ours; the paper gives no rate).
  config.data.cfg_dropout = 0.1
  config.system = ml_collections.ConfigDict(dict(
      name="ming_univision",
      # A MingTok tokenizer workdir or the authors' state dict (.safetensors); '' = a random
      # tokenizer (plumbing tests only).
      tokenizer_path="",
  ))
  config.vq = config_defaults.load_config("configs/mingtok.py:tiny").model
  config.model = config_defaults.scene_llm()
  # The per-token rectified-flow head (models/flow_head.py): t = 1 is noise; training t
  # logit-normal (mean 0.8, std 0.8: ours, the authors released no training code).
  config.flow_head = ml_collections.ConfigDict(dict(
      width=3072, depth=12, mlp_ratio=4.0, t_distribution="logit_normal", t_mean=0.8,
      t_std=0.8, dtype="float32"))
  # router_aux: an MoE LLM's load-balance term (E sum f_e P_e; their release computes none,
  # the weight is ours).
  config.loss = ml_collections.ConfigDict(dict(flow=1.0, z_loss=0.0, router_aux=0.0))
  config.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.95, weight_decay=0.0, schedule="cosine",
      warmup_steps=20, grad_clip=1.0, groups=ml_collections.ConfigDict()))
  config.ema_decay = 0.0
  # The authors' sampling: 16 Euler steps, text CFG 3.0 (`cfg_scale`), image CFG 1.1,
  # temperature 1 (the noise's scale).
  config.generation = ml_collections.ConfigDict(dict(cfg_scale=3.0, image_scale=1.1,
                                                     temperature=1.0, num_steps=16,
                                                     top_k=None, top_p=None))
  config_defaults.set_mllm_schedule(config)
  config = config_defaults.apply_variants(config, arg, _VARIANTS,
                                          "configs/ming_univision.py")
  if config.data.tokenizer == "scene_edit_words":
    config.tokens, config.model.vocab_size = config_defaults.scene_marker_tokens(
        "scene_edit_words")
  config.data.image_size = config.vq.image_size
  return config


def _tiny(config):
  m = config.model
  m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads = 32, 64, 2, 4, 2
  config.flow_head.update(dict(width=64, depth=2))
  config.generation.num_steps = 4
  config.data.seq_len = 96
  config.data.images_per_row = 2
  config.data.max_edits = 1  # an edit example holds max_edits + 1 images
  config.eval.num_edits = 2
  config_defaults.set_mllm_test_schedule(config)


def _demo(config):
  """Scenes at 32 px through `configs/mingtok.py:scenes` (8 x 8 latents of 16): 64 slots
  per image; understanding : generation : editing 2 : 2 : 1 (chains of up to 2 edits)."""
  config.vq = config_defaults.load_config("configs/mingtok.py:scenes").model
  config.flow_head.update(dict(width=256, depth=3))
  config.data.seq_len, config.data.images_per_row = 512, 4
  config.data.questions_per_image = 6
  config.data.understanding_weight, config.data.generation_weight = 2.0, 2.0
  config.data.editing_weight, config.data.max_edits = 1.0, 2
  config.train.batch_size = 8
  config.train.steps = 950
  config.train.update(dict(image_every=950, checkpoint_every=950, eval_every=950))
  config.eval.update(dict(batch_size=8, num_answers=240, num_edits=48))


def _paper(config):
  config.data.tokenizer = ""  # set to the Ling-lite checkpoint's tokenizer directory
  config.data.source, config.data.path = "jsonl", ""  # set to the conversations' JSONL files
  config.data.images_per_row = 1
  config.data.seq_len = 2048
  config.vq = config_defaults.load_config("configs/mingtok.py:paper").model
  # Ling-lite's ids (its <|endoftext|> pad and end of turn, the image markers of its
  # tokenizer: config.json image_start_token 126347 and the next id).
  config.tokens = ml_collections.ConfigDict(dict(
      pad=126081, bos=126080, eos=126081, boi=126347, eoi=126348))
  config.model.update(dict(
      vocab_size=126464, hidden_size=2048, intermediate_size=5632, num_layers=28,
      num_heads=16, num_kv_heads=4, head_dim=128, rope_theta=600000.0, rms_norm_eps=1e-5,
      qkv_bias=False, dtype="bfloat16", scan_layers=True, remat=True,
      # Ling-lite's experts: 64 routed SwiGLU experts of 1408, top-6 (renormalised), 2
      # shared; text / image / audio routers (multi_gate).
      num_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408,
      num_shared_experts=2, first_k_dense_replace=0, norm_topk_prob=True, num_routers=3))
  config.loss.router_aux = 0.001
  config.flow_head.update(dict(width=3072, depth=12, dtype="bfloat16"))
  config.train.batch_size = 256
  config.mesh.update(dict(data=1, fsdp=-1, tensor=1))


def _stage(understanding: float, generation: float, editing: float, frozen: str | None,
           lr: float):
  """A stage: the mixture (shares), lr and the params kept frozen (a regular expression over
  their paths)."""
  def apply(config):
    config.data.understanding_weight = understanding
    config.data.generation_weight = generation
    config.data.editing_weight = editing
    config.optim.lr = lr
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = max(1, round(0.03 * config.train.steps))
    if frozen is not None:
      config.optim.groups.llm = dict(pattern=frozen, lr_mult=1.0, weight_decay=None,
                                     frozen=True)
  return apply


_VARIANTS = {
    "tiny": _tiny,
    "demo": _demo,
    "paper": _paper,
    "pretrain_stage1": _stage(0.3, 0.7, 0.0, r"llm/.*", 1e-3),
    "pretrain_stage2": _stage(0.3, 0.7, 0.0, None, 1e-4),
    "sft_stage1": _stage(0.3, 0.6, 0.0, None, 2e-5),
    "sft_stage2": _stage(0.15, 0.35, 0.55, None, 2e-5),
}
