r"""EvoTok's unified MLLM (unimm_jax/systems/evotok_mllm.py): the LLM reads an image as the
EvoTok semantic decoder's features (through a Linear-GELU-Linear projector) and writes one
as the first L_pix residual codes of each token, predicted by a depth transformer.

Variants, chosen by the text after the colon (comma-separated, applied in order):
  tiny          tests: the tiny EvoTok (32 px, 4 x 4 tokens of 2 pixel codes of 16), an LLM 32
                wide, a 2-layer head; joint.
  demo          the built-in scenes (`configs/unitoken.py`'s data): a 32 px EvoTok trained on
                them (--config.system.tokenizer_path, see `launch/unified_demo.sh`), an LLM
                128 wide, one joint model that answers and draws.
  paper         Qwen2.5-7B-Instruct shape (--config.model.init_path a transformers qwen2
                directory, --config.data.tokenizer its tokenizer), the paper's EvoTok
                (--config.system.tokenizer_path its workdir or the authors' .safetensors), the
                head 2560 wide, 40 heads, 6 layers, dropout 0.1; batch 8 x 16 GPUs = 128.
  The authors' four stages (each a separate run; `--config.train.init_from` the previous
  stage's workdir), after a size:
  und_pretrain  understanding model, LLaVA-Pretrain captions: the projector alone, lr 1e-3;
  und_sft       understanding model, instruction data: the LLM and projector, lr 2e-5;
  gen_pretrain  generation model: gen_projector, depth head and the LLM's input embedding
                (their image markers are new tokens, so `tune_mm_mlp_adapter` opens the
                embedding) at lr 1e-3, the rest of the LLM frozen;
  gen_sft       generation model: everything but the tokenizer, lr 2e-5.
  All stages: AdamW without weight decay, cosine schedule, 3% warmup (their scripts).
  joint         one model for both (ours: the authors train two), understanding and
                generation examples 1:1.

  python -m unimm_jax.main --config=configs/evotok_mllm.py:demo --workdir=/tmp/evotok_mllm \
      --config.system.tokenizer_path=/tmp/evotok_scenes
"""
import ml_collections

from unimm_jax import config_defaults
from unimm_jax.data import mllm_data


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  """Returns the EvoTok MLLM config for a comma-separated list of variants."""
  config = config_defaults.base_config()
  config.task = "mllm"
  config.data = mllm_data.default_mllm_data_config()
  config.data.tokenizer = "scene_words"
  config.system = ml_collections.ConfigDict(dict(
      name="evotok",
      mode="joint",  # 'understanding' | 'generation' (the authors' two models) | 'joint'
      # An EvoTok tokenizer workdir or the authors' state dict (.safetensors); '' = a random
      # tokenizer (plumbing tests only).
      tokenizer_path="",
  ))
  config.vq = config_defaults.load_config("configs/evotok.py:tiny").model
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=0,  # set from config.tokens for the scene words
      hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4, num_kv_heads=2,
      head_dim=0, rope_theta=10000.0, rms_norm_eps=1e-6, qkv_bias=True, qk_norm="",
      tie_word_embeddings=False, dtype="float32", scan_layers=False, remat=False,
      attention_impl="xla",
      init_path=""))  # a transformers qwen2 directory the LLM of a fresh run starts from
  config.depth_head = ml_collections.ConfigDict(dict(
      width=128, num_heads=4, num_layers=2, dropout_rate=0.1, dtype="float32"))
  config.loss = ml_collections.ConfigDict(dict(image_ce=1.0, z_loss=0.0))
  config.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.0, schedule="cosine",
      warmup_steps=20, grad_clip=1.0, groups=ml_collections.ConfigDict()))
  config.ema_decay = 0.0
  # The authors' sampling: CFG 3.0 in their code (the paper reports 7.5), temperature 1,
  # top-k 900, top-p 0.96.
  config.generation = ml_collections.ConfigDict(dict(cfg_scale=3.0, temperature=1.0,
                                                     top_k=900, top_p=0.96))
  config_defaults.set_mllm_schedule(config)
  config = config_defaults.apply_variants(config, arg, _VARIANTS, "configs/evotok_mllm.py")
  if config.data.tokenizer == "scene_words":
    config.tokens, config.model.vocab_size = config_defaults.scene_marker_tokens("scene_words")
  config.data.image_size = config.vq.encoder.image_size
  return config


def _tiny(config):
  m = config.model
  m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads = 32, 64, 2, 4, 2
  config.depth_head.update(dict(width=32, num_heads=4, num_layers=2))
  config.data.seq_len = 96
  config.data.images_per_row = 2
  config_defaults.set_mllm_test_schedule(config)


def _demo(config):
  """Scenes at 32 px through `configs/evotok.py:scenes` (8 x 8 tokens, the first 4 of 8
  levels of 256 codes generate): 64 slots per image."""
  config.vq = config_defaults.load_config("configs/evotok.py:scenes").model
  config.data.seq_len, config.data.images_per_row = 512, 4
  config.data.questions_per_image = 6
  config.train.batch_size = 8
  config.train.steps = 950
  config.train.update(dict(image_every=950, checkpoint_every=950, eval_every=950))
  config.eval.update(dict(batch_size=8, num_answers=240))


def _paper(config):
  config.data.tokenizer = ""  # set to the Qwen2.5 checkpoint's tokenizer directory
  config.data.chat_template = "chatml"  # Qwen's turns, with its default system prompt
  config.data.source, config.data.path = "jsonl", ""  # set to the conversations' JSONL files
  config.data.images_per_row = 1
  config.data.seq_len = 2048  # their model_max_length
  config.vq = config_defaults.load_config("configs/evotok.py:paper").model
  # Qwen2.5's <|endoftext|> (pad; ChatML uses no BOS), <|im_end|> (end of turn), and the
  # two markers they add after its 151665 tokens (the embedding has 152064 rows).
  config.tokens = ml_collections.ConfigDict(dict(
      pad=151643, bos=151643, eos=151645, boi=151665, eoi=151666))
  config.model.update(dict(
      vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
      num_heads=28, num_kv_heads=4, head_dim=0, rope_theta=1e6, rms_norm_eps=1e-6,
      qkv_bias=True, dtype="bfloat16", scan_layers=True, remat=True))
  config.depth_head.update(dict(width=2560, num_heads=40, num_layers=6, dtype="bfloat16"))
  config.train.batch_size = 128
  config.mesh.update(dict(data=1, fsdp=-1, tensor=1))


def _stage(mode: str, lr: float, frozen: str | None):
  """One of the authors' stages: the model `mode`, lr, and (pretraining) the LLM
  parameters kept frozen, a regular expression over their paths (`frozen`)."""
  def apply(config):
    config.system.mode = mode
    config.data.understanding_weight = 1.0 if mode == "understanding" else 0.0
    config.data.generation_weight = 1.0 if mode == "generation" else 0.0
    config.loss.image_ce = 1.0 if mode == "generation" else 0.0  # no head to train
    config.optim.lr = lr
    config.optim.weight_decay = 0.0
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = max(1, round(0.03 * config.train.steps))
    if frozen is not None:
      config.optim.groups.llm = dict(pattern=frozen, lr_mult=1.0, weight_decay=None,
                                     frozen=True)
  return apply


def _joint(config):
  config.system.mode = "joint"
  config.data.understanding_weight = config.data.generation_weight = 1.0
  config.loss.image_ce = 1.0


_VARIANTS = {
    "tiny": _tiny,
    "demo": _demo,
    "paper": _paper,
    "und_pretrain": _stage("understanding", 1e-3, r"llm/.*"),
    "und_sft": _stage("understanding", 2e-5, None),
    "gen_pretrain": _stage("generation", 1e-3, r"llm/(?!embed_tokens/).*"),
    "gen_sft": _stage("generation", 2e-5, None),
    "joint": _joint,
}
