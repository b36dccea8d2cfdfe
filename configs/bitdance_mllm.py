r"""BitDance's unified MLLM on UniWeTok's binary tokens (unimm_jax/systems/bitdance_mllm.py):
an LLM that reads images as connector(bits) + 2D sin-cos positions and writes them P tokens
at a time with the parallel binary diffusion head; edits keep every image in context as bits.
The UniWeTok paper's unified model (sec 4, Tables 11-13) and its fine-tunes UniWeTok-Gen,
-Edit and -Chat.

Variants, chosen by the text after the colon (comma-separated, applied in order):
  tiny     tests: the tiny UniWeTok at 16 px (4 x 4 tokens of 16 bits), P = 4, an LLM 32 wide.
  demo     the built-in scenes at 32 px through `configs/uniwetok.py:scenes` (8 x 8 tokens of
           32 bits; --config.system.tokenizer_path its workdir), P = 4, an LLM 128 wide;
           answers, draws and edits (understanding : generation : editing 2 : 2 : 1).
  paper    the UniWeTok paper's unified MLLM: Qwen3-8B (--config.model.init_path its
           transformers directory; the res and query tokens appended to its tokenizer as the
           authors' code does), the paper UniWeTok (downsampling 32, 16 x 8 bits;
           --config.system.tokenizer_path its state dict), 512 px (16 x 16 tokens), P = 16 (4 x 4
           patches), the head as wide as the LLM, 6 blocks / 2 adaLN, heads of 128, SwiGLU;
           the authors' training settings (AdamW 1e-5, (0.9, 0.95), eps 1e-15, 2000 warm-up
           steps then constant, text loss 0.01, image loss 1, prompts dropped 10 %, bits
           flipped with 0.1 u), 50 sampling steps, CFG 7.5.
  p1 / p4 / p16   P tokens per step (1: one token per step, the serial head).
  The fine-tunes (each a run with --config.train.init_from=<the unified run's workdir>):
  gen      UniWeTok-Gen: text-to-image conversations only;
  edit     UniWeTok-Edit: editing conversations only;
  chat     UniWeTok-Chat: understanding conversations only (binary tokens -> connector ->
           LLM); the head gets no gradient and is frozen.
  The paper trains at native resolutions (one sequence per image size); here a run has one
  square size, any multiple of the tokenizer's downsampling (config.system.image_size).

  python -m unimm_jax.main --config=configs/bitdance_mllm.py:demo --workdir=/tmp/bdm \
      --config.system.tokenizer_path=/tmp/uniwetok_scenes
"""
import ml_collections

from unimm_jax import config_defaults
from unimm_jax.data import mllm_data
from unimm_jax.systems import tokenizers


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  """Returns the BitDance MLLM config for a comma-separated list of variants."""
  config = config_defaults.base_config()
  config.task = "mllm"
  config.data = mllm_data.default_mllm_data_config()
  config.data.tokenizer = "scene_edit_words"
  # Their text_cond_dropout_prob: a tenth of the prompts dropped, so CFG has its
  # unconditional stream.
  config.data.cfg_dropout = 0.1
  config.system = ml_collections.ConfigDict(dict(
      name="bitdance_mllm",
      # A UniWeTok workdir or the authors' state dict (.safetensors); '' = a random tokenizer
      # (plumbing tests only).
      tokenizer_path="",
      # The authors' MLLModel state dict (.safetensors): LLM, head and connector start from it.
      weights_path="",
      image_size=32,  # square side in pixels, a multiple of the tokenizer's downsampling
      parallel=4,  # P tokens written per step: 1 or a square whose side divides D
  ))
  config.vq = config_defaults.load_config("configs/uniwetok.py:tiny").model
  config.model = config_defaults.scene_llm(qk_norm="rms")
  # The parallel binary diffusion head (models/bit_diffusion.py; their flow_head_parallel_x):
  # t logit-normal (-0.8, 0.8), one (t, eps) draw per block (diff_batch_mul 1), bits fed
  # back flipped with probability bit_flip * u (their vision_perturb).
  config.head = ml_collections.ConfigDict(dict(
      width=128, depth=6, adaln_blocks=2, head_dim=32, bounded=True, swiglu=True,
      noise_repeats=1,
      t_mean=-0.8, t_std=0.8, time_shift=1.0, bit_flip=0.1, dtype="float32"))
  # ce: the text term's weight (theirs 0.01 against the image term's 1.0; the built-in
  # variants train a small LLM from scratch, which needs the text term at full weight).
  config.loss = ml_collections.ConfigDict(dict(ce=1.0, bitdiff=1.0, z_loss=0.0))
  config.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, schedule="cosine",
      warmup_steps=20, grad_clip=1.0, groups=ml_collections.ConfigDict()))
  config.ema_decay = 0.0
  # Euler-Maruyama steps per block and the (constant) CFG scale of text-to-image.
  config.generation = ml_collections.ConfigDict(dict(cfg_scale=3.0, temperature=1.0,
                                                     num_steps=25, top_k=None, top_p=None))
  config_defaults.set_mllm_schedule(config)
  config = config_defaults.apply_variants(config, arg, _VARIANTS,
                                          "configs/bitdance_mllm.py")
  if config.data.tokenizer == "scene_edit_words":
    config.tokens, config.model.vocab_size = _scene_tokens(config)
  config.data.image_size = config.system.image_size
  return config


def _scene_tokens(config) -> tuple[ml_collections.ConfigDict, int]:
  """The scene words' pad, bos and eos, then BOI, EOI, the size tokens res_1..res_D and the
  P - 1 queries after its words (as the authors append <|res_k|> and <|query_i|>)."""
  tokens, vocab = config_defaults.scene_marker_tokens("scene_edit_words")
  side = config.system.image_size // tokenizers.spec(config.vq).downsample_factor(config.vq)
  tokens.size_base = vocab - 1  # res_k = size_base + k, k = 1..side
  tokens.query_base = vocab + side
  return tokens, vocab + side + config.system.parallel - 1


def _tiny(config):
  config.system.image_size = 16
  m = config.model
  m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads = 32, 64, 2, 4, 2
  config.head.update(dict(width=32, depth=2, adaln_blocks=1, head_dim=16))
  config.generation.num_steps = 4
  config.data.seq_len = 96
  config.data.images_per_row = 2
  config.data.max_edits = 1  # an edit example holds max_edits + 1 images
  config.eval.num_edits = 2
  config_defaults.set_mllm_test_schedule(config)


def _demo(config):
  """Scenes at 32 px through `configs/uniwetok.py:scenes` (8 x 8 tokens of 32 bits, 16
  steps of 4 per image); understanding : generation : editing 2 : 2 : 1."""
  config.vq = config_defaults.load_config("configs/uniwetok.py:scenes").model
  config.head.update(dict(width=128, depth=2, adaln_blocks=1, head_dim=32))
  config.data.seq_len, config.data.images_per_row = 512, 4
  config.data.questions_per_image = 6
  config.data.understanding_weight, config.data.generation_weight = 2.0, 2.0
  config.data.editing_weight, config.data.max_edits = 1.0, 2
  config.train.batch_size = 8
  config.train.steps = 1000
  config.train.update(dict(image_every=500, checkpoint_every=500, eval_every=500))
  config.eval.update(dict(batch_size=8, num_answers=240, num_edits=48))


def _paper(config):
  config.data.tokenizer = ""  # set to the Qwen3 checkpoint's tokenizer directory
  config.data.chat_template = "chatml"
  config.data.source, config.data.path = "jsonl", ""  # set to the conversations' JSONL files
  config.data.images_per_row = 2
  config.data.seq_len = 4096
  config.vq = config_defaults.load_config("configs/uniwetok.py:paper").model
  config.system.update(dict(image_size=512, parallel=16))
  # Qwen3's <|endoftext|> (pad; ChatML uses no BOS), <|im_end|>, <|vision_start|> and
  # <|vision_end|>; <|res_1|>..<|res_256|> then <|query_1|>..<|query_15|> appended after
  # its 151669 tokens (the authors' add_resolution_special_tokens / add_query_special_tokens;
  # the embedding is resized to the tokenizer's length, 151940).
  config.tokens = ml_collections.ConfigDict(dict(
      pad=151643, bos=151643, eos=151645, boi=151652, eoi=151653, size_base=151668,
      query_base=151925))
  config.model.update(dict(
      vocab_size=151940, hidden_size=4096, intermediate_size=12288, num_layers=36,
      num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
      qkv_bias=False, qk_norm="rms", dtype="bfloat16", scan_layers=True, remat=True))
  config.head.update(dict(width=4096, depth=6, adaln_blocks=2, head_dim=128,
                          dtype="bfloat16"))
  config.loss.ce = 0.01
  config.optim.update(dict(lr=1e-5, b1=0.9, b2=0.95, eps=1e-15, weight_decay=0.0,
                           schedule="constant", warmup_steps=2000))
  config.generation.update(dict(cfg_scale=7.5, num_steps=50))
  config.train.batch_size = 64
  config.mesh.update(dict(data=1, fsdp=-1, tensor=1))


def _parallel(p: int):
  def apply(config):
    config.system.parallel = p
  return apply


def _finetune(understanding: float, generation: float, editing: float):
  """A fine-tune's mixture; Chat (no generation) freezes the head, which gets no gradient."""
  def apply(config):
    config.data.understanding_weight = understanding
    config.data.generation_weight = generation
    config.data.editing_weight = editing
    if not generation and not editing:
      config.loss.bitdiff = 0.0
      config.optim.groups.head = dict(pattern=r"head/.*", lr_mult=1.0, weight_decay=None,
                                      frozen=True)
  return apply


_VARIANTS = {
    "tiny": _tiny,
    "demo": _demo,
    "paper": _paper,
    "p1": _parallel(1),
    "p4": _parallel(4),
    "p16": _parallel(16),
    "gen": _finetune(0.0, 1.0, 0.0),
    "edit": _finetune(0.0, 0.0, 1.0),
    "chat": _finetune(1.0, 0.0, 0.0),
}
